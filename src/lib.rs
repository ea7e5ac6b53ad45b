//! Shared pieces of diesel-memclone's integration tests, examples and benches: the schema, the
//! models, connections to the test servers, a database query counter and a cuttable Redis link.
//! Not published.

/// Runs `$e` and returns its value and the number of SQL statements `$counter` saw it run.
#[macro_export]
macro_rules! counted {
    ($counter:expr, $e:expr) => {{
        let before = $counter.get();
        let value = $e;
        (value, $counter.get() - before)
    }};
}

/// Declares one test per store for `$scenario(cache, schema)`: PostgreSQL (in a fresh schema)
/// with the single Redis, the Redis Cluster and the in-process store.
#[macro_export]
macro_rules! on_every_store {
    ($scenario:ident: $single:ident, $cluster:ident, $memory:ident) => {
        #[tokio::test]
        async fn $single() {
            let schema = $crate::unique("store");
            let (Some(_), Some(store)) =
                ($crate::postgres(&schema).await, $crate::redis_store().await)
            else {
                return;
            };
            let cache = diesel_memclone::Cache::builder()
                .store(store)
                .namespace($crate::unique("store"));
            $scenario(cache.build().unwrap(), &schema).await;
        }

        #[tokio::test]
        async fn $cluster() {
            let schema = $crate::unique("store");
            let (Some(_), Some(store)) = (
                $crate::postgres(&schema).await,
                $crate::redis_cluster_store().await,
            ) else {
                return;
            };
            let cache = diesel_memclone::Cache::builder()
                .store(store)
                .namespace($crate::unique("store"));
            $scenario(cache.build().unwrap(), &schema).await;
        }

        #[tokio::test]
        async fn $memory() {
            let schema = $crate::unique("store");
            let Some(_) = $crate::postgres(&schema).await else {
                return;
            };
            let cache = diesel_memclone::Cache::builder().namespace($crate::unique("store"));
            $scenario(cache.build().unwrap(), &schema).await;
        }
    };
}

pub mod bench;
pub mod counting;
pub mod proxy;
pub mod service;

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::prelude::*;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{
    AsyncConnection, AsyncMysqlConnection, AsyncPgConnection, SimpleAsyncConnection,
};
use diesel_memclone::deadpool_redis::redis;
use diesel_memclone::{CacheValue, MemClone};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The SQLite connection type the tests use.
pub type SqliteConn = SyncConnectionWrapper<diesel::SqliteConnection>;

#[allow(missing_docs)]
pub mod schema {
    diesel::table! {
        users (id) {
            id -> Integer,
            name -> Text,
            status -> Text,
        }
    }

    diesel::table! {
        posts (id) {
            id -> Integer,
            user_id -> Integer,
            title -> Text,
        }
    }

    diesel::table! {
        memberships (org_id, user_id) {
            org_id -> Integer,
            user_id -> Integer,
            role -> Text,
        }
    }

    diesel::joinable!(posts -> users (user_id));
    diesel::allow_tables_to_appear_in_same_query!(users, posts, memberships);
}

use schema::{memberships, posts, users};

/// A user.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    Selectable,
    Identifiable,
    Insertable,
    Serialize,
    Deserialize,
    MemClone,
)]
#[diesel(table_name = users)]
#[memclone(scope(id))]
pub struct User {
    /// Primary key.
    pub id: i32,
    /// Display name.
    pub name: String,
    /// `active` or anything else.
    pub status: String,
}

/// A post, belonging to a user.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    Selectable,
    Identifiable,
    Insertable,
    Associations,
    Serialize,
    Deserialize,
    MemClone,
)]
#[diesel(table_name = posts, belongs_to(User))]
#[memclone(ttl = 600, scope(user_id))]
pub struct Post {
    /// Primary key.
    pub id: i32,
    /// Author.
    pub user_id: i32,
    /// Title.
    pub title: String,
}

/// A membership, with a composite primary key.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone,
)]
#[diesel(table_name = memberships, primary_key(org_id, user_id))]
pub struct Membership {
    /// Organisation.
    pub org_id: i32,
    /// Member.
    pub user_id: i32,
    /// Role in the organisation.
    pub role: String,
}

/// A user's name and post count: a result that is not a model.
#[derive(Debug, Clone, PartialEq, Queryable, Serialize, Deserialize, CacheValue)]
pub struct NameCount {
    /// The user's name.
    pub name: String,
    /// How many posts.
    pub posts: i64,
}

/// Counts the SQL statements a connection runs.
#[derive(Clone, Default, Debug)]
pub struct QueryCounter(Arc<AtomicUsize>);

impl QueryCounter {
    /// Statements run so far.
    pub fn get(&self) -> usize {
        AtomicUsize::load(&self.0, Ordering::SeqCst)
    }

    /// Attaches the counter to a connection.
    pub fn attach<C: AsyncConnection>(&self, conn: &mut C) {
        conn.set_instrumentation(self.clone());
    }

    /// Attaches the counter to a synchronous connection.
    pub fn attach_sync<C: diesel::Connection>(&self, conn: &mut C) {
        conn.set_instrumentation(self.clone());
    }
}

impl Instrumentation for QueryCounter {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::StartQuery { .. } = event {
            AtomicUsize::fetch_add(&self.0, 1, Ordering::SeqCst);
        }
    }
}

/// True when CI demands every server (`MEMCLONE_REQUIRE_SERVERS=1`).
pub fn servers_required() -> bool {
    std::env::var("MEMCLONE_REQUIRE_SERVERS").is_ok_and(|v| v == "1" || v == "true")
}

/// Reports a missing server: a failure under `MEMCLONE_REQUIRE_SERVERS=1`, a loud skip otherwise.
pub fn server_missing(what: &str, error: impl std::fmt::Display) {
    if servers_required() {
        panic!("{what} is required (MEMCLONE_REQUIRE_SERVERS=1) but unreachable: {error}");
    }
    // Written to the stderr handle, not with `eprintln!`: the test harness captures the macros'
    // output of passing tests, and a skip has to be seen by whoever reads the run.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n!!! SKIPPED ({}): {what} unreachable ({error}); set MEMCLONE_REQUIRE_SERVERS=1 to fail instead\n",
        std::thread::current().name().unwrap_or("a test")
    );
}

/// PostgreSQL URL: `DATABASE_URL` or the local test database.
pub fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// MySQL/MariaDB URL: `MYSQL_URL` or the local test database.
pub fn mysql_url() -> String {
    std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// Redis URL: `REDIS_URL` or the local server.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A name unique to this process and call, for schemas, databases and namespaces.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

const PG_TABLES: &str = "
    CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, title TEXT NOT NULL);
    CREATE TABLE memberships (org_id INTEGER NOT NULL, user_id INTEGER NOT NULL, role TEXT NOT NULL,
                              PRIMARY KEY (org_id, user_id));";

const MYSQL_TABLES: &str = "
    CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(255) NOT NULL, status VARCHAR(64) NOT NULL);
    CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, title VARCHAR(255) NOT NULL);
    CREATE TABLE memberships (org_id INTEGER NOT NULL, user_id INTEGER NOT NULL, role VARCHAR(64) NOT NULL,
                              PRIMARY KEY (org_id, user_id));";

/// A PostgreSQL connection in a fresh schema of its own (so tests run in parallel), or `None`
/// (reported) when the server is unreachable.
pub async fn postgres(schema: &str) -> Option<AsyncPgConnection> {
    let mut conn = match AsyncPgConnection::establish(&postgres_url()).await {
        Ok(conn) => conn,
        Err(e) => {
            server_missing("PostgreSQL", e);
            return None;
        }
    };
    let setup = format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema}; {PG_TABLES}"
    );
    conn.batch_execute(&setup)
        .await
        .expect("create the test schema");
    Some(conn)
}

/// Another connection to a schema made by [`postgres`].
pub async fn postgres_again(schema: &str) -> AsyncPgConnection {
    let mut conn = AsyncPgConnection::establish(&postgres_url())
        .await
        .expect("connect");
    conn.batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .expect("search_path");
    conn
}

/// A MariaDB/MySQL connection in a fresh database of its own, or `None` (reported).
pub async fn mysql(database: &str) -> Option<AsyncMysqlConnection> {
    let mut conn = match AsyncMysqlConnection::establish(&mysql_url()).await {
        Ok(conn) => conn,
        Err(e) => {
            server_missing("MariaDB/MySQL", e);
            return None;
        }
    };
    let setup = format!("DROP DATABASE IF EXISTS {database}; CREATE DATABASE {database}; USE {database}; {MYSQL_TABLES}");
    conn.batch_execute(&setup)
        .await
        .expect("create the test database");
    Some(conn)
}

/// Another connection to a database made by [`mysql`] or [`mysql_sync`].
pub async fn mysql_again(database: &str) -> AsyncMysqlConnection {
    AsyncMysqlConnection::establish(&mysql_url_of(database))
        .await
        .expect("connect")
}

/// [`mysql_url`] with its database replaced by `database`.
pub fn mysql_url_of(database: &str) -> String {
    let base = mysql_url();
    let server = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(server, _)| server);
    format!("{server}/{database}")
}

/// An in-memory SQLite connection with the tables.
pub async fn sqlite() -> SqliteConn {
    let mut conn = SqliteConn::establish(":memory:")
        .await
        .expect("open SQLite");
    conn.batch_execute(PG_TABLES).await.expect("create tables");
    conn
}

/// A synchronous in-memory SQLite connection with the tables.
pub fn sqlite_sync() -> diesel::SqliteConnection {
    use diesel::connection::SimpleConnection;
    let mut conn = diesel::SqliteConnection::establish(":memory:").expect("open SQLite");
    conn.batch_execute(PG_TABLES).expect("create tables");
    conn
}

/// A synchronous PostgreSQL connection in a fresh schema of its own, or `None` (reported).
pub fn postgres_sync(schema: &str) -> Option<diesel::PgConnection> {
    use diesel::connection::SimpleConnection;
    let mut conn = match diesel::PgConnection::establish(&postgres_url()) {
        Ok(conn) => conn,
        Err(e) => {
            server_missing("PostgreSQL", e);
            return None;
        }
    };
    let setup = format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema}; {PG_TABLES}"
    );
    conn.batch_execute(&setup).expect("create the test schema");
    Some(conn)
}

/// A synchronous MariaDB/MySQL connection in a fresh database of its own, or `None` (reported).
pub fn mysql_sync(database: &str) -> Option<diesel::MysqlConnection> {
    use diesel::connection::SimpleConnection;
    let mut conn = match diesel::MysqlConnection::establish(&mysql_url()) {
        Ok(conn) => conn,
        Err(e) => {
            server_missing("MariaDB/MySQL", e);
            return None;
        }
    };
    let setup = format!("DROP DATABASE IF EXISTS {database}; CREATE DATABASE {database}; USE {database}; {MYSQL_TABLES}");
    conn.batch_execute(&setup)
        .expect("create the test database");
    Some(conn)
}

/// Another synchronous connection to a database made by [`mysql`] or [`mysql_sync`].
pub fn mysql_sync_again(database: &str) -> diesel::MysqlConnection {
    diesel::MysqlConnection::establish(&mysql_url_of(database)).expect("connect")
}

/// A Redis store on the test server for synchronous code, built without any async runtime
/// (connections are made on first use), or `None` (reported) when the server is unreachable.
pub fn redis_store_sync() -> Option<diesel_memclone::store::RedisStore> {
    let url = redis_url();
    reachable("Redis", &url)?;
    Some(
        diesel_memclone::store::RedisStore::builder(url)
            .build()
            .expect("valid URL"),
    )
}

/// A store on the test Redis Cluster for synchronous code, or `None` (reported).
pub fn redis_cluster_store_sync() -> Option<diesel_memclone::store::RedisStore> {
    let urls = redis_cluster_urls();
    for url in &urls {
        reachable("Redis Cluster", url)?;
    }
    Some(
        diesel_memclone::store::RedisStore::cluster_builder(urls)
            .build()
            .expect("valid URLs"),
    )
}

/// `Some(())` when a TCP connection to the host of `url` succeeds, else reported.
fn reachable(what: &str, url: &str) -> Option<()> {
    let address = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .trim_end_matches('/')
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    match std::net::TcpStream::connect(&address) {
        Ok(_) => Some(()),
        Err(error) => {
            server_missing(what, error);
            None
        }
    }
}

/// A Redis store on the test server, or `None` (reported) when it is unreachable.
pub async fn redis_store() -> Option<diesel_memclone::store::RedisStore> {
    redis_store_at(&redis_url()).await
}

/// A Redis store at `url`, once it connected, or `None` (reported).
pub async fn redis_store_at(url: &str) -> Option<diesel_memclone::store::RedisStore> {
    let store = diesel_memclone::store::RedisStore::builder(url)
        .build()
        .expect("valid URL");
    checked(store, "Redis").await
}

/// Redis Cluster node URLs: `REDIS_CLUSTER_URLS` (comma-separated) or the three local nodes
/// `.ci/run` starts on ports 7000-7002.
pub fn redis_cluster_urls() -> Vec<String> {
    std::env::var("REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into()
        })
        .split(',')
        .map(|u| u.trim().to_owned())
        .collect()
}

/// A store on the test Redis Cluster, or `None` (reported) when it is unreachable.
pub async fn redis_cluster_store() -> Option<diesel_memclone::store::RedisStore> {
    let store = diesel_memclone::store::RedisStore::cluster_builder(redis_cluster_urls())
        .build()
        .expect("valid URLs");
    checked(store, "Redis Cluster").await
}

/// The store, once its connections open (proof that its server answers), or `None` (reported).
async fn checked(
    store: diesel_memclone::store::RedisStore,
    what: &str,
) -> Option<diesel_memclone::store::RedisStore> {
    match tokio::time::timeout(std::time::Duration::from_secs(5), store.connect()).await {
        Ok(Ok(())) => Some(store),
        Ok(Err(e)) => {
            server_missing(what, e);
            None
        }
        Err(_) => {
            server_missing(what, "no answer in 5 s");
            None
        }
    }
}

/// A Redis connection of the tests' own, beside the store under test, for raw commands: to
/// look at the keys a cache wrote, or to plant keys it must cope with. (The store offers no
/// raw access.) Cheap to clone: a multiplexed connection.
#[derive(Clone)]
pub struct RawRedis(RawConnection);

#[derive(Clone)]
enum RawConnection {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RawRedis {
    /// A connection to the server at `url`.
    pub async fn open(url: &str) -> redis::RedisResult<RawRedis> {
        let conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        Ok(RawRedis(RawConnection::Single(conn)))
    }

    /// A connection to the cluster of these nodes.
    pub async fn open_cluster(urls: &[String]) -> redis::RedisResult<RawRedis> {
        let conn = redis::cluster::ClusterClient::new(urls.to_vec())?
            .get_async_connection()
            .await?;
        Ok(RawRedis(RawConnection::Cluster(conn)))
    }

    /// A connection to the test server ([`redis_url`]) or the test cluster
    /// ([`redis_cluster_urls`]); panics if it does not open (call it once the store answered).
    pub async fn test_server(cluster: bool) -> RawRedis {
        let opened = match cluster {
            true => RawRedis::open_cluster(&redis_cluster_urls()).await,
            false => RawRedis::open(&redis_url()).await,
        };
        opened.expect("a raw connection to the test Redis")
    }

    /// Runs one command and returns its reply; an error reply is an error.
    pub async fn query(&self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        match self.0.clone() {
            RawConnection::Single(mut conn) => cmd.query_async(&mut conn).await,
            RawConnection::Cluster(mut conn) => cmd.query_async(&mut conn).await,
        }
    }

    /// Runs one command and converts its reply; panics on an error or a reply of another type.
    pub async fn query_as<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let reply = self.query(cmd).await;
        let reply = reply.unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        T::from_redis_value(reply).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }
}

/// User names in id order, read through `cache` under the label `names` (the read most tests
/// repeat).
pub async fn user_names(
    cache: &diesel_memclone::Cache,
    conn: &mut AsyncPgConnection,
) -> Vec<String> {
    use diesel_memclone::CachedDsl as _;
    users::table
        .select(users::name)
        .order(users::id)
        .cached("names")
        .using(cache)
        .load(conn)
        .await
        .expect("cached read of the user names")
}

/// Silences the unused warning on `memberships` when a test does not use it.
pub fn _uses(_: memberships::table, _: posts::table) {}

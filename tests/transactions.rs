//! `diesel_memclone::transaction` on pooled connections (bb8, deadpool), with helpers that take
//! the plain connection type, savepoints, diesel-async's own transactions and both closure forms.
//! Every hit and miss is proven by counting the statements another connection runs.

use diesel::prelude::*;
use diesel_async::pooled_connection::{bb8, deadpool, AsyncDieselConnectionManager};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, AsyncPgConnection, RunQueryDsl};
use diesel_memclone::{Cache, CachedDsl, Error};
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::{
    counted, mysql, mysql_url, postgres, postgres_again, postgres_url, redis_store, unique,
    user_names, QueryCounter, User,
};
use std::ops::DerefMut;
use std::sync::Arc;
use tokio::sync::Mutex;

/// A helper as applications write them: it takes the plain connection type, whatever pool the
/// caller's connection came from.
async fn write_user(
    conn: &mut AsyncPgConnection,
    cache: &Cache,
    id: i32,
    name: &str,
) -> Result<usize, Error> {
    diesel_memclone::update(users::table.find(id))
        .set(users::name.eq(name))
        .using(cache)
        .execute(conn)
        .await
}

/// A helper that opens its own (nested) memclone transaction on the plain connection type.
async fn rename_in_savepoint(
    conn: &mut AsyncPgConnection,
    cache: &Cache,
    id: i32,
    name: &str,
    roll_back: bool,
) -> Result<(), Error> {
    diesel_memclone::transaction(conn, async |conn| {
        write_user(conn, cache, id, name).await?;
        if roll_back {
            return Err(Error::Database(diesel::result::Error::RollbackTransaction));
        }
        Ok(())
    })
    .await
}

/// The URL of the test database with `search_path` set to `schema` for every pooled connection.
fn pooled_url(schema: &str) -> String {
    let url = postgres_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-csearch_path%3D{schema}")
}

/// A cache on the test Redis, or `None` (reported) when Redis or PostgreSQL is unreachable;
/// also makes the schema and inserts user 1, "Ann".
async fn setup(schema: &str) -> Option<Cache> {
    let (Some(mut conn), Some(store)) = (postgres(schema).await, redis_store().await) else {
        return None;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("txn"))
        .build()
        .unwrap();
    diesel_memclone::insert_into(users::table)
        .values(&User {
            id: 1,
            name: "Ann".into(),
            status: "a".into(),
        })
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    Some(cache)
}

/// Another connection whose statements are counted, and its cached read of the names (with
/// how many statements it ran: 0 is a hit, 1 a miss).
#[derive(Clone)]
struct Observer {
    conn: Arc<Mutex<AsyncPgConnection>>,
    counter: QueryCounter,
    cache: Cache,
}

impl Observer {
    async fn new(schema: &str, cache: &Cache) -> Self {
        let mut conn = postgres_again(schema).await;
        let counter = QueryCounter::default();
        counter.attach(&mut conn);
        Observer {
            conn: Arc::new(Mutex::new(conn)),
            counter,
            cache: cache.clone(),
        }
    }

    async fn names(&self) -> (Vec<String>, usize) {
        let mut conn = self.conn.lock().await;
        counted!(self.counter, user_names(&self.cache, &mut conn).await)
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|n| n.to_string()).collect()
}

/// The whole scenario on one pooled connection `pooled`: a helper's write is deferred to the
/// commit, a rollback leaves the cache alone, nested memclone transactions (in a helper) and
/// diesel-async transactions nested inside a memclone one are savepoints whose writes wait for
/// the outermost commit.
async fn deferred_until_commit_on<P>(mut pooled: P, cache: Cache, schema: &str)
where
    P: DerefMut<Target = AsyncPgConnection> + Send,
{
    let observer = Observer::new(schema, &cache).await;
    assert_eq!(observer.names().await, (names(&["Ann"]), 1), "fill");
    assert_eq!(observer.names().await, (names(&["Ann"]), 0), "hit");

    // Commit: the helper's write is deferred, the observer keeps hitting until the commit.
    let (cache, observer) = (&cache, &observer);
    let committed: Result<(), Error> = diesel_memclone::transaction(&mut pooled, async |conn| {
        write_user(conn, cache, 1, "Anne").await?;
        assert_eq!(
            observer.names().await,
            (names(&["Ann"]), 0),
            "before the commit another connection still hits the old entry"
        );
        assert_eq!(
            user_names(cache, conn).await,
            ["Anne"],
            "the transaction's own read bypasses what it wrote"
        );
        Ok(())
    })
    .await;
    committed.unwrap();
    assert_eq!(
        observer.names().await,
        (names(&["Anne"]), 1),
        "the commit invalidated: a miss"
    );
    assert_eq!(observer.names().await, (names(&["Anne"]), 0), "hit");

    // Rollback: the cache is untouched (still a hit on the committed name).
    let rolled_back: Result<(), Error> = diesel_memclone::transaction(&mut pooled, async |conn| {
        write_user(conn, cache, 1, "Nope").await?;
        Err(Error::Database(diesel::result::Error::RollbackTransaction))
    })
    .await;
    assert!(rolled_back.is_err());
    assert_eq!(
        observer.names().await,
        (names(&["Anne"]), 0),
        "a rollback leaves the cache as it was"
    );

    // Savepoints: a helper's nested memclone transactions (one rolled back, one committed) and
    // a diesel-async transaction nested inside; all wait for the outermost commit.
    let nested: Result<(), Error> = diesel_memclone::transaction(&mut pooled, async |conn| {
        let failed = rename_in_savepoint(conn, cache, 1, "Ghost", true).await;
        assert!(failed.is_err());
        rename_in_savepoint(conn, cache, 1, "Annie", false).await?;
        let plain: &mut AsyncPgConnection = conn;
        plain
            .transaction::<_, Error, _>(async |conn| {
                write_user(conn, cache, 1, "Annabel").await?;
                Ok(())
            })
            .await?;
        assert_eq!(
            observer.names().await,
            (names(&["Anne"]), 0),
            "savepoints released inside do not invalidate"
        );
        Ok(())
    })
    .await;
    nested.unwrap();
    assert_eq!(
        observer.names().await,
        (names(&["Annabel"]), 1),
        "the outermost commit invalidated"
    );
    assert_eq!(observer.names().await, (names(&["Annabel"]), 0), "hit");
}

#[tokio::test]
async fn a_helpers_write_waits_for_the_commit_on_a_bb8_pooled_connection() {
    let schema = unique("txn_bb8");
    let Some(cache) = setup(&schema).await else {
        return;
    };
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(pooled_url(&schema));
    let pool = bb8::Pool::builder()
        .max_size(1)
        .build(manager)
        .await
        .unwrap();
    let pooled = pool.get().await.unwrap();
    deferred_until_commit_on(pooled, cache, &schema).await;
}

#[tokio::test]
async fn a_helpers_write_waits_for_the_commit_on_a_deadpool_pooled_connection() {
    let schema = unique("txn_deadpool");
    let Some(cache) = setup(&schema).await else {
        return;
    };
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(pooled_url(&schema));
    let pool = deadpool::Pool::builder(manager)
        .max_size(1)
        .build()
        .unwrap();
    let pooled = pool.get().await.unwrap();
    deferred_until_commit_on(pooled, cache, &schema).await;
}

/// Two connections in one task: a write on the outer transaction's connection, made inside
/// another connection's memclone transaction, waits for the outer commit (it is neither refused
/// nor delivered with the inner commit).
#[tokio::test]
async fn a_write_on_an_outer_transactions_connection_waits_for_that_commit() {
    let schema = unique("txn_two");
    let Some(cache) = setup(&schema).await else {
        return;
    };
    let mut outer = postgres_again(&schema).await;
    let mut inner = postgres_again(&schema).await;
    let observer = Observer::new(&schema, &cache).await;
    assert_eq!(observer.names().await.1, 1, "fill");
    let (cache, observer, inner) = (&cache, &observer, &mut inner);
    let outcome: Result<(), Error> = diesel_memclone::transaction(&mut outer, async |outer| {
        diesel_memclone::transaction(inner, async |_inner| {
            write_user(outer, cache, 1, "Anne").await
        })
        .await?;
        assert_eq!(
            observer.names().await,
            (names(&["Ann"]), 0),
            "the inner commit does not deliver the outer connection's write"
        );
        assert_eq!(
            user_names(cache, outer).await,
            ["Anne"],
            "the outer transaction's read bypasses what it wrote"
        );
        Ok(())
    })
    .await;
    outcome.unwrap();
    assert_eq!(
        observer.names().await,
        (names(&["Anne"]), 1),
        "the outer commit did"
    );
}

/// A pooled connection handed to another task after a memclone transaction carries nothing of
/// it: the transaction future is `Send` (spawned), and in the next task a write in diesel-async's
/// own transaction is refused while an autocommit write invalidates at once.
#[tokio::test]
async fn a_pooled_connection_reused_by_another_task_carries_no_transaction() {
    let schema = unique("txn_reuse");
    let Some(cache) = setup(&schema).await else {
        return;
    };
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(pooled_url(&schema));
    let pool = deadpool::Pool::builder(manager)
        .max_size(1)
        .build()
        .unwrap();
    let observer = Observer::new(&schema, &cache).await;
    assert_eq!(observer.names().await.1, 1, "fill");
    let (first_pool, first_cache) = (pool.clone(), cache.clone());
    tokio::spawn(async move {
        let mut pooled = first_pool.get().await.unwrap();
        diesel_memclone::transaction(&mut pooled, async |conn| {
            write_user(conn, &first_cache, 1, "Anne").await
        })
        .await
        .unwrap();
    })
    .await
    .unwrap();
    assert_eq!(observer.names().await, (names(&["Anne"]), 1), "committed");
    let (second_pool, second_cache) = (pool.clone(), cache.clone());
    tokio::spawn(async move {
        let mut pooled = second_pool.get().await.unwrap();
        let cache = &second_cache;
        let refused = pooled
            .transaction::<_, Error, _>(async |conn| write_user(conn, cache, 1, "Sneaky").await)
            .await;
        assert!(matches!(refused, Err(Error::UnmanagedTransaction)));
        write_user(&mut pooled, cache, 1, "Annie").await.unwrap();
    })
    .await
    .unwrap();
    assert_eq!(
        observer.names().await,
        (names(&["Annie"]), 1),
        "the autocommit write invalidated at once"
    );
}

/// The text the refusal must contain: exactly what to write instead.
const INSTEAD: &str = "write `diesel_memclone::transaction(conn, async |conn| { .. })` instead of `conn.transaction(async |conn| { .. })`";

/// A memclone write inside diesel-async's own outermost transaction cannot be told when the
/// transaction commits: it is refused before it runs, the error saying what to write, and
/// nothing is invalidated.
#[tokio::test]
async fn a_write_in_diesel_asyncs_own_transaction_is_refused_with_what_to_write_instead() {
    let schema = unique("txn_refuse");
    let Some(cache) = setup(&schema).await else {
        return;
    };
    let mut conn = postgres_again(&schema).await;
    let observer = Observer::new(&schema, &cache).await;
    assert_eq!(observer.names().await.1, 1, "fill");
    let cache_ref = &cache;
    let refused = conn
        .transaction::<_, Error, _>(async |conn| {
            write_user(conn, cache_ref, 1, "Sneaky").await?;
            Ok(())
        })
        .await;
    let error = refused.unwrap_err();
    assert!(matches!(error, Error::UnmanagedTransaction), "{error:?}");
    assert!(error.to_string().contains(INSTEAD), "{error}");
    // A memclone transaction opened inside one is refused the same way.
    let refused = conn
        .transaction::<_, Error, _>(async |conn| {
            diesel_memclone::transaction(conn, async |_conn| Ok::<_, Error>(())).await
        })
        .await;
    assert!(refused.unwrap_err().to_string().contains(INSTEAD));
    assert_eq!(
        observer.names().await,
        (names(&["Ann"]), 0),
        "nothing ran, nothing was invalidated"
    );
}

/// MariaDB: the same deferral on a bb8-pooled connection, written by a helper that takes the
/// plain `AsyncMysqlConnection`.
#[tokio::test]
async fn a_helpers_write_waits_for_the_commit_on_a_bb8_pooled_mariadb_connection() {
    let database = unique("txn_my");
    let (Some(mut observer), Some(store)) = (mysql(&database).await, redis_store().await) else {
        return;
    };
    async fn write_user(
        conn: &mut AsyncMysqlConnection,
        cache: &Cache,
        name: &str,
    ) -> Result<usize, Error> {
        diesel_memclone::update(users::table.find(1))
            .set(users::name.eq(name))
            .using(cache)
            .execute(conn)
            .await
    }
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("txn_my"))
        .build()
        .unwrap();
    diesel::sql_query("INSERT INTO users VALUES (1, 'Ann', 'a')")
        .execute(&mut observer)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut observer);
    assert_eq!(
        read_names_my(&mut observer, &cache, &counter).await,
        (names(&["Ann"]), 1),
        "fill"
    );
    let base = mysql_url();
    let manager = AsyncDieselConnectionManager::<AsyncMysqlConnection>::new(format!(
        "{}/{database}",
        base.rsplit_once('/').unwrap().0
    ));
    let pool = bb8::Pool::builder()
        .max_size(1)
        .build(manager)
        .await
        .unwrap();
    let mut pooled = pool.get().await.unwrap();
    let observer = Arc::new(Mutex::new(observer));
    let (cache_ref, observer_ref, counter_ref) = (cache.clone(), observer.clone(), counter.clone());
    let outcome: Result<(), Error> = diesel_memclone::transaction(&mut pooled, async move |conn| {
        write_user(conn, &cache_ref, "Anne").await?;
        let mut observer = observer_ref.lock().await;
        assert_eq!(
            read_names_my(&mut observer, &cache_ref, &counter_ref).await,
            (names(&["Ann"]), 0),
            "still a hit before the commit"
        );
        Ok(())
    })
    .await;
    outcome.unwrap();
    assert_eq!(
        read_names_my(&mut *observer.lock().await, &cache, &counter).await,
        (names(&["Anne"]), 1),
        "a miss after it"
    );
}

/// The cached read of the names on MariaDB, with the statements it ran.
async fn read_names_my(
    conn: &mut AsyncMysqlConnection,
    cache: &Cache,
    counter: &QueryCounter,
) -> (Vec<String>, usize) {
    let read: (Vec<String>, usize) = counted!(
        counter,
        users::table
            .select(users::name)
            .order(users::id)
            .cached("names")
            .using(cache)
            .load(conn)
            .await
            .unwrap()
    );
    read
}

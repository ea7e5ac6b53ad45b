//! The synchronous API on PostgreSQL + Redis and MariaDB + Redis: a sync "process" and an async
//! one (each its own store and connections, one namespace) see each other's writes; transactions
//! and r2d2 pools.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel_memclone::store::RedisStore;
use diesel_memclone::sync as memclone;
use diesel_memclone::sync::prelude::*;
use diesel_memclone::{Cache, Error};
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::{
    counted, mysql_again, mysql_sync, mysql_url_of, postgres_again, postgres_sync,
    redis_cluster_store, redis_store, redis_store_sync, unique, QueryCounter, User,
};

fn user(id: i32, name: &str) -> User {
    User {
        id,
        name: name.into(),
        status: "active".into(),
    }
}

/// The scenario, with `$sync_conn` (a `$conn`) and `$async_conn` on one database.
macro_rules! sync_and_async_processes {
    ($conn:ty, $sync_conn:expr, $async_conn:expr, $sync_store:expr, $async_store:expr) => {{
        let mut sync_conn: $conn = $sync_conn;
        let mut async_conn = $async_conn;
        let (sync_store, async_store): (RedisStore, RedisStore) = ($sync_store, $async_store);
        let namespace = unique("sync_ns");
        let sync_cache = Cache::builder()
            .store(sync_store)
            .namespace(&namespace)
            .build()
            .unwrap();
        let async_cache = Cache::builder()
            .store(async_store)
            .namespace(&namespace)
            .build()
            .unwrap();
        let sync_counter = QueryCounter::default();
        sync_counter.attach_sync(&mut sync_conn);
        let async_counter = QueryCounter::default();
        async_counter.attach(&mut async_conn);

        // The sync side runs on blocking threads, as a sync program's threads would.

        let sync_read = |conn: &mut $conn, cache: &Cache| {
            users::table
                .order(users::id)
                .cached("all")
                .using(cache)
                .load::<User, _>(conn)
                .unwrap()
        };
        let (mut sync_conn, sync_cache) = tokio::task::spawn_blocking(move || {
            memclone::insert_into(users::table)
                .values(&user(1, "Ada"))
                .using(&sync_cache)
                .execute(&mut sync_conn)
                .unwrap();
            let (rows, queries) = counted!(sync_counter, sync_read(&mut sync_conn, &sync_cache));
            assert_eq!((rows.len(), queries), (1, 1));
            let (_, queries) = counted!(sync_counter, sync_read(&mut sync_conn, &sync_cache));
            assert_eq!(queries, 0);
            let blocking = sync_cache.blocking();
            let (_, queries) = counted!(
                sync_counter,
                blocking.find::<User, _>(&mut sync_conn, 1).unwrap()
            );
            assert_eq!(queries, 1);
            let (_, queries) = counted!(
                sync_counter,
                blocking.find::<User, _>(&mut sync_conn, 1).unwrap()
            );
            assert_eq!(queries, 0);
            (sync_conn, sync_cache)
        })
        .await
        .unwrap();

        // The async process reads the entries the sync one stored: the same keys.
        let (rows, queries) = counted!(
            async_counter,
            diesel_memclone::CachedDsl::cached(users::table.order(users::id), "all")
                .using(&async_cache)
                .load::<User, _>(&mut async_conn)
                .await
                .unwrap()
        );
        assert_eq!((rows.len(), queries), (1, 0), "the sync process's entry");
        let (_, queries) = counted!(
            async_counter,
            async_cache
                .find::<User, _>(&mut async_conn, 1)
                .await
                .unwrap()
        );
        assert_eq!(queries, 0, "the sync process's entity entry");

        // An async write invalidates what the sync process cached.
        diesel_memclone::update(users::table.filter(users::id.eq(1)))
            .set(users::name.eq("Ada (async)"))
            .using(&async_cache)
            .execute(&mut async_conn)
            .await
            .unwrap();
        let (mut sync_conn, sync_cache, sync_counter) = tokio::task::spawn_blocking(move || {
            let sync_counter = QueryCounter::default();
            sync_counter.attach_sync(&mut sync_conn);
            let (rows, queries) = counted!(sync_counter, sync_read(&mut sync_conn, &sync_cache));
            assert_eq!((rows[0].name.as_str(), queries), ("Ada (async)", 1));
            let (ada, queries) = counted!(
                sync_counter,
                sync_cache
                    .blocking()
                    .find::<User, _>(&mut sync_conn, 1)
                    .unwrap()
            );
            assert_eq!((ada.name.as_str(), queries), ("Ada (async)", 1));

            // A sync write (in a sync transaction) invalidates what the async process cached.
            memclone::transaction(&mut sync_conn, |conn| {
                memclone::update(users::table.filter(users::id.eq(1)))
                    .set(users::name.eq("Ada (sync)"))
                    .using(&sync_cache)
                    .execute(conn)?;
                memclone::insert_into(users::table)
                    .values(&user(2, "Bob"))
                    .using(&sync_cache)
                    .execute(conn)?;
                Ok::<_, Error>(())
            })
            .unwrap();
            (sync_conn, sync_cache, sync_counter)
        })
        .await
        .unwrap();
        let (rows, queries) = counted!(
            async_counter,
            diesel_memclone::CachedDsl::cached(users::table.order(users::id), "all")
                .using(&async_cache)
                .load::<User, _>(&mut async_conn)
                .await
                .unwrap()
        );
        assert_eq!(
            (rows.len(), rows[0].name.as_str(), queries),
            (2, "Ada (sync)", 1)
        );
        let (ada, queries) = counted!(
            async_counter,
            async_cache
                .find::<User, _>(&mut async_conn, 1)
                .await
                .unwrap()
        );
        assert_eq!((ada.name.as_str(), queries), ("Ada (sync)", 1));

        // Diesel's own transaction around a memclone write is refused, and nothing is written.
        tokio::task::spawn_blocking(move || {
            let refused = sync_conn.transaction(|conn| {
                memclone::delete(users::table.filter(users::id.eq(2)))
                    .using(&sync_cache)
                    .execute(conn)
            });
            assert!(
                matches!(refused, Err(Error::UnmanagedTransaction)),
                "{refused:?}"
            );
            let (rows, queries) = counted!(sync_counter, sync_read(&mut sync_conn, &sync_cache));
            assert_eq!((rows.len(), queries), (2, 0));
        })
        .await
        .unwrap();
    }};
}

/// The scenario, with an r2d2 pool of `$conn` (two connections) and a cache.
macro_rules! r2d2_pooled_connections {
    ($conn:ty, $pool:expr, $cache:expr) => {{
        let pool: Pool<ConnectionManager<$conn>> = $pool;
        let cache: Cache = $cache;
        let counter = QueryCounter::default();
        let mut conn = pool.get().unwrap();
        counter.attach_sync(&mut *conn);
        let all = || users::table.order(users::id).cached("all").using(&cache);
        memclone::insert_into(users::table)
            .values(&user(1, "Ada"))
            .using(&cache)
            .execute(&mut conn)
            .unwrap();
        let (rows, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
        assert_eq!((rows.len(), queries), (1, 1));
        let (_, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
        assert_eq!(queries, 0);
        // A transaction on the pooled handle; a helper taking the plain connection writes inside.
        fn helper(conn: &mut $conn, cache: &Cache) -> Result<usize, Error> {
            memclone::insert_into(users::table)
                .values(&user(2, "Bob"))
                .using(cache)
                .execute(conn)
        }
        memclone::transaction(&mut conn, |conn| {
            helper(conn, &cache)?;
            Ok::<_, Error>(())
        })
        .unwrap();
        let (rows, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
        assert_eq!((rows.len(), queries), (2, 1));
        // Another pooled connection gets the entry.
        let mut other = pool.get().unwrap();
        let other_counter = QueryCounter::default();
        other_counter.attach_sync(&mut *other);
        let (rows, queries) = counted!(other_counter, all().load::<User, _>(&mut other).unwrap());
        assert_eq!((rows.len(), queries), (2, 0));
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_async_processes_share_one_redis() {
    let schema = unique("sync_pg");
    let Some(sync_conn) = postgres_sync(&schema) else {
        return;
    };
    let (Some(sync_store), Some(async_store)) = (redis_store().await, redis_store().await) else {
        return;
    };
    sync_and_async_processes(sync_conn, &schema, sync_store, async_store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_async_processes_share_one_redis_cluster() {
    let schema = unique("sync_pg");
    let Some(sync_conn) = postgres_sync(&schema) else {
        return;
    };
    let (Some(sync_store), Some(async_store)) =
        (redis_cluster_store().await, redis_cluster_store().await)
    else {
        return;
    };
    sync_and_async_processes(sync_conn, &schema, sync_store, async_store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_async_processes_share_one_redis_mariadb() {
    let database = unique("sync_my");
    let Some(sync_conn) = mysql_sync(&database) else {
        return;
    };
    let (Some(sync_store), Some(async_store)) = (redis_store().await, redis_store().await) else {
        return;
    };
    let async_conn = mysql_again(&database).await;
    sync_and_async_processes!(
        MysqlConnection,
        sync_conn,
        async_conn,
        sync_store,
        async_store
    );
}

async fn sync_and_async_processes(
    sync_conn: PgConnection,
    schema: &str,
    sync_store: RedisStore,
    async_store: RedisStore,
) {
    let async_conn = postgres_again(schema).await;
    sync_and_async_processes!(PgConnection, sync_conn, async_conn, sync_store, async_store);
}

/// Sets each pooled connection's schema.
#[derive(Debug)]
struct SearchPath(String);

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for SearchPath {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&format!("SET search_path TO {}", self.0))
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

#[test]
fn r2d2_pooled_connections() {
    let schema = unique("sync_r2d2");
    let Some(_) = postgres_sync(&schema) else {
        return;
    };
    let cache = Cache::builder()
        .namespace(unique("sync_r2d2"))
        .build()
        .unwrap();
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(SearchPath(schema)))
        .build(ConnectionManager::<PgConnection>::new(
            diesel_memclone_tests::postgres_url(),
        ))
        .unwrap();
    r2d2_pooled_connections!(PgConnection, pool, cache);
}

#[test]
fn r2d2_pooled_connections_mariadb_redis() {
    let database = unique("sync_r2d2");
    let (Some(_), Some(store)) = (mysql_sync(&database), redis_store_sync()) else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("sync_r2d2"))
        .build()
        .unwrap();
    let pool = Pool::builder()
        .max_size(2)
        .build(ConnectionManager::<MysqlConnection>::new(mysql_url_of(
            &database,
        )))
        .unwrap();
    r2d2_pooled_connections!(MysqlConnection, pool, cache);
}

/// Counts a pool's checkouts.
#[derive(Debug, Clone, Default)]
struct Checkouts(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Checkouts {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl diesel::r2d2::HandleEvent for Checkouts {
    fn handle_checkout(&self, _: diesel::r2d2::event::CheckoutEvent) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The `*_from` reads on an r2d2 pool of `$conn` (one connection, a short checkout timeout,
/// r2d2's default `test_on_check_out`): a miss checks a connection out, a hit does not, even
/// while the pool's only connection is taken; a write through memclone is seen by the next read.
macro_rules! r2d2_reads_check_out_only_on_a_miss {
    ($conn:ty, $builder:expr, $manager:expr, $cache:expr) => {{
        let checkouts = Checkouts::default();
        let pool: Pool<ConnectionManager<$conn>> = $builder
            .max_size(1)
            .connection_timeout(std::time::Duration::from_secs(3))
            .event_handler(Box::new(checkouts.clone()))
            .build($manager)
            .unwrap();
        let cache: Cache = $cache;
        memclone::insert_into(users::table)
            .values(&[user(1, "Ada"), user(2, "Bob")])
            .using(&cache)
            .execute(&mut pool.get().unwrap())
            .unwrap();
        let all = || users::table.order(users::id).cached("all").using(&cache);
        let bob = || users::table.find(2).cached("bob").using(&cache);
        let blocking = cache.blocking();
        // Every `*_from` read: the users, Bob, the first user, how many, Ada, and user 3.
        let reads = || {
            let rows: Vec<User> = all().load_from(&pool).unwrap();
            let one: User = bob().get_result_from(&pool).unwrap();
            let first: User = all().first_from(&pool).unwrap();
            let n = users::table.cached("n").using(&cache).count_from(&pool);
            let ada: User = blocking.find_from(&pool, 1).unwrap();
            let nobody = blocking.find_optional_from::<User, _>(&pool, 3).unwrap();
            (rows.len(), one.name, first.id, n.unwrap(), ada.name, nobody)
        };
        let expected = || (2, "Bob".to_owned(), 1, 2, "Ada".to_owned(), None);
        // Each read once with the pool free: a miss, one checkout each.
        let before = checkouts.count();
        assert_eq!(reads(), expected());
        assert_eq!(checkouts.count() - before, 6, "each miss checks one out");
        // Again with the only connection taken: every read is a hit and takes none (a checkout
        // would wait 3 s and fail).
        let mut busy = pool.get().unwrap();
        let before = checkouts.count();
        assert_eq!(reads(), expected());
        assert_eq!(checkouts.count(), before, "hits take no connection");
        // A write through memclone on the busy connection; once it is back, the reads see it.
        memclone::update(users::table.find(2))
            .set(users::name.eq("Robert"))
            .using(&cache)
            .execute(&mut busy)
            .unwrap();
        memclone::insert_into(users::table)
            .values(&user(3, "Cy"))
            .using(&cache)
            .execute(&mut busy)
            .unwrap();
        drop(busy);
        let before = checkouts.count();
        let rows: Vec<User> = all().load_from(&pool).unwrap();
        let one: User = bob().get_result_from(&pool).unwrap();
        let cy = blocking.find_optional_from::<User, _>(&pool, 3).unwrap();
        assert_eq!(
            (rows.len(), one.name.as_str(), cy.map(|u| u.name)),
            (3, "Robert", Some("Cy".to_owned()))
        );
        assert_eq!(
            checkouts.count() - before,
            3,
            "the written tables' reads miss"
        );
        // A pool that cannot give a connection: the miss is an error, not a hang or a panic.
        let _busy = pool.get().unwrap();
        let error = all()
            .map(|q| q.filter(users::id.gt(1)))
            .load_from::<User, _>(&pool)
            .unwrap_err();
        assert!(matches!(error, Error::Pool(_)), "{error:?}");
    }};
}

#[test]
fn r2d2_reads_check_out_only_on_a_miss() {
    let schema = unique("sync_from");
    let (Some(_), Some(store)) = (postgres_sync(&schema), redis_store_sync()) else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("sync_from"))
        .build()
        .unwrap();
    r2d2_reads_check_out_only_on_a_miss!(
        PgConnection,
        Pool::builder().connection_customizer(Box::new(SearchPath(schema))),
        ConnectionManager::<PgConnection>::new(diesel_memclone_tests::postgres_url()),
        cache
    );
}

#[test]
fn r2d2_reads_check_out_only_on_a_miss_mariadb_memory() {
    let database = unique("sync_from");
    let Some(_) = mysql_sync(&database) else {
        return;
    };
    let cache = Cache::builder()
        .namespace(unique("sync_from"))
        .build()
        .unwrap();
    r2d2_reads_check_out_only_on_a_miss!(
        MysqlConnection,
        Pool::builder(),
        ConnectionManager::<MysqlConnection>::new(mysql_url_of(&database)),
        cache
    );
}

/// A blocking statement on one thread holds up nobody else's store calls: thread B holds a row
/// lock in a transaction and then reads through Redis while thread A's update waits for that
/// lock. With a runtime that A's call held while its statement ran, B's read could never be
/// answered and the two threads would wait for each other for ever.
#[test]
fn a_blocked_statement_does_not_stall_other_threads() {
    let schema = unique("sync_lock");
    let (Some(mut setup), Some(store)) = (postgres_sync(&schema), redis_store_sync()) else {
        return;
    };
    let again = |schema: &str| {
        let mut conn = PgConnection::establish(&diesel_memclone_tests::postgres_url()).unwrap();
        conn.batch_execute(&format!("SET search_path TO {schema}"))
            .unwrap();
        conn
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("sync_lock"))
        .build()
        .unwrap();
    memclone::insert_into(users::table)
        .values(&user(1, "Ada"))
        .using(&cache)
        .execute(&mut setup)
        .unwrap();
    let (mut conn_a, mut conn_b) = (again(&schema), again(&schema));
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let cache_b = cache.clone();
    let done_b = done_tx.clone();
    std::thread::spawn(move || {
        let read = memclone::transaction(&mut conn_b, |conn| {
            memclone::update(users::table.filter(users::id.eq(1)))
                .set(users::name.eq("Bea"))
                .using(&cache_b)
                .execute(conn)?;
            locked_tx.send(()).unwrap();
            // Let A's update start and block on the row lock.
            std::thread::sleep(std::time::Duration::from_millis(300));
            users::table
                .order(users::id)
                .cached("all")
                .using(&cache_b)
                .load::<User, _>(conn)
        });
        done_b.send(("B", read.map(|users| users.len()))).unwrap();
    });
    std::thread::spawn(move || {
        locked_rx.recv().unwrap();
        let updated = memclone::update(users::table.filter(users::id.eq(1)))
            .set(users::name.eq("Cy"))
            .using(&cache)
            .execute(&mut conn_a);
        done_tx.send(("A", updated)).unwrap();
    });
    for _ in 0..2 {
        let (who, outcome) = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("both threads finish: no stall between a blocked statement and a store call");
        assert_eq!(outcome.unwrap(), 1, "thread {who}");
    }
}

/// A synchronous read through a near tier: near hits (answered before any runtime is entered),
/// and a write made through another cache ("process") on the same Redis served at most
/// `max_lag` late.
#[test]
fn sync_near_hits_see_other_processes_writes() {
    use diesel_memclone::NearCache;
    use std::time::{Duration, Instant};
    let schema = unique("sync_near");
    let (Some(mut conn), Some(store), Some(other_store)) = (
        postgres_sync(&schema),
        redis_store_sync(),
        redis_store_sync(),
    ) else {
        return;
    };
    let namespace = unique("sync_near");
    let max_lag = NearCache::DEFAULT_MAX_LAG;
    let cache = Cache::builder()
        .store(store)
        .namespace(&namespace)
        .near_cache(NearCache::new())
        .build()
        .unwrap();
    let other = Cache::builder()
        .store(other_store)
        .namespace(&namespace)
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    memclone::insert_into(users::table)
        .values(&user(1, "Ada"))
        .using(&other)
        .execute(&mut conn)
        .unwrap();
    let read = |conn: &mut PgConnection| {
        users::table
            .order(users::id)
            .cached("all")
            .using(&cache)
            .load::<User, _>(conn)
            .unwrap()
    };
    // The first read fills, a later one keeps the entry in the tier once its stream is in sync.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().near_hits == 0 {
        assert!(Instant::now() < deadline, "a near hit within 10 s");
        assert_eq!(read(&mut conn)[0].name, "Ada");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A hit: near, or from Redis if the stream lags on a loaded machine.
    let (users, queries) = counted!(counter, read(&mut conn));
    assert_eq!((users[0].name.as_str(), queries), ("Ada", 0), "a hit");

    memclone::update(users::table.filter(users::id.eq(1)))
        .set(users::name.eq("Bea"))
        .using(&other)
        .execute(&mut conn)
        .unwrap();
    std::thread::sleep(max_lag * 2);
    assert_eq!(
        read(&mut conn)[0].name,
        "Bea",
        "another process's write, max_lag later"
    );
}

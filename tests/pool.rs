//! Reads from a pool (`load_from`, `get_result_from`, `first_from`, `count_from`, `find_from`):
//! a hit, from Redis or the near tier, answers while the pool's only connection is held by
//! someone else; a miss checks one out and gives it back; a pool that gives no connection is
//! `Error::Pool`, not a panic. On PostgreSQL, with diesel-async's deadpool and bb8 pools.

use diesel::prelude::*;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use diesel_memclone::prelude::*;
use diesel_memclone::{Cache, Error, NearCache};
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::User;
use std::time::{Duration, Instant};

type Deadpool = diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>;
type Bb8 = diesel_async::pooled_connection::bb8::Pool<AsyncPgConnection>;

/// How long a read that needs no connection may take, at most, on a loaded machine.
const ANSWERS_WITHIN: Duration = Duration::from_secs(5);
/// How long a read that waits for the pool's held connection is given before the test
/// concludes that it waits.
const WAITS_FOR: Duration = Duration::from_millis(300);

/// A manager of connections to `url` that work in `schema`.
fn manager(url: &str, schema: &str) -> AsyncDieselConnectionManager<AsyncPgConnection> {
    let mut setup = ManagerConfig::<AsyncPgConnection>::default();
    let search_path = format!("SET search_path TO {schema}");
    setup.custom_setup = Box::new(move |url| {
        let search_path = search_path.clone();
        Box::pin(async move {
            let mut conn = AsyncPgConnection::establish(url).await?;
            conn.batch_execute(&search_path)
                .await
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
            Ok(conn)
        })
    });
    AsyncDieselConnectionManager::new_with_config(url, setup)
}

/// Schema `name` with users 1 (active) and 2 (away), and caches on Redis without and with a
/// near tier; `None` (reported) when a server is down.
async fn setup(name: &str) -> Option<[Cache; 2]> {
    let mut conn = diesel_memclone_tests::postgres(name).await?;
    let store = diesel_memclone_tests::redis_store().await?;
    conn.batch_execute(
        "INSERT INTO users (id, name, status) VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away')",
    )
    .await
    .unwrap();
    let plain = Cache::builder()
        .store(store.clone())
        .namespace(format!("{name}_plain"))
        .build()
        .unwrap();
    let near = Cache::builder()
        .store(store)
        .namespace(format!("{name}_near"))
        .near_cache(NearCache::new())
        .build()
        .unwrap();
    assert!(near.near_cache_ready(Duration::from_secs(5)).await);
    Some([plain, near])
}

/// Every `*_from` read once through `$pool` on `$cache`: `(active users, Ada, Bob, active
/// count, first active user)`. (A macro: the reads' bounds name the pool's connection type.)
macro_rules! read_all {
    ($cache:expr, $pool:expr) => {{
        let (cache, pool): (&Cache, _) = ($cache, $pool);
        async move {
            let active = || {
                users::table
                    .filter(users::status.eq("active"))
                    .order(users::id)
                    .select(User::as_select())
            };
            let list: Vec<User> = active()
                .cached("pool_active")
                .using(cache)
                .load_from(pool)
                .await?;
            let ada: User = cache.find_from(pool, 1).await?;
            let bob = cache.find_optional_from::<User, _>(pool, 2).await?;
            let count = users::table
                .filter(users::status.eq("active"))
                .cached("pool_count")
                .using(cache)
                .count_from(pool)
                .await?;
            let first: User = active()
                .cached("pool_first")
                .using(cache)
                .first_from(pool)
                .await?;
            Ok::<_, Error>((list, ada, bob, count, first))
        }
    }};
}

/// What [`read_all`] reads in the two users' initial state.
fn check_initial(read: &(Vec<User>, User, Option<User>, i64, User)) {
    let (list, ada, bob, count, first) = read;
    assert_eq!(list.iter().map(|u| u.id).collect::<Vec<_>>(), [1]);
    assert_eq!((ada.name.as_str(), first.id, *count), ("Ada", 1, 1));
    assert_eq!(bob.as_ref().map(|b| b.name.as_str()), Some("Bob"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_hits_take_no_connection_and_misses_give_theirs_back() {
    let name = diesel_memclone_tests::unique("pool_deadpool");
    let Some(caches) = setup(&name).await else {
        return;
    };
    for cache in &caches {
        let pool: Deadpool =
            Deadpool::builder(manager(&diesel_memclone_tests::postgres_url(), &name))
                .max_size(1)
                .build()
                .unwrap();
        // Misses: each checks the one connection out and gives it back.
        let read = read_all!(cache, &pool)
            .await
            .expect("the misses read the database");
        check_initial(&read);
        let status = pool.status();
        assert_eq!((status.size, status.available), (1, 1), "{status:?}");
        assert_eq!(cache.stats().misses, 5);

        // The only connection is held: hits still answer, without waiting for it.
        let held = pool.get().await.unwrap();
        let read = tokio::time::timeout(ANSWERS_WITHIN, read_all!(cache, &pool))
            .await
            .expect("hits do not wait for the pool")
            .unwrap();
        check_initial(&read);
        assert_eq!((cache.stats().hits, cache.stats().misses), (5, 5));
        if std::ptr::eq(cache, &caches[1]) {
            // The queries' entries; the rows' generations are new to the tier, so those two
            // hits may come from Redis.
            assert!(cache.stats().near_hits >= 3, "{:?}", cache.stats());
        }
        // A miss does wait for it.
        let miss = users::table
            .filter(users::status.eq("away"))
            .select(User::as_select())
            .cached("pool_away")
            .using(cache)
            .load_from(&pool);
        let mut miss = Box::pin(miss);
        assert!(
            tokio::time::timeout(WAITS_FOR, miss.as_mut())
                .await
                .is_err(),
            "a miss takes a connection"
        );
        drop(held);
        let away = tokio::time::timeout(ANSWERS_WITHIN, miss)
            .await
            .expect("the miss gets the connection once it is free")
            .unwrap();
        assert_eq!(away.iter().map(|u| u.id).collect::<Vec<_>>(), [2]);
        let status = pool.status();
        assert_eq!((status.size, status.available), (1, 1), "{status:?}");

        // A write through memclone: the next reads miss again, and see it.
        let mut conn = pool.get().await.unwrap();
        diesel_memclone::update(users::table.find(2))
            .set(users::status.eq("active"))
            .using(cache)
            .execute(&mut conn)
            .await
            .unwrap();
        drop(conn);
        let (list, _, bob, count, _) = read_all!(cache, &pool).await.unwrap();
        assert_eq!(list.iter().map(|u| u.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((bob.unwrap().status.as_str(), count), ("active", 2));
        diesel_memclone::update(users::table.find(2))
            .set(users::status.eq("away"))
            .using(cache)
            .execute(&mut pool.get().await.unwrap())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bb8_hits_take_no_connection() {
    let name = diesel_memclone_tests::unique("pool_bb8");
    let Some(caches) = setup(&name).await else {
        return;
    };
    for cache in &caches {
        let pool: Bb8 = Bb8::builder()
            .max_size(1)
            .build(manager(&diesel_memclone_tests::postgres_url(), &name))
            .await
            .unwrap();
        check_initial(&read_all!(cache, &pool).await.unwrap());
        assert_eq!(pool.state().idle_connections, 1);
        let held = pool.get().await.unwrap();
        let read = tokio::time::timeout(ANSWERS_WITHIN, read_all!(cache, &pool))
            .await
            .expect("hits do not wait for the pool")
            .unwrap();
        check_initial(&read);
        assert_eq!((cache.stats().hits, cache.stats().misses), (5, 5));
        drop(held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_without_connections_is_an_error() {
    let name = diesel_memclone_tests::unique("pool_errors");
    let Some([cache, _]) = setup(&name).await else {
        return;
    };
    // Nothing listens on port 1: every checkout fails to connect.
    let refused = "postgres://postgres@127.0.0.1:1/test";
    let deadpool: Deadpool = Deadpool::builder(manager(refused, &name))
        .max_size(1)
        .build()
        .unwrap();
    let bb8: Bb8 = Bb8::builder()
        .max_size(1)
        .connection_timeout(Duration::from_millis(500))
        .retry_connection(false)
        .build_unchecked(manager(refused, &name));
    let closed: Deadpool =
        Deadpool::builder(manager(&diesel_memclone_tests::postgres_url(), &name))
            .max_size(1)
            .build()
            .unwrap();
    closed.close();

    let errors = [
        read_all!(&cache, &deadpool).await.err(),
        read_all!(&cache, &bb8).await.err(),
        read_all!(&cache, &closed).await.err(),
    ];
    for error in errors {
        let error = error.expect("no connection, no rows");
        assert!(matches!(error, Error::Pool(_)), "{error:?}");
        assert!(std::error::Error::source(&error).is_some(), "{error}");
        // In code that returns Diesel's `QueryResult`, still this error.
        let diesel_error: diesel::result::Error = error.into();
        let diesel::result::Error::QueryBuilderError(inner) = &diesel_error else {
            panic!("{diesel_error:?}");
        };
        assert!(matches!(
            inner.downcast_ref::<Error>(),
            Some(Error::Pool(_))
        ));
    }
    // Nothing was cached: a working pool then reads the database.
    assert_eq!(cache.stats().hits, 0);
    let working: Deadpool =
        Deadpool::builder(manager(&diesel_memclone_tests::postgres_url(), &name))
            .max_size(1)
            .build()
            .unwrap();
    check_initial(&read_all!(&cache, &working).await.unwrap());
}

/// A `*_from` miss takes its connection before it leads this process's load of the entry: a task
/// holding the pool's only connection and reading the same entry with it does not wait on a load
/// that waits for that connection (the follower patience before).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_does_not_stall_the_holder_of_the_pool_s_connection() {
    let schema = diesel_memclone_tests::unique("pool_from");
    let Some(mut conn) = diesel_memclone_tests::postgres(&schema).await else {
        return;
    };
    conn.batch_execute("INSERT INTO users VALUES (1, 'Ann', 'a')")
        .await
        .unwrap();
    let manager = manager(&diesel_memclone_tests::postgres_url(), &schema);
    let pool = Deadpool::builder(manager).max_size(1).build().unwrap();
    let cache = Cache::builder()
        .namespace(diesel_memclone_tests::unique("pool_from"))
        // The follower patience (the lock's wait and time to live) far above what the test
        // allows the holder, so that a slow machine cannot pass for a stall.
        .lock(
            diesel_memclone::LockOptions::default()
                .ttl(Duration::from_secs(60))
                .wait_timeout(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    // This task takes the pool's only connection.
    let mut held = pool.get().await.unwrap();
    let reader = {
        let (pool, cache) = (pool.clone(), cache.clone());
        tokio::spawn(async move { cache.find_from::<User, _>(&pool, 1).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = Instant::now();
    let mine: User = cache.find(&mut held, 1).await.unwrap();
    let waited = began.elapsed();
    drop(held);
    assert_eq!(mine.name, "Ann");
    assert_eq!(reader.await.unwrap().name, "Ann");
    assert!(
        waited < Duration::from_secs(20),
        "the connection's holder waited {waited:?} on a load that waited for its connection"
    );
}

/// A `*_from` Redis hit whose generations the near tier knows reads the entry alone, as the
/// `.load(&mut conn)` hit does: with a tier that keeps no entry (`max_bytes(0)`), each such hit
/// counts one near miss (the entry's `GET`) and no near hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_read_whose_generations_are_known_reads_the_entry_alone() {
    let name = diesel_memclone_tests::unique("pool_known");
    let Some(_) = setup(&name).await else {
        return;
    };
    let Some(store) = diesel_memclone_tests::redis_store().await else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(format!("{name}_known"))
        .near_cache(NearCache::new().max_bytes(0))
        .build()
        .unwrap();
    assert!(cache.near_cache_ready(Duration::from_secs(5)).await);
    let pool: Deadpool = Deadpool::builder(manager(&diesel_memclone_tests::postgres_url(), &name))
        .max_size(1)
        .build()
        .unwrap();
    // The miss, then a hit that learns the generations, then hits with them known.
    for _ in 0..3 {
        let user: User = cache.find_from(&pool, 1).await.unwrap();
        assert_eq!(user.name, "Ada");
    }
    let before = cache.stats();
    for _ in 0..5 {
        let user: User = cache.find_from(&pool, 1).await.unwrap();
        assert_eq!(user.name, "Ada");
    }
    let after = cache.stats();
    assert_eq!(
        (
            after.hits - before.hits,
            after.misses - before.misses,
            after.near_hits - before.near_hits,
            after.near_misses - before.near_misses,
        ),
        (5, 0, 0, 5),
        "{after:?}"
    );
}

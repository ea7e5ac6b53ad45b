//! Connections to Redis on a cold start, and single-flight when the store is slow: a burst of
//! callers on a store that has opened no connection yet opens each of its connections once (the
//! callers wait for the same connect) and loads once; callers whose store call times out still
//! share one database read per process. Connections are counted at a proxy in front of Redis.

use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_memclone::store::RedisStore;
use diesel_memclone::Cache;
use diesel_memclone_tests::proxy::Proxy;
use diesel_memclone_tests::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Barrier, Mutex, Notify};

#[derive(diesel::QueryableByName)]
struct Number {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A shared PostgreSQL connection whose statements are counted.
#[derive(Clone)]
struct Db {
    conn: Arc<Mutex<AsyncPgConnection>>,
    counter: QueryCounter,
}

impl Db {
    /// The number of users, read slowly enough that a burst of callers overlaps it.
    async fn count_users(&self) -> diesel::QueryResult<i64> {
        let mut conn = self.conn.lock().await;
        let row: Number = diesel::sql_query("SELECT count(*) AS n FROM users, pg_sleep(0.1)")
            .get_result(&mut *conn)
            .await?;
        Ok(row.n)
    }
}

/// A counted PostgreSQL connection in a fresh schema, and a proxy in front of the test Redis.
async fn setup() -> Option<(Db, Proxy)> {
    let schema = unique("cold");
    postgres(&schema).await?;
    redis_store().await?;
    let mut conn = postgres_again(&schema).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let db = Db {
        conn: Arc::new(Mutex::new(conn)),
        counter,
    };
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .parse()
        .expect("REDIS_URL as redis://ip:port");
    Some((db, Proxy::start(upstream).await))
}

/// `callers` tasks read one query through `cache` at the same moment; returns their answers.
async fn burst(cache: &Cache, db: &Db, callers: usize) -> Vec<i64> {
    let start = Arc::new(Barrier::new(callers));
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (cache, db, start) = (cache.clone(), db.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                cache
                    .fill_with("users", "count", &["users"], || db.count_users())
                    .await
                    .expect("read")
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("caller"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_cold_store_opens_each_connection_once_and_loads_once() {
    let Some((db, proxy)) = setup().await else {
        return;
    };
    let store = RedisStore::builder(proxy.url()).build().unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("cold"))
        .build()
        .unwrap();
    assert_eq!(proxy.accepted(), 0, "building a store opens no connection");

    let answers = burst(&cache, &db, 200).await;
    assert!(answers.iter().all(|&n| n == 0));
    assert_eq!(db.counter.get(), 1, "one database query for 200 callers");
    let opened = proxy.accepted();
    assert!(
        (1..=4).contains(&opened),
        "the callers waited for the same connects: {opened} connections opened"
    );

    let (_, queries) = counted!(db.counter, burst(&cache, &db, 200).await);
    assert_eq!(queries, 0, "then every caller hits");
    assert_eq!(proxy.accepted(), opened, "on the connections already open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_opens_every_connection_before_the_first_call() {
    let Some((db, proxy)) = setup().await else {
        return;
    };
    let store = RedisStore::builder(proxy.url())
        .connections(3)
        .build()
        .unwrap();
    store.connect().await.expect("connect");
    assert_eq!(proxy.accepted(), 3, "one per configured connection");
    store.connect().await.expect("connect again");
    assert_eq!(proxy.accepted(), 3, "connecting again reuses them");

    let cache = Cache::builder()
        .store(store)
        .namespace(unique("warm"))
        .build()
        .unwrap();
    let answers = burst(&cache, &db, 100).await;
    assert!(answers.iter().all(|&n| n == 0));
    assert_eq!(db.counter.get(), 1);
    assert_eq!(proxy.accepted(), 3, "the burst opened no connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_whose_store_call_times_out_share_one_load() {
    let Some((db, proxy)) = setup().await else {
        return;
    };
    let store = RedisStore::builder(proxy.url())
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("slow"))
        .store_timeout(Duration::from_millis(100))
        .retry_after(Duration::from_millis(100))
        .build()
        .unwrap();
    let (answers, queries) = counted!(db.counter, burst(&cache, &db, 20).await);
    assert_eq!((answers[0], queries), (0, 1), "a miss, filled once");

    proxy.stall();
    let (answers, queries) = counted!(db.counter, burst(&cache, &db, 100).await);
    assert!(answers.iter().all(|&n| n == 0));
    assert_eq!(
        queries, 1,
        "the callers whose store calls timed out shared one database read"
    );
    assert!(cache.stats().coalesced >= 99, "{:?}", cache.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_on_a_cold_store_that_hangs_share_one_load() {
    let Some((db, proxy)) = setup().await else {
        return;
    };
    proxy.stall();
    let store = RedisStore::builder(proxy.url())
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("hung"))
        .store_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let (answers, queries) = counted!(db.counter, burst(&cache, &db, 100).await);
    assert!(answers.iter().all(|&n| n == 0));
    assert_eq!(queries, 1, "one database read for the whole burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_starts_after_a_write_does_not_join_a_load_that_read_before_it() {
    let Some((db, proxy)) = setup().await else {
        return;
    };
    let store = RedisStore::builder(proxy.url()).build().unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("late"))
        .store_timeout(Duration::from_millis(100))
        .retry_after(Duration::from_secs(30))
        .build()
        .unwrap();
    proxy.stall(); // every read goes to the database, through the store-less single-flight
    let (read, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let leader = {
        let (cache, db, read, release) = (cache.clone(), db.clone(), read.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .fill_with("users", "count", &["users"], || async move {
                    let n = db.count_users().await;
                    read.notify_one();
                    release.notified().await;
                    n
                })
                .await
        })
    };
    read.notified().await;
    {
        let mut conn = db.conn.lock().await;
        diesel::sql_query("INSERT INTO users VALUES (1, 'Ann', 'a')")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let late = cache
        .fill_with("users", "count", &["users"], || db.count_users())
        .await
        .unwrap();
    assert_eq!(late, 1, "the late caller read after the write");
    release.notify_one();
    assert_eq!(leader.await.unwrap().unwrap(), 0);
    assert_eq!(cache.stats().coalesced, 0);
}

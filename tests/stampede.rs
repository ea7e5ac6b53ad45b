//! Stampede protection and per-query options: single-flight, the distributed fill lock (holder
//! killed, wait timeout in both modes, non-owner release), TTL jitter, stale-while-revalidate,
//! custom keys and `uncache`. Fills run real PostgreSQL statements, counted by instrumentation.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_memclone::prelude::*;
use diesel_memclone::store::{MemoryStore, Store};
use diesel_memclone::{Cache, Error, LockOptions, OnLockTimeout};
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify};

#[derive(QueryableByName)]
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
    async fn new(schema: &str) -> Db {
        let mut conn = postgres_again(schema).await;
        let counter = QueryCounter::default();
        counter.attach(&mut conn);
        Db {
            conn: Arc::new(Mutex::new(conn)),
            counter,
        }
    }

    /// One statement returning the number of users.
    async fn count_users(&self) -> diesel::QueryResult<i64> {
        let mut conn = self.conn.lock().await;
        let row: Number = diesel::sql_query("SELECT count(*) AS n FROM users")
            .get_result(&mut *conn)
            .await?;
        Ok(row.n)
    }
}

async fn read(cache: &Cache, db: &Db) -> i64 {
    cache
        .fill_with("users", "count", &["users"], || db.count_users())
        .await
        .unwrap()
}

async fn setup() -> Option<(String, Db)> {
    let schema = unique("stampede");
    postgres(&schema).await?;
    let db = Db::new(&schema).await;
    Some((schema, db))
}

#[tokio::test]
async fn concurrent_callers_share_one_load() {
    let Some((_, db)) = setup().await else { return };
    for lock in [true, false] {
        let builder = Cache::builder().namespace(unique("flight"));
        let cache = if lock { builder } else { builder.no_lock() }
            .build()
            .unwrap();
        let before = db.counter.get();
        let slow = || async {
            let mut conn = db.conn.lock().await;
            let row: Number = diesel::sql_query("SELECT count(*) AS n FROM users, pg_sleep(0.1)")
                .get_result(&mut *conn)
                .await?;
            Ok(row.n)
        };
        let callers = (0..50).map(|_| cache.fill_with("users", "slow count", &["users"], slow));
        let results = futures_util::future::join_all(callers).await;
        assert!(results.iter().all(|r| matches!(r, Ok(0))));
        assert_eq!(
            db.counter.get() - before,
            1,
            "lock={lock}: one load for fifty callers"
        );
        assert_eq!(cache.stats().coalesced, 49);
    }
}

#[tokio::test]
async fn a_caller_after_an_invalidation_does_not_join_an_earlier_load() {
    let Some((schema, db)) = setup().await else {
        return;
    };
    let cache = Cache::builder()
        .namespace(unique("flight"))
        .build()
        .unwrap();
    let mut writer = postgres_again(&schema).await;
    let loaded = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let early = {
        let (cache, db, loaded, release) =
            (cache.clone(), db.clone(), loaded.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .fill_with("users", "count", &["users"], || async move {
                    let n = db.count_users().await?;
                    loaded.notify_one();
                    release.notified().await;
                    Ok(n)
                })
                .await
                .unwrap()
        })
    };
    loaded.notified().await;
    let row = User {
        id: 1,
        name: "Ann".into(),
        status: "a".into(),
    };
    diesel_memclone::insert_into(users::table)
        .values(&row)
        .using(&cache)
        .execute(&mut writer)
        .await
        .unwrap();
    // The early load is still running; a caller arriving now must not take its (old) answer.
    let late = read(&cache, &db).await;
    release.notify_one();
    assert_eq!(
        early.await.unwrap(),
        0,
        "the early caller gets what it read"
    );
    assert_eq!(late, 1, "the late caller loaded for itself");
    assert_eq!(cache.stats().coalesced, 0);
    assert_eq!(db.counter.get(), 2);
}

/// Two caches on one store stand for two processes (no shared single-flight).
async fn two_processes(lock: LockOptions) -> Option<(Cache, Cache, Db)> {
    let (_, db) = setup().await?;
    let store = redis_store().await?;
    let ns = unique("lock");
    let a = Cache::builder()
        .store(store.clone())
        .namespace(&ns)
        .lock(lock.clone())
        .build()
        .unwrap();
    let b = Cache::builder()
        .store(store)
        .namespace(&ns)
        .lock(lock)
        .build()
        .unwrap();
    Some((a, b, db))
}

#[tokio::test]
async fn a_killed_lock_holder_frees_the_lock_when_it_expires() {
    let lock = LockOptions::default()
        .ttl(Duration::from_millis(300))
        .wait_timeout(Duration::from_secs(5));
    let Some((a, b, db)) = two_processes(lock).await else {
        return;
    };
    let holding = Arc::new(Notify::new());
    let holder = {
        let (a, holding) = (a.clone(), holding.clone());
        tokio::spawn(async move {
            a.fill_with("users", "count", &["users"], || async move {
                holding.notify_one();
                std::future::pending::<diesel::QueryResult<i64>>().await
            })
            .await
        })
    };
    holding.notified().await;
    holder.abort(); // killed mid-fill: its lock is never released
    assert_eq!(
        read(&b, &db).await,
        0,
        "the waiter filled once the lock expired"
    );
    assert_eq!(db.counter.get(), 1);
    assert_eq!(
        b.stats().lock_timeouts,
        0,
        "it took the expired lock, it did not time out"
    );
    assert_eq!(read(&a, &db).await, 0);
    assert_eq!(
        db.counter.get(),
        1,
        "the other process hits what the waiter filled"
    );
}

/// A fill cancelled while it holds the lock (its caller went away) frees the lock at once,
/// whether the lock was taken after the read (a cold entry) or in the read itself (this
/// process's write moved the generations, see `tests/miss_path.rs`): the other process does not
/// wait out the lock's 30 s, and with `OnLockTimeout::Error` would fail if it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_fill_frees_its_lock_at_once() {
    let lock = LockOptions::default()
        .ttl(Duration::from_secs(30))
        .wait_timeout(Duration::from_secs(2))
        .on_timeout(OnLockTimeout::Error);
    let Some((a, b, db)) = two_processes(lock).await else {
        return;
    };
    for after_a_write in [false, true] {
        if after_a_write {
            a.invalidate_table("users").await;
        }
        let holding = Arc::new(Notify::new());
        let holder = {
            let (a, holding) = (a.clone(), holding.clone());
            tokio::spawn(async move {
                a.fill_with("users", "count", &["users"], || async move {
                    holding.notify_one();
                    std::future::pending::<diesel::QueryResult<i64>>().await
                })
                .await
            })
        };
        holding.notified().await;
        holder.abort();
        assert!(holder.await.unwrap_err().is_cancelled());
        let before = db.counter.get();
        assert_eq!(
            b.fill_with("users", "count", &["users"], || db.count_users())
                .await
                .unwrap(),
            0,
            "after a write: {after_a_write}"
        );
        assert_eq!(db.counter.get() - before, 1);
        assert_eq!(b.stats().lock_timeouts, 0);
        // The next round starts from a miss again.
        b.invalidate_table("users").await;
    }
}

/// After a write, many callers in two processes miss one entry at once, each through a read
/// that takes the fill lock in its round trip (the writing process expects the miss; the
/// other's near tier no longer knows the generations): one database read in all, and every
/// caller gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_lock_in_their_read_share_one_load_across_processes() {
    let Some((_, db)) = setup().await else {
        return;
    };
    let Some(store) = redis_store().await else {
        return;
    };
    let ns = unique("readlock");
    let a = Cache::builder()
        .store(store.clone())
        .namespace(&ns)
        .build()
        .unwrap();
    let b = Cache::builder()
        .store(store)
        .namespace(&ns)
        .near_cache(diesel_memclone::NearCache::new())
        .build()
        .unwrap();
    assert!(b.near_cache_ready(Duration::from_secs(10)).await);
    let slow = || async {
        let mut conn = db.conn.lock().await;
        let row: Number = diesel::sql_query("SELECT count(*) AS n FROM users, pg_sleep(0.1)")
            .get_result(&mut *conn)
            .await?;
        Ok(row.n)
    };
    for round in 0..3 {
        // Both have read the entry; then `a` writes.
        for cache in [&a, &b] {
            let n = cache
                .fill_with("users", "slow count", &["users"], slow)
                .await;
            assert_eq!(n.unwrap(), 0);
        }
        a.invalidate_table("users").await;
        assert!(b.near_cache_ready(Duration::from_secs(10)).await);
        let before = db.counter.get();
        let callers = (0..25).flat_map(|_| {
            [
                a.fill_with("users", "slow count", &["users"], slow),
                b.fill_with("users", "slow count", &["users"], slow),
            ]
        });
        let results = futures_util::future::join_all(callers).await;
        assert!(results.iter().all(|r| matches!(r, Ok(0))), "{results:?}");
        assert_eq!(
            db.counter.get() - before,
            1,
            "round {round}: one load for fifty callers in two processes"
        );
    }
}

async fn wait_timeout(
    on_timeout: OnLockTimeout,
) -> Option<(diesel_memclone::Result<i64>, Cache, Db)> {
    let lock = LockOptions::default()
        .ttl(Duration::from_secs(30))
        .wait_timeout(Duration::from_millis(200))
        .on_timeout(on_timeout);
    let (a, b, db) = two_processes(lock).await?;
    let holding = Arc::new(Notify::new());
    let holder = {
        let holding = holding.clone();
        tokio::spawn(async move {
            a.fill_with("users", "count", &["users"], || async move {
                holding.notify_one();
                std::future::pending::<diesel::QueryResult<i64>>().await
            })
            .await
        })
    };
    holding.notified().await;
    let result = b
        .fill_with("users", "count", &["users"], || db.count_users())
        .await;
    holder.abort();
    Some((result, b, db))
}

#[tokio::test]
async fn a_wait_timeout_goes_to_the_database_when_so_configured() {
    let Some((result, cache, db)) = wait_timeout(OnLockTimeout::Database).await else {
        return;
    };
    assert_eq!(result.unwrap(), 0);
    assert_eq!(db.counter.get(), 1, "the waiter went to the database");
    assert_eq!(cache.stats().lock_timeouts, 1);
}

#[tokio::test]
async fn a_wait_timeout_is_an_error_when_so_configured() {
    let Some((result, cache, db)) = wait_timeout(OnLockTimeout::Error).await else {
        return;
    };
    assert!(matches!(result, Err(Error::LockTimeout)), "{result:?}");
    assert_eq!(db.counter.get(), 0);
    assert_eq!(cache.stats().lock_timeouts, 1);
}

async fn only_the_owner_releases(store: &dyn Store) {
    let key = unique("lockkey");
    let ttl = Duration::from_secs(10);
    assert!(store.try_lock(&key, 1, ttl).await.unwrap());
    assert!(!store.try_lock(&key, 2, ttl).await.unwrap(), "held");
    store.unlock(&key, 2).await.unwrap();
    assert!(
        !store.try_lock(&key, 3, ttl).await.unwrap(),
        "a non-owner's release did nothing"
    );
    store.unlock(&key, 1).await.unwrap();
    assert!(
        store.try_lock(&key, 3, ttl).await.unwrap(),
        "the owner's release freed it"
    );
}

#[tokio::test]
async fn a_lock_released_by_a_non_owner_stays_held() {
    only_the_owner_releases(&MemoryStore::default()).await;
    if let Some(store) = redis_store().await {
        only_the_owner_releases(&store).await;
    }
    if let Some(store) = redis_cluster_store().await {
        only_the_owner_releases(&store).await;
    }
}

#[tokio::test]
async fn ttl_jitter_spreads_expiry() {
    let Some(store) = redis_store().await else {
        return;
    };
    let ns = unique("jitter");
    let cache = Cache::builder()
        .store(store)
        .namespace(&ns)
        .default_ttl(Duration::from_secs(1000))
        .ttl_jitter(0.5)
        .build()
        .unwrap();
    for i in 0..20 {
        let v: i64 = cache
            .fill_with("jitter", &format!("key {i}"), &[], || async move { Ok(i) })
            .await
            .unwrap();
        assert_eq!(v, i);
    }
    use diesel_memclone::deadpool_redis::redis::cmd;
    let redis = RawRedis::test_server(false).await;
    let keys: Vec<String> = redis.query_as(cmd("KEYS").arg(format!("{ns}:{{q:*"))).await;
    assert_eq!(keys.len(), 20);
    let mut ttls = Vec::new();
    for key in keys {
        ttls.push(redis.query_as::<i64>(cmd("PTTL").arg(key)).await);
    }
    let (min, max) = (*ttls.iter().min().unwrap(), *ttls.iter().max().unwrap());
    assert!(min >= 499_000 && max <= 1_500_000, "within ±50%: {ttls:?}");
    assert!(
        max - min > 100_000,
        "spread out, not all at one instant: {ttls:?}"
    );
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_once_and_refreshes_once() {
    let Some((schema, db)) = setup().await else {
        return;
    };
    let cache = Cache::builder()
        .namespace(unique("swr"))
        .default_ttl(Duration::from_millis(200))
        .stale_while_revalidate(Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(read(&cache, &db).await, 0);
    // A bypassing write (contract point 7): only expiry can reveal it.
    let mut writer = postgres_again(&schema).await;
    diesel::sql_query("INSERT INTO users VALUES (1, 'Ann', 'a')")
        .execute(&mut writer)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // expired, within the window

    let refreshing = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let refresher = {
        let (cache, db, refreshing, release) = (
            cache.clone(),
            db.clone(),
            refreshing.clone(),
            release.clone(),
        );
        tokio::spawn(async move {
            cache
                .fill_with("users", "count", &["users"], || async move {
                    let n = db.count_users().await?;
                    refreshing.notify_one();
                    release.notified().await;
                    Ok(n)
                })
                .await
                .unwrap()
        })
    };
    refreshing.notified().await;
    let during = read(&cache, &db).await;
    assert_eq!(during, 0, "served stale while another caller refreshes");
    assert_eq!(cache.stats().stale_served, 1);
    release.notify_one();
    assert_eq!(
        refresher.await.unwrap(),
        1,
        "the refresher returns fresh data"
    );
    assert_eq!(
        read(&cache, &db).await,
        1,
        "then the refreshed entry is a hit"
    );
    assert_eq!(db.counter.get(), 2, "one fill and one refresh");
}

#[tokio::test]
async fn an_invalidation_in_the_stale_window_forces_a_fresh_read() {
    let Some((schema, db)) = setup().await else {
        return;
    };
    let cache = Cache::builder()
        .namespace(unique("swr"))
        .default_ttl(Duration::from_millis(200))
        .stale_while_revalidate(Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(read(&cache, &db).await, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut writer = postgres_again(&schema).await;
    let row = User {
        id: 1,
        name: "Ann".into(),
        status: "a".into(),
    };
    diesel_memclone::insert_into(users::table)
        .values(&row)
        .using(&cache)
        .execute(&mut writer)
        .await
        .unwrap();
    assert_eq!(
        read(&cache, &db).await,
        1,
        "never stale after an invalidation"
    );
    assert_eq!(cache.stats().stale_served, 0);
}

#[tokio::test]
async fn custom_keys_and_uncache() {
    let Some((schema, _)) = setup().await else {
        return;
    };
    let Some(store) = redis_store().await else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("keys"))
        .build()
        .unwrap();
    let mut conn = postgres_again(&schema).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    for expected_queries in [1, 1] {
        let n = users::table
            .cached("n")
            .key("user_count")
            .using(&cache)
            .count(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(
            counter.get(),
            expected_queries,
            "one miss, then a hit under the custom key"
        );
    }
    // A bypassing write, then a write elsewhere that names the key in `uncache`.
    diesel::sql_query("INSERT INTO users VALUES (1, 'Ann', 'a')")
        .execute(&mut conn)
        .await
        .unwrap();
    diesel_memclone::update(diesel_memclone_tests::schema::posts::table)
        .set(diesel_memclone_tests::schema::posts::title.eq("x"))
        .uncache(["user_count"])
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let before = counter.get();
    let n = users::table
        .cached("n")
        .key("user_count")
        .using(&cache)
        .count(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        (n, counter.get() - before),
        (1, 1),
        "uncache deleted the entry"
    );
}

#[tokio::test]
async fn the_stampede_example_makes_one_query_for_all_processes() {
    if setup().await.is_none() || redis_store().await.is_none() {
        return;
    }
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let binary = deps.parent().unwrap().join("examples").join("stampede");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        assert!(std::process::Command::new(cargo)
            .args([
                "build",
                "-p",
                "diesel-memclone-tests",
                "--example",
                "stampede"
            ])
            .status()
            .unwrap()
            .success());
    }
    for (lock, cold, expected) in [
        (true, false, "callers=100 db_queries=1"),
        (true, true, "callers=100 db_queries=1"),
        (false, false, "callers=100 db_queries=2"),
    ] {
        let mut command = std::process::Command::new(&binary);
        command.args(["--processes", "2", "--callers", "50"]);
        if !lock {
            command.arg("--no-lock");
        }
        if cold {
            command.arg("--cold");
        }
        let output = command.output().unwrap();
        assert!(output.status.success());
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(stdout.lines().last(), Some(expected), "{stdout}");
    }
}

/// The in-process store, which reads and locks in one step as a single Redis server does, with
/// the reply to the next read that takes the fill lock held back for a while (`delay_taken`):
/// the caller that holds the lock then joins this process's load after another caller, which
/// found the lock taken, leads it.
struct LateLockHolder {
    inner: MemoryStore,
    delay_taken: Arc<std::sync::atomic::AtomicBool>,
    /// Lock attempts outside reads (a waiter's probes).
    probes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Store for LateLockHolder {
    fn fetch<'a>(
        &'a self,
        entry: &'a str,
        generations: &'a [String],
    ) -> futures_util::future::BoxFuture<
        'a,
        diesel_memclone::store::StoreResult<diesel_memclone::store::Fetched>,
    > {
        self.inner.fetch(entry, generations)
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> futures_util::future::BoxFuture<'a, diesel_memclone::store::StoreResult<()>> {
        self.inner.put(key, value, ttl)
    }
    fn put_with_generations<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
        generations: &'a [String],
    ) -> futures_util::future::BoxFuture<'a, diesel_memclone::store::StoreResult<()>> {
        self.inner
            .put_with_generations(key, value, ttl, generations)
    }
    fn remove<'a>(
        &'a self,
        keys: &'a [String],
    ) -> futures_util::future::BoxFuture<'a, diesel_memclone::store::StoreResult<()>> {
        self.inner.remove(keys)
    }
    fn ensure_generations<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Option<Duration>,
    ) -> futures_util::future::BoxFuture<'a, diesel_memclone::store::StoreResult<Vec<u64>>> {
        self.inner.ensure_generations(keys, ttl)
    }
    fn set_generations<'a>(
        &'a self,
        keys: &'a [String],
        values: &'a [u64],
        ttl: Option<Duration>,
    ) -> futures_util::future::BoxFuture<'a, diesel_memclone::store::StoreResult<()>> {
        self.inner.set_generations(keys, values, ttl)
    }
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        owner: u64,
        ttl: Duration,
    ) -> futures_util::future::BoxFuture<'a, diesel_memclone::store::StoreResult<bool>> {
        self.probes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.try_lock(key, owner, ttl)
    }
    fn unlock<'a>(
        &'a self,
        key: &'a str,
        owner: u64,
    ) -> futures_util::future::BoxFuture<'a, diesel_memclone::store::StoreResult<()>> {
        self.inner.unlock(key, owner)
    }
    fn reads_and_locks_at_once(&self) -> bool {
        true
    }
    fn read_or_lock<'a>(
        &'a self,
        probe: diesel_memclone::store::ReadProbe<'a>,
    ) -> futures_util::future::BoxFuture<
        'a,
        diesel_memclone::store::StoreResult<diesel_memclone::store::ReadLocked>,
    > {
        Box::pin(async move {
            let read = self.inner.read_or_lock(probe).await?;
            if read.lock == diesel_memclone::store::ReadLock::Taken
                && self
                    .delay_taken
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(read)
        })
    }
}

/// Two callers of this process miss one entry; the one whose read took the fill lock joins the
/// process's load after the other, which found the lock taken and so leads it, waiting on the
/// lock. The holder fills and hands its entry to that load: the leader does not sleep out the
/// lock's retry delay (20 s here) before finding it. One database read for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_led_by_a_caller_waiting_on_this_process_s_lock_gets_the_holder_s_entry() {
    let Some((_, db)) = setup().await else {
        return;
    };
    let delay_taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = LateLockHolder {
        inner: MemoryStore::new(1 << 20),
        delay_taken: delay_taken.clone(),
        probes: probes.clone(),
    };
    let cache = Cache::builder()
        .store(store)
        // Longer than the held-back reply.
        .store_timeout(Duration::from_secs(5))
        .namespace(unique("latelock"))
        .lock(
            LockOptions::default()
                .retry_delay(Duration::from_secs(20))
                .retry_jitter(Duration::ZERO)
                .wait_timeout(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    // Read once, then invalidate here: this process moved the generations, so the next reads
    // expect a miss and read and lock in one step.
    assert_eq!(read(&cache, &db).await, 0);
    cache.invalidate_table("users").await;
    delay_taken.store(true, std::sync::atomic::Ordering::SeqCst);
    probes.store(0, std::sync::atomic::Ordering::SeqCst);
    let before = (db.counter.get(), cache.stats());
    let began = std::time::Instant::now();
    let (a, b) = tokio::join!(read(&cache, &db), async {
        // After the first caller's read took the lock.
        tokio::time::sleep(Duration::from_millis(50)).await;
        read(&cache, &db).await
    });
    let waited = began.elapsed();
    let stats = cache.stats();
    assert_eq!((a, b), (0, 0));
    assert!(
        !std::sync::atomic::AtomicBool::load(&delay_taken, std::sync::atomic::Ordering::SeqCst),
        "the lock was taken in a read"
    );
    assert_eq!(db.counter.get() - before.0, 1, "one database read");
    assert_eq!(stats.lock_waits - before.1.lock_waits, 1, "{stats:?}");
    // The leader waited without probing the lock again (not in a loop either).
    assert_eq!(
        std::sync::atomic::AtomicUsize::load(&probes, std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(
        waited < Duration::from_secs(10),
        "the waiting leader slept out the retry delay: {waited:?}"
    );
}

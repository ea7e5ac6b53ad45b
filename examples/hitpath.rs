//! The hit path against its floor, without criterion.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example hitpath
//! ```
//!
//! For results of 1, 100 and 1000 rows, fills one cached query on Redis, then alternates a
//! memclone hit with the floor (one `GET` of the same bytes on the same deadpool-redis pool,
//! decoded the same way) and prints the medians. The last line is the 1-row case, where the
//! cache's own work weighs most: `hit_us=H floor_us=F ratio=R`.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example hitpath -- --near
//! ```
//!
//! With `--near`, one row, every kind of read interleaved round by round in one run: a near hit
//! (Redis cache with a near tier holding the entry), an in-process-store hit, a Redis hit whose
//! generations the near tier knows (`max_bytes(0)`: generations tracked, no entry held, so one
//! `GET`), the floor, PostgreSQL's primary-key lookup with plain Diesel, and the plain Redis hit
//! (entry and generations). Each cache's stats must show that its timed reads were the kind
//! claimed. The last line is `near_us=N memory_us=M redis_us=R floor_us=F pg_us=P`.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example hitpath -- --sync
//! ```
//!
//! With `--sync`, one row on Redis, on one plain thread, interleaved round by round: the hit of
//! the synchronous API (`diesel_memclone::sync`, a `PgConnection`) and the hit of the async API
//! (an `AsyncPgConnection`, timed inside a current-thread runtime's `block_on`), each through
//! its own store and pool on one namespace, so both read the same entry. Then the same with a
//! near tier holding the entry (a near hit of each API, `near: sync_us=.. async_us=..`), and on
//! an r2d2 pool (`r2d2: get_us=.. from_us=.. conn_us=..`: the Redis hit of
//! `.load(&mut pool.get()?)`, of `.load_from(&pool)`, and on a connection held throughout). The
//! last line is `sync_us=S async_us=A ratio=Q`, of the Redis hits.

// mimalloc, as in the benches: with glibc's malloc the cost of the same decode depends on the
// allocation history (consolidation of freed chunks), which adds noise unrelated to the cache.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_memclone::prelude::*;
use diesel_memclone::store::RedisStore;
use diesel_memclone::{Cache, NearCache, Stats};
use diesel_memclone_tests::bench::schema::bench_users;
use diesel_memclone_tests::bench::{
    connect, first_users, floor_get, only_entry_key, redis_cache, BenchUser,
};
use diesel_memclone_tests::RawRedis;
use std::time::{Duration, Instant};

const ROUNDS: usize = 3000;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut conn = connect().await;
    if std::env::args().skip(1).any(|arg| arg == "--near") {
        return near(&mut conn).await;
    }
    if std::env::args().skip(1).any(|arg| arg == "--sync") {
        drop(conn);
        // A thread of its own: the sync API is timed as a sync program calls it, outside any
        // runtime.
        return std::thread::spawn(sync_against_async).join().unwrap();
    }
    let mut last = String::new();
    for rows in [1000_i64, 100, 1] {
        let namespace = format!("hitpath{}_{rows}", std::process::id());
        let (store, cache) = redis_cache(&namespace);
        let redis = RawRedis::test_server(false).await;
        let filled: Vec<BenchUser> = first_users(rows)
            .cached("first")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        let key = only_entry_key(&redis, &namespace).await;
        let (mut hits, mut floors) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
        for round in 0..ROUNDS + 200 {
            let start = Instant::now();
            let hit: Vec<BenchUser> = first_users(rows)
                .cached("first")
                .using(&cache)
                .load(&mut conn)
                .await
                .unwrap();
            let hit_time = start.elapsed().as_secs_f64() * 1e6;
            let start = Instant::now();
            let floor = floor_get(&store, &key).await;
            let floor_time = start.elapsed().as_secs_f64() * 1e6;
            assert_eq!((hit.len(), floor.len()), (filled.len(), filled.len()));
            if round >= 200 {
                // The first rounds warm the pool and the caches up.
                hits.push(hit_time);
                floors.push(floor_time);
            }
        }
        let stats = cache.stats();
        assert_eq!(stats.misses, 1, "every timed read was a hit: {stats:?}");
        let (hit, floor) = (median(hits), median(floors));
        last = format!(
            "hit_us={hit:.1} floor_us={floor:.1} ratio={:.3}",
            hit / floor
        );
        println!("rows={rows} {last}");
    }
    println!("{last}");
}

/// The one-row read of every cache, timed, after checking it returned the filled row.
async fn timed_hit(cache: &Cache, conn: &mut AsyncPgConnection, want: &[BenchUser]) -> f64 {
    let start = Instant::now();
    let hit: Vec<BenchUser> = first_users(1)
        .cached("first")
        .using(cache)
        .load(conn)
        .await
        .unwrap();
    let time = start.elapsed().as_secs_f64() * 1e6;
    assert_eq!(hit, want);
    time
}

/// A Redis cache on the shared namespace with a near tier, in sync before it is timed.
async fn near_cache(namespace: &str, near: NearCache) -> Cache {
    let store = RedisStore::builder(diesel_memclone_tests::redis_url())
        .build()
        .expect("Redis URL");
    let cache = Cache::builder()
        .store(store)
        .namespace(namespace)
        .near_cache(near)
        .build()
        .expect("cache");
    assert!(
        cache.near_cache_ready(Duration::from_secs(10)).await,
        "the near tier's stream is in sync"
    );
    cache
}

/// The order of the kinds of read in each round: a Fisher-Yates shuffle driven by xorshift64
/// (fixed seed: runs are comparable).
struct Order(u64);

impl Order {
    fn shuffled(&mut self) -> [usize; 6] {
        let mut order = [0, 1, 2, 3, 4, 5];
        for i in (1..order.len()).rev() {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            order.swap(i, (self.0 % (i as u64 + 1)) as usize);
        }
        order
    }
}

/// What one cache's timed reads were, from its stats before and after them.
fn kinds(before: Stats, after: Stats) -> [u64; 4] {
    [
        after.hits - before.hits,
        after.misses - before.misses,
        after.near_hits - before.near_hits,
        after.near_misses - before.near_misses,
    ]
}

async fn near(conn: &mut AsyncPgConnection) {
    const WARM_UP: usize = 200;
    let namespace = format!("hitpath_near{}", std::process::id());
    // One entry in Redis, read by every Redis cache and by the floor: the same bytes.
    let (store, plain) = redis_cache(&namespace);
    let want: Vec<BenchUser> = first_users(1)
        .cached("first")
        .using(&plain)
        .load(conn)
        .await
        .unwrap();
    let key = only_entry_key(&RawRedis::test_server(false).await, &namespace).await;
    let near = near_cache(&namespace, NearCache::new()).await;
    // No entry is ever held (a zero-byte tier keeps nothing), but the generations are tracked:
    // a hit is the entry's GET alone.
    let generations = near_cache(&namespace, NearCache::new().max_bytes(0)).await;
    let memory = Cache::builder().namespace(&namespace).build().unwrap();
    timed_hit(&memory, conn, &want).await;

    // near, memory, redis (generations known), floor, pg, plain redis.
    let mut samples: [Vec<f64>; 6] = Default::default();
    let caches = [&near, &generations, &memory, &plain];
    let mut before = [Stats::default(); 4];
    let mut order = Order(0x2545_f491_4f6c_dd1d);
    for round in 0..ROUNDS + WARM_UP {
        if round == WARM_UP {
            // The first rounds warm the pools up and put the entry and generations in the tiers.
            for (stats, cache) in before.iter_mut().zip(caches) {
                *stats = cache.stats();
            }
        }
        let mut times = [0.0; 6];
        // A fresh order each round, so that no kind always follows the same other kind. (A
        // rotation keeps the cyclic order: the near hit then always came right after a Redis
        // round trip, with the thread just woken on cold caches, and the in-process hit always
        // right after the near hit, on caches it had warmed.)
        for kind in order.shuffled() {
            times[kind] = match kind {
                0 => timed_hit(&near, conn, &want).await,
                1 => timed_hit(&memory, conn, &want).await,
                2 => timed_hit(&generations, conn, &want).await,
                3 => {
                    let start = Instant::now();
                    let floor = floor_get(&store, &key).await;
                    let time = start.elapsed().as_secs_f64() * 1e6;
                    assert_eq!(floor, want);
                    time
                }
                4 => {
                    let start = Instant::now();
                    let user: BenchUser = bench_users::table
                        .find(want[0].id)
                        .get_result(conn)
                        .await
                        .unwrap();
                    let time = start.elapsed().as_secs_f64() * 1e6;
                    assert_eq!(user, want[0]);
                    time
                }
                _ => timed_hit(&plain, conn, &want).await,
            };
        }
        if round >= WARM_UP {
            for (samples, time) in samples.iter_mut().zip(times) {
                samples.push(time);
            }
        }
    }
    let rounds = ROUNDS as u64;
    // [hits, misses, near hits, near misses] of the timed reads, per cache.
    let [near_kinds, generation_kinds, memory_kinds, plain_kinds] =
        [0, 1, 2, 3].map(|i| kinds(before[i], caches[i].stats()));
    assert_eq!(near_kinds, [rounds, 0, rounds, 0], "near: all near hits");
    assert_eq!(
        generation_kinds,
        [rounds, 0, 0, rounds],
        "generations known: all Redis hits (entry GET only), no near hit"
    );
    assert_eq!(memory_kinds[..2], [rounds, 0], "in-process: all hits");
    assert_eq!(plain_kinds[..2], [rounds, 0], "plain Redis: all hits");
    eprintln!("near tier: {:?}", near.stats());
    eprintln!("generations only: {:?}", generations.stats());

    let [n, m, r, f, p, plain] = samples.map(median);
    println!("plain_redis_us={plain:.1} (entry and generations, no near tier)");
    println!(
        "near/memory={:.2} (target <= 1.25) pg/near={:.1} (target >= 25) redis/floor={:.3} (target <= 1.10)",
        n / m,
        p / n,
        r / f
    );
    println!("near_us={n:.1} memory_us={m:.1} redis_us={r:.1} floor_us={f:.1} pg_us={p:.1}");
}

/// `--sync`: the sync API's hit against the async API's, on one thread.
fn sync_against_async() {
    use diesel::connection::SimpleConnection;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut async_conn = runtime.block_on(connect());
    let mut sync_conn = PgConnection::establish(&diesel_memclone_tests::postgres_url()).unwrap();
    sync_conn
        .batch_execute(&format!(
            "SET search_path TO {}",
            diesel_memclone_tests::bench::SCHEMA
        ))
        .unwrap();
    let namespace = format!("hitpath_sync{}", std::process::id());
    // Two stores and pools (as two processes would have), one namespace: one entry.
    let (_, async_cache) = redis_cache(&namespace);
    let (_, sync_cache) = redis_cache(&namespace);
    let filled: Vec<BenchUser> = runtime.block_on(async {
        first_users(1)
            .cached("first")
            .using(&async_cache)
            .load(&mut async_conn)
            .await
            .unwrap()
    });
    let (mut syncs, mut asyncs) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    for round in 0..ROUNDS + 200 {
        let start = Instant::now();
        let hit: Vec<BenchUser> = diesel_memclone::sync::CachedDsl::cached(first_users(1), "first")
            .using(&sync_cache)
            .load(&mut sync_conn)
            .unwrap();
        let sync_time = start.elapsed().as_secs_f64() * 1e6;
        assert_eq!(hit, filled);
        let async_time = runtime.block_on(timed_hit(&async_cache, &mut async_conn, &filled));
        if round >= 200 {
            syncs.push(sync_time);
            asyncs.push(async_time);
        }
    }
    let (sync_stats, async_stats) = (sync_cache.stats(), async_cache.stats());
    assert_eq!(
        sync_stats.misses, 0,
        "every sync read was a hit: {sync_stats:?}"
    );
    assert_eq!(
        async_stats.misses, 1,
        "every timed async read was a hit: {async_stats:?}"
    );
    let (sync, asynch) = (median(syncs), median(asyncs));
    near_sync_against_async(&mut sync_conn, &mut async_conn, &namespace, &filled);
    r2d2_hits(&sync_cache, &mut sync_conn, &filled);
    println!(
        "rows=1 sync_us={sync:.1} async_us={asynch:.1} ratio={:.3}",
        sync / asynch
    );
    println!(
        "sync_us={sync:.1} async_us={asynch:.1} ratio={:.3}",
        sync / asynch
    );
}

/// `--sync`, on an r2d2 pool with its defaults (a `SELECT 1` tests each connection it hands
/// out): the Redis hit of `.load(&mut pool.get()?)` against `.load_from(&pool)`, which checks a
/// connection out only on a miss, and against the hit on a connection held throughout,
/// interleaved. `r2d2: get_us=G from_us=F conn_us=C`.
fn r2d2_hits(cache: &Cache, conn: &mut PgConnection, want: &[BenchUser]) {
    use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
    use diesel_memclone::sync::CachedDsl;
    #[derive(Debug)]
    struct SearchPath;
    impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for SearchPath {
        fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
            use diesel::connection::SimpleConnection;
            let sql = format!(
                "SET search_path TO {}",
                diesel_memclone_tests::bench::SCHEMA
            );
            conn.batch_execute(&sql)
                .map_err(diesel::r2d2::Error::QueryError)
        }
    }
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(SearchPath))
        .build(ConnectionManager::<PgConnection>::new(
            diesel_memclone_tests::postgres_url(),
        ))
        .expect("an r2d2 pool");
    let before = cache.stats();
    let mut samples: [Vec<f64>; 3] = Default::default();
    let mut order = Order(0x9e37_79b9_7f4a_7c15);
    for round in 0..ROUNDS + 200 {
        let mut times = [0.0; 3];
        for kind in order.shuffled().into_iter().filter(|&k| k < 3) {
            let start = Instant::now();
            let query = CachedDsl::cached(first_users(1), "first").using(cache);
            let hit: Vec<BenchUser> = match kind {
                0 => query.load(&mut pool.get().unwrap()).unwrap(),
                1 => query.load_from(&pool).unwrap(),
                _ => query.load(conn).unwrap(),
            };
            times[kind] = start.elapsed().as_secs_f64() * 1e6;
            assert_eq!(hit, want);
        }
        if round >= 200 {
            for (samples, time) in samples.iter_mut().zip(times) {
                samples.push(time);
            }
        }
    }
    let stats = cache.stats();
    assert_eq!(
        stats.misses, before.misses,
        "every pooled read was a hit: {stats:?}"
    );
    let [get, from, held] = samples.map(median);
    println!("r2d2: get_us={get:.1} from_us={from:.1} conn_us={held:.1}");
}

/// `--sync`, with a near tier holding the entry: the sync API's near hit against the async
/// API's, interleaved. A near hit is a lookup in this process's memory: the sync call should
/// cost no more than the async one.
fn near_sync_against_async(
    sync_conn: &mut PgConnection,
    async_conn: &mut AsyncPgConnection,
    namespace: &str,
    want: &[BenchUser],
) {
    // A worker thread keeps the async near tier's change stream going between the timed reads
    // (a near hit does no I/O: the connection's own runtime need not run).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let async_near = runtime.block_on(near_cache(namespace, NearCache::new()));
    // Built outside the example's runtime: its first sync read starts its change stream on the
    // library's internal runtime, which runs while this thread is not inside a call.
    let store = RedisStore::builder(diesel_memclone_tests::redis_url())
        .build()
        .expect("Redis URL");
    let sync_near = Cache::builder()
        .store(store)
        .namespace(namespace)
        .near_cache(NearCache::new())
        .build()
        .expect("cache");
    let mut sync_hit = || {
        let start = Instant::now();
        let hit: Vec<BenchUser> = diesel_memclone::sync::CachedDsl::cached(first_users(1), "first")
            .using(&sync_near)
            .load(sync_conn)
            .unwrap();
        let time = start.elapsed().as_secs_f64() * 1e6;
        assert_eq!(hit, want);
        time
    };
    // Until the tier is in sync and holds the entry.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sync_near.stats().near_hits == 0 {
        assert!(
            Instant::now() < deadline,
            "the sync near tier holds the entry"
        );
        sync_hit();
        std::thread::sleep(Duration::from_millis(1));
    }
    let (mut syncs, mut asyncs) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    let mut before = (Stats::default(), Stats::default());
    for round in 0..ROUNDS + 200 {
        if round == 200 {
            before = (sync_near.stats(), async_near.stats());
        }
        let sync_time = sync_hit();
        let async_time = runtime.block_on(timed_hit(&async_near, async_conn, want));
        if round >= 200 {
            syncs.push(sync_time);
            asyncs.push(async_time);
        }
    }
    let rounds = ROUNDS as u64;
    assert_eq!(
        kinds(before.0, sync_near.stats()),
        [rounds, 0, rounds, 0],
        "sync: all near hits"
    );
    assert_eq!(
        kinds(before.1, async_near.stats()),
        [rounds, 0, rounds, 0],
        "async: all near hits"
    );
    let (sync, asynch) = (median(syncs), median(asyncs));
    println!(
        "near: sync_us={sync:.2} async_us={asynch:.2} ratio={:.3}",
        sync / asynch
    );
}

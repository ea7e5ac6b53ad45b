//! The miss path: the first read after an invalidating write, against plain Diesel.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example misspath
//! cargo run --release -p diesel-memclone-tests --example misspath -- --cluster
//! ```
//!
//! Four Redis caches, each in a namespace of its own: fill lock on or off (`no_lock()`), near
//! tier on or off. Round by round, in a rotating order, each cache invalidates `bench_users`
//! (`invalidate_table`, as a write would) and then reads the first user, which must miss; the
//! same query with plain Diesel is timed in the same rounds. Each cache's stats must show one
//! miss per round. Before timing, one such miss per cache goes through a store that counts the
//! store operations (each one round trip on Redis) and prints those its caller waited for (done
//! when the read returned) and those finished after it returned (the entry's write): once after
//! an invalidation made by the cache itself (as timed), once after one made by another cache on
//! the same Redis (another process's write).
//!
//! A miss's caller does not wait for its entry's write (it is finished by a task of its own);
//! each timed read is followed by an untimed pause in which that write completes, so that its
//! work is not counted in the next timed read.
//!
//! The last line is
//! `plain_us=P lock_us=L nolock_us=N near_lock_us=NL near_nolock_us=NN` (medians, µs).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_memclone::prelude::*;
use diesel_memclone::store::{RedisStore, Store};
use diesel_memclone::{Cache, NearCache};
use diesel_memclone_tests::bench::{connect, first_users, BenchUser};
use diesel_memclone_tests::counting::Counting;
use std::time::{Duration, Instant};

const WARM_UP: usize = 100;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn store(cluster: bool) -> RedisStore {
    match cluster {
        true => RedisStore::cluster_builder(diesel_memclone_tests::redis_cluster_urls()),
        false => RedisStore::builder(diesel_memclone_tests::redis_url()),
    }
    .build()
    .expect("Redis URL")
}

/// A cache on `store` in `namespace`: fill lock on or off, near tier on or off.
async fn cache(store: impl Store, namespace: &str, lock: bool, near: bool) -> Cache {
    let mut builder = Cache::builder().store(store).namespace(namespace);
    if !lock {
        builder = builder.no_lock();
    }
    if near {
        builder = builder.near_cache(NearCache::new());
    }
    let cache = builder.build().expect("cache");
    if near {
        assert!(
            cache.near_cache_ready(Duration::from_secs(10)).await,
            "the near tier's stream is in sync"
        );
    }
    cache
}

async fn read(cache: &Cache, conn: &mut AsyncPgConnection) -> Vec<BenchUser> {
    first_users(1)
        .cached("first")
        .using(cache)
        .load(conn)
        .await
        .unwrap()
}

/// One invalidation and then one timed read, which must be a miss.
async fn timed_miss(cache: &Cache, conn: &mut AsyncPgConnection, want: &[BenchUser]) -> f64 {
    cache.invalidate_table("bench_users").await;
    timed_read_miss(cache, conn, want).await
}

/// One timed read, which must be a miss.
async fn timed_read_miss(cache: &Cache, conn: &mut AsyncPgConnection, want: &[BenchUser]) -> f64 {
    let before = cache.stats().misses;
    let start = Instant::now();
    let got = read(cache, conn).await;
    let time = start.elapsed().as_secs_f64() * 1e6;
    assert_eq!(got, want);
    assert_eq!(cache.stats().misses, before + 1, "a miss");
    time
}

/// A miss's entry write finishes after the read returned, on this thread: it finishes here,
/// untimed, rather than in whatever is timed next. The thread keeps running (yielding to the
/// runtime) for 300 µs, several Redis round trips: a sleep would let the core idle and make the
/// next timed read start cold.
async fn settle() {
    let until = Instant::now() + Duration::from_micros(300);
    while Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

const KINDS: [(&str, bool, bool); 4] = [
    ("lock", true, false),
    ("nolock", false, false),
    ("near_lock", true, true),
    ("near_nolock", false, true),
];

// A multi-thread runtime: a miss writes its entry behind the caller only on one (a current-thread
// runtime may not run again once a `block_on` returns).
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut cluster = false;
    let mut rounds = 1000;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cluster" => cluster = true,
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--rounds N")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let mut conn = connect().await;
    let want: Vec<BenchUser> = first_users(1).load(&mut conn).await.unwrap();
    let pid = std::process::id();

    // Store operations (round trips) of one uncontended miss after an invalidation made by this
    // cache, then after one made by another cache on the same Redis (another process).
    for (name, lock, near) in KINDS {
        let counting = Counting::new(store(cluster));
        let namespace = format!("misspath_count{pid}_{name}");
        let other = cache(store(cluster), &namespace, lock, false).await;
        let cache = cache(counting.clone(), &namespace, lock, near).await;
        for by_other in [false, true] {
            read(&cache, &mut conn).await;
            // The fill's entry write, finished behind the read, is not counted.
            tokio::time::sleep(Duration::from_millis(200)).await;
            match by_other {
                false => cache.invalidate_table("bench_users").await,
                true => other.invalidate_table("bench_users").await,
            }
            if near {
                // The tier has heard of the write.
                assert!(cache.near_cache_ready(Duration::from_secs(10)).await);
            }
            counting.take();
            timed_read_miss(&cache, &mut conn, &want).await;
            // Done when the read returned: what its caller waited for.
            let ops = counting.take();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let after = counting.take();
            let writer = ["this process", "another process"][usize::from(by_other)];
            println!(
                "{name}, written by {writer}: {} round trips waited for {ops:?}, then {after:?} after returning",
                ops.len()
            );
        }
    }

    let mut caches = Vec::new();
    for (name, lock, near) in KINDS {
        let namespace = format!("misspath{pid}_{name}");
        caches.push(cache(store(cluster), &namespace, lock, near).await);
    }
    // plain, then the caches in KINDS order.
    let mut samples: [Vec<f64>; 5] = Default::default();
    for round in 0..rounds + WARM_UP {
        let mut times = [0.0; 5];
        for turn in 0..5 {
            let kind = (round + turn) % 5;
            times[kind] = match kind {
                0 => {
                    let start = Instant::now();
                    let got: Vec<BenchUser> = first_users(1).load(&mut conn).await.unwrap();
                    let time = start.elapsed().as_secs_f64() * 1e6;
                    assert_eq!(got, want);
                    time
                }
                i => timed_miss(&caches[i - 1], &mut conn, &want).await,
            };
            settle().await;
        }
        if round >= WARM_UP {
            for (samples, time) in samples.iter_mut().zip(times) {
                samples.push(time);
            }
        }
    }
    let [plain, lock, nolock, near_lock, near_nolock] = samples.map(median);
    println!(
        "ratios to plain: lock={:.2} nolock={:.2} near_lock={:.2} near_nolock={:.2}",
        lock / plain,
        nolock / plain,
        near_lock / plain,
        near_nolock / plain
    );
    println!(
        "plain_us={plain:.1} lock_us={lock:.1} nolock_us={nolock:.1} near_lock_us={near_lock:.1} near_nolock_us={near_nolock:.1}"
    );
}

//! Synchronous calls on Redis from many threads: each thread (up to
//! `sync::MAX_THREAD_RUNTIMES`) reads through a connection of its own, closed when the thread
//! ends, and further threads share the store's connection. A file of its own: the bound is
//! process-wide, so no other test may hold thread runtimes meanwhile (and this file's tests run
//! one at a time).
//!
//! The Redis server is reached through a proxy that counts the connections open at each moment.

use diesel_memclone::store::RedisStore;
use diesel_memclone::sync::MAX_THREAD_RUNTIMES;
use diesel_memclone::Cache;
use diesel_memclone_tests::counting::Counting;
use diesel_memclone_tests::proxy::Proxy;
use diesel_memclone_tests::{redis_store_sync, redis_url, unique};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Waits up to 10 s for the proxy to count `want` open connections; the count seen last.
fn open_connections(proxy: &Proxy, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.open() != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.open()
}

/// `threads` threads read one cached value through `cache` (each 20 times), then wait, all
/// alive, until `while_alive` has looked at the proxy; they end after it. The values read.
fn read_on_threads(
    cache: &Cache,
    threads: usize,
    while_alive: impl FnOnce(),
) -> Vec<Vec<diesel_memclone::Result<i64>>> {
    let (read, done) = (
        Arc::new(Barrier::new(threads + 1)),
        Arc::new(Barrier::new(threads + 1)),
    );
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (cache, read, done) = (cache.clone(), read.clone(), done.clone());
            std::thread::spawn(move || {
                let values = (0..20)
                    .map(|_| {
                        cache
                            .blocking()
                            .fill_with("threads", "answer", &["users"], || Ok(42_i64))
                    })
                    .collect();
                read.wait();
                done.wait();
                values
            })
        })
        .collect();
    read.wait();
    while_alive();
    done.wait();
    handles
        .into_iter()
        .map(|handle| handle.join().expect("a reading thread panicked"))
        .collect()
}

/// Held by each test: the bound is process-wide, so a test's threads must not take thread
/// runtimes while another test counts connections.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A proxy to the test Redis, on a runtime of the test's own (the reads run on plain threads),
/// or `None` (reported) when the server is unreachable.
fn proxy() -> Option<(tokio::runtime::Runtime, Proxy)> {
    redis_store_sync()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .parse()
        .expect("REDIS_URL as redis://ip:port");
    let proxy = runtime.block_on(Proxy::start(upstream));
    Some((runtime, proxy))
}

#[test]
fn each_thread_reads_on_a_connection_of_its_own_up_to_the_bound() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_runtime, proxy)) = proxy() else {
        return;
    };
    let store = RedisStore::builder(proxy.url()).build().unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("sync_threads"))
        .build()
        .unwrap();

    // A few threads: one connection each, while they live, and none once they ended.
    let values = read_on_threads(&cache, 4, || {
        assert_eq!(open_connections(&proxy, 4), 4, "one connection per thread");
    });
    assert!(values.iter().flatten().all(|v| matches!(v, Ok(42))));
    assert_eq!(
        open_connections(&proxy, 0),
        0,
        "each thread's connection closed with its thread"
    );
    let stats = cache.stats();
    // The first reads may wait for the one fill instead (coalesced), or find its entry when
    // they come to take the lock (a lock wait): either way, not a second fill.
    assert_eq!(
        (
            stats.misses,
            stats.hits + stats.coalesced + stats.lock_waits
        ),
        (1, 79),
        "one fill, then hits: {stats:?}"
    );
    let hits = stats.hits;

    // More threads than the bound: the bound's threads have a connection each, the others share
    // the store's one, and every read is answered.
    let threads = MAX_THREAD_RUNTIMES + 6;
    let values = read_on_threads(&cache, threads, || {
        assert_eq!(
            open_connections(&proxy, MAX_THREAD_RUNTIMES + 1),
            MAX_THREAD_RUNTIMES + 1,
            "a connection per thread up to the bound, and the store's shared one"
        );
    });
    assert_eq!(values.len(), threads);
    assert!(values.iter().flatten().all(|v| matches!(v, Ok(42))));
    let stats = cache.stats();
    assert_eq!(stats.misses, 1, "all hits: {stats:?}");
    assert_eq!(stats.hits, hits + 20 * threads as u64, "{stats:?}");
    assert_eq!(
        open_connections(&proxy, 1),
        1,
        "the threads' connections closed, the store's shared one stays"
    );
    drop(cache);
    assert_eq!(
        open_connections(&proxy, 0),
        0,
        "the shared one closed with the store"
    );
}

/// A store of the user's own (here one wrapping the Redis store) runs its operations with the
/// internal runtime current: the connection it opens serves every thread and outlives the
/// thread that opened it.
#[test]
fn a_store_of_the_users_own_shares_its_connection_across_threads() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_runtime, proxy)) = proxy() else {
        return;
    };
    let store = Counting::new(RedisStore::builder(proxy.url()).build().unwrap());
    let cache = Cache::builder()
        .store(store.clone())
        .namespace(unique("sync_own_store"))
        .build()
        .unwrap();
    let read = |cache: &Cache| {
        let cache = cache.clone();
        std::thread::spawn(move || {
            cache
                .blocking()
                .fill_with("own", "answer", &["users"], || Ok(42_i64))
        })
        .join()
        .expect("a reading thread panicked")
    };
    assert!(matches!(read(&cache), Ok(42)));
    assert!(store.take().contains(&"fetch"), "the store was asked");
    assert_eq!(
        open_connections(&proxy, 1),
        1,
        "the store's one connection outlives the thread that opened it"
    );
    assert!(matches!(read(&cache), Ok(42)));
    assert_eq!(store.take(), ["fetch"], "a hit: one round trip");
    assert_eq!(proxy.accepted(), 1, "on the same connection");
    let stats = cache.stats();
    assert_eq!(
        (stats.misses, stats.hits, stats.store_errors),
        (1, 1, 0),
        "{stats:?}"
    );
}

//! N in-process hits of a 1-row cached query and nothing else, to count the hit path's
//! instructions under callgrind (independent of the machine's load):
//!
//! ```text
//! cargo build --release -p diesel-memclone-tests --example hitcount
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/hitcount 0
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/hitcount 20000
//! ```
//!
//! The difference of the two totals ("Collected"), over 20000, is one hit's instructions. The
//! same file built against another version of the library compares the two (as
//! `benches/observe.rs` does by time).
//!
//! With a second argument `near`, the hits are near hits (a Redis cache whose near tier holds
//! the entry; its `max_lag` is 10 s, so that callgrind's slowness does not stop the tier); with
//! `find`, near hits of `Cache::find` (an entity read) instead; with `redis`, Redis hits whose
//! generations a near tier knows (`max_bytes(0)`: the entry's `GET` alone, as `hitpath --near`
//! times them); with `floor`, that `GET` and the decoding alone (`bench::floor_get`), so that
//! `redis` less `floor` is the cache's own work around the round trip. Allocations are counted
//! by callgrind too (the calls of `mi_malloc_aligned`).

use diesel_async::AsyncPgConnection;
use diesel_memclone::prelude::*;
use diesel_memclone::store::RedisStore;
use diesel_memclone::{Cache, NearCache};
use diesel_memclone_tests::bench::{connect, first_users, floor_get, only_entry_key, BenchUser};
use diesel_memclone_tests::RawRedis;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let hits: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let mode = std::env::args().nth(2).unwrap_or_default();
    let namespace = format!("hitcount_{}", std::process::id());
    let near = matches!(mode.as_str(), "near" | "find" | "redis" | "floor");
    let cache = match near {
        false => Cache::builder().namespace(&namespace).build().unwrap(),
        true => {
            let store = RedisStore::builder(diesel_memclone_tests::redis_url())
                .build()
                .expect("Redis URL");
            let cache = Cache::builder()
                .store(store)
                .namespace(&namespace)
                .near_cache(
                    match mode.as_str() {
                        "redis" | "floor" => NearCache::new().max_bytes(0),
                        _ => NearCache::new(),
                    }
                    .max_lag(Duration::from_secs(10)),
                )
                .build()
                .unwrap();
            assert!(cache.near_cache_ready(Duration::from_secs(60)).await);
            cache
        }
    };
    let mut conn = connect().await;
    let filled: Vec<BenchUser> = first_users(1)
        .cached("first")
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    let id = filled[0].id;
    if mode == "floor" {
        let store = RedisStore::builder(diesel_memclone_tests::redis_url())
            .build()
            .expect("Redis URL");
        let key = only_entry_key(&RawRedis::test_server(false).await, &namespace).await;
        for _ in 0..hits + 10 {
            let rows = floor_get(&store, &key).await;
            assert_eq!(rows, filled);
        }
        println!("floor gets={}", hits + 10);
        return;
    }
    // The fill, and a few hits so that every lazy initialisation is behind us.
    for _ in 0..10 {
        read(&cache, &mut conn, &mode, id).await;
    }
    let before = cache.stats();
    for _ in 0..hits {
        read(&cache, &mut conn, &mode, id).await;
    }
    let stats = cache.stats();
    assert_eq!(stats.misses - before.misses, 0, "{stats:?}");
    assert_eq!((stats.hits - before.hits) as usize, hits, "{stats:?}");
    if near && mode != "redis" {
        assert_eq!(
            (stats.near_hits - before.near_hits) as usize,
            hits,
            "{stats:?}"
        );
    }
    println!("hits={}", stats.hits);
}

/// One read of the kind `mode` names.
async fn read(cache: &Cache, conn: &mut AsyncPgConnection, mode: &str, id: i32) {
    if mode == "find" {
        let user: BenchUser = cache.find(conn, id).await.unwrap();
        std::hint::black_box(user);
    } else {
        let hit: Vec<BenchUser> = first_users(1)
            .cached("first")
            .using(cache)
            .load(conn)
            .await
            .unwrap();
        std::hint::black_box(hit);
    }
}

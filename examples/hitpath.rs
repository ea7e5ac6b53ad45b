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

// mimalloc, as in the benches: with glibc's malloc the cost of the same decode depends on the
// allocation history (consolidation of freed chunks), which adds noise unrelated to the cache.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use diesel_memclone::prelude::*;
use diesel_memclone_tests::bench::{
    connect, first_users, floor_get, only_entry_key, redis_cache, BenchUser,
};
use diesel_memclone_tests::RawRedis;
use std::time::Instant;

const ROUNDS: usize = 3000;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut conn = connect().await;
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

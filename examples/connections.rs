//! How many multiplexed connections a Redis store needs: hits per second from 16 and 64
//! concurrent tasks for each number of connections.
//!
//! ```text
//! cargo run --release --example connections
//! ```
//!
//! Each line is `connections=C tasks=T hits_per_s=H` (the best of three rounds). Every task
//! reads the same small cached entry through the cache, so each read is one pipelined round
//! trip to Redis and its decoding.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use diesel_memclone::store::RedisStore;
use diesel_memclone::Cache;
use diesel_memclone_tests::redis_url;
use std::time::Instant;

const PER_TASK: usize = 2000;

async fn read(cache: &Cache) -> Vec<u32> {
    cache
        .fill_with("connections", "entry", &["bench"], || async {
            Ok((0..16).collect::<Vec<u32>>())
        })
        .await
        .expect("read")
}

#[tokio::main]
async fn main() {
    for connections in [1_usize, 2, 4, 8, 16, 32] {
        let store = RedisStore::builder(redis_url())
            .connections(connections)
            .build()
            .expect("Redis URL");
        store.connect().await.expect("Redis");
        let cache = Cache::builder()
            .store(store)
            .namespace(format!("connections{}_{connections}", std::process::id()))
            .build()
            .expect("cache");
        read(&cache).await;
        for tasks in [16_usize, 64] {
            let mut best = 0.0_f64;
            for _ in 0..3 {
                let started = Instant::now();
                let workers: Vec<_> = (0..tasks)
                    .map(|_| {
                        let cache = cache.clone();
                        tokio::spawn(async move {
                            for _ in 0..PER_TASK {
                                read(&cache).await;
                            }
                        })
                    })
                    .collect();
                for worker in workers {
                    worker.await.expect("worker");
                }
                let rate = (tasks * PER_TASK) as f64 / started.elapsed().as_secs_f64();
                best = best.max(rate);
            }
            assert_eq!(cache.stats().misses, 1, "every read after the first hits");
            println!("connections={connections} tasks={tasks} hits_per_s={best:.0}");
        }
    }
}

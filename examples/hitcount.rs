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

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::bench::{connect, first_users, BenchUser};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let hits: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let cache = Cache::builder()
        .namespace(format!("hitcount_{}", std::process::id()))
        .build()
        .unwrap();
    let mut conn = connect().await;
    // The fill, and a few hits so that every lazy initialisation is behind us.
    for _ in 0..10 {
        let _: Vec<BenchUser> = first_users(1)
            .cached("first")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
    }
    for _ in 0..hits {
        let hit: Vec<BenchUser> = first_users(1)
            .cached("first")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        std::hint::black_box(hit);
    }
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits as usize), (1, 9 + hits));
    println!("hits={}", stats.hits);
}

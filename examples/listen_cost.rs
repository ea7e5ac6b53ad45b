//! What the double bump costs (issue 12): a write through memclone bumps its table's generation
//! at once, and, with a listener running, again when the trigger's notification comes back.
//! This times single-row `UPDATE`s through memclone with the triggers installed, in rounds that
//! alternate between no listener and a listener on the same cache (the order flips each round,
//! so that drift cancels out), and counts the invalidations the cache made.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example listen_cost -- [--writes 2000] \
//!     [--rounds 6] [--store redis|memory] [--listener both|on|off]
//! ```
//!
//! `--listener on` or `off` runs every round one way, for an instruction count of each under
//! `valgrind --tool=callgrind` (independent of the machine's load).
//!
//! The writer's session sets `synchronous_commit = off`: the disk's flush per commit (milliseconds
//! on a busy machine) would otherwise hide what is measured.
//!
//! The last line is `store=S writes=W off_us=A on_us=B ratio=R bumps_per_write_off=X
//! bumps_per_write_on=Y`: A and B the median over rounds of the mean time per write without
//! and with the listener, X and Y the cache's invalidations per write.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use diesel_memclone::store::RedisStore;
use diesel_memclone::{listen, Cache};
use std::time::{Duration, Instant};

#[allow(missing_docs)]
mod schema {
    diesel::table! {
        cost_rows (id) {
            id -> Integer,
            n -> BigInt,
        }
    }
}
use schema::cost_rows;

const ROWS: i32 = 100;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let (mut writes, mut rounds, mut store) = (2000_u64, 6_usize, "redis".to_owned());
    let mut modes = vec![false, true];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--writes" => writes = value().parse().expect("--writes N"),
            "--rounds" => rounds = value().parse().expect("--rounds N"),
            "--store" => store = value(),
            "--listener" => {
                modes = match value().as_str() {
                    "on" => vec![true],
                    "off" => vec![false],
                    _ => vec![false, true],
                }
            }
            other => panic!("unknown option {other}"),
        }
    }
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("listen_cost_{}", std::process::id());
    let mut conn = AsyncPgConnection::establish(&database_url)
        .await
        .expect("PostgreSQL");
    conn.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema};
         CREATE TABLE cost_rows (id INTEGER PRIMARY KEY, n BIGINT NOT NULL);
         INSERT INTO cost_rows SELECT g, 0 FROM generate_series(1, {ROWS}) g;
         SET synchronous_commit TO off;"
    ))
    .await
    .expect("schema");
    conn.batch_execute(&listen::install_sql(&schema, &["cost_rows"]).expect("names"))
        .await
        .expect("triggers");
    let mut builder = Cache::builder().namespace(&schema);
    if store == "redis" {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        builder = builder.store(RedisStore::builder(url).build().expect("Redis URL"));
    }
    let cache = builder.build().expect("cache");

    let mut id = 0;
    let mut write_round = async |conn: &mut AsyncPgConnection| {
        let before = cache.stats().invalidations;
        let started = Instant::now();
        for _ in 0..writes {
            id = id % ROWS + 1;
            diesel_memclone::update(cost_rows::table.find(id))
                .set(cost_rows::n.eq(cost_rows::n + 1))
                .using(&cache)
                .execute(conn)
                .await
                .expect("write");
        }
        let per_write_us = started.elapsed().as_secs_f64() * 1e6 / writes as f64;
        (per_write_us, before)
    };
    // One warm-up round of each, not counted.
    let (mut off_us, mut on_us, mut off_bumps, mut on_bumps) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds + 1 {
        // Alternate which goes first.
        let order: Vec<bool> = match round % 2 {
            0 => modes.clone(),
            _ => modes.iter().rev().copied().collect(),
        };
        for listening in order {
            let listener = match listening {
                true => Some(
                    listen::postgres(&database_url)
                        .tables([format!("{schema}.cost_rows")])
                        .channel(&schema)
                        .cache(cache.clone())
                        .start()
                        .await
                        .expect("listener"),
                ),
                false => None,
            };
            let (per_write_us, before) = write_round(&mut conn).await;
            if let Some(listener) = listener {
                // The last notifications: their bumps belong to this round.
                let deadline = Instant::now() + Duration::from_secs(10);
                while listener.notifications() < writes && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                listener.stop().await;
            }
            // The start-up invalidation of the listener is not a write's.
            let bumps = cache.stats().invalidations - before - u64::from(listening);
            let bumps_per_write = bumps as f64 / writes as f64;
            eprintln!(
                "round {round} listener={listening}: {per_write_us:.1} µs/write, \
                 {bumps_per_write:.2} bumps/write"
            );
            if round == 0 {
                continue;
            }
            match listening {
                true => (on_us.push(per_write_us), on_bumps.push(bumps_per_write)),
                false => (off_us.push(per_write_us), off_bumps.push(bumps_per_write)),
            };
        }
    }
    conn.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .expect("drop schema");
    if off_us.is_empty() || on_us.is_empty() {
        println!("store={store} writes={writes} (one mode only: no comparison)");
        return;
    }
    let (off, on) = (median(&mut off_us), median(&mut on_us));
    println!(
        "store={store} writes={writes} off_us={off:.1} on_us={on:.1} ratio={:.3} \
         bumps_per_write_off={:.2} bumps_per_write_on={:.2}",
        on / off,
        median(&mut off_bumps),
        median(&mut on_bumps)
    );
}

//! Short runs of the freshness checker (`examples/freshness.rs`) as part of the suite: several
//! OS processes read and write through the cache; no read may be older than a committed write.
//! A run against the deliberately unguarded cache shows the checker does catch stale reads.
//!
//! Runs are bounded by work, not time (`--reads`, `--writes`, `--until-stale`): a slow or busy
//! machine makes them longer, never a failure. `--seconds` is only an upper bound against a hang.

use diesel_memclone_tests::{
    postgres, redis_cluster_store, redis_cluster_urls, redis_store, unique,
};
use std::path::PathBuf;
use std::process::Command;

fn checker() -> PathBuf {
    let deps = std::env::current_exe()
        .expect("test binary")
        .parent()
        .expect("deps dir")
        .to_path_buf();
    let binary = deps
        .parent()
        .expect("profile dir")
        .join("examples")
        .join("freshness");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "diesel-memclone-tests",
                "--example",
                "freshness",
            ])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building the freshness example failed");
    }
    binary
}

fn run(args: &[&str]) -> (u64, u64, u64, u64) {
    let output = Command::new(checker())
        .args(args)
        .output()
        .expect("run the checker");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "checker failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    let field = |name: &str| -> u64 {
        last.split_whitespace()
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in the last line {last:?}"))
    };
    assert_eq!(
        last.split_whitespace().count(),
        4,
        "last line is exactly four fields: {last:?}"
    );
    (
        field("reads"),
        field("writes"),
        field("stale_reads"),
        field("stale_entries"),
    )
}

/// Work per process: enough reads and writes to interleave, whatever the machine's speed.
const READS: &str = "400";
const WRITES: &str = "40";
/// Only a hang reaches this: a run is normally over in a few seconds.
const UPPER_BOUND: &str = "180";

/// Two processes each did the work asked for (not cut short by the upper bound).
fn assert_work_done(reads: u64, writes: u64) {
    assert!(
        reads >= 2 * READS.parse::<u64>().unwrap() && writes >= 2 * WRITES.parse::<u64>().unwrap(),
        "the run hit its {UPPER_BOUND} s bound before doing its work: reads={reads} writes={writes}"
    );
}

async fn servers_up() -> bool {
    postgres(&unique("fresh_probe")).await.is_some() && redis_store().await.is_some()
}

#[tokio::test]
async fn no_stale_read_across_processes_single_redis() {
    if !servers_up().await {
        return;
    }
    let (reads, writes, stale_reads, stale_entries) = run(&[
        "--processes",
        "2",
        "--reads",
        READS,
        "--writes",
        WRITES,
        "--seconds",
        UPPER_BOUND,
    ]);
    assert_work_done(reads, writes);
    assert_eq!((stale_reads, stale_entries), (0, 0));
}

#[tokio::test]
async fn no_stale_read_across_processes_redis_cluster() {
    if !servers_up().await || redis_cluster_store().await.is_none() {
        return;
    }
    let urls = redis_cluster_urls().join(",");
    let (reads, writes, stale_reads, stale_entries) = run(&[
        "--processes",
        "2",
        "--reads",
        READS,
        "--writes",
        WRITES,
        "--seconds",
        UPPER_BOUND,
        "--redis-cluster",
        &urls,
    ]);
    assert_work_done(reads, writes);
    assert_eq!((stale_reads, stale_entries), (0, 0));
}

#[tokio::test]
async fn the_checker_catches_an_unguarded_fill() {
    if !servers_up().await {
        return;
    }
    let (reads, _, stale_reads, _) = run(&[
        "--processes",
        "2",
        "--naive",
        "--until-stale",
        "--seconds",
        UPPER_BOUND,
    ]);
    assert!(
        stale_reads > 0,
        "the naive cache served no stale read in {reads} reads: the checker is blind"
    );
}

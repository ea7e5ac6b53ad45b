//! Short runs of the freshness checker (`examples/freshness.rs`) as part of the suite: several
//! OS processes read and write through the cache; no read may be older than a committed write.
//! A run against the deliberately unguarded cache shows the checker does catch stale reads.

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
            .args(["build", "--example", "freshness"])
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

async fn servers_up() -> bool {
    postgres(&unique("fresh_probe")).await.is_some() && redis_store().await.is_some()
}

#[tokio::test]
async fn no_stale_read_across_processes_single_redis() {
    if !servers_up().await {
        return;
    }
    let (reads, writes, stale_reads, stale_entries) = run(&["--processes", "2", "--seconds", "3"]);
    assert!(reads > 500 && writes > 50, "reads={reads} writes={writes}");
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
        "--seconds",
        "3",
        "--redis-cluster",
        &urls,
    ]);
    assert!(reads > 500 && writes > 50, "reads={reads} writes={writes}");
    assert_eq!((stale_reads, stale_entries), (0, 0));
}

#[tokio::test]
async fn the_checker_catches_an_unguarded_fill() {
    if !servers_up().await {
        return;
    }
    let (reads, _, stale_reads, _) = run(&["--processes", "2", "--seconds", "4", "--naive"]);
    assert!(reads > 500);
    assert!(
        stale_reads > 0,
        "the naive cache served no stale read in {reads} reads: the checker is blind"
    );
}

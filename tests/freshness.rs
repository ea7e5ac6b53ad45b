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

/// A process on the synchronous API (`diesel_memclone::sync`, `PgConnection`s on plain threads)
/// beside an async one, on one Redis: each sees the other's writes.
#[tokio::test]
async fn no_stale_read_across_sync_and_async_processes() {
    if !servers_up().await {
        return;
    }
    let (reads, writes, stale_reads, stale_entries) = run(&[
        "--processes",
        "1",
        "--sync-processes",
        "1",
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

/// What a `--near-cache` run reports: its last line's seven fields and the near tier's line.
#[derive(Debug)]
struct NearRun {
    reads: u64,
    writes: u64,
    stale_entries: u64,
    beyond_window: u64,
    near_hits: u64,
    near_flushes: u64,
    tracking_faults: u64,
}

fn run_near(args: &[&str]) -> NearRun {
    let output = Command::new(checker())
        .args(args)
        .arg("--near-cache")
        .output()
        .expect("run the checker");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "checker failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let [.., tier, last] = lines[..] else {
        panic!("no near tier line and last line in {stdout:?}")
    };
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
    };
    let names: Vec<&str> = last
        .split_whitespace()
        .map(|p| p.split('=').next().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        [
            "reads",
            "writes",
            "stale_reads",
            "stale_entries",
            "max_lag_us",
            "window_us",
            "beyond_window"
        ],
        "last line: {last:?}"
    );
    assert_eq!(field(last, "window_us"), 100_000, "the default max_lag");
    NearRun {
        reads: field(last, "reads"),
        writes: field(last, "writes"),
        stale_entries: field(last, "stale_entries"),
        beyond_window: field(last, "beyond_window"),
        near_hits: field(tier, "near_hits"),
        near_flushes: field(tier, "near_flushes"),
        tracking_faults: field(tier, "tracking_faults"),
    }
}

/// No stale answer once the writers stopped and `max_lag` passed, no stale read later than
/// `max_lag` after its write returned, the work done and the near tier used.
fn assert_near_run(run: &NearRun) {
    assert_work_done(run.reads, run.writes);
    assert_eq!((run.stale_entries, run.beyond_window), (0, 0), "{run:?}");
    assert!(run.near_hits > 0, "the near tier answered nothing: {run:?}");
}

#[tokio::test]
async fn near_cache_within_max_lag_across_processes_single_redis() {
    if !servers_up().await {
        return;
    }
    let run = run_near(&[
        "--processes",
        "2",
        "--reads",
        READS,
        "--writes",
        WRITES,
        "--seconds",
        UPPER_BOUND,
    ]);
    assert_near_run(&run);
}

#[tokio::test]
async fn near_cache_within_max_lag_across_processes_redis_cluster() {
    if !servers_up().await || redis_cluster_store().await.is_none() {
        return;
    }
    let urls = redis_cluster_urls().join(",");
    let run = run_near(&[
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
    assert_near_run(&run);
}

/// Each process's invalidation stream stalls or is cut every second. The faults come by the
/// clock, not by the work, so the run also lasts at least `--min-seconds` (4: two stalls and
/// two cuts per process); a slow machine only makes it longer.
#[tokio::test]
async fn near_cache_within_max_lag_while_the_stream_stalls_and_is_cut() {
    if !servers_up().await {
        return;
    }
    let run = run_near(&[
        "--processes",
        "2",
        "--reads",
        READS,
        "--writes",
        WRITES,
        "--seconds",
        UPPER_BOUND,
        "--cut-tracking-every",
        "1",
        "--min-seconds",
        "4",
    ]);
    assert_near_run(&run);
    assert!(
        run.tracking_faults >= 2 * 2,
        "each process saw a stall and a cut: {run:?}"
    );
    assert!(run.near_flushes > 2, "the cuts flushed the tiers: {run:?}");
}

/// A run with listeners (`--external-writers`, `--embedded`): its last line, checked to be
/// exactly `reads writes stale_reads stale_entries lag_p50_us lag_p99_us max_lag_us`, and
/// its fields.
fn run_listening(args: &[&str]) -> (String, Vec<(String, u64)>) {
    let output = Command::new(checker())
        .args(args)
        .args([
            "--reads",
            READS,
            "--writes",
            WRITES,
            "--seconds",
            UPPER_BOUND,
        ])
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
    let fields: Vec<(String, u64)> = last
        .split_whitespace()
        .filter_map(|p| p.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.parse().expect("a number")))
        .collect();
    let names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "reads",
            "writes",
            "stale_reads",
            "stale_entries",
            "lag_p50_us",
            "lag_p99_us",
            "max_lag_us"
        ],
        "{last:?}"
    );
    (last, fields)
}

fn field(fields: &[(String, u64)], name: &str) -> u64 {
    fields.iter().find(|(n, _)| n == name).unwrap().1
}

/// Issue 12: two memclone processes and one that writes with plain Diesel (no memclone), the
/// triggers installed and listeners running. Stale reads are allowed (a listener hears of a
/// commit after it); stale entries once every process stopped are not. The lags are reported,
/// not asserted (no speed is asserted in the suite).
#[tokio::test]
async fn external_writers_leave_no_stale_entry() {
    if !servers_up().await {
        return;
    }
    let (last, fields) = run_listening(&["--processes", "2", "--external-writers", "1"]);
    // Three writing processes (two through memclone, one external).
    assert!(
        field(&fields, "reads") >= 2 * READS.parse::<u64>().unwrap()
            && field(&fields, "writes") >= 3 * WRITES.parse::<u64>().unwrap(),
        "the run hit its bound before doing its work: {last}"
    );
    assert_eq!(field(&fields, "stale_entries"), 0, "{last}");
    eprintln!("external writers: {last}");
}

/// Issue 12 on MariaDB (`--mariadb`): the same run as `external_writers_leave_no_stale_entry`,
/// with MariaDB's triggers and polling listeners.
#[tokio::test]
async fn external_writers_on_mariadb_leave_no_stale_entry() {
    let (Some(_), Some(_)) = (
        diesel_memclone_tests::mysql(&unique("fresh")).await,
        redis_store().await,
    ) else {
        return;
    };
    let (last, fields) =
        run_listening(&["--mariadb", "--processes", "2", "--external-writers", "1"]);
    assert!(
        field(&fields, "reads") >= 2 * READS.parse::<u64>().unwrap()
            && field(&fields, "writes") >= 3 * WRITES.parse::<u64>().unwrap(),
        "the run hit its bound before doing its work: {last}"
    );
    assert_eq!(field(&fields, "stale_entries"), 0, "{last}");
    eprintln!("external writers on MariaDB: {last}");
}

/// Issue 12, replicas on the in-process store: two OS processes, each with its own in-process
/// store (no Redis in the cache) and its own listener, writing through memclone, and a third
/// writing with plain Diesel. Each process hears the others' writes only from PostgreSQL; once
/// all stopped, neither store holds a stale answer.
#[tokio::test]
async fn embedded_replicas_leave_no_stale_entry() {
    if !servers_up().await {
        return;
    }
    let (last, fields) =
        run_listening(&["--embedded", "--processes", "2", "--external-writers", "1"]);
    assert!(
        field(&fields, "reads") >= 2 * READS.parse::<u64>().unwrap()
            && field(&fields, "writes") >= 3 * WRITES.parse::<u64>().unwrap(),
        "the run hit its bound before doing its work: {last}"
    );
    assert_eq!(field(&fields, "stale_entries"), 0, "{last}");
    eprintln!("embedded replicas: {last}");
}

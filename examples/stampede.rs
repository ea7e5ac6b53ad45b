//! Stampede protection across processes: every caller misses the same key at the same moment.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example stampede -- --processes 4 --callers 250
//! cargo run --release -p diesel-memclone-tests --example stampede -- --processes 4 --callers 250 --no-lock
//! cargo run --release -p diesel-memclone-tests --example stampede -- --processes 4 --callers 250 --cold
//! ```
//!
//! Each process opens its Redis connections (`RedisStore::connect`) before the burst, unless
//! `--cold`: then the burst itself opens them, as in a process that just started.
//!
//! Each process starts `--callers` tasks at one agreed instant; all read one entry through the
//! cache, whose fill is a slow PostgreSQL query (400 ms). In-process single-flight makes one load
//! per process; the distributed fill lock makes one load in all. The last line is
//! `callers=N db_queries=Q`, with Q counted by Diesel's instrumentation in every process.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_memclone::store::RedisStore;
use diesel_memclone::Cache;
use diesel_memclone_tests::QueryCounter;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

struct Options {
    processes: usize,
    callers: usize,
    lock: bool,
    cold: bool,
    child: Option<(String, u64)>,
}

fn parse_options() -> Options {
    let mut options = Options {
        processes: 4,
        callers: 250,
        lock: true,
        cold: false,
        child: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--processes" => options.processes = value().parse().expect("--processes N"),
            "--callers" => options.callers = value().parse().expect("--callers N"),
            "--no-lock" => options.lock = false,
            "--cold" => options.cold = true,
            "--child" => {
                let namespace = value();
                options.child = Some((namespace, value().parse().expect("start instant")));
            }
            other => panic!("unknown option {other}"),
        }
    }
    options
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn child(options: &Options, namespace: &str, start_at: u64) {
    let database = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = RedisStore::builder(redis).build().expect("Redis URL");
    if !options.cold {
        store.connect().await.expect("Redis");
    }
    let mut builder = Cache::builder().store(store).namespace(namespace);
    if !options.lock {
        builder = builder.no_lock();
    }
    let cache = builder.build().expect("cache");
    let counter = QueryCounter::default();
    let mut conn = AsyncPgConnection::establish(&database)
        .await
        .expect("PostgreSQL");
    counter.attach(&mut conn);
    let conn = Arc::new(tokio::sync::Mutex::new(conn));

    tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(now_millis()))).await;
    let mut callers = Vec::new();
    for _ in 0..options.callers {
        let (cache, conn) = (cache.clone(), conn.clone());
        callers.push(tokio::spawn(async move {
            cache
                .fill_with("stampede", "the hot key", &[], || async move {
                    let mut conn = conn.lock().await;
                    let row: Count =
                        diesel::sql_query("SELECT count(*) AS n FROM pg_class, pg_sleep(0.4)")
                            .get_result(&mut *conn)
                            .await?;
                    Ok(row.n)
                })
                .await
                .expect("read")
        }));
    }
    for caller in callers {
        caller.await.expect("caller");
    }
    let stats = cache.stats();
    println!(
        "callers={} db_queries={} coalesced={} lock_waits={}",
        options.callers,
        counter.get(),
        stats.coalesced,
        stats.lock_waits
    );
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

#[tokio::main]
async fn main() {
    let options = parse_options();
    if let Some((namespace, start_at)) = &options.child {
        child(&options, namespace, *start_at).await;
        return;
    }
    let namespace = format!("stampede{}", now_millis());
    // Time for every process to start and connect before the agreed instant.
    let start_at = now_millis() + 2500;
    let exe = std::env::current_exe().expect("current exe");
    let mut children = Vec::new();
    for _ in 0..options.processes {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["--child", &namespace, &start_at.to_string()])
            .args(["--callers", &options.callers.to_string()])
            .stdout(Stdio::piped());
        if !options.lock {
            command.arg("--no-lock");
        }
        if options.cold {
            command.arg("--cold");
        }
        children.push(command.spawn().expect("spawn"));
    }
    let (mut callers, mut queries) = (0, 0);
    for child in children {
        let output = child.wait_with_output().await.expect("child");
        assert!(output.status.success(), "a process failed");
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().last().unwrap_or_default().to_owned();
        println!("process: {line}");
        callers += field(&line, "callers");
        queries += field(&line, "db_queries");
    }
    println!("callers={callers} db_queries={queries}");
}

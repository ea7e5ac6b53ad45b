//! `--mariadb`: the external-writer mode (`--external-writers N`) on MariaDB/MySQL instead of
//! PostgreSQL (`MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`; a fresh database per
//! run). The parent installs `listen::mariadb_install_sql`'s triggers and runs a sidecar
//! listener; each memclone process runs `listen::mariadb(..)` of its own; the external writers
//! write with plain Diesel. The same floors, lags and last line as on PostgreSQL.
//!
//! MariaDB has no `RETURNING`: a writer learns the version it wrote from
//! `SET version = LAST_INSERT_ID(version + 1)` and `SELECT LAST_INSERT_ID()`, which belong to
//! its connection.

use super::{
    cache_for, check, field, fresh_items, fresh_notes, unix_us, Floors, Item, Lags, Note, Options,
    Random, Stop, Tally, EXTERNAL_WINDOW_US, GROUPS,
};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_memclone::listen;
use diesel_memclone::prelude::*;
use diesel_memclone::{Cache, Error};
use diesel_memclone_tests::RawRedis;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TABLES: [&str; 2] = ["fresh_items", "fresh_notes"];

/// The server's URL with `database` as its database.
fn url_of(database: &str) -> String {
    let base =
        std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let server = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(server, _)| server);
    format!("{server}/{database}")
}

async fn connect(database: &str) -> AsyncMysqlConnection {
    AsyncMysqlConnection::establish(&url_of(database))
        .await
        .expect("MariaDB")
}

/// A listener that invalidates `cache` on every write to the checker's tables.
async fn listener_for(database: &str, cache: &Cache) -> listen::ListenHandle {
    listen::mariadb(url_of(database))
        .tables(TABLES)
        .cache(cache.clone())
        .start()
        .await
        .expect("listener")
}

#[derive(QueryableByName)]
struct LastId {
    #[diesel(sql_type = diesel::sql_types::Unsigned<diesel::sql_types::BigInt>)]
    id: u64,
}

/// `row`'s item version + 1, remembered by the connection for [`written_version`].
fn next_version() -> diesel::expression::SqlLiteral<diesel::sql_types::BigInt> {
    diesel::dsl::sql::<diesel::sql_types::BigInt>("LAST_INSERT_ID(version + 1)")
}

async fn written_version(conn: &mut AsyncMysqlConnection) -> QueryResult<i64> {
    let last: LastId = diesel::sql_query("SELECT LAST_INSERT_ID() AS id")
        .get_result(conn)
        .await?;
    Ok(last.id as i64)
}

fn notes_at_least(version: i64) -> diesel::expression::SqlLiteral<diesel::sql_types::BigInt> {
    diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!("GREATEST(version, {version})"))
}

/// Writes through memclone on `cache`, or, without one, with plain Diesel: the item and its
/// note, in one transaction or as autocommits.
async fn writer(
    cache: Option<Cache>,
    floors: Floors,
    mut conn: AsyncMysqlConnection,
    rows: i32,
    stop: Stop,
    salt: u64,
    lags: Lags,
) {
    let tally = stop.tally.clone();
    let mut random = Random::new(salt);
    while !stop.now() {
        let row = 1 + random.below(rows as u64) as i32;
        let in_transaction = random.below(2) == 0;
        let written: Result<i64, Error> = match &cache {
            None => {
                async fn both(conn: &mut AsyncMysqlConnection, row: i32) -> QueryResult<i64> {
                    diesel::update(fresh_items::table.find(row))
                        .set(fresh_items::version.eq(next_version()))
                        .execute(conn)
                        .await?;
                    let version = written_version(conn).await?;
                    diesel::update(fresh_notes::table.filter(fresh_notes::item_id.eq(row)))
                        .set(fresh_notes::version.eq(notes_at_least(version)))
                        .execute(conn)
                        .await?;
                    Ok(version)
                }
                match in_transaction {
                    true => {
                        conn.transaction(async move |conn| both(conn, row).await)
                            .await
                    }
                    false => both(&mut conn, row).await,
                }
                .map_err(Error::from)
            }
            Some(cache) => {
                async fn both(
                    cache: Cache,
                    conn: &mut AsyncMysqlConnection,
                    row: i32,
                ) -> Result<i64, Error> {
                    diesel_memclone::update(fresh_items::table.find(row))
                        .set(fresh_items::version.eq(next_version()))
                        .using(&cache)
                        .execute(conn)
                        .await?;
                    let version = written_version(conn).await?;
                    diesel_memclone::update(
                        fresh_notes::table.filter(fresh_notes::item_id.eq(row)),
                    )
                    .set(fresh_notes::version.eq(notes_at_least(version)))
                    .using(&cache)
                    .execute(conn)
                    .await?;
                    Ok(version)
                }
                let cache = cache.clone();
                match in_transaction {
                    true => {
                        diesel_memclone::transaction(&mut conn, async move |conn| {
                            both(cache, conn, row).await
                        })
                        .await
                    }
                    false => both(cache, &mut conn, row).await,
                }
            }
        };
        let returned_us = unix_us();
        match written {
            Ok(version) => {
                // Recorded before the floor is raised: a reader that sees the floor finds it.
                lags.returned(row, version, returned_us).await;
                floors.raise(row, version).await;
                AtomicU64::fetch_add(&tally.writes, 1, Ordering::Relaxed);
            }
            // Deadlocks and lock waits are retried by the next loop turn.
            Err(error) => eprintln!("write failed: {error}"),
        }
    }
}

async fn reader(
    cache: Cache,
    floors: Floors,
    mut conn: AsyncMysqlConnection,
    rows: i32,
    stop: Stop,
    salt: u64,
    lags: Lags,
) {
    let tally = stop.tally.clone();
    let mut random = Random::new(salt);
    while !stop.now() {
        let row = 1 + random.below(rows as u64) as i32;
        let kind = random.below(4);
        let floor_rows: Vec<i32> = match kind {
            2 => (1..=rows).filter(|r| r % GROUPS == row % GROUPS).collect(),
            _ => vec![row],
        };
        // The floors are read *before* the cached read begins.
        let floors_before = floors.get(&floor_rows).await;
        let started_us = unix_us();
        let (label, seen) = cached_read(&cache, &mut conn, kind, row).await;
        check(&tally, label, &floor_rows, &floors_before, &seen);
        lags.time_stale(&floor_rows, &floors_before, &seen, started_us)
            .await;
    }
}

/// One read of `kind` (0..4) about `row` through memclone: its label and the versions it saw
/// (the reads of the PostgreSQL checker).
async fn cached_read(
    cache: &Cache,
    conn: &mut AsyncMysqlConnection,
    kind: u64,
    row: i32,
) -> (&'static str, Vec<(i32, i64)>) {
    let items = |items: Vec<Item>| items.iter().map(|i| (i.id, i.version)).collect();
    match kind {
        0 => {
            let item = cache.find::<Item, _>(conn, row).await.expect("entity read");
            ("entity", vec![(item.id, item.version)])
        }
        1 => (
            "query",
            items(
                fresh_items::table
                    .filter(fresh_items::id.eq(row))
                    .cached("item")
                    .using(cache)
                    .load(conn)
                    .await
                    .expect("query read"),
            ),
        ),
        2 => (
            "group",
            items(
                fresh_items::table
                    .filter(fresh_items::grp.eq(row % GROUPS))
                    .order(fresh_items::id)
                    .cached("group")
                    .using(cache)
                    .load(conn)
                    .await
                    .expect("group read"),
            ),
        ),
        _ => {
            let pairs: Vec<(Item, Note)> = fresh_items::table
                .inner_join(fresh_notes::table)
                .filter(fresh_items::id.eq(row))
                .select((Item::as_select(), Note::as_select()))
                .cached("join")
                .using(cache)
                .load(conn)
                .await
                .expect("join read");
            let seen = pairs
                .iter()
                .flat_map(|(i, n)| [(i.id, i.version), (n.item_id, n.version)])
                .collect();
            ("join", seen)
        }
    }
}

/// A child process: memclone readers and writers with a listener, or (`--external`) plain
/// Diesel writers alone.
pub(super) async fn child(options: Options) {
    let (database, namespace) = options.child.clone().expect("child");
    let cache = cache_for(&options, &namespace);
    let lags = Lags::connect(&namespace, EXTERNAL_WINDOW_US).await;
    let listener = match options.external {
        false => Some(listener_for(&database, &cache).await),
        true => None,
    };
    let floors = Floors {
        redis: RawRedis::open(&super::redis_url()).await.expect("Redis"),
        namespace: namespace.clone(),
    };
    let tally = Arc::new(Tally::default());
    let stop = Stop {
        deadline: Instant::now() + Duration::from_secs_f64(options.seconds),
        reads: options.reads_target.filter(|_| !options.external),
        writes: options.writes_target,
        until_stale: options.until_stale,
        not_before: Instant::now() + Duration::from_secs_f64(options.min_seconds),
        tally: tally.clone(),
    };
    let mut tasks = Vec::new();
    for i in 0..options.writers {
        tasks.push(tokio::spawn(writer(
            (!options.external).then(|| cache.clone()),
            floors.clone(),
            connect(&database).await,
            options.rows,
            stop.clone(),
            i as u64 + if options.external { 500 } else { 0 },
            lags.clone(),
        )));
    }
    let readers = if options.external { 0 } else { options.readers };
    for i in 0..readers {
        tasks.push(tokio::spawn(reader(
            cache.clone(),
            floors.clone(),
            connect(&database).await,
            options.rows,
            stop.clone(),
            1000 + i as u64,
            lags.clone(),
        )));
    }
    for task in tasks {
        task.await.expect("task");
    }
    eprintln!("cache: {:?}", cache.stats());
    if let Some(listener) = listener {
        eprintln!("listener: {listener:?}");
        listener.stop().await;
    }
    let samples = lags.samples.lock().unwrap_or_else(|e| e.into_inner());
    let samples: Vec<String> = samples.iter().map(u64::to_string).collect();
    println!("lags_us={}", samples.join(","));
    println!(
        "reads={} writes={} stale_reads={}",
        AtomicU64::load(&tally.reads, Ordering::Relaxed),
        AtomicU64::load(&tally.writes, Ordering::Relaxed),
        AtomicU64::load(&tally.stale, Ordering::Relaxed)
    );
}

/// How many of a fresh cache's answers on the namespace (every row's and group's reads) are
/// older than the database.
async fn stale_entries(options: &Options, database: &str, namespace: &str) -> u64 {
    let cache = cache_for(options, namespace);
    let mut conn = connect(database).await;
    let truth: Vec<Item> = fresh_items::table
        .order(fresh_items::id)
        .load(&mut conn)
        .await
        .expect("truth");
    let version_of = |row: i32| {
        truth
            .iter()
            .find(|i| i.id == row)
            .map(|i| i.version)
            .unwrap_or_default()
    };
    let mut asked: Vec<(u64, i32)> = Vec::new();
    for row in 1..=options.rows {
        asked.extend([(0, row), (1, row), (3, row)]);
    }
    asked.extend((0..GROUPS).map(|group| (2, group)));
    let mut stale = 0;
    for (kind, row) in asked {
        let (_, seen) = cached_read(&cache, &mut conn, kind, row).await;
        stale += seen
            .iter()
            .filter(|(id, version)| *version < version_of(*id))
            .count() as u64;
    }
    stale
}

pub(super) async fn parent(options: Options) {
    let database = format!(
        "fresh_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let namespace = format!("fresh{}", std::process::id());
    let mut conn = connect("").await;
    let values =
        |f: &dyn Fn(i32) -> String| (1..=options.rows).map(f).collect::<Vec<_>>().join(", ");
    conn.batch_execute(&format!(
        "DROP DATABASE IF EXISTS {database}; CREATE DATABASE {database}; USE {database};
         CREATE TABLE fresh_items (id INTEGER PRIMARY KEY, grp INTEGER NOT NULL, version BIGINT NOT NULL);
         CREATE TABLE fresh_notes (id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL, version BIGINT NOT NULL);
         INSERT INTO fresh_items VALUES {};
         INSERT INTO fresh_notes VALUES {};",
        values(&|g| format!("({g}, {}, 0)", g % GROUPS)),
        values(&|g| format!("({g}, {g}, 0)")),
    ))
    .await
    .expect("database");
    conn.batch_execute(&listen::mariadb_install_sql(
        listen::MARIADB_VERSIONS_TABLE,
        &TABLES,
    ))
    .await
    .expect("triggers");
    // A listener for the whole run (a sidecar), which outlives every writer.
    let sidecar = listener_for(&database, &cache_for(&options, &namespace)).await;

    let exe = std::env::current_exe().expect("current exe");
    let mut children = Vec::new();
    for i in 0..options.processes + options.external_writers {
        let mut command = tokio::process::Command::new(&exe);
        if i >= options.processes {
            command.arg("--external");
        }
        command
            .arg("--mariadb")
            .args(["--external-writers", &options.external_writers.to_string()])
            .args(["--child", &database, &namespace])
            .args(["--seconds", &options.seconds.to_string()])
            .args(["--rows", &options.rows.to_string()])
            .args(["--readers", &options.readers.to_string()])
            .args(["--writers", &options.writers.to_string()])
            .stdout(Stdio::piped());
        if let Some(reads) = options.reads_target {
            command.args(["--reads", &reads.to_string()]);
        }
        if let Some(writes) = options.writes_target {
            command.args(["--writes", &writes.to_string()]);
        }
        if options.until_stale {
            command.arg("--until-stale");
        }
        children.push(command.spawn().expect("spawn a checker process"));
    }
    let (mut reads, mut writes, mut stale_reads) = (0, 0, 0);
    let mut lags_us: Vec<u64> = Vec::new();
    for child in children {
        let output = child.wait_with_output().await.expect("child output");
        assert!(
            output.status.success(),
            "a checker process failed: {:?}",
            output.status
        );
        let text = String::from_utf8_lossy(&output.stdout);
        for lags in text.lines().filter_map(|l| l.strip_prefix("lags_us=")) {
            lags_us.extend(lags.split(',').filter_map(|lag| lag.parse::<u64>().ok()));
        }
        let line = text.lines().last().unwrap_or_default().to_owned();
        eprintln!("process: {line}");
        reads += field(&line, "reads");
        writes += field(&line, "writes");
        stale_reads += field(&line, "stale_reads");
    }
    // The last external commits reach the cache through the sidecar: give them time.
    let mut stale_entries = stale_entries(&options, &database, &namespace).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stale_entries > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stale_entries = self::stale_entries(&options, &database, &namespace).await;
    }
    eprintln!("sidecar listener: {sidecar:?}");
    sidecar.stop().await;
    conn.batch_execute(&format!("DROP DATABASE IF EXISTS {database}"))
        .await
        .expect("drop database");
    lags_us.sort_unstable();
    let at = |q: f64| match lags_us.len() {
        0 => 0,
        n => lags_us[((n as f64 * q).ceil() as usize).clamp(1, n) - 1],
    };
    let (p50, p99, max) = (at(0.50), at(0.99), lags_us.last().copied().unwrap_or(0));
    println!(
        "reads={reads} writes={writes} stale_reads={stale_reads} stale_entries={stale_entries} \
         lag_p50_us={p50} lag_p99_us={p99} max_lag_us={max}"
    );
}

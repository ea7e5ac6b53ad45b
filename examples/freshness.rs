//! The freshness checker: several OS processes write versioned rows through memclone and read
//! them back through `.cached()` (entity reads, single-row queries, group lists, joins), and every
//! read is checked against the newest version committed before that read began.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example freshness -- --processes 3 --seconds 20
//! cargo run --release -p diesel-memclone-tests --example freshness -- --processes 3 --seconds 20 \
//!     --redis-cluster redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002
//! ```
//!
//! PostgreSQL comes from `DATABASE_URL`, Redis from `REDIS_URL` (the defaults of the tests).
//! How "committed before the read began" is known across processes: after a write helper
//! returns (the transaction committed and the invalidation was delivered), the writer raises
//! the row's *floor* to the version it wrote, in a Redis key of its own (an atomic max). A reader
//! reads the floor first, then does its cached read: a version below the floor is a stale read.
//!
//! The last line is exactly `reads=R writes=W stale_reads=S stale_entries=E`, where E counts the
//! cached answers still stale once every writer has stopped (the TTL is far from expiring).
//! `--naive` makes the readers use a deliberately broken cache instead (fills tag themselves with
//! generations read after their database read), to show that the checker catches stale reads. It
//! lives in this file, on the public `Store` trait, under the same namespace as memclone's
//! entries, so that memclone's writes invalidate it (see `Naive`).
//!
//! A run is bounded by time (`--seconds`) or by work: with `--reads N` / `--writes M` each process
//! stops once it has made that many reads and writes, and with `--until-stale` once it has seen a
//! stale read; `--seconds` is then only the upper bound. The suite runs by work, so that a slow or
//! busy machine makes a run longer, never a failure.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example freshness -- --processes 3 --seconds 20 \
//!     --near-cache [--max-lag-ms 100] [--cut-tracking-every 2]
//! ```
//!
//! `--near-cache` gives each process's cache a near tier, which may serve another process's
//! write stale for up to `max_lag` (`--max-lag-ms`, default 100). Each stale read is then timed
//! from the return of the write that made its version stale (the writer records every version's
//! return time, unix µs, in Redis beside the floors; the processes share one clock) to the
//! read's start. Once every process's writers have stopped, each process waits past `max_lag`
//! and counts the answers its own cache (near tier included) still gives stale. The last line is
//! `reads=R writes=W stale_reads=S stale_entries=E max_lag_us=L window_us=X beyond_window=B`:
//! L the longest lag of a stale read, X the configured `max_lag`, B the stale reads later than X.
//! The line before it reports `near_hits`, `near_flushes` and `tracking_faults`.
//!
//! `--sync-processes N` adds N processes that use the synchronous API (`diesel_memclone::sync`,
//! `PgConnection`s on plain threads) beside the `--processes` async ones, on the same Redis,
//! namespace and rows: each kind must see the other's writes (not with `--naive` or
//! `--near-cache`).
//!
//! `--external-writers N` (single Redis only; issue 12) adds N processes that write the same rows
//! with plain Diesel (no memclone: like `psql`, a cron job or another service). The parent
//! installs memclone's row-level triggers (`listen::row_triggers`; `--table-triggers`: the
//! table-level ones of `listen::install_sql`) on the tables and runs a listener for
//! the whole run (a sidecar), and each memclone process runs one of its own
//! (`listen::postgres(..).start()`). Every stale read is timed from the return of the commit
//! that made it stale; stale reads are expected here (a listener hears of a commit after it),
//! stale entries are not: once every process stopped, the answers still stale are counted
//! (waiting up to 10 s for the last notifications to land). The last line is
//! `reads=R writes=W stale_reads=S stale_entries=E lag_p50_us=A lag_p99_us=B max_lag_us=C`.
//!
//! `--mariadb` runs the `--external-writers` mode on MariaDB/MySQL (`MYSQL_URL`) with its
//! listener (`listen::mariadb`): see `freshness/mariadb.rs`.
//! `--embedded` (issue 12) runs the replicas' set-up without Redis in the cache: each memclone
//! process keeps the in-process store and a listener of its own, and hears every other
//! process's writes (and, with `--external-writers`, the plain-Diesel ones) only through
//! PostgreSQL's notifications. Stale reads are timed from the return of the write (through
//! memclone in another process, or external) that made them stale. Once every process has
//! stopped writing, each memclone process counts the answers its own store still gives stale
//! (waiting up to 10 s for the last notifications), and the last line is the one of
//! `--external-writers`. Redis still holds the checker's floors and return times (not the cache).
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example freshness -- --embedded --processes 2 \
//!     [--external-writers 1] --seconds 20
//! ```
//!
//! `--cut-tracking-every S` (single Redis only: `NearCache::tracking_url` takes one server) runs
//! each process's invalidation stream through a proxy of its own that every S seconds
//! alternately stalls (holds every byte, connection open) and cuts the link, restoring it after
//! twice `max_lag`. Its faults are time based: `--min-seconds S` keeps a run bounded by work going
//! at least that long.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_memclone::deadpool_redis::redis;
use diesel_memclone::prelude::*;
use diesel_memclone::store::{RedisStore, Store};
use diesel_memclone::{Cache, Error, NearCache};
use diesel_memclone_tests::proxy::Proxy;
use diesel_memclone_tests::RawRedis;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// Not `examples/mariadb.rs`: cargo would take that for an example of its own.
#[path = "freshness/mariadb.rs"]
mod mariadb;

#[allow(missing_docs)]
mod schema {
    diesel::table! {
        fresh_items (id) {
            id -> Integer,
            grp -> Integer,
            version -> BigInt,
        }
    }

    diesel::table! {
        fresh_notes (id) {
            id -> Integer,
            item_id -> Integer,
            version -> BigInt,
        }
    }

    diesel::joinable!(fresh_notes -> fresh_items (item_id));
    diesel::allow_tables_to_appear_in_same_query!(fresh_items, fresh_notes);
}
use schema::{fresh_items, fresh_notes};

#[derive(Debug, Clone, Queryable, Selectable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = fresh_items)]
struct Item {
    id: i32,
    grp: i32,
    version: i64,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = fresh_notes)]
struct Note {
    id: i32,
    item_id: i32,
    version: i64,
}

const GROUPS: i32 = 4;

#[derive(Debug, Clone)]
struct Options {
    processes: usize,
    seconds: f64,
    rows: i32,
    readers: usize,
    writers: usize,
    cluster: Option<String>,
    naive: bool,
    /// Per process: stop once this many reads (and `writes_target` writes) are done.
    reads_target: Option<u64>,
    writes_target: Option<u64>,
    /// Per process: stop at the first stale read.
    until_stale: bool,
    /// Per process: do not stop before this many seconds, even with the work done.
    min_seconds: f64,
    near: bool,
    max_lag_ms: u64,
    cut_every: Option<f64>,
    child: Option<(String, String)>,
    /// Processes using the synchronous API, besides `processes`.
    sync_processes: usize,
    /// This child uses the synchronous API.
    sync: bool,
    /// Processes that write with plain Diesel, invalidating through the database's listeners.
    external_writers: usize,
    /// This child is one of them.
    external: bool,
    /// `--mariadb`: the external-writer mode on MariaDB/MySQL.
    mariadb: bool,
    /// In-process stores and a listener per process, no Redis in the cache.
    embedded: bool,
    /// `--table-triggers`: `install_sql`'s table-level triggers, not row-level ones.
    table_triggers: bool,
}

fn parse_options() -> Options {
    let mut options = Options {
        processes: 3,
        seconds: 20.0,
        rows: 16,
        readers: 4,
        writers: 1,
        cluster: None,
        naive: false,
        reads_target: None,
        writes_target: None,
        until_stale: false,
        min_seconds: 0.0,
        near: false,
        max_lag_ms: NearCache::DEFAULT_MAX_LAG.as_millis() as u64,
        cut_every: None,
        child: None,
        sync_processes: 0,
        sync: false,
        external_writers: 0,
        external: false,
        mariadb: false,
        embedded: false,
        table_triggers: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--processes" => options.processes = value().parse().expect("--processes N"),
            "--seconds" => options.seconds = value().parse().expect("--seconds S"),
            "--rows" => options.rows = value().parse().expect("--rows N"),
            "--readers" => options.readers = value().parse().expect("--readers N"),
            "--writers" => options.writers = value().parse().expect("--writers N"),
            "--redis-cluster" => options.cluster = Some(value()),
            "--naive" => options.naive = true,
            "--reads" => options.reads_target = Some(value().parse().expect("--reads N")),
            "--writes" => options.writes_target = Some(value().parse().expect("--writes N")),
            "--until-stale" => options.until_stale = true,
            "--min-seconds" => options.min_seconds = value().parse().expect("--min-seconds S"),
            "--near-cache" => options.near = true,
            "--max-lag-ms" => options.max_lag_ms = value().parse().expect("--max-lag-ms N"),
            "--cut-tracking-every" => {
                options.cut_every = Some(value().parse().expect("--cut-tracking-every S"))
            }
            "--sync-processes" => {
                options.sync_processes = value().parse().expect("--sync-processes N")
            }
            "--sync" => options.sync = true,
            "--external-writers" => {
                options.external_writers = value().parse().expect("--external-writers N")
            }
            "--external" => options.external = true,
            "--mariadb" => options.mariadb = true,
            "--embedded" => options.embedded = true,
            "--table-triggers" => options.table_triggers = true,
            "--child" => {
                let schema = value();
                options.child = Some((schema, value()));
            }
            other => panic!("unknown option {other}; see the example's documentation"),
        }
    }
    assert!(
        options.sync_processes == 0 || !(options.near || options.naive),
        "--sync-processes does not combine with --near-cache or --naive"
    );
    assert!(
        options.cut_every.is_none() || (options.near && options.cluster.is_none()),
        "--cut-tracking-every needs --near-cache and a single Redis (not --redis-cluster)"
    );
    assert!(
        options.external_writers == 0
            || !(options.near || options.naive || options.cluster.is_some()),
        "--external-writers does not combine with --near-cache, --naive or --redis-cluster"
    );
    assert!(
        !(options.mariadb || options.embedded)
            || !(options.near
                || options.naive
                || options.cluster.is_some()
                || options.sync_processes > 0),
        "--mariadb and --embedded do not combine with --near-cache, --naive, --redis-cluster or --sync-processes"
    );
    options
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn connect(schema: &str) -> AsyncPgConnection {
    let mut conn = AsyncPgConnection::establish(&database_url())
        .await
        .expect("PostgreSQL");
    conn.batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .expect("search_path");
    conn
}

fn store_for(options: &Options) -> RedisStore {
    match &options.cluster {
        Some(urls) => RedisStore::cluster_builder(urls.split(',').map(str::trim)).build(),
        None => RedisStore::builder(redis_url()).build(),
    }
    .expect("Redis URL")
}

fn cache_for(options: &Options, namespace: &str) -> Cache {
    if options.embedded {
        // The in-process store: nothing shared, only the listener keeps it fresh.
        return Cache::builder()
            .namespace(namespace)
            .default_ttl(Duration::from_secs(600))
            .build()
            .expect("cache");
    }
    Cache::builder()
        .store(store_for(options))
        .namespace(namespace)
        .default_ttl(Duration::from_secs(600))
        .build()
        .expect("cache")
}

/// How the readers read: through memclone, or through the broken cache of `--naive`.
#[derive(Clone)]
enum Reads {
    Memclone(Cache),
    Naive(Naive),
}

impl Reads {
    /// The readers' side of `cache`: the cache itself, or with `--naive` the broken cache on
    /// the same store and namespace.
    fn new(options: &Options, namespace: &str, cache: &Cache) -> Self {
        match options.naive {
            true => Reads::Naive(Naive {
                store: store_for(options),
                namespace: namespace.to_owned(),
            }),
            false => Reads::Memclone(cache.clone()),
        }
    }

    /// One read of `kind` (0..4) about `row`: its label and the versions it saw, by row.
    async fn read(
        &self,
        conn: &mut AsyncPgConnection,
        kind: u64,
        row: i32,
    ) -> (&'static str, Vec<(i32, i64)>) {
        match self {
            Reads::Memclone(cache) => cached_read(cache, conn, kind, row).await,
            Reads::Naive(naive) => naive.read(conn, kind, row).await,
        }
    }
}

/// **Broken on purpose**: a read-through cache that reads the generations *after* its database
/// read, the classic race that lets a fill store data a concurrent write already replaced (and
/// tag it as current). Its entries (JSON, under `{namespace}:naive:..`) are guarded by the query
/// generations of the tables they read, at the key memclone documents for them
/// (`{namespace}:{t:TABLE}:qgen`), which every write through memclone moves: only the race
/// makes it serve stale reads.
#[derive(Clone)]
struct Naive {
    store: RedisStore,
    namespace: String,
}

#[derive(Serialize, Deserialize)]
struct NaiveEntry {
    tags: Vec<u64>,
    seen: Vec<(i32, i64)>,
}

impl Naive {
    async fn read(
        &self,
        conn: &mut AsyncPgConnection,
        kind: u64,
        row: i32,
    ) -> (&'static str, Vec<(i32, i64)>) {
        let (label, tables, id) = match kind {
            0 => ("entity", &["fresh_items"][..], row),
            1 => ("query", &["fresh_items"][..], row),
            2 => ("group", &["fresh_items"][..], row % GROUPS),
            _ => ("join", &["fresh_items", "fresh_notes"][..], row),
        };
        let seen = self
            .read_through(label, id, tables, database_read(conn, kind, row))
            .await;
        (label, seen)
    }

    async fn read_through(
        &self,
        label: &str,
        id: i32,
        tables: &[&str],
        database: impl Future<Output = Vec<(i32, i64)>>,
    ) -> Vec<(i32, i64)> {
        let key = format!("{}:naive:{label}:{id}", self.namespace);
        let generations: Vec<String> = tables
            .iter()
            .map(|table| format!("{}:{{t:{table}}}:qgen", self.namespace))
            .collect();
        let fetched = self
            .store
            .fetch(&key, &generations)
            .await
            .expect("naive fetch");
        let entry = fetched
            .entry
            .and_then(|bytes| serde_json::from_slice::<NaiveEntry>(&bytes).ok());
        if let Some(entry) = entry {
            if entry.tags.iter().copied().map(Some).eq(fetched.generations) {
                return entry.seen;
            }
        }
        let seen = database.await;
        // The bug: the generations are read only now. Waiting widens the window between the
        // database read and this, so that the race shows quickly.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let tags = self
            .store
            .ensure_generations(&generations, None)
            .await
            .expect("naive generations");
        let entry = NaiveEntry {
            tags,
            seen: seen.clone(),
        };
        let bytes = serde_json::to_vec(&entry).expect("JSON");
        self.store
            .put(&key, bytes, Duration::from_secs(600))
            .await
            .expect("naive put");
        seen
    }
}

/// The floors live on the single Redis server, apart from the cache under test.
#[derive(Clone)]
struct Floors {
    redis: RawRedis,
    namespace: String,
}

impl Floors {
    fn key(&self, row: i32) -> String {
        format!("{}:floor:{row}", self.namespace)
    }

    async fn raise(&self, row: i32, version: i64) {
        let script = "local v = tonumber(redis.call('GET', KEYS[1]) or '0') \
                      if v < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end return 1";
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(1).arg(self.key(row)).arg(version);
        self.redis.query(&cmd).await.expect("raise floor");
    }

    async fn get(&self, rows: &[i32]) -> Vec<i64> {
        let mut cmd = redis::cmd("MGET");
        for row in rows {
            cmd.arg(self.key(*row));
        }
        self.redis
            .query_as::<Vec<Option<i64>>>(&cmd)
            .await
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect()
    }
}

/// A small xorshift generator: reads and writes pick rows at random, without another crate.
struct Random(u64);

impl Random {
    fn new(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Random(
            (nanos
                ^ (u64::from(std::process::id()) << 32)
                ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                | 1,
        )
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    writes: AtomicU64,
    stale: AtomicU64,
}

/// When a process's readers and writers stop: at the deadline, or once the work asked for is done.
#[derive(Clone)]
struct Stop {
    deadline: Instant,
    reads: Option<u64>,
    writes: Option<u64>,
    until_stale: bool,
    /// `--min-seconds`: work done earlier keeps going until then.
    not_before: Instant,
    tally: Arc<Tally>,
}

impl Stop {
    fn now(&self) -> bool {
        if Instant::now() >= self.deadline {
            return true;
        }
        if self.until_stale && AtomicU64::load(&self.tally.stale, Ordering::Relaxed) > 0 {
            return true;
        }
        if Instant::now() < self.not_before {
            return false;
        }
        if self.reads.is_none() && self.writes.is_none() {
            return false;
        }
        let reached = |target: Option<u64>, done: &AtomicU64| {
            target.is_none_or(|t| AtomicU64::load(done, Ordering::Relaxed) >= t)
        };
        !self.until_stale
            && reached(self.reads, &self.tally.reads)
            && reached(self.writes, &self.tally.writes)
    }
}

/// Writes through memclone on `cache`, or, without one, with plain Diesel (`--external`).
async fn writer(
    cache: Option<Cache>,
    floors: Floors,
    mut conn: AsyncPgConnection,
    rows: i32,
    stop: Stop,
    salt: u64,
    lags: Option<Lags>,
) {
    let external = cache.is_none();
    let cache = cache.unwrap_or_else(Cache::in_memory);
    let tally = stop.tally.clone();
    let mut random = Random::new(salt);
    while !stop.now() {
        let row = 1 + random.below(rows as u64) as i32;
        let written: Result<i64, Error> = if external {
            // Plain Diesel, no memclone: only the triggers and the listeners see it.
            external_write(&mut conn, row, random.below(2) == 0).await
        } else if random.below(2) == 0 {
            // Item and note in one transaction: invalidated after the commit.
            let cache2 = cache.clone();
            diesel_memclone::transaction(&mut conn, async move |conn| {
                let item: Item = diesel_memclone::update(fresh_items::table.find(row))
                    .set(fresh_items::version.eq(fresh_items::version + 1))
                    .map(|s| s.returning(fresh_items::all_columns))
                    .using(&cache2)
                    .get_result(conn)
                    .await?;
                diesel_memclone::update(fresh_notes::table.filter(fresh_notes::item_id.eq(row)))
                    .set(fresh_notes::version.eq(item.version))
                    .using(&cache2)
                    .execute(conn)
                    .await?;
                Ok(item.version)
            })
            .await
        } else {
            // Two autocommit writes with RETURNING: their rows are written through when no
            // other write overlapped. The floor is raised once both have returned.
            async {
                let item: Item = diesel_memclone::update(fresh_items::table.find(row))
                    .set(fresh_items::version.eq(fresh_items::version + 1))
                    .map(|s| s.returning(fresh_items::all_columns))
                    .using(&cache)
                    .get_result(&mut conn)
                    .await?;
                let _: Note = diesel_memclone::update(
                    fresh_notes::table.filter(fresh_notes::item_id.eq(row)),
                )
                .set(
                    fresh_notes::version.eq(diesel::dsl::sql::<diesel::sql_types::BigInt>(
                        &format!("GREATEST(version, {})", item.version),
                    )),
                )
                .map(|s| s.returning(fresh_notes::all_columns))
                .using(&cache)
                .get_result(&mut conn)
                .await?;
                Ok(item.version)
            }
            .await
        };
        let returned_us = unix_us();
        match written {
            Ok(version) => {
                // Recorded before the floor is raised: a reader that sees the floor finds it.
                if let Some(lags) = &lags {
                    lags.returned(row, version, returned_us).await;
                }
                floors.raise(row, version).await;
                AtomicU64::fetch_add(&tally.writes, 1, Ordering::Relaxed);
            }
            // Serialization conflicts are retried by the next loop turn.
            Err(error) => eprintln!("write failed: {error}"),
        }
    }
}

/// The writer's two writes with plain Diesel: in one transaction, or as two autocommits.
async fn external_write(
    conn: &mut AsyncPgConnection,
    row: i32,
    in_transaction: bool,
) -> Result<i64, Error> {
    use diesel_async::AsyncConnection as _;
    async fn both(conn: &mut AsyncPgConnection, row: i32) -> QueryResult<i64> {
        let version: i64 = diesel::update(fresh_items::table.find(row))
            .set(fresh_items::version.eq(fresh_items::version + 1))
            .returning(fresh_items::version)
            .get_result(conn)
            .await?;
        diesel::update(fresh_notes::table.filter(fresh_notes::item_id.eq(row)))
            .set(
                fresh_notes::version.eq(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
                    "GREATEST(version, {version})"
                ))),
            )
            .execute(conn)
            .await?;
        Ok(version)
    }
    let version = match in_transaction {
        true => {
            conn.transaction(async move |conn| both(conn, row).await)
                .await?
        }
        false => both(conn, row).await?,
    };
    Ok(version)
}

async fn reader(
    reads: Reads,
    floors: Floors,
    mut conn: AsyncPgConnection,
    rows: i32,
    stop: Stop,
    salt: u64,
    lags: Option<Lags>,
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
        let (label, seen) = reads.read(&mut conn, kind, row).await;
        check(&tally, label, &floor_rows, &floors_before, &seen);
        if let Some(lags) = &lags {
            lags.time_stale(&floor_rows, &floors_before, &seen, started_us)
                .await;
        }
    }
}

/// One read of `kind` (0..4) about `row` through memclone: its label and the versions it saw.
async fn cached_read(
    cache: &Cache,
    conn: &mut AsyncPgConnection,
    kind: u64,
    row: i32,
) -> (&'static str, Vec<(i32, i64)>) {
    match kind {
        0 => {
            let item = cache.find::<Item, _>(conn, row).await.expect("entity read");
            ("entity", vec![(item.id, item.version)])
        }
        1 => {
            let items: Vec<Item> = fresh_items::table
                .filter(fresh_items::id.eq(row))
                .cached("item")
                .using(cache)
                .load(conn)
                .await
                .expect("query read");
            ("query", items.iter().map(|i| (i.id, i.version)).collect())
        }
        2 => {
            let items: Vec<Item> = fresh_items::table
                .filter(fresh_items::grp.eq(row % GROUPS))
                .order(fresh_items::id)
                .cached("group")
                .using(cache)
                .load(conn)
                .await
                .expect("group read");
            ("group", items.iter().map(|i| (i.id, i.version)).collect())
        }
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

/// The same read as `cached_read`, from the database alone (what `--naive` caches).
async fn database_read(conn: &mut AsyncPgConnection, kind: u64, row: i32) -> Vec<(i32, i64)> {
    let items = |items: Vec<Item>| items.iter().map(|i| (i.id, i.version)).collect();
    match kind {
        0 | 1 => items(
            fresh_items::table
                .filter(fresh_items::id.eq(row))
                .select(Item::as_select())
                .load(conn)
                .await
                .expect("database read"),
        ),
        2 => items(
            fresh_items::table
                .filter(fresh_items::grp.eq(row % GROUPS))
                .order(fresh_items::id)
                .select(Item::as_select())
                .load(conn)
                .await
                .expect("database read"),
        ),
        _ => {
            let pairs: Vec<(Item, Note)> = fresh_items::table
                .inner_join(fresh_notes::table)
                .filter(fresh_items::id.eq(row))
                .select((Item::as_select(), Note::as_select()))
                .load(conn)
                .await
                .expect("database read");
            pairs
                .iter()
                .flat_map(|(i, n)| [(i.id, i.version), (n.item_id, n.version)])
                .collect()
        }
    }
}

fn check(tally: &Tally, label: &str, floor_rows: &[i32], floors: &[i64], seen: &[(i32, i64)]) {
    AtomicU64::fetch_add(&tally.reads, 1, Ordering::Relaxed);
    let stale = seen.iter().find(|(row, version)| {
        floor_rows
            .iter()
            .zip(floors)
            .any(|(r, floor)| r == row && version < floor)
    });
    if let Some((row, version)) = stale {
        let n = AtomicU64::fetch_add(&tally.stale, 1, Ordering::Relaxed);
        if n < 5 {
            let floor = floor_rows
                .iter()
                .zip(floors)
                .find(|(r, _)| *r == row)
                .map(|(_, f)| *f)
                .unwrap_or_default();
            eprintln!("STALE {label} read: row {row} version {version} < committed {floor}");
        }
    }
}

async fn child(options: Options) {
    let (schema, namespace) = options.child.clone().expect("child");
    let near = match options.near {
        true => Some(NearProcess::start(&options, &namespace).await),
        false => None,
    };
    let cache = match &near {
        Some(near) => near.cache.clone(),
        None => cache_for(&options, &namespace),
    };
    let mut lags = near.as_ref().map(|near| near.lags.clone());
    let external = options.external || options.external_writers > 0 || options.embedded;
    if external {
        lags = Some(Lags::connect(&namespace, EXTERNAL_WINDOW_US).await);
    }
    // A memclone process beside external writers listens, as an application would.
    let listener = match (options.external_writers > 0 || options.embedded) && !options.external {
        true => Some(listener_for(&schema, &cache).await),
        false => None,
    };
    let reads = Reads::new(&options, &namespace, &cache);
    let floors = Floors {
        redis: RawRedis::open(&redis_url()).await.expect("Redis"),
        namespace: namespace.clone(),
    };
    let tally = Arc::new(Tally::default());
    let stop = Stop {
        deadline: Instant::now() + Duration::from_secs_f64(options.seconds),
        // An external writer has no readers: its work is its writes.
        reads: options.reads_target.filter(|_| !options.external),
        writes: options.writes_target,
        until_stale: options.until_stale,
        not_before: Instant::now() + Duration::from_secs_f64(options.min_seconds),
        tally: tally.clone(),
    };
    let mut tasks = Vec::new();
    for i in 0..options.writers {
        let conn = connect(&schema).await;
        tasks.push(tokio::spawn(writer(
            (!options.external).then(|| cache.clone()),
            floors.clone(),
            conn,
            options.rows,
            stop.clone(),
            i as u64 + if options.external { 500 } else { 0 },
            lags.clone(),
        )));
    }
    let readers = if options.external { 0 } else { options.readers };
    for i in 0..readers {
        let conn = connect(&schema).await;
        tasks.push(tokio::spawn(reader(
            reads.clone(),
            floors.clone(),
            conn,
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
    if let Some(near) = near {
        return near.finish(&options, &schema, &tally).await;
    }
    let mut stale_entries = None;
    if let (true, Some(lags)) = (options.embedded, &lags) {
        // Every process's writes have to be over before this store can be checked.
        let patience = Duration::from_secs_f64(options.seconds) + Duration::from_secs(120);
        lags.all_stopped(options.processes + options.external_writers, patience)
            .await;
        stale_entries = Some(match options.external {
            true => 0,
            false => {
                // The last notifications may still be on their way: up to 10 s.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let stale = count_stale_entries(&cache, &options, &schema, &namespace).await;
                    if stale == 0 || Instant::now() >= deadline {
                        break stale;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
    }
    if let Some(listener) = listener {
        eprintln!("listener: {listener:?}");
        listener.stop().await;
    }
    if let (true, Some(lags)) = (external, &lags) {
        let samples = lags.samples.lock().unwrap_or_else(|e| e.into_inner());
        let samples: Vec<String> = samples.iter().map(u64::to_string).collect();
        println!("lags_us={}", samples.join(","));
    }
    let stale_entries = stale_entries
        .map(|stale| format!(" stale_entries={stale}"))
        .unwrap_or_default();
    println!(
        "reads={} writes={} stale_reads={}{stale_entries}",
        AtomicU64::load(&tally.reads, Ordering::Relaxed),
        AtomicU64::load(&tally.writes, Ordering::Relaxed),
        AtomicU64::load(&tally.stale, Ordering::Relaxed)
    );
}

/// `--external-writers`: the lag a stale read may have (issue 12's bound on p99), in µs.
const EXTERNAL_WINDOW_US: u64 = 50_000;

/// The tables the triggers are on and the listeners watch, schema-qualified.
fn watched(schema: &str) -> [String; 2] {
    [
        format!("{schema}.fresh_items"),
        format!("{schema}.fresh_notes"),
    ]
}

/// A listener that invalidates `cache` on every write to the checker's tables.
async fn listener_for(schema: &str, cache: &Cache) -> diesel_memclone::listen::ListenHandle {
    diesel_memclone::listen::postgres(database_url())
        .tables(watched(schema))
        .channel(schema)
        .cache(cache.clone())
        .start()
        .await
        .expect("listener")
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

/// After the writers stopped: how many cached answers are still older than the database.
async fn stale_entries(options: &Options, schema: &str, namespace: &str) -> u64 {
    let cache = cache_for(options, namespace);
    count_stale_entries(&cache, options, schema, namespace).await
}

/// How many of `cache`'s answers (every row's and group's reads) are older than the database.
async fn count_stale_entries(
    cache: &Cache,
    options: &Options,
    schema: &str,
    namespace: &str,
) -> u64 {
    let reads = Reads::new(options, namespace, cache);
    let mut conn = connect(schema).await;
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
    // Every entity, single-row query and join entry, then every group list.
    let mut asked: Vec<(u64, i32)> = Vec::new();
    for row in 1..=options.rows {
        asked.extend([(0, row), (1, row), (3, row)]);
    }
    asked.extend((0..GROUPS).map(|group| (2, group)));
    let mut stale = 0;
    for (kind, row) in asked {
        let (_, seen) = reads.read(&mut conn, kind, row).await;
        stale += seen
            .iter()
            .filter(|(id, version)| *version < version_of(*id))
            .count() as u64;
    }
    stale
}

async fn parent(options: Options) {
    let schema = format!(
        "fresh_{}_{}",
        std::process::id(),
        Instant::now().elapsed().subsec_nanos()
    );
    let namespace = format!("fresh{}", std::process::id());
    let mut conn = AsyncPgConnection::establish(&database_url())
        .await
        .expect("PostgreSQL");
    conn.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema};
         CREATE TABLE fresh_items (id INTEGER PRIMARY KEY, grp INTEGER NOT NULL, version BIGINT NOT NULL);
         CREATE TABLE fresh_notes (id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL, version BIGINT NOT NULL);
         INSERT INTO fresh_items SELECT g, g % {GROUPS}, 0 FROM generate_series(1, {rows}) g;
         INSERT INTO fresh_notes SELECT g, g, 0 FROM generate_series(1, {rows}) g;",
        rows = options.rows
    ))
    .await
    .expect("schema");
    // `--external-writers` and `--embedded`: the triggers. With Redis, also a listener for the
    // whole run (a sidecar), which outlives every writer; with `--embedded` each process's store
    // is its own, and the processes' listeners are all there is.
    if options.external_writers > 0 || options.embedded {
        let tables = watched(&schema);
        let up = match options.table_triggers {
            true => diesel_memclone::listen::install_sql(&schema, &tables),
            false => diesel_memclone::listen::row_triggers(&schema)
                .models::<(Item, Note)>()
                .install_sql(),
        };
        conn.batch_execute(&up.expect("valid names"))
            .await
            .expect("triggers");
    }
    let sidecar = match options.external_writers > 0 && !options.embedded {
        true => Some(listener_for(&schema, &cache_for(&options, &namespace)).await),
        false => None,
    };

    let exe = std::env::current_exe().expect("current exe");
    let mut children = Vec::new();
    let memclone_processes = options.processes + options.sync_processes;
    for i in 0..memclone_processes + options.external_writers {
        let mut command = tokio::process::Command::new(&exe);
        if i >= memclone_processes {
            command.arg("--external");
        } else if i >= options.processes {
            command.arg("--sync");
        }
        if options.external_writers > 0 {
            command.args(["--external-writers", &options.external_writers.to_string()]);
        }
        if options.embedded {
            // The children wait for each other before counting stale entries.
            command
                .arg("--embedded")
                .args(["--processes", &options.processes.to_string()]);
        }
        command
            .args(["--child", &schema, &namespace])
            .args(["--seconds", &options.seconds.to_string()])
            .args(["--rows", &options.rows.to_string()])
            .args(["--readers", &options.readers.to_string()])
            .args(["--writers", &options.writers.to_string()])
            .stdout(Stdio::piped());
        if let Some(urls) = &options.cluster {
            command.args(["--redis-cluster", urls]);
        }
        if options.naive {
            command.arg("--naive");
        }
        if let Some(reads) = options.reads_target {
            command.args(["--reads", &reads.to_string()]);
        }
        if let Some(writes) = options.writes_target {
            command.args(["--writes", &writes.to_string()]);
        }
        if options.until_stale {
            command.arg("--until-stale");
        }
        near_args(&options, &mut command);
        children.push(command.spawn().expect("spawn a checker process"));
    }
    let (mut reads, mut writes, mut stale_reads) = (0, 0, 0);
    let mut lines = Vec::new();
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
        lines.push(line);
    }
    let mut stale_entries = match options.embedded {
        // Each process counted its own store's, which died with it.
        true => lines.iter().map(|line| field(line, "stale_entries")).sum(),
        false => stale_entries(&options, &schema, &namespace).await,
    };
    if let Some(sidecar) = sidecar {
        // The last external commits reach the cache through the sidecar: give them time.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stale_entries > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stale_entries = self::stale_entries(&options, &schema, &namespace).await;
        }
        eprintln!("sidecar listener: {sidecar:?}");
        sidecar.stop().await;
    }
    conn.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .expect("drop schema");
    if options.near {
        let totals = [reads, writes, stale_reads, stale_entries];
        return near_summary(&options, &lines, totals);
    }
    if options.external_writers > 0 || options.embedded {
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
        return;
    }
    println!(
        "reads={reads} writes={writes} stale_reads={stale_reads} stale_entries={stale_entries}"
    );
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

/// `--near-cache`: stale reads timed from the return of the write that made them stale.
///
/// Each write's return time goes into a hash per row (version → unix µs) on the single Redis,
/// through a connection of its own (not the cache's store). A read of version `v` under floor
/// `f` is stale since the earliest recorded return among versions `v+1..=f`.
#[derive(Clone)]
struct Lags {
    redis: redis::aio::MultiplexedConnection,
    namespace: String,
    window_us: u64,
    max_us: Arc<AtomicU64>,
    beyond: Arc<AtomicU64>,
    /// Every stale read's lag (`--external-writers`: for the percentiles).
    samples: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Lags {
    async fn connect(namespace: &str, window_us: u64) -> Lags {
        let client = redis::Client::open(redis_url()).expect("Redis URL");
        let redis = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis for the lags");
        Lags {
            redis,
            namespace: namespace.to_owned(),
            window_us,
            max_us: Arc::default(),
            beyond: Arc::default(),
            samples: Arc::default(),
        }
    }

    fn key(&self, row: i32) -> String {
        format!("{}:returned:{row}", self.namespace)
    }

    /// Records when the write of `version` returned.
    async fn returned(&self, row: i32, version: i64, at_us: u64) {
        let key = self.key(row);
        let _: () = redis::pipe()
            .hset(&key, version, at_us)
            .ignore()
            .expire(&key, 3600)
            .ignore()
            .query_async(&mut self.redis.clone())
            .await
            .expect("record a write's return");
    }

    /// Times a read that began at `started_us` if it was stale: its lag is that of its stalest
    /// row.
    async fn time_stale(
        &self,
        floor_rows: &[i32],
        floors: &[i64],
        seen: &[(i32, i64)],
        started_us: u64,
    ) {
        let mut lag = None;
        for (row, version) in seen {
            let Some(floor) = floor_rows
                .iter()
                .zip(floors)
                .find(|(r, _)| *r == row)
                .map(|(_, f)| *f)
                .filter(|floor| version < floor)
            else {
                continue;
            };
            // The floor's own return is always recorded; so are the versions between, unless
            // their write has not returned yet. Far behind: the first 64 are enough.
            let mut versions: Vec<i64> = (version + 1..floor).take(64).collect();
            versions.push(floor);
            let times: Vec<Option<u64>> = redis::cmd("HMGET")
                .arg(self.key(*row))
                .arg(&versions)
                .query_async(&mut self.redis.clone())
                .await
                .expect("read return times");
            let since = times.into_iter().flatten().min().expect("floor recorded");
            let row_lag = started_us.saturating_sub(since);
            lag = Some(lag.map_or(row_lag, |lag: u64| lag.max(row_lag)));
        }
        if let Some(lag) = lag {
            self.samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(lag);
            self.max_us.fetch_max(lag, Ordering::Relaxed);
            if lag > self.window_us {
                let n = self.beyond.fetch_add(1, Ordering::Relaxed);
                if n < 5 {
                    eprintln!("BEYOND THE WINDOW: a stale read {lag} µs after the write returned");
                }
            }
        }
    }

    /// Waits until every process's readers and writers have stopped.
    async fn all_stopped(&self, processes: usize, patience: Duration) {
        let key = format!("{}:stopped", self.namespace);
        let mut redis = self.redis.clone();
        let _: u64 = redis::cmd("INCR")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .expect("INCR");
        let deadline = Instant::now() + patience;
        loop {
            let stopped: u64 = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .expect("GET");
            if stopped >= processes as u64 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the other processes did not stop"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A process's near-tier cache, its lags and, with `--cut-tracking-every`, the faults made on
/// its invalidation stream.
struct NearProcess {
    cache: Cache,
    lags: Lags,
    faults: Arc<AtomicU64>,
    cutter: Option<tokio::task::JoinHandle<()>>,
}

impl NearProcess {
    async fn start(options: &Options, namespace: &str) -> NearProcess {
        let max_lag = Duration::from_millis(options.max_lag_ms);
        let mut near = NearCache::new().max_lag(max_lag);
        let faults = Arc::new(AtomicU64::new(0));
        let mut cutter = None;
        if let Some(every) = options.cut_every {
            let upstream = redis_url()
                .trim_start_matches("redis://")
                .trim_end_matches('/')
                .parse()
                .expect("a redis://host:port Redis URL for --cut-tracking-every");
            let proxy = Proxy::start(upstream).await;
            near = near.tracking_url(proxy.url());
            // Longer than max_lag, so that a stall must stop the near tier.
            let hold = (2 * max_lag).min(Duration::from_secs_f64(every / 2.0));
            let every = Duration::from_secs_f64(every);
            cutter = Some(tokio::spawn(cut_tracking(
                proxy,
                every,
                hold,
                faults.clone(),
            )));
        }
        let store = match &options.cluster {
            Some(urls) => RedisStore::cluster_builder(urls.split(',').map(str::trim)).build(),
            None => RedisStore::builder(redis_url()).build(),
        }
        .expect("Redis URL");
        let cache = Cache::builder()
            .store(store)
            .namespace(namespace)
            .default_ttl(Duration::from_secs(600))
            .near_cache(near)
            .build()
            .expect("cache");
        if !cache.near_cache_ready(Duration::from_secs(10)).await {
            eprintln!("the near tier was not in sync after 10 s; starting anyway");
        }
        let window_us = max_lag.as_micros() as u64;
        let lags = Lags::connect(namespace, window_us).await;
        NearProcess {
            cache,
            lags,
            faults,
            cutter,
        }
    }

    /// Once every process stopped writing and `max_lag` passed: what this process's cache (near
    /// tier included) still answers stale. Prints the process's line.
    async fn finish(self, options: &Options, schema: &str, tally: &Tally) {
        let patience = Duration::from_secs_f64(options.seconds) + Duration::from_secs(120);
        self.lags.all_stopped(options.processes, patience).await;
        tokio::time::sleep(Duration::from_millis(options.max_lag_ms + 1)).await;
        let stale_entries =
            count_stale_entries(&self.cache, options, schema, &self.lags.namespace).await;
        if let Some(cutter) = self.cutter {
            cutter.abort();
        }
        let stats = self.cache.stats();
        println!(
            "reads={} writes={} stale_reads={} stale_entries={stale_entries} max_lag_us={} \
             beyond_window={} near_hits={} near_flushes={} tracking_faults={}",
            AtomicU64::load(&tally.reads, Ordering::Relaxed),
            AtomicU64::load(&tally.writes, Ordering::Relaxed),
            AtomicU64::load(&tally.stale, Ordering::Relaxed),
            AtomicU64::load(&self.lags.max_us, Ordering::Relaxed),
            AtomicU64::load(&self.lags.beyond, Ordering::Relaxed),
            stats.near_hits,
            stats.near_flushes,
            AtomicU64::load(&self.faults, Ordering::Relaxed),
        );
    }
}

/// Every `every`, alternately stalls and cuts the proxied link, restoring it after `hold`.
async fn cut_tracking(proxy: Proxy, every: Duration, hold: Duration, faults: Arc<AtomicU64>) {
    for turn in 0_u64.. {
        tokio::time::sleep(every.saturating_sub(hold)).await;
        if turn % 2 == 0 {
            proxy.stall();
        } else {
            proxy.cut();
        }
        faults.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(hold).await;
        proxy.restore();
    }
}

/// The flags a child needs for `--near-cache`.
fn near_args(options: &Options, command: &mut tokio::process::Command) {
    if options.min_seconds > 0.0 {
        command.args(["--min-seconds", &options.min_seconds.to_string()]);
    }
    if options.near {
        // The children wait for each other before counting stale entries.
        command
            .arg("--near-cache")
            .args(["--max-lag-ms", &options.max_lag_ms.to_string()])
            .args(["--processes", &options.processes.to_string()]);
    }
    if let Some(every) = options.cut_every {
        command.args(["--cut-tracking-every", &every.to_string()]);
    }
}

/// The near mode's last two lines, from the children's lines and the run's totals.
fn near_summary(options: &Options, lines: &[String], totals: [u64; 4]) {
    let [reads, writes, stale_reads, parent_stale_entries] = totals;
    let sum = |name: &str| lines.iter().map(|line| field(line, name)).sum::<u64>();
    let max_lag_us = lines
        .iter()
        .map(|line| field(line, "max_lag_us"))
        .max()
        .unwrap_or_default();
    // The children's caches (near tiers included) and a fresh cache on Redis, in the parent.
    let stale_entries = sum("stale_entries") + parent_stale_entries;
    println!(
        "near_hits={} near_flushes={} tracking_faults={}",
        sum("near_hits"),
        sum("near_flushes"),
        sum("tracking_faults")
    );
    println!(
        "reads={reads} writes={writes} stale_reads={stale_reads} stale_entries={stale_entries} \
         max_lag_us={max_lag_us} window_us={} beyond_window={}",
        options.max_lag_ms * 1000,
        sum("beyond_window")
    );
}

#[tokio::main]
async fn main() {
    let options = parse_options();
    if options.mariadb {
        match options.child.is_some() {
            true => mariadb::child(options).await,
            false => mariadb::parent(options).await,
        }
    } else if options.child.is_some() && options.sync {
        sync_child(options).await;
    } else if options.child.is_some() {
        child(options).await;
    } else {
        parent(options).await;
    }
}

/// A child process of `--sync-processes`: the same writers and readers on the synchronous API,
/// each on a plain thread with a `PgConnection` (the floors, checker bookkeeping, stay async).
async fn sync_child(options: Options) {
    let (schema, namespace) = options.child.clone().expect("child");
    let cache = cache_for(&options, &namespace);
    let floors = Floors {
        redis: RawRedis::open(&redis_url()).await.expect("Redis"),
        namespace: namespace.clone(),
    };
    let tally = Arc::new(Tally::default());
    let stop = Stop {
        deadline: Instant::now() + Duration::from_secs_f64(options.seconds),
        reads: options.reads_target,
        writes: options.writes_target,
        until_stale: options.until_stale,
        not_before: Instant::now() + Duration::from_secs_f64(options.min_seconds),
        tally: tally.clone(),
    };
    let handle = tokio::runtime::Handle::current();
    let mut threads = Vec::new();
    for i in 0..options.writers {
        let (cache, floors, stop, handle) =
            (cache.clone(), floors.clone(), stop.clone(), handle.clone());
        let conn = sync_connect(&schema);
        let rows = options.rows;
        threads.push(std::thread::spawn(move || {
            sync_writer(handle, cache, floors, conn, rows, stop, i as u64)
        }));
    }
    for i in 0..options.readers {
        let (cache, floors, stop, handle) =
            (cache.clone(), floors.clone(), stop.clone(), handle.clone());
        let conn = sync_connect(&schema);
        let rows = options.rows;
        threads.push(std::thread::spawn(move || {
            sync_reader(handle, cache, floors, conn, rows, stop, 1000 + i as u64)
        }));
    }
    tokio::task::spawn_blocking(move || {
        for thread in threads {
            thread.join().expect("thread");
        }
    })
    .await
    .expect("threads");
    eprintln!("cache (sync): {:?}", cache.stats());
    println!(
        "reads={} writes={} stale_reads={}",
        AtomicU64::load(&tally.reads, Ordering::Relaxed),
        AtomicU64::load(&tally.writes, Ordering::Relaxed),
        AtomicU64::load(&tally.stale, Ordering::Relaxed)
    );
}

fn sync_connect(schema: &str) -> PgConnection {
    use diesel::connection::SimpleConnection;
    let mut conn = PgConnection::establish(&database_url()).expect("PostgreSQL");
    conn.batch_execute(&format!("SET search_path TO {schema}"))
        .expect("search_path");
    conn
}

/// `writer` on the synchronous API.
fn sync_writer(
    handle: tokio::runtime::Handle,
    cache: Cache,
    floors: Floors,
    mut conn: PgConnection,
    rows: i32,
    stop: Stop,
    salt: u64,
) {
    use diesel_memclone::sync as memclone;
    let tally = stop.tally.clone();
    let mut random = Random::new(salt ^ 0x5eed);
    while !stop.now() {
        let row = 1 + random.below(rows as u64) as i32;
        let written: Result<i64, Error> = if random.below(2) == 0 {
            memclone::transaction(&mut conn, |conn| {
                let item: Item = memclone::update(fresh_items::table.find(row))
                    .set(fresh_items::version.eq(fresh_items::version + 1))
                    .map(|s| s.returning(fresh_items::all_columns))
                    .using(&cache)
                    .get_result(conn)?;
                memclone::update(fresh_notes::table.filter(fresh_notes::item_id.eq(row)))
                    .set(fresh_notes::version.eq(item.version))
                    .using(&cache)
                    .execute(conn)?;
                Ok(item.version)
            })
        } else {
            (|| {
                let item: Item = memclone::update(fresh_items::table.find(row))
                    .set(fresh_items::version.eq(fresh_items::version + 1))
                    .map(|s| s.returning(fresh_items::all_columns))
                    .using(&cache)
                    .get_result(&mut conn)?;
                let _: Note =
                    memclone::update(fresh_notes::table.filter(fresh_notes::item_id.eq(row)))
                        .set(fresh_notes::version.eq(
                            diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
                                "GREATEST(version, {})",
                                item.version
                            )),
                        ))
                        .map(|s| s.returning(fresh_notes::all_columns))
                        .using(&cache)
                        .get_result(&mut conn)?;
                Ok(item.version)
            })()
        };
        match written {
            Ok(version) => {
                handle.block_on(floors.raise(row, version));
                AtomicU64::fetch_add(&tally.writes, 1, Ordering::Relaxed);
            }
            Err(error) => eprintln!("write failed: {error}"),
        }
    }
}

/// `reader` on the synchronous API.
fn sync_reader(
    handle: tokio::runtime::Handle,
    cache: Cache,
    floors: Floors,
    mut conn: PgConnection,
    rows: i32,
    stop: Stop,
    salt: u64,
) {
    use diesel_memclone::sync::CachedDsl as SyncCached;
    let tally = stop.tally.clone();
    let mut random = Random::new(salt ^ 0x5eed);
    while !stop.now() {
        let row = 1 + random.below(rows as u64) as i32;
        let kind = random.below(4);
        let floor_rows: Vec<i32> = match kind {
            2 => (1..=rows).filter(|r| r % GROUPS == row % GROUPS).collect(),
            _ => vec![row],
        };
        let floors_before = handle.block_on(floors.get(&floor_rows));
        let conn = &mut conn;
        let (label, seen): (&str, Vec<(i32, i64)>) = match kind {
            0 => {
                let item = cache
                    .blocking()
                    .find::<Item, _>(conn, row)
                    .expect("entity read");
                ("entity", vec![(item.id, item.version)])
            }
            1 => {
                let items: Vec<Item> =
                    SyncCached::cached(fresh_items::table.filter(fresh_items::id.eq(row)), "item")
                        .using(&cache)
                        .load(conn)
                        .expect("query read");
                ("query", items.iter().map(|i| (i.id, i.version)).collect())
            }
            2 => {
                let items: Vec<Item> = SyncCached::cached(
                    fresh_items::table
                        .filter(fresh_items::grp.eq(row % GROUPS))
                        .order(fresh_items::id),
                    "group",
                )
                .using(&cache)
                .load(conn)
                .expect("group read");
                ("group", items.iter().map(|i| (i.id, i.version)).collect())
            }
            _ => {
                let pairs: Vec<(Item, Note)> = SyncCached::cached(
                    fresh_items::table
                        .inner_join(fresh_notes::table)
                        .filter(fresh_items::id.eq(row))
                        .select((Item::as_select(), Note::as_select())),
                    "join",
                )
                .using(&cache)
                .load(conn)
                .expect("join read");
                let seen = pairs
                    .iter()
                    .flat_map(|(i, n)| [(i.id, i.version), (n.item_id, n.version)])
                    .collect();
                ("join", seen)
            }
        };
        check(&tally, label, &floor_rows, &floors_before, &seen);
    }
}

//! Invalidation from MariaDB/MySQL: see [`mariadb()`] (the public items are re-exported by
//! `listen`).

use super::{invalidate_all, lost, reconnect, stopped, ListenError, ListenHandle, Served, Shared};
use crate::Cache;
use diesel::sql_types::{BigInt, Nullable, Text, Unsigned};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The counter table [`mariadb_install_sql`] creates and the listener reads, unless told
/// otherwise.
pub const MARIADB_VERSIONS_TABLE: &str = "memclone_versions";

/// How many counter rows each table has: writers on connections with different
/// `CONNECTION_ID() % MARIADB_SHARDS` never wait for each other's commits on a counter.
pub const MARIADB_SHARDS: u32 = 16;

/// How often the foreign keys are read again while connected (a migration may add a cascade).
const FOREIGN_KEYS_EVERY: Duration = Duration::from_secs(10);

/// The longest a poll may take before the connection is given up as dead.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// The events the triggers fire on, with the suffix of each trigger's name.
const EVENTS: [(&str, &str); 3] = [("INSERT", "ai"), ("UPDATE", "au"), ("DELETE", "ad")];

/// MariaDB's longest identifier.
const MAX_IDENTIFIER: usize = 64;

/// A table named as text (`users`, ``app.`Users` ``): the database, if given, and the table.
/// Backquoted (or double-quoted) parts may hold dots (` `` ` is a backquote); case is kept, as
/// MariaDB on Linux keeps it.
fn split_name(name: &str) -> (Option<String>, String) {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = name.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // Backticks, MariaDB's own, or double quotes, as `listen::tables` writes names
            // (PostgreSQL's quoting, which ANSI_QUOTES mode also reads).
            quote @ ('`' | '"') => {
                while let Some(c) = chars.next() {
                    if c == quote {
                        if chars.peek() == Some(&quote) {
                            chars.next();
                            current.push(quote);
                        } else {
                            break;
                        }
                    } else {
                        current.push(c);
                    }
                }
            }
            '.' => parts.push(std::mem::take(&mut current)),
            c if c.is_whitespace() => {}
            c => current.push(c),
        }
    }
    parts.push(current);
    let table = parts.pop().unwrap_or_default();
    (parts.pop().filter(|d| !d.is_empty()), table)
}

fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A string literal that reads the same whatever the `sql_mode` (`NO_BACKSLASH_ESCAPES` changes
/// what a backslash means): plain names as text, others in hexadecimal.
fn literal(text: &str) -> String {
    if text.contains(['\'', '\\']) {
        let hex: String = text.bytes().map(|b| format!("{b:02X}")).collect();
        format!("X'{hex}'")
    } else {
        format!("'{text}'")
    }
}

/// The name of `table`'s trigger for one event: `memclone_au_users`, or, past 64 characters, a
/// prefix of it and a hash of the whole.
fn trigger_name(table: &str, suffix: &str) -> String {
    let name = format!("memclone_{suffix}_{table}");
    if name.chars().count() <= MAX_IDENTIFIER {
        return name;
    }
    let hash = xxhash_rust::xxh3::xxh3_64(table.as_bytes());
    let prefix: String = name.chars().take(MAX_IDENTIFIER - 17).collect();
    format!("{prefix}_{hash:016x}")
}

/// The statement each trigger runs, as MariaDB stores it (`information_schema.TRIGGERS`):
/// compared at start to find triggers that are out of date.
fn trigger_body(versions_table: &str, table: &str) -> String {
    format!(
        "INSERT INTO {} (tbl, shard, version) VALUES ({}, CONNECTION_ID() % {MARIADB_SHARDS}, 1) \
         ON DUPLICATE KEY UPDATE version = version + 1",
        quote_ident(versions_table),
        literal(table)
    )
}

/// The table, with its database if given, as SQL.
fn table_sql(database: Option<&str>, name: &str) -> String {
    match database {
        Some(db) => format!("{}.{}", quote_ident(db), quote_ident(name)),
        None => quote_ident(name),
    }
}

/// The SQL that installs the invalidation triggers on `tables`, for a migration's `up.sql`
/// (MariaDB 10.2.3+ or MySQL 5.7+, which allow several triggers per event): the counter table
/// `versions_table` (usually [`MARIADB_VERSIONS_TABLE`]; created if missing, InnoDB so that a
/// bump commits or rolls back with its write) and, on each table, the triggers
/// `memclone_ai_<table>`, `memclone_au_<table>` and `memclone_ad_<table>` (replaced if they
/// exist). Every statement is a single one: no `DELIMITER` is needed.
///
/// The tables are those of the migration's database, named as memclone names them (`users`);
/// a table named with its database (`app.users`) gets its triggers there, and they bump the
/// counter table of that database, which must be the listener's.
///
/// Cost: one counter upsert per written row, inside the writer's transaction; the counter row
/// (one of [`MARIADB_SHARDS`] per table, picked by the connection) stays locked until the
/// writer commits. Triggers run with their definer's rights: writers need no right on the
/// counter table.
pub fn mariadb_install_sql<S: AsRef<str>>(versions_table: &str, tables: &[S]) -> String {
    let mut sql = format!(
        "-- diesel-memclone: invalidate the cache on every committed write (issue 12).\n\
         CREATE TABLE IF NOT EXISTS {} (\n  \
           tbl VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,\n  \
           shard SMALLINT UNSIGNED NOT NULL,\n  \
           version BIGINT UNSIGNED NOT NULL,\n  \
           PRIMARY KEY (tbl, shard)\n\
         ) ENGINE=InnoDB;\n",
        quote_ident(versions_table)
    );
    for table in tables {
        let (database, name) = split_name(table.as_ref());
        let body = trigger_body(versions_table, &name);
        for (event, suffix) in EVENTS {
            let trigger = table_sql(database.as_deref(), &trigger_name(&name, suffix));
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS {trigger};\n\
                 CREATE TRIGGER {trigger} AFTER {event} ON {} FOR EACH ROW {body};\n",
                table_sql(database.as_deref(), &name)
            ));
        }
    }
    sql
}

/// The SQL that removes what [`mariadb_install_sql`] installed, for a migration's `down.sql`:
/// each table's triggers and its counters. The counter table itself is left (other tables, or
/// another list, may still use it); drop it yourself once no trigger uses it.
pub fn mariadb_uninstall_sql<S: AsRef<str>>(versions_table: &str, tables: &[S]) -> String {
    let mut sql = String::new();
    for table in tables {
        let (database, name) = split_name(table.as_ref());
        for (_, suffix) in EVENTS {
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS {};\n",
                table_sql(database.as_deref(), &trigger_name(&name, suffix))
            ));
        }
        sql.push_str(&format!(
            "DELETE FROM {} WHERE tbl = {};\n",
            quote_ident(versions_table),
            literal(&name)
        ));
    }
    sql
}

/// A MariaDB/MySQL set-up that keeps a listener from starting
/// ([`ListenError::MariaDb`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum MariaDbSetupError {
    /// The URL names no database (`mysql://host/` without one).
    NoDatabase,
    /// The counter table does not exist in the listener's database.
    NoVersionsTable {
        /// The counter table's name.
        versions_table: String,
    },
    /// A watched table lacks one of the triggers [`mariadb_install_sql`] installs, or has an
    /// older or different one (or the listener's user lacks the `TRIGGER` right, without which
    /// MariaDB hides triggers from it).
    MissingTrigger {
        /// The table, as given.
        table: String,
        /// The trigger that is missing or out of date.
        trigger: String,
        /// The counter table the listener reads.
        versions_table: String,
    },
    /// A foreign key with `ON DELETE`/`ON UPDATE CASCADE`, `SET NULL` or `SET DEFAULT` lets
    /// writes to `parent` change the watched table `table`, but `parent` lacks the triggers:
    /// its writes, and so those cascades, would go unseen.
    CascadeParentWithoutTriggers {
        /// The watched table.
        table: String,
        /// The table whose writes cascade into it.
        parent: String,
        /// The counter table the listener reads.
        versions_table: String,
    },
}

impl fmt::Display for MariaDbSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MariaDbSetupError::NoDatabase => {
                write!(f, "the database URL names no database")
            }
            MariaDbSetupError::NoVersionsTable { versions_table } => write!(
                f,
                "the counter table `{versions_table}` does not exist: install it with the SQL of \
                 `diesel_memclone::listen::mariadb_install_sql({versions_table:?}, ..)` (in a \
                 migration)"
            ),
            MariaDbSetupError::MissingTrigger {
                table,
                trigger,
                versions_table,
            } => write!(
                f,
                "table {table} has no up-to-date trigger `{trigger}`: install it with the SQL of \
                 `diesel_memclone::listen::mariadb_install_sql({versions_table:?}, ..)` (in a \
                 migration); if it is there, the listener's user lacks the TRIGGER right \
                 needed to see it"
            ),
            MariaDbSetupError::CascadeParentWithoutTriggers {
                table,
                parent,
                versions_table,
            } => write!(
                f,
                "writes to table {parent} cascade (foreign key) into the watched table {table}, \
                 but {parent} has no up-to-date triggers: add it to the tables of \
                 `diesel_memclone::listen::mariadb_install_sql({versions_table:?}, ..)`"
            ),
        }
    }
}

impl std::error::Error for MariaDbSetupError {}

impl From<MariaDbSetupError> for ListenError {
    fn from(e: MariaDbSetupError) -> Self {
        ListenError::MariaDb(e)
    }
}

/// A MariaDB/MySQL listener to configure and [`start`](MariaDbListener::start): see
/// [`mariadb()`].
#[must_use = "a listener does nothing until started"]
#[derive(Clone)]
pub struct MariaDbListener {
    database_url: String,
    tables: Vec<String>,
    versions_table: String,
    cache: Option<Cache>,
    backoff: (Duration, Duration),
    poll_every: Duration,
}

impl fmt::Debug for MariaDbListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password.
        f.debug_struct("MariaDbListener")
            .field("tables", &self.tables)
            .field("versions_table", &self.versions_table)
            .field("backoff", &self.backoff)
            .field("poll_every", &self.poll_every)
            .finish_non_exhaustive()
    }
}

/// `url` with a `mariadb://` scheme (any case) written `mysql://`, the only scheme
/// `mysql_async` accepts; any other URL as it is.
fn mysql_scheme(url: String) -> String {
    match url.get(..10) {
        Some(scheme) if scheme.eq_ignore_ascii_case("mariadb://") => {
            format!("mysql://{}", &url[10..])
        }
        _ => url,
    }
}

/// A listener on the MariaDB/MySQL database at `database_url` (which names the database whose
/// tables are watched): give it the tables to watch, then [`start`](MariaDbListener::start) it.
/// A `mariadb://` URL is taken as the `mysql://` one the MySQL client library expects.
///
/// MariaDB/MySQL has no `NOTIFY`: row triggers bump a per-table version counter in the
/// writer's transaction, and the listener polls the counters.
///
/// * [`mariadb_install_sql`] gives the SQL for a migration: the counter table
///   (`memclone_versions`, InnoDB) and, on each table, three `AFTER INSERT/UPDATE/DELETE ... FOR
///   EACH ROW` triggers of one statement each (no `DELIMITER` needed), which run
///   `INSERT INTO memclone_versions (tbl, shard, version) VALUES ('<table>', CONNECTION_ID() % 16, 1)
///   ON DUPLICATE KEY UPDATE version = version + 1`. [`mariadb_uninstall_sql`] undoes it.
/// * this starts a listener: a background task on a connection of its own that reads the
///   counters every few milliseconds ([`MariaDbListener::poll_every`], default 10 ms) and
///   invalidates each table whose counters moved, through the same path as memclone's own
///   writes ([`Cache::invalidate_table`]).
///
/// Why counters rather than a change log: the bump is part of the writer's transaction, so the
/// listener sees it exactly when the write commits (and never if it rolls back). Counters only
/// grow, so a listener that compares them cannot skip a change, whereas a log's auto-increment
/// ids commit out of order and a cursor over them can skip one that commits late; they need no
/// trimming (one row per table and shard), and any number of listeners (one per replica) read
/// them without writing. The counter row is locked by the writer until it commits: the shard
/// (`CONNECTION_ID() % 16`) keeps concurrent writers of one table on different rows, so that
/// they do not wait for each other's commits.
///
/// Foreign-key cascades (`ON DELETE CASCADE`, `SET NULL`, ...) change child rows without firing
/// their triggers. The listener reads the database's foreign keys
/// (`information_schema.REFERENTIAL_CONSTRAINTS`) at start, after every reconnection and every
/// 10 s, and when a table changes it invalidates the tables its cascades can change too
/// (transitively).
///
/// Nothing is lost while the listener is away: on start and after every reconnection it reads
/// the counters, then invalidates every watched table (and the tables that changed meanwhile),
/// then polls. A write committed before that read is covered by the invalidation, one committed
/// after it moves a counter the next poll sees.
///
/// Not seen (as on PostgreSQL for DDL): `TRUNCATE TABLE` (it fires no trigger), DDL, and writes
/// to tables without the triggers. Call [`Cache::invalidate_table`] after those.
///
/// ```no_run
/// # async fn run() -> Result<(), diesel_memclone::listen::ListenError> {
/// use diesel_memclone::listen;
/// // In a migration (`up.sql`): the output of
/// let up = listen::mariadb_install_sql(listen::MARIADB_VERSIONS_TABLE, &["users", "posts"]);
/// // and in `down.sql`:
/// let down = listen::mariadb_uninstall_sql(listen::MARIADB_VERSIONS_TABLE, &["users", "posts"]);
///
/// // In the application, once the cache is installed:
/// let listener = listen::mariadb("mysql://app@localhost/app")
///     .tables(["users", "posts"])
///     .start()
///     .await?;
/// assert!(listener.is_healthy());
/// # Ok(()) }
/// ```
pub fn mariadb(database_url: impl Into<String>) -> MariaDbListener {
    MariaDbListener {
        database_url: mysql_scheme(database_url.into()),
        tables: Vec::new(),
        versions_table: MARIADB_VERSIONS_TABLE.to_owned(),
        cache: None,
        backoff: (Duration::from_millis(100), Duration::from_secs(10)),
        poll_every: Duration::from_millis(10),
    }
}

impl MariaDbListener {
    /// Adds tables to watch (as for [`mariadb_install_sql`]): each must have the triggers, and
    /// each is invalidated on start and after every reconnection. A counter of another table
    /// that moves invalidates that table too.
    pub fn tables<I, S>(mut self, tables: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for table in tables {
            let table = table.as_ref().to_owned();
            if !self.tables.contains(&table) {
                self.tables.push(table);
            }
        }
        self
    }

    /// The counter table (default [`MARIADB_VERSIONS_TABLE`]); the triggers must bump the same.
    pub fn versions_table(mut self, versions_table: impl Into<String>) -> Self {
        self.versions_table = versions_table.into();
        self
    }

    /// The cache to invalidate (default: the installed one, [`crate::cache()`]).
    pub fn cache(mut self, cache: Cache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The pause before the first reconnection attempt, doubled after each failure up to `max`
    /// (default 100 ms to 10 s).
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = (first, max.max(first));
        self
    }

    /// How often the counters are read (default 10 ms, at least 1 ms): the longest a committed
    /// write waits, beyond the read itself, before its tables are invalidated. Each read is one
    /// small query (one row per counted table); it also notices a dead connection.
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll_every = every.max(Duration::from_millis(1));
        self
    }

    /// Connects, checks the counter table and every watched table's triggers (and those of the
    /// tables that cascade into them), reads the counters, invalidates every watched table, and
    /// leaves a background task (on the current tokio runtime) that polls the counters and
    /// reconnects when the connection drops.
    ///
    /// Fails, with nothing left running, when the database is unreachable, the counter table, a
    /// table or a trigger is missing or out of date, or the user lacks a right it needs
    /// (`SELECT` on the counter table; `TRIGGER` on the watched tables, to see their triggers).
    pub async fn start(self) -> Result<ListenHandle, ListenError> {
        if self.tables.is_empty() {
            return Err(ListenError::NoTables);
        }
        let cache = self.cache.clone().unwrap_or_else(|| crate::cache().clone());
        let shared = Arc::new(Shared::default());
        let connected = self.connect(&cache, &shared, None).await?;
        tracing::info!(
            tables = ?self.tables,
            versions_table = %self.versions_table,
            "memclone listener (MariaDB) started; invalidated every watched table"
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(self, cache, shared.clone(), connected, stop_rx));
        Ok(ListenHandle {
            shared,
            stop: stop_tx,
            task: Some(task),
        })
    }

    /// A connection with its set-up checked, the counters read, and every watched table
    /// invalidated (with the tables whose counters moved since `known`, the last counters read
    /// before a reconnection).
    async fn connect(
        &self,
        cache: &Cache,
        shared: &Shared,
        known: Option<&Versions>,
    ) -> Result<Connected, ListenError> {
        let mut conn = AsyncMysqlConnection::establish(&self.database_url).await?;
        // Each poll is one autocommit statement; read committed makes it see every commit
        // before it, whatever the server's default isolation.
        conn.batch_execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await?;
        let session: Session =
            diesel::sql_query("SELECT DATABASE() AS db, CAST(CONNECTION_ID() AS UNSIGNED) AS id")
                .get_result(&mut conn)
                .await?;
        let Some(database) = session.db else {
            return Err(MariaDbSetupError::NoDatabase.into());
        };
        shared.pid.store(session.id as i32, Ordering::Relaxed);
        let versions = read_versions(&mut conn, &self.versions_table)
            .await
            .map_err(|e| match e {
                diesel::result::Error::DatabaseError(_, ref info)
                    if info.message().contains("doesn't exist") =>
                {
                    MariaDbSetupError::NoVersionsTable {
                        versions_table: self.versions_table.clone(),
                    }
                    .into()
                }
                e => ListenError::Database(e),
            })?;
        let mut watched = Vec::new();
        for table in &self.tables {
            let (db, name) = split_name(table);
            if db.is_some_and(|db| db != database) || !table_exists(&mut conn, &name).await? {
                return Err(ListenError::NoSuchTable(table.clone()));
            }
            if let Some(trigger) = missing_trigger(&mut conn, &self.versions_table, &name).await? {
                return Err(MariaDbSetupError::MissingTrigger {
                    table: table.clone(),
                    trigger,
                    versions_table: self.versions_table.clone(),
                }
                .into());
            }
            watched.push(name);
        }
        let cascades = Cascades::read(&mut conn).await?;
        // Every table whose writes can reach a watched one through cascades has triggers.
        for table in &watched {
            for parent in cascades.ancestors(table) {
                if missing_trigger(&mut conn, &self.versions_table, &parent)
                    .await?
                    .is_some()
                {
                    return Err(MariaDbSetupError::CascadeParentWithoutTriggers {
                        table: table.clone(),
                        parent,
                        versions_table: self.versions_table.clone(),
                    }
                    .into());
                }
            }
        }
        // After reading the counters: a write committed before that read is covered here, one
        // committed after it moves a counter that the next poll sees.
        let mut tables: BTreeSet<String> = watched.iter().cloned().collect();
        if let Some(known) = known {
            tables.extend(versions.changed_since(known));
        }
        let tables = cascades.with_descendants(tables);
        invalidate_all(cache, &tables).await;
        shared.healthy.store(true, Ordering::Release);
        Ok(Connected {
            conn,
            versions,
            cascades,
            cascades_read: Instant::now(),
        })
    }
}

impl ListenHandle {
    /// The MariaDB/MySQL listener's current (or last) connection id (`CONNECTION_ID()`, what
    /// `KILL` takes).
    #[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
    pub fn connection_id(&self) -> u64 {
        // The connection id's 32 bits, kept in the PostgreSQL backend pid's place.
        u64::from(std::sync::atomic::AtomicI32::load(&self.shared.pid, Ordering::Relaxed) as u32)
    }
}

#[derive(diesel::QueryableByName)]
struct Session {
    #[diesel(sql_type = Nullable<Text>)]
    db: Option<String>,
    #[diesel(sql_type = Unsigned<BigInt>)]
    id: u64,
}

#[derive(diesel::QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = Text)]
    tbl: String,
    #[diesel(sql_type = BigInt)]
    shards: i64,
    #[diesel(sql_type = Unsigned<BigInt>)]
    versions: u64,
}

/// Each counted table's number of counter rows and the sum of its counters: every bump adds one
/// to the sum, so a table changed if and only if its pair did.
#[derive(Debug, Default, PartialEq)]
struct Versions(BTreeMap<String, (i64, u64)>);

impl Versions {
    /// The tables whose counters differ from `before`'s (or appeared or vanished).
    fn changed_since(&self, before: &Versions) -> BTreeSet<String> {
        let mut changed: BTreeSet<String> = self
            .0
            .iter()
            .filter(|(table, v)| before.0.get(*table) != Some(v))
            .map(|(table, _)| table.clone())
            .collect();
        changed.extend(
            before
                .0
                .keys()
                .filter(|t| !self.0.contains_key(*t))
                .cloned(),
        );
        changed
    }
}

async fn read_versions(
    conn: &mut AsyncMysqlConnection,
    versions_table: &str,
) -> Result<Versions, diesel::result::Error> {
    let rows: Vec<VersionRow> = diesel::sql_query(format!(
        "SELECT tbl, COUNT(*) AS shards, CAST(SUM(version) AS UNSIGNED) AS versions \
         FROM {} GROUP BY tbl",
        quote_ident(versions_table)
    ))
    .load(conn)
    .await?;
    Ok(Versions(
        rows.into_iter()
            .map(|r| (r.tbl, (r.shards, r.versions)))
            .collect(),
    ))
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn table_exists(
    conn: &mut AsyncMysqlConnection,
    table: &str,
) -> Result<bool, diesel::result::Error> {
    let count: Count = diesel::sql_query(
        "SELECT COUNT(*) AS n FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE() AND BINARY TABLE_NAME = ?",
    )
    .bind::<Text, _>(table)
    .get_result(conn)
    .await?;
    Ok(count.n > 0)
}

#[derive(diesel::QueryableByName)]
struct TriggerRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    event: String,
    #[diesel(sql_type = Text)]
    timing: String,
    #[diesel(sql_type = Text)]
    orientation: String,
    #[diesel(sql_type = Text)]
    body: String,
}

/// The first of `table`'s three triggers that is missing or differs from what
/// [`mariadb_install_sql`] installs today.
async fn missing_trigger(
    conn: &mut AsyncMysqlConnection,
    versions_table: &str,
    table: &str,
) -> Result<Option<String>, diesel::result::Error> {
    let rows: Vec<TriggerRow> = diesel::sql_query(
        "SELECT TRIGGER_NAME AS name, EVENT_MANIPULATION AS event, ACTION_TIMING AS timing, \
         ACTION_ORIENTATION AS orientation, ACTION_STATEMENT AS body \
         FROM information_schema.TRIGGERS \
         WHERE EVENT_OBJECT_SCHEMA = DATABASE() AND BINARY EVENT_OBJECT_TABLE = ?",
    )
    .bind::<Text, _>(table)
    .load(conn)
    .await?;
    let body = trigger_body(versions_table, table);
    for (event, suffix) in EVENTS {
        let name = trigger_name(table, suffix);
        let up_to_date = rows.iter().any(|r| {
            r.name == name
                && r.event == event
                && r.timing == "AFTER"
                && r.orientation == "ROW"
                && r.body.trim() == body
        });
        if !up_to_date {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

#[derive(diesel::QueryableByName)]
struct ForeignKey {
    #[diesel(sql_type = Text)]
    child: String,
    #[diesel(sql_type = Text)]
    parent: String,
}

/// The database's foreign keys whose parent's writes change the child's rows: parent to
/// children.
#[derive(Debug, Default)]
struct Cascades(BTreeMap<String, BTreeSet<String>>);

impl Cascades {
    async fn read(conn: &mut AsyncMysqlConnection) -> Result<Cascades, diesel::result::Error> {
        let keys: Vec<ForeignKey> = diesel::sql_query(
            "SELECT TABLE_NAME AS child, REFERENCED_TABLE_NAME AS parent \
             FROM information_schema.REFERENTIAL_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = DATABASE() AND UNIQUE_CONSTRAINT_SCHEMA = DATABASE() \
               AND (DELETE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT') \
                    OR UPDATE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT'))",
        )
        .load(conn)
        .await?;
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for key in keys {
            graph.entry(key.parent).or_default().insert(key.child);
        }
        Ok(Cascades(graph))
    }

    /// `tables` and every table their writes can change through cascades, transitively.
    fn with_descendants(&self, tables: BTreeSet<String>) -> BTreeSet<String> {
        let mut out = tables.clone();
        let mut todo: Vec<String> = tables.into_iter().collect();
        while let Some(table) = todo.pop() {
            for child in self.0.get(&table).into_iter().flatten() {
                if out.insert(child.clone()) {
                    todo.push(child.clone());
                }
            }
        }
        out
    }

    /// Every table whose writes can change `table` through cascades, transitively.
    fn ancestors(&self, table: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![table.to_owned()];
        while let Some(table) = todo.pop() {
            for (parent, children) in &self.0 {
                if children.contains(&table) && *parent != table && out.insert(parent.clone()) {
                    todo.push(parent.clone());
                }
            }
        }
        out.remove(table);
        out
    }
}

/// A connection ready to poll, with what it read.
struct Connected {
    conn: AsyncMysqlConnection,
    versions: Versions,
    cascades: Cascades,
    cascades_read: Instant,
}

async fn run(
    listener: MariaDbListener,
    cache: Cache,
    shared: Arc<Shared>,
    mut connected: Connected,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match serve(&listener, &cache, &shared, &mut connected, &mut stop).await {
            Served::Stopped => {
                shared.healthy.store(false, Ordering::Release);
                return;
            }
            Served::Lost(why) => lost("mariadb", &cache, &shared, &why),
        }
        let Connected {
            conn,
            versions: known,
            ..
        } = connected;
        drop(conn);
        let reconnected = reconnect(
            "mariadb",
            &cache,
            &shared,
            listener.backoff,
            &mut stop,
            || listener.connect(&cache, &shared, Some(&known)),
        );
        match reconnected.await {
            Some(session) => connected = session,
            None => return,
        }
    }
}

async fn serve(
    listener: &MariaDbListener,
    cache: &Cache,
    shared: &Shared,
    connected: &mut Connected,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Served {
    let mut tick = tokio::time::interval(listener.poll_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped(stop) => return Served::Stopped,
            _ = tick.tick() => {}
        }
        if connected.cascades_read.elapsed() >= FOREIGN_KEYS_EVERY {
            match tokio::time::timeout(POLL_TIMEOUT, Cascades::read(&mut connected.conn)).await {
                Ok(Ok(cascades)) => connected.cascades = cascades,
                Ok(Err(e)) => return Served::Lost(e.to_string()),
                Err(_) => return Served::Lost("no answer to a read of the foreign keys".into()),
            }
            connected.cascades_read = Instant::now();
        }
        let read = tokio::time::timeout(
            POLL_TIMEOUT,
            read_versions(&mut connected.conn, &listener.versions_table),
        )
        .await;
        let versions = match read {
            Ok(Ok(versions)) => versions,
            Ok(Err(e)) => return Served::Lost(e.to_string()),
            Err(_) => return Served::Lost("no answer to a poll".into()),
        };
        let changed = versions.changed_since(&connected.versions);
        if changed.is_empty() {
            continue;
        }
        shared
            .notifications
            .fetch_add(changed.len() as u64, Ordering::Relaxed);
        connected.versions = versions;
        invalidate_all(cache, &connected.cascades.with_descendants(changed)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_urls_become_mysql_ones() {
        assert_eq!(
            mysql_scheme("mariadb://root@h/db".into()),
            "mysql://root@h/db"
        );
        assert_eq!(
            mysql_scheme("MariaDB://h:3306/db".into()),
            "mysql://h:3306/db"
        );
        assert_eq!(mysql_scheme("mysql://h/db".into()), "mysql://h/db");
        assert_eq!(mysql_scheme("maria".into()), "maria");
        assert_eq!(mysql_scheme("mariadb:/é".into()), "mariadb:/é");
    }

    #[test]
    fn names() {
        assert_eq!(split_name("users"), (None, "users".into()));
        assert_eq!(
            split_name("App.Users"),
            (Some("App".into()), "Users".into())
        );
        assert_eq!(
            split_name("`a.b`.`c``d`"),
            (Some("a.b".into()), "c`d".into())
        );
        // As `listen::tables` names a mixed-case table.
        assert_eq!(split_name("\"Ledger\""), (None, "Ledger".into()));
        assert_eq!(
            split_name("app.\"We.ird\"\"Name\""),
            (Some("app".into()), "We.ird\"Name".into())
        );
        assert_eq!(trigger_name("users", "ai"), "memclone_ai_users");
        let long = "t".repeat(64);
        let name = trigger_name(&long, "ad");
        assert_eq!(name.chars().count(), 64);
        assert_ne!(name, trigger_name(&format!("{long}x"), "ad"));
        assert_eq!(literal("users"), "'users'");
        assert_eq!(literal("it's"), "X'69742773'");
    }

    #[test]
    fn sql() {
        let up = mariadb_install_sql("memclone_versions", &["users", "app.posts"]);
        assert!(up.contains("CREATE TABLE IF NOT EXISTS `memclone_versions`"));
        assert!(up.contains(
            "CREATE TRIGGER `memclone_au_users` AFTER UPDATE ON `users` FOR EACH ROW \
             INSERT INTO `memclone_versions` (tbl, shard, version) VALUES ('users', \
             CONNECTION_ID() % 16, 1) ON DUPLICATE KEY UPDATE version = version + 1;"
        ));
        assert!(up.contains(
            "CREATE TRIGGER `app`.`memclone_ad_posts` AFTER DELETE ON `app`.`posts` FOR EACH ROW"
        ));
        let down = mariadb_uninstall_sql("memclone_versions", &["users"]);
        assert!(down.contains("DROP TRIGGER IF EXISTS `memclone_ai_users`;"));
        assert!(down.contains("DELETE FROM `memclone_versions` WHERE tbl = 'users';"));
    }

    #[test]
    fn versions_and_cascades() {
        let before = Versions(
            [("a".to_owned(), (1, 5)), ("b".to_owned(), (2, 7))]
                .into_iter()
                .collect(),
        );
        let after = Versions(
            [("a".to_owned(), (1, 6)), ("c".to_owned(), (1, 1))]
                .into_iter()
                .collect(),
        );
        assert_eq!(
            after.changed_since(&before),
            ["a", "b", "c"].map(String::from).into_iter().collect()
        );
        assert!(before.changed_since(&before).is_empty());
        let mut graph = BTreeMap::new();
        graph.insert("p".to_owned(), BTreeSet::from(["c".to_owned()]));
        graph.insert("c".to_owned(), BTreeSet::from(["g".to_owned()]));
        graph.insert("g".to_owned(), BTreeSet::from(["g".to_owned()]));
        let cascades = Cascades(graph);
        assert_eq!(
            cascades.with_descendants(BTreeSet::from(["p".to_owned()])),
            BTreeSet::from(["p", "c", "g"].map(String::from))
        );
        assert_eq!(
            cascades.ancestors("g"),
            BTreeSet::from(["p", "c"].map(String::from))
        );
    }
}

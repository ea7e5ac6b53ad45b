//! Invalidation from PostgreSQL itself: writes that bypass memclone (raw SQL, `psql`, a
//! migration, another service, a trigger, an `ON DELETE CASCADE`) invalidate the cache too.
//!
//! Two parts:
//!
//! * [`install_sql`] gives the SQL to put in a Diesel migration: for each table, one
//!   statement-level `AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE` trigger that calls
//!   `memclone_notify()`, which sends `pg_notify(<channel>, <schema>.<table>)`. PostgreSQL
//!   delivers a notification only after its transaction commits, once per distinct payload per
//!   transaction, so a transaction that writes a table a thousand times sends one notification.
//!   [`uninstall_sql`] undoes it.
//! * [`postgres`] starts a [`Listener`]: a background task on a connection of its own that
//!   `LISTEN`s on the channel and invalidates each notified table through the same path as
//!   memclone's own writes ([`Cache::invalidate_table`]: an invalidation the store did not take is
//!   kept, retried, and keeps the table from being served meanwhile).
//!
//! The invalidation is per table (every cached query and entity of the table), as for a write
//! whose rows memclone does not know. Row-level payloads (the changed rows' primary keys, so
//! that only their entity entries are evicted) are a later optimisation: the table's queries
//! have to be invalidated on every write anyway.
//!
//! Nothing is lost while the listener is away: on start and after every reconnection it
//! `LISTEN`s first, then invalidates every watched table once (and says so once in the log),
//! then serves notifications. A write committed while it was away is covered by that
//! invalidation; one committed after the `LISTEN` is notified.
//!
//! ```no_run
//! # async fn run() -> Result<(), diesel_memclone::listen::ListenError> {
//! // In a migration (`up.sql`): the output of
//! let up = diesel_memclone::listen::install_sql("memclone", &["users", "app.ledger"]);
//! // and in `down.sql`:
//! let down = diesel_memclone::listen::uninstall_sql(&["users", "app.ledger"]);
//!
//! // In the application, once the cache is installed:
//! let listener = diesel_memclone::listen::postgres("postgres://localhost/app")
//!     .tables(["users", "app.ledger"])
//!     .start()
//!     .await?;
//! assert!(listener.is_healthy());
//! // Dropping `listener` (or `listener.stop().await`) ends the task.
//! # Ok(()) }
//! ```
//!
//! MariaDB/MySQL has no `NOTIFY`: this module is PostgreSQL only.

use crate::Cache;
use diesel::sql_types::{BigInt, Bool, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::{FutureExt, StreamExt};
use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The channel the triggers notify and the listener listens on, unless told otherwise.
pub const DEFAULT_CHANNEL: &str = "memclone";
/// The name of the trigger [`install_sql`] creates on each table.
pub const TRIGGER_NAME: &str = "memclone_invalidate";
/// The name of the trigger function [`install_sql`] creates (in the first schema of the
/// migration's `search_path`).
pub const FUNCTION_NAME: &str = "memclone_notify";
/// The `application_name` of the listener's connection (to find it in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "memclone-listener";

/// How long one reconnection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The names of the tables of the given [`MemClone`](crate::MemClone) models, for
/// [`install_sql`] and [`Listener::tables`]: `listen::tables::<(User, Post)>()`.
///
/// These are the names memclone keys them by ([`MemClone::table`](crate::MemClone::table)):
/// without their schema. A model whose table is not in the `search_path` of the migration and of
/// the listener's connection has to be named with its schema (`"app.ledger"`) instead.
pub fn tables<M: Models>() -> Vec<&'static str> {
    let mut out = Vec::new();
    M::tables(&mut out);
    out
}

/// A tuple of [`MemClone`](crate::MemClone) models (up to 12), or one model: see [`tables`].
pub trait Models {
    /// Appends the models' table names.
    fn tables(out: &mut Vec<&'static str>);
}

macro_rules! models_tuple {
    ($($m:ident),+) => {
        impl<$($m: crate::MemClone),+> Models for ($($m,)+) {
            fn tables(out: &mut Vec<&'static str>) {
                $(
                    if !out.contains(&$m::table()) {
                        out.push($m::table());
                    }
                )+
            }
        }
    };
}

models_tuple!(A);
models_tuple!(A, B);
models_tuple!(A, B, C);
models_tuple!(A, B, C, D);
models_tuple!(A, B, C, D, E);
models_tuple!(A, B, C, D, E, F);
models_tuple!(A, B, C, D, E, F, G);
models_tuple!(A, B, C, D, E, F, G, H);
models_tuple!(A, B, C, D, E, F, G, H, I);
models_tuple!(A, B, C, D, E, F, G, H, I, J);
models_tuple!(A, B, C, D, E, F, G, H, I, J, K);
models_tuple!(A, B, C, D, E, F, G, H, I, J, K, L);

/// A table named as text (`users`, `app.ledger`, `"App"."Ledger"`), as a list of identifiers:
/// quoted parts keep their case (`""` is a quote), bare parts are folded to lower case, as
/// PostgreSQL does.
fn identifiers(name: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut chars = name.trim().chars().peekable();
    let mut current = String::new();
    let mut quoted_part = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted_part = true;
                while let Some(c) = chars.next() {
                    if c == '"' {
                        if chars.peek() == Some(&'"') {
                            chars.next();
                            current.push('"');
                        } else {
                            break;
                        }
                    } else {
                        current.push(c);
                    }
                }
            }
            '.' => {
                parts.push(std::mem::take(&mut current));
                quoted_part = false;
            }
            c if c.is_whitespace() && !quoted_part => {}
            c => current.extend(c.to_lowercase()),
        }
    }
    parts.push(current);
    parts.retain(|p| !p.is_empty());
    parts
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The table as SQL: each identifier quoted (`"app"."ledger"`).
fn table_sql(name: &str) -> String {
    identifiers(name)
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join(".")
}

/// The SQL that installs the triggers on `tables`, for a migration's `up.sql`: the trigger
/// function `memclone_notify()` (created or replaced, in the first schema of the `search_path`)
/// and, on each table, the trigger `memclone_invalidate` (replaced if it exists).
///
/// Each trigger runs once per statement, after it (`FOR EACH STATEMENT`: a statement that
/// changes a million rows sends one notification, and one that changes none sends one too), and
/// notifies `channel` with the table's name, schema-qualified and quoted
/// (`"public"."users"`). Tables are named as memclone names them (`users`), or with their
/// schema (`app.ledger`); an unqualified name is resolved by the migration's `search_path`.
///
/// Cost: one `pg_notify` per write statement, queued until commit and sent once per distinct
/// table per transaction.
pub fn install_sql<S: AsRef<str>>(channel: &str, tables: &[S]) -> String {
    let mut sql = format!(
        "-- diesel-memclone: invalidate the cache on every committed write (issue 12).\n\
         CREATE OR REPLACE FUNCTION {FUNCTION_NAME}() RETURNS trigger LANGUAGE plpgsql AS $memclone$\n\
         BEGIN\n  \
           PERFORM pg_notify(TG_ARGV[0], quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME));\n  \
           RETURN NULL;\n\
         END\n\
         $memclone$;\n"
    );
    for table in tables {
        let table = table_sql(table.as_ref());
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {table};\n\
             CREATE TRIGGER {TRIGGER_NAME} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}\n  \
               FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION_NAME}({});\n",
            quote_literal(channel)
        ));
    }
    sql
}

/// The SQL that removes what [`install_sql`] installed on `tables`, for a migration's
/// `down.sql`: each table's trigger, then the function if no trigger uses it any more.
pub fn uninstall_sql<S: AsRef<str>>(tables: &[S]) -> String {
    let mut sql = String::new();
    for table in tables {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {};\n",
            table_sql(table.as_ref())
        ));
    }
    sql.push_str(&format!(
        "DO $memclone$ BEGIN\n  \
           IF to_regprocedure('{FUNCTION_NAME}()') IS NOT NULL AND NOT EXISTS (\n    \
             SELECT 1 FROM pg_trigger WHERE tgfoid = to_regprocedure('{FUNCTION_NAME}()')) THEN\n    \
             DROP FUNCTION {FUNCTION_NAME}();\n  \
           END IF;\n\
         END $memclone$;\n"
    ));
    sql
}

/// Why a [`Listener`] did not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum ListenError {
    /// The database could not be reached.
    Connection(diesel::ConnectionError),
    /// A statement failed (the role's rights, say).
    Database(diesel::result::Error),
    /// A watched table does not exist (in the listener connection's `search_path`, when
    /// unqualified).
    NoSuchTable(String),
    /// A watched table lacks the trigger [`install_sql`] installs for this channel, or has an
    /// older, different or disabled one.
    MissingTrigger {
        /// The table, as given.
        table: String,
        /// The channel the listener listens on.
        channel: String,
    },
    /// No table to watch was given.
    NoTables,
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::Connection(e) => write!(f, "memclone listener: cannot connect: {e}"),
            ListenError::Database(e) => write!(f, "memclone listener: {e}"),
            ListenError::NoSuchTable(t) => {
                write!(f, "memclone listener: watched table {t} does not exist")
            }
            ListenError::MissingTrigger { table, channel } => write!(
                f,
                "memclone listener: table {table} has no up-to-date `{TRIGGER_NAME}` trigger for \
                 channel {channel:?}: install it with the SQL of \
                 `diesel_memclone::listen::install_sql({channel:?}, ..)` (in a migration)"
            ),
            ListenError::NoTables => write!(f, "memclone listener: no table to watch"),
        }
    }
}

impl std::error::Error for ListenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ListenError::Connection(e) => Some(e),
            ListenError::Database(e) => Some(e),
            _ => None,
        }
    }
}

impl From<diesel::ConnectionError> for ListenError {
    fn from(e: diesel::ConnectionError) -> Self {
        ListenError::Connection(e)
    }
}

impl From<diesel::result::Error> for ListenError {
    fn from(e: diesel::result::Error) -> Self {
        ListenError::Database(e)
    }
}

/// A listener to configure and [`start`](Listener::start): see [`postgres`].
#[must_use = "a listener does nothing until started"]
#[derive(Clone)]
pub struct Listener {
    database_url: String,
    tables: Vec<String>,
    channel: String,
    cache: Option<Cache>,
    backoff: (Duration, Duration),
    ping_every: Duration,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password.
        f.debug_struct("Listener")
            .field("tables", &self.tables)
            .field("channel", &self.channel)
            .field("backoff", &self.backoff)
            .field("ping_every", &self.ping_every)
            .finish_non_exhaustive()
    }
}

/// A listener on the PostgreSQL database at `database_url`: give it the tables to watch, then
/// [`start`](Listener::start) it.
pub fn postgres(database_url: impl Into<String>) -> Listener {
    Listener {
        database_url: database_url.into(),
        tables: Vec::new(),
        channel: DEFAULT_CHANNEL.to_owned(),
        cache: None,
        backoff: (Duration::from_millis(100), Duration::from_secs(10)),
        ping_every: Duration::from_secs(5),
    }
}

impl Listener {
    /// Adds tables to watch (as for [`install_sql`]): each must have the trigger, and each is
    /// invalidated on start and after every reconnection. A notification for another table on
    /// the channel invalidates that table too.
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

    /// The channel (default [`DEFAULT_CHANNEL`]); the triggers must notify the same one.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
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

    /// How often the connection is checked (`SELECT 1`) while no notification comes (default
    /// 5 s): what notices a connection that died without a word.
    pub fn ping_every(mut self, every: Duration) -> Self {
        self.ping_every = every.max(Duration::from_millis(10));
        self
    }

    /// Connects, checks that every watched table has its trigger, `LISTEN`s, invalidates every
    /// watched table, and leaves a background task (on the current tokio runtime) that serves
    /// the notifications and reconnects when the connection drops.
    ///
    /// Fails, with nothing left running, when the database is unreachable, a table or its
    /// trigger is missing, or the role cannot `LISTEN`.
    pub async fn start(self) -> Result<ListenHandle, ListenError> {
        if self.tables.is_empty() {
            return Err(ListenError::NoTables);
        }
        let cache = self.cache.clone().unwrap_or_else(|| crate::cache().clone());
        let shared = Arc::new(Shared::default());
        let conn = self.connect(&cache, &shared).await?;
        tracing::info!(
            tables = ?self.tables,
            channel = %self.channel,
            "memclone listener started; invalidated every watched table"
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(self, cache, shared.clone(), conn, stop_rx));
        Ok(ListenHandle {
            shared,
            stop: stop_tx,
            task: Some(task),
        })
    }

    /// A connection that listens, its tables checked, and every watched table invalidated.
    async fn connect(
        &self,
        cache: &Cache,
        shared: &Shared,
    ) -> Result<AsyncPgConnection, ListenError> {
        let mut conn = AsyncPgConnection::establish(&self.database_url).await?;
        conn.batch_execute(&format!(
            "SET application_name = {}",
            quote_literal(APPLICATION_NAME)
        ))
        .await?;
        check_triggers(&mut conn, &self.tables, &self.channel).await?;
        conn.batch_execute(&format!("LISTEN {}", quote_ident(&self.channel)))
            .await?;
        let pid: BackendPid = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query("SELECT pg_backend_pid() AS pid"),
            &mut conn,
        )
        .await?;
        shared.pid.store(pid.pid, Ordering::Relaxed);
        // After the LISTEN: a write committed before it is covered by this invalidation, one
        // committed after it is notified.
        for table in &self.tables {
            cache.invalidate_table(table).await;
        }
        shared.healthy.store(true, Ordering::Release);
        Ok(conn)
    }
}

#[derive(diesel::QueryableByName)]
struct BackendPid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(diesel::QueryableByName)]
struct TriggerCheck {
    #[diesel(sql_type = Bool)]
    exists: bool,
    #[diesel(sql_type = BigInt)]
    triggers: i64,
}

/// Every watched table exists and has an enabled `memclone_invalidate` trigger that fires after
/// each statement of the four kinds and notifies `channel`.
async fn check_triggers(
    conn: &mut AsyncPgConnection,
    tables: &[String],
    channel: &str,
) -> Result<(), ListenError> {
    // tgtype: 1 row, 2 before, 4 insert, 8 delete, 16 update, 32 truncate, 64 instead.
    let query = "SELECT to_regclass($1) IS NOT NULL AS exists, \
                 (SELECT count(*) FROM pg_trigger t \
                  WHERE t.tgrelid = to_regclass($1) AND t.tgname = $2 AND t.tgenabled <> 'D' \
                    AND (t.tgtype & 127) = 60 AND t.tgnargs = 1 \
                    AND t.tgargs = convert_to($3, 'UTF8') || '\\x00'::bytea \
                    AND t.tgfoid IN (SELECT oid FROM pg_proc WHERE proname = $4)) AS triggers";
    for table in tables {
        let query = diesel::sql_query(query)
            .bind::<Text, _>(table_sql(table))
            .bind::<Text, _>(TRIGGER_NAME)
            .bind::<Text, _>(channel)
            .bind::<Text, _>(FUNCTION_NAME);
        let check: TriggerCheck = diesel_async::RunQueryDsl::get_result(query, &mut *conn).await?;
        if !check.exists {
            return Err(ListenError::NoSuchTable(table.clone()));
        }
        if check.triggers == 0 {
            return Err(ListenError::MissingTrigger {
                table: table.clone(),
                channel: channel.to_owned(),
            });
        }
    }
    Ok(())
}

impl Shared {
    /// Down: counted once in the cache's stats; up again or stopped: uncounted.
    fn set_down(&self, cache: &Cache, down: bool) {
        if down {
            self.healthy.store(false, Ordering::Release);
        }
        if self.counted_down.swap(down, Ordering::AcqRel) != down {
            cache.listener_unhealthy(down);
        }
    }
}

#[derive(Default)]
struct Shared {
    healthy: AtomicBool,
    /// Counted in the cache's `Stats::listeners_unhealthy`.
    counted_down: AtomicBool,
    reconnects: AtomicU64,
    notifications: AtomicU64,
    pid: AtomicI32,
}

/// A running listener. Dropping it, or [`stop`](ListenHandle::stop), ends its task and closes
/// its connection.
pub struct ListenHandle {
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl fmt::Debug for ListenHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenHandle")
            .field("healthy", &self.is_healthy())
            .field("reconnects", &self.reconnects())
            .field("notifications", &self.notifications())
            .finish()
    }
}

impl ListenHandle {
    /// Whether the listener is connected and listening (the cache's
    /// [`Stats::listeners_unhealthy`](crate::Stats::listeners_unhealthy) counts those that are
    /// not). While it is not (it is reconnecting),
    /// writes that bypass memclone are not seen until it is back, when it invalidates every
    /// watched table; meanwhile such writes can be served stale (at most until the TTL, as
    /// without a listener).
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// How many times the connection was lost and made again.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Notifications received so far.
    pub fn notifications(&self) -> u64 {
        self.shared.notifications.load(Ordering::Relaxed)
    }

    /// The process id of the listener's current (or last) backend (`pg_backend_pid()`).
    pub fn backend_pid(&self) -> i32 {
        self.shared.pid.load(Ordering::Relaxed)
    }

    /// Ends the task and waits for it (the connection is closed when this returns).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ListenHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Why serving stopped.
enum Served {
    Stopped,
    Lost(String),
}

async fn run(
    listener: Listener,
    cache: Cache,
    shared: Arc<Shared>,
    mut conn: AsyncPgConnection,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match serve(&listener, &cache, &shared, &mut conn, &mut stop).await {
            Served::Stopped => {
                shared.healthy.store(false, Ordering::Release);
                return;
            }
            Served::Lost(why) => {
                shared.set_down(&cache, true);
                tracing::warn!(
                    error = %why,
                    "memclone listener lost its connection; reconnecting (writes that bypass \
                     memclone are not seen until it is back)"
                );
            }
        }
        drop(conn);
        // However the reconnection ends (back, stopped, or the task dropped), uncount it.
        let down = DownGuard(&shared, &cache);
        let mut pause = listener.backoff.0;
        let mut warned = false;
        conn = loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stopped(&mut stop) => return,
            }
            // Bounded: a host that drops packets, or a connection that went silent, must not
            // keep the listener down for minutes.
            let attempt = tokio::select! {
                attempt = tokio::time::timeout(CONNECT_TIMEOUT, listener.connect(&cache, &shared)) => {
                    attempt.unwrap_or_else(|_| {
                        Err(ListenError::Connection(diesel::ConnectionError::BadConnection(
                            "no answer in 10 s".into(),
                        )))
                    })
                }
                _ = stopped(&mut stop) => return,
            };
            match attempt {
                Ok(conn) => break conn,
                Err(e) => {
                    // Said once per outage (a missing trigger, say); each retry at debug level.
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(error = %e, "memclone listener: reconnection failed; retrying");
                    } else {
                        tracing::debug!(error = %e, "memclone listener: reconnection failed");
                    }
                    pause = (pause * 2).min(listener.backoff.1);
                }
            }
        };
        drop(down);
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            tables = ?listener.tables,
            "memclone listener reconnected; invalidated every watched table"
        );
    }
}

/// Uncounts a listener that was down, when dropped.
struct DownGuard<'a>(&'a Shared, &'a Cache);

impl Drop for DownGuard<'_> {
    fn drop(&mut self) {
        self.0.set_down(self.1, false);
    }
}

/// Resolves when the handle asks to stop or is dropped.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn serve(
    listener: &Listener,
    cache: &Cache,
    shared: &Shared,
    conn: &mut AsyncPgConnection,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Served {
    let mut ping = tokio::time::interval(listener.ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        let mut tables = BTreeSet::new();
        {
            // The stream only borrows the connection's channel of notifications: dropping it
            // loses none (receiving is cancel-safe), and lets the ping use the connection.
            let mut stream = std::pin::pin!(conn.notifications_stream());
            let first = tokio::select! {
                _ = stopped(stop) => return Served::Stopped,
                _ = ping.tick() => None,
                next = stream.next() => Some(next),
            };
            let mut next = first;
            while let Some(item) = next {
                match item {
                    Some(Ok(n)) => {
                        shared.notifications.fetch_add(1, Ordering::Relaxed);
                        if n.channel == listener.channel {
                            tables.insert(n.payload);
                        }
                    }
                    // What arrived before the loss is invalidated first: a reconnect may take
                    // long, and tables outside the watched list are not invalidated by it.
                    Some(Err(e)) => {
                        invalidate_all(cache, &tables).await;
                        return Served::Lost(e.to_string());
                    }
                    None => {
                        invalidate_all(cache, &tables).await;
                        return Served::Lost("notification stream ended".into());
                    }
                }
                // Whatever else has arrived: one invalidation per table.
                next = stream.next().now_or_never();
            }
        }
        if tables.is_empty() {
            // A ping: a connection that died in silence is noticed here.
            let alive = tokio::time::timeout(
                listener.ping_every.max(Duration::from_secs(1)),
                conn.batch_execute("SELECT 1"),
            )
            .await;
            match alive {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Served::Lost(e.to_string()),
                Err(_) => return Served::Lost("no answer to a ping".into()),
            }
        }
        invalidate_all(cache, &tables).await;
    }
}

async fn invalidate_all(cache: &Cache, tables: &BTreeSet<String>) {
    for table in tables {
        cache.invalidate_table(table).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(identifiers("users"), ["users"]);
        assert_eq!(identifiers("App.Ledger"), ["app", "ledger"]);
        assert_eq!(identifiers(r#""App"."Le""dger""#), ["App", "Le\"dger"]);
        assert_eq!(table_sql("app.ledger"), r#""app"."ledger""#);
        assert_eq!(table_sql(r#""odd""name""#), r#""odd""name""#);
    }

    #[test]
    fn sql() {
        let up = install_sql("memclone", &["users", "app.ledger"]);
        assert!(up.contains("CREATE OR REPLACE FUNCTION memclone_notify()"));
        assert!(up.contains(
            "AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON \"app\".\"ledger\"\n  FOR EACH STATEMENT EXECUTE FUNCTION memclone_notify('memclone');"
        ));
        let down = uninstall_sql(&["users"]);
        assert!(down.contains("DROP TRIGGER IF EXISTS memclone_invalidate ON \"users\";"));
        assert!(install_sql("it's", &["t"]).contains("memclone_notify('it''s')"));
    }
}

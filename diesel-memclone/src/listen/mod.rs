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
//! * [`postgres()`] starts a [`Listener`]: a background task on a connection of its own that
//!   `LISTEN`s on the channel and invalidates each notified table through the same path as
//!   memclone's own writes ([`Cache::invalidate_table`]: an invalidation the store did not take is
//!   kept, retried, and keeps the table from being served meanwhile).
//!
//! With these triggers the invalidation is per table (every cached query and entity of the
//! table), as for a write whose rows memclone does not know. [`row_triggers`] installs
//! row-level ones instead: statement-level triggers with transition tables that send the table
//! and the primary keys of the changed rows (old and new keys when an `UPDATE` changes a key),
//! or the table alone past a number of rows, past PostgreSQL's 8,000-byte payload, on
//! `TRUNCATE`, or for a key type whose text memclone cannot match. For a notification with rows,
//! the listener makes the bumps of a memclone write whose rows are known: the table's queries
//! and those rows' entity entries, not the table's other rows. A listener reads both kinds of
//! payload, so tables of either kind can be watched together.
//!
//! Nothing is lost while the listener is away: on start and after every reconnection it
//! `LISTEN`s first, then invalidates every watched table once (and says so once in the log),
//! then serves notifications. A write committed while it was away is covered by that
//! invalidation; one committed after the `LISTEN` is notified.
//!
//! # Replicas on the in-process store
//!
//! Several replicas that each keep the embedded in-process store (no Redis) never hear of each
//! other's writes through the cache itself. Give each replica its own listener (same channel,
//! the same triggers): every write, through memclone in any replica or from outside, is
//! notified to every replica, and each invalidates its own store. A replica's own memclone
//! writes are bumped twice (at once by the write, then when the notification comes back), which
//! costs a table bump per write statement and is harmless.
//!
//! ```no_run
//! # async fn run() -> Result<(), diesel_memclone::listen::ListenError> {
//! // In a migration (`up.sql`): the output of
//! let up = diesel_memclone::listen::install_sql("memclone", &["users", "app.ledger"])?;
//! // and in `down.sql`:
//! let down = diesel_memclone::listen::uninstall_sql(&["users", "app.ledger"])?;
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
//! # One listener per deployment
//!
//! The `memclone-listen` binary (package `diesel-memclone-listen`) runs this listener as a
//! sidecar on the applications' Redis and namespace, so that the applications need none of
//! their own; `memclone-listen --print-install-sql --tables ..` prints [`install_sql`]'s SQL.
//!
//! MariaDB/MySQL has no `NOTIFY`: its listener (feature `mysql`) polls counters that triggers
//! bump, see [`mariadb()`].
// Each backend's items exist with its feature only; links to the other's then point at docs.rs,
// where every feature is documented (as in lib.rs).
#![cfg_attr(
    not(feature = "postgres"),
    doc = "\n\n[`install_sql`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/fn.install_sql.html\n[`row_triggers`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/fn.row_triggers.html\n[`uninstall_sql`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/fn.uninstall_sql.html\n[`postgres()`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/fn.postgres.html\n[`Listener`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/struct.Listener.html"
)]
#![cfg_attr(
    not(feature = "mysql"),
    doc = "\n\n[`mariadb()`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/fn.mariadb.html"
)]

use crate::Cache;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "mysql")]
mod mariadb;
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use mariadb::{
    mariadb, mariadb_install_sql, mariadb_uninstall_sql, MariaDbListener, MariaDbSetupError,
    MARIADB_SHARDS, MARIADB_VERSIONS_TABLE,
};

#[cfg(feature = "postgres")]
mod postgres;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::{
    install_sql, postgres, row_triggers, uninstall_sql, Listener, RowTriggers, DEFAULT_MAX_ROWS,
    FUNCTION_NAME, ROWS_FUNCTION_NAME, TRIGGER_NAME,
};

/// How long one reconnection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a listener's session ended.
enum Served {
    Stopped,
    Lost(String),
}

#[cfg(feature = "postgres")]
/// The channel the triggers notify and the listener listens on, unless told otherwise.
pub const DEFAULT_CHANNEL: &str = "memclone";
#[cfg(feature = "postgres")]
/// The `application_name` of the listener's connection (to find it in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "memclone-listener";

/// The names of the tables of the given [`MemClone`](crate::MemClone) models, for
/// [`install_sql`] and [`Listener::tables`]: `listen::tables::<(User, Post)>()`.
///
/// Each is the table as its `table!` names it ([`MemClone::table_sql`](crate::MemClone::table_sql)):
/// with its schema when `table!` gives one (`app.ledger`), and quoted where a bare name would be
/// folded to lower case or is not a plain identifier (`"Ledger"`). A table without a schema is
/// found through the `search_path` of the migration and of the listener's connection. The
/// MariaDB listener and [`mariadb_install_sql`] read these names too.
#[cfg_attr(
    not(feature = "postgres"),
    doc = "\n\n[`install_sql`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/fn.install_sql.html\n[`Listener::tables`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/struct.Listener.html#method.tables"
)]
#[cfg_attr(
    not(feature = "mysql"),
    doc = "\n\n[`mariadb_install_sql`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/fn.mariadb_install_sql.html"
)]
pub fn tables<M: Models>() -> Vec<&'static str> {
    let mut out = Vec::new();
    M::tables(&mut out);
    out
}

/// A tuple of [`MemClone`](crate::MemClone) models (up to 12), or one model: see [`tables`].
pub trait Models {
    /// Appends the models' tables, as [`tables`] lists them.
    fn tables(out: &mut Vec<&'static str>);

    /// Appends the models' tables, as [`tables`] lists them, each with its primary key's
    /// columns (for row-level triggers). The default names no column: the table alone.
    fn keyed_tables(out: &mut Vec<(&'static str, &'static [&'static str])>) {
        let mut tables = Vec::new();
        Self::tables(&mut tables);
        out.extend(
            tables
                .into_iter()
                .map(|t| (t, &[] as &'static [&'static str])),
        );
    }
}

macro_rules! models_tuple {
    ($($m:ident),+) => {
        impl<$($m: crate::MemClone),+> Models for ($($m,)+) {
            fn tables(out: &mut Vec<&'static str>) {
                $(
                    if !out.contains(&$m::table_sql()) {
                        out.push($m::table_sql());
                    }
                )+
            }
            fn keyed_tables(out: &mut Vec<(&'static str, &'static [&'static str])>) {
                $(
                    if !out.iter().any(|(t, _)| *t == $m::table_sql()) {
                        out.push((
                            $m::table_sql(),
                            <$m as crate::MemClone>::row_key_columns(),
                        ));
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

/// Why a listener ([`Listener`], or MariaDB's) did not start, or [`install_sql`] could not
/// write its SQL.
#[cfg_attr(
    not(feature = "postgres"),
    doc = "\n\n[`Listener`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/struct.Listener.html\n[`install_sql`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/fn.install_sql.html"
)]
#[derive(Debug)]
#[non_exhaustive]
pub enum ListenError {
    /// The database could not be reached.
    Connection(diesel::ConnectionError),
    /// A statement failed.
    Database(diesel::result::Error),
    /// A watched table does not exist (in the listener connection's `search_path`, when
    /// unqualified).
    NoSuchTable(String),
    /// A watched table lacks the trigger [`install_sql`] installs for this channel (or the four
    /// that [`RowTriggers`] install), or has a different or disabled one.
    #[cfg(feature = "postgres")]
    MissingTrigger {
        /// The table, as given.
        table: String,
        /// The channel the listener listens on.
        channel: String,
    },
    /// A watched table's trigger calls a trigger function whose body is not the one this version
    /// of memclone installs (for a row-level trigger: for the key columns it names): an older
    /// version's, or one edited by hand. What it sends may not be what the listener reads.
    #[cfg(feature = "postgres")]
    OutdatedFunction {
        /// The table, as given.
        table: String,
        /// The function the trigger calls.
        function: String,
    },
    /// The listener's role lacks a right it needs to check the set-up.
    InsufficientPrivilege {
        /// The role (`current_user`).
        role: String,
        /// What it needs, and on what.
        needs: String,
    },
    /// The channel cannot be used: see `install_sql` (PostgreSQL) for what a channel may be.
    InvalidChannel {
        /// The channel, as given.
        channel: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A table name cannot be read as `table` or `schema.table` (each part a plain identifier
    /// or a double-quoted one of at most 63 bytes).
    InvalidTable {
        /// The name, as given.
        table: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A key column given to [`RowTriggers::table`] cannot be a column's name.
    #[cfg(feature = "postgres")]
    InvalidColumn {
        /// The table, as given.
        table: String,
        /// The column, as given.
        column: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No table to watch was given.
    NoTables,
    /// MariaDB/MySQL: the counter table or a trigger is missing or out of date.
    #[cfg(feature = "mysql")]
    #[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
    MariaDb(MariaDbSetupError),
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::Connection(e) => write!(f, "memclone listener: cannot connect: {e}"),
            ListenError::Database(e) => write!(f, "memclone listener: {e}"),
            ListenError::NoSuchTable(t) => {
                write!(f, "memclone listener: watched table {t} does not exist")
            }
            #[cfg(feature = "postgres")]
            ListenError::MissingTrigger { table, channel } => write!(
                f,
                "memclone listener: table {table} has no enabled `{TRIGGER_NAME}` trigger for \
                 channel {channel:?}: install it with the SQL of \
                 `diesel_memclone::listen::install_sql({channel:?}, ..)` (in a migration)"
            ),
            #[cfg(feature = "postgres")]
            ListenError::OutdatedFunction { table, function } => write!(
                f,
                "memclone listener: the trigger of table {table} calls {function}(), whose body \
                 is not the one this version of memclone installs: run the SQL of \
                 `diesel_memclone::listen::install_sql(..)` again (in a new migration)"
            ),
            ListenError::InsufficientPrivilege { role, needs } => write!(
                f,
                "memclone listener: role {role:?} lacks a right the listener needs: {needs}"
            ),
            ListenError::InvalidChannel { channel, reason } => {
                write!(f, "memclone listener: channel {channel:?} {reason}")
            }
            ListenError::InvalidTable { table, reason } => {
                write!(f, "memclone listener: table name {table:?} {reason}")
            }
            #[cfg(feature = "postgres")]
            ListenError::InvalidColumn {
                table,
                column,
                reason,
            } => write!(
                f,
                "memclone listener: key column {column:?} of table {table:?} {reason}"
            ),
            ListenError::NoTables => write!(f, "memclone listener: no table to watch"),
            #[cfg(feature = "mysql")]
            ListenError::MariaDb(e) => write!(f, "memclone listener: {e}"),
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

/// What a listener's task and its handle share: health and counters.
#[derive(Default)]
struct Shared {
    healthy: AtomicBool,
    /// Counted in the cache's `Stats::listeners_unhealthy`.
    counted_down: AtomicBool,
    reconnects: AtomicU64,
    notifications: AtomicU64,
    pid: AtomicI32,
    /// A notification that was not a table name was logged (once per listener).
    #[cfg(feature = "postgres")]
    warned_payload: AtomicBool,
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

/// Uncounts a listener that was down, when dropped.
struct DownGuard<'a>(&'a Shared, &'a Cache);

impl Drop for DownGuard<'_> {
    fn drop(&mut self) {
        self.0.set_down(self.1, false);
    }
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

/// Marks a listener whose connection was lost as down (in its handle, the cache's stats and
/// the log), until [`reconnect`] brings it back.
fn lost(name: &'static str, cache: &Cache, shared: &Shared, why: &str) {
    shared.set_down(cache, true);
    tracing::warn!(
        listener = name,
        error = %why,
        "memclone listener lost its connection; reconnecting (writes that bypass memclone are \
         not seen until it is back)"
    );
}

/// Reconnects a listener that was [`lost`], with exponential `backoff` between attempts, each
/// bounded by [`CONNECT_TIMEOUT`]: `connect` gives a session that has invalidated every watched
/// table, or an error (said once per outage, each retry at debug level). `None` when the handle
/// asks to stop first. The listener counts as down until it is back (or stopped).
async fn reconnect<C, Fut>(
    name: &'static str,
    cache: &Cache,
    shared: &Shared,
    backoff: (Duration, Duration),
    stop: &mut tokio::sync::watch::Receiver<bool>,
    mut connect: impl FnMut() -> Fut,
) -> Option<C>
where
    Fut: std::future::Future<Output = Result<C, ListenError>>,
{
    // However the reconnection ends (back, stopped, or the task dropped), uncount it.
    let _down = DownGuard(shared, cache);
    let mut pause = backoff.0;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped(stop) => return None,
        }
        // Bounded: a host that drops packets, or a connection that went silent, must not keep
        // the listener down for minutes.
        let attempt = tokio::select! {
            attempt = tokio::time::timeout(CONNECT_TIMEOUT, connect()) => {
                attempt.unwrap_or_else(|_| {
                    Err(ListenError::Connection(diesel::ConnectionError::BadConnection(
                        "no answer in 10 s".into(),
                    )))
                })
            }
            _ = stopped(stop) => return None,
        };
        match attempt {
            Ok(session) => {
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    listener = name,
                    "memclone listener reconnected; invalidated every watched table"
                );
                return Some(session);
            }
            Err(e) => {
                // Said once per outage (a missing trigger, say); each retry at debug level.
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(listener = name, error = %e, "memclone listener: reconnection failed; retrying");
                } else {
                    tracing::debug!(listener = name, error = %e, "memclone listener: reconnection failed");
                }
                pause = (pause * 2).min(backoff.1);
            }
        }
    }
}

/// Resolves when the handle asks to stop or is dropped.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(feature = "mysql")]
async fn invalidate_all(cache: &Cache, tables: &std::collections::BTreeSet<String>) {
    for table in tables {
        cache.invalidate_table(table).await;
    }
}

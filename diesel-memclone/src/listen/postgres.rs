//! The PostgreSQL side: the SQL of the triggers, the start-up checks, and the task that
//! `LISTEN`s and turns notifications into invalidations.

use super::{
    invalidate_all, lost, reconnect, stopped, ListenError, ListenHandle, Served, Shared,
    APPLICATION_NAME, DEFAULT_CHANNEL,
};
use crate::Cache;
use diesel::sql_types::{Bool, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::{FutureExt, StreamExt};
use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The name of the trigger [`install_sql`] creates on each table.
pub const TRIGGER_NAME: &str = "memclone_invalidate";
/// The name of the trigger function [`install_sql`] creates (in the first schema of the
/// migration's `search_path`).
pub const FUNCTION_NAME: &str = "memclone_notify";

/// The body of [`FUNCTION_NAME`]. The listener compares what the database holds with it
/// (whitespace aside): a trigger calling another body is reported, not trusted. Its payload,
/// `quote_ident(schema) || '.' || quote_ident(table)`, is what [`table_parts`] reads back.
const FUNCTION_BODY: &str = "
BEGIN
  PERFORM pg_notify(TG_ARGV[0], quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME));
  RETURN NULL;
END
";

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`): a longer one is cut to this
/// length with only a `NOTICE`, so a trigger would notify a name memclone does not know, and
/// `pg_notify` refuses a longer channel, which would fail every write through the trigger.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// Checks a channel name: 1 to 63 bytes of lower-case ASCII letters, digits and `_`, not
/// starting with a digit. Such a name is the same whether a client `LISTEN`s to it quoted or
/// bare (`LISTEN memclone` in `psql` hears it), and `pg_notify` accepts it.
fn check_channel(channel: &str) -> Result<(), ListenError> {
    let invalid = |reason| {
        Err(ListenError::InvalidChannel {
            channel: channel.to_owned(),
            reason,
        })
    };
    if channel.is_empty() {
        return invalid("is empty (pg_notify refuses it, which would fail every write)");
    }
    if channel.len() > MAX_IDENTIFIER_BYTES {
        return invalid(
            "is longer than 63 bytes (pg_notify refuses it, which would fail every write)",
        );
    }
    let plain = channel
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !plain || channel.as_bytes()[0].is_ascii_digit() {
        return invalid(
            "is not a plain identifier (lower-case ASCII letters, digits and `_`, not starting \
             with a digit), so `LISTEN` would need it quoted",
        );
    }
    Ok(())
}

/// A table named as text (`users`, `app.ledger`, `"App"."Ledger"`, as SQL names it): its
/// identifiers, schema first. A quoted part keeps its case (`""` is a quote), a bare part is a
/// plain identifier folded to lower case, as PostgreSQL does; whitespace around the parts is
/// ignored. This is also how the triggers' payloads (`quote_ident` of schema and table) are read.
fn table_parts(name: &str) -> Result<Vec<String>, &'static str> {
    let mut parts = Vec::new();
    let mut chars = name.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut part = String::new();
        match chars.next() {
            None => return Err("is empty, or ends with a dot"),
            Some('"') => loop {
                match chars.next() {
                    None => return Err("has an unterminated quote"),
                    Some('"') if chars.next_if_eq(&'"').is_some() => part.push('"'),
                    Some('"') => break,
                    Some(c) => part.push(c),
                }
            },
            Some(c) if c.is_alphabetic() || c == '_' => {
                part.push(c.to_ascii_lowercase());
                while let Some(c) = chars.next_if(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                {
                    part.push(c.to_ascii_lowercase());
                }
            }
            Some(_) => {
                return Err("has a part that is neither a plain identifier nor double-quoted")
            }
        }
        if part.is_empty() {
            return Err("has an empty quoted part");
        }
        if part.len() > MAX_IDENTIFIER_BYTES {
            return Err("has a part longer than 63 bytes (PostgreSQL would cut it)");
        }
        parts.push(part);
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.next() {
            None => break,
            Some('.') => {}
            Some(_) => return Err("has characters after a part that are not a dot"),
        }
    }
    if parts.len() > 2 {
        return Err("has more than two parts (give `table` or `schema.table`)");
    }
    Ok(parts)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The table as SQL, each identifier quoted (`"app"."ledger"`), or why its name cannot be read.
fn table_sql(name: &str) -> Result<String, ListenError> {
    let parts = table_parts(name).map_err(|reason| ListenError::InvalidTable {
        table: name.to_owned(),
        reason,
    })?;
    Ok(parts
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join("."))
}

/// The SQL that installs the triggers on `tables`, for a migration's `up.sql`: the trigger
/// function `memclone_notify()` (created or replaced, in the first schema of the `search_path`)
/// and, on each table, the trigger `memclone_invalidate` (replaced if it exists).
///
/// Each trigger runs once per statement, after it (`FOR EACH STATEMENT`: a statement that
/// changes a million rows sends one notification, and one that changes none sends one too), and
/// notifies `channel` with the table's name, schema-qualified and quoted as `quote_ident` does
/// (`public.users`, `app."Ledger"`). Tables are named as SQL names them: `users` (folded to
/// lower case), `"Ledger"` (case kept), or with their schema (`app.ledger`); an unqualified
/// name is resolved by the migration's `search_path`. [`tables`](super::tables) lists a set of
/// models' tables in this form.
///
/// # Errors
///
/// [`ListenError::InvalidChannel`] unless `channel` is 1 to 63 bytes of lower-case ASCII
/// letters, digits and `_`, not starting with a digit: a longer or empty one would make
/// `pg_notify`, and so every write to the tables, fail, and one that needs quoting would be
/// missed by a bare `LISTEN`. [`ListenError::InvalidTable`] for a name that is not `table` or
/// `schema.table` or has a part over 63 bytes. A `Result` rather than SQL that fails in the
/// migration: a bad name is found where it was written, before anything reaches the database.
///
/// Cost: one `pg_notify` per write statement, queued until commit and sent once per distinct
/// table per transaction.
pub fn install_sql<S: AsRef<str>>(channel: &str, tables: &[S]) -> Result<String, ListenError> {
    check_channel(channel)?;
    let mut sql = format!(
        "-- diesel-memclone: invalidate the cache on every committed write (issue 12).\n\
         CREATE OR REPLACE FUNCTION {FUNCTION_NAME}() RETURNS trigger LANGUAGE plpgsql AS \
         $memclone${FUNCTION_BODY}$memclone$;\n"
    );
    for table in tables {
        let table = table_sql(table.as_ref())?;
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {table};\n\
             CREATE TRIGGER {TRIGGER_NAME} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}\n  \
               FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION_NAME}({});\n",
            quote_literal(channel)
        ));
    }
    Ok(sql)
}

/// The SQL that removes what [`install_sql`] installed on `tables`, for a migration's
/// `down.sql`: each table's trigger, then the function if no trigger uses it any more.
///
/// # Errors
///
/// [`ListenError::InvalidTable`], as for [`install_sql`].
pub fn uninstall_sql<S: AsRef<str>>(tables: &[S]) -> Result<String, ListenError> {
    let mut sql = String::new();
    for table in tables {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {};\n",
            table_sql(table.as_ref())?
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
    Ok(sql)
}

/// A listener to configure and [`start`](Listener::start): see [`postgres()`].
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
    /// Adds tables to watch (named as for [`install_sql`]): each must have the trigger, and each
    /// is invalidated on start and after every reconnection. A notification for another table
    /// on the channel invalidates that table too.
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

    /// The channel (default [`DEFAULT_CHANNEL`]); the triggers must notify the same one. It is
    /// checked at [`start`](Listener::start), as [`install_sql`] checks it.
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
    /// Fails, with nothing left running, when the channel or a table name is invalid
    /// ([`install_sql`] says what is valid), the database is unreachable, a table or its
    /// trigger is missing, the trigger's function is not this version's, or the role cannot
    /// read what the check needs (the catalogs `pg_trigger` and `pg_proc`, `USAGE` on the
    /// tables' schemas).
    pub async fn start(self) -> Result<ListenHandle, ListenError> {
        check_channel(&self.channel)?;
        for table in &self.tables {
            table_sql(table)?;
        }
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
struct CatalogRights {
    #[diesel(sql_type = Text)]
    role: String,
    #[diesel(sql_type = Bool)]
    readable: bool,
}

#[derive(diesel::QueryableByName)]
struct SchemaUsage {
    #[diesel(sql_type = Bool)]
    usage: bool,
}

#[derive(diesel::QueryableByName)]
struct TriggerCheck {
    #[diesel(sql_type = Bool)]
    exists: bool,
    /// The body of the function a matching trigger calls, if there is such a trigger.
    #[diesel(sql_type = Nullable<Text>)]
    source: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    function: Option<String>,
}

/// Every watched table exists and has an enabled `memclone_invalidate` trigger that fires after
/// each statement of the four kinds, notifies `channel`, and calls this version's function; the
/// role can read what that takes.
async fn check_triggers(
    conn: &mut AsyncPgConnection,
    tables: &[String],
    channel: &str,
) -> Result<(), ListenError> {
    // The catalogs are readable by every role unless an administrator revoked it; without them
    // the checks below would fail with a bare "permission denied".
    let rights: CatalogRights = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query(
            "SELECT current_user::text AS role, \
             has_table_privilege('pg_catalog.pg_trigger', 'SELECT') \
             AND has_table_privilege('pg_catalog.pg_proc', 'SELECT') \
             AND has_table_privilege('pg_catalog.pg_class', 'SELECT') AS readable",
        ),
        &mut *conn,
    )
    .await?;
    if !rights.readable {
        return Err(ListenError::InsufficientPrivilege {
            role: rights.role,
            needs: "SELECT on pg_catalog.pg_trigger, pg_proc and pg_class (to check the \
                    watched tables' triggers)"
                .to_owned(),
        });
    }
    // tgtype: 1 row, 2 before, 4 insert, 8 delete, 16 update, 32 truncate, 64 instead.
    let query = "SELECT to_regclass($1) IS NOT NULL AS exists, p.prosrc AS source, \
                 p.oid::regproc::text AS function \
                 FROM (SELECT 1) AS one LEFT JOIN (pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid) \
                   ON t.tgrelid = to_regclass($1) AND t.tgname = $2 AND t.tgenabled <> 'D' \
                    AND (t.tgtype & 127) = 60 AND t.tgnargs = 1 \
                    AND t.tgargs = convert_to($3, 'UTF8') || '\\x00'::bytea \
                    AND p.proname = $4 \
                 LIMIT 1";
    for table in tables {
        let parts = table_parts(table).map_err(|reason| ListenError::InvalidTable {
            table: table.clone(),
            reason,
        })?;
        if let [schema, _] = parts.as_slice() {
            // `to_regclass` raises "permission denied for schema" instead of answering.
            let usage: Vec<SchemaUsage> = diesel_async::RunQueryDsl::load(
                diesel::sql_query(
                    "SELECT has_schema_privilege(oid, 'USAGE') AS usage \
                     FROM pg_namespace WHERE nspname = $1",
                )
                .bind::<Text, _>(schema),
                &mut *conn,
            )
            .await?;
            match usage.first() {
                None => return Err(ListenError::NoSuchTable(table.clone())),
                Some(SchemaUsage { usage: false }) => {
                    return Err(ListenError::InsufficientPrivilege {
                        role: rights.role,
                        needs: format!(
                            "USAGE on schema {} (to find table {table})",
                            quote_ident(schema)
                        ),
                    })
                }
                Some(_) => {}
            }
        }
        let query = diesel::sql_query(query)
            .bind::<Text, _>(table_sql(table)?)
            .bind::<Text, _>(TRIGGER_NAME)
            .bind::<Text, _>(channel)
            .bind::<Text, _>(FUNCTION_NAME);
        let check: TriggerCheck = diesel_async::RunQueryDsl::get_result(query, &mut *conn).await?;
        if !check.exists {
            return Err(ListenError::NoSuchTable(table.clone()));
        }
        let Some(source) = check.source else {
            return Err(ListenError::MissingTrigger {
                table: table.clone(),
                channel: channel.to_owned(),
            });
        };
        if !same_text(&source, FUNCTION_BODY) {
            return Err(ListenError::OutdatedFunction {
                table: table.clone(),
                function: check.function.unwrap_or_else(|| FUNCTION_NAME.to_owned()),
            });
        }
    }
    Ok(())
}

/// Equal but for whitespace (a migration file saved with other line endings or indentation).
fn same_text(a: &str, b: &str) -> bool {
    a.split_whitespace().eq(b.split_whitespace())
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
            Served::Lost(why) => lost("postgres", &cache, &shared, &why),
        }
        drop(conn);
        let reconnected = reconnect(
            "postgres",
            &cache,
            &shared,
            listener.backoff,
            &mut stop,
            || listener.connect(&cache, &shared),
        );
        match reconnected.await {
            Some(session) => conn = session,
            None => return,
        }
    }
}

/// What a batch of notifications asks for.
#[derive(Default)]
struct Batch {
    tables: BTreeSet<String>,
    /// A payload that is not a table name (another notifier on the channel, or a trigger of
    /// another version): every watched table is invalidated, since which one changed is unknown.
    unreadable: bool,
}

impl Batch {
    fn add(&mut self, payload: String, shared: &Shared) {
        match table_parts(&payload) {
            Ok(_) => {
                self.tables.insert(payload);
            }
            Err(reason) => {
                if !shared.warned_payload.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        payload = %payload,
                        reason,
                        "memclone listener: a notification on its channel is not a table name; \
                         invalidating every watched table (said once)"
                    );
                }
                self.unreadable = true;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.tables.is_empty() && !self.unreadable
    }

    async fn invalidate(&mut self, cache: &Cache, watched: &[String]) {
        if std::mem::take(&mut self.unreadable) {
            self.tables.extend(watched.iter().cloned());
        }
        invalidate_all(cache, &self.tables).await;
        self.tables.clear();
    }
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
        let mut batch = Batch::default();
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
                            batch.add(n.payload, shared);
                        }
                    }
                    // What arrived before the loss is invalidated first: a reconnect may take
                    // long, and tables outside the watched list are not invalidated by it.
                    Some(Err(e)) => {
                        batch.invalidate(cache, &listener.tables).await;
                        return Served::Lost(e.to_string());
                    }
                    None => {
                        batch.invalidate(cache, &listener.tables).await;
                        return Served::Lost("notification stream ended".into());
                    }
                }
                // Whatever else has arrived: one invalidation per table.
                next = stream.next().now_or_never();
            }
        }
        if batch.is_empty() {
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
        batch.invalidate(cache, &listener.tables).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(name: &str) -> Vec<String> {
        table_parts(name).unwrap()
    }

    #[test]
    fn names() {
        assert_eq!(parts("users"), ["users"]);
        assert_eq!(parts("App.Ledger"), ["app", "ledger"]);
        assert_eq!(parts(" app . ledger "), ["app", "ledger"]);
        assert_eq!(parts(r#""App"."Le""dger""#), ["App", "Le\"dger"]);
        assert_eq!(parts("tbl$1"), ["tbl$1"]);
        assert_eq!(table_sql("app.ledger").unwrap(), r#""app"."ledger""#);
        assert_eq!(table_sql(r#""odd""name""#).unwrap(), r#""odd""name""#);
        for bad in [
            "",
            "  ",
            "a.",
            ".a",
            "a..b",
            "a.b.c",
            "my table",
            "\"open",
            "\"\"",
            "a\"b\"",
            "1abc",
            "a-b",
            "a;drop table x",
        ] {
            assert!(table_parts(bad).is_err(), "{bad:?} accepted");
            assert!(
                matches!(
                    install_sql("c", &[bad]),
                    Err(ListenError::InvalidTable { .. })
                ),
                "{bad:?}"
            );
        }
        let long = "x".repeat(64);
        assert!(table_parts(&long).is_err());
        assert!(table_parts(&"x".repeat(63)).is_ok());
        assert!(table_parts(&format!("\"{long}\"")).is_err());
    }

    #[allow(missing_docs)]
    mod schema {
        diesel::table! {
            app.ledger (id) {
                id -> Integer,
            }
        }
        diesel::table! {
            #[sql_name = "Ledger"]
            app.upper (id) {
                id -> Integer,
            }
        }
        diesel::table! {
            #[sql_name = "a b\"c"]
            odd (id) {
                id -> Integer,
            }
        }
    }

    /// `listen::tables` names a model's table as SQL does, schema and case included, and
    /// `install_sql` reads that name back.
    #[test]
    fn model_table_sql() {
        let names = [
            crate::key::table_sql(&schema::ledger::table),
            crate::key::table_sql(&schema::upper::table),
            crate::key::table_sql(&schema::odd::table),
        ];
        assert_eq!(names, ["app.ledger", r#"app."Ledger""#, r#""a b""c""#]);
        assert_eq!(parts(&names[1]), ["app", "Ledger"]);
        assert_eq!(parts(&names[2]), ["a b\"c"]);
    }

    /// Payloads as `quote_ident(schema) || '.' || quote_ident(table)` writes them (checked
    /// against the server in tests/listen.rs).
    #[test]
    fn payloads() {
        assert_eq!(parts("public.users"), ["public", "users"]);
        assert_eq!(parts(r#"public."Ledger""#), ["public", "Ledger"]);
        assert_eq!(
            parts(r#""My.Schema"."We.ird""Name""#),
            ["My.Schema", "We.ird\"Name"]
        );
        assert_eq!(parts(r#"app."user""#), ["app", "user"]);
        assert_eq!(parts(r#"app."a b""#), ["app", "a b"]);
    }

    #[test]
    fn channels() {
        assert!(check_channel("memclone").is_ok());
        assert!(check_channel("_a1").is_ok());
        assert!(check_channel(&"c".repeat(63)).is_ok());
        for bad in ["", "Memclone", "a b", "1a", "a-b", "a\"b", "é"] {
            assert!(
                matches!(check_channel(bad), Err(ListenError::InvalidChannel { .. })),
                "{bad:?}"
            );
            assert!(install_sql(bad, &["t"]).is_err(), "{bad:?}");
        }
        assert!(check_channel(&"c".repeat(64)).is_err());
    }

    #[test]
    fn sql() {
        let up = install_sql("memclone", &["users", "app.ledger"]).unwrap();
        assert!(up.contains("CREATE OR REPLACE FUNCTION memclone_notify()"));
        assert!(up.contains(
            "AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON \"app\".\"ledger\"\n  FOR EACH STATEMENT EXECUTE FUNCTION memclone_notify('memclone');"
        ));
        let down = uninstall_sql(&["users"]).unwrap();
        assert!(down.contains("DROP TRIGGER IF EXISTS memclone_invalidate ON \"users\";"));
        assert!(same_text(
            "\r\nBEGIN\r\n\tPERFORM pg_notify(TG_ARGV[0], quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME));\r\n RETURN NULL;\r\nEND\r\n",
            FUNCTION_BODY
        ));
    }
}

//! The PostgreSQL side: the SQL of the triggers, the start-up checks, and the task that
//! `LISTEN`s and turns notifications into invalidations.

use super::{
    lost, reconnect, stopped, ListenError, ListenHandle, Served, Shared, APPLICATION_NAME,
    DEFAULT_CHANNEL,
};
use crate::Cache;
use diesel::sql_types::{Bool, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::{FutureExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
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

/// What the names of the trigger functions [`RowTriggers`] installs start with: each is
/// `memclone_notify_rows_` and a hash of its key columns' names (tables keyed by the same
/// columns share one), in the first schema of the migration's `search_path`.
pub const ROWS_FUNCTION_NAME: &str = "memclone_notify_rows";

/// The row-level triggers [`RowTriggers`] creates on each table, one per kind of statement (a
/// trigger with transition tables fires for one event only): name, event, transition tables.
const ROW_TRIGGERS: [(&str, &str, &str); 4] = [
    (
        "memclone_invalidate_insert",
        "INSERT",
        "REFERENCING NEW TABLE AS memclone_new ",
    ),
    (
        "memclone_invalidate_update",
        "UPDATE",
        "REFERENCING OLD TABLE AS memclone_old NEW TABLE AS memclone_new ",
    ),
    (
        "memclone_invalidate_delete",
        "DELETE",
        "REFERENCING OLD TABLE AS memclone_old ",
    ),
    ("memclone_invalidate_truncate", "TRUNCATE", ""),
];

/// The name of the row-level trigger function for these key columns.
fn rows_function_name<S: AsRef<str>>(columns: &[S]) -> String {
    let joined: Vec<&str> = columns.iter().map(AsRef::as_ref).collect();
    let hash = crate::key::hash64(&joined.join("\0"));
    format!("{ROWS_FUNCTION_NAME}_{hash:016x}")
}

/// The body of a row-level trigger function, for these key columns. Its arguments: the channel,
/// the most rows a notification names, and the key columns (for the listener's check: the body
/// names them itself, so that its queries are planned once per session, not on every statement).
///
/// Its payload is the table as [`FUNCTION_BODY`] sends it, followed, when the statement changed
/// at most that many rows, every key column is of a type whose text is the key's `Debug` in Rust
/// (`int2`, `int4`, `int8`, `bool`, `uuid`: sent bare; `text`, `varchar`: double-quoted, `""` for
/// a quote), no key value is NULL and the payload stays under PostgreSQL's 8,000 bytes, by one
/// line per changed row (old and new keys for an `UPDATE`), its key's values separated by commas:
/// what [`row_keys`] reads back. Otherwise (and on `TRUNCATE`) the table alone. A statement that
/// changed no row sends nothing. The types are checked on each row (`pg_typeof`), so that a
/// column of another type, or one whose type changed since, sends the table rather than a key
/// in the wrong form.
fn rows_function_body<S: AsRef<str>>(columns: &[S]) -> String {
    let key: Vec<String> = columns
        .iter()
        .map(|column| {
            let c = quote_ident(column.as_ref());
            format!(
                "CASE WHEN pg_typeof({c}) IN ('int2'::regtype, 'int4', 'int8', 'bool', 'uuid') \
                 THEN {c}::text WHEN pg_typeof({c}) IN ('text'::regtype, 'varchar') \
                 THEN '\"' || replace({c}::text, '\"', '\"\"') || '\"' END"
            )
        })
        .collect();
    let key = key.join(" || ',' || ");
    format!(
        r#"
DECLARE
  tbl text := quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME);
  max_rows int := TG_ARGV[1]::int;
  n int;
  keys text;
  nulls bool;
BEGIN
  IF TG_OP = 'INSERT' THEN
    SELECT count(*) INTO n FROM (SELECT FROM memclone_new LIMIT max_rows + 1) s;
    IF n BETWEEN 1 AND max_rows THEN
      SELECT bool_or(k IS NULL), string_agg(k, E'\n') INTO nulls, keys
        FROM (SELECT DISTINCT {key} AS k FROM memclone_new) s;
    END IF;
  ELSIF TG_OP = 'UPDATE' THEN
    SELECT count(*) INTO n FROM (SELECT FROM memclone_old LIMIT max_rows + 1) s;
    IF n BETWEEN 1 AND max_rows THEN
      SELECT bool_or(k IS NULL), string_agg(k, E'\n') INTO nulls, keys
        FROM (SELECT {key} AS k FROM memclone_old UNION SELECT {key} FROM memclone_new) s;
    END IF;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT count(*) INTO n FROM (SELECT FROM memclone_old LIMIT max_rows + 1) s;
    IF n BETWEEN 1 AND max_rows THEN
      SELECT bool_or(k IS NULL), string_agg(k, E'\n') INTO nulls, keys
        FROM (SELECT DISTINCT {key} AS k FROM memclone_old) s;
    END IF;
  ELSE
    n := -1;
  END IF;
  IF n = 0 THEN
    RETURN NULL;
  END IF;
  IF keys IS NOT NULL AND NOT nulls AND octet_length(tbl) + 1 + octet_length(keys) < 8000 THEN
    PERFORM pg_notify(TG_ARGV[0], tbl || E'\n' || keys);
  ELSE
    PERFORM pg_notify(TG_ARGV[0], tbl);
  END IF;
  RETURN NULL;
END
"#
    )
}

/// The most rows a row-level notification names unless told otherwise
/// ([`RowTriggers::max_rows`]).
pub const DEFAULT_MAX_ROWS: u32 = 100;

/// The most rows of one table that one batch of notifications evicts one by one; past it, the
/// whole table.
const MAX_BATCH_ROWS: usize = 1000;

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
    sql.push_str(&drop_unused(FUNCTION_NAME));
    Ok(sql)
}

/// Row-level triggers for `channel`: give them tables and their key columns, or models, then
/// take their [`install_sql`](RowTriggers::install_sql) for a migration's `up.sql` and
/// [`uninstall_sql`](RowTriggers::uninstall_sql) for its `down.sql`.
///
/// Where [`install_sql`]'s triggers make the listener evict every cached row of a written table,
/// these name the changed rows' primary keys, and the listener bumps exactly what a memclone
/// write whose rows are known bumps: the table's queries and those rows' entity entries; the
/// table's other cached rows stay. A statement that changes more than
/// [`max_rows`](RowTriggers::max_rows) rows, a `TRUNCATE`, a key of another type than those
/// listed at `rows_function_body` (integers, `bool`, `uuid`, `text`, `varchar`), or a payload
/// that would pass PostgreSQL's 8,000 bytes, is notified as the table alone, as
/// [`install_sql`]'s triggers notify it.
///
/// ```
/// # fn main() -> Result<(), diesel_memclone::listen::ListenError> {
/// let up = diesel_memclone::listen::row_triggers("memclone")
///     .table("users", &["id"])
///     .table("app.memberships", &["org_id", "user_id"])
///     .install_sql()?;
/// // The channel, the row limit and the key columns, as the trigger function's arguments.
/// assert!(up.contains("('memclone', '100', 'org_id', 'user_id')"));
/// // A misspelt column fails the migration, not every later write.
/// assert!(up.contains(r#"SELECT "org_id", "user_id" FROM "app"."memberships" LIMIT 0;"#));
/// # Ok(()) }
/// ```
///
/// [`models`](RowTriggers::models) takes the tables and key columns of `MemClone` models.
#[derive(Debug, Clone)]
#[must_use = "the triggers' SQL comes from `install_sql`"]
pub struct RowTriggers {
    channel: String,
    tables: Vec<(String, Vec<String>)>,
    max_rows: u32,
}

/// Row-level triggers notifying `channel`: see [`RowTriggers`].
pub fn row_triggers(channel: &str) -> RowTriggers {
    RowTriggers {
        channel: channel.to_owned(),
        tables: Vec::new(),
        max_rows: DEFAULT_MAX_ROWS,
    }
}

impl RowTriggers {
    /// Adds a table (named as for [`install_sql`]) and its primary key's columns, in the order
    /// of the model's `PrimaryKey` tuple, each spelled as the catalog spells it (Diesel's
    /// `Column::NAME`: case kept, no quotes). The keys the triggers send are built from these
    /// columns: they must be the columns of the key memclone caches the table's rows by. No
    /// column: the table alone is notified.
    pub fn table<S: AsRef<str>>(mut self, table: &str, key_columns: &[S]) -> Self {
        let columns = key_columns.iter().map(|c| c.as_ref().to_owned()).collect();
        self.tables.push((table.to_owned(), columns));
        self
    }

    /// Adds the tables of `MemClone` models (a tuple of up to 12: `(User,)` for one), each with its
    /// primary key's columns: `.models::<(User, Post)>()`.
    pub fn models<M: super::Models>(mut self) -> Self {
        let mut keyed = Vec::new();
        M::keyed_tables(&mut keyed);
        for (table, columns) in keyed {
            self = self.table(table, columns);
        }
        self
    }

    /// The most rows one notification names (default [`DEFAULT_MAX_ROWS`]); a statement that
    /// changes more is notified as the table alone. At most 4,000 (more keys could never fit
    /// in a notification's 8,000 bytes; a larger value is taken as 4,000, which also keeps the
    /// trigger's `int` arithmetic from overflowing).
    pub fn max_rows(mut self, max_rows: u32) -> Self {
        self.max_rows = max_rows.min(4_000);
        self
    }

    /// The SQL that installs the triggers, for a migration's `up.sql`: one trigger function per
    /// set of key columns, `memclone_notify_rows_<hash of the columns>` (created or replaced,
    /// in the first schema of the `search_path`), and on each table four statement-level
    /// triggers, `memclone_invalidate_insert`, `_update`, `_delete` (with transition tables)
    /// and `_truncate`, replacing the table's [`install_sql`] trigger if it has one; then a
    /// `SELECT` of the key columns that fails the migration if one is misspelt. A table given
    /// no key columns gets [`install_sql`]'s table-level trigger.
    ///
    /// Cost: on each write statement, a query over the transition table that checks each
    /// row's key type (`pg_typeof`) and renders its keys, then one `pg_notify`, sent at commit. The
    /// transition tables keep the changed rows until the statement ends. Unlike
    /// [`install_sql`]'s, a transaction that writes many rows one statement at a time sends one
    /// notification per statement (PostgreSQL folds only identical payloads).
    ///
    /// # Errors
    ///
    /// As [`install_sql`], and [`ListenError::InvalidColumn`] for a key column that is empty,
    /// longer than 63 bytes or holds a NUL.
    pub fn install_sql(&self) -> Result<String, ListenError> {
        check_channel(&self.channel)?;
        let mut sql = String::from(
            "-- diesel-memclone: invalidate the cache's changed rows on every committed write \
             (issue 12).\n",
        );
        let mut functions = BTreeSet::new();
        let mut table_level = Vec::new();
        for (table, columns) in &self.tables {
            let name = table_sql(table)?;
            if columns.is_empty() {
                // No key to send: the table-level trigger.
                table_level.push(table.as_str());
                for (trigger, _, _) in ROW_TRIGGERS {
                    sql.push_str(&format!("DROP TRIGGER IF EXISTS {trigger} ON {name};\n"));
                }
                continue;
            }
            let mut args = vec![
                quote_literal(&self.channel),
                quote_literal(&self.max_rows.to_string()),
            ];
            for column in columns {
                check_column(table, column)?;
                args.push(quote_literal(column));
            }
            let args = args.join(", ");
            let function = rows_function_name(columns);
            if functions.insert(function.clone()) {
                sql.push_str(&format!(
                    "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql \
                     AS $memclone${}$memclone$;\n",
                    rows_function_body(columns)
                ));
            }
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {name};\n"
            ));
            for (trigger, event, transition) in ROW_TRIGGERS {
                sql.push_str(&format!(
                    "DROP TRIGGER IF EXISTS {trigger} ON {name};\n\
                     CREATE TRIGGER {trigger} AFTER {event} ON {name}\n  \
                       {transition}FOR EACH STATEMENT EXECUTE FUNCTION {function}({args});\n"
                ));
            }
            // PL/pgSQL resolves the key columns only when the trigger first runs: a misspelt one
            // would fail every later write to the table. This fails the migration instead.
            let selected: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
            sql.push_str(&format!(
                "SELECT {} FROM {name} LIMIT 0;\n",
                selected.join(", ")
            ));
        }
        if !table_level.is_empty() {
            sql.push_str(&install_sql(&self.channel, &table_level)?);
        }
        Ok(sql)
    }

    /// The SQL that removes what [`install_sql`](RowTriggers::install_sql) installed, for a
    /// migration's `down.sql`: each table's triggers, then each trigger function that no
    /// trigger uses any more.
    ///
    /// # Errors
    ///
    /// [`ListenError::InvalidTable`], as for [`install_sql`].
    pub fn uninstall_sql(&self) -> Result<String, ListenError> {
        let mut sql = String::new();
        let mut functions = BTreeSet::new();
        let mut table_level = Vec::new();
        for (table, columns) in &self.tables {
            let name = table_sql(table)?;
            match columns.is_empty() {
                true => table_level.push(table.as_str()),
                false => {
                    functions.insert(rows_function_name(columns));
                }
            }
            for (trigger, _, _) in ROW_TRIGGERS {
                sql.push_str(&format!("DROP TRIGGER IF EXISTS {trigger} ON {name};\n"));
            }
        }
        for function in functions {
            sql.push_str(&drop_unused(&function));
        }
        if !table_level.is_empty() {
            sql.push_str(&uninstall_sql(&table_level)?);
        }
        Ok(sql)
    }
}

/// Drops the trigger function `function` unless a trigger still uses it.
fn drop_unused(function: &str) -> String {
    format!(
        "DO $memclone$ BEGIN\n  \
           IF to_regprocedure('{function}()') IS NOT NULL AND NOT EXISTS (\n    \
             SELECT 1 FROM pg_trigger WHERE tgfoid = to_regprocedure('{function}()')) THEN\n    \
             DROP FUNCTION {function}();\n  \
           END IF;\n\
         END $memclone$;\n"
    )
}

/// A key column's name, as the triggers' arguments carry it.
fn check_column(table: &str, column: &str) -> Result<(), ListenError> {
    let reason = if column.is_empty() {
        "is empty"
    } else if column.len() > MAX_IDENTIFIER_BYTES {
        "is longer than 63 bytes (PostgreSQL would cut it)"
    } else if column.contains('\0') {
        "holds a NUL"
    } else if column.contains('$') {
        // The trigger function's body is dollar-quoted: a `$` could end it early.
        "holds a `$`"
    } else {
        return Ok(());
    };
    Err(ListenError::InvalidColumn {
        table: table.to_owned(),
        column: column.to_owned(),
        reason,
    })
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
struct TableExists {
    #[diesel(sql_type = Bool)]
    exists: bool,
}

#[derive(diesel::QueryableByName)]
struct TriggerCheck {
    /// `tgtype`'s low bits: 1 row, 2 before, 4 insert, 8 delete, 16 update, 32 truncate, 64
    /// instead.
    #[diesel(sql_type = Integer)]
    kind: i32,
    /// The function's name, arguments and body.
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    args: Vec<u8>,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Text)]
    function: String,
}

/// The events of `tgtype` a watched table's triggers must cover: insert, delete, update,
/// truncate.
const EVENTS: i32 = 4 | 8 | 16 | 32;

/// Every watched table exists and has enabled memclone triggers, table-level
/// ([`install_sql`]'s) or row-level ([`RowTriggers`]'), that fire after each statement of the
/// four kinds, notify `channel`, and call this version's functions; the role can read what that
/// takes.
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
    // memclone's triggers on the table whose first argument is the channel.
    let query = "SELECT (t.tgtype & 127)::int AS kind, p.proname::text AS name, \
                 t.tgargs AS args, p.prosrc AS source, p.oid::regproc::text AS function \
                 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
                 WHERE t.tgrelid = to_regclass($1) AND t.tgenabled <> 'D' \
                   AND (t.tgname = $2 OR t.tgname LIKE $2 || '\\_%') AND t.tgnargs >= 1 \
                   AND substring(t.tgargs FROM 1 FOR octet_length(convert_to($3, 'UTF8')) + 1) \
                     = convert_to($3, 'UTF8') || '\\x00'::bytea \
                   AND (p.proname = $4 OR p.proname LIKE $5 || '\\_%')";
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
        let exists: TableExists = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query("SELECT to_regclass($1) IS NOT NULL AS exists")
                .bind::<Text, _>(table_sql(table)?),
            &mut *conn,
        )
        .await?;
        if !exists.exists {
            return Err(ListenError::NoSuchTable(table.clone()));
        }
        let query = diesel::sql_query(query)
            .bind::<Text, _>(table_sql(table)?)
            .bind::<Text, _>(TRIGGER_NAME)
            .bind::<Text, _>(channel)
            .bind::<Text, _>(FUNCTION_NAME)
            .bind::<Text, _>(ROWS_FUNCTION_NAME);
        let triggers: Vec<TriggerCheck> =
            diesel_async::RunQueryDsl::load(query, &mut *conn).await?;
        let mut covered = 0;
        let mut outdated = None;
        // After each statement: neither per row, nor before, nor instead of.
        for trigger in triggers.iter().filter(|t| t.kind & (1 | 2 | 64) == 0) {
            let fresh = match trigger.name.as_str() {
                FUNCTION_NAME => same_text(&trigger.source, FUNCTION_BODY),
                // channel, max rows, key columns: the body and name those columns give.
                name => {
                    let args: Vec<String> = trigger
                        .args
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    let columns = args
                        .get(2..args.len().saturating_sub(1))
                        .unwrap_or_default();
                    !columns.is_empty()
                        && name == rows_function_name(columns)
                        && same_text(&trigger.source, &rows_function_body(columns))
                }
            };
            if fresh {
                covered |= trigger.kind & EVENTS;
            } else {
                outdated = Some(trigger.function.clone());
            }
        }
        if covered != EVENTS {
            return Err(match outdated {
                Some(function) => ListenError::OutdatedFunction {
                    table: table.clone(),
                    function,
                },
                None => ListenError::MissingTrigger {
                    table: table.clone(),
                    channel: channel.to_owned(),
                },
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
    /// Each notified table (as its payload names it): the rows to evict, or `None` for every
    /// row of the table.
    tables: BTreeMap<String, Option<BTreeSet<String>>>,
    /// A payload that is not a table name (another notifier on the channel, or a trigger of
    /// another version): every watched table is invalidated, since which one changed is unknown.
    unreadable: bool,
}

impl Batch {
    fn add(&mut self, payload: String, shared: &Shared) {
        let (table, rows) = split_payload(&payload);
        if let Err(reason) = table_parts(table) {
            if !shared.warned_payload.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    payload = %payload,
                    reason,
                    "memclone listener: a notification on its channel is not a table name; \
                     invalidating every watched table (said once)"
                );
            }
            self.unreadable = true;
            return;
        }
        let rows = match rows.map(row_keys) {
            None => None,
            Some(Ok(rows)) => Some(rows),
            Some(Err(reason)) => {
                if !shared.warned_payload.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        payload = %payload,
                        reason,
                        "memclone listener: a notification's rows cannot be read; invalidating \
                         its whole table (said once)"
                    );
                }
                None
            }
        };
        let entry = self
            .tables
            .entry(table.to_owned())
            .or_insert_with(|| Some(BTreeSet::new()));
        match (entry.as_mut(), rows) {
            (Some(known), Some(rows)) => {
                known.extend(rows);
                if known.len() > MAX_BATCH_ROWS {
                    *entry = None;
                }
            }
            (_, None) => *entry = None,
            (None, Some(_)) => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.tables.is_empty() && !self.unreadable
    }

    /// The bumps of a memclone write: for a table whose rows are known, its queries and those
    /// rows' entity entries; for any other, every query and entity entry of the table.
    async fn invalidate(&mut self, cache: &Cache, watched: &[String]) {
        if std::mem::take(&mut self.unreadable) {
            for table in watched {
                self.tables.insert(table.clone(), None);
            }
        }
        for (table, rows) in std::mem::take(&mut self.tables) {
            match rows {
                Some(rows) => {
                    let rows: Vec<String> = rows.into_iter().collect();
                    cache.invalidate_rows(&table, &rows).await;
                }
                None => cache.invalidate_table(&table).await,
            }
        }
    }
}

/// A payload's table, and its rows' part when it has one (after the first line break outside
/// double quotes: a table's name, as `quote_ident` writes it, has none).
fn split_payload(payload: &str) -> (&str, Option<&str>) {
    let mut quoted = false;
    for (i, c) in payload.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '\n' if !quoted => return (&payload[..i], Some(&payload[i + 1..])),
            _ => {}
        }
    }
    (payload, None)
}

/// The rows' part of a row-level payload (see `rows_function_body`): one key per line, its
/// values separated by commas, each as [`RowKey`](crate::RowKey) renders the key (the key's
/// `Debug`): a bare value as it is (an integer, `true`/`false`, a lower-case UUID), a quoted
/// one (a string) as Rust's `Debug` quotes it, several as a tuple's `Debug` does (`(1, "a")`).
fn row_keys(rows: &str) -> Result<Vec<String>, &'static str> {
    let mut keys = Vec::new();
    let mut chars = rows.chars().peekable();
    let mut values = Vec::new();
    loop {
        let value = if chars.next_if_eq(&'"').is_some() {
            let mut text = String::new();
            loop {
                match chars.next() {
                    None => return Err("has an unterminated quoted value"),
                    Some('"') if chars.next_if_eq(&'"').is_some() => text.push('"'),
                    Some('"') => break,
                    Some(c) => text.push(c),
                }
            }
            format!("{text:?}")
        } else {
            let mut bare = String::new();
            while let Some(c) = chars.next_if(|c| *c != ',' && *c != '\n') {
                bare.push(c);
            }
            if !is_bare_key(&bare) {
                return Err("has a bare value that is not an integer, a boolean or a UUID");
            }
            bare
        };
        values.push(value);
        match chars.next() {
            Some(',') => continue,
            end @ (Some('\n') | None) => {
                keys.push(match values.len() {
                    1 => values.pop().unwrap_or_default(),
                    _ => format!("({})", values.join(", ")),
                });
                values.clear();
                if end.is_none() {
                    return Ok(keys);
                }
            }
            Some(_) => return Err("has characters after a quoted value"),
        }
    }
}

/// A value whose text is its `Debug` in Rust: an integer, a boolean, a UUID as PostgreSQL
/// writes it (lower case, hyphenated).
fn is_bare_key(value: &str) -> bool {
    let digits = value.strip_prefix('-').unwrap_or(value);
    let integer = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    let uuid = value.len() == 36
        && value.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        });
    integer || uuid || value == "true" || value == "false"
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

    /// Row-level payloads read back to the keys `RowKey` renders for the same values.
    #[test]
    fn row_payloads() {
        use crate::RowKey;
        let pk = |payload: &str| {
            let (table, rows) = split_payload(payload);
            (table.to_owned(), rows.map(row_keys))
        };
        assert_eq!(pk("public.users"), ("public.users".to_owned(), None));
        let (table, rows) = pk("public.users\n1\n-20");
        assert_eq!(table, "public.users");
        assert_eq!(
            rows.unwrap().unwrap(),
            [
                RowKey::new("users", 1).primary_key,
                RowKey::new("users", -20_i64).primary_key
            ]
        );
        // A table whose quoted name holds a line break, a quote and a comma.
        let odd = "a\"b,c\nd\\e\té";
        let payload = format!(
            "app.\"x\ny\"\"\"\n\"{}\",7\n\"\",0\ntrue\n67e55044-10b1-426f-9247-bb680e5fe0c8",
            odd.replace('"', "\"\"")
        );
        let (table, rows) = pk(&payload);
        assert_eq!(table, "app.\"x\ny\"\"\"");
        assert_eq!(parts(&table), ["app", "x\ny\""]);
        assert_eq!(
            rows.unwrap().unwrap(),
            [
                RowKey::new("t", (odd.to_owned(), 7)).primary_key,
                RowKey::new("t", (String::new(), 0)).primary_key,
                RowKey::new("t", true).primary_key,
                "67e55044-10b1-426f-9247-bb680e5fe0c8".to_owned(),
            ]
        );
        for bad in [
            "",
            "\"open",
            "\"a\"b",
            "1.5",
            "x",
            "1,",
            "1\n",
            "NULL",
            "67E55044-10B1-426F-9247-BB680E5FE0C8",
            "--1",
            "-",
        ] {
            assert!(row_keys(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn row_sql() {
        let up = row_triggers("memclone")
            .table("app.ledger", &["id"])
            .table("pairs", &["a", "B"])
            .table("plain", &[] as &[&str])
            .table("more", &["id"])
            .max_rows(7)
            .install_sql()
            .unwrap();
        let id_function = rows_function_name(&["id"]);
        assert_eq!(up.matches("CREATE OR REPLACE FUNCTION").count(), 3, "{up}");
        assert!(up.contains(&format!(
            "CREATE TRIGGER memclone_invalidate_update AFTER UPDATE ON \"app\".\"ledger\"\n  \
             REFERENCING OLD TABLE AS memclone_old NEW TABLE AS memclone_new FOR EACH STATEMENT \
             EXECUTE FUNCTION {id_function}('memclone', '7', 'id');"
        )));
        assert!(up.contains("('memclone', '7', 'a', 'B');"));
        assert!(up.contains("\"B\"::text"));
        // A table without key columns gets the table-level trigger.
        assert!(up.contains("AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON \"plain\""));
        assert_ne!(rows_function_name(&["a", "b"]), rows_function_name(&["ab"]));
        assert!(rows_function_name(&["x".repeat(63)]).len() <= MAX_IDENTIFIER_BYTES);
        let down = row_triggers("memclone")
            .table("app.ledger", &["id"])
            .uninstall_sql()
            .unwrap();
        assert!(down.contains(
            "DROP TRIGGER IF EXISTS memclone_invalidate_truncate ON \"app\".\"ledger\";"
        ));
        assert!(down.contains(&format!("DROP FUNCTION {id_function}();")));
        for bad in ["", "a\0b"] {
            assert!(matches!(
                row_triggers("memclone").table("t", &[bad]).install_sql(),
                Err(ListenError::InvalidColumn { .. })
            ));
        }
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

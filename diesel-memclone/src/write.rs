//! Invalidating writes: `insert_into`, `update`, `delete`, `replace_into` and any statement
//! through [`write()`], shaped like Diesel's own builders.

use crate::cache::{cache, Cache, Invalidated, PendingWrite, RowsThrough};
use crate::error::{Error, Result};
use crate::key::{self, Verb, WrittenStatement};
use crate::model::{CacheValue, RowKey};
use crate::transaction::{write_timing, WriteTiming};
use diesel::backend::Backend;
use diesel::query_builder::{
    AsChangeset, IncompleteInsertStatement, InsertStatement, IntoUpdateTarget, QueryFragment,
    QueryId, UpdateStatement,
};
use diesel::query_dsl::methods::FilterDsl;
use diesel::query_source::QuerySource;
use diesel::{Insertable, Table};
use diesel_async::methods::{ExecuteDsl, LoadQuery};
use diesel_async::{AsyncConnection, RunQueryDsl};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

/// A Diesel write statement that invalidates the cache once it has committed.
///
/// Build it with [`insert_into`], [`update`], [`delete`], [`replace_into`] or [`write()`], run it
/// with [`execute`](Write::execute), [`get_result`](Write::get_result) or
/// [`get_results`](Write::get_results). Any builder method without a forwarder here is reached
/// through [`map`](Write::map), for example an upsert:
/// `memclone::insert_into(users).values(&u).map(|s| s.on_conflict(id).do_update().set(&u))`.
///
/// ```
/// # use diesel::prelude::*;
/// # use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
/// # use diesel_memclone::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
/// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
/// # #[diesel(table_name = users)]
/// # struct User { id: i32, name: String, status: String }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> diesel_memclone::Result<()> {
/// # let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
/// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
/// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
/// use diesel_memclone as memclone;
///
/// let cached = || users::table.filter(users::status.eq("active")).cached("active");
/// assert_eq!(cached().count(&mut conn).await?, 1);
///
/// // The update runs, then invalidates every cached query of `users` and the rows' entries.
/// memclone::update(users::table.find(2))
///     .set(users::status.eq("active"))
///     .execute(&mut conn)
///     .await?;
/// assert_eq!(cached().count(&mut conn).await?, 2);
///
/// memclone::insert_into(users::table)
///     .values(&User { id: 3, name: "Cy".into(), status: "active".into() })
///     .execute(&mut conn)
///     .await?;
/// memclone::delete(users::table.find(1)).execute(&mut conn).await?;
/// assert_eq!(cached().count(&mut conn).await?, 2);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a write does nothing until executed"]
pub struct Write<S> {
    statement: S,
    /// The written table, from Diesel's table type when the builder knows it.
    table: Option<&'static str>,
    cache: Option<Cache>,
    uncache: Vec<String>,
    cache_result: Option<CacheResult>,
    also: Vec<String>,
}

/// Computes a returned row's key (`None` for a row of another type).
type KeyOfRow = dyn Fn(&dyn Any) -> Option<String> + Send + Sync;

/// Where and for how long a write's returned rows are cached.
#[derive(Clone)]
struct CacheResult {
    ttl: Duration,
    key: Arc<KeyOfRow>,
}

impl std::fmt::Debug for CacheResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheResult")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// `INSERT INTO target`, like [`diesel::insert_into`].
pub fn insert_into<T>(target: T) -> Write<IncompleteInsertStatement<T>>
where
    T: Table + 'static,
    T::FromClause: QueryFragment<diesel::pg::Pg>,
{
    Write {
        table: Some(crate::key::table_name(&target)),
        ..write(diesel::insert_into(target))
    }
}

/// `REPLACE INTO target` (MySQL, SQLite), like [`diesel::replace_into`].
pub fn replace_into<T>(
    target: T,
) -> Write<IncompleteInsertStatement<T, diesel::query_builder::Replace>>
where
    T: Table + 'static,
    T::FromClause: QueryFragment<diesel::pg::Pg>,
{
    Write {
        table: Some(crate::key::table_name(&target)),
        ..write(diesel::replace_into(target))
    }
}

/// `UPDATE target`, like [`diesel::update`].
pub fn update<T>(target: T) -> Write<UpdateStatement<T::Table, T::WhereClause>>
where
    T: IntoUpdateTarget,
    T::Table: 'static,
    <T::Table as QuerySource>::FromClause: QueryFragment<diesel::pg::Pg>,
{
    Write {
        table: Some(crate::key::table_name(&T::table())),
        ..write(diesel::update(target))
    }
}

/// `DELETE FROM target`, like [`diesel::delete`].
pub fn delete<T>(
    target: T,
) -> Write<diesel::query_builder::DeleteStatement<T::Table, T::WhereClause>>
where
    T: IntoUpdateTarget,
    T::Table: 'static,
    <T::Table as QuerySource>::FromClause: QueryFragment<diesel::pg::Pg>,
{
    Write {
        table: Some(crate::key::table_name(&T::table())),
        ..write(diesel::delete(target))
    }
}

/// Any complete write statement (an upsert, `insert_or_ignore_into`, a statement with
/// `RETURNING`, raw SQL): the table it writes is the first one its SQL names after
/// `INSERT INTO`, `REPLACE INTO`, `UPDATE` or `DELETE FROM`. Prefer [`insert_into`], [`update`]
/// and [`delete`] (with [`map`](Write::map) for the rest of the builder), which take the table
/// from Diesel's table type.
pub fn write<S>(statement: S) -> Write<S> {
    Write {
        statement,
        table: None,
        cache: None,
        uncache: Vec::new(),
        cache_result: None,
        also: Vec::new(),
    }
}

impl<T, Op> Write<IncompleteInsertStatement<T, Op>> {
    /// The rows to insert, like Diesel's `values`.
    pub fn values<U>(self, records: U) -> Write<InsertStatement<T, U::Values, Op>>
    where
        T: Table,
        U: Insertable<T>,
    {
        self.map(|s| s.values(records))
    }
}

impl<T: QuerySource, U> Write<UpdateStatement<T, U>> {
    /// The changes, like Diesel's `set`.
    pub fn set<V>(self, values: V) -> Write<UpdateStatement<T, U, V::Changeset>>
    where
        T: Table,
        V: AsChangeset<Target = T>,
        UpdateStatement<T, U, V::Changeset>: diesel::query_builder::AsQuery,
    {
        self.map(|s| s.set(values))
    }
}

impl<S> Write<S> {
    /// Adds a `WHERE` condition (update and delete), like Diesel's `filter`.
    pub fn filter<P>(self, predicate: P) -> Write<diesel::dsl::Filter<S, P>>
    where
        S: FilterDsl<P>,
    {
        self.map(|s| s.filter(predicate))
    }

    /// Uses `cache` instead of the process-wide default.
    pub fn using(mut self, cache: &Cache) -> Self {
        self.cache = Some(cache.clone());
        self
    }

    /// Also deletes these custom keys (see [`Cached::key`](crate::Cached::key)) once the write
    /// has committed, as the Prisma reference's `uncache`.
    pub fn uncache<K: Into<String>>(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.uncache.extend(keys.into_iter().map(Into::into));
        self
    }

    /// Caches each row the write returns (`get_result`/`get_results` with `RETURNING`) under
    /// the key `key(row)` for `ttl`, as the Prisma reference's `cache: { ttl, key: (result) => .. }`.
    /// Read it back with `query.cached(label).key(key).get_result::<U>()` on a query of the
    /// written table.
    ///
    /// Writing a result through is only safe when no other write to the table overlapped this
    /// one (otherwise an older row could land after a newer one). memclone checks that with the
    /// table's write sequence and, when another write did overlap or the write runs inside a
    /// transaction, caches nothing: the next read fills the key from the database.
    pub fn cache_result<U, F>(mut self, ttl: Duration, key: F) -> Self
    where
        U: CacheValue,
        F: Fn(&U) -> String + Send + Sync + 'static,
    {
        let key = move |row: &dyn Any| row.downcast_ref::<U>().map(&key);
        self.cache_result = Some(CacheResult {
            ttl,
            key: Arc::new(key),
        });
        self
    }

    /// Changes the statement with any Diesel builder method, keeping the cache.
    pub fn map<S2>(self, f: impl FnOnce(S) -> S2) -> Write<S2> {
        Write {
            statement: f(self.statement),
            table: self.table,
            cache: self.cache,
            uncache: self.uncache,
            cache_result: self.cache_result,
            also: self.also,
        }
    }

    fn prepare<C>(&self, conn: &mut C) -> Result<(WrittenStatement, WriteTiming)>
    where
        C: AsyncConnection,
        C::Backend: Default,
        <C::Backend as Backend>::QueryBuilder: Default,
        S: QueryFragment<C::Backend>,
    {
        let statement = self.analyse::<C::Backend>()?;
        Ok((statement, write_timing(conn)?))
    }

    /// What this statement writes, from its SQL in the backend `DB`.
    pub(crate) fn analyse<DB>(&self) -> Result<WrittenStatement>
    where
        DB: Backend + Default,
        DB::QueryBuilder: Default,
        S: QueryFragment<DB>,
    {
        let sql = key::Rendered::of::<DB, _>(&self.statement).map(|r| r.sql());
        let parsed = sql.as_deref().and_then(key::written_statement);
        let statement = match (self.table, parsed) {
            (Some(table), Some(mut statement)) => {
                statement.table = table.to_owned();
                statement
            }
            // Diesel renders nothing to parse (an empty changeset, which fails when run) or
            // something else than a write (an empty batch insert is `SELECT 1 .. WHERE 1=0`):
            // the table is known, so invalidate it whole and write nothing through.
            (Some(table), None) => WrittenStatement::unknown(table),
            (None, Some(mut statement)) => {
                // A raw statement may write more than its first table (`WITH .. UPDATE`, a
                // multi-table `UPDATE`): every table it names is invalidated.
                let mut named = sql.as_deref().map(key::tables_in_sql).unwrap_or_default();
                named.retain(|t| *t != statement.table);
                statement.also_named = named;
                statement
            }
            (None, None) => {
                return Err(Error::Config(format!(
                    "cannot tell which table this statement writes: {}",
                    sql.as_deref().unwrap_or("(Diesel could not build its SQL)")
                )))
            }
        };
        Ok(statement)
    }

    /// Separates the statement from the options.
    pub(crate) fn split(self) -> (S, Write<()>) {
        let options = Write {
            statement: (),
            table: self.table,
            cache: self.cache,
            uncache: self.uncache,
            cache_result: self.cache_result,
            also: self.also,
        };
        (self.statement, options)
    }

    /// Also invalidates `table` (its queries and all its rows) when this write commits: for
    /// tables a trigger or a foreign-key cascade changes, which the statement does not name.
    /// Naming the written table itself (a self-referencing cascade, a trigger that changes
    /// other rows of it) makes the write's rows unknown: every row and every scoped query of
    /// the table is invalidated, and nothing is written through.
    pub fn also_invalidates(mut self, table: &str) -> Self {
        self.also.push(key::table_from_text(table));
        self
    }

    /// Delivers an autocommit write's invalidation, or narrows a transaction's deferred one.
    ///
    /// `scopes`, the value generations of every written row's scope values (see
    /// [`Cache::value_generation_keys`]), only for an autocommit write that
    /// cannot have moved a row out of a scope; in a transaction they are dropped (its
    /// invalidation at commit moves every scoped query of its tables).
    async fn finish(
        cache: &Cache,
        tables: Vec<String>,
        written: Written<'_>,
        uncache: Vec<String>,
        timing: WriteTiming,
        deferred: Option<usize>,
    ) -> Option<Invalidated> {
        let Written {
            rows,
            scopes,
            through,
        } = written;
        match timing {
            WriteTiming::Now => {
                let invalidated = cache
                    .invalidate_scoped(&tables, rows.as_deref(), scopes.as_deref(), through)
                    .await;
                if !uncache.is_empty() {
                    cache.uncache(&uncache).await;
                }
                invalidated
            }
            WriteTiming::AfterCommit(transaction) => {
                if let (Some(index), Some(rows)) = (deferred, rows) {
                    transaction.narrow(index, rows);
                }
                None
            }
        }
    }

    /// Runs the write, like Diesel's `execute`, and invalidates every cached query of the
    /// written table and every entity entry of it (the rows are unknown).
    pub async fn execute<C>(self, conn: &mut C) -> Result<usize>
    where
        C: AsyncConnection,
        C::Backend: Default,
        <C::Backend as Backend>::QueryBuilder: Default,
        S: QueryFragment<C::Backend> + QueryId + Send + ExecuteDsl<C>,
    {
        let (statement, timing) = self.prepare(conn)?;
        let (query, options) = self.split();
        options
            .execute_with(statement, timing, || query.execute(conn))
            .await
    }

    /// Runs a write with `RETURNING`, like Diesel's `get_results`. When the rows are the
    /// written table's model, only their entity entries change (every cached query of the
    /// table is invalidated as always): they are written through with the returned rows when
    /// no other write to the table overlapped this one, and evicted otherwise.
    pub async fn get_results<'q, U, C>(self, conn: &mut C) -> Result<Vec<U>>
    where
        C: AsyncConnection,
        C::Backend: Default,
        <C::Backend as Backend>::QueryBuilder: Default,
        S: QueryFragment<C::Backend> + LoadQuery<'q, C, U> + 'q,
        U: CacheValue + Send,
    {
        let (statement, timing) = self.prepare(conn)?;
        let (query, options) = self.split();
        options
            .get_results_with(statement, timing, || query.load::<U>(conn))
            .await
    }

    /// Runs a write with `RETURNING` for one row, like Diesel's `get_result`.
    pub async fn get_result<'q, U, C>(self, conn: &mut C) -> Result<U>
    where
        C: AsyncConnection,
        C::Backend: Default,
        <C::Backend as Backend>::QueryBuilder: Default,
        S: QueryFragment<C::Backend> + LoadQuery<'q, C, U> + 'q,
        U: CacheValue + Send,
    {
        let mut rows = self.get_results::<U, C>(conn).await?;
        if rows.is_empty() {
            return Err(Error::Database(diesel::result::Error::NotFound));
        }
        Ok(rows.swap_remove(0))
    }
}

/// The written table, then the other tables a raw statement names and the ones
/// `also_invalidates` named.
impl Write<()> {
    /// Runs a statement that returns no rows (`run`), with the invalidation around it: the
    /// part of `execute` every connection type shares.
    pub(crate) async fn execute_with<F, Fut>(
        self,
        statement: WrittenStatement,
        timing: WriteTiming,
        run: F,
    ) -> Result<usize>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = diesel::QueryResult<usize>>,
    {
        let cache = self.cache.unwrap_or_else(|| cache().clone());
        let tables = written_tables(&statement, &self.also);
        let (pending, deferred) = pending(&cache, &tables, &self.uncache, &timing);
        let written = run().await;
        // Invalidate even after an error: the statement may have changed rows before failing.
        let unknown = Written::default();
        Write::<()>::finish(&cache, tables, unknown, self.uncache, timing, deferred).await;
        if let Some(pending) = pending {
            pending.done();
        }
        Ok(written?)
    }

    /// Runs a statement returning rows (`run`), with the invalidation and write-through
    /// around it: the part of `get_results` every connection type shares.
    pub(crate) async fn get_results_with<U, F, Fut>(
        self,
        statement: WrittenStatement,
        timing: WriteTiming,
        run: F,
    ) -> Result<Vec<U>>
    where
        U: CacheValue,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = diesel::QueryResult<Vec<U>>>,
    {
        let table = statement.table.clone();
        let cache = self.cache.unwrap_or_else(|| cache().clone());
        // The returned rows name exactly the rows written, except when the statement moves
        // rows to other keys (it assigns a key column) or deletes rows it does not return
        // (`REPLACE`): then every row of the table is evicted.
        // `also_invalidates` naming the written table itself says the statement changes rows
        // of it that it does not return (a self-referencing cascade, a trigger): the same.
        let moves_rows = matches!(statement.verb, Verb::Replace | Verb::Unknown)
            || self.also.contains(&table)
            || U::key_columns()
                .iter()
                .any(|c| statement.assigned.contains(&c.to_lowercase()));
        // Rows written through must exist after the write: never a delete's.
        let rows_through = model_of::<U>(&table) && !moves_rows && statement.verb != Verb::Delete;
        // Writing through (the rows' entity entries, `cache_result` keys) needs the table's
        // write sequence from before the write, and never happens inside a transaction.
        let through = matches!(timing, WriteTiming::Now)
            && ((self.cache_result.is_some() && statement.verb != Verb::Delete) || rows_through);
        // The sequence, and the entity generation the rows' entries will carry if the bump
        // stores them (in the same round trip).
        let (before, entity_generation) = match through {
            true => cache.write_sequence_and_entity_generation(&table).await,
            false => (None, None),
        };
        let tables = written_tables(&statement, &self.also);
        let (pending, deferred) = pending(&cache, &tables, &self.uncache, &timing);
        let result = run().await;
        let rows = match &result {
            Ok(values) if !moves_rows => returned_rows(&table, values),
            _ => None,
        };
        // Where the store can, the rows' entries go with the bump itself: one round trip less.
        let folded = match (&result, &rows, before, entity_generation) {
            (Ok(values), Some(rows), Some(before), Some(entity_generation)) if rows_through => {
                rows_through_bump(&cache, values, rows, before, entity_generation)
            }
            _ => None,
        };
        // The returned rows name every scope they are in only when none of them can have left
        // one: rows of the table's model that declares scopes, a plain insert, update or delete
        // that assigns no scope column, outside a transaction. Otherwise (None) every scoped
        // query of the table is invalidated.
        let keeps_scopes = matches!(timing, WriteTiming::Now)
            && !moves_rows
            && matches!(statement.verb, Verb::Insert | Verb::Update | Verb::Delete)
            && !U::scope_columns().is_empty()
            && !U::scope_columns()
                .iter()
                .any(|c| statement.assigned.contains(&c.to_lowercase()));
        let scopes = match (&result, &rows) {
            (Ok(values), Some(_)) if keeps_scopes => {
                Some(cache.value_generation_keys(&table, &scope_values_of(values)))
            }
            _ => None,
        };
        let written = Written {
            rows: rows.clone(),
            scopes,
            through: folded.as_ref(),
        };
        let invalidated =
            Write::<()>::finish(&cache, tables, written, self.uncache, timing, deferred).await;
        if let Some(pending) = pending {
            pending.done();
        }
        let values = result?;
        let (Some(before), Some(invalidated)) = (before, invalidated) else {
            return Ok(values);
        };
        // Stored with the bump, or found it moved by another write: nothing more to store.
        let stored_with_bump = invalidated.written_through.is_some();
        if let (Some(true), Some(through)) = (invalidated.written_through, &folded) {
            cache.count_written_through(through.keys.len());
        }
        let Some(ours) = <[_]>::first(&invalidated.tables) else {
            return Ok(values);
        };
        // Exactly one more invalidation of the table than before the write: ours, and no
        // other write overlapped, so these rows are the newest and may be cached.
        if ours.sequence != Some(before + 1) {
            return Ok(values);
        }
        if let (true, false, Some(rows), Some(entity_generation)) = (
            rows_through,
            stored_with_bump,
            &rows,
            ours.entity_generation,
        ) {
            if rows.len() == values.len() {
                let written = values.iter().zip(rows).zip(&invalidated.row_generations);
                for ((value, row), row_generation) in written {
                    let tags = [entity_generation, *row_generation];
                    cache
                        .put_entity(row, U::fingerprint(), tags, U::entity_ttl(), value)
                        .await;
                }
            }
        }
        if let Some(caching) = self
            .cache_result
            .as_ref()
            .filter(|_| statement.verb != Verb::Delete)
        {
            for value in &values {
                if let Some(key) = (caching.key)(value as &dyn Any) {
                    cache
                        .put_custom(&key, ours.query_generation, caching.ttl, value)
                        .await;
                }
            }
        }
        Ok(values)
    }
}

/// The written rows' entity entries, for the bump to store (see [`RowsThrough`]): tagged with
/// the entity generation read before the write and the row generations drawn here for the bump.
/// `None` when a value does not encode or the rows do not match the values one to one.
fn rows_through_bump<U: CacheValue>(
    cache: &Cache,
    values: &[U],
    rows: &[RowKey],
    before: u64,
    entity_generation: u64,
) -> Option<RowsThrough> {
    if rows.len() != values.len() {
        return None;
    }
    let mut through = RowsThrough {
        sequence: before.checked_add(1)?,
        entity_generation,
        row_values: Vec::with_capacity(rows.len()),
        keys: Vec::with_capacity(rows.len()),
        values: Vec::with_capacity(rows.len()),
        ttl: Duration::ZERO,
    };
    for (value, row) in values.iter().zip(rows) {
        let row_generation = crate::store::fresh_generation();
        let tags = [entity_generation, row_generation];
        let (key, bytes, kept_for) =
            cache.entity_entry_of(row, U::fingerprint(), tags, U::entity_ttl(), value)?;
        through.row_values.push(row_generation);
        through.keys.push(key);
        through.values.push(bytes);
        // One lifetime for all: the model's, so the same for every row.
        through.ttl = kept_for;
    }
    Some(through)
}

/// What a write knows of what it wrote, for its invalidation (see `Write::finish`).
#[derive(Default)]
struct Written<'a> {
    /// Its rows, when they are known.
    rows: Option<Vec<RowKey>>,
    /// The value generations of every scope value of the rows, when none can have left one.
    scopes: Option<Vec<String>>,
    /// Their entries, to store with the bump (see [`RowsThrough`]).
    through: Option<&'a RowsThrough>,
}

fn written_tables(statement: &WrittenStatement, also: &[String]) -> Vec<String> {
    let mut tables = vec![statement.table.clone()];
    for table in statement.also_named.iter().chain(also) {
        if !tables.contains(table) {
            tables.push(table.clone());
        }
    }
    tables
}

/// Makes sure a write's invalidation survives the write's future being dropped once its
/// statement may have run: an autocommit write is guarded (dropped armed, it marks its tables
/// undelivered); a write in a transaction is recorded in the transaction *before* its
/// statement runs, with every row of its tables, and narrowed to its rows once it returns them.
fn pending(
    cache: &Cache,
    tables: &[String],
    uncache: &[String],
    timing: &WriteTiming,
) -> (Option<PendingWrite>, Option<usize>) {
    match timing {
        WriteTiming::Now => (
            Some(PendingWrite::new(cache, tables.to_vec(), uncache)),
            None,
        ),
        WriteTiming::AfterCommit(transaction) => {
            let index = transaction.defer(cache, tables.to_vec(), None, uncache.to_vec());
            (None, Some(index))
        }
    }
}

/// True when `U` is the model of `table`.
fn model_of<U: CacheValue>(table: &str) -> bool {
    let mut tables = Vec::new();
    U::tables(&mut tables);
    tables.as_slice() == [table]
}

/// The written rows, when the returned values are rows of the written table's model.
fn returned_rows<U: CacheValue>(table: &str, values: &[U]) -> Option<Vec<RowKey>> {
    if !model_of::<U>(table) {
        return None;
    }
    let mut rows = Vec::new();
    values.iter().for_each(|v| v.rows(&mut rows));
    rows.retain(|r| r.table == table);
    Some(rows)
}

/// Every scope value of the written rows (see [`CacheValue::scope_values`]).
fn scope_values_of<U: CacheValue>(values: &[U]) -> Vec<(&'static str, String)> {
    let mut scopes = Vec::new();
    values.iter().for_each(|v| v.scope_values(&mut scopes));
    scopes
}

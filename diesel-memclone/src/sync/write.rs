//! Invalidating writes for synchronous connections: the same builders as the async ones.

use super::block_on;
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::model::CacheValue;
use crate::transaction::sync_write_timing;
use diesel::backend::Backend;
use diesel::query_builder::{
    AsChangeset, IncompleteInsertStatement, InsertStatement, IntoUpdateTarget, QueryFragment,
    QueryId, UpdateStatement,
};
use diesel::query_dsl::methods::{ExecuteDsl, FilterDsl};
use diesel::query_dsl::LoadQuery;
use diesel::query_source::QuerySource;
use diesel::{Connection, Insertable, Table};
use std::time::Duration;

/// A write that invalidates what it changes, for synchronous connections: the same builder as
/// [`crate::Write`], run with [`execute`](Write::execute),
/// [`get_result`](Write::get_result) or [`get_results`](Write::get_results).
#[derive(Debug, Clone)]
#[must_use = "a write does nothing until executed"]
pub struct Write<S>(crate::Write<S>);

/// [`crate::insert_into`] for synchronous connections.
pub fn insert_into<T>(target: T) -> Write<IncompleteInsertStatement<T>>
where
    T: Table + 'static,
    T::FromClause: QueryFragment<diesel::pg::Pg>,
{
    Write(crate::insert_into(target))
}

/// [`crate::replace_into`] for synchronous connections.
pub fn replace_into<T>(
    target: T,
) -> Write<IncompleteInsertStatement<T, diesel::query_builder::Replace>>
where
    T: Table + 'static,
    T::FromClause: QueryFragment<diesel::pg::Pg>,
{
    Write(crate::replace_into(target))
}

/// [`crate::update`] for synchronous connections.
pub fn update<T>(target: T) -> Write<UpdateStatement<T::Table, T::WhereClause>>
where
    T: IntoUpdateTarget,
    T::Table: 'static,
    <T::Table as QuerySource>::FromClause: QueryFragment<diesel::pg::Pg>,
{
    Write(crate::update(target))
}

/// [`crate::delete`] for synchronous connections.
pub fn delete<T>(
    target: T,
) -> Write<diesel::query_builder::DeleteStatement<T::Table, T::WhereClause>>
where
    T: IntoUpdateTarget,
    T::Table: 'static,
    <T::Table as QuerySource>::FromClause: QueryFragment<diesel::pg::Pg>,
{
    Write(crate::delete(target))
}

/// [`crate::write()`] (any statement) for synchronous connections.
pub fn write<S>(statement: S) -> Write<S> {
    Write(crate::write(statement))
}

impl<T, Op> Write<IncompleteInsertStatement<T, Op>> {
    /// The rows to insert, like Diesel's `values`.
    pub fn values<U>(self, records: U) -> Write<InsertStatement<T, U::Values, Op>>
    where
        T: Table,
        U: Insertable<T>,
    {
        Write(self.0.values(records))
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
        Write(self.0.set(values))
    }
}

impl<S> Write<S> {
    /// Narrows an update or delete, like Diesel's `filter`.
    pub fn filter<P>(self, predicate: P) -> Write<diesel::dsl::Filter<S, P>>
    where
        S: FilterDsl<P>,
    {
        Write(self.0.filter(predicate))
    }

    /// Uses `cache` instead of the process-wide default.
    pub fn using(self, cache: &Cache) -> Self {
        Write(self.0.using(cache))
    }

    /// Also deletes these custom keys ([`Cached::key`](super::Cached::key)) after the write.
    pub fn uncache<K: Into<String>>(self, keys: impl IntoIterator<Item = K>) -> Self {
        Write(self.0.uncache(keys))
    }

    /// Stores each returned row under `key(row)`: see [`crate::Write::cache_result`].
    pub fn cache_result<U, F>(self, ttl: Duration, key: F) -> Self
    where
        U: CacheValue,
        F: Fn(&U) -> String + Send + Sync + 'static,
    {
        Write(self.0.cache_result(ttl, key))
    }

    /// Changes the statement (`.map(|s| s.returning(..))`, `.on_conflict(..)` upserts),
    /// keeping the options.
    pub fn map<S2>(self, f: impl FnOnce(S) -> S2) -> Write<S2> {
        Write(self.0.map(f))
    }

    /// Also invalidates `table`, which the statement changes without naming it (a trigger).
    pub fn also_invalidates(self, table: &str) -> Self {
        Write(self.0.also_invalidates(table))
    }

    /// Runs the statement and invalidates what it wrote (after the commit, inside
    /// [`transaction`](super::transaction)); the number of rows changed.
    pub fn execute<C>(self, conn: &mut C) -> Result<usize>
    where
        C: Connection,
        C::Backend: Default,
        <C::Backend as Backend>::QueryBuilder: Default,
        S: QueryFragment<C::Backend> + QueryId + ExecuteDsl<C>,
    {
        let statement = self.0.analyse::<C::Backend>()?;
        let timing = sync_write_timing(conn)?;
        let (query, options) = self.0.split();
        block_on(options.execute_with(statement, timing, || {
            std::future::ready(ExecuteDsl::execute(query, conn))
        }))
    }

    /// Runs a statement with `RETURNING` and invalidates what it wrote; the returned rows are
    /// written through to their entity entries, as with [`crate::Write::get_results`].
    pub fn get_results<'q, U, C>(self, conn: &mut C) -> Result<Vec<U>>
    where
        C: Connection,
        C::Backend: Default,
        <C::Backend as Backend>::QueryBuilder: Default,
        S: QueryFragment<C::Backend> + LoadQuery<'q, C, U> + 'q,
        U: CacheValue,
    {
        let statement = self.0.analyse::<C::Backend>()?;
        let timing = sync_write_timing(conn)?;
        let (query, options) = self.0.split();
        block_on(options.get_results_with(statement, timing, || {
            std::future::ready(query.load::<U>(conn))
        }))
    }

    /// [`get_results`](Write::get_results) for one row; none is
    /// [`Error::Database(NotFound)`](diesel::result::Error::NotFound).
    pub fn get_result<'q, U, C>(self, conn: &mut C) -> Result<U>
    where
        C: Connection,
        C::Backend: Default,
        <C::Backend as Backend>::QueryBuilder: Default,
        S: QueryFragment<C::Backend> + LoadQuery<'q, C, U> + 'q,
        U: CacheValue,
    {
        let mut rows = self.get_results::<U, C>(conn)?;
        if rows.is_empty() {
            return Err(Error::Database(diesel::result::Error::NotFound));
        }
        Ok(rows.swap_remove(0))
    }
}

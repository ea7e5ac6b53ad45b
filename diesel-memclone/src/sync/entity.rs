//! The entity cache (rows by primary key) for synchronous connections.

use super::{block_on, ConnectionPool};
use crate::cache::{cache, Cache, Policy};
use crate::error::{Error, Result};
use crate::model::{MemClone, RowKey};
use crate::transaction::sync_read_policy;
use diesel::query_dsl::LoadQuery;
use diesel::{Connection, OptionalExtension, RunQueryDsl};
use std::time::Duration;

/// A [`Cache`] used from synchronous code: `cache.blocking()`, or [`find`] and the other
/// functions of this module for the process-wide cache.
#[derive(Debug, Clone, Copy)]
pub struct BlockingCache<'a>(pub(super) &'a Cache);

impl Cache {
    /// This cache's synchronous API: [`find`](BlockingCache::find),
    /// [`load_with`](BlockingCache::load_with), [`uncache`](BlockingCache::uncache), ... for
    /// `diesel::Connection`s and code without an async runtime.
    pub fn blocking(&self) -> BlockingCache<'_> {
        BlockingCache(self)
    }
}

fn ttl_of<M: MemClone>(cache: &Cache) -> Duration {
    M::TTL_SECONDS
        .map(Duration::from_secs)
        .unwrap_or_else(|| cache.default_ttl())
}

impl BlockingCache<'_> {
    /// The row with this primary key, or `None`: [`Cache::find_optional`] on a synchronous
    /// connection.
    pub fn find_optional<'q, M, C>(
        &self,
        conn: &mut C,
        primary_key: M::PrimaryKey,
    ) -> Result<Option<M>>
    where
        M: MemClone,
        C: Connection,
        M::FindQuery: LoadQuery<'q, C, M> + 'q,
    {
        let cache = self.0;
        let row = RowKey::new(M::table(), &primary_key);
        let tables = [M::table().to_owned()];
        let policy = sync_read_policy(conn, &tables);
        let fingerprint = <M as crate::CacheValue>::fingerprint();
        let lookup = cache.entity_lookup(&row, fingerprint, ttl_of::<M>(cache), policy);
        if let Some(hit) = cache.near_hit_now(&lookup) {
            return Ok(hit);
        }
        block_on(async move {
            let fill =
                || std::future::ready(M::find_query(primary_key).get_result::<M>(conn).optional());
            cache.read_through(lookup, fill).await
        })
    }

    /// The row with this primary key; none is
    /// [`Error::Database(NotFound)`](diesel::result::Error::NotFound).
    pub fn find<'q, M, C>(&self, conn: &mut C, primary_key: M::PrimaryKey) -> Result<M>
    where
        M: MemClone,
        C: Connection,
        M::FindQuery: LoadQuery<'q, C, M> + 'q,
    {
        self.find_optional(conn, primary_key)?
            .ok_or(Error::Database(diesel::result::Error::NotFound))
    }

    /// Like [`find_optional`](BlockingCache::find_optional), with a connection checked out of
    /// `pool` only on a miss (see [`ConnectionPool`]): a hit never touches the pool.
    pub fn find_optional_from<'q, M, P>(
        &self,
        pool: &P,
        primary_key: M::PrimaryKey,
    ) -> Result<Option<M>>
    where
        M: MemClone,
        P: ConnectionPool,
        M::FindQuery: LoadQuery<'q, P::Connection, M> + 'q,
    {
        let cache = self.0;
        let row = RowKey::new(M::table(), &primary_key);
        let fingerprint = <M as crate::CacheValue>::fingerprint();
        // The pool's connection is in no transaction of the caller's: a plain read.
        let lookup = cache.entity_lookup(&row, fingerprint, ttl_of::<M>(cache), Policy::ReadWrite);
        if let Some(hit) = cache.near_hit_now(&lookup) {
            return Ok(hit);
        }
        block_on(async move {
            if let Some(hit) = cache.store_hit(&lookup).await {
                return Ok(hit);
            }
            // A miss: the connection first, then the load others may share (see `store_hit`).
            let mut conn = pool.connection()?;
            let fill = || {
                let found = M::find_query(primary_key).get_result::<M>(&mut *conn);
                std::future::ready(found.optional().map_err(Error::from))
            };
            cache.read_through(lookup, fill).await
        })
    }

    /// Like [`find`](BlockingCache::find), with a connection checked out of `pool` only on a
    /// miss (see [`ConnectionPool`]).
    pub fn find_from<'q, M, P>(&self, pool: &P, primary_key: M::PrimaryKey) -> Result<M>
    where
        M: MemClone,
        P: ConnectionPool,
        M::FindQuery: LoadQuery<'q, P::Connection, M> + 'q,
    {
        self.find_optional_from(pool, primary_key)?
            .ok_or(Error::Database(diesel::result::Error::NotFound))
    }

    /// Reads `row` again from the database and refreshes its entry: [`Cache::reload`].
    pub fn reload<'q, M, C>(&self, row: &mut M, conn: &mut C) -> Result<()>
    where
        M: MemClone,
        C: Connection,
        M::FindQuery: LoadQuery<'q, C, M> + 'q,
    {
        let cache = self.0;
        let fresh = block_on(async {
            let primary_key = row.primary_key();
            let key = RowKey::new(M::table(), &primary_key);
            let tables = [M::table().to_owned()];
            let policy = match sync_read_policy(conn, &tables) {
                Policy::ReadWrite if cache.invalidate_row(&key).await => Policy::Refresh,
                _ => Policy::Bypass,
            };
            let fingerprint = <M as crate::CacheValue>::fingerprint();
            let lookup = cache.entity_lookup(&key, fingerprint, ttl_of::<M>(cache), policy);
            let fill =
                || std::future::ready(M::find_query(primary_key).get_result::<M>(conn).optional());
            cache.read_through(lookup, fill).await
        })?;
        *row = fresh.ok_or(Error::Database(diesel::result::Error::NotFound))?;
        Ok(())
    }

    /// Invalidates every cached query of `M`'s table and every entity entry of `M`.
    pub fn invalidate<M: MemClone>(&self) -> Result<()> {
        block_on(async {
            self.0.invalidate::<M>().await;
            Ok(())
        })
    }

    /// Invalidates every cached query of `table`.
    pub fn invalidate_table(&self, table: &str) -> Result<()> {
        block_on(async {
            self.0.invalidate_table(table).await;
            Ok(())
        })
    }

    /// Deletes the entries stored under these custom keys: [`Cache::uncache`].
    pub fn uncache<S: AsRef<str>>(&self, keys: &[S]) -> Result<()> {
        block_on(async {
            self.0.uncache(keys).await;
            Ok(())
        })
    }
}

/// The row of `M` with this primary key, from the process-wide cache, on a synchronous
/// connection: what `Model::find_cached_blocking` (from `#[derive(MemClone)]`) calls.
pub fn find<'q, M, C>(conn: &mut C, primary_key: M::PrimaryKey) -> Result<M>
where
    M: MemClone,
    C: Connection,
    M::FindQuery: LoadQuery<'q, C, M> + 'q,
{
    cache().blocking().find(conn, primary_key)
}

/// The row of `M` with this primary key, or `None`, from the process-wide cache.
pub fn find_optional<'q, M, C>(conn: &mut C, primary_key: M::PrimaryKey) -> Result<Option<M>>
where
    M: MemClone,
    C: Connection,
    M::FindQuery: LoadQuery<'q, C, M> + 'q,
{
    cache().blocking().find_optional(conn, primary_key)
}

/// The row of `M` with this primary key, from the process-wide cache, with a connection
/// checked out of `pool` only on a miss (see [`ConnectionPool`]).
pub fn find_from<'q, M, P>(pool: &P, primary_key: M::PrimaryKey) -> Result<M>
where
    M: MemClone,
    P: ConnectionPool,
    M::FindQuery: LoadQuery<'q, P::Connection, M> + 'q,
{
    cache().blocking().find_from(pool, primary_key)
}

/// The row of `M` with this primary key, or `None`, from the process-wide cache, with a
/// connection checked out of `pool` only on a miss (see [`ConnectionPool`]).
pub fn find_optional_from<'q, M, P>(pool: &P, primary_key: M::PrimaryKey) -> Result<Option<M>>
where
    M: MemClone,
    P: ConnectionPool,
    M::FindQuery: LoadQuery<'q, P::Connection, M> + 'q,
{
    cache().blocking().find_optional_from(pool, primary_key)
}

/// Reads `row` again from the database and refreshes its entry in the process-wide cache.
pub fn reload<'q, M, C>(row: &mut M, conn: &mut C) -> Result<()>
where
    M: MemClone,
    C: Connection,
    M::FindQuery: LoadQuery<'q, C, M> + 'q,
{
    cache().blocking().reload(row, conn)
}

/// Invalidates every cached query and entity entry of `M` in the process-wide cache.
pub fn invalidate<M: MemClone>() -> Result<()> {
    cache().blocking().invalidate::<M>()
}

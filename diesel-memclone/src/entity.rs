//! The entity cache: rows by primary key.

use crate::cache::{cache, Cache, Policy};
use crate::error::{Error, Result};
use crate::model::{MemClone, RowKey};
use crate::transaction::read_policy;
use diesel::OptionalExtension;
use diesel_async::methods::LoadQuery;
use diesel_async::{AsyncConnection, RunQueryDsl};
use std::time::Duration;

fn ttl_of<M: MemClone>(cache: &Cache) -> Duration {
    M::TTL_SECONDS
        .map(Duration::from_secs)
        .unwrap_or_else(|| cache.default_ttl())
}

impl Cache {
    /// The row of `M` with this primary key, from the cache or else the database (which then
    /// fills the cache). `Ok(None)` when there is no such row; that answer is cached too, and
    /// an insert of the row through memclone invalidates it.
    pub async fn find_optional<'q, M, C>(
        &self,
        conn: &mut C,
        primary_key: M::PrimaryKey,
    ) -> Result<Option<M>>
    where
        M: MemClone + Send,
        C: AsyncConnection,
        M::FindQuery: LoadQuery<'q, C, M> + 'q,
    {
        let row = RowKey::new(M::table(), &primary_key);
        let tables = [M::table().to_owned()];
        let policy = read_policy(conn, &tables);
        let lookup = self.entity_lookup(&row, entity_fingerprint::<M>(), ttl_of::<M>(self), policy);
        self.read_through(lookup, || async move {
            M::find_query(primary_key)
                .get_result::<M>(conn)
                .await
                .optional()
        })
        .await
    }

    /// Like [`find_optional`](Cache::find_optional), with a missing row as
    /// `Error::Database(NotFound)`.
    pub async fn find<'q, M, C>(&self, conn: &mut C, primary_key: M::PrimaryKey) -> Result<M>
    where
        M: MemClone + Send,
        C: AsyncConnection,
        M::FindQuery: LoadQuery<'q, C, M> + 'q,
    {
        self.find_optional(conn, primary_key)
            .await?
            .ok_or(Error::Database(diesel::result::Error::NotFound))
    }

    /// Re-reads `row` from the database, bypassing the cache, and refreshes its entity entry:
    /// the fix for rows changed by writes that bypassed memclone.
    pub async fn reload<'q, M, C>(&self, row: &mut M, conn: &mut C) -> Result<()>
    where
        M: MemClone + Send,
        C: AsyncConnection,
        M::FindQuery: LoadQuery<'q, C, M> + 'q,
    {
        let primary_key = row.primary_key();
        let key = RowKey::new(M::table(), &primary_key);
        let tables = [M::table().to_owned()];
        // Move the row's generation first, so that a fill that read the database before this
        // reload cannot land over the reloaded row; if that fails, do not store at all.
        let policy = match read_policy(conn, &tables) {
            Policy::ReadWrite if self.invalidate_row(&key).await => Policy::Refresh,
            _ => Policy::Bypass,
        };
        let lookup = self.entity_lookup(&key, entity_fingerprint::<M>(), ttl_of::<M>(self), policy);
        let fresh = self
            .read_through(lookup, || async move {
                M::find_query(primary_key)
                    .get_result::<M>(conn)
                    .await
                    .optional()
            })
            .await?;
        *row = fresh.ok_or(Error::Database(diesel::result::Error::NotFound))?;
        Ok(())
    }
}

fn entity_fingerprint<M: MemClone>() -> u64 {
    <M as crate::CacheValue>::fingerprint()
}

/// [`Cache::find`] on the default cache: `memclone::find::<User, _>(&mut conn, 1)`.
pub async fn find<'q, M, C>(conn: &mut C, primary_key: M::PrimaryKey) -> Result<M>
where
    M: MemClone + Send,
    C: AsyncConnection,
    M::FindQuery: LoadQuery<'q, C, M> + 'q,
{
    cache().find(conn, primary_key).await
}

/// [`Cache::find_optional`] on the default cache.
pub async fn find_optional<'q, M, C>(conn: &mut C, primary_key: M::PrimaryKey) -> Result<Option<M>>
where
    M: MemClone + Send,
    C: AsyncConnection,
    M::FindQuery: LoadQuery<'q, C, M> + 'q,
{
    cache().find_optional(conn, primary_key).await
}

/// [`Cache::reload`] on the default cache: `memclone::reload(&mut user, &mut conn)`.
pub async fn reload<'q, M, C>(row: &mut M, conn: &mut C) -> Result<()>
where
    M: MemClone + Send,
    C: AsyncConnection,
    M::FindQuery: LoadQuery<'q, C, M> + 'q,
{
    cache().reload(row, conn).await
}

/// [`Cache::invalidate`] on the default cache: forget every cached query and row of `M`.
pub async fn invalidate<M: MemClone>() {
    cache().invalidate::<M>().await
}

//! The entity cache: rows by primary key.

use crate::cache::{cache, Cache, Policy};
use crate::error::{Error, Result};
use crate::model::{MemClone, RowKey};
use crate::pool::ConnectionPool;
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

    /// Like [`find_optional`](Cache::find_optional), with a connection checked out of `pool`
    /// only on a miss: a hit never touches the pool (see [`ConnectionPool`]).
    pub async fn find_optional_from<'q, M, P>(
        &self,
        pool: &P,
        primary_key: M::PrimaryKey,
    ) -> Result<Option<M>>
    where
        M: MemClone + Send,
        P: ConnectionPool,
        M::FindQuery: LoadQuery<'q, P::Connection, M> + 'q,
    {
        let row = RowKey::new(M::table(), &primary_key);
        // The pool's connection is in no transaction of the caller's: a plain read.
        let policy = Policy::ReadWrite;
        let lookup = self.entity_lookup(&row, entity_fingerprint::<M>(), ttl_of::<M>(self), policy);
        if let Some(hit) = self.store_hit(&lookup).await {
            return Ok(hit);
        }
        // A miss: the connection first, then the load others may share (see `store_hit`).
        let mut conn = pool.connection().await?;
        self.read_through(lookup, move || async move {
            let found = M::find_query(primary_key)
                .get_result::<M>(&mut conn)
                .await
                .optional()?;
            Ok::<_, Error>(found)
        })
        .await
    }

    /// Like [`find`](Cache::find), with a connection checked out of `pool` only on a miss: a
    /// hit never touches the pool (see [`ConnectionPool`]).
    pub async fn find_from<'q, M, P>(&self, pool: &P, primary_key: M::PrimaryKey) -> Result<M>
    where
        M: MemClone + Send,
        P: ConnectionPool,
        M::FindQuery: LoadQuery<'q, P::Connection, M> + 'q,
    {
        self.find_optional_from(pool, primary_key)
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
/// let ada = diesel_memclone::find::<User, _>(&mut conn, 1).await?;
/// assert_eq!(ada.name, "Ada");
/// // A missing row is an error; see `find_optional`.
/// assert!(diesel_memclone::find::<User, _>(&mut conn, 9).await.unwrap_err().is_not_found());
/// # Ok(()) }
/// ```
pub async fn find<'q, M, C>(conn: &mut C, primary_key: M::PrimaryKey) -> Result<M>
where
    M: MemClone + Send,
    C: AsyncConnection,
    M::FindQuery: LoadQuery<'q, C, M> + 'q,
{
    cache().find(conn, primary_key).await
}

/// [`Cache::find_optional`] on the default cache.
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
/// let nobody = diesel_memclone::find_optional::<User, _>(&mut conn, 9).await?;
/// assert!(nobody.is_none());
/// # Ok(()) }
/// ```
pub async fn find_optional<'q, M, C>(conn: &mut C, primary_key: M::PrimaryKey) -> Result<Option<M>>
where
    M: MemClone + Send,
    C: AsyncConnection,
    M::FindQuery: LoadQuery<'q, C, M> + 'q,
{
    cache().find_optional(conn, primary_key).await
}

/// [`Cache::find_from`] on the default cache: `memclone::find_from::<User, _>(&pool, 1)`,
/// which checks out a connection of `pool` only on a miss (see [`ConnectionPool`]).
pub async fn find_from<'q, M, P>(pool: &P, primary_key: M::PrimaryKey) -> Result<M>
where
    M: MemClone + Send,
    P: ConnectionPool,
    M::FindQuery: LoadQuery<'q, P::Connection, M> + 'q,
{
    cache().find_from(pool, primary_key).await
}

/// [`Cache::find_optional_from`] on the default cache.
pub async fn find_optional_from<'q, M, P>(pool: &P, primary_key: M::PrimaryKey) -> Result<Option<M>>
where
    M: MemClone + Send,
    P: ConnectionPool,
    M::FindQuery: LoadQuery<'q, P::Connection, M> + 'q,
{
    cache().find_optional_from(pool, primary_key).await
}

/// [`Cache::reload`] on the default cache: `memclone::reload(&mut user, &mut conn)`.
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
/// let mut ada = User::find_cached(&mut conn, 1).await?;
/// // A write that bypasses memclone (raw SQL, another service) leaves the cached row stale...
/// diesel::update(users::table.find(1))
///     .set(users::name.eq("Ada L."))
///     .execute(&mut conn)
///     .await?;
/// assert_eq!(User::find_cached(&mut conn, 1).await?.name, "Ada");
/// // ...until it is reloaded, which reads the database and refreshes the cached row.
/// diesel_memclone::reload(&mut ada, &mut conn).await?;
/// assert_eq!(ada.name, "Ada L.");
/// assert_eq!(User::find_cached(&mut conn, 1).await?.name, "Ada L.");
/// # Ok(()) }
/// ```
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

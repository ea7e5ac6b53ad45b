//! `.cached(label)` on any Diesel query, for synchronous connections.

use super::{block_on, ConnectionPool};
use crate::cache::Cache;
use crate::error::Result;
use crate::identity::CacheBackend;
use crate::key;
use crate::model::CacheValue;
use crate::transaction::sync_read_policy;
use diesel::dsl::{CountStar, Limit, Select};
use diesel::query_builder::{AsQuery, QueryFragment, QueryId};
use diesel::query_dsl::methods::{LimitDsl, SelectDsl};
use diesel::query_dsl::LoadQuery;
use diesel::{Connection, OptionalExtension, RunQueryDsl};
use std::borrow::Cow;
use std::time::Duration;

/// Adds [`cached`](CachedDsl::cached) to every Diesel query, for synchronous connections.
pub trait CachedDsl: crate::CachedDsl {
    /// Caches this query's results under `label`: the same entry as the async
    /// [`crate::CachedDsl::cached`] (same key, same contract).
    fn cached(self, label: impl Into<Cow<'static, str>>) -> Cached<Self> {
        Cached(crate::CachedDsl::cached(self, label))
    }
}

impl<T: AsQuery> CachedDsl for T {}

/// A query to be answered from the cache on a synchronous connection; made by
/// [`CachedDsl::cached`].
///
/// ```
/// # use diesel::prelude::*;
/// # use diesel_memclone::sync::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
/// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
/// # #[diesel(table_name = users)]
/// # struct User { id: i32, name: String, status: String }
/// # fn main() -> diesel_memclone::Result<()> {
/// # let mut conn = diesel::SqliteConnection::establish(":memory:")?;
/// # diesel::connection::SimpleConnection::batch_execute(&mut conn, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
/// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');")?;
/// let active: Vec<User> = users::table
///     .filter(users::status.eq("active"))
///     .cached("active_users")
///     .ttl(std::time::Duration::from_secs(60))
///     .load(&mut conn)?;
/// assert_eq!(active.len(), 1);
/// let ada: User = users::table.find(1).cached("user").get_result(&mut conn)?;
/// let newest: User = users::table.order(users::id.desc()).cached("newest").first(&mut conn)?;
/// let n = users::table.cached("n_users").count(&mut conn)?;
/// assert_eq!((ada.name.as_str(), newest.name.as_str(), n), ("Ada", "Bob", 2));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a cached query does nothing until loaded"]
pub struct Cached<Q>(crate::Cached<Q>);

impl<Q> Cached<Q> {
    /// How long this entry lives (default: the model's `#[memclone(ttl)]`, else the cache's).
    pub fn ttl(self, ttl: Duration) -> Self {
        Cached(self.0.ttl(ttl))
    }

    /// Uses `cache` instead of the process-wide default.
    pub fn using(self, cache: &Cache) -> Self {
        Cached(self.0.using(cache))
    }

    /// Stores the result under this key instead of the one derived from the query: see
    /// [`crate::Cached::key`].
    pub fn key(self, key: impl Into<String>) -> Self {
        Cached(self.0.key(key))
    }

    /// Adds a table the result depends on that the SQL does not name.
    pub fn depends_on(self, table: &str) -> Self {
        Cached(self.0.depends_on(table))
    }

    /// Declares that, of `column`'s table, this query reads only rows whose `column` equals
    /// `value`: see [`crate::Cached::within`] (same keys, same contract).
    pub fn within<C: crate::ScopeColumn>(self, column: C, value: C::Value) -> Self {
        Cached(self.0.within(column, value))
    }

    /// Changes the query, keeping the label and options.
    pub fn map<Q2>(self, f: impl FnOnce(Q) -> Q2) -> Cached<Q2> {
        Cached(self.0.map(f))
    }

    /// Loads every row, like Diesel's `load`.
    pub fn load<'q, U, C>(self, conn: &mut C) -> Result<Vec<U>>
    where
        C: Connection,
        C::Backend: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, U> + 'q,
        U: CacheValue,
    {
        let (query, this) = self.0.split();
        let query = query.as_query();
        // The async driver's lookup (query shapes included): the same key.
        let lookup = this.query_lookup::<Vec<U>, C::Backend, Q::Query>(
            "load",
            &[&query],
            &[Q::Query::query_id()],
        );
        let Some(mut lookup) = lookup else {
            return Ok(query.load::<U>(conn)?);
        };
        lookup.policy = sync_read_policy(conn, &lookup.tables);
        if let Some(hit) = this.cache().near_hit_now(&lookup) {
            return Ok(hit);
        }
        block_on(async move {
            let fill = || std::future::ready(query.load::<U>(conn));
            this.cache().read_through(lookup, fill).await
        })
    }

    /// Loads one row, like Diesel's `get_result`; no row is
    /// [`Error::Database(NotFound)`](diesel::result::Error::NotFound), cached too.
    pub fn get_result<'q, U, C>(self, conn: &mut C) -> Result<U>
    where
        C: Connection,
        C::Backend: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, U> + 'q,
        U: CacheValue,
    {
        let (query, this) = self.0.split();
        let query = query.as_query();
        let lookup = this.query_lookup::<Option<U>, C::Backend, Q::Query>(
            "one",
            &[&query],
            &[Q::Query::query_id()],
        );
        let Some(mut lookup) = lookup else {
            return Ok(query.get_result::<U>(conn)?);
        };
        lookup.policy = sync_read_policy(conn, &lookup.tables);
        if let Some(hit) = this.cache().near_hit_now::<Option<U>>(&lookup) {
            return hit.ok_or(crate::Error::Database(diesel::result::Error::NotFound));
        }
        let found = block_on(async move {
            let fill = || std::future::ready(query.get_result::<U>(conn).optional());
            this.cache().read_through(lookup, fill).await
        })?;
        found.ok_or(crate::Error::Database(diesel::result::Error::NotFound))
    }

    /// The first row, like Diesel's `first` (adds `LIMIT 1`).
    pub fn first<'q, U, C>(self, conn: &mut C) -> Result<U>
    where
        C: Connection,
        C::Backend: CacheBackend,
        Q: LimitDsl,
        Limit<Q>: AsQuery,
        <Limit<Q> as AsQuery>::Query:
            QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, U> + 'q,
        U: CacheValue,
    {
        self.map(|q| q.limit(1)).get_result(conn)
    }

    /// The number of rows, like Diesel's `.count().get_result::<i64>()`.
    pub fn count<'q, C>(self, conn: &mut C) -> Result<i64>
    where
        C: Connection,
        C::Backend: CacheBackend,
        Q: SelectDsl<CountStar>,
        Select<Q, CountStar>: AsQuery,
        <Select<Q, CountStar> as AsQuery>::Query:
            QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, i64> + 'q,
    {
        self.map(|q| q.select(diesel::dsl::count_star()))
            .get_result(conn)
    }

    /// A page of rows and the total count, in one entry: see
    /// [`crate::Cached::load_and_count`].
    pub fn load_and_count<'q, U, CQ, C>(
        self,
        count_query: CQ,
        conn: &mut C,
    ) -> Result<(Vec<U>, i64)>
    where
        C: Connection,
        C::Backend: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, U> + 'q,
        CQ: AsQuery,
        CQ::Query: QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, i64> + 'q,
        U: CacheValue,
    {
        let (query, this) = self.0.split();
        let query = query.as_query();
        let count_query = count_query.as_query();
        let lookup = this.query_lookup::<(Vec<U>, i64), C::Backend, (Q::Query, CQ::Query)>(
            "load_and_count",
            &[&query, &count_query],
            &[Q::Query::query_id(), CQ::Query::query_id()],
        );
        let Some(mut lookup) = lookup else {
            let rows = query.load::<U>(conn)?;
            let total = count_query.get_result::<i64>(conn)?;
            return Ok((rows, total));
        };
        block_on(async move {
            lookup.policy = sync_read_policy(conn, &lookup.tables);
            let fill = || {
                std::future::ready((|| {
                    let rows = query.load::<U>(conn)?;
                    let total = count_query.get_result::<i64>(conn)?;
                    diesel::QueryResult::Ok((rows, total))
                })())
            };
            this.cache().read_through(lookup, fill).await
        })
    }
}

impl<Q> Cached<Q> {
    /// Like [`load`](Cached::load), with a connection checked out of `pool` only on a miss (see
    /// [`ConnectionPool`]): a hit never touches the pool.
    ///
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel_memclone::sync::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
    /// # fn main() -> diesel_memclone::Result<()> {
    /// # let pool = std::sync::Mutex::new(diesel::SqliteConnection::establish(":memory:")?);
    /// # diesel::connection::SimpleConnection::batch_execute(&mut *pool.lock().unwrap(), "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    /// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');")?;
    /// // `pool`: Diesel's r2d2 pool (feature `r2d2`), or any `sync::ConnectionPool`: here a
    /// // `Mutex` around one connection.
    /// let names: Vec<String> = users::table
    ///     .select(users::name)
    ///     .order(users::id)
    ///     .cached("names")
    ///     .load_from(&pool)?;
    /// assert_eq!(names, ["Ada", "Bob"]);
    /// # Ok(()) }
    /// ```
    pub fn load_from<'q, U, P>(self, pool: &P) -> Result<Vec<U>>
    where
        P: ConnectionPool,
        <P::Connection as Connection>::Backend: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<<P::Connection as Connection>::Backend>
            + QueryId
            + LoadQuery<'q, P::Connection, U>
            + 'q,
        U: CacheValue,
    {
        let (query, this) = self.0.split();
        let query = query.as_query();
        let lookup = this.query_lookup::<Vec<U>, <P::Connection as Connection>::Backend, Q::Query>(
            "load",
            &[&query],
            &[Q::Query::query_id()],
        );
        let Some(lookup) = lookup else {
            return Ok(query.load::<U>(&mut *pool.connection()?)?);
        };
        // The pool's connection is in no transaction of the caller's: a plain read.
        if let Some(hit) = this.cache().near_hit_now(&lookup) {
            return Ok(hit);
        }
        block_on(async move {
            let cache = this.cache();
            if let Some(hit) = cache.store_hit(&lookup).await {
                return Ok(hit);
            }
            // A miss: the connection first, then the load others may share (see
            // `Cache::store_hit`).
            let mut conn = pool.connection()?;
            let fill =
                || std::future::ready(query.load::<U>(&mut *conn).map_err(crate::Error::from));
            cache.read_through(lookup, fill).await
        })
    }

    /// Like [`get_result`](Cached::get_result), with a connection checked out of `pool` only
    /// on a miss (see [`ConnectionPool`]). No row is
    /// [`Error::Database(NotFound)`](diesel::result::Error::NotFound), cached too.
    pub fn get_result_from<'q, U, P>(self, pool: &P) -> Result<U>
    where
        P: ConnectionPool,
        <P::Connection as Connection>::Backend: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<<P::Connection as Connection>::Backend>
            + QueryId
            + LoadQuery<'q, P::Connection, U>
            + 'q,
        U: CacheValue,
    {
        let (query, this) = self.0.split();
        let query = query.as_query();
        let lookup = this
            .query_lookup::<Option<U>, <P::Connection as Connection>::Backend, Q::Query>(
                "one",
                &[&query],
                &[Q::Query::query_id()],
            );
        let Some(lookup) = lookup else {
            return Ok(query.get_result::<U>(&mut *pool.connection()?)?);
        };
        let found = match this.cache().near_hit_now::<Option<U>>(&lookup) {
            Some(hit) => hit,
            None => block_on(async move {
                let cache = this.cache();
                if let Some(hit) = cache.store_hit(&lookup).await {
                    return Ok(hit);
                }
                // A miss: the connection first (see `Cache::store_hit`).
                let mut conn = pool.connection()?;
                let fill = || {
                    let found = query.get_result::<U>(&mut *conn).optional();
                    std::future::ready(found.map_err(crate::Error::from))
                };
                cache.read_through(lookup, fill).await
            })?,
        };
        found.ok_or(crate::Error::Database(diesel::result::Error::NotFound))
    }

    /// Like [`first`](Cached::first), with a connection checked out of `pool` only on a miss
    /// (see [`ConnectionPool`]).
    pub fn first_from<'q, U, P>(self, pool: &P) -> Result<U>
    where
        P: ConnectionPool,
        <P::Connection as Connection>::Backend: CacheBackend,
        Q: LimitDsl,
        Limit<Q>: AsQuery,
        <Limit<Q> as AsQuery>::Query: QueryFragment<<P::Connection as Connection>::Backend>
            + QueryId
            + LoadQuery<'q, P::Connection, U>
            + 'q,
        U: CacheValue,
    {
        self.map(|q| q.limit(1)).get_result_from(pool)
    }

    /// Like [`count`](Cached::count), with a connection checked out of `pool` only on a miss
    /// (see [`ConnectionPool`]).
    pub fn count_from<'q, P>(self, pool: &P) -> Result<i64>
    where
        P: ConnectionPool,
        <P::Connection as Connection>::Backend: CacheBackend,
        Q: SelectDsl<CountStar>,
        Select<Q, CountStar>: AsQuery,
        <Select<Q, CountStar> as AsQuery>::Query: QueryFragment<<P::Connection as Connection>::Backend>
            + QueryId
            + LoadQuery<'q, P::Connection, i64>
            + 'q,
    {
        self.map(|q| q.select(diesel::dsl::count_star()))
            .get_result_from(pool)
    }
}

impl super::BlockingCache<'_> {
    /// Caches any value computed from the database: [`Cache::load_with`] for a synchronous
    /// connection and fill.
    ///
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel_memclone::sync::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
    /// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
    /// # #[diesel(table_name = users)]
    /// # struct User { id: i32, name: String, status: String }
    /// # fn main() -> diesel_memclone::Result<()> {
    /// # let mut conn = diesel::SqliteConnection::establish(":memory:")?;
    /// # diesel::connection::SimpleConnection::batch_execute(&mut conn, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    /// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');")?;
    /// let everyone: Vec<User> = diesel_memclone::cache()
    ///     .blocking()
    ///     .load_with("everyone", "all", &[], &mut conn, |conn| {
    ///         users::table.order(users::id).load(conn)
    ///     })?;
    /// assert_eq!(everyone.len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn load_with<T, C, F>(
        &self,
        label: &str,
        key: &str,
        extra_tables: &[&str],
        conn: &mut C,
        fill: F,
    ) -> Result<T>
    where
        T: CacheValue,
        C: Connection,
        F: FnOnce(&mut C) -> diesel::QueryResult<T>,
    {
        let cache = self.0;
        block_on(async move {
            let options = crate::Cached::value_options(cache, label, extra_tables);
            let mut lookup = options.lookup::<T>("value", &[key::Rendered(key.to_owned())], false);
            lookup.policy = sync_read_policy(conn, &lookup.tables);
            cache
                .read_through(lookup, || std::future::ready(fill(conn)))
                .await
        })
    }

    /// [`Cache::fill_with`] for a synchronous fill that gets its own connection (from a pool,
    /// say). The fill must read committed data: never call this inside a transaction.
    pub fn fill_with<T, F>(&self, label: &str, key: &str, tables: &[&str], fill: F) -> Result<T>
    where
        T: CacheValue,
        F: FnOnce() -> diesel::QueryResult<T>,
    {
        let cache = self.0;
        block_on(async move {
            let options = crate::Cached::value_options(cache, label, tables);
            let lookup = options.lookup::<T>("value", &[key::Rendered(key.to_owned())], false);
            cache
                .read_through(lookup, || std::future::ready(fill()))
                .await
        })
    }
}

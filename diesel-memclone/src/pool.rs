//! Reads that take a database connection only when the cache cannot answer them.

#[cfg(any(feature = "deadpool", feature = "bb8"))]
use crate::error::Error;
use crate::error::Result;
use diesel_async::AsyncConnection;
use std::future::Future;

/// Where a cached read gets a database connection on a miss: a connection pool.
///
/// The `*_from` reads ([`Cached::load_from`](crate::Cached::load_from),
/// [`get_result_from`](crate::Cached::get_result_from), [`first_from`](crate::Cached::first_from),
/// [`count_from`](crate::Cached::count_from), [`Cache::find_from`](crate::Cache::find_from),
/// [`find_from`](crate::find_from)) take a pool instead of a connection and check one out
/// only when the cache cannot answer: a hit (near tier or store) never waits for the pool
/// behind the misses and never pays a checkout. The connection goes back to the pool as soon
/// as the database has answered, before the entry is stored. A miss takes its connection
/// before it joins another caller's load of the same entry or takes the fill lock: a caller
/// that holds one of the pool's connections and reads the same entry then never waits on a
/// load that waits for that connection.
///
/// Implemented for diesel-async's pools behind this crate's features `deadpool`
/// (`diesel_async::pooled_connection::deadpool::Pool<C>`) and `bb8`
/// (`diesel_async::pooled_connection::bb8::Pool<C>`); implement it for any other pool or
/// connection source. For a value computed over several queries,
/// [`Cache::fill_with`](crate::Cache::fill_with) takes a fill that checks out its own
/// connection.
///
/// The connection is the pool's: it is never in the caller's transaction, so these reads see
/// committed data only. Inside a transaction, read with the transaction's connection
/// ([`Cached::load`](crate::Cached::load) and the like).
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
/// use diesel_memclone::ConnectionPool;
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use tokio::sync::{Mutex, OwnedMutexGuard};
///
/// type Conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>;
///
/// /// A pool of one connection, counting its checkouts.
/// struct OneConnection(Arc<Mutex<Conn>>, AtomicUsize);
///
/// impl OneConnection {
///     fn checkouts(&self) -> usize {
///         AtomicUsize::load(&self.1, Ordering::Relaxed)
///     }
/// }
///
/// impl ConnectionPool for OneConnection {
///     // A guard that derefs to an `AsyncConnection` is one (as pools' guards are).
///     type Connection = OwnedMutexGuard<Conn>;
///
///     async fn connection(&self) -> diesel_memclone::Result<Self::Connection> {
///         self.1.fetch_add(1, Ordering::Relaxed);
///         Ok(self.0.clone().lock_owned().await)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> diesel_memclone::Result<()> {
/// # let mut conn = Conn::establish(":memory:").await?;
/// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
/// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
/// let pool = OneConnection(Arc::new(Mutex::new(conn)), AtomicUsize::new(0));
/// let active = || users::table.filter(users::status.eq("active")).cached("active_users");
///
/// // A miss checks out a connection and gives it back once the database has answered...
/// let first: Vec<User> = active().load_from(&pool).await?;
/// let ada: User = diesel_memclone::find_from(&pool, 1).await?;
/// assert_eq!((first.len(), ada.name.as_str()), (1, "Ada"));
/// assert_eq!(pool.checkouts(), 2);
///
/// // ...a hit does not take one, even while every connection is busy.
/// let busy = pool.0.clone().lock_owned().await;
/// let again: Vec<User> = active().load_from(&pool).await?;
/// let ada: User = diesel_memclone::find_from(&pool, 1).await?;
/// assert_eq!((again.len(), ada.name.as_str()), (1, "Ada"));
/// assert_eq!(pool.checkouts(), 2);
/// drop(busy);
/// # Ok(()) }
/// ```
pub trait ConnectionPool: Sync {
    /// The connection handed out, which goes back to the pool when dropped (a pool's guard:
    /// diesel-async implements `AsyncConnection` for anything that derefs to one).
    type Connection: AsyncConnection + Send;

    /// A connection, or why there is none ([`Error::Pool`](crate::Error::Pool) for a pool's own errors).
    fn connection(&self) -> impl Future<Output = Result<Self::Connection>> + Send;
}

#[cfg(feature = "deadpool")]
#[cfg_attr(docsrs, doc(cfg(feature = "deadpool")))]
impl<C> ConnectionPool for diesel_async::pooled_connection::deadpool::Pool<C>
where
    C: AsyncConnection + Send + 'static,
    diesel_async::pooled_connection::AsyncDieselConnectionManager<C>:
        deadpool::managed::Manager<Type = C, Error = diesel_async::pooled_connection::PoolError>,
{
    type Connection = diesel_async::pooled_connection::deadpool::Object<C>;

    async fn connection(&self) -> Result<Self::Connection> {
        self.get().await.map_err(Error::pool)
    }
}

#[cfg(feature = "bb8")]
#[cfg_attr(docsrs, doc(cfg(feature = "bb8")))]
impl<C> ConnectionPool for diesel_async::pooled_connection::bb8::Pool<C>
where
    C: AsyncConnection + Send + 'static,
    diesel_async::pooled_connection::AsyncDieselConnectionManager<C>:
        bb8::ManageConnection<Connection = C, Error = diesel_async::pooled_connection::PoolError>,
{
    type Connection = diesel_async::pooled_connection::bb8::PooledConnection<'static, C>;

    async fn connection(&self) -> Result<Self::Connection> {
        self.get_owned().await.map_err(Error::pool)
    }
}

//! Synchronous reads that take a database connection only when the cache cannot answer them.

use crate::error::Result;

/// Where a synchronous cached read gets a database connection on a miss: a connection pool.
///
/// The synchronous `*_from` reads ([`Cached::load_from`](super::Cached::load_from),
/// [`get_result_from`](super::Cached::get_result_from),
/// [`first_from`](super::Cached::first_from), [`count_from`](super::Cached::count_from),
/// [`BlockingCache::find_from`](super::BlockingCache::find_from), [`find_from`](super::find_from))
/// take a pool instead of a connection and check one out only when the cache cannot answer, as
/// the async [`ConnectionPool`](crate::ConnectionPool) does. With r2d2 this matters more than
/// the checkout itself: r2d2 tests every connection it hands out by default
/// (`test_on_check_out`), and Diesel's test is a `SELECT 1`, so
/// `.load(&mut pool.get()?)` pays a database round trip even on a cache hit.
///
/// Implemented for Diesel's r2d2 pools (`diesel::r2d2::Pool<ConnectionManager<C>>`) behind this
/// crate's feature `r2d2`; implement it for any other pool or connection source.
///
/// The connection is the pool's: it is never in the caller's transaction, so these reads see
/// committed data only. Inside a transaction, read with the transaction's connection
/// ([`Cached::load`](super::Cached::load) and the like).
///
/// ```
/// # use diesel::prelude::*;
/// # use diesel_memclone::sync::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
/// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
/// # #[diesel(table_name = users)]
/// # struct User { id: i32, name: String, status: String }
/// use diesel_memclone::sync::ConnectionPool;
/// use std::cell::{Cell, RefCell, RefMut};
///
/// /// A pool of one connection, counting its checkouts.
/// struct OneConnection(RefCell<SqliteConnection>, Cell<usize>);
///
/// impl ConnectionPool for OneConnection {
///     type Connection = SqliteConnection;
///     type Guard<'a> = RefMut<'a, SqliteConnection>;
///
///     fn connection(&self) -> diesel_memclone::Result<RefMut<'_, SqliteConnection>> {
///         self.1.set(self.1.get() + 1);
///         self.0.try_borrow_mut().map_err(diesel_memclone::Error::pool)
///     }
/// }
///
/// # fn main() -> diesel_memclone::Result<()> {
/// # let mut conn = SqliteConnection::establish(":memory:")?;
/// # diesel::connection::SimpleConnection::batch_execute(&mut conn, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
/// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');")?;
/// let pool = OneConnection(RefCell::new(conn), Cell::new(0));
/// let active = || users::table.filter(users::status.eq("active")).cached("active_users");
///
/// // A miss checks out a connection and gives it back once the database has answered...
/// let first: Vec<User> = active().load_from(&pool)?;
/// let ada: User = diesel_memclone::sync::find_from(&pool, 1)?;
/// assert_eq!((first.len(), ada.name.as_str()), (1, "Ada"));
/// assert_eq!(pool.1.get(), 2);
///
/// // ...a hit does not take one, even while the only connection is busy.
/// let busy = pool.0.borrow_mut();
/// let again: Vec<User> = active().load_from(&pool)?;
/// let ada: User = diesel_memclone::sync::find_from(&pool, 1)?;
/// assert_eq!((again.len(), ada.name.as_str()), (1, "Ada"));
/// assert_eq!(pool.1.get(), 2);
/// drop(busy);
/// # Ok(()) }
/// ```
pub trait ConnectionPool {
    /// The connection type: `PgConnection`, `MysqlConnection`, `SqliteConnection`...
    type Connection: diesel::Connection;

    /// What hands a connection out and takes it back to the pool when dropped: a guard that
    /// derefs to the connection (r2d2's `PooledConnection`, a `MutexGuard`, a `RefMut`...).
    type Guard<'a>: std::ops::DerefMut<Target = Self::Connection>
    where
        Self: 'a;

    /// A connection, or why there is none ([`Error::Pool`](crate::Error::Pool) for a pool's own
    /// errors).
    fn connection(&self) -> Result<Self::Guard<'_>>;
}

#[cfg(feature = "r2d2")]
#[cfg_attr(docsrs, doc(cfg(feature = "r2d2")))]
impl<C> ConnectionPool for diesel::r2d2::Pool<diesel::r2d2::ConnectionManager<C>>
where
    C: diesel::r2d2::R2D2Connection + Send + 'static,
{
    type Connection = C;
    type Guard<'a> = diesel::r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>;

    fn connection(&self) -> Result<Self::Guard<'_>> {
        self.get().map_err(crate::error::Error::pool)
    }
}

/// One connection shared by the threads that read through it: each miss holds the lock while
/// the database answers (a poisoned lock is [`Error::Pool`](crate::Error::Pool)).
impl<C: diesel::Connection> ConnectionPool for std::sync::Mutex<C> {
    type Connection = C;
    type Guard<'a>
        = std::sync::MutexGuard<'a, C>
    where
        C: 'a;

    fn connection(&self) -> Result<Self::Guard<'_>> {
        self.lock()
            .map_err(|_| crate::error::Error::pool("the connection's mutex is poisoned"))
    }
}

//! The crate's one error type.

use std::fmt;
use std::sync::Arc;

/// Everything that can go wrong in diesel-memclone.
///
/// Store failures never appear here on the read or write paths: the cache fails open (the
/// database answers and the write succeeds). They surface only where a caller asked the store
/// for something directly, such as building a cache against an unreachable Redis.
///
/// A missing row is `Error::Database(diesel::result::Error::NotFound)`, as in Diesel: test it
/// with [`is_not_found`](Error::is_not_found), or use the `Option`-returning reads
/// ([`find_optional`](crate::find_optional), a cached `load` of at most one row).
///
/// The error converts both ways with [`diesel::result::Error`], so `?` works in code that
/// returns Diesel's `QueryResult`: adding `.cached(..)` to a query there changes one line.
/// A not-found stays `NotFound` and a database error stays itself; the implementation of
/// `From<Error> for diesel::result::Error` below says what the others become.
///
/// ```
/// use diesel::prelude::*;
/// use diesel_async::RunQueryDsl;
/// use diesel_memclone::prelude::*;
/// # use diesel_async::{sync_connection_wrapper::SyncConnectionWrapper, AsyncConnection};
/// # use serde::{Deserialize, Serialize};
/// # diesel::table! { users (id) { id -> Integer, name -> Text } }
/// # #[derive(Queryable, Selectable, Serialize, Deserialize, MemClone)]
/// # #[diesel(table_name = users)]
/// # struct User { id: i32, name: String }
/// # type Conn = SyncConnectionWrapper<diesel::SqliteConnection>;
///
/// // Existing code that returns Diesel's QueryResult keeps its signature.
/// async fn name_of(conn: &mut Conn, user: i32) -> QueryResult<String> {
///     let row: User = users::table
///         .find(user)
///         .cached("user")              // the one added line
///         .get_result(conn)
///         .await?;
///     Ok(row.name)
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> QueryResult<()> {
/// # let mut conn = Conn::establish(":memory:").await.unwrap();
/// # diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
/// #     .execute(&mut conn).await?;
/// // A missing row is still Diesel's NotFound.
/// assert_eq!(name_of(&mut conn, 7).await, Err(diesel::result::Error::NotFound));
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The database returned an error (including [`diesel::result::Error::NotFound`]).
    Database(diesel::result::Error),
    /// A database connection could not be established.
    Connection(diesel::ConnectionError),
    /// A [`ConnectionPool`](crate::ConnectionPool) gave no connection (it timed out, is
    /// closed, or could not connect) to a read the cache could not answer. The pool's error is
    /// the [`source`](std::error::Error::source).
    Pool(Box<dyn std::error::Error + Send + Sync>),
    /// The store could not be reached or answered with an error.
    Store(StoreError),
    /// The cache was configured with a value it cannot use.
    Config(String),
    /// A memclone write (or [`crate::transaction()`]) ran inside a database transaction that
    /// memclone did not open, such as diesel-async's `conn.transaction(..)`: memclone cannot
    /// know when it commits, so it cannot defer the invalidation. Open the outermost
    /// transaction with [`crate::transaction()`] instead; diesel-async transactions nested in it
    /// are fine.
    UnmanagedTransaction,
    /// Waiting for another caller's fill lock timed out, and the lock's
    /// [`on_timeout`](crate::LockOptions::on_timeout) says to fail.
    LockTimeout,
    /// A [`crate::sync`] call ran inside the fill of another one (`load_with`, `fill_with`):
    /// the outer call drives the store while its fill runs, so the inner one cannot wait for
    /// it. Use plain Diesel inside a fill.
    NestedSyncCall,
}

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Database(e) => write!(f, "database error: {e}"),
            Error::Connection(e) => write!(f, "database connection error: {e}"),
            Error::Pool(e) => write!(f, "no database connection from the pool: {e}"),
            Error::Store(e) => write!(f, "cache store error: {e}"),
            Error::Config(msg) => write!(f, "invalid cache configuration: {msg}"),
            Error::LockTimeout => {
                f.write_str("timed out waiting for another caller to fill this cache entry")
            }
            Error::NestedSyncCall => f.write_str(
                "a diesel_memclone::sync call ran inside the fill of another one (load_with, \
                 fill_with), which drives the cache's store while its fill runs, so the inner \
                 call cannot wait for the store; use plain Diesel inside the fill",
            ),
            Error::UnmanagedTransaction => f.write_str(
                "a memclone write ran inside a database transaction that memclone did not open \
                 (such as diesel-async's `conn.transaction(..)`), so its cache invalidation \
                 cannot wait for the commit; \
                 write `diesel_memclone::transaction(conn, async |conn| { .. })` instead of \
                 `conn.transaction(async |conn| { .. })` for the outermost transaction \
                 (diesel-async transactions nested inside it are fine); on Diesel's \
                 synchronous connections, `diesel_memclone::sync::transaction(conn, |conn| { .. })`",
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Database(e) => Some(e),
            Error::Connection(e) => Some(e),
            Error::Pool(e) => Some(&**e),
            Error::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        Error::Database(e)
    }
}

/// Lets `?` turn a memclone error into Diesel's, in code that returns `QueryResult`.
///
/// * a database error, `NotFound` included, is returned as it was;
/// * every other error (the store, the configuration, a fill lock's timeout, an unmanaged
///   transaction, a connection error, a pool's error) becomes
///   [`QueryBuilderError`](diesel::result::Error::QueryBuilderError) holding the memclone error,
///   which `downcast_ref::<diesel_memclone::Error>()` gets back. Diesel uses that variant for
///   errors raised on the client side before the database answers, which is where these arise;
///   it is not a database error (callers that retry on `DatabaseError` kinds do not retry them)
///   and not a row-decoding error, as `DeserializationError` would suggest.
///
/// ```
/// use diesel_memclone::Error;
///
/// let not_found: diesel::result::Error = Error::Database(diesel::result::Error::NotFound).into();
/// assert_eq!(not_found, diesel::result::Error::NotFound);
///
/// let timeout: diesel::result::Error = Error::LockTimeout.into();
/// let diesel::result::Error::QueryBuilderError(inner) = &timeout else { unreachable!() };
/// assert!(matches!(inner.downcast_ref::<Error>(), Some(Error::LockTimeout)));
/// ```
impl From<Error> for diesel::result::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Database(e) => e,
            other => diesel::result::Error::QueryBuilderError(Box::new(other)),
        }
    }
}

impl From<diesel::ConnectionError> for Error {
    fn from(e: diesel::ConnectionError) -> Self {
        Error::Connection(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl Error {
    /// A [`Pool`](Error::Pool) error from its cause (a pool's error or a message), for
    /// implementations of [`ConnectionPool`](crate::ConnectionPool).
    pub fn pool(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Pool(cause.into())
    }

    /// True when no row matched: a `get_result`, `first`, [`find`](crate::find) or
    /// [`reload`](crate::reload) whose row does not exist (`Error::Database(NotFound)`).
    ///
    /// ```
    /// use diesel_memclone::Error;
    /// assert!(Error::Database(diesel::result::Error::NotFound).is_not_found());
    /// assert!(!Error::LockTimeout.is_not_found());
    /// ```
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Database(diesel::result::Error::NotFound))
    }
}

/// A failure of a [`Store`](crate::store::Store).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within the configured timeout.
    Timeout,
    /// The store is marked unavailable after a recent failure; it is retried after a cool-down.
    Unavailable,
    /// The store answered with an error, or the connection failed. The underlying error (for
    /// the Redis store, a `redis::RedisError`) is the [`source`](std::error::Error::source).
    Backend(Arc<dyn std::error::Error + Send + Sync>),
    /// The store refused an operation on one key (for example, a key that holds a value of
    /// another type) but works otherwise: the cache treats the key as a miss, not the store as
    /// down. The underlying error is the [`source`](std::error::Error::source).
    Key(Arc<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// A [`Backend`](StoreError::Backend) error from its cause (an error or a message).
    pub fn backend(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StoreError::Backend(cause.into().into())
    }

    /// A [`Key`](StoreError::Key) error from its cause (an error or a message).
    pub fn key(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StoreError::Key(cause.into().into())
    }

    /// True when the error is about the store as a whole (it timed out, is unreachable or
    /// failing), which makes the cache skip it for a while; false for an error about one key.
    pub fn is_outage(&self) -> bool {
        !matches!(self, StoreError::Key(_))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout => f.write_str("the store did not answer in time"),
            StoreError::Unavailable => f.write_str("the store is cooling down after a failure"),
            StoreError::Backend(cause) => write!(f, "{cause}"),
            StoreError::Key(cause) => write!(f, "the store refused a key: {cause}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Backend(cause) | StoreError::Key(cause) => Some(&**cause),
            StoreError::Timeout | StoreError::Unavailable => None,
        }
    }
}

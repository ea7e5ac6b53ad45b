//! The crate's one error type.

use std::fmt;
use std::sync::Arc;

/// Everything that can go wrong in diesel-memclone.
///
/// Store failures never appear here on the read or write paths: the cache fails open (the
/// database answers and the write succeeds). They surface only where a caller asked the store
/// for something directly, such as building a cache against an unreachable Redis.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The database returned an error (including [`diesel::result::Error::NotFound`]).
    Database(diesel::result::Error),
    /// A database connection could not be established.
    Connection(diesel::ConnectionError),
    /// The store could not be reached or answered with an error.
    Store(StoreError),
    /// The cache was configured with a value it cannot use.
    Config(String),
    /// A memclone write (or [`crate::transaction`]) ran inside a database transaction that
    /// memclone did not open, such as diesel-async's `conn.transaction(..)`: memclone cannot
    /// know when it commits, so it cannot defer the invalidation. Open the outermost
    /// transaction with [`crate::transaction`] instead; diesel-async transactions nested in it
    /// are fine.
    UnmanagedTransaction,
    /// Waiting for another caller's fill lock timed out, and the lock's
    /// [`on_timeout`](crate::LockOptions::on_timeout) says to fail.
    LockTimeout,
}

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Database(e) => write!(f, "database error: {e}"),
            Error::Connection(e) => write!(f, "database connection error: {e}"),
            Error::Store(e) => write!(f, "cache store error: {e}"),
            Error::Config(msg) => write!(f, "invalid cache configuration: {msg}"),
            Error::LockTimeout => {
                f.write_str("timed out waiting for another caller to fill this cache entry")
            }
            Error::UnmanagedTransaction => f.write_str(
                "a memclone write ran inside a database transaction that memclone did not open \
                 (such as diesel-async's `conn.transaction(..)`), so its cache invalidation \
                 cannot wait for the commit; \
                 write `diesel_memclone::transaction(conn, async |conn| { .. })` instead of \
                 `conn.transaction(async |conn| { .. })` for the outermost transaction \
                 (diesel-async transactions nested inside it are fine)",
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Database(e) => Some(e),
            Error::Connection(e) => Some(e),
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
    /// True when the database reported that no row matched.
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

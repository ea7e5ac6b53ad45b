//! Transactions: invalidate after the commit, leave nothing behind on rollback.

use crate::cache::{Cache, Policy};
use crate::error::Error;
use crate::model::RowKey;
use diesel_async::{AsyncConnection, TransactionManager};
use futures_util::future::BoxFuture;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

struct DeferredWrite {
    cache: Cache,
    tables: Vec<String>,
    rows: Option<Vec<RowKey>>,
    uncache: Vec<String>,
}

/// Invalidations recorded inside an open transaction, delivered after its commit.
struct Deferred {
    /// The connection whose transaction this is (its address).
    conn: usize,
    writes: Vec<DeferredWrite>,
    written_tables: BTreeSet<String>,
}

fn address<C>(conn: &C) -> usize {
    conn as *const C as *const () as usize
}

tokio::task_local! {
    static DEFERRED: Arc<Mutex<Deferred>>;
}

fn with_deferred<R>(f: impl FnOnce(&mut Deferred) -> R) -> Option<R> {
    DEFERRED
        .try_with(|d| f(&mut d.lock().unwrap_or_else(|e| e.into_inner())))
        .ok()
}

/// True when `conn` is inside a transaction (or its transaction state is broken, which is
/// treated the same way: nothing it reads may be cached).
pub(crate) fn in_transaction<C: AsyncConnection>(conn: &mut C) -> bool {
    let status = C::TransactionManager::transaction_manager_status_mut(conn);
    !matches!(status.transaction_depth(), Ok(None))
}

/// How a read on `conn` over `tables` may use the cache.
pub(crate) fn read_policy<C: AsyncConnection>(conn: &mut C, tables: &[String]) -> Policy {
    if !in_transaction(conn) {
        return Policy::ReadWrite;
    }
    // Not tied to the connection's address: a transaction opened on a pooled object and read
    // through the connection it derefs to must still bypass what it wrote.
    let wrote = with_deferred(|d| tables.iter().any(|t| d.written_tables.contains(t)));
    match wrote {
        Some(true) => Policy::Bypass,
        // Data read inside a transaction may be uncommitted or an old snapshot: serve fresh
        // entries, never store.
        _ => Policy::ReadOnly,
    }
}

/// What a write must do with its invalidation.
pub(crate) enum WriteTiming {
    Now,
    AfterCommit,
}

/// Decides, before a write runs, when its invalidation can be delivered.
pub(crate) fn write_timing<C: AsyncConnection>(conn: &mut C) -> Result<WriteTiming, Error> {
    if !in_transaction(conn) {
        return Ok(WriteTiming::Now);
    }
    // Only the transaction memclone opened on *this* connection can defer the invalidation.
    let here = address(conn);
    match with_deferred(|d| d.conn == here) {
        Some(true) => Ok(WriteTiming::AfterCommit),
        _ => Err(Error::UnmanagedTransaction),
    }
}

/// Records a write made inside a memclone transaction.
pub(crate) fn defer(
    cache: &Cache,
    tables: Vec<String>,
    rows: Option<Vec<RowKey>>,
    uncache: Vec<String>,
) {
    with_deferred(|d| {
        d.written_tables.extend(tables.iter().cloned());
        d.writes.push(DeferredWrite {
            cache: cache.clone(),
            tables,
            rows,
            uncache,
        });
    });
}

/// Runs `body` in a database transaction whose memclone writes invalidate after the commit.
///
/// Inside, a cached read of a table this transaction wrote goes to the database, and nothing
/// read inside is stored for others. A rollback (an `Err` from `body`) leaves no trace in the
/// cache. Nested calls become savepoints; their writes are delivered with the outermost commit.
///
/// ```
/// # use diesel::prelude::*;
/// # use diesel_async::{sync_connection_wrapper::SyncConnectionWrapper, AsyncConnection, RunQueryDsl};
/// # diesel::table! { users (id) { id -> Integer, name -> Text } }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> diesel_memclone::Result<()> {
/// # let mut conn = SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
/// # diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)").execute(&mut conn).await?;
/// use diesel_memclone as memclone;
/// memclone::transaction(&mut conn, |conn| {
///     Box::pin(async move {
///         memclone::insert_into(users::table)
///             .values((users::id.eq(1), users::name.eq("Ada")))
///             .execute(conn)
///             .await?;
///         Ok::<_, memclone::Error>(())
///     })
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn transaction<C, R, E, F>(conn: &mut C, body: F) -> Result<R, E>
where
    C: AsyncConnection,
    F: for<'r> FnOnce(&'r mut C) -> BoxFuture<'r, Result<R, E>> + Send,
    E: From<Error> + Send,
    R: Send,
{
    let here = address(conn);
    let nested = with_deferred(|d| d.conn == here).unwrap_or(false);
    if nested {
        return run(conn, body).await.0;
    }
    if in_transaction(conn) {
        // A savepoint's "commit" is not a commit: invalidating then would be too early.
        return Err(Error::UnmanagedTransaction.into());
    }
    let deferred = Arc::new(Mutex::new(Deferred {
        conn: here,
        writes: Vec::new(),
        written_tables: BTreeSet::new(),
    }));
    // Dropped before the invalidations are delivered (a cancelled future, even during the
    // commit), the guard records them as undelivered: too much invalidation is harmless.
    let mut guard = DeferredGuard(Some(deferred.clone()));
    let (result, body_succeeded) = DEFERRED.scope(deferred.clone(), run(conn, body)).await;
    // Invalidate unless the body failed (a rollback): also when the commit itself reported an
    // error, since it may have committed all the same.
    if body_succeeded {
        loop {
            let next = deferred
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .writes
                .pop();
            let Some(write) = next else { break };
            let cache = &write.cache;
            cache
                .invalidate_written(&write.tables, write.rows.as_deref())
                .await;
            if !write.uncache.is_empty() {
                cache.uncache(&write.uncache).await;
            }
        }
    }
    guard.0 = None;
    result
}

/// Marks a transaction's remaining deferred invalidations undelivered when dropped armed.
struct DeferredGuard(Option<Arc<Mutex<Deferred>>>);

impl Drop for DeferredGuard {
    fn drop(&mut self) {
        if let Some(deferred) = self.0.take() {
            let writes =
                std::mem::take(&mut deferred.lock().unwrap_or_else(|e| e.into_inner()).writes);
            for write in writes {
                write.cache.mark_undelivered(&write.tables);
            }
        }
    }
}

/// Runs `body` in a transaction (or a savepoint); also says whether the body succeeded.
async fn run<C, R, E, F>(conn: &mut C, body: F) -> (Result<R, E>, bool)
where
    C: AsyncConnection,
    F: for<'r> FnOnce(&'r mut C) -> BoxFuture<'r, Result<R, E>> + Send,
    E: From<Error> + Send,
{
    if let Err(error) = C::TransactionManager::begin_transaction(conn).await {
        return (Err(Error::from(error).into()), false);
    }
    match body(conn).await {
        Ok(value) => match C::TransactionManager::commit_transaction(conn).await {
            Ok(()) => (Ok(value), true),
            Err(error) => (Err(Error::from(error).into()), true),
        },
        Err(error) => {
            // The body's error matters more than a failed rollback.
            let _ = C::TransactionManager::rollback_transaction(conn).await;
            (Err(error), false)
        }
    }
}

//! Transactions: invalidate after the commit, leave nothing behind on rollback.

use crate::cache::{Cache, Policy};
use crate::error::Error;
use crate::model::RowKey;
use diesel_async::{AsyncConnection, TransactionManager};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

struct DeferredWrite {
    cache: Cache,
    tables: Vec<String>,
    rows: Option<Vec<RowKey>>,
    uncache: Vec<String>,
}

/// Which connection a transaction is open on: the address of the connection's transaction
/// manager status.
///
/// Sound because:
/// - the status lives inside the real connection (inline in `AsyncPgConnection` and
///   `AsyncMysqlConnection`, behind the `Arc` of `SyncConnectionWrapper`), and diesel-async's
///   pool wrappers (bb8, deadpool, mobc) reach it through their deref: a pooled object and the
///   plain connection a helper receives from it give the same id, unlike their own addresses;
/// - an id is compared only while the transaction that recorded it is open, that is while
///   [`transaction`] holds the connection's `&mut` borrow: the connection cannot move, be
///   dropped or go back to its pool meanwhile, so no other live connection (in this task or
///   elsewhere) has its status at that address;
/// - the record is task-local and scoped to the transaction's future: another task, a task
///   spawned by the body, or the next user of a pooled connection never sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ConnectionId(usize);

impl ConnectionId {
    fn of<C: AsyncConnection>(conn: &mut C) -> Self {
        let status = C::TransactionManager::transaction_manager_status_mut(conn);
        ConnectionId(std::ptr::from_mut(status).addr())
    }

    /// The same for a synchronous connection: the status lives inside the connection
    /// (`PgConnection`, `MysqlConnection`, `SqliteConnection`), and r2d2's `PooledConnection`
    /// reaches it through its deref, so a pooled handle and the plain connection agree.
    fn of_sync<C: diesel::Connection>(conn: &mut C) -> Self {
        use diesel::connection::TransactionManager as _;
        let status = C::TransactionManager::transaction_manager_status_mut(conn);
        ConnectionId(std::ptr::from_mut(status).addr())
    }
}

/// Invalidations recorded inside an open transaction, delivered after its commit.
struct Deferred {
    conn: ConnectionId,
    writes: Vec<DeferredWrite>,
    written_tables: BTreeSet<String>,
    /// The memclone transaction (on another connection) this one was opened inside.
    outer: Option<OpenTransaction>,
}

/// A memclone transaction open in this task.
#[derive(Clone)]
pub(crate) struct OpenTransaction(Arc<Mutex<Deferred>>);

impl OpenTransaction {
    fn lock(&self) -> std::sync::MutexGuard<'_, Deferred> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a write made in this transaction, to be invalidated after its commit.
    pub(crate) fn defer(
        &self,
        cache: &Cache,
        tables: Vec<String>,
        rows: Option<Vec<RowKey>>,
        uncache: Vec<String>,
    ) -> usize {
        let mut deferred = self.lock();
        deferred.written_tables.extend(tables.iter().cloned());
        deferred.writes.push(DeferredWrite {
            cache: cache.clone(),
            tables,
            rows,
            uncache,
        });
        deferred.writes.len() - 1
    }

    /// Narrows the write recorded at `index` (before its statement ran, with every row of its
    /// tables) to the rows the statement returned.
    pub(crate) fn narrow(&self, index: usize, rows: Vec<RowKey>) {
        if let Some(write) = self.lock().writes.get_mut(index) {
            write.rows = Some(rows);
        }
    }
}

tokio::task_local! {
    /// The innermost memclone transaction open in this task; the others are its `outer` chain.
    static INNERMOST: OpenTransaction;
}

std::thread_local! {
    /// The innermost memclone transaction open by synchronous code on this thread
    /// ([`sync_transaction`]): a synchronous body runs on its caller's thread from start to end,
    /// so the thread is its scope as the task is an async body's.
    static SYNC_INNERMOST: std::cell::RefCell<Option<OpenTransaction>> =
        const { std::cell::RefCell::new(None) };
}

/// The memclone transaction open on `conn` in this task, however deep among transactions on
/// other connections.
fn open_transaction_of(conn: ConnectionId) -> Option<OpenTransaction> {
    open_among(INNERMOST.try_with(OpenTransaction::clone).ok(), conn)
}

/// The memclone transaction open on `conn` by synchronous code on this thread.
fn sync_open_transaction_of(conn: ConnectionId) -> Option<OpenTransaction> {
    open_among(SYNC_INNERMOST.with(|t| t.borrow().clone()), conn)
}

/// The transaction on `conn` in the chain that starts at `innermost`.
fn open_among(innermost: Option<OpenTransaction>, conn: ConnectionId) -> Option<OpenTransaction> {
    let mut next = innermost;
    while let Some(transaction) = next {
        let outer = {
            let deferred = transaction.lock();
            if deferred.conn == conn {
                None
            } else {
                Some(deferred.outer.clone())
            }
        };
        match outer {
            None => return Some(transaction),
            Some(outer) => next = outer,
        }
    }
    None
}

/// True when `conn` is inside a transaction (or its transaction state is broken, which is
/// treated the same way: nothing it reads may be cached).
pub(crate) fn in_transaction<C: AsyncConnection>(conn: &mut C) -> bool {
    let status = C::TransactionManager::transaction_manager_status_mut(conn);
    !matches!(status.transaction_depth(), Ok(None))
}

/// True when the synchronous `conn` is inside a transaction (or its state is broken).
pub(crate) fn sync_in_transaction<C: diesel::Connection>(conn: &mut C) -> bool {
    use diesel::connection::TransactionManager as _;
    let status = C::TransactionManager::transaction_manager_status_mut(conn);
    !matches!(status.transaction_depth(), Ok(None))
}

/// How a read on `conn` over `tables` may use the cache.
pub(crate) fn read_policy<C: AsyncConnection>(conn: &mut C, tables: &[String]) -> Policy {
    if !in_transaction(conn) {
        return Policy::ReadWrite;
    }
    policy_in_transaction(open_transaction_of(ConnectionId::of(conn)), tables)
}

/// How a read on the synchronous `conn` over `tables` may use the cache.
pub(crate) fn sync_read_policy<C: diesel::Connection>(conn: &mut C, tables: &[String]) -> Policy {
    if !sync_in_transaction(conn) {
        return Policy::ReadWrite;
    }
    policy_in_transaction(
        sync_open_transaction_of(ConnectionId::of_sync(conn)),
        tables,
    )
}

/// How a read inside a transaction (`open`, if memclone opened it) may use the cache.
fn policy_in_transaction(open: Option<OpenTransaction>, tables: &[String]) -> Policy {
    let wrote = open.is_some_and(|transaction| {
        let deferred = transaction.lock();
        tables.iter().any(|t| deferred.written_tables.contains(t))
    });
    if wrote {
        Policy::Bypass
    } else {
        // Data read inside a transaction may be uncommitted or an old snapshot: serve fresh
        // entries, never store.
        Policy::ReadOnly
    }
}

/// What a write must do with its invalidation.
pub(crate) enum WriteTiming {
    Now,
    /// Deliver it after the commit of this transaction.
    AfterCommit(OpenTransaction),
}

/// Decides, before a write runs, when its invalidation can be delivered.
pub(crate) fn write_timing<C: AsyncConnection>(conn: &mut C) -> Result<WriteTiming, Error> {
    if !in_transaction(conn) {
        return Ok(WriteTiming::Now);
    }
    // Only a transaction memclone opened on this very connection can defer the invalidation:
    // nothing tells memclone when any other one commits.
    match open_transaction_of(ConnectionId::of(conn)) {
        Some(transaction) => Ok(WriteTiming::AfterCommit(transaction)),
        None => Err(Error::UnmanagedTransaction),
    }
}

/// [`write_timing`] for a synchronous connection.
pub(crate) fn sync_write_timing<C: diesel::Connection>(conn: &mut C) -> Result<WriteTiming, Error> {
    if !sync_in_transaction(conn) {
        return Ok(WriteTiming::Now);
    }
    match sync_open_transaction_of(ConnectionId::of_sync(conn)) {
        Some(transaction) => Ok(WriteTiming::AfterCommit(transaction)),
        None => Err(Error::UnmanagedTransaction),
    }
}

/// What a transaction body must be: an async closure (`async |conn| { .. }`) whose future is
/// `Send`.
///
/// The same device as diesel-async 0.9's `AsyncConnection::transaction` bound: `AsyncFnOnce`
/// alone cannot say that the future is `Send`.
pub trait TransactionBody<T, R>:
    AsyncFnOnce(T) -> R + FnOnce(T) -> <Self as TransactionBody<T, R>>::Fut
{
    /// The future the body returns.
    type Fut: Future<Output = R>;
}

impl<F, T, Fut, R> TransactionBody<T, R> for F
where
    F: AsyncFnOnce(T) -> R + FnOnce(T) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

/// Runs `body` in a database transaction whose memclone writes invalidate after the commit.
///
/// Inside, a cached read of a table this transaction wrote goes to the database, and nothing
/// read inside is stored for others. A rollback (an `Err` from `body`) leaves no trace in the
/// cache. Nested calls become savepoints; their writes are delivered with the outermost commit.
///
/// The transaction belongs to the connection, not to the handle: `conn` may be a pooled
/// connection (bb8, deadpool) and the body may pass it on to helpers taking the plain
/// connection type (`&mut AsyncPgConnection`), whose memclone writes are deferred all the same.
/// diesel-async's own `conn.transaction(..)` may be nested inside (its writes wait for this
/// commit), but memclone writes are refused with [`Error::UnmanagedTransaction`] in an
/// outermost transaction memclone did not open: it cannot know when that one commits.
///
/// `body` is an async closure, as for diesel-async 0.9's `transaction`: it may borrow from
/// its surroundings. (A closure returning `Box::pin(async move { .. })` is not accepted: Rust
/// infers a plain closure's signature from `Fn` bounds only, not from the `AsyncFnOnce` one an
/// async closure needs; write `async move |conn| { .. }` instead.)
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
/// memclone::transaction(&mut conn, async |conn| {
///     memclone::insert_into(users::table)
///         .values((users::id.eq(1), users::name.eq("Ada")))
///         .execute(conn)
///         .await?;
///     Ok::<_, memclone::Error>(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn transaction<C, R, E, F>(conn: &mut C, body: F) -> Result<R, E>
where
    C: AsyncConnection,
    for<'r> F: AsyncFnOnce(&'r mut C) -> Result<R, E>
        + TransactionBody<&'r mut C, Result<R, E>, Fut: Send>
        + Send,
    E: From<Error> + Send,
    R: Send,
{
    let here = ConnectionId::of(conn);
    if open_transaction_of(here).is_some() {
        // Nested on the same connection: a savepoint of the open transaction.
        return run(conn, body).await.0;
    }
    if in_transaction(conn) {
        // A transaction memclone did not open: its commit would go unseen, and a savepoint's
        // "commit" is not a commit.
        return Err(Error::UnmanagedTransaction.into());
    }
    let transaction = OpenTransaction(Arc::new(Mutex::new(Deferred {
        conn: here,
        writes: Vec::new(),
        written_tables: BTreeSet::new(),
        outer: INNERMOST.try_with(OpenTransaction::clone).ok(),
    })));
    // Dropped before the invalidations are delivered (a cancelled future, even during the
    // commit), the guard records them as undelivered: too much invalidation is harmless.
    let mut guard = DeferredGuard(Some(transaction.clone()));
    let (result, body_succeeded) = INNERMOST.scope(transaction.clone(), run(conn, body)).await;
    // Invalidate unless the body failed (a rollback): also when the commit itself reported an
    // error, since it may have committed all the same.
    if body_succeeded {
        deliver(&transaction).await;
    }
    guard.0 = None;
    result
}

/// Delivers a committed transaction's invalidations.
async fn deliver(transaction: &OpenTransaction) {
    loop {
        let next = transaction.lock().writes.pop();
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

/// Runs `body` in a database transaction of the synchronous `conn` whose memclone writes
/// invalidate after the commit: [`transaction`] for `diesel::Connection`s.
///
/// The same rules: inside, a cached read of a table this transaction wrote goes to the
/// database and nothing read inside is stored; a rollback (an `Err` from `body`) leaves no
/// trace; nested calls become savepoints; Diesel's own `conn.transaction(..)` may be nested
/// inside, but memclone writes in an outermost transaction memclone did not open are refused
/// with [`Error::UnmanagedTransaction`]. `conn` may be an r2d2 `PooledConnection`.
///
/// ```
/// # use diesel::prelude::*;
/// # diesel::table! { users (id) { id -> Integer, name -> Text } }
/// # fn main() -> diesel_memclone::Result<()> {
/// # let mut conn = diesel::SqliteConnection::establish(":memory:")?;
/// # diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)").execute(&mut conn)?;
/// use diesel_memclone::sync as memclone;
/// memclone::transaction(&mut conn, |conn| {
///     memclone::insert_into(users::table)
///         .values((users::id.eq(1), users::name.eq("Ada")))
///         .execute(conn)?;
///     Ok::<_, diesel_memclone::Error>(())
/// })?;
/// # Ok(()) }
/// ```
pub fn sync_transaction<C, R, E, F>(conn: &mut C, body: F) -> Result<R, E>
where
    C: diesel::Connection,
    F: FnOnce(&mut C) -> Result<R, E>,
    E: From<Error>,
{
    let here = ConnectionId::of_sync(conn);
    if sync_open_transaction_of(here).is_some() {
        return run_sync(conn, body).0;
    }
    if sync_in_transaction(conn) {
        return Err(Error::UnmanagedTransaction.into());
    }
    // Inside another synchronous call's fill the invalidation could not be delivered after the
    // commit: refuse before the transaction begins rather than report an error for committed
    // work.
    if crate::sync::driving() {
        return Err(Error::NestedSyncCall.into());
    }
    let outer = SYNC_INNERMOST.with(|t| t.borrow().clone());
    let transaction = OpenTransaction(Arc::new(Mutex::new(Deferred {
        conn: here,
        writes: Vec::new(),
        written_tables: BTreeSet::new(),
        outer: outer.clone(),
    })));
    let mut guard = DeferredGuard(Some(transaction.clone()));
    let (result, body_succeeded) = {
        // Restores the outer transaction even if the body panics.
        struct Restore(Option<OpenTransaction>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let outer = self.0.take();
                SYNC_INNERMOST.with(|t| *t.borrow_mut() = outer);
            }
        }
        let _restore = Restore(outer);
        SYNC_INNERMOST.with(|t| *t.borrow_mut() = Some(transaction.clone()));
        run_sync(conn, body)
    };
    if body_succeeded {
        // Not delivered (called inside another sync call's fill): the armed guard records the
        // invalidations as undelivered, so the next calls deliver them.
        crate::sync::block_on(async {
            deliver(&transaction).await;
            Ok(())
        })
        .map_err(E::from)?;
    }
    guard.0 = None;
    result
}

/// [`run`] for a synchronous connection.
fn run_sync<C, R, E, F>(conn: &mut C, body: F) -> (Result<R, E>, bool)
where
    C: diesel::Connection,
    F: FnOnce(&mut C) -> Result<R, E>,
    E: From<Error>,
{
    use diesel::connection::TransactionManager as _;
    if let Err(error) = C::TransactionManager::begin_transaction(conn) {
        return (Err(Error::from(error).into()), false);
    }
    match body(&mut *conn) {
        Ok(value) => match C::TransactionManager::commit_transaction(conn) {
            Ok(()) => (Ok(value), true),
            Err(error) => (Err(Error::from(error).into()), true),
        },
        Err(error) => {
            let _ = C::TransactionManager::rollback_transaction(conn);
            (Err(error), false)
        }
    }
}

/// Marks a transaction's remaining deferred invalidations undelivered when dropped armed.
struct DeferredGuard(Option<OpenTransaction>);

impl Drop for DeferredGuard {
    fn drop(&mut self) {
        if let Some(transaction) = self.0.take() {
            let writes = std::mem::take(&mut transaction.lock().writes);
            for write in writes {
                write.cache.mark_undelivered(&write.tables);
                let keys: Vec<String> = write
                    .uncache
                    .iter()
                    .map(|k| write.cache.custom_key(k))
                    .collect();
                write.cache.mark_unremoved(&keys);
            }
        }
    }
}

/// Runs `body` in a transaction (or a savepoint); also says whether the body succeeded.
async fn run<C, R, E, F>(conn: &mut C, body: F) -> (Result<R, E>, bool)
where
    C: AsyncConnection,
    for<'r> F: AsyncFnOnce(&'r mut C) -> Result<R, E>
        + TransactionBody<&'r mut C, Result<R, E>, Fut: Send>
        + Send,
    E: From<Error> + Send,
{
    if let Err(error) = C::TransactionManager::begin_transaction(conn).await {
        return (Err(Error::from(error).into()), false);
    }
    match body(&mut *conn).await {
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

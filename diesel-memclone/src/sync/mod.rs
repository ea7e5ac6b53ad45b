//! The same cache for synchronous Diesel: `diesel::Connection`s (`PgConnection`,
//! `MysqlConnection`, `SqliteConnection`) and r2d2's pooled connections.
//!
//! Same names as the async API, as `moka::sync` beside `moka::future`: [`CachedDsl`] and
//! [`Cached`], [`insert_into`], [`update`], [`delete`], [`replace_into`], [`write()`],
//! [`transaction`], [`find`] and the rest. They share the async API's [`Cache`](crate::Cache), keys and
//! contract: a sync and an async process on one Redis see each other's writes with the same
//! guarantees.
//!
//! The cache's logic is written once, as futures. A synchronous call runs the Diesel statement
//! itself, on the caller's thread and connection, inside the same read-through and
//! invalidation code, which it drives with a `block_on` on the caller's thread: on a
//! current-thread runtime of that thread's own, created on its first call, with (for a Redis
//! store) a Redis connection of that thread's own. The reply to a hit is then read by the
//! thread that waits for it, as in async code, instead of being handed over from another thread
//! (a hit costs about 1.0x the async API's, against 1.35x when one internal thread read every
//! reply). A thread's runtime runs only while the thread is inside a call, and nothing other
//! threads need lives on it, so a caller's blocking statement holds up nobody else's store
//! calls. At most [`MAX_THREAD_RUNTIMES`] threads get one; the runtime and its connections
//! close when the thread ends. Background work (the near tier's stream, invalidation retries),
//! the store's shared connections, and stores other than the crate's own live on an internal
//! runtime with one worker thread, created on first need. A near hit
//! ([`NearCache`](crate::NearCache)) is answered before any runtime is entered. The program needs
//! no runtime of its own.
//!
//! Where it may be called:
//! * plain threads and `tokio::task::spawn_blocking`: as any blocking call;
//! * a worker thread of a multi-thread tokio runtime: it works, through
//!   `tokio::task::block_in_place` (the worker hands its other tasks to another thread), except
//!   in a `tokio::task::LocalSet`, where tokio refuses `block_in_place` with a panic (no public
//!   tokio API tells a `LocalSet` apart beforehand): use `spawn_blocking` there;
//! * the thread of a current-thread runtime (`#[tokio::main(flavor = "current_thread")]`,
//!   `#[tokio::test]`): it works and blocks that runtime while it runs, like any blocking
//!   call. It polls on this thread with the internal runtime's worker driving the store's
//!   shared connections (tokio cannot nest a runtime there). If that runtime's own tasks drive
//!   the store's connections (a Redis store first used by async code on it), they cannot answer
//!   meanwhile: the call does not deadlock, the store times out ([`CacheBuilder::store_timeout`](crate::CacheBuilder::store_timeout)) and the
//!   cache is bypassed as in a Redis outage. Prefer `spawn_blocking` or the async API there;
//! * inside the fill of another synchronous call (`load_with`, `fill_with`), whose `block_on`
//!   is still running: [`Error::NestedSyncCall`], never a
//!   deadlock (use plain Diesel inside a fill). This is the one error of the functions below
//!   that only return `()` in the async API ([`invalidate`], `BlockingCache::uncache`, ...).
//!
//! ```
//! use diesel::prelude::*;
//! use diesel_memclone::sync::prelude::*;
//! use diesel_memclone::sync as memclone;
//! use serde::{Deserialize, Serialize};
//!
//! diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
//!
//! #[derive(Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone, Debug)]
//! #[diesel(table_name = users)]
//! struct User { id: i32, name: String, status: String }
//!
//! # fn main() -> diesel_memclone::Result<()> {
//! let mut conn = diesel::SqliteConnection::establish(":memory:")?;
//! # diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL)")
//! #     .execute(&mut conn)?;
//! let ada = User { id: 1, name: "Ada".into(), status: "active".into() };
//! memclone::insert_into(users::table).values(&ada).execute(&mut conn)?;
//!
//! let active: Vec<User> = users::table
//!     .filter(users::status.eq("active"))
//!     .cached("active")
//!     .load(&mut conn)?;
//! assert_eq!(active.len(), 1);
//! let one: User = memclone::find(&mut conn, 1)?;
//! assert_eq!(one.name, "Ada");
//!
//! memclone::update(users::table.filter(users::id.eq(1)))
//!     .set(users::name.eq("Ada L."))
//!     .execute(&mut conn)?;
//! assert_eq!(User::find_cached_blocking(&mut conn, 1)?.name, "Ada L.");
//! # Ok(()) }
//! ```

mod entity;
mod pool;
mod query;
mod write;

use crate::error::{Error, Result};
use std::cell::{Cell, OnceCell};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

pub use crate::transaction::sync_transaction as transaction;
pub use entity::{
    find, find_from, find_optional, find_optional_from, invalidate, reload, BlockingCache,
};
pub use pool::ConnectionPool;
pub use query::{Cached, CachedDsl};
pub use write::{delete, insert_into, replace_into, update, write, Write};

/// The traits and macros synchronous code needs: `use diesel_memclone::sync::prelude::*;`.
pub mod prelude {
    pub use super::CachedDsl;
    pub use crate::{CacheValue, MemClone};
}

/// The internal runtime: a multi-thread runtime with one worker, created on first need. It
/// drives what outlives one call or serves every thread: the near tier's change stream,
/// invalidation retries, and the store connections of threads without a runtime of their own
/// (see [`MAX_THREAD_RUNTIMES`]) or of stores that cannot use one.
struct Driver {
    runtime: Runtime,
}

fn driver() -> &'static Driver {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    DRIVER.get_or_init(|| Driver {
        runtime: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("memclone-sync")
            .enable_all()
            .build()
            .expect("diesel-memclone could not start its runtime"),
    })
}

/// How many threads at most get a runtime of their own for their synchronous calls (and, on it,
/// one connection to each Redis server store they use). Further threads share the internal
/// runtime's worker thread and the store's connections, and pay for it: a Redis hit costs about
/// 1.35x the async API's hit there, against about 1.0x on a thread's own runtime.
///
/// A thread's own runtime is a current-thread tokio runtime that only this thread drives, while
/// it is inside a synchronous call: the connections opened on it serve this thread alone, so a
/// thread blocked in a database statement stalls nobody else's cache calls. The runtime and its
/// connections are closed when the thread ends.
pub const MAX_THREAD_RUNTIMES: usize = 64;

/// How many threads hold a runtime of their own now.
static THREAD_RUNTIMES: AtomicUsize = AtomicUsize::new(0);

/// One thread's own runtime; gives its place back when the thread ends.
struct ThreadRuntime(Runtime);

impl Drop for ThreadRuntime {
    fn drop(&mut self) {
        THREAD_RUNTIMES.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ThreadRuntime {
    /// A runtime for this thread, if fewer than [`MAX_THREAD_RUNTIMES`] threads hold one.
    fn new() -> Option<Self> {
        THREAD_RUNTIMES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < MAX_THREAD_RUNTIMES).then_some(held + 1)
            })
            .ok()?;
        let built = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        match built {
            Ok(runtime) => Some(ThreadRuntime(runtime)),
            Err(error) => {
                // Out of file descriptors, say: this thread uses the internal runtime instead.
                THREAD_RUNTIMES.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(%error, "diesel-memclone could not start a thread's runtime");
                None
            }
        }
    }
}

/// Runs `future` on this thread's own runtime, or else on the internal one (the caller polls,
/// the internal runtime's worker drives the I/O).
fn run_on_this_thread<F: Future>(future: F) -> F::Output {
    DRIVING.set(true);
    let _driving = NotDriving;
    let mut future = std::pin::pin!(future);
    // `try_with`: from another thread-local's destructor, this thread's runtime may be gone.
    let ran = OWN_RUNTIME.try_with(|own| {
        if own.get().is_none() {
            if let Some(runtime) = ThreadRuntime::new() {
                let _ = own.set(runtime);
            }
        }
        own.get().map(|ThreadRuntime(runtime)| {
            ON_OWN_RUNTIME.set(true);
            let _off = OffOwnRuntime;
            runtime.block_on(future.as_mut())
        })
    });
    match ran {
        Ok(Some(output)) => output,
        _ => driver().runtime.block_on(future),
    }
}

/// Runs `future` to completion on the calling thread: on the thread's own runtime (see
/// [`MAX_THREAD_RUNTIMES`]), else with the internal runtime as the current runtime.
///
/// Inside another synchronous call (its `load_with` or `fill_with` fill, which runs while that
/// call drives the runtime) it cannot drive the runtime again, and returns an error instead of
/// deadlocking.
pub(crate) fn block_on<T, F: Future<Output = Result<T>>>(future: F) -> Result<T> {
    if DRIVING.get() {
        return Err(Error::NestedSyncCall);
    }
    match Handle::try_current() {
        // A plain thread: the usual case.
        Err(_) => run_on_this_thread(future),
        // A worker (or a `spawn_blocking` thread) of a multi-thread runtime: the worker hands
        // its queue to another thread first, so that nothing waits on this one.
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| run_on_this_thread(future))
        }
        // A current-thread runtime's thread, or one of its `spawn_blocking` threads: tokio
        // would refuse to nest `block_on` on the former, and the two cannot be told apart;
        // poll on this thread with a plain parking loop instead, the internal runtime's worker
        // driving the I/O.
        Ok(_) => {
            // Marked as driving too: a nested call from this call's fill would otherwise see
            // the internal (multi-thread) runtime entered and panic in `block_in_place`.
            DRIVING.set(true);
            let _driving = NotDriving;
            let _entered = driver().runtime.enter();
            park_until_ready(tokio::task::unconstrained(future))
        }
    }
}

/// True while this thread runs a synchronous call on its own runtime: a store may then use a
/// connection of this thread's own (opened on that runtime), and must open nothing there that
/// other threads share.
pub(crate) fn on_own_runtime() -> bool {
    ON_OWN_RUNTIME.get()
}

/// Where background work goes (the near tier's stream, invalidation retries): the internal
/// runtime during a synchronous call on a thread's own runtime, which runs only while that
/// thread is inside a call; else the current runtime, if any.
pub(crate) fn background_runtime() -> Option<Handle> {
    if on_own_runtime() {
        return Some(driver().runtime.handle().clone());
    }
    Handle::try_current().ok()
}

/// Polls `future` with the internal runtime as the current runtime while this thread runs a
/// synchronous call on its own runtime, and as if it did not: whatever it spawns or opens (a
/// connection another thread may use next) then lives on the internal runtime, not on a runtime
/// that is driven only while this thread is inside a call. Elsewhere it polls `future` as it is.
pub(crate) async fn in_shared_runtime<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|context| {
        if !on_own_runtime() {
            return future.as_mut().poll(context);
        }
        let _entered = driver().runtime.enter();
        // Inside, as on any thread without one: a Redis store uses its shared connections.
        ON_OWN_RUNTIME.set(false);
        let _back = BackOnOwnRuntime;
        future.as_mut().poll(context)
    })
    .await
}

/// Sets `ON_OWN_RUNTIME` again when dropped (also on a panic).
struct BackOnOwnRuntime;

impl Drop for BackOnOwnRuntime {
    fn drop(&mut self) {
        ON_OWN_RUNTIME.set(true);
    }
}

/// True while this thread is inside a synchronous call's `block_on` (a nested call would be
/// refused).
pub(crate) fn driving() -> bool {
    DRIVING.get()
}

std::thread_local! {
    /// True while this thread is inside a synchronous call's `block_on` (`run_on_this_thread`).
    static DRIVING: Cell<bool> = const { Cell::new(false) };
    /// True while this thread drives its own runtime (inside `run_on_this_thread`).
    static ON_OWN_RUNTIME: Cell<bool> = const { Cell::new(false) };
    /// This thread's own runtime, once it has one.
    static OWN_RUNTIME: OnceCell<ThreadRuntime> = const { OnceCell::new() };
}

/// Clears `ON_OWN_RUNTIME` when dropped (also on a panic).
struct OffOwnRuntime;

impl Drop for OffOwnRuntime {
    fn drop(&mut self) {
        ON_OWN_RUNTIME.set(false);
    }
}

/// Clears `DRIVING` when dropped (also on a panic).
struct NotDriving;

impl Drop for NotDriving {
    fn drop(&mut self) {
        DRIVING.set(false);
    }
}

/// Wakes a parked thread.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `future` on this thread, parking it between wake-ups.
fn park_until_ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut context = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

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
//! invalidation code, which it drives with a `block_on` on the caller's thread. The store's
//! connections and background work (the near tier's stream, invalidation retries) live on an
//! internal runtime with one worker thread, created on first use, so that a caller's blocking
//! statement never holds up another thread's store calls. The program needs no runtime of its
//! own.
//!
//! Where it may be called:
//! * plain threads and `tokio::task::spawn_blocking`: as any blocking call;
//! * a worker thread of a multi-thread tokio runtime: it works, through
//!   `tokio::task::block_in_place` (the worker hands its other tasks to another thread), except
//!   in a `tokio::task::LocalSet`, where tokio refuses `block_in_place` with a panic (no public
//!   tokio API tells a `LocalSet` apart beforehand): use `spawn_blocking` there;
//! * the thread of a current-thread runtime (`#[tokio::main(flavor = "current_thread")]`,
//!   `#[tokio::test]`): it works and blocks that runtime while it runs, like any blocking
//!   call. If that runtime's own tasks drive the store's connections (a Redis store first used
//!   by async code on it), they cannot answer meanwhile: the call does not deadlock, the store
//!   times out ([`CacheBuilder::store_timeout`](crate::CacheBuilder::store_timeout)) and the
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
mod query;
mod write;

use crate::error::{Error, Result};
use std::cell::Cell;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

pub use crate::transaction::sync_transaction as transaction;
pub use entity::{find, find_optional, invalidate, reload, BlockingCache};
pub use query::{Cached, CachedDsl};
pub use write::{delete, insert_into, replace_into, update, write, Write};

/// The traits and macros synchronous code needs: `use diesel_memclone::sync::prelude::*;`.
pub mod prelude {
    pub use super::CachedDsl;
    pub use crate::{CacheValue, MemClone};
}

/// The internal runtime: a multi-thread runtime with one worker, which drives the store's
/// connections, timers and background work (the near tier's stream, invalidation retries)
/// while callers' futures run on the callers' own threads. A caller's blocking Diesel statement
/// therefore holds up nobody else.
///
/// (A current-thread runtime driven by each caller in turn was measured 1.01x the async hit
/// against 1.35x for this one, but its caller holds the runtime, and with it every other
/// thread's store calls, while its statement runs: a slow query stalls the cache for every
/// thread, and a row lock held by a thread that waits for the store deadlocks.)
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

impl Driver {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        DRIVING.set(true);
        let _driving = NotDriving;
        self.runtime.block_on(future)
    }
}

/// Runs `future` to completion on the calling thread, with the internal runtime as the
/// current runtime (for the store's I/O, timers and background tasks).
///
/// Inside another synchronous call (its `load_with` or `fill_with` fill, which runs while that
/// call drives the runtime) it cannot drive the runtime again, and returns an error instead of
/// deadlocking.
pub(crate) fn block_on<T, F: Future<Output = Result<T>>>(future: F) -> Result<T> {
    if DRIVING.get() {
        return Err(Error::NestedSyncCall);
    }
    let driver = driver();
    match Handle::try_current() {
        // A plain thread: the usual case.
        Err(_) => driver.block_on(future),
        // A worker (or a `spawn_blocking` thread) of a multi-thread runtime: the worker hands
        // its queue to another thread first, so that nothing waits on this one.
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| driver.block_on(future))
        }
        // A current-thread runtime's thread, or one of its `spawn_blocking` threads: tokio
        // would refuse to nest `block_on` on the former, and the two cannot be told apart;
        // poll on this thread with a plain parking loop instead, the internal runtime's worker
        // driving the I/O.
        Ok(_) => {
            let _entered = driver.runtime.enter();
            park_until_ready(tokio::task::unconstrained(future))
        }
    }
}

/// True while this thread is inside a synchronous call's `block_on` (a nested call would be
/// refused).
pub(crate) fn driving() -> bool {
    DRIVING.get()
}

std::thread_local! {
    /// True while this thread drives the internal runtime (inside `Driver::block_on`).
    static DRIVING: Cell<bool> = const { Cell::new(false) };
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

//! A [`Store`] that counts the operations it forwards to another: on the Redis store each
//! operation is one round trip (a pipeline on a single server, concurrent commands on a
//! cluster), so the count of an operation sequence is its count of round trips. An operation is
//! recorded when it completes: what a call's caller waited for is what was recorded when the
//! call returned (the cache finishes some writes after returning). For tests that assert how
//! many the cache makes (behaviour, not speed), and for `examples/misspath.rs`.

use diesel_memclone::store::{
    Bumped, Fetched, FollowChanges, LockProbe, Probed, PutEntry, ReadLocked, ReadProbe, Store,
    StoreResult, TableBump,
};
use futures_util::future::{BoxFuture, FutureExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Forwards every operation to `S` and records its name.
#[derive(Clone)]
pub struct Counting<S> {
    inner: S,
    log: Arc<Mutex<Vec<&'static str>>>,
    /// How long entry writes wait before they are forwarded.
    put_delay: Duration,
}

impl<S: Store> Counting<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            log: Arc::default(),
            put_delay: Duration::ZERO,
        }
    }

    /// Makes every entry write (`put`, `put_with_generations`, `put_and_unlock`) wait `delay`
    /// before it is forwarded: a slow write, for races with the writes that follow it.
    pub fn with_put_delay(mut self, delay: Duration) -> Self {
        self.put_delay = delay;
        self
    }

    /// `operation` after the put delay.
    fn delayed<'a, T: Send + 'a>(&self, operation: BoxFuture<'a, T>) -> BoxFuture<'a, T> {
        let delay = self.put_delay;
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            operation.await
        }
        .boxed()
    }

    /// The operations recorded since the last call, in order, and forgets them.
    pub fn take(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// `operation`, recorded as `name` once it completed.
    fn record<'a, T: Send + 'a>(
        &self,
        name: &'static str,
        operation: BoxFuture<'a, T>,
    ) -> BoxFuture<'a, T> {
        let log = self.log.clone();
        async move {
            let outcome = operation.await;
            log.lock().unwrap().push(name);
            outcome
        }
        .boxed()
    }
}

impl<S: Store> Store for Counting<S> {
    fn fetch<'a>(
        &'a self,
        entry: &'a str,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Fetched>> {
        self.record("fetch", self.inner.fetch(entry, generations))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<()>> {
        self.record("put", self.delayed(self.inner.put(key, value, ttl)))
    }

    fn put_with_generations<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<()>> {
        let put = self
            .inner
            .put_with_generations(key, value, ttl, generations);
        self.record("put_with_generations", self.delayed(put))
    }

    fn remove<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, StoreResult<()>> {
        self.record("remove", self.inner.remove(keys))
    }

    fn ensure_generations<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<Vec<u64>>> {
        self.record(
            "ensure_generations",
            self.inner.ensure_generations(keys, ttl),
        )
    }

    fn set_generations<'a>(
        &'a self,
        keys: &'a [String],
        values: &'a [u64],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<()>> {
        self.record(
            "set_generations",
            self.inner.set_generations(keys, values, ttl),
        )
    }

    fn bump_table<'a>(&'a self, bump: TableBump<'a>) -> BoxFuture<'a, StoreResult<Option<Bumped>>> {
        self.record("bump_table", self.inner.bump_table(bump))
    }

    fn write_sequence<'a>(&'a self, sequence: &'a str) -> BoxFuture<'a, StoreResult<Option<u64>>> {
        self.record("write_sequence", self.inner.write_sequence(sequence))
    }

    fn reset(&self) {
        self.inner.reset()
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        owner: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        self.record("try_lock", self.inner.try_lock(key, owner, ttl))
    }

    fn unlock<'a>(&'a self, key: &'a str, owner: u64) -> BoxFuture<'a, StoreResult<()>> {
        self.record("unlock", self.inner.unlock(key, owner))
    }

    fn fetch_or_lock<'a>(&'a self, probe: LockProbe<'a>) -> BoxFuture<'a, StoreResult<Probed>> {
        self.record("fetch_or_lock", self.inner.fetch_or_lock(probe))
    }

    fn read_or_lock<'a>(&'a self, probe: ReadProbe<'a>) -> BoxFuture<'a, StoreResult<ReadLocked>> {
        self.record("read_or_lock", self.inner.read_or_lock(probe))
    }

    fn reads_and_locks_at_once(&self) -> bool {
        self.inner.reads_and_locks_at_once()
    }

    fn put_and_unlock<'a>(
        &'a self,
        put: PutEntry<'a>,
        lock: &'a str,
        owner: u64,
    ) -> BoxFuture<'a, StoreResult<()>> {
        self.record(
            "put_and_unlock",
            self.delayed(self.inner.put_and_unlock(put, lock, owner)),
        )
    }

    fn follow_changes(&self, follow: FollowChanges) -> Option<BoxFuture<'static, ()>> {
        self.inner.follow_changes(follow)
    }
}

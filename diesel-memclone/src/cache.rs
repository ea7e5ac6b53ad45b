//! The [`Cache`] handle: a store, its configuration, the read-through and invalidation paths.

use crate::codec::{self, Reject};
use crate::error::{Error, Result, StoreError};
use crate::flight::{self, Flights, Join, LockOptions, OnLockTimeout};
use crate::key;
use crate::model::RowKey;
use crate::near::{Near, NearCache};
use crate::store::{MemoryStore, Store, StoreResult};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A cache: a [`Store`] plus the rules for reading through it and invalidating it.
///
/// Cheap to clone (an `Arc`). Most code uses the process-wide default (see [`install`] and
/// [`cache`]); pass a `Cache` explicitly with [`Cached::using`](crate::Cached::using) and
/// [`Write::using`](crate::Write::using) to keep several caches in one process.
///
/// ```
/// use diesel_memclone::Cache;
/// use std::time::Duration;
///
/// let cache = Cache::builder()
///     .namespace("myapp")
///     .default_ttl(Duration::from_secs(600))
///     .build()?; // the in-process store
/// # Ok::<(), diesel_memclone::Error>(())
/// ```
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    namespace: String,
    default_ttl: Duration,
    store_timeout: Duration,
    retry_after: Duration,
    generation_ttl: Duration,
    unguarded_fills: bool,
    lock: Option<LockOptions>,
    single_flight: bool,
    ttl_jitter: f64,
    stale_while_revalidate: Duration,
    flights: Flights,
    health: Health,
    /// Tables whose invalidation could not be delivered; their reads bypass the cache until it is.
    /// Each with the epoch of its latest failure: a delivery clears only what it delivered.
    undelivered: Mutex<BTreeMap<String, u64>>,
    epochs: AtomicU64,
    /// True while a background task retries the undelivered invalidations.
    retrying: AtomicBool,
    has_undelivered: AtomicBool,
    stats: Counters,
    /// The near tier, when one was asked for.
    near: Option<Arc<Near>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("namespace", &self.inner.namespace)
            .field("default_ttl", &self.inner.default_ttl)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Options for a [`Cache`]; start with [`Cache::builder`].
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
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> diesel_memclone::Result<()> {
/// # let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
/// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
/// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
/// use diesel_memclone::{store::MemoryStore, Cache};
/// use std::time::Duration;
///
/// // A second cache beside the process-wide default, with its own store and options, used by
/// // the queries and writes that name it.
/// let reports = Cache::builder()
///     .store(MemoryStore::new(16 * 1024 * 1024))
///     .namespace("reports")
///     .default_ttl(Duration::from_secs(30))
///     .ttl_jitter(0.1)
///     .build()?;
/// let n = users::table.cached("n_users").using(&reports).count(&mut conn).await?;
/// assert_eq!(n, 2);
/// assert_eq!(reports.stats().misses, 1);
/// # Ok(()) }
/// ```
#[must_use]
pub struct CacheBuilder {
    store: Option<Arc<dyn Store>>,
    namespace: String,
    default_ttl: Duration,
    store_timeout: Duration,
    retry_after: Duration,
    generation_ttl: Duration,
    unguarded_fills: bool,
    lock: Option<LockOptions>,
    single_flight: bool,
    ttl_jitter: f64,
    stale_while_revalidate: Duration,
    near: Option<NearCache>,
}

impl std::fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("namespace", &self.namespace)
            .field("default_ttl", &self.default_ttl)
            .field("store_timeout", &self.store_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for CacheBuilder {
    fn default() -> Self {
        Self {
            store: None,
            namespace: "memclone".to_owned(),
            default_ttl: Duration::from_secs(3600),
            store_timeout: Duration::from_millis(250),
            retry_after: Duration::from_secs(1),
            generation_ttl: Duration::from_secs(60),
            unguarded_fills: false,
            lock: Some(LockOptions::default()),
            single_flight: true,
            ttl_jitter: 0.0,
            stale_while_revalidate: Duration::ZERO,
            near: None,
        }
    }
}

impl CacheBuilder {
    /// The store (default: a [`MemoryStore`] of 256 MiB).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The first part of every key (default `memclone`): letters, digits, `_`, `-`, `.`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long an entry lives unless the model or the query says otherwise (default 1 hour).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// How long one store operation may take before the cache gives up on it and goes to the
    /// database (default 250 ms).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// After a store failure, how long the cache skips the store before trying again
    /// (default 1 s). Reads go to the database meanwhile.
    pub fn retry_after(mut self, pause: Duration) -> Self {
        self.retry_after = pause;
        self
    }

    /// How long a generation a write sets on a row lives before an entry is stored under it
    /// (default 1 minute): long enough for the write to store its returned rows
    /// (write-through). Once entries depend on a row's generation, it lives as long as the
    /// longest of them, whatever this says, and no longer. Expiry is safe: a lost generation
    /// comes back with a fresh value, so older entries just miss.
    pub fn generation_ttl(mut self, ttl: Duration) -> Self {
        self.generation_ttl = ttl;
        self
    }

    /// The distributed fill lock's options (default: [`LockOptions::default`]).
    pub fn lock(mut self, options: LockOptions) -> Self {
        self.lock = Some(options);
        self
    }

    /// Turns the distributed fill lock off: each process then loads a missed entry once
    /// (single-flight still applies within a process).
    pub fn no_lock(mut self) -> Self {
        self.lock = None;
        self
    }

    /// Whether concurrent callers of one entry in this process share one load (default true).
    pub fn single_flight(mut self, on: bool) -> Self {
        self.single_flight = on;
        self
    }

    /// Spreads expiry: each entry lives its TTL times a random factor in
    /// `[1 - fraction, 1 + fraction]` (default 0), so that entries filled together do not all
    /// expire together. `fraction` is between 0 and 1.
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.ttl_jitter = fraction;
        self
    }

    /// Stale-while-revalidate (default off): for `window` after an entry's TTL, one caller
    /// refreshes it from the database while the others are served the expired value.
    /// An invalidated entry is never served, in the window or not.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = window;
        self
    }

    /// Keeps the hottest entries, and the generations that validate them, in this process too,
    /// in front of a Redis store: a read whose entry and generations are held here asks
    /// nothing of Redis, and a read whose generations are held needs only its entry's `GET`.
    /// Redis tells the tier of every change (see [`NearCache`] for what `max_lag` promises).
    ///
    /// [`build`](CacheBuilder::build) fails on a store that cannot report changes (the
    /// in-process store, which needs no near tier, or a `RedisStore` made from a pool without
    /// [`NearCache::tracking_url`]).
    pub fn near_cache(mut self, options: NearCache) -> Self {
        self.near = Some(options);
        self
    }

    /// **Broken on purpose, for tests of the freshness checker only**: fills read the
    /// generations *after* their database read, the classic race that lets a fill store data a
    /// concurrent write already replaced. Never use it elsewhere.
    #[doc(hidden)]
    pub fn unguarded_fills_for_testing(mut self) -> Self {
        self.unguarded_fills = true;
        self
    }

    /// Checks the options and builds the cache.
    pub fn build(self) -> Result<Cache> {
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(Error::Config(format!(
                "namespace {ns:?} must be 1 to 64 characters of letters, digits, '_', '-' or '.'"
            )));
        }
        for (name, value) in [
            ("default_ttl", self.default_ttl),
            ("store_timeout", self.store_timeout),
            ("generation_ttl", self.generation_ttl),
        ] {
            if value.is_zero() {
                return Err(Error::Config(format!("{name} must be greater than zero")));
            }
        }
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::default()));
        let near = match self.near {
            None => None,
            Some(options) => {
                if options.max_lag.is_zero() {
                    return Err(Error::Config("max_lag must be greater than zero".into()));
                }
                let prefixes = vec![
                    key::generation_prefix(&self.namespace),
                    key::custom_prefix(&self.namespace),
                ];
                let near = Near::new(options, prefixes);
                // Asked once here, not polled, to refuse a store that cannot report changes.
                if store.follow_changes(near.request()).is_none() {
                    return Err(Error::Config(
                        "the near cache needs a store that reports changes: a RedisStore built \
                         from URLs, or from a pool with NearCache::tracking_url (the in-process \
                         store needs no near tier)"
                            .into(),
                    ));
                }
                Some(near)
            }
        };
        Ok(Cache {
            inner: Arc::new(Inner {
                store,
                namespace: self.namespace,
                default_ttl: self.default_ttl,
                store_timeout: self.store_timeout,
                retry_after: self.retry_after,
                generation_ttl: self.generation_ttl,
                unguarded_fills: self.unguarded_fills,
                lock: self.lock,
                single_flight: self.single_flight,
                ttl_jitter: self.ttl_jitter,
                stale_while_revalidate: self.stale_while_revalidate,
                flights: Flights::default(),
                health: Health::default(),
                undelivered: Mutex::new(BTreeMap::new()),
                epochs: AtomicU64::new(0),
                retrying: AtomicBool::new(false),
                has_undelivered: AtomicBool::new(false),
                stats: Counters::default(),
                near,
            }),
        })
    }
}

/// Counts of what the cache did, since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Reads answered from the store.
    pub hits: u64,
    /// Reads that went to the database and filled the store.
    pub misses: u64,
    /// Reads that went to the database without the store (transaction, store down,
    /// undelivered invalidation, reload).
    pub bypasses: u64,
    /// Entries that did not decode (corrupt, foreign or from another version) and were replaced.
    pub corrupt_entries: u64,
    /// Store operations that failed or timed out.
    pub store_errors: u64,
    /// Invalidating writes.
    pub invalidations: u64,
    /// Reads answered by another caller's load in this process (single-flight).
    pub coalesced: u64,
    /// Reads answered by another process's load, after waiting for its fill lock.
    pub lock_waits: u64,
    /// Waits for a fill lock that timed out.
    pub lock_timeouts: u64,
    /// Expired entries served while another caller refreshed them (stale-while-revalidate).
    pub stale_served: u64,
    /// Rows a write stored because no other write overlapped it (write-through).
    pub written_through: u64,
    /// Reads answered by the near tier without asking Redis (also counted in `hits`).
    pub near_hits: u64,
    /// Reads the near tier could have answered (it was in sync and knew the generations) but
    /// did not hold the entry for.
    pub near_misses: u64,
    /// Times the near tier forgot everything: its invalidation stream was lost or restarted,
    /// or Redis flushed its data.
    pub near_flushes: u64,
    /// The longest heartbeat round trip on the near tier's invalidation stream, in
    /// microseconds: how late, at worst, a change was known to arrive while the stream was
    /// healthy.
    pub invalidation_lag_us: u64,
    /// About how many bytes of entries the near tier holds now.
    pub near_bytes: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    corrupt_entries: AtomicU64,
    store_errors: AtomicU64,
    invalidations: AtomicU64,
    coalesced: AtomicU64,
    lock_waits: AtomicU64,
    lock_timeouts: AtomicU64,
    stale_served: AtomicU64,
    written_through: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Remembers a store failure so that calls skip the store for a while, and logs the failure once
/// (and the recovery once) instead of once per call.
#[derive(Default)]
struct Health {
    down_since: Mutex<Option<Instant>>,
    down: AtomicBool,
}

impl Health {
    fn skip(&self, retry_after: Duration) -> bool {
        if !self.down.load(Ordering::Relaxed) {
            return false;
        }
        let since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        since.is_some_and(|t| t.elapsed() < retry_after)
    }

    fn failed(&self, error: &StoreError) {
        let mut since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %error,
                "diesel-memclone: cache store failed; reads go to the database until it answers again"
            );
        }
        *since = Some(Instant::now());
    }

    fn succeeded(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("diesel-memclone: cache store answers again");
        }
    }
}

/// How a read may use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Serve a fresh entry or fill one.
    ReadWrite,
    /// Serve a fresh entry, but never store (inside a transaction).
    ReadOnly,
    /// Skip the store entirely.
    Bypass,
    /// Skip the read, fill the entry (reload).
    Refresh,
}

/// One cached read: where its entry lives and which generations guard it.
pub(crate) struct Lookup {
    pub(crate) key: String,
    pub(crate) generations: Vec<String>,
    pub(crate) generation_ttl: Option<Duration>,
    pub(crate) ttl: Duration,
    pub(crate) tables: Vec<String>,
    pub(crate) policy: Policy,
}

impl Cache {
    /// Starts the options for a cache.
    pub fn builder() -> CacheBuilder {
        CacheBuilder::default()
    }

    /// A cache on the in-process store with default options.
    pub fn in_memory() -> Cache {
        CacheBuilder::default()
            .build()
            .expect("the default options are valid")
    }

    /// The namespace every key starts with.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The default entry lifetime.
    pub fn default_ttl(&self) -> Duration {
        self.inner.default_ttl
    }

    /// What the cache has done so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            hits: load(&c.hits),
            misses: load(&c.misses),
            bypasses: load(&c.bypasses),
            corrupt_entries: load(&c.corrupt_entries),
            store_errors: load(&c.store_errors),
            invalidations: load(&c.invalidations),
            coalesced: load(&c.coalesced),
            lock_waits: load(&c.lock_waits),
            lock_timeouts: load(&c.lock_timeouts),
            stale_served: load(&c.stale_served),
            written_through: load(&c.written_through),
            near_hits: self.inner.near.as_ref().map_or(0, |n| load(&n.hits)),
            near_misses: self.inner.near.as_ref().map_or(0, |n| load(&n.misses)),
            near_flushes: self.inner.near.as_ref().map_or(0, |n| load(&n.flushes)),
            invalidation_lag_us: self.inner.near.as_ref().map_or(0, |n| load(&n.lag_max_us)),
            near_bytes: self.inner.near.as_ref().map_or(0, |n| n.size().1),
        }
    }

    /// Makes every cached query and entity of `table` (its SQL name) unreachable: for writes that
    /// bypass memclone (raw SQL, another service). An undeliverable invalidation is kept and
    /// retried; until then this process does not serve the table from the cache.
    pub async fn invalidate_table(&self, table: &str) {
        self.invalidate_written(&[crate::key::table_from_text(table)], None)
            .await;
    }

    /// Makes every cached query and entity of model `M` unreachable.
    pub async fn invalidate<M: crate::MemClone>(&self) {
        self.invalidate_table(M::table()).await;
    }

    /// Tables whose invalidation has not reached the store yet.
    pub fn undelivered_invalidations(&self) -> Vec<String> {
        self.lock_undelivered().keys().cloned().collect()
    }

    pub(crate) fn query_generation_keys(&self, tables: &[String]) -> Vec<String> {
        tables
            .iter()
            .map(|t| key::query_generation(&self.inner.namespace, t))
            .collect()
    }

    pub(crate) fn custom_key(&self, custom: &str) -> String {
        key::custom_entry(&self.inner.namespace, custom)
    }

    /// Deletes the entries stored under these custom keys (see
    /// [`Cached::key`](crate::Cached::key)). Store failures are logged and ignored: such entries
    /// are still guarded by their tables' generations.
    pub async fn uncache<S: AsRef<str>>(&self, keys: &[S]) {
        let keys: Vec<String> = keys.iter().map(|k| self.custom_key(k.as_ref())).collect();
        let _ = self.call(self.inner.store.remove(&keys)).await;
        self.forget_near(&keys);
    }

    pub(crate) fn query_key(&self, hash: &str, label: &str) -> String {
        key::query_entry(&self.inner.namespace, hash, label)
    }

    pub(crate) fn entity_lookup(
        &self,
        row: &RowKey,
        fingerprint: u64,
        ttl: Duration,
        policy: Policy,
    ) -> Lookup {
        let ns = &self.inner.namespace;
        Lookup {
            key: key::entity_entry(ns, row.table, &row.primary_key, fingerprint),
            generations: vec![
                key::entity_generation(ns, row.table),
                key::row_generation(ns, row.table, &row.primary_key),
            ],
            // Created to live as long as the entry, and extended by every entry stored under
            // them: a row's generation lives as long as the longest entry that needs it.
            generation_ttl: Some(ttl.saturating_add(self.inner.stale_while_revalidate)),
            ttl,
            tables: vec![row.table.to_owned()],
            policy,
        }
    }

    fn lock_undelivered(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.inner
            .undelivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one store operation under the timeout and the failure memory.
    async fn call<T>(&self, operation: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let inner = &self.inner;
        if inner.health.skip(inner.retry_after) {
            return Err(StoreError::Unavailable);
        }
        let outcome = match tokio::time::timeout(inner.store_timeout, operation).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // The link may be stalled rather than broken: start afresh next time.
                inner.store.reset();
                Err(StoreError::Timeout)
            }
        };
        match &outcome {
            Ok(_) => inner.health.succeeded(),
            Err(error) => {
                bump(&inner.stats.store_errors);
                // An error about one key is that key's miss, not a reason to skip the store.
                if error.is_outage() {
                    inner.health.failed(error);
                }
            }
        }
        outcome
    }

    /// Retries undelivered invalidations. Returns true when none is left.
    async fn deliver_pending(&self) -> bool {
        if !self.inner.has_undelivered.load(Ordering::Acquire) {
            return true;
        }
        let snapshot: Vec<(String, u64)> = self
            .lock_undelivered()
            .iter()
            .map(|(t, e)| (t.clone(), *e))
            .collect();
        if snapshot.is_empty() {
            return true;
        }
        let tables: Vec<String> = snapshot.iter().map(|(t, _)| t.clone()).collect();
        if self.bump_tables(&tables, None).await.is_ok() {
            let mut pending = self.lock_undelivered();
            for (table, epoch) in &snapshot {
                // A failure recorded while this delivery ran may postdate it: keep that one.
                if pending.get(table) == Some(epoch) {
                    pending.remove(table);
                }
            }
            self.inner
                .has_undelivered
                .store(!pending.is_empty(), Ordering::Release);
            return pending.is_empty();
        }
        false
    }

    /// Records tables whose invalidation did not reach the store.
    pub(crate) fn mark_undelivered(&self, tables: &[String]) {
        let epoch = self.inner.epochs.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.lock_undelivered();
        for table in tables {
            pending.insert(table.clone(), epoch);
        }
        self.inner.has_undelivered.store(true, Ordering::Release);
        drop(pending);
        self.retry_in_background();
    }

    /// Keeps retrying the undelivered invalidations every `retry_after` until they are
    /// delivered, so that they do not wait for this cache's next call. The task holds the cache
    /// weakly: it ends when the cache is dropped (or the runtime shuts down).
    fn retry_in_background(&self) {
        if self.inner.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.retrying.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let pause = self.inner.retry_after.max(Duration::from_millis(10));
        runtime.spawn(async move {
            // If the task is dropped (its runtime shut down), let the next failure start another.
            let mut flag = RetryingFlag(Some(weak.clone()));
            loop {
                tokio::time::sleep(pause).await;
                let Some(inner) = weak.upgrade() else { return };
                let cache = Cache { inner };
                if cache.deliver_pending().await {
                    cache.inner.retrying.store(false, Ordering::Release);
                    // A failure recorded just now may have seen `retrying` still set.
                    if !cache.inner.has_undelivered.load(Ordering::Acquire)
                        || cache.inner.retrying.swap(true, Ordering::AcqRel)
                    {
                        // Either nothing is left, or another task owns the flag now.
                        flag.0 = None;
                        return;
                    }
                }
            }
        });
    }

    fn is_undelivered(&self, tables: &[String]) -> bool {
        if !self.inner.has_undelivered.load(Ordering::Acquire) {
            return false;
        }
        let pending = self.lock_undelivered();
        tables.iter().any(|t| pending.contains_key(t))
    }

    async fn bump_tables(
        &self,
        tables: &[String],
        rows: Option<&[RowKey]>,
    ) -> StoreResult<Invalidated> {
        let ns = &self.inner.namespace;
        let store = &self.inner.store;
        let mut bumps = Vec::with_capacity(tables.len());
        let mut row_generations = Vec::new();
        for (i, table) in tables.iter().enumerate() {
            // The rows, when known, are rows of the first (written) table; any other table
            // (`also_invalidates`, a pending delivery) has all of its rows evicted.
            let rows = if i == 0 { rows } else { None };
            let mut keys = vec![key::query_generation(ns, table)];
            // Rows known: the table's entity generation stays, and is observed for
            // write-through; rows unknown: it moves, evicting every row of the table.
            let mut observe = Vec::new();
            match rows {
                Some(_) => observe.push(key::entity_generation(ns, table)),
                None => keys.push(key::entity_generation(ns, table)),
            }
            let values: Vec<u64> = keys
                .iter()
                .map(|_| crate::store::fresh_generation())
                .collect();
            let row_keys: Vec<String> = rows
                .unwrap_or_default()
                .iter()
                .map(|row| key::row_generation(ns, row.table, &row.primary_key))
                .collect();
            let row_values: Vec<u64> = row_keys
                .iter()
                .map(|_| crate::store::fresh_generation())
                .collect();
            let sequence = key::write_sequence(ns, table);
            let bump = crate::store::TableBump {
                sequence: &sequence,
                keys: &keys,
                values: &values,
                row_keys: &row_keys,
                row_values: &row_values,
                rows_ttl: self.inner.generation_ttl,
                observe: &observe,
            };
            // One atomic script per table: its generations, its rows' generations and its
            // write sequence move together, which is what makes write-through safe.
            let bumped = self.call(store.bump_table(bump)).await;
            // Whatever the outcome, this process stops trusting what it knew of these keys:
            // read-your-writes, with no window, in the near tier.
            self.forget_near(&keys);
            self.forget_near(&row_keys);
            let bumped = bumped?;
            bumps.push(TableBump {
                sequence: bumped.as_ref().map(|b| b.sequence),
                query_generation: values[0],
                entity_generation: bumped.and_then(|b| b.observed.first().copied().flatten()),
            });
            if i == 0 {
                row_generations = row_values;
            }
        }
        Ok(Invalidated {
            tables: bumps,
            row_generations,
        })
    }

    /// Invalidates after a committed write: every query of `tables`, and the entity entries of
    /// `rows` (or of every row of `tables` when the rows are unknown). Never fails: what cannot be
    /// delivered is remembered and retried, and blocks reads of those tables meanwhile.
    /// Returns what each table's bump set, when it was delivered.
    pub(crate) async fn invalidate_written(
        &self,
        tables: &[String],
        rows: Option<&[RowKey]>,
    ) -> Option<Invalidated> {
        bump(&self.inner.stats.invalidations);
        // If this future is dropped before the bump is done (a cancelled request), the guard
        // records the invalidation as undelivered, to be retried.
        let mut guard = Undelivered {
            cache: self,
            tables,
            delivered: false,
        };
        let bumps = self.bump_tables(tables, rows).await.ok()?;
        guard.delivered = true;
        self.deliver_pending().await;
        Some(bumps)
    }

    /// Invalidates one row's entity entries (not the table's queries): for a reload, so that a
    /// fill that read the database before it cannot land over the reloaded row.
    pub(crate) async fn invalidate_row(&self, row: &RowKey) -> bool {
        let ns = &self.inner.namespace;
        let row_keys = [key::row_generation(ns, row.table, &row.primary_key)];
        let row_values = [crate::store::fresh_generation()];
        let sequence = key::write_sequence(ns, row.table);
        let bump = crate::store::TableBump {
            sequence: &sequence,
            keys: &[],
            values: &[],
            row_keys: &row_keys,
            row_values: &row_values,
            rows_ttl: self.inner.generation_ttl,
            observe: &[],
        };
        let bumped = self.call(self.inner.store.bump_table(bump)).await.is_ok();
        self.forget_near(&row_keys);
        bumped
    }

    /// The table's write sequence before a write whose result may be cached.
    pub(crate) async fn write_sequence(&self, table: &str) -> Option<u64> {
        let sequence = key::write_sequence(&self.inner.namespace, table);
        self.call(self.inner.store.write_sequence(&sequence))
            .await
            .ok()
            .flatten()
    }

    /// Stores a written row's entity entry (`Some(value)`, as entity reads decode it), tagged
    /// with the generations the write left.
    pub(crate) async fn put_entity<T: Serialize + DeserializeOwned>(
        &self,
        row: &RowKey,
        fingerprint: u64,
        tags: [u64; 2],
        ttl: Option<Duration>,
        value: &T,
    ) {
        let ttl = ttl.unwrap_or(self.inner.default_ttl);
        let fresh_until = codec::now_millis().saturating_add(ttl.as_millis() as u64);
        if let Some(bytes) = codec::encode_as::<Option<T>, _>(&tags, fresh_until, &Some(value)) {
            bump(&self.inner.stats.written_through);
            let key = key::entity_entry(
                &self.inner.namespace,
                row.table,
                &row.primary_key,
                fingerprint,
            );
            let kept_for = ttl.saturating_add(self.inner.stale_while_revalidate);
            let ns = &self.inner.namespace;
            let generations = [
                key::entity_generation(ns, row.table),
                key::row_generation(ns, row.table, &row.primary_key),
            ];
            let put = self
                .inner
                .store
                .put_with_generations(&key, bytes, kept_for, &generations);
            let _ = self.call(put).await;
        }
    }

    /// Stores a write's returned value under a custom key (`Some(value)`, as readers decode
    /// it), tagged with the query generation the write itself set (see
    /// [`Write::cache_result`](crate::Write::cache_result)).
    pub(crate) async fn put_custom<T: Serialize + DeserializeOwned>(
        &self,
        custom: &str,
        generation: u64,
        ttl: Duration,
        value: &T,
    ) {
        let fresh_until = codec::now_millis().saturating_add(ttl.as_millis() as u64);
        let entry = Some(value);
        if let Some(bytes) = codec::encode_as::<Option<T>, _>(&[generation], fresh_until, &entry) {
            bump(&self.inner.stats.written_through);
            let key = self.custom_key(custom);
            let kept_for = ttl.saturating_add(self.inner.stale_while_revalidate);
            let _ = self.call(self.inner.store.put(&key, bytes, kept_for)).await;
            self.forget_near(std::slice::from_ref(&key));
        }
    }

    /// Answers a read from the store when a fresh entry exists, otherwise from `fill`, and
    /// stores the result tagged with the generations read *before* `fill` ran.
    pub(crate) async fn read_through<T, F, Fut>(&self, lookup: Lookup, fill: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = diesel::QueryResult<T>>,
    {
        let stats = &self.inner.stats;
        // Taken before anything else: a database read shared when the store fails must begin
        // after this call did (see `database_read`).
        let began = self.inner.flights.ticket();
        let blocked = !self.deliver_pending().await && self.is_undelivered(&lookup.tables);
        if lookup.policy == Policy::Bypass {
            bump(&stats.bypasses);
            return Ok(fill().await?);
        }
        if blocked {
            return self.database_read(&lookup, began, fill).await;
        }
        let near = self.near();
        let mut tags = None;
        let mut stale = None;
        if lookup.policy != Policy::Refresh {
            let mut read = None;
            if let Some(near) = near.filter(|near| near.in_sync()) {
                if let Some(current) = near.generations(&lookup.generations) {
                    read = Some(self.near_read::<T>(near, &lookup, current).await);
                }
            }
            let read = match read {
                Some(read) => read,
                None => self.store_read::<T>(near, &lookup).await,
            };
            match read {
                StoreRead::Hit(value) => return Ok(value),
                StoreRead::Failed => return self.database_read(&lookup, began, fill).await,
                StoreRead::Miss(current, expired) => {
                    tags = current;
                    stale = expired;
                }
            }
        }
        if lookup.policy == Policy::ReadOnly {
            bump(&stats.bypasses);
            return Ok(fill().await?);
        }
        if self.inner.unguarded_fills {
            return self.unguarded_fill(lookup, fill).await;
        }
        let tags = match tags {
            Some(tags) => tags,
            None => {
                let store = &self.inner.store;
                let stamps = near.map(|near| near.stamps(&lookup.generations));
                let ensured = store.ensure_generations(&lookup.generations, lookup.generation_ttl);
                match self.call(ensured).await {
                    Ok(tags) => {
                        if let (Some(near), Some(stamps)) = (near, stamps) {
                            near.learn_all(&lookup.generations, &tags, &stamps);
                        }
                        tags
                    }
                    Err(_) => return self.database_read(&lookup, began, fill).await,
                }
            }
        };
        if let Some(stale) = stale {
            return self.revalidate(lookup, tags, stale, fill).await;
        }
        self.fill_once(lookup, tags, fill).await
    }

    /// The near tier, its change stream started (on the first read inside a runtime).
    fn near(&self) -> Option<&Near> {
        let near = self.inner.near.as_ref()?;
        near.follow(&*self.inner.store);
        Some(near.as_ref())
    }

    /// Waits until the near tier has applied every change Redis made before this call (a
    /// heartbeat sent after it came back), or `timeout` passed: true in the first case. For
    /// start-up, when a process wants near reads from its first request, and for tests. Always
    /// false without a near tier.
    pub async fn near_cache_ready(&self, timeout: Duration) -> bool {
        let Some(near) = self.near() else {
            return false;
        };
        let began = Instant::now();
        let deadline = began + timeout;
        while !near.synced_since(began) {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    /// Forgets keys in the near tier (this process changed or removed them).
    fn forget_near(&self, keys: &[String]) {
        if let Some(near) = self.inner.near.as_deref() {
            for key in keys {
                near.forget(key);
            }
        }
    }

    /// A read whose generations the near tier knows: its entry from the tier, or else the
    /// entry alone from the store (one `GET`), validated against those generations.
    async fn near_read<T: DeserializeOwned>(
        &self,
        near: &Near,
        lookup: &Lookup,
        current: Vec<u64>,
    ) -> StoreRead<T> {
        let stats = &self.inner.stats;
        if let Some(bytes) = near.entry(&lookup.key) {
            if let Ok((value, fresh_until)) = codec::decode::<T>(&bytes, &current) {
                if codec::now_millis() < fresh_until {
                    bump(&near.hits);
                    bump(&stats.hits);
                    return StoreRead::Hit(value);
                }
            }
        }
        bump(&near.misses);
        let stamp = near.stamp(&lookup.key);
        let Ok(fetched) = self.call(self.inner.store.fetch(&lookup.key, &[])).await else {
            return StoreRead::Failed;
        };
        let expired = match fetched.entry {
            Some(bytes) => self.judge::<T>(Some(near), lookup, bytes, &current, stamp),
            None => None,
        };
        match expired {
            Some(Judged::Fresh(value)) => StoreRead::Hit(value),
            Some(Judged::Expired(value)) => StoreRead::Miss(Some(current), Some(value)),
            None => StoreRead::Miss(Some(current), None),
        }
    }

    /// A read of the entry and its generations from the store, in one round trip; what it
    /// learns of the generations goes to the near tier, if any.
    async fn store_read<T: DeserializeOwned>(
        &self,
        near: Option<&Near>,
        lookup: &Lookup,
    ) -> StoreRead<T> {
        let stamps = near.map(|near| (near.stamps(&lookup.generations), near.stamp(&lookup.key)));
        let store = &self.inner.store;
        let Ok(fetched) = self
            .call(store.fetch(&lookup.key, &lookup.generations))
            .await
        else {
            return StoreRead::Failed;
        };
        let current: Option<Vec<u64>> = fetched.generations.iter().copied().collect();
        let mut entry_stamp = 0;
        if let (Some(near), Some((stamps, stamp))) = (near, stamps) {
            near.learn_some(&lookup.generations, &fetched.generations, &stamps);
            entry_stamp = stamp;
        }
        if let (Some(bytes), Some(current)) = (fetched.entry, &current) {
            match self.judge::<T>(near, lookup, bytes, current, entry_stamp) {
                Some(Judged::Fresh(value)) => return StoreRead::Hit(value),
                Some(Judged::Expired(value)) => {
                    return StoreRead::Miss(Some(current.clone()), Some(value))
                }
                None => {}
            }
        }
        StoreRead::Miss(current, None)
    }

    /// Decodes an entry read from the store under `current` generations: fresh (counted as a
    /// hit, and kept in the near tier), expired but in the stale-while-revalidate window, or
    /// unusable (`None`; counted when corrupt).
    fn judge<T: DeserializeOwned>(
        &self,
        near: Option<&Near>,
        lookup: &Lookup,
        bytes: Vec<u8>,
        current: &[u64],
        stamp: u64,
    ) -> Option<Judged<T>> {
        match codec::decode::<T>(&bytes, current) {
            Ok((value, fresh_until)) if codec::now_millis() < fresh_until => {
                bump(&self.inner.stats.hits);
                if let Some(near) = near {
                    near.keep(&lookup.key, bytes.into(), fresh_until, stamp);
                }
                Some(Judged::Fresh(value))
            }
            // Expired, but physically kept for the stale-while-revalidate window.
            Ok((value, _)) if !self.inner.stale_while_revalidate.is_zero() => {
                Some(Judged::Expired(value))
            }
            Ok(_) => None,
            Err(Reject::Corrupt) => {
                bump(&self.inner.stats.corrupt_entries);
                None
            }
            Err(Reject::Outdated) => None,
        }
    }

    /// A read the store cannot serve (it failed, timed out, or misses an invalidation): from the
    /// database, and not stored. Callers of one entry in this process share one such read, as
    /// long as it began after their own call began (`began`, a ticket): the generations cannot
    /// be compared without the store, but a read that began later sees every write they saw.
    async fn database_read<T, F, Fut>(&self, lookup: &Lookup, began: u64, fill: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = diesel::QueryResult<T>>,
    {
        let stats = &self.inner.stats;
        // Only a plain read may share: a read in a transaction must see that transaction.
        if lookup.policy != Policy::ReadWrite || !self.inner.single_flight {
            bump(&stats.bypasses);
            return Ok(fill().await?);
        }
        let key = format!("{}#database", lookup.key);
        let leader = match self.inner.flights.join_after(key, Some(began)) {
            Join::Lead(leader) => Some(leader),
            Join::Follow(receiver) => {
                let followed = tokio::time::timeout(self.patience(), flight::follow(receiver));
                if let Ok(Some(entry)) = followed.await {
                    if let Ok((value, _)) = codec::decode::<T>(&entry, &[]) {
                        bump(&stats.coalesced);
                        return Ok(value);
                    }
                }
                // The leader gave up (an error, a cancelled call): read for ourselves.
                None
            }
        };
        bump(&stats.bypasses);
        let value = fill().await?;
        if let Some(leader) = leader {
            if let Some(bytes) = codec::encode(&[], u64::MAX, &value) {
                leader.publish(bytes.into());
            }
        }
        Ok(value)
    }

    /// How long a single-flight follower waits for its leader: a leader that is alive but never
    /// polled must not hold it for ever.
    fn patience(&self) -> Duration {
        self.inner
            .lock
            .as_ref()
            .map_or(Duration::from_secs(30), |l| l.wait_timeout.max(l.ttl))
    }

    /// Stale-while-revalidate: one caller refreshes, the others get the expired value.
    async fn revalidate<T, F, Fut>(
        &self,
        lookup: Lookup,
        tags: Vec<u64>,
        stale: T,
        fill: F,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = diesel::QueryResult<T>>,
    {
        let key = format!("{}:swr:{}", lookup.key, tags_hex(&tags));
        let owner = crate::store::fresh_generation();
        let lock_ttl = self
            .inner
            .lock
            .as_ref()
            .map_or(Duration::from_secs(5), |l| l.ttl);
        match self
            .call(self.inner.store.try_lock(&key, owner, lock_ttl))
            .await
        {
            Ok(true) => {
                let value = fill().await;
                if let Ok(value) = &value {
                    bump(&self.inner.stats.misses);
                    self.store_entry(&lookup, &tags, value).await;
                }
                let _ = self.call(self.inner.store.unlock(&key, owner)).await;
                Ok(value?)
            }
            _ => {
                bump(&self.inner.stats.stale_served);
                Ok(stale)
            }
        }
    }

    /// A miss: one load per entry and generations, shared by the callers of this process
    /// (single-flight) and, with the lock, of every process.
    async fn fill_once<T, F, Fut>(&self, lookup: Lookup, tags: Vec<u64>, fill: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = diesel::QueryResult<T>>,
    {
        let stats = &self.inner.stats;
        let coordinated = lookup.policy == Policy::ReadWrite;
        let mut leader = None;
        if coordinated && self.inner.single_flight {
            match self
                .inner
                .flights
                .join(format!("{}#{}", lookup.key, tags_hex(&tags)))
            {
                Join::Lead(lead) => leader = Some(lead),
                Join::Follow(receiver) => {
                    let followed = tokio::time::timeout(self.patience(), flight::follow(receiver));
                    if let Ok(Some(entry)) = followed.await {
                        if let Ok((value, _)) = codec::decode::<T>(&entry, &tags) {
                            bump(&stats.coalesced);
                            return Ok(value);
                        }
                    }
                    // The leader gave up (an error, a cancelled call): load for ourselves.
                }
            }
        }
        let mut held_lock = None;
        if let (true, Some(lock)) = (coordinated, &self.inner.lock) {
            match self.wait_for_lock::<T>(&lookup, &tags, lock).await? {
                LockWait::Held(key, owner) => held_lock = Some((key, owner)),
                LockWait::FilledByOther(value, entry) => {
                    if let Some(leader) = leader {
                        leader.publish(entry);
                    }
                    return Ok(value);
                }
                LockWait::GoAhead => {}
            }
        }
        let value = fill().await;
        if let Ok(value) = &value {
            bump(if lookup.policy == Policy::Refresh {
                &stats.bypasses
            } else {
                &stats.misses
            });
            if let Some(entry) = self.store_entry(&lookup, &tags, value).await {
                if let Some(leader) = leader {
                    leader.publish(entry);
                }
            }
        }
        if let Some((key, owner)) = held_lock {
            let _ = self.call(self.inner.store.unlock(&key, owner)).await;
        }
        Ok(value?)
    }

    /// Takes the entry's fill lock, or waits until its holder has filled the entry.
    async fn wait_for_lock<T: DeserializeOwned>(
        &self,
        lookup: &Lookup,
        tags: &[u64],
        lock: &LockOptions,
    ) -> Result<LockWait<T>> {
        let store = &self.inner.store;
        let key = format!("{}:{}:{}", lookup.key, lock.prefix, tags_hex(tags));
        let owner = crate::store::fresh_generation();
        let now = Instant::now();
        let deadline = now
            .checked_add(lock.wait_timeout)
            .unwrap_or(now + Duration::from_secs(86_400));
        loop {
            match self.call(store.try_lock(&key, owner, lock.ttl)).await {
                Ok(true) => {
                    // The previous holder may have filled the entry and left between our read
                    // and our lock: look once more before going to the database.
                    match self.filled_entry::<T>(lookup, tags).await {
                        Some(LockWait::FilledByOther(value, entry)) => {
                            let _ = self.call(store.unlock(&key, owner)).await;
                            return Ok(LockWait::FilledByOther(value, entry));
                        }
                        _ => return Ok(LockWait::Held(key, owner)),
                    }
                }
                Ok(false) => {}
                // The store is in trouble: the database answers.
                Err(_) => return Ok(LockWait::GoAhead),
            }
            if Instant::now() >= deadline {
                bump(&self.inner.stats.lock_timeouts);
                return match lock.on_timeout {
                    OnLockTimeout::Database => Ok(LockWait::GoAhead),
                    OnLockTimeout::Error => Err(Error::LockTimeout),
                };
            }
            tokio::time::sleep(lock.retry_delay + flight::jitter(lock.retry_jitter)).await;
            if let Some(filled) = self.filled_entry::<T>(lookup, tags).await {
                return Ok(filled);
            }
        }
    }

    /// Looks for the entry another caller filled under `tags`. `GoAhead` when the generations
    /// moved (an invalidation: waiting for that load is pointless) or the store failed.
    async fn filled_entry<T: DeserializeOwned>(
        &self,
        lookup: &Lookup,
        tags: &[u64],
    ) -> Option<LockWait<T>> {
        let fetch = self.inner.store.fetch(&lookup.key, &lookup.generations);
        let Ok(fetched) = self.call(fetch).await else {
            return Some(LockWait::GoAhead);
        };
        let current: Option<Vec<u64>> = fetched.generations.iter().copied().collect();
        if current.as_deref() != Some(tags) {
            return Some(LockWait::GoAhead);
        }
        let entry = fetched.entry?;
        let (value, _) = codec::decode::<T>(&entry, tags).ok()?;
        bump(&self.inner.stats.lock_waits);
        Some(LockWait::FilledByOther(value, entry.into()))
    }

    /// Encodes and stores an entry; returns the bytes (also for single-flight followers).
    async fn store_entry<T: Serialize + DeserializeOwned>(
        &self,
        lookup: &Lookup,
        tags: &[u64],
        value: &T,
    ) -> Option<Arc<[u8]>> {
        let ttl = self.jittered(lookup.ttl);
        let fresh_until = codec::now_millis().saturating_add(ttl.as_millis() as u64);
        let bytes = codec::encode(tags, fresh_until, value)?;
        let entry: Arc<[u8]> = bytes.as_slice().into();
        let kept_for = ttl.saturating_add(self.inner.stale_while_revalidate);
        let store = &self.inner.store;
        // Generations that expire (a row's) are kept alive as long as the entry.
        let put = match lookup.generation_ttl {
            Some(_) => {
                store.put_with_generations(&lookup.key, bytes, kept_for, &lookup.generations)
            }
            None => store.put(&lookup.key, bytes, kept_for),
        };
        let near = self.inner.near.as_deref();
        let stamp = near.map(|near| near.stamp(&lookup.key));
        // A failed store write only costs a later miss.
        if self.call(put).await.is_ok() {
            if let (Some(near), Some(stamp)) = (near, stamp) {
                near.keep(&lookup.key, entry.clone(), fresh_until, stamp);
            }
        }
        Some(entry)
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        let fraction = self.inner.ttl_jitter;
        if fraction == 0.0 {
            return ttl;
        }
        let unit = (crate::store::fresh_generation() % 1_000_001) as f64 / 1_000_000.0;
        let factor = 1.0 + fraction * (2.0 * unit - 1.0);
        Duration::try_from_secs_f64(ttl.as_secs_f64() * factor)
            .unwrap_or(ttl)
            .max(Duration::from_millis(1))
    }
}

/// Clears the "retrying" flag when the background retry task ends or is dropped.
struct RetryingFlag(Option<std::sync::Weak<Inner>>);

impl Drop for RetryingFlag {
    fn drop(&mut self) {
        if let Some(inner) = self.0.as_ref().and_then(std::sync::Weak::upgrade) {
            inner.retrying.store(false, Ordering::Release);
        }
    }
}

/// A write between its statement and its invalidation: dropped before
/// [`done`](PendingWrite::done) (a cancelled future), it marks its tables undelivered.
pub(crate) struct PendingWrite {
    cache: Cache,
    tables: Vec<String>,
    armed: bool,
}

impl PendingWrite {
    pub(crate) fn new(cache: &Cache, tables: Vec<String>) -> Self {
        Self {
            cache: cache.clone(),
            tables,
            armed: true,
        }
    }

    /// The invalidation ran (delivered, or recorded as undelivered by it).
    pub(crate) fn done(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if self.armed {
            self.cache.mark_undelivered(&self.tables);
        }
    }
}

/// Marks its tables undelivered when dropped before its invalidation was delivered.
struct Undelivered<'a> {
    cache: &'a Cache,
    tables: &'a [String],
    delivered: bool,
}

impl Drop for Undelivered<'_> {
    fn drop(&mut self) {
        if !self.delivered {
            self.cache.mark_undelivered(self.tables);
        }
    }
}

/// What an invalidation set, for write-through.
pub(crate) struct Invalidated {
    /// One per written table.
    pub(crate) tables: Vec<TableBump>,
    /// The new generation of each written row, in the order of the rows given.
    pub(crate) row_generations: Vec<u64>,
}

/// What one table's invalidation set.
pub(crate) struct TableBump {
    /// The table's write sequence after this bump, if the store keeps one.
    pub(crate) sequence: Option<u64>,
    /// The new generation of the table's queries.
    pub(crate) query_generation: u64,
    /// The table's entity generation, observed with the bump (when the rows were known).
    pub(crate) entity_generation: Option<u64>,
}

/// What a read of the store found.
enum StoreRead<T> {
    /// A fresh entry.
    Hit(T),
    /// No fresh entry: the current generations, if all known, and an expired value that the
    /// stale-while-revalidate window still allows.
    Miss(Option<Vec<u64>>, Option<T>),
    /// The store failed.
    Failed,
}

enum Judged<T> {
    Fresh(T),
    Expired(T),
}

enum LockWait<T> {
    Held(String, u64),
    FilledByOther(T, Arc<[u8]>),
    GoAhead,
}

fn tags_hex(tags: &[u64]) -> String {
    tags.iter().map(|t| format!("{t:016x}")).collect()
}

impl Cache {
    /// The deliberately broken fill of [`CacheBuilder::unguarded_fills_for_testing`].
    async fn unguarded_fill<T, F, Fut>(&self, lookup: Lookup, fill: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = diesel::QueryResult<T>>,
    {
        let value = fill().await?;
        bump(&self.inner.stats.misses);
        // Widen the window between the read and the generations so the race shows quickly.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let store = &self.inner.store;
        if let Ok(tags) = self
            .call(store.ensure_generations(&lookup.generations, lookup.generation_ttl))
            .await
        {
            let fresh_until = codec::now_millis() + lookup.ttl.as_millis() as u64;
            if let Some(bytes) = codec::encode(&tags, fresh_until, &value) {
                let _ = self.call(store.put(&lookup.key, bytes, lookup.ttl)).await;
            }
        }
        Ok(value)
    }
}

static DEFAULT: OnceLock<Cache> = OnceLock::new();

/// Installs the process-wide default cache used by `.cached()`, the write helpers and
/// [`find`](crate::find). Call it once at start-up, before the first cached call; a second call
/// (or a call after the default was already created on first use) returns the cache back as
/// the error.
///
/// ```
/// let cache = diesel_memclone::Cache::builder().namespace("demo").build()?;
/// let _ = diesel_memclone::install(cache); // Err(cache) if a default was already in place
/// # Ok::<(), diesel_memclone::Error>(())
/// ```
pub fn install(cache: Cache) -> std::result::Result<(), Cache> {
    DEFAULT.set(cache)
}

/// The process-wide default cache: the one [`install`]ed, or else an in-process cache with
/// default options, created on first use.
///
/// That fallback belongs to one process: several replicas of a service each get their own, and
/// a write in one never invalidates the others, which can serve stale rows for the default TTL
/// (1 hour). It logs a warning once, when it is created. Replicas should [`install`] a cache on
/// a shared Redis ([`store`](crate::store)`::RedisStore`, feature `redis`); a process that is
/// alone on purpose installs [`Cache::in_memory()`] and is not warned.
pub fn cache() -> &'static Cache {
    DEFAULT.get_or_init(|| {
        // Once per process, and only on the implicit path: the multi-replica trap is silent.
        tracing::warn!(
            "diesel-memclone: no cache installed, using a per-process in-memory cache; \
             other processes' writes will not invalidate it (install a Redis-backed cache for \
             several replicas, or install Cache::in_memory() to silence this)"
        );
        Cache::in_memory()
    })
}

//! The [`Cache`] handle: a store, its options and its counters.
//!
//! The rest of the cache lives beside this file:
//!
//! * [`read`]: the read path (read-through, fills, the fill lock, stale-while-revalidate) and
//!   the entries a write stores through;
//! * [`invalidate`]: the invalidation path (generation bumps, write sequences, invalidations
//!   that could not be delivered and their retry);
//! * [`health`]: every store call, under the timeout and the memory of the store's failures.

mod health;
mod invalidate;
mod moves;
mod observe;
mod read;

pub(crate) use invalidate::{Invalidated, PendingWrite, RowsThrough};
pub(crate) use observe::ReadName;

use crate::error::{Error, Result};
use crate::flight::{Flights, LockOptions};
use crate::key;
use crate::model::RowKey;
use crate::near::{Near, NearCache, NearKey, NearKeys};
use crate::store::{MemoryStore, Store};
use health::Health;
use std::any::TypeId;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
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
    /// The store's [`Store::tier_name`], for metrics, and a hit's outcome there, for spans.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    store_tier: &'static str,
    /// True for the crate's own stores, whose operations may run on a synchronous caller's own
    /// runtime (see `crate::sync::MAX_THREAD_RUNTIMES`): the in-process store does no I/O, and
    /// the Redis store opens there only connections of that thread's own. Other stores' operations
    /// run with the internal runtime current, as they may open or spawn what every thread shares.
    store_is_thread_aware: bool,
    store_hit: &'static str,
    namespace: String,
    default_ttl: Duration,
    store_timeout: Duration,
    retry_after: Duration,
    generation_ttl: Duration,
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
    /// What every read of a query shape shares (see [`Shape`]).
    shapes: RwLock<HashMap<ShapeKey, Arc<Shape>, BuildShapeHasher>>,
    /// The store's [`Store::reads_and_locks_at_once`], asked once.
    locks_on_read: bool,
    /// The generations this process moved, for reads that expect a miss.
    moves: moves::Moves,
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
    /// See `Inner::store_is_thread_aware`.
    store_is_thread_aware: bool,
    namespace: String,
    default_ttl: Duration,
    store_timeout: Duration,
    retry_after: Duration,
    generation_ttl: Duration,
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
            store_is_thread_aware: true,
            namespace: "memclone".to_owned(),
            default_ttl: Duration::from_secs(3600),
            store_timeout: Duration::from_millis(250),
            retry_after: Duration::from_secs(1),
            generation_ttl: Duration::from_secs(60),
            lock: Some(LockOptions::default()),
            single_flight: true,
            ttl_jitter: 0.0,
            stale_while_revalidate: Duration::ZERO,
            near: None,
        }
    }
}

/// See `Inner::store_is_thread_aware`.
fn thread_aware(store: &dyn std::any::Any) -> bool {
    #[cfg(feature = "redis")]
    if store.is::<crate::store::RedisStore>() {
        return true;
    }
    store.is::<MemoryStore>()
}

impl CacheBuilder {
    /// The store (default: a [`MemoryStore`] of 256 MiB).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store_is_thread_aware = thread_aware(&store);
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
    /// longest of them, whatever this says, and at most a quarter longer. Expiry is safe: a
    /// lost generation comes back with a fresh value, so older entries just miss.
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
    /// in-process store, which needs no near tier, a single-server `RedisStore` made from a
    /// pool without [`NearCache::tracking_url`], or a cluster store given one).
    pub fn near_cache(mut self, options: NearCache) -> Self {
        self.near = Some(options);
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
                         from URLs, or a single-server one from a pool with NearCache::tracking_url (the in-process \
                         store needs no near tier)"
                            .into(),
                    ));
                }
                Some(near)
            }
        };
        Ok(Cache {
            inner: Arc::new(Inner {
                locks_on_read: store.reads_and_locks_at_once(),
                moves: moves::Moves::default(),
                store_tier: store.tier_name(),
                store_hit: observe::store_hit_outcome(store.tier_name()),
                store,
                store_is_thread_aware: self.store_is_thread_aware,
                namespace: self.namespace,
                default_ttl: self.default_ttl,
                store_timeout: self.store_timeout,
                retry_after: self.retry_after,
                generation_ttl: self.generation_ttl,
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
                shapes: RwLock::default(),
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
    /// Database listeners of this cache (`listen`, feature `postgres`) that are running but not
    /// connected now: writes that bypass memclone are not seen until they are back.
    pub listeners_unhealthy: u64,
}

/// The live counts behind [`Stats`].
#[derive(Default)]
struct Counters {
    hits: Counter,
    misses: Counter,
    bypasses: Counter,
    corrupt_entries: Counter,
    store_errors: Counter,
    invalidations: Counter,
    coalesced: Counter,
    lock_waits: Counter,
    lock_timeouts: Counter,
    stale_served: Counter,
    written_through: Counter,
    /// A gauge, not a count: see [`Stats::listeners_unhealthy`].
    listeners_unhealthy: AtomicU64,
}

/// One count of [`Stats`], shared by every clone of the cache.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    /// Counts one more.
    fn add_one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
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
    /// Its store key, read through [`Cache::key_text`].
    pub(crate) key: EntryKey,
    pub(crate) generations: Arc<[String]>,
    /// The near tier's names of the entry and of the generations (unset without a tier).
    pub(crate) near_key: NearKey,
    pub(crate) near_generations: NearKeys,
    pub(crate) generation_ttl: Option<Duration>,
    pub(crate) ttl: Duration,
    pub(crate) tables: Arc<[String]>,
    pub(crate) policy: Policy,
    /// Its label and span.
    pub(crate) name: ReadName,
}

/// A lookup's store key: its text, or a query's identity whose key (see
/// [`key::query_entry`]) is spelt out the first time a read needs it: a near hit never does.
pub(crate) enum EntryKey {
    Text(String),
    Query {
        digest: u128,
        text: OnceLock<String>,
    },
}

/// Which reads share a [`Shape`]: the result type, and (a hint only) the type name of the
/// backend and query. Type names are not unique (lifetimes are erased, and Rust does not promise
/// them distinct), which is why a read uses its shape only if its SQL is the shape's: compared,
/// or known from the statement's query id (see [`StatementIdentity::Collected`]). Any other
/// read builds its identity in full.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ShapeKey {
    result: TypeId,
    /// Where the type name of the backend and query lives and how long it is (cheaper to hash
    /// than its text).
    query: (usize, usize),
}

impl ShapeKey {
    /// The key of a read of result `T` by a query of type `Q` (a backend and query, or a
    /// tuple of them).
    pub(crate) fn of<T: 'static, Q: ?Sized>() -> Self {
        let name = std::any::type_name::<Q>();
        ShapeKey {
            result: TypeId::of::<T>(),
            query: (name.as_ptr() as usize, name.len()),
        }
    }
}

/// What every read of one query shape shares, computed on its first read: its statements' SQL,
/// the tables they read and the result type's models, their generation keys, and the result
/// type's fingerprint. A read uses it only if its statements build exactly this SQL (known from
/// their types, or compared); its binds are still collected (or rendered) on every read.
pub(crate) struct Shape {
    pub(crate) statements: Box<[ShapeStatement]>,
    pub(crate) fingerprint: u64,
    pub(crate) tables: Arc<[String]>,
    pub(crate) generations: Arc<[String]>,
    /// Their near tier's names (see [`Lookup::near_generations`]).
    pub(crate) near_generations: NearKeys,
}

/// One statement of a [`Shape`].
pub(crate) struct ShapeStatement {
    /// Its SQL, as Diesel builds it.
    pub(crate) sql: Box<str>,
    /// How a read's identity is made from it.
    pub(crate) identity: StatementIdentity,
}

/// How the reads of a shape make a statement's identity.
pub(crate) enum StatementIdentity {
    /// From the backend's bind collector (see [`crate::identity`]): the SQL's digest, and the
    /// backend and query id of the statement's type if that type always builds this SQL (then
    /// a read of that type need not build it).
    Collected {
        sql_digest: u128,
        fixed_by: Option<(TypeId, TypeId)>,
    },
    /// From the `debug_query` rendering: the SQL as `Debug` escapes it.
    Rendered { escaped_sql: Box<str> },
}

/// A shape map's hasher: the keys are type ids and addresses, already well spread.
#[derive(Default, Clone, Copy)]
pub(crate) struct BuildShapeHasher;

/// See [`BuildShapeHasher`] (FxHash's mixing step).
#[derive(Default)]
pub(crate) struct ShapeHasher(u64);

impl std::hash::BuildHasher for BuildShapeHasher {
    type Hasher = ShapeHasher;
    fn build_hasher(&self) -> ShapeHasher {
        ShapeHasher(0)
    }
}

impl std::hash::Hasher for ShapeHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}

/// At most this many shapes per cache: a program has a fixed set of query types, but a map
/// that could only grow would be a leak if one did not.
const MAX_SHAPES: usize = 4096;

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

    /// How long past its TTL an entry may still be served while it is refreshed.
    pub(crate) fn stale_while_revalidate(&self) -> Duration {
        self.inner.stale_while_revalidate
    }

    /// What the cache has done so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.stats;
        Stats {
            hits: c.hits.get(),
            misses: c.misses.get(),
            bypasses: c.bypasses.get(),
            corrupt_entries: c.corrupt_entries.get(),
            store_errors: c.store_errors.get(),
            invalidations: c.invalidations.get(),
            coalesced: c.coalesced.get(),
            lock_waits: c.lock_waits.get(),
            lock_timeouts: c.lock_timeouts.get(),
            stale_served: c.stale_served.get(),
            written_through: c.written_through.get(),
            near_hits: self.inner.near.as_ref().map_or(0, |n| n.hits()),
            near_misses: self.inner.near.as_ref().map_or(0, |n| n.misses()),
            near_flushes: self.inner.near.as_ref().map_or(0, |n| n.flushes()),
            invalidation_lag_us: self.inner.near.as_ref().map_or(0, |n| n.lag_max_us()),
            near_bytes: self.inner.near.as_ref().map_or(0, |n| n.size().1),
            listeners_unhealthy: c.listeners_unhealthy.load(Ordering::Relaxed),
        }
    }

    /// A listener of this cache went down (`true`) or came back or stopped (`false`).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn listener_unhealthy(&self, unhealthy: bool) {
        let gauge = &self.inner.stats.listeners_unhealthy;
        match unhealthy {
            true => gauge.fetch_add(1, Ordering::Relaxed),
            false => gauge.fetch_sub(1, Ordering::Relaxed),
        };
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

    /// The shape remembered under `key`, if any.
    pub(crate) fn shape(&self, key: &ShapeKey) -> Option<Arc<Shape>> {
        let shapes = self.inner.shapes.read().unwrap_or_else(|e| e.into_inner());
        shapes.get(key).cloned()
    }

    /// Remembers a shape under `key`, unless one is there already (the first stays: a query type
    /// whose SQL varies keeps its first shape and renders the others in full).
    pub(crate) fn remember_shape(&self, key: ShapeKey, shape: Shape) {
        let mut shapes = self.inner.shapes.write().unwrap_or_else(|e| e.into_inner());
        if shapes.len() < MAX_SHAPES {
            shapes.entry(key).or_insert_with(|| Arc::new(shape));
        }
    }

    /// The near tier's name for the store key `key` (unset without a tier).
    pub(crate) fn near_key(&self, key: &str) -> NearKey {
        self.inner
            .near
            .as_deref()
            .map_or(NearKey::default(), |near| near.key(key))
    }

    /// The near tier's names of the store keys `keys` (none without a tier).
    pub(crate) fn near_keys(&self, keys: &[String]) -> NearKeys {
        self.inner
            .near
            .as_deref()
            .map_or(NearKeys::None, |near| near.keys(keys))
    }

    /// The near tier's name for the entry of the query `digest` labelled `label` (see
    /// [`Near::query_key`]; unset without a tier).
    pub(crate) fn near_query_key(&self, digest: u128, label: &str) -> NearKey {
        self.inner
            .near
            .as_deref()
            .map_or(NearKey::default(), |near| near.query_key(digest, label))
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
    /// [`Cached::key`](crate::Cached::key)). A deletion the store does not take is remembered
    /// as an undelivered invalidation is: retried, and the key not served by this process until
    /// it is deleted (its tables' generations guard it only where it depends on the written
    /// table; an entry that reads a view, or a key whose deletion is the only link to the write,
    /// would otherwise be served stale until its TTL).
    pub async fn uncache<S: AsRef<str>>(&self, keys: &[S]) {
        let keys: Vec<String> = keys.iter().map(|k| self.custom_key(k.as_ref())).collect();
        if self.call(self.inner.store.remove(&keys)).await.is_err() {
            // Not lost: deleted with the next delivery, and not served here until then.
            self.mark_unremoved(&keys);
        }
        self.forget_near(&keys);
    }

    /// The store key of `lookup`'s entry (spelt out on first use; see [`EntryKey`]).
    pub(crate) fn key_text<'a>(&self, lookup: &'a Lookup) -> &'a str {
        match &lookup.key {
            EntryKey::Text(text) => text,
            EntryKey::Query { digest, text } => {
                text.get_or_init(|| self.query_key(*digest, &lookup.name.label))
            }
        }
    }

    /// The key of a query's entry, from its identity (see [`key::identity_digest`]).
    pub(crate) fn query_key(&self, digest: u128, label: &str) -> String {
        key::query_entry(&self.inner.namespace, digest, label)
    }

    pub(crate) fn entity_lookup(
        &self,
        row: &RowKey,
        fingerprint: u64,
        ttl: Duration,
        policy: Policy,
    ) -> Lookup {
        let ns = &self.inner.namespace;
        let key = key::entity_entry(ns, row.table, &row.primary_key, fingerprint);
        let generations = [
            key::entity_generation(ns, row.table),
            key::row_generation(ns, row.table, &row.primary_key),
        ];
        Lookup {
            near_key: self.near_key(&key),
            near_generations: self.near_keys(&generations),
            key: EntryKey::Text(key),
            generations: Arc::new(generations),
            // Created to live a quarter longer than the entry, and extended by the entries
            // stored under them when they would outlive it: a row's generation lives as long as
            // the longest entry that needs it, and at most a quarter longer (the store extends
            // it seldom, each extension being a change a near tier hears of).
            generation_ttl: Some({
                let kept = ttl.saturating_add(self.inner.stale_while_revalidate);
                kept.saturating_add(kept / 4)
            }),
            ttl,
            tables: Arc::new([row.table.to_owned()]),
            policy,
            name: ReadName::entity(row.table),
        }
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

//! The near tier: entries and generations kept in this process, in front of a shared store
//! (Redis), and trusted only while the store's change stream says they are current.
//!
//! Two maps live here:
//!
//! * the **view**: the values of generation keys this process has read or set, each removed the
//!   moment the store reports the key changed (Redis `CLIENT TRACKING` in broadcast mode, on a
//!   connection of its own). A read whose generations are all in the view knows them without
//!   asking the store;
//! * the **entries**: encoded entries as the store holds them, bounded in bytes, each served no
//!   longer than its own freshness (and the first to go once past it). An entry is served when the generations it was filled under
//!   equal the view's, exactly as a store entry is validated on read.
//!
//! Both are trusted only while the change stream is known to be in sync: a heartbeat sent at
//! `t` whose reply came back proves that every change Redis made before `t` has been applied
//! here (the stream and the reply share one connection, in order, and changes are applied as
//! they arrive, before the reply is seen). Near reads stop when the last such `t` is more than
//! `max_lag` ago, and the view and entries are flushed whenever the stream was lost.
//!
//! A value read from the store is put in the view only if no change to that key arrived between
//! the moment before the read was sent and the moment it is put: each key hashes to a stripe
//! whose counter every change (and every local invalidation) advances, and an insert that sees
//! its stripe moved takes itself back out.

use crate::codec;
use crate::store::{ChangeListener, FollowChanges, Store};
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of the near tier, an in-process copy of the hottest entries in front of a Redis
/// store (see [`CacheBuilder::near_cache`](crate::CacheBuilder::near_cache)).
///
/// A near hit costs what an in-process lookup and a decode cost and asks nothing of Redis. It is
/// served only while this process is known to have heard of every change Redis made more than
/// [`max_lag`](NearCache::max_lag) ago: a write made through another process can be served
/// stale here for at most that long. Writes made through this process are seen at once.
///
/// ```no_run
/// # #[cfg(feature = "redis")]
/// # fn demo() -> diesel_memclone::Result<()> {
/// use diesel_memclone::{store::RedisStore, Cache, NearCache};
/// use std::time::Duration;
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379").build()?;
/// let cache = Cache::builder()
///     .store(store)
///     .near_cache(NearCache::new().max_bytes(64 << 20).max_lag(Duration::from_millis(50)))
///     .build()?;
/// # let _ = cache; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct NearCache {
    pub(crate) max_bytes: u64,
    pub(crate) max_lag: Duration,
    pub(crate) tracking_url: Option<String>,
}

impl Default for NearCache {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            max_lag: Self::DEFAULT_MAX_LAG,
            tracking_url: None,
        }
    }
}

impl NearCache {
    /// The default [`max_lag`](NearCache::max_lag): 100 ms.
    pub const DEFAULT_MAX_LAG: Duration = Duration::from_millis(100);

    /// A near tier of 64 MiB with a `max_lag` of 100 ms.
    pub fn new() -> Self {
        Self::default()
    }

    /// About how many bytes of entries (keys and encoded values) the tier holds at most
    /// (default 64 MiB); the least useful go first. The generations the tier knows are bounded
    /// apart: one per 128 bytes of this (at least 4096), forgotten all at once past that. With
    /// `0` no entry is held, but the generations are: a read then costs its entry's `GET` alone.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The longest a write made by another process can go unseen here (default 100 ms).
    ///
    /// The tier answers only while a heartbeat sent on the invalidation connection less than
    /// `max_lag` ago has come back, which proves that every change before it arrived. If the
    /// connection is lost, hangs, or Redis restarts, near reads stop within `max_lag` and go to
    /// Redis until the stream is back and the tier has been flushed. The cost: one `ROLE` every
    /// quarter of `max_lag` on that connection (40 a second at the default).
    pub fn max_lag(mut self, max_lag: Duration) -> Self {
        self.max_lag = max_lag;
        self
    }

    /// Opens the invalidation connection at this address instead of the store's (single
    /// servers only): for a proxy or tunnel in front of the same server. It must reach the
    /// server the store writes to, or the tier never hears of changes.
    pub fn tracking_url(mut self, url: impl Into<String>) -> Self {
        self.tracking_url = Some(url.into());
        self
    }

    /// The heartbeat period: four beats per `max_lag`, so that one late beat does not stop the
    /// tier.
    pub(crate) fn heartbeat(&self) -> Duration {
        (self.max_lag / 4).max(Duration::from_micros(250))
    }
}

/// Stripes of the change counters. A change to any key of a stripe voids what the view and the
/// entries hold under every key of that stripe, so their number bounds how much one write
/// evicts by accident: with 256, a service writing a table 500 times a second (three keys per
/// write) voided each stripe several times a second, and most of its near reads of that table
/// went back to Redis (`examples/service.rs --bench`: 2,600 near hits against 17,200 Redis hits
/// of `posts`; 14,000-15,000 against 3,000 with 16,384). 128 KiB of counters per cache.
const STRIPES: usize = 16384;

/// The tier's name for a store key: a 128-bit xxh3 of its text, seeded per tier (see
/// [`Near::key`]). The view, the entries and the stripes are all keyed by it, so that a read
/// whose keys' names were computed once (a query shape's generations) hashes no text, and a
/// query read need not build its entry key's text at all (see [`Near::query_key`]).
///
/// The seed is drawn per process and never leaves it: keys a client can choose (row primary
/// keys) cannot be aimed at one name, nor at one bucket of the maps.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub(crate) struct NearKey(u128);

/// The hasher of the tier's maps, whose keys are [`NearKey`]s: already seeded hashes, folded to
/// 64 bits (SipHash, the default, cost more than the rest of a lookup).
#[derive(Clone, Default)]
pub(crate) struct BuildKeyHasher;

impl std::hash::BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

/// See [`BuildKeyHasher`].
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for a `NearKey` (`write_u128`); any other key is hashed whole.
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }
    fn write_u128(&mut self, value: u128) {
        self.0 ^= (value as u64) ^ ((value >> 64) as u64);
    }
}

/// The [`NearKey`]s of a read's generations: shared with its query shape, or the two of an
/// entity read, or none (no near tier).
#[derive(Clone, Default)]
pub(crate) enum NearKeys {
    #[default]
    None,
    Pair([NearKey; 2]),
    Shared(Arc<[NearKey]>),
}

impl std::ops::Deref for NearKeys {
    type Target = [NearKey];
    fn deref(&self) -> &[NearKey] {
        match self {
            NearKeys::None => &[],
            NearKeys::Pair(keys) => keys,
            NearKeys::Shared(keys) => keys,
        }
    }
}

/// The generations of a read as the view knows them: up to four kept inline (a read names one
/// per table it reads, seldom more), so that a near hit allocates nothing for them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Known {
    Inline(u8, [u64; 4]),
    Heap(Vec<u64>),
}

impl Known {
    /// Into a vector (a read that goes on to the store).
    pub(crate) fn into_vec(self) -> Vec<u64> {
        match self {
            Known::Inline(..) => self.to_vec(),
            Known::Heap(values) => values,
        }
    }
}

impl std::ops::Deref for Known {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        match self {
            Known::Inline(len, values) => &values[..usize::from(*len)],
            Known::Heap(values) => values,
        }
    }
}

/// An encoded entry, its weight and when it stops being fresh.
struct NearEntry {
    bytes: Arc<[u8]>,
    /// The stamp of the key's stripe when the entry was read (see `Near::view`).
    stamp: u64,
    /// Unix milliseconds; an entry past it is not served (its readers check the same instant,
    /// which the entry carries) and goes first when room is needed.
    fresh_until: u64,
    weight: u64,
    /// Which insertion this is, so that the eviction queue's older mentions of the key pass
    /// it by.
    seq: u64,
    /// Read since the eviction hand last passed it (a second chance).
    used: AtomicBool,
}

/// The entries: a concurrent map bounded in bytes, evicting with a CLOCK hand (an entry read
/// since the hand last passed gets a second chance; expired entries go at once).
///
/// It replaced a moka cache, whose `get` (frequency sketch, read buffer, and the housekeeping
/// the buffer triggers) cost about 1,060 instructions of a near hit's 6,600 under callgrind
/// (`examples/hitcount.rs near`); a read here is one shard read lock and a hash lookup.
struct Entries {
    map: DashMap<NearKey, NearEntry, BuildKeyHasher>,
    /// The keys in insertion order, with their insertion's `seq`: the CLOCK's ring. Mentions
    /// of keys since removed or replaced are passed by (and dropped when the ring outgrows the
    /// map).
    ring: std::sync::Mutex<std::collections::VecDeque<(NearKey, u64)>>,
    /// The weights of the entries in `map`: added before an insert, taken off by whoever
    /// removes the entry, so that it never goes below zero.
    weight: AtomicU64,
    max_weight: u64,
    seq: AtomicU64,
}

impl Entries {
    fn new(max_weight: u64) -> Self {
        Self {
            map: DashMap::with_hasher(BuildKeyHasher),
            ring: Default::default(),
            weight: AtomicU64::new(0),
            max_weight,
            seq: AtomicU64::new(0),
        }
    }

    /// The bytes under `key` if `current` says the stamp they were kept under is still the
    /// key's (asked after the entry is found), marked as read. An entry kept under an older
    /// stamp can never be served again: no second chance for it.
    fn get(&self, key: NearKey, current: impl FnOnce(u64) -> bool) -> Option<Arc<[u8]>> {
        let entry = self.map.get(&key)?;
        if !current(entry.stamp) {
            return None;
        }
        if !entry.used.load(Ordering::Relaxed) {
            entry.used.store(true, Ordering::Relaxed);
        }
        Some(entry.bytes.clone())
    }

    fn insert(&self, key: NearKey, bytes: Arc<[u8]>, stamp: u64, fresh_until: u64) {
        let weight = (std::mem::size_of::<NearKey>() + bytes.len() + 64) as u64;
        if weight > self.max_weight {
            // Not kept; nor is what the key held before.
            self.remove(key);
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let entry = NearEntry {
            bytes,
            stamp,
            fresh_until,
            weight,
            seq,
            used: AtomicBool::new(false),
        };
        self.weight.fetch_add(weight, Ordering::AcqRel);
        if let Some(old) = self.map.insert(key, entry) {
            self.weight.fetch_sub(old.weight, Ordering::AcqRel);
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.push_back((key, seq));
        if ring.len() > 2 * self.map.len() + 1024 {
            ring.retain(|(key, seq)| self.map.get(key).is_some_and(|e| e.seq == *seq));
        }
        self.evict(&mut ring);
    }

    /// Removes entries until the weight is within bound: the hand goes round the ring, taking
    /// expired entries and those not read since it last passed.
    fn evict(&self, ring: &mut std::collections::VecDeque<(NearKey, u64)>) {
        let now = codec::now_millis();
        // Each mention is passed at most twice (once to clear its mark): then it goes.
        let mut passes = 2 * ring.len();
        while self.weight.load(Ordering::Acquire) > self.max_weight {
            let Some((key, seq)) = ring.pop_front() else {
                return;
            };
            let keep = passes > 0
                && self.map.get(&key).is_some_and(|entry| {
                    entry.seq == seq
                        && entry.fresh_until > now
                        && entry.used.swap(false, Ordering::Relaxed)
                });
            passes = passes.saturating_sub(1);
            if keep {
                ring.push_back((key, seq));
                continue;
            }
            if let Some((_, entry)) = self.map.remove_if(&key, |_, entry| entry.seq == seq) {
                self.weight.fetch_sub(entry.weight, Ordering::AcqRel);
            }
        }
    }

    fn remove(&self, key: NearKey) {
        if let Some((_, entry)) = self.map.remove(&key) {
            self.weight.fetch_sub(entry.weight, Ordering::AcqRel);
        }
    }

    fn clear(&self) {
        self.map.retain(|_, entry| {
            self.weight.fetch_sub(entry.weight, Ordering::AcqRel);
            false
        });
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The near tier's state, shared with the change stream's listener.
pub(crate) struct Near {
    /// Each value with the stamp of its stripe when it was read: it counts only while the stripe
    /// still has that stamp, so a change that lands between a check and an insert can never be
    /// read past.
    view: DashMap<NearKey, (u64, u64), BuildKeyHasher>,
    stripes: Box<[AtomicU64]>,
    entries: Entries,
    /// The seed of [`NearKey`]s.
    seed: u64,
    /// Nanoseconds after `base` at which the last acknowledged heartbeat was sent; 0: not in
    /// sync.
    synced_at: AtomicU64,
    base: Instant,
    max_lag_nanos: u64,
    started: AtomicBool,
    /// Values learnt, to check the view's size now and then.
    learnt: AtomicU64,
    /// The most generations the view holds: one per 128 bytes of `max_bytes`, at least 4096.
    view_limit: usize,
    /// What the store's change stream is asked to follow, and whom it tells.
    request: FollowChanges,
    hits: AtomicU64,
    misses: AtomicU64,
    flushes: AtomicU64,
    /// The longest heartbeat round trip seen, in microseconds.
    lag_max_us: AtomicU64,
}

impl Near {
    /// A tier following changes to keys that start with `prefixes`.
    pub(crate) fn new(options: NearCache, prefixes: Vec<String>) -> Arc<Self> {
        Arc::new_cyclic(|near| Self {
            request: FollowChanges::new(
                prefixes,
                options.heartbeat(),
                options.tracking_url.clone(),
                Arc::new(NearListener(near.clone())),
            ),
            view: DashMap::with_hasher(BuildKeyHasher),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            entries: Entries::new(options.max_bytes),
            seed: crate::store::fresh_generation(),
            synced_at: AtomicU64::new(0),
            base: Instant::now(),
            max_lag_nanos: u64::try_from(options.max_lag.as_nanos()).unwrap_or(u64::MAX),
            started: AtomicBool::new(false),
            learnt: AtomicU64::new(0),
            view_limit: usize::try_from(options.max_bytes / 128)
                .unwrap_or(usize::MAX)
                .max(4096),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            lag_max_us: AtomicU64::new(0),
        })
    }

    /// Counts a near hit.
    pub(crate) fn count_hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a read the tier could have answered but did not hold the entry for.
    pub(crate) fn count_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Near hits so far.
    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Near misses so far.
    pub(crate) fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Flushes so far.
    pub(crate) fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// The longest heartbeat round trip seen, in microseconds.
    pub(crate) fn lag_max_us(&self) -> u64 {
        self.lag_max_us.load(Ordering::Relaxed)
    }

    /// What to ask of the store's change stream.
    pub(crate) fn request(&self) -> FollowChanges {
        self.request.clone()
    }

    /// Starts the store's change stream on the current runtime (the internal one for a
    /// synchronous call), unless it runs already. Outside a runtime it is started by a later call. If its runtime shuts down, the tier is out of
    /// sync and flushed, and the next call (on another runtime) starts it again.
    pub(crate) fn follow(self: &Arc<Self>, store: &dyn Store) {
        if self.started.load(Ordering::Relaxed) || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let stream = crate::sync::background_runtime()
            .and_then(|runtime| Some((runtime, store.follow_changes(self.request())?)));
        let Some((runtime, stream)) = stream else {
            self.started.store(false, Ordering::Release);
            return;
        };
        let following = Following(Arc::downgrade(self));
        drop(runtime.spawn(async move {
            let _following = following;
            stream.await;
        }));
    }

    /// True while the tier may answer: a heartbeat sent less than `max_lag` ago came back.
    pub(crate) fn in_sync(&self) -> bool {
        let synced = self.synced_at.load(Ordering::Acquire);
        synced != 0 && self.now_nanos().saturating_sub(synced) <= self.max_lag_nanos
    }

    /// True once a heartbeat sent at or after `since` has come back: every change Redis made
    /// before `since` has been applied.
    pub(crate) fn synced_since(&self, since: Instant) -> bool {
        let since = u64::try_from(since.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX);
        self.synced_at.load(Ordering::Acquire) >= since.max(1)
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The tier's name for the store key `key`.
    pub(crate) fn key(&self, key: &str) -> NearKey {
        NearKey(xxhash_rust::xxh3::xxh3_128_with_seed(
            key.as_bytes(),
            self.seed,
        ))
    }

    /// The tier's names of `keys`.
    pub(crate) fn keys(&self, keys: &[String]) -> NearKeys {
        match keys {
            [first, second] => NearKeys::Pair([self.key(first), self.key(second)]),
            _ => NearKeys::Shared(keys.iter().map(|key| self.key(key)).collect()),
        }
    }

    /// The tier's name for the entry of the query whose identity is `digest`, labelled `label`
    /// (the key [`key::query_entry`](crate::key::query_entry) spells out), without that text:
    /// the digest and the label, after a byte no key's text starts with (UTF-8 never has
    /// `0xff`). Such keys are never followed by the change stream, so never forgotten by text.
    pub(crate) fn query_key(&self, digest: u128, label: &str) -> NearKey {
        let mut bytes = [0u8; 96];
        let len = 17 + label.len();
        let Some(buffer) = bytes.get_mut(..len) else {
            // A long label: hashed through its key's text (as `key`), which is never equal to
            // a short label's name but for a hash collision.
            let mut key = Vec::with_capacity(len);
            key.push(0xff);
            key.extend_from_slice(&digest.to_le_bytes());
            key.extend_from_slice(label.as_bytes());
            return NearKey(xxhash_rust::xxh3::xxh3_128_with_seed(&key, self.seed));
        };
        buffer[0] = 0xff;
        buffer[1..17].copy_from_slice(&digest.to_le_bytes());
        buffer[17..].copy_from_slice(label.as_bytes());
        NearKey(xxhash_rust::xxh3::xxh3_128_with_seed(buffer, self.seed))
    }

    fn stripe(&self, key: NearKey) -> &AtomicU64 {
        // STRIPES is a power of two: the low bits of a seeded hash.
        &self.stripes[(key.0 as usize) % STRIPES]
    }

    /// Taken before a read of `key` is sent: [`Near::learn`] and [`Near::keep`] put what it
    /// read in the tier only if the key did not change since.
    pub(crate) fn stamp(&self, key: NearKey) -> u64 {
        self.stripe(key).load(Ordering::SeqCst)
    }

    /// [`Near::stamp`] of each key.
    pub(crate) fn stamps(&self, keys: &[NearKey]) -> Vec<u64> {
        keys.iter().map(|key| self.stamp(*key)).collect()
    }

    /// [`Near::learn`] of each key.
    pub(crate) fn learn_all(&self, keys: &[NearKey], values: &[u64], stamps: &[u64]) {
        for ((key, value), stamp) in keys.iter().zip(values).zip(stamps) {
            self.learn(*key, *value, *stamp);
        }
    }

    /// [`Near::learn`] of each key whose value was found.
    pub(crate) fn learn_some(&self, keys: &[NearKey], values: &[Option<u64>], stamps: &[u64]) {
        for ((key, value), stamp) in keys.iter().zip(values).zip(stamps) {
            if let Some(value) = value {
                self.learn(*key, *value, *stamp);
            }
        }
    }

    /// The current values of `keys` when the view knows all of them (ask [`Near::in_sync`]
    /// first).
    pub(crate) fn generations(&self, keys: &[NearKey]) -> Option<Known> {
        let known = |key: &NearKey| {
            let (value, stamp) = *self.view.get(key)?;
            (self.stamp(*key) == stamp).then_some(value)
        };
        if keys.len() > 4 {
            return keys
                .iter()
                .map(known)
                .collect::<Option<_>>()
                .map(Known::Heap);
        }
        let mut values = [0; 4];
        for (value, key) in values.iter_mut().zip(keys) {
            *value = known(key)?;
        }
        Some(Known::Inline(keys.len() as u8, values))
    }

    /// Puts a generation read from the store in the view, unless it changed since `stamp`.
    pub(crate) fn learn(&self, key: NearKey, value: u64, stamp: u64) {
        // Only while a stream follows changes: what is learnt otherwise could never be
        // forgotten (and the next stream flushes it anyway).
        if !self.in_sync() || self.stamp(key) != stamp {
            return;
        }
        // A change that lands after the check moves the stripe, which voids the value for
        // readers at once; the removal is only housekeeping.
        self.view.insert(key, (value, stamp));
        if self.stamp(key) != stamp {
            self.view.remove(&key);
        }
        // The view is bounded too: every generation ever read would otherwise stay (a row's
        // lives as long as its entries). Past the bound it starts over, which costs one
        // Redis round trip per read until it has learnt the hot keys again.
        if self
            .learnt
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(1024)
            && self.view.len() > self.view_limit
        {
            for stripe in self.stripes.iter() {
                stripe.fetch_add(1, Ordering::SeqCst);
            }
            self.view.clear();
        }
    }

    /// The entry under `key`, if held.
    pub(crate) fn entry(&self, key: NearKey) -> Option<Arc<[u8]>> {
        self.entries.get(key, |stamp| self.stamp(key) == stamp)
    }

    /// Keeps an entry (as the store holds it) until `fresh_until` (unix ms), unless `key` changed
    /// since `stamp` (entries under keys the stream follows, such as custom keys).
    pub(crate) fn keep(&self, key: NearKey, bytes: Arc<[u8]>, fresh_until: u64, stamp: u64) {
        let left = fresh_until.saturating_sub(codec::now_millis());
        if left == 0 {
            return;
        }
        let stripe = self.stripe(key);
        if stripe.load(Ordering::SeqCst) != stamp {
            return;
        }
        self.entries.insert(key, bytes, stamp, fresh_until);
        if stripe.load(Ordering::SeqCst) != stamp {
            self.entries.remove(key);
        }
    }

    /// Forgets a key: a change reported by the store, or one this process made.
    pub(crate) fn forget(&self, key: &str) {
        let key = self.key(key);
        self.stripe(key).fetch_add(1, Ordering::SeqCst);
        self.view.remove(&key);
        self.entries.remove(key);
    }

    /// Forgets everything; counted in `near_flushes` when the tier was answering (a stream
    /// that starts, or restarts after a loss already counted, forgets what nobody trusted).
    pub(crate) fn flush(&self) {
        if self.in_sync() {
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
        self.forget_all();
    }

    fn forget_all(&self) {
        for stripe in self.stripes.iter() {
            stripe.fetch_add(1, Ordering::SeqCst);
        }
        self.view.clear();
        self.entries.clear();
    }

    /// Entries held and their weight in bytes (approximate while writes are in flight).
    pub(crate) fn size(&self) -> (u64, u64) {
        let entries = &self.entries;
        (
            entries.map.len() as u64,
            entries.weight.load(Ordering::Acquire),
        )
    }
}

/// Held by the running change stream: when the stream ends or is dropped (its runtime shut
/// down), the tier stops answering and a later read starts a new stream.
struct Following(std::sync::Weak<Near>);

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(near) = self.0.upgrade() {
            NearListener(self.0.clone()).lost();
            near.started.store(false, Ordering::Release);
        }
    }
}

/// What the change stream reports to: the tier, held weakly so that the stream ends with the
/// cache.
pub(crate) struct NearListener(pub(crate) std::sync::Weak<Near>);

impl ChangeListener for NearListener {
    fn changed(&self, key: &[u8]) {
        if let Some(near) = self.0.upgrade() {
            match std::str::from_utf8(key) {
                Ok(key) => near.forget(key),
                // Not a key this crate wrote; cannot be matched: forget everything.
                Err(_) => near.flush(),
            }
        }
    }

    fn flush(&self) {
        if let Some(near) = self.0.upgrade() {
            near.flush();
        }
    }

    fn lost(&self) {
        if let Some(near) = self.0.upgrade() {
            let was_answering = near.in_sync();
            near.synced_at.store(0, Ordering::Release);
            if was_answering {
                near.flushes.fetch_add(1, Ordering::Relaxed);
            }
            near.forget_all();
        }
    }

    fn synced(&self, sent: Instant, round_trip: Duration) {
        if let Some(near) = self.0.upgrade() {
            let at = u64::try_from(sent.saturating_duration_since(near.base).as_nanos())
                .unwrap_or(u64::MAX)
                .max(1);
            near.synced_at.fetch_max(at, Ordering::AcqRel);
            let us = u64::try_from(round_trip.as_micros()).unwrap_or(u64::MAX);
            near.lag_max_us.fetch_max(us, Ordering::Relaxed);
        }
    }

    fn is_closed(&self) -> bool {
        self.0.strong_count() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near() -> Arc<Near> {
        Near::new(NearCache::new().max_bytes(1 << 20), vec!["ns:{t:".into()])
    }

    #[test]
    fn a_change_between_stamp_and_learn_keeps_the_value_out() {
        let near = near();
        NearListener(Arc::downgrade(&near)).synced(Instant::now(), Duration::ZERO);
        let g = near.key("g");
        let stamp = near.stamp(g);
        near.forget("g");
        near.learn(g, 7, stamp);
        assert_eq!(near.generations(&[g]), None);
        let stamp = near.stamp(g);
        near.learn(g, 8, stamp);
        assert_eq!(near.generations(&[g]).as_deref(), Some(&[8][..]));
    }

    #[test]
    fn a_change_between_stamp_and_keep_keeps_the_entry_out() {
        let near = near();
        let text = "ns:{k:custom}";
        let key = near.key(text);
        let until = codec::now_millis() + 60_000;
        let stamp = near.stamp(key);
        // Reported by its text, as the change stream reports it.
        near.forget(text);
        near.keep(key, vec![1u8].into(), until, stamp);
        assert_eq!(near.entry(key), None);
        let stamp = near.stamp(key);
        near.keep(key, vec![2u8].into(), until, stamp);
        assert_eq!(near.entry(key).as_deref(), Some(&[2u8][..]));
        near.forget(text);
        assert_eq!(near.entry(key), None, "forgotten by its text");
    }

    #[test]
    fn generations_known_inline_and_past_four() {
        let near = near();
        NearListener(Arc::downgrade(&near)).synced(Instant::now(), Duration::ZERO);
        let keys: Vec<NearKey> = (0..6).map(|i| near.key(&format!("g{i}"))).collect();
        for (value, key) in keys.iter().enumerate() {
            near.learn(*key, value as u64 + 10, near.stamp(*key));
        }
        assert_eq!(
            near.generations(&keys[..3]).as_deref(),
            Some(&[10, 11, 12][..])
        );
        assert_eq!(
            near.generations(&keys).as_deref(),
            Some(&[10, 11, 12, 13, 14, 15][..])
        );
        near.forget("g5");
        assert_eq!(near.generations(&keys), None);
        near.forget("g1");
        assert_eq!(near.generations(&keys[..2]), None);
        assert_eq!(near.generations(&[]).as_deref(), Some(&[][..]));
    }

    #[test]
    fn a_query_entry_is_named_by_its_digest_and_label() {
        let near = near();
        let name = near.query_key(7, "first");
        assert_eq!(name, near.query_key(7, "first"));
        assert_ne!(name, near.query_key(8, "first"));
        assert_ne!(name, near.query_key(7, "firsT"));
        let long = "l".repeat(200);
        assert_eq!(near.query_key(7, &long), near.query_key(7, &long));
        assert_ne!(near.query_key(7, &long), near.query_key(7, &long[1..]));
    }

    #[test]
    fn out_of_sync_until_a_heartbeat_and_after_a_loss() {
        let near = near();
        let listener = NearListener(Arc::downgrade(&near));
        assert!(!near.in_sync());
        listener.synced(Instant::now(), Duration::from_micros(30));
        assert!(near.in_sync());
        listener.lost();
        assert!(!near.in_sync());
        let stale = Instant::now();
        std::thread::sleep(NearCache::DEFAULT_MAX_LAG + Duration::from_millis(20));
        listener.synced(stale, Duration::from_millis(1));
        assert!(
            !near.in_sync(),
            "a heartbeat older than max_lag proves nothing now"
        );
    }

    #[test]
    fn entries_are_bounded_in_bytes() {
        let near = near();
        let until = codec::now_millis() + 60_000;
        for i in 0..200 {
            let key = near.key(&format!("k{i}"));
            let stamp = near.stamp(key);
            near.keep(key, vec![0u8; 16 * 1024].into(), until, stamp);
        }
        let (_, bytes) = near.size();
        assert!(bytes <= 1 << 20, "{bytes} bytes held");
    }

    #[test]
    fn an_entry_read_between_fills_outlives_those_never_read() {
        let near = near();
        let until = codec::now_millis() + 60_000;
        let hot = near.key("hot");
        near.keep(hot, vec![0u8; 16 * 1024].into(), until, near.stamp(hot));
        for i in 0..200 {
            assert!(near.entry(hot).is_some(), "evicted after {i} others");
            let key = near.key(&format!("k{i}"));
            near.keep(key, vec![0u8; 16 * 1024].into(), until, near.stamp(key));
            let (_, bytes) = near.size();
            assert!(bytes <= 1 << 20, "{bytes} bytes held");
        }
        near.forget_all();
        assert_eq!(near.size(), (0, 0));
    }

    #[test]
    fn the_listener_ends_with_the_tier() {
        let near = near();
        let listener = NearListener(Arc::downgrade(&near));
        assert!(!listener.is_closed());
        drop(near);
        assert!(listener.is_closed());
    }
}

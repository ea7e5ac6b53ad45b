//! Where entries and generations live: the [`Store`] trait and its two implementations.

use crate::error::StoreError;
use futures_util::future::{BoxFuture, FutureExt};
use std::time::Duration;

mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod tracking;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{RedisStore, RedisStoreBuilder};

/// The result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// An entry and the current values of the generations it must match, read together.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fetched {
    /// The entry's bytes, if the key exists.
    pub entry: Option<Vec<u8>>,
    /// The current value of each generation key, in the order asked; `None` where missing.
    pub generations: Vec<Option<u64>>,
}

impl Fetched {
    /// A fetch result from its parts (for implementors of [`Store`]).
    pub fn new(entry: Option<Vec<u8>>, generations: Vec<Option<u64>>) -> Self {
        Self { entry, generations }
    }
}

/// A key-value store the cache can live in.
///
/// Implementations must be safe to share between tasks and processes as far as their medium
/// allows. The cache's correctness rests on four promises:
///
/// * [`fetch`](Store::fetch) reads the entry and the generations in one consistent step from the
///   caller's point of view (one round trip where possible);
/// * [`ensure_generations`](Store::ensure_generations) never overwrites an existing generation
///   and creates a missing one with a fresh value that was never used before (never 0 or a
///   counter that restarts);
/// * [`set_generations`](Store::set_generations) is only ever given fresh, never-used values
///   (the cache draws them), which makes every entry filled under the old values unreachable;
/// * an entry is never returned after its TTL.
pub trait Store: Send + Sync + 'static {
    /// Reads an entry and the current values of `generations`.
    fn fetch<'a>(
        &'a self,
        entry: &'a str,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Fetched>>;

    /// Stores an entry for `ttl`.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// Stores an entry for `ttl`, and keeps each of `generations` (the generations it is tagged
    /// with) alive at least as long, so that a generation lives as long as the longest entry
    /// that depends on it and no longer. A generation that never expires stays so; a missing
    /// one is not created (the entry then simply misses).
    ///
    /// The default only stores the entry: generations then live the time they were created
    /// with, and entries outliving them miss early (never stale: a missing generation is
    /// recreated with a fresh value).
    fn put_with_generations<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<()>> {
        let _ = generations;
        self.put(key, value, ttl)
    }

    /// Deletes keys (missing keys are fine).
    fn remove<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, StoreResult<()>>;

    /// Returns the current value of each generation, creating missing ones with fresh values.
    /// `ttl` bounds how long a created generation lives (`None`: until evicted or bumped).
    fn ensure_generations<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<Vec<u64>>>;

    /// Sets each generation to its fresh value, which makes every entry filled under the old
    /// value unreachable. `ttl` as in [`ensure_generations`](Store::ensure_generations).
    fn set_generations<'a>(
        &'a self,
        keys: &'a [String],
        values: &'a [u64],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<()>>;

    /// Carries out one table's invalidation *atomically*: sets the table's generations and the
    /// written rows' generations (all in the table's slot), advances the table's write
    /// sequence, and reads the generations to observe. Writers compare the new sequence with
    /// the one they read before writing: exactly one more means no other write to the table
    /// was invalidated in between, which is when a write's result may be written through.
    ///
    /// The default sets the generations and returns `None` (no ordering: results of writes are
    /// then never written through, only invalidated).
    fn bump_table<'a>(&'a self, bump: TableBump<'a>) -> BoxFuture<'a, StoreResult<Option<Bumped>>> {
        async move {
            self.set_generations(bump.keys, bump.values, None).await?;
            let ttl = Some(bump.rows_ttl);
            self.set_generations(bump.row_keys, bump.row_values, ttl)
                .await?;
            Ok(None)
        }
        .boxed()
    }

    /// The table's write sequence (0 when it does not exist yet), or `None` when the store
    /// does not keep one.
    fn write_sequence<'a>(&'a self, sequence: &'a str) -> BoxFuture<'a, StoreResult<Option<u64>>> {
        let _ = sequence;
        futures_util::future::ready(Ok(None)).boxed()
    }

    /// [`write_sequence`](Store::write_sequence), and the current value of `generation` (in the
    /// same round trip where the store can; `None` when missing or not a generation). The
    /// default reads the sequence alone.
    fn write_sequence_and_generation<'a>(
        &'a self,
        sequence: &'a str,
        generation: &'a str,
    ) -> BoxFuture<'a, StoreResult<(Option<u64>, Option<u64>)>> {
        let _ = generation;
        async move { Ok((self.write_sequence(sequence).await?, None)) }.boxed()
    }

    /// Called when an operation timed out: drop connections that may be stalled, so that the
    /// next operation opens a fresh one. The default does nothing.
    fn reset(&self) {}

    /// Takes the lock `key` for `owner` if nobody holds it (`SET NX PX`): true when taken. The
    /// lock frees itself after `ttl`, so a holder that dies cannot block others for longer.
    /// The default takes every lock at once (a store without locks).
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        owner: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        let _ = (key, owner, ttl);
        futures_util::future::ready(Ok(true)).boxed()
    }

    /// Frees the lock `key` if, and only if, `owner` holds it.
    fn unlock<'a>(&'a self, key: &'a str, owner: u64) -> BoxFuture<'a, StoreResult<()>> {
        let _ = (key, owner);
        futures_util::future::ready(Ok(())).boxed()
    }

    /// Reads `probe.entry` and, unless it holds `probe.tag` at byte `probe.tag_at` (an entry
    /// filled under the generations the caller knows), also tries to take the lock
    /// `probe.lock` for `probe.owner` as [`try_lock`](Store::try_lock) does: one round trip
    /// where the store allows, which turns an uncontended miss's read and lock into one.
    ///
    /// The default reads the entry and then takes the lock: two operations.
    fn fetch_or_lock<'a>(&'a self, probe: LockProbe<'a>) -> BoxFuture<'a, StoreResult<Probed>> {
        async move {
            let entry = self.fetch(probe.entry, &[]).await?.entry;
            if entry.as_deref().is_some_and(|bytes| probe.matches(bytes)) {
                return Ok(Probed::new(entry, false));
            }
            let locked = self.try_lock(probe.lock, probe.owner, probe.ttl).await?;
            Ok(Probed::new(entry, locked))
        }
        .boxed()
    }

    /// Reads `probe.entry` and the current values of `probe.generations`, creating a missing
    /// (or unreadable) generation with a fresh value as
    /// [`ensure_generations`](Store::ensure_generations) does (a store that does it all in one
    /// step takes that value from `probe.fresh`); then, unless the entry holds
    /// those generations (see [`ReadProbe::holds`]), takes the fill lock named after them
    /// ([`ReadProbe::lock_key`]) for `probe.owner` as [`try_lock`](Store::try_lock) does. A
    /// miss whose generations the caller does not know then waits for one round trip before
    /// its database read instead of two, where the store does all this in one step (see
    /// [`reads_and_locks_at_once`](Store::reads_and_locks_at_once)).
    ///
    /// The default makes the steps one after the other: [`fetch`](Store::fetch), then
    /// [`ensure_generations`](Store::ensure_generations) if one is missing, then
    /// [`fetch_or_lock`](Store::fetch_or_lock) unless the entry holds the generations.
    fn read_or_lock<'a>(&'a self, probe: ReadProbe<'a>) -> BoxFuture<'a, StoreResult<ReadLocked>> {
        read_or_lock_in_steps(self, probe)
    }

    /// True when [`read_or_lock`](Store::read_or_lock) costs what a
    /// [`fetch`](Store::fetch) costs (one round trip): the cache then calls it where a miss is
    /// likely, instead of a fetch followed by [`fetch_or_lock`](Store::fetch_or_lock). The
    /// default is false, and so is a Redis Cluster's (the keys of one read live in several
    /// slots): the cache then never calls it.
    fn reads_and_locks_at_once(&self) -> bool {
        false
    }

    /// Stores an entry as [`put_with_generations`](Store::put_with_generations) does, then
    /// frees the lock `lock` if `owner` holds it, as [`unlock`](Store::unlock) does: one round
    /// trip where the store allows. The lock is freed even if the entry could not be stored.
    ///
    /// The default makes the two calls one after the other.
    fn put_and_unlock<'a>(
        &'a self,
        put: PutEntry<'a>,
        lock: &'a str,
        owner: u64,
    ) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            let stored = self
                .put_with_generations(put.key, put.value, put.ttl, put.generations)
                .await;
            let unlocked = self.unlock(lock, owner).await;
            stored.and(unlocked)
        }
        .boxed()
    }

    /// For a near tier: a task that reports every change to keys starting with one of
    /// `follow.prefixes` to `follow.listener` until the listener is closed, or `None` when the
    /// store cannot report changes (the default; a cache refuses a near tier on such a store).
    ///
    /// The task must call [`ChangeListener::lost`] as soon as it may have missed a change (a
    /// connection lost or hung, a server restarted), [`ChangeListener::flush`] once it follows
    /// changes again (and before any [`synced`](ChangeListener::synced)), and
    /// [`ChangeListener::synced`] after each heartbeat that proves every change before it was
    /// reported.
    fn follow_changes(&self, follow: FollowChanges) -> Option<BoxFuture<'static, ()>> {
        let _ = follow;
        None
    }

    /// The store's name in metrics and spans (see [`observe`](crate::observe)): `memory`,
    /// `redis`, or by default `store`. Keep it short, fixed and lowercase.
    fn tier_name(&self) -> &'static str {
        "store"
    }
}

/// Where a store reports changes for a near tier (see [`Store::follow_changes`]).
pub trait ChangeListener: Send + Sync + 'static {
    /// `key` changed, expired or was evicted.
    fn changed(&self, key: &[u8]);
    /// Anything may have changed (`FLUSHALL`, a new connection): forget everything.
    fn flush(&self);
    /// The stream may have missed changes: stop answering and forget everything until the next
    /// [`synced`](ChangeListener::synced).
    fn lost(&self);
    /// Every change made before `sent` has been reported; the heartbeat took `round_trip`.
    fn synced(&self, sent: std::time::Instant, round_trip: Duration);
    /// True once nobody listens any more: the task ends.
    fn is_closed(&self) -> bool;
}

/// What [`Store::follow_changes`] follows and whom it tells.
#[derive(Clone)]
#[non_exhaustive]
pub struct FollowChanges {
    /// Changes to keys starting with one of these are reported.
    pub prefixes: Vec<String>,
    /// How often to prove the stream is in sync.
    pub heartbeat: Duration,
    /// Where to connect instead of the store's own address, if set.
    pub address: Option<String>,
    /// Whom to tell.
    pub listener: std::sync::Arc<dyn ChangeListener>,
}

impl std::fmt::Debug for FollowChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowChanges")
            .field("prefixes", &self.prefixes)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

impl FollowChanges {
    /// A request from its parts (for callers of [`Store::follow_changes`]).
    pub fn new(
        prefixes: Vec<String>,
        heartbeat: Duration,
        address: Option<String>,
        listener: std::sync::Arc<dyn ChangeListener>,
    ) -> Self {
        Self {
            prefixes,
            heartbeat,
            address,
            listener,
        }
    }
}

/// What [`Store::fetch_or_lock`] reads, and the lock it takes unless the entry is current.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct LockProbe<'a> {
    /// The entry's key.
    pub entry: &'a str,
    /// The bytes an entry filled under the caller's generations holds at `tag_at`.
    pub tag: &'a [u8],
    /// Where `tag` starts in the entry.
    pub tag_at: usize,
    /// The lock's key (in the entry's cluster slot).
    pub lock: &'a str,
    /// The lock's owner token.
    pub owner: u64,
    /// How long the lock lives unless freed.
    pub ttl: Duration,
}

impl<'a> LockProbe<'a> {
    /// A probe from its parts (for callers of [`Store::fetch_or_lock`]).
    pub fn new(
        entry: &'a str,
        tag: &'a [u8],
        tag_at: usize,
        lock: &'a str,
        owner: u64,
        ttl: Duration,
    ) -> Self {
        Self {
            entry,
            tag,
            tag_at,
            lock,
            owner,
            ttl,
        }
    }

    /// True when `entry` holds the tag at its place (the test the store makes before locking).
    pub fn matches(&self, entry: &[u8]) -> bool {
        !self.tag.is_empty()
            && entry
                .get(self.tag_at..)
                .is_some_and(|rest| rest.starts_with(self.tag))
    }
}

/// What [`Store::fetch_or_lock`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Probed {
    /// The entry's bytes, if the key exists (empty if it holds a value of another type).
    pub entry: Option<Vec<u8>>,
    /// True when the lock was taken for the caller.
    pub locked: bool,
}

impl Probed {
    /// A result from its parts (for implementors of [`Store`]).
    pub fn new(entry: Option<Vec<u8>>, locked: bool) -> Self {
        Self { entry, locked }
    }
}

/// What [`Store::read_or_lock`] reads, the generations it creates when missing, and the lock it
/// takes unless the entry holds the generations it read.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ReadProbe<'a> {
    /// The entry's key.
    pub entry: &'a str,
    /// The generation keys the entry must match, in order (at most 255).
    pub generations: &'a [String],
    /// One fresh value per generation, for those that are missing.
    pub fresh: &'a [u64],
    /// How long a created generation lives (`None`: until evicted or bumped).
    pub generation_ttl: Option<Duration>,
    /// Where the generations start in an entry (see [`ReadProbe::holds`]).
    pub tag_at: usize,
    /// The lock key before the generations (see [`ReadProbe::lock_key`]).
    pub lock_prefix: &'a str,
    /// The lock's owner token.
    pub owner: u64,
    /// How long the lock lives unless freed.
    pub ttl: Duration,
}

impl<'a> ReadProbe<'a> {
    /// A probe from its parts (for callers of [`Store::read_or_lock`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        entry: &'a str,
        generations: &'a [String],
        fresh: &'a [u64],
        generation_ttl: Option<Duration>,
        tag_at: usize,
        lock_prefix: &'a str,
        owner: u64,
        ttl: Duration,
    ) -> Self {
        Self {
            entry,
            generations,
            fresh,
            generation_ttl,
            tag_at,
            lock_prefix,
            owner,
            ttl,
        }
    }

    /// The bytes an entry filled under `generations` holds at [`tag_at`](ReadProbe::tag_at):
    /// their count (one byte), then each one as 8 bytes, little-endian. Empty (matching no
    /// entry) past 255 generations.
    pub fn tag(generations: &[u64]) -> Vec<u8> {
        let Ok(count) = u8::try_from(generations.len()) else {
            return Vec::new();
        };
        let mut tag = Vec::with_capacity(1 + 8 * generations.len());
        tag.push(count);
        for generation in generations {
            tag.extend_from_slice(&generation.to_le_bytes());
        }
        tag
    }

    /// True when `entry` was filled under `generations` (holds their [`tag`](ReadProbe::tag)).
    pub fn holds(&self, entry: &[u8], generations: &[u64]) -> bool {
        let tag = Self::tag(generations);
        !tag.is_empty()
            && entry
                .get(self.tag_at..)
                .is_some_and(|rest| rest.starts_with(&tag))
    }

    /// The fill lock of the entry under `generations`: the prefix, then the generations in
    /// decimal, separated by dots (text a Lua script can build from the values Redis holds).
    pub fn lock_key(&self, generations: &[u64]) -> String {
        lock_key(self.lock_prefix, generations)
    }
}

/// See [`ReadProbe::lock_key`].
pub(crate) fn lock_key(prefix: &str, generations: &[u64]) -> String {
    use std::fmt::Write;
    let mut key = String::with_capacity(prefix.len() + 21 * generations.len());
    key.push_str(prefix);
    for (i, generation) in generations.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        let _ = write!(key, "{generation}");
    }
    key
}

/// What became of the fill lock in [`Store::read_or_lock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadLock {
    /// The entry holds the generations read: no lock was asked for. (A store may judge this
    /// loosely, very rarely calling current an entry that is not: the cache checks the entry
    /// itself, and then takes the lock in another step. Never the other way round.)
    Current,
    /// The lock was taken for the caller.
    Taken,
    /// The entry does not hold them, and someone else holds the lock.
    Busy,
}

/// What [`Store::read_or_lock`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadLocked {
    /// The entry's bytes, if the key exists (empty if it holds a value of another type).
    pub entry: Option<Vec<u8>>,
    /// The current value of each generation, in the order asked (created where missing).
    pub generations: Vec<u64>,
    /// The lock.
    pub lock: ReadLock,
}

impl ReadLocked {
    /// A result from its parts (for implementors of [`Store`]).
    pub fn new(entry: Option<Vec<u8>>, generations: Vec<u64>, lock: ReadLock) -> Self {
        Self {
            entry,
            generations,
            lock,
        }
    }
}

/// [`Store::read_or_lock`] in steps, each one operation of `store` (the trait's default).
pub(crate) fn read_or_lock_in_steps<'a, S: Store + ?Sized>(
    store: &'a S,
    probe: ReadProbe<'a>,
) -> BoxFuture<'a, StoreResult<ReadLocked>> {
    async move {
        let fetched = store.fetch(probe.entry, probe.generations).await?;
        let known: Option<Vec<u64>> = fetched.generations.iter().copied().collect();
        let generations = match known {
            Some(generations) if generations.len() == probe.generations.len() => generations,
            _ => {
                store
                    .ensure_generations(probe.generations, probe.generation_ttl)
                    .await?
            }
        };
        let entry = fetched.entry;
        if entry
            .as_deref()
            .is_some_and(|bytes| probe.holds(bytes, &generations))
        {
            return Ok(ReadLocked::new(entry, generations, ReadLock::Current));
        }
        // The entry may have been filled since the fetch: the lock only if it was not.
        let tag = ReadProbe::tag(&generations);
        let lock = probe.lock_key(&generations);
        let lock_probe = LockProbe::new(
            probe.entry,
            &tag,
            probe.tag_at,
            &lock,
            probe.owner,
            probe.ttl,
        );
        let probed = store.fetch_or_lock(lock_probe).await?;
        let state = match probed.locked {
            true => ReadLock::Taken,
            false
                if probed
                    .entry
                    .as_deref()
                    .is_some_and(|bytes| lock_probe.matches(bytes)) =>
            {
                ReadLock::Current
            }
            false => ReadLock::Busy,
        };
        Ok(ReadLocked::new(probed.entry, generations, state))
    }
    .boxed()
}

/// An entry to store, for [`Store::put_and_unlock`]: as the arguments of
/// [`Store::put_with_generations`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PutEntry<'a> {
    /// The entry's key.
    pub key: &'a str,
    /// Its bytes.
    pub value: Vec<u8>,
    /// How long it lives.
    pub ttl: Duration,
    /// The generations kept alive at least as long (may be empty).
    pub generations: &'a [String],
}

impl<'a> PutEntry<'a> {
    /// An entry from its parts (for callers of [`Store::put_and_unlock`]).
    pub fn new(key: &'a str, value: Vec<u8>, ttl: Duration, generations: &'a [String]) -> Self {
        Self {
            key,
            value,
            ttl,
            generations,
        }
    }
}

/// One table's invalidation, for [`Store::bump_table`]. Every key carries the table's hash tag.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TableBump<'a> {
    /// The table's write sequence, advanced by one.
    pub sequence: &'a str,
    /// The table's generations to set (kept until evicted).
    pub keys: &'a [String],
    /// Their new values.
    pub values: &'a [u64],
    /// The written rows' generations to set, which expire after `rows_ttl` unless an entry
    /// stored under them extends them (see [`Store::put_with_generations`]).
    pub row_keys: &'a [String],
    /// Their new values.
    pub row_values: &'a [u64],
    /// How long a generation this bump sets on a row (or creates to observe) lives before an
    /// entry stored under it extends it.
    pub rows_ttl: Duration,
    /// Generations to read once the others are set. A missing one is created with a fresh
    /// value that lives `rows_ttl` (unless an entry stored under it extends it), so that a
    /// write can write its rows through even in a namespace no read has used yet.
    pub observe: &'a [String],
    /// A write's rows to store in the same atomic step, if the bump finds the table as the
    /// writer left it (see [`WriteThrough`]). A store that cannot do both at once ignores it and
    /// says so ([`Bumped::written_through`] `None`); the writer then stores them itself.
    pub write_through: Option<WriteThrough<'a>>,
}

/// Entries a write stores with its table's bump ([`TableBump::write_through`]): its returned
/// rows, tagged with the table's entity generation the writer read before its statement
/// (`guard`) and the rows' generations this bump sets. Stored only if, after the bump, the
/// write sequence is exactly `sequence` (no other write to the table was invalidated since the
/// writer read it) and the first observed generation still holds `guard`; then each row
/// generation of the bump, and the observed generation, live at least as long as the entries
/// (as [`Store::put_with_generations`] keeps them).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct WriteThrough<'a> {
    /// The write sequence the bump must reach.
    pub sequence: u64,
    /// The value the first observed generation must hold.
    pub guard: u64,
    /// The entries' keys.
    pub keys: &'a [String],
    /// Their encoded values, one per key.
    pub values: &'a [Vec<u8>],
    /// How long the entries are kept.
    pub ttl: Duration,
}

/// What [`Store::bump_table`] did: the new write sequence and the observed generations.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Bumped {
    /// The table's write sequence after the bump.
    pub sequence: u64,
    /// The current value of each observed generation, in the order asked.
    pub observed: Vec<Option<u64>>,
    /// Whether the bump stored the [`TableBump::write_through`] entries: `None` when the store
    /// did not try (no entries, or a store that cannot store them in the same step).
    pub written_through: Option<bool>,
}

impl Bumped {
    /// A result from its parts (for implementors of [`Store`]), with no entries stored.
    pub fn new(sequence: u64, observed: Vec<Option<u64>>) -> Self {
        Self {
            sequence,
            observed,
            written_through: None,
        }
    }

    /// The same result, saying whether the write-through entries were stored.
    pub fn with_written_through(mut self, stored: bool) -> Self {
        self.written_through = Some(stored);
        self
    }
}

/// Write sequences start from a random base below 2^52: Lua, which runs the bump script,
/// holds numbers as doubles, so larger integers would come back rounded.
pub(crate) const SEQUENCE_SHIFT: u32 = 12;

/// A fresh generation value: unique across processes and restarts with overwhelming
/// probability (64 random bits from the OS-seeded `RandomState`, mixed with a counter and the
/// clock). Never 0, so that a zeroed or default value can never match.
pub(crate) fn fresh_generation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = SEED.get_or_init(Default::default).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    hasher.write_u64(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish().max(1)
}

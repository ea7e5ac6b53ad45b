//! The in-process store: the embedded default. No server, bounded memory, per-entry TTL.

use super::{fresh_generation, Bumped, Fetched, Store, StoreResult, TableBump, SEQUENCE_SHIFT};
use futures_util::future::{BoxFuture, FutureExt};
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache as MokaCache;
use moka::Expiry;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
enum Slot {
    Entry(Arc<[u8]>),
    Generation(u64),
    Lock(u64),
}

#[derive(Clone)]
struct Stored {
    slot: Slot,
    ttl: Option<Duration>,
    /// When the value expires (`ttl` after it was written), to extend it, never shorten it.
    until: Option<Instant>,
}

impl Stored {
    fn new(slot: Slot, ttl: Option<Duration>) -> Self {
        let until = ttl.and_then(|ttl| Instant::now().checked_add(ttl));
        Self { slot, ttl, until }
    }

    fn generation(value: u64, ttl: Option<Duration>) -> Self {
        Self::new(Slot::Generation(value), ttl)
    }
}

struct PerEntryTtl;

impl Expiry<String, Stored> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, value: &Stored, _: Instant) -> Option<Duration> {
        value.ttl
    }
    fn expire_after_update(
        &self,
        _: &String,
        value: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        value.ttl
    }
}

/// An in-process [`Store`], bounded by the bytes it holds.
///
/// Built on [moka](https://docs.rs/moka), which gives lock-free concurrent reads, per-entry
/// expiry and size-bounded eviction (TinyLFU): the parts a hand-written map would get wrong.
/// Evicting a generation is safe: a missing generation is recreated with a fresh value, so the
/// entries filled under the old one simply miss.
///
/// It lives in one process: use it for a single process, tests, or data that no other process
/// writes; several processes that write share a Redis store instead.
///
/// ```
/// use diesel_memclone::{store::MemoryStore, Cache};
///
/// let store = MemoryStore::new(64 * 1024 * 1024); // at most ~64 MiB of entries
/// let cache = Cache::builder().store(store.clone()).build()?;
/// // Installing it says that one process is intended (no warning about the implicit default).
/// let _ = diesel_memclone::install(cache);
/// assert!(store.is_empty());
/// # Ok::<(), diesel_memclone::Error>(())
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    map: MokaCache<String, Stored>,
    /// Serializes table bumps, so that a sequence and its generations change together.
    table_bumps: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.map.entry_count())
            .field("bytes", &self.map.weighted_size())
            .finish()
    }
}

impl Default for MemoryStore {
    /// A store bounded to 256 MiB.
    fn default() -> Self {
        Self::new(256 * 1024 * 1024)
    }
}

impl MemoryStore {
    /// A store that holds at most about `max_bytes` of keys and values.
    pub fn new(max_bytes: u64) -> Self {
        let map = MokaCache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, value: &Stored| {
                let size = match &value.slot {
                    Slot::Entry(bytes) => bytes.len(),
                    Slot::Generation(_) | Slot::Lock(_) => 8,
                };
                u32::try_from(key.len() + size + 64).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        Self {
            map,
            table_bumps: Arc::default(),
        }
    }

    /// Number of keys held (entries and generations); approximate while writes are in flight.
    pub fn len(&self) -> u64 {
        self.map.run_pending_tasks();
        self.map.entry_count()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key held, for inspection (for example, to see what a query stored).
    pub fn keys(&self) -> Vec<String> {
        self.map
            .iter()
            .map(|(key, _)| key.as_ref().clone())
            .collect()
    }

    fn insert_entry(&self, key: &str, bytes: Arc<[u8]>, ttl: Duration) {
        self.map
            .insert(key.to_owned(), Stored::new(Slot::Entry(bytes), Some(ttl)));
    }

    /// Sets a generation. Every write of a generation goes through the key's lock (moka's
    /// `and_compute_with`), so that an extension never puts back a value a write replaced.
    fn set_generation(&self, key: &str, value: u64, ttl: Option<Duration>) {
        self.map
            .entry_by_ref(key)
            .and_compute_with(|_| Op::Put(Stored::generation(value, ttl)));
    }

    /// The generation's value, created fresh when missing (or of another kind).
    fn ensure_generation(&self, key: &str, ttl: Option<Duration>) -> u64 {
        let mut created = None;
        let result = self
            .map
            .entry_by_ref(key)
            .and_compute_with(|held| match held {
                Some(held) if matches!(held.value().slot, Slot::Generation(_)) => Op::Nop,
                _ => {
                    let value = fresh_generation();
                    created = Some(value);
                    Op::Put(Stored::generation(value, ttl))
                }
            });
        match result {
            CompResult::Unchanged(held)
            | CompResult::Inserted(held)
            | CompResult::ReplacedWith(held) => match held.value().slot {
                Slot::Generation(value) => value,
                Slot::Entry(_) | Slot::Lock(_) => created.unwrap_or_else(fresh_generation),
            },
            CompResult::StillNone(_) | CompResult::Removed(_) => {
                created.unwrap_or_else(fresh_generation)
            }
        }
    }

    /// Makes a generation that expires live at least `ttl` from now.
    fn extend_generation(&self, key: &str, ttl: Duration) {
        let Some(until) = Instant::now().checked_add(ttl) else {
            return;
        };
        self.map
            .entry_by_ref(key)
            .and_compute_with(|held| match held {
                Some(held) => {
                    let held = held.into_value();
                    match (&held.slot, held.until) {
                        (Slot::Generation(value), Some(current)) if current < until => {
                            Op::Put(Stored::generation(*value, Some(ttl)))
                        }
                        _ => Op::Nop,
                    }
                }
                None => Op::Nop,
            });
    }

    fn generation(&self, key: &str) -> Option<u64> {
        match self.map.get(key)?.slot {
            Slot::Generation(value) => Some(value),
            Slot::Entry(_) | Slot::Lock(_) => None,
        }
    }
}

impl Store for MemoryStore {
    fn tier_name(&self) -> &'static str {
        "memory"
    }

    fn fetch<'a>(
        &'a self,
        entry: &'a str,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Fetched>> {
        let entry = match self.map.get(entry).map(|s| s.slot) {
            Some(Slot::Entry(bytes)) => Some(bytes.to_vec()),
            _ => None,
        };
        let generations = generations.iter().map(|key| self.generation(key)).collect();
        futures_util::future::ready(Ok(Fetched { entry, generations })).boxed()
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<()>> {
        self.insert_entry(key, value.into(), ttl);
        futures_util::future::ready(Ok(())).boxed()
    }

    fn put_with_generations<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<()>> {
        self.insert_entry(key, value.into(), ttl);
        for generation in generations {
            self.extend_generation(generation, ttl);
        }
        futures_util::future::ready(Ok(())).boxed()
    }

    fn remove<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, StoreResult<()>> {
        for key in keys {
            self.map.invalidate(key);
        }
        futures_util::future::ready(Ok(())).boxed()
    }

    fn ensure_generations<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<Vec<u64>>> {
        // Atomic per key: of two racing creators, one value wins and both see it.
        let values = keys
            .iter()
            .map(|key| self.ensure_generation(key, ttl))
            .collect();
        futures_util::future::ready(Ok(values)).boxed()
    }

    fn set_generations<'a>(
        &'a self,
        keys: &'a [String],
        values: &'a [u64],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<()>> {
        for (key, value) in keys.iter().zip(values) {
            self.set_generation(key, *value, ttl);
        }
        futures_util::future::ready(Ok(())).boxed()
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        owner: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        let entry = self
            .map
            .entry_by_ref(key)
            .or_insert_with(|| Stored::new(Slot::Lock(owner), Some(ttl)));
        let taken = matches!(entry.value().slot, Slot::Lock(holder) if holder == owner);
        futures_util::future::ready(Ok(taken)).boxed()
    }

    fn unlock<'a>(&'a self, key: &'a str, owner: u64) -> BoxFuture<'a, StoreResult<()>> {
        self.map.entry_by_ref(key).and_compute_with(|held| match held {
            Some(held) if matches!(held.value().slot, Slot::Lock(holder) if holder == owner) => {
                Op::Remove
            }
            _ => Op::Nop,
        });
        futures_util::future::ready(Ok(())).boxed()
    }

    fn bump_table<'a>(&'a self, bump: TableBump<'a>) -> BoxFuture<'a, StoreResult<Option<Bumped>>> {
        let _serial = self.table_bumps.lock().unwrap_or_else(|e| e.into_inner());
        let table = bump.keys.iter().zip(bump.values).map(|kv| (kv, None));
        let rows = bump.row_keys.iter().zip(bump.row_values);
        let rows = rows.map(|kv| (kv, Some(bump.rows_ttl)));
        for ((key, value), ttl) in table.chain(rows) {
            self.set_generation(key, *value, ttl);
        }
        // A missing sequence restarts from a random base, never from 0 (see the Redis store).
        let current = self.generation(bump.sequence);
        let next = current.unwrap_or_else(|| fresh_generation() >> SEQUENCE_SHIFT) + 1;
        self.map
            .insert(bump.sequence.to_owned(), Stored::generation(next, None));
        // A missing observed generation is created (see `TableBump::observe`).
        let observed = bump
            .observe
            .iter()
            .map(|key| Some(self.ensure_generation(key, Some(bump.rows_ttl))))
            .collect();
        futures_util::future::ready(Ok(Some(Bumped::new(next, observed)))).boxed()
    }

    fn write_sequence<'a>(&'a self, sequence: &'a str) -> BoxFuture<'a, StoreResult<Option<u64>>> {
        let _serial = self.table_bumps.lock().unwrap_or_else(|e| e.into_inner());
        let current = match self.generation(sequence) {
            Some(current) => current,
            None => {
                // Created here if missing, from a random base (as a bump would).
                let base = fresh_generation() >> SEQUENCE_SHIFT;
                self.map
                    .insert(sequence.to_owned(), Stored::generation(base, None));
                base
            }
        };
        futures_util::future::ready(Ok(Some(current))).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn until(store: &MemoryStore, key: &str) -> Option<Instant> {
        store.map.get(key).and_then(|stored| stored.until)
    }

    #[test]
    fn entries_extend_their_generations_and_never_shorten_them() {
        let store = MemoryStore::new(1 << 20);
        let keys = ["g:short", "g:long", "g:forever", "g:missing"].map(String::from);
        store.set_generation(&keys[0], 1, Some(Duration::from_secs(1)));
        store.set_generation(&keys[1], 2, Some(Duration::from_secs(3600)));
        store.set_generation(&keys[2], 3, None);
        let long = until(&store, &keys[1]);
        let before = Instant::now();
        let ttl = Duration::from_secs(60);
        store
            .put_with_generations("entry", vec![1], ttl, &keys)
            .now_or_never()
            .expect("ready")
            .unwrap();
        assert!(
            until(&store, &keys[0]).is_some_and(|t| t >= before + ttl),
            "extended"
        );
        assert_eq!(until(&store, &keys[1]), long, "never shortened");
        assert_eq!(
            until(&store, &keys[2]),
            None,
            "a lasting generation stays so"
        );
        assert!(
            store.map.get(&keys[3]).is_none(),
            "a missing one is not created"
        );
        let values: Vec<_> = keys.iter().map(|k| store.generation(k)).collect();
        assert_eq!(
            values,
            [Some(1), Some(2), Some(3), None],
            "values untouched"
        );
    }

    #[test]
    fn a_bump_creates_the_generation_it_observes() {
        let store = MemoryStore::new(1 << 20);
        let observe = ["t:egen".to_owned()];
        let bump = TableBump {
            sequence: "t:wseq",
            keys: &[],
            values: &[],
            row_keys: &[],
            row_values: &[],
            rows_ttl: Duration::from_secs(60),
            observe: &observe,
            write_through: None,
        };
        let bumped = store.bump_table(bump).now_or_never().expect("ready");
        let observed = bumped.unwrap().expect("a sequence").observed;
        assert_eq!(observed, [store.generation("t:egen")]);
        assert!(observed[0].is_some());
    }
}

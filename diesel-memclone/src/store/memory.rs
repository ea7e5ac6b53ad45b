//! The in-process store: the embedded default. No server, bounded memory, per-entry TTL.

use super::{fresh_generation, Bumped, Fetched, Store, StoreResult, TableBump, SEQUENCE_SHIFT};
use futures_util::future::{BoxFuture, FutureExt};
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

    /// Overwrites a raw entry (used by tests to simulate corrupt or foreign data).
    pub fn put_raw(&self, key: &str, bytes: &[u8], ttl: Duration) {
        self.insert_entry(key, bytes.into(), ttl);
    }

    fn insert_entry(&self, key: &str, bytes: Arc<[u8]>, ttl: Duration) {
        let stored = Stored {
            slot: Slot::Entry(bytes),
            ttl: Some(ttl),
        };
        self.map.insert(key.to_owned(), stored);
    }

    fn generation(&self, key: &str) -> Option<u64> {
        match self.map.get(key)?.slot {
            Slot::Generation(value) => Some(value),
            Slot::Entry(_) | Slot::Lock(_) => None,
        }
    }
}

impl Store for MemoryStore {
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
        let values = keys
            .iter()
            .map(|key| {
                // Atomic per key: of two racing creators, one value wins and both see it.
                let stored = self
                    .map
                    .entry_by_ref(key.as_str())
                    .or_insert_with(|| Stored {
                        slot: Slot::Generation(fresh_generation()),
                        ttl,
                    });
                match stored.value().slot {
                    Slot::Generation(value) => value,
                    // A key of the wrong kind: replace it with a fresh generation.
                    Slot::Entry(_) | Slot::Lock(_) => {
                        let value = fresh_generation();
                        self.map.insert(
                            key.clone(),
                            Stored {
                                slot: Slot::Generation(value),
                                ttl,
                            },
                        );
                        value
                    }
                }
            })
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
            let stored = Stored {
                slot: Slot::Generation(*value),
                ttl,
            };
            self.map.insert(key.clone(), stored);
        }
        futures_util::future::ready(Ok(())).boxed()
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        owner: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        let entry = self.map.entry_by_ref(key).or_insert_with(|| Stored {
            slot: Slot::Lock(owner),
            ttl: Some(ttl),
        });
        let taken = matches!(entry.value().slot, Slot::Lock(holder) if holder == owner);
        futures_util::future::ready(Ok(taken)).boxed()
    }

    fn unlock<'a>(&'a self, key: &'a str, owner: u64) -> BoxFuture<'a, StoreResult<()>> {
        self.map.entry_by_ref(key).and_compute_with(|held| match held {
            Some(held) if matches!(held.value().slot, Slot::Lock(holder) if holder == owner) => {
                moka::ops::compute::Op::Remove
            }
            _ => moka::ops::compute::Op::Nop,
        });
        futures_util::future::ready(Ok(())).boxed()
    }

    fn bump_table<'a>(&'a self, bump: TableBump<'a>) -> BoxFuture<'a, StoreResult<Option<Bumped>>> {
        let _serial = self.table_bumps.lock().unwrap_or_else(|e| e.into_inner());
        let table = bump.keys.iter().zip(bump.values).map(|kv| (kv, None));
        let rows = bump.row_keys.iter().zip(bump.row_values);
        let rows = rows.map(|kv| (kv, Some(bump.rows_ttl)));
        for ((key, value), ttl) in table.chain(rows) {
            let stored = Stored {
                slot: Slot::Generation(*value),
                ttl,
            };
            self.map.insert(key.clone(), stored);
        }
        // A missing sequence restarts from a random base, never from 0 (see the Redis store).
        let current = self.generation(bump.sequence);
        let next = current.unwrap_or_else(|| fresh_generation() >> SEQUENCE_SHIFT) + 1;
        let stored = Stored {
            slot: Slot::Generation(next),
            ttl: None,
        };
        self.map.insert(bump.sequence.to_owned(), stored);
        let observed = bump
            .observe
            .iter()
            .map(|key| self.generation(key))
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
                let stored = Stored {
                    slot: Slot::Generation(base),
                    ttl: None,
                };
                self.map.insert(sequence.to_owned(), stored);
                base
            }
        };
        futures_util::future::ready(Ok(Some(current))).boxed()
    }
}

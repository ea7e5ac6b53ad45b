//! Where a miss is likely without a near tier: the generations this process moved since it last
//! read an entry. A read that expects a miss takes the fill lock in its read (one round trip
//! where the store allows, see `Store::read_or_lock`); any other read stays a plain fetch, whose
//! hit is cheaper than the script's.
//!
//! Two striped arrays, lossy by design (a wrong guess costs speed, never correctness): one
//! counts this process's bumps per stripe of generation keys; the other keeps, per stripe of
//! entry keys, which entry was last read there and the sum of its generations' counters then.
//! A read whose sum moved since (a write here invalidated it) expects a miss. An entry this
//! process has not read yet, or whose stripe another entry took since, expects a hit.

use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::xxh3_64;

/// Stripes of each array: 128 KiB per cache in all.
const STRIPES: usize = 8192;

pub(super) struct Moves {
    generations: Box<[AtomicU64]>,
    entries: Box<[AtomicU64]>,
}

/// What a read looked at before it was sent, to [`Moves::settle`] once it is done.
#[derive(Clone, Copy)]
pub(super) struct Seen {
    stripe: usize,
    mark: u64,
}

impl Default for Moves {
    fn default() -> Self {
        let stripes = || (0..STRIPES).map(|_| AtomicU64::new(0)).collect();
        Self {
            generations: stripes(),
            entries: stripes(),
        }
    }
}

impl Moves {
    /// This process moved these generations (a write's bump).
    pub(super) fn moved(&self, generations: &[String]) {
        for generation in generations {
            let stripe = stripe(generation);
            self.generations[stripe].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a read of `entry` under `generations` expects a miss, and what to settle once it
    /// is done.
    pub(super) fn expects_miss(&self, entry: &str, generations: &[String]) -> (bool, Seen) {
        let hash = xxh3_64(entry.as_bytes());
        let sum = generations.iter().fold(0u32, |sum, generation| {
            let moves = self.generations[stripe(generation)].load(Ordering::Relaxed);
            sum.wrapping_add(moves as u32)
        });
        // The entry's hash in the high half tells its stripe's other entries apart.
        let mark = (hash & 0xffff_ffff_0000_0000) | u64::from(sum);
        let stripe = (hash as usize) % STRIPES;
        let last = self.entries[stripe].load(Ordering::Relaxed);
        let expects = last != mark && last >> 32 == mark >> 32;
        (expects, Seen { stripe, mark })
    }

    /// The read is done: until one of its generations moves here, the entry's next read
    /// expects a hit.
    pub(super) fn settle(&self, seen: Seen) {
        let slot = &self.entries[seen.stripe];
        if slot.load(Ordering::Relaxed) != seen.mark {
            slot.store(seen.mark, Ordering::Relaxed);
        }
    }
}

fn stripe(key: &str) -> usize {
    (xxh3_64(key.as_bytes()) as usize) % STRIPES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_expects_a_miss_only_after_a_move_of_its_generations() {
        let moves = Moves::default();
        let generations = ["ns:{t:users}:qgen".to_string()];
        let (expects, seen) = moves.expects_miss("ns:{q:1}:a", &generations);
        assert!(!expects, "never read: a hit");
        moves.settle(seen);
        assert!(!moves.expects_miss("ns:{q:1}:a", &generations).0);
        moves.moved(&generations);
        let (expects, seen) = moves.expects_miss("ns:{q:1}:a", &generations);
        assert!(expects, "moved since its last read");
        moves.settle(seen);
        assert!(!moves.expects_miss("ns:{q:1}:a", &generations).0);
        moves.moved(&["ns:{t:posts}:qgen".to_string()]);
        assert!(
            !moves.expects_miss("ns:{q:1}:a", &generations).0,
            "another table's write"
        );
    }
}

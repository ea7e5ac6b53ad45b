//! The entry codec alone, on the plain rows of the hit-path benchmark (`BenchUser`: integers and
//! strings), old and new in one run: no server needed.
//!
//! * `decode_old` / `decode_new`: the hit's decode before the MessagePack fallback (copied below
//!   as it was) and today's, on the very same bytes (plain rows keep the old layout);
//! * `decode_msgpack`: today's decode of the same rows stored in MessagePack, what a
//!   MessagePack-everywhere codec would cost on a hit;
//! * `encode_old` / `encode_new`: the fill's encode before (bincode) and today's (bincode; the
//!   type's first fills and then one in 64 are read back before they are stored).
//!
//! `cargo bench -p diesel-memclone-tests --bench codec`; BENCHMARKS.md quotes a run's medians.

// mimalloc, as in the other benches.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, BenchmarkId, Criterion};
use diesel_memclone::__private::codec as new_codec;
use diesel_memclone_tests::bench::BenchUser;
use std::hint::black_box;
use std::time::Duration;

/// The entry codec before the MessagePack fallback (commit 1a214a7), copied as it was: the
/// baseline.
mod old_codec {
    use xxhash_rust::xxh3::xxh3_64;

    const MAGIC: &[u8; 4] = b"MCv2";

    fn config() -> bincode::config::Configuration {
        bincode::config::standard()
    }

    pub fn encode<T: serde::Serialize + ?Sized>(
        generations: &[u64],
        fresh_until: u64,
        value: &T,
    ) -> Option<Vec<u8>> {
        let payload = bincode::serde::encode_to_vec(value, config()).ok()?;
        let count = u8::try_from(generations.len()).ok()?;
        let mut out =
            Vec::with_capacity(MAGIC.len() + 1 + 8 * generations.len() + 16 + payload.len());
        out.extend_from_slice(MAGIC);
        out.push(count);
        for generation in generations {
            out.extend_from_slice(&generation.to_le_bytes());
        }
        out.extend_from_slice(&fresh_until.to_le_bytes());
        out.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Some(out)
    }

    pub fn decode<T: serde::de::DeserializeOwned>(
        bytes: &[u8],
        current: &[u64],
    ) -> Option<(T, u64)> {
        let rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let (&count, mut rest) = rest.split_first()?;
        if usize::from(count) != current.len() {
            return None;
        }
        for expected in current {
            let (word, tail) = split_u64(rest)?;
            if word != *expected {
                return None;
            }
            rest = tail;
        }
        let (fresh_until, rest) = split_u64(rest)?;
        let (checksum, payload) = split_u64(rest)?;
        if checksum != xxh3_64(payload) {
            return None;
        }
        match bincode::serde::decode_from_slice::<T, _>(payload, config()) {
            Ok((value, read)) if read == payload.len() => Some((value, fresh_until)),
            _ => None,
        }
    }

    fn split_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
        let (head, tail) = bytes.split_first_chunk::<8>()?;
        Some((u64::from_le_bytes(*head), tail))
    }
}

/// A row as the benchmark schema holds it.
fn bench_user(id: i32) -> BenchUser {
    BenchUser {
        id,
        name: format!("user {id}"),
        email: format!("user{id}@example.com"),
        status: if id % 3 == 0 { "inactive" } else { "active" }.to_owned(),
        org_id: id % 100,
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    // One generation, as a cached query's entry has.
    let tags = [0x1234_5678_9abc_def0_u64];
    for rows in [1_i32, 100, 1000] {
        let value: Vec<BenchUser> = (1..=rows).map(bench_user).collect();
        let entry = new_codec::encode(&tags, u64::MAX, &value).expect("encode");
        // Plain rows keep the old layout byte for byte: entries written before stay readable,
        // and the two decodes below read the very same bytes.
        assert_eq!(entry, old_codec::encode(&tags, u64::MAX, &value).unwrap());
        let msgpack = new_codec::encode_msgpack(&tags, u64::MAX, &value).expect("msgpack");
        assert_eq!(
            new_codec::decode::<Vec<BenchUser>>(&msgpack, &tags)
                .unwrap()
                .0,
            value
        );
        group.bench_with_input(BenchmarkId::new("decode_old", rows), &rows, |b, _| {
            b.iter(|| old_codec::decode::<Vec<BenchUser>>(black_box(&entry), &tags).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("decode_new", rows), &rows, |b, _| {
            b.iter(|| new_codec::decode::<Vec<BenchUser>>(black_box(&entry), &tags).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("decode_msgpack", rows), &rows, |b, _| {
            b.iter(|| new_codec::decode::<Vec<BenchUser>>(black_box(&msgpack), &tags).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("encode_old", rows), &rows, |b, _| {
            b.iter(|| old_codec::encode(&tags, u64::MAX, black_box(&value)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("encode_new", rows), &rows, |b, _| {
            b.iter(|| new_codec::encode(&tags, u64::MAX, black_box(&value)).unwrap())
        });
    }
    group.finish();
}

/// On a shared machine the load moves between two criterion functions measured seconds apart.
/// This pairs them instead: rounds of alternating batches of the old and the new decode, each
/// round giving new/old; prints the median and the spread of the rounds' ratios.
fn paired() {
    let tags = [0x1234_5678_9abc_def0_u64];
    println!("\npaired rounds (alternating batches of the old and new decode, same bytes):");
    for rows in [1_i32, 100, 1000] {
        let value: Vec<BenchUser> = (1..=rows).map(bench_user).collect();
        let entry = new_codec::encode(&tags, u64::MAX, &value).expect("encode");
        let batch = (20_000 / rows).max(1);
        let time = |decode: &dyn Fn() -> Vec<BenchUser>| {
            let start = std::time::Instant::now();
            for _ in 0..batch {
                black_box(decode());
            }
            start.elapsed().as_secs_f64()
        };
        let old = || {
            old_codec::decode::<Vec<BenchUser>>(black_box(&entry), &tags)
                .unwrap()
                .0
        };
        let new = || {
            new_codec::decode::<Vec<BenchUser>>(black_box(&entry), &tags)
                .unwrap()
                .0
        };
        let mut ratios = Vec::new();
        for round in 0..201 {
            // Alternate which goes first, so that neither always follows the other.
            let (o, n) = if round % 2 == 0 {
                let o = time(&old);
                (o, time(&new))
            } else {
                let n = time(&new);
                (time(&old), n)
            };
            ratios.push(n / o);
        }
        ratios.sort_by(f64::total_cmp);
        let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q) as usize];
        println!(
            "  {rows:>4} rows: decode_new / decode_old = {:.3} (median of {} rounds; quartiles {:.3} to {:.3})",
            at(0.5),
            ratios.len(),
            at(0.25),
            at(0.75)
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2));
    targets = codec
}

fn main() {
    benches();
    // Only under `cargo bench` (not when `cargo test --benches` runs each benchmark once).
    if std::env::args().any(|a| a == "--bench") {
        paired();
    }
    Criterion::default().configure_from_args().final_summary();
}

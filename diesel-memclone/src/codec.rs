//! How cached values are laid out in the store.
//!
//! An entry is `MAGIC | generation count | generations (u64 LE each) | fresh until (unix ms,
//! u64 LE) | checksum (u64 LE) | payload`. The payload is the value encoded with bincode 2 (serde). The generations are the
//! ones the fill read *before* it queried the database; a reader serves the entry only if they
//! still equal the current generations (validate on read). The checksum turns corrupt bytes or a
//! foreign writer's value into a miss instead of a wrong value.

use serde::{de::DeserializeOwned, Serialize};
use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 4] = b"MCv2";

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` tagged with the generations it was filled under.
/// Milliseconds since the Unix epoch (the clock entries' freshness is measured on).
pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Encodes `value` tagged with the generations it was filled under and the instant (unix ms)
/// until which it is fresh; past it, it may only be served stale-while-revalidate.
pub(crate) fn encode<T: Serialize + ?Sized>(
    generations: &[u64],
    fresh_until: u64,
    value: &T,
) -> Option<Vec<u8>> {
    let payload = bincode::serde::encode_to_vec(value, config()).ok()?;
    let count = u8::try_from(generations.len()).ok()?;
    let mut out = Vec::with_capacity(MAGIC.len() + 1 + 8 * generations.len() + 16 + payload.len());
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

/// Why an entry was not served.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Filled under other generations: a write happened since (or the fill raced one).
    Outdated,
    /// Not an entry this version wrote, or bytes that do not decode.
    Corrupt,
}

/// Decodes an entry if it was filled under exactly `current` generations; returns the value
/// and the instant (unix ms) until which it is fresh.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    current: &[u64],
) -> Result<(T, u64), Reject> {
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or(Reject::Corrupt)?;
    let (&count, mut rest) = rest.split_first().ok_or(Reject::Corrupt)?;
    if usize::from(count) != current.len() {
        return Err(Reject::Corrupt);
    }
    for expected in current {
        let (word, tail) = split_u64(rest).ok_or(Reject::Corrupt)?;
        if word != *expected {
            return Err(Reject::Outdated);
        }
        rest = tail;
    }
    let (fresh_until, rest) = split_u64(rest).ok_or(Reject::Corrupt)?;
    let (checksum, payload) = split_u64(rest).ok_or(Reject::Corrupt)?;
    if checksum != xxh3_64(payload) {
        return Err(Reject::Corrupt);
    }
    match bincode::serde::decode_from_slice::<T, _>(payload, config()) {
        Ok((value, read)) if read == payload.len() => Ok((value, fresh_until)),
        _ => Err(Reject::Corrupt),
    }
}

fn split_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (head, tail) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*head), tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_under_same_generations() {
        let bytes = encode(&[7, 9], 1234, &vec![(1i32, "a".to_string())]).unwrap();
        let back: (Vec<(i32, String)>, u64) = decode(&bytes, &[7, 9]).unwrap();
        assert_eq!(back, (vec![(1, "a".to_string())], 1234));
    }

    #[test]
    fn other_generations_are_outdated() {
        let bytes = encode(&[7, 9], 0, &5u32).unwrap();
        assert_eq!(decode::<u32>(&bytes, &[7, 10]), Err(Reject::Outdated));
        assert_eq!(decode::<u32>(&bytes, &[7]), Err(Reject::Corrupt));
    }

    #[test]
    fn corrupt_bytes_are_rejected_not_panicking() {
        let mut bytes = encode(&[1], 0, &"hello".to_string()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(decode::<String>(&bytes, &[1]), Err(Reject::Corrupt));
        for cut in 0..bytes.len() {
            assert!(decode::<String>(&bytes[..cut], &[1]).is_err());
        }
        assert_eq!(decode::<String>(b"garbage", &[1]), Err(Reject::Corrupt));
    }

    #[test]
    fn a_value_that_does_not_fit_the_type_is_corrupt() {
        // Types are told apart by the key (type name and fingerprint); the codec only has to
        // refuse bytes that do not fit, or do not use up the payload.
        let bytes = encode(&[1], 0, &vec![1u8, 2, 3]).unwrap();
        assert_eq!(
            decode::<(u64, u64, u64, u64, u64)>(&bytes, &[1]),
            Err(Reject::Corrupt)
        );
        assert_eq!(decode::<(u64, u64)>(&bytes, &[1]), Err(Reject::Corrupt));
    }
}

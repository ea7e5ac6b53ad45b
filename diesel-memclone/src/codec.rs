//! How cached values are laid out in the store.
//!
//! An entry is `MAGIC | generation count | generations (u64 LE each) | fresh until (unix ms,
//! u64 LE) | checksum (u64 LE) | payload`. The generations are the ones the fill read *before* it
//! queried the database; a reader serves the entry only if they still equal the current
//! generations (validate on read). The checksum turns corrupt bytes or a foreign writer's value
//! into a miss instead of a wrong value.
//!
//! The magic names the payload's encoding, so that every entry says how to read it:
//!
//! * `MCv2`: bincode 2 (serde, standard configuration), compact and the fastest to decode: the
//!   default, byte for byte the layout of the versions before the fallback existed;
//! * `MCm2`: MessagePack (rmp-serde, structs as maps), self-describing: for values bincode cannot
//!   read back, those whose `Deserialize` asks the format what comes next (`deserialize_any`):
//!   `serde_json::Value`, `bigdecimal::BigDecimal`, `#[serde(untagged)]` and internally tagged
//!   enums, `#[serde(flatten)]`. Its checksum is seeded differently, so that a damaged magic is
//!   caught too.
//!
//! The choice is made on the fill path, never on a hit (a hit reads the magic): a type's first
//! fills, and then one in [`CHECK_EVERY`], are read back before they are stored. A value that
//! bincode writes but cannot read is written in MessagePack instead, and so is every later value
//! of its type. A value that reads back in neither is not stored, and its type is reported once,
//! by name ([`tracing`] at ERROR), and checked on every fill from then on: otherwise it would be
//! re-read from the database on every call without anyone noticing. A value that fails only past
//! the checked fills (a nullable JSON column that was null until then) fails on its first read:
//! that read counts a corrupt entry, goes to the database, and sends the type's next fills
//! through the check again.

use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Entries whose payload is bincode 2.
const MAGIC_BINCODE: &[u8; 4] = b"MCv2";
/// Entries whose payload is MessagePack.
const MAGIC_MSGPACK: &[u8; 4] = b"MCm2";
/// The checksum seed of MessagePack payloads (bincode payloads use xxh3's default).
const MSGPACK_SEED: u64 = 0x6d73_6770_6163_6b21;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Milliseconds since the Unix epoch (the clock entries' freshness is measured on).
pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// bincode 2, standard configuration.
    Bincode,
    /// MessagePack, structs as maps.
    MessagePack,
}

impl Encoding {
    fn magic(self) -> &'static [u8; 4] {
        match self {
            Encoding::Bincode => MAGIC_BINCODE,
            Encoding::MessagePack => MAGIC_MSGPACK,
        }
    }

    fn checksum(self, payload: &[u8]) -> u64 {
        match self {
            Encoding::Bincode => xxh3_64(payload),
            Encoding::MessagePack => xxh3_64_with_seed(payload, MSGPACK_SEED),
        }
    }

    /// Appends `value`'s encoding to `out`; the error's text on failure.
    fn write<T: Serialize + ?Sized>(self, value: &T, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Encoding::Bincode => bincode::serde::encode_into_writer(value, Append(out), config())
                .map_err(|e| e.to_string()),
            Encoding::MessagePack => {
                rmp_serde::encode::write_named(out, value).map_err(|e| e.to_string())
            }
        }
    }

    /// Decodes a payload that must be used up whole.
    fn read<T: DeserializeOwned>(self, payload: &[u8]) -> Result<T, String> {
        match self {
            Encoding::Bincode => match bincode::serde::decode_from_slice::<T, _>(payload, config())
            {
                Ok((value, read)) if read == payload.len() => Ok(value),
                Ok((_, read)) => Err(format!("{} bytes left over", payload.len() - read)),
                Err(e) => Err(e.to_string()),
            },
            Encoding::MessagePack => {
                let mut rest = payload;
                let mut de = rmp_serde::Deserializer::new(&mut rest);
                let value = T::deserialize(&mut de).map_err(|e| e.to_string())?;
                drop(de);
                if rest.is_empty() {
                    Ok(value)
                } else {
                    Err(format!("{} bytes left over", rest.len()))
                }
            }
        }
    }
}

/// bincode's writer for appending to a `Vec` that already holds the entry's header.
struct Append<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for Append<'_> {
    #[inline(always)]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// What the codec learnt of one type (told apart by name: two types with one name would only
/// share an encoding or a check, never a value, since their keys differ).
#[derive(Default)]
struct TypeState {
    /// Its values are written in MessagePack: one of them did not read back from bincode.
    msgpack: AtomicBool,
    /// No encoding read one of its values back: every fill is checked, and it was reported.
    unencodable: AtomicBool,
    /// Fills encoded, since the first or since an entry of the type failed to decode.
    fills: AtomicU64,
    /// An entry with a valid checksum that did not decode was reported.
    undecodable: AtomicBool,
}

/// Every type encoded so far: one small allocation per type, kept for the process's life.
static TYPES: RwLock<BTreeMap<&'static str, &'static TypeState>> = RwLock::new(BTreeMap::new());

fn state<T: ?Sized>() -> &'static TypeState {
    let name = std::any::type_name::<T>();
    if let Some(state) = TYPES.read().unwrap_or_else(|e| e.into_inner()).get(name) {
        return state;
    }
    let mut types = TYPES.write().unwrap_or_else(|e| e.into_inner());
    types
        .entry(name)
        .or_insert_with(|| Box::leak(Box::default()))
}

/// The first fills of each type are read back before they are stored...
const CHECK_FIRST: u64 = 16;
/// ...and then one fill in this many: reading back costs about as much as a hit's decode, three
/// times the encode itself, and a value that fails later is caught on its first read anyway
/// (see [`undecodable`]).
const CHECK_EVERY: u64 = 64;

impl TypeState {
    /// Whether this fill's encoding is read back before it is stored.
    fn check_this_fill(&self) -> bool {
        let fill = self.fills.fetch_add(1, Ordering::Relaxed);
        fill < CHECK_FIRST
            || fill.is_multiple_of(CHECK_EVERY)
            || self.unencodable.load(Ordering::Relaxed)
    }
}

/// Encodes `value` tagged with the generations it was filled under and the instant (unix ms)
/// until which it is fresh; past it, it may only be served stale-while-revalidate.
///
/// `None` when the value cannot be stored: more than 255 generations, or a value that reads
/// back in no encoding (its type is then reported once).
pub(crate) fn encode<T: Serialize + DeserializeOwned>(
    generations: &[u64],
    fresh_until: u64,
    value: &T,
) -> Option<Vec<u8>> {
    encode_as::<T, T>(generations, fresh_until, value)
}

/// [`encode`] for a value that readers decode as `T` (an `Option<&U>` read as `Option<U>`).
pub(crate) fn encode_as<T: DeserializeOwned, S: Serialize + ?Sized>(
    generations: &[u64],
    fresh_until: u64,
    value: &S,
) -> Option<Vec<u8>> {
    let state = state::<T>();
    let check = state.check_this_fill();
    let first = match state.msgpack.load(Ordering::Relaxed) {
        true => Encoding::MessagePack,
        false => Encoding::Bincode,
    };
    let mut out = header(generations, fresh_until)?;
    let start = out.len();
    let mut errors = Vec::new();
    for encoding in [first, Encoding::MessagePack] {
        out.truncate(start);
        let written = encoding.write(value, &mut out).and_then(|()| match check {
            true => encoding.read::<T>(&out[start..]).map(drop),
            false => Ok(()),
        });
        match written {
            Ok(()) => {
                if encoding != first && !state.msgpack.swap(true, Ordering::Relaxed) {
                    tracing::debug!(
                        r#type = std::any::type_name::<T>(),
                        error = errors.join("; "),
                        "diesel-memclone: bincode cannot read this type back; its entries use \
                         MessagePack"
                    );
                }
                out[..MAGIC_BINCODE.len()].copy_from_slice(encoding.magic());
                let checksum = encoding.checksum(&out[start..]);
                out[start - 8..start].copy_from_slice(&checksum.to_le_bytes());
                return Some(out);
            }
            Err(error) => errors.push(format!("{encoding:?}: {error}")),
        }
        if first == Encoding::MessagePack {
            break;
        }
    }
    if !state.unencodable.swap(true, Ordering::Relaxed) {
        let name = std::any::type_name::<T>();
        tracing::error!(
            r#type = name,
            errors = errors.join("; "),
            "diesel-memclone: values of type `{name}` cannot be cached: they do not read back from \
             bincode nor from MessagePack, so its reads go to the database every time. Make its \
             serde Serialize and Deserialize agree (reported once per type)"
        );
    }
    None
}

/// Where [`tag`] starts in an entry: after the magic.
pub(crate) const TAG_AT: usize = MAGIC_BINCODE.len();

/// The bytes every entry filled under `generations` holds at [`TAG_AT`], whatever its encoding:
/// the generation count and the generations (empty when there are too many to encode).
pub(crate) fn tag(generations: &[u64]) -> Vec<u8> {
    let Ok(count) = u8::try_from(generations.len()) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(1 + 8 * generations.len());
    out.push(count);
    for generation in generations {
        out.extend_from_slice(&generation.to_le_bytes());
    }
    out
}

/// The entry's header with a zero checksum, with room for a small payload.
fn header(generations: &[u64], fresh_until: u64) -> Option<Vec<u8>> {
    let count = u8::try_from(generations.len()).ok()?;
    let mut out = Vec::with_capacity(MAGIC_BINCODE.len() + 1 + 8 * generations.len() + 16 + 64);
    out.extend_from_slice(MAGIC_BINCODE);
    out.push(count);
    for generation in generations {
        out.extend_from_slice(&generation.to_le_bytes());
    }
    out.extend_from_slice(&fresh_until.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
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
    // The hit path of plain rows: the same steps as before the fallback existed.
    let Some(rest) = bytes.strip_prefix(MAGIC_BINCODE.as_slice()) else {
        return decode_msgpack(bytes, current);
    };
    let (fresh_until, checksum, payload) = fields(rest, current)?;
    if checksum != xxh3_64(payload) {
        return Err(Reject::Corrupt);
    }
    decode_bincode(payload).map(|value| (value, fresh_until))
}

/// [`decode`] of an entry whose checksum this process has checked already, or that it
/// encoded: the near tier's (it keeps only entries that decoded, and they cannot change in
/// memory). Skips hashing the payload again.
pub(crate) fn decode_checked<T: DeserializeOwned>(
    bytes: &[u8],
    current: &[u64],
) -> Result<(T, u64), Reject> {
    let Some(rest) = bytes.strip_prefix(MAGIC_BINCODE.as_slice()) else {
        return decode_msgpack(bytes, current);
    };
    let (fresh_until, _, payload) = fields(rest, current)?;
    decode_bincode(payload).map(|value| (value, fresh_until))
}

#[inline(always)]
fn decode_bincode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Reject> {
    match bincode::serde::decode_from_slice::<T, _>(payload, config()) {
        Ok((value, read)) if read == payload.len() => Ok(value),
        Ok((_, read)) => Err(undecodable::<T>(
            Encoding::Bincode,
            &format_args!("{} bytes left over", payload.len() - read),
        )),
        Err(error) => Err(undecodable::<T>(Encoding::Bincode, &error)),
    }
}

/// [`decode`] of a MessagePack entry (or of bytes that are no entry).
#[inline(never)]
fn decode_msgpack<T: DeserializeOwned>(bytes: &[u8], current: &[u64]) -> Result<(T, u64), Reject> {
    let rest = bytes
        .strip_prefix(MAGIC_MSGPACK.as_slice())
        .ok_or(Reject::Corrupt)?;
    let (fresh_until, checksum, payload) = fields(rest, current)?;
    let encoding = Encoding::MessagePack;
    if checksum != encoding.checksum(payload) {
        return Err(Reject::Corrupt);
    }
    match encoding.read::<T>(payload) {
        Ok(value) => Ok((value, fresh_until)),
        Err(error) => Err(undecodable::<T>(encoding, &error)),
    }
}

/// The fields after the magic: checks the generations against `current`; returns the freshness
/// instant, the checksum and the payload.
#[inline(always)]
fn fields<'a>(rest: &'a [u8], current: &[u64]) -> Result<(u64, u64, &'a [u8]), Reject> {
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
    Ok((fresh_until, checksum, payload))
}

/// An entry with a valid checksum that does not decode as `T`: a value whose fill was not read
/// back (past the type's first fills) and that bincode cannot read, or an entry written by
/// another version of the program. It is replaced from the database, and the type's next fills
/// are read back again, which moves it to MessagePack if bincode is the trouble. Each type is
/// reported once.
#[cold]
#[inline(never)]
fn undecodable<T>(encoding: Encoding, error: &dyn std::fmt::Display) -> Reject {
    let state = state::<T>();
    state.fills.store(0, Ordering::Relaxed);
    if !state.undecodable.swap(true, Ordering::Relaxed) {
        let name = std::any::type_name::<T>();
        tracing::warn!(
            r#type = name,
            encoding = ?encoding,
            error = %error,
            "diesel-memclone: a cached entry of type `{name}` did not decode; it is read from the \
             database and replaced, and the type's next entries are checked (reported once per \
             type)"
        );
    }
    Reject::Corrupt
}

fn split_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (head, tail) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*head), tail))
}

/// The codec for the benchmarks (`benches/codec.rs`): not public API.
#[doc(hidden)]
pub mod bench {
    use serde::{de::DeserializeOwned, Serialize};

    /// The codec's `encode`, as a fill runs it.
    pub fn encode<T: Serialize + DeserializeOwned>(
        generations: &[u64],
        fresh_until: u64,
        value: &T,
    ) -> Option<Vec<u8>> {
        super::encode(generations, fresh_until, value)
    }

    /// An entry in MessagePack whatever the type (to compare the encodings on one value).
    pub fn encode_msgpack<T: Serialize>(
        generations: &[u64],
        fresh_until: u64,
        value: &T,
    ) -> Option<Vec<u8>> {
        let encoding = super::Encoding::MessagePack;
        let mut out = super::header(generations, fresh_until)?;
        let start = out.len();
        encoding.write(value, &mut out).ok()?;
        out[..4].copy_from_slice(encoding.magic());
        let checksum = encoding.checksum(&out[start..]);
        out[start - 8..start].copy_from_slice(&checksum.to_le_bytes());
        Some(out)
    }

    /// The codec's `decode`, as a hit runs it.
    pub fn decode<T: DeserializeOwned>(bytes: &[u8], current: &[u64]) -> Option<(T, u64)> {
        super::decode(bytes, current).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Deserializer};

    #[test]
    fn round_trip_under_same_generations() {
        let bytes = encode(&[7, 9], 1234, &vec![(1i32, "a".to_string())]).unwrap();
        let back: (Vec<(i32, String)>, u64) = decode(&bytes, &[7, 9]).unwrap();
        assert_eq!(back, (vec![(1, "a".to_string())], 1234));
    }

    #[test]
    fn plain_values_keep_the_bincode_layout() {
        // Byte for byte what the versions before the fallback wrote: their entries stay readable.
        let value = vec![(1i32, "a".to_string())];
        let bytes = encode(&[7], 99, &value).unwrap();
        let payload = bincode::serde::encode_to_vec(&value, config()).unwrap();
        let mut expected = b"MCv2\x01".to_vec();
        expected.extend_from_slice(&7u64.to_le_bytes());
        expected.extend_from_slice(&99u64.to_le_bytes());
        expected.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
        expected.extend_from_slice(&payload);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn other_generations_are_outdated() {
        let bytes = encode(&[7, 9], 0, &5u32).unwrap();
        assert_eq!(decode::<u32>(&bytes, &[7, 10]), Err(Reject::Outdated));
        assert_eq!(decode::<u32>(&bytes, &[7]), Err(Reject::Corrupt));
    }

    #[test]
    fn corrupt_bytes_are_rejected_not_panicking() {
        for value in [Any::Text("hello".into()), Any::Number(5)] {
            let mut bytes = encode(&[1], 0, &value).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            assert_eq!(decode::<Any>(&bytes, &[1]), Err(Reject::Corrupt));
            for cut in 0..bytes.len() {
                assert!(decode::<Any>(&bytes[..cut], &[1]).is_err());
            }
        }
        let mut bytes = encode(&[1], 0, &"hello".to_string()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(decode::<String>(&bytes, &[1]), Err(Reject::Corrupt));
        assert_eq!(decode::<String>(b"garbage", &[1]), Err(Reject::Corrupt));
    }

    #[test]
    fn a_swapped_magic_fails_the_checksum() {
        let mut bytes = encode(&[1], 0, &"hello".to_string()).unwrap();
        bytes[..4].copy_from_slice(MAGIC_MSGPACK);
        assert_eq!(decode::<String>(&bytes, &[1]), Err(Reject::Corrupt));
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
        let bytes = encode(&[1], 0, &vec![Any::Number(1), Any::Number(2)]).unwrap();
        assert_eq!(&bytes[..4], MAGIC_MSGPACK);
        assert_eq!(decode::<(Any,)>(&bytes, &[1]), Err(Reject::Corrupt));
        assert_eq!(decode::<Vec<String>>(&bytes, &[1]), Err(Reject::Corrupt));
    }

    /// A value whose `Deserialize` asks the format what comes next, like `serde_json::Value`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(untagged)]
    enum Any {
        Number(i64),
        Text(String),
    }

    #[test]
    fn what_bincode_cannot_read_back_goes_to_messagepack() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Row {
            id: i32,
            extra: Option<Any>,
        }
        // A value that bincode reads back (nothing untagged in it) stays in bincode...
        let none = Row { id: 1, extra: None };
        let bytes = encode(&[1], 0, &none).unwrap();
        assert_eq!(&bytes[..4], MAGIC_BINCODE);
        assert_eq!(decode::<Row>(&bytes, &[1]).unwrap().0, none);
        // ...one that does not is written in MessagePack, and so is every later value of the type.
        let some = Row {
            id: 2,
            extra: Some(Any::Text("x".into())),
        };
        let bytes = encode(&[1], 0, &some).unwrap();
        assert_eq!(&bytes[..4], MAGIC_MSGPACK);
        assert_eq!(decode::<Row>(&bytes, &[1]).unwrap().0, some);
        assert!(state::<Row>().msgpack.load(Ordering::Relaxed));
        let bytes = encode(&[1], 0, &none).unwrap();
        assert_eq!(&bytes[..4], MAGIC_MSGPACK);
        assert_eq!(decode::<Row>(&bytes, &[1]).unwrap().0, none);
        // Plain types are not affected.
        let bytes = encode(&[1], 0, &(1i32, "a".to_string())).unwrap();
        assert_eq!(&bytes[..4], MAGIC_BINCODE);
        assert!(!state::<(i32, String)>().msgpack.load(Ordering::Relaxed));
    }

    #[test]
    fn a_value_that_fails_past_the_checked_fills_is_caught_on_its_first_read() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Late {
            extra: Option<Any>,
        }
        let none = Late { extra: None };
        let some = Late {
            extra: Some(Any::Number(3)),
        };
        // Past the first fills (all `None`, which bincode reads back), fills are not checked...
        for _ in 0..CHECK_FIRST {
            encode(&[1], 0, &none).unwrap();
        }
        let unchecked = encode(&[1], 0, &some).unwrap();
        assert_eq!(&unchecked[..4], MAGIC_BINCODE);
        // ...so the first read of such an entry fails: a corrupt entry, re-read from the database.
        assert_eq!(decode::<Late>(&unchecked, &[1]), Err(Reject::Corrupt));
        // Its refill is checked again, and moves the type to MessagePack.
        let refill = encode(&[1], 0, &some).unwrap();
        assert_eq!(&refill[..4], MAGIC_MSGPACK);
        assert_eq!(decode::<Late>(&refill, &[1]).unwrap().0, some);
        assert_eq!(&encode(&[1], 0, &none).unwrap()[..4], MAGIC_MSGPACK);
    }

    #[test]
    fn fills_are_checked_first_and_then_one_in_so_many() {
        #[derive(Serialize, Deserialize)]
        struct Counted(u8);
        let state = state::<Counted>();
        let checked: Vec<bool> = (0..CHECK_FIRST + 2 * CHECK_EVERY)
            .map(|_| state.check_this_fill())
            .collect();
        let expected = (0..CHECK_FIRST + 2 * CHECK_EVERY)
            .filter(|&n| n < CHECK_FIRST || n.is_multiple_of(CHECK_EVERY))
            .count();
        assert_eq!(checked.iter().filter(|&&c| c).count(), expected);
        assert!(checked[..CHECK_FIRST as usize].iter().all(|&c| c));
        assert!(!checked[CHECK_FIRST as usize]);
    }

    #[test]
    fn a_type_that_reads_back_in_no_encoding_is_not_stored() {
        #[derive(Debug, Serialize)]
        struct Lossy(u8);
        impl<'de> Deserialize<'de> for Lossy {
            fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
                Err(serde::de::Error::custom("never"))
            }
        }
        // Every fill of it is checked from then on: nothing unreadable is ever stored.
        for _ in 0..CHECK_FIRST + 2 * CHECK_EVERY {
            assert_eq!(encode(&[1], 0, &Lossy(1)), None);
        }
        assert!(state::<Lossy>().unencodable.load(Ordering::Relaxed));
    }
}

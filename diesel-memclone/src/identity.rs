//! A cached query's identity from what its backend would send: the SQL, and the binds as the
//! backend's own bind collector serializes them (bytes and type metadata).
//!
//! The collector's contents are read through Diesel's API for third-party backends (the
//! `RawBytesBindCollector` fields and `MoveableBindCollector`), which diesel-async already
//! enables and which it pins Diesel's minor version for. PostgreSQL's and MySQL's binds are
//! hashed from their bytes and types directly (MySQL's with this crate's `mysql` feature);
//! SQLite's, with the `sqlite` feature, from their owned values' `Debug` form (which lists each
//! value and its type). Only these collectors are trusted: any other backend, or one whose
//! feature is off, keeps the identity of its `debug_query` rendering, to which the digest of its
//! collector's `Debug` form is added (it can tell apart binds that render alike, never merge two).

use diesel::backend::Backend;
use diesel::query_builder::bind_collector::{MoveableBindCollector, RawBytesBindCollector};
use diesel::query_builder::{QueryBuilder, QueryFragment};
use std::any::{Any, TypeId};
use std::fmt::{self, Write as _};
use xxhash_rust::xxh3::Xxh3Default;

/// A Diesel backend whose queries [`Cached`](crate::Cached) can cache.
///
/// Implemented for every backend with a default value and query builder, whose bind collector
/// has a default and can be moved (Diesel's `MoveableBindCollector`, with a `Debug` form), and
/// whose type lookup is Diesel's PostgreSQL one or `()`: PostgreSQL, MySQL/MariaDB and SQLite,
/// with sync and async connections alike.
///
/// A query's identity is its SQL and its binds. On PostgreSQL, and on MySQL and SQLite with the
/// crate's `mysql` and `sqlite` features, the binds are what the backend's bind collector
/// serializes (bytes and types), and a query type that Diesel's prepared-statement cache trusts
/// to always build the same SQL (a static query id, safe to cache prepared) has its SQL built
/// once; on any other backend the identity is the query's `debug_query` rendering, made finer
/// by a digest of what its bind collector lists.
pub trait CacheBackend: Backend<QueryBuilder: Default> + Default + 'static {
    /// Whether [`binds_digest`](CacheBackend::binds_digest) is trusted as this backend's
    /// identity of the binds (a collector memclone knows lists every bind and its type).
    #[doc(hidden)]
    fn collects_binds() -> bool;

    /// A stable digest of `query`'s binds as this backend's bind collector serializes them;
    /// `None` when a bind cannot be serialized (running the query would fail the same way).
    #[doc(hidden)]
    fn binds_digest(query: &dyn QueryFragment<Self>) -> Option<u128>;
}

impl<DB> CacheBackend for DB
where
    DB: Backend<QueryBuilder: Default> + Default + 'static,
    for<'b> DB::BindCollector<'b>: Default + MoveableBindCollector<DB>,
    for<'b> <DB::BindCollector<'b> as MoveableBindCollector<DB>>::BindData: fmt::Debug,
    DB::MetadataLookup: BindLookup,
{
    fn collects_binds() -> bool {
        let backend = TypeId::of::<DB>();
        // Each a constant once monomorphised.
        let known = [
            TypeId::of::<diesel::pg::Pg>(),
            #[cfg(feature = "mysql")]
            TypeId::of::<diesel::mysql::Mysql>(),
            // The unit tests have SQLite (a dev-dependency) without the feature.
            #[cfg(any(feature = "sqlite", test))]
            TypeId::of::<diesel::sqlite::Sqlite>(),
        ];
        known.contains(&backend)
    }

    fn binds_digest(query: &dyn QueryFragment<DB>) -> Option<u128> {
        let backend = DB::default();
        let mut collector = DB::BindCollector::default();
        DB::MetadataLookup::with_placeholder(|lookup| {
            query.collect_binds(&mut collector, lookup, &backend)
        })
        .ok()?;
        // Owned ('static), so that the collectors whose fields memclone reads can be told
        // apart; for raw bytes, a copy of the collector.
        let binds = collector.moveable();
        let any: &dyn Any = &binds;
        let mut hasher = Hasher::new();
        if let Some(pg) = any.downcast_ref::<RawBytesBindCollector<diesel::pg::Pg>>() {
            hasher.update(b"pg");
            hash_raw_bytes(pg, &mut hasher, |metadata, hasher| {
                for oid in [metadata.oid().ok(), metadata.array_oid().ok()] {
                    // No OID (a failed lookup, which memclone's never is): a marker of its own.
                    hasher.update(&oid.map_or([0xff; 5], |oid| {
                        let [a, b, c, d] = oid.to_le_bytes();
                        [0, a, b, c, d]
                    }));
                }
            });
            return Some(hasher.digest128());
        }
        #[cfg(feature = "mysql")]
        if let Some(mysql) = any.downcast_ref::<RawBytesBindCollector<diesel::mysql::Mysql>>() {
            hasher.update(b"mysql");
            hash_raw_bytes(mysql, &mut hasher, |metadata, hasher| {
                // A variant's name: an identifier, ended by a character none contains.
                let _ = write!(hasher, "{metadata:?};");
            });
            return Some(hasher.digest128());
        }
        hasher.update(b"debug");
        write!(hasher, "{binds:?}").ok()?;
        Some(hasher.digest128())
    }
}

/// Hashes a raw-bytes collector: the number of binds, then each bind's type (`metadata`), and
/// its bytes with their length, or a NULL marker.
fn hash_raw_bytes<DB: Backend>(
    collector: &RawBytesBindCollector<DB>,
    hasher: &mut Hasher,
    metadata: impl Fn(&DB::TypeMetadata, &mut Hasher),
) {
    hasher.update(&(collector.binds.len() as u64).to_le_bytes());
    for (bind, bind_metadata) in collector.binds.iter().zip(&collector.metadata) {
        metadata(bind_metadata, hasher);
        match bind {
            None => hasher.update(&[0]),
            Some(bytes) => {
                hasher.update(&[1]);
                hasher.update(&(bytes.len() as u64).to_le_bytes());
                hasher.update(bytes);
            }
        }
    }
}

/// An xxh3-128 hasher for short inputs written in many small pieces (a `Debug` form writes one
/// per name, bracket and byte): the pieces gather on the stack and are hashed in one call; the
/// streaming state (the same digest) is set up only for inputs longer than the buffer.
struct Hasher {
    buffer: [u8; 256],
    len: usize,
    stream: Option<Box<Xxh3Default>>,
}

impl Hasher {
    #[inline]
    fn new() -> Self {
        Hasher {
            buffer: [0; 256],
            len: 0,
            stream: None,
        }
    }

    #[inline]
    fn update(&mut self, bytes: &[u8]) {
        if let Some(free) = self.buffer.get_mut(self.len..self.len + bytes.len()) {
            free.copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            self.spill(bytes);
        }
    }

    /// [`update`](Self::update) past the buffer: into the streaming state.
    #[cold]
    fn spill(&mut self, bytes: &[u8]) {
        let stream = self
            .stream
            .get_or_insert_with(|| Box::new(Xxh3Default::new()));
        stream.update(&self.buffer[..self.len]);
        self.len = 0;
        match self.buffer.get_mut(..bytes.len()) {
            Some(free) => {
                free.copy_from_slice(bytes);
                self.len = bytes.len();
            }
            None => stream.update(bytes),
        }
    }

    fn digest128(mut self) -> u128 {
        match self.stream.as_mut() {
            None => xxhash_rust::xxh3::xxh3_128(&self.buffer[..self.len]),
            Some(stream) => {
                stream.update(&self.buffer[..self.len]);
                stream.digest128()
            }
        }
    }
}

impl fmt::Write for Hasher {
    #[inline]
    fn write_str(&mut self, piece: &str) -> fmt::Result {
        self.update(piece.as_bytes());
        Ok(())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl Sealed for dyn diesel::pg::PgMetadataLookup {}
}

/// A backend's type lookup, as memclone stands in for it while it collects binds for an
/// identity (no connection at hand): `()`, or PostgreSQL's.
pub trait BindLookup: sealed::Sealed {
    /// Calls `f` with a lookup that needs no connection.
    #[doc(hidden)]
    fn with_placeholder<R>(f: impl FnOnce(&mut Self) -> R) -> R;
}

impl BindLookup for () {
    fn with_placeholder<R>(f: impl FnOnce(&mut Self) -> R) -> R {
        f(&mut ())
    }
}

impl BindLookup for dyn diesel::pg::PgMetadataLookup {
    fn with_placeholder<R>(f: impl FnOnce(&mut Self) -> R) -> R {
        f(&mut NamedTypes)
    }
}

/// PostgreSQL's lookup of user-defined types (an enum, a domain, an extension's type) without a
/// connection: stable placeholder OIDs made from the type's schema and name. Built-in types
/// never ask; for a user type, the bytes its `ToSql` wrote and its name are what tell binds
/// apart, and the placeholder keeps the name.
struct NamedTypes;

impl diesel::pg::PgMetadataLookup for NamedTypes {
    fn lookup_type(&mut self, type_name: &str, schema: Option<&str>) -> diesel::pg::PgTypeMetadata {
        let mut hasher = Xxh3Default::new();
        for part in [schema.unwrap_or(""), type_name] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.digest();
        diesel::pg::PgTypeMetadata::new(digest as u32, (digest >> 32) as u32)
    }
}

/// The SQL Diesel builds for `query` on backend `DB` (what `debug_query` shows); `None` when it
/// cannot build it (an empty changeset, say).
pub(crate) fn sql_of<DB: CacheBackend>(
    query: &dyn QueryFragment<DB>,
    backend: &DB,
) -> Option<String> {
    let mut builder = DB::QueryBuilder::default();
    query.to_sql(&mut builder, backend).ok()?;
    Some(builder.finish())
}

/// Whether `query`, whose type's query id is `query_id`, builds the same SQL whatever its
/// values: Diesel's own criterion for caching a prepared statement by type alone (a static
/// query id, and safe to cache prepared).
pub(crate) fn fixed_sql<DB: Backend>(
    query: &dyn QueryFragment<DB>,
    query_id: Option<TypeId>,
    backend: &DB,
) -> Option<TypeId> {
    query_id.filter(|_| matches!(query.is_safe_to_cache_prepared(backend), Ok(true)))
}

/// The identity of a read whose statements' binds a bind collector listed: a stable 128-bit
/// hash (xxh3) of a scheme tag, `kind`, the result type's `fingerprint` and, for each statement,
/// the digest of its SQL and of its binds (fixed-size parts: no two lists hash the same bytes).
///
/// The tag keeps these apart from the identities of rendered statements
/// ([`key::identity_digest`](crate::key::identity_digest)), whose first part is the kind.
pub(crate) fn collected_digest(kind: &str, fingerprint: u64, statements: &[(u128, u128)]) -> u128 {
    let mut hasher = Hasher::new();
    for part in [
        SCHEME.as_bytes(),
        kind.as_bytes(),
        &fingerprint.to_le_bytes(),
    ] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    for (sql, binds) in statements {
        hasher.update(&sql.to_le_bytes());
        hasher.update(&binds.to_le_bytes());
    }
    hasher.digest128()
}

/// A rendered identity (`key::identity_digest`) made finer by its statements' bind digests
/// ([`CacheBackend::binds_digest`]), on a backend whose collector memclone does not know.
pub(crate) fn with_binds(rendered: u128, binds: &[u128]) -> u128 {
    let mut hasher = Hasher::new();
    hasher.update(&(WITH_BINDS.len() as u64).to_le_bytes());
    hasher.update(WITH_BINDS.as_bytes());
    hasher.update(&rendered.to_le_bytes());
    for digest in binds {
        hasher.update(&digest.to_le_bytes());
    }
    hasher.digest128()
}

/// What a rendered identity with bind digests starts with.
const WITH_BINDS: &str = "rendered+binds/1";

/// What a collected identity starts with (never a kind of rendered identity).
const SCHEME: &str = "sql+collected-binds/1";

/// The digest of a statement's SQL in a collected identity.
pub(crate) fn sql_digest(sql: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(sql.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hash_as_their_concatenation() {
        for len in [0, 1, 255, 256, 257, 600, 5000] {
            let text: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            for piece in [1, 7, 300] {
                let mut hasher = Hasher::new();
                for chunk in text.as_bytes().chunks(piece) {
                    hasher.update(chunk);
                }
                let expected = xxhash_rust::xxh3::xxh3_128(text.as_bytes());
                assert_eq!(hasher.digest128(), expected, "{len} bytes by {piece}");
            }
        }
    }

    #[test]
    fn collected_digest_is_stable() {
        // Pinned: a change here silently splits every deployed cache.
        let digest = collected_digest("load", 7, &[(1, 2), (3, 4)]);
        assert_eq!(format!("{digest:032x}"), "94af6f1341315eafa8878875fccbca3e");
        let mut bytes = Vec::new();
        for part in [SCHEME.as_bytes(), b"load", &7_u64.to_le_bytes()] {
            bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
            bytes.extend_from_slice(part);
        }
        for n in 1_u128..=4 {
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        assert_eq!(digest, xxhash_rust::xxh3::xxh3_128(&bytes));
        assert_ne!(
            collected_digest("load", 7, &[(1, 2)]),
            collected_digest("one", 7, &[(1, 2)])
        );
        assert_ne!(
            collected_digest("load", 7, &[(1, 2)]),
            collected_digest("load", 7, &[(2, 1)])
        );
    }

    #[test]
    fn binds_are_told_apart_by_value_and_type() {
        use diesel::dsl::sql;
        use diesel::sql_types::{BigInt, Integer, Nullable, Text};
        use diesel::ExpressionMethods;
        let pg = |q: &dyn QueryFragment<diesel::pg::Pg>| diesel::pg::Pg::binds_digest(q).unwrap();
        let int4 = diesel::select(sql::<Integer>("1").eq(1));
        let int4_two = diesel::select(sql::<Integer>("1").eq(2));
        let int8 = diesel::select(sql::<BigInt>("1").eq(1_i64));
        let text = diesel::select(sql::<Text>("1").eq("1"));
        let null = diesel::select(sql::<Nullable<Text>>("1").eq(None::<&str>));
        let empty = diesel::select(sql::<Nullable<Text>>("1").eq(Some("")));
        let digests = [
            pg(&int4),
            pg(&int4_two),
            pg(&int8),
            pg(&text),
            pg(&null),
            pg(&empty),
        ];
        for (i, a) in digests.iter().enumerate() {
            for b in &digests[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(pg(&int4), pg(&diesel::select(sql::<Integer>("2").eq(1))));
        assert!(diesel::pg::Pg::collects_binds());
    }
}

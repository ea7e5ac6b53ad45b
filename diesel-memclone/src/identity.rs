//! A cached query's identity from what its backend would send: the SQL, and the binds as the
//! backend's own bind collector serializes them (bytes and type metadata).
//!
//! Diesel has no public accessor for a bind collector's contents (its fields are public only
//! under a feature that opts out of Diesel's semver guarantees), so the collector is hashed
//! through its `Debug` form, streamed into xxh3 without an intermediate string. That form is
//! trusted only for the collectors memclone knows, which list every bind's bytes (or value) and
//! type: any other backend keeps the identity of its `debug_query` rendering.

use diesel::backend::Backend;
use diesel::query_builder::{QueryBuilder, QueryFragment};
use std::any::TypeId;
use std::fmt::{self, Write as _};
use xxhash_rust::xxh3::Xxh3Default;

/// A Diesel backend whose queries [`Cached`](crate::Cached) can cache.
///
/// Implemented for every backend with a default value and query builder, whose bind collector
/// has a default and a `Debug` form, and whose type lookup is Diesel's PostgreSQL one or `()`:
/// PostgreSQL, MySQL/MariaDB and SQLite, with sync and async connections alike.
///
/// A query's identity is its SQL and its binds. On PostgreSQL, and on MySQL and SQLite with the
/// crate's `mysql` and `sqlite` features, the binds are what the backend's bind collector
/// serializes (bytes and types), and a query type that Diesel's prepared-statement cache trusts
/// to always build the same SQL (a static query id, safe to cache prepared) has its SQL built
/// once; on any other backend the identity is the query's `debug_query` rendering, as in 0.1.
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
    for<'b> DB::BindCollector<'b>: Default + fmt::Debug,
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
        let mut hasher = HashWriter(Xxh3Default::new());
        write!(hasher, "{collector:?}").ok()?;
        Some(hasher.0.digest128())
    }
}

/// A `fmt::Write` that hashes what is written.
struct HashWriter(Xxh3Default);

impl fmt::Write for HashWriter {
    fn write_str(&mut self, piece: &str) -> fmt::Result {
        self.0.update(piece.as_bytes());
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
    let mut hasher = Xxh3Default::new();
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

/// What a collected identity starts with (never a kind of rendered identity).
const SCHEME: &str = "sql+collected-binds/1";

/// The digest of a statement's SQL in a collected identity.
pub(crate) fn sql_digest(sql: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(sql.as_bytes())
}

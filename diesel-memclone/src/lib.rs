//! Keep the hot part of a Diesel database in Redis or in process memory, invalidated by every
//! write that goes through memclone.
//!
//! * `#[derive(MemClone)]` on a model gives it entity keys, a schema fingerprint and
//!   `Model::find_cached` (and `Model::find_cached_blocking` for [`sync`]);
//! * [`CachedDsl::cached`] on any query: `users.filter(..).cached("label").load(&mut conn)`;
//! * [`insert_into`], [`update`], [`delete`], [`replace_into`] and [`write()`] run the write and
//!   then invalidate every cached query of the written table (one O(1) generation bump) and the
//!   written rows' entity entries;
//! * two stores: [`store::MemoryStore`] (the embedded default, one per process) and
//!   [`store::RedisStore`] (feature `redis`; shared by every process that uses it);
//! * `tracing` spans on cached reads and invalidations, and metrics through the `metrics`
//!   facade (feature `metrics`): see [`observe`] for every name.
//!
//! Without [`install`], each process gets its own in-process cache: replicas of a service then
//! never invalidate each other and can serve stale rows for the default TTL (1 hour). Install
//! a cache on Redis when several processes write.
//!
//! # Example
//!
//! SQLite in memory and the in-process store: no server needed.
//!
//! ```
//! use diesel::prelude::*;
//! use diesel_async::{sync_connection_wrapper::SyncConnectionWrapper, AsyncConnection, RunQueryDsl};
//! use diesel_memclone::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
//!
//! #[derive(Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone, Debug)]
//! #[diesel(table_name = users)]
//! struct User { id: i32, name: String, status: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> diesel_memclone::Result<()> {
//! let mut conn = SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
//! # diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL)")
//! #     .execute(&mut conn).await?;
//! let ada = User { id: 1, name: "Ada".into(), status: "active".into() };
//! diesel_memclone::insert_into(users::table).values(&ada).execute(&mut conn).await?;
//!
//! // A miss fills the cache; the same query again is a hit.
//! let active: Vec<User> = users::table
//!     .filter(users::status.eq("active"))
//!     .cached("active")
//!     .load(&mut conn)
//!     .await?;
//! assert_eq!(active.len(), 1);
//! let one = User::find_cached(&mut conn, 1).await?;
//! assert_eq!(one.name, "Ada");
//!
//! // A write through memclone invalidates every cached query of `users` and evicts row 1.
//! diesel_memclone::update(users::table.filter(users::id.eq(1)))
//!     .set(users::name.eq("Ada L."))
//!     .execute(&mut conn)
//!     .await?;
//! assert_eq!(User::find_cached(&mut conn, 1).await?.name, "Ada L.");
//! # Ok(()) }
//! ```
//!
//! # Synchronous Diesel
//!
//! The same API for `diesel::Connection`s (`PgConnection`, `MysqlConnection`,
//! `SqliteConnection`, r2d2's pooled connections) is in [`sync`], under the same names: the
//! example above, without an async runtime.
//!
//! ```
//! use diesel::prelude::*;
//! use diesel_memclone::sync::prelude::*;
//! use diesel_memclone::sync as memclone;
//! # use serde::{Deserialize, Serialize};
//! # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
//! # #[derive(Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone, Debug)]
//! # #[diesel(table_name = users)]
//! # struct User { id: i32, name: String, status: String }
//!
//! # fn main() -> diesel_memclone::Result<()> {
//! let mut conn = diesel::SqliteConnection::establish(":memory:")?;
//! # diesel::sql_query("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL)")
//! #     .execute(&mut conn)?;
//! let ada = User { id: 1, name: "Ada".into(), status: "active".into() };
//! memclone::insert_into(users::table).values(&ada).execute(&mut conn)?;
//!
//! let active: Vec<User> = users::table
//!     .filter(users::status.eq("active"))
//!     .cached("active")
//!     .load(&mut conn)?;
//! assert_eq!(active.len(), 1);
//! let one: User = memclone::find(&mut conn, 1)?;
//! assert_eq!(one.name, "Ada");
//!
//! memclone::update(users::table.filter(users::id.eq(1)))
//!     .set(users::name.eq("Ada L."))
//!     .execute(&mut conn)?;
//! assert_eq!(User::find_cached_blocking(&mut conn, 1)?.name, "Ada L.");
//! # Ok(()) }
//! ```
//!
//! Sync and async code share one cache, one key layout and one contract: the sync calls run the
//! same read-through and invalidation code (see [`sync`] for how, and where they may be
//! called from).
//!
//! See the README for the contract (what is guaranteed fresh, and when), Redis set-up, and the
//! options.
//!
//! # Cargo features
//!
//! * `derive` (default): re-exports `#[derive(MemClone)]` and `#[derive(CacheValue)]`;
//! * `redis`: [`store::RedisStore`], over a deadpool-redis pool (single server or Cluster);
//! * `postgres`, `mysql`, `sqlite`: forward diesel-async's backends; `postgres` and `mysql` also
//!   give [`listen`]: triggers and a listener that invalidate the cache on writes that bypass
//!   memclone. With `mysql` and `sqlite`, a cached query on those backends is identified by the
//!   binds their bind collector serializes, as on PostgreSQL always (see [`CacheBackend`]);
//!   without, by its `debug_query` rendering and a digest of those binds (slower);
//! * `deadpool`, `bb8`: [`ConnectionPool`] for diesel-async's pools (`*_from` reads check a
//!   connection out only on a miss); `r2d2`: [`sync::ConnectionPool`] for Diesel's r2d2 pools;
//! * `metrics`: counters and histograms through the `metrics` facade (see [`observe`]).
#![cfg_attr(docsrs, feature(doc_cfg))]
// Without the `redis` feature `RedisStore` does not exist; the links above then point at
// docs.rs, where every feature is documented.
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql")),
    doc = "\n\n[`listen`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/listen/index.html"
)]
#![cfg_attr(
    not(feature = "redis"),
    doc = "\n\n[`store::RedisStore`]: https://docs.rs/diesel-memclone/latest/diesel_memclone/store/struct.RedisStore.html"
)]

mod cache;
mod codec;
mod entity;
mod error;
mod flight;
mod identity;
mod key;
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "mysql"))))]
pub mod listen;
mod model;
mod near;
pub mod observe;
mod pool;
mod query;
pub mod store;
pub mod sync;
mod transaction;
mod write;

pub use cache::{cache, install, Cache, CacheBuilder, Stats};
pub use entity::{find, find_from, find_optional, find_optional_from, invalidate, reload};
pub use error::{Error, Result, StoreError};
pub use flight::{LockOptions, OnLockTimeout};
pub use identity::CacheBackend;
pub use key::table_name;
pub use model::{CacheValue, MemClone, RowKey, ScopeColumn, ScopeValue};
pub use near::NearCache;
pub use pool::ConnectionPool;
pub use query::{dsl, Cached, CachedDsl};
pub use transaction::transaction;
pub use write::{delete, insert_into, replace_into, update, write, Write};

#[cfg(feature = "derive")]
#[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
pub use diesel_memclone_derive::{CacheValue, MemClone};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use deadpool_redis;
pub use diesel_async;

/// The traits and macros most code needs: `use diesel_memclone::prelude::*;`.
pub mod prelude {
    pub use crate::{CacheValue, CachedDsl, MemClone};
}

// The README's Rust blocks run as doc tests of this crate (`cargo test --doc`). `doctest` is set
// only while rustdoc collects doc tests, so a packaged crate, which has no README at this path,
// never reads it.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme_doctests {}

#[doc(hidden)]
pub mod __private {
    //! Used by the derive's generated code; not public API.
    pub use crate::codec::bench as codec;
    pub use crate::key::{hash64, qualified_table_name, table_sql};
    pub use crate::model::field;
    pub use crate::model::{KeyTextProbe, KnownKeyText, ScopedTable, UnknownKeyText};
    pub use diesel;
}

#![doc = include_str!("../../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod codec;
mod entity;
mod error;
mod key;
mod model;
mod query;
pub mod store;
mod transaction;
mod write;

pub use cache::{cache, install, Cache, CacheBuilder, Stats};
pub use entity::{find, find_optional, invalidate, reload};
pub use error::{Error, Result, StoreError};
pub use model::{CacheValue, MemClone, RowKey};
pub use query::{dsl, Cached, CachedDsl};
pub use transaction::transaction;
pub use write::{delete, insert_into, replace_into, update, write, Write};

#[cfg(feature = "derive")]
pub use diesel_memclone_derive::{CacheValue, MemClone};

#[cfg(feature = "redis")]
pub use deadpool_redis;
pub use diesel_async;

/// The traits and macros most code needs: `use diesel_memclone::prelude::*;`.
pub mod prelude {
    pub use crate::{CacheValue, CachedDsl, MemClone};
}

#[doc(hidden)]
pub mod __private {
    //! Used by the derive's generated code; not public API.
    pub use crate::key::hash64;
    pub use diesel;
}

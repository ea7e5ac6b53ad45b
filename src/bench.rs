//! Data and helpers shared by `benches/memclone.rs` and `examples/hitpath.rs`: a PostgreSQL
//! schema with 100,000 users and 100,000 orders, and the cached queries measured on it.

use crate::RawRedis;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use diesel_memclone::deadpool_redis::redis;
use diesel_memclone::store::{RedisStore, Store};
use diesel_memclone::{Cache, MemClone};
use serde::{Deserialize, Serialize};

#[allow(missing_docs)]
pub mod schema {
    diesel::table! {
        bench_users (id) {
            id -> Integer,
            name -> Text,
            email -> Text,
            status -> Text,
            org_id -> Integer,
        }
    }

    diesel::table! {
        bench_orders (id) {
            id -> Integer,
            user_id -> Integer,
            amount -> BigInt,
        }
    }

    diesel::joinable!(bench_orders -> bench_users (user_id));
    diesel::allow_tables_to_appear_in_same_query!(bench_users, bench_orders);
}

use schema::bench_users;

/// A user row of the benchmark.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = bench_users)]
pub struct BenchUser {
    /// Primary key.
    pub id: i32,
    /// Name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Status.
    pub status: String,
    /// Organisation.
    pub org_id: i32,
}

/// The schema the benchmarks use (created once, reused while its row counts are right).
pub const SCHEMA: &str = "memclone_bench";

/// Connects to PostgreSQL in the benchmark schema, creating and filling it when needed.
pub async fn connect() -> AsyncPgConnection {
    let url = crate::postgres_url();
    let mut conn = AsyncPgConnection::establish(&url)
        .await
        .expect("PostgreSQL for the benchmarks");
    let ready = conn
        .batch_execute(&format!(
            "SET search_path TO {SCHEMA};
             DO $$ BEGIN
               IF (SELECT count(*) FROM bench_users) <> 100000 OR (SELECT count(*) FROM bench_orders) <> 100000
               THEN RAISE EXCEPTION 'refill'; END IF;
             END $$;"
        ))
        .await;
    if ready.is_err() {
        let mut conn = AsyncPgConnection::establish(&url)
            .await
            .expect("PostgreSQL");
        conn.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}; SET search_path TO {SCHEMA};
             CREATE TABLE bench_users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL,
                                       status TEXT NOT NULL, org_id INTEGER NOT NULL);
             CREATE TABLE bench_orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, amount BIGINT NOT NULL);
             INSERT INTO bench_users
               SELECT g, 'user ' || g, 'user' || g || '@example.com',
                      CASE WHEN g % 3 = 0 THEN 'inactive' ELSE 'active' END, g % 100
               FROM generate_series(1, 100000) g;
             INSERT INTO bench_orders SELECT g, 1 + (g * 7919) % 100000, (g * 31) % 1000 FROM generate_series(1, 100000) g;
             CREATE INDEX ON bench_orders (user_id);
             ANALYZE;"
        ))
        .await
        .expect("create the benchmark data");
        conn.batch_execute(&format!("SET search_path TO {SCHEMA}"))
            .await
            .expect("search_path");
        return conn;
    }
    conn
}

/// A Redis store and a cache on it, in a namespace of their own.
pub fn redis_cache(namespace: &str) -> (RedisStore, Cache) {
    let store = RedisStore::builder(crate::redis_url())
        .build()
        .expect("Redis URL");
    let cache = Cache::builder()
        .store(store.clone())
        .namespace(namespace)
        .build()
        .expect("cache");
    (store, cache)
}

/// The first `n` users by id: the cached query of the hit-path benchmarks.
pub fn first_users(
    n: i64,
) -> diesel::dsl::Limit<diesel::dsl::Order<bench_users::table, diesel::dsl::Asc<bench_users::id>>> {
    bench_users::table.order(bench_users::id.asc()).limit(n)
}

/// The key of the one query entry in `namespace` (there must be exactly one).
pub async fn only_entry_key(redis: &RawRedis, namespace: &str) -> String {
    let keys: Vec<String> = redis
        .query_as(redis::cmd("KEYS").arg(format!("{namespace}:{{q:*")))
        .await;
    assert_eq!(keys.len(), 1, "expected one entry in {namespace}: {keys:?}");
    keys.into_iter().next().unwrap_or_default()
}

/// The floor: one `GET` of the entry's bytes over the store's own connections (a fetch with no
/// generations), then the same decoding (bincode 2 of the payload, after the entry's header:
/// magic, one generation, the freshness instant and the checksum).
pub async fn floor_get(store: &RedisStore, key: &str) -> Vec<BenchUser> {
    let fetched = store.fetch(key, &[]).await.expect("GET");
    let Some(bytes) = fetched.entry else {
        panic!("no entry at {key}")
    };
    const HEADER: usize = 4 + 1 + 8 + 8 + 8;
    let (rows, _): (Vec<BenchUser>, usize) =
        bincode::serde::decode_from_slice(&bytes[HEADER..], bincode::config::standard())
            .expect("decode");
    rows
}

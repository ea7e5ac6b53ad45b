//! Benchmarks of diesel-memclone, each beside its floor or its alternative in the same run:
//!
//! * `hit_path`: a cached query hit against one `GET` of the same bytes on the same connection,
//!   decoded the same way, for results of 1, 100 and 1000 rows; with, for the plot, the same
//!   read uncached, from the in-process store and from a near tier in front of Redis;
//! * `database`: the same reads uncached on PostgreSQL (a primary-key lookup, a 100-row filter,
//!   a join with aggregation over 100,000 orders) against their cached hits;
//! * `alternative`: the `cached` crate's `AsyncRedisCache` on the same Redis and data;
//! * `writes`: an invalidating update with 1, 1,000 and 100,000 cached queries on the table,
//!   against the bare Diesel update;
//! * `throughput`: hits per second from 1, 16 and 64 concurrent tasks.
//!
//! `cargo bench -p diesel-memclone-tests` (PostgreSQL and Redis as for the tests). `BENCHMARKS.md`
//! holds a run's medians.

// mimalloc, as in the benches: with glibc's malloc the cost of the same decode depends on the
// allocation history (consolidation of freed chunks), which adds noise unrelated to the cache.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cached::stores::AsyncRedisCache;
use cached::ConcurrentCachedAsync;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use diesel_memclone::prelude::*;
use diesel_memclone::store::RedisStore;
use diesel_memclone::NearCache;
use diesel_memclone_tests::bench::schema::{bench_orders, bench_users};
use diesel_memclone_tests::bench::{
    connect, first_users, floor_get, only_entry_key, redis_cache, BenchUser,
};
use diesel_memclone_tests::RawRedis;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::Mutex;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn namespace(group: &str) -> String {
    format!("bench_{group}_{}", std::process::id())
}

fn hit_path(c: &mut Criterion) {
    let rt = runtime();
    // The near tier's stream (heartbeats and pushes) runs on a worker thread: a near hit never
    // yields, so on a single thread a sample's loop would starve it past `max_lag` and turn the
    // samples into Redis reads.
    let near_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("hit_path");
    for rows in [1_i64, 100, 1000] {
        let ns = namespace(&format!("hit{rows}"));
        let (store, cache, conn, key) = rt.block_on(async {
            let (store, cache) = redis_cache(&ns);
            let redis = RawRedis::test_server(false).await;
            let mut conn = connect().await;
            let _: Vec<BenchUser> = first_users(rows)
                .cached("first")
                .using(&cache)
                .load(&mut conn)
                .await
                .unwrap();
            let key = only_entry_key(&redis, &ns).await;
            (store, cache, Arc::new(Mutex::new(conn)), key)
        });
        group.bench_with_input(BenchmarkId::new("memclone", rows), &rows, |b, &rows| {
            b.to_async(&rt).iter(|| async {
                let mut conn = conn.lock().await;
                let hit: Vec<BenchUser> = first_users(rows)
                    .cached("first")
                    .using(&cache)
                    .load(&mut *conn)
                    .await
                    .unwrap();
                hit
            })
        });
        group.bench_with_input(BenchmarkId::new("floor", rows), &rows, |b, _| {
            b.to_async(&rt).iter(|| floor_get(&store, &key))
        });
        assert_eq!(
            cache.stats().misses,
            1,
            "the memclone samples were all hits"
        );
        // For the plot: the same read from PostgreSQL, and from the in-process store.
        group.bench_with_input(BenchmarkId::new("postgres", rows), &rows, |b, &rows| {
            b.to_async(&rt).iter(|| async {
                let mut conn = conn.lock().await;
                let rows: Vec<BenchUser> = first_users(rows).load(&mut *conn).await.unwrap();
                rows
            })
        });
        let memory = diesel_memclone::Cache::builder()
            .namespace(&ns)
            .build()
            .unwrap();
        group.bench_with_input(BenchmarkId::new("memory_store", rows), &rows, |b, &rows| {
            b.to_async(&rt).iter(|| async {
                let mut conn = conn.lock().await;
                let hit: Vec<BenchUser> = first_users(rows)
                    .cached("first")
                    .using(&memory)
                    .load(&mut *conn)
                    .await
                    .unwrap();
                hit
            })
        });
        assert_eq!(
            memory.stats().misses,
            1,
            "the in-process samples were all hits"
        );
        // The Redis entry above, held in a near tier (its own store and connection).
        let (near, near_conn) = near_rt.block_on(async {
            let store = RedisStore::builder(diesel_memclone_tests::redis_url())
                .build()
                .expect("Redis URL");
            let near = diesel_memclone::Cache::builder()
                .store(store)
                .namespace(&ns)
                .near_cache(NearCache::new())
                .build()
                .unwrap();
            assert!(near.near_cache_ready(Duration::from_secs(10)).await);
            let mut conn = connect().await;
            let _: Vec<BenchUser> = first_users(rows)
                .cached("first")
                .using(&near)
                .load(&mut conn)
                .await
                .unwrap();
            (near, Arc::new(Mutex::new(conn)))
        });
        let before = near.stats();
        group.bench_with_input(BenchmarkId::new("near", rows), &rows, |b, &rows| {
            b.to_async(&near_rt).iter(|| async {
                let mut conn = near_conn.lock().await;
                let hit: Vec<BenchUser> = first_users(rows)
                    .cached("first")
                    .using(&near)
                    .load(&mut *conn)
                    .await
                    .unwrap();
                hit
            })
        });
        let after = near.stats();
        let (hits, near_hits) = (after.hits - before.hits, after.near_hits - before.near_hits);
        assert_eq!(after.misses, 0, "the near samples were all hits");
        // A heartbeat late on a busy machine sends a few reads to Redis; more would skew it.
        assert!(
            near_hits as f64 >= 0.99 * hits as f64,
            "{near_hits} of {hits} samples were near hits: {after:?}"
        );
    }
    group.finish();
}

/// The heavy read: per organisation, the number of orders and the largest amount.
macro_rules! heavy_join {
    () => {
        bench_users::table
            .inner_join(bench_orders::table)
            .group_by(bench_users::org_id)
            .select((
                bench_users::org_id,
                diesel::dsl::count(bench_orders::id),
                diesel::dsl::max(bench_orders::amount),
            ))
            .order(bench_users::org_id)
    };
}

fn database(c: &mut Criterion) {
    let rt = runtime();
    let ns = namespace("db");
    let (cache, conn) = rt.block_on(async {
        let (_, cache) = redis_cache(&ns);
        (cache, Arc::new(Mutex::new(connect().await)))
    });
    let filter_100 = || {
        bench_users::table
            .filter(bench_users::org_id.eq(7))
            .order(bench_users::id)
            .limit(100)
    };
    let mut group = c.benchmark_group("database");
    group.bench_function("pk_lookup/postgres", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = conn.lock().await;
            let user: BenchUser = bench_users::table
                .find(4242)
                .get_result(&mut *conn)
                .await
                .unwrap();
            user
        })
    });
    group.bench_function("pk_lookup/memclone", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = conn.lock().await;
            cache.find::<BenchUser, _>(&mut *conn, 4242).await.unwrap()
        })
    });
    group.bench_function("filter_100/postgres", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = conn.lock().await;
            let rows: Vec<BenchUser> = filter_100().load(&mut *conn).await.unwrap();
            rows
        })
    });
    group.bench_function("filter_100/memclone", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = conn.lock().await;
            let rows: Vec<BenchUser> = filter_100()
                .cached("filter")
                .using(&cache)
                .load(&mut *conn)
                .await
                .unwrap();
            rows
        })
    });
    group.sample_size(20);
    group.bench_function("heavy_join/postgres", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = conn.lock().await;
            let rows: Vec<(i32, i64, Option<i64>)> = heavy_join!().load(&mut *conn).await.unwrap();
            rows
        })
    });
    group.sample_size(100);
    group.bench_function("heavy_join/memclone", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = conn.lock().await;
            let rows: Vec<(i32, i64, Option<i64>)> = heavy_join!()
                .cached("heavy")
                .using(&cache)
                .load(&mut *conn)
                .await
                .unwrap();
            rows
        })
    });
    group.finish();
    assert_eq!(
        cache.stats().misses,
        3,
        "one miss per cached read, then hits"
    );
}

fn alternative(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("alternative");
    for rows in [1_i64, 100, 1000] {
        let ns = namespace(&format!("alt{rows}"));
        let (cache, conn, other) = rt.block_on(async {
            let (_, cache) = redis_cache(&ns);
            let mut conn = connect().await;
            let filled: Vec<BenchUser> = first_users(rows)
                .cached("first")
                .using(&cache)
                .load(&mut conn)
                .await
                .unwrap();
            let other: AsyncRedisCache<String, Vec<BenchUser>> =
                AsyncRedisCache::builder(format!("{ns}_cached_crate"))
                    .ttl(Duration::from_secs(3600))
                    .connection_string(&diesel_memclone_tests::redis_url())
                    .build()
                    .await
                    .expect("cached crate store");
            let _ = other
                .async_cache_set(format!("first{rows}"), filled)
                .await
                .expect("cached crate set");
            (cache, Arc::new(Mutex::new(conn)), other)
        });
        group.bench_with_input(BenchmarkId::new("memclone", rows), &rows, |b, &rows| {
            b.to_async(&rt).iter(|| async {
                let mut conn = conn.lock().await;
                let hit: Vec<BenchUser> = first_users(rows)
                    .cached("first")
                    .using(&cache)
                    .load(&mut *conn)
                    .await
                    .unwrap();
                hit
            })
        });
        group.bench_with_input(BenchmarkId::new("cached_crate", rows), &rows, |b, &rows| {
            let key = format!("first{rows}");
            b.to_async(&rt)
                .iter(|| async { other.async_cache_get(&key).await.unwrap().expect("hit") })
        });
    }
    group.finish();
}

fn writes(c: &mut Criterion) {
    let rt = runtime();
    let conn = rt.block_on(async { Arc::new(Mutex::new(connect().await)) });
    let mut group = c.benchmark_group("writes");
    group.bench_function("bare_update", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = conn.lock().await;
            diesel::update(bench_users::table.find(1))
                .set(bench_users::name.eq("renamed"))
                .execute(&mut *conn)
                .await
                .unwrap()
        })
    });
    for cached_queries in [1_usize, 1_000, 100_000] {
        let ns = namespace(&format!("writes{cached_queries}"));
        let (_, cache) = redis_cache(&ns);
        rt.block_on(async {
            // Fill the cached queries that depend on the table, 64 at a time.
            let mut filled = 0;
            while filled < cached_queries {
                let batch = (filled..(filled + 64).min(cached_queries)).map(|i| {
                    let cache = cache.clone();
                    async move {
                        let key = format!("query {i}");
                        cache
                            .fill_with("q", &key, &["bench_users"], || async move { Ok(i as i64) })
                            .await
                            .unwrap()
                    }
                });
                filled += futures_util::future::join_all(batch).await.len();
            }
        });
        group.bench_with_input(
            BenchmarkId::new("invalidating_update", cached_queries),
            &cached_queries,
            |b, _| {
                b.to_async(&rt).iter(|| async {
                    let mut conn = conn.lock().await;
                    diesel_memclone::update(bench_users::table.find(1))
                        .set(bench_users::name.eq("renamed"))
                        .using(&cache)
                        .execute(&mut *conn)
                        .await
                        .unwrap()
                })
            },
        );
    }
    group.finish();
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ns = namespace("throughput");
    let (cache, conns) = rt.block_on(async {
        let (_, cache) = redis_cache(&ns);
        let mut conns = Vec::new();
        for _ in 0..64 {
            conns.push(Arc::new(Mutex::new(connect().await)));
        }
        let _: Vec<BenchUser> = first_users(1)
            .cached("first")
            .using(&cache)
            .load(&mut *conns[0].lock().await)
            .await
            .unwrap();
        (cache, conns)
    });
    const PER_TASK: u64 = 200;
    let mut group = c.benchmark_group("throughput");
    group.sample_size(10);
    for tasks in [1_usize, 16, 64] {
        group.throughput(Throughput::Elements(tasks as u64 * PER_TASK));
        group.bench_with_input(BenchmarkId::new("hits", tasks), &tasks, |b, &tasks| {
            b.to_async(&rt).iter_custom(|iterations| {
                let (cache, conns) = (cache.clone(), conns.clone());
                async move {
                    let start = std::time::Instant::now();
                    for _ in 0..iterations {
                        let workers = conns.iter().take(tasks).map(|conn| {
                            let (cache, conn) = (cache.clone(), conn.clone());
                            tokio::spawn(async move {
                                let mut conn = conn.lock().await;
                                for _ in 0..PER_TASK {
                                    let hit: Vec<BenchUser> = first_users(1)
                                        .cached("first")
                                        .using(&cache)
                                        .load(&mut *conn)
                                        .await
                                        .unwrap();
                                    assert_eq!(hit.len(), 1);
                                }
                            })
                        });
                        for worker in futures_util::future::join_all(workers).await {
                            worker.unwrap();
                        }
                    }
                    start.elapsed()
                }
            })
        });
    }
    group.finish();
    assert_eq!(cache.stats().misses, 1);
}

/// The part of a hit that names the query: rendering it and finding its SQL. Before: the
/// `Display` form split at ` -- binds: `; after: the `Debug` form, whose SQL is a string literal.
fn render(c: &mut Criterion) {
    let mut group = c.benchmark_group("render");
    let query = first_users(1)
        .filter(bench_users::name.eq("someone"))
        .select(BenchUser::as_select());
    group.bench_function("display_split", |b| {
        b.iter(|| {
            let text = diesel::debug_query::<diesel::pg::Pg, _>(&query).to_string();
            let end = text.find(" -- binds: ").unwrap_or(text.len());
            std::hint::black_box(end);
            text
        })
    });
    group.bench_function("debug_literal", |b| {
        b.iter(|| {
            let text = format!("{:?}", diesel::debug_query::<diesel::pg::Pg, _>(&query));
            let rest = text.strip_prefix("Query { sql: \"").unwrap_or(&text);
            let bytes = rest.as_bytes();
            let mut i = 0;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            std::hint::black_box(i);
            text
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2));
    targets = render, hit_path, database, alternative, writes, throughput
}
criterion_main!(benches);

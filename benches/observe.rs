//! What observation costs on the hit path: a 1-row cached query answered by the in-process
//! store (the cheapest hit, where any added work weighs most), in one run:
//!
//! * `plain`: no tracing subscriber, no metrics recorder (spans and metrics compiled in);
//! * `info_subscriber`: a `fmt` subscriber at `INFO` (a service's usual filter: the cache's
//!   `DEBUG` spans are filtered out);
//! * `debug_subscriber`: a `fmt` subscriber at `DEBUG`, writing to a sink (every read's span is
//!   built, recorded and closed);
//! * `prometheus`: the Prometheus recorder installed (every hit counted, per label).
//!
//! ```text
//! cargo bench -p diesel-memclone-tests --bench observe
//! ```
//!
//! The cost with nothing compiled in is measured by running this same file against the
//! library before observation was added (see BENCHMARKS.md): spans and metrics are compile-time,
//! so that is the only honest "without".

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion};
use diesel_async::AsyncPgConnection;
use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::bench::{connect, first_users, BenchUser};
use std::sync::Arc;
use tokio::runtime::Runtime;
use tokio::sync::Mutex;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn hit(cache: &Cache, conn: &Mutex<AsyncPgConnection>) -> Vec<BenchUser> {
    let mut conn = conn.lock().await;
    first_users(1)
        .cached("first")
        .using(cache)
        .load(&mut *conn)
        .await
        .unwrap()
}

fn observe_hit(c: &mut Criterion) {
    let rt = runtime();
    let cache = Cache::builder()
        .namespace(format!("bench_observe_{}", std::process::id()))
        .build()
        .unwrap();
    let conn = Arc::new(Mutex::new(rt.block_on(connect())));
    rt.block_on(hit(&cache, &conn));
    let mut group = c.benchmark_group("observe_hit");
    group.bench_function("plain", |b| {
        b.to_async(&rt).iter(|| hit(&cache, &conn));
    });
    // Scoped to this thread, where the current-thread runtime polls the reads.
    let at = |level| {
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(std::io::sink)
            .finish()
    };
    tracing::subscriber::with_default(at(tracing::Level::INFO), || {
        group.bench_function("info_subscriber", |b| {
            b.to_async(&rt).iter(|| hit(&cache, &conn));
        });
    });
    tracing::subscriber::with_default(at(tracing::Level::DEBUG), || {
        group.bench_function("debug_subscriber", |b| {
            b.to_async(&rt).iter(|| hit(&cache, &conn));
        });
    });
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        group.bench_function("prometheus", |b| {
            b.to_async(&rt).iter(|| hit(&cache, &conn));
        });
    });
    group.finish();
    assert_eq!(cache.stats().misses, 1, "the samples were all hits");
}

criterion_group!(benches, observe_hit);
criterion_main!(benches);

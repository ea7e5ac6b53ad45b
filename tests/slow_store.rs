//! A Redis that hangs (bytes held back, connection open): reads come from the database within
//! the store timeout, writes succeed, the failure is logged once rather than per call (a warning),
//! and once Redis answers again the cache recovers (logged once, at info level).

use diesel::prelude::*;
use diesel_memclone::store::RedisStore;
use diesel_memclone::Cache;
use diesel_memclone_tests::proxy::Proxy;
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counts the WARN and INFO events memclone logs (a minimal `tracing` subscriber, no extra
/// crate).
struct WarnCounter(Arc<AtomicUsize>, Arc<AtomicUsize>);

impl tracing::Subscriber for WarnCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        match *event.metadata().level() {
            tracing::Level::WARN => self.0.fetch_add(1, Ordering::SeqCst),
            tracing::Level::INFO => self.1.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread")]
async fn a_hanging_redis_means_database_reads_successful_writes_and_one_log_line() {
    let schema = unique("slow");
    let (Some(mut conn), Some(_)) = (postgres(&schema).await, redis_store().await) else {
        return;
    };
    let warnings = Arc::new(AtomicUsize::new(0));
    let infos = Arc::new(AtomicUsize::new(0));
    let _subscriber =
        tracing::subscriber::set_default(WarnCounter(warnings.clone(), infos.clone()));
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .parse()
        .expect("REDIS_URL as redis://ip:port");
    let proxy = Proxy::start(upstream).await;
    let store = RedisStore::builder(proxy.url())
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("slow"))
        .store_timeout(Duration::from_millis(100))
        .retry_after(Duration::from_millis(200))
        .build()
        .unwrap();
    let row = User {
        id: 1,
        name: "Ann".into(),
        status: "a".into(),
    };
    diesel_memclone::insert_into(users::table)
        .values(&row)
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let _: Vec<String> = user_names(&cache, &mut conn).await;
    let _: Vec<String> = user_names(&cache, &mut conn).await;
    assert_eq!(counter.get(), 1, "a miss, then a hit");

    proxy.stall();
    for i in 0..10 {
        let read: Vec<String> = user_names(&cache, &mut conn).await;
        assert_eq!(
            read,
            [if i < 5 { "Ann" } else { "Anne" }],
            "read {i} is correct"
        );
        if i == 4 {
            let written = diesel_memclone::update(users::table.find(1))
                .set(users::name.eq("Anne"))
                .using(&cache)
                .execute(&mut conn)
                .await
                .expect("a write succeeds while the store hangs");
            assert_eq!(written, 1);
        }
    }
    assert_eq!(counter.get(), 1 + 10 + 1, "every read went to the database");
    assert_eq!(
        AtomicUsize::load(&warnings, Ordering::SeqCst),
        1,
        "one warning for the whole outage"
    );
    assert_eq!(cache.undelivered_invalidations(), ["users"]);

    proxy.restore();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read: Vec<String> = user_names(&cache, &mut conn).await;
    assert_eq!(read, ["Anne"]);
    let before = counter.get();
    let read: Vec<String> = user_names(&cache, &mut conn).await;
    assert_eq!(
        (read, counter.get() - before),
        (vec!["Anne".to_string()], 0),
        "recovered: a hit"
    );
    assert!(cache.undelivered_invalidations().is_empty());
    assert_eq!(
        AtomicUsize::load(&warnings, Ordering::SeqCst),
        1,
        "the recovery is no warning"
    );
    assert_eq!(
        AtomicUsize::load(&infos, Ordering::SeqCst),
        1,
        "one info line for the recovery"
    );
}

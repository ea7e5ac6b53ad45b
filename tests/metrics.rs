//! The `metrics` feature, without servers: SQLite in memory and the in-process store, with a
//! Prometheus recorder installed for this thread only (`metrics::with_local_recorder`), so that
//! each test counts its own reads.

use diesel::prelude::*;
use diesel_async::SimpleAsyncConnection;
use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;
use metrics_exporter_prometheus::PrometheusBuilder;

/// `name{labels} value` from a Prometheus exposition, `None` when absent.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().expect("a number"))
}

/// Runs `scenario` on a current-thread runtime with a Prometheus recorder for this thread, and
/// returns what the recorder rendered.
fn recorded<F: std::future::Future<Output = ()>>(scenario: impl FnOnce() -> F) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(scenario()));
    handle.render()
}

async fn active_ids(cache: &Cache, conn: &mut SqliteConn) -> Vec<i32> {
    users::table
        .filter(users::status.eq("active"))
        .select(users::id)
        .cached("active_ids")
        .using(cache)
        .load::<i32, _>(conn)
        .await
        .unwrap()
}

#[test]
fn reads_count_by_tier_and_label_and_writes_by_table() {
    let cache = Cache::builder()
        .namespace(unique("metrics"))
        .build()
        .unwrap();
    let rendered = recorded(|| async {
        let mut conn = sqlite().await;
        conn.batch_execute("INSERT INTO users VALUES (1, 'Ann', 'active'), (2, 'Bob', 'away')")
            .await
            .unwrap();
        let first = active_ids(&cache, &mut conn).await;
        assert_eq!(active_ids(&cache, &mut conn).await, first);
        assert_eq!(active_ids(&cache, &mut conn).await, first);
        let ann = cache.find::<User, _>(&mut conn, 1).await.unwrap();
        assert_eq!(ann.name, "Ann");
        diesel_memclone::update(users::table.find(1))
            .set(users::status.eq("away"))
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
        active_ids(&cache, &mut conn).await;
    });
    let count = |series: &str| sample(&rendered, series).unwrap_or(0.0);
    assert_eq!(
        count(r#"memclone_hits_total{tier="memory",label="active_ids"}"#),
        2.0,
        "{rendered}"
    );
    assert_eq!(count(r#"memclone_misses_total{label="active_ids"}"#), 2.0);
    assert_eq!(
        count(r#"memclone_misses_total{label="users"}"#),
        1.0,
        "find: by table"
    );
    assert_eq!(count(r#"memclone_invalidations_total{table="users"}"#), 1.0);
    assert_eq!(
        count(r#"memclone_fill_seconds_count{label="active_ids"}"#),
        2.0,
        "each miss's database read is timed"
    );
    assert!(
        count(r#"memclone_store_seconds_count{outcome="ok"}"#) >= 5.0,
        "store calls are timed"
    );
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.invalidations), (2, 3, 1));
}

#[test]
fn reads_in_a_transaction_count_as_bypasses() {
    let cache = Cache::builder()
        .namespace(unique("metrics"))
        .build()
        .unwrap();
    let rendered = recorded(|| async {
        let mut conn = sqlite().await;
        let cache = cache.clone();
        let ids: Vec<i32> = diesel_memclone::transaction(&mut conn, async move |conn| {
            users::table
                .select(users::id)
                .cached("in_transaction")
                .using(&cache)
                .load::<i32, _>(conn)
                .await
        })
        .await
        .unwrap();
        assert!(ids.is_empty());
    });
    assert_eq!(
        sample(
            &rendered,
            r#"memclone_bypasses_total{label="in_transaction"}"#
        ),
        Some(1.0),
        "{rendered}"
    );
    assert_eq!(
        sample(
            &rendered,
            r#"memclone_misses_total{label="in_transaction"}"#
        ),
        None
    );
}

#[test]
fn without_a_recorder_reads_are_still_counted_in_stats() {
    let cache = Cache::builder()
        .namespace(unique("metrics"))
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut conn = sqlite().await;
        for _ in 0..2 {
            users::table
                .select(users::id)
                .cached("no_recorder")
                .using(&cache)
                .load::<i32, _>(&mut conn)
                .await
                .unwrap();
        }
    });
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (1, 1));
}

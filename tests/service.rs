//! The example service (`diesel_memclone_tests::service`) on a random port: a few requests, then
//! `/metrics` shows the hit and miss counters those requests imply, per label, and they agree
//! with `Cache::stats`. One test in this binary: the Prometheus recorder is process-wide.

use axum::http::{Method, StatusCode};
use diesel_memclone_tests::service::{self, Client, Config};
use std::collections::BTreeMap;

/// The sum of `name`'s samples whose labels include `label="..."`, from a Prometheus text
/// exposition (every tier of `memclone_hits_total`, for instance).
fn sample_sum(exposition: &str, name: &str, label: (&str, &str)) -> u64 {
    let wanted = format!("{}=\"{}\"", label.0, label.1);
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            let labels = labels.trim_end_matches('}');
            (metric == name && labels.split(',').any(|l| l == wanted)).then(|| {
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("a number in {line:?}")) as u64
            })
        })
        .sum()
}

/// Every sample of `name`, by its labels.
fn samples(exposition: &str, name: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter_map(|line| line.rsplit_once(' '))
        .map(|(series, value)| (series.to_owned(), value.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_requests_hits_and_misses() {
    let name = diesel_memclone_tests::unique("service");
    // Reported (and skipped, unless servers are required) when a server is down.
    let (Some(_), Some(_)) = (
        diesel_memclone_tests::postgres(&name).await,
        diesel_memclone_tests::redis_store().await,
    ) else {
        return;
    };
    let config = Config::from_env().named(&name).seed(5, 2);
    let state = service::start(&config).await.expect("the service starts");
    let cache = state.cache.clone().expect("cached");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = Client::new(listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let before = cache.stats();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let (status, body) = client.get(path).await.expect("a response");
            assert_eq!(
                status,
                StatusCode::OK,
                "{path}: {}",
                String::from_utf8_lossy(&body)
            );
            body
        }
    };
    // User 1: a miss, then two hits. User 2: a miss.
    let first = get("/users/1").await;
    assert_eq!(get("/users/1").await, first);
    assert_eq!(get("/users/1").await, first);
    get("/users/2").await;
    // User 1's posts (a join): a miss, a hit; a post's update invalidates them: a miss.
    let posts = get("/posts?author=1").await;
    assert_eq!(get("/posts?author=1").await, posts);
    let (status, _) = client
        .request(
            Method::PUT,
            "/posts/1",
            Some(serde_json::json!({ "title": "changed" })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let changed = get("/posts?author=1").await;
    assert!(String::from_utf8_lossy(&changed).contains("changed"));
    // Not found is an answer, not a failure (and it is cached like any other).
    let (status, _) = client.get("/users/999").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = client.get("/metrics").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let metrics = String::from_utf8(body.to_vec()).unwrap();
    let count = |metric: &str, label: &str| sample_sum(&metrics, metric, ("label", label));
    // A read right after a miss is a hit, or, when it comes before the miss's entry write has
    // landed (that write runs after the response, and the near tier may be catching up on a
    // loaded machine), a read of that miss's value through the single-flight (coalesced):
    // neither asks the database.
    let answered = |label: &str| {
        count("memclone_hits_total", label) + count("memclone_coalesced_total", label)
    };
    assert_eq!(
        (answered("users"), count("memclone_misses_total", "users")),
        (2, 3),
        "entity reads of users: 2 hits, 3 misses (users 1, 2 and 999):\n{:#?}",
        samples(&metrics, "memclone_hits_total")
    );
    assert_eq!(
        (
            answered("posts_by_author"),
            count("memclone_misses_total", "posts_by_author")
        ),
        (1, 2),
        "{metrics}"
    );
    assert_eq!(count("memclone_bypasses_total", "users"), 0);
    // Start-up invalidates each table once (the namespace may hold an earlier run's entries).
    assert_eq!(
        sample_sum(&metrics, "memclone_invalidations_total", ("table", "posts")),
        2,
        "start-up and one write to posts"
    );
    assert_eq!(
        sample_sum(&metrics, "memclone_invalidations_total", ("table", "users")),
        1,
        "start-up only"
    );
    assert!(
        metrics.contains("memclone_store_seconds"),
        "store calls are timed"
    );
    assert!(
        metrics.contains("memclone_fill_seconds{label=\"posts_by_author\"}")
            || metrics.contains("memclone_fill_seconds_count{label=\"posts_by_author\"}"),
        "fills are timed"
    );

    // The same counts in the cache's own stats.
    let after = cache.stats();
    assert_eq!(
        (
            after.hits + after.coalesced - before.hits - before.coalesced,
            after.misses - before.misses
        ),
        (3, 5)
    );

    let _ = stop.send(());
    server.await.unwrap().expect("a graceful shutdown");
    assert!(cache.undelivered_invalidations().is_empty());
}

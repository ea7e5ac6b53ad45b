//! A web service on PostgreSQL and Redis, cached by memclone, with Prometheus metrics.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example service
//! ```
//!
//! Creates schema `memclone_service` in `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) with 1000 users and 10000 posts, caches reads on
//! `REDIS_URL` (default `redis://127.0.0.1:6379`) with a near tier, and listens on
//! `127.0.0.1:3000` (`PORT` to change). The routes are listed in
//! `diesel_memclone_tests::service`; for example:
//!
//! ```text
//! curl localhost:3000/users/7
//! curl 'localhost:3000/posts?author=7'
//! curl -X PUT localhost:3000/users/7 -H 'content-type: application/json' -d '{"name":"Ada"}'
//! curl localhost:3000/metrics
//! ```
//!
//! Ctrl-C or SIGTERM stops it gracefully: the requests in flight finish, then the invalidations
//! the store has not taken yet are delivered. `RUST_LOG=diesel_memclone=debug` prints the
//! cache's spans.
//!
//! ```text
//! cargo run --release -p diesel-memclone-tests --example service -- --bench SECONDS
//! ```
//!
//! The load run: starts the service on a free loopback port, drives it for SECONDS (after an
//! unmeasured warm-up of half that, at most 10 s) from 64 concurrent HTTP/1 clients in this
//! process, at most 2 million requests, then does the same with the cache off (the same routes
//! with plain Diesel, on freshly seeded tables). Reads and writes use separate pools of 16
//! connections. The workload, 90% reads and 10% writes, ids skewed so that 80% of the requests
//! go to a tenth of the rows (`MIX` changes the shares, see `next_request`):
//!
//! | share | request |
//! | --- | --- |
//! | 30% | `GET /users/{id}` (primary key) |
//! | 30% | `GET /posts/{id}` (primary key) |
//! | 15% | `GET /posts?author={id}` (a user's 20 latest posts joined with the user, by an index) |
//! | 10% | `GET /users?status=active&limit=50` |
//! | 5% | `GET /posts` (the 20 latest posts with their authors) |
//! | 5% | `PUT /posts/{id}` (a new title) |
//! | 3% | `POST /posts` |
//! | 2% | `PUT /users/{id}` (a new name) |
//!
//! The last line is `rps_cached=A rps_uncached=B p99_cached_ms=C p99_uncached_ms=D hit_ratio=H`,
//! where H is the cached run's hits over its cached reads (hits, misses, bypasses).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use axum::http::Method;
use diesel_memclone_tests::service::{self, Client, Config};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const MAX_REQUESTS: u64 = 2_000_000;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().position(|a| a == "--bench") {
        Some(i) => {
            let seconds: f64 = args
                .get(i + 1)
                .and_then(|s| s.parse().ok())
                .filter(|s: &f64| *s > 0.0)
                .unwrap_or_else(|| {
                    eprintln!("usage: service --bench SECONDS");
                    std::process::exit(2)
                });
            bench(Duration::from_secs_f64(seconds)).await;
        }
        None => run().await,
    }
}

/// Serves on `PORT` (default 3000) until Ctrl-C or SIGTERM.
async fn run() {
    init_tracing();
    let config = Config::from_env();
    let state = service::start(&config).await.unwrap_or_else(|e| {
        eprintln!("cannot start: {e} (are PostgreSQL and Redis up? see DATABASE_URL, REDIS_URL)");
        std::process::exit(1)
    });
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1)
        });
    println!(
        "listening on http://127.0.0.1:{port} (schema {}, {} users); try: curl 127.0.0.1:{port}/users/7",
        config.schema, config.seed_users
    );
    service::serve(listener, state, service::shutdown_signal())
        .await
        .expect("serve");
    println!("stopped");
}

/// Prints the cache's spans when `RUST_LOG` asks for them.
fn init_tracing() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let level = filter
            .rsplit('=')
            .next()
            .and_then(|l| l.parse::<tracing::Level>().ok())
            .unwrap_or(tracing::Level::INFO);
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .init();
    }
}

/// One run's figures.
struct Figures {
    requests: u64,
    errors: u64,
    rps: f64,
    p99_ms: f64,
    hit_ratio: f64,
}

async fn bench(measured: Duration) {
    let warmup = (measured / 2).min(Duration::from_secs(10));
    let cached = load_run(
        Config::from_env().named("memclone_service_bench"),
        warmup,
        measured,
    )
    .await;
    let uncached = load_run(
        Config::from_env()
            .named("memclone_service_bench")
            .cached(false),
        warmup,
        measured,
    )
    .await;
    for (name, f) in [("cached", &cached), ("uncached", &uncached)] {
        println!(
            "{name}: {} requests ({} errors) in {:.1} s, {:.0} req/s, p99 {:.2} ms",
            f.requests,
            f.errors,
            measured.as_secs_f64(),
            f.rps,
            f.p99_ms
        );
    }
    println!(
        "rps_cached={:.0} rps_uncached={:.0} p99_cached_ms={:.2} p99_uncached_ms={:.2} hit_ratio={:.3}",
        cached.rps, uncached.rps, cached.p99_ms, uncached.p99_ms, cached.hit_ratio
    );
}

/// Starts the service as `config` says, drives it for `warmup` then `measured`, stops it.
async fn load_run(config: Config, warmup: Duration, measured: Duration) -> Figures {
    let state = service::start(&config).await.unwrap_or_else(|e| {
        eprintln!("cannot start: {e} (are PostgreSQL and Redis up? see DATABASE_URL, REDIS_URL)");
        std::process::exit(1)
    });
    let cache = state.cache.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let address = listener.local_addr().expect("its address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let users = config.seed_users;
    let posts = config.seed_users * config.posts_per_user;
    drive(address, users, posts, warmup, u64::MAX).await;
    let before = cache.as_ref().map(|c| c.stats());
    let cpu_before = cpu_times(&config).await;
    let began = Instant::now();
    let (latencies, by_kind, errors) = drive(address, users, posts, measured, MAX_REQUESTS).await;
    // Where the time goes, by request.
    let means: Vec<String> = KINDS
        .iter()
        .zip(by_kind)
        .filter(|(_, (n, _))| *n > 0)
        .map(|(kind, (n, micros))| format!("{kind} {:.2}", micros as f64 / n as f64 / 1000.0))
        .collect();
    println!("mean ms by request: {}", means.join(", "));
    let elapsed = began.elapsed();
    let cpu_after = cpu_times(&config).await;
    let per_request = |ms: f64| ms / latencies.len().max(1) as f64;
    let spent: Vec<f64> = (0..3).map(|i| cpu_after[i] - cpu_before[i]).collect();
    println!(
        "cpu ms per request: service and client {:.3}, postgres backends {:.3}, redis {:.3} (all of redis-server's), total {:.3}",
        per_request(spent[0]),
        per_request(spent[1]),
        per_request(spent[2]),
        per_request(spent.iter().sum()),
    );
    let hit_ratio = match (cache.as_ref().map(|c| c.stats()), before) {
        (Some(after), Some(before)) => {
            println!("cache stats over the measured run (cumulative since start): {after:?}");
            let hits = after.hits - before.hits;
            let reads = hits + (after.misses - before.misses) + (after.bypasses - before.bypasses);
            hits as f64 / reads.max(1) as f64
        }
        _ => 0.0,
    };
    if cache.is_some() {
        // What the cache did, per label and tier (cumulative since the process started).
        let rendered = service::prometheus().render();
        let counters = [
            "memclone_hits_total",
            "memclone_misses_total",
            "memclone_coalesced_total",
        ];
        for line in rendered.lines() {
            if counters
                .iter()
                .any(|name| line.starts_with(&format!("{name}{{")))
            {
                println!("  {line}");
            }
        }
    }
    let _ = stop.send(());
    server.await.expect("server task").expect("serve");

    let mut latencies = latencies;
    latencies.sort_unstable();
    let p99 = latencies
        .get(latencies.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(0);
    Figures {
        requests: latencies.len() as u64,
        errors,
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        p99_ms: p99 as f64 / 1000.0,
        hit_ratio,
    }
}

/// CPU milliseconds used so far by this process (the service and the client), by the
/// PostgreSQL backends of the service's pools (named after its schema), and by redis-server
/// (which other clients may share): what a load run costs, whatever else the machine runs.
async fn cpu_times(config: &Config) -> [f64; 3] {
    fn cpu_ms(pid: u32) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0.0;
        };
        // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
            .sum();
        ticks * 10.0 // USER_HZ is 100 on Linux
    }
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let backends: Vec<i32> =
        match diesel_async::AsyncPgConnection::establish(&config.database_url).await {
            Ok(mut conn) => diesel::sql_query(format!(
                "SELECT pid FROM pg_stat_activity WHERE application_name = '{}'",
                config.schema
            ))
            .load::<Pid>(&mut conn)
            .await
            .map(|rows| rows.into_iter().map(|r| r.pid).collect())
            .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
    let redis = std::process::Command::new("redis-cli")
        .args(["-u", &config.redis_url, "INFO", "server"])
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("process_id:"))
                .and_then(|p| p.trim().parse::<u32>().ok())
        });
    [
        cpu_ms(std::process::id()),
        backends.iter().map(|&pid| cpu_ms(pid as u32)).sum(),
        redis.map_or(0.0, cpu_ms),
    ]
}

#[derive(diesel::QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// Drives the service at `address` from [`CLIENTS`] tasks for `duration` or `max_requests`
/// requests: each request's latency in microseconds, the count and total microseconds of each
/// kind of request ([`KINDS`]), and how many failed.
async fn drive(
    address: SocketAddr,
    users: i32,
    posts: i32,
    duration: Duration,
    max_requests: u64,
) -> (Vec<u32>, [(u64, u64); KINDS.len()], u64) {
    let client = Client::new(address);
    let deadline = Instant::now() + duration;
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let reported = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..CLIENTS {
        let (client, sent, errors, reported) = (
            client.clone(),
            sent.clone(),
            errors.clone(),
            reported.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((task as u64 + 1) * 0x2545_f491_4f6c_dd1d));
            let mut latencies = Vec::new();
            let mut by_kind = [(0_u64, 0_u64); KINDS.len()];
            while Instant::now() < deadline && sent.fetch_add(1, Ordering::Relaxed) < max_requests {
                let (kind, method, path, body) = next_request(&mut rng, users, posts);
                let began = Instant::now();
                let outcome = client.request(method, &path, body).await;
                let micros = began.elapsed().as_micros().min(u32::MAX as u128) as u32;
                latencies.push(micros);
                by_kind[kind].0 += 1;
                by_kind[kind].1 += u64::from(micros);
                let failure = match outcome {
                    Ok((status, _)) if status.is_success() => None,
                    Ok((status, body)) => {
                        Some(format!("{status} {}", String::from_utf8_lossy(&body)))
                    }
                    Err(e) => Some(e.to_string()),
                };
                if let Some(failure) = failure {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if !reported.swap(true, Ordering::Relaxed) {
                        eprintln!("first failed request: {path}: {failure}");
                    }
                }
            }
            (latencies, by_kind)
        }));
    }
    let mut latencies = Vec::new();
    let mut by_kind = [(0_u64, 0_u64); KINDS.len()];
    for task in tasks {
        let (task_latencies, task_by_kind) = task.await.expect("client task");
        latencies.extend(task_latencies);
        for (total, (n, micros)) in by_kind.iter_mut().zip(task_by_kind) {
            total.0 += n;
            total.1 += micros;
        }
    }
    (latencies, by_kind, errors.load(Ordering::Relaxed))
}

/// The next request of the workload (see the module's table).
fn next_request(
    rng: &mut Rng,
    users: i32,
    posts: i32,
) -> (usize, Method, String, Option<serde_json::Value>) {
    let user = rng.skewed(users);
    let post = rng.skewed(posts);
    // `MIX`: the cumulative shares of the table's rows, in percent (default
    // `30,60,75,85,90,95,98`: the rest is the last row), to try other workloads.
    static MIX: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    let mix = MIX.get_or_init(|| {
        let given = std::env::var("MIX").ok().map(|mix| {
            mix.split(',')
                .map(|share| share.trim().parse::<u64>())
                .collect::<Result<Vec<_>, _>>()
        });
        match given {
            Some(Ok(mix)) => mix,
            Some(Err(_)) => {
                eprintln!("MIX: comma-separated percentages, such as 30,60,75,85,90,95,98");
                std::process::exit(2)
            }
            None => vec![30, 60, 75, 85, 90, 95, 98],
        }
    });
    let pick = rng.below(100);
    let kind = mix.iter().position(|&t| pick < t).unwrap_or(mix.len());
    let (method, path, body) = match kind {
        0 => (Method::GET, format!("/users/{user}"), None),
        1 => (Method::GET, format!("/posts/{post}"), None),
        2 => (Method::GET, format!("/posts?author={user}"), None),
        3 => (Method::GET, "/users?status=active&limit=50".into(), None),
        4 => (Method::GET, "/posts".into(), None),
        5 => (
            Method::PUT,
            format!("/posts/{post}"),
            Some(serde_json::json!({ "title": format!("edited {}", rng.below(1_000_000)) })),
        ),
        6 => (
            Method::POST,
            "/posts".into(),
            Some(serde_json::json!({ "user_id": user, "title": "new post" })),
        ),
        _ => (
            Method::PUT,
            format!("/users/{user}"),
            Some(serde_json::json!({ "name": format!("renamed {}", rng.below(1_000_000)) })),
        ),
    };
    (kind.min(KINDS.len() - 1), method, path, body)
}

/// The workload's requests, in `next_request`'s order, for the per-request means.
const KINDS: [&str; 8] = [
    "GET /users/{id}",
    "GET /posts/{id}",
    "GET /posts?author=",
    "GET /users?status=",
    "GET /posts",
    "PUT /posts/{id}",
    "POST /posts",
    "PUT /users/{id}",
];

/// xorshift64*: reproducible runs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An id in `1..=n`, 80% of them in the first tenth.
    fn skewed(&mut self, n: i32) -> i32 {
        let n = n.max(1) as u64;
        let range = if self.below(10) < 8 {
            (n / 10).max(1)
        } else {
            n
        };
        (self.below(range) + 1) as i32
    }
}

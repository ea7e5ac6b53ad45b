//! The near tier in front of Redis: near hits ask nothing of Redis or the database; a write
//! made through one cache is seen at once by that cache and within `max_lag` by another
//! (a second process, as far as the tier is concerned: its own store, connections and stream);
//! a hung invalidation stream stops near hits within `max_lag`; a Redis restart flushes the tier.

use diesel::prelude::*;
use diesel_async::AsyncPgConnection;
use diesel_memclone::deadpool_redis::redis;
use diesel_memclone::prelude::*;
use diesel_memclone::store::RedisStore;
use diesel_memclone::{Cache, NearCache};
use diesel_memclone_tests::proxy::Proxy;
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MAX_LAG: Duration = Duration::from_millis(100);
/// Longer than `max_lag` by a margin for a busy machine: after it, nothing may be stale.
const PAST_THE_WINDOW: Duration = Duration::from_millis(150);
/// How long a test waits for a stream to come (back) into sync.
const PATIENCE: Duration = Duration::from_secs(10);

fn near() -> NearCache {
    NearCache::new().max_lag(MAX_LAG)
}

async fn seed(cache: &Cache, conn: &mut AsyncPgConnection) {
    let row = User {
        id: 1,
        name: "Ann".into(),
        status: "a".into(),
    };
    diesel_memclone::insert_into(users::table)
        .values(&row)
        .using(cache)
        .execute(conn)
        .await
        .unwrap();
}

async fn rename(cache: &Cache, conn: &mut AsyncPgConnection, name: &str) {
    diesel_memclone::update(users::table.find(1))
        .set(users::name.eq(name))
        .using(cache)
        .execute(conn)
        .await
        .unwrap();
}

/// Two caches ("processes") on one namespace, each with its own store and near tier.
async fn two_processes(stores: [RedisStore; 2], namespace: &str) -> (Cache, Cache) {
    let [a, b] = stores;
    let build = |store: RedisStore| {
        Cache::builder()
            .store(store)
            .namespace(namespace)
            .near_cache(near())
            .build()
            .unwrap()
    };
    let (a, b) = (build(a), build(b));
    assert!(a.near_cache_ready(PATIENCE).await, "A's stream is in sync");
    assert!(b.near_cache_ready(PATIENCE).await, "B's stream is in sync");
    (a, b)
}

/// B's near tier serves B's repeated read with no Redis or database work; A's write is seen by
/// A at once and by B once `max_lag` has passed; entity reads and custom keys too.
async fn writes_reach_the_other_process(a: Cache, b: Cache, schema: &str) {
    let mut conn_a = postgres_again(schema).await;
    let mut conn_b = postgres_again(schema).await;
    seed(&a, &mut conn_a).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn_b);

    assert!(b.near_cache_ready(PATIENCE).await, "B heard of the insert");
    assert_eq!(user_names(&b, &mut conn_b).await, ["Ann"]);
    let before = b.stats();
    let (names, queries) = counted!(counter, user_names(&b, &mut conn_b).await);
    assert_eq!((names, queries), (vec!["Ann".to_owned()], 0));
    assert_eq!(b.stats().near_hits, before.near_hits + 1, "a near hit");

    // Entity reads and custom keys use the tier too.
    let user: User = b.find(&mut conn_b, 1).await.unwrap();
    assert_eq!(user.name, "Ann");
    // A fill may extend the row generation's lifetime (when the generation would expire
    // before the entry), which Redis reports as a change: the next read then learns the
    // generations again from Redis (one hit), and the one after is near.
    assert!(b.near_cache_ready(PATIENCE).await);
    let before = b.stats();
    for _ in 0..2 {
        let (user, queries) = counted!(counter, b.find::<User, _>(&mut conn_b, 1).await);
        assert_eq!((user.unwrap().name, queries), ("Ann".to_owned(), 0));
    }
    assert!(b.stats().near_hits > before.near_hits, "an entity near hit");

    rename(&a, &mut conn_a, "Anna").await;
    // Read-your-writes in the writing process, with no window.
    assert_eq!(user_names(&a, &mut conn_a).await, ["Anna"]);
    tokio::time::sleep(PAST_THE_WINDOW).await;
    assert_eq!(
        user_names(&b, &mut conn_b).await,
        ["Anna"],
        "B past the window"
    );
    let user: User = b.find(&mut conn_b, 1).await.unwrap();
    assert_eq!(user.name, "Anna");
}

#[tokio::test]
async fn a_write_in_one_process_reaches_another_within_max_lag() {
    let schema = unique("near");
    let (Some(_), Some(a), Some(b)) = (
        postgres(&schema).await,
        redis_store().await,
        redis_store().await,
    ) else {
        return;
    };
    let (a, b) = two_processes([a, b], &unique("near")).await;
    writes_reach_the_other_process(a, b, &schema).await;
}

#[tokio::test]
async fn on_a_cluster_a_write_reaches_another_process_within_max_lag() {
    let schema = unique("near");
    let (Some(_), Some(a), Some(b)) = (
        postgres(&schema).await,
        redis_cluster_store().await,
        redis_cluster_store().await,
    ) else {
        return;
    };
    let (a, b) = two_processes([a, b], &unique("near")).await;
    writes_reach_the_other_process(a, b, &schema).await;
}

/// The in-process store has no near tier to give, and says so.
#[test]
fn the_memory_store_refuses_a_near_tier() {
    let refused = Cache::builder().near_cache(NearCache::new()).build();
    assert!(
        matches!(refused, Err(diesel_memclone::Error::Config(ref m)) if m.contains("near")),
        "{refused:?}"
    );
}

/// B's invalidation stream goes through a proxy that then hangs (holds every byte back, keeps
/// the connection open): B stops near hits within `max_lag`, reads Redis meanwhile and is never
/// stale past the window; when the link comes back, near hits resume.
#[tokio::test]
async fn a_hung_stream_stops_near_hits_within_max_lag() {
    let schema = unique("near");
    let (Some(_), Some(a), Some(b)) = (
        postgres(&schema).await,
        redis_store().await,
        redis_store().await,
    ) else {
        return;
    };
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("a host:port Redis URL");
    let proxy = Proxy::start(upstream).await;
    let namespace = unique("near");
    let a = Cache::builder()
        .store(a)
        .namespace(&namespace)
        .near_cache(near())
        .build()
        .unwrap();
    let b = Cache::builder()
        .store(b)
        .namespace(&namespace)
        .near_cache(near().tracking_url(proxy.url()))
        .build()
        .unwrap();
    assert!(b.near_cache_ready(PATIENCE).await);
    let mut conn_a = postgres_again(&schema).await;
    let mut conn_b = postgres_again(&schema).await;
    seed(&a, &mut conn_a).await;
    assert!(b.near_cache_ready(PATIENCE).await);
    user_names(&b, &mut conn_b).await;
    let hits = b.stats().near_hits;
    assert_eq!(user_names(&b, &mut conn_b).await, ["Ann"]);
    assert_eq!(b.stats().near_hits, hits + 1, "{:?}", b.stats());

    proxy.stall();
    rename(&a, &mut conn_a, "Anna").await;
    tokio::time::sleep(PAST_THE_WINDOW).await;
    let hits = b.stats().near_hits;
    assert_eq!(user_names(&b, &mut conn_b).await, ["Anna"], "not stale");
    assert_eq!(
        b.stats().near_hits,
        hits,
        "no near hit while the stream hangs"
    );

    proxy.restore();
    assert!(b.near_cache_ready(PATIENCE).await, "back in sync");
    user_names(&b, &mut conn_b).await;
    let hits = b.stats().near_hits;
    assert_eq!(user_names(&b, &mut conn_b).await, ["Anna"]);
    assert_eq!(b.stats().near_hits, hits + 1, "near hits resume");
}

/// A `redis-server` of the test's own on a free port, so that it can be restarted without
/// disturbing the shared one; killed when dropped.
struct OwnRedis {
    child: Child,
    port: u16,
    /// Removed when dropped (a cluster node's state).
    dir: Option<std::path::PathBuf>,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl OwnRedis {
    async fn start(port: Option<u16>) -> Option<OwnRedis> {
        Self::start_with(port, &[]).await
    }

    /// A cluster-enabled node whose state lives in a directory of its own.
    async fn cluster_node() -> Option<OwnRedis> {
        let dir = std::env::temp_dir().join(unique("memclone_near_cluster"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.to_string_lossy().into_owned();
        let mut node = Self::start_with(None, &["--cluster-enabled", "yes", "--dir", &path]).await;
        if let Some(node) = &mut node {
            node.dir = Some(dir);
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        node
    }

    async fn start_with(port: Option<u16>, extra: &[&str]) -> Option<OwnRedis> {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("a free port")
                .port()
        });
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                server_missing("redis-server", e);
                return None;
            }
        };
        let server = OwnRedis {
            child,
            port,
            dir: None,
        };
        let client = redis::Client::open(server.url()).unwrap();
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return Some(server);
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn command(&self, cmd: &redis::Cmd) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        cmd.query_async(&mut conn).await.unwrap()
    }

    async fn text(&self, cmd: &redis::Cmd) -> String {
        match self.command(cmd).await {
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            redis::Value::SimpleString(text) => text,
            other => panic!("not text: {other:?}"),
        }
    }
}

/// Waits until `what` holds, or panics after a while.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never: {what}");
}

/// On a cluster of its own (one node holding every slot, then a second primary with none), the
/// tier stops answering when a primary joins, and while a slot migrates, and answers again once
/// it follows the new primary too and the slot is stable.
#[tokio::test]
async fn a_cluster_topology_change_stops_near_reads_until_followed() {
    let (Some(a), Some(b)) = (
        OwnRedis::cluster_node().await,
        OwnRedis::cluster_node().await,
    ) else {
        return;
    };
    a.command(redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(16383))
        .await;
    eventually("the one-node cluster is up", || async {
        a.text(redis::cmd("CLUSTER").arg("INFO"))
            .await
            .contains("cluster_state:ok")
    })
    .await;
    let store = RedisStore::cluster_builder([a.url()]).build().unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("near"))
        .near_cache(near())
        .build()
        .unwrap();
    assert!(
        cache.near_cache_ready(PATIENCE).await,
        "in sync on one node"
    );
    let flushes = cache.stats().near_flushes;

    // A second primary joins (no slots yet: slots would migrate to it next).
    a.command(
        redis::cmd("CLUSTER")
            .arg("MEET")
            .arg("127.0.0.1")
            .arg(b.port),
    )
    .await;
    eventually("the tier noticed the new primary", || async {
        cache.stats().near_flushes > flushes
    })
    .await;
    assert!(cache.near_cache_ready(PATIENCE).await, "in sync on both");

    // A slot migrating to it: keys may live on either node, so the tier must not answer.
    let b_id = b.text(redis::cmd("CLUSTER").arg("MYID")).await;
    a.command(
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(0)
            .arg("MIGRATING")
            .arg(&b_id),
    )
    .await;
    tokio::time::sleep(PAST_THE_WINDOW).await;
    assert!(
        !cache.near_cache_ready(Duration::from_millis(300)).await,
        "no near reads while a slot migrates"
    );
    a.command(redis::cmd("CLUSTER").arg("SETSLOT").arg(0).arg("STABLE"))
        .await;
    assert!(
        cache.near_cache_ready(PATIENCE).await,
        "in sync once the slot is stable"
    );
}

/// Redis restarts empty (every generation lost) and A writes to the new server: B's tier,
/// which knew the old generations, was flushed when its stream broke and serves the new row.
#[tokio::test]
async fn a_redis_restart_flushes_the_tier() {
    let schema = unique("near");
    let (Some(_), Some(server)) = (postgres(&schema).await, OwnRedis::start(None).await) else {
        return;
    };
    let store = || RedisStore::builder(server.url()).build().unwrap();
    let (a, b) = two_processes([store(), store()], &unique("near")).await;
    let mut conn_a = postgres_again(&schema).await;
    let mut conn_b = postgres_again(&schema).await;
    seed(&a, &mut conn_a).await;
    assert!(b.near_cache_ready(PATIENCE).await);
    user_names(&b, &mut conn_b).await;
    let hits = b.stats().near_hits;
    assert_eq!(user_names(&b, &mut conn_b).await, ["Ann"]);
    assert_eq!(b.stats().near_hits, hits + 1);
    let flushes = b.stats().near_flushes;

    let port = server.port;
    drop(server);
    let _server = OwnRedis::start(Some(port)).await.expect("restarted");
    // A's store reconnects on use; its write lands in the empty server.
    let mut renamed = false;
    for _ in 0..100 {
        rename(&a, &mut conn_a, "Anna").await;
        if a.undelivered_invalidations().is_empty() {
            renamed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(renamed, "A's invalidation reached the restarted server");
    assert_eq!(user_names(&b, &mut conn_b).await, ["Anna"], "not stale");
    assert!(b.stats().near_flushes > flushes, "B's tier was flushed");
    assert!(
        b.near_cache_ready(PATIENCE).await,
        "B follows the new server"
    );
}

/// The tier holds about `max_bytes` at most, however many entries pass through it.
#[tokio::test]
async fn near_entries_are_bounded_in_bytes() {
    let schema = unique("near");
    let (Some(mut conn), Some(store)) = (postgres(&schema).await, redis_store().await) else {
        return;
    };
    let max_bytes = 64 * 1024;
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("near"))
        .near_cache(near().max_bytes(max_bytes))
        .build()
        .unwrap();
    assert!(cache.near_cache_ready(PATIENCE).await);
    let long = "x".repeat(2000);
    for id in 0..100 {
        diesel_memclone::insert_into(users::table)
            .values((
                users::id.eq(id),
                users::name.eq(&long),
                users::status.eq("a"),
            ))
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    for id in 0..100 {
        for _ in 0..2 {
            let name: String = users::table
                .find(id)
                .select(users::name)
                .cached("name")
                .using(&cache)
                .get_result(&mut conn)
                .await
                .unwrap();
            assert_eq!(name.len(), 2000);
        }
    }
    let held = cache.stats().near_bytes;
    assert!(held > 0, "the tier held entries");
    assert!(
        held <= max_bytes,
        "{held} bytes held, more than {max_bytes}"
    );
}

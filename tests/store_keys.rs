//! What the Redis store does with its own keys: a key of the wrong type (another writer in the
//! namespace, a bad migration) is a miss that replaces it, never an outage; a write writes its
//! rows through in a fresh namespace; row generations live as long as the entries that depend
//! on them; scripts run by SHA; a store error keeps the Redis error as its source.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use diesel_memclone::deadpool_redis::redis::{self, Value};
use diesel_memclone::store::Store;
use diesel_memclone::{Cache, CacheValue, LockOptions};
use diesel_memclone_tests::schema::{posts, users};
use diesel_memclone_tests::*;
use std::time::Duration;

/// A fresh schema with users 1..=`users` and post 1, and a cache on the single Redis or the
/// cluster (with a raw connection to the same server or cluster, for raw commands).
async fn setup(
    cluster: bool,
    users: i32,
    options: impl FnOnce(diesel_memclone::CacheBuilder) -> diesel_memclone::CacheBuilder,
) -> Option<(Cache, RawRedis, String, AsyncPgConnection, QueryCounter)> {
    let schema = unique("keys");
    let mut conn = postgres(&schema).await?;
    let store = match cluster {
        true => redis_cluster_store().await?,
        false => redis_store().await?,
    };
    let ns = unique("keys");
    let redis = RawRedis::test_server(cluster).await;
    let builder = Cache::builder().store(store).namespace(ns.clone());
    let cache = options(builder).build().unwrap();
    let mut seed = String::new();
    for id in 1..=users {
        seed.push_str(&format!(
            "INSERT INTO users VALUES ({id}, 'user {id}', 'a');"
        ));
    }
    seed.push_str("INSERT INTO posts VALUES (1, 1, 'post 1');");
    conn.batch_execute(&seed).await.unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    Some((cache, redis, ns, conn, counter))
}

fn user_entry(ns: &str, id: i32) -> String {
    let fingerprint = <User as CacheValue>::fingerprint();
    format!("{ns}:{{r:users:{id}}}:e:{fingerprint:016x}")
}

fn table_key(ns: &str, table: &str, what: &str) -> String {
    format!("{ns}:{{t:{table}}}:{what}")
}

/// Replaces `key` with a list, as another writer in the namespace could.
async fn make_list(redis: &RawRedis, key: &str) {
    redis.query(redis::cmd("DEL").arg(key)).await.unwrap();
    redis
        .query(redis::cmd("RPUSH").arg(key).arg("foreign"))
        .await
        .unwrap();
}

async fn key_type(redis: &RawRedis, key: &str) -> String {
    match redis.query(redis::cmd("TYPE").arg(key)).await.unwrap() {
        Value::SimpleString(kind) => kind,
        Value::Okay => "ok".into(),
        other => format!("{other:?}"),
    }
}

async fn pttl(redis: &RawRedis, key: &str) -> i64 {
    match redis.query(redis::cmd("PTTL").arg(key)).await.unwrap() {
        Value::Int(ms) => ms,
        other => panic!("PTTL {key}: {other:?}"),
    }
}

async fn get_u64(redis: &RawRedis, key: &str) -> u64 {
    match redis.query(redis::cmd("GET").arg(key)).await.unwrap() {
        Value::BulkString(bytes) => String::from_utf8(bytes).unwrap().parse().unwrap(),
        other => panic!("GET {key}: {other:?}"),
    }
}

async fn find_user(cache: &Cache, conn: &mut AsyncPgConnection, id: i32) -> User {
    cache.find::<User, _>(conn, id).await.unwrap()
}

async fn find_post(cache: &Cache, conn: &mut AsyncPgConnection, id: i32) -> Post {
    cache.find::<Post, _>(conn, id).await.unwrap()
}

async fn entry_of_the_wrong_type_is_a_miss_that_replaces_it(cluster: bool) {
    let Some((cache, redis, ns, mut conn, counter)) = setup(cluster, 3, |b| b).await else {
        return;
    };
    for id in 1..=3 {
        find_user(&cache, &mut conn, id).await;
    }
    assert_eq!(counter.get(), 3, "three misses fill three entries");
    make_list(&redis, &user_entry(&ns, 1)).await;

    let (user, queries) = counted!(counter, find_user(&cache, &mut conn, 1).await);
    assert_eq!((user.name.as_str(), queries), ("user 1", 1), "one miss");
    for id in 2..=3 {
        let (user, queries) = counted!(counter, find_user(&cache, &mut conn, id).await);
        assert_eq!(
            (user.name, queries),
            (format!("user {id}"), 0),
            "the other entries keep hitting"
        );
    }
    let (user, queries) = counted!(counter, find_user(&cache, &mut conn, 1).await);
    assert_eq!(
        (user.name.as_str(), queries),
        ("user 1", 0),
        "the bad key was replaced by a good entry"
    );
    assert_eq!(key_type(&redis, &user_entry(&ns, 1)).await, "string");
    let stats = cache.stats();
    assert_eq!(
        (stats.store_errors, stats.bypasses, stats.corrupt_entries),
        (0, 0, 1),
        "a bad key is a corrupt entry, not a store failure: {stats:?}"
    );
}

async fn generations_of_the_wrong_type_are_misses_and_replaced(cluster: bool) {
    let Some((cache, redis, ns, mut conn, counter)) = setup(cluster, 2, |b| b).await else {
        return;
    };
    find_user(&cache, &mut conn, 1).await;
    find_user(&cache, &mut conn, 2).await;
    find_post(&cache, &mut conn, 1).await;
    user_names(&cache, &mut conn).await;
    assert_eq!(counter.get(), 4);
    let bad = [
        table_key(&ns, "users", "qgen"),
        table_key(&ns, "users", "egen"),
        table_key(&ns, "users", "r:2"),
    ];
    for key in &bad {
        make_list(&redis, key).await;
    }

    let (post, queries) = counted!(counter, find_post(&cache, &mut conn, 1).await);
    assert_eq!((post.id, queries), (1, 0), "another table keeps hitting");
    let (names, queries) = counted!(counter, user_names(&cache, &mut conn).await);
    assert_eq!(
        (names.len(), queries),
        (2, 1),
        "a query under a bad generation: a miss"
    );
    for id in 1..=2 {
        let (user, queries) = counted!(counter, find_user(&cache, &mut conn, id).await);
        assert_eq!(
            (user.id, queries),
            (id, 1),
            "a row under a bad generation: a miss"
        );
    }
    let (_, queries) = counted!(counter, {
        user_names(&cache, &mut conn).await;
        find_user(&cache, &mut conn, 1).await;
        find_user(&cache, &mut conn, 2).await;
        find_post(&cache, &mut conn, 1).await
    });
    assert_eq!(queries, 0, "every generation was replaced: hits again");
    for key in &bad {
        assert_eq!(key_type(&redis, key).await, "string", "{key}");
    }
    let stats = cache.stats();
    assert_eq!(
        (stats.store_errors, stats.bypasses),
        (0, 0),
        "no store failure: {stats:?}"
    );
}

async fn writes_invalidate_over_keys_of_the_wrong_type(cluster: bool) {
    let Some((cache, redis, ns, mut conn, counter)) = setup(cluster, 1, |b| b).await else {
        return;
    };
    find_user(&cache, &mut conn, 1).await;
    user_names(&cache, &mut conn).await;
    for key in [
        table_key(&ns, "users", "wseq"),
        table_key(&ns, "users", "r:1"),
        table_key(&ns, "users", "egen"),
        table_key(&ns, "users", "qgen"),
    ] {
        make_list(&redis, &key).await;
    }
    let rename = |name: &'static str| {
        diesel_memclone::update(users::table.find(1))
            .set(users::name.eq(name))
            .map(|s| s.returning(users::all_columns))
            .using(&cache)
    };
    let written: User = rename("Ann").get_result(&mut conn).await.unwrap();
    assert_eq!(written.name, "Ann");
    assert!(
        cache.undelivered_invalidations().is_empty(),
        "the bump replaced the keys of the wrong type and was delivered"
    );
    assert_eq!(find_user(&cache, &mut conn, 1).await.name, "Ann");
    assert_eq!(user_names(&cache, &mut conn).await, ["Ann"]);
    assert_eq!(
        key_type(&redis, &table_key(&ns, "users", "wseq")).await,
        "string"
    );
    // The write sequence works again: the next write is written through.
    let before = cache.stats().written_through;
    let written: User = rename("Anna").get_result(&mut conn).await.unwrap();
    assert_eq!(written.name, "Anna");
    assert_eq!(cache.stats().written_through, before + 1);
    let (user, queries) = counted!(counter, find_user(&cache, &mut conn, 1).await);
    assert_eq!((user.name.as_str(), queries), ("Anna", 0));
    let stats = cache.stats();
    assert_eq!(stats.store_errors, 0, "no store failure: {stats:?}");
}

async fn lock_of_the_wrong_type_does_not_block_the_fill(cluster: bool) {
    let lock = LockOptions::default().wait_timeout(Duration::from_millis(300));
    let Some((cache, redis, ns, mut conn, counter)) = setup(cluster, 1, |b| b.lock(lock)).await
    else {
        return;
    };
    find_user(&cache, &mut conn, 1).await;
    let entry = user_entry(&ns, 1);
    redis.query(redis::cmd("DEL").arg(&entry)).await.unwrap();
    let tags = [
        get_u64(&redis, &table_key(&ns, "users", "egen")).await,
        get_u64(&redis, &table_key(&ns, "users", "r:1")).await,
    ];
    let lock_key = format!("{entry}:lock:{:016x}{:016x}", tags[0], tags[1]);
    make_list(&redis, &lock_key).await;

    let (user, queries) = counted!(counter, find_user(&cache, &mut conn, 1).await);
    assert_eq!((user.name.as_str(), queries), ("user 1", 1), "a miss");
    let (user, queries) = counted!(counter, find_user(&cache, &mut conn, 1).await);
    assert_eq!((user.name.as_str(), queries), ("user 1", 0), "then a hit");
    let stats = cache.stats();
    assert_eq!(
        (stats.lock_timeouts, stats.store_errors, stats.bypasses),
        (0, 0, 0),
        "the bad lock was taken over at once: {stats:?}"
    );
}

async fn fresh_namespace_writes_through(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let row = User {
        id: 7,
        name: "Grace".into(),
        status: "a".into(),
    };
    let inserted: User = diesel_memclone::insert_into(users::table)
        .values(&row)
        .map(|s| s.returning(users::all_columns))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(inserted, row);
    assert_eq!(cache.stats().written_through, 1, "the inserted row");
    let (found, queries) = counted!(counter, find_user(&cache, &mut conn, 7).await);
    assert_eq!(
        (found, queries),
        (row, 0),
        "a hit on the written-through row"
    );
}

async fn row_generations_live_as_long_as_their_entries(cluster: bool) {
    let entry_ttl = Duration::from_secs(30);
    let slack_ms = 1_000;
    let Some((cache, redis, ns, mut conn, _)) =
        setup(cluster, 20, |b| b.default_ttl(entry_ttl)).await
    else {
        return;
    };
    for id in 1..=20 {
        find_user(&cache, &mut conn, id).await;
    }
    // At most a quarter longer than the entries (extensions are rare, see `EXTEND_SCRIPT`).
    let bound = entry_ttl.as_millis() as i64 * 5 / 4 + slack_ms;
    for id in 1..=20 {
        let ms = pttl(&redis, &table_key(&ns, "users", &format!("r:{id}"))).await;
        assert!(
            ms > 0 && ms <= bound,
            "row generation {id}: PTTL {ms} ms, entries live {bound} ms at most"
        );
    }
    let ms = pttl(&redis, &table_key(&ns, "users", "egen")).await;
    assert!(ms > 0 && ms <= bound, "entity generation: PTTL {ms} ms");
    // A longer-lived entry (posts: 600 s) keeps its row generation for as long.
    find_post(&cache, &mut conn, 1).await;
    let ms = pttl(&redis, &table_key(&ns, "posts", "r:1")).await;
    assert!(
        ms > bound && ms <= 750_000 + slack_ms,
        "post row generation: PTTL {ms} ms"
    );
}

/// A write sequence at or past 2^52 (a foreign writer's, or one shared with another app) is not
/// trusted: Lua holds it as a double, which cannot tell two writes apart there. The write that
/// finds one writes nothing through, and its bump starts the sequence again from a random base.
async fn write_sequences_past_2_52_are_reset(cluster: bool) {
    let Some((cache, redis, ns, mut conn, counter)) = setup(cluster, 1, |b| b).await else {
        return;
    };
    find_user(&cache, &mut conn, 1).await;
    let sequence = table_key(&ns, "users", "wseq");
    redis
        .query(redis::cmd("SET").arg(&sequence).arg("123456789012345677"))
        .await
        .unwrap();
    let rename = |name: &'static str| {
        diesel_memclone::update(users::table.find(1))
            .set(users::name.eq(name))
            .using(&cache)
    };
    let written: User = rename("Ann").get_result(&mut conn).await.unwrap();
    assert_eq!(written.name, "Ann");
    assert_eq!(cache.stats().written_through, 0, "nothing written through");
    let reset = get_u64(&redis, &sequence).await;
    assert!(
        reset < 1 << 52,
        "the sequence starts again below 2^52: {reset}"
    );
    let (user, queries) = counted!(counter, find_user(&cache, &mut conn, 1).await);
    assert_eq!((user.name.as_str(), queries), ("Ann", 1));
    // From there, writes are written through again.
    let written: User = rename("Anna").get_result(&mut conn).await.unwrap();
    assert_eq!(written.name, "Anna");
    assert_eq!(cache.stats().written_through, 1);
    let (user, queries) = counted!(counter, find_user(&cache, &mut conn, 1).await);
    assert_eq!((user.name.as_str(), queries), ("Anna", 0));
}

/// Rows written through by a write (with its bump, on a single server) keep their generations
/// as long as their entries, as rows filled by reads do.
async fn written_rows_keep_their_generations(cluster: bool) {
    let Some((cache, redis, ns, mut conn, counter)) = setup(cluster, 1, |b| b).await else {
        return;
    };
    // A read first: the table's entity generation exists, which a write needs to store its rows
    // with its bump.
    find_post(&cache, &mut conn, 1).await;
    let post: Post = diesel_memclone::update(posts::table.find(1))
        .set(posts::title.eq("written"))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(cache.stats().written_through, 1, "the updated post");
    // Posts' entries live 600 s: their generations at least as long, at most a quarter longer.
    for generation in ["r:1", "egen"] {
        let ms = pttl(&redis, &table_key(&ns, "posts", generation)).await;
        assert!(
            ms > 590_000 && ms <= 751_000,
            "post {generation}: PTTL {ms} ms, the entry lives 600 s"
        );
    }
    let (found, queries) = counted!(counter, find_post(&cache, &mut conn, 1).await);
    assert_eq!((found, queries), (post, 0), "a hit on the written row");
}

/// A generation that expired under a living entry makes that entry a miss, never a stale hit.
async fn missing_row_generation_is_a_miss(cluster: bool) {
    let Some((cache, redis, ns, mut conn, counter)) = setup(cluster, 1, |b| b).await else {
        return;
    };
    find_user(&cache, &mut conn, 1).await;
    let row_generation = table_key(&ns, "users", "r:1");
    redis
        .query(redis::cmd("DEL").arg(&row_generation))
        .await
        .unwrap();
    conn.batch_execute("UPDATE users SET name = 'changed' WHERE id = 1")
        .await
        .unwrap();
    let (user, queries) = counted!(counter, find_user(&cache, &mut conn, 1).await);
    assert_eq!((user.name.as_str(), queries), ("changed", 1));
}

/// Sum of `cmdstat_<command>` calls on every node of the store.
async fn command_calls(cluster: bool, command: &str) -> u64 {
    let urls = match cluster {
        true => redis_cluster_urls(),
        false => vec![redis_url()],
    };
    let mut calls = 0;
    for url in urls {
        let node = RawRedis::open(&url).await.expect("the node answers");
        let info = node
            .query(redis::cmd("INFO").arg("commandstats"))
            .await
            .unwrap();
        let text = match info {
            Value::BulkString(bytes) => String::from_utf8(bytes).unwrap(),
            Value::VerbatimString { text, .. } => text,
            other => panic!("INFO: {other:?}"),
        };
        let prefix = format!("cmdstat_{command}:calls=");
        calls += text
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse::<u64>().unwrap());
    }
    calls
}

async fn scripts_run_by_sha_and_survive_a_flush(cluster: bool) {
    let Some((cache, redis, _, mut conn, counter)) = setup(cluster, 1, |b| b).await else {
        return;
    };
    user_names(&cache, &mut conn).await;
    // Scripts lost (a restart, a failover, SCRIPT FLUSH): the store loads them again.
    redis
        .query(redis::cmd("SCRIPT").arg("FLUSH"))
        .await
        .unwrap();
    let before = command_calls(cluster, "evalsha").await;
    for name in ["a", "b", "c"] {
        diesel_memclone::update(users::table.find(1))
            .set(users::name.eq(name))
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
        let (names, queries) = counted!(counter, user_names(&cache, &mut conn).await);
        assert_eq!((names, queries), (vec![name.to_owned()], 1), "invalidated");
    }
    assert!(cache.undelivered_invalidations().is_empty());
    let after = command_calls(cluster, "evalsha").await;
    assert!(
        after >= before + 3,
        "three bumps by EVALSHA (calls {before} -> {after})"
    );
}

#[tokio::test]
async fn store_error_keeps_the_redis_error_as_its_source() {
    let Some(store) = redis_store().await else {
        return;
    };
    // A time to live Redis refuses (`SET .. PX` beyond its range): an error reply.
    let key = unique("keys-ttl");
    let error = store
        .put(&key, b"value".to_vec(), Duration::MAX)
        .await
        .expect_err("SET with a time to live out of range");
    let source = std::error::Error::source(&error).expect("a source");
    let redis_error = source
        .downcast_ref::<redis::RedisError>()
        .expect("the source is the Redis error");
    assert_eq!(redis_error.code(), Some("ERR"));
    assert!(error.to_string().contains("out of range"), "{error}");
}

macro_rules! on_redis {
    ($scenario:ident: $single:ident, $cluster:ident) => {
        #[tokio::test]
        async fn $single() {
            $scenario(false).await;
        }

        #[tokio::test]
        async fn $cluster() {
            $scenario(true).await;
        }
    };
}

on_redis!(entry_of_the_wrong_type_is_a_miss_that_replaces_it: wrong_type_entry_redis, wrong_type_entry_redis_cluster);
on_redis!(generations_of_the_wrong_type_are_misses_and_replaced: wrong_type_generations_redis, wrong_type_generations_redis_cluster);
on_redis!(writes_invalidate_over_keys_of_the_wrong_type: wrong_type_write_keys_redis, wrong_type_write_keys_redis_cluster);
on_redis!(lock_of_the_wrong_type_does_not_block_the_fill: wrong_type_lock_redis, wrong_type_lock_redis_cluster);
on_redis!(row_generations_live_as_long_as_their_entries: row_generation_ttl_redis, row_generation_ttl_redis_cluster);
on_redis!(write_sequences_past_2_52_are_reset: sequences_past_2_52_redis, sequences_past_2_52_redis_cluster);
on_redis!(written_rows_keep_their_generations: written_rows_generations_redis, written_rows_generations_redis_cluster);
on_redis!(missing_row_generation_is_a_miss: missing_row_generation_redis, missing_row_generation_redis_cluster);
on_redis!(scripts_run_by_sha_and_survive_a_flush: scripts_by_sha_redis, scripts_by_sha_redis_cluster);
on_every_store!(fresh_namespace_writes_through: fresh_write_through_redis, fresh_write_through_redis_cluster, fresh_write_through_memory);

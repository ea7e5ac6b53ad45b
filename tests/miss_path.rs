//! The miss path's round trips: the store operations of one uncontended miss after an
//! invalidating write that its caller waits for, and the one that stores the entry after the
//! call returned, counted by a wrapper store (each operation is one round trip on Redis), on a
//! single server and on the cluster, with the fill lock on and off, with and without a near
//! tier. Behaviour, not speed.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use diesel_memclone::deadpool_redis::redis;
use diesel_memclone::store::{MemoryStore, ReadLock, ReadProbe, RedisStore, Store};
use diesel_memclone::{Cache, NearCache};
use diesel_memclone_tests::counting::Counting;
use diesel_memclone_tests::*;
use std::time::Duration;

async fn scenario(store: RedisStore, cluster: bool) {
    let schema = unique("misspath");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    for lock in [true, false] {
        // Entry writes held back 200 ms: on a multi-thread runtime the write behind the caller
        // runs on another worker, and without the delay it could land before the caller's
        // return is looked at; with it, a write found done at once was waited for.
        let counting = Counting::new(store.clone()).with_put_delay(Duration::from_millis(200));
        let mut builder = Cache::builder()
            .store(counting.clone())
            .namespace(unique("misspath"));
        if !lock {
            builder = builder.no_lock();
        }
        let cache = builder.build().unwrap();
        let names = user_names(&cache, &mut conn).await;
        let stored = match lock {
            true => "put_and_unlock",
            false => "put",
        };
        // The first fill's entry write, finished after it returned.
        background(&counting, stored).await;
        cache.invalidate_table("users").await;
        if !cluster {
            // Scripts lost (a restart, SCRIPT FLUSH): the miss's scripts load them again, and
            // a refused script is sent again in the same operation.
            let raw = RawRedis::test_server(false).await;
            raw.query(redis::cmd("SCRIPT").arg("FLUSH")).await.unwrap();
        }
        counting.take();
        assert_eq!(user_names(&cache, &mut conn).await, names);
        // What the caller waited for: the operations done when the read returned.
        let ops = counting.take();
        let want: &[&str] = match (lock, cluster) {
            // One round trip: the entry and generations, and the lock named after them, in one
            // script (this process's write moved the generations: a miss is likely).
            (true, false) => &["read_or_lock"],
            // The entry and generations; the lock with a look at the entry (a cluster's keys
            // of one read live in several slots, which no script may touch).
            (true, true) => &["fetch", "fetch_or_lock"],
            (false, _) => &["fetch"],
        };
        assert_eq!(ops, want, "lock {lock}, cluster {cluster}");
        // Then, off the caller's path: the entry stored and the lock freed, in one round trip.
        assert_eq!(background(&counting, stored).await, [stored], "lock {lock}");
        assert_eq!(cache.stats().misses, 2);
        // The lock was freed: no lock key is left in the namespace.
        let raw = RawRedis::test_server(cluster).await;
        let pattern = format!("{}:*:lock:*", cache.namespace());
        let keys: Vec<String> = match cluster {
            false => raw.query_as(redis::cmd("KEYS").arg(&pattern)).await,
            true => Vec::new(),
        };
        assert!(keys.is_empty(), "locks left: {keys:?}");
        // And the next read is a hit, in one round trip.
        assert_eq!(user_names(&cache, &mut conn).await, names);
        assert_eq!(counting.take(), ["fetch"]);
    }
}

/// The operations that completed until `last` did (a write the cache finishes after
/// returning), waiting for it up to 5 s.
async fn background(counting: &Counting<RedisStore>, last: &str) -> Vec<&'static str> {
    let mut done = Vec::new();
    for _ in 0..500 {
        done.extend(counting.take());
        if done.contains(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_miss_single_server() {
    let Some(store) = redis_store().await else {
        return;
    };
    scenario(store, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_miss_cluster() {
    let Some(store) = redis_cluster_store().await else {
        return;
    };
    scenario(store, true).await;
}

/// A write made by another process (another cache on the same Redis): a cache with a near tier
/// hears of it, no longer knows the generations, and its miss takes the lock in its one round
/// trip; a cache without one cannot tell it from a hit, and reads first (two round trips, as
/// before). Either way the next read is a hit, and no lock is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_after_another_process_wrote() {
    let Some(store) = redis_store().await else {
        return;
    };
    let schema = unique("misspath_other");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    for near in [true, false] {
        let namespace = unique("misspath_other");
        let writer = Cache::builder()
            .store(store.clone())
            .namespace(&namespace)
            .build()
            .unwrap();
        let counting = Counting::new(store.clone()).with_put_delay(Duration::from_millis(200));
        let mut builder = Cache::builder()
            .store(counting.clone())
            .namespace(&namespace);
        if near {
            builder = builder.near_cache(NearCache::new());
        }
        let cache = builder.build().unwrap();
        if near {
            assert!(cache.near_cache_ready(Duration::from_secs(10)).await);
        }
        let names = user_names(&cache, &mut conn).await;
        background(&counting, "put_and_unlock").await;
        writer.invalidate_table("users").await;
        if near {
            // The push has arrived: the tier no longer knows the table's generation.
            assert!(cache.near_cache_ready(Duration::from_secs(10)).await);
        }
        counting.take();
        assert_eq!(user_names(&cache, &mut conn).await, names);
        let want: &[&str] = match near {
            true => &["read_or_lock"],
            false => &["fetch", "fetch_or_lock"],
        };
        assert_eq!(counting.take(), want, "near {near}");
        let stored = background(&counting, "put_and_unlock").await;
        assert_eq!(stored, ["put_and_unlock"], "near {near}");
        assert_eq!(user_names(&cache, &mut conn).await, names);
        let want: &[&str] = match near {
            // Held by the near tier since the fill.
            true => &[],
            false => &["fetch"],
        };
        assert_eq!(counting.take(), want, "near {near}: a hit");
        assert_eq!(cache.stats().misses, 2, "near {near}");
        let raw = RawRedis::test_server(false).await;
        let pattern = format!("{namespace}:*:lock:*");
        let keys: Vec<String> = raw.query_as(redis::cmd("KEYS").arg(&pattern)).await;
        assert!(keys.is_empty(), "locks left: {keys:?}");
    }
}

/// The entry write that a miss leaves running after it returned loses to an invalidation that
/// lands first: a read after the invalidation gets the new row, whichever write reaches the
/// store last, with the fill lock on and off and with a near tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_racing_the_background_write_wins() {
    let Some(store) = redis_store().await else {
        return;
    };
    let schema = unique("misspath_race");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    diesel::insert_into(schema::users::table)
        .values((
            schema::users::id.eq(1),
            schema::users::name.eq("ada"),
            schema::users::status.eq("active"),
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    let slow_write = Duration::from_millis(300);
    for (lock, near) in [(true, false), (false, false), (true, true)] {
        let counting = Counting::new(store.clone()).with_put_delay(slow_write);
        let mut builder = Cache::builder()
            .store(counting.clone())
            // The slow write must not time out: it is to land after the invalidation.
            .store_timeout(Duration::from_secs(5))
            .namespace(unique("misspath_race"));
        if !lock {
            builder = builder.no_lock();
        }
        if near {
            builder = builder.near_cache(NearCache::new());
        }
        let cache = builder.build().unwrap();
        if near {
            assert!(cache.near_cache_ready(Duration::from_secs(10)).await);
        }
        let before = user_names(&cache, &mut conn).await;
        // The miss's entry write is still waiting: the row changes and the table is
        // invalidated before it reaches the store.
        let renamed = format!("renamed {lock} {near}");
        diesel::update(schema::users::table.filter(schema::users::id.eq(1)))
            .set(schema::users::name.eq(&renamed))
            .execute(&mut conn)
            .await
            .unwrap();
        cache.invalidate_table("users").await;
        let mut after = before.clone();
        after[0] = renamed;
        assert_eq!(
            user_names(&cache, &mut conn).await,
            after,
            "lock {lock} near {near}"
        );
        // Both writes have landed now, the old one possibly last: still the new row.
        tokio::time::sleep(slow_write * 3).await;
        assert_eq!(
            user_names(&cache, &mut conn).await,
            after,
            "lock {lock} near {near}"
        );
        // No lock is left behind for other processes to wait on.
        let raw = RawRedis::test_server(false).await;
        let pattern = format!("{}:*:lock:*", cache.namespace());
        let keys: Vec<String> = raw.query_as(redis::cmd("KEYS").arg(&pattern)).await;
        assert!(keys.is_empty(), "locks left: {keys:?}");
    }
}

/// `uncache` moves no generation: a miss under a custom key must not leave its entry write (or
/// its single-flight) behind the caller, or the write would land after the delete, and the next
/// read would be handed the old value. With entry writes held back 200 ms: a miss, a write that
/// bypasses memclone, `uncache` of the key, then reads at once and after the delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncache_after_a_miss_under_a_custom_key_wins() {
    use diesel_async::SimpleAsyncConnection;
    use diesel_memclone::prelude::*;
    use diesel_memclone::store::MemoryStore;
    use diesel_memclone_tests::schema::users;
    use std::time::Duration;

    async fn names(cache: &Cache, conn: &mut SqliteConn) -> Vec<String> {
        users::table
            .order(users::id)
            .select(users::name)
            .cached("summary")
            .key("summary")
            .using(cache)
            .load::<String, _>(conn)
            .await
            .unwrap()
    }
    let store = Counting::new(MemoryStore::default()).with_put_delay(Duration::from_millis(200));
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("uncache_race"))
        .build()
        .unwrap();
    let mut conn = sqlite().await;
    conn.batch_execute("INSERT INTO users VALUES (1, 'Ann', 'active')")
        .await
        .unwrap();
    assert_eq!(names(&cache, &mut conn).await, ["Ann"]);
    conn.batch_execute("UPDATE users SET name = 'Bob' WHERE id = 1")
        .await
        .unwrap();
    cache.uncache(&["summary"]).await;
    let right_after = names(&cache, &mut conn).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let later = names(&cache, &mut conn).await;
    assert_eq!(
        (right_after, later),
        (vec!["Bob".to_string()], vec!["Bob".to_string()]),
        "{:?}",
        cache.stats()
    );
}

/// A runtime used for one `block_on` per call (current-thread, not driven in between) gets no
/// entry write behind it: a miss there stores its entry and frees its fill lock before
/// returning, so another cache on the same Redis (another process) reads a hit at once, with no
/// lock wait (before, it waited out the lock and read the database).
#[test]
fn a_current_thread_runtime_between_calls_leaves_no_lock_behind() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(store) = runtime.block_on(redis_store()) else {
        return;
    };
    let schema = unique("misspath_block_on");
    let Some(mut conn) = runtime.block_on(postgres(&schema)) else {
        return;
    };
    let namespace = unique("misspath_block_on");
    let cache = |store: RedisStore| {
        Cache::builder()
            .store(store)
            .namespace(namespace.clone())
            .build()
            .unwrap()
    };
    let first = cache(store);
    let names = runtime.block_on(user_names(&first, &mut conn));
    // The runtime is not driven from here on; another process's cache, on its own runtime.
    let other_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let other = cache(other_runtime.block_on(redis_store()).unwrap());
    let mut other_conn = other_runtime.block_on(postgres_again(&schema));
    let read = other_runtime.block_on(user_names(&other, &mut other_conn));
    assert_eq!(read, names);
    let stats = other.stats();
    assert_eq!(
        (
            stats.hits,
            stats.misses,
            stats.lock_waits,
            stats.lock_timeouts
        ),
        (1, 0, 0, 0),
        "{stats:?}"
    );
}

/// `Store::read_or_lock`, as the Redis script does it on a single server and as the trait's
/// default does it in steps (the cluster, the in-process store): the same generations (a
/// missing one created, values past 2^53 intact), the lock named after them taken unless the
/// entry holds them, held against another owner, and not asked for when the entry is current.
async fn read_or_lock_scenario(store: &dyn Store, what: &str) {
    let ns = unique("read_or_lock");
    let entry = format!("{ns}:{{q:1}}:e");
    let generations = vec![format!("{ns}:{{t:a}}:qgen"), format!("{ns}:{{t:b}}:qgen")];
    store
        .set_generations(&generations[..1], &[u64::MAX], None)
        .await
        .unwrap();
    let fresh = [7, (1 << 53) + 1];
    let prefix = format!("{entry}:lock:");
    let ttl = Duration::from_secs(10);
    let probe = |owner| {
        let generation_ttl = Some(Duration::from_secs(60));
        ReadProbe::new(
            &entry,
            &generations,
            &fresh,
            generation_ttl,
            4,
            &prefix,
            owner,
            ttl,
        )
    };
    let first = store.read_or_lock(probe(1)).await.unwrap();
    let current = first.generations.clone();
    assert_eq!(
        (&first.entry, first.lock),
        (&None, ReadLock::Taken),
        "{what}"
    );
    assert_eq!(current[0], u64::MAX, "{what}");
    if store.reads_and_locks_at_once() {
        // Created in the script, with the value given.
        assert_eq!(current[1], (1 << 53) + 1, "{what}");
    }
    let lock = probe(1).lock_key(&current);
    assert_eq!(lock, format!("{prefix}{}.{}", u64::MAX, current[1]));
    assert_eq!(
        store.fetch("", &generations).await.unwrap().generations,
        [Some(u64::MAX), Some(current[1])],
        "{what}: created"
    );
    assert!(
        !store.try_lock(&lock, 9, ttl).await.unwrap(),
        "{what}: held"
    );
    let second = store.read_or_lock(probe(2)).await.unwrap();
    assert_eq!(
        (&second.generations, second.lock),
        (&current, ReadLock::Busy),
        "{what}"
    );
    // An entry filled under these generations: current, and no lock asked for.
    let mut bytes = b"MAGC".to_vec();
    bytes.extend(ReadProbe::tag(&current));
    bytes.extend(b"payload");
    store
        .put(&entry, bytes.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    store.unlock(&lock, 1).await.unwrap();
    let third = store.read_or_lock(probe(3)).await.unwrap();
    assert_eq!(
        (third.entry, third.lock),
        (Some(bytes), ReadLock::Current),
        "{what}"
    );
    assert!(store.try_lock(&lock, 9, ttl).await.unwrap(), "{what}: free");
    store.unlock(&lock, 9).await.unwrap();
    // A generation moves: the entry no longer holds them, and the new lock is taken.
    store
        .set_generations(&generations[1..], &[5], None)
        .await
        .unwrap();
    let fourth = store.read_or_lock(probe(4)).await.unwrap();
    assert_eq!(
        (&fourth.generations, fourth.lock),
        (&vec![u64::MAX, 5], ReadLock::Taken),
        "{what}"
    );
    let moved = probe(4).lock_key(&fourth.generations);
    assert_eq!(moved, format!("{prefix}{}.5", u64::MAX));
    assert!(!store.try_lock(&moved, 9, ttl).await.unwrap(), "{what}");
    store.unlock(&moved, 4).await.unwrap();
    // An entry one off in a generation does not hold them either.
    let mut bytes = b"MAGC".to_vec();
    bytes.extend(ReadProbe::tag(&[u64::MAX, 4]));
    store
        .put(&entry, bytes, Duration::from_secs(60))
        .await
        .unwrap();
    let fifth = store.read_or_lock(probe(5)).await.unwrap();
    assert_eq!(fifth.lock, ReadLock::Taken, "{what}");
    store.unlock(&moved, 5).await.unwrap();
}

#[tokio::test]
async fn read_or_lock_on_every_store() {
    read_or_lock_scenario(&MemoryStore::default(), "memory").await;
    if let Some(store) = redis_store().await {
        assert!(store.reads_and_locks_at_once());
        read_or_lock_scenario(&store, "redis").await;
        // Keys of another type are replaced (a generation) or read as an empty entry.
        let raw = RawRedis::test_server(false).await;
        let ns = unique("read_or_lock_types");
        let entry = format!("{ns}:{{q:1}}:e");
        let generations = vec![format!("{ns}:{{t:a}}:qgen")];
        for key in [&entry, &generations[0]] {
            raw.query(redis::cmd("LPUSH").arg(key).arg("x"))
                .await
                .unwrap();
        }
        let prefix = format!("{entry}:lock:");
        let probe = ReadProbe::new(
            &entry,
            &generations,
            &[42],
            None,
            4,
            &prefix,
            1,
            Duration::from_secs(10),
        );
        let read = store.read_or_lock(probe).await.unwrap();
        assert_eq!(
            (read.entry, read.generations, read.lock),
            (Some(Vec::new()), vec![42], ReadLock::Taken)
        );
        store.unlock(&probe.lock_key(&[42]), 1).await.unwrap();
    }
    if let Some(store) = redis_cluster_store().await {
        assert!(!store.reads_and_locks_at_once());
        read_or_lock_scenario(&store, "cluster").await;
    }
}

//! The miss path's round trips: the store operations of one uncontended miss after an
//! invalidating write, counted by a wrapper store (each operation is one round trip on Redis),
//! on a single server and on the cluster, with the fill lock on and off. Behaviour, not speed.

use diesel_memclone::deadpool_redis::redis;
use diesel_memclone::store::RedisStore;
use diesel_memclone::Cache;
use diesel_memclone_tests::counting::Counting;
use diesel_memclone_tests::*;

async fn scenario(store: RedisStore, cluster: bool) {
    let schema = unique("misspath");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    for lock in [true, false] {
        let counting = Counting::new(store.clone());
        let mut builder = Cache::builder()
            .store(counting.clone())
            .namespace(unique("misspath"));
        if !lock {
            builder = builder.no_lock();
        }
        let cache = builder.build().unwrap();
        let names = user_names(&cache, &mut conn).await;
        cache.invalidate_table("users").await;
        if !cluster {
            // Scripts lost (a restart, SCRIPT FLUSH): the miss's scripts load them again, and
            // a refused script is sent again in the same operation.
            let raw = RawRedis::test_server(false).await;
            raw.query(redis::cmd("SCRIPT").arg("FLUSH")).await.unwrap();
        }
        counting.take();
        assert_eq!(user_names(&cache, &mut conn).await, names);
        let ops = counting.take();
        let want: &[&str] = match lock {
            // The entry and generations; the lock with a look at the entry; the entry stored
            // and the lock freed.
            true => &["fetch", "fetch_or_lock", "put_and_unlock"],
            false => &["fetch", "put"],
        };
        assert_eq!(ops, want, "lock {lock}, cluster {cluster}");
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

#[tokio::test]
async fn uncontended_miss_single_server() {
    let Some(store) = redis_store().await else {
        return;
    };
    scenario(store, false).await;
}

#[tokio::test]
async fn uncontended_miss_cluster() {
    let Some(store) = redis_cluster_store().await else {
        return;
    };
    scenario(store, true).await;
}

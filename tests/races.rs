//! Contract points 2-4 under races, made deterministic: a transaction is held open (or a fill
//! is paused) while the other side runs, on PostgreSQL with Redis, Redis Cluster and the
//! in-process store. Every step asserts its database query count.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_memclone::prelude::*;
use diesel_memclone::{Cache, Error};
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;

use std::sync::Arc;
use tokio::sync::Notify;

async fn names(cache: &Cache, conn: &mut AsyncPgConnection) -> Vec<String> {
    users::table
        .select(users::name)
        .order(users::id)
        .cached("names")
        .using(cache)
        .load(conn)
        .await
        .unwrap()
}

async fn setup(
    cache: &Cache,
    schema: &str,
) -> (AsyncPgConnection, AsyncPgConnection, QueryCounter) {
    let mut writer = postgres_again(schema).await;
    let mut reader = postgres_again(schema).await;
    let row = User {
        id: 1,
        name: "v1".into(),
        status: "a".into(),
    };
    diesel_memclone::insert_into(users::table)
        .values(&row)
        .using(cache)
        .execute(&mut writer)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut reader);
    (writer, reader, counter)
}

/// A read that runs while a write is uncommitted fills with the old value; once the write
/// commits, the next read misses once (fresh value), then hits. Queries and entities alike.
async fn read_during_open_write_is_never_served_after_commit(cache: Cache, schema: &str) {
    let (mut writer, mut reader, counter) = setup(&cache, schema).await;
    let written = Arc::new(Notify::new());
    let read_done = Arc::new(Notify::new());
    let write = {
        let (cache, written, read_done) = (cache.clone(), written.clone(), read_done.clone());
        async move {
            diesel_memclone::transaction(&mut writer, async move |conn| {
                diesel_memclone::update(users::table.find(1))
                    .set(users::name.eq("v2"))
                    .using(&cache)
                    .execute(conn)
                    .await?;
                written.notify_one();
                read_done.notified().await;
                Ok::<_, Error>(())
            })
            .await
            .unwrap();
        }
    };
    let read = async {
        written.notified().await;
        // The write is made but not committed: the database still says v1, and so may we.
        let (during, queries) = counted!(counter, names(&cache, &mut reader).await);
        assert_eq!(
            (during, queries),
            (vec!["v1".to_string()], 1),
            "a miss that fills with v1"
        );
        let (entity, queries) = counted!(
            counter,
            cache.find::<User, _>(&mut reader, 1).await.unwrap()
        );
        assert_eq!((entity.name.as_str(), queries), ("v1", 1));
        read_done.notify_one();
    };
    tokio::join!(write, read);

    let (after, queries) = counted!(counter, names(&cache, &mut reader).await);
    assert_eq!(
        (after, queries),
        (vec!["v2".to_string()], 1),
        "the racing fill is not served: one miss"
    );
    let (after, queries) = counted!(counter, names(&cache, &mut reader).await);
    assert_eq!((after, queries), (vec!["v2".to_string()], 0), "then a hit");
    let (entity, queries) = counted!(
        counter,
        cache.find::<User, _>(&mut reader, 1).await.unwrap()
    );
    assert_eq!(
        (entity.name.as_str(), queries),
        ("v2", 1),
        "entity: one miss"
    );
    let (entity, queries) = counted!(
        counter,
        cache.find::<User, _>(&mut reader, 1).await.unwrap()
    );
    assert_eq!(
        (entity.name.as_str(), queries),
        ("v2", 0),
        "entity: then a hit"
    );
}

/// An invalidation lands while a fill is between its database read and its store: the fill's
/// result is returned to its caller but never served to a later one; the next call fills; the
/// one after hits.
async fn invalidation_during_a_fill(cache: Cache, schema: &str) {
    let (mut writer, mut reader, counter) = setup(&cache, schema).await;
    let fill_read = Arc::new(Notify::new());
    let invalidated = Arc::new(Notify::new());
    async fn paused_load(
        cache: &Cache,
        conn: &mut AsyncPgConnection,
        pause: Option<(Arc<Notify>, Arc<Notify>)>,
    ) -> Vec<String> {
        cache
            .load_with("paused", "all names", &["users"], conn, move |conn| {
                Box::pin(async move {
                    let rows: Vec<String> = users::table
                        .select(users::name)
                        .order(users::id)
                        .load(conn)
                        .await?;
                    if let Some((fill_read, invalidated)) = pause {
                        fill_read.notify_one();
                        invalidated.notified().await;
                    }
                    Ok(rows)
                })
            })
            .await
            .unwrap()
    }
    let read = async {
        let (racing, queries) = counted!(
            counter,
            paused_load(
                &cache,
                &mut reader,
                Some((fill_read.clone(), invalidated.clone()))
            )
            .await
        );
        assert_eq!(
            (racing, queries),
            (vec!["v1".to_string()], 1),
            "the caller gets what it read"
        );
    };
    let write = async {
        fill_read.notified().await;
        diesel_memclone::update(users::table.find(1))
            .set(users::name.eq("v2"))
            .using(&cache)
            .execute(&mut writer)
            .await
            .unwrap();
        invalidated.notify_one();
    };
    tokio::join!(read, write);
    let (next, queries) = counted!(counter, paused_load(&cache, &mut reader, None).await);
    assert_eq!(
        (next, queries),
        (vec!["v2".to_string()], 1),
        "the next call fills"
    );
    let (after, queries) = counted!(counter, paused_load(&cache, &mut reader, None).await);
    assert_eq!(
        (after, queries),
        (vec!["v2".to_string()], 0),
        "the one after hits"
    );
}

on_every_store!(read_during_open_write_is_never_served_after_commit:
    open_write_redis, open_write_redis_cluster, open_write_memory);
on_every_store!(invalidation_during_a_fill:
    fill_race_redis, fill_race_redis_cluster, fill_race_memory);

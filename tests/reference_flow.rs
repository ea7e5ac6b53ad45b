//! The Sequelize reference flow (create, query miss then hit, external write, stale read,
//! reload, invalidating update, query miss) on every backend, with database query counts.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::schema::{posts, users};
use diesel_memclone_tests::*;

macro_rules! reference_flow {
    ($conn:expr, $cache:expr) => {{
        let conn = &mut $conn;
        let cache: &Cache = &$cache;
        let counter = QueryCounter::default();
        counter.attach(conn);
        let active = || {
            users::table
                .inner_join(posts::table)
                .filter(users::status.eq("active"))
                .select((User::as_select(), Post::as_select()))
                .order(posts::id)
        };

        // 1. Create through memclone.
        let alice = User {
            id: 1,
            name: "Alice".into(),
            status: "active".into(),
        };
        diesel_memclone::insert_into(users::table)
            .values(&alice)
            .using(cache)
            .execute(conn)
            .await
            .unwrap();
        let post = Post {
            id: 1,
            user_id: 1,
            title: "Post A".into(),
        };
        diesel_memclone::insert_into(posts::table)
            .values(&post)
            .using(cache)
            .execute(conn)
            .await
            .unwrap();

        // 2. Query: miss (one statement), then hit (none).
        let (rows, queries) = counted!(counter, {
            let rows: Vec<(User, Post)> = active()
                .cached("active_list")
                .using(cache)
                .load(conn)
                .await
                .unwrap();
            rows
        });
        assert_eq!((rows.len(), queries), (1, 1), "first read is a miss");
        let (rows, queries) = counted!(counter, {
            let rows: Vec<(User, Post)> = active()
                .cached("active_list")
                .using(cache)
                .load(conn)
                .await
                .unwrap();
            rows
        });
        assert_eq!(
            (rows[0].0.name.as_str(), queries),
            ("Alice", 0),
            "second read is a hit"
        );
        let (user, queries) = counted!(counter, cache.find::<User, _>(conn, 1).await.unwrap());
        assert_eq!((user.name.as_str(), queries), ("Alice", 1), "entity miss");
        let (user, queries) = counted!(counter, cache.find::<User, _>(conn, 1).await.unwrap());
        assert_eq!((user.name.as_str(), queries), ("Alice", 0), "entity hit");

        // 3. External write, bypassing memclone.
        diesel::update(users::table.find(1))
            .set(users::name.eq("Alicia"))
            .execute(conn)
            .await
            .unwrap();

        // 4. Stale read, by design (contract point 7).
        let (mut stale, queries) = counted!(counter, cache.find::<User, _>(conn, 1).await.unwrap());
        assert_eq!(
            (stale.name.as_str(), queries),
            ("Alice", 0),
            "bypassing writes are not seen"
        );

        // 5. Reload: one statement, fresh data, and the entry is refreshed.
        let ((), queries) = counted!(counter, cache.reload(&mut stale, conn).await.unwrap());
        assert_eq!((stale.name.as_str(), queries), ("Alicia", 1));
        let (user, queries) = counted!(counter, cache.find::<User, _>(conn, 1).await.unwrap());
        assert_eq!(
            (user.name.as_str(), queries),
            ("Alicia", 0),
            "reload refreshed the entry"
        );

        // 6. Invalidating update.
        let (updated, _) = counted!(counter, {
            diesel_memclone::update(users::table.filter(users::id.eq(1)))
                .set(users::name.eq("ALICIA"))
                .using(cache)
                .execute(conn)
                .await
                .unwrap()
        });
        assert_eq!(updated, 1);

        // 7. The query misses once, then hits; the entity too.
        let (rows, queries) = counted!(counter, {
            let rows: Vec<(User, Post)> = active()
                .cached("active_list")
                .using(cache)
                .load(conn)
                .await
                .unwrap();
            rows
        });
        assert_eq!(
            (rows[0].0.name.as_str(), queries),
            ("ALICIA", 1),
            "invalidated query misses"
        );
        let (rows, queries) = counted!(counter, {
            let rows: Vec<(User, Post)> = active()
                .cached("active_list")
                .using(cache)
                .load(conn)
                .await
                .unwrap();
            rows
        });
        assert_eq!(
            (rows[0].0.name.as_str(), queries),
            ("ALICIA", 0),
            "then hits"
        );
        let (user, queries) = counted!(counter, cache.find::<User, _>(conn, 1).await.unwrap());
        assert_eq!(
            (user.name.as_str(), queries),
            ("ALICIA", 1),
            "entity evicted by the write"
        );
        let (user, queries) = counted!(counter, cache.find::<User, _>(conn, 1).await.unwrap());
        assert_eq!((user.name.as_str(), queries), ("ALICIA", 0));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (6, 4), "{stats:?}");
    }};
}

#[tokio::test]
async fn reference_flow_sqlite_memory_store() {
    let mut conn = sqlite().await;
    let cache = Cache::builder().namespace(unique("flow")).build().unwrap();
    reference_flow!(conn, cache);
}

#[tokio::test]
async fn reference_flow_postgres_redis() {
    let (Some(mut conn), Some(store)) = (postgres(&unique("flow")).await, redis_store().await)
    else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("flow"))
        .build()
        .unwrap();
    reference_flow!(conn, cache);
}

#[tokio::test]
async fn reference_flow_mariadb_redis() {
    let (Some(mut conn), Some(store)) = (mysql(&unique("flow")).await, redis_store().await) else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("flow"))
        .build()
        .unwrap();
    reference_flow!(conn, cache);
}

#[tokio::test]
async fn reference_flow_postgres_memory_store() {
    let Some(mut conn) = postgres(&unique("flow")).await else {
        return;
    };
    let cache = Cache::builder().namespace(unique("flow")).build().unwrap();
    reference_flow!(conn, cache);
}

#[tokio::test]
async fn reference_flow_postgres_redis_cluster() {
    let (Some(mut conn), Some(store)) =
        (postgres(&unique("flow")).await, redis_cluster_store().await)
    else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("flow"))
        .build()
        .unwrap();
    reference_flow!(conn, cache);
}

#[tokio::test]
async fn reference_flow_mariadb_redis_cluster() {
    let (Some(mut conn), Some(store)) = (mysql(&unique("flow")).await, redis_cluster_store().await)
    else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("flow"))
        .build()
        .unwrap();
    reference_flow!(conn, cache);
}

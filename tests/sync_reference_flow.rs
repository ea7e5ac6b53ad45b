//! The Sequelize reference flow of `reference_flow.rs` (create, query miss then hit, external
//! write, stale read, reload, invalidating update, query miss) on synchronous connections, from
//! plain test threads without any async runtime, with database query counts.

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};
use diesel_memclone::sync::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::schema::{posts, users};
use diesel_memclone_tests::*;

macro_rules! reference_flow {
    ($conn:expr, $cache:expr) => {{
        let conn = &mut $conn;
        let cache: &Cache = &$cache;
        let counter = QueryCounter::default();
        counter.attach_sync(&mut *conn);
        let active = || {
            users::table
                .inner_join(posts::table)
                .filter(users::status.eq("active"))
                .select((User::as_select(), Post::as_select()))
                .order(posts::id)
        };
        let blocking = cache.blocking();

        // 1. Create through memclone.
        let alice = User {
            id: 1,
            name: "Alice".into(),
            status: "active".into(),
        };
        diesel_memclone::sync::insert_into(users::table)
            .values(&alice)
            .using(cache)
            .execute(conn)
            .unwrap();
        let post = Post {
            id: 1,
            user_id: 1,
            title: "Post A".into(),
        };
        diesel_memclone::sync::insert_into(posts::table)
            .values(&post)
            .using(cache)
            .execute(conn)
            .unwrap();

        // 2. Query: miss (one statement), then hit (none).
        let read = |conn: &mut _| -> Vec<(User, Post)> {
            active()
                .cached("active_list")
                .using(cache)
                .load(conn)
                .unwrap()
        };
        let (rows, queries) = counted!(counter, read(conn));
        assert_eq!((rows.len(), queries), (1, 1), "first read is a miss");
        let (rows, queries) = counted!(counter, read(conn));
        assert_eq!(
            (rows[0].0.name.as_str(), queries),
            ("Alice", 0),
            "second read is a hit"
        );
        let (user, queries) = counted!(counter, blocking.find::<User, _>(conn, 1).unwrap());
        assert_eq!((user.name.as_str(), queries), ("Alice", 1), "entity miss");
        let (user, queries) = counted!(counter, blocking.find::<User, _>(conn, 1).unwrap());
        assert_eq!((user.name.as_str(), queries), ("Alice", 0), "entity hit");

        // 3. External write, bypassing memclone.
        diesel::update(users::table.find(1))
            .set(users::name.eq("Alicia"))
            .execute(conn)
            .unwrap();

        // 4. Stale read, by design (contract point 7).
        let (mut stale, queries) = counted!(counter, blocking.find::<User, _>(conn, 1).unwrap());
        assert_eq!(
            (stale.name.as_str(), queries),
            ("Alice", 0),
            "bypassing writes are not seen"
        );

        // 5. Reload: one statement, fresh data, and the entry is refreshed.
        let ((), queries) = counted!(counter, blocking.reload(&mut stale, conn).unwrap());
        assert_eq!((stale.name.as_str(), queries), ("Alicia", 1));
        let (user, queries) = counted!(counter, blocking.find::<User, _>(conn, 1).unwrap());
        assert_eq!(
            (user.name.as_str(), queries),
            ("Alicia", 0),
            "reload refreshed the entry"
        );

        // 6. Invalidating update.
        let updated = diesel_memclone::sync::update(users::table.filter(users::id.eq(1)))
            .set(users::name.eq("ALICIA"))
            .using(cache)
            .execute(conn)
            .unwrap();
        assert_eq!(updated, 1);

        // 7. The query misses once, then hits; the entity too.
        let (rows, queries) = counted!(counter, read(conn));
        assert_eq!(
            (rows[0].0.name.as_str(), queries),
            ("ALICIA", 1),
            "invalidated query misses"
        );
        let (rows, queries) = counted!(counter, read(conn));
        assert_eq!(
            (rows[0].0.name.as_str(), queries),
            ("ALICIA", 0),
            "then hits"
        );
        let (user, queries) = counted!(counter, blocking.find::<User, _>(conn, 1).unwrap());
        assert_eq!(
            (user.name.as_str(), queries),
            ("ALICIA", 1),
            "entity evicted by the write"
        );
        let (user, queries) = counted!(counter, blocking.find::<User, _>(conn, 1).unwrap());
        assert_eq!((user.name.as_str(), queries), ("ALICIA", 0));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (6, 4), "{stats:?}");
    }};
}

fn redis_cache(store: diesel_memclone::store::RedisStore) -> Cache {
    Cache::builder()
        .store(store)
        .namespace(unique("sflow"))
        .build()
        .unwrap()
}

#[test]
fn sync_reference_flow_sqlite_memory_store() {
    let mut conn = sqlite_sync();
    let cache = Cache::builder().namespace(unique("sflow")).build().unwrap();
    reference_flow!(conn, cache);
}

#[test]
fn sync_reference_flow_postgres_redis() {
    let (Some(mut conn), Some(store)) = (postgres_sync(&unique("sflow")), redis_store_sync())
    else {
        return;
    };
    reference_flow!(conn, redis_cache(store));
}

#[test]
fn sync_reference_flow_mariadb_redis() {
    let (Some(mut conn), Some(store)) = (mysql_sync(&unique("sflow")), redis_store_sync()) else {
        return;
    };
    reference_flow!(conn, redis_cache(store));
}

#[test]
fn sync_reference_flow_mariadb_redis_cluster() {
    let (Some(mut conn), Some(store)) = (mysql_sync(&unique("sflow")), redis_cluster_store_sync())
    else {
        return;
    };
    reference_flow!(conn, redis_cache(store));
}

#[test]
fn sync_reference_flow_postgres_redis_cluster() {
    let (Some(mut conn), Some(store)) =
        (postgres_sync(&unique("sflow")), redis_cluster_store_sync())
    else {
        return;
    };
    reference_flow!(conn, redis_cache(store));
}

#[test]
fn sync_reference_flow_postgres_memory_store() {
    let Some(mut conn) = postgres_sync(&unique("sflow")) else {
        return;
    };
    let cache = Cache::builder().namespace(unique("sflow")).build().unwrap();
    reference_flow!(conn, cache);
}

/// Sets each pooled connection's schema.
#[derive(Debug)]
struct SearchPath(String);

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for SearchPath {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        use diesel::connection::SimpleConnection;
        conn.batch_execute(&format!("SET search_path TO {}", self.0))
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

#[test]
fn sync_reference_flow_r2d2_postgres_redis() {
    let schema = unique("sflow");
    let (Some(_), Some(store)) = (postgres_sync(&schema), redis_store_sync()) else {
        return;
    };
    let pool = Pool::builder()
        .max_size(1)
        .connection_customizer(Box::new(SearchPath(schema)))
        .build(ConnectionManager::<PgConnection>::new(postgres_url()))
        .unwrap();
    let mut conn = pool.get().unwrap();
    reference_flow!(conn, redis_cache(store));
}

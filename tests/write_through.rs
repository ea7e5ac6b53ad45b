//! Writing returned rows through: entity entries, and keys computed from the rows
//! (`Write::cache_result`). Done when no other write to the table overlapped, skipped when one
//! did, and always guarded by the generations afterwards.

use diesel::prelude::*;
use diesel::sql_types::Bool;
use diesel_async::AsyncPgConnection;
use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;

use std::time::Duration;

async fn read_key(cache: &Cache, conn: &mut AsyncPgConnection, id: i32) -> User {
    users::table
        .find(id)
        .cached("user")
        .key(format!("user-{id}"))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap()
}

async fn seed(cache: &Cache, conn: &mut AsyncPgConnection) {
    for (id, name) in [(1, "Ann"), (2, "Bob")] {
        let row = User {
            id,
            name: name.into(),
            status: "a".into(),
        };
        diesel_memclone::insert_into(users::table)
            .values(&row)
            .using(cache)
            .execute(conn)
            .await
            .unwrap();
    }
}

async fn uncontended(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    seed(&cache, &mut conn).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let updated: User = diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anna"))
        .map(|s| s.returning(users::all_columns))
        .cache_result(Duration::from_secs(60), |u: &User| format!("user-{}", u.id))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(updated.name, "Anna");
    let (user, queries) = counted!(counter, read_key(&cache, &mut conn, 1).await);
    assert_eq!(
        (user.name.as_str(), queries),
        ("Anna", 0),
        "the written row was cached under its key"
    );
    // A later write to the table makes it unreachable.
    diesel_memclone::update(users::table.find(2))
        .set(users::name.eq("Rob"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (user, queries) = counted!(counter, read_key(&cache, &mut conn, 1).await);
    assert_eq!(
        (user.name.as_str(), queries),
        ("Anna", 1),
        "guarded by the table's generation"
    );
}

async fn contended(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    seed(&cache, &mut conn).await;
    let mut other = postgres_again(schema).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let slow_write = diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anna"))
        .map(|s| {
            s.filter(diesel::dsl::sql::<Bool>("pg_sleep(0.3) IS NOT NULL"))
                .returning(users::all_columns)
        })
        .cache_result(Duration::from_secs(60), |u: &User| format!("user-{}", u.id))
        .using(&cache)
        .get_result::<User, _>(&mut conn);
    let overlapping = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        diesel_memclone::update(users::table.find(2))
            .set(users::name.eq("Rob"))
            .using(&cache)
            .execute(&mut other)
            .await
            .unwrap();
    };
    let (updated, ()) = tokio::join!(slow_write, overlapping);
    assert_eq!(updated.unwrap().name, "Anna");
    let (user, queries) = counted!(counter, read_key(&cache, &mut conn, 1).await);
    assert_eq!(
        (user.name.as_str(), queries),
        ("Anna", 1),
        "an overlapped write caches nothing"
    );
}

on_every_store!(uncontended: uncontended_redis, uncontended_redis_cluster, uncontended_memory);
on_every_store!(contended: contended_redis, contended_redis_cluster, contended_memory);

/// Entity entries of the returned rows (stored with the table's bump on a single server):
/// stored when no other write overlapped, skipped when one did.
async fn entity_rows(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    seed(&cache, &mut conn).await;
    let mut other = postgres_again(schema).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let updated: User = diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anna"))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(updated.name, "Anna");
    let (user, queries) = counted!(counter, cache.find::<User, _>(&mut conn, 1).await.unwrap());
    assert_eq!(
        (user.name.as_str(), queries),
        ("Anna", 0),
        "the returned row is the entity entry"
    );
    let slow_write = diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Annie"))
        .map(|s| s.filter(diesel::dsl::sql::<Bool>("pg_sleep(0.3) IS NOT NULL")))
        .using(&cache)
        .get_result::<User, _>(&mut conn);
    let overlapping = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Its rows known, it moves the write sequence and row 2, not the entity generation:
        // only the sequence tells the slow write that it was overlapped.
        let rob: User = diesel_memclone::update(users::table.find(2))
            .set(users::name.eq("Rob"))
            .using(&cache)
            .get_result(&mut other)
            .await
            .unwrap();
        assert_eq!(rob.name, "Rob");
    };
    let (updated, ()) = tokio::join!(slow_write, overlapping);
    assert_eq!(updated.unwrap().name, "Annie");
    let (user, queries) = counted!(counter, cache.find::<User, _>(&mut conn, 1).await.unwrap());
    assert_eq!(
        (user.name.as_str(), queries),
        ("Annie", 1),
        "an overlapped write stores no entry: the read goes to the database"
    );
}

on_every_store!(entity_rows: entity_rows_redis, entity_rows_redis_cluster, entity_rows_memory);

//! Statements at the edges of what memclone reads from Diesel, each found by a review to serve a
//! stale row, panic or fail where Diesel does not: a write cancelled inside a transaction after
//! its statement ran, two schemas with a table of one name, `FROM ONLY`, a key change hidden
//! behind a subquery, an empty changeset, an empty batch insert.

use diesel::pg::expression::extensions::OnlyDsl;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_memclone::prelude::*;
use diesel_memclone::{Cache, Error};
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::{
    counted, on_every_store, postgres, postgres_again, redis_store, unique, QueryCounter, User,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

async fn ada(conn: &mut AsyncPgConnection) {
    conn.batch_execute("INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Brian', 'active')")
        .await
        .unwrap();
}

/// A write whose future is dropped after its statement reached the server, inside a memclone
/// transaction that then commits: its invalidation must still be delivered after the commit.
async fn write_cancelled_inside_a_transaction(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    ada(&mut conn).await;
    conn.batch_execute(
        "CREATE FUNCTION slow_update() RETURNS trigger AS $$
         BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER slow BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION slow_update();",
    )
    .await
    .unwrap();
    let mut reader = postgres_again(schema).await;
    assert_eq!(
        cache.find::<User, _>(&mut reader, 1).await.unwrap().name,
        "Ada"
    );

    let cache_in = cache.clone();
    diesel_memclone::transaction(&mut conn, async move |conn| {
        let update = diesel_memclone::update(users::table.find(1))
            .set(users::name.eq("Ada L."))
            .using(&cache_in)
            .execute(conn);
        // Gives up on the write's future; the statement is on its way and the commit runs it.
        let _ = tokio::time::timeout(Duration::from_millis(50), update).await;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();

    let truth: String = users::table
        .find(1)
        .select(users::name)
        .get_result(&mut reader)
        .await
        .unwrap();
    let cached = cache.find::<User, _>(&mut reader, 1).await.unwrap();
    assert_eq!(
        cached.name, truth,
        "the cache agrees with the committed database"
    );
}

/// `users.only()` renders `FROM ONLY "users"`: the table is `users`, not `only`.
async fn from_only(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    ada(&mut conn).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let count = || users::table.only().cached("only").using(&cache);
    let (n, misses) = counted!(counter, count().count(&mut conn).await.unwrap());
    assert_eq!((n, misses), (2, 1));
    diesel_memclone::insert_into(users::table)
        .values(&User {
            id: 3,
            name: "Cleo".into(),
            status: "active".into(),
        })
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (n, refills) = counted!(counter, count().count(&mut conn).await.unwrap());
    assert_eq!((n, refills), (3, 1));
}

/// A key change whose `SET` clause also holds a subquery: the moved row's old key is not served.
async fn key_change_behind_a_subquery(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    ada(&mut conn).await;
    assert!(cache
        .find_optional::<User, _>(&mut conn, 1)
        .await
        .unwrap()
        .is_some());
    let moved: Vec<User> = diesel_memclone::update(users::table.find(1))
        .set((
            users::name.eq(diesel::dsl::sql::<diesel::sql_types::Text>(
                "(SELECT 'z' FROM users LIMIT 1)",
            )),
            users::id.eq(20),
        ))
        .map(|s| s.returning(users::all_columns))
        .using(&cache)
        .get_results(&mut conn)
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!(
        cache.find_optional::<User, _>(&mut conn, 1).await.unwrap(),
        None
    );
}

#[derive(AsChangeset)]
#[diesel(table_name = users)]
struct Patch {
    name: Option<String>,
}

/// An empty changeset is Diesel's error, not a panic; an empty batch insert is `Ok(0)`, as in
/// Diesel.
async fn empty_statements(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    ada(&mut conn).await;
    let result = diesel_memclone::update(users::table.find(1))
        .set(&Patch { name: None })
        .using(&cache)
        .execute(&mut conn)
        .await;
    assert!(
        matches!(
            result,
            Err(Error::Database(diesel::result::Error::QueryBuilderError(_)))
        ),
        "{result:?}"
    );
    let none: Vec<User> = Vec::new();
    let inserted = diesel_memclone::insert_into(users::table)
        .values(&none)
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(inserted, 0);
    // The cached read still works, and still sees the rows.
    let rows: Vec<User> = users::table
        .cached("all")
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
}

on_every_store!(write_cancelled_inside_a_transaction: cancelled_write_redis, cancelled_write_cluster, cancelled_write_memory);
on_every_store!(from_only: from_only_redis, from_only_cluster, from_only_memory);
on_every_store!(key_change_behind_a_subquery: subquery_key_change_redis, subquery_key_change_cluster, subquery_key_change_memory);
on_every_store!(empty_statements: empty_statements_redis, empty_statements_cluster, empty_statements_memory);

#[allow(missing_docs)]
mod two_schemas {
    diesel::table! { memclone_schema_a.items (id) { id -> Integer, label -> Text } }
    pub mod b {
        diesel::table! { memclone_schema_b.items (id) { id -> Integer, label -> Text } }
    }
}

#[derive(Debug, Queryable, Selectable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = two_schemas::items)]
struct ItemA {
    id: i32,
    label: String,
}

#[derive(Debug, Queryable, Selectable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = two_schemas::b::items)]
struct ItemB {
    id: i32,
    label: String,
}

/// Two schemas with a table of one name: one's rows are never served for the other's.
#[tokio::test]
async fn tables_of_one_name_in_two_schemas() {
    let setup = unique("two_schemas");
    let (Some(mut conn), Some(store)) = (postgres(&setup).await, redis_store().await) else {
        return;
    };
    // `table!` needs fixed schema names; this is the only test that uses them.
    conn.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS memclone_schema_a; CREATE SCHEMA IF NOT EXISTS memclone_schema_b;
         DROP TABLE IF EXISTS memclone_schema_a.items; DROP TABLE IF EXISTS memclone_schema_b.items;
         CREATE TABLE memclone_schema_a.items (id INTEGER PRIMARY KEY, label TEXT NOT NULL);
         CREATE TABLE memclone_schema_b.items (id INTEGER PRIMARY KEY, label TEXT NOT NULL);
         INSERT INTO memclone_schema_a.items VALUES (1, 'from a');
         INSERT INTO memclone_schema_b.items VALUES (1, 'from b');",
    )
    .await
    .unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("two_schemas"))
        .build()
        .unwrap();
    let a = cache.find::<ItemA, _>(&mut conn, 1).await.unwrap();
    let b = cache.find::<ItemB, _>(&mut conn, 1).await.unwrap();
    assert_eq!((a.label.as_str(), b.label.as_str()), ("from a", "from b"));
}

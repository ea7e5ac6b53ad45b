//! Every way Diesel lets a schema rename things: a table's `#[sql_name]`, a column's
//! `#[sql_name]` (a key column too), a table in another PostgreSQL schema, and raw SQL that
//! contains what `debug_query` prints between the SQL and its binds. The derive, the write
//! helpers and the cached queries must name each table the same way, or a write leaves rows stale.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::{
    counted, on_every_store, postgres, postgres_again, redis_store, unique, QueryCounter,
};
use serde::{Deserialize, Serialize};

#[allow(missing_docs)]
mod schema {
    diesel::table! {
        #[sql_name = "people"]
        persons (id) {
            #[sql_name = "person_id"]
            id -> Integer,
            #[sql_name = "full_name"]
            name -> Text,
        }
    }

    diesel::table! {
        badges (id) {
            id -> Integer,
            person_id -> Integer,
        }
    }

    diesel::table! {
        memclone_elsewhere.ledger (id) {
            id -> BigInt,
            amount -> BigInt,
        }
    }
}
use schema::{badges, ledger, persons};

/// A model of a renamed table, with a renamed key column, and no memclone option at all.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone,
)]
#[diesel(table_name = persons)]
struct Person {
    id: i32,
    name: String,
}

/// A model of a table in another schema.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone,
)]
#[diesel(table_name = ledger)]
struct Entry {
    id: i64,
    amount: i64,
}

/// A row of a raw query.
#[derive(Debug, Clone, PartialEq, QueryableByName, Serialize, Deserialize, CacheValue)]
struct Named {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    id: i32,
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

async fn people(conn: &mut AsyncPgConnection) {
    conn.batch_execute(
        "CREATE TABLE people (person_id INTEGER PRIMARY KEY, full_name TEXT NOT NULL);
         CREATE TABLE badges (id INTEGER PRIMARY KEY, person_id INTEGER NOT NULL);
         INSERT INTO people VALUES (1, 'Ada'), (2, 'Brian');",
    )
    .await
    .expect("tables");
}

fn names(rows: &[Person]) -> Vec<&str> {
    rows.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn every_part_names_a_renamed_table_the_same_way() {
    assert_eq!(<Person as MemClone>::table(), "people");
    assert_eq!(diesel_memclone::table_name(&persons::table), "people");
    assert_eq!(<Entry as MemClone>::table(), "ledger");
    assert_eq!(<Person as CacheValue>::key_columns(), ["person_id"]);
}

/// The reported case: `memclone::update` of a renamed table left `find_cached` stale.
async fn update_of_a_renamed_table(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    people(&mut conn).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);

    let (ada, misses) = counted!(
        counter,
        cache.find::<Person, _>(&mut conn, 1).await.unwrap()
    );
    assert_eq!((ada.name.as_str(), misses), ("Ada", 1));
    let all = || {
        persons::table
            .order(persons::id)
            .cached("people")
            .using(&cache)
    };
    let (rows, misses) = counted!(counter, all().load::<Person, _>(&mut conn).await.unwrap());
    assert_eq!((names(&rows), misses), (vec!["Ada", "Brian"], 1));
    let (_, hits) = counted!(
        counter,
        cache.find::<Person, _>(&mut conn, 1).await.unwrap()
    );
    assert_eq!(hits, 0, "the second find is a hit");

    diesel_memclone::update(persons::table.find(1))
        .set(persons::name.eq("Ada L."))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (ada, refills) = counted!(
        counter,
        cache.find::<Person, _>(&mut conn, 1).await.unwrap()
    );
    assert_eq!(
        (ada.name.as_str(), refills),
        ("Ada L.", 1),
        "the row was evicted"
    );
    let (rows, refills) = counted!(counter, all().load::<Person, _>(&mut conn).await.unwrap());
    assert_eq!((names(&rows), refills), (vec!["Ada L.", "Brian"], 1));

    // A write that returns the row writes it through under the name the derive uses.
    let brian: Person = diesel_memclone::update(persons::table.find(2))
        .set(persons::name.eq("Brian K."))
        .map(|s| s.returning(persons::all_columns))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(brian.name, "Brian K.");
    let (found, queries) = counted!(
        counter,
        cache.find::<Person, _>(&mut conn, 2).await.unwrap()
    );
    assert_eq!(found.name, "Brian K.");
    assert!(queries <= 1, "written through or refilled, never stale");

    // `memclone::write` on a Diesel statement reads the same name from its SQL.
    diesel_memclone::write(diesel::delete(persons::table.find(2)))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let gone = cache
        .find_optional::<Person, _>(&mut conn, 2)
        .await
        .unwrap();
    assert_eq!(gone, None, "the deleted row is not served");
}

/// An update that assigns a renamed key column moves the row: the old key must not be served.
async fn key_change_through_a_renamed_key_column(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    people(&mut conn).await;
    assert_eq!(
        cache.find::<Person, _>(&mut conn, 1).await.unwrap().name,
        "Ada"
    );
    let moved: Vec<Person> = diesel_memclone::update(persons::table.find(1))
        .set(persons::id.eq(10))
        .map(|s| s.returning(persons::all_columns))
        .using(&cache)
        .get_results(&mut conn)
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    let old = cache
        .find_optional::<Person, _>(&mut conn, 1)
        .await
        .unwrap();
    assert_eq!(old, None, "row 1 moved to 10; its old entry must be gone");
    assert_eq!(
        cache.find::<Person, _>(&mut conn, 10).await.unwrap().name,
        "Ada"
    );
}

/// Raw SQL that contains ` -- binds: ` (what `debug_query` prints before the binds): the tables
/// after it are still dependencies.
async fn raw_sql_with_the_bind_marker(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    people(&mut conn).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let decorated = || {
        diesel::sql_query(
            "SELECT p.person_id AS id, p.full_name AS name FROM people p /* -- binds: [] */ \
             WHERE p.person_id IN (SELECT b.person_id FROM badges b) ORDER BY p.person_id",
        )
        .cached("decorated")
        .using(&cache)
    };
    let (rows, misses) = counted!(
        counter,
        decorated().load::<Named, _>(&mut conn).await.unwrap()
    );
    assert_eq!((rows.len(), misses), (0, 1));
    let (_, hits) = counted!(
        counter,
        decorated().load::<Named, _>(&mut conn).await.unwrap()
    );
    assert_eq!(hits, 0);

    diesel_memclone::insert_into(badges::table)
        .values((badges::id.eq(1), badges::person_id.eq(2)))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (rows, refills) = counted!(
        counter,
        decorated().load::<Named, _>(&mut conn).await.unwrap()
    );
    assert_eq!(
        (rows, refills),
        (
            vec![Named {
                id: 2,
                name: "Brian".into()
            }],
            1
        ),
        "a write to the table after the marker invalidates the read"
    );

    // The same marker inside a raw write: the written table is still found.
    diesel_memclone::write(diesel::sql_query(
        "DELETE FROM badges /* -- binds: [] */ WHERE id = 1",
    ))
    .using(&cache)
    .execute(&mut conn)
    .await
    .unwrap();
    let (rows, refills) = counted!(
        counter,
        decorated().load::<Named, _>(&mut conn).await.unwrap()
    );
    assert_eq!((rows.len(), refills), (0, 1));
}

on_every_store!(update_of_a_renamed_table: renamed_table_redis, renamed_table_cluster, renamed_table_memory);
on_every_store!(key_change_through_a_renamed_key_column: renamed_key_redis, renamed_key_cluster, renamed_key_memory);
on_every_store!(raw_sql_with_the_bind_marker: bind_marker_redis, bind_marker_cluster, bind_marker_memory);

/// A table in a schema other than the connection's search path (`schema.table` in `table!`).
#[tokio::test]
async fn a_table_in_another_schema() {
    let setup = unique("elsewhere");
    let (Some(mut conn), Some(store)) = (postgres(&setup).await, redis_store().await) else {
        return;
    };
    // `table!` needs a fixed schema name; this is the only test that uses it.
    conn.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS memclone_elsewhere;
         DROP TABLE IF EXISTS memclone_elsewhere.ledger;
         CREATE TABLE memclone_elsewhere.ledger (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL);
         INSERT INTO memclone_elsewhere.ledger VALUES (1, 100);",
    )
    .await
    .unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("elsewhere"))
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let (entry, misses) = counted!(counter, cache.find::<Entry, _>(&mut conn, 1).await.unwrap());
    assert_eq!((entry.amount, misses), (100, 1));
    let (_, hits) = counted!(counter, cache.find::<Entry, _>(&mut conn, 1).await.unwrap());
    assert_eq!(hits, 0);
    let all = || {
        ledger::table
            .order(ledger::id)
            .cached("ledger")
            .using(&cache)
    };
    let (rows, misses) = counted!(counter, all().load::<Entry, _>(&mut conn).await.unwrap());
    assert_eq!((rows.len(), misses), (1, 1));

    diesel_memclone::update(ledger::table.find(1))
        .set(ledger::amount.eq(250))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (entry, refills) = counted!(counter, cache.find::<Entry, _>(&mut conn, 1).await.unwrap());
    assert_eq!((entry.amount, refills), (250, 1));
    let (rows, refills) = counted!(counter, all().load::<Entry, _>(&mut conn).await.unwrap());
    assert_eq!((rows[0].amount, refills), (250, 1));
    conn.batch_execute("DROP TABLE memclone_elsewhere.ledger")
        .await
        .unwrap();
}

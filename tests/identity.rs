//! A cached query's identity on PostgreSQL, MariaDB and SQLite: every query that can answer
//! differently has its own entry (binds that differ by a quote, a NULL, a list's length, a bind
//! type; boxed queries whose SQL differs under one type), and the sync and async APIs read the
//! same entry for the same query.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Float, Integer, Text};
use diesel_memclone::{Cache, CacheValue, CachedDsl};
use diesel_memclone_tests::{mysql, mysql_sync_again, postgres, postgres_url, unique};
use serde::{Deserialize, Serialize};

#[allow(missing_docs)]
mod schema {
    diesel::table! {
        idents (id) {
            id -> Integer,
            name -> Text,
            nick -> Nullable<Text>,
        }
    }
}
use schema::idents;

const NAMES: [&str; 5] = ["it's", "it\"s", "its", "", "it's -- binds: [\"x\"]"];

/// The rows: a name of each of [`NAMES`], and nicks that are NULL, empty, the text `NULL`.
fn rows() -> String {
    let nicks = ["NULL", "''", "'x'", "'NULL'", "NULL"];
    let values: Vec<String> = NAMES
        .iter()
        .zip(nicks)
        .enumerate()
        .map(|(i, (name, nick))| {
            let name = name.replace('\'', "''");
            format!("({}, '{name}', {nick})", i + 1)
        })
        .collect();
    format!("INSERT INTO idents VALUES {};", values.join(", "))
}

/// A row of a raw statement.
#[derive(Debug, PartialEq, QueryableByName, Serialize, Deserialize, CacheValue)]
struct Raw {
    #[diesel(sql_type = Text)]
    t: String,
}

/// A number of a raw statement.
#[derive(Debug, PartialEq, QueryableByName, Serialize, Deserialize, CacheValue)]
struct Number {
    #[diesel(sql_type = Double)]
    v: f64,
}

/// Reads the query `$make` builds (ids) from the cache, async then sync, and checks both against
/// Diesel's own answer: one miss (a new entry), then hits.
macro_rules! same_answers {
    ($cache:expr, $conn:expr, $sync_conn:expr, $make:expr) => {{
        let cache: &Cache = $cache;
        let make = $make;
        let direct: Vec<i32> = diesel_async::RunQueryDsl::load(make(), $conn)
            .await
            .unwrap();
        let before = cache.stats();
        for _ in 0..2 {
            let cached: Vec<i32> = CachedDsl::cached(make(), "ids")
                .using(cache)
                .load($conn)
                .await
                .unwrap();
            assert_eq!(cached, direct, "{}", stringify!($make));
        }
        let synced: Vec<i32> = diesel_memclone::sync::CachedDsl::cached(make(), "ids")
            .using(cache)
            .load($sync_conn)
            .unwrap();
        assert_eq!(synced, direct, "sync: {}", stringify!($make));
        let after = cache.stats();
        assert_eq!(
            (after.misses - before.misses, after.hits - before.hits),
            (1, 2),
            "its own entry, read again by both APIs: {}",
            stringify!($make)
        );
    }};
}

/// Every query below on one cache, `$conn` and `$sync_conn` on one database of backend `$db`.
macro_rules! one_entry_per_query {
    ($db:ty, $conn:expr, $sync_conn:expr) => {{
        let cache = Cache::in_memory();
        let (conn, sync_conn) = ($conn, $sync_conn);
        for name in NAMES {
            let query = || {
                idents::table
                    .filter(idents::name.eq(name))
                    .select(idents::id)
            };
            same_answers!(&cache, conn, sync_conn, query);
        }
        for nick in [None, Some(""), Some("NULL"), Some("x")] {
            let query = || {
                idents::table
                    .filter(idents::nick.eq(nick))
                    .select(idents::id)
                    .order(idents::id)
            };
            same_answers!(&cache, conn, sync_conn, query);
        }
        for ids in [vec![1], vec![1, 2], vec![1, 2, 3], vec![], vec![3]] {
            let query = || {
                idents::table
                    .filter(idents::id.eq_any(ids.clone()))
                    .select(idents::id)
                    .order(idents::id)
            };
            same_answers!(&cache, conn, sync_conn, query);
        }
        // One type, three SQL texts, one bind.
        for which in 0..3 {
            let query = || {
                let query = idents::table
                    .select(idents::id)
                    .order(idents::id)
                    .into_boxed::<$db>();
                match which {
                    0 => query.filter(idents::name.eq("its")),
                    1 => query.filter(idents::nick.eq("its")),
                    _ => query.filter(idents::name.ne("its")),
                }
            };
            same_answers!(&cache, conn, sync_conn, query);
        }
    }};
}

/// `SELECT <bind> AS v` of a `Float` 0.1 and a `Double` 0.1 (which `Debug` lists alike): two
/// values, two entries.
macro_rules! float_and_double {
    ($conn:expr, $sql:expr) => {{
        let cache = Cache::in_memory();
        let conn = $conn;
        let float: Number = diesel::sql_query($sql)
            .bind::<Float, _>(0.1_f32)
            .cached("v")
            .using(&cache)
            .get_result(conn)
            .await
            .unwrap();
        let double: Number = diesel::sql_query($sql)
            .bind::<Double, _>(0.1_f64)
            .cached("v")
            .using(&cache)
            .get_result(conn)
            .await
            .unwrap();
        assert_eq!(float.v, f64::from(0.1_f32));
        assert_eq!(double.v, 0.1);
        assert_eq!(cache.stats().misses, 2);
    }};
}

fn postgres_sync_again(schema: &str) -> diesel::PgConnection {
    let mut conn = diesel::PgConnection::establish(&postgres_url()).expect("connect");
    conn.batch_execute(&format!("SET search_path TO {schema}"))
        .expect("search_path");
    conn
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_queries_have_one_entry_each() {
    let schema = unique("ident");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut conn,
        &format!(
            "CREATE TABLE idents (id INTEGER PRIMARY KEY, name TEXT NOT NULL, nick TEXT); {}",
            rows()
        ),
    )
    .await
    .unwrap();
    let mut sync_conn = postgres_sync_again(&schema);
    one_entry_per_query!(diesel::pg::Pg, &mut conn, &mut sync_conn);
    float_and_double!(&mut conn, "SELECT ($1)::float8 AS v");

    // An `Int4` 1 and an `Int8` 1: PostgreSQL sees two types.
    let cache = Cache::in_memory();
    let sql = "SELECT pg_typeof($1)::text AS t";
    let int4: Raw = diesel::sql_query(sql)
        .bind::<Integer, _>(1)
        .cached("t")
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    let int8: Raw = diesel::sql_query(sql)
        .bind::<BigInt, _>(1_i64)
        .cached("t")
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!((int4.t.as_str(), int8.t.as_str()), ("integer", "bigint"));
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_queries_have_one_entry_each() {
    let database = unique("ident");
    let Some(mut conn) = mysql(&database).await else {
        return;
    };
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut conn,
        &format!(
            "CREATE TABLE idents (id INTEGER PRIMARY KEY, name VARCHAR(255) NOT NULL, nick VARCHAR(255)); {}",
            rows()
        ),
    )
    .await
    .unwrap();
    let mut sync_conn = mysql_sync_again(&database);
    one_entry_per_query!(diesel::mysql::Mysql, &mut conn, &mut sync_conn);
    float_and_double!(&mut conn, "SELECT ? + 0e0 AS v");
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_queries_have_one_entry_each() {
    use diesel_async::AsyncConnection;
    let path = std::env::temp_dir().join(format!("{}.db", unique("ident")));
    let url = path.to_str().unwrap().to_owned();
    let mut sync_conn = diesel::SqliteConnection::establish(&url).unwrap();
    sync_conn
        .batch_execute(&format!(
            "CREATE TABLE idents (id INTEGER PRIMARY KEY, name TEXT NOT NULL, nick TEXT); {}",
            rows()
        ))
        .unwrap();
    let mut conn = diesel_memclone_tests::SqliteConn::establish(&url)
        .await
        .unwrap();
    one_entry_per_query!(diesel::sqlite::Sqlite, &mut conn, &mut sync_conn);
    float_and_double!(&mut conn, "SELECT ? AS v");
    drop((conn, sync_conn));
    let _ = std::fs::remove_file(path);
}

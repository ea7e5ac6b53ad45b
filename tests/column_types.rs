//! Every column type Diesel maps, on each backend that has it, is served from the cache on the
//! second read: chrono and time types, uuid, JSON and JSONB (`serde_json::Value`, and a user
//! type stored as JSONB), NUMERIC (`bigdecimal::BigDecimal`), inet and cidr (ipnetwork and
//! ipnet), arrays, custom enums (a PostgreSQL ENUM and a text column), bytes, and `Option` of
//! each. Proven by counting database statements: the second read runs none.
//!
//! A type whose values read back in no encoding is not cached, and says so once, by name.

use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::prelude::*;
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::Text;
use diesel_async::SimpleAsyncConnection;
use diesel_memclone::prelude::*;
use diesel_memclone::{Cache, RowKey};
use diesel_memclone_tests::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

#[allow(missing_docs)]
mod schema {
    /// The PostgreSQL ENUM type `mood`.
    #[derive(diesel::sql_types::SqlType, diesel::query_builder::QueryId)]
    #[diesel(postgres_type(name = "mood"))]
    pub struct MoodSql;

    diesel::table! {
        use diesel::sql_types::*;
        use super::MoodSql;

        pg_values (id) {
            id -> Integer,
            small -> SmallInt,
            big -> BigInt,
            real -> Float,
            double -> Double,
            flag -> Bool,
            txt -> Text,
            ts -> Timestamp,
            tstz -> Timestamptz,
            day -> Date,
            clock -> Time,
            span -> Interval,
            t_ts -> Timestamp,
            t_tstz -> Timestamptz,
            t_day -> Date,
            t_clock -> Time,
            uid -> Uuid,
            doc -> Jsonb,
            doc_json -> Json,
            settings -> Jsonb,
            amount -> Numeric,
            addr -> Inet,
            net -> Cidr,
            addr_ipnet -> Inet,
            nums -> Array<Int4>,
            tags -> Array<Text>,
            mood -> MoodSql,
            level -> Text,
            data -> Bytea,
        }
    }

    diesel::table! {
        use diesel::sql_types::*;
        use super::MoodSql;

        pg_optionals (id) {
            id -> Integer,
            small -> Nullable<SmallInt>,
            big -> Nullable<BigInt>,
            real -> Nullable<Float>,
            double -> Nullable<Double>,
            flag -> Nullable<Bool>,
            txt -> Nullable<Text>,
            ts -> Nullable<Timestamp>,
            tstz -> Nullable<Timestamptz>,
            day -> Nullable<Date>,
            clock -> Nullable<Time>,
            span -> Nullable<Interval>,
            t_ts -> Nullable<Timestamp>,
            t_tstz -> Nullable<Timestamptz>,
            t_day -> Nullable<Date>,
            t_clock -> Nullable<Time>,
            uid -> Nullable<Uuid>,
            doc -> Nullable<Jsonb>,
            doc_json -> Nullable<Json>,
            settings -> Nullable<Jsonb>,
            amount -> Nullable<Numeric>,
            addr -> Nullable<Inet>,
            net -> Nullable<Cidr>,
            addr_ipnet -> Nullable<Inet>,
            nums -> Nullable<Array<Int4>>,
            tags -> Nullable<Array<Text>>,
            mood -> Nullable<MoodSql>,
            level -> Nullable<Text>,
            data -> Nullable<Bytea>,
        }
    }

    diesel::table! {
        my_values (id) {
            id -> Integer,
            small -> SmallInt,
            big -> BigInt,
            tiny -> TinyInt,
            unsigned -> Unsigned<Integer>,
            real -> Float,
            double -> Double,
            flag -> Bool,
            txt -> Text,
            ts -> Datetime,
            stamp -> Timestamp,
            day -> Date,
            clock -> Time,
            t_ts -> Datetime,
            t_stamp -> Timestamp,
            t_day -> Date,
            t_clock -> Time,
            amount -> Numeric,
            doc -> Json,
            level -> Text,
            data -> Blob,
        }
    }

    diesel::table! {
        my_optionals (id) {
            id -> Integer,
            small -> Nullable<SmallInt>,
            big -> Nullable<BigInt>,
            tiny -> Nullable<TinyInt>,
            unsigned -> Nullable<Unsigned<Integer>>,
            real -> Nullable<Float>,
            double -> Nullable<Double>,
            flag -> Nullable<Bool>,
            txt -> Nullable<Text>,
            ts -> Nullable<Datetime>,
            stamp -> Nullable<Timestamp>,
            day -> Nullable<Date>,
            clock -> Nullable<Time>,
            t_ts -> Nullable<Datetime>,
            t_stamp -> Nullable<Timestamp>,
            t_day -> Nullable<Date>,
            t_clock -> Nullable<Time>,
            amount -> Nullable<Numeric>,
            doc -> Nullable<Json>,
            level -> Nullable<Text>,
            data -> Nullable<Blob>,
        }
    }

    diesel::table! {
        lite_values (id) {
            id -> Integer,
            small -> SmallInt,
            big -> BigInt,
            real -> Float,
            double -> Double,
            flag -> Bool,
            txt -> Text,
            ts -> Timestamp,
            tstz -> TimestamptzSqlite,
            day -> Date,
            clock -> Time,
            t_ts -> Timestamp,
            t_tstz -> TimestamptzSqlite,
            t_day -> Date,
            t_clock -> Time,
            doc -> Json,
            docb -> Jsonb,
            amount -> Numeric,
            level -> Text,
            data -> Binary,
        }
    }

    diesel::table! {
        lite_optionals (id) {
            id -> Integer,
            small -> Nullable<SmallInt>,
            big -> Nullable<BigInt>,
            real -> Nullable<Float>,
            double -> Nullable<Double>,
            flag -> Nullable<Bool>,
            txt -> Nullable<Text>,
            ts -> Nullable<Timestamp>,
            tstz -> Nullable<TimestamptzSqlite>,
            day -> Nullable<Date>,
            clock -> Nullable<Time>,
            t_ts -> Nullable<Timestamp>,
            t_tstz -> Nullable<TimestamptzSqlite>,
            t_day -> Nullable<Date>,
            t_clock -> Nullable<Time>,
            doc -> Nullable<Json>,
            docb -> Nullable<Jsonb>,
            amount -> Nullable<Numeric>,
            level -> Nullable<Text>,
            data -> Nullable<Binary>,
        }
    }

    diesel::table! {
        accounts (id) {
            id -> Integer,
            name -> Text,
            secret -> Text,
        }
    }
}

use schema::{
    accounts, lite_optionals, lite_values, my_optionals, my_values, pg_optionals, pg_values,
    MoodSql,
};

// ---------------------------------------------------------------------------------------------
// Custom column types.

/// A PostgreSQL ENUM, mapped to a Rust enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AsExpression, FromSqlRow)]
#[diesel(sql_type = MoodSql)]
enum Mood {
    Happy,
    Sad,
}

impl ToSql<MoodSql, diesel::pg::Pg> for Mood {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, diesel::pg::Pg>) -> serialize::Result {
        out.write_all(match self {
            Mood::Happy => b"happy",
            Mood::Sad => b"sad",
        })?;
        Ok(IsNull::No)
    }
}

impl FromSql<MoodSql, diesel::pg::Pg> for Mood {
    fn from_sql(value: diesel::pg::PgValue<'_>) -> deserialize::Result<Self> {
        match value.as_bytes() {
            b"happy" => Ok(Mood::Happy),
            b"sad" => Ok(Mood::Sad),
            other => Err(format!("unknown mood {other:?}").into()),
        }
    }
}

/// A text column mapped to a Rust enum, on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "lowercase")]
enum Level {
    Low,
    High,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::High => "high",
        }
    }
}

impl<DB> ToSql<Text, DB> for Level
where
    DB: diesel::backend::Backend,
    str: ToSql<Text, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
        self.as_str().to_sql(out)
    }
}

impl<DB> FromSql<Text, DB> for Level
where
    DB: diesel::backend::Backend,
    String: FromSql<Text, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        match String::from_sql(bytes)?.as_str() {
            "low" => Ok(Level::Low),
            "high" => Ok(Level::High),
            other => Err(format!("unknown level {other:?}").into()),
        }
    }
}

/// A user type stored as JSONB: an internally tagged enum and flattened extra keys, which
/// serde reads back only from a self-describing format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, AsExpression, FromSqlRow)]
#[diesel(sql_type = diesel::sql_types::Jsonb)]
struct Settings {
    theme: Theme,
    #[serde(flatten)]
    extra: BTreeMap<String, Value>,
}

/// Internally tagged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
enum Theme {
    Light,
    Dark { contrast: u8 },
}

impl ToSql<diesel::sql_types::Jsonb, diesel::pg::Pg> for Settings {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, diesel::pg::Pg>) -> serialize::Result {
        out.write_all(&[1])?; // JSONB's binary format version
        serde_json::to_writer(out, self)?;
        Ok(IsNull::No)
    }
}

impl FromSql<diesel::sql_types::Jsonb, diesel::pg::Pg> for Settings {
    fn from_sql(value: diesel::pg::PgValue<'_>) -> deserialize::Result<Self> {
        let json = <Value as FromSql<diesel::sql_types::Jsonb, diesel::pg::Pg>>::from_sql(value)?;
        Ok(serde_json::from_value(json)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Values.

fn chrono_ts() -> chrono::NaiveDateTime {
    chrono::NaiveDate::from_ymd_opt(2024, 2, 29)
        .unwrap()
        .and_hms_micro_opt(13, 14, 15, 123_456)
        .unwrap()
}

fn chrono_utc() -> chrono::DateTime<chrono::Utc> {
    chrono_ts().and_utc()
}

fn time_ts() -> time::PrimitiveDateTime {
    time::macros::datetime!(2023-12-31 23:59:58.654321)
}

fn time_utc() -> time::OffsetDateTime {
    time_ts().assume_utc()
}

fn doc() -> Value {
    json!({"name": "Ada", "tags": ["x", "y"], "score": 1.5, "nested": {"ok": true, "none": null}, "n": -7})
}

fn amount() -> bigdecimal::BigDecimal {
    bigdecimal::BigDecimal::from_str("12345.678900").unwrap()
}

fn settings() -> Settings {
    Settings {
        theme: Theme::Dark { contrast: 7 },
        extra: BTreeMap::from([
            ("font".to_owned(), json!("mono")),
            ("size".into(), json!(12)),
        ]),
    }
}

/// Reads `$read` twice: the first runs one statement, the second none (a hit); both give
/// `$expected`.
macro_rules! hits_on_second_read {
    ($counter:expr, $expected:expr, $read:expr) => {{
        let expected = $expected;
        let (first, statements) = counted!($counter, $read);
        assert_eq!(first, expected, "first read of {}", stringify!($read));
        assert_eq!(statements, 1, "the first read goes to the database");
        let (second, statements) = counted!($counter, $read);
        assert_eq!(second, expected, "second read of {}", stringify!($read));
        assert_eq!(
            statements,
            0,
            "the second read is a hit: {}",
            stringify!($read)
        );
    }};
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL.

#[derive(Debug, Clone, PartialEq, Queryable, Insertable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = pg_values)]
struct PgValues {
    id: i32,
    small: i16,
    big: i64,
    real: f32,
    double: f64,
    flag: bool,
    txt: String,
    ts: chrono::NaiveDateTime,
    tstz: chrono::DateTime<chrono::Utc>,
    day: chrono::NaiveDate,
    clock: chrono::NaiveTime,
    span: chrono::TimeDelta,
    t_ts: time::PrimitiveDateTime,
    t_tstz: time::OffsetDateTime,
    t_day: time::Date,
    t_clock: time::Time,
    uid: uuid::Uuid,
    doc: Value,
    doc_json: Value,
    settings: Settings,
    amount: bigdecimal::BigDecimal,
    addr: ipnetwork::IpNetwork,
    net: ipnetwork::IpNetwork,
    addr_ipnet: ipnet::IpNet,
    nums: Vec<i32>,
    tags: Vec<String>,
    mood: Mood,
    level: Level,
    data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Queryable, Insertable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = pg_optionals)]
struct PgOptionals {
    id: i32,
    small: Option<i16>,
    big: Option<i64>,
    real: Option<f32>,
    double: Option<f64>,
    flag: Option<bool>,
    txt: Option<String>,
    ts: Option<chrono::NaiveDateTime>,
    tstz: Option<chrono::DateTime<chrono::Utc>>,
    day: Option<chrono::NaiveDate>,
    clock: Option<chrono::NaiveTime>,
    span: Option<chrono::TimeDelta>,
    t_ts: Option<time::PrimitiveDateTime>,
    t_tstz: Option<time::OffsetDateTime>,
    t_day: Option<time::Date>,
    t_clock: Option<time::Time>,
    uid: Option<uuid::Uuid>,
    doc: Option<Value>,
    doc_json: Option<Value>,
    settings: Option<Settings>,
    amount: Option<bigdecimal::BigDecimal>,
    addr: Option<ipnetwork::IpNetwork>,
    net: Option<ipnetwork::IpNetwork>,
    addr_ipnet: Option<ipnet::IpNet>,
    nums: Option<Vec<i32>>,
    tags: Option<Vec<String>>,
    mood: Option<Mood>,
    level: Option<Level>,
    data: Option<Vec<u8>>,
}

/// A selection of columns, with `#[derive(CacheValue)]`: fields that are no `CacheValue`
/// themselves (dates, uuid, JSON, NUMERIC, enums).
#[derive(Debug, Clone, PartialEq, Queryable, Serialize, Deserialize, CacheValue)]
struct PgStamped {
    id: i32,
    ts: chrono::NaiveDateTime,
    t_tstz: time::OffsetDateTime,
    uid: uuid::Uuid,
    doc: Value,
    amount: bigdecimal::BigDecimal,
    addr: ipnetwork::IpNetwork,
    mood: Mood,
    level: Option<Level>,
}

fn pg_values(id: i32) -> PgValues {
    PgValues {
        id,
        small: -12,
        big: 1 << 40,
        real: 1.25,
        double: -2.5e-3,
        flag: true,
        txt: "text ü".into(),
        ts: chrono_ts(),
        tstz: chrono_utc(),
        day: chrono_ts().date(),
        clock: chrono_ts().time(),
        span: chrono::TimeDelta::seconds(3_723) + chrono::TimeDelta::microseconds(5),
        t_ts: time_ts(),
        t_tstz: time_utc(),
        t_day: time_ts().date(),
        t_clock: time_ts().time(),
        uid: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef + id as u128),
        doc: doc(),
        doc_json: json!([1, "two", {"three": 3}]),
        settings: settings(),
        amount: amount(),
        addr: "192.168.1.7/24".parse().unwrap(),
        net: "2001:db8::/32".parse().unwrap(),
        addr_ipnet: "10.1.2.3/8".parse().unwrap(),
        nums: vec![3, -1, 4],
        tags: vec!["a".into(), "b c".into()],
        mood: Mood::Sad,
        level: Level::High,
        data: vec![0, 1, 255, 128],
    }
}

fn pg_some(id: i32) -> PgOptionals {
    let v = pg_values(id);
    PgOptionals {
        id,
        small: Some(v.small),
        big: Some(v.big),
        real: Some(v.real),
        double: Some(v.double),
        flag: Some(v.flag),
        txt: Some(v.txt),
        ts: Some(v.ts),
        tstz: Some(v.tstz),
        day: Some(v.day),
        clock: Some(v.clock),
        span: Some(v.span),
        t_ts: Some(v.t_ts),
        t_tstz: Some(v.t_tstz),
        t_day: Some(v.t_day),
        t_clock: Some(v.t_clock),
        uid: Some(v.uid),
        doc: Some(v.doc),
        doc_json: Some(v.doc_json),
        settings: Some(v.settings),
        amount: Some(v.amount),
        addr: Some(v.addr),
        net: Some(v.net),
        addr_ipnet: Some(v.addr_ipnet),
        nums: Some(v.nums),
        tags: Some(v.tags),
        mood: Some(v.mood),
        level: Some(v.level),
        data: Some(v.data),
    }
}

fn pg_none(id: i32) -> PgOptionals {
    PgOptionals {
        id,
        small: None,
        big: None,
        real: None,
        double: None,
        flag: None,
        txt: None,
        ts: None,
        tstz: None,
        day: None,
        clock: None,
        span: None,
        t_ts: None,
        t_tstz: None,
        t_day: None,
        t_clock: None,
        uid: None,
        doc: None,
        doc_json: None,
        settings: None,
        amount: None,
        addr: None,
        net: None,
        addr_ipnet: None,
        nums: None,
        tags: None,
        mood: None,
        level: None,
        data: None,
    }
}

const PG_COLUMNS: &str = "
    small SMALLINT{n}, big BIGINT{n}, real REAL{n}, double DOUBLE PRECISION{n}, flag BOOLEAN{n},
    txt TEXT{n}, ts TIMESTAMP{n}, tstz TIMESTAMPTZ{n}, day DATE{n}, clock TIME{n}, span INTERVAL{n},
    t_ts TIMESTAMP{n}, t_tstz TIMESTAMPTZ{n}, t_day DATE{n}, t_clock TIME{n}, uid UUID{n},
    doc JSONB{n}, doc_json JSON{n}, settings JSONB{n}, amount NUMERIC(20, 6){n}, addr INET{n},
    net CIDR{n}, addr_ipnet INET{n}, nums INT4[]{n}, tags TEXT[]{n}, mood mood{n}, level TEXT{n},
    data BYTEA{n}";

async fn pg_tables(conn: &mut diesel_async::AsyncPgConnection) {
    let not_null = PG_COLUMNS.replace("{n}", " NOT NULL");
    let nullable = PG_COLUMNS.replace("{n}", "");
    conn.batch_execute(&format!(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE TABLE pg_values (id INTEGER PRIMARY KEY, {not_null});
         CREATE TABLE pg_optionals (id INTEGER PRIMARY KEY, {nullable});"
    ))
    .await
    .expect("create the PostgreSQL tables");
}

/// Every PostgreSQL column type through `cache`: query loads, entity reads, a derived value.
async fn pg_reads(cache: &Cache, conn: &mut diesel_async::AsyncPgConnection) {
    let counter = QueryCounter::default();
    counter.attach(conn);
    hits_on_second_read!(
        counter,
        vec![pg_values(1), pg_values(2)],
        pg_values::table
            .order(pg_values::id)
            .cached("all")
            .using(cache)
            .load::<PgValues, _>(conn)
            .await
            .unwrap()
    );
    hits_on_second_read!(
        counter,
        pg_values(2),
        cache.find::<PgValues, _>(conn, 2).await.unwrap()
    );
    hits_on_second_read!(
        counter,
        vec![pg_some(1), pg_none(2)],
        pg_optionals::table
            .order(pg_optionals::id)
            .cached("all")
            .using(cache)
            .load::<PgOptionals, _>(conn)
            .await
            .unwrap()
    );
    for row in [pg_some(1), pg_none(2)] {
        hits_on_second_read!(
            counter,
            row.clone(),
            cache.find::<PgOptionals, _>(conn, row.id).await.unwrap()
        );
    }
    let v = pg_values(1);
    hits_on_second_read!(
        counter,
        vec![PgStamped {
            id: 1,
            ts: v.ts,
            t_tstz: v.t_tstz,
            uid: v.uid,
            doc: v.doc,
            amount: v.amount,
            addr: v.addr,
            mood: v.mood,
            level: Some(v.level),
        }],
        pg_values::table
            .filter(pg_values::id.eq(1))
            .select((
                pg_values::id,
                pg_values::ts,
                pg_values::t_tstz,
                pg_values::uid,
                pg_values::doc,
                pg_values::amount,
                pg_values::addr,
                pg_values::mood,
                pg_values::level.nullable(),
            ))
            .cached("stamped")
            .using(cache)
            .load::<PgStamped, _>(conn)
            .await
            .unwrap()
    );
    assert_eq!(cache.stats().corrupt_entries, 0, "{:?}", cache.stats());
}

#[tokio::test]
async fn postgres_column_types_hit_on_the_second_read() {
    let schema = unique("types");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    pg_tables(&mut conn).await;
    let cache = Cache::builder().namespace(unique("types")).build().unwrap();
    for row in [pg_values(1), pg_values(2)] {
        diesel_memclone::insert_into(pg_values::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    for row in [pg_some(1), pg_none(2)] {
        diesel_memclone::insert_into(pg_optionals::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    // The in-process store.
    pg_reads(&cache, &mut conn).await;
    // Redis.
    if let Some(store) = redis_store().await {
        let redis = Cache::builder()
            .store(store)
            .namespace(unique("types"))
            .build()
            .unwrap();
        pg_reads(&redis, &mut conn).await;
    }
    // `Model::find_cached`, on the process-wide cache.
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    hits_on_second_read!(
        counter,
        pg_values(1),
        PgValues::find_cached(&mut conn, 1).await.unwrap()
    );
    hits_on_second_read!(
        counter,
        pg_some(1),
        PgOptionals::find_cached(&mut conn, 1).await.unwrap()
    );
    hits_on_second_read!(
        counter,
        pg_none(2),
        PgOptionals::find_cached(&mut conn, 2).await.unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// MariaDB / MySQL.

#[derive(Debug, Clone, PartialEq, Queryable, Insertable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = my_values)]
struct MyValues {
    id: i32,
    small: i16,
    big: i64,
    tiny: i8,
    unsigned: u32,
    real: f32,
    double: f64,
    flag: bool,
    txt: String,
    ts: chrono::NaiveDateTime,
    stamp: chrono::NaiveDateTime,
    day: chrono::NaiveDate,
    clock: chrono::NaiveTime,
    t_ts: time::OffsetDateTime,
    t_stamp: time::PrimitiveDateTime,
    t_day: time::Date,
    t_clock: time::Time,
    amount: bigdecimal::BigDecimal,
    doc: Value,
    level: Level,
    data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Queryable, Insertable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = my_optionals)]
struct MyOptionals {
    id: i32,
    small: Option<i16>,
    big: Option<i64>,
    tiny: Option<i8>,
    unsigned: Option<u32>,
    real: Option<f32>,
    double: Option<f64>,
    flag: Option<bool>,
    txt: Option<String>,
    ts: Option<chrono::NaiveDateTime>,
    stamp: Option<chrono::NaiveDateTime>,
    day: Option<chrono::NaiveDate>,
    clock: Option<chrono::NaiveTime>,
    t_ts: Option<time::OffsetDateTime>,
    t_stamp: Option<time::PrimitiveDateTime>,
    t_day: Option<time::Date>,
    t_clock: Option<time::Time>,
    amount: Option<bigdecimal::BigDecimal>,
    doc: Option<Value>,
    level: Option<Level>,
    data: Option<Vec<u8>>,
}

/// A selection with `#[derive(CacheValue)]`.
#[derive(Debug, Clone, PartialEq, Queryable, Serialize, Deserialize, CacheValue)]
struct MyStamped {
    id: i32,
    ts: chrono::NaiveDateTime,
    amount: bigdecimal::BigDecimal,
    doc: Value,
    level: Level,
}

fn my_values(id: i32) -> MyValues {
    MyValues {
        id,
        small: -12,
        big: 1 << 40,
        tiny: -5,
        unsigned: 4_000_000_000,
        real: 1.25,
        double: -2.5e-3,
        flag: true,
        txt: "text ü".into(),
        ts: chrono_ts(),
        stamp: chrono_ts(),
        day: chrono_ts().date(),
        clock: chrono_ts().time(),
        t_ts: time_utc(),
        t_stamp: time_ts(),
        t_day: time_ts().date(),
        // Diesel reads a MySQL TIME into `time::Time` without its fraction of a second.
        t_clock: time::macros::time!(23:59:58),
        amount: amount(),
        doc: doc(),
        level: Level::Low,
        data: vec![0, 1, 255, 128],
    }
}

fn my_some(id: i32) -> MyOptionals {
    let v = my_values(id);
    MyOptionals {
        id,
        small: Some(v.small),
        big: Some(v.big),
        tiny: Some(v.tiny),
        unsigned: Some(v.unsigned),
        real: Some(v.real),
        double: Some(v.double),
        flag: Some(v.flag),
        txt: Some(v.txt),
        ts: Some(v.ts),
        stamp: Some(v.stamp),
        day: Some(v.day),
        clock: Some(v.clock),
        t_ts: Some(v.t_ts),
        t_stamp: Some(v.t_stamp),
        t_day: Some(v.t_day),
        t_clock: Some(v.t_clock),
        amount: Some(v.amount),
        doc: Some(v.doc),
        level: Some(v.level),
        data: Some(v.data),
    }
}

fn my_none(id: i32) -> MyOptionals {
    MyOptionals {
        id,
        small: None,
        big: None,
        tiny: None,
        unsigned: None,
        real: None,
        double: None,
        flag: None,
        txt: None,
        ts: None,
        stamp: None,
        day: None,
        clock: None,
        t_ts: None,
        t_stamp: None,
        t_day: None,
        t_clock: None,
        amount: None,
        doc: None,
        level: None,
        data: None,
    }
}

const MY_COLUMNS: &str = "
    small SMALLINT{n}, big BIGINT{n}, tiny TINYINT{n}, `unsigned` INT UNSIGNED{n}, `real` FLOAT{n},
    `double` DOUBLE{n}, flag BOOL{n}, txt TEXT{n}, ts DATETIME(6){n}, stamp TIMESTAMP(6){s},
    day DATE{n}, clock TIME(6){n}, t_ts DATETIME(6){n}, t_stamp TIMESTAMP(6){s}, t_day DATE{n},
    t_clock TIME(6){n}, amount DECIMAL(20, 6){n}, doc JSON{n}, level VARCHAR(16){n}, data BLOB{n}";

#[tokio::test]
async fn mariadb_column_types_hit_on_the_second_read() {
    let database = unique("types");
    let Some(mut conn) = mysql(&database).await else {
        return;
    };
    // TIMESTAMP columns get no automatic default or update: `DEFAULT NULL` when nullable.
    let not_null = MY_COLUMNS
        .replace("{n}", " NOT NULL")
        .replace("{s}", " NOT NULL DEFAULT '2000-01-01 00:00:00'");
    let nullable = MY_COLUMNS
        .replace("{n}", "")
        .replace("{s}", " NULL DEFAULT NULL");
    conn.batch_execute(&format!(
        "SET time_zone = '+00:00';
         CREATE TABLE my_values (id INTEGER PRIMARY KEY, {not_null});
         CREATE TABLE my_optionals (id INTEGER PRIMARY KEY, {nullable});"
    ))
    .await
    .expect("create the MariaDB tables");
    let cache = Cache::builder().namespace(unique("types")).build().unwrap();
    for row in [my_values(1), my_values(2)] {
        diesel_memclone::insert_into(my_values::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    for row in [my_some(1), my_none(2)] {
        diesel_memclone::insert_into(my_optionals::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    hits_on_second_read!(
        counter,
        vec![my_values(1), my_values(2)],
        my_values::table
            .order(my_values::id)
            .cached("all")
            .using(&cache)
            .load::<MyValues, _>(&mut conn)
            .await
            .unwrap()
    );
    hits_on_second_read!(
        counter,
        vec![my_some(1), my_none(2)],
        my_optionals::table
            .order(my_optionals::id)
            .cached("all")
            .using(&cache)
            .load::<MyOptionals, _>(&mut conn)
            .await
            .unwrap()
    );
    let v = my_values(2);
    hits_on_second_read!(
        counter,
        vec![MyStamped {
            id: 2,
            ts: v.ts,
            amount: v.amount,
            doc: v.doc,
            level: v.level,
        }],
        my_values::table
            .filter(my_values::id.eq(2))
            .select((
                my_values::id,
                my_values::ts,
                my_values::amount,
                my_values::doc,
                my_values::level,
            ))
            .cached("stamped")
            .using(&cache)
            .load::<MyStamped, _>(&mut conn)
            .await
            .unwrap()
    );
    assert_eq!(cache.stats().corrupt_entries, 0, "{:?}", cache.stats());
    hits_on_second_read!(
        counter,
        my_values(2),
        MyValues::find_cached(&mut conn, 2).await.unwrap()
    );
    for row in [my_some(1), my_none(2)] {
        hits_on_second_read!(
            counter,
            row.clone(),
            MyOptionals::find_cached(&mut conn, row.id).await.unwrap()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite.

#[derive(Debug, Clone, PartialEq, Queryable, Insertable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = lite_values)]
struct LiteValues {
    id: i32,
    small: i16,
    big: i64,
    real: f32,
    double: f64,
    flag: bool,
    txt: String,
    ts: chrono::NaiveDateTime,
    tstz: chrono::DateTime<chrono::Utc>,
    day: chrono::NaiveDate,
    clock: chrono::NaiveTime,
    t_ts: time::PrimitiveDateTime,
    t_tstz: time::OffsetDateTime,
    t_day: time::Date,
    t_clock: time::Time,
    doc: Value,
    docb: Value,
    amount: bigdecimal::BigDecimal,
    level: Level,
    data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Queryable, Insertable, Serialize, Deserialize, MemClone)]
#[diesel(table_name = lite_optionals)]
struct LiteOptionals {
    id: i32,
    small: Option<i16>,
    big: Option<i64>,
    real: Option<f32>,
    double: Option<f64>,
    flag: Option<bool>,
    txt: Option<String>,
    ts: Option<chrono::NaiveDateTime>,
    tstz: Option<chrono::DateTime<chrono::Utc>>,
    day: Option<chrono::NaiveDate>,
    clock: Option<chrono::NaiveTime>,
    t_ts: Option<time::PrimitiveDateTime>,
    t_tstz: Option<time::OffsetDateTime>,
    t_day: Option<time::Date>,
    t_clock: Option<time::Time>,
    doc: Option<Value>,
    docb: Option<Value>,
    amount: Option<bigdecimal::BigDecimal>,
    level: Option<Level>,
    data: Option<Vec<u8>>,
}

/// A selection with `#[derive(CacheValue)]`.
#[derive(Debug, Clone, PartialEq, Queryable, Serialize, Deserialize, CacheValue)]
struct LiteStamped {
    id: i32,
    t_ts: time::PrimitiveDateTime,
    docb: Value,
    amount: Option<bigdecimal::BigDecimal>,
    level: Level,
}

fn lite_values(id: i32) -> LiteValues {
    LiteValues {
        id,
        small: -12,
        big: 1 << 40,
        real: 1.25,
        double: -2.5e-3,
        flag: true,
        txt: "text ü".into(),
        ts: chrono_ts(),
        tstz: chrono_utc(),
        day: chrono_ts().date(),
        clock: chrono_ts().time(),
        t_ts: time_ts(),
        t_tstz: time_utc(),
        t_day: time_ts().date(),
        t_clock: time_ts().time(),
        doc: doc(),
        docb: json!({"b": [1, 2, {"c": null}], "s": "x"}),
        // SQLite keeps NUMERIC as a floating-point number: an exact binary fraction.
        amount: bigdecimal::BigDecimal::from_str("1234.5").unwrap(),
        level: Level::High,
        data: vec![0, 1, 255, 128],
    }
}

fn lite_some(id: i32) -> LiteOptionals {
    let v = lite_values(id);
    LiteOptionals {
        id,
        small: Some(v.small),
        big: Some(v.big),
        real: Some(v.real),
        double: Some(v.double),
        flag: Some(v.flag),
        txt: Some(v.txt),
        ts: Some(v.ts),
        tstz: Some(v.tstz),
        day: Some(v.day),
        clock: Some(v.clock),
        t_ts: Some(v.t_ts),
        t_tstz: Some(v.t_tstz),
        t_day: Some(v.t_day),
        t_clock: Some(v.t_clock),
        doc: Some(v.doc),
        docb: Some(v.docb),
        amount: Some(v.amount),
        level: Some(v.level),
        data: Some(v.data),
    }
}

fn lite_none(id: i32) -> LiteOptionals {
    LiteOptionals {
        id,
        small: None,
        big: None,
        real: None,
        double: None,
        flag: None,
        txt: None,
        ts: None,
        tstz: None,
        day: None,
        clock: None,
        t_ts: None,
        t_tstz: None,
        t_day: None,
        t_clock: None,
        doc: None,
        docb: None,
        amount: None,
        level: None,
        data: None,
    }
}

const LITE_COLUMNS: &str = "
    small SMALLINT{n}, big BIGINT{n}, real REAL{n}, double DOUBLE{n}, flag BOOLEAN{n}, txt TEXT{n},
    ts TIMESTAMP{n}, tstz TIMESTAMPTZ{n}, day DATE{n}, clock TIME{n}, t_ts TIMESTAMP{n},
    t_tstz TIMESTAMPTZ{n}, t_day DATE{n}, t_clock TIME{n}, doc TEXT{n}, docb BLOB{n},
    amount NUMERIC{n}, level TEXT{n}, data BLOB{n}";

#[tokio::test]
async fn sqlite_column_types_hit_on_the_second_read() {
    let mut conn = sqlite().await;
    conn.batch_execute(&format!(
        "CREATE TABLE lite_values (id INTEGER PRIMARY KEY, {});
         CREATE TABLE lite_optionals (id INTEGER PRIMARY KEY, {});",
        LITE_COLUMNS.replace("{n}", " NOT NULL"),
        LITE_COLUMNS.replace("{n}", "")
    ))
    .await
    .expect("create the SQLite tables");
    let cache = Cache::builder().namespace(unique("types")).build().unwrap();
    for row in [lite_values(1), lite_values(2)] {
        diesel_memclone::insert_into(lite_values::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    for row in [lite_some(1), lite_none(2)] {
        diesel_memclone::insert_into(lite_optionals::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    hits_on_second_read!(
        counter,
        vec![lite_values(1), lite_values(2)],
        lite_values::table
            .order(lite_values::id)
            .cached("all")
            .using(&cache)
            .load::<LiteValues, _>(&mut conn)
            .await
            .unwrap()
    );
    hits_on_second_read!(
        counter,
        vec![lite_some(1), lite_none(2)],
        lite_optionals::table
            .order(lite_optionals::id)
            .cached("all")
            .using(&cache)
            .load::<LiteOptionals, _>(&mut conn)
            .await
            .unwrap()
    );
    let v = lite_values(1);
    hits_on_second_read!(
        counter,
        vec![LiteStamped {
            id: 1,
            t_ts: v.t_ts,
            docb: v.docb,
            amount: Some(v.amount),
            level: v.level,
        }],
        lite_values::table
            .filter(lite_values::id.eq(1))
            .select((
                lite_values::id,
                lite_values::t_ts,
                lite_values::docb,
                lite_values::amount.nullable(),
                lite_values::level,
            ))
            .cached("stamped")
            .using(&cache)
            .load::<LiteStamped, _>(&mut conn)
            .await
            .unwrap()
    );
    assert_eq!(cache.stats().corrupt_entries, 0, "{:?}", cache.stats());
    hits_on_second_read!(
        counter,
        lite_values(1),
        LiteValues::find_cached(&mut conn, 1).await.unwrap()
    );
    for row in [lite_some(1), lite_none(2)] {
        hits_on_second_read!(
            counter,
            row.clone(),
            LiteOptionals::find_cached(&mut conn, row.id).await.unwrap()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `#[derive(CacheValue)]` keeps the tables and rows of the models it holds.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, CacheValue)]
struct UserVisit {
    user: User,
    posts: Vec<Post>,
    at: chrono::NaiveDateTime,
    doc: Option<Value>,
    mood: Mood,
}

#[test]
fn a_derived_value_keeps_the_tables_and_rows_of_its_models() {
    let mut tables = Vec::new();
    <UserVisit as CacheValue>::tables(&mut tables);
    assert_eq!(tables, ["users", "posts"]);
    let visit = UserVisit {
        user: User {
            id: 7,
            name: "Ann".into(),
            status: "a".into(),
        },
        posts: vec![Post {
            id: 3,
            user_id: 7,
            title: "t".into(),
        }],
        at: chrono_ts(),
        doc: Some(doc()),
        mood: Mood::Happy,
    };
    let mut rows = Vec::new();
    visit.rows(&mut rows);
    assert_eq!(rows, [RowKey::new("users", 7), RowKey::new("posts", 3)]);
    // The fingerprint is the fields' names and types: stable, and another shape is another key.
    assert_eq!(
        <UserVisit as CacheValue>::fingerprint(),
        <UserVisit as CacheValue>::fingerprint()
    );
    assert_ne!(
        <UserVisit as CacheValue>::fingerprint(),
        <PgStamped as CacheValue>::fingerprint()
    );
}

// ---------------------------------------------------------------------------------------------
// A type that cannot round-trip is reported once, by name, and not cached.

/// `#[serde(skip_serializing)]` on a column (kept out of an API's JSON, say): its values are
/// written without the field and cannot be read back in any encoding.
#[derive(
    Debug, Clone, PartialEq, Queryable, Insertable, Selectable, Serialize, Deserialize, MemClone,
)]
#[diesel(table_name = accounts)]
struct Account {
    id: i32,
    name: String,
    #[serde(skip_serializing)]
    secret: String,
}

/// Keeps the ERROR events memclone logs (a minimal `tracing` subscriber, no extra crate).
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl tracing::Subscriber for Errors {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            let mut text = String::new();
            event.record(&mut Fields(&mut text));
            self.0.lock().unwrap().push(text);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread")]
async fn a_type_that_cannot_round_trip_is_reported_once_with_its_name() {
    let errors = Errors::default();
    let _subscriber = tracing::subscriber::set_default(errors.clone());
    let mut conn = sqlite().await;
    conn.batch_execute(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT NOT NULL, secret TEXT NOT NULL);
         INSERT INTO accounts VALUES (1, 'Ann', 's3cret');",
    )
    .await
    .unwrap();
    let cache = Cache::builder().namespace(unique("lossy")).build().unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let ann = Account {
        id: 1,
        name: "Ann".into(),
        secret: "s3cret".into(),
    };
    for _ in 0..3 {
        let (rows, statements) = counted!(
            counter,
            accounts::table
                .cached("all")
                .using(&cache)
                .load::<Account, _>(&mut conn)
                .await
                .unwrap()
        );
        assert_eq!(rows, std::slice::from_ref(&ann));
        assert_eq!(
            statements, 1,
            "not cacheable: every read goes to the database"
        );
        let (row, statements) = counted!(
            counter,
            cache.find::<Account, _>(&mut conn, 1).await.unwrap()
        );
        assert_eq!(row, ann);
        assert_eq!(statements, 1);
    }
    let stats = cache.stats();
    assert_eq!(stats.hits, 0, "{stats:?}");
    assert_eq!(
        stats.corrupt_entries, 0,
        "nothing unreadable was stored: {stats:?}"
    );
    let logged = errors.0.lock().unwrap().clone();
    // Once per type: the query's `Vec<Account>` and the entity's `Option<Account>`.
    assert_eq!(logged.len(), 2, "{logged:#?}");
    let vec_type = std::any::type_name::<Vec<Account>>();
    let option_type = std::any::type_name::<Option<Account>>();
    assert!(logged[0].contains(vec_type), "{logged:#?}");
    assert!(logged[1].contains(option_type), "{logged:#?}");
    assert!(logged[0].contains("missing field `secret`"), "{logged:#?}");
}

//! Invalidation from PostgreSQL (issue 12): triggers installed with `listen::install_sql`, and a
//! listener per cache. Writes made with plain diesel-async (no memclone) must reach the cache.
//! Every wait is bounded (10 s) and only behaviour is asserted, never speed.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_memclone::listen::{self, ListenError, ListenHandle};
use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::schema::{posts, users};
use diesel_memclone_tests::*;
use std::time::{Duration, Instant};

#[allow(missing_docs)]
mod extra {
    diesel::table! {
        children (id) {
            id -> Integer,
            parent_id -> Integer,
            name -> Text,
        }
    }
    diesel::table! {
        #[sql_name = "Ledger"]
        ledger (id) {
            id -> Integer,
            note -> Text,
        }
    }
    diesel::table! {
        #[sql_name = "We.ird\"Name"]
        weird (id) {
            id -> Integer,
            note -> Text,
        }
    }
}
use extra::{children, ledger, weird};

/// A model of a table whose name keeps its case.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, serde::Serialize, serde::Deserialize, MemClone,
)]
#[diesel(table_name = ledger)]
struct LedgerRow {
    id: i32,
    note: String,
}

/// A model of a table whose name needs quoting for its dot and quote.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, serde::Serialize, serde::Deserialize, MemClone,
)]
#[diesel(table_name = weird)]
struct WeirdRow {
    id: i32,
    note: String,
}

const WAIT: Duration = Duration::from_secs(10);
const TABLES: [&str; 4] = ["users", "posts", "parents", "children"];

/// The extra tables, a trigger that writes `posts` when `users` changes, and memclone's
/// triggers on every table, notifying the channel named after the schema.
async fn install(conn: &mut AsyncPgConnection, schema: &str) {
    conn.batch_execute(
        "CREATE TABLE parents (id INTEGER PRIMARY KEY);
         CREATE TABLE children (id INTEGER PRIMARY KEY,
             parent_id INTEGER NOT NULL REFERENCES parents (id) ON DELETE CASCADE,
             name TEXT NOT NULL);
         CREATE FUNCTION copy_name() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN UPDATE posts SET title = NEW.name WHERE user_id = NEW.id; RETURN NULL; END $$;
         CREATE TRIGGER copy_name AFTER UPDATE ON users FOR EACH ROW EXECUTE FUNCTION copy_name();
         INSERT INTO users VALUES (1, 'Ann', 'a'), (2, 'Bob', 'b');
         INSERT INTO posts VALUES (10, 1, 'Ann');
         INSERT INTO parents VALUES (1), (2);
         INSERT INTO children VALUES (1, 1, 'x'), (2, 1, 'y'), (3, 2, 'z');",
    )
    .await
    .unwrap();
    conn.batch_execute(&listen::install_sql(schema, &TABLES).unwrap())
        .await
        .unwrap();
}

fn listener(cache: &Cache, schema: &str) -> listen::Listener {
    listen::postgres(postgres_url())
        .tables(TABLES.iter().map(|t| format!("{schema}.{t}")))
        .channel(schema)
        .cache(cache.clone())
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .ping_every(Duration::from_millis(500))
}

async fn start(cache: &Cache, schema: &str) -> ListenHandle {
    listener(cache, schema).start().await.expect("listener")
}

async fn name(conn: &mut AsyncPgConnection, cache: &Cache, id: i32) -> String {
    users::table
        .find(id)
        .select(users::name)
        .cached("name")
        .using(cache)
        .get_result(conn)
        .await
        .unwrap()
}

async fn children_of(conn: &mut AsyncPgConnection, cache: &Cache) -> Vec<String> {
    children::table
        .order(children::id)
        .select(children::name)
        .cached("children")
        .using(cache)
        .load(conn)
        .await
        .unwrap()
}

async fn titles(conn: &mut AsyncPgConnection, cache: &Cache) -> Vec<String> {
    posts::table
        .order(posts::id)
        .select(posts::title)
        .cached("titles")
        .using(cache)
        .load(conn)
        .await
        .unwrap()
}

/// Polls `read` until it gives `want`, for at most [`WAIT`].
macro_rules! eventually {
    ($read:expr, $want:expr) => {{
        let deadline = Instant::now() + WAIT;
        loop {
            let got = $read;
            if got == $want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still {got:?}, not {:?}, after {WAIT:?}",
                $want
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

/// Runs a scenario on the in-process store and on Redis, each in a schema and namespace of
/// its own.
macro_rules! on_both_stores {
    ($scenario:ident: $memory:ident, $redis:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $memory() {
            let schema = unique("listen");
            let Some(mut conn) = postgres(&schema).await else {
                return;
            };
            install(&mut conn, &schema).await;
            let cache = Cache::builder()
                .namespace(unique("listen"))
                .build()
                .unwrap();
            $scenario(cache, &schema, conn).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            let schema = unique("listen");
            let (Some(mut conn), Some(store)) = (postgres(&schema).await, redis_store().await)
            else {
                return;
            };
            install(&mut conn, &schema).await;
            let cache = Cache::builder()
                .store(store)
                .namespace(unique("listen"))
                .build()
                .unwrap();
            $scenario(cache, &schema, conn).await;
        }
    };
}

async fn raw_update(cache: Cache, schema: &str, mut conn: AsyncPgConnection) {
    let handle = start(&cache, schema).await;
    assert!(handle.is_healthy());
    assert_eq!(name(&mut conn, &cache, 1).await, "Ann");
    let mut writer = postgres_again(schema).await;
    writer
        .batch_execute("UPDATE users SET name = 'Ann 2' WHERE id = 1")
        .await
        .unwrap();
    eventually!(name(&mut conn, &cache, 1).await, "Ann 2");
    // `sql_query` too, in an explicit transaction.
    writer
        .batch_execute("BEGIN; UPDATE users SET name = 'Ann 3' WHERE id = 1; COMMIT;")
        .await
        .unwrap();
    eventually!(name(&mut conn, &cache, 1).await, "Ann 3");
    diesel::sql_query("UPDATE users SET name = $1 WHERE id = 1")
        .bind::<diesel::sql_types::Text, _>("Ann 4")
        .execute(&mut writer)
        .await
        .unwrap();
    eventually!(name(&mut conn, &cache, 1).await, "Ann 4");
    assert!(handle.notifications() >= 3);
    handle.stop().await;
}
on_both_stores!(raw_update: raw_update_memory, raw_update_redis);

async fn cascade(cache: Cache, schema: &str, mut conn: AsyncPgConnection) {
    let _handle = start(&cache, schema).await;
    assert_eq!(children_of(&mut conn, &cache).await, ["x", "y", "z"]);
    postgres_again(schema)
        .await
        .batch_execute("DELETE FROM parents WHERE id = 1")
        .await
        .unwrap();
    eventually!(children_of(&mut conn, &cache).await, ["z"]);
}
on_both_stores!(cascade: cascade_memory, cascade_redis);

async fn other_trigger(cache: Cache, schema: &str, mut conn: AsyncPgConnection) {
    let _handle = start(&cache, schema).await;
    assert_eq!(titles(&mut conn, &cache).await, ["Ann"]);
    // `copy_name` writes `posts`: its reads are invalidated, though nothing named them.
    postgres_again(schema)
        .await
        .batch_execute("UPDATE users SET name = 'Ann B' WHERE id = 1")
        .await
        .unwrap();
    eventually!(titles(&mut conn, &cache).await, ["Ann B"]);
}
on_both_stores!(other_trigger: other_trigger_memory, other_trigger_redis);

async fn stopped_and_restarted(cache: Cache, schema: &str, mut conn: AsyncPgConnection) {
    let handle = start(&cache, schema).await;
    assert_eq!(name(&mut conn, &cache, 1).await, "Ann");
    // A writer that keeps writing while the listener stops.
    let writer_schema = schema.to_owned();
    let writer = tokio::spawn(async move {
        let mut writer = postgres_again(&writer_schema).await;
        for i in 0..60 {
            writer
                .batch_execute(&format!("UPDATE users SET name = 'Ann #{i}' WHERE id = 1"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle.stop().await;
    // Reads meanwhile fill the cache with whatever they see; nothing invalidates it now.
    let _ = name(&mut conn, &cache, 1).await;
    writer.await.unwrap();
    let seen = name(&mut conn, &cache, 1).await;
    // Without a listener, a write that bypasses memclone is not seen: the cache is stale.
    postgres_again(schema)
        .await
        .batch_execute("UPDATE users SET name = 'Ann final' WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(name(&mut conn, &cache, 1).await, seen);
    assert_ne!(seen, "Ann final");
    let handle = start(&cache, schema).await;
    // `start` invalidated every watched table before returning: fresh at once, no wait.
    assert_eq!(name(&mut conn, &cache, 1).await, "Ann final");
    drop(handle);
}
on_both_stores!(stopped_and_restarted: restart_memory, restart_redis);

async fn dropped_connection(cache: Cache, schema: &str, mut conn: AsyncPgConnection) {
    let handle = start(&cache, schema).await;
    assert_eq!(name(&mut conn, &cache, 1).await, "Ann");
    let pid = handle.backend_pid();
    let mut admin = postgres_again(schema).await;
    // The listener's backend is known to PostgreSQL by its application name.
    let app: String = diesel::sql_query(format!(
        "SELECT application_name AS name FROM pg_stat_activity WHERE pid = {pid}"
    ))
    .get_result::<Named>(&mut admin)
    .await
    .unwrap()
    .name;
    assert_eq!(app, listen::APPLICATION_NAME);
    diesel::sql_query(format!("SELECT pg_terminate_backend({pid})"))
        .execute(&mut admin)
        .await
        .unwrap();
    // A write while the listener may be away: the reconnection's invalidation covers it.
    admin
        .batch_execute("UPDATE users SET name = 'Ann away' WHERE id = 1")
        .await
        .unwrap();
    eventually!(handle.reconnects() >= 1 && handle.is_healthy(), true);
    assert_ne!(handle.backend_pid(), pid);
    eventually!(name(&mut conn, &cache, 1).await, "Ann away");
    // And it listens again.
    admin
        .batch_execute("UPDATE users SET name = 'Ann back' WHERE id = 1")
        .await
        .unwrap();
    eventually!(name(&mut conn, &cache, 1).await, "Ann back");
}
on_both_stores!(dropped_connection: dropped_connection_memory, dropped_connection_redis);

#[derive(QueryableByName)]
struct Named {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

#[tokio::test]
async fn bad_set_ups_fail_at_start() {
    let schema = unique("listen");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    // No trigger yet.
    let err = listener(&cache, &schema).start().await.unwrap_err();
    assert!(
        matches!(&err, ListenError::NoSuchTable(t) if t.ends_with(".parents"))
            || matches!(&err, ListenError::MissingTrigger { .. }),
        "{err}"
    );
    let only_users = || {
        listen::postgres(postgres_url())
            .tables([format!("{schema}.users")])
            .channel(&schema)
            .cache(cache.clone())
    };
    let err = only_users().start().await.unwrap_err();
    assert!(
        matches!(&err, ListenError::MissingTrigger { table, .. } if table.ends_with(".users")),
        "{err}"
    );
    assert!(err.to_string().contains("install_sql"), "{err}");
    // Installed, but for another channel.
    conn.batch_execute(&listen::install_sql("elsewhere", &["users"]).unwrap())
        .await
        .unwrap();
    let err = only_users().start().await.unwrap_err();
    assert!(matches!(err, ListenError::MissingTrigger { .. }), "{err}");
    // Right channel: starts. Uninstalled: fails again.
    conn.batch_execute(&listen::install_sql(&schema, &["users"]).unwrap())
        .await
        .unwrap();
    only_users().start().await.unwrap().stop().await;
    conn.batch_execute(&listen::uninstall_sql(&["users"]).unwrap())
        .await
        .unwrap();
    let err = only_users().start().await.unwrap_err();
    assert!(matches!(err, ListenError::MissingTrigger { .. }), "{err}");
    // A table that does not exist, and a database that is not there.
    let err = listen::postgres(postgres_url())
        .tables([format!("{schema}.nope")])
        .cache(cache.clone())
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, ListenError::NoSuchTable(_)), "{err}");
    let err = listen::postgres("postgres://postgres@127.0.0.1:1/test")
        .tables(["users"])
        .cache(cache.clone())
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, ListenError::Connection(_)), "{err}");
}

/// Two in-process caches (two replicas with the embedded store, no Redis), each with its own
/// listener: a write through either, or from outside, reaches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_embedded_caches() {
    let schema = unique("listen");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    install(&mut conn, &schema).await;
    let a = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let b = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let (_la, _lb) = (start(&a, &schema).await, start(&b, &schema).await);
    let mut other = postgres_again(&schema).await;
    assert_eq!(name(&mut conn, &a, 1).await, "Ann");
    assert_eq!(name(&mut other, &b, 1).await, "Ann");
    // Through memclone on `a`: `a` is fresh at once, `b` hears it from PostgreSQL.
    diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Ann A"))
        .using(&a)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(name(&mut conn, &a, 1).await, "Ann A");
    eventually!(name(&mut other, &b, 1).await, "Ann A");
    diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Ann B"))
        .using(&b)
        .execute(&mut other)
        .await
        .unwrap();
    eventually!(name(&mut conn, &a, 1).await, "Ann B");
}

#[test]
fn models_tables() {
    assert_eq!(listen::tables::<(User, Post, User)>(), ["users", "posts"]);
    assert_eq!(listen::tables::<(Membership,)>(), ["memberships"]);
}

/// A listener that lost its connection says so in the handle and in the cache's stats until it
/// is back or stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_listener_shows_in_stats() {
    let schema = unique("listen");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    install(&mut conn, &schema).await;
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    // A reconnection far away: the listener stays down for the whole test.
    let handle = listener(&cache, &schema)
        .backoff(Duration::from_secs(600), Duration::from_secs(600))
        .start()
        .await
        .unwrap();
    assert!(handle.is_healthy());
    assert_eq!(cache.stats().listeners_unhealthy, 0);
    diesel::sql_query(format!(
        "SELECT pg_terminate_backend({})",
        handle.backend_pid()
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    eventually!(handle.is_healthy(), false);
    eventually!(cache.stats().listeners_unhealthy, 1);
    handle.stop().await;
    assert_eq!(cache.stats().listeners_unhealthy, 0);
}

/// A channel or table name that would break the triggers, or that PostgreSQL would read as
/// another name, is refused by `install_sql` and at `start`, before anything is connected.
#[tokio::test]
async fn bad_names_are_refused() {
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    // An unreachable database: the names are checked first.
    let unreachable = || {
        listen::postgres("postgres://postgres@127.0.0.1:1/test")
            .cache(cache.clone())
            .tables(["users"])
    };
    let long = "c".repeat(64);
    for channel in [
        "",
        long.as_str(),
        "Memclone",
        "mem clone",
        "mem-clone",
        "1memclone",
    ] {
        let err = unreachable().channel(channel).start().await.unwrap_err();
        assert!(
            matches!(&err, ListenError::InvalidChannel { channel: c, .. } if c == channel),
            "{channel:?}: {err}"
        );
        assert!(
            matches!(
                listen::install_sql(channel, &["users"]),
                Err(ListenError::InvalidChannel { .. })
            ),
            "{channel:?}"
        );
    }
    let long_table = format!("\"{}\"", "t".repeat(64));
    for table in ["", "a.b.c", "my table", "\"open", long_table.as_str()] {
        let err = unreachable().tables([table]).start().await.unwrap_err();
        assert!(
            matches!(&err, ListenError::InvalidTable { table: t, .. } if t == table),
            "{table:?}: {err}"
        );
        assert!(listen::install_sql("memclone", &[table]).is_err());
        assert!(listen::uninstall_sql(&[table]).is_err());
    }
}

/// Tables named with upper case, a dot and a quote: `listen::tables` names them so that
/// `install_sql` puts the trigger on the right table, and the listener reads the trigger's
/// payload (`quote_ident`) back to the table memclone keys. The listener watches only `users`:
/// the other tables are invalidated only because their payloads were read right (a payload it
/// could not read would invalidate `users` alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_table_names() {
    let schema = unique("listen");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    let tables = listen::tables::<(LedgerRow, WeirdRow, User)>();
    assert_eq!(tables, [r#""Ledger""#, r#""We.ird""Name""#, "users"]);
    conn.batch_execute(
        r#"CREATE TABLE "Ledger" (id INTEGER PRIMARY KEY, note TEXT NOT NULL);
           CREATE TABLE "We.ird""Name" (id INTEGER PRIMARY KEY, note TEXT NOT NULL);
           INSERT INTO "Ledger" VALUES (1, 'one');
           INSERT INTO "We.ird""Name" VALUES (1, 'one');"#,
    )
    .await
    .unwrap();
    conn.batch_execute(&listen::install_sql(&schema, &tables).unwrap())
        .await
        .unwrap();
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let handle = listen::postgres(postgres_url())
        .tables([format!("{schema}.users")])
        .channel(&schema)
        .cache(cache.clone())
        .start()
        .await
        .unwrap();
    // The same tables, named with their schema as the listener's connection would name them.
    listen::postgres(postgres_url())
        .tables(tables.iter().map(|t| format!("{schema}.{t}")))
        .channel(&schema)
        .cache(cache.clone())
        .start()
        .await
        .expect("the triggers are on the quoted tables")
        .stop()
        .await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    assert_eq!(ledger_note(&mut conn, &cache).await, "one");
    assert_eq!(weird_note(&mut conn, &cache).await, "one");
    let before = counter.get();
    assert_eq!(ledger_note(&mut conn, &cache).await, "one");
    assert_eq!(weird_note(&mut conn, &cache).await, "one");
    assert_eq!(counter.get(), before, "both served from the cache");
    postgres_again(&schema)
        .await
        .batch_execute(
            r#"UPDATE "Ledger" SET note = 'two'; UPDATE "We.ird""Name" SET note = 'two';"#,
        )
        .await
        .unwrap();
    eventually!(ledger_note(&mut conn, &cache).await, "two");
    eventually!(weird_note(&mut conn, &cache).await, "two");
    assert!(handle.notifications() >= 2);
    // What the trigger sends is `quote_ident(schema) || '.' || quote_ident(table)`.
    let payload: String = diesel::sql_query(
        r#"SELECT quote_ident(current_schema()) || '.' || quote_ident('We.ird"Name') AS name"#,
    )
    .get_result::<Named>(&mut conn)
    .await
    .unwrap()
    .name;
    assert_eq!(payload, format!(r#"{schema}."We.ird""Name""#));
    handle.stop().await;
}

async fn ledger_note(conn: &mut AsyncPgConnection, cache: &Cache) -> String {
    cache.find::<LedgerRow, _>(conn, 1).await.unwrap().note
}

async fn weird_note(conn: &mut AsyncPgConnection, cache: &Cache) -> String {
    weird::table
        .find(1)
        .select(weird::note)
        .cached("weird note")
        .using(cache)
        .get_result(conn)
        .await
        .unwrap()
}

/// A role that cannot see a watched table's schema, and a trigger function of another version,
/// are clear errors at start.
#[tokio::test]
async fn rights_and_outdated_function_fail_at_start() {
    let schema = unique("listen");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    install(&mut conn, &schema).await;
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let url = postgres_url();
    if let Some(role_url) = url
        .contains("://postgres@")
        .then(|| url.replace("://postgres@", &format!("://{schema}@")))
    {
        // A role of its own (roles are per server: named after the schema, dropped at the end).
        conn.batch_execute(&format!("CREATE ROLE {schema} LOGIN"))
            .await
            .unwrap();
        let as_role = || {
            listen::postgres(role_url.clone())
                .tables([format!("{schema}.users")])
                .channel(&schema)
                .cache(cache.clone())
        };
        let err = as_role().start().await.unwrap_err();
        assert!(
            matches!(&err, ListenError::InsufficientPrivilege { role, needs }
                if role == &schema && needs.contains("USAGE")),
            "{err}"
        );
        assert!(err.to_string().contains("USAGE on schema"), "{err}");
        conn.batch_execute(&format!("GRANT USAGE ON SCHEMA {schema} TO {schema}"))
            .await
            .unwrap();
        // USAGE is all it needs: no right on the table itself.
        as_role().start().await.expect("with USAGE").stop().await;
        conn.batch_execute(&format!(
            "REVOKE USAGE ON SCHEMA {schema} FROM {schema}; DROP ROLE {schema}"
        ))
        .await
        .unwrap();
    } else {
        server_missing(
            "a PostgreSQL URL of user postgres (to log in as another role)",
            &url,
        );
    }
    // The function of an older version (it notified the bare table name).
    conn.batch_execute(
        "CREATE OR REPLACE FUNCTION memclone_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME); RETURN NULL; END $$;",
    )
    .await
    .unwrap();
    let err = listener(&cache, &schema).start().await.unwrap_err();
    assert!(
        matches!(&err, ListenError::OutdatedFunction { function, .. } if function.contains("memclone_notify")),
        "{err}"
    );
    assert!(err.to_string().contains("install_sql"), "{err}");
    // Installing again brings it up to date.
    conn.batch_execute(&listen::install_sql(&schema, &TABLES).unwrap())
        .await
        .unwrap();
    listener(&cache, &schema)
        .start()
        .await
        .unwrap()
        .stop()
        .await;
}

// Row-level triggers (`listen::row_triggers`): the changed rows' keys reach the listener, which
// evicts those rows' entity entries and the table's queries, and leaves the table's other rows.

#[allow(missing_docs)]
mod keyed {
    diesel::table! {
        tags (name) {
            name -> Text,
            note -> Text,
        }
    }
    diesel::table! {
        pairs (a, b) {
            a -> Text,
            b -> Integer,
            note -> Text,
        }
    }
    diesel::table! {
        tokens (id) {
            id -> Uuid,
            note -> Text,
        }
    }
}
use keyed::{pairs, tags, tokens};

/// A row keyed by text.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, serde::Serialize, serde::Deserialize, MemClone,
)]
#[diesel(table_name = tags, primary_key(name))]
struct TagRow {
    name: String,
    note: String,
}

/// A row keyed by text and an integer.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, serde::Serialize, serde::Deserialize, MemClone,
)]
#[diesel(table_name = pairs, primary_key(a, b))]
struct PairRow {
    a: String,
    b: i32,
    note: String,
}

/// A row keyed by a UUID.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, serde::Serialize, serde::Deserialize, MemClone,
)]
#[diesel(table_name = tokens)]
struct TokenRow {
    id: uuid::Uuid,
    note: String,
}

/// Text keys that need quoting in the payload: a quote, a comma, a line break, a backslash.
const ODD: &str = "a\"b,c\nd\\e";
const TOKEN: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";
const OTHER_TOKEN: &str = "00000000-0000-4000-8000-0000000000ff";

/// Users 1 to 4, the keyed tables, row-level triggers at most `max_rows` rows on `users`, `tags`,
/// `pairs`, `tokens` and `memberships`, and the table-level trigger on `posts`; a listener on
/// them and a cache.
async fn rows_set_up(
    schema: &str,
    max_rows: u32,
) -> Option<(AsyncPgConnection, Cache, ListenHandle)> {
    let mut conn = postgres(schema).await?;
    conn.batch_execute(&format!(
        "CREATE TABLE tags (name TEXT PRIMARY KEY, note TEXT NOT NULL);
         CREATE TABLE pairs (a TEXT, b INTEGER, note TEXT NOT NULL, PRIMARY KEY (a, b));
         CREATE TABLE tokens (id UUID PRIMARY KEY, note TEXT NOT NULL);
         INSERT INTO users VALUES (1, 'Ann', 'a'), (2, 'Bob', 'b'), (3, 'Cy', 'c'), (4, 'Di', 'd');
         INSERT INTO posts VALUES (10, 1, 'Ann');
         INSERT INTO memberships VALUES (1, 1, 'owner'), (1, 2, 'member');
         INSERT INTO tags VALUES ({odd}, 'one'), ('x', 'one');
         INSERT INTO pairs VALUES ({odd}, 1, 'one'), ({odd}, 2, 'one');
         INSERT INTO tokens VALUES ('{TOKEN}', 'one'), ('{OTHER_TOKEN}', 'one');",
        odd = sql_text(ODD)
    ))
    .await
    .unwrap();
    let up = listen::row_triggers(schema)
        .models::<(User, TagRow, PairRow, TokenRow, Membership)>()
        .max_rows(max_rows)
        .install_sql()
        .unwrap();
    conn.batch_execute(&up).await.unwrap();
    conn.batch_execute(&listen::install_sql(schema, &["posts"]).unwrap())
        .await
        .unwrap();
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let handle = listen::postgres(postgres_url())
        .tables(
            ["users", "posts", "tags", "pairs", "tokens", "memberships"]
                .map(|t| format!("{schema}.{t}")),
        )
        .channel(schema)
        .cache(cache.clone())
        .start()
        .await
        .expect("listener on row-level triggers");
    Some((conn, cache, handle))
}

/// A string as an SQL literal (`standard_conforming_strings`: a backslash is itself).
fn sql_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

async fn user(conn: &mut AsyncPgConnection, cache: &Cache, id: i32) -> Option<User> {
    cache.find_optional::<User, _>(conn, id).await.unwrap()
}

async fn user_name(conn: &mut AsyncPgConnection, cache: &Cache, id: i32) -> Option<String> {
    user(conn, cache, id).await.map(|u| u.name)
}

async fn all_names(conn: &mut AsyncPgConnection, cache: &Cache) -> Vec<String> {
    users::table
        .order(users::id)
        .select(users::name)
        .cached("all names")
        .using(cache)
        .load(conn)
        .await
        .unwrap()
}

/// The database reads `read` made.
macro_rules! reads {
    ($counter:expr, $read:expr) => {{
        let before = $counter.get();
        let value = $read;
        ($counter.get() - before, value)
    }};
}

/// A raw update of one row, then of two, then a key change and a delete: each evicts the
/// changed rows and the table's queries, and no other row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_updates_evict_only_their_rows() {
    let schema = unique("listen");
    let Some((mut conn, cache, handle)) = rows_set_up(&schema, 100).await else {
        return;
    };
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    for id in 1..=4 {
        user(&mut conn, &cache, id).await.unwrap();
    }
    assert_eq!(user(&mut conn, &cache, 10).await, None);
    assert_eq!(
        all_names(&mut conn, &cache).await,
        ["Ann", "Bob", "Cy", "Di"]
    );
    let (n, _) = reads!(counter, user(&mut conn, &cache, 2).await);
    assert_eq!(n, 0, "cached");
    let mut writer = postgres_again(&schema).await;

    // One row.
    writer
        .batch_execute("UPDATE users SET name = 'Ann 2' WHERE id = 1")
        .await
        .unwrap();
    eventually!(
        user_name(&mut conn, &cache, 1).await,
        Some("Ann 2".to_owned())
    );
    assert_eq!(
        all_names(&mut conn, &cache).await,
        ["Ann 2", "Bob", "Cy", "Di"]
    );
    for id in 2..=4 {
        let (n, _) = reads!(counter, user(&mut conn, &cache, id).await);
        assert_eq!(n, 0, "user {id}: another row's entry stays cached");
    }

    // Two rows in one statement.
    writer
        .batch_execute("UPDATE users SET name = name || '+' WHERE id IN (2, 3)")
        .await
        .unwrap();
    eventually!(
        user_name(&mut conn, &cache, 2).await,
        Some("Bob+".to_owned())
    );
    assert_eq!(user_name(&mut conn, &cache, 3).await.unwrap(), "Cy+");
    assert_eq!(
        all_names(&mut conn, &cache).await,
        ["Ann 2", "Bob+", "Cy+", "Di"]
    );
    let (n, _) = reads!(counter, user(&mut conn, &cache, 4).await);
    assert_eq!(n, 0, "user 4 stays cached");

    // A key change: the old key is gone, the new one (cached as missing) is there.
    writer
        .batch_execute("UPDATE users SET id = 10 WHERE id = 1")
        .await
        .unwrap();
    eventually!(user(&mut conn, &cache, 1).await, None::<User>);
    assert_eq!(user_name(&mut conn, &cache, 10).await.unwrap(), "Ann 2");
    let (n, _) = reads!(counter, user(&mut conn, &cache, 4).await);
    assert_eq!(n, 0, "user 4 stays cached");

    // A delete.
    writer
        .batch_execute("DELETE FROM users WHERE id = 2")
        .await
        .unwrap();
    eventually!(user(&mut conn, &cache, 2).await, None::<User>);
    assert_eq!(all_names(&mut conn, &cache).await, ["Cy+", "Di", "Ann 2"]);
    let (n, _) = reads!(counter, user(&mut conn, &cache, 4).await);
    assert_eq!(n, 0, "user 4 stays cached");

    // An insert, in a transaction with an update of another row.
    writer
        .batch_execute(
            "BEGIN; INSERT INTO users VALUES (5, 'Eve', 'e'); \
             UPDATE users SET name = 'Cy 3' WHERE id = 3; COMMIT;",
        )
        .await
        .unwrap();
    eventually!(
        all_names(&mut conn, &cache).await,
        ["Cy 3", "Di", "Eve", "Ann 2"]
    );
    assert_eq!(user_name(&mut conn, &cache, 3).await.unwrap(), "Cy 3");
    let (n, _) = reads!(counter, user(&mut conn, &cache, 4).await);
    assert_eq!(n, 0, "user 4 stays cached");
    handle.stop().await;
}

/// A key whose Rust `Debug` is not the database's text (`AccountId(1)` against `1`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    diesel::expression::AsExpression,
    diesel::deserialize::FromSqlRow,
    serde::Serialize,
    serde::Deserialize,
)]
#[diesel(sql_type = diesel::sql_types::Integer)]
struct AccountId(i32);

impl diesel::serialize::ToSql<diesel::sql_types::Integer, diesel::pg::Pg> for AccountId {
    fn to_sql<'b>(
        &'b self,
        out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>,
    ) -> diesel::serialize::Result {
        <i32 as diesel::serialize::ToSql<diesel::sql_types::Integer, diesel::pg::Pg>>::to_sql(
            &self.0,
            &mut out.reborrow(),
        )
    }
}

impl diesel::deserialize::FromSql<diesel::sql_types::Integer, diesel::pg::Pg> for AccountId {
    fn from_sql(bytes: diesel::pg::PgValue<'_>) -> diesel::deserialize::Result<Self> {
        <i32 as diesel::deserialize::FromSql<diesel::sql_types::Integer, diesel::pg::Pg>>::from_sql(
            bytes,
        )
        .map(AccountId)
    }
}

#[allow(missing_docs)]
mod accounts_schema {
    diesel::table! {
        accounts (id) {
            id -> Integer,
            name -> Text,
        }
    }
}
use accounts_schema::accounts;

/// A model keyed by a newtype.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, serde::Serialize, serde::Deserialize, MemClone,
)]
#[diesel(table_name = accounts)]
struct Account {
    id: AccountId,
    name: String,
}

async fn account_name(conn: &mut AsyncPgConnection, cache: &Cache, id: i32) -> String {
    cache
        .find::<Account, _>(conn, AccountId(id))
        .await
        .unwrap()
        .name
}

/// A model whose key's `Debug` text is not what PostgreSQL sends (a newtype) gets the
/// table-level trigger from `models`: a raw update must still evict its cached row. (Named by
/// the database's text, `1`, the row would be a key nothing reads, and `find` would serve the
/// old name until the TTL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_models_with_other_key_types_fall_back_to_the_table() {
    assert!(Account::row_key_columns().is_empty());
    assert_eq!(User::row_key_columns(), ["id"]);
    assert_eq!(TokenRow::row_key_columns(), ["id"]);
    assert_eq!(PairRow::row_key_columns(), ["a", "b"]);
    let schema = unique("listen");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    conn.batch_execute(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
         INSERT INTO accounts VALUES (1, 'Ann'), (2, 'Bob');",
    )
    .await
    .unwrap();
    let up = listen::row_triggers(&schema)
        .models::<(Account, User)>()
        .install_sql()
        .unwrap();
    conn.batch_execute(&up).await.unwrap();
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let handle = listen::postgres(postgres_url())
        .tables([format!("{schema}.accounts"), format!("{schema}.users")])
        .channel(&schema)
        .cache(cache.clone())
        .start()
        .await
        .expect("listener");
    assert_eq!(account_name(&mut conn, &cache, 1).await, "Ann");
    let mut writer = postgres_again(&schema).await;
    writer
        .batch_execute("UPDATE accounts SET name = 'Ann 2' WHERE id = 1")
        .await
        .unwrap();
    eventually!(account_name(&mut conn, &cache, 1).await, "Ann 2".to_owned());
    handle.stop().await;
}

/// A statement over the row limit, and a `TRUNCATE`, are notified as the table: every row is
/// evicted, those it did not change too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_falls_back_to_the_table() {
    let schema = unique("listen");
    let Some((mut conn, cache, handle)) = rows_set_up(&schema, 2).await else {
        return;
    };
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    for id in 1..=4 {
        user(&mut conn, &cache, id).await.unwrap();
    }
    let mut writer = postgres_again(&schema).await;
    // Two rows: within the limit, user 4 stays.
    writer
        .batch_execute("UPDATE users SET status = 'x' WHERE id <= 2")
        .await
        .unwrap();
    eventually!(user(&mut conn, &cache, 2).await.unwrap().status, "x");
    let (n, _) = reads!(counter, user(&mut conn, &cache, 4).await);
    assert_eq!(n, 0, "user 4 stays cached");
    // Three rows: over the limit, the table, user 4 too.
    writer
        .batch_execute("UPDATE users SET status = 'y' WHERE id <= 3")
        .await
        .unwrap();
    eventually!(user(&mut conn, &cache, 3).await.unwrap().status, "y");
    for id in 1..=2 {
        assert_eq!(user(&mut conn, &cache, id).await.unwrap().status, "y");
    }
    let (n, _) = reads!(counter, user(&mut conn, &cache, 4).await);
    assert_eq!(n, 1, "user 4 was evicted with the table");
    // Two rows, but keys too long for one notification (8,000 bytes): the table.
    let tag = async |conn: &mut AsyncPgConnection| {
        cache
            .find_optional::<TagRow, _>(conn, "x".to_owned())
            .await
            .unwrap()
    };
    tag(&mut conn).await.unwrap();
    let (n, _) = reads!(counter, tag(&mut conn).await);
    assert_eq!(n, 0, "cached");
    writer
        .batch_execute("INSERT INTO tags VALUES (repeat('l', 5000), 'n'), (repeat('m', 5000), 'n')")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while reads!(counter, tag(&mut conn).await).0 == 0 {
        assert!(Instant::now() < deadline, "tag x never evicted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // TRUNCATE: the table.
    writer.batch_execute("TRUNCATE users").await.unwrap();
    eventually!(user(&mut conn, &cache, 4).await, None::<User>);
    assert_eq!(user(&mut conn, &cache, 1).await, None);
    handle.stop().await;
}

/// Text keys with a quote, a comma, a line break and a backslash, a composite key of text and an
/// integer, a UUID key, a composite integer key: each notified row is evicted, the other stays.
/// And a table with `install_sql`'s table-level trigger beside them (its old payload) still
/// evicts its every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_keys_of_every_kind() {
    let schema = unique("listen");
    let Some((mut conn, cache, handle)) = rows_set_up(&schema, 100).await else {
        return;
    };
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let token = uuid::Uuid::parse_str(TOKEN).unwrap();
    let other_token = uuid::Uuid::parse_str(OTHER_TOKEN).unwrap();
    let note_of_tag = async |conn: &mut AsyncPgConnection, name: &str| {
        cache
            .find::<TagRow, _>(conn, name.to_owned())
            .await
            .unwrap()
            .note
    };
    let note_of_pair = async |conn: &mut AsyncPgConnection, b: i32| {
        cache
            .find::<PairRow, _>(conn, (ODD.to_owned(), b))
            .await
            .unwrap()
            .note
    };
    let note_of_token = async |conn: &mut AsyncPgConnection, id: uuid::Uuid| {
        cache.find::<TokenRow, _>(conn, id).await.unwrap().note
    };
    let role = async |conn: &mut AsyncPgConnection, user_id: i32| {
        cache
            .find::<Membership, _>(conn, (1, user_id))
            .await
            .unwrap()
            .role
    };
    let post_title = async |conn: &mut AsyncPgConnection, id: i32| {
        cache.find::<Post, _>(conn, id).await.unwrap().title
    };
    // Cache everything.
    for name in [ODD, "x"] {
        note_of_tag(&mut conn, name).await;
    }
    for b in [1, 2] {
        note_of_pair(&mut conn, b).await;
    }
    for id in [token, other_token] {
        note_of_token(&mut conn, id).await;
    }
    for user_id in [1, 2] {
        role(&mut conn, user_id).await;
    }
    user(&mut conn, &cache, 1).await.unwrap();
    post_title(&mut conn, 10).await;

    let mut writer = postgres_again(&schema).await;
    writer
        .batch_execute(&format!(
            "UPDATE tags SET note = 'two' WHERE name = {odd};
             UPDATE pairs SET note = 'two' WHERE a = {odd} AND b = 1;
             UPDATE tokens SET note = 'two' WHERE id = '{TOKEN}';
             UPDATE memberships SET role = 'admin' WHERE user_id = 1;",
            odd = sql_text(ODD)
        ))
        .await
        .unwrap();
    eventually!(note_of_tag(&mut conn, ODD).await, "two");
    eventually!(note_of_pair(&mut conn, 1).await, "two");
    eventually!(note_of_token(&mut conn, token).await, "two");
    eventually!(role(&mut conn, 1).await, "admin");
    let (n, _) = reads!(counter, note_of_tag(&mut conn, "x").await);
    assert_eq!(n, 0, "the other tag stays cached");
    let (n, _) = reads!(counter, note_of_pair(&mut conn, 2).await);
    assert_eq!(n, 0, "the other pair stays cached");
    let (n, _) = reads!(counter, note_of_token(&mut conn, other_token).await);
    assert_eq!(n, 0, "the other token stays cached");
    let (n, _) = reads!(counter, role(&mut conn, 2).await);
    assert_eq!(n, 0, "the other membership stays cached");

    // `posts` has the table-level trigger (the payload of the old triggers): a write to it
    // evicts its every row, other posts too, and leaves `users` alone.
    writer
        .batch_execute("INSERT INTO posts VALUES (11, 2, 'Bob')")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (n, _) = reads!(counter, post_title(&mut conn, 10).await);
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "post 10 never evicted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (n, _) = reads!(counter, user(&mut conn, &cache, 1).await);
    assert_eq!(n, 0, "users untouched");
    handle.stop().await;
}

/// The listener checks row-level triggers as it checks table-level ones: all four events
/// covered, this version's function for the key columns the triggers name.
#[tokio::test]
async fn row_triggers_are_checked_at_start() {
    let schema = unique("listen");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let users_only = || {
        listen::postgres(postgres_url())
            .tables([format!("{schema}.users")])
            .channel(&schema)
            .cache(cache.clone())
    };
    let triggers = listen::row_triggers(&schema).models::<(User,)>();
    conn.batch_execute(&triggers.install_sql().unwrap())
        .await
        .unwrap();
    users_only().start().await.unwrap().stop().await;
    // One event uncovered.
    conn.batch_execute("DROP TRIGGER memclone_invalidate_truncate ON users")
        .await
        .unwrap();
    let err = users_only().start().await.unwrap_err();
    assert!(matches!(err, ListenError::MissingTrigger { .. }), "{err}");
    // Every event, but the function edited by hand.
    conn.batch_execute(&triggers.install_sql().unwrap())
        .await
        .unwrap();
    let function: String = diesel::sql_query(
        "SELECT p.proname::text AS name FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
         WHERE t.tgname = 'memclone_invalidate_update' AND t.tgrelid = 'users'::regclass",
    )
    .get_result::<Named>(&mut conn)
    .await
    .unwrap()
    .name;
    assert!(
        function.starts_with(listen::ROWS_FUNCTION_NAME),
        "{function}"
    );
    conn.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME); RETURN NULL; END $$;"
    ))
    .await
    .unwrap();
    let err = users_only().start().await.unwrap_err();
    assert!(
        matches!(&err, ListenError::OutdatedFunction { function: f, .. } if f.contains(&function)),
        "{err}"
    );
    // Installed again: up; uninstalled: nothing left.
    conn.batch_execute(&triggers.install_sql().unwrap())
        .await
        .unwrap();
    users_only().start().await.unwrap().stop().await;
    conn.batch_execute(&triggers.uninstall_sql().unwrap())
        .await
        .unwrap();
    let err = users_only().start().await.unwrap_err();
    assert!(matches!(err, ListenError::MissingTrigger { .. }), "{err}");
    let left: String = diesel::sql_query(format!(
        "SELECT count(*)::text AS name FROM pg_proc WHERE proname = '{function}' \
         AND pronamespace = current_schema()::regnamespace"
    ))
    .get_result::<Named>(&mut conn)
    .await
    .unwrap()
    .name;
    assert_eq!(left, "0", "the function is dropped with its last trigger");
}

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

//! Invalidation from MariaDB/MySQL (issue 12): triggers installed with
//! `listen::mariadb_install_sql`, and a listener per cache that polls their counters. Writes
//! made with plain diesel-async (no memclone) must reach the cache. Hits and misses are proved
//! by counting the statements the reading connection runs; every wait is bounded (10 s) and only
//! behaviour is asserted, never speed.

use diesel::prelude::*;
use diesel_async::{AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_memclone::listen::{self, ListenError, ListenHandle, MariaDbSetupError};
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
}
use extra::children;

const WAIT: Duration = Duration::from_secs(10);
const TABLES: [&str; 4] = ["users", "posts", "parents", "children"];

/// The extra tables (a cascading foreign key), a trigger that writes `posts` when `users`
/// changes, and memclone's triggers on every table.
async fn install(conn: &mut AsyncMysqlConnection) {
    conn.batch_execute(
        "CREATE TABLE parents (id INTEGER PRIMARY KEY) ENGINE=InnoDB;
         CREATE TABLE children (id INTEGER PRIMARY KEY, parent_id INTEGER NOT NULL,
             name VARCHAR(64) NOT NULL,
             FOREIGN KEY (parent_id) REFERENCES parents (id) ON DELETE CASCADE) ENGINE=InnoDB;
         CREATE TRIGGER copy_name AFTER UPDATE ON users FOR EACH ROW
             UPDATE posts SET title = NEW.name WHERE user_id = NEW.id;
         INSERT INTO users VALUES (1, 'Ann', 'a'), (2, 'Bob', 'b');
         INSERT INTO posts VALUES (10, 1, 'Ann');
         INSERT INTO parents VALUES (1), (2);
         INSERT INTO children VALUES (1, 1, 'x'), (2, 1, 'y'), (3, 2, 'z');",
    )
    .await
    .unwrap();
    conn.batch_execute(&listen::mariadb_install_sql(
        listen::MARIADB_VERSIONS_TABLE,
        &TABLES,
    ))
    .await
    .unwrap();
}

fn listener(cache: &Cache, db: &str) -> listen::MariaDbListener {
    listen::mariadb(mysql_url_of(db))
        .tables(TABLES)
        .cache(cache.clone())
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
}

async fn start(cache: &Cache, db: &str) -> ListenHandle {
    listener(cache, db).start().await.expect("listener")
}

/// The reading connection, with a statement counter.
struct Reader {
    conn: AsyncMysqlConnection,
    counter: QueryCounter,
}

impl Reader {
    async fn new(db: &str) -> Reader {
        let mut conn = mysql_again(db).await;
        let counter = QueryCounter::default();
        counter.attach(&mut conn);
        Reader { conn, counter }
    }

    async fn name(&mut self, cache: &Cache, id: i32) -> String {
        users::table
            .find(id)
            .select(users::name)
            .cached("name")
            .using(cache)
            .get_result(&mut self.conn)
            .await
            .unwrap()
    }

    async fn children(&mut self, cache: &Cache) -> Vec<String> {
        children::table
            .order(children::id)
            .select(children::name)
            .cached("children")
            .using(cache)
            .load(&mut self.conn)
            .await
            .unwrap()
    }

    async fn titles(&mut self, cache: &Cache) -> Vec<String> {
        posts::table
            .order(posts::id)
            .select(posts::title)
            .cached("titles")
            .using(cache)
            .load(&mut self.conn)
            .await
            .unwrap()
    }
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

/// `$read` is answered from the cache (no statement) and gives `$want`.
macro_rules! hit {
    ($reader:expr, $read:expr, $want:expr) => {{
        let (got, statements) = counted!($reader.counter, $read);
        assert_eq!(got, $want);
        assert_eq!(statements, 0, "a hit runs no statement");
    }};
}

/// Runs a scenario on the in-process store and on Redis, each in a database and namespace of
/// its own.
macro_rules! on_both_stores {
    ($scenario:ident: $memory:ident, $redis:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $memory() {
            let db = unique("listen");
            let Some(mut conn) = mysql(&db).await else {
                return;
            };
            install(&mut conn).await;
            let cache = Cache::builder()
                .namespace(unique("listen"))
                .build()
                .unwrap();
            $scenario(cache, &db).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            let db = unique("listen");
            let (Some(mut conn), Some(store)) = (mysql(&db).await, redis_store().await) else {
                return;
            };
            install(&mut conn).await;
            let cache = Cache::builder()
                .store(store)
                .namespace(unique("listen"))
                .build()
                .unwrap();
            $scenario(cache, &db).await;
        }
    };
}

async fn raw_update(cache: Cache, db: &str) {
    let handle = start(&cache, db).await;
    assert!(handle.is_healthy());
    let mut reader = Reader::new(db).await;
    let (name, statements) = counted!(reader.counter, reader.name(&cache, 1).await);
    assert_eq!((name.as_str(), statements), ("Ann", 1));
    hit!(reader, reader.name(&cache, 1).await, "Ann");
    let mut writer = mysql_again(db).await;
    writer
        .batch_execute("UPDATE users SET name = 'Ann 2' WHERE id = 1")
        .await
        .unwrap();
    eventually!(reader.name(&cache, 1).await, "Ann 2");
    hit!(reader, reader.name(&cache, 1).await, "Ann 2");
    // In an explicit transaction, and with `sql_query` and a bound value.
    writer
        .batch_execute("START TRANSACTION; UPDATE users SET name = 'Ann 3' WHERE id = 1; COMMIT;")
        .await
        .unwrap();
    eventually!(reader.name(&cache, 1).await, "Ann 3");
    diesel::sql_query("UPDATE users SET name = ? WHERE id = 1")
        .bind::<diesel::sql_types::Text, _>("Ann 4")
        .execute(&mut writer)
        .await
        .unwrap();
    eventually!(reader.name(&cache, 1).await, "Ann 4");
    assert!(handle.notifications() >= 3);
    // A write that rolls back moves no counter: the entry stays, a hit.
    hit!(reader, reader.name(&cache, 1).await, "Ann 4");
    let seen = handle.notifications();
    writer
        .batch_execute("START TRANSACTION; UPDATE users SET name = 'never' WHERE id = 1; ROLLBACK;")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handle.notifications(), seen);
    hit!(reader, reader.name(&cache, 1).await, "Ann 4");
    handle.stop().await;
}
on_both_stores!(raw_update: raw_update_memory, raw_update_redis);

async fn cascade(cache: Cache, db: &str) {
    let _handle = start(&cache, db).await;
    let mut reader = Reader::new(db).await;
    assert_eq!(reader.children(&cache).await, ["x", "y", "z"]);
    hit!(reader, reader.children(&cache).await, ["x", "y", "z"]);
    // InnoDB deletes the children without firing their triggers: the listener knows the
    // foreign key.
    mysql_again(db)
        .await
        .batch_execute("DELETE FROM parents WHERE id = 1")
        .await
        .unwrap();
    eventually!(reader.children(&cache).await, ["z"]);
    hit!(reader, reader.children(&cache).await, ["z"]);
}
on_both_stores!(cascade: cascade_memory, cascade_redis);

async fn other_trigger(cache: Cache, db: &str) {
    let _handle = start(&cache, db).await;
    let mut reader = Reader::new(db).await;
    assert_eq!(reader.titles(&cache).await, ["Ann"]);
    hit!(reader, reader.titles(&cache).await, ["Ann"]);
    // `copy_name` writes `posts`: its reads are invalidated, though nothing named them.
    mysql_again(db)
        .await
        .batch_execute("UPDATE users SET name = 'Ann B' WHERE id = 1")
        .await
        .unwrap();
    eventually!(reader.titles(&cache).await, ["Ann B"]);
    hit!(reader, reader.titles(&cache).await, ["Ann B"]);
}
on_both_stores!(other_trigger: other_trigger_memory, other_trigger_redis);

async fn stopped_and_restarted(cache: Cache, db: &str) {
    let handle = start(&cache, db).await;
    let mut reader = Reader::new(db).await;
    assert_eq!(reader.name(&cache, 1).await, "Ann");
    // A writer that keeps writing while the listener stops.
    let writer_db = db.to_owned();
    let writer = tokio::spawn(async move {
        let mut writer = mysql_again(&writer_db).await;
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
    let _ = reader.name(&cache, 1).await;
    writer.await.unwrap();
    let seen = reader.name(&cache, 1).await;
    // Without a listener, a write that bypasses memclone is not seen: the cache is stale.
    mysql_again(db)
        .await
        .batch_execute("UPDATE users SET name = 'Ann final' WHERE id = 1")
        .await
        .unwrap();
    hit!(reader, reader.name(&cache, 1).await, seen);
    assert_ne!(seen, "Ann final");
    let handle = start(&cache, db).await;
    // `start` invalidated every watched table before returning: fresh at once, no wait.
    let (name, statements) = counted!(reader.counter, reader.name(&cache, 1).await);
    assert_eq!((name.as_str(), statements), ("Ann final", 1));
    drop(handle);
}
on_both_stores!(stopped_and_restarted: restart_memory, restart_redis);

#[derive(QueryableByName)]
struct Named {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

async fn killed_connection(cache: Cache, db: &str) {
    let handle = start(&cache, db).await;
    let mut reader = Reader::new(db).await;
    assert_eq!(reader.name(&cache, 1).await, "Ann");
    let id = handle.connection_id();
    let mut admin = mysql_again(db).await;
    // The id is the listener's: its session is in this database.
    let in_db: Named = diesel::sql_query(format!(
        "SELECT DB AS name FROM information_schema.PROCESSLIST WHERE ID = {id}"
    ))
    .get_result(&mut admin)
    .await
    .unwrap();
    assert_eq!(in_db.name, db);
    admin.batch_execute(&format!("KILL {id}")).await.unwrap();
    // A write while the listener may be away: the reconnection's invalidation covers it.
    admin
        .batch_execute("UPDATE users SET name = 'Ann away' WHERE id = 1")
        .await
        .unwrap();
    eventually!(handle.reconnects() >= 1 && handle.is_healthy(), true);
    assert_ne!(handle.connection_id(), id);
    eventually!(reader.name(&cache, 1).await, "Ann away");
    // And it polls again.
    admin
        .batch_execute("UPDATE users SET name = 'Ann back' WHERE id = 1")
        .await
        .unwrap();
    eventually!(reader.name(&cache, 1).await, "Ann back");
    hit!(reader, reader.name(&cache, 1).await, "Ann back");
}
on_both_stores!(killed_connection: killed_connection_memory, killed_connection_redis);

#[tokio::test]
async fn bad_set_ups_fail_at_start() {
    let db = unique("listen");
    let Some(mut conn) = mysql(&db).await else {
        return;
    };
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let only = |table: &str| {
        listen::mariadb(mysql_url_of(&db))
            .tables([table])
            .cache(cache.clone())
    };
    // Nothing installed: no counter table.
    let err = only("users").start().await.unwrap_err();
    assert!(
        matches!(
            &err,
            ListenError::MariaDb(MariaDbSetupError::NoVersionsTable { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("mariadb_install_sql"), "{err}");
    // The counter table, but no trigger on `users`.
    conn.batch_execute(&listen::mariadb_install_sql(
        listen::MARIADB_VERSIONS_TABLE,
        &["posts"],
    ))
    .await
    .unwrap();
    let err = only("users").start().await.unwrap_err();
    assert!(
        matches!(&err, ListenError::MariaDb(MariaDbSetupError::MissingTrigger { table, trigger, .. })
            if table == "users" && trigger == "memclone_ai_users"),
        "{err}"
    );
    // Triggers that bump another counter table: out of date for this listener.
    conn.batch_execute(&listen::mariadb_install_sql("elsewhere", &["users"]))
        .await
        .unwrap();
    let err = only("users").start().await.unwrap_err();
    assert!(
        matches!(
            &err,
            ListenError::MariaDb(MariaDbSetupError::MissingTrigger { .. })
        ),
        "{err}"
    );
    // Reinstalled: starts. Uninstalled: fails again.
    conn.batch_execute(&listen::mariadb_install_sql(
        listen::MARIADB_VERSIONS_TABLE,
        &["users"],
    ))
    .await
    .unwrap();
    only("users").start().await.unwrap().stop().await;
    only(&format!("{db}.users"))
        .start()
        .await
        .unwrap()
        .stop()
        .await;
    conn.batch_execute(&listen::mariadb_uninstall_sql(
        listen::MARIADB_VERSIONS_TABLE,
        &["users"],
    ))
    .await
    .unwrap();
    let err = only("users").start().await.unwrap_err();
    assert!(
        matches!(
            &err,
            ListenError::MariaDb(MariaDbSetupError::MissingTrigger { .. })
        ),
        "{err}"
    );
    // A watched table whose parent's deletes cascade into it, without triggers on the parent.
    conn.batch_execute(
        "CREATE TABLE parents (id INTEGER PRIMARY KEY) ENGINE=InnoDB;
         CREATE TABLE children (id INTEGER PRIMARY KEY, parent_id INTEGER,
             FOREIGN KEY (parent_id) REFERENCES parents (id) ON DELETE SET NULL) ENGINE=InnoDB;",
    )
    .await
    .unwrap();
    conn.batch_execute(&listen::mariadb_install_sql(
        listen::MARIADB_VERSIONS_TABLE,
        &["children"],
    ))
    .await
    .unwrap();
    let err = only("children").start().await.unwrap_err();
    assert!(
        matches!(&err, ListenError::MariaDb(MariaDbSetupError::CascadeParentWithoutTriggers { table, parent, .. })
            if table == "children" && parent == "parents"),
        "{err}"
    );
    // A table that does not exist (here or in another database), a URL without a database,
    // a server that is not there.
    for table in ["nope", "elsewhere.users"] {
        let err = only(table).start().await.unwrap_err();
        assert!(matches!(err, ListenError::NoSuchTable(_)), "{err}");
    }
    let err = listen::mariadb(mysql_url_of(""))
        .tables(["users"])
        .cache(cache.clone())
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ListenError::MariaDb(MariaDbSetupError::NoDatabase)),
        "{err}"
    );
    let err = listen::mariadb("mysql://root@127.0.0.1:1/test")
        .tables(["users"])
        .cache(cache.clone())
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, ListenError::Connection(_)), "{err}");
    let err = listen::mariadb(mysql_url_of(&db))
        .cache(cache.clone())
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, ListenError::NoTables), "{err}");
}

/// A user that may read the tables but not the counters is refused at start, with the
/// server's words.
#[tokio::test]
async fn missing_rights_fail_at_start() {
    let db = unique("listen");
    let Some(mut conn) = mysql(&db).await else {
        return;
    };
    install(&mut conn).await;
    let user = unique("mc");
    conn.batch_execute(&format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'; \
         CREATE USER '{user}'@'localhost' IDENTIFIED BY 'pw'; \
         GRANT SELECT, TRIGGER ON {db}.users TO '{user}'@'%'; \
         GRANT SELECT, TRIGGER ON {db}.users TO '{user}'@'localhost';"
    ))
    .await
    .unwrap();
    let url = mysql_url_of(&db).replacen("root@", &format!("{user}:pw@"), 1);
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let err = listen::mariadb(url.clone())
        .tables(["users"])
        .cache(cache.clone())
        .start()
        .await
        .unwrap_err();
    let shown = err.to_string();
    // Granted the counters: starts.
    conn.batch_execute(&format!(
        "GRANT SELECT ON {db}.memclone_versions TO '{user}'@'%'; \
         GRANT SELECT ON {db}.memclone_versions TO '{user}'@'localhost';"
    ))
    .await
    .unwrap();
    let started = listen::mariadb(url)
        .tables(["users"])
        .cache(cache)
        .start()
        .await;
    conn.batch_execute(&format!(
        "DROP USER '{user}'@'%'; DROP USER '{user}'@'localhost';"
    ))
    .await
    .unwrap();
    assert!(matches!(err, ListenError::Database(_)), "{shown}");
    assert!(shown.contains("denied"), "{shown}");
    started
        .expect("a user with SELECT on the counters")
        .stop()
        .await;
}

/// Two in-process caches (two replicas with the embedded store, no Redis), each with its own
/// listener: a write through either, or from outside, reaches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_embedded_caches() {
    let db = unique("listen");
    let Some(mut conn) = mysql(&db).await else {
        return;
    };
    install(&mut conn).await;
    let a = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let b = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    let (_la, _lb) = (start(&a, &db).await, start(&b, &db).await);
    let (mut ra, mut rb) = (Reader::new(&db).await, Reader::new(&db).await);
    assert_eq!(ra.name(&a, 1).await, "Ann");
    assert_eq!(rb.name(&b, 1).await, "Ann");
    // Through memclone on `a`: `a` is fresh at once, `b` hears it from MariaDB.
    diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Ann A"))
        .using(&a)
        .execute(&mut ra.conn)
        .await
        .unwrap();
    assert_eq!(ra.name(&a, 1).await, "Ann A");
    eventually!(rb.name(&b, 1).await, "Ann A");
    diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Ann B"))
        .using(&b)
        .execute(&mut rb.conn)
        .await
        .unwrap();
    eventually!(ra.name(&a, 1).await, "Ann B");
}

/// A listener that lost its connection says so in the handle and in the cache's stats until it
/// is back or stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_listener_shows_in_stats() {
    let db = unique("listen");
    let Some(mut conn) = mysql(&db).await else {
        return;
    };
    install(&mut conn).await;
    let cache = Cache::builder()
        .namespace(unique("listen"))
        .build()
        .unwrap();
    // A reconnection far away: the listener stays down for the whole test.
    let handle = listener(&cache, &db)
        .backoff(Duration::from_secs(600), Duration::from_secs(600))
        .start()
        .await
        .unwrap();
    assert!(handle.is_healthy());
    assert_eq!(cache.stats().listeners_unhealthy, 0);
    conn.batch_execute(&format!("KILL {}", handle.connection_id()))
        .await
        .unwrap();
    eventually!(handle.is_healthy(), false);
    eventually!(cache.stats().listeners_unhealthy, 1);
    handle.stop().await;
    assert_eq!(cache.stats().listeners_unhealthy, 0);
}

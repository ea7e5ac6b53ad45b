//! The `memclone-listen` binary (package `diesel-memclone-listen`) against the real servers: a raw-SQL write invalidates an
//! application's cached read through it (database queries counted), SIGTERM stops it cleanly,
//! and its SQL printing matches the library's; with a `mysql://` URL, the same on MariaDB.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_memclone::listen;
use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(10);

/// The binary, from this test's target dir and profile. It belongs to another package:
/// `cargo test --workspace` builds it with the tests; alone, this test builds it when it is
/// missing (as tests/freshness.rs does its checker), with `cargo build -p diesel-memclone-listen`
/// (rebuild it that way after changing it).
fn binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let profile_dir = std::env::current_exe()
            .expect("test binary")
            .parent()
            .and_then(Path::parent)
            .expect("profile dir")
            .to_path_buf();
        let binary = profile_dir.join(format!("memclone-listen{}", std::env::consts::EXE_SUFFIX));
        if !binary.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build.args([
                "build",
                "-p",
                "diesel-memclone-listen",
                "--bin",
                "memclone-listen",
            ]);
            if profile_dir
                .file_name()
                .is_some_and(|name| name == "release")
            {
                build.arg("--release");
            }
            let status = build.status().expect("cargo build");
            assert!(status.success(), "building memclone-listen failed");
        }
        binary
    })
}

fn sidecar() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary());
    command.env_remove("DATABASE_URL").env_remove("REDIS_URL");
    command
}

#[tokio::test]
async fn prints_the_libraries_sql() {
    let tables = ["users", r#"app."Ledger""#];
    let output = sidecar()
        .args(["--print-install-sql", "--channel", "chan", "--tables"])
        .arg(tables.join(","))
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        listen::install_sql("chan", &tables).unwrap()
    );
    let output = sidecar()
        .args(["--print-uninstall-sql", "--tables"])
        .arg(tables.join(","))
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        listen::uninstall_sql(&tables).unwrap()
    );
    // Key columns: row-level triggers (a table without gets the table-level one).
    let keyed = listen::row_triggers("chan")
        .table("users", &["id"])
        .table("memberships", &["org_id", "user_id"])
        .table(r#"app."Ledger""#, &[] as &[&str]);
    for (flag, sql) in [
        ("--print-install-sql", keyed.install_sql().unwrap()),
        ("--print-uninstall-sql", keyed.uninstall_sql().unwrap()),
    ] {
        let output = sidecar()
            .args([flag, "--channel", "chan", "--tables"])
            .arg(r#"users(id),memberships(org_id, user_id),app."Ledger""#)
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        assert_eq!(String::from_utf8(output.stdout).unwrap(), sql);
    }
    // A channel that would break every write: refused, nothing printed.
    let output = sidecar()
        .args([
            "--print-install-sql",
            "--channel",
            "Bad Chan",
            "--tables",
            "t",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("channel"));
    // No tables, or an unknown flag: usage.
    let output = sidecar().arg("--frobnicate").output().await.unwrap();
    assert_eq!(output.status.code(), Some(2));
}

async fn name(conn: &mut AsyncPgConnection, cache: &Cache) -> String {
    users::table
        .find(1)
        .select(users::name)
        .cached("name")
        .using(cache)
        .get_result(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_write_invalidates_the_applications_cache() {
    let schema = unique("sidecar");
    let (Some(mut conn), Some(store)) = (postgres(&schema).await, redis_store().await) else {
        return;
    };
    conn.batch_execute("INSERT INTO users VALUES (1, 'Ann', 'a')")
        .await
        .unwrap();
    // The migration's SQL, as the binary prints it.
    let printed = sidecar()
        .args([
            "--print-install-sql",
            "--channel",
            &schema,
            "--tables",
            "users",
        ])
        .output()
        .await
        .unwrap();
    assert!(printed.status.success());
    conn.batch_execute(std::str::from_utf8(&printed.stdout).unwrap())
        .await
        .unwrap();
    // The application: a cache on Redis under a namespace of its own, no listener.
    let namespace = unique("sidecar");
    let cache = Cache::builder()
        .store(store)
        .namespace(&namespace)
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    assert_eq!(name(&mut conn, &cache).await, "Ann");

    let mut child = sidecar()
        .args([
            "--database-url",
            &postgres_url(),
            "--redis-url",
            &redis_url(),
        ])
        .args(["--namespace", &namespace, "--channel", &schema])
        .args(["--tables", &format!("{schema}.users")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .expect("the sidecar said nothing in 10 s")
        .unwrap()
        .expect("the sidecar ended before listening");
    assert!(ready.starts_with("memclone-listen: listening"), "{ready}");
    let pid: i32 = ready
        .rsplit_once("backend pid ")
        .and_then(|(_, pid)| pid.trim_end_matches(')').parse().ok())
        .expect("the backend pid");

    // Cached: no query. (The sidecar's start invalidated `users` once: one refill first.)
    let _ = name(&mut conn, &cache).await;
    let before = counter.get();
    assert_eq!(name(&mut conn, &cache).await, "Ann");
    assert_eq!(counter.get(), before, "served from the cache");
    // A write that bypasses memclone, from another connection.
    postgres_again(&schema)
        .await
        .batch_execute("UPDATE users SET name = 'Ann 2' WHERE id = 1")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let before = counter.get();
        let seen = name(&mut conn, &cache).await;
        if seen == "Ann 2" {
            assert_eq!(
                counter.get(),
                before + 1,
                "the fresh answer came from the database"
            );
            break;
        }
        assert_eq!(counter.get(), before, "a stale answer is a cache hit");
        assert!(Instant::now() < deadline, "still {seen:?} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = counter.get();
    assert_eq!(name(&mut conn, &cache).await, "Ann 2");
    assert_eq!(counter.get(), before, "cached again");

    // SIGTERM: it stops, says so, exits 0, and its backend is gone.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the sidecar did not stop in 10 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.contains("stopped (SIGTERM)"), "{stderr}");
    let deadline = Instant::now() + WAIT;
    loop {
        let backends: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            &format!("(SELECT count(*) FROM pg_stat_activity WHERE pid = {pid})"),
        ))
        .get_result(&mut conn)
        .await
        .unwrap();
        if backends == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "backend {pid} still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bad set-up is an error at start, exit status 1, with the library's message.
#[tokio::test]
async fn a_missing_trigger_fails_at_start() {
    let schema = unique("sidecar");
    let (Some(_conn), Some(_store)) = (postgres(&schema).await, redis_store().await) else {
        return;
    };
    let output = sidecar()
        .args([
            "--database-url",
            &postgres_url(),
            "--redis-url",
            &redis_url(),
        ])
        .args(["--channel", &schema, "--tables", &format!("{schema}.users")])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("install_sql"), "{stderr}");
}

async fn mariadb_name(conn: &mut diesel_async::AsyncMysqlConnection, cache: &Cache) -> String {
    users::table
        .find(1)
        .select(users::name)
        .cached("name")
        .using(cache)
        .get_result(conn)
        .await
        .unwrap()
}

/// With a `mysql://` URL: it prints `mariadb_install_sql`'s SQL, and runs MariaDB's listener, so
/// that a raw write invalidates the application's cached read; SIGTERM stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_mode() {
    let db = unique("sidecar");
    let (Some(mut conn), Some(store)) = (mysql(&db).await, redis_store().await) else {
        return;
    };
    let url = mysql_url_of(&db);
    conn.batch_execute("INSERT INTO users VALUES (1, 'Ann', 'a')")
        .await
        .unwrap();
    let printed = sidecar()
        .args([
            "--database-url",
            &url,
            "--print-install-sql",
            "--tables",
            "users",
        ])
        .output()
        .await
        .unwrap();
    assert!(printed.status.success());
    let up = String::from_utf8(printed.stdout).unwrap();
    assert_eq!(
        up,
        listen::mariadb_install_sql(listen::MARIADB_VERSIONS_TABLE, &["users"])
    );
    conn.batch_execute(&up).await.unwrap();
    let down = sidecar()
        .env("DATABASE_URL", &url)
        .args([
            "--print-uninstall-sql",
            "--versions-table",
            "vt",
            "--tables",
            "users",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(down.stdout).unwrap(),
        listen::mariadb_uninstall_sql("vt", &["users"])
    );

    let namespace = unique("sidecar");
    let cache = Cache::builder()
        .store(store)
        .namespace(&namespace)
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let mut child = sidecar()
        .args(["--database-url", &url, "--redis-url", &redis_url()])
        .args(["--namespace", &namespace, "--tables", "users"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .expect("the sidecar said nothing in 10 s")
        .unwrap()
        .expect("the sidecar ended before listening");
    assert!(
        ready.starts_with("memclone-listen: listening on MariaDB"),
        "{ready}"
    );
    assert_eq!(mariadb_name(&mut conn, &cache).await, "Ann");
    let before = counter.get();
    assert_eq!(mariadb_name(&mut conn, &cache).await, "Ann");
    assert_eq!(counter.get(), before, "served from the cache");
    mysql_again(&db)
        .await
        .batch_execute("UPDATE users SET name = 'Ann 2' WHERE id = 1")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = mariadb_name(&mut conn, &cache).await;
        if seen == "Ann 2" {
            break;
        }
        assert!(Instant::now() < deadline, "still {seen:?} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the sidecar did not stop in 10 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.contains("stopped (SIGTERM)"), "{stderr}");
    // Without the triggers: an error at start, exit status 1.
    conn.batch_execute(&listen::mariadb_uninstall_sql(
        listen::MARIADB_VERSIONS_TABLE,
        &["users"],
    ))
    .await
    .unwrap();
    let output = sidecar()
        .args(["--database-url", &url, "--redis-url", &redis_url()])
        .args(["--namespace", &namespace, "--tables", "users"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
}

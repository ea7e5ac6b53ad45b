//! `memclone-listen`: one listener process per deployment. It `LISTEN`s to the notifications of
//! the triggers `diesel_memclone::listen::install_sql` installs and bumps the generations in
//! Redis exactly as a memclone write would, under the applications' namespace, so that their
//! cached reads of a table written outside memclone (raw SQL, `psql`, another service) miss.
//! With a `mysql://` database URL it runs the MariaDB/MySQL listener instead
//! (`diesel_memclone::listen::mariadb`), which polls the counters of the triggers
//! `mariadb_install_sql` installs.
//!
//! ```text
//! memclone-listen --database-url postgres://.. --redis-url redis://.. \
//!     --namespace memclone --channel memclone --tables users,app.ledger
//! memclone-listen --print-install-sql --tables users,app.ledger > up.sql
//! memclone-listen --print-install-sql --tables 'users(id),memberships(org_id,user_id)' > up.sql
//! memclone-listen --database-url mysql://.. --print-install-sql --tables users > up.sql
//! ```
//!
//! Arguments are parsed by hand: a handful of flags, and a sidecar that builds without another
//! dependency (clap would add about ten crates for no behaviour the users need).

use diesel_memclone::listen::{self, ListenHandle};
use diesel_memclone::store::RedisStore;
use diesel_memclone::Cache;
use std::io::Write as _;
use std::process::ExitCode;

const USAGE: &str = "\
memclone-listen: invalidate diesel-memclone's Redis cache on every write PostgreSQL or
MariaDB/MySQL commits

USAGE:
    memclone-listen [OPTIONS] --tables TABLE[,TABLE..]
    memclone-listen --print-install-sql [--channel NAME] --tables TABLE[,TABLE..]
    memclone-listen --print-uninstall-sql --tables TABLE[,TABLE..]
    memclone-listen --database-url mysql://.. --print-install-sql [--versions-table NAME] \
        --tables TABLE[,TABLE..]

OPTIONS:
    --database-url URL       PostgreSQL, a direct connection (not through PgBouncer's
                             transaction pooling), or MariaDB/MySQL (a mysql:// URL)
                             [env: DATABASE_URL]
    --redis-url URL          the applications' Redis (redis:// or rediss://) [env: REDIS_URL]
    --redis-cluster URLS     a Redis Cluster instead: its nodes, comma-separated
    --namespace NAME         the applications' cache namespace [default: memclone]
    --channel NAME           the triggers' channel (PostgreSQL) [default: memclone]
    --versions-table NAME    the triggers' counter table (MariaDB/MySQL)
                             [default: memclone_versions]
    --tables LIST            the tables to watch, comma-separated (`users`, `app.ledger`,
                             `\"Ledger\"`); may be repeated. PostgreSQL: a table followed by
                             its primary key's columns (`users(id)`, `m(org_id,user_id)`) gets
                             row-level triggers from --print-install-sql (listen::row_triggers)
    --print-install-sql      print the SQL that installs the triggers (for a migration), exit:
                             MariaDB/MySQL's when the database URL is a mysql:// one
    --print-uninstall-sql    print the SQL that removes them, exit
    -h, --help               print this, exit
    -V, --version            print the version, exit

It starts only if every table has its trigger; then it invalidates every watched table once,
prints one line to stdout (`memclone-listen: listening ..`) and runs until SIGTERM or SIGINT,
reconnecting when the connection drops (each reconnection invalidates every watched table
again). Logs go to stderr, filtered by RUST_LOG (default: info).
Exit status: 0 stopped by a signal, 1 could not start, 2 bad arguments.
";

/// Where the cache lives.
#[derive(Debug)]
enum Redis {
    Url(String),
    Cluster(Vec<String>),
}

/// The database, and what its listener needs besides the tables.
#[derive(Debug, Clone, PartialEq)]
enum Database {
    /// PostgreSQL: the channel the triggers notify.
    Postgres { channel: String },
    /// MariaDB/MySQL: the counter table the triggers bump.
    MariaDb { versions_table: String },
}

impl Database {
    /// MariaDB/MySQL for a `mysql://` or `mariadb://` URL (any case), PostgreSQL otherwise
    /// (`postgres://`, `postgresql://` or a `key=value` connection string).
    fn of(url: Option<&str>, channel: String, versions_table: String) -> Self {
        let mysql = |url: &str| {
            ["mysql://", "mariadb://"].iter().any(|scheme| {
                url.get(..scheme.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
            })
        };
        match url.is_some_and(mysql) {
            true => Database::MariaDb { versions_table },
            false => Database::Postgres { channel },
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
enum Command {
    Run {
        database_url: String,
        database: Database,
        redis: Redis,
        namespace: String,
        tables: Vec<String>,
    },
    PrintInstall {
        database: Database,
        tables: Vec<Keyed>,
    },
    PrintUninstall {
        database: Database,
        tables: Vec<Keyed>,
    },
    Help,
    Version,
}

/// A table and its key columns (none: table-level triggers).
type Keyed = (String, Vec<String>);

/// Splits a comma-separated list of tables, keeping commas inside double quotes (`"a,b"`) and
/// inside a table's key columns (`m(org_id,user_id)`).
fn split_tables(list: &str, out: &mut Vec<String>) {
    let mut current = String::new();
    let mut quoted = false;
    let mut depth = 0_usize;
    for c in list.chars() {
        match c {
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth == 0 => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current);
    out.retain(|t| !t.trim().is_empty());
}

/// A table of `--tables` and its key columns: `users`, or `users(id)`.
fn keyed(spec: &str) -> Result<Keyed, String> {
    let mut quoted = false;
    for (i, c) in spec.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '(' if !quoted => {
                let columns = spec[i + 1..]
                    .trim_end()
                    .strip_suffix(')')
                    .ok_or_else(|| format!("table {spec:?}: its key columns lack a `)`"))?;
                let columns: Vec<String> = columns
                    .split(',')
                    .map(|c| c.trim().to_owned())
                    .filter(|c| !c.is_empty())
                    .collect();
                return Ok((spec[..i].trim().to_owned(), columns));
            }
            _ => {}
        }
    }
    Ok((spec.trim().to_owned(), Vec::new()))
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut database_url = std::env::var("DATABASE_URL").ok();
    let mut redis_url = std::env::var("REDIS_URL").ok();
    let mut cluster = None;
    let mut namespace = "memclone".to_owned();
    let mut channel = listen::DEFAULT_CHANNEL.to_owned();
    let mut versions_table = listen::MARIADB_VERSIONS_TABLE.to_owned();
    let mut tables = Vec::new();
    let (mut print_install, mut print_uninstall) = (false, false);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // `--flag value` or `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.into())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--database-url" => database_url = Some(value()?),
            "--redis-url" => redis_url = Some(value()?),
            "--redis-cluster" => {
                let urls: Vec<String> = value()?
                    .split(',')
                    .map(|u| u.trim().to_owned())
                    .filter(|u| !u.is_empty())
                    .collect();
                cluster = Some(urls);
            }
            "--namespace" => namespace = value()?,
            "--channel" => channel = value()?,
            "--versions-table" => versions_table = value()?,
            "--tables" | "--table" => split_tables(&value()?, &mut tables),
            "--print-install-sql" => print_install = true,
            "--print-uninstall-sql" => print_uninstall = true,
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if tables.is_empty() {
        return Err("no table to watch: give --tables".into());
    }
    let keyed = tables
        .iter()
        .map(|t| keyed(t))
        .collect::<Result<Vec<Keyed>, String>>()?;
    let tables: Vec<String> = keyed.iter().map(|(t, _)| t.clone()).collect();
    let database = Database::of(database_url.as_deref(), channel, versions_table);
    if matches!(database, Database::MariaDb { .. }) && keyed.iter().any(|(_, c)| !c.is_empty()) {
        return Err("key columns (`users(id)`) are for PostgreSQL's row-level triggers".into());
    }
    let tables_keyed = keyed;
    match (print_install, print_uninstall) {
        (true, true) => {
            return Err("--print-install-sql and --print-uninstall-sql exclude each other".into())
        }
        (true, false) => {
            return Ok(Command::PrintInstall {
                database,
                tables: tables_keyed,
            })
        }
        (false, true) => {
            return Ok(Command::PrintUninstall {
                database,
                tables: tables_keyed,
            })
        }
        (false, false) => {}
    }
    let database_url = database_url.ok_or("no database: give --database-url or DATABASE_URL")?;
    let redis = match (cluster, redis_url) {
        (Some(urls), _) if urls.is_empty() => return Err("--redis-cluster has no URL".into()),
        (Some(urls), _) => Redis::Cluster(urls),
        (None, Some(url)) => Redis::Url(url),
        (None, None) => {
            return Err("no Redis: give --redis-url (or REDIS_URL) or --redis-cluster".into())
        }
    };
    Ok(Command::Run {
        database_url,
        database,
        redis,
        namespace,
        tables,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let command = match parse(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("memclone-listen: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let printed = match command {
        Command::Help => Ok(USAGE.to_owned()),
        Command::Version => Ok(format!("memclone-listen {}\n", env!("CARGO_PKG_VERSION"))),
        Command::PrintInstall { database, tables } => match database {
            Database::Postgres { channel } if row_level(&tables) => {
                row_triggers(&channel, &tables).install_sql()
            }
            Database::Postgres { channel } => listen::install_sql(&channel, &names(&tables)),
            Database::MariaDb { versions_table } => Ok(listen::mariadb_install_sql(
                &versions_table,
                &names(&tables),
            )),
        },
        Command::PrintUninstall { database, tables } => match database {
            Database::Postgres { channel } if row_level(&tables) => {
                row_triggers(&channel, &tables).uninstall_sql()
            }
            Database::Postgres { .. } => listen::uninstall_sql(&names(&tables)),
            Database::MariaDb { versions_table } => Ok(listen::mariadb_uninstall_sql(
                &versions_table,
                &names(&tables),
            )),
        },
        Command::Run {
            database_url,
            database,
            redis,
            namespace,
            tables,
        } => return run(database_url, database, redis, namespace, tables).await,
    };
    match printed {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// Some table has key columns: row-level triggers (a table without gets the table-level one).
fn row_level(tables: &[Keyed]) -> bool {
    tables.iter().any(|(_, columns)| !columns.is_empty())
}

fn row_triggers(channel: &str, tables: &[Keyed]) -> listen::RowTriggers {
    tables.iter().fold(
        listen::row_triggers(channel),
        |triggers, (table, columns)| triggers.table(table, columns),
    )
}

fn names(tables: &[Keyed]) -> Vec<String> {
    tables.iter().map(|(t, _)| t.clone()).collect()
}

async fn run(
    database_url: String,
    database: Database,
    redis: Redis,
    namespace: String,
    tables: Vec<String>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let store = match &redis {
        Redis::Url(url) => RedisStore::builder(url.clone()).build(),
        Redis::Cluster(urls) => RedisStore::cluster_builder(urls.iter().cloned()).build(),
    };
    // The same namespace and key layout as the applications' caches: the bumps land on the
    // generations their entries are tagged with.
    let cache =
        match store.and_then(|store| Cache::builder().store(store).namespace(&namespace).build()) {
            Ok(cache) => cache,
            Err(e) => {
                eprintln!("memclone-listen: bad Redis set-up: {e}");
                return ExitCode::from(1);
            }
        };
    let started = match &database {
        Database::Postgres { channel } => {
            listen::postgres(database_url)
                .tables(&tables)
                .channel(channel)
                .cache(cache.clone())
                .start()
                .await
        }
        Database::MariaDb { versions_table } => {
            listen::mariadb(database_url)
                .tables(&tables)
                .versions_table(versions_table)
                .cache(cache.clone())
                .start()
                .await
        }
    };
    let handle = match started {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    // `start` invalidated every watched table: one it could not deliver means Redis is not
    // there, and a sidecar that cannot invalidate must not look healthy.
    let undelivered = cache.undelivered_invalidations();
    if !undelivered.is_empty() {
        eprintln!(
            "memclone-listen: cannot reach Redis: the invalidations of {undelivered:?} were not \
             delivered"
        );
        handle.stop().await;
        return ExitCode::from(1);
    }
    match &database {
        Database::Postgres { channel } => println!(
            "memclone-listen: listening on channel {channel} for {} (namespace {namespace}, \
             backend pid {})",
            tables.join(","),
            handle.backend_pid()
        ),
        Database::MariaDb { versions_table } => println!(
            "memclone-listen: listening on MariaDB counter table {versions_table} for {} \
             (namespace {namespace}, connection id {})",
            tables.join(","),
            handle.connection_id()
        ),
    }
    let _ = std::io::stdout().flush();
    let signal = wait_for_signal().await;
    stop(handle, signal).await;
    // Invalidations Redis has not taken yet live only in this process: deliver them before it
    // ends, or the applications would serve those tables stale until their TTL.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cache.deliver_invalidations().await {
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "memclone-listen: the invalidations of {:?} were not delivered: those tables can \
                 be served stale until their TTL",
                cache.undelivered_invalidations()
            );
            return ExitCode::from(1);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ExitCode::SUCCESS
}

async fn stop(handle: ListenHandle, signal: &str) {
    tracing::info!(
        signal,
        notifications = handle.notifications(),
        reconnects = handle.reconnects(),
        "memclone-listen stopping"
    );
    handle.stop().await;
    eprintln!("memclone-listen: stopped ({signal})");
}

/// SIGTERM (what a container runtime sends) or SIGINT (Ctrl-C).
#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn tables_split() {
        let mut out = Vec::new();
        split_tables(r#"users, app.ledger,"a,b",,m(a, b),"x(".y(c)"#, &mut out);
        assert_eq!(
            out,
            [
                "users",
                " app.ledger",
                r#""a,b""#,
                "m(a, b)",
                r#""x(".y(c)"#
            ]
        );
        assert_eq!(keyed("users").unwrap(), ("users".to_owned(), vec![]));
        assert_eq!(
            keyed(" m( a, b ) ").unwrap(),
            ("m".to_owned(), vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(
            keyed(r#""x(".y(c)"#).unwrap(),
            (r#""x(".y"#.to_owned(), vec!["c".to_owned()])
        );
        assert!(keyed("m(a").is_err());
    }

    #[test]
    fn parses() {
        match parse(args(
            "--database-url=pg --redis-cluster a,b --namespace ns --channel ch --tables t1,t2 --table t3",
        )) {
            Ok(Command::Run {
                database_url,
                database: Database::Postgres { channel },
                redis: Redis::Cluster(urls),
                namespace,
                tables,
            }) => {
                assert_eq!(database_url, "pg");
                assert_eq!(urls, ["a", "b"]);
                assert_eq!((namespace.as_str(), channel.as_str()), ("ns", "ch"));
                assert_eq!(tables, ["t1", "t2", "t3"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(args("--print-install-sql --tables t")),
            Ok(Command::PrintInstall { .. })
        ));
        match parse(args(
            "--database-url mysql://root@h/db --redis-url r --versions-table vt --tables t",
        )) {
            Ok(Command::Run {
                database: Database::MariaDb { versions_table },
                ..
            }) => assert_eq!(versions_table, "vt"),
            other => panic!("{other:?}"),
        }
        for url in ["mariadb://root@h/db", "MySQL://h/db"] {
            assert!(matches!(
                parse(args(&format!(
                    "--database-url {url} --print-install-sql --tables t"
                ))),
                Ok(Command::PrintInstall {
                    database: Database::MariaDb { .. },
                    ..
                })
            ));
        }
        assert!(matches!(
            parse(args(
                "--database-url mysql://h/db --print-install-sql --tables t"
            )),
            Ok(Command::PrintInstall {
                database: Database::MariaDb { .. },
                ..
            })
        ));
        assert!(parse(args(
            "--database-url mysql://h/db --print-install-sql --tables t(id)"
        ))
        .is_err());
        assert!(parse(args("--tables")).is_err());
        assert!(parse(args("--database-url pg --redis-url r")).is_err());
        assert!(parse(args("--bogus")).is_err());
        assert!(parse(args("--print-install-sql --print-uninstall-sql --tables t")).is_err());
    }
}

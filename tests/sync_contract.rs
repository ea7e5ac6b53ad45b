//! Contract points of `contract.rs` that touch the synchronous driver's own code (its
//! transaction tracking, RETURNING write-through, key-changing writes), on PostgreSQL + Redis
//! and MariaDB + Redis (which has no RETURNING: a write evicts every entity of its table) from
//! plain threads, with database query counts.

use diesel::prelude::*;
use diesel_memclone::sync as memclone;
use diesel_memclone::sync::prelude::*;
use diesel_memclone::{Cache, Error};
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;

fn user(id: i32, name: &str, status: &str) -> User {
    User {
        id,
        name: name.into(),
        status: status.into(),
    }
}

fn setup(prefix: &str) -> Option<(PgConnection, String, Cache)> {
    let schema = unique(prefix);
    let (Some(conn), Some(store)) = (postgres_sync(&schema), redis_store_sync()) else {
        return None;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique(prefix))
        .build()
        .unwrap();
    Some((conn, schema, cache))
}

fn setup_mariadb(prefix: &str) -> Option<(MysqlConnection, String, Cache)> {
    let database = unique(prefix);
    let (Some(conn), Some(store)) = (mysql_sync(&database), redis_store_sync()) else {
        return None;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique(prefix))
        .build()
        .unwrap();
    Some((conn, database, cache))
}

fn connect_again(schema: &str) -> PgConnection {
    use diesel::connection::SimpleConnection;
    let mut conn = PgConnection::establish(&postgres_url()).unwrap();
    conn.batch_execute(&format!("SET search_path TO {schema}"))
        .unwrap();
    conn
}

/// The user names in id order, read through the cache under the label `names`.
macro_rules! names {
    ($cache:expr, $conn:expr) => {
        users::table
            .select(users::name)
            .order(users::id)
            .cached("names")
            .using($cache)
            .load::<String, _>($conn)
            .unwrap()
    };
}

#[test]
fn a_cached_not_found_is_invalidated_by_the_insert() {
    let Some((mut conn, _, cache)) = setup("snf") else {
        return;
    };
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    let blocking = cache.blocking();
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 5).unwrap()
    );
    assert_eq!((none, queries), (None, 1));
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 5).unwrap()
    );
    assert_eq!((none, queries), (None, 0), "not-found is cached");
    assert_eq!(
        blocking.find_optional::<User, _>(&mut conn, 6).unwrap(),
        None
    );
    let inserted: User = memclone::insert_into(users::table)
        .values(&user(5, "Eve", "a"))
        .using(&cache)
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(inserted.name, "Eve");
    let (found, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 5).unwrap()
    );
    assert_eq!(
        (found.map(|u| u.name), queries),
        (Some("Eve".to_string()), 0),
        "the insert replaced the cached not-found with the row it returned"
    );
    let (_, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 6).unwrap()
    );
    assert_eq!(
        queries, 0,
        "RETURNING named the row: other rows' entries stay"
    );
}

#[test]
fn deletes_and_key_changing_updates_never_leave_a_row_behind() {
    let Some((mut conn, _, cache)) = setup("sdel") else {
        return;
    };
    for row in [user(1, "Ann", "a"), user(2, "Bob", "b")] {
        memclone::insert_into(users::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .unwrap();
    }
    let blocking = cache.blocking();
    assert_eq!(blocking.find::<User, _>(&mut conn, 1).unwrap().name, "Ann");
    assert_eq!(blocking.find::<User, _>(&mut conn, 2).unwrap().name, "Bob");
    let deleted: Vec<User> = memclone::delete(users::table.find(1))
        .map(|s| s.returning(users::all_columns))
        .using(&cache)
        .get_results(&mut conn)
        .unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        blocking.find_optional::<User, _>(&mut conn, 1).unwrap(),
        None
    );
    let moved: User = memclone::update(users::table.find(2))
        .set(users::id.eq(20))
        .map(|s| s.returning(users::all_columns))
        .using(&cache)
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(moved.id, 20);
    assert_eq!(
        blocking.find_optional::<User, _>(&mut conn, 2).unwrap(),
        None,
        "the old key is evicted"
    );
    assert_eq!(blocking.find::<User, _>(&mut conn, 20).unwrap().name, "Bob");
}

/// The same on MariaDB, which has no RETURNING: the insert evicts every entity of the table.
#[test]
fn a_cached_not_found_is_invalidated_by_the_insert_mariadb() {
    let Some((mut conn, _, cache)) = setup_mariadb("snf") else {
        return;
    };
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    let blocking = cache.blocking();
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 5).unwrap()
    );
    assert_eq!((none, queries), (None, 1));
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 5).unwrap()
    );
    assert_eq!((none, queries), (None, 0), "not-found is cached");
    assert_eq!(
        blocking.find_optional::<User, _>(&mut conn, 6).unwrap(),
        None
    );
    let (inserted, queries) = counted!(
        counter,
        memclone::insert_into(users::table)
            .values(&user(5, "Eve", "a"))
            .using(&cache)
            .execute(&mut conn)
            .unwrap()
    );
    assert_eq!((inserted, queries), (1, 1));
    let (found, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 5).unwrap());
    assert_eq!((found.name.as_str(), queries), ("Eve", 1));
    let (found, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 5).unwrap());
    assert_eq!((found.name.as_str(), queries), ("Eve", 0), "then a hit");
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 6).unwrap()
    );
    assert_eq!(
        (none, queries),
        (None, 1),
        "no RETURNING: the other rows' entries went too"
    );
}

/// The same on MariaDB, without RETURNING: the table's entities are evicted.
#[test]
fn deletes_and_key_changing_updates_never_leave_a_row_behind_mariadb() {
    let Some((mut conn, _, cache)) = setup_mariadb("sdel") else {
        return;
    };
    for row in [user(1, "Ann", "a"), user(2, "Bob", "b")] {
        memclone::insert_into(users::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .unwrap();
    }
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    let blocking = cache.blocking();
    assert_eq!(blocking.find::<User, _>(&mut conn, 1).unwrap().name, "Ann");
    assert_eq!(blocking.find::<User, _>(&mut conn, 2).unwrap().name, "Bob");
    let (_, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 2).unwrap());
    assert_eq!(queries, 0, "cached");
    let deleted = memclone::delete(users::table.find(1))
        .using(&cache)
        .execute(&mut conn)
        .unwrap();
    assert_eq!(deleted, 1);
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 1).unwrap()
    );
    assert_eq!((none, queries), (None, 1));
    assert_eq!(blocking.find::<User, _>(&mut conn, 2).unwrap().name, "Bob");
    let moved = memclone::update(users::table.find(2))
        .set(users::id.eq(20))
        .using(&cache)
        .execute(&mut conn)
        .unwrap();
    assert_eq!(moved, 1);
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 2).unwrap()
    );
    assert_eq!((none, queries), (None, 1), "the old key is evicted");
    let (bob, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 20).unwrap());
    assert_eq!((bob.name.as_str(), queries), ("Bob", 1));
}

/// A write on another connection inside a memclone transaction is not deferred to that
/// transaction's commit: it is delivered at once.
macro_rules! a_transaction_defers_only_its_own_connection {
    ($setup:ident, $connect_again:ident) => {{
        let Some((mut conn, schema, cache)) = $setup("sconns") else {
            return;
        };
        let mut other = $connect_again(&schema);
        memclone::insert_into(users::table)
            .values(&user(1, "Ann", "a"))
            .using(&cache)
            .execute(&mut conn)
            .unwrap();
        assert_eq!(names!(&cache, &mut conn), ["Ann"]);
        let outcome: Result<(), Error> = memclone::transaction(&mut conn, |_conn| {
            memclone::update(users::table.find(1))
                .set(users::name.eq("Anne"))
                .using(&cache)
                .execute(&mut other)?;
            Err(Error::Database(diesel::result::Error::RollbackTransaction))
        });
        assert!(outcome.is_err());
        assert_eq!(names!(&cache, &mut conn), ["Anne"]);
    }};
}

#[test]
fn a_transaction_defers_only_its_own_connection() {
    a_transaction_defers_only_its_own_connection!(setup, connect_again);
}

#[test]
fn a_transaction_defers_only_its_own_connection_mariadb() {
    a_transaction_defers_only_its_own_connection!(setup_mariadb, mysql_sync_again);
}

/// Transactions on two connections, one inside the other: each connection's writes wait for
/// its own commit, a savepoint's writes for the outermost commit, and a rolled-back inner
/// transaction leaves nothing.
macro_rules! nested_transactions_on_two_connections {
    ($setup:ident, $connect_again:ident) => {{
        let Some((mut conn, schema, cache)) = $setup("snest") else {
            return;
        };
        let mut other = $connect_again(&schema);
        let mut reader = $connect_again(&schema);
        memclone::insert_into(users::table)
            .values(&user(1, "Ann", "a"))
            .using(&cache)
            .execute(&mut conn)
            .unwrap();
        assert_eq!(names!(&cache, &mut reader), ["Ann"]);
        memclone::transaction(&mut conn, |conn| {
            memclone::transaction(&mut other, |other| {
                memclone::insert_into(users::table)
                    .values(&user(2, "Bob", "b"))
                    .using(&cache)
                    .execute(other)
            })?;
            // `other` committed: its write is visible, and delivered.
            assert_eq!(names!(&cache, &mut reader), ["Ann", "Bob"]);
            // A savepoint on `conn` whose write waits for the outer commit.
            memclone::transaction(conn, |conn| {
                memclone::update(users::table.find(1))
                    .set(users::name.eq("Anne"))
                    .using(&cache)
                    .execute(conn)
            })?;
            assert_eq!(
                names!(&cache, &mut reader),
                ["Ann", "Bob"],
                "not committed yet: the entry stays"
            );
            // Inside its transaction, `conn` reads its own writes from the database.
            assert_eq!(names!(&cache, conn), ["Anne", "Bob"]);
            // An inner transaction on `other` that rolls back leaves nothing.
            let failed: Result<(), Error> = memclone::transaction(&mut other, |other| {
                memclone::delete(users::table.find(2))
                    .using(&cache)
                    .execute(other)?;
                Err(Error::Database(diesel::result::Error::RollbackTransaction))
            });
            assert!(failed.is_err());
            Ok::<_, Error>(())
        })
        .unwrap();
        assert_eq!(names!(&cache, &mut reader), ["Anne", "Bob"]);
    }};
}

#[test]
fn nested_transactions_on_two_connections() {
    nested_transactions_on_two_connections!(setup, connect_again);
}

#[test]
fn nested_transactions_on_two_connections_mariadb() {
    nested_transactions_on_two_connections!(setup_mariadb, mysql_sync_again);
}

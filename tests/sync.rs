//! The synchronous API (`diesel_memclone::sync`) on `diesel::Connection`s: reads, writes,
//! transactions and the threads it may be called from, with database query counts.

use diesel::prelude::*;
use diesel_memclone::sync as memclone;
use diesel_memclone::sync::prelude::*;
use diesel_memclone::{Cache, Error};
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::{counted, sqlite_sync, unique, QueryCounter, User};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn memory_cache() -> Cache {
    Cache::builder().namespace(unique("sync")).build().unwrap()
}

fn user(id: i32, name: &str, status: &str) -> User {
    User {
        id,
        name: name.into(),
        status: status.into(),
    }
}

/// Two users, written through memclone.
fn seed(conn: &mut SqliteConnection, cache: &Cache) {
    for row in [user(1, "Ada", "active"), user(2, "Bob", "away")] {
        memclone::insert_into(users::table)
            .values(&row)
            .using(cache)
            .execute(conn)
            .unwrap();
    }
}

#[test]
fn cached_reads_miss_then_hit_and_writes_invalidate() {
    let cache = memory_cache();
    let mut conn = sqlite_sync();
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    seed(&mut conn, &cache);
    let active = || {
        users::table
            .filter(users::status.eq("active"))
            .order(users::id)
            .cached("active")
            .using(&cache)
    };

    let (rows, queries) = counted!(counter, active().load::<User, _>(&mut conn).unwrap());
    assert_eq!((rows.len(), queries), (1, 1), "miss");
    let (rows, queries) = counted!(counter, active().load::<User, _>(&mut conn).unwrap());
    assert_eq!((rows.len(), queries), (1, 0), "hit");

    let one = || users::table.find(1).cached("one").using(&cache);
    let (ada, queries) = counted!(counter, one().get_result::<User, _>(&mut conn).unwrap());
    assert_eq!((ada.name.as_str(), queries), ("Ada", 1));
    let (_, queries) = counted!(counter, one().get_result::<User, _>(&mut conn).unwrap());
    assert_eq!(queries, 0);
    let first = || {
        users::table
            .order(users::id.desc())
            .cached("first")
            .using(&cache)
    };
    let (bob, queries) = counted!(counter, first().first::<User, _>(&mut conn).unwrap());
    assert_eq!((bob.name.as_str(), queries), ("Bob", 1));
    let (_, queries) = counted!(counter, first().first::<User, _>(&mut conn).unwrap());
    assert_eq!(queries, 0);
    let count = || users::table.cached("count").using(&cache);
    let (n, queries) = counted!(counter, count().count(&mut conn).unwrap());
    assert_eq!((n, queries), (2, 1));
    let (n, queries) = counted!(counter, count().count(&mut conn).unwrap());
    assert_eq!((n, queries), (2, 0));
    // No row is NotFound, and that answer is cached too.
    let missing = || users::table.find(9).cached("one").using(&cache);
    let (err, queries) = counted!(
        counter,
        missing().get_result::<User, _>(&mut conn).unwrap_err()
    );
    assert!(err.is_not_found());
    assert_eq!(queries, 1);
    let (_, queries) = counted!(
        counter,
        missing().get_result::<User, _>(&mut conn).unwrap_err()
    );
    assert_eq!(queries, 0);

    // A custom key, a TTL and a dependency the SQL does not name.
    let keyed = || {
        users::table
            .select(users::name)
            .order(users::id)
            .cached("names")
            .key("all_names")
            .ttl(std::time::Duration::from_secs(60))
            .depends_on("posts")
            .using(&cache)
    };
    let (names, queries) = counted!(counter, keyed().load::<String, _>(&mut conn).unwrap());
    assert_eq!((names.len(), queries), (2, 1));
    let (_, queries) = counted!(counter, keyed().load::<String, _>(&mut conn).unwrap());
    assert_eq!(queries, 0);
    memclone::write(diesel::sql_query("DELETE FROM posts"))
        .using(&cache)
        .execute(&mut conn)
        .unwrap();
    let (_, queries) = counted!(counter, keyed().load::<String, _>(&mut conn).unwrap());
    assert_eq!(queries, 1, "a write to the dependency invalidates");

    // Entities.
    let blocking = cache.blocking();
    let (ada, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 1).unwrap());
    assert_eq!((ada.name.as_str(), queries), ("Ada", 1));
    let (_, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 1).unwrap());
    assert_eq!(queries, 0);
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 7).unwrap()
    );
    assert_eq!((none, queries), (None, 1));
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 7).unwrap()
    );
    assert_eq!((none, queries), (None, 0));

    // An invalidating update: the query and the entity read the new name once, then hit.
    let (changed, queries) = counted!(
        counter,
        memclone::update(users::table.filter(users::id.eq(1)))
            .set(users::name.eq("Ada L."))
            .using(&cache)
            .execute(&mut conn)
            .unwrap()
    );
    assert_eq!((changed, queries), (1, 1));
    let (rows, queries) = counted!(counter, active().load::<User, _>(&mut conn).unwrap());
    assert_eq!((rows[0].name.as_str(), queries), ("Ada L.", 1));
    let (_, queries) = counted!(counter, active().load::<User, _>(&mut conn).unwrap());
    assert_eq!(queries, 0);
    let (ada, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 1).unwrap());
    assert_eq!((ada.name.as_str(), queries), ("Ada L.", 1));
}

#[test]
fn returning_writes_through_and_the_default_cache_serves_find() {
    let cache = memory_cache();
    let mut conn = sqlite_sync();
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    seed(&mut conn, &cache);
    let blocking = cache.blocking();
    blocking.find::<User, _>(&mut conn, 2).unwrap();
    let (bob, queries) = counted!(
        counter,
        memclone::update(users::table.filter(users::id.eq(2)))
            .set(users::name.eq("Robert"))
            .map(|s| s.returning(users::all_columns))
            .using(&cache)
            .get_result::<User, _>(&mut conn)
            .unwrap()
    );
    assert_eq!((bob.name.as_str(), queries), ("Robert", 1));
    // Written through: the entity is a hit with the new name.
    let (bob, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 2).unwrap());
    assert_eq!((bob.name.as_str(), queries), ("Robert", 0));
    let (gone, queries) = counted!(
        counter,
        memclone::delete(users::table.filter(users::id.eq(2)))
            .using(&cache)
            .execute(&mut conn)
            .unwrap()
    );
    assert_eq!((gone, queries), (1, 1));
    let (none, queries) = counted!(
        counter,
        blocking.find_optional::<User, _>(&mut conn, 2).unwrap()
    );
    assert_eq!((none, queries), (None, 1));

    // Plain Diesel bypasses the cache; reload reads the database and refreshes the entry.
    let mut ada = blocking.find::<User, _>(&mut conn, 1).unwrap();
    diesel::update(users::table.find(1))
        .set(users::name.eq("Alicia"))
        .execute(&mut conn)
        .unwrap();
    assert_eq!(blocking.find::<User, _>(&mut conn, 1).unwrap().name, "Ada");
    blocking.reload(&mut ada, &mut conn).unwrap();
    assert_eq!(ada.name, "Alicia");
    let (ada, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 1).unwrap());
    assert_eq!((ada.name.as_str(), queries), ("Alicia", 0));

    // The process-wide default cache.
    let mut other = sqlite_sync();
    other.set_instrumentation(counter.clone());
    memclone::insert_into(users::table)
        .values(&user(5, "Eve", "active"))
        .execute(&mut other)
        .unwrap();
    let (eve, queries) = counted!(counter, memclone::find::<User, _>(&mut other, 5).unwrap());
    assert_eq!((eve.name.as_str(), queries), ("Eve", 1));
    let (_, queries) = counted!(counter, memclone::find::<User, _>(&mut other, 5).unwrap());
    assert_eq!(queries, 0);
    // The derive's synchronous `find_cached`.
    let (eve, queries) = counted!(counter, User::find_cached_blocking(&mut other, 5).unwrap());
    assert_eq!((eve.name.as_str(), queries), ("Eve", 0));
}

#[test]
fn transactions_invalidate_after_commit_and_unmanaged_ones_refuse_writes() {
    let cache = memory_cache();
    let mut conn = sqlite_sync();
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    seed(&mut conn, &cache);
    let all = || users::table.order(users::id).cached("all").using(&cache);
    assert_eq!(all().load::<User, _>(&mut conn).unwrap().len(), 2);

    memclone::transaction(&mut conn, |conn| {
        memclone::insert_into(users::table)
            .values(&user(3, "Cy", "active"))
            .using(&cache)
            .execute(conn)?;
        // Inside, a read of the written table goes to the database and sees the write.
        let (rows, queries) = counted!(counter, all().load::<User, _>(conn)?);
        assert_eq!((rows.len(), queries), (3, 1));
        Ok::<_, Error>(())
    })
    .unwrap();
    let (rows, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
    assert_eq!((rows.len(), queries), (3, 1), "invalidated by the commit");
    let (_, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
    assert_eq!(queries, 0);

    // A rollback leaves no trace.
    let failed: Result<(), Error> = memclone::transaction(&mut conn, |conn| {
        memclone::insert_into(users::table)
            .values(&user(4, "Dee", "active"))
            .using(&cache)
            .execute(conn)?;
        Err(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(failed.is_err());
    let (rows, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
    assert_eq!((rows.len(), queries), (3, 0));

    // Diesel's own transaction, outermost: memclone writes are refused, nothing is written.
    let refused = conn.transaction(|conn| {
        memclone::insert_into(users::table)
            .values(&user(4, "Dee", "active"))
            .using(&cache)
            .execute(conn)
    });
    assert!(
        matches!(refused, Err(Error::UnmanagedTransaction)),
        "{refused:?}"
    );
    // Diesel's transaction nested inside memclone's is fine.
    memclone::transaction(&mut conn, |conn| {
        conn.transaction(|conn| {
            memclone::delete(users::table.filter(users::id.eq(3)))
                .using(&cache)
                .execute(conn)
        })
    })
    .unwrap();
    let (rows, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
    assert_eq!((rows.len(), queries), (2, 1));
}

/// A miss then a hit on a fresh SQLite database: the two reads' query counts.
fn miss_then_hit(cache: &Cache) -> (usize, usize) {
    let mut conn = sqlite_sync();
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    // Plain Diesel: threads sharing `cache` must not invalidate each other's entries.
    diesel::insert_into(users::table)
        .values(&vec![user(1, "Ada", "active"), user(2, "Bob", "away")])
        .execute(&mut conn)
        .unwrap();
    let read = |conn: &mut SqliteConnection| {
        users::table
            .order(users::id)
            .cached("context")
            .using(cache)
            .load::<User, _>(conn)
            .unwrap()
    };
    let (rows, miss) = counted!(counter, read(&mut conn));
    assert_eq!(rows.len(), 2);
    let (_, hit) = counted!(counter, read(&mut conn));
    let entity = cache.blocking().find::<User, _>(&mut conn, 1).unwrap();
    assert_eq!(entity.name, "Ada");
    (miss, hit)
}

#[test]
fn works_from_plain_threads() {
    let cache = memory_cache();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || miss_then_hit(&cache))
        })
        .collect();
    for thread in threads {
        let (_, hit) = thread.join().unwrap();
        assert_eq!(hit, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_from_spawn_blocking_on_a_multi_thread_runtime() {
    let cache = memory_cache();
    let counts = tokio::task::spawn_blocking(move || miss_then_hit(&cache))
        .await
        .unwrap();
    assert_eq!(counts, (1, 0));
}

#[tokio::test]
async fn works_from_spawn_blocking_on_a_current_thread_runtime() {
    let cache = memory_cache();
    let counts = tokio::task::spawn_blocking(move || miss_then_hit(&cache))
        .await
        .unwrap();
    assert_eq!(counts, (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_multi_thread_runtime_worker() {
    // Blocking a worker is the caller's choice; it must neither panic nor deadlock.
    assert_eq!(miss_then_hit(&memory_cache()), (1, 0));
    // Also with a Redis store whose connections were made by async code on this runtime.
    let Some(store) = diesel_memclone_tests::redis_store().await else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("sync"))
        .build()
        .unwrap();
    cache.invalidate_table("users").await;
    assert_eq!(miss_then_hit(&cache), (1, 0));
}

#[tokio::test]
async fn works_on_a_current_thread_runtime_with_the_in_process_store() {
    assert_eq!(miss_then_hit(&memory_cache()), (1, 0));
}

#[tokio::test]
async fn redis_store_used_by_async_code_then_by_spawn_blocking_on_a_current_thread_runtime() {
    let Some(store) = diesel_memclone_tests::redis_store().await else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("sync"))
        .build()
        .unwrap();
    cache.invalidate_table("users").await;
    let counts = tokio::task::spawn_blocking(move || miss_then_hit(&cache))
        .await
        .unwrap();
    assert_eq!(counts, (1, 0));
}

#[test]
fn redis_store_from_plain_threads_without_any_runtime() {
    let Some(store) = diesel_memclone_tests::redis_store_sync() else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("sync"))
        .build()
        .unwrap();
    // Concurrent callers take turns driving the internal runtime (and the keeper thread in
    // between): every call must finish.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let mut hits = 0;
                for _ in 0..50 {
                    hits += usize::from(miss_then_hit(&cache).1 == 0);
                    std::thread::sleep(std::time::Duration::from_micros(500));
                }
                hits
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap(), 50);
    }
}

#[test]
fn the_rest_of_the_api_on_sqlite() {
    use diesel_memclone_tests::schema::posts;
    use diesel_memclone_tests::Post;
    let cache = memory_cache();
    let mut conn = sqlite_sync();
    let counter = QueryCounter::default();
    counter.attach_sync(&mut conn);
    seed(&mut conn, &cache);

    // load_and_count: one entry for the page and the total.
    let page = || {
        users::table
            .order(users::id)
            .limit(1)
            .cached("page")
            .using(&cache)
    };
    let ((rows, total), queries) = counted!(
        counter,
        page()
            .load_and_count::<User, _, _>(users::table.count(), &mut conn)
            .unwrap()
    );
    assert_eq!((rows.len(), total, queries), (1, 2, 2));
    let (_, queries) = counted!(
        counter,
        page()
            .load_and_count::<User, _, _>(users::table.count(), &mut conn)
            .unwrap()
    );
    assert_eq!(queries, 0);

    // load_with and fill_with: any value; the models in its type (and extra tables) make it
    // depend on their tables.
    let blocking = cache.blocking();
    let with = |conn: &mut SqliteConnection| {
        blocking
            .load_with("with", "k", &[], conn, |conn| {
                users::table.order(users::id).load::<User>(conn)
            })
            .unwrap()
    };
    let (rows, queries) = counted!(counter, with(&mut conn));
    assert_eq!((rows.len(), queries), (2, 1));
    let (_, queries) = counted!(counter, with(&mut conn));
    assert_eq!(queries, 0);
    let filled: i64 = blocking
        .fill_with("fill", "k", &["users"], || Ok(41))
        .unwrap();
    let again: i64 = blocking
        .fill_with("fill", "k", &["users"], || Ok(0))
        .unwrap();
    assert_eq!((filled, again), (41, 41));

    // also_invalidates: a write to posts that says it changes users too.
    memclone::insert_into(posts::table)
        .values(&Post {
            id: 1,
            user_id: 1,
            title: "P".into(),
        })
        .also_invalidates("users")
        .using(&cache)
        .execute(&mut conn)
        .unwrap();
    let (_, queries) = counted!(counter, with(&mut conn));
    assert_eq!(queries, 1, "invalidated through also_invalidates");
    let again: i64 = blocking
        .fill_with("fill", "k", &["users"], || Ok(7))
        .unwrap();
    assert_eq!(again, 7);

    // A custom key, removed by uncache, and filled by cache_result.
    let by_key = || {
        users::table
            .filter(users::id.eq(9))
            .cached("by_key")
            .key("user:9")
            .using(&cache)
    };
    memclone::insert_into(users::table)
        .values(&user(9, "Nine", "active"))
        .map(|s| s.returning(users::all_columns))
        .cache_result(std::time::Duration::from_secs(60), |u: &User| {
            format!("user:{}", u.id)
        })
        .using(&cache)
        .get_result::<User, _>(&mut conn)
        .unwrap();
    let (nine, queries) = counted!(counter, by_key().get_result::<User, _>(&mut conn).unwrap());
    assert_eq!(
        (nine.name.as_str(), queries),
        ("Nine", 0),
        "written by cache_result"
    );
    blocking.uncache(&["user:9"]).unwrap();
    let (_, queries) = counted!(counter, by_key().get_result::<User, _>(&mut conn).unwrap());
    assert_eq!(queries, 1, "uncached");
    let (_, queries) = counted!(counter, by_key().get_result::<User, _>(&mut conn).unwrap());
    assert_eq!(queries, 0);
    memclone::update(users::table.filter(users::id.eq(2)))
        .set(users::status.eq("away"))
        .uncache(["user:9"])
        .using(&cache)
        .execute(&mut conn)
        .unwrap();
    let (_, queries) = counted!(counter, by_key().get_result::<User, _>(&mut conn).unwrap());
    assert_eq!(queries, 1, "uncached by the write");

    // replace_into and an upsert through map invalidate like any write.
    let all = || users::table.order(users::id).cached("all").using(&cache);
    all().load::<User, _>(&mut conn).unwrap();
    memclone::replace_into(users::table)
        .values(&user(2, "Bobby", "away"))
        .using(&cache)
        .execute(&mut conn)
        .unwrap();
    let (rows, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
    assert_eq!((rows[1].name.as_str(), queries), ("Bobby", 1));
    memclone::insert_into(users::table)
        .values(&user(2, "Roberta", "away"))
        .map(|s| {
            s.on_conflict(users::id)
                .do_update()
                .set(users::name.eq("Roberta"))
        })
        .using(&cache)
        .execute(&mut conn)
        .unwrap();
    let (rows, queries) = counted!(counter, all().load::<User, _>(&mut conn).unwrap());
    assert_eq!((rows[1].name.as_str(), queries), ("Roberta", 1));
    let (bob, queries) = counted!(counter, blocking.find::<User, _>(&mut conn, 2).unwrap());
    assert_eq!((bob.name.as_str(), queries), ("Roberta", 1));
}

#[test]
fn a_sync_call_inside_a_fill_is_a_clear_error_not_a_deadlock() {
    let cache = memory_cache();
    let mut conn = sqlite_sync();
    seed(&mut conn, &cache);
    let blocking = cache.blocking();
    let nested: Result<Vec<User>, Error> =
        blocking.load_with("outer", "k", &[], &mut conn, |conn| {
            let inner = users::table
                .cached("inner")
                .using(&cache)
                .load::<User, _>(conn);
            match inner {
                Err(Error::NestedSyncCall) => Err(diesel::result::Error::NotFound),
                other => panic!("expected Error::NestedSyncCall, got {other:?}"),
            }
        });
    assert!(nested.unwrap_err().is_not_found());
    // The thread is usable afterwards.
    assert_eq!(
        users::table
            .cached("after")
            .using(&cache)
            .load::<User, _>(&mut conn)
            .unwrap()
            .len(),
        2
    );
}

/// The worst place: the thread of a current-thread runtime whose own tasks drive the store's
/// connections (made by async code on it), blocked by the sync call. It must not deadlock:
/// the store's timeout (driven by memclone's own runtime) ends the wait, and the answer comes
/// from the database.
#[tokio::test]
async fn a_current_thread_runtime_blocked_on_its_own_redis_connections_does_not_deadlock() {
    let Some(store) = diesel_memclone_tests::redis_store().await else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("sync"))
        .build()
        .unwrap();
    // Async use first: the pool's connections (and their driver tasks) belong to this runtime.
    cache.invalidate_table("users").await;
    let mut conn = sqlite_sync();
    seed(&mut conn, &cache);
    for _ in 0..3 {
        let rows = users::table
            .order(users::id)
            .cached("blocked")
            .using(&cache)
            .load::<User, _>(&mut conn)
            .unwrap();
        assert_eq!(rows.len(), 2);
    }
    // Degraded, not stuck: the store timed out once, and the reads went to the database.
    let stats = cache.stats();
    assert!(stats.store_errors >= 1 && stats.hits == 0, "{stats:?}");
}

/// A read from a `Mutex` "pool" that misses takes the connection before it leads this process's
/// load of the entry: the connection's holder reading the same entry with that connection does
/// not wait on a load that waits for its connection (the follower patience before).
#[test]
fn a_pool_miss_does_not_stall_the_holder_of_the_pool_s_connection() {
    let pool = Arc::new(Mutex::new(sqlite_sync()));
    diesel::connection::SimpleConnection::batch_execute(
        &mut *pool.lock().unwrap(),
        "INSERT INTO users VALUES (1, 'Ann', 'a')",
    )
    .unwrap();
    let cache = Cache::builder()
        .namespace(unique("sync_from"))
        // The follower patience (the lock's wait and time to live) far above what the test
        // allows the holder, so that a slow machine cannot pass for a stall.
        .lock(
            diesel_memclone::LockOptions::default()
                .ttl(Duration::from_secs(60))
                .wait_timeout(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let names = |cache: &Cache| {
        users::table
            .select(users::name)
            .cached("pool_names")
            .using(cache)
    };
    // This thread takes the connection (a transaction, a batch of reads on one connection).
    let mut held = pool.lock().unwrap();
    let reader = {
        let (pool, cache) = (pool.clone(), cache.clone());
        std::thread::spawn(move || {
            // A miss: it leads the load and waits for the connection.
            let got: Vec<String> = names(&cache).load_from(&*pool).unwrap();
            got
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The holder reads the same entry on the connection it holds.
    let began = Instant::now();
    let mine: Vec<String> = names(&cache).load(&mut *held).unwrap();
    let waited = began.elapsed();
    drop(held);
    assert_eq!(mine, ["Ann"]);
    assert_eq!(reader.join().unwrap(), ["Ann"]);
    assert!(
        waited < Duration::from_secs(20),
        "the connection's holder waited {waited:?} on a load that waited for its connection"
    );
}

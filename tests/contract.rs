//! The contract, point by point, with database query counts.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use diesel_memclone::prelude::*;
use diesel_memclone::store::{MemoryStore, RedisStore, Store};
use diesel_memclone::{Cache, Error};
use diesel_memclone_tests::schema::{memberships, posts, users};
use diesel_memclone_tests::*;

use std::time::Duration;

fn user(id: i32, name: &str, status: &str) -> User {
    User {
        id,
        name: name.into(),
        status: status.into(),
    }
}

async fn seed(conn: &mut SqliteConn, cache: &Cache) {
    // One statement per row: diesel-async's SQLite wrapper has no batch insert.
    for row in [user(1, "Ann", "a"), user(2, "Bob", "b"), user(3, "Cy", "a")] {
        diesel_memclone::insert_into(users::table)
            .values(&row)
            .using(cache)
            .execute(conn)
            .await
            .unwrap();
    }
}

async fn add_posts(conn: &mut SqliteConn, cache: &Cache, rows: &[Post]) {
    for row in rows {
        diesel_memclone::insert_into(posts::table)
            .values(row)
            .using(cache)
            .execute(conn)
            .await
            .unwrap();
    }
}

/// Contract 1: the label is not the identity.
#[tokio::test]
async fn same_label_other_binds_never_share_an_entry() {
    let mut conn = sqlite().await;
    let cache = Cache::builder().namespace(unique("label")).build().unwrap();
    seed(&mut conn, &cache).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let by_status = |s: &'static str| {
        users::table
            .filter(users::status.eq(s))
            .order(users::id)
            .select(users::name)
    };
    for _ in 0..2 {
        let a: Vec<String> = by_status("a")
            .cached("q")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        let b: Vec<String> = by_status("b")
            .cached("q")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        assert_eq!(a, ["Ann", "Cy"]);
        assert_eq!(b, ["Bob"]);
    }
    assert_eq!(counter.get(), 2, "one miss per bind value, then hits");
    // Same SQL and binds, another result type: another entry.
    let ids: Vec<i32> = users::table
        .filter(users::status.eq("a"))
        .order(users::id)
        .select(users::id)
        .cached("q")
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(ids, [1, 3]);
}

/// A join depends on both tables; a count and a subquery on the tables they read.
#[tokio::test]
async fn joins_counts_and_subqueries_are_invalidated_by_every_table_they_read() {
    let mut conn = sqlite().await;
    let cache = Cache::builder().namespace(unique("join")).build().unwrap();
    seed(&mut conn, &cache).await;
    diesel_memclone::insert_into(posts::table)
        .values(&Post {
            id: 1,
            user_id: 1,
            title: "p1".into(),
        })
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let join = || {
        users::table
            .inner_join(posts::table)
            .select((User::as_select(), Post::as_select()))
            .order(posts::id)
    };
    let authors = || {
        users::table
            .filter(users::id.eq_any(posts::table.select(posts::user_id)))
            .select(users::name)
            .order(users::id)
    };

    macro_rules! load_all {
        ($conn:expr) => {{
            let conn = $conn;
            let joined: Vec<(User, Post)> = join()
                .cached("join")
                .using(&cache)
                .load(conn)
                .await
                .unwrap();
            let count = users::table
                .cached("count")
                .using(&cache)
                .count(conn)
                .await
                .unwrap();
            let names: Vec<String> = authors()
                .cached("authors")
                .using(&cache)
                .load(conn)
                .await
                .unwrap();
            (joined.len(), count, names)
        }};
    }
    let (first, misses) = counted!(counter, load_all!(&mut conn));
    assert_eq!(
        (first.clone(), misses),
        ((1, 3, vec!["Ann".to_string()]), 3)
    );
    let (again, hits) = counted!(counter, load_all!(&mut conn));
    assert_eq!((again, hits), (first, 0), "all three hit");

    // A write to posts: the join and the subquery miss, the count (users only) hits.
    diesel_memclone::insert_into(posts::table)
        .values(&Post {
            id: 2,
            user_id: 2,
            title: "p2".into(),
        })
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (after_post, queries) = counted!(counter, load_all!(&mut conn));
    assert_eq!(
        after_post,
        (2, 3, vec!["Ann".to_string(), "Bob".to_string()])
    );
    assert_eq!(queries, 2, "join and subquery missed, count hit");

    // A write to users: all three read users.
    diesel_memclone::update(users::table.find(2))
        .set(users::name.eq("Rob"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (after_user, queries) = counted!(counter, load_all!(&mut conn));
    assert_eq!(
        after_user,
        (2, 3, vec!["Ann".to_string(), "Rob".to_string()])
    );
    assert_eq!(queries, 3);
}

/// Deep results, `(User, Vec<Post>)`, depend on both models.
#[tokio::test]
async fn users_with_their_posts_depend_on_both_tables() {
    let mut conn = sqlite().await;
    let cache = Cache::builder().namespace(unique("deep")).build().unwrap();
    seed(&mut conn, &cache).await;
    add_posts(
        &mut conn,
        &cache,
        &[
            Post {
                id: 1,
                user_id: 1,
                title: "a".into(),
            },
            Post {
                id: 2,
                user_id: 3,
                title: "b".into(),
            },
        ],
    )
    .await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    async fn load(cache: &Cache, conn: &mut SqliteConn) -> Vec<(User, Vec<Post>)> {
        cache
            .load_with("users_with_posts", "status=a", &[], conn, |conn| {
                Box::pin(async move {
                    let people: Vec<User> = users::table
                        .filter(users::status.eq("a"))
                        .order(users::id)
                        .load(conn)
                        .await?;
                    let their_posts: Vec<Post> = Post::belonging_to(&people)
                        .select(Post::as_select())
                        .load(conn)
                        .await?;
                    let grouped = their_posts.grouped_by(&people);
                    Ok(people.into_iter().zip(grouped).collect())
                })
            })
            .await
            .unwrap()
    }
    let (deep, queries) = counted!(counter, load(&cache, &mut conn).await);
    assert_eq!((deep.len(), deep[0].1.len(), queries), (2, 1, 2));
    let (_, queries) = counted!(counter, load(&cache, &mut conn).await);
    assert_eq!(queries, 0, "hit");
    diesel_memclone::update(posts::table.find(1))
        .set(posts::title.eq("A!"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (deep, queries) = counted!(counter, load(&cache, &mut conn).await);
    assert_eq!(
        (deep[0].1[0].title.as_str(), queries),
        ("A!", 2),
        "a post write invalidates it"
    );
}

/// Contract 6: bytes that do not decode are a miss and get replaced (in-process store).
#[tokio::test]
async fn a_corrupt_entry_is_a_miss_and_is_replaced_memory_store() {
    let mut conn = sqlite().await;
    let store = MemoryStore::default();
    let cache = Cache::builder()
        .store(store.clone())
        .namespace(unique("corrupt"))
        .build()
        .unwrap();
    seed(&mut conn, &cache).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let query = || users::table.order(users::id).select(users::name);
    let names: Vec<String> = query()
        .cached("names")
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    let user_one = cache.find::<User, _>(&mut conn, 1).await.unwrap();
    let entries: Vec<String> = store
        .keys()
        .into_iter()
        .filter(|k| k.contains(":{q:") || k.contains(":e:"))
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    for (i, key) in entries.iter().enumerate() {
        let garbage: &[u8] = if i == 0 {
            b"\x00\x01 not an entry"
        } else {
            b"MCv1\x02garbage"
        };
        store
            .put(key, garbage.to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
    }
    let (again, queries) = counted!(counter, {
        let names: Vec<String> = query()
            .cached("names")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        (names, cache.find::<User, _>(&mut conn, 1).await.unwrap())
    });
    assert_eq!(again, (names.clone(), user_one.clone()));
    assert_eq!(queries, 2, "both corrupt entries were misses");
    assert_eq!(
        cache.stats().corrupt_entries,
        2,
        "a foreign value and a damaged one"
    );
    let (_, queries) = counted!(counter, {
        let names: Vec<String> = query()
            .cached("names")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        (names, cache.find::<User, _>(&mut conn, 1).await.unwrap())
    });
    assert_eq!(queries, 0, "replaced entries hit");
}

/// Contract 6 on Redis: garbage written by a foreign writer is a miss.
#[tokio::test]
async fn a_corrupt_entry_is_a_miss_and_is_replaced_redis() {
    let (Some(mut conn), Some(store)) = (postgres(&unique("corrupt")).await, redis_store().await)
    else {
        return;
    };
    let inspector = RawRedis::test_server(false).await;
    let ns = unique("corrupt");
    let cache = Cache::builder()
        .store(store)
        .namespace(&ns)
        .build()
        .unwrap();
    diesel_memclone::insert_into(users::table)
        .values(&user(1, "Ann", "a"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let query = || users::table.order(users::id).select(users::name);
    let names: Vec<String> = query()
        .cached("names")
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    use diesel_memclone::deadpool_redis::redis::cmd;
    let keys = |pattern: String| {
        let inspector = inspector.clone();
        async move {
            inspector
                .query_as::<Vec<String>>(cmd("KEYS").arg(pattern))
                .await
        }
    };
    let set = |key: String, value: Vec<u8>| {
        let inspector = inspector.clone();
        async move {
            inspector
                .query_as::<()>(cmd("SET").arg(key).arg(value))
                .await
        }
    };
    let entries = keys(format!("{ns}:{{q:*")).await;
    assert_eq!(entries.len(), 1);
    set(
        entries[0].clone(),
        b"\xff\xfe definitely not bincode".to_vec(),
    )
    .await;
    let (again, queries) = counted!(counter, {
        let names: Vec<String> = query()
            .cached("names")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        names
    });
    assert_eq!((again, queries), (names.clone(), 1));
    let (_, queries) = counted!(counter, {
        let names: Vec<String> = query()
            .cached("names")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        names
    });
    assert_eq!(queries, 0, "the entry was replaced");
    // A generation overwritten with garbage is replaced with a fresh value: a miss, never an error.
    let gens = keys(format!("{ns}:{{t:users}}:qgen")).await;
    set(gens[0].clone(), b"not a number".to_vec()).await;
    let (again, queries) = counted!(counter, {
        let names: Vec<String> = query()
            .cached("names")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        names
    });
    assert_eq!((again, queries), (names, 1));
}

/// Contract 5: Redis cut mid-test. Reads go to the database and stay correct, writes succeed,
/// the invalidation is kept and delivered when Redis is back.
#[tokio::test]
async fn redis_cut_mid_test_falls_back_and_delivers_the_invalidation_later() {
    let schema = unique("cut");
    let (Some(mut conn), Some(_)) = (postgres(&schema).await, redis_store().await) else {
        return;
    };
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .parse()
        .expect("REDIS_URL as redis://ip:port");
    let proxy = diesel_memclone_tests::proxy::Proxy::start(upstream).await;
    let ns = unique("cut");
    let through_proxy = RedisStore::builder(proxy.url())
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let cache = Cache::builder()
        .store(through_proxy)
        .namespace(&ns)
        .store_timeout(Duration::from_millis(200))
        .retry_after(Duration::from_millis(100))
        .build()
        .unwrap();
    // Another process's view of the same store, directly connected.
    let other = Cache::builder()
        .store(redis_store().await.unwrap())
        .namespace(&ns)
        .build()
        .unwrap();
    let mut other_conn = postgres_again(&schema).await;

    diesel_memclone::insert_into(users::table)
        .values(&user(1, "Ann", "a"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let names = || users::table.order(users::id).select(users::name);

    let (first, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!((first, queries), (vec!["Ann".to_string()], 1));
    let (_, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!(queries, 0, "hit before the cut");

    proxy.cut();
    let (during, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!(
        (during, queries),
        (vec!["Ann".to_string()], 1),
        "store down: the database answers"
    );
    let written = diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anne"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .expect("a write succeeds while the store is down");
    assert_eq!(written, 1);
    assert_eq!(cache.undelivered_invalidations(), ["users"]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (during, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!(
        (during, queries),
        (vec!["Anne".to_string()], 1),
        "fresh data from the database"
    );
    assert!(cache.stats().store_errors > 0);

    proxy.restore();
    // Delivered by the cache's background retry, before any further call.
    for _ in 0..60 {
        if cache.undelivered_invalidations().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cache.undelivered_invalidations().is_empty(),
        "delivered in the background once Redis answers"
    );

    let (after, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!(
        (after, queries),
        (vec!["Anne".to_string()], 1),
        "delivered, then a miss"
    );
    assert!(cache.undelivered_invalidations().is_empty());
    let (_, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!(queries, 0, "and hits again");
    // The other process sees the delivered invalidation too.
    let seen: Vec<String> = names()
        .cached("names")
        .using(&other)
        .load(&mut other_conn)
        .await
        .unwrap();
    assert_eq!(seen, ["Anne"]);
}

/// An unreachable Redis from the start: the cache builds, reads and writes work, nothing panics.
#[tokio::test]
async fn an_unreachable_redis_means_database_reads_and_successful_writes() {
    let mut conn = sqlite().await;
    let nowhere = RedisStore::builder("redis://127.0.0.1:1")
        .connect_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let cache = Cache::builder()
        .store(nowhere)
        .namespace(unique("down"))
        .store_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    seed(&mut conn, &cache).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    for _ in 0..3 {
        let names: Vec<String> = users::table
            .order(users::id)
            .select(users::name)
            .cached("n")
            .using(&cache)
            .load(&mut conn)
            .await
            .unwrap();
        assert_eq!(names, ["Ann", "Bob", "Cy"]);
        assert_eq!(
            cache.find::<User, _>(&mut conn, 2).await.unwrap().name,
            "Bob"
        );
    }
    assert_eq!(counter.get(), 6, "every read went to the database");
    assert_eq!(cache.stats().hits, 0);
}

/// Misconfiguration is a clear error when the cache is built.
#[test]
fn misconfiguration_is_an_error_at_build_time() {
    let error = Cache::builder().namespace("has space").build().unwrap_err();
    assert!(
        matches!(error, Error::Config(ref m) if m.contains("namespace")),
        "{error}"
    );
    let error = Cache::builder()
        .default_ttl(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("default_ttl"), "{error}");
    let error = RedisStore::builder("http://example").build().unwrap_err();
    assert!(error.to_string().contains("not a Redis URL"), "{error}");
}

/// Contract 4: invalidation after commit, nothing from a rollback, reads inside bypass.
#[tokio::test]
async fn transactions_invalidate_after_commit_and_rollbacks_leave_nothing() {
    let (Some(mut conn), Some(store)) = (postgres(&unique("tx")).await, redis_store().await) else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("tx"))
        .build()
        .unwrap();
    diesel_memclone::insert_into(users::table)
        .values(&user(1, "Ann", "a"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let names = || users::table.order(users::id).select(users::name);
    let _: Vec<String> = user_names(&cache, &mut conn).await;

    // Rollback: the write is undone and the cached entry stays valid (a hit, with the old name).
    let cache2 = cache.clone();
    let rolled_back: Result<(), Error> =
        diesel_memclone::transaction(&mut conn, async move |conn| {
            diesel_memclone::update(users::table.find(1))
                .set(users::name.eq("Nope"))
                .using(&cache2)
                .execute(conn)
                .await?;
            let inside: Vec<String> = names().cached("names").using(&cache2).load(conn).await?;
            assert_eq!(
                inside,
                ["Nope"],
                "a read of a table written in this transaction bypasses the cache"
            );
            Err(Error::Database(diesel::result::Error::RollbackTransaction))
        })
        .await;
    assert!(rolled_back.is_err());
    let (after, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!(
        (after, queries),
        (vec!["Ann".to_string()], 0),
        "rollback left the cache as it was"
    );

    // Commit inside a savepoint whose sibling rolled back: the write lands and invalidates
    // after the outer commit.
    let cache2 = cache.clone();
    diesel_memclone::transaction(&mut conn, async move |conn| {
        let cache4 = cache2.clone();
        let inner: Result<(), Error> = diesel_memclone::transaction(conn, async move |conn| {
            diesel_memclone::insert_into(users::table)
                .values(&user(9, "Ghost", "a"))
                .using(&cache4)
                .execute(conn)
                .await?;
            Err(Error::Database(diesel::result::Error::RollbackTransaction))
        })
        .await;
        assert!(inner.is_err());
        let cache3 = cache2.clone();
        diesel_memclone::transaction(conn, async move |conn| {
            diesel_memclone::update(users::table.find(1))
                .set(users::name.eq("Anne"))
                .using(&cache3)
                .execute(conn)
                .await?;
            Ok::<_, Error>(())
        })
        .await?;
        // Inside the open transaction, other processes still see the old entry: nothing
        // has been invalidated before the commit.
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let (after, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!(
        (after, queries),
        (vec!["Anne".to_string()], 1),
        "commit invalidated: one miss"
    );
    let (_, queries) = counted!(counter, {
        let v: Vec<String> = user_names(&cache, &mut conn).await;
        v
    });
    assert_eq!(queries, 0, "then a hit");

    // A memclone write inside a transaction memclone does not manage is refused before it runs.
    let cache2 = cache.clone();
    let refused = conn
        .transaction::<_, Error, _>(async |conn| {
            diesel_memclone::update(users::table.find(1))
                .set(users::name.eq("Sneaky"))
                .using(&cache2)
                .execute(conn)
                .await?;
            Ok(())
        })
        .await;
    assert!(
        matches!(refused, Err(Error::UnmanagedTransaction)),
        "{refused:?}"
    );
    let name: String = users::table
        .find(1)
        .select(users::name)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(name, "Anne");
}

/// A cached "not found" is invalidated by the insert of that row (PostgreSQL: RETURNING rows).
#[tokio::test]
async fn a_cached_not_found_is_invalidated_by_the_insert_postgres() {
    let (Some(mut conn), Some(store)) = (postgres(&unique("nf")).await, redis_store().await) else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("nf"))
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let (none, queries) = counted!(
        counter,
        cache.find_optional::<User, _>(&mut conn, 5).await.unwrap()
    );
    assert_eq!((none, queries), (None, 1));
    let (none, queries) = counted!(
        counter,
        cache.find_optional::<User, _>(&mut conn, 5).await.unwrap()
    );
    assert_eq!((none, queries), (None, 0), "not-found is cached");
    let other: Option<User> = cache.find_optional(&mut conn, 6).await.unwrap();
    assert_eq!(other, None);
    let inserted: User = diesel_memclone::insert_into(users::table)
        .values(&user(5, "Eve", "a"))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(inserted.name, "Eve");
    let (found, queries) = counted!(
        counter,
        cache.find_optional::<User, _>(&mut conn, 5).await.unwrap()
    );
    assert_eq!(
        (found.map(|u| u.name), queries),
        (Some("Eve".to_string()), 0),
        "the insert replaced the cached not-found with the row it returned"
    );
    let (_, queries) = counted!(
        counter,
        cache.find_optional::<User, _>(&mut conn, 6).await.unwrap()
    );
    assert_eq!(
        queries, 0,
        "RETURNING named the row: other rows' entries stay"
    );
}

/// The same on MariaDB, which has no RETURNING: every entity of the table is evicted.
#[tokio::test]
async fn a_cached_not_found_is_invalidated_by_the_insert_mariadb() {
    let (Some(mut conn), Some(store)) = (mysql(&unique("nf")).await, redis_store().await) else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("nf"))
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    assert_eq!(
        cache.find_optional::<User, _>(&mut conn, 5).await.unwrap(),
        None
    );
    let (none, queries) = counted!(
        counter,
        cache.find_optional::<User, _>(&mut conn, 5).await.unwrap()
    );
    assert_eq!((none, queries), (None, 0));
    diesel_memclone::insert_into(users::table)
        .values(&user(5, "Eve", "a"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (found, queries) = counted!(counter, cache.find::<User, _>(&mut conn, 5).await.unwrap());
    assert_eq!((found.name.as_str(), queries), ("Eve", 1));
}

/// Composite primary keys, upserts through `map`, and RETURNING rows that evict only themselves.
#[tokio::test]
async fn composite_keys_upserts_and_precise_eviction_postgres() {
    let (Some(mut conn), Some(store)) = (postgres(&unique("pk")).await, redis_store().await) else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("pk"))
        .build()
        .unwrap();
    let member = Membership {
        org_id: 7,
        user_id: 1,
        role: "owner".into(),
    };
    diesel_memclone::insert_into(memberships::table)
        .values(&member)
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let (found, queries) = counted!(
        counter,
        cache
            .find::<Membership, _>(&mut conn, (7, 1))
            .await
            .unwrap()
    );
    assert_eq!((found, queries), (member.clone(), 1));
    let (_, queries) = counted!(
        counter,
        cache
            .find::<Membership, _>(&mut conn, (7, 1))
            .await
            .unwrap()
    );
    assert_eq!(queries, 0);
    let missing = cache
        .find::<Membership, _>(&mut conn, (7, 2))
        .await
        .unwrap_err();
    assert!(missing.is_not_found());

    // Upsert: insert .. on conflict do update, reached through `map`.
    let promoted = Membership {
        role: "admin".into(),
        ..member.clone()
    };
    let upserted: Membership = diesel_memclone::insert_into(memberships::table)
        .values(&promoted)
        .map(|s| {
            s.on_conflict((memberships::org_id, memberships::user_id))
                .do_update()
                .set(memberships::role.eq("admin"))
        })
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(upserted, promoted);
    let (found, queries) = counted!(
        counter,
        cache
            .find::<Membership, _>(&mut conn, (7, 1))
            .await
            .unwrap()
    );
    assert_eq!(
        (found.role.as_str(), queries),
        ("admin", 0),
        "the upsert wrote its returned row through"
    );

    // update .. returning: only the returned rows change, written through.
    diesel_memclone::insert_into(users::table)
        .values(&vec![user(1, "Ann", "a"), user(2, "Bob", "b")])
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = cache.find::<User, _>(&mut conn, 1).await.unwrap();
    let _ = cache.find::<User, _>(&mut conn, 2).await.unwrap();
    let changed: Vec<User> = diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anna"))
        .map(|s| s.returning(users::all_columns))
        .using(&cache)
        .get_results(&mut conn)
        .await
        .unwrap();
    assert_eq!(changed[0].name, "Anna");
    let (one, queries_one) = counted!(counter, cache.find::<User, _>(&mut conn, 1).await.unwrap());
    let (two, queries_two) = counted!(counter, cache.find::<User, _>(&mut conn, 2).await.unwrap());
    assert_eq!(
        (one.name.as_str(), queries_one),
        ("Anna", 0),
        "written through"
    );
    assert_eq!(
        (two.name.as_str(), queries_two),
        ("Bob", 0),
        "row 2 stayed cached"
    );

    // delete: the row and every query of the table.
    let (n, _) = counted!(
        counter,
        diesel_memclone::delete(users::table.find(2))
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap()
    );
    assert_eq!(n, 1);
    let gone = cache.find_optional::<User, _>(&mut conn, 2).await.unwrap();
    assert_eq!(gone, None);
}

/// count, first, load_and_count, get_result, per-query TTL, and CacheValue rows.
#[tokio::test]
async fn every_read_shape_is_cached_and_invalidated() {
    let mut conn = sqlite().await;
    let cache = Cache::builder()
        .namespace(unique("shapes"))
        .build()
        .unwrap();
    seed(&mut conn, &cache).await;
    add_posts(
        &mut conn,
        &cache,
        &[
            Post {
                id: 1,
                user_id: 1,
                title: "x".into(),
            },
            Post {
                id: 2,
                user_id: 1,
                title: "y".into(),
            },
        ],
    )
    .await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let page = || {
        users::table
            .filter(users::status.eq("a"))
            .order(users::id)
            .limit(1)
    };
    let total = || users::table.filter(users::status.eq("a")).count();
    let name_counts = || {
        users::table
            .inner_join(posts::table)
            .group_by(users::name)
            .select((users::name, diesel::dsl::count(posts::id)))
    };
    for round in 0..2 {
        let (values, queries) = counted!(counter, {
            let count = users::table
                .cached("n")
                .using(&cache)
                .count(&mut conn)
                .await
                .unwrap();
            let first: User = users::table
                .order(users::id.desc())
                .cached("last")
                .using(&cache)
                .first(&mut conn)
                .await
                .unwrap();
            let one: User = users::table
                .find(2)
                .cached("two")
                .ttl(Duration::from_secs(5))
                .using(&cache)
                .get_result(&mut conn)
                .await
                .unwrap();
            let (rows, all): (Vec<User>, i64) = page()
                .cached("page")
                .using(&cache)
                .load_and_count(total(), &mut conn)
                .await
                .unwrap();
            let counts: Vec<NameCount> = name_counts()
                .cached("counts")
                .using(&cache)
                .load(&mut conn)
                .await
                .unwrap();
            (count, first.id, one.name, rows.len(), all, counts)
        });
        assert_eq!(
            values,
            (
                3,
                3,
                "Bob".to_string(),
                1,
                2,
                vec![NameCount {
                    name: "Ann".into(),
                    posts: 2
                }]
            )
        );
        assert_eq!(queries, if round == 0 { 6 } else { 0 }, "round {round}");
    }
    let missing = users::table
        .find(99)
        .cached("none")
        .using(&cache)
        .get_result::<User, _>(&mut conn)
        .await
        .unwrap_err();
    assert!(missing.is_not_found());
    diesel_memclone::delete(posts::table.find(2))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let counts: Vec<NameCount> = name_counts()
        .cached("counts")
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        counts,
        vec![NameCount {
            name: "Ann".into(),
            posts: 1
        }]
    );
}

/// An entry expires with its TTL.
#[tokio::test]
async fn entries_expire_with_their_ttl() {
    let mut conn = sqlite().await;
    let cache = Cache::builder().namespace(unique("ttl")).build().unwrap();
    seed(&mut conn, &cache).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let query = || users::table.select(users::id).order(users::id);
    let _: Vec<i32> = query()
        .cached("ids")
        .ttl(Duration::from_millis(200))
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    let _: Vec<i32> = query()
        .cached("ids")
        .ttl(Duration::from_millis(200))
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(counter.get(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _: Vec<i32> = query()
        .cached("ids")
        .ttl(Duration::from_millis(200))
        .using(&cache)
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(counter.get(), 2, "expired, so a miss");
}

/// A delete's returned rows are evicted, never written back; an update that changes a primary
/// key evicts the old key's entry too.
#[tokio::test]
async fn deletes_and_key_changing_updates_never_leave_a_row_behind() {
    let (Some(mut conn), Some(store)) = (postgres(&unique("del")).await, redis_store().await)
    else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("del"))
        .build()
        .unwrap();
    for row in [user(1, "Ann", "a"), user(2, "Bob", "b")] {
        diesel_memclone::insert_into(users::table)
            .values(&row)
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(
        cache.find::<User, _>(&mut conn, 1).await.unwrap().name,
        "Ann"
    );
    assert_eq!(
        cache.find::<User, _>(&mut conn, 2).await.unwrap().name,
        "Bob"
    );

    let deleted: Vec<User> = diesel_memclone::delete(users::table.find(1))
        .map(|s| s.returning(users::all_columns))
        .using(&cache)
        .get_results(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        cache.find_optional::<User, _>(&mut conn, 1).await.unwrap(),
        None,
        "the deleted row is gone"
    );

    let moved: User = diesel_memclone::update(users::table.find(2))
        .set(users::id.eq(20))
        .map(|s| s.returning(users::all_columns))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(moved.id, 20);
    assert_eq!(
        cache.find_optional::<User, _>(&mut conn, 2).await.unwrap(),
        None,
        "the old key is evicted"
    );
    assert_eq!(
        cache.find::<User, _>(&mut conn, 20).await.unwrap().name,
        "Bob"
    );
}

/// A write on another connection inside a memclone transaction is not deferred to that
/// transaction's commit: it is delivered at once (its connection is not in a transaction).
#[tokio::test]
async fn a_transaction_defers_only_its_own_connection() {
    let schema = unique("conns");
    let (Some(mut conn), Some(store)) = (postgres(&schema).await, redis_store().await) else {
        return;
    };
    let mut other = postgres_again(&schema).await;
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("conns"))
        .build()
        .unwrap();
    diesel_memclone::insert_into(users::table)
        .values(&user(1, "Ann", "a"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let _: Vec<String> = user_names(&cache, &mut conn).await;
    let cache2 = cache.clone();
    let outcome: Result<(), Error> = diesel_memclone::transaction(&mut conn, async move |_conn| {
        diesel_memclone::update(users::table.find(1))
            .set(users::name.eq("Anne"))
            .using(&cache2)
            .execute(&mut other)
            .await?;
        // The transaction on `conn` rolls back; the write on `other` committed and must
        // have invalidated already.
        Err(Error::Database(diesel::result::Error::RollbackTransaction))
    })
    .await;
    assert!(outcome.is_err());
    let read: Vec<String> = user_names(&cache, &mut conn).await;
    assert_eq!(read, ["Anne"]);
}

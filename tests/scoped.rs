//! Scoped queries (`Cached::within`): a list of one author's posts stays cached across writes
//! that return other authors' rows, and misses after every write that may have touched its
//! rows or whose scope values memclone does not know. Every hit and miss is proven by counting
//! the statements the connection runs.

use diesel::prelude::*;
use diesel_async::AsyncPgConnection;
use diesel_memclone::prelude::*;
use diesel_memclone::{Cache, NearCache};
use diesel_memclone_tests::schema::{posts, users};
use diesel_memclone_tests::*;
use std::time::Duration;

/// The author's posts with the author's name, scoped to the author, and how many statements
/// reading it ran.
async fn list(
    cache: &Cache,
    conn: &mut AsyncPgConnection,
    counter: &QueryCounter,
    author: i32,
) -> (Vec<(i32, String, String)>, usize) {
    let (rows, queries) = counted!(
        counter,
        posts::table
            .inner_join(users::table)
            .select((Post::as_select(), users::name))
            .filter(posts::user_id.eq(author))
            .order(posts::id)
            .cached("posts_by_author")
            .within(posts::user_id, author)
            .within(users::id, author)
            .using(cache)
            .load::<(Post, String), _>(conn)
            .await
            .unwrap()
    );
    let rows = rows
        .into_iter()
        .map(|(post, name)| (post.id, post.title, name))
        .collect();
    (rows, queries)
}

fn ids(rows: &[(i32, String, String)]) -> Vec<i32> {
    rows.iter().map(|r| r.0).collect()
}

fn post(id: i32, user_id: i32, title: &str) -> Post {
    Post {
        id,
        user_id,
        title: title.into(),
    }
}

async fn seed(cache: &Cache, conn: &mut AsyncPgConnection) {
    for (id, name) in [(1, "Ann"), (2, "Bob")] {
        let user = User {
            id,
            name: name.into(),
            status: "a".into(),
        };
        diesel_memclone::insert_into(users::table)
            .values(&user)
            .using(cache)
            .execute(conn)
            .await
            .unwrap();
    }
    for row in [post(10, 1, "a"), post(11, 1, "b"), post(20, 2, "c")] {
        diesel_memclone::insert_into(posts::table)
            .values(&row)
            .using(cache)
            .execute(conn)
            .await
            .unwrap();
    }
}

/// Renames a post, returning it (the title owned: a borrowed one makes the transaction's
/// future fail rustc's `Send` check for every lifetime).
async fn retitle(
    conn: &mut AsyncPgConnection,
    cache: &Cache,
    id: i32,
    title: String,
) -> Result<Post, diesel_memclone::Error> {
    diesel_memclone::update(posts::table.find(id))
        .set(posts::title.eq(title))
        .using(cache)
        .get_result(conn)
        .await
}

/// Both lists, read until cached: author 1's and author 2's.
async fn warm(cache: &Cache, conn: &mut AsyncPgConnection, counter: &QueryCounter) {
    for author in [1, 2] {
        list(cache, conn, counter, author).await;
        let (_, queries) = list(cache, conn, counter, author).await;
        assert_eq!(queries, 0, "author {author}'s list is cached");
    }
}

async fn scoped(cache: Cache, schema: &str) {
    let mut conn = postgres_again(schema).await;
    seed(&cache, &mut conn).await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let conn = &mut conn;
    let cache = &cache;
    warm(cache, conn, &counter).await;
    let all = |cache: &Cache| posts::table.count().cached("all_posts").using(cache);
    assert_eq!(all(cache).count(conn).await.unwrap(), 3);

    // Writes that return author 2's posts: author 1's list stays, author 2's misses, and an
    // unscoped query of the table misses as always.
    let inserted: Post = diesel_memclone::insert_into(posts::table)
        .values(&post(21, 2, "d"))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    assert_eq!(inserted.id, 21);
    assert_eq!(list(cache, conn, &counter, 1).await.1, 0, "insert for 2");
    let (rows, queries) = list(cache, conn, &counter, 2).await;
    assert_eq!((ids(&rows), queries), (vec![20, 21], 1), "insert for 2");
    let (n, queries) = counted!(counter, all(cache).count(conn).await.unwrap());
    assert_eq!((n, queries), (4, 1), "unscoped queries miss");

    let _: Post = diesel_memclone::update(posts::table.find(20))
        .set(posts::title.eq("c2"))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    assert_eq!(list(cache, conn, &counter, 1).await.1, 0, "update for 2");
    let (rows, queries) = list(cache, conn, &counter, 2).await;
    assert_eq!((rows[0].1.as_str(), queries), ("c2", 1), "update for 2");

    let _: Post = diesel_memclone::delete(posts::table.find(21))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    assert_eq!(list(cache, conn, &counter, 1).await.1, 0, "delete for 2");
    let (rows, queries) = list(cache, conn, &counter, 2).await;
    assert_eq!((ids(&rows), queries), (vec![20], 1), "delete for 2");

    let _: User = diesel_memclone::update(users::table.find(2))
        .set(users::name.eq("Rob"))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    assert_eq!(list(cache, conn, &counter, 1).await.1, 0, "user 2 renamed");
    let (rows, queries) = list(cache, conn, &counter, 2).await;
    assert_eq!((rows[0].2.as_str(), queries), ("Rob", 1), "user 2 renamed");

    // The same writes to author 1's rows refresh author 1's list.
    let _: Post = diesel_memclone::insert_into(posts::table)
        .values(&post(12, 1, "e"))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    let (rows, queries) = list(cache, conn, &counter, 1).await;
    assert_eq!((ids(&rows), queries), (vec![10, 11, 12], 1), "insert for 1");
    let _: Post = diesel_memclone::update(posts::table.find(12))
        .set(posts::title.eq("e2"))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    let (rows, queries) = list(cache, conn, &counter, 1).await;
    assert_eq!((rows[2].1.as_str(), queries), ("e2", 1), "update for 1");
    let _: Vec<Post> = diesel_memclone::delete(posts::table.find(12))
        .using(cache)
        .get_results(conn)
        .await
        .unwrap();
    let (rows, queries) = list(cache, conn, &counter, 1).await;
    assert_eq!((ids(&rows), queries), (vec![10, 11], 1), "delete for 1");
    let _: User = diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anna"))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    let (rows, queries) = list(cache, conn, &counter, 1).await;
    assert_eq!((rows[0].2.as_str(), queries), ("Anna", 1), "user 1 renamed");
    assert_eq!(list(cache, conn, &counter, 2).await.1, 0, "user 1 renamed");

    // Writes whose scope values memclone does not know: every scoped list misses.
    warm(cache, conn, &counter).await;
    cache.invalidate_table("posts").await;
    assert_eq!(
        list(cache, conn, &counter, 1).await.1,
        1,
        "invalidate_table"
    );

    // A post moved from author 1 to author 2: both lists miss (the returned row names only
    // its new author).
    warm(cache, conn, &counter).await;
    let moved: Post = diesel_memclone::update(posts::table.find(11))
        .set(posts::user_id.eq(2))
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    assert_eq!(moved.user_id, 2);
    let (rows, queries) = list(cache, conn, &counter, 1).await;
    assert_eq!((ids(&rows), queries), (vec![10], 1), "moved out of 1");
    let (rows, queries) = list(cache, conn, &counter, 2).await;
    assert_eq!((ids(&rows), queries), (vec![11, 20], 1), "moved into 2");

    // No rows returned.
    warm(cache, conn, &counter).await;
    diesel_memclone::update(posts::table.find(20))
        .set(posts::title.eq("c3"))
        .using(cache)
        .execute(conn)
        .await
        .unwrap();
    assert_eq!(list(cache, conn, &counter, 1).await.1, 1, "execute");

    // A write in a transaction (invalidated at commit, its scope values not carried).
    warm(cache, conn, &counter).await;
    diesel_memclone::transaction(conn, async |conn| {
        retitle(conn, cache, 20, "c4".into()).await
    })
    .await
    .unwrap();
    assert_eq!(list(cache, conn, &counter, 1).await.1, 1, "transaction");

    // An upsert whose `DO UPDATE SET` moves post 10 from author 1 to author 2.
    warm(cache, conn, &counter).await;
    let upserted: Post = diesel_memclone::insert_into(posts::table)
        .values(&post(10, 2, "a"))
        .map(|s| {
            s.on_conflict(posts::id)
                .do_update()
                .set(posts::user_id.eq(2))
        })
        .using(cache)
        .get_result(conn)
        .await
        .unwrap();
    assert_eq!(upserted.user_id, 2);
    let (rows, queries) = list(cache, conn, &counter, 1).await;
    assert_eq!(
        (ids(&rows), queries),
        (vec![], 1),
        "upsert moved 10 out of 1"
    );
    let (rows, queries) = list(cache, conn, &counter, 2).await;
    assert_eq!((ids(&rows), queries), (vec![10, 11, 20], 1), "upsert");
}

on_every_store!(scoped: scoped_redis, scoped_redis_cluster, scoped_memory);

/// The same with a near tier in front of Redis: near hits where Redis would hit.
#[tokio::test]
async fn scoped_near_cache() {
    let schema = unique("scoped");
    let (Some(_), Some(store)) = (postgres(&schema).await, redis_store().await) else {
        return;
    };
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("scoped"))
        .near_cache(NearCache::new().max_lag(Duration::from_millis(100)))
        .build()
        .unwrap();
    assert!(
        cache.near_cache_ready(Duration::from_secs(10)).await,
        "the near tier is in sync"
    );
    scoped(cache.clone(), &schema).await;
    assert!(cache.stats().near_hits > 0, "{:?}", cache.stats());
}

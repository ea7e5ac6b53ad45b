//! Statements whose text hides what they read or write: writes whose returned rows do not name
//! every row they changed (or every scope those rows left: a data-modifying `WITH`, MySQL's
//! `ON DUPLICATE KEY UPDATE`, SQLite's `OR REPLACE`, `also_invalidates` of the written table), so
//! that a scoped list (`Cached::within`) or a row's entity entry could stay cached with data a
//! committed memclone write replaced; raw reads whose tables hide behind a comment,
//! `STRAIGHT_JOIN` or a parenthesized join; `uncache` during an outage; nullable scope values. Each read counts the statements
//! it ran: 0 means it was served from the cache.

use diesel::prelude::*;
use diesel_async::SimpleAsyncConnection;
use diesel_memclone::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::*;
use serde::{Deserialize, Serialize};

/// The tests' `posts` table under a `table!` of its own, so that a model readable by name
/// (raw SQL) may declare the scope (`Post` already declares one on `schema::posts`).
mod raw {
    diesel::table! {
        posts (id) {
            id -> Integer,
            user_id -> Integer,
            title -> Text,
        }
    }
}

/// A post read by raw SQL too.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    QueryableByName,
    Selectable,
    Serialize,
    Deserialize,
    MemClone,
)]
#[diesel(table_name = raw::posts)]
#[memclone(scope(user_id))]
struct RawPost {
    id: i32,
    user_id: i32,
    title: String,
}

/// Author `$author`'s post ids through `$cache`, scoped to the author, and the statements run.
macro_rules! list {
    ($cache:expr, $conn:expr, $counter:expr, $author:expr) => {{
        let (rows, queries) = counted!(
            $counter,
            raw::posts::table
                .select(RawPost::as_select())
                .filter(raw::posts::user_id.eq($author))
                .order(raw::posts::id)
                .cached("posts_by_author")
                .within(raw::posts::user_id, $author)
                .using($cache)
                .load::<RawPost, _>($conn)
                .await
                .unwrap()
        );
        (
            rows.into_iter().map(|p| p.id).collect::<Vec<i32>>(),
            queries,
        )
    }};
}

/// Reads `$author`'s list until it is cached; its ids.
macro_rules! warm {
    ($cache:expr, $conn:expr, $counter:expr, $author:expr) => {{
        list!($cache, $conn, $counter, $author);
        let (ids, queries) = list!($cache, $conn, $counter, $author);
        assert_eq!(queries, 0, "the list is cached");
        ids
    }};
}

/// PostgreSQL: a raw write whose data-modifying CTE deletes author 1's post 10 and whose main
/// statement updates author 2's post 20 returns only post 20. Author 1's list (and post 10's
/// entity entry) must not survive the delete.
#[tokio::test]
async fn cte_write_invalidates_rows_it_does_not_return() {
    let schema = unique("raw_stmt");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    conn.batch_execute("INSERT INTO posts VALUES (10, 1, 'a'), (11, 1, 'b'), (20, 2, 'c')")
        .await
        .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    assert_eq!(warm!(&cache, &mut conn, &counter, 1), vec![10, 11]);
    let found: RawPost = cache.find(&mut conn, 10).await.unwrap();
    assert_eq!(found.id, 10);
    let (_, queries) = counted!(
        counter,
        cache.find::<RawPost, _>(&mut conn, 10).await.unwrap()
    );
    assert_eq!(queries, 0, "post 10's entity entry is cached");

    let returned: Vec<RawPost> = diesel_memclone::write(diesel::sql_query(
        "WITH gone AS (DELETE FROM posts WHERE id = 10 RETURNING id) \
         UPDATE posts SET title = 'c2' WHERE id = 20 RETURNING id, user_id, title",
    ))
    .using(&cache)
    .get_results(&mut conn)
    .await
    .unwrap();
    assert_eq!(returned.iter().map(|p| p.id).collect::<Vec<_>>(), vec![20]);

    let (ids, _) = list!(&cache, &mut conn, &counter, 1);
    assert_eq!(ids, vec![11], "author 1's list after post 10 was deleted");
    let gone = cache
        .find_optional::<RawPost, _>(&mut conn, 10)
        .await
        .unwrap();
    assert_eq!(gone, None, "post 10 was deleted");
}

/// SQLite: `INSERT OR REPLACE` deletes the row it conflicts with (author 1's post 10) and
/// inserts one for author 2: the returned row names only author 2. (Passed on the earlier
/// code by accident: the parser took `replace` for the written table and invalidated `posts`
/// whole as another table the statement names. Now read as a `REPLACE` of `posts`.)
#[tokio::test]
async fn sqlite_insert_or_replace_moves_rows_out_of_a_scope() {
    let mut conn = sqlite().await;
    conn.batch_execute("INSERT INTO posts VALUES (10, 1, 'a'), (11, 1, 'b'), (20, 2, 'c')")
        .await
        .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    assert_eq!(warm!(&cache, &mut conn, &counter, 1), vec![10, 11]);

    let returned: Vec<RawPost> = diesel_memclone::write(diesel::sql_query(
        "INSERT OR REPLACE INTO posts (id, user_id, title) VALUES (10, 2, 'moved') \
         RETURNING id, user_id, title",
    ))
    .using(&cache)
    .get_results(&mut conn)
    .await
    .unwrap();
    assert_eq!(returned[0].user_id, 2);

    let (ids, _) = list!(&cache, &mut conn, &counter, 1);
    assert_eq!(ids, vec![11], "post 10 left author 1");
}

/// MariaDB (which has `INSERT .. RETURNING`): `ON DUPLICATE KEY UPDATE user_id = ..` moves
/// author 1's post 10 to author 2; the returned row names only author 2.
#[tokio::test]
async fn mariadb_on_duplicate_key_update_moves_rows_out_of_a_scope() {
    let database = unique("raw_stmt");
    let Some(mut conn) = mysql(&database).await else {
        return;
    };
    conn.batch_execute("INSERT INTO posts VALUES (10, 1, 'a'), (11, 1, 'b'), (20, 2, 'c')")
        .await
        .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    assert_eq!(warm!(&cache, &mut conn, &counter, 1), vec![10, 11]);

    let returned: Vec<RawPost> = diesel_memclone::write(diesel::sql_query(
        "INSERT INTO posts (id, user_id, title) VALUES (10, 2, 'a') \
         ON DUPLICATE KEY UPDATE user_id = VALUES(user_id) RETURNING id, user_id, title",
    ))
    .using(&cache)
    .get_results(&mut conn)
    .await
    .unwrap();
    assert_eq!(returned[0].user_id, 2);

    let (ids, _) = list!(&cache, &mut conn, &counter, 1);
    assert_eq!(ids, vec![11], "post 10 left author 1");
    conn.batch_execute(&format!("DROP DATABASE {database}"))
        .await
        .unwrap();
}

/// PostgreSQL: deleting a post cascades (a self-referencing foreign key) to a reply of
/// author 2. `also_invalidates` is what the docs give for rows a cascade changes; naming the
/// written table itself must make every row of it unknown, not be dropped as a duplicate.
#[tokio::test]
async fn also_invalidates_own_table_forgets_the_returned_rows() {
    use diesel_memclone_tests::schema::posts;
    let schema = unique("raw_stmt");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    conn.batch_execute(
        "ALTER TABLE posts ADD COLUMN parent_id INTEGER REFERENCES posts(id) ON DELETE CASCADE;
         INSERT INTO posts VALUES (10, 1, 'a', NULL), (11, 1, 'b', NULL), (20, 2, 'c', NULL),
                                  (21, 2, 'reply to 10', 10)",
    )
    .await
    .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    assert_eq!(warm!(&cache, &mut conn, &counter, 2), vec![20, 21]);
    let reply: RawPost = cache.find(&mut conn, 21).await.unwrap();
    assert_eq!(reply.id, 21);

    let deleted: Vec<Post> = diesel_memclone::delete(posts::table.find(10))
        .also_invalidates("posts")
        .using(&cache)
        .get_results(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted.len(), 1);

    let (ids, _) = list!(&cache, &mut conn, &counter, 2);
    assert_eq!(ids, vec![20], "the reply to post 10 went with it");
    let gone = cache
        .find_optional::<RawPost, _>(&mut conn, 21)
        .await
        .unwrap();
    assert_eq!(gone, None, "post 21 was deleted by the cascade");
}

/// SQLite: `UPDATE OR REPLACE posts ..` (and `OR ABORT`, `OR FAIL`, `OR ROLLBACK`) is a write
/// to `posts`; the parser took the conflict word for the table (`replace`) and found `posts`
/// nowhere, so no query of `posts` was invalidated, not even an unscoped one.
#[tokio::test]
async fn sqlite_update_or_replace_invalidates_its_table() {
    let mut conn = sqlite().await;
    conn.batch_execute("INSERT INTO posts VALUES (10, 1, 'a'), (11, 1, 'b'), (20, 2, 'c')")
        .await
        .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let titles = |cache: &Cache| {
        raw::posts::table
            .select(raw::posts::title)
            .order(raw::posts::id)
            .cached("titles")
            .using(cache)
    };
    let before: Vec<String> = titles(&cache).load(&mut conn).await.unwrap();
    assert_eq!(before, ["a", "b", "c"]);
    for (word, title) in [("REPLACE", "z"), ("ABORT", "y")] {
        diesel_memclone::write(diesel::sql_query(format!(
            "UPDATE OR {word} posts SET title = '{title}' WHERE id = 10"
        )))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
        let after: Vec<String> = titles(&cache).load(&mut conn).await.unwrap();
        assert_eq!(after, [title, "b", "c"], "after UPDATE OR {word}");
    }
}

/// A post with its author's name, read by raw SQL.
#[derive(Debug, QueryableByName, Serialize, Deserialize, diesel_memclone::CacheValue)]
struct Titled {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    id: i32,
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

/// A raw cached read whose SQL has a comment holding an apostrophe: the table scanner read
/// the apostrophe as the start of a string literal running to the end of the statement, and
/// missed every table after it (here `users`): a write to `users` left the entry stale.
#[tokio::test]
async fn comment_with_apostrophe_hides_no_table() {
    use diesel_memclone_tests::schema::users;
    let mut conn = sqlite().await;
    conn.batch_execute(
        "INSERT INTO users VALUES (1, 'Ann', 'a'); INSERT INTO posts VALUES (10, 1, 'a')",
    )
    .await
    .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    for comment in ["-- the author's name\n", "/* the author's name */"] {
        let read = |cache: &Cache| {
            diesel::sql_query(format!(
                "SELECT posts.id, users.name FROM posts {comment} \
                 JOIN users ON users.id = posts.user_id ORDER BY posts.id"
            ))
            .cached("titled")
            .using(cache)
        };
        let before: Vec<Titled> = read(&cache).load(&mut conn).await.unwrap();
        let renamed = format!("{}!", before[0].name);
        diesel_memclone::update(users::table.find(1))
            .set(users::name.eq(&renamed))
            .using(&cache)
            .execute(&mut conn)
            .await
            .unwrap();
        let after: Vec<Titled> = read(&cache).load(&mut conn).await.unwrap();
        assert_eq!(
            after[0].name, renamed,
            "after the rename, comment {comment:?}"
        );
    }
}

/// A query kept "for ever" (`ttl(Duration::MAX)`) on the in-process store, and a scoped one
/// (whose generations are created to live longer still): no panic, and a write still
/// invalidates it.
#[tokio::test]
async fn ttl_max_neither_panics_nor_goes_stale() {
    use diesel_memclone_tests::schema::posts;
    let mut conn = sqlite().await;
    conn.batch_execute("INSERT INTO posts VALUES (10, 1, 'a')")
        .await
        .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let read = |cache: &Cache| {
        raw::posts::table
            .select(RawPost::as_select())
            .filter(raw::posts::user_id.eq(1))
            .cached("forever")
            .within(raw::posts::user_id, 1)
            .ttl(std::time::Duration::MAX)
            .using(cache)
    };
    let before: Vec<RawPost> = read(&cache).load(&mut conn).await.unwrap();
    assert_eq!(before.len(), 1);
    let _: Vec<RawPost> = read(&cache).load(&mut conn).await.unwrap();
    diesel_memclone::insert_into(posts::table)
        .values(&Post {
            id: 11,
            user_id: 1,
            title: "b".into(),
        })
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let after: Vec<RawPost> = read(&cache).load(&mut conn).await.unwrap();
    assert_eq!(after.len(), 2);
}

mod nullable {
    diesel::table! {
        notes (id) {
            id -> Integer,
            owner_id -> Nullable<Integer>,
            body -> Text,
        }
    }
}

/// A note whose owner may be NULL.
#[derive(
    Debug, Clone, PartialEq, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone,
)]
#[diesel(table_name = nullable::notes)]
#[memclone(scope(owner_id))]
struct Note {
    id: i32,
    owner_id: Option<i32>,
    body: String,
}

/// Scoped lists of a nullable scope column: the NULL owner's and owner 1's. Writes returning
/// notes of one invalidate that one's list only; a write moving a note between them
/// invalidates both.
#[tokio::test]
async fn nullable_scope_values() {
    use nullable::notes;
    let schema = unique("raw_stmt");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    conn.batch_execute(
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, owner_id INTEGER, body TEXT NOT NULL);
         INSERT INTO notes VALUES (1, NULL, 'a'), (2, 1, 'b')",
    )
    .await
    .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    macro_rules! list {
        ($owner:expr) => {{
            let owner: Option<i32> = $owner;
            let query = notes::table
                .select(Note::as_select())
                .order(notes::id)
                .into_boxed();
            let query = match owner {
                Some(owner) => query.filter(notes::owner_id.eq(owner)),
                None => query.filter(notes::owner_id.is_null()),
            };
            let (rows, queries) = counted!(
                counter,
                query
                    .cached("notes")
                    .within(notes::owner_id, owner)
                    .using(&cache)
                    .load::<Note, _>(&mut conn)
                    .await
                    .unwrap()
            );
            (rows.into_iter().map(|n| n.id).collect::<Vec<_>>(), queries)
        }};
    }
    for owner in [None, Some(1)] {
        list!(owner);
        assert_eq!(list!(owner).1, 0, "{owner:?} cached");
    }
    let _: Note = diesel_memclone::insert_into(notes::table)
        .values(&Note {
            id: 3,
            owner_id: None,
            body: "c".into(),
        })
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(list!(Some(1)), (vec![2], 0), "a NULL owner's note");
    assert_eq!(list!(None), (vec![1, 3], 1), "a NULL owner's note");
    let _: Note = diesel_memclone::update(notes::table.find(3))
        .set(notes::owner_id.eq(Some(1)))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(list!(None), (vec![1], 1), "moved to owner 1");
    assert_eq!(list!(Some(1)), (vec![2, 3], 1), "moved to owner 1");
    let _: Note = diesel_memclone::delete(notes::table.find(3))
        .using(&cache)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(list!(None), (vec![1], 0), "owner 1's note deleted");
    assert_eq!(list!(Some(1)), (vec![2], 1), "owner 1's note deleted");
}

/// A name read through a view.
#[derive(Debug, QueryableByName, Serialize, Deserialize, diesel_memclone::CacheValue)]
struct ViewName {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

/// `uncache` while Redis is unreachable: the write's table invalidation is remembered and
/// delivered once Redis answers, but the custom key the write asked to delete was dropped
/// silently (`let _ =`), so the entry under it (a read of a view over `users`, which no
/// generation of `users` guards) was served stale after Redis came back, until its TTL.
#[tokio::test]
async fn uncache_during_an_outage_is_not_lost() {
    use diesel_memclone::store::RedisStore;
    use diesel_memclone_tests::schema::users;
    use std::time::Duration;
    let schema = unique("raw_stmt");
    let (Some(mut conn), Some(_)) = (postgres(&schema).await, redis_store().await) else {
        return;
    };
    conn.batch_execute(
        "INSERT INTO users VALUES (1, 'Ann', 'a');
         CREATE VIEW user_names_v AS SELECT id, name FROM users",
    )
    .await
    .unwrap();
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .parse()
        .expect("REDIS_URL as redis://ip:port");
    let proxy = diesel_memclone_tests::proxy::Proxy::start(upstream).await;
    let store = RedisStore::builder(proxy.url())
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("raw_stmt"))
        .store_timeout(Duration::from_millis(200))
        .retry_after(Duration::from_millis(100))
        .build()
        .unwrap();
    let read = |cache: &Cache| {
        diesel::sql_query("SELECT name FROM user_names_v WHERE id = 1")
            .cached("view")
            .key("user_1_name")
            .using(cache)
    };
    let first: Vec<ViewName> = read(&cache).load(&mut conn).await.unwrap();
    assert_eq!(first[0].name, "Ann");

    proxy.cut();
    diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anne"))
        .uncache(["user_1_name"])
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    proxy.restore();
    assert!(
        cache.deliver_invalidations().await,
        "delivered once Redis answers"
    );

    let after: Vec<ViewName> = read(&cache).load(&mut conn).await.unwrap();
    assert_eq!(after[0].name, "Anne", "the uncached key after the outage");
}

/// MySQL/MariaDB's `STRAIGHT_JOIN` is a join: the table after it is read. The scanner knew
/// `JOIN` only, so a raw cached read joining `users` that way missed `users`, and a write to
/// it left the entry stale.
#[tokio::test]
async fn straight_join_names_its_table() {
    use diesel_memclone_tests::schema::users;
    let database = unique("raw_stmt");
    let Some(mut conn) = mysql(&database).await else {
        return;
    };
    conn.batch_execute(
        "INSERT INTO users VALUES (1, 'Ann', 'a'); INSERT INTO posts VALUES (10, 1, 'a')",
    )
    .await
    .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let read = |cache: &Cache| {
        diesel::sql_query(
            "SELECT p.id, u.name FROM posts p STRAIGHT_JOIN users u ON u.id = p.user_id",
        )
        .cached("straight")
        .using(cache)
    };
    let before: Vec<Titled> = read(&cache).load(&mut conn).await.unwrap();
    assert_eq!(before[0].name, "Ann");
    diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anne"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let after: Vec<Titled> = read(&cache).load(&mut conn).await.unwrap();
    assert_eq!(after[0].name, "Anne", "after the rename");
    conn.batch_execute(&format!("DROP DATABASE {database}"))
        .await
        .unwrap();
}

/// A raw cached read whose FROM clause is a parenthesized join: the first table follows `(`,
/// not `FROM`, and was missed (here `posts`): a write to it left the entry stale.
#[tokio::test]
async fn parenthesized_join_names_its_first_table() {
    use diesel_memclone_tests::schema::posts;
    let mut conn = sqlite().await;
    conn.batch_execute(
        "INSERT INTO users VALUES (1, 'Ann', 'a'); INSERT INTO posts VALUES (10, 1, 'a')",
    )
    .await
    .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let read = |cache: &Cache| {
        diesel::sql_query(
            "SELECT p.id, p.title AS name FROM (posts p JOIN users u ON u.id = p.user_id)",
        )
        .cached("nested")
        .using(cache)
    };
    let before: Vec<Titled> = read(&cache).load(&mut conn).await.unwrap();
    assert_eq!(before[0].name, "a");
    diesel_memclone::update(posts::table.find(10))
        .set(posts::title.eq("a2"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let after: Vec<Titled> = read(&cache).load(&mut conn).await.unwrap();
    assert_eq!(after[0].name, "a2", "after the retitle");
}

/// MariaDB: `ON DUPLICATE KEY UPDATE id = ..` moves post 10 to another key; the returned row
/// names only the new key, so post 10's entity entry must go with every row of the table.
#[tokio::test]
async fn mariadb_on_duplicate_key_update_of_the_key_evicts_the_old_row() {
    let database = unique("raw_stmt");
    let Some(mut conn) = mysql(&database).await else {
        return;
    };
    conn.batch_execute("INSERT INTO posts VALUES (10, 1, 'a')")
        .await
        .unwrap();
    let cache = Cache::builder()
        .namespace(unique("raw_stmt"))
        .build()
        .unwrap();
    let found: RawPost = cache.find(&mut conn, 10).await.unwrap();
    assert_eq!(found.title, "a");

    let returned: Vec<RawPost> = diesel_memclone::write(diesel::sql_query(
        "INSERT INTO posts (id, user_id, title) VALUES (10, 1, 'a') \
         ON DUPLICATE KEY UPDATE id = 110 RETURNING id, user_id, title",
    ))
    .using(&cache)
    .get_results(&mut conn)
    .await
    .unwrap();
    assert_eq!(returned[0].id, 110);

    let gone = cache
        .find_optional::<RawPost, _>(&mut conn, 10)
        .await
        .unwrap();
    assert_eq!(gone, None, "post 10 is now post 110");
    conn.batch_execute(&format!("DROP DATABASE {database}"))
        .await
        .unwrap();
}

//! The Sequelize reference flow of `quickstart.rs` on synchronous Diesel: a plain
//! `SqliteConnection` in memory and the in-process store, no async runtime in the program.
//!
//! ```text
//! cargo run --example quickstart_sync
//! ```
//!
//! Each step prints HIT or MISS (from the cache's counters) and how many SQL statements the
//! database ran for it (from Diesel's instrumentation).
//!
//! It lives in the library's package and needs only what a user of the crate depends on
//! (diesel-memclone, diesel with SQLite, serde), so it builds quickly.

use diesel::connection::SimpleConnection;
use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::prelude::*;
use diesel_memclone::sync as memclone;
use diesel_memclone::sync::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

mod schema {
    diesel::table! {
        users (id) {
            id -> Integer,
            name -> Text,
            status -> Text,
        }
    }

    diesel::table! {
        posts (id) {
            id -> Integer,
            user_id -> Integer,
            title -> Text,
        }
    }

    diesel::joinable!(posts -> users (user_id));
    diesel::allow_tables_to_appear_in_same_query!(users, posts);
}

use schema::{posts, users};

/// A user.
#[derive(
    Debug, Queryable, Selectable, Identifiable, Insertable, Serialize, Deserialize, MemClone,
)]
#[diesel(table_name = users)]
struct User {
    id: i32,
    name: String,
    status: String,
}

/// A post, belonging to a user; its entries live 10 minutes.
#[derive(
    Debug,
    Queryable,
    Selectable,
    Identifiable,
    Insertable,
    Associations,
    Serialize,
    Deserialize,
    MemClone,
)]
#[diesel(table_name = posts, belongs_to(User))]
#[memclone(ttl = 600)]
struct Post {
    id: i32,
    user_id: i32,
    title: String,
}

/// Counts the SQL statements a connection runs.
#[derive(Clone, Default)]
struct QueryCounter(Arc<AtomicUsize>);

impl QueryCounter {
    fn get(&self) -> usize {
        AtomicUsize::load(&self.0, Ordering::SeqCst)
    }
}

impl Instrumentation for QueryCounter {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::StartQuery { .. } = event {
            AtomicUsize::fetch_add(&self.0, 1, Ordering::SeqCst);
        }
    }
}

struct Step {
    counter: QueryCounter,
    queries: usize,
    stats: diesel_memclone::Stats,
}

impl Step {
    fn start(counter: &QueryCounter) -> Step {
        Step {
            counter: counter.clone(),
            queries: counter.get(),
            stats: diesel_memclone::cache().stats(),
        }
    }

    fn report(self, what: &str, shown: impl std::fmt::Debug) {
        let now = diesel_memclone::cache().stats();
        let outcome = if now.hits > self.stats.hits {
            "HIT "
        } else if now.misses > self.stats.misses {
            "MISS"
        } else {
            "DB  "
        };
        let queries = self.counter.get() - self.queries;
        println!("{outcome} db_queries={queries}  {what}: {shown:?}");
    }
}

fn main() -> diesel_memclone::Result<()> {
    let mut conn = SqliteConnection::establish(":memory:")?;
    conn.batch_execute(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
         CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, title TEXT NOT NULL);",
    )?;
    let counter = QueryCounter::default();
    conn.set_instrumentation(counter.clone());
    let active = || {
        users::table
            .inner_join(posts::table)
            .filter(users::status.eq("active"))
            .select((User::as_select(), Post::as_select()))
            .order(posts::id)
    };

    // 1. Create: written through memclone, which invalidates the users' queries.
    let step = Step::start(&counter);
    let alice = User {
        id: 1,
        name: "Alice".into(),
        status: "active".into(),
    };
    memclone::insert_into(users::table)
        .values(&alice)
        .execute(&mut conn)?;
    memclone::insert_into(posts::table)
        .values(&Post {
            id: 1,
            user_id: 1,
            title: "Post A".into(),
        })
        .execute(&mut conn)?;
    step.report("1. create Alice and Post A", "ok");

    // 2. Query miss, then hit.
    let step = Step::start(&counter);
    let rows: Vec<(User, Post)> = active().cached("active_list").load(&mut conn)?;
    step.report("2. active users with posts", rows.len());
    let step = Step::start(&counter);
    let rows: Vec<(User, Post)> = active().cached("active_list").load(&mut conn)?;
    step.report("2. again", rows.len());
    let step = Step::start(&counter);
    let user = User::find_cached_blocking(&mut conn, 1)?;
    step.report("2. find user 1", &user.name);

    // 3. External write: plain Diesel, bypassing the cache.
    let step = Step::start(&counter);
    diesel::update(users::table.find(1))
        .set(users::name.eq("Alicia"))
        .execute(&mut conn)?;
    step.report("3. external update (plain Diesel) to Alicia", "ok");

    // 4. Stale read: the entity entry still says Alice (contract point 7: bypassing writes).
    let step = Step::start(&counter);
    let mut stale = User::find_cached_blocking(&mut conn, 1)?;
    step.report("4. find user 1 (stale by design)", &stale.name);

    // 5. Reload: bypasses the cache, reads the database, refreshes the entry.
    let step = Step::start(&counter);
    memclone::reload(&mut stale, &mut conn)?;
    step.report("5. reload", &stale.name);
    let step = Step::start(&counter);
    let user = User::find_cached_blocking(&mut conn, 1)?;
    step.report("5. find user 1 after reload", &user.name);

    // 6. Invalidating update through memclone.
    let step = Step::start(&counter);
    // With RETURNING, the written row goes straight into its entity entry (write-through).
    let updated: User = memclone::update(users::table.filter(users::id.eq(1)))
        .set(users::name.eq("ALICIA"))
        .map(|s| s.returning(users::all_columns))
        .get_result(&mut conn)?;
    step.report(
        "6. memclone::update to ALICIA, returning the row",
        &updated.name,
    );

    // 7. The query misses once (the mass invalidation worked), then hits; the entity was
    //    written through by step 6.
    let step = Step::start(&counter);
    let rows: Vec<(User, Post)> = active().cached("active_list").load(&mut conn)?;
    step.report("7. active users with posts", &rows[0].0.name);
    let step = Step::start(&counter);
    let rows: Vec<(User, Post)> = active().cached("active_list").load(&mut conn)?;
    step.report("7. again", &rows[0].0.name);
    let step = Step::start(&counter);
    let user = User::find_cached_blocking(&mut conn, 1)?;
    step.report("7. find user 1", &user.name);

    println!("{:?}", diesel_memclone::cache().stats());
    Ok(())
}

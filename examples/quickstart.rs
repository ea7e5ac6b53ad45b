//! The Sequelize reference flow on SQLite in memory and the in-process store: no servers.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Each step prints HIT or MISS (from the cache's counters) and how many SQL statements the
//! database ran for it (from Diesel's instrumentation).

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use diesel_memclone as memclone;
use diesel_memclone::prelude::*;
use diesel_memclone_tests::schema::{posts, users};
use diesel_memclone_tests::{sqlite, Post, QueryCounter, User};

struct Step {
    counter: QueryCounter,
    queries: usize,
    stats: memclone::Stats,
}

impl Step {
    fn start(counter: &QueryCounter) -> Step {
        Step {
            counter: counter.clone(),
            queries: counter.get(),
            stats: memclone::cache().stats(),
        }
    }

    fn report(self, what: &str, shown: impl std::fmt::Debug) {
        let now = memclone::cache().stats();
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> memclone::Result<()> {
    let mut conn = sqlite().await;
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
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
        .execute(&mut conn)
        .await?;
    memclone::insert_into(posts::table)
        .values(&Post {
            id: 1,
            user_id: 1,
            title: "Post A".into(),
        })
        .execute(&mut conn)
        .await?;
    step.report("1. create Alice and Post A", "ok");

    // 2. Query miss, then hit.
    let step = Step::start(&counter);
    let rows: Vec<(User, Post)> = active().cached("active_list").load(&mut conn).await?;
    step.report("2. active users with posts", rows.len());
    let step = Step::start(&counter);
    let rows: Vec<(User, Post)> = active().cached("active_list").load(&mut conn).await?;
    step.report("2. again", rows.len());
    let step = Step::start(&counter);
    let user = User::find_cached(&mut conn, 1).await?;
    step.report("2. find user 1", &user.name);

    // 3. External write: plain Diesel, bypassing the cache.
    let step = Step::start(&counter);
    diesel::update(users::table.find(1))
        .set(users::name.eq("Alicia"))
        .execute(&mut conn)
        .await?;
    step.report("3. external update (plain Diesel) to Alicia", "ok");

    // 4. Stale read: the entity entry still says Alice (contract point 7: bypassing writes).
    let step = Step::start(&counter);
    let mut stale = User::find_cached(&mut conn, 1).await?;
    step.report("4. find user 1 (stale by design)", &stale.name);

    // 5. Reload: bypasses the cache, reads the database, refreshes the entry.
    let step = Step::start(&counter);
    memclone::reload(&mut stale, &mut conn).await?;
    step.report("5. reload", &stale.name);
    let step = Step::start(&counter);
    let user = User::find_cached(&mut conn, 1).await?;
    step.report("5. find user 1 after reload", &user.name);

    // 6. Invalidating update through memclone.
    let step = Step::start(&counter);
    // With RETURNING, the written row goes straight into its entity entry (write-through).
    let updated: User = memclone::update(users::table.filter(users::id.eq(1)))
        .set(users::name.eq("ALICIA"))
        .map(|s| s.returning(users::all_columns))
        .get_result(&mut conn)
        .await?;
    step.report(
        "6. memclone::update to ALICIA, returning the row",
        &updated.name,
    );

    // 7. The query misses once (the mass invalidation worked), then hits; the entity was
    //    written through by step 6.
    let step = Step::start(&counter);
    let rows: Vec<(User, Post)> = active().cached("active_list").load(&mut conn).await?;
    step.report("7. active users with posts", &rows[0].0.name);
    let step = Step::start(&counter);
    let rows: Vec<(User, Post)> = active().cached("active_list").load(&mut conn).await?;
    step.report("7. again", &rows[0].0.name);
    let step = Step::start(&counter);
    let user = User::find_cached(&mut conn, 1).await?;
    step.report("7. find user 1", &user.name);

    println!("{:?}", memclone::cache().stats());
    Ok(())
}

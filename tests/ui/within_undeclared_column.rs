use diesel_memclone::{CachedDsl, MemClone};
use serde::{Deserialize, Serialize};

diesel::table! { posts (id) { id -> Integer, user_id -> Integer, title -> Text } }

#[derive(Serialize, Deserialize, MemClone)]
#[diesel(table_name = posts)]
#[memclone(scope(user_id))]
struct Post {
    id: i32,
    user_id: i32,
    title: String,
}

fn main() {
    // `title` is not a scope column of `Post`.
    let _ = posts::table
        .cached("by_title")
        .within(posts::title, "a".to_string());
    // A declared one is fine.
    let _ = posts::table.cached("by_user").within(posts::user_id, 1);
}

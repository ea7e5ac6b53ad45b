use diesel_memclone::MemClone;

diesel::table! { users (id) { id -> Integer, name -> Text } }

#[derive(MemClone)]
#[diesel(table_name = users, primary_key(uid))]
struct User {
    id: i32,
    name: String,
}

fn main() {}

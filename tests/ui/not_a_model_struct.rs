use diesel_memclone::MemClone;

diesel::table! { users (id) { id -> Integer, name -> Text } }

#[derive(MemClone)]
enum User {
    Admin,
}

#[derive(MemClone)]
struct Pair(i32, String);

#[derive(MemClone)]
struct Generic<T> {
    id: T,
}

fn main() {}

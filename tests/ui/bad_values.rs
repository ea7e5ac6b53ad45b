use diesel_memclone::MemClone;

diesel::table! { users (id) { id -> Integer, name -> Text } }

#[derive(MemClone)]
#[diesel(table_name = users)]
#[memclone(ttl = "soon", name = 5)]
struct User {
    id: i32,
    name: String,
}

#[derive(MemClone)]
#[diesel(table_name = users)]
#[memclone(ttl = 0)]
struct Zero {
    id: i32,
    name: String,
}

fn main() {}

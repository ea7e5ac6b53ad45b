use diesel_memclone::MemClone;

diesel::table! { users (id) { id -> Integer, name -> Text } }

#[derive(MemClone)]
#[diesel(table_name = users)]
#[memclone(colour = "red")]
struct User {
    id: i32,
    name: String,
}

fn main() {}

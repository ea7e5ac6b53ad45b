//! Review: a synchronous read from a `Mutex` "pool" whose miss blocks on the connection while
//! it leads this process's load of the entry; the connection's holder then reads the same
//! entry with that connection and waits on the load that waits on it.

use diesel::prelude::*;
use diesel_memclone::sync::prelude::*;
use diesel_memclone::Cache;
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn review_pool_miss_does_not_stall_the_connections_holder() {
    let pool = Arc::new(Mutex::new(sqlite_sync()));
    diesel::connection::SimpleConnection::batch_execute(
        &mut *pool.lock().unwrap(),
        "INSERT INTO users VALUES (1, 'Ann', 'a')",
    )
    .unwrap();
    let cache = Cache::builder()
        .namespace(unique("review"))
        .build()
        .unwrap();
    let names = |cache: &Cache| {
        users::table
            .select(users::name)
            .cached("review_pool_names")
            .using(cache)
    };
    // This thread takes the connection (a transaction, a batch of reads on one connection).
    let mut held = pool.lock().unwrap();
    let reader = {
        let (pool, cache) = (pool.clone(), cache.clone());
        std::thread::spawn(move || {
            // A miss: it leads the load and waits for the connection.
            let got: Vec<String> = names(&cache).load_from(&*pool).unwrap();
            got
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The holder reads the same entry on the connection it holds.
    let began = Instant::now();
    let mine: Vec<String> = names(&cache).load(&mut *held).unwrap();
    let waited = began.elapsed();
    drop(held);
    assert_eq!(mine, ["Ann"]);
    assert_eq!(reader.join().unwrap(), ["Ann"]);
    assert!(
        waited < Duration::from_secs(1),
        "the connection's holder waited {waited:?} on a load that waited for its connection"
    );
}

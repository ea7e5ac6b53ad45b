//! Review: the async `*_from` reads (a pool of one connection): a miss leads the process's load
//! of the entry while it waits for the pool's connection; a task holding that connection and
//! reading the same entry with it waits on the load that waits on it.

use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use diesel_memclone::Cache;
use diesel_memclone_tests::*;
use std::time::{Duration, Instant};

type Deadpool = diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_async_pool_miss_does_not_stall_the_connections_holder() {
    let schema = unique("review");
    let Some(mut conn) = postgres(&schema).await else {
        return;
    };
    conn.batch_execute("INSERT INTO users VALUES (1, 'Ann', 'a')")
        .await
        .unwrap();
    let mut setup = ManagerConfig::<AsyncPgConnection>::default();
    let search_path = format!("SET search_path TO {schema}");
    setup.custom_setup = Box::new(move |url| {
        let search_path = search_path.clone();
        Box::pin(async move {
            let mut conn = AsyncPgConnection::establish(url).await?;
            conn.batch_execute(&search_path)
                .await
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
            Ok(conn)
        })
    });
    let manager = AsyncDieselConnectionManager::new_with_config(postgres_url(), setup);
    let pool = Deadpool::builder(manager).max_size(1).build().unwrap();
    let cache = Cache::builder()
        .namespace(unique("review"))
        .build()
        .unwrap();
    // This task takes the pool's only connection.
    let mut held = pool.get().await.unwrap();
    let reader = {
        let (pool, cache) = (pool.clone(), cache.clone());
        tokio::spawn(async move { cache.find_from::<User, _>(&pool, 1).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = Instant::now();
    let mine: User = cache.find(&mut held, 1).await.unwrap();
    let waited = began.elapsed();
    drop(held);
    assert_eq!(mine.name, "Ann");
    assert_eq!(reader.await.unwrap().name, "Ann");
    assert!(
        waited < Duration::from_secs(1),
        "the connection's holder waited {waited:?} on a load that waited for its connection"
    );
}

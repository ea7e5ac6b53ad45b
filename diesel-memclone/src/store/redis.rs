//! The Redis store, over a deadpool-redis pool.

use super::{fresh_generation, Fetched, Store, StoreResult};
use crate::error::{Error, StoreError};
use deadpool_redis::redis::{self, Value};
use deadpool_redis::{Config, Pool, PoolConfig, Runtime, Timeouts};
use futures_util::future::{BoxFuture, FutureExt};
use std::time::Duration;

/// A [`Store`] on a Redis (or Valkey) server, through a [deadpool-redis](https://docs.rs/deadpool-redis) pool.
///
/// Every operation is one pipelined round trip: a hit is one `GET` for the entry plus one `GET`
/// per generation it depends on, sent together. Generations are written with `SET .. NX GET`,
/// so a missing generation is created with a fresh random value and never reset to an old one.
///
/// ```no_run
/// # async fn demo() -> diesel_memclone::Result<()> {
/// use diesel_memclone::{store::RedisStore, Cache};
/// let store = RedisStore::builder("redis://127.0.0.1:6379").pool_size(16).build()?;
/// let cache = Cache::builder().store(store).namespace("myapp").build()?;
/// # let _ = cache; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

/// Options for a [`RedisStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    pool_size: usize,
    connect_timeout: Duration,
}

impl RedisStoreBuilder {
    /// Maximum number of pooled connections (default 16).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// How long to wait for a pooled connection or a new one (default 1 s). Each operation is
    /// bounded again by the cache's [`store_timeout`](crate::CacheBuilder::store_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builds the pool. Connections are opened lazily, so an unreachable server is not an error
    /// here (the cache fails open); a malformed URL is.
    pub fn build(self) -> Result<RedisStore, Error> {
        redis::parse_redis_url(&self.url)
            .ok_or_else(|| Error::Config(format!("not a Redis URL: {:?}", self.url)))?;
        let mut config = Config::from_url(self.url);
        let timeouts = Timeouts {
            wait: Some(self.connect_timeout),
            create: Some(self.connect_timeout),
            recycle: Some(self.connect_timeout),
        };
        config.pool = Some(PoolConfig {
            max_size: self.pool_size,
            timeouts,
            ..Default::default()
        });
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| Error::Config(format!("cannot build the Redis pool: {e}")))?;
        Ok(RedisStore { pool })
    }
}

impl RedisStore {
    /// Starts the options for a store at `url` (`redis://host:port/db`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// A store from an existing deadpool-redis pool.
    pub fn from_pool(pool: Pool) -> Self {
        Self { pool }
    }

    /// The underlying pool (the same connections the cache uses).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> StoreResult<T> {
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        pipe.query_async(&mut conn)
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn set_generation(pipe: &mut redis::Pipeline, key: &str, value: u64, ttl: Option<Duration>) {
    let cmd = pipe.cmd("SET").arg(key).arg(value);
    if let Some(ttl) = ttl {
        cmd.arg("PX").arg(millis(ttl));
    }
}

fn parse_generation(value: &Value) -> Option<u64> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

impl Store for RedisStore {
    fn fetch<'a>(
        &'a self,
        entry: &'a str,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Fetched>> {
        async move {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(entry);
            for key in generations {
                pipe.cmd("GET").arg(key);
            }
            let values: Vec<Value> = self.run(&pipe).await?;
            let mut values = values.into_iter();
            let entry = match values.next() {
                Some(Value::BulkString(bytes)) => Some(bytes),
                _ => None,
            };
            let generations = values.map(|v| parse_generation(&v)).collect();
            Ok(Fetched { entry, generations })
        }
        .boxed()
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(millis(ttl))
                .ignore();
            self.run(&pipe).await
        }
        .boxed()
    }

    fn remove<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            // One DEL per key: the keys may live in different cluster slots.
            for key in keys {
                pipe.cmd("DEL").arg(key).ignore();
            }
            self.run(&pipe).await
        }
        .boxed()
    }

    fn ensure_generations<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<Vec<u64>>> {
        async move {
            let fresh: Vec<u64> = keys.iter().map(|_| fresh_generation()).collect();
            let mut pipe = redis::pipe();
            for (key, value) in keys.iter().zip(&fresh) {
                set_generation(&mut pipe, key, *value, ttl);
                pipe.arg("NX").arg("GET");
            }
            let previous: Vec<Value> = self.run(&pipe).await?;
            let mut result = Vec::with_capacity(keys.len());
            let mut repair = redis::pipe();
            for ((key, fresh), previous) in keys.iter().zip(fresh).zip(previous) {
                match previous {
                    Value::Nil => result.push(fresh),
                    other => match parse_generation(&other) {
                        Some(existing) => result.push(existing),
                        None => {
                            // Not a generation (a foreign or corrupt value): replace it.
                            let value = fresh_generation();
                            set_generation(&mut repair, key, value, ttl);
                            repair.ignore();
                            result.push(value);
                        }
                    },
                }
            }
            if repair.cmd_iter().next().is_some() {
                self.run::<()>(&repair).await?;
            }
            Ok(result)
        }
        .boxed()
    }

    fn bump_generations<'a>(
        &'a self,
        keys: &'a [String],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for key in keys {
                set_generation(&mut pipe, key, fresh_generation(), ttl);
                pipe.ignore();
            }
            self.run(&pipe).await
        }
        .boxed()
    }
}

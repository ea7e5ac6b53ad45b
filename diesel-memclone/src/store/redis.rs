//! The Redis store, over a deadpool-redis pool.

use super::tracking::{self, Targets};
use super::{
    fresh_generation, Bumped, Fetched, FollowChanges, LockProbe, Probed, PutEntry, ReadLock,
    ReadLocked, ReadProbe, Store, StoreResult, TableBump, WriteThrough, SEQUENCE_SHIFT,
};
use crate::error::{Error, StoreError};
use deadpool::managed;
use deadpool_redis::redis::{self, Value};
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use futures_util::future::try_join_all;
use futures_util::future::{BoxFuture, FutureExt, Shared as SharedFuture};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

/// A [`Store`] on a Redis (or Valkey) server, over multiplexed connections opened through a
/// [deadpool-redis](https://docs.rs/deadpool-redis) pool.
///
/// Every operation is one pipelined round trip: a hit is one `GET` for the entry plus one `GET`
/// per generation it depends on, sent together. Generations are written with `SET .. NX GET`,
/// so a missing generation is created with a fresh random value and never reset to an old one.
/// Scripts are called by SHA (`EVALSHA`), and loaded again if the server lost them.
///
/// A key of the namespace that holds a value of another type (another writer, a bad migration)
/// is a miss that gets replaced, never a store failure: an entry is counted as corrupt and
/// refilled, a generation or a lock is replaced, and a write's script replaces whatever it
/// finds, so that an invalidation is never lost to such a key.
///
/// The store keeps a fixed number of [multiplexed](RedisStoreBuilder::connections) connections
/// and spreads operations over them; each is opened once, by the first operation that needs
/// it, while concurrent operations wait for that same connect. [`RedisStore::connect`] opens
/// them all ahead of the first request.
///
/// Synchronous calls ([`crate::sync`]) are the exception: each calling thread, up to
/// [`MAX_THREAD_RUNTIMES`](crate::sync::MAX_THREAD_RUNTIMES) of them, opens one connection of its
/// own (through the pool's manager, with its settings, outside its size) on its own runtime,
/// and closes it when the thread ends (or, once the store is dropped, when the thread next opens
/// a connection to another store). Count them in Redis's `maxclients`. A cluster store's
/// synchronous calls use its shared cluster connection.
///
/// ```no_run
/// # async fn demo() -> diesel_memclone::Result<()> {
/// use diesel_memclone::{store::RedisStore, Cache};
/// let store = RedisStore::builder("redis://127.0.0.1:6379").connections(2).build()?;
/// store.connect().await?; // optional: open the connections now rather than on first use
/// let cache = Cache::builder().store(store).namespace("myapp").build()?;
/// # let _ = cache; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    backend: Backend,
    /// Multiplexed connections taken out of the pool and shared by every operation. A deadpool
    /// checkout verifies its connection with a `PING` round trip, which would double the cost of
    /// a hit; a multiplexed connection needs no checkout: each operation clones it.
    shared: Arc<Shared>,
    /// Where a near tier's change stream connects (unknown for a store made from a pool).
    targets: Option<Targets>,
}

struct Shared {
    single: Vec<Slot<redis::aio::MultiplexedConnection>>,
    cluster: Slot<redis::cluster_async::ClusterConnection>,
    next: AtomicUsize,
}

impl Shared {
    fn new(slots: usize) -> Arc<Self> {
        Arc::new(Shared {
            single: (0..slots.max(1)).map(|_| Slot::default()).collect(),
            cluster: Slot::default(),
            next: AtomicUsize::new(0),
        })
    }
}

/// A connect in progress, awaited by every operation that needs its connection meanwhile.
/// Why a connection could not be opened, shared by every caller that waited for it.
type ConnectError = Arc<dyn std::error::Error + Send + Sync>;

type Connecting<C> = SharedFuture<BoxFuture<'static, Result<C, ConnectError>>>;

/// One shared connection: open, being opened, or not yet (or no longer) open.
enum SlotState<C> {
    Closed,
    Connecting(u64, Connecting<C>),
    Open(u64, C),
}

/// One shared connection and its state, behind a lock held only to look or swap.
struct Slot<C> {
    state: Mutex<SlotState<C>>,
    /// Numbers the connects, so that a late outcome or failure touches only its own connection.
    connects: AtomicU64,
}

impl<C> Default for Slot<C> {
    fn default() -> Self {
        Slot {
            state: Mutex::new(SlotState::Closed),
            connects: AtomicU64::new(0),
        }
    }
}

/// A connection lent to one operation: `id` names it for [`Slot::forget`]; `fresh` when this
/// operation waited for it to open (a failure on it is not worth a retry).
struct Lent<C> {
    conn: C,
    id: u64,
    fresh: bool,
}

impl<C: Clone + Send + 'static> Slot<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState<C>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open connection, or the outcome of the one connect that every caller of a closed
    /// slot waits for (`open` starts it).
    async fn get(
        &self,
        open: impl FnOnce() -> BoxFuture<'static, Result<C, ConnectError>>,
    ) -> StoreResult<Lent<C>> {
        let (id, connecting) = {
            let mut state = self.lock();
            match &*state {
                SlotState::Open(id, conn) => {
                    return Ok(Lent {
                        conn: conn.clone(),
                        id: *id,
                        fresh: false,
                    })
                }
                SlotState::Connecting(id, connecting) => (*id, connecting.clone()),
                SlotState::Closed => {
                    let id = self.connects.fetch_add(1, Ordering::Relaxed);
                    let connecting = open().shared();
                    *state = SlotState::Connecting(id, connecting.clone());
                    (id, connecting)
                }
            }
        };
        let outcome = connecting.await;
        let mut state = self.lock();
        if matches!(&*state, SlotState::Connecting(current, _) if *current == id) {
            *state = match &outcome {
                Ok(conn) => SlotState::Open(id, conn.clone()),
                // The next operation tries again.
                Err(_) => SlotState::Closed,
            };
        }
        match outcome {
            Ok(conn) => Ok(Lent {
                conn,
                id,
                fresh: true,
            }),
            Err(error) => Err(StoreError::Backend(error)),
        }
    }

    /// Closes connection `id` if it is still the slot's: of many operations failing on one
    /// broken connection, the first closes it and the others leave its successor alone.
    fn forget(&self, id: u64) {
        let mut state = self.lock();
        if matches!(&*state, SlotState::Open(current, _) if *current == id) {
            *state = SlotState::Closed;
        }
    }

    fn reset(&self) {
        *self.lock() = SlotState::Closed;
    }
}

#[derive(Clone)]
enum Backend {
    Single(Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.backend {
            Backend::Single(_) => "single",
            Backend::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("kind", &kind)
            .field("connections", &self.shared.single.len())
            .finish()
    }
}

/// Options for a [`RedisStore`].
#[derive(Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    urls: Vec<String>,
    cluster: bool,
    connections: usize,
    connect_timeout: Duration,
    #[cfg(feature = "redis-tls")]
    tls_root_certificates: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("urls", &self.urls.len())
            .field("cluster", &self.cluster)
            .field("connections", &self.connections)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// How many multiplexed connections to a single server the store opens and spreads its
    /// operations over (default [`RedisStore::DEFAULT_CONNECTIONS`], at least 1). One
    /// connection carries any number of concurrent operations, pipelined together, and the
    /// pipelining is what makes it fast: on 2 cores, 16 and 64 tasks made the most hits per
    /// second on 1 connection and fewer on each step up to 32 (`examples/connections.rs`).
    /// More may help on many cores, where one connection's I/O task can fill a core: measure.
    /// A cluster store uses one cluster connection (one multiplexed connection per node)
    /// whatever this says.
    pub fn connections(mut self, connections: usize) -> Self {
        self.connections = connections.max(1);
        self
    }

    /// How long to wait for a new connection (default 1 s). Each operation is bounded again by
    /// the cache's [`store_timeout`](crate::CacheBuilder::store_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Trusts these certificate authorities (PEM, one or more) for `rediss://` URLs instead of
    /// the system's: for a server whose certificate a private CA signed. Single servers only.
    #[cfg(feature = "redis-tls")]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_certificates = Some(pem.into());
        self
    }

    /// Builds the store. Connections are opened on first use (or by [`RedisStore::connect`]),
    /// so an unreachable server is not an error here (the cache fails open); a malformed URL
    /// is, and so is a `rediss://` URL without the `redis-tls` feature.
    pub fn build(self) -> Result<RedisStore, Error> {
        if self.urls.is_empty() {
            return Err(Error::Config("no Redis URL given".into()));
        }
        for url in &self.urls {
            redis::parse_redis_url(url)
                .ok_or_else(|| Error::Config(format!("not a Redis URL: {url:?}")))?;
            if url.starts_with("rediss://") && !cfg!(feature = "redis-tls") {
                return Err(Error::Config(format!(
                    "{url:?} asks for TLS: enable the `redis-tls` feature of diesel-memclone"
                )));
            }
        }
        #[cfg(feature = "redis-tls")]
        if self.urls.iter().any(|url| url.starts_with("rediss://")) {
            // rustls needs a process-wide crypto provider; if the application installed one
            // already, that one stays.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let timeouts = Timeouts {
            wait: Some(self.connect_timeout),
            create: Some(self.connect_timeout),
            recycle: Some(self.connect_timeout),
        };
        // The pool only opens connections: each is taken out of it for good, and it opens at
        // most one per shared connection at a time.
        let pool_config = PoolConfig {
            max_size: self.connections,
            timeouts,
            ..Default::default()
        };
        let built =
            |e: &dyn std::fmt::Display| Error::Config(format!("cannot build the Redis pool: {e}"));
        let targets;
        let backend = if self.cluster {
            #[cfg(feature = "redis-tls")]
            if self.tls_root_certificates.is_some() {
                return Err(Error::Config(
                    "tls_root_certificates applies to a single server, not a cluster".into(),
                ));
            }
            let seeds = self
                .urls
                .iter()
                .map(|url| tracking::info(url).map_err(|e| built(&e)))
                .collect::<Result<Vec<_>, _>>()?;
            targets = Some(Targets::Cluster(seeds));
            let mut config = deadpool_redis::cluster::Config::from_urls(self.urls);
            config.pool = Some(pool_config);
            Backend::Cluster(
                config
                    .create_pool(Some(Runtime::Tokio1))
                    .map_err(|e| built(&e))?,
            )
        } else {
            let url = self.urls.into_iter().next().unwrap_or_default();
            #[cfg(feature = "redis-tls")]
            let url = match self.tls_root_certificates {
                Some(pem) => {
                    let certificates = redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    };
                    redis::Client::build_with_tls(url.as_str(), certificates)
                        .map_err(|e| built(&e))?
                        .get_connection_info()
                        .clone()
                }
                None => redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .map_err(|e| built(&e))?,
            };
            targets = Some(Targets::Single(Box::new(
                redis::IntoConnectionInfo::into_connection_info(url.clone())
                    .map_err(|e| built(&e))?,
            )));
            // Without it, redis-rs gives up connecting after its own default of 1 s.
            let connection = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.connect_timeout));
            let manager =
                deadpool_redis::Manager::new_with_config(url, connection).map_err(|e| built(&e))?;
            Backend::Single(
                Pool::builder(manager)
                    .config(pool_config)
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| built(&e))?,
            )
        };
        Ok(RedisStore {
            backend,
            shared: Shared::new(self.connections),
            targets,
        })
    }
}

impl RedisStore {
    /// How many multiplexed connections a store opens unless told otherwise (see
    /// [`RedisStoreBuilder::connections`]).
    pub const DEFAULT_CONNECTIONS: usize = 1;

    /// Starts the options for a store at `url`: `redis://host:port/db`, or `rediss://` for TLS
    /// (with the `redis-tls` feature; `rediss://host:port/#insecure` skips the certificate check
    /// with `redis-tls-insecure`, for tests only).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        Self::builder_for(vec![url.into()], false)
    }

    /// Starts the options for a store on a Redis Cluster, given one or more of its nodes.
    ///
    /// Keys are laid out with hash tags (see the crate's key layout), and no operation relies
    /// on several slots changing together: a read sends its commands to the nodes that hold
    /// them, in parallel.
    pub fn cluster_builder<S: Into<String>>(
        urls: impl IntoIterator<Item = S>,
    ) -> RedisStoreBuilder {
        Self::builder_for(urls.into_iter().map(Into::into).collect(), true)
    }

    fn builder_for(urls: Vec<String>, cluster: bool) -> RedisStoreBuilder {
        RedisStoreBuilder {
            urls,
            cluster,
            connections: Self::DEFAULT_CONNECTIONS,
            connect_timeout: Duration::from_secs(1),
            #[cfg(feature = "redis-tls")]
            tls_root_certificates: None,
        }
    }

    /// A store whose connections `pool` opens: [`RedisStore::DEFAULT_CONNECTIONS`] of them, or
    /// the pool's maximum size if smaller. Each is taken out of the pool for good. Synchronous
    /// calls share these connections too (no connection of each thread's own, which would miss
    /// the pool's hooks), at about 1.35× the cost of a thread's own.
    pub fn from_pool(pool: Pool) -> Self {
        let connections = Self::DEFAULT_CONNECTIONS.min(pool.status().max_size);
        Self {
            backend: Backend::Single(pool),
            shared: Shared::new(connections),
            targets: None,
        }
    }

    /// A store whose cluster connection `pool` opens (taken out of the pool for good).
    pub fn from_cluster_pool(pool: deadpool_redis::cluster::Pool) -> Self {
        Self {
            backend: Backend::Cluster(pool),
            shared: Shared::new(1),
            targets: None,
        }
    }

    /// True when this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// [`Store::bump_table`] with the write's entries stored in the same script
    /// (`BUMP_AND_PUT_SCRIPT`), on a single server.
    async fn bump_and_write_through(
        &self,
        bump: TableBump<'_>,
        through: WriteThrough<'_>,
    ) -> StoreResult<Option<Bumped>> {
        let key_count = 1 + bump.keys.len() + bump.row_keys.len() + 1 + through.keys.len();
        let mut cmd = evalsha(&SCRIPTS.bump_and_put, key_count);
        cmd.arg(bump.sequence)
            .arg(bump.keys)
            .arg(bump.row_keys)
            .arg(bump.observe)
            .arg(through.keys);
        let ttl = millis(through.ttl);
        cmd.arg(bump.keys.len())
            .arg(bump.row_keys.len())
            .arg(millis(bump.rows_ttl))
            .arg(through.keys.len())
            .arg(through.sequence)
            .arg(through.guard)
            .arg(ttl)
            .arg(ttl)
            .arg(extended_millis(through.ttl))
            .arg(fresh_generation() >> SEQUENCE_SHIFT)
            .arg(bump.values)
            .arg(bump.row_values)
            .arg(fresh_generation());
        for value in through.values {
            cmd.arg(value.as_slice());
        }
        let reply = reply(self.run_once(&[cmd]).await?.pop().unwrap_or(Value::Nil))?;
        let Value::Array(items) = reply else {
            return Ok(None);
        };
        let [Value::Int(next), observed, Value::Int(stored)] = items.as_slice() else {
            return Ok(None);
        };
        Ok(u64::try_from(*next).ok().map(|next| {
            Bumped::new(next, vec![parse_generation(observed)]).with_written_through(*stored == 1)
        }))
    }

    /// Opens every connection now (those not open yet), rather than on first use: call it at
    /// start-up so that the first burst of requests finds them open. Fails if one cannot be
    /// opened; the store stays usable (it tries again on use).
    pub async fn connect(&self) -> StoreResult<()> {
        match &self.backend {
            Backend::Single(pool) => {
                try_join_all(
                    self.shared
                        .single
                        .iter()
                        .map(|slot| slot.get(|| open_single(pool))),
                )
                .await?;
            }
            Backend::Cluster(pool) => {
                self.shared.cluster.get(|| open_cluster(pool)).await?;
            }
        }
        Ok(())
    }

    /// Runs commands in one round trip: one pipeline on a single server; on a cluster, every
    /// command at once over the multiplexed connection (a pipeline must stay in one slot there).
    /// Error replies come back in place (`Value::ServerError`), for the caller to judge.
    async fn run(&self, cmds: &[redis::Cmd]) -> StoreResult<Vec<Value>> {
        self.run_loading_scripts(cmds, true).await
    }

    /// Like `run`, never resent: for commands that set generations to given values, where a
    /// resend after a first send that did execute could restore a value another writer had
    /// already replaced. A failure is reported, and the cache retries later with fresh values.
    async fn run_once(&self, cmds: &[redis::Cmd]) -> StoreResult<Vec<Value>> {
        self.run_loading_scripts(cmds, false).await
    }

    /// Scripts are called by SHA (`EVALSHA`: 40 bytes instead of the script's text). A server
    /// that lost them (a restart, a failover, `SCRIPT FLUSH`) refuses with `NOSCRIPT`, which
    /// means the command did not run: it is sent again once the scripts are loaded, as
    /// `redis::Script::invoke_async` does for a single call (and safe for `run_once`).
    async fn run_loading_scripts(
        &self,
        cmds: &[redis::Cmd],
        resend: bool,
    ) -> StoreResult<Vec<Value>> {
        let mut values = self.run_with(cmds, resend).await?;
        let refused: Vec<usize> = (0..values.len())
            .filter(|&i| is_noscript(&values[i]))
            .collect();
        if refused.is_empty() {
            return Ok(values);
        }
        let loads: Vec<redis::Cmd> = SCRIPT_SOURCES
            .iter()
            .map(|source| {
                let mut cmd = redis::cmd("SCRIPT");
                cmd.arg("LOAD").arg(*source);
                cmd
            })
            .collect();
        for loaded in self.run_with(&loads, true).await? {
            reply(loaded)?;
        }
        let again: Vec<redis::Cmd> = refused.iter().map(|&i| cmds[i].clone()).collect();
        let replies = self.run_with(&again, resend).await?;
        for (i, value) in refused.into_iter().zip(replies) {
            values[i] = value;
        }
        Ok(values)
    }

    async fn run_with(&self, cmds: &[redis::Cmd], resend: bool) -> StoreResult<Vec<Value>> {
        match &self.backend {
            // Only a store this crate built from its URL: a pool of the user's own may
            // configure its connections in hooks (`SELECT`, `AUTH`, a name) that a connection
            // opened apart from the pool would miss.
            Backend::Single(pool) if crate::sync::on_own_runtime() && self.targets.is_some() => {
                self.run_on_own_connection(pool, cmds, resend).await
            }
            Backend::Single(pool) => {
                let n = self.shared.next.fetch_add(1, Ordering::Relaxed) % self.shared.single.len();
                let slot = &self.shared.single[n];
                let pipe = pipeline(cmds);
                // A shared connection may have died while idle (a restart, a cut link): one
                // retry on a fresh connection before reporting a failure.
                for attempt in 0..2 {
                    let Lent {
                        mut conn,
                        id,
                        fresh,
                    } = slot.get(|| open_single(pool)).await?;
                    // No timer here: the cache bounds every operation with its own timeout and
                    // calls `reset` when it fires (a timer per call is measurable on a hit).
                    match pipe.query_async(&mut conn).await {
                        Ok(values) => return Ok(values),
                        Err(error) if broken(&error) => {
                            slot.forget(id);
                            if fresh || attempt == 1 || !resend {
                                return Err(StoreError::backend(error));
                            }
                        }
                        Err(error) => return Err(StoreError::backend(error)),
                    }
                }
                Err(StoreError::Unavailable)
            }
            // A synchronous caller's own runtime: the cluster connection, shared, lives on the
            // internal runtime.
            Backend::Cluster(pool) if crate::sync::on_own_runtime() => {
                crate::sync::in_shared_runtime(self.run_on_cluster(pool, cmds)).await
            }
            Backend::Cluster(pool) => self.run_on_cluster(pool, cmds).await,
        }
    }

    async fn run_on_cluster(
        &self,
        pool: &deadpool_redis::cluster::Pool,
        cmds: &[redis::Cmd],
    ) -> StoreResult<Vec<Value>> {
        let slot = &self.shared.cluster;
        let Lent {
            conn: shared, id, ..
        } = slot.get(|| open_cluster(pool)).await?;
        let replies = try_join_all(cmds.iter().map(|cmd| {
            let mut conn = shared.clone();
            async move { in_place(cmd.query_async::<Value>(&mut conn).await) }
        }));
        match replies.await {
            Ok(values) => Ok(values),
            Err(error) => {
                if broken(&error) {
                    slot.forget(id);
                }
                Err(StoreError::backend(error))
            }
        }
    }
}

impl RedisStore {
    /// `run_with` during a synchronous call on the caller's own runtime: on a connection of this
    /// thread's own, opened on that runtime (see [`crate::sync::MAX_THREAD_RUNTIMES`]), so
    /// that the reply is read by this thread, not handed over from another. It is not lent to
    /// other threads, which could not use it while this one is not inside a call.
    async fn run_on_own_connection(
        &self,
        pool: &Pool,
        cmds: &[redis::Cmd],
        resend: bool,
    ) -> StoreResult<Vec<Value>> {
        let pipe = pipeline(cmds);
        for attempt in 0..2 {
            let (mut conn, fresh) = match own_connection(&self.shared) {
                Some(conn) => (conn, false),
                None => {
                    let conn = managed::Manager::create(pool.manager())
                        .await
                        .map_err(StoreError::backend)?;
                    keep_own_connection(&self.shared, conn.clone());
                    (conn, true)
                }
            };
            match pipe.query_async(&mut conn).await {
                Ok(values) => return Ok(values),
                Err(error) if broken(&error) => {
                    forget_own_connection(&self.shared);
                    if fresh || attempt == 1 || !resend {
                        return Err(StoreError::backend(error));
                    }
                }
                Err(error) => return Err(StoreError::backend(error)),
            }
        }
        Err(StoreError::Unavailable)
    }
}

/// The commands as one pipeline whose error replies come back in place, for each operation to
/// judge per key.
fn pipeline(cmds: &[redis::Cmd]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for cmd in cmds {
        pipe.add_command(cmd.clone());
    }
    pipe
}

std::thread_local! {
    /// The connections this thread opened on its own runtime, one per store (known by its
    /// `Shared`), closed with the thread (see `crate::sync::MAX_THREAD_RUNTIMES`).
    static OWN_CONNECTIONS: RefCell<Vec<(Weak<Shared>, redis::aio::MultiplexedConnection)>> =
        const { RefCell::new(Vec::new()) };
}

fn own_connection(store: &Arc<Shared>) -> Option<redis::aio::MultiplexedConnection> {
    OWN_CONNECTIONS
        .try_with(|own| {
            own.borrow()
                .iter()
                .find(|(of, _)| std::ptr::eq(of.as_ptr(), Arc::as_ptr(store)))
                .map(|(_, conn)| conn.clone())
        })
        .ok()
        .flatten()
}

fn keep_own_connection(store: &Arc<Shared>, conn: redis::aio::MultiplexedConnection) {
    let _ = OWN_CONNECTIONS.try_with(|own| {
        let mut own = own.borrow_mut();
        // Those of dropped stores go, and an older one of this store (opened concurrently).
        own.retain(|(of, _)| {
            of.strong_count() > 0 && !std::ptr::eq(of.as_ptr(), Arc::as_ptr(store))
        });
        own.push((Arc::downgrade(store), conn));
    });
}

fn forget_own_connection(store: &Arc<Shared>) {
    let _ = OWN_CONNECTIONS.try_with(|own| {
        own.borrow_mut()
            .retain(|(of, _)| !std::ptr::eq(of.as_ptr(), Arc::as_ptr(store)));
    });
}

/// Opens a connection to a single server, to be shared: taken out of the pool.
fn open_single(
    pool: &Pool,
) -> BoxFuture<'static, Result<redis::aio::MultiplexedConnection, ConnectError>> {
    let pool = pool.clone();
    async move {
        match pool.get().await {
            Ok(pooled) => Ok(deadpool_redis::Connection::take(pooled)),
            Err(error) => Err(Arc::new(error) as ConnectError),
        }
    }
    .boxed()
}

/// Opens a cluster connection, to be shared: taken out of the pool.
fn open_cluster(
    pool: &deadpool_redis::cluster::Pool,
) -> BoxFuture<'static, Result<redis::cluster_async::ClusterConnection, ConnectError>> {
    let pool = pool.clone();
    async move {
        match pool.get().await {
            Ok(pooled) => Ok(deadpool_redis::cluster::Connection::take(pooled)),
            Err(error) => Err(Arc::new(error) as ConnectError),
        }
    }
    .boxed()
}

/// True for errors after which a connection should not be used again.
fn broken(error: &redis::RedisError) -> bool {
    error.is_unrecoverable_error()
        || error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
}

/// A cluster command's error reply as a value in place, as a pipeline with `ignore_errors`
/// gives it on a single server; connection failures stay errors.
fn in_place(result: redis::RedisResult<Value>) -> redis::RedisResult<Value> {
    match result {
        Err(error) if !broken(&error) => match error.clone().into_server_errors() {
            Some(errors) if errors.len() == 1 => Ok(Value::ServerError(errors[0].1.clone())),
            _ => Err(error),
        },
        other => other,
    }
}

/// A reply as a result: an error reply about the type of a key is a [`StoreError::Key`], any
/// other a [`StoreError::Backend`]; both keep the `redis::RedisError` as their source.
fn reply(value: Value) -> StoreResult<Value> {
    match value {
        Value::ServerError(error) => {
            let wrong_type = error.code() == "WRONGTYPE";
            let error = redis::RedisError::from(error);
            Err(match wrong_type {
                true => StoreError::key(error),
                false => StoreError::backend(error),
            })
        }
        other => Ok(other),
    }
}

/// A reply, or `None` when the key holds a value of another type (written by someone else:
/// the caller treats it as missing and replaces it).
fn unless_wrong_type(value: Value) -> StoreResult<Option<Value>> {
    match reply(value) {
        Ok(value) => Ok(Some(value)),
        Err(StoreError::Key(_)) => Ok(None),
        Err(error) => Err(error),
    }
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if error.kind() == Some(redis::ServerErrorKind::NoScript))
}

/// Checks every reply of a batch of writes.
fn replies(values: Vec<Value>) -> StoreResult<()> {
    values
        .into_iter()
        .try_for_each(|value| reply(value).map(drop))
}

/// A quarter more than `ttl`, in milliseconds: how long a generation is made to live when an
/// entry that needs it would outlive it.
fn extended_millis(ttl: Duration) -> u64 {
    let ms = millis(ttl);
    ms.saturating_add(ms / 4)
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn set_generation(key: &str, value: u64, ttl: Option<Duration>) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    if let Some(ttl) = ttl {
        cmd.arg("PX").arg(millis(ttl));
    }
    cmd
}

/// An entry's `SET`, and a call of `EXTEND_SCRIPT` per generation it depends on.
fn put_commands(
    key: &str,
    value: Vec<u8>,
    ttl: Duration,
    generations: &[String],
) -> Vec<redis::Cmd> {
    // SET replaces a key of any type.
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value).arg("PX").arg(millis(ttl));
    let mut cmds = vec![cmd];
    // Each generation lives at least as long as the entry, and at most a quarter longer
    // (see `EXTEND_SCRIPT`).
    let (at_least, extended) = (millis(ttl), extended_millis(ttl));
    cmds.extend(generations.iter().map(|generation| {
        let mut cmd = evalsha(&SCRIPTS.extend, 1);
        cmd.arg(generation).arg(at_least).arg(extended);
        cmd
    }));
    cmds
}

fn get(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("GET");
    cmd.arg(key);
    cmd
}

/// `EVALSHA` of one of the store's scripts, with its number of keys (keys and arguments follow).
fn evalsha(script: &redis::Script, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

/// A write sequence, if below 2^52: the bump scripts reset larger ones (Lua holds numbers as
/// doubles, which cannot compare them exactly), so a writer that read one writes nothing
/// through.
fn parse_sequence(value: &Value) -> Option<u64> {
    parse_generation(value).filter(|sequence| *sequence < 1 << (64 - SEQUENCE_SHIFT))
}

fn parse_generation(value: &Value) -> Option<u64> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

impl Store for RedisStore {
    fn tier_name(&self) -> &'static str {
        "redis"
    }

    fn fetch<'a>(
        &'a self,
        entry: &'a str,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<Fetched>> {
        async move {
            let cmds: Vec<redis::Cmd> = std::iter::once(entry)
                .chain(generations.iter().map(String::as_str))
                .map(get)
                .collect();
            let mut values = self.run(&cmds).await?.into_iter();
            let entry = match values.next().map(unless_wrong_type).transpose()? {
                Some(Some(Value::BulkString(bytes))) => Some(bytes),
                // Not an entry at all (a key of another type): reported as an entry that does
                // not decode, so that the cache counts it as corrupt and replaces it.
                Some(None) => Some(Vec::new()),
                _ => None,
            };
            let mut current = Vec::with_capacity(generations.len());
            for value in values {
                // A generation of the wrong type is missing: the cache replaces it.
                current.push(
                    unless_wrong_type(value)?
                        .as_ref()
                        .and_then(parse_generation),
                );
            }
            Ok(Fetched {
                entry,
                generations: current,
            })
        }
        .boxed()
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<()>> {
        self.put_with_generations(key, value, ttl, &[])
    }

    fn put_with_generations<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Duration,
        generations: &'a [String],
    ) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            let cmds = put_commands(key, value, ttl, generations);
            replies(self.run(&cmds).await?)
        }
        .boxed()
    }

    fn put_and_unlock<'a>(
        &'a self,
        put: PutEntry<'a>,
        lock: &'a str,
        owner: u64,
    ) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            // One round trip: on a single server one pipeline, which keeps the order (the
            // unlock after the entry's SET); on a cluster the entry and its lock share a slot,
            // hence a node and its one connection, sent in this order.
            let mut cmds = put_commands(put.key, put.value, put.ttl, put.generations);
            let mut unlock = evalsha(&SCRIPTS.unlock, 1);
            unlock.arg(lock).arg(owner);
            cmds.push(unlock);
            replies(self.run(&cmds).await?)
        }
        .boxed()
    }

    fn fetch_or_lock<'a>(&'a self, probe: LockProbe<'a>) -> BoxFuture<'a, StoreResult<Probed>> {
        async move {
            // The entry's own GET, beside a script that locks unless the entry holds the tag:
            // the script reads only the tag's bytes (GETRANGE), and both keys share a slot.
            let mut cmd = evalsha(&SCRIPTS.probe, 2);
            cmd.arg(probe.entry).arg(probe.lock);
            cmd.arg(probe.tag).arg(probe.tag_at).arg(probe.owner);
            cmd.arg(millis(probe.ttl));
            let mut values = self.run(&[get(probe.entry), cmd]).await?.into_iter();
            let entry = match values.next().map(unless_wrong_type).transpose()? {
                Some(Some(Value::BulkString(bytes))) => Some(bytes),
                // As in `fetch`: a key of another type reads as an entry that does not decode.
                Some(None) => Some(Vec::new()),
                _ => None,
            };
            let locked = reply(values.next().unwrap_or(Value::Nil))?;
            Ok(Probed::new(entry, matches!(locked, Value::Int(1))))
        }
        .boxed()
    }

    fn reads_and_locks_at_once(&self) -> bool {
        // A cluster's keys of one read live in several slots, which no script may touch.
        matches!(self.backend, Backend::Single(_))
    }

    fn read_or_lock<'a>(&'a self, probe: ReadProbe<'a>) -> BoxFuture<'a, StoreResult<ReadLocked>> {
        if !self.reads_and_locks_at_once() || probe.generations.len() > 255 {
            return super::read_or_lock_in_steps(self, probe);
        }
        async move {
            let mut cmd = evalsha(&SCRIPTS.read_or_lock, 1 + probe.generations.len());
            cmd.arg(probe.entry).arg(probe.generations);
            cmd.arg(probe.lock_prefix)
                .arg(probe.owner)
                .arg(millis(probe.ttl));
            match probe.generation_ttl {
                Some(ttl) => cmd.arg(millis(ttl)),
                None => cmd.arg(""),
            };
            cmd.arg(probe.tag_at).arg(probe.fresh);
            let reply = reply(self.run(&[cmd]).await?.pop().unwrap_or(Value::Nil))?;
            let malformed = || StoreError::backend("unexpected reply of the read-or-lock script");
            let Value::Array(items) = reply else {
                return Err(malformed());
            };
            let mut items = items.into_iter();
            let entry = match items.next() {
                Some(Value::BulkString(bytes)) => Some(bytes),
                Some(Value::Nil) => None,
                _ => return Err(malformed()),
            };
            let lock = match items.next() {
                Some(Value::Int(0)) => ReadLock::Current,
                Some(Value::Int(1)) => ReadLock::Taken,
                Some(Value::Int(2)) => ReadLock::Busy,
                _ => return Err(malformed()),
            };
            let generations = items
                .map(|value| parse_generation(&value))
                .collect::<Option<Vec<u64>>>()
                .filter(|generations| generations.len() == probe.generations.len())
                .ok_or_else(malformed)?;
            Ok(ReadLocked::new(entry, generations, lock))
        }
        .boxed()
    }

    fn remove<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            // One DEL per key: the keys may live in different cluster slots.
            let cmds: Vec<redis::Cmd> = keys
                .iter()
                .map(|key| {
                    let mut cmd = redis::cmd("DEL");
                    cmd.arg(key);
                    cmd
                })
                .collect();
            if cmds.is_empty() {
                return Ok(());
            }
            replies(self.run(&cmds).await?)
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
            let cmds: Vec<redis::Cmd> = keys
                .iter()
                .zip(&fresh)
                .map(|(key, value)| {
                    let mut cmd = set_generation(key, *value, ttl);
                    cmd.arg("NX").arg("GET");
                    cmd
                })
                .collect();
            let previous = self.run(&cmds).await?;
            let mut result = Vec::with_capacity(keys.len());
            let mut repairs = Vec::new();
            for ((key, fresh), previous) in keys.iter().zip(fresh).zip(previous) {
                let previous = unless_wrong_type(previous)?;
                match previous
                    .as_ref()
                    .map(|value| (value, parse_generation(value)))
                {
                    Some((Value::Nil, _)) => result.push(fresh),
                    Some((_, Some(existing))) => result.push(existing),
                    // Not a generation (a foreign or corrupt value, or a key of another type):
                    // replace it with a fresh one.
                    _ => {
                        let value = fresh_generation();
                        repairs.push(set_generation(key, value, ttl));
                        result.push(value);
                    }
                }
            }
            if !repairs.is_empty() {
                replies(self.run_once(&repairs).await?)?;
            }
            Ok(result)
        }
        .boxed()
    }

    fn set_generations<'a>(
        &'a self,
        keys: &'a [String],
        values: &'a [u64],
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            let cmds: Vec<redis::Cmd> = keys
                .iter()
                .zip(values)
                .map(|(key, value)| set_generation(key, *value, ttl))
                .collect();
            if cmds.is_empty() {
                return Ok(());
            }
            replies(self.run_once(&cmds).await?)
        }
        .boxed()
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        owner: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        async move {
            let mut cmd = evalsha(&SCRIPTS.lock, 1);
            cmd.arg(key).arg(owner).arg(millis(ttl));
            let reply = reply(self.run(&[cmd]).await?.pop().unwrap_or(Value::Nil))?;
            Ok(matches!(reply, Value::Okay | Value::SimpleString(_)))
        }
        .boxed()
    }

    fn bump_table<'a>(&'a self, bump: TableBump<'a>) -> BoxFuture<'a, StoreResult<Option<Bumped>>> {
        async move {
            // On a single server the written rows' entries go in the same script; on a
            // cluster they live in other slots than the table's, so the writer stores them.
            if let (Some(through), Backend::Single(_)) = (bump.write_through, &self.backend) {
                if !through.keys.is_empty()
                    && through.keys.len() == through.values.len()
                    && bump.observe.len() == 1
                {
                    return self.bump_and_write_through(bump, through).await;
                }
            }
            // One script in the table's slot: every key shares its hash tag.
            let key_count = 1 + bump.keys.len() + bump.row_keys.len() + bump.observe.len();
            let mut cmd = evalsha(&SCRIPTS.bump_table, key_count);
            cmd.arg(bump.sequence);
            cmd.arg(bump.keys).arg(bump.row_keys).arg(bump.observe);
            cmd.arg(bump.keys.len()).arg(bump.row_keys.len());
            cmd.arg(millis(bump.rows_ttl))
                .arg(bump.values)
                .arg(bump.row_values);
            // Values for observed generations that are missing, which the script creates.
            for _ in bump.observe {
                cmd.arg(fresh_generation());
            }
            cmd.arg(fresh_generation() >> SEQUENCE_SHIFT);
            let reply = reply(self.run_once(&[cmd]).await?.pop().unwrap_or(Value::Nil))?;
            let Value::Array(items) = reply else {
                return Ok(None);
            };
            let mut items = items.iter();
            let Some(Value::Int(next)) = items.next() else {
                return Ok(None);
            };
            let observed = items.map(parse_generation).collect();
            Ok(u64::try_from(*next)
                .ok()
                .map(|next| Bumped::new(next, observed)))
        }
        .boxed()
    }

    fn write_sequence_and_generation<'a>(
        &'a self,
        sequence: &'a str,
        generation: &'a str,
    ) -> BoxFuture<'a, StoreResult<(Option<u64>, Option<u64>)>> {
        async move {
            // On a cluster the rows' entries are not stored with the bump: no generation needed.
            if !matches!(self.backend, Backend::Single(_)) {
                return Ok((self.write_sequence(sequence).await?, None));
            }
            // Both keys are in the table's slot: one round trip (unless the sequence is new).
            let mut cmd = redis::cmd("SET");
            cmd.arg(sequence)
                .arg(fresh_generation() >> SEQUENCE_SHIFT)
                .arg("NX")
                .arg("GET");
            let mut replies = self.run(&[cmd, get(generation)]).await?.into_iter();
            let previous = replies.next().unwrap_or(Value::Nil);
            let generation = unless_wrong_type(replies.next().unwrap_or(Value::Nil))?
                .as_ref()
                .and_then(parse_generation);
            let sequence = match unless_wrong_type(previous)? {
                Some(Value::Nil) => {
                    let current = self.run(&[get(sequence)]).await?.pop();
                    let current = current.map(unless_wrong_type).transpose()?.flatten();
                    current.as_ref().and_then(parse_sequence)
                }
                Some(other) => parse_sequence(&other),
                None => None,
            };
            Ok((sequence, generation))
        }
        .boxed()
    }

    fn write_sequence<'a>(&'a self, sequence: &'a str) -> BoxFuture<'a, StoreResult<Option<u64>>> {
        async move {
            // Created here if missing, from a random base (as the bump script would). A key of
            // another type: no sequence (nothing is written through), and the bump replaces it.
            let mut cmd = redis::cmd("SET");
            cmd.arg(sequence)
                .arg(fresh_generation() >> SEQUENCE_SHIFT)
                .arg("NX")
                .arg("GET");
            let previous = self.run(&[cmd]).await?.pop().unwrap_or(Value::Nil);
            match unless_wrong_type(previous)? {
                Some(Value::Nil) => {
                    let current = self.run(&[get(sequence)]).await?.pop();
                    let current = current.map(unless_wrong_type).transpose()?.flatten();
                    Ok(current.as_ref().and_then(parse_sequence))
                }
                Some(other) => Ok(parse_sequence(&other)),
                None => Ok(None),
            }
        }
        .boxed()
    }

    fn follow_changes(&self, follow: FollowChanges) -> Option<BoxFuture<'static, ()>> {
        let targets = match (&follow.address, &self.backend) {
            // One address cannot follow every primary of a cluster.
            (Some(_), Backend::Cluster(_)) => return None,
            (Some(url), Backend::Single(_)) => Targets::Single(Box::new(tracking::info(url).ok()?)),
            (None, _) => self.targets.clone()?,
        };
        Some(tracking::follow(targets, follow).boxed())
    }

    fn reset(&self) {
        // Called on the thread whose operation timed out.
        forget_own_connection(&self.shared);
        for slot in &self.shared.single {
            slot.reset();
        }
        self.shared.cluster.reset();
    }

    fn unlock<'a>(&'a self, key: &'a str, owner: u64) -> BoxFuture<'a, StoreResult<()>> {
        async move {
            // Only the owner may free the lock: compare and delete in one script.
            let mut cmd = evalsha(&SCRIPTS.unlock, 1);
            cmd.arg(key).arg(owner);
            replies(self.run(&[cmd]).await?)
        }
        .boxed()
    }
}

/// The store's scripts, called by SHA.
struct Scripts {
    bump_table: redis::Script,
    lock: redis::Script,
    unlock: redis::Script,
    extend: redis::Script,
    probe: redis::Script,
    read_or_lock: redis::Script,
    bump_and_put: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    bump_table: redis::Script::new(BUMP_TABLE_SCRIPT),
    lock: redis::Script::new(LOCK_SCRIPT),
    unlock: redis::Script::new(UNLOCK_SCRIPT),
    extend: redis::Script::new(EXTEND_SCRIPT),
    probe: redis::Script::new(PROBE_SCRIPT),
    read_or_lock: redis::Script::new(READ_OR_LOCK_SCRIPT),
    bump_and_put: redis::Script::new(BUMP_AND_PUT_SCRIPT),
});

/// What `SCRIPT LOAD` sends when a server lost the scripts.
const SCRIPT_SOURCES: [&str; 7] = [
    BUMP_TABLE_SCRIPT,
    LOCK_SCRIPT,
    UNLOCK_SCRIPT,
    EXTEND_SCRIPT,
    PROBE_SCRIPT,
    READ_OR_LOCK_SCRIPT,
    BUMP_AND_PUT_SCRIPT,
];

/// KEYS: the sequence, the table's generations (n), the rows' generations (m), the generations
/// to observe (o); ARGV: n, m, the time to live in ms of the rows' generations, the n + m new
/// values, o fresh values, the sequence's random base. Returns the new sequence followed by the
/// observed values. An observed generation that is missing (or not a generation) is created
/// with its fresh value, living as long as the rows' generations: what a write needs to write
/// its rows through in a namespace no read has used yet. A missing (or foreign) sequence
/// restarts from the random base, never from 0, so that an evicted sequence cannot count up to
/// a value a writer read before the eviction. `SET` replaces a key of any type and `TYPE` is
/// checked before every `GET`: a key someone else wrote never makes an invalidation fail.
const BUMP_TABLE_SCRIPT: &str = "local n, m, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] \
     local function value(key) \
       if redis.call('TYPE', key).ok ~= 'string' then return false end \
       return redis.call('GET', key) \
     end \
     for i = 1, n do redis.call('SET', KEYS[1 + i], ARGV[3 + i]) end \
     for i = 1, m do redis.call('SET', KEYS[1 + n + i], ARGV[3 + n + i], 'PX', ttl) end \
     local seq = value(KEYS[1]) \
     if not seq or not string.match(seq, '^%d+$') or #seq > 16 or tonumber(seq) >= 4503599627370496 then \
       redis.call('SET', KEYS[1], ARGV[#ARGV]) \
     end \
     local out = { redis.call('INCR', KEYS[1]) } \
     for i = n + m + 2, #KEYS do \
       local current = value(KEYS[i]) \
       if not current or not string.match(current, '^%d+$') then \
         current = ARGV[2 + i] \
         redis.call('SET', KEYS[i], current, 'PX', ttl) \
       end \
       out[#out + 1] = current \
     end \
     return out";

/// `BUMP_TABLE_SCRIPT` with one observed generation (the guard) and a write's entries, stored
/// in the same step when the bump finds the table as the writer left it. KEYS: the sequence, the
/// table's generations (n), the rows' generations (m), the guard, the entries (w); ARGV: n, m,
/// the rows' generations' time to live in ms, w, the sequence the bump must reach, the guard's
/// value, the entries' time to live in ms, the least time to live of the generations the
/// entries depend on and what to extend it to (as `EXTEND_SCRIPT`), the sequence's random base,
/// the n + m new values, a fresh value for a missing guard, the w entries. Returns the new
/// sequence, the guard's value, and 1 when the entries were stored (else 0). The sequence is
/// compared as a number (below 2^52, see `SEQUENCE_SHIFT`), the guard as the text `GET` returns,
/// so that a generation written in another form never matches.
const BUMP_AND_PUT_SCRIPT: &str = "local n, m, rttl, w = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]) \
     local function value(key) \
       if redis.call('TYPE', key).ok ~= 'string' then return false end \
       return redis.call('GET', key) \
     end \
     local seq = value(KEYS[1]) \
     if not seq or not string.match(seq, '^%d+$') or #seq > 16 or tonumber(seq) >= 4503599627370496 then \
       redis.call('SET', KEYS[1], ARGV[10]) \
     end \
     local after = redis.call('INCR', KEYS[1]) \
     local guard = KEYS[2 + n + m] \
     local current = value(guard) \
     if not current or not string.match(current, '^%d+$') then \
       current = ARGV[11 + n + m] \
       redis.call('SET', guard, current, 'PX', rttl) \
     end \
     local stored = after == tonumber(ARGV[5]) and current == ARGV[6] \
     for i = 1, n do redis.call('SET', KEYS[1 + i], ARGV[10 + i]) end \
     local row_ttl = rttl \
     if stored then row_ttl = math.max(rttl, tonumber(ARGV[9])) end \
     for i = 1, m do redis.call('SET', KEYS[1 + n + i], ARGV[10 + n + i], 'PX', row_ttl) end \
     if not stored then return { after, current, 0 } end \
     for i = 1, w do redis.call('SET', KEYS[2 + n + m + i], ARGV[11 + n + m + i], 'PX', ARGV[7]) end \
     local left = redis.call('PTTL', guard) \
     if left >= 0 and left < tonumber(ARGV[8]) then redis.call('PEXPIRE', guard, ARGV[9]) end \
     return { after, current, 1 }";

/// Takes a lock (`SET NX PX`); a lock key of another type is garbage, replaced.
const LOCK_SCRIPT: &str = "local kind = redis.call('TYPE', KEYS[1]).ok \
     if kind ~= 'none' and kind ~= 'string' then redis.call('DEL', KEYS[1]) end \
     return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])";

const UNLOCK_SCRIPT: &str = "if redis.call('TYPE', KEYS[1]).ok == 'string' \
     and redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end \
     return 0";

/// KEYS: a generation; ARGV: the entry's lifetime and the extended one, in ms. Extends the
/// generation only when it would expire before the entry, and then to a quarter more: a
/// generation changed (here, its TTL) is reported to every near tier as a change, so extending
/// on every fill would make every process forget it on every fill; this way it happens at most
/// once per fifth of the entry's lifetime. A generation without expiry, or missing, is left
/// alone (a missing one makes the entry miss, which is safe).
const EXTEND_SCRIPT: &str = "local left = redis.call('PTTL', KEYS[1]) \
     if left >= 0 and left < tonumber(ARGV[1]) then \
       return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
     return 0";

/// KEYS: an entry, its lock (same slot); ARGV: the tag, its offset in the entry, the owner, the
/// lock's time to live in ms. Returns 1 when it took the lock, 0 when the entry holds the tag
/// (filled under the caller's generations: no lock) or someone else holds the lock. Only the
/// tag's bytes are read (`GETRANGE`); an entry of another type is not current, and a lock key
/// of another type is garbage, replaced (as `LOCK_SCRIPT` does).
const PROBE_SCRIPT: &str = "local tag, at = ARGV[1], tonumber(ARGV[2]) \
     if #tag > 0 and redis.call('TYPE', KEYS[1]).ok == 'string' \
       and redis.call('GETRANGE', KEYS[1], at, at + #tag - 1) == tag then return 0 end \
     local kind = redis.call('TYPE', KEYS[2]).ok \
     if kind ~= 'none' and kind ~= 'string' then redis.call('DEL', KEYS[2]) end \
     if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then return 1 end \
     return 0";

/// `Store::read_or_lock` on a single server (it touches keys of several cluster slots, and a
/// lock key it names itself). KEYS: the entry, then its n generations; ARGV: the lock key's
/// prefix, the owner, the lock's time to live in ms, a created generation's time to live in ms
/// (empty: none), where the generations start in an entry, then n fresh values. Returns the
/// entry (nil if missing, empty if of another type), 0 (the entry holds the generations: no
/// lock asked for), 1 (lock taken) or 2 (held by someone else), then the n generations.
///
/// A generation that is missing, not a `u64` in canonical decimal, or a key of another type is
/// replaced by its fresh value, as `ensure_generations` does. The lock key is the prefix and the
/// generations' decimal text (as `ReadProbe::lock_key`). Whether the entry holds them (as
/// `ReadProbe::holds`) is judged in doubles, Lua's only numbers: each generation against the
/// entry's 8 little-endian bytes, equal within 2^-48 of their size. Two different random
/// generations pass for equal once in about 2^47, and then no lock is asked for: the cache,
/// which checks the entry exactly, takes it in a second round trip. (Turning each generation
/// into its exact bytes in Lua made the script 8 µs slower, twice what it costs beside a `GET`.)
/// A lock key of another type is garbage, replaced (as `LOCK_SCRIPT`).
const READ_OR_LOCK_SCRIPT: &str = "local n, at = #KEYS - 1, tonumber(ARGV[5]) \
     local gens = {} \
     for i = 1, n do \
       local v = redis.pcall('GET', KEYS[1 + i]) \
       if type(v) ~= 'string' or not (v == '0' or (#v <= 20 and string.match(v, '^[1-9]%d*$') \
         and (#v < 20 or v <= '18446744073709551615'))) then \
         v = ARGV[5 + i] \
         if ARGV[4] == '' then redis.call('SET', KEYS[1 + i], v) \
         else redis.call('SET', KEYS[1 + i], v, 'PX', ARGV[4]) end \
       end \
       gens[i] = v \
     end \
     local entry = redis.pcall('GET', KEYS[1]) \
     if type(entry) == 'table' then entry = '' end \
     local current = entry and string.byte(entry, at + 1) == n \
     if current then \
       for i = 1, n do \
         local o = at + 2 + 8 * (i - 1) \
         local b1, b2, b3, b4, b5, b6, b7, b8 = string.byte(entry, o, o + 7) \
         if not b8 then current = false break end \
         local x = ((((((b8 * 256 + b7) * 256 + b6) * 256 + b5) * 256 + b4) * 256 + b3) \
           * 256 + b2) * 256 + b1 \
         local y = tonumber(gens[i]) \
         if math.abs(x - y) > y / 281474976710656 then current = false break end \
       end \
     end \
     local state = 0 \
     if not current then \
       local lock = ARGV[1] .. table.concat(gens, '.') \
       if redis.call('SET', lock, ARGV[2], 'NX', 'PX', ARGV[3]) then state = 1 \
       elseif redis.call('TYPE', lock).ok ~= 'string' then \
         redis.call('DEL', lock) \
         redis.call('SET', lock, ARGV[2], 'PX', ARGV[3]) \
         state = 1 \
       else state = 2 end \
     end \
     return { entry, state, unpack(gens) }";

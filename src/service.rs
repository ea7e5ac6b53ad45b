//! The web service of `examples/service.rs` and `tests/service.rs`: users and posts over HTTP
//! (axum), on PostgreSQL, cached by memclone on Redis with a near tier, with a Prometheus
//! `/metrics` endpoint; and the load run of `--bench`.
//!
//! | route | what | cache |
//! | --- | --- | --- |
//! | `GET /users?status=S&limit=N` | users of a status, by id (N ≤ 100, default 50) | `.cached("users_by_status")` |
//! | `GET /users/{id}` | one user | `find` (entity, label `users`) |
//! | `POST /users` `{"name", "status"}` | creates a user | `memclone::insert_into` |
//! | `PUT /users/{id}` `{"name"?, "status"?}` | changes a user | `memclone::update` |
//! | `DELETE /users/{id}` | deletes a user and their posts | `memclone::delete` |
//! | `GET /posts?author=ID` | the 20 latest posts (of one author), with the author's name (a join) | `.cached("latest_posts")`, `.cached("posts_by_author")` |
//! | `GET /posts/{id}` | one post | `find` (entity, label `posts`) |
//! | `POST /posts` `{"user_id", "title"}` | creates a post | `memclone::insert_into` |
//! | `PUT /posts/{id}` `{"title"}` | changes a post | `memclone::update` |
//! | `DELETE /posts/{id}` | deletes a post | `memclone::delete` |
//! | `GET /metrics` | the Prometheus exposition of every metric | |
//!
//! With the cache off ([`Config::cached`] false), the same routes run the same statements with
//! plain Diesel.

use crate::schema::{posts, users};
use crate::{Post, User};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use diesel::prelude::*;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::RecyclingMethod;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_memclone::store::RedisStore;
use diesel_memclone::{Cache, NearCache};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use std::time::Duration;

/// Where the service keeps its data and what it caches.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// PostgreSQL (`DATABASE_URL`, default the README's `postgres://postgres@127.0.0.1:5432/test`).
    pub database_url: String,
    /// Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`).
    pub redis_url: String,
    /// The PostgreSQL schema of the service's tables (created, and emptied, at start-up).
    pub schema: String,
    /// The cache's namespace in Redis.
    pub namespace: String,
    /// Reads through memclone (true) or plain Diesel (false).
    pub cached: bool,
    /// Users and posts written at start-up.
    pub seed_users: i32,
    /// Posts per seeded user.
    pub posts_per_user: i32,
    /// Database connections in each pool (one for reads, one for writes).
    pub pool_size: usize,
}

impl Config {
    /// The README's servers (or `DATABASE_URL`, `REDIS_URL`), schema `memclone_service`, cache
    /// on, 1000 users of 10 posts each.
    pub fn from_env() -> Self {
        Config {
            database_url: crate::postgres_url(),
            redis_url: crate::redis_url(),
            schema: "memclone_service".into(),
            namespace: "memclone_service".into(),
            cached: true,
            seed_users: 1000,
            posts_per_user: 10,
            pool_size: 16,
        }
    }

    /// The same, in schema and namespace `name`.
    pub fn named(mut self, name: &str) -> Self {
        self.schema = name.into();
        self.namespace = name.into();
        self
    }

    /// The same, with the cache on or off.
    pub fn cached(mut self, on: bool) -> Self {
        self.cached = on;
        self
    }

    /// The same, seeded with `users` users of `posts_per_user` posts each.
    pub fn seed(mut self, users: i32, posts_per_user: i32) -> Self {
        self.seed_users = users;
        self.posts_per_user = posts_per_user;
        self
    }
}

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Reads and writes have pools of their own (as with a replica for reads): a read never
    /// waits behind writes waiting for their commit to reach the disk. Cached reads check out
    /// a connection only on a miss (`load_from`, `find_from`).
    reads: Pool<AsyncPgConnection>,
    writes: Pool<AsyncPgConnection>,
    /// The cache, when reads are cached.
    pub cache: Option<Cache>,
    metrics: PrometheusHandle,
}

/// The process's Prometheus recorder, installed on first use (the `metrics` facade has one
/// global recorder: install it before the first cached call).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

const TABLES: &str = "
    CREATE TABLE users (id INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                        name TEXT NOT NULL, status TEXT NOT NULL);
    CREATE TABLE posts (id INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                        user_id INTEGER NOT NULL REFERENCES users (id), title TEXT NOT NULL);
    CREATE INDEX posts_by_user ON posts (user_id, id);";

/// Creates the schema, its tables and rows (dropping what was there), the connection pool and
/// the cache; fails when a server is unreachable.
pub async fn start(config: &Config) -> Result<AppState, Box<dyn std::error::Error + Send + Sync>> {
    let metrics = prometheus();
    let schema = &config.schema;
    if !schema
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!("schema {schema:?}: letters, digits and '_' only").into());
    }
    let mut conn = AsyncPgConnection::establish(&config.database_url).await?;
    conn.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema}; {TABLES}
         INSERT INTO users (name, status)
           SELECT 'user ' || i, CASE WHEN i % 4 = 0 THEN 'away' ELSE 'active' END
           FROM generate_series(1, {users}) AS i;
         INSERT INTO posts (user_id, title)
           SELECT u, 'post ' || p || ' of user ' || u
           FROM generate_series(1, {users}) AS u, generate_series(1, {posts}) AS p;
         ANALYZE users; ANALYZE posts;",
        users = config.seed_users,
        posts = config.posts_per_user,
    ))
    .await?;

    let reads = Pool::builder(manager_of(config))
        .max_size(config.pool_size)
        .build()?;
    let writes = Pool::builder(manager_of(config))
        .max_size(config.pool_size)
        .build()?;

    let cache = if config.cached {
        let store = RedisStore::builder(config.redis_url.clone()).build()?;
        let cache = Cache::builder()
            .store(store)
            .namespace(config.namespace.clone())
            .default_ttl(Duration::from_secs(300))
            .near_cache(NearCache::new())
            .build()?;
        // The namespace may hold entries of an earlier run on rows of the same ids.
        cache.invalidate_table("users").await;
        cache.invalidate_table("posts").await;
        cache.near_cache_ready(Duration::from_secs(2)).await;
        Some(cache)
    } else {
        None
    };
    Ok(AppState {
        reads,
        writes,
        cache,
        metrics,
    })
}

/// A connection manager whose connections work in the service's schema.
fn manager_of(config: &Config) -> AsyncDieselConnectionManager<AsyncPgConnection> {
    let schema = &config.schema;
    let mut setup = ManagerConfig::<AsyncPgConnection>::default();
    // No test query on every checkout: a cached read must not cost a database round trip.
    setup.recycling_method = RecyclingMethod::Fast;
    // Named after the schema, so that a load run can find its backends (and their CPU time).
    let search_path = format!("SET search_path TO {schema}; SET application_name TO '{schema}'");
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
    AsyncDieselConnectionManager::new_with_config(config.database_url.clone(), setup)
}

/// The routes (see the module's table).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/users", get(list_users).post(create_user))
        .route(
            "/users/{id}",
            get(get_user).put(update_user).delete(delete_user),
        )
        .route("/posts", get(list_posts).post(create_post))
        .route(
            "/posts/{id}",
            get(get_post).put(update_post).delete(delete_post),
        )
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, lets the requests in flight
/// finish, then delivers the invalidations the store has not taken yet (for up to 5 s), so
/// that other processes stop serving what this one wrote.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cache = state.cache.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    if let Some(cache) = cache {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cache.deliver_invalidations().await {
            if tokio::time::Instant::now() >= deadline {
                eprintln!(
                    "shutdown: invalidations of {:?} could not be delivered",
                    cache.undelivered_invalidations()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// A request's failure, as an HTTP status and a message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

impl From<diesel::result::Error> for ApiError {
    fn from(error: diesel::result::Error) -> Self {
        match error {
            diesel::result::Error::NotFound => ApiError(StatusCode::NOT_FOUND, "not found".into()),
            diesel::result::Error::QueryBuilderError(e) => {
                ApiError(StatusCode::BAD_REQUEST, e.to_string())
            }
            diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::ForeignKeyViolation,
                _,
            ) => ApiError(StatusCode::UNPROCESSABLE_ENTITY, "no such user".into()),
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

impl From<diesel_memclone::Error> for ApiError {
    fn from(error: diesel_memclone::Error) -> Self {
        match error {
            diesel_memclone::Error::Database(e) => e.into(),
            diesel_memclone::Error::Pool(e) => {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl AppState {
    async fn read_conn(&self) -> ApiResult<Object<AsyncPgConnection>> {
        self.reads
            .get()
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
    }

    async fn write_conn(&self) -> ApiResult<Object<AsyncPgConnection>> {
        self.writes
            .get()
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
    }
}

/// `GET /users` parameters.
#[derive(Debug, Deserialize)]
pub struct UserFilter {
    status: Option<String>,
    limit: Option<i64>,
}

/// A new user.
#[derive(Debug, Serialize, Deserialize, Insertable)]
#[diesel(table_name = users)]
pub struct NewUser {
    /// Display name.
    pub name: String,
    /// Status.
    pub status: String,
}

/// Changes to a user.
#[derive(Debug, Deserialize, AsChangeset)]
#[diesel(table_name = users)]
pub struct UserChanges {
    name: Option<String>,
    status: Option<String>,
}

/// A new post.
#[derive(Debug, Serialize, Deserialize, Insertable)]
#[diesel(table_name = posts)]
pub struct NewPost {
    /// Author.
    pub user_id: i32,
    /// Title.
    pub title: String,
}

/// Changes to a post.
#[derive(Debug, Deserialize, AsChangeset)]
#[diesel(table_name = posts)]
pub struct PostChanges {
    title: String,
}

/// `GET /posts` parameters.
#[derive(Debug, Deserialize)]
pub struct PostFilter {
    author: Option<i32>,
}

/// A post with its author's name, as `GET /posts` lists it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PostWithAuthor {
    /// The post.
    #[serde(flatten)]
    pub post: Post,
    /// Its author's name.
    pub author: String,
}

async fn list_users(
    State(state): State<AppState>,
    Query(filter): Query<UserFilter>,
) -> ApiResult<Json<Vec<User>>> {
    let status = filter.status.unwrap_or_else(|| "active".into());
    let limit = filter.limit.unwrap_or(50).clamp(1, 100);
    let query = users::table
        .filter(users::status.eq(status))
        .order(users::id)
        .limit(limit)
        .select(User::as_select());
    let rows = match &state.cache {
        Some(cache) => {
            use diesel_memclone::CachedDsl;
            query
                .cached("users_by_status")
                .using(cache)
                .load_from(&state.reads)
                .await?
        }
        None => query.load(&mut *state.read_conn().await?).await?,
    };
    Ok(Json(rows))
}

async fn get_user(State(state): State<AppState>, Path(id): Path<i32>) -> ApiResult<Json<User>> {
    let user = match &state.cache {
        Some(cache) => cache.find_from::<User, _>(&state.reads, id).await?,
        None => {
            users::table
                .find(id)
                .select(User::as_select())
                .get_result(&mut *state.read_conn().await?)
                .await?
        }
    };
    Ok(Json(user))
}

async fn create_user(
    State(state): State<AppState>,
    Json(new): Json<NewUser>,
) -> ApiResult<(StatusCode, Json<User>)> {
    let mut conn = state.write_conn().await?;
    let user: User = match &state.cache {
        Some(cache) => {
            diesel_memclone::insert_into(users::table)
                .values(new)
                .map(|s| s.returning(users::all_columns))
                .using(cache)
                .get_result(&mut *conn)
                .await?
        }
        None => {
            diesel::insert_into(users::table)
                .values(new)
                .returning(users::all_columns)
                .get_result(&mut *conn)
                .await?
        }
    };
    Ok((StatusCode::CREATED, Json(user)))
}

async fn update_user(
    State(state): State<AppState>,
    Path(id): Path<i32>,
    Json(changes): Json<UserChanges>,
) -> ApiResult<Json<User>> {
    let mut conn = state.write_conn().await?;
    let user: User = match &state.cache {
        Some(cache) => {
            diesel_memclone::update(users::table.find(id))
                .set(changes)
                .map(|s| s.returning(users::all_columns))
                .using(cache)
                .get_result(&mut *conn)
                .await?
        }
        None => {
            diesel::update(users::table.find(id))
                .set(changes)
                .returning(users::all_columns)
                .get_result(&mut *conn)
                .await?
        }
    };
    Ok(Json(user))
}

async fn delete_user(State(state): State<AppState>, Path(id): Path<i32>) -> ApiResult<StatusCode> {
    let mut conn = state.write_conn().await?;
    let deleted = match &state.cache {
        Some(cache) => {
            diesel_memclone::delete(posts::table.filter(posts::user_id.eq(id)))
                .using(cache)
                .execute(&mut *conn)
                .await?;
            diesel_memclone::delete(users::table.find(id))
                .using(cache)
                .execute(&mut *conn)
                .await?
        }
        None => {
            diesel::delete(posts::table.filter(posts::user_id.eq(id)))
                .execute(&mut *conn)
                .await?;
            diesel::delete(users::table.find(id))
                .execute(&mut *conn)
                .await?
        }
    };
    Ok(match deleted {
        0 => StatusCode::NOT_FOUND,
        _ => StatusCode::NO_CONTENT,
    })
}

async fn list_posts(
    State(state): State<AppState>,
    Query(filter): Query<PostFilter>,
) -> ApiResult<Json<Vec<PostWithAuthor>>> {
    let joined = posts::table
        .inner_join(users::table)
        .select((Post::as_select(), users::name))
        .order(posts::id.desc())
        .limit(20);
    let rows: Vec<(Post, String)> = match (filter.author, &state.cache) {
        (Some(author), Some(cache)) => {
            use diesel_memclone::CachedDsl;
            joined
                .filter(posts::user_id.eq(author))
                .cached("posts_by_author")
                // It reads only the author's posts and the author's row: writes to other
                // authors' posts and users leave it cached.
                .within(posts::user_id, author)
                .within(users::id, author)
                .using(cache)
                .load_from(&state.reads)
                .await?
        }
        (Some(author), None) => {
            joined
                .filter(posts::user_id.eq(author))
                .load(&mut *state.read_conn().await?)
                .await?
        }
        (None, Some(cache)) => {
            use diesel_memclone::CachedDsl;
            joined
                .cached("latest_posts")
                .using(cache)
                .load_from(&state.reads)
                .await?
        }
        (None, None) => joined.load(&mut *state.read_conn().await?).await?,
    };
    let rows = rows
        .into_iter()
        .map(|(post, author)| PostWithAuthor { post, author })
        .collect();
    Ok(Json(rows))
}

async fn get_post(State(state): State<AppState>, Path(id): Path<i32>) -> ApiResult<Json<Post>> {
    let post = match &state.cache {
        Some(cache) => cache.find_from::<Post, _>(&state.reads, id).await?,
        None => {
            posts::table
                .find(id)
                .select(Post::as_select())
                .get_result(&mut *state.read_conn().await?)
                .await?
        }
    };
    Ok(Json(post))
}

async fn create_post(
    State(state): State<AppState>,
    Json(new): Json<NewPost>,
) -> ApiResult<(StatusCode, Json<Post>)> {
    let mut conn = state.write_conn().await?;
    let post: Post = match &state.cache {
        Some(cache) => {
            diesel_memclone::insert_into(posts::table)
                .values(new)
                .map(|s| s.returning(posts::all_columns))
                .using(cache)
                .get_result(&mut *conn)
                .await?
        }
        None => {
            diesel::insert_into(posts::table)
                .values(new)
                .returning(posts::all_columns)
                .get_result(&mut *conn)
                .await?
        }
    };
    Ok((StatusCode::CREATED, Json(post)))
}

async fn update_post(
    State(state): State<AppState>,
    Path(id): Path<i32>,
    Json(changes): Json<PostChanges>,
) -> ApiResult<Json<Post>> {
    let mut conn = state.write_conn().await?;
    let post: Post = match &state.cache {
        Some(cache) => {
            diesel_memclone::update(posts::table.find(id))
                .set(changes)
                .map(|s| s.returning(posts::all_columns))
                .using(cache)
                .get_result(&mut *conn)
                .await?
        }
        None => {
            diesel::update(posts::table.find(id))
                .set(changes)
                .returning(posts::all_columns)
                .get_result(&mut *conn)
                .await?
        }
    };
    Ok(Json(post))
}

async fn delete_post(State(state): State<AppState>, Path(id): Path<i32>) -> ApiResult<StatusCode> {
    let mut conn = state.write_conn().await?;
    let deleted = match &state.cache {
        Some(cache) => {
            diesel_memclone::delete(posts::table.find(id))
                .using(cache)
                .execute(&mut *conn)
                .await?
        }
        None => {
            diesel::delete(posts::table.find(id))
                .execute(&mut *conn)
                .await?
        }
    };
    Ok(match deleted {
        0 => StatusCode::NOT_FOUND,
        _ => StatusCode::NO_CONTENT,
    })
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// A small HTTP/1 client on loopback, for the load run and the tests.
#[derive(Clone)]
pub struct Client {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<axum::body::Bytes>,
    >,
    base: String,
}

impl Client {
    /// A client of the service listening on `address`.
    pub fn new(address: std::net::SocketAddr) -> Self {
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build_http();
        Client {
            http,
            base: format!("http://{address}"),
        }
    }

    /// Sends `method path` with an optional JSON body; the status and the body.
    pub async fn request(
        &self,
        method: axum::http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, axum::body::Bytes), Box<dyn std::error::Error + Send + Sync>> {
        use http_body_util::BodyExt;
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                axum::body::Bytes::from(serde_json::to_vec(&json)?)
            }
            None => axum::body::Bytes::new(),
        };
        let response = self
            .http
            .request(request.body(http_body_util::Full::new(body))?)
            .await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// `GET path`.
    pub async fn get(
        &self,
        path: &str,
    ) -> Result<(StatusCode, axum::body::Bytes), Box<dyn std::error::Error + Send + Sync>> {
        self.request(axum::http::Method::GET, path, None).await
    }
}

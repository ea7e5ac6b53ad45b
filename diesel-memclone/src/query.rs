//! `.cached(label)` on any Diesel query.

use crate::cache::{
    cache, Cache, EntryKey, Lookup, Policy, ReadName, Shape, ShapeKey, ShapeStatement,
    StatementIdentity,
};
use crate::error::Result;
use crate::identity::{self, CacheBackend};
use crate::key;
use crate::model::{CacheValue, ScopeColumn, ScopeValue};
use crate::near::{NearKey, NearKeys};
use crate::pool::ConnectionPool;
use crate::transaction::read_policy;
use diesel::dsl::{CountStar, Limit, Select};
use diesel::query_builder::{AsQuery, QueryFragment, QueryId};
use diesel::query_dsl::methods::{LimitDsl, SelectDsl};
use diesel_async::methods::LoadQuery;
use diesel_async::{AsyncConnection, AsyncConnectionCore, RunQueryDsl};
use std::any::TypeId;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Adds [`cached`](CachedDsl::cached) to every Diesel query.
pub trait CachedDsl: Sized {
    /// Caches this query's results under `label`.
    ///
    /// The label names the entry for people (it shows in the key); it is not its identity:
    /// the identity is a stable hash of the SQL text, the bind values, the backend, the result
    /// type and its fingerprint, so the same label with other binds is another entry.
    fn cached(self, label: impl Into<Cow<'static, str>>) -> Cached<Self> {
        Cached {
            query: self,
            label: label.into(),
            ttl: None,
            cache: None,
            extra_tables: Vec::new(),
            custom_key: None,
            scopes: Vec::new(),
        }
    }
}

impl<T: AsQuery> CachedDsl for T {}

/// A query to be answered from the cache; made by [`CachedDsl::cached`].
///
/// ```
/// # use diesel::prelude::*;
/// # use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
/// # use diesel_memclone::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
/// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
/// # #[diesel(table_name = users)]
/// # struct User { id: i32, name: String, status: String }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> diesel_memclone::Result<()> {
/// # let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
/// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
/// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
/// // Answered by the database the first time, then by the cache until a memclone write to
/// // `users` (or the TTL) invalidates it.
/// let active: Vec<User> = users::table
///     .filter(users::status.eq("active"))
///     .cached("active_users")
///     .ttl(std::time::Duration::from_secs(60))
///     .load(&mut conn)
///     .await?;
/// assert_eq!(active.len(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a cached query does nothing until loaded"]
pub struct Cached<Q> {
    query: Q,
    label: Cow<'static, str>,
    ttl: Option<Duration>,
    cache: Option<Cache>,
    extra_tables: Vec<String>,
    custom_key: Option<String>,
    scopes: Vec<Scope>,
}

/// A scope a query declared with [`Cached::within`]: it reads only rows of `table` whose
/// `column` holds `value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    table: &'static str,
    column: &'static str,
    value: String,
}

/// The backend of `P`'s connections.
pub(crate) type BackendOf<P> = <<P as ConnectionPool>::Connection as AsyncConnectionCore>::Backend;

/// The type of `query.cached(label)`.
pub mod dsl {
    /// The type [`cached`](super::CachedDsl::cached) returns for a query of type `Q`.
    pub type Cached<Q> = super::Cached<Q>;
}

/// A shape learnt from the first read of `queries` (rendered in full as `rendered`, looked up
/// as `lookup`), on a backend whose binds memclone does not collect: `None` unless it rebuilds
/// each rendering exactly from the SQL and this read's binds, which is what every later read of
/// the shape relies on.
fn learn_rendered_shape<T: CacheValue, DB: CacheBackend>(
    queries: &[&dyn QueryFragment<DB>],
    rendered: &[key::Rendered],
    lookup: &Lookup,
) -> Option<Shape> {
    let mut statements = Vec::with_capacity(queries.len());
    for (query, rendered) in queries.iter().zip(rendered) {
        let sql = rendered.sql();
        let escaped_sql = rendered.escaped_sql();
        let binds = key::binds_of::<DB>(*query, &sql)?;
        let rebuilt = key::Identity::Shaped {
            escaped_sql,
            binds: &binds,
        };
        if rebuilt.text() != rendered.0 {
            return None;
        }
        statements.push(ShapeStatement {
            sql: sql.into_boxed_str(),
            identity: StatementIdentity::Rendered {
                escaped_sql: escaped_sql.into(),
            },
        });
    }
    Some(Shape {
        statements: statements.into(),
        fingerprint: T::fingerprint(),
        tables: lookup.tables.clone(),
        generations: lookup.generations.clone(),
        near_generations: lookup.near_generations.clone(),
    })
}

impl<Q> Cached<Q> {
    /// How long this entry lives (default: the model's `#[memclone(ttl)]`, else the cache's).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Uses `cache` instead of the process-wide default.
    pub fn using(mut self, cache: &Cache) -> Self {
        self.cache = Some(cache.clone());
        self
    }

    /// Stores the result under this key instead of the one derived from the query (as in the
    /// Prisma reference: `cache: { key: "user_count" }`). Every query given the same key shares
    /// the entry, so the key must name the query and its arguments; writes to the tables the
    /// query reads still invalidate it, and [`Write::uncache`](crate::Write::uncache) or
    /// [`Cache::uncache`] delete it by name.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.custom_key = Some(key.into());
        self
    }

    /// Adds a table the result depends on that the SQL does not name (a view's base table,
    /// a function that reads another table). Writes to it will invalidate this entry.
    pub fn depends_on(mut self, table: &str) -> Self {
        self.extra_tables.push(key::table_from_text(table));
        self
    }

    /// Declares that, of `column`'s table, this query reads only rows whose `column` equals
    /// `value` (the column is declared with `#[memclone(scope(field))]` on its model). Its
    /// entry is then invalidated by writes to that table only when they may have touched such
    /// rows: a memclone write outside a transaction that returns the model's rows
    /// (`get_result`/`get_results`, with `RETURNING`) and assigns no scope column invalidates
    /// only the scoped queries of the values its rows hold; every other write to the table
    /// (`execute`, a write in a transaction, one that assigns a scope column, an upsert whose
    /// `DO UPDATE SET` does, `invalidate_table`, a listener's notification, other models' rows)
    /// invalidates every scoped query of it, as before. Queries of the table without `within`
    /// are invalidated by every write, as always.
    ///
    /// Several `within` calls add up: the query may read rows matching any of them (a
    /// `filter(posts::user_id.eq_any([1, 2]))` takes `.within(posts::user_id, 1)
    /// .within(posts::user_id, 2)`), so a write to a row matching any one invalidates it.
    /// `within` on a table the query does not read changes nothing.
    ///
    /// The query vouches for this: its SQL must read no other row of the table (not one with
    /// another value, not a row of a subquery on it). If it does, a write to such a row leaves
    /// this entry stale until its TTL, or until a write that invalidates every scoped query.
    ///
    /// ```ignore
    /// posts::table.inner_join(users::table)
    ///     .filter(posts::user_id.eq(author))
    ///     .cached("posts_by_author")
    ///     .within(posts::user_id, author) // only posts with user_id = author
    ///     .within(users::id, author)      // only the user with id = author
    ///     .load::<(Post, User)>(&mut conn)
    /// ```
    pub fn within<C: ScopeColumn>(mut self, _column: C, value: C::Value) -> Self {
        let scope = Scope {
            table: C::model_table(),
            column: C::NAME,
            value: value.scope_text(),
        };
        if !self.scopes.contains(&scope) {
            self.scopes.push(scope);
        }
        self
    }

    /// `lookup` with its scopes: for each table it declared a scope of, the table's scope
    /// generation and one generation per declared value instead of its query generation.
    /// Generations that expire are then among them: they are created to live as long as the
    /// entry (and a quarter), and extended by the entries stored under them, as a row's are.
    fn scoped(&self, cache: &Cache, mut lookup: Lookup) -> Lookup {
        if self.scopes.is_empty() {
            return lookup;
        }
        let ns = cache.namespace();
        let mut generations = Vec::with_capacity(lookup.tables.len() + self.scopes.len());
        let mut values = Vec::with_capacity(self.scopes.len());
        for table in lookup.tables.iter() {
            let mut scopes = self.scopes.iter().filter(|s| s.table == table).peekable();
            if scopes.peek().is_none() {
                generations.push(key::query_generation(ns, table));
                continue;
            }
            generations.push(key::scope_generation(ns, table));
            values.extend(scopes.map(|s| key::value_generation(ns, table, s.column, &s.value)));
        }
        if values.is_empty() {
            return lookup;
        }
        generations.extend(values);
        // The near tier names them anew: it must check exactly the generations the entry has.
        lookup.near_generations = cache.near_keys(&generations);
        lookup.generations = generations.into();
        let kept = lookup.ttl.saturating_add(cache.stale_while_revalidate());
        lookup.generation_ttl = Some(kept.saturating_add(kept / 4));
        lookup
    }

    /// Builds the lookup for a result of type `T` read by the statements `sqls` (rendered in
    /// full), or computed from the key `sqls` holds (`scan_sql` false).
    pub(crate) fn lookup<T: CacheValue>(
        &self,
        kind: &str,
        sqls: &[key::Rendered],
        scan_sql: bool,
    ) -> Lookup {
        // Stable across builds and compilers: the result type is known by its fingerprint (not
        // `type_name`, whose text Rust does not promise), the backend by the SQL it renders.
        let statements: Vec<key::Identity<'_>> =
            sqls.iter().map(|s| key::Identity::Text(&s.0)).collect();
        let digest = key::identity_digest(kind, T::fingerprint(), &statements);
        let scanned: Vec<Arc<[String]>> = sqls
            .iter()
            .filter(|_| scan_sql)
            .map(key::tables_of)
            .collect();
        self.lookup_of::<T>(digest, &scanned)
    }

    /// The lookup of the entry whose identity is `digest`, a result of type `T` read by
    /// statements that name the tables `scanned`.
    fn lookup_of<T: CacheValue>(&self, digest: u128, scanned: &[Arc<[String]>]) -> Lookup {
        let cache = self.cache();
        let mut tables: Vec<String> = Vec::new();
        let mut add = |t: &str| {
            if !tables.iter().any(|known| known == t) {
                tables.push(t.to_owned());
            }
        };
        scanned.iter().flat_map(|s| s.iter()).for_each(|t| add(t));
        let mut model_tables = Vec::new();
        T::tables(&mut model_tables);
        model_tables.iter().for_each(|t| add(t));
        self.extra_tables.iter().for_each(|t| add(t));
        tables.sort();
        let (key, near_key) = self.entry_key(cache, digest);
        let generations = cache.query_generation_keys(&tables);
        Lookup {
            key,
            near_key,
            near_generations: match cache.near_keys(&generations) {
                // Shared with the shape this read may teach.
                NearKeys::Pair(pair) => NearKeys::Shared(Arc::new(pair)),
                keys => keys,
            },
            generations: generations.into(),
            generation_ttl: None,
            ttl: self.ttl.unwrap_or_else(|| cache.default_ttl()),
            tables: tables.into(),
            policy: Policy::ReadWrite,
            name: ReadName::query(&self.label),
        }
    }

    /// The lookup of the entry whose identity is `digest`, read through `shape`.
    fn shaped(&self, cache: &Cache, shape: &Shape, digest: u128) -> Lookup {
        let (key, near_key) = self.entry_key(cache, digest);
        Lookup {
            key,
            near_key,
            near_generations: shape.near_generations.clone(),
            generations: shape.generations.clone(),
            generation_ttl: None,
            ttl: self.ttl.unwrap_or_else(|| cache.default_ttl()),
            tables: shape.tables.clone(),
            policy: Policy::ReadWrite,
            name: ReadName::query(&self.label),
        }
    }

    /// The key of the entry whose identity is `digest` (or the custom key), and the near
    /// tier's name for it. A query's key is spelt out only when a read needs it (see
    /// [`Cache::key_text`]): a near hit does not.
    fn entry_key(&self, cache: &Cache, digest: u128) -> (EntryKey, NearKey) {
        match &self.custom_key {
            Some(custom) => {
                let key = cache.custom_key(custom);
                let near_key = cache.near_key(&key);
                (EntryKey::Text(key), near_key)
            }
            None => {
                let digest = self.scoped_digest(digest);
                (
                    EntryKey::Query {
                        digest,
                        text: OnceLock::new(),
                    },
                    cache.near_query_key(digest, &self.label),
                )
            }
        }
    }

    /// `digest`, with this read's scopes: a scoped read's entry is not the unscoped read's of
    /// the same SQL (other generations guard it; sharing one key, they would evict each other).
    fn scoped_digest(&self, digest: u128) -> u128 {
        if self.scopes.is_empty() {
            return digest;
        }
        let mut text = String::new();
        for scope in &self.scopes {
            for part in [scope.table, scope.column, scope.value.as_str()] {
                text.push_str(&part.len().to_string());
                text.push(':');
                text.push_str(part);
            }
        }
        digest ^ xxhash_rust::xxh3::xxh3_128(text.as_bytes())
    }

    /// The lookup of a read of result `T` by `queries` on backend `DB`, `QT` being their type
    /// (or a tuple of their types) and `query_ids` their types' query ids: from their shape when
    /// they build its SQL, else in full, and the shape is learnt. `None` when Diesel cannot
    /// build their SQL or serialize their binds.
    pub(crate) fn query_lookup<T, DB, QT: ?Sized>(
        &self,
        kind: &str,
        queries: &[&dyn QueryFragment<DB>],
        query_ids: &[Option<TypeId>],
    ) -> Option<Lookup>
    where
        T: CacheValue,
        DB: CacheBackend,
    {
        self.lookup_by::<T, DB, QT>(kind, queries, query_ids, DB::collects_binds())
    }

    /// [`query_lookup`](Self::query_lookup), the identity made from the bind collector
    /// (`collected`) or from the `debug_query` rendering.
    fn lookup_by<T, DB, QT: ?Sized>(
        &self,
        kind: &str,
        queries: &[&dyn QueryFragment<DB>],
        query_ids: &[Option<TypeId>],
        collected: bool,
    ) -> Option<Lookup>
    where
        T: CacheValue,
        DB: CacheBackend,
    {
        let cache = self.cache();
        let backend = DB::default();
        // Tables added with `depends_on` belong to this read, not to its shape.
        let shape_key = self
            .extra_tables
            .is_empty()
            .then(ShapeKey::of::<T, (DB, QT)>);
        let mut learn = shape_key.is_some();
        if let Some(shape) = shape_key.as_ref().and_then(|k| cache.shape(k)) {
            let lookup = if collected {
                self.collected_shaped_lookup(cache, &shape, kind, queries, query_ids, &backend)
            } else {
                self.rendered_shaped_lookup(cache, &shape, kind, queries)
            };
            // The shape's generations are its tables' query generations: this read's scopes
            // replace them.
            if let Some(lookup) = lookup {
                return Some(self.scoped(cache, lookup));
            }
            // Another SQL under the same type (a raw or boxed query): built in full.
            learn = false;
        }
        let (lookup, shape) = if collected {
            self.collected_lookup::<T, DB>(kind, queries, query_ids, &backend, learn)?
        } else {
            self.rendered_lookup::<T, DB>(kind, queries, learn)?
        };
        if let (Some(shape_key), Some(shape)) = (shape_key, shape) {
            cache.remember_shape(shape_key, shape);
        }
        // After the shape was learnt: it keeps the unscoped generations, shared by every read.
        Some(self.scoped(cache, lookup))
    }

    /// The lookup of `queries` from their SQL and collected binds, and their shape if `learn`.
    fn collected_lookup<T: CacheValue, DB: CacheBackend>(
        &self,
        kind: &str,
        queries: &[&dyn QueryFragment<DB>],
        query_ids: &[Option<TypeId>],
        backend: &DB,
        learn: bool,
    ) -> Option<(Lookup, Option<Shape>)> {
        let mut statements = Vec::with_capacity(queries.len());
        let mut digests = Vec::with_capacity(queries.len());
        let mut scanned = Vec::with_capacity(queries.len());
        for (i, query) in queries.iter().enumerate() {
            let sql = identity::sql_of(*query, backend)?;
            let sql_digest = identity::sql_digest(&sql);
            digests.push((sql_digest, DB::binds_digest(*query)?));
            scanned.push(key::tables_of_sql(&sql));
            // Only a read that builds its type's one SQL may let later reads of that type skip
            // building theirs: a query whose SQL depends on its values (`eq_any` with a list)
            // is not safe to cache prepared, and its SQL is compared on every read.
            let query_id = query_ids.get(i).copied().flatten();
            let fixed_by =
                identity::fixed_sql(*query, query_id, backend).map(|id| (TypeId::of::<DB>(), id));
            statements.push(ShapeStatement {
                sql: sql.into_boxed_str(),
                identity: StatementIdentity::Collected {
                    sql_digest,
                    fixed_by,
                },
            });
        }
        let digest = identity::collected_digest(kind, T::fingerprint(), &digests);
        let lookup = self.lookup_of::<T>(digest, &scanned);
        let shape = learn.then(|| Shape {
            statements: statements.into(),
            fingerprint: T::fingerprint(),
            tables: lookup.tables.clone(),
            generations: lookup.generations.clone(),
            near_generations: lookup.near_generations.clone(),
        });
        Some((lookup, shape))
    }

    /// The lookup of `queries` from their shape, if they build its SQL: the same key as
    /// [`collected_lookup`](Self::collected_lookup) gives them. A statement whose type always
    /// builds the shape's SQL is not built at all; only its binds are collected.
    fn collected_shaped_lookup<DB: CacheBackend>(
        &self,
        cache: &Cache,
        shape: &Shape,
        kind: &str,
        queries: &[&dyn QueryFragment<DB>],
        query_ids: &[Option<TypeId>],
        backend: &DB,
    ) -> Option<Lookup> {
        // One or two statements (`load_and_count`): no vector to allocate.
        let n = queries.len();
        if n > 2 || shape.statements.len() != n {
            return None;
        }
        let mut digests = [(0, 0); 2];
        for (i, (query, statement)) in queries.iter().zip(&*shape.statements).enumerate() {
            let StatementIdentity::Collected {
                sql_digest,
                fixed_by,
            } = &statement.identity
            else {
                return None;
            };
            let query_id = query_ids.get(i).copied().flatten();
            let fixed = match (*fixed_by, query_id) {
                (Some((db, fixed_id)), Some(id)) => {
                    db == TypeId::of::<DB>()
                        && id == fixed_id
                        && identity::fixed_sql(*query, query_id, backend).is_some()
                }
                _ => false,
            };
            if !fixed && identity::sql_of(*query, backend)? != *statement.sql {
                return None;
            }
            digests[i] = (*sql_digest, DB::binds_digest(*query)?);
        }
        let digest = identity::collected_digest(kind, shape.fingerprint, &digests[..n]);
        Some(self.shaped(cache, shape, digest))
    }

    /// The lookup of `queries` from their `debug_query` rendering, and their shape if `learn`.
    ///
    /// The collector's digest of their binds is added: on a backend memclone does not know it
    /// may not list everything, but it can only tell apart what the rendering confuses (a
    /// `Float` and a `Double` 0.1 both render as `0.1`), never make two renderings one.
    fn rendered_lookup<T: CacheValue, DB: CacheBackend>(
        &self,
        kind: &str,
        queries: &[&dyn QueryFragment<DB>],
        learn: bool,
    ) -> Option<(Lookup, Option<Shape>)> {
        let rendered: Vec<key::Rendered> = queries
            .iter()
            .map(key::Rendered::of::<DB, _>)
            .collect::<Option<_>>()?;
        let binds: Vec<u128> = queries
            .iter()
            .map(|query| DB::binds_digest(*query))
            .collect::<Option<_>>()?;
        let statements: Vec<key::Identity<'_>> =
            rendered.iter().map(|s| key::Identity::Text(&s.0)).collect();
        let digest = key::identity_digest(kind, T::fingerprint(), &statements);
        let scanned: Vec<Arc<[String]>> = rendered.iter().map(key::tables_of).collect();
        let lookup = self.lookup_of::<T>(identity::with_binds(digest, &binds), &scanned);
        let shape = learn
            .then(|| learn_rendered_shape::<T, DB>(queries, &rendered, &lookup))
            .flatten();
        Some((lookup, shape))
    }

    /// The lookup of `queries` from their shape, if they render its SQL: the same key as
    /// [`rendered_lookup`](Self::rendered_lookup) gives them.
    fn rendered_shaped_lookup<DB: CacheBackend>(
        &self,
        cache: &Cache,
        shape: &Shape,
        kind: &str,
        queries: &[&dyn QueryFragment<DB>],
    ) -> Option<Lookup> {
        // One or two statements (`load_and_count`): no vector to allocate.
        let n = queries.len();
        if n > 2 || shape.statements.len() != n {
            return None;
        }
        let mut binds: [String; 2] = Default::default();
        let mut collected = [0; 2];
        let mut escaped: [&str; 2] = ["", ""];
        for (i, (query, statement)) in queries.iter().zip(&*shape.statements).enumerate() {
            let StatementIdentity::Rendered { escaped_sql } = &statement.identity else {
                return None;
            };
            binds[i] = key::binds_of::<DB>(*query, &statement.sql)?;
            collected[i] = DB::binds_digest(*query)?;
            escaped[i] = escaped_sql;
        }
        let [first, second] = [0, 1].map(|i| key::Identity::Shaped {
            escaped_sql: escaped[i],
            binds: &binds[i],
        });
        let statements = [first, second];
        let digest = key::identity_digest(kind, shape.fingerprint, &statements[..n]);
        let digest = identity::with_binds(digest, &collected[..n]);
        Some(self.shaped(cache, shape, digest))
    }

    pub(crate) fn cache(&self) -> &Cache {
        self.cache.as_ref().unwrap_or_else(|| cache())
    }

    /// Loads every row, like Diesel's `load`.
    ///
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    /// # use diesel_memclone::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
    /// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
    /// # #[diesel(table_name = users)]
    /// # struct User { id: i32, name: String, status: String }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> diesel_memclone::Result<()> {
    /// # let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
    /// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    /// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
    /// let names: Vec<String> = users::table
    ///     .select(users::name)
    ///     .order(users::id)
    ///     .cached("names")
    ///     .load(&mut conn)
    ///     .await?;
    /// assert_eq!(names, ["Ada", "Bob"]);
    /// # Ok(()) }
    /// ```
    pub async fn load<'q, U, C>(self, conn: &mut C) -> Result<Vec<U>>
    where
        C: AsyncConnection,
        C::Backend: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, U> + 'q,
        U: CacheValue + Send,
    {
        let (query, this) = self.split();
        let query = query.as_query();
        let lookup = this.query_lookup::<Vec<U>, C::Backend, Q::Query>(
            "load",
            &[&query],
            &[Q::Query::query_id()],
        );
        let Some(lookup) = lookup else {
            // Diesel cannot build this query's SQL: let it say why.
            return Ok(query.load::<U>(conn).await?);
        };
        let lookup = with_policy(lookup, conn);
        let cache = this.cache();
        cache.read_through(lookup, || query.load::<U>(conn)).await
    }

    /// Loads one row, like Diesel's `get_result`; no row is
    /// [`Error::Database(NotFound)`](diesel::result::Error::NotFound), and that answer is
    /// cached too (until a write to the table).
    ///
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    /// # use diesel_memclone::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
    /// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
    /// # #[diesel(table_name = users)]
    /// # struct User { id: i32, name: String, status: String }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> diesel_memclone::Result<()> {
    /// # let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
    /// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    /// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
    /// let ada: User = users::table.find(1).cached("user").get_result(&mut conn).await?;
    /// assert_eq!(ada.name, "Ada");
    ///
    /// // No row is Diesel's NotFound, cached like any other answer.
    /// let missing = users::table.find(9).cached("user").get_result::<User, _>(&mut conn).await;
    /// assert!(missing.unwrap_err().is_not_found());
    /// # Ok(()) }
    /// ```
    pub async fn get_result<'q, U, C>(self, conn: &mut C) -> Result<U>
    where
        C: AsyncConnection,
        C::Backend: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, U> + 'q,
        U: CacheValue + Send,
    {
        let (query, this) = self.split();
        let query = query.as_query();
        let lookup = this.query_lookup::<Option<U>, C::Backend, Q::Query>(
            "one",
            &[&query],
            &[Q::Query::query_id()],
        );
        let Some(lookup) = lookup else {
            return Ok(query.get_result::<U>(conn).await?);
        };
        let lookup = with_policy(lookup, conn);
        let cache = this.cache();
        let found = cache
            .read_through(lookup, || async move {
                use diesel::OptionalExtension;
                query.get_result::<U>(conn).await.optional()
            })
            .await?;
        found.ok_or(crate::Error::Database(diesel::result::Error::NotFound))
    }

    /// The first row, like Diesel's `first` (adds `LIMIT 1`).
    ///
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    /// # use diesel_memclone::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
    /// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
    /// # #[diesel(table_name = users)]
    /// # struct User { id: i32, name: String, status: String }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> diesel_memclone::Result<()> {
    /// # let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
    /// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    /// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
    /// let newest: User = users::table
    ///     .order(users::id.desc())
    ///     .cached("newest_user")
    ///     .first(&mut conn)
    ///     .await?;
    /// assert_eq!(newest.name, "Bob");
    /// # Ok(()) }
    /// ```
    pub async fn first<'q, U, C>(self, conn: &mut C) -> Result<U>
    where
        C: AsyncConnection,
        C::Backend: CacheBackend,
        Q: LimitDsl,
        Limit<Q>: AsQuery,
        <Limit<Q> as AsQuery>::Query:
            QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, U> + 'q,
        U: CacheValue + Send,
    {
        self.map(|q| q.limit(1)).get_result(conn).await
    }

    /// The number of rows, like Diesel's `.count().get_result::<i64>()`.
    ///
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    /// # use diesel_memclone::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
    /// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
    /// # #[diesel(table_name = users)]
    /// # struct User { id: i32, name: String, status: String }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> diesel_memclone::Result<()> {
    /// # let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
    /// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    /// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
    /// let active = users::table
    ///     .filter(users::status.eq("active"))
    ///     .cached("n_active")
    ///     .count(&mut conn)
    ///     .await?;
    /// assert_eq!(active, 1);
    /// # Ok(()) }
    /// ```
    pub async fn count<'q, C>(self, conn: &mut C) -> Result<i64>
    where
        C: AsyncConnection,
        C::Backend: CacheBackend,
        Q: SelectDsl<CountStar>,
        Select<Q, CountStar>: AsQuery,
        <Select<Q, CountStar> as AsQuery>::Query:
            QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, i64> + 'q,
    {
        self.map(|q| q.select(diesel::dsl::count_star()))
            .get_result(conn)
            .await
    }

    /// A page of rows and the total count, in one entry (Sequelize's `findAndCountAll`):
    /// `count_query` is the same filter without `LIMIT`/`OFFSET`, usually `filter.count()`.
    pub async fn load_and_count<'q, U, CQ, C>(
        self,
        count_query: CQ,
        conn: &mut C,
    ) -> Result<(Vec<U>, i64)>
    where
        C: AsyncConnection,
        C::Backend: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, U> + 'q,
        CQ: AsQuery,
        CQ::Query: QueryFragment<C::Backend> + QueryId + LoadQuery<'q, C, i64> + 'q,
        U: CacheValue + Send,
    {
        let (query, this) = self.split();
        let query = query.as_query();
        let count_query = count_query.as_query();
        let lookup = this.query_lookup::<(Vec<U>, i64), C::Backend, (Q::Query, CQ::Query)>(
            "load_and_count",
            &[&query, &count_query],
            &[Q::Query::query_id(), CQ::Query::query_id()],
        );
        let Some(lookup) = lookup else {
            let rows = query.load::<U>(conn).await?;
            let total = count_query.get_result::<i64>(conn).await?;
            return Ok((rows, total));
        };
        let lookup = with_policy(lookup, conn);
        let cache = this.cache();
        cache
            .read_through(lookup, || async move {
                let rows = query.load::<U>(conn).await?;
                let total = count_query.get_result::<i64>(conn).await?;
                diesel::QueryResult::Ok((rows, total))
            })
            .await
    }

    /// Like [`load`](Cached::load), with a connection checked out of `pool` only on a miss:
    /// a hit never touches the pool (see [`ConnectionPool`]).
    ///
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    /// # use diesel_memclone::prelude::*;
    /// # use diesel_memclone::ConnectionPool;
    /// # use serde::{Deserialize, Serialize};
    /// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
    /// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
    /// # #[diesel(table_name = users)]
    /// # struct User { id: i32, name: String, status: String }
    /// # type Conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>;
    /// # struct Pool(std::sync::Arc<tokio::sync::Mutex<Conn>>);
    /// # impl ConnectionPool for Pool {
    /// #     type Connection = tokio::sync::OwnedMutexGuard<Conn>;
    /// #     async fn connection(&self) -> diesel_memclone::Result<Self::Connection> {
    /// #         Ok(self.0.clone().lock_owned().await)
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> diesel_memclone::Result<()> {
    /// # let mut conn = Conn::establish(":memory:").await?;
    /// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    /// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
    /// # let pool = Pool(std::sync::Arc::new(tokio::sync::Mutex::new(conn)));
    /// // `pool`: diesel-async's deadpool or bb8 pool (features `deadpool`, `bb8`), or any
    /// // `ConnectionPool`.
    /// let names: Vec<String> = users::table
    ///     .select(users::name)
    ///     .order(users::id)
    ///     .cached("names")
    ///     .load_from(&pool)
    ///     .await?;
    /// assert_eq!(names, ["Ada", "Bob"]);
    /// # Ok(()) }
    /// ```
    pub async fn load_from<'q, U, P>(self, pool: &P) -> Result<Vec<U>>
    where
        P: ConnectionPool,
        BackendOf<P>: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<BackendOf<P>> + QueryId + LoadQuery<'q, P::Connection, U> + 'q,
        U: CacheValue + Send,
    {
        let (query, this) = self.split();
        let query = query.as_query();
        let lookup = this.query_lookup::<Vec<U>, BackendOf<P>, Q::Query>(
            "load",
            &[&query],
            &[Q::Query::query_id()],
        );
        let Some(lookup) = lookup else {
            let mut conn = pool.connection().await?;
            return Ok(query.load::<U>(&mut conn).await?);
        };
        // The pool's connection is in no transaction of the caller's: a plain read.
        let cache = this.cache();
        if let Some(hit) = cache.store_hit(&lookup).await {
            return Ok(hit);
        }
        // A miss: the connection first, then the load others may share (see
        // `Cache::store_hit`).
        let mut conn = pool.connection().await?;
        cache
            .read_through(lookup, move || async move {
                Ok::<_, crate::Error>(query.load::<U>(&mut conn).await?)
            })
            .await
    }

    /// Like [`get_result`](Cached::get_result), with a connection checked out of `pool` only
    /// on a miss (see [`ConnectionPool`]). No row is
    /// [`Error::Database(NotFound)`](diesel::result::Error::NotFound), cached too.
    pub async fn get_result_from<'q, U, P>(self, pool: &P) -> Result<U>
    where
        P: ConnectionPool,
        BackendOf<P>: CacheBackend,
        Q: AsQuery,
        Q::Query: QueryFragment<BackendOf<P>> + QueryId + LoadQuery<'q, P::Connection, U> + 'q,
        U: CacheValue + Send,
    {
        use diesel::OptionalExtension;
        let (query, this) = self.split();
        let query = query.as_query();
        let lookup = this.query_lookup::<Option<U>, BackendOf<P>, Q::Query>(
            "one",
            &[&query],
            &[Q::Query::query_id()],
        );
        let Some(lookup) = lookup else {
            let mut conn = pool.connection().await?;
            return Ok(query.get_result::<U>(&mut conn).await?);
        };
        let cache = this.cache();
        let found = match cache.store_hit(&lookup).await {
            Some(hit) => hit,
            None => {
                // A miss: the connection first (see `Cache::store_hit`).
                let mut conn = pool.connection().await?;
                cache
                    .read_through(lookup, move || async move {
                        Ok::<_, crate::Error>(query.get_result::<U>(&mut conn).await.optional()?)
                    })
                    .await?
            }
        };
        found.ok_or(crate::Error::Database(diesel::result::Error::NotFound))
    }

    /// Like [`first`](Cached::first), with a connection checked out of `pool` only on a miss
    /// (see [`ConnectionPool`]).
    pub async fn first_from<'q, U, P>(self, pool: &P) -> Result<U>
    where
        P: ConnectionPool,
        BackendOf<P>: CacheBackend,
        Q: LimitDsl,
        Limit<Q>: AsQuery,
        <Limit<Q> as AsQuery>::Query:
            QueryFragment<BackendOf<P>> + QueryId + LoadQuery<'q, P::Connection, U> + 'q,
        U: CacheValue + Send,
    {
        self.map(|q| q.limit(1)).get_result_from(pool).await
    }

    /// Like [`count`](Cached::count), with a connection checked out of `pool` only on a miss
    /// (see [`ConnectionPool`]).
    pub async fn count_from<'q, P>(self, pool: &P) -> Result<i64>
    where
        P: ConnectionPool,
        BackendOf<P>: CacheBackend,
        Q: SelectDsl<CountStar>,
        Select<Q, CountStar>: AsQuery,
        <Select<Q, CountStar> as AsQuery>::Query:
            QueryFragment<BackendOf<P>> + QueryId + LoadQuery<'q, P::Connection, i64> + 'q,
    {
        self.map(|q| q.select(diesel::dsl::count_star()))
            .get_result_from(pool)
            .await
    }

    /// Separates the query from the options.
    pub(crate) fn split(self) -> (Q, Cached<()>) {
        let options = Cached {
            query: (),
            label: self.label,
            ttl: self.ttl,
            cache: self.cache,
            extra_tables: self.extra_tables,
            custom_key: self.custom_key,
            scopes: self.scopes,
        };
        (self.query, options)
    }

    /// Changes the query, keeping the label and options.
    pub fn map<Q2>(self, f: impl FnOnce(Q) -> Q2) -> Cached<Q2> {
        Cached {
            query: f(self.query),
            label: self.label,
            ttl: self.ttl,
            cache: self.cache,
            extra_tables: self.extra_tables,
            custom_key: self.custom_key,
            scopes: self.scopes,
        }
    }
}

/// `lookup` with the policy of a read on `conn` (in a transaction or not).
fn with_policy<C: AsyncConnection>(mut lookup: Lookup, conn: &mut C) -> Lookup {
    lookup.policy = read_policy(conn, &lookup.tables);
    lookup
}

impl Cache {
    /// Caches any value computed from the database, such as users with their posts,
    /// `(User, Vec<Post>)`, built from `belonging_to` and `grouped_by`.
    ///
    /// The identity is `label`, `key`, the value's type and its fingerprint: put every input of
    /// the computation in `key`. The value depends on the tables of the models its type holds,
    /// plus `extra_tables`; a write to any of them invalidates it.
    ///
    /// ```
    /// # use diesel::prelude::*;
    /// # use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    /// # use diesel_memclone::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # diesel::table! { users (id) { id -> Integer, name -> Text, status -> Text } }
    /// # #[derive(Debug, Queryable, Selectable, Insertable, Serialize, Deserialize, MemClone)]
    /// # #[diesel(table_name = users)]
    /// # struct User { id: i32, name: String, status: String }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> diesel_memclone::Result<()> {
    /// # let mut conn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper::<diesel::SqliteConnection>::establish(":memory:").await?;
    /// # conn.batch_execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL);
    /// #     INSERT INTO users VALUES (1, 'Ada', 'active'), (2, 'Bob', 'away');").await?;
    /// // Any computation over one or more queries; a write to `users` invalidates the value,
    /// // because `User` is in its type.
    /// let cache = diesel_memclone::cache();
    /// let by_status: Vec<(String, Vec<User>)> = cache
    ///     .load_with("users_by_status", "all", &[], &mut conn, |conn| {
    ///         Box::pin(async move {
    ///             let rows: Vec<User> = users::table.order(users::id).load(conn).await?;
    ///             let mut groups: Vec<(String, Vec<User>)> = Vec::new();
    ///             for user in rows {
    ///                 match groups.iter_mut().find(|(status, _)| *status == user.status) {
    ///                     Some((_, members)) => members.push(user),
    ///                     None => groups.push((user.status.clone(), vec![user])),
    ///                 }
    ///             }
    ///             Ok(groups)
    ///         })
    ///     })
    ///     .await?;
    /// assert_eq!(by_status.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn load_with<T, C, F>(
        &self,
        label: &str,
        key: &str,
        extra_tables: &[&str],
        conn: &mut C,
        fill: F,
    ) -> Result<T>
    where
        T: CacheValue,
        C: AsyncConnection,
        F: for<'r> FnOnce(&'r mut C) -> futures_util::future::BoxFuture<'r, diesel::QueryResult<T>>,
    {
        let mut options = Cached {
            query: (),
            label: Cow::Owned(label.to_owned()),
            ttl: None,
            cache: Some(self.clone()),
            extra_tables: Vec::new(),
            custom_key: None,
            scopes: Vec::new(),
        };
        for table in extra_tables {
            options = options.depends_on(table);
        }
        // The key is not SQL: only the model tables and the extra tables count.
        let mut lookup = options.lookup::<T>("value", &[key::Rendered(key.to_owned())], false);
        lookup.policy = read_policy(conn, &lookup.tables);
        self.read_through(lookup, || fill(conn)).await
    }
}

impl Cache {
    /// Like [`load_with`](Cache::load_with), for a fill that gets its own connection (from a
    /// pool, say), so that callers answered by the cache never check one out. The fill must read
    /// committed data: never call this inside a transaction.
    pub async fn fill_with<T, F, Fut>(
        &self,
        label: &str,
        key: &str,
        tables: &[&str],
        fill: F,
    ) -> Result<T>
    where
        T: CacheValue,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = diesel::QueryResult<T>>,
    {
        let mut options = Cached {
            query: (),
            label: Cow::Owned(label.to_owned()),
            ttl: None,
            cache: Some(self.clone()),
            extra_tables: Vec::new(),
            custom_key: None,
            scopes: Vec::new(),
        };
        for table in tables {
            options = options.depends_on(table);
        }
        let lookup = options.lookup::<T>("value", &[key::Rendered(key.to_owned())], false);
        self.read_through(lookup, fill).await
    }
}

impl Cached<()> {
    /// The options of a value computed by `fill` (`load_with`, `fill_with`): `label`, on
    /// `cache`, depending on `tables` besides the value's models.
    pub(crate) fn value_options(cache: &Cache, label: &str, tables: &[&str]) -> Self {
        let mut options = Cached {
            query: (),
            label: Cow::Owned(label.to_owned()),
            ttl: None,
            cache: Some(cache.clone()),
            extra_tables: Vec::new(),
            custom_key: None,
            scopes: Vec::new(),
        };
        for table in tables {
            options = options.depends_on(table);
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::CachedDsl;
    use crate::cache::{ShapeKey, StatementIdentity};
    use crate::Cache;
    use diesel::prelude::*;
    use diesel::query_builder::{AsQuery, QueryFragment, QueryId};
    use diesel::sql_types::{BigInt, Integer, Text};
    use diesel::sqlite::Sqlite;
    use diesel_async::methods::LoadQuery;
    use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};

    diesel::table! { people (id) { id -> Integer, name -> Text } }
    diesel::table! { pets (id) { id -> Integer, name -> Text, nick -> Nullable<Text> } }

    type Conn = SyncConnectionWrapper<diesel::SqliteConnection>;

    async fn names<Q>(cache: &Cache, conn: &mut Conn, query: Q) -> Vec<String>
    where
        Q: AsQuery,
        Q::Query: QueryFragment<Sqlite> + QueryId + for<'q> LoadQuery<'q, Conn, String> + 'static,
    {
        query.cached("names").using(cache).load(conn).await.unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shapes_answer_only_their_own_sql() {
        let mut conn = Conn::establish(":memory:").await.unwrap();
        conn.batch_execute(
            "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
             INSERT INTO people VALUES (1, 'a'), (2, 'b'), (3, 'c');",
        )
        .await
        .unwrap();
        let cache = Cache::in_memory();
        let by_ids = |ids: Vec<i32>| {
            people::table
                .filter(people::id.eq_any(ids))
                .select(people::name)
                .order(people::id)
        };
        // One query type; on SQLite its SQL has one placeholder per id.
        assert_eq!(
            names(&cache, &mut conn, by_ids(vec![1, 2])).await,
            ["a", "b"]
        );
        assert_eq!(
            names(&cache, &mut conn, by_ids(vec![1, 2, 3])).await,
            ["a", "b", "c"]
        );
        assert_eq!(
            names(&cache, &mut conn, by_ids(vec![2, 3])).await,
            ["b", "c"]
        );
        assert_eq!(cache.stats().misses, 3);
        // Read again through the shape: the entries the full renderings stored (same keys).
        assert_eq!(
            names(&cache, &mut conn, by_ids(vec![1, 2])).await,
            ["a", "b"]
        );
        assert_eq!(
            names(&cache, &mut conn, by_ids(vec![2, 3])).await,
            ["b", "c"]
        );
        assert_eq!(
            names(&cache, &mut conn, by_ids(vec![1, 2, 3])).await,
            ["a", "b", "c"]
        );
        assert_eq!((cache.stats().misses, cache.stats().hits), (3, 3));

        // A boxed query: one type, any SQL.
        let boxed = |by_name: bool| {
            let query = people::table.select(people::name).into_boxed();
            if by_name {
                query.filter(people::name.eq("c"))
            } else {
                query.filter(people::id.eq(1))
            }
        };
        for _ in 0..2 {
            assert_eq!(names(&cache, &mut conn, boxed(false)).await, ["a"]);
            assert_eq!(names(&cache, &mut conn, boxed(true)).await, ["c"]);
        }
        assert_eq!((cache.stats().misses, cache.stats().hits), (5, 5));
    }

    /// The key of a `load` of `query` into `Vec<String>` through `cache`, its identity made from
    /// the bind collector (`collected`) or from the `debug_query` rendering.
    fn key_of<Q>(cache: &Cache, query: Q, collected: bool) -> String
    where
        Q: AsQuery,
        Q::Query: QueryFragment<Sqlite> + QueryId,
    {
        let (query, options) = query.cached("k").using(cache).split();
        let query = query.as_query();
        let ids = [<Q::Query as QueryId>::query_id()];
        let lookup =
            options.lookup_by::<Vec<String>, Sqlite, Q::Query>("load", &[&query], &ids, collected);
        cache
            .key_text(&lookup.expect("Diesel builds it"))
            .to_owned()
    }

    fn by_name(name: &str) -> impl AsQuery<Query: QueryFragment<Sqlite> + QueryId> + '_ {
        pets::table.filter(pets::name.eq(name)).select(pets::name)
    }

    fn by_nick(nick: Option<&str>) -> impl AsQuery<Query: QueryFragment<Sqlite> + QueryId> + '_ {
        pets::table.filter(pets::nick.eq(nick)).select(pets::name)
    }

    fn by_ids(ids: Vec<i32>) -> impl AsQuery<Query: QueryFragment<Sqlite> + QueryId> {
        pets::table.filter(pets::id.eq_any(ids)).select(pets::name)
    }

    /// One type, three SQL texts, the same bind.
    fn boxed(which: u8) -> impl AsQuery<Query: QueryFragment<Sqlite> + QueryId> {
        let query = pets::table.select(pets::name).into_boxed::<Sqlite>();
        match which {
            0 => query.filter(pets::name.eq("1")),
            1 => query.filter(pets::nick.eq("1")),
            _ => query.filter(pets::name.ne("1")),
        }
    }

    const RAW: &str = "SELECT name FROM pets WHERE id = ?";

    /// Every read of each query gets one key, whether it learns its shape (a fresh cache) or
    /// goes through it; and no two of these queries share a key.
    fn one_key_per_query(collected: bool) -> Vec<String> {
        let shared = Cache::in_memory();
        let mut keys: Vec<String> = Vec::new();
        macro_rules! key {
            ($query:expr) => {{
                let learnt = key_of(&Cache::in_memory(), $query, collected);
                for _ in 0..2 {
                    let shaped = key_of(&shared, $query, collected);
                    assert_eq!(
                        shaped,
                        learnt,
                        "{} (collected: {collected})",
                        stringify!($query)
                    );
                }
                keys.push(learnt);
            }};
        }
        for name in ["it's", "it\"s", "its", "", "it's -- binds: [\"x\"]", "NULL"] {
            key!(by_name(name));
        }
        for nick in [None, Some(""), Some("NULL"), Some("None")] {
            key!(by_nick(nick));
        }
        for ids in [
            vec![],
            vec![1],
            vec![1, 2],
            vec![12],
            vec![1, 2, 3],
            vec![2, 1],
        ] {
            key!(by_ids(ids.clone()));
        }
        for which in 0..3 {
            key!(boxed(which));
        }
        key!(diesel::sql_query(RAW).bind::<Integer, _>(1));
        // As the server sees them, an `Int4` 1 and an `Int8` 1 are different binds; `Debug`
        // lists them alike.
        key!(diesel::sql_query(RAW).bind::<BigInt, _>(1_i64));
        key!(diesel::sql_query(RAW).bind::<Text, _>("1"));
        key!(diesel::sql_query(RAW).bind::<Integer, _>(2));
        key!(diesel::sql_query(RAW.replace('?', "? ")).bind::<Integer, _>(1));
        let distinct: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "collected: {collected}: {keys:#?}"
        );
        keys
    }

    #[test]
    fn collected_identities_are_one_per_query() {
        let collected = one_key_per_query(true);
        // Another scheme than the rendered identities.
        let rendered = one_key_per_query(false);
        assert!(collected.iter().all(|key| !rendered.contains(key)));
    }

    #[test]
    fn rendered_identities_add_the_binds() {
        let query = by_name("a").as_query();
        let rendered = crate::key::Rendered::of::<Sqlite, _>(&query).unwrap();
        let cache = Cache::in_memory();
        let digest = crate::key::identity_digest(
            "load",
            <Vec<String> as crate::CacheValue>::fingerprint(),
            &[crate::key::Identity::Text(&rendered.0)],
        );
        let binds = <Sqlite as crate::CacheBackend>::binds_digest(&query).unwrap();
        assert_eq!(
            key_of(&cache, by_name("a"), false),
            cache.query_key(crate::identity::with_binds(digest, &[binds]), "k")
        );
    }

    /// Which statements of a shape are known from their type to build its SQL.
    fn fixed<Q>(query: Q) -> bool
    where
        Q: AsQuery,
        Q::Query: QueryFragment<Sqlite> + QueryId,
    {
        let cache = Cache::in_memory();
        key_of(&cache, query, true);
        let shape = cache
            .shape(&ShapeKey::of::<Vec<String>, (Sqlite, Q::Query)>())
            .expect("learnt");
        match shape.statements[0].identity {
            StatementIdentity::Collected { fixed_by, .. } => fixed_by.is_some(),
            StatementIdentity::Rendered { .. } => panic!("collected"),
        }
    }

    #[test]
    fn only_types_with_one_sql_skip_building_it() {
        assert!(fixed(by_name("a")));
        assert!(fixed(by_nick(None)));
        assert!(fixed(pets::table.find(1).select(pets::name).limit(1)));
        // Their SQL depends on their values: compared on every read.
        assert!(!fixed(by_ids(vec![1, 2])));
        assert!(!fixed(boxed(0)));
        assert!(!fixed(diesel::sql_query(RAW).bind::<Integer, _>(1)));
    }
}

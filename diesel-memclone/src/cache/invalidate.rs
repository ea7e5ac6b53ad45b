//! The invalidation path: a write moves its tables' generations (and its rows'), one atomic
//! bump per table; an invalidation the store did not take is remembered, retried in the
//! background, and keeps the cache from serving its tables until it is delivered.

use super::{Cache, Inner};
use crate::key;
use crate::model::RowKey;
use crate::store::{fresh_generation, StoreResult, TableBump, WriteThrough};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl Cache {
    /// Makes every cached query and entity of `table` (its SQL name) unreachable: for writes that
    /// bypass memclone (raw SQL, another service). An undeliverable invalidation is kept and
    /// retried; until then this process does not serve the table from the cache.
    pub async fn invalidate_table(&self, table: &str) {
        self.invalidate_written(&[key::table_from_text(table)], None)
            .await;
    }

    /// Makes every cached query and entity of model `M` unreachable.
    pub async fn invalidate<M: crate::MemClone>(&self) {
        self.invalidate_table(M::table()).await;
    }

    /// Delivers now, if the store takes them, the invalidations that could not be delivered
    /// (they are otherwise retried every `retry_after` in the background): for a graceful
    /// shutdown, which should not leave other processes serving what this one wrote. True when
    /// none is left. It tries the store even within `retry_after` of a failure.
    pub async fn deliver_invalidations(&self) -> bool {
        if self.inner.has_undelivered.load(Ordering::Acquire) {
            self.inner.health.retry_now();
        }
        self.deliver_pending().await
    }

    /// Tables whose invalidation has not reached the store yet.
    pub fn undelivered_invalidations(&self) -> Vec<String> {
        self.lock_undelivered()
            .keys()
            .filter(|name| !self.is_custom_entry(name))
            .cloned()
            .collect()
    }

    /// True for the store key of a custom entry (`.key(..)`), which the undelivered map also
    /// holds: a deletion (`uncache`) the store did not take.
    fn is_custom_entry(&self, name: &str) -> bool {
        name.starts_with(&key::custom_prefix(&self.inner.namespace))
    }

    fn lock_undelivered(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.inner
            .undelivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Retries undelivered invalidations. Returns true when none is left.
    pub(super) async fn deliver_pending(&self) -> bool {
        if !self.inner.has_undelivered.load(Ordering::Acquire) {
            return true;
        }
        let snapshot: Vec<(String, u64)> = self
            .lock_undelivered()
            .iter()
            .map(|(t, e)| (t.clone(), *e))
            .collect();
        if snapshot.is_empty() {
            return true;
        }
        // Custom entries whose deletion (`uncache`) failed are deleted now; tables bumped.
        let (keys, tables): (Vec<String>, Vec<String>) = snapshot
            .iter()
            .map(|(t, _)| t.clone())
            .partition(|name| self.is_custom_entry(name));
        let tables_delivered =
            tables.is_empty() || self.bump_tables(&tables, None, None, None).await.is_ok();
        let keys_delivered =
            keys.is_empty() || self.call(self.inner.store.remove(&keys)).await.is_ok();
        if keys_delivered {
            self.forget_near(&keys);
        }
        if !tables_delivered && !keys_delivered {
            return false;
        }
        let mut pending = self.lock_undelivered();
        for (name, epoch) in &snapshot {
            let delivered = match self.is_custom_entry(name) {
                true => keys_delivered,
                false => tables_delivered,
            };
            // A failure recorded while this delivery ran may postdate it: keep that one.
            if delivered && pending.get(name) == Some(epoch) {
                pending.remove(name);
            }
        }
        self.inner
            .has_undelivered
            .store(!pending.is_empty(), Ordering::Release);
        pending.is_empty()
    }

    /// Records tables whose invalidation did not reach the store.
    pub(crate) fn mark_undelivered(&self, tables: &[String]) {
        self.undelivered_event(tables);
        self.record_undelivered(tables);
    }

    /// Records custom entries (their store keys) whose deletion did not reach the store: they
    /// are deleted with the next delivery, and not served by this process until then.
    pub(crate) fn mark_unremoved(&self, keys: &[String]) {
        if !keys.is_empty() {
            self.record_undelivered(keys);
        }
    }

    fn record_undelivered(&self, names: &[String]) {
        let epoch = self.inner.epochs.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.lock_undelivered();
        for name in names {
            pending.insert(name.clone(), epoch);
        }
        self.inner.has_undelivered.store(true, Ordering::Release);
        drop(pending);
        self.retry_in_background();
    }

    /// Keeps retrying the undelivered invalidations every `retry_after` until they are
    /// delivered, so that they do not wait for this cache's next call. The task holds the cache
    /// weakly: it ends when the cache is dropped (or the runtime shuts down).
    fn retry_in_background(&self) {
        if self.inner.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        // A synchronous call's own runtime runs only during its calls: the internal one then.
        let Some(runtime) = crate::sync::background_runtime() else {
            self.inner.retrying.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let pause = self.inner.retry_after.max(Duration::from_millis(10));
        runtime.spawn(async move {
            // If the task is dropped (its runtime shut down), let the next failure start another.
            let mut flag = RetryingFlag(Some(weak.clone()));
            loop {
                tokio::time::sleep(pause).await;
                let Some(inner) = weak.upgrade() else { return };
                let cache = Cache { inner };
                if cache.deliver_pending().await {
                    cache.inner.retrying.store(false, Ordering::Release);
                    // A failure recorded just now may have seen `retrying` still set.
                    if !cache.inner.has_undelivered.load(Ordering::Acquire)
                        || cache.inner.retrying.swap(true, Ordering::AcqRel)
                    {
                        // Either nothing is left, or another task owns the flag now.
                        flag.0 = None;
                        return;
                    }
                }
            }
        });
    }

    pub(super) fn is_undelivered(&self, tables: &[String]) -> bool {
        if !self.inner.has_undelivered.load(Ordering::Acquire) {
            return false;
        }
        let pending = self.lock_undelivered();
        tables.iter().any(|t| pending.contains_key(t))
    }

    /// True when `key` is a custom entry whose deletion has not reached the store yet.
    pub(super) fn is_unremoved(&self, key: &str) -> bool {
        self.inner.has_undelivered.load(Ordering::Acquire)
            && self.is_custom_entry(key)
            && self.lock_undelivered().contains_key(key)
    }

    /// Moves the generations of `tables`. `rows`, when known, are rows of the first table;
    /// `scopes`, when known, are the value generations of every scope value of those rows (see
    /// [`Cached::within`](crate::Cached::within)): then the first table's scoped queries of
    /// those values are invalidated, and not the others. Without them every scoped query of
    /// every table is (its scope generation moves).
    async fn bump_tables(
        &self,
        tables: &[String],
        rows: Option<&[RowName<'_>]>,
        scopes: Option<&[String]>,
        through: Option<&RowsThrough>,
    ) -> StoreResult<Invalidated> {
        let ns = &self.inner.namespace;
        let store = &self.inner.store;
        let mut invalidated = Vec::with_capacity(tables.len());
        let mut row_generations = Vec::new();
        let mut written_through = None;
        for (i, table) in tables.iter().enumerate() {
            // The rows, when known, are rows of the first (written) table; any other table
            // (`also_invalidates`, a pending delivery) has all of its rows evicted.
            let rows = if i == 0 { rows } else { None };
            // Scope values name rows of the first table only, and only with its rows.
            let scopes = if i == 0 { rows.and(scopes) } else { None };
            let mut keys = vec![key::query_generation(ns, table)];
            // Scope values unknown: every scoped query of the table is invalidated.
            if scopes.is_none() {
                keys.push(key::scope_generation(ns, table));
            }
            // Rows known: the table's entity generation stays, and is observed for
            // write-through; rows unknown: it moves, evicting every row of the table.
            let mut observe = Vec::new();
            match rows {
                Some(_) => observe.push(key::entity_generation(ns, table)),
                None => keys.push(key::entity_generation(ns, table)),
            }
            let values: Vec<u64> = keys.iter().map(|_| fresh_generation()).collect();
            let mut row_keys: Vec<String> = rows
                .unwrap_or_default()
                .iter()
                .map(|(table, primary_key)| key::row_generation(ns, table, primary_key))
                .collect();
            let named_rows = row_keys.len();
            // Value generations expire and are kept alive by the entries stored under them,
            // as a row's are: set with the rows' generations, in the same script.
            row_keys.extend(scopes.unwrap_or_default().iter().cloned());
            // Rows written through with the bump carry the generations it sets: drawn before
            // (the value generations after them are drawn here).
            let through = through.filter(|t| i == 0 && t.row_values.len() == named_rows);
            let row_values: Vec<u64> = match through {
                Some(through) => (through.row_values.iter().copied())
                    .chain(row_keys[named_rows..].iter().map(|_| fresh_generation()))
                    .collect(),
                None => row_keys.iter().map(|_| fresh_generation()).collect(),
            };
            let sequence = key::write_sequence(ns, table);
            let bump = TableBump {
                sequence: &sequence,
                keys: &keys,
                values: &values,
                row_keys: &row_keys,
                row_values: &row_values,
                rows_ttl: self.inner.generation_ttl,
                observe: &observe,
                write_through: through.map(|t| WriteThrough {
                    sequence: t.sequence,
                    guard: t.entity_generation,
                    keys: &t.keys,
                    values: &t.values,
                    ttl: t.ttl,
                }),
            };
            // One atomic script per table: its generations, its rows' generations and its
            // write sequence move together, which is what makes write-through safe.
            let bumped = self.call(store.bump_table(bump)).await;
            // Whatever the outcome, this process stops trusting what it knew of these keys:
            // read-your-writes, with no window, in the near tier.
            self.forget_near(&keys);
            self.forget_near(&row_keys);
            // And the next read of an entry under them expects a miss.
            self.inner.moves.moved(&keys);
            self.inner.moves.moved(&row_keys);
            let bumped = bumped?;
            if through.is_some() {
                written_through = bumped.as_ref().and_then(|b| b.written_through);
            }
            invalidated.push(TableInvalidated {
                sequence: bumped.as_ref().map(|b| b.sequence),
                query_generation: values[0],
                entity_generation: bumped.and_then(|b| b.observed.first().copied().flatten()),
            });
            if i == 0 {
                row_generations = row_values;
                row_generations.truncate(named_rows);
            }
        }
        Ok(Invalidated {
            tables: invalidated,
            row_generations,
            written_through,
        })
    }

    /// Invalidates after a committed write: every query of `tables`, and the entity entries of
    /// `rows` (or of every row of `tables` when the rows are unknown). Never fails: what cannot be
    /// delivered is remembered and retried, and blocks reads of those tables meanwhile.
    /// Returns what each table's bump set, when it was delivered.
    pub(crate) async fn invalidate_written(
        &self,
        tables: &[String],
        rows: Option<&[RowKey]>,
    ) -> Option<Invalidated> {
        self.invalidate_scoped(tables, rows, None, None).await
    }

    /// The value generations of the first of `tables` for the scope values `scopes` (column
    /// and value text), each once: what a write whose rows hold them moves.
    pub(crate) fn value_generation_keys(
        &self,
        table: &str,
        scopes: &[(&'static str, String)],
    ) -> Vec<String> {
        let mut keys: Vec<String> = scopes
            .iter()
            .map(|(column, value)| {
                key::value_generation(&self.inner.namespace, table, column, value)
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// [`invalidate_written`](Self::invalidate_written), with the value generations of every
    /// scope value of `rows` when they are known (see
    /// [`value_generation_keys`](Self::value_generation_keys)): then only the first table's
    /// scoped queries of those values are invalidated (see [`bump_tables`](Self::bump_tables)).
    /// `scopes` only for a write that cannot have moved a row out of a scope. `through`
    /// (entries of `rows`) is stored in the same step as the first table's bump where the store
    /// can ([`Invalidated::written_through`] says whether it did).
    pub(crate) async fn invalidate_scoped(
        &self,
        tables: &[String],
        rows: Option<&[RowKey]>,
        scopes: Option<&[String]>,
        through: Option<&RowsThrough>,
    ) -> Option<Invalidated> {
        let rows: Option<Vec<RowName<'_>>> = rows.map(|rows| {
            rows.iter()
                .map(|row| (row.table, row.primary_key.as_str()))
                .collect()
        });
        self.invalidate_named(tables, rows.as_deref(), scopes, through)
            .await
    }

    /// Invalidates every query of `table` (its SQL name, as for
    /// [`invalidate_table`](Self::invalidate_table)) and the entity entries of the rows whose
    /// primary keys, rendered as [`RowKey`] renders them, are `primary_keys`: the bumps of a
    /// memclone write whose rows are known, for the listener's row-level notifications.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) async fn invalidate_rows(&self, table: &str, primary_keys: &[String]) {
        let table = key::table_from_text(table);
        let rows: Vec<RowName<'_>> = primary_keys
            .iter()
            .map(|pk| (table.as_str(), pk.as_str()))
            .collect();
        // The notification names keys, not scope values: every scoped query of the table.
        self.invalidate_named(std::slice::from_ref(&table), Some(&rows), None, None)
            .await;
    }

    /// [`invalidate_written`](Self::invalidate_written), its rows named by table and key text.
    async fn invalidate_named(
        &self,
        tables: &[String],
        rows: Option<&[RowName<'_>]>,
        scopes: Option<&[String]>,
        through: Option<&RowsThrough>,
    ) -> Option<Invalidated> {
        let span = Cache::invalidate_span(tables, rows.map(<[RowName<'_>]>::len));
        if span.is_disabled() {
            return self
                .invalidate_tables(tables, rows, scopes, through, &span)
                .await;
        }
        let invalidation = self.invalidate_tables(tables, rows, scopes, through, &span);
        tracing::Instrument::instrument(invalidation, span.clone()).await
    }

    /// [`invalidate_written`](Self::invalidate_written), in its span.
    async fn invalidate_tables(
        &self,
        tables: &[String],
        rows: Option<&[RowName<'_>]>,
        scopes: Option<&[String]>,
        through: Option<&RowsThrough>,
        span: &tracing::Span,
    ) -> Option<Invalidated> {
        self.invalidation_event(tables);
        // If this future is dropped before the bump is done (a cancelled request), the guard
        // records the invalidation as undelivered, to be retried.
        let mut guard = Undelivered {
            cache: self,
            tables,
            delivered: false,
        };
        let bumped = self.bump_tables(tables, rows, scopes, through).await;
        span.record(
            "outcome",
            ["undelivered", "delivered"][usize::from(bumped.is_ok())],
        );
        let invalidated = bumped.ok()?;
        guard.delivered = true;
        self.deliver_pending().await;
        Some(invalidated)
    }

    /// Invalidates one row's entity entries (not the table's queries): for a reload, so that a
    /// fill that read the database before it cannot land over the reloaded row.
    pub(crate) async fn invalidate_row(&self, row: &RowKey) -> bool {
        let ns = &self.inner.namespace;
        let row_keys = [key::row_generation(ns, row.table, &row.primary_key)];
        let row_values = [fresh_generation()];
        let sequence = key::write_sequence(ns, row.table);
        let bump = TableBump {
            sequence: &sequence,
            keys: &[],
            values: &[],
            row_keys: &row_keys,
            row_values: &row_values,
            rows_ttl: self.inner.generation_ttl,
            observe: &[],
            write_through: None,
        };
        let bumped = self.call(self.inner.store.bump_table(bump)).await.is_ok();
        self.forget_near(&row_keys);
        self.inner.moves.moved(&row_keys);
        bumped
    }

    /// The table's write sequence before a write whose result may be cached, and its entity
    /// generation where the store can store the rows with the bump (in the same round trip),
    /// which the rows' entries then carry.
    pub(crate) async fn write_sequence_and_entity_generation(
        &self,
        table: &str,
    ) -> (Option<u64>, Option<u64>) {
        let ns = &self.inner.namespace;
        let sequence = key::write_sequence(ns, table);
        let generation = key::entity_generation(ns, table);
        let read = self
            .inner
            .store
            .write_sequence_and_generation(&sequence, &generation);
        self.call(read).await.unwrap_or((None, None))
    }
}

/// A written row: its table's name for the cache and its primary key as [`RowKey`] renders it.
type RowName<'a> = (&'a str, &'a str);

/// Clears the "retrying" flag when the background retry task ends or is dropped.
struct RetryingFlag(Option<std::sync::Weak<Inner>>);

impl Drop for RetryingFlag {
    fn drop(&mut self) {
        if let Some(inner) = self.0.as_ref().and_then(std::sync::Weak::upgrade) {
            inner.retrying.store(false, Ordering::Release);
        }
    }
}

/// A write between its statement and its invalidation: dropped before
/// [`done`](PendingWrite::done) (a cancelled future), it marks its tables undelivered.
pub(crate) struct PendingWrite {
    cache: Cache,
    tables: Vec<String>,
    /// The custom entries the write deletes (`uncache`), as store keys.
    keys: Vec<String>,
    armed: bool,
}

impl PendingWrite {
    pub(crate) fn new(cache: &Cache, tables: Vec<String>, uncache: &[String]) -> Self {
        Self {
            cache: cache.clone(),
            tables,
            keys: uncache.iter().map(|k| cache.custom_key(k)).collect(),
            armed: true,
        }
    }

    /// The invalidation ran (delivered, or recorded as undelivered by it).
    pub(crate) fn done(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if self.armed {
            self.cache.mark_undelivered(&self.tables);
            self.cache.mark_unremoved(&self.keys);
        }
    }
}

/// Marks its tables undelivered when dropped before its invalidation was delivered.
struct Undelivered<'a> {
    cache: &'a Cache,
    tables: &'a [String],
    delivered: bool,
}

impl Drop for Undelivered<'_> {
    fn drop(&mut self) {
        if !self.delivered {
            self.cache.mark_undelivered(self.tables);
        }
    }
}

/// What an invalidation set, for write-through.
pub(crate) struct Invalidated {
    /// One per written table.
    pub(crate) tables: Vec<TableInvalidated>,
    /// The new generation of each written row, in the order of the rows given.
    pub(crate) row_generations: Vec<u64>,
    /// Whether the store stored the [`RowsThrough`] entries with the bump (`None`: not tried).
    pub(crate) written_through: Option<bool>,
}

/// A write's returned rows, encoded for their entity entries, to store with its table's bump
/// (see [`WriteThrough`]).
pub(crate) struct RowsThrough {
    /// The table's write sequence the bump must reach: one more than before the write.
    pub(crate) sequence: u64,
    /// The table's entity generation read before the write, which the entries carry.
    pub(crate) entity_generation: u64,
    /// The generation the bump gives each row, which the entries carry: one per row.
    pub(crate) row_values: Vec<u64>,
    /// The entries' keys.
    pub(crate) keys: Vec<String>,
    /// Their encoded values.
    pub(crate) values: Vec<Vec<u8>>,
    /// How long they are kept.
    pub(crate) ttl: Duration,
}

/// What one table's invalidation set.
pub(crate) struct TableInvalidated {
    /// The table's write sequence after this bump, if the store keeps one.
    pub(crate) sequence: Option<u64>,
    /// The new generation of the table's queries.
    pub(crate) query_generation: u64,
    /// The table's entity generation, observed with the bump (when the rows were known).
    pub(crate) entity_generation: Option<u64>,
}

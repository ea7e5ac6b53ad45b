//! The hooks behind [`observe`](crate::observe): each outcome of a read or an invalidation is
//! counted in [`Stats`](crate::Stats), recorded on its span and, with the `metrics` feature,
//! emitted as a metric.

// Labels are passed as `&Cow`, not `&str`: a borrowed `'static` label (a literal, the usual
// case) is copied into spans and metric keys for free, an owned one is cloned.
#![allow(clippy::ptr_arg)]

use super::{Cache, Lookup};
use std::borrow::Cow;
use tracing::field::Empty;

/// The name of a cached read for spans and metrics: the query's label, or the table of an entity
/// read.
#[derive(Clone)]
pub(crate) struct ReadName {
    pub(super) label: Cow<'static, str>,
    entity: bool,
    pub(super) span: tracing::Span,
}

impl ReadName {
    /// A read by `.cached(label)`.
    pub(crate) fn query(label: &Cow<'static, str>) -> Self {
        ReadName {
            // A literal label (the usual case) is a borrowed `'static` str: free to copy.
            label: label.clone(),
            entity: false,
            span: tracing::Span::none(),
        }
    }

    /// An entity read (`find`, `reload`) of `table`.
    pub(crate) fn entity(table: &'static str) -> Self {
        ReadName {
            label: Cow::Borrowed(table),
            entity: true,
            span: tracing::Span::none(),
        }
    }
}

/// The outcome of a hit from a store whose [`tier_name`](crate::store::Store::tier_name) is
/// `tier`, for spans.
pub(super) fn store_hit_outcome(tier: &str) -> &'static str {
    match tier {
        "redis" => "hit_redis",
        "memory" => "hit_memory",
        _ => "hit_store",
    }
}

/// How a read ended, or something that happened on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadEvent {
    /// Answered by the near tier.
    NearHit,
    /// Answered by the store.
    StoreHit,
    /// Read from the database and stored.
    Miss,
    /// Read from the database without the store.
    Bypass,
    /// Answered by another caller's load in this process.
    Coalesced,
    /// An expired entry served while another caller refreshed it.
    Stale,
    /// An entry that did not decode.
    Corrupt,
    /// Answered by another process's load, after waiting for its lock.
    LockWait,
    /// A wait for a fill lock timed out.
    LockTimeout,
}

impl Cache {
    /// Counts `event` of the read `lookup` in [`Stats`](crate::Stats), the metrics (feature
    /// `metrics`) and the read's span.
    pub(crate) fn read_event(&self, lookup: &Lookup, event: ReadEvent) {
        let counters = &self.inner.stats;
        let outcome = match event {
            ReadEvent::NearHit => {
                counters.hits.add_one();
                "hit_near"
            }
            ReadEvent::StoreHit => {
                counters.hits.add_one();
                self.inner.store_hit
            }
            ReadEvent::Miss => {
                counters.misses.add_one();
                "miss"
            }
            ReadEvent::Bypass => {
                counters.bypasses.add_one();
                "bypass"
            }
            ReadEvent::Coalesced => {
                counters.coalesced.add_one();
                "coalesced"
            }
            ReadEvent::Stale => {
                counters.stale_served.add_one();
                "stale"
            }
            ReadEvent::Corrupt => {
                counters.corrupt_entries.add_one();
                "corrupt"
            }
            ReadEvent::LockWait => {
                counters.lock_waits.add_one();
                "lock_wait"
            }
            ReadEvent::LockTimeout => {
                counters.lock_timeouts.add_one();
                "lock_timeout"
            }
        };
        // A disabled span still looks its field up by name: skip it.
        if !lookup.name.span.is_disabled() {
            lookup.name.span.record("outcome", outcome);
        }
        #[cfg(feature = "metrics")]
        meters::read_event(self.inner.store_tier, &lookup.name.label, event);
    }

    /// Records the size of the entry a read found or stored on its span.
    pub(crate) fn read_bytes(&self, lookup: &Lookup, bytes: usize) {
        if !lookup.name.span.is_disabled() {
            lookup.name.span.record("bytes", bytes);
        }
    }

    /// The span of a cached read, kept in its lookup so that its outcome can be recorded on it.
    /// Disabled (and free) unless a subscriber listens at `DEBUG`.
    pub(crate) fn read_span(&self, lookup: &mut Lookup) -> tracing::Span {
        let name = &lookup.name;
        let span = tracing::debug_span!(
            target: "diesel_memclone",
            "memclone.read",
            label = &*name.label,
            entity = name.entity,
            tables = ?lookup.tables,
            outcome = Empty,
            bytes = Empty,
        );
        if !span.is_disabled() {
            lookup.name.span = span.clone();
        }
        span
    }

    /// The span of an invalidation after a write to `tables` (`rows` rows, when known).
    pub(crate) fn invalidate_span(tables: &[String], rows: Option<usize>) -> tracing::Span {
        tracing::debug_span!(
            target: "diesel_memclone",
            "memclone.invalidate",
            tables = ?tables,
            rows,
            outcome = Empty,
        )
    }

    /// Counts an invalidating write to `tables`.
    pub(crate) fn invalidation_event(&self, tables: &[String]) {
        self.inner.stats.invalidations.add_one();
        #[cfg(feature = "metrics")]
        meters::tables_event("memclone_invalidations_total", tables);
        #[cfg(not(feature = "metrics"))]
        let _ = tables;
    }

    /// Counts invalidations of `tables` that the store did not take.
    pub(crate) fn undelivered_event(&self, tables: &[String]) {
        #[cfg(feature = "metrics")]
        meters::tables_event("memclone_invalidations_undelivered_total", tables);
        #[cfg(not(feature = "metrics"))]
        let _ = tables;
    }
}

/// The metrics themselves (feature `metrics`).
#[cfg(feature = "metrics")]
pub(crate) mod meters {
    use super::ReadEvent;
    use crate::error::StoreError;
    use std::borrow::Cow;
    use std::future::Future;
    use std::time::{Duration, Instant};

    /// Whether a recorder is installed: the facade's own no-op recorder is the only zero-sized
    /// one in practice, and emitting to it would still build and hash every key.
    pub(crate) fn recording() -> bool {
        metrics::with_recorder(|recorder| std::mem::size_of_val(recorder) != 0)
    }

    fn label(label: &Cow<'static, str>) -> metrics::SharedString {
        match label {
            Cow::Borrowed(text) => metrics::SharedString::const_str(text),
            Cow::Owned(text) => metrics::SharedString::from_owned(text.clone()),
        }
    }

    pub(super) fn read_event(tier: &'static str, name: &Cow<'static, str>, event: ReadEvent) {
        if !recording() {
            return;
        }
        let label = label(name);
        match event {
            ReadEvent::NearHit => {
                metrics::counter!("memclone_hits_total", "tier" => "near", "label" => label)
                    .increment(1)
            }
            ReadEvent::StoreHit => {
                metrics::counter!("memclone_hits_total", "tier" => tier, "label" => label)
                    .increment(1)
            }
            ReadEvent::Miss => {
                metrics::counter!("memclone_misses_total", "label" => label).increment(1)
            }
            ReadEvent::Bypass => {
                metrics::counter!("memclone_bypasses_total", "label" => label).increment(1)
            }
            ReadEvent::Coalesced => {
                metrics::counter!("memclone_coalesced_total", "label" => label).increment(1)
            }
            ReadEvent::Stale => {
                metrics::counter!("memclone_stale_served_total", "label" => label).increment(1)
            }
            ReadEvent::Corrupt => {
                metrics::counter!("memclone_corrupt_entries_total", "label" => label).increment(1)
            }
            ReadEvent::LockWait => {
                metrics::counter!("memclone_lock_waits_total", "label" => label).increment(1)
            }
            ReadEvent::LockTimeout => {
                metrics::counter!("memclone_lock_timeouts_total", "label" => label).increment(1)
            }
        }
    }

    /// Counts one of `name` for each of `tables`.
    pub(super) fn tables_event(name: &'static str, tables: &[String]) {
        if !recording() {
            return;
        }
        for table in tables {
            let table = metrics::SharedString::from_owned(table.clone());
            metrics::counter!(name, "table" => table).increment(1);
        }
    }

    /// Times the database reads of a cached read (`fill`), when a recorder is installed.
    pub(crate) fn timed_fill<F, Fut>(
        name: &Cow<'static, str>,
        fill: F,
    ) -> impl FnOnce() -> TimedFill<Fut>
    where
        F: FnOnce() -> Fut,
        Fut: Future,
    {
        let name = name.clone();
        move || TimedFill {
            began: recording().then(Instant::now),
            name,
            fill: Box::pin(fill()),
        }
    }

    /// A fill, timed into `memclone_fill_seconds` when it ends.
    pub(crate) struct TimedFill<Fut> {
        began: Option<Instant>,
        name: Cow<'static, str>,
        fill: std::pin::Pin<Box<Fut>>,
    }

    impl<Fut: Future> Future for TimedFill<Fut> {
        type Output = Fut::Output;

        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Fut::Output> {
            let polled = self.fill.as_mut().poll(cx);
            if polled.is_ready() {
                if let Some(began) = self.began.take() {
                    let label = label(&self.name);
                    metrics::histogram!("memclone_fill_seconds", "label" => label)
                        .record(began.elapsed());
                }
            }
            polled
        }
    }

    /// When a store call began, if a recorder is installed.
    pub(crate) fn store_call_began() -> Option<Instant> {
        recording().then(Instant::now)
    }

    /// Times a store call that began at `began` and ended with `error` (none: it succeeded).
    pub(crate) fn store_call_ended(began: Option<Instant>, error: Option<&StoreError>) {
        let Some(began) = began else { return };
        let elapsed: Duration = began.elapsed();
        let outcome = match error {
            None => "ok",
            Some(StoreError::Timeout) => "timeout",
            Some(_) => "error",
        };
        metrics::histogram!("memclone_store_seconds", "outcome" => outcome).record(elapsed);
        if error.is_some() {
            metrics::counter!("memclone_store_errors_total").increment(1);
        }
    }
}

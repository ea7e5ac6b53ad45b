//! The store's health: every store call goes through [`Cache::call`], which bounds it with the
//! store timeout, remembers a failure so that calls skip the store for a while, and logs the
//! outage once (and the recovery once) instead of once per call.

use super::Cache;
use crate::error::StoreError;
use crate::store::StoreResult;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Remembers a store failure so that calls skip the store for a while, and logs the failure once
/// (and the recovery once) instead of once per call.
#[derive(Default)]
pub(super) struct Health {
    down_since: Mutex<Option<Instant>>,
    down: AtomicBool,
}

impl Health {
    fn skip(&self, retry_after: Duration) -> bool {
        if !self.down.load(Ordering::Relaxed) {
            return false;
        }
        let since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        since.is_some_and(|t| t.elapsed() < retry_after)
    }

    fn failed(&self, error: &StoreError) {
        let mut since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %error,
                "diesel-memclone: cache store failed; reads go to the database until it answers again"
            );
        }
        *since = Some(Instant::now());
    }

    /// Forgets the last failure's time, so that the next call tries the store at once.
    pub(super) fn retry_now(&self) {
        *self.down_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn succeeded(&self) {
        // Read first: a swap on every call would make every thread's store call write the
        // same cache line.
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("diesel-memclone: cache store answers again");
        }
    }
}

impl Cache {
    /// Runs one store operation under the timeout and the failure memory.
    pub(super) async fn call<T>(
        &self,
        operation: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let inner = &self.inner;
        if inner.health.skip(inner.retry_after) {
            return Err(StoreError::Unavailable);
        }
        #[cfg(feature = "metrics")]
        let began = super::observe::meters::store_call_began();
        let timed = match inner.store_is_thread_aware {
            true => tokio::time::timeout(inner.store_timeout, operation).await,
            false => {
                let operation = crate::sync::in_shared_runtime(operation);
                tokio::time::timeout(inner.store_timeout, operation).await
            }
        };
        let outcome = match timed {
            Ok(outcome) => outcome,
            Err(_) => {
                // The link may be stalled rather than broken: start afresh next time.
                inner.store.reset();
                Err(StoreError::Timeout)
            }
        };
        #[cfg(feature = "metrics")]
        super::observe::meters::store_call_ended(began, outcome.as_ref().err());
        match &outcome {
            Ok(_) => inner.health.succeeded(),
            Err(error) => {
                inner.stats.store_errors.add_one();
                // An error about one key is that key's miss, not a reason to skip the store.
                if error.is_outage() {
                    inner.health.failed(error);
                }
            }
        }
        outcome
    }
}

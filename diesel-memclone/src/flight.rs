//! Stampede protection: in-process single-flight, and the options of the distributed fill lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// What the distributed fill lock does when waiting for it times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnLockTimeout {
    /// Go to the database anyway (the default): availability over load shedding.
    #[default]
    Database,
    /// Fail the read with [`Error::LockTimeout`](crate::Error::LockTimeout).
    Error,
}

/// Options of the distributed fill lock: across processes, one caller per missed entry goes to
/// the database while the others wait for its result (`SET NX PX` with an owner token, freed by
/// a script that only the owner's token can satisfy).
///
/// ```
/// use diesel_memclone::{Cache, LockOptions, OnLockTimeout};
/// use std::time::Duration;
///
/// let cache = Cache::builder()
///     .lock(LockOptions::default()
///         .ttl(Duration::from_secs(5))
///         .wait_timeout(Duration::from_secs(2))
///         .retry_delay(Duration::from_millis(40))
///         .retry_jitter(Duration::from_millis(20))
///         .prefix("fill-lock")
///         .on_timeout(OnLockTimeout::Error))
///     .build()?;
/// # Ok::<(), diesel_memclone::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct LockOptions {
    /// How long a lock lives if its holder never frees it (a holder that died).
    pub ttl: Duration,
    /// How long a caller waits for another's fill before [`on_timeout`](LockOptions::on_timeout).
    pub wait_timeout: Duration,
    /// Pause between two looks at the entry while waiting.
    pub retry_delay: Duration,
    /// A random extra pause of up to this much, so that waiters do not poll in step.
    pub retry_jitter: Duration,
    /// The lock key's marker, after the entry key (which keeps the lock in the entry's slot).
    pub prefix: String,
    /// What a caller does when the wait times out.
    pub on_timeout: OnLockTimeout,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(2),
            retry_delay: Duration::from_millis(40),
            retry_jitter: Duration::from_millis(20),
            prefix: "lock".to_owned(),
            on_timeout: OnLockTimeout::Database,
        }
    }
}

impl LockOptions {
    /// See [`LockOptions::ttl`](LockOptions#structfield.ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
    /// See [`LockOptions::wait_timeout`](LockOptions#structfield.wait_timeout).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }
    /// See [`LockOptions::retry_delay`](LockOptions#structfield.retry_delay).
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }
    /// See [`LockOptions::retry_jitter`](LockOptions#structfield.retry_jitter).
    pub fn retry_jitter(mut self, jitter: Duration) -> Self {
        self.retry_jitter = jitter;
        self
    }
    /// See [`LockOptions::prefix`](LockOptions#structfield.prefix).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// See [`LockOptions::on_timeout`](LockOptions#structfield.on_timeout).
    pub fn on_timeout(mut self, choice: OnLockTimeout) -> Self {
        self.on_timeout = choice;
        self
    }
}

/// The state a leader publishes: `None` while running, then the encoded entry.
type Published = Option<Arc<[u8]>>;

/// In-process single-flight: concurrent callers of one key *and generations* share one load.
/// Keying by the generations means a caller that arrives after an invalidation never joins a
/// load that started before it.
///
/// Where the generations are unknown (the store is slow or down), [`Flights::join_after`] keeps
/// the same promise by time instead: a caller joins only a load that began after its own call
/// began, so the load sees every write the caller had seen commit.
#[derive(Default)]
pub(crate) struct Flights {
    /// Shared with the leaders, which may outlive the call that made them (a leader stays until
    /// its entry is in the store, see `Cache::store_entry`).
    running: Arc<Mutex<HashMap<String, Running>>>,
    /// Orders call starts and load starts (see [`Flights::ticket`]).
    tickets: AtomicU64,
}

/// A load in progress: its followers' channel, the ticket taken when it began, and the flight
/// itself (alive while its leader or a caller that fills for it holds it).
struct Running {
    receiver: watch::Receiver<Published>,
    began: u64,
    flight: Weak<Flight>,
}

pub(crate) enum Join {
    Lead(Leader),
    Follow(Follower),
}

/// One load's channel. It leaves the map of running loads when its last holder drops it: the
/// leader, or a caller that fills for the leader (see [`Follower::filler`]).
struct Flight {
    running: Arc<Mutex<HashMap<String, Running>>>,
    key: String,
    sender: watch::Sender<Published>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running
            .get(&self.key)
            .is_some_and(|load| load.receiver.same_channel(&self.sender.subscribe()))
        {
            running.remove(&self.key);
        }
    }
}

/// The caller that loads. Dropping it without [`publish`](Leader::publish) (an error, a
/// cancelled future) releases the followers, who then load for themselves, unless a caller
/// that fills for it still holds the flight. After `publish`, callers that join get the
/// published entry until it is dropped.
pub(crate) struct Leader(Arc<Flight>);

/// A caller that joined another caller's load.
pub(crate) struct Follower {
    pub(crate) receiver: watch::Receiver<Published>,
    flight: Weak<Flight>,
}

impl Follower {
    /// The right to publish into the load this caller joined, for a caller that fills the entry
    /// itself: one whose read took the fill lock that the leader then found taken. Without it
    /// the leader, and every follower of its, would sleep out the lock's retry delay before
    /// finding the entry in the store. `None` when the load is over.
    pub(crate) fn filler(&self) -> Option<Leader> {
        self.flight.upgrade().map(Leader)
    }
}

impl Flights {
    /// A ticket for the start of a call: tickets taken later compare greater, and what happened
    /// before one ticket was taken happened before any later ticket was taken.
    pub(crate) fn ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::SeqCst)
    }

    pub(crate) fn join(&self, key: String) -> Join {
        self.join_after(key, None)
    }

    /// Like [`join`](Flights::join), but with `since` (a [`ticket`](Flights::ticket) the caller
    /// took when its call began) follows only a load that began after it; an older load is
    /// replaced by this caller's own.
    pub(crate) fn join_after(&self, key: String, since: Option<u64>) -> Join {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(load) = running.get(&key) {
            let recent = since.is_none_or(|since| load.began > since);
            // A flight that is gone leaves a closed channel: take over.
            if recent && load.receiver.has_changed().is_ok() {
                return Join::Follow(Follower {
                    receiver: load.receiver.clone(),
                    flight: load.flight.clone(),
                });
            }
        }
        let (sender, receiver) = watch::channel(None);
        let began = self.ticket();
        let flight = Arc::new(Flight {
            running: self.running.clone(),
            key: key.clone(),
            sender,
        });
        let weak = Arc::downgrade(&flight);
        running.insert(
            key,
            Running {
                receiver,
                began,
                flight: weak,
            },
        );
        Join::Lead(Leader(flight))
    }
}

impl Leader {
    pub(crate) fn publish(&self, entry: Arc<[u8]>) {
        let _ = self.0.sender.send(Some(entry));
    }

    /// What is published into this load from now on (by a caller that fills for it).
    pub(crate) fn published(&self) -> watch::Receiver<Published> {
        self.0.sender.subscribe()
    }
}

/// Waits for the leader's entry; `None` when the leader gave up.
pub(crate) async fn follow(mut receiver: watch::Receiver<Published>) -> Option<Arc<[u8]>> {
    loop {
        if let Some(entry) = receiver.borrow_and_update().clone() {
            return Some(entry);
        }
        receiver.changed().await.ok()?;
    }
}

/// A pseudo-random duration in `[0, max]`, for jitter.
pub(crate) fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let bound = u64::try_from(max.as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
        .max(1);
    let nanos = crate::store::fresh_generation() % bound;
    Duration::from_nanos(nanos)
}

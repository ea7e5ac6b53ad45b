//! The read path: a read is answered from a fresh entry, or else from the database and stored
//! tagged with the generations read *before* the database read; misses are shared within a
//! process (single-flight) and across processes (the fill lock). Also the entries a write
//! stores through.

use super::moves::Seen;
use super::observe::ReadEvent;
use super::{Cache, Lookup, Policy};
use crate::codec::{self, Reject};
use crate::error::{Error, Result};
use crate::flight::{self, Join, Leader, LockOptions, OnLockTimeout};
use crate::key;
use crate::model::RowKey;
use crate::near::{Known, Near};
use crate::store::{LockProbe, PutEntry, ReadLock, ReadProbe};
use futures_util::future::{BoxFuture, FutureExt};
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Cache {
    /// Answers a read from the store when a fresh entry exists, otherwise from `fill`, and
    /// stores the result tagged with the generations read *before* `fill` ran.
    pub(crate) async fn read_through<T, E, F, Fut>(&self, mut lookup: Lookup, fill: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        Error: From<E>,
    {
        // A subscriber listens: the read runs again inside its span (boxed, so that the read
        // without one, the common case, carries no layer of its own: that cost 1-2% of a hit).
        if lookup.name.span.is_disabled() {
            let span = self.read_span(&mut lookup);
            if !span.is_disabled() {
                let read = Box::pin(self.read_through(lookup, fill));
                return tracing::Instrument::instrument(read, span).await;
            }
        }
        #[cfg(feature = "metrics")]
        let fill = super::observe::meters::timed_fill(&lookup.name.label, fill);
        // Taken before anything else: a database read shared when the store fails must begin
        // after this call did (see `database_read`).
        let began = self.inner.flights.ticket();
        let blocked = !self.deliver_pending().await
            && (self.is_undelivered(&lookup.tables) || self.is_unremoved(self.key_text(&lookup)));
        if lookup.policy == Policy::Bypass {
            self.read_event(&lookup, ReadEvent::Bypass);
            return Ok(fill().await?);
        }
        if blocked {
            return self.database_read(&lookup, began, fill).await;
        }
        // The tier names the lookup's generations one by one: with names that do not match
        // them it would learn one generation's value under another's name. Never built so,
        // and then read without the tier.
        let named = lookup.near_generations.len() == lookup.generations.len();
        debug_assert!(named || self.inner.near.is_none(), "near names out of step");
        let near = self.near().filter(|_| named);
        let mut tags = None;
        let mut stale = None;
        let mut lock = Lock::Unknown;
        if lookup.policy != Policy::Refresh {
            let mut read = None;
            if let Some(near) = near.filter(|near| near.in_sync()) {
                if let Some(current) = near.generations(&lookup.near_generations) {
                    read = Some(self.near_read::<T>(near, &lookup, current).await);
                }
            }
            let read = match read {
                Some(read) => read,
                None => self.store_read::<T>(near, &lookup, true).await,
            };
            match read {
                StoreRead::Hit(value) => return Ok(value),
                StoreRead::Failed => return self.database_read(&lookup, began, fill).await,
                StoreRead::Miss(current, expired, held) => {
                    tags = current;
                    stale = expired;
                    lock = held;
                }
            }
        }
        if lookup.policy == Policy::ReadOnly {
            self.read_event(&lookup, ReadEvent::Bypass);
            return Ok(fill().await?);
        }
        let tags = match tags {
            Some(tags) => tags,
            None => {
                let store = &self.inner.store;
                let stamps = near.map(|near| near.stamps(&lookup.near_generations));
                let ensured = store.ensure_generations(&lookup.generations, lookup.generation_ttl);
                match self.call(ensured).await {
                    Ok(tags) => {
                        if let (Some(near), Some(stamps)) = (near, stamps) {
                            near.learn_all(&lookup.near_generations, &tags, &stamps);
                        }
                        tags
                    }
                    Err(_) => return self.database_read(&lookup, began, fill).await,
                }
            }
        };
        if let Some(stale) = stale {
            // (A read that found a stale value took no lock: the value holds its generations.)
            drop(lock);
            return self.revalidate(lookup, tags, stale, fill).await;
        }
        self.fill_once(lookup, tags, fill, lock).await
    }

    /// The store's fresh entry for `lookup`, counted as a hit, else `None` (nothing counted),
    /// having taken nothing: no fill lock, no place in this process's load of the entry. For a
    /// read that checks its database connection out of a pool only on a miss (`*_from`): it
    /// takes the connection before `read_through`, so that it never holds the load (or the
    /// lock) other callers wait on while it waits for a connection one of them may hold.
    pub(crate) async fn store_hit<T: DeserializeOwned>(&self, lookup: &Lookup) -> Option<T> {
        if lookup.policy != Policy::ReadWrite {
            return None;
        }
        let blocked = !self.deliver_pending().await
            && (self.is_undelivered(&lookup.tables) || self.is_unremoved(self.key_text(lookup)));
        if blocked {
            return None;
        }
        let named = lookup.near_generations.len() == lookup.generations.len();
        let near = self.near().filter(|_| named);
        // As `read_through` reads: generations known here, the near entry or else the entry's
        // `GET` alone; otherwise the entry and its generations (never the lock).
        let known = near
            .filter(|near| near.in_sync())
            .and_then(|near| Some((near, near.generations(&lookup.near_generations)?)));
        let read = match known {
            Some((near, current)) => self.near_read::<T>(near, lookup, current).await,
            None => self.store_read::<T>(near, lookup, false).await,
        };
        match read {
            StoreRead::Hit(value) => Some(value),
            _ => None,
        }
    }

    /// The near tier's fresh entry for `lookup` under the `current` generations, counted as a
    /// hit; `None` (not counted) otherwise.
    fn near_entry_hit<T: DeserializeOwned>(
        &self,
        near: &Near,
        lookup: &Lookup,
        current: &[u64],
    ) -> Option<T> {
        let bytes = near.entry(lookup.near_key)?;
        let (value, fresh_until) = codec::decode_checked::<T>(&bytes, current).ok()?;
        if codec::now_millis() >= fresh_until {
            return None;
        }
        near.count_hit();
        self.read_event(lookup, ReadEvent::NearHit);
        self.read_bytes(lookup, bytes.len());
        Some(value)
    }

    /// A near hit answered at once, without a runtime: what `read_through` would answer from
    /// the near tier without waiting for anything, else `None` (nothing counted) and the caller
    /// goes on with `read_through`. For synchronous calls, whose runtime costs more than the
    /// lookup itself.
    pub(crate) fn near_hit_now<T: DeserializeOwned>(&self, lookup: &Lookup) -> Option<T> {
        // As `read_through`: a pending invalidation or a policy that does not read first goes
        // the long way.
        // Inside another synchronous call's fill every call is refused, hit or not.
        if !matches!(lookup.policy, Policy::ReadWrite | Policy::ReadOnly)
            || self
                .inner
                .has_undelivered
                .load(std::sync::atomic::Ordering::Acquire)
            || crate::sync::driving()
        {
            return None;
        }
        // Not `near()`: its change stream is started by the first call inside a runtime.
        let near = self.inner.near.as_deref().filter(|near| near.in_sync())?;
        if lookup.near_generations.len() != lookup.generations.len() {
            return None;
        }
        let current = near.generations(&lookup.near_generations)?;
        self.near_entry_hit(near, lookup, &current)
    }

    /// A read whose generations the near tier knows: its entry from the tier, or else the
    /// entry alone from the store (one `GET`), validated against those generations.
    async fn near_read<T: DeserializeOwned>(
        &self,
        near: &Near,
        lookup: &Lookup,
        current: Known,
    ) -> StoreRead<T> {
        if let Some(value) = self.near_entry_hit(near, lookup, &current) {
            return StoreRead::Hit(value);
        }
        let current = current.into_vec();
        near.count_miss();
        let stamp = near.stamp(lookup.near_key);
        // The entry's GET alone. (Taking the fill lock in the same round trip, with a script
        // that locks unless the entry holds these generations, made this Redis hit 2x the
        // floor of one GET: the script runs on every hit; see `examples/misspath.rs`.)
        let Ok(fetched) = self
            .call(self.inner.store.fetch(self.key_text(lookup), &[]))
            .await
        else {
            return StoreRead::Failed;
        };
        let expired = match fetched.entry {
            Some(bytes) => self.judge::<T>(Some(near), lookup, bytes, &current, stamp),
            None => None,
        };
        match expired {
            Some(Judged::Fresh(value)) => StoreRead::Hit(value),
            Some(Judged::Expired(value)) => {
                StoreRead::Miss(Some(current), Some(value), Lock::Unknown)
            }
            None => StoreRead::Miss(Some(current), None, Lock::Unknown),
        }
    }

    /// A read of the entry and its generations from the store, in one round trip; what it
    /// learns of the generations goes to the near tier, if any. Where a miss is likely (see
    /// [`Cache::expects_miss`]) the same round trip also takes the fill lock, if the entry
    /// does not hold the generations read.
    async fn store_read<T: DeserializeOwned>(
        &self,
        near: Option<&Near>,
        lookup: &Lookup,
        may_lock: bool,
    ) -> StoreRead<T> {
        let expects = self.expects_miss(near, lookup).filter(|_| may_lock);
        if let Some((true, seen)) = expects {
            let read = self.read_or_lock(near, lookup).await;
            self.inner.moves.settle(seen);
            return read;
        }
        let stamps = near.map(|near| {
            (
                near.stamps(&lookup.near_generations),
                near.stamp(lookup.near_key),
            )
        });
        let store = &self.inner.store;
        let fetched = self
            .call(store.fetch(self.key_text(lookup), &lookup.generations))
            .await;
        if let Some((_, seen)) = expects {
            self.inner.moves.settle(seen);
        }
        let Ok(fetched) = fetched else {
            return StoreRead::Failed;
        };
        let current: Option<Vec<u64>> = fetched.generations.iter().copied().collect();
        let mut entry_stamp = 0;
        if let (Some(near), Some((stamps, stamp))) = (near, stamps) {
            near.learn_some(&lookup.near_generations, &fetched.generations, &stamps);
            entry_stamp = stamp;
        }
        if let (Some(bytes), Some(current)) = (fetched.entry, &current) {
            match self.judge::<T>(near, lookup, bytes, current, entry_stamp) {
                Some(Judged::Fresh(value)) => return StoreRead::Hit(value),
                Some(Judged::Expired(value)) => {
                    return StoreRead::Miss(Some(current.clone()), Some(value), Lock::Unknown)
                }
                None => {}
            }
        }
        StoreRead::Miss(current, None, Lock::Unknown)
    }

    /// Whether a read whose generations this process does not know should take the fill lock
    /// with its read, with what to settle once it is done (`None`: it never does; see
    /// [`Store::read_or_lock`](crate::store::Store::read_or_lock)). Only where the store does
    /// it in the round trip of a plain fetch, for a read that fills (and may lock), and only
    /// where a miss is likely, since the script that does it costs a hit more than a fetch
    /// (`examples/misspath.rs`, `examples/hitpath.rs`): with a near tier that follows
    /// changes, always (the tier dropped these generations: they moved lately, or this process
    /// never read them); otherwise when this process moved one of them since it last read the
    /// entry (see `moves.rs`). A write by another process is not seen without a near tier: that
    /// miss takes two round trips, as on a cluster.
    fn expects_miss(&self, near: Option<&Near>, lookup: &Lookup) -> Option<(bool, Seen)> {
        if !self.inner.locks_on_read
            || lookup.policy != Policy::ReadWrite
            || self.inner.lock.is_none()
            || lookup.generations.len() > 255
        {
            return None;
        }
        let (moved, seen) = self
            .inner
            .moves
            .expects_miss(self.key_text(lookup), &lookup.generations);
        Some((moved || near.is_some_and(Near::in_sync), seen))
    }

    /// [`store_read`](Cache::store_read) that also takes the fill lock unless the entry holds
    /// the generations read, in one round trip ([`Store::read_or_lock`]; missing generations
    /// are created in it too).
    ///
    /// [`Store::read_or_lock`]: crate::store::Store::read_or_lock
    async fn read_or_lock<T: DeserializeOwned>(
        &self,
        near: Option<&Near>,
        lookup: &Lookup,
    ) -> StoreRead<T> {
        let Some(options) = &self.inner.lock else {
            return StoreRead::Failed;
        };
        let stamps = near.map(|near| {
            (
                near.stamps(&lookup.near_generations),
                near.stamp(lookup.near_key),
            )
        });
        let fresh: Vec<u64> = lookup
            .generations
            .iter()
            .map(|_| crate::store::fresh_generation())
            .collect();
        let prefix = lock_prefix(self.key_text(lookup), options);
        let owner = crate::store::fresh_generation();
        let probe = ReadProbe::new(
            self.key_text(lookup),
            &lookup.generations,
            &fresh,
            lookup.generation_ttl,
            codec::TAG_AT,
            &prefix,
            owner,
            options.ttl,
        );
        let Ok(read) = self.call(self.inner.store.read_or_lock(probe)).await else {
            return StoreRead::Failed;
        };
        let current = read.generations;
        let mut entry_stamp = 0;
        if let (Some(near), Some((stamps, stamp))) = (near, stamps) {
            near.learn_all(&lookup.near_generations, &current, &stamps);
            entry_stamp = stamp;
        }
        let lock = match read.lock {
            ReadLock::Taken => Lock::Held(HeldLock::new(self, probe.lock_key(&current), owner)),
            ReadLock::Busy => Lock::Busy,
            _ => Lock::Unknown,
        };
        if let Some(bytes) = read.entry {
            match self.judge::<T>(near, lookup, bytes, &current, entry_stamp) {
                Some(Judged::Fresh(value)) => return StoreRead::Hit(value),
                Some(Judged::Expired(value)) => {
                    return StoreRead::Miss(Some(current), Some(value), lock)
                }
                None => {}
            }
        }
        StoreRead::Miss(Some(current), None, lock)
    }

    /// Decodes an entry read from the store under `current` generations: fresh (counted as a
    /// hit, and kept in the near tier), expired but in the stale-while-revalidate window, or
    /// unusable (`None`; counted when corrupt).
    fn judge<T: DeserializeOwned>(
        &self,
        near: Option<&Near>,
        lookup: &Lookup,
        bytes: Vec<u8>,
        current: &[u64],
        stamp: u64,
    ) -> Option<Judged<T>> {
        match codec::decode::<T>(&bytes, current) {
            Ok((value, fresh_until)) if codec::now_millis() < fresh_until => {
                self.read_event(lookup, ReadEvent::StoreHit);
                self.read_bytes(lookup, bytes.len());
                if let Some(near) = near {
                    near.keep(lookup.near_key, bytes.into(), fresh_until, stamp);
                }
                Some(Judged::Fresh(value))
            }
            // Expired, but physically kept for the stale-while-revalidate window.
            Ok((value, _)) if !self.inner.stale_while_revalidate.is_zero() => {
                Some(Judged::Expired(value))
            }
            Ok(_) => None,
            Err(Reject::Corrupt) => {
                self.read_event(lookup, ReadEvent::Corrupt);
                None
            }
            Err(Reject::Outdated) => None,
        }
    }

    /// A read the store cannot serve (it failed, timed out, or misses an invalidation): from the
    /// database, and not stored. Callers of one entry in this process share one such read, as
    /// long as it began after their own call began (`began`, a ticket): the generations cannot
    /// be compared without the store, but a read that began later sees every write they saw.
    async fn database_read<T, E, F, Fut>(&self, lookup: &Lookup, began: u64, fill: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        Error: From<E>,
    {
        // Only a plain read may share: a read in a transaction must see that transaction.
        if lookup.policy != Policy::ReadWrite || !self.inner.single_flight {
            self.read_event(lookup, ReadEvent::Bypass);
            return Ok(fill().await?);
        }
        let key = format!("{}#database", self.key_text(lookup));
        let leader = match self.inner.flights.join_after(key, Some(began)) {
            Join::Lead(leader) => Some(leader),
            Join::Follow(follower) => {
                let followed =
                    tokio::time::timeout(self.patience(), flight::follow(follower.receiver));
                if let Ok(Some(entry)) = followed.await {
                    if let Ok((value, _)) = codec::decode::<T>(&entry, &[]) {
                        self.read_event(lookup, ReadEvent::Coalesced);
                        return Ok(value);
                    }
                }
                // The leader gave up (an error, a cancelled call): read for ourselves.
                None
            }
        };
        self.read_event(lookup, ReadEvent::Bypass);
        let value = fill().await?;
        if let Some(leader) = leader {
            if let Some(bytes) = codec::encode(&[], u64::MAX, &value) {
                leader.publish(bytes.into());
            }
        }
        Ok(value)
    }

    /// How long a single-flight follower waits for its leader: a leader that is alive but never
    /// polled must not hold it for ever.
    fn patience(&self) -> Duration {
        self.inner
            .lock
            .as_ref()
            .map_or(Duration::from_secs(30), |l| l.wait_timeout.max(l.ttl))
    }

    /// Stale-while-revalidate: one caller refreshes, the others get the expired value.
    async fn revalidate<T, E, F, Fut>(
        &self,
        lookup: Lookup,
        tags: Vec<u64>,
        stale: T,
        fill: F,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        Error: From<E>,
    {
        let key = format!("{}:swr:{}", self.key_text(&lookup), tags_hex(&tags));
        let owner = crate::store::fresh_generation();
        let lock_ttl = self
            .inner
            .lock
            .as_ref()
            .map_or(Duration::from_secs(5), |l| l.ttl);
        match self
            .call(self.inner.store.try_lock(&key, owner, lock_ttl))
            .await
        {
            Ok(true) => {
                let value = fill().await;
                match &value {
                    Ok(value) => {
                        self.read_event(&lookup, ReadEvent::Miss);
                        let unlock = Some((key.clone(), owner));
                        let write = self.store_entry(&lookup, &tags, value, unlock, None);
                        match self.writes_behind(&lookup) {
                            true => in_background(write),
                            false => write.await,
                        }
                    }
                    Err(_) => {
                        let _ = self.call(self.inner.store.unlock(&key, owner)).await;
                    }
                }
                Ok(value?)
            }
            _ => {
                self.read_event(&lookup, ReadEvent::Stale);
                Ok(stale)
            }
        }
    }

    /// Whether a miss's entry write may finish after the read returns. Not on a reload (which
    /// returns once it is stored); not under a custom key (`.key(..)`), which `uncache` deletes
    /// without moving a generation: a write still in flight would land after the delete, and
    /// the open single-flight would hand the old value to the next read; nor on a synchronous
    /// caller's own runtime: that thread reads on a connection of its own, so its next read
    /// could overtake the write on the shared one and find the entry missing (or this
    /// process's lock held); nor on a current-thread runtime, which may not run again once the
    /// caller's `block_on` returns (a runtime kept for per-call `block_on`s is common), leaving
    /// the entry unwritten and its fill lock held until its TTL. There the write costs the
    /// caller its round trip, as before.
    fn writes_behind(&self, lookup: &Lookup) -> bool {
        let custom_key = self
            .key_text(lookup)
            .strip_prefix(self.inner.namespace.as_str())
            .is_some_and(|rest| rest.starts_with(":{k:"));
        let runs_on = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        lookup.policy != Policy::Refresh
            && !custom_key
            && !crate::sync::on_own_runtime()
            && runs_on.is_ok_and(|flavor| flavor == tokio::runtime::RuntimeFlavor::MultiThread)
    }

    /// A miss: one load per entry and generations, shared by the callers of this process
    /// (single-flight) and, with the lock, of every process. `lock`: the fill lock as the read
    /// left it.
    async fn fill_once<T, E, F, Fut>(
        &self,
        lookup: Lookup,
        tags: Vec<u64>,
        fill: F,
        lock: Lock,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        Error: From<E>,
    {
        let coordinated = lookup.policy == Policy::ReadWrite;
        let busy = matches!(lock, Lock::Busy);
        let mut held_lock = match lock {
            Lock::Held(held) => Some(held),
            _ => None,
        };
        let mut leader = None;
        if coordinated && self.inner.single_flight {
            match self
                .inner
                .flights
                .join(format!("{}#{}", self.key_text(&lookup), tags_hex(&tags)))
            {
                Join::Lead(lead) => leader = Some(lead),
                // This call's read took the fill lock, which the leader of this process then
                // waits for: this call fills, and publishes its entry into the leader's load,
                // which the leader and its followers wait on beside the lock.
                Join::Follow(follower) if held_lock.is_some() => leader = follower.filler(),
                Join::Follow(follower) => {
                    let followed =
                        tokio::time::timeout(self.patience(), flight::follow(follower.receiver));
                    if let Ok(Some(entry)) = followed.await {
                        // A leader whose store write never lands (its runtime no longer
                        // driven) keeps its flight open: its value is shared only while fresh.
                        if let Ok((value, fresh_until)) = codec::decode::<T>(&entry, &tags) {
                            if codec::now_millis() < fresh_until {
                                self.read_event(&lookup, ReadEvent::Coalesced);
                                return Ok(value);
                            }
                        }
                    }
                    // The leader gave up (an error, a cancelled call, an entry past its
                    // freshness): load for ourselves.
                }
            }
        }
        if let (true, Some(lock), None) = (coordinated, &self.inner.lock, &held_lock) {
            // Busy: the read just found another caller's lock; look again after a pause.
            let waited = self.wait_for_lock::<T>(&lookup, &tags, lock, !busy, leader.as_ref());
            match waited.await? {
                LockWait::Held(held) => held_lock = Some(held),
                LockWait::FilledByOther(value, entry) => {
                    if let Some(leader) = leader {
                        leader.publish(entry);
                    }
                    return Ok(value);
                }
                LockWait::GoAhead => {}
            }
        }
        let value = fill().await;
        match &value {
            Ok(value) => {
                match lookup.policy {
                    Policy::Refresh => self.read_event(&lookup, ReadEvent::Bypass),
                    _ => self.read_event(&lookup, ReadEvent::Miss),
                }
                // The entry is stored and the lock freed in one round trip, which the caller
                // does not wait for, except where `writes_behind` says otherwise.
                let unlock = held_lock.map(HeldLock::hand_on);
                let write = self.store_entry(&lookup, &tags, value, unlock, leader);
                match self.writes_behind(&lookup) {
                    true => in_background(write),
                    false => write.await,
                }
            }
            Err(_) => {
                if let Some(held) = held_lock {
                    let (key, owner) = held.hand_on();
                    let _ = self.call(self.inner.store.unlock(&key, owner)).await;
                }
            }
        }
        Ok(value?)
    }

    /// Takes the entry's fill lock, or waits until its holder has filled the entry; with
    /// `probe_first` false, begins with the pause (the caller just found the lock held). A
    /// caller that leads this process's load (`flight`) also ends its pause as soon as the
    /// lock's holder, if it is a caller of this process, publishes its entry into that load.
    async fn wait_for_lock<T: DeserializeOwned>(
        &self,
        lookup: &Lookup,
        tags: &[u64],
        lock: &LockOptions,
        mut probe_first: bool,
        flight: Option<&Leader>,
    ) -> Result<LockWait<T>> {
        let store = &self.inner.store;
        let key = crate::store::lock_key(&lock_prefix(self.key_text(lookup), lock), tags);
        let owner = crate::store::fresh_generation();
        let tag = codec::tag(tags);
        let mut published = flight.map(Leader::published);
        // An entry published before this caller began to wait.
        if let Some(entry) = published.as_ref().and_then(|p| p.borrow().clone()) {
            if let Ok((value, _)) = codec::decode::<T>(&entry, tags) {
                self.read_event(lookup, ReadEvent::LockWait);
                return Ok(LockWait::FilledByOther(value, entry));
            }
        }
        let now = Instant::now();
        let deadline = now
            .checked_add(lock.wait_timeout)
            .unwrap_or(now + Duration::from_secs(86_400));
        loop {
            // The lock, unless the entry was filled under `tags` in the meantime (the previous
            // holder may have filled it and left between our read and now): one round trip.
            let probe = LockProbe::new(
                self.key_text(lookup),
                &tag,
                codec::TAG_AT,
                &key,
                owner,
                lock.ttl,
            );
            let probed = match probe_first {
                true => Some(self.call(store.fetch_or_lock(probe)).await),
                false => None,
            };
            probe_first = true;
            match probed {
                Some(Ok(probed)) if probed.locked => {
                    return Ok(LockWait::Held(HeldLock::new(self, key, owner)))
                }
                Some(Ok(probed)) => {
                    let entry = probed.entry.filter(|bytes| probe.matches(bytes));
                    if let Some(entry) = entry {
                        if let Ok((value, _)) = codec::decode::<T>(&entry, tags) {
                            self.read_event(lookup, ReadEvent::LockWait);
                            return Ok(LockWait::FilledByOther(value, entry.into()));
                        }
                    }
                }
                // The store is in trouble: the database answers.
                Some(Err(_)) => return Ok(LockWait::GoAhead),
                None => {}
            }
            if Instant::now() >= deadline {
                self.read_event(lookup, ReadEvent::LockTimeout);
                return match lock.on_timeout {
                    OnLockTimeout::Database => Ok(LockWait::GoAhead),
                    OnLockTimeout::Error => Err(Error::LockTimeout),
                };
            }
            let pause = lock.retry_delay + flight::jitter(lock.retry_jitter);
            // The pause ends early when an entry is published into this caller's load; each
            // entry is looked at once (a receiver marks what it has seen), so that one that
            // does not decode cannot end every pause at once.
            let waited = match published.as_mut() {
                Some(published) => {
                    match tokio::time::timeout(pause, published.changed()).await {
                        Ok(Ok(())) => published.borrow_and_update().clone(),
                        Ok(Err(_)) => {
                            // (Not while this caller holds the load; sleep, to be safe.)
                            tokio::time::sleep(pause).await;
                            None
                        }
                        Err(_) => None,
                    }
                }
                None => {
                    tokio::time::sleep(pause).await;
                    None
                }
            };
            if let Some(entry) = waited {
                if let Ok((value, _)) = codec::decode::<T>(&entry, tags) {
                    self.read_event(lookup, ReadEvent::LockWait);
                    return Ok(LockWait::FilledByOther(value, entry));
                }
            }
            if let Some(filled) = self.filled_entry::<T>(lookup, tags).await {
                return Ok(filled);
            }
        }
    }

    /// Looks for the entry another caller filled under `tags`. `GoAhead` when the generations
    /// moved (an invalidation: waiting for that load is pointless) or the store failed.
    async fn filled_entry<T: DeserializeOwned>(
        &self,
        lookup: &Lookup,
        tags: &[u64],
    ) -> Option<LockWait<T>> {
        let fetch = self
            .inner
            .store
            .fetch(self.key_text(lookup), &lookup.generations);
        let Ok(fetched) = self.call(fetch).await else {
            return Some(LockWait::GoAhead);
        };
        let current: Option<Vec<u64>> = fetched.generations.iter().copied().collect();
        if current.as_deref() != Some(tags) {
            return Some(LockWait::GoAhead);
        }
        let entry = fetched.entry?;
        let (value, _) = codec::decode::<T>(&entry, tags).ok()?;
        self.read_event(lookup, ReadEvent::LockWait);
        Some(LockWait::FilledByOther(value, entry.into()))
    }

    /// Encodes an entry, hands it to `leader`'s followers, then stores it and frees `unlock` (a
    /// lock key and its owner) in one round trip, off the caller's path: the caller gets its
    /// value as soon as the database answered. Until the store has answered, callers of this
    /// process that miss the entry get it from the flight (`leader` is held until then), and
    /// other processes wait on the lock, which the store write frees. A failed write only costs
    /// a later miss (the lock expires); it cannot make a read stale: the entry carries the
    /// generations read before the database read, and an invalidation that lands first moved
    /// them. Returns the write, for [`in_background`] (or to await, for a reload).
    fn store_entry<T: Serialize + DeserializeOwned>(
        &self,
        lookup: &Lookup,
        tags: &[u64],
        value: &T,
        unlock: Option<(String, u64)>,
        leader: Option<Leader>,
    ) -> BoxFuture<'static, ()> {
        let ttl = self.jittered(lookup.ttl);
        let fresh_until = codec::now_millis().saturating_add(ttl.as_millis() as u64);
        let cache = self.clone();
        let Some(bytes) = codec::encode(tags, fresh_until, value) else {
            // The followers load for themselves (`leader` dropped unpublished).
            drop(leader);
            return async move {
                if let Some((key, owner)) = unlock {
                    let _ = cache.call(cache.inner.store.unlock(&key, owner)).await;
                }
            }
            .boxed();
        };
        let entry: Arc<[u8]> = bytes.as_slice().into();
        self.read_bytes(lookup, entry.len());
        if let Some(leader) = &leader {
            leader.publish(entry.clone());
        }
        let kept_for = ttl.saturating_add(self.inner.stale_while_revalidate);
        let key = self.key_text(lookup).to_owned();
        // Generations that expire (a row's) are kept alive as long as the entry.
        let generations = lookup.generation_ttl.map(|_| lookup.generations.clone());
        // Kept in the near tier at once, for this process's next reads: like the store's copy,
        // it is served only under the generations it carries, which an invalidation moves.
        if let Some(near) = self.inner.near.as_deref() {
            let stamp = near.stamp(lookup.near_key);
            near.keep(lookup.near_key, entry.clone(), fresh_until, stamp);
        }
        let storing = async move {
            let store = &cache.inner.store;
            let put = match (generations.as_deref(), &unlock) {
                (Some(generations), None) => {
                    store.put_with_generations(&key, bytes, kept_for, generations)
                }
                (None, None) => store.put(&key, bytes, kept_for),
                (generations, Some((lock, owner))) => {
                    let generations = generations.unwrap_or(&[]);
                    let put = PutEntry::new(&key, bytes, kept_for, generations);
                    store.put_and_unlock(put, lock, *owner)
                }
            };
            // A failed write only costs a later miss.
            let _ = cache.call(put).await;
            // Only now may callers of this process go to the store for the entry.
            drop(leader);
        };
        storing.boxed()
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        let fraction = self.inner.ttl_jitter;
        if fraction == 0.0 {
            return ttl;
        }
        let unit = (crate::store::fresh_generation() % 1_000_001) as f64 / 1_000_000.0;
        let factor = 1.0 + fraction * (2.0 * unit - 1.0);
        Duration::try_from_secs_f64(ttl.as_secs_f64() * factor)
            .unwrap_or(ttl)
            .max(Duration::from_millis(1))
    }

    /// Stores a written row's entity entry (`Some(value)`, as entity reads decode it), tagged
    /// with the generations the write left.
    pub(crate) async fn put_entity<T: Serialize + DeserializeOwned>(
        &self,
        row: &RowKey,
        fingerprint: u64,
        tags: [u64; 2],
        ttl: Option<Duration>,
        value: &T,
    ) {
        if let Some((key, bytes, kept_for)) =
            self.entity_entry_of(row, fingerprint, tags, ttl, value)
        {
            self.inner.stats.written_through.add_one();
            let ns = &self.inner.namespace;
            let generations = [
                key::entity_generation(ns, row.table),
                key::row_generation(ns, row.table, &row.primary_key),
            ];
            let put = self
                .inner
                .store
                .put_with_generations(&key, bytes, kept_for, &generations);
            let _ = self.call(put).await;
        }
    }

    /// A written row's entity entry, tagged with `tags` (its table's entity generation and its
    /// row generation): its key, its bytes, and how long the store keeps it. `None` when the
    /// value does not encode.
    pub(crate) fn entity_entry_of<T: Serialize + DeserializeOwned>(
        &self,
        row: &RowKey,
        fingerprint: u64,
        tags: [u64; 2],
        ttl: Option<Duration>,
        value: &T,
    ) -> Option<(String, Vec<u8>, Duration)> {
        let ttl = ttl.unwrap_or(self.inner.default_ttl);
        let fresh_until = codec::now_millis().saturating_add(ttl.as_millis() as u64);
        let bytes = codec::encode_as::<Option<T>, _>(&tags, fresh_until, &Some(value))?;
        let key = key::entity_entry(
            &self.inner.namespace,
            row.table,
            &row.primary_key,
            fingerprint,
        );
        Some((
            key,
            bytes,
            ttl.saturating_add(self.inner.stale_while_revalidate),
        ))
    }

    /// Counts entries a write's bump stored ([`RowsThrough`](super::invalidate::RowsThrough)).
    pub(crate) fn count_written_through(&self, entries: usize) {
        for _ in 0..entries {
            self.inner.stats.written_through.add_one();
        }
    }

    /// Stores a write's returned value under a custom key (`Some(value)`, as readers decode
    /// it), tagged with the query generation the write itself set (see
    /// [`Write::cache_result`](crate::Write::cache_result)).
    pub(crate) async fn put_custom<T: Serialize + DeserializeOwned>(
        &self,
        custom: &str,
        generation: u64,
        ttl: Duration,
        value: &T,
    ) {
        let fresh_until = codec::now_millis().saturating_add(ttl.as_millis() as u64);
        let entry = Some(value);
        if let Some(bytes) = codec::encode_as::<Option<T>, _>(&[generation], fresh_until, &entry) {
            self.inner.stats.written_through.add_one();
            let key = self.custom_key(custom);
            let kept_for = ttl.saturating_add(self.inner.stale_while_revalidate);
            let _ = self.call(self.inner.store.put(&key, bytes, kept_for)).await;
            self.forget_near(std::slice::from_ref(&key));
        }
    }
}

/// Runs a store write off the caller's path, where [`Cache::writes_behind`] allows it (a
/// multi-thread runtime, whose workers finish it): polled once here, so that an in-process store
/// is done at once and a Redis command is on its way, then finished by a task of its own.
fn in_background(write: BoxFuture<'static, ()>) {
    let mut write = write;
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    if write.as_mut().poll(&mut context).is_ready() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        drop(runtime.spawn(write));
    }
}

/// What a read of the store found.
enum StoreRead<T> {
    /// A fresh entry.
    Hit(T),
    /// No fresh entry: the current generations, if all known, an expired value that the
    /// stale-while-revalidate window still allows, and the fill lock as the read left it.
    Miss(Option<Vec<u64>>, Option<T>, Lock),
    /// The store failed.
    Failed,
}

enum Judged<T> {
    Fresh(T),
    Expired(T),
}

enum LockWait<T> {
    Held(HeldLock),
    FilledByOther(T, Arc<[u8]>),
    GoAhead,
}

/// The fill lock as a read left it.
enum Lock {
    /// Not asked for (or the entry held the generations read).
    Unknown,
    /// Taken for this call.
    Held(HeldLock),
    /// Held by another caller when the read looked.
    Busy,
}

/// A fill lock this call holds. Dropped before it is handed on (a cancelled call, or a path
/// that does not fill), it is freed in the background rather than left to expire, so that
/// other processes do not wait out its time to live.
struct HeldLock {
    key: String,
    owner: u64,
    /// Who frees it when dropped; `None` once handed on.
    frees: Option<Cache>,
}

impl HeldLock {
    fn new(cache: &Cache, key: String, owner: u64) -> Self {
        Self {
            key,
            owner,
            frees: Some(cache.clone()),
        }
    }

    /// The lock key and owner, for the caller that frees it from now on.
    fn hand_on(mut self) -> (String, u64) {
        self.frees = None;
        (std::mem::take(&mut self.key), self.owner)
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let Some(cache) = self.frees.take() else {
            return;
        };
        let (key, owner) = (std::mem::take(&mut self.key), self.owner);
        if let Some(runtime) = crate::sync::background_runtime() {
            drop(runtime.spawn(async move {
                let _ = cache.call(cache.inner.store.unlock(&key, owner)).await;
            }));
        }
    }
}

/// The fill locks of `lookup`'s entry start with this, followed by the generations (see
/// [`ReadProbe::lock_key`]): after the entry key, so in its slot.
fn lock_prefix(key: &str, lock: &LockOptions) -> String {
    format!("{key}:{}:", lock.prefix)
}

fn tags_hex(tags: &[u64]) -> String {
    tags.iter().map(|t| format!("{t:016x}")).collect()
}

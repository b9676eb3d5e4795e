//! Distributed locks on etcd's lock service, bound to the process's [`SharedLease`].
//!
//! A lock named `jobs/nightly` is a set of keys `jobs/nightly/<lease id in hex>`, one per contender,
//! each attached to its contender's lease; the holder is the key with the lowest create revision.
//! This is the layout of etcd's v3 lock service (`etcdctl lock`, Go's `concurrency.Mutex`), so Rust,
//! Go and shell contenders exclude each other.
//!
//! - [`Lock::lock`] asks etcd's lock RPC, which queues behind the current holder. It is bounded by
//!   the caller's timeout, not by the per-attempt request timeout (it blocks for as long as someone
//!   else holds the lock). On timeout our waiter key is deleted, so we do not hold up the queue.
//! - [`Lock::try_lock`] does the lock service's first step itself in one transaction (create our key
//!   if absent, read the lowest one) and withdraws at once if we are not first.
//! - A holder that crashes stops keeping its lease alive; etcd deletes its key when the lease expires
//!   and the next contender gets the lock, within one TTL.
//! - A lost lease cannot be kept secret: the lease's keys are gone, someone else may hold the lock.
//!   [`LockGuard::lost`] resolves and [`LockGuard::is_held`] turns false; the lock is *not* taken
//!   again behind the holder's back.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{
    Compare, CompareOp, GetOptions, LockOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse,
};
use tokio::{
    sync::{OwnedMutexGuard, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    backoff::Backoff,
    error::{Error, Result, chain},
    etcd::Etcd,
    key_watch,
    lease::{self, SharedLease},
    sync::Unpoisoned,
};

/// An in-process mutex per lock name and lease ([`SharedLease::serial`]): etcd's lock key is
/// `<name>/<lease>`, so two holders in this process on the same lease would share one key and both
/// believe they hold the lock. Each holder or waiter keeps a clone of its mutex; an entry goes when
/// the last of them lets go.
static LOCAL_LOCKS: Mutex<BTreeMap<(u64, String), LocalMutex>> = Mutex::new(BTreeMap::new());

/// What serialises this process's holders of one lock on one lease.
type LocalMutex = Arc<tokio::sync::Mutex<()>>;

/// The in-process mutex serialising holders of lock `name` on `lease`.
fn local_lock(lease: &SharedLease, name: &str) -> LocalMutex {
    LOCAL_LOCKS
        .locked()
        .entry((lease.serial(), name.to_owned()))
        .or_default()
        .clone()
}

/// Forgets lock `name`'s in-process mutex on `lease` once nobody holds or waits for it.
fn prune_local_lock(lease: &SharedLease, name: &str) {
    let mut locks = LOCAL_LOCKS.locked();
    let entry = (lease.serial(), name.to_owned());
    // Every holder and waiter has a clone, taken under this lock: one reference is the map's.
    if locks.get(&entry).is_some_and(|m| Arc::strong_count(m) == 1) {
        locks.remove(&entry);
    }
}

/// Takes locks on etcd, each held under a [`SharedLease`] and released when that lease goes.
///
/// ```no_run
/// use std::time::Duration;
/// use registry::{EtcdConfig, Lock, SharedLease};
/// # async fn demo() -> Result<(), registry::Error> {
/// let etcd = EtcdConfig::new(["127.0.0.1:2379"])?.connect().await?;
/// let lease = SharedLease::start(&etcd, Duration::from_secs(10))?;
/// let locks = Lock::new(&lease);
///
/// let guard = locks.lock("jobs/nightly", Duration::from_secs(30)).await?;
/// tokio::select! {
///     reason = guard.lost() => eprintln!("lock lost ({reason}); stopping the job"),
///     _ = async { /* the work that must not run twice */ } => {}
/// }
/// guard.unlock().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Lock {
    lease: SharedLease,
}

impl Lock {
    /// Locks taken through this handle are held under `lease`.
    pub fn new(lease: &SharedLease) -> Self {
        Self {
            lease: lease.clone(),
        }
    }

    /// Waits up to `timeout` for lock `name`, then holds it until the guard is unlocked or dropped,
    /// or the lease is lost.
    ///
    /// Two guards of the same lock and lease (the same process) also exclude each other: the second
    /// waits for the first here, before asking etcd.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for an empty name; [`Error::LockTimeout`] if the lock (or a live lease)
    /// was not had within `timeout`; [`Error::Etcd`] if etcd kept failing until then.
    pub async fn lock(&self, name: &str, timeout: Duration) -> Result<LockGuard> {
        check_name(name)?;
        let deadline = Instant::now() + timeout;
        let timed_out = |waiting_for| Error::LockTimeout {
            name: name.to_owned(),
            waited: timeout,
            waiting_for,
        };
        let waited = tokio::time::timeout_at(deadline, local_lock(&self.lease, name).lock_owned());
        let Ok(local) = waited.await else {
            // The holder may have let go just now, seeing our clone: the table entry is ours to drop.
            prune_local_lock(&self.lease, name);
            return Err(timed_out("another holder in this process to release it"));
        };
        let local = LocalHold::new(&self.lease, name, local);
        let mut backoff = Backoff::etcd_task();
        loop {
            let id = tokio::time::timeout_at(deadline, self.live_lease())
                .await
                .map_err(|_| timed_out("a live lease"))?;
            let key = lock_key(name, id);
            let mut client = self.lease.etcd().client();
            // Not through `Etcd::call`: its per-attempt timeout would abandon every wait longer than
            // a second. Dropping the future resets the HTTP/2 stream, and etcd's lock service then
            // deletes our waiter key itself (seen with 3.4.23); `withdraw` makes sure of it for when
            // the reset cannot reach etcd (the connection broke).
            let asked = client.lock(name, Some(LockOptions::new().with_lease(id)));
            let error = match tokio::time::timeout_at(deadline, asked).await {
                Ok(Ok(resp)) => {
                    let revision = resp.header().map_or(0, |h| h.revision());
                    if self.lease.id() == Some(id) {
                        info!(lock = name, key, "lock acquired");
                        return Ok(LockGuard::new(&self.lease, name, key, id, revision, local));
                    }
                    // The lease was lost while we queued: the key went with it, so did the lock.
                    debug!(
                        lock = name,
                        key, "lease lost while waiting for the lock; asking again"
                    );
                    continue;
                }
                Ok(Err(source)) => Error::Etcd {
                    op: "lock",
                    key: name.to_owned(),
                    endpoints: self.lease.etcd().endpoints(),
                    source,
                },
                Err(_) => {
                    withdraw(self.lease.etcd(), &key).await;
                    return Err(timed_out("the holder to release it"));
                }
            };
            if lease::is_lease_not_found(&error) {
                self.lease
                    .report_lost(id, format!("etcd no longer knows lease {id:x}"));
                // Ask again on the next lease, not on this one.
                let mut state = self.lease.state();
                tokio::time::timeout_at(deadline, lease::replaced(&mut state, id))
                    .await
                    .map_err(|_| timed_out("a live lease"))?;
                continue;
            }
            // A member died under the waiting RPC, or etcd is between leaders: ask again, on our
            // deadline. A lasting error ends the same way, reported when time is up.
            let retry_at = Instant::now() + backoff.next_delay();
            if retry_at >= deadline {
                withdraw(self.lease.etcd(), &key).await;
                return Err(error);
            }
            debug!(lock = name, error = %chain(&error), "asking for the lock failed; retrying");
            tokio::time::sleep_until(retry_at).await;
        }
    }

    /// Takes lock `name` if nobody holds it, without waiting for a holder: `Ok(None)` when someone
    /// else (another process, or another guard of this process) holds it.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for an empty name; [`Error::GaveUp`] if the lease is not live within
    /// the request timeout; [`Error::Etcd`] / [`Error::Timeout`] if etcd did not answer.
    pub async fn try_lock(&self, name: &str) -> Result<Option<LockGuard>> {
        check_name(name)?;
        let Ok(local) = local_lock(&self.lease, name).try_lock_owned() else {
            // As for a timed-out wait: the holder may have let go since, seeing our clone.
            prune_local_lock(&self.lease, name);
            return Ok(None);
        };
        let local = LocalHold::new(&self.lease, name, local);
        let etcd = self.lease.etcd();
        let id = self.lease.wait_live(etcd.config().request_timeout).await?;
        let key = lock_key(name, id);
        let prefix = format!("{name}/");
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        // etcd's lock service, step one: create our key unless it exists, and read the lowest key.
        // Safe to repeat: a retry finds the key the first attempt created.
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(key.as_str(), "", Some(PutOptions::new().with_lease(id))),
                TxnOp::get(prefix.as_str(), Some(first.clone())),
            ])
            .or_else([
                TxnOp::get(key.as_str(), None),
                TxnOp::get(prefix.as_str(), Some(first)),
            ]);
        let resp = etcd
            .call("try-lock", &key, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let responses = resp.op_responses();
        let create_revision = |i: usize| match responses.get(i) {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().map(|kv| kv.create_revision()),
            _ => None,
        };
        let ours = if resp.succeeded() {
            Some(revision)
        } else {
            create_revision(0)
        };
        let owner = create_revision(1);
        if ours.is_some() && ours == owner {
            info!(lock = name, key, "lock acquired");
            return Ok(Some(LockGuard::new(
                &self.lease,
                name,
                key,
                id,
                revision,
                local,
            )));
        }
        withdraw(etcd, &key).await;
        Ok(None)
    }

    /// The current lease id, waiting for one if the lease is being (re-)granted.
    async fn live_lease(&self) -> i64 {
        let mut state = self.lease.state();
        loop {
            if let Some(id) = self.lease.id() {
                return id;
            }
            if state.changed().await.is_err() {
                // Cannot happen while we hold a handle; wait for the caller's deadline.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The lock is held while this guard lives. [`LockGuard::unlock`] releases it and reports whether
/// it was held to the end; dropping the guard releases it in the background.
#[derive(Debug)]
pub struct LockGuard {
    name: String,
    key: String,
    lease: SharedLease,
    /// `Some(reason)` once ownership is gone; set by the `watch_ownership` task.
    lost: watch::Receiver<Option<String>>,
    /// Stops `watch_ownership`.
    cancel: CancellationToken,
    /// `None` once unlocked.
    local: Option<LocalHold>,
}

impl LockGuard {
    fn new(
        lease: &SharedLease,
        name: &str,
        key: String,
        id: i64,
        revision: i64,
        local: LocalHold,
    ) -> Self {
        let (lost_tx, lost) = watch::channel(None);
        let cancel = CancellationToken::new();
        tokio::spawn(watch_ownership(
            lease.etcd().clone(),
            key.clone(),
            id,
            revision,
            lease.state(),
            lost_tx,
            cancel.clone(),
        ));
        Self {
            name: name.to_owned(),
            key,
            lease: lease.clone(),
            lost,
            cancel,
            local: Some(local),
        }
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Our key in etcd, `<name>/<lease id in hex>`: it exists exactly while we hold the lock, so a
    /// transaction comparing on it writes only under the lock.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the lock is still ours: false once the lease was lost or our key deleted.
    pub fn is_held(&self) -> bool {
        self.lost.borrow().is_none()
    }

    /// Resolves when the lock is lost, with the reason; never while it is held. Run the work under
    /// the lock in a `select!` with this to stop it when another holder may have taken over.
    pub async fn lost(&self) -> String {
        let mut lost = self.lost.clone();
        match lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The watcher ended without a verdict (it panicked): ownership can no longer be known.
            Err(_) => format!("the watch on lock key {} stopped", self.key),
        }
    }

    /// Releases the lock.
    ///
    /// # Errors
    /// [`Error::LockLost`] if the lock had been lost before (the work done under it may have
    /// overlapped another holder's); [`Error::Etcd`] / [`Error::Timeout`] if etcd did not answer
    /// (the key then goes with the lease).
    pub async fn unlock(mut self) -> Result<()> {
        self.cancel.cancel();
        let local = self.local.take();
        let lost = self.lost.borrow().clone();
        let released = unlock(self.lease.etcd(), &self.key).await;
        drop(local);
        if released.is_ok() {
            info!(lock = self.name, key = self.key, "lock released");
        }
        match lost {
            Some(reason) => Err(Error::LockLost {
                name: self.name.clone(),
                reason,
            }),
            None => released,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.cancel.cancel();
        let Some(local) = self.local.take() else {
            return; // unlocked
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(
                lock = self.name,
                key = self.key,
                "lock guard dropped outside a runtime; the lock is released when the lease ends"
            );
            return;
        };
        let etcd = self.lease.etcd().clone();
        let key = self.key.clone();
        // Bounded by the request timeout and owned by nobody, like any drop-time cleanup. The
        // in-process hold is kept until etcd's key is gone: a second guard of this process would
        // share that key, and our delete would take its lock away.
        runtime.spawn(async move {
            if let Err(e) = unlock(&etcd, &key).await {
                warn!(key, error = %chain(&e), "releasing a dropped lock failed; it is released when the lease ends");
            }
            drop(local);
        });
    }
}

/// The in-process hold on a lock name; forgets the name's mutex when the last holder lets go.
#[derive(Debug)]
struct LocalHold {
    lease: SharedLease,
    name: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl LocalHold {
    fn new(lease: &SharedLease, name: &str, guard: OwnedMutexGuard<()>) -> Self {
        Self {
            lease: lease.clone(),
            name: name.to_owned(),
            guard: Some(guard),
        }
    }
}

impl Drop for LocalHold {
    fn drop(&mut self) {
        drop(self.guard.take());
        prune_local_lock(&self.lease, &self.name);
    }
}

/// `<name>/<lease id in hex>`, the key etcd's lock service creates for a contender.
fn lock_key(name: &str, id: i64) -> String {
    format!("{name}/{id:x}")
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidName {
            what: "lock name",
            value: name.to_owned(),
            reason: "must not be empty",
        });
    }
    Ok(())
}

/// Deletes our key through etcd's unlock RPC.
async fn unlock(etcd: &Etcd, key: &str) -> Result<()> {
    etcd.call("unlock", key, |mut c| async move { c.unlock(key).await })
        .await
        .map(drop)
}

/// Deletes a waiter key we gave up on, so it does not hold up the queue until the lease ends.
async fn withdraw(etcd: &Etcd, key: &str) {
    if let Err(e) = unlock(etcd, key).await {
        warn!(key, error = %chain(&e), "could not withdraw from the lock queue; the key goes with the lease");
    }
}

/// Watches what the lock depends on, until cancelled: the lease (lost or replaced) and our key
/// (deleted by an operator, or with the lease). Either ends ownership for good.
async fn watch_ownership(
    etcd: Etcd,
    key: String,
    id: i64,
    revision: i64,
    mut lease: watch::Receiver<lease::LeaseState>,
    lost: watch::Sender<Option<String>>,
    cancel: CancellationToken,
) {
    let reason = tokio::select! {
        _ = cancel.cancelled() => return,
        reason = lease::replaced(&mut lease, id) => reason,
        reason = key_deleted(&etcd, &key, revision) => reason,
    };
    warn!(key, %reason, "lock lost");
    lost.send_replace(Some(reason));
}

/// Returns once `key` is deleted after `revision`.
async fn key_deleted(etcd: &Etcd, key: &str, revision: i64) -> String {
    let at = key_watch::deleted(etcd, key, revision).await;
    format!("lock key {key} was deleted (revision {at})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_etcds_lock_service() {
        // `etcdctl lock jobs/nightly` with lease 694d71ac1ad5d904 creates this very key.
        assert_eq!(
            lock_key("jobs/nightly", 0x694d_71ac_1ad5_d904),
            "jobs/nightly/694d71ac1ad5d904"
        );
    }

    #[test]
    fn empty_names_are_refused() {
        assert!(matches!(check_name(""), Err(Error::InvalidName { .. })));
        assert!(check_name("jobs/nightly").is_ok());
    }
}

//! Registration: put `<namespace>/<service>/<instance-id>` under a lease and keep it there for as long
//! as the [`Registration`] handle lives, whatever happens to etcd in between.
//!
//! The lease is a [`SharedLease`]: the one given with [`RegistrationBuilder::lease`] (shared with the
//! process's other registrations and locks), or one of its own. The lease's task grants and keeps it
//! alive, and after a loss grants a new one. The registration's own task is the only writer of the
//! key, and follows the lease:
//! 1. *register*: wait for a live lease, put the key on it. On failure (etcd down, no quorum), retry
//!    with capped, jittered backoff, forever; the state says [`RegistrationState::Lost`] meanwhile.
//! 2. *guard* until the lease is replaced, then back to 1. Meanwhile `guard_key` watches the key itself
//!    and puts it back on the same lease if something deletes it (an operator's `etcdctl del`); a
//!    put-back that finds the lease gone tells the lease's task, which re-grants at once.
//!
//! Reconnecting the keep-alive stream alone is not enough after a long outage: if the lease expired,
//! etcd deleted the key, so the only fix is a new lease and a new put (the bug behind go-zero #1926,
//! kratos #3883 and rpcx #420). Deregistration deletes the key at once (and revokes the lease when no
//! one else uses it).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::problem::Problem;
use crate::sync::{Unpoisoned, Waited};
use crate::{
    backoff::Backoff,
    endpoint::Endpoint,
    error::{Error, Result},
    etcd::Etcd,
    key, key_watch,
    lease::{self, DEFAULT_TTL, LeaseEnd, LeaseState, SharedLease, WeakLease},
    metrics,
};

/// Where a registration stands. Observe it with [`Registration::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// The first grant-and-put is in progress.
    Registering,
    /// The key is in etcd under this lease, which is being kept alive.
    Registered {
        /// The lease the key is attached to.
        lease_id: i64,
    },
    /// The key may be missing from etcd (lease lost, or etcd unreachable); re-registering with backoff.
    Lost {
        /// Why, for display.
        reason: String,
    },
    /// The handle was deregistered or dropped; nothing is kept alive any more.
    Deregistered,
}

/// Describes one instance to register; [`RegistrationBuilder::start`] validates it and starts the task.
#[derive(Debug, Clone)]
pub struct RegistrationBuilder {
    namespace: String,
    service: String,
    instance_id: String,
    addr: String,
    ttl: Duration,
    lease: Option<SharedLease>,
    metadata: serde_json::Map<String, serde_json::Value>,
}

impl RegistrationBuilder {
    /// Adds a metadata field published with the address (e.g. `version`, `zone`, `weight`); clients
    /// can select instances on it. The instance id is always included.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the key namespace (default [`key::DEFAULT_NAMESPACE`]).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the lease TTL (default [`DEFAULT_TTL`], at least [`crate::MIN_TTL`]) of the registration's own
    /// lease. Ignored with [`RegistrationBuilder::lease`]: a shared lease has its own TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Hangs the key on `lease`, shared with the process's other registrations and locks, instead of
    /// a lease of its own: one lease id and one keep-alive stream for all of them. Deregistering
    /// then deletes just this key; the lease is revoked when its last user is gone.
    pub fn lease(mut self, lease: &SharedLease) -> Self {
        self.lease = Some(lease.clone());
        self
    }

    /// Validates the description and starts registering in the background; returns at once. Use
    /// [`Registration::wait_registered`] to wait for the key to be in etcd.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::InvalidAddr`] or [`Error::InvalidTtl`] for bad input; etcd
    /// problems are never errors here: the task retries them.
    pub fn start(self, etcd: &Etcd) -> Result<Registration> {
        lease::check_ttl(self.ttl)?;
        let key = key::instance_key(&self.namespace, &self.service, &self.instance_id)?;
        let mut endpoint = Endpoint::new(self.addr, &self.instance_id)?;
        if let serde_json::Value::Object(fields) = &mut endpoint.metadata {
            // The instance id stays authoritative whatever the caller added.
            for (key, value) in self.metadata {
                fields.entry(key).or_insert(value);
            }
        }
        let value = endpoint.encode();
        // The same record with the departure announced (see `Registration::announce_draining`).
        if let serde_json::Value::Object(fields) = &mut endpoint.metadata {
            fields.insert(crate::endpoint::DRAINING_KEY.to_owned(), true.into());
        }
        let draining_value = endpoint.encode();
        let lease = match self.lease {
            Some(lease) => lease,
            // Its own lease, named after the key in logs and metrics as before leases were shared.
            None => SharedLease::start_labelled(etcd, self.ttl, key.clone())?,
        };
        let (state_tx, state) = watch::channel(RegistrationState::Registering);
        let cancel = CancellationToken::new();
        let weak_lease = lease.downgrade();
        let record = Arc::new(Mutex::new(value));
        let task = tokio::spawn(run(
            lease,
            key.clone(),
            record.clone(),
            state_tx,
            cancel.clone(),
        ));
        Ok(Registration {
            key,
            lease: weak_lease,
            record,
            draining_value,
            state,
            cancel,
            task: Some(task),
        })
    }
}

/// A live registration. While it exists, the key is kept in etcd; [`Registration::deregister`] removes
/// it at once. Dropping the handle does the same in the background if the runtime is still running
/// (and revokes the lease if nothing else uses it); otherwise the key disappears when the lease
/// expires (at most one TTL).
#[derive(Debug)]
pub struct Registration {
    key: String,
    /// The task owns the lease; this handle must not count as a user, or deregistering would
    /// not revoke it.
    lease: WeakLease,
    /// The record every put writes, shared with the task: the draining one once announced.
    record: Arc<Mutex<String>>,
    /// The record with `draining: true` in its metadata.
    draining_value: String,
    state: watch::Receiver<RegistrationState>,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

impl Registration {
    /// Describes an instance of `service` reachable at `addr` (`host:port`) with id `instance_id`.
    pub fn builder(
        service: impl Into<String>,
        instance_id: impl Into<String>,
        addr: impl Into<String>,
    ) -> RegistrationBuilder {
        RegistrationBuilder {
            namespace: key::DEFAULT_NAMESPACE.to_owned(),
            service: service.into(),
            instance_id: instance_id.into(),
            addr: addr.into(),
            ttl: DEFAULT_TTL,
            lease: None,
            metadata: serde_json::Map::new(),
        }
    }

    /// The etcd key this registration maintains.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A receiver of state changes.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Waits until the key is in etcd, returning the lease id.
    ///
    /// # Errors
    /// [`Error::GaveUp`] after `timeout`, with the last reason registration failed.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<i64> {
        let gave_up = |why: String| Error::GaveUp {
            what: format!("registration of {} ({why})", self.key),
            waited: timeout,
        };
        let registered = |s: &RegistrationState| matches!(s, RegistrationState::Registered { .. });
        match crate::sync::wait_for(&self.state, timeout, registered).await {
            Waited::Reached(RegistrationState::Registered { lease_id }) => Ok(lease_id),
            Waited::Reached(other) => Err(gave_up(format!("unexpected state {other:?}"))),
            Waited::Stopped => Err(gave_up("the registration task stopped".into())),
            Waited::TimedOut(RegistrationState::Lost { reason }) => Err(gave_up(reason)),
            Waited::TimedOut(other) => Err(gave_up(format!("still {other:?}"))),
        }
    }

    /// Announces that this instance is leaving: rewrites its record, same key, same lease, with
    /// metadata `draining: true` ([`crate::endpoint::DRAINING_KEY`]). Our clients stop sending
    /// to it on that event, before the DELETE, and give it no removal grace; a stock Go client
    /// ignores metadata and keeps calling it until the DELETE. Call it on the way out, before
    /// [`Registration::deregister`]; every later put of the key (a new lease, the key put back)
    /// carries the draining record too. Returns the revision of the put.
    ///
    /// # Errors
    /// [`Error::GaveUp`] if the key is not registered right now (nothing can be written without
    /// a live lease) or etcd did not answer within `timeout`; [`Error::Etcd`] if the put failed.
    /// Either way the departure is still seen with the DELETE.
    pub async fn announce_draining(&self, timeout: Duration) -> Result<i64> {
        let gave_up = |why: String| Error::GaveUp {
            what: format!("announcing that {} is draining ({why})", self.key),
            waited: timeout,
        };
        let lease = self
            .lease
            .upgrade()
            .ok_or_else(|| gave_up("the registration has stopped".into()))?;
        self.draining_value.clone_into(&mut self.record.locked());
        let RegistrationState::Registered { lease_id } = *self.state.borrow() else {
            return Err(gave_up(format!(
                "not registered: {:?}",
                *self.state.borrow()
            )));
        };
        let putting = put(lease.etcd(), &self.key, &self.draining_value, lease_id);
        let revision = tokio::time::timeout(timeout, putting)
            .await
            .map_err(|_| gave_up("no answer from etcd".into()))??;
        info!(
            key = self.key.as_str(),
            lease = format_args!("{lease_id:x}"),
            revision,
            "announced draining"
        );
        Ok(revision)
    }

    /// Stops keeping the key and deletes it, so watchers see a DELETE immediately instead of after
    /// the TTL; revokes the lease too if nothing else uses it.
    ///
    /// # Errors
    /// [`Error::Etcd`] / [`Error::Timeout`] if the delete or revoke failed (the key then expires
    /// with its lease, within one TTL if nothing else keeps that alive), or [`Error::TaskLost`] if
    /// the task had died.
    pub async fn deregister(mut self) -> Result<()> {
        self.cancel.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(|source| Error::TaskLost {
                task: "registration",
                key: self.key.clone(),
                source,
            })?,
            None => Ok(()),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The task sees the cancellation and deletes the key (and revokes an unshared lease) on its
        // way out.
        self.cancel.cancel();
    }
}

/// The registration task: follow the lease, put the key on each new one, guard it; delete it on
/// cancellation.
async fn run(
    lease: SharedLease,
    key: String,
    record: Arc<Mutex<String>>,
    state: watch::Sender<RegistrationState>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut lease_state = lease.state();
    // The lease of our last put (sent, if not answered): where the key is, for the delete on the
    // way out.
    let mut put_on: Option<i64> = None;
    // A 1 s cap: after an outage the key is back within about a second of etcd answering again.
    let mut backoff = Backoff::etcd_task();
    let mut problem = Problem::default();
    let mut registrations = 0u64;

    'register: loop {
        // 1. A live lease. While there is none, say why (the lease's task is re-granting).
        let id = loop {
            let current = lease_state.borrow_and_update().clone();
            match current {
                LeaseState::Live { id } => break id,
                LeaseState::Lost { reason } => {
                    state.send_replace(RegistrationState::Lost { reason });
                }
                LeaseState::Granting => {}
                // Cannot happen while we hold a handle; nothing would keep the key anyway.
                LeaseState::Closed => break 'register,
            }
            tokio::select! {
                _ = cancel.cancelled() => break 'register,
                changed = lease_state.changed() => if changed.is_err() { break 'register },
            }
        };
        // 2. The key on that lease, with the current record (the draining one once the departure
        // was announced).
        let current = record.locked().clone();
        // Awaited even when cancelled (it is bounded by the request timeout): a put already sent
        // may still land, and the delete on the way out must come after it, on its lease.
        put_on = Some(id);
        let attempt = put(lease.etcd(), &key, &current, id).await;
        if cancel.is_cancelled() {
            break;
        }
        let put_revision = match attempt {
            Ok(revision) => revision,
            Err(e) => {
                let reason = e.to_string();
                if let Some(problem) = problem.error("putting the key", &e) {
                    warn!(key, problem, "registration failed; retrying with backoff");
                }
                state.send_replace(RegistrationState::Lost {
                    reason: reason.clone(),
                });
                if lease::is_lease_not_found(&e) {
                    // Not worth retrying on this lease: wait for the next one.
                    lease.report_lost(id, reason);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = lease::replaced(&mut lease_state, id) => continue,
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        info!(
            key,
            lease = format_args!("{id:x}"),
            ttl_s = crate::lease::ttl_seconds(lease.ttl()),
            "registered"
        );
        metrics::registered(&key, true);
        if registrations > 0 {
            metrics::reregistered(&key);
        }
        registrations += 1;
        backoff.reset();
        problem.clear();
        state.send_replace(RegistrationState::Registered { lease_id: id });

        // 3. Keep the key there until the lease is replaced (or we are cancelled).
        let end = tokio::select! {
            reason = lease::replaced(&mut lease_state, id) => LeaseEnd::Lost(reason),
            end = guard_key(&lease, &key, &record, id, put_revision, &cancel) => end,
        };
        match end {
            LeaseEnd::Cancelled => break,
            LeaseEnd::Lost(reason) => {
                warn!(key, lease = format_args!("{id:x}"), %reason, "lease lost; registering again with a new lease");
                lease.report_lost(id, reason.clone());
                metrics::registered(&key, false);
                state.send_replace(RegistrationState::Lost { reason });
                // Until the lease's task has acted on the loss, the state still names lease `id`.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = lease::replaced(&mut lease_state, id) => {}
                }
            }
        }
    }

    // Only if the key is still on the lease we last put it on: an instance that took the same key
    // over meanwhile keeps it.
    let deleted = match put_on {
        Some(id) => delete_if_on(lease.etcd(), &key, id).await,
        None => Ok(()),
    };
    // Revokes the lease if this registration was its last user.
    let released = lease.release_last().await;
    match (&deleted, &released) {
        (Ok(()), Ok(Some(id))) => info!(
            key,
            lease = format_args!("{id:x}"),
            "deregistered: lease revoked, key deleted"
        ),
        (Ok(()), Ok(None)) => info!(key, "deregistered: key deleted; the shared lease stays"),
        (Err(e), _) | (_, Err(e)) => {
            warn!(key, error = %crate::error::chain(e), "could not delete the key or revoke its lease; the key expires with its lease")
        }
    }
    metrics::registered(&key, false);
    state.send_replace(RegistrationState::Deregistered);
    match (deleted, released) {
        (Ok(()), Ok(_)) => Ok(()),
        (Err(delete), Err(revoke)) => Err(Error::Deregistration {
            key,
            delete: Box::new(delete),
            revoke: Box::new(revoke),
        }),
        (Err(e), Ok(_)) | (Ok(()), Err(e)) => Err(e),
    }
}

/// Watches our own key from just after `revision` and puts it back, on the same lease, whenever
/// something deletes it while the lease lives: an operator's `etcdctl del`, a buggy script. (go-zero
/// does the same.) Returns when cancelled, or when putting it back shows the lease is gone, which
/// is also how an expired lease is noticed the moment etcd deletes the key.
async fn guard_key(
    lease: &SharedLease,
    key: &str,
    record: &Mutex<String>,
    id: i64,
    mut revision: i64,
    cancel: &CancellationToken,
) -> LeaseEnd {
    loop {
        let deleted = tokio::select! {
            _ = cancel.cancelled() => return LeaseEnd::Cancelled,
            deleted = key_watch::deleted(lease.etcd(), key, revision) => deleted,
        };
        // The lease keep-alive, not this guard, decides whether the lease survived: putting the
        // key back on it tells.
        warn!(
            key,
            lease = format_args!("{id:x}"),
            revision = deleted,
            "our key was deleted (by an operator, or with its lease); putting it back on the lease"
        );
        match restore(lease, key, record, id, cancel).await {
            Ok(now) => revision = now,
            Err(end) => return end,
        }
    }
}

/// Puts the key back on lease `id`, retrying transient failures; `Err` ends the guard.
async fn restore(
    lease: &SharedLease,
    key: &str,
    record: &Mutex<String>,
    id: i64,
    cancel: &CancellationToken,
) -> Result<i64, LeaseEnd> {
    let mut backoff = Backoff::key_put();
    loop {
        // The current record: the draining one once the departure was announced.
        let current = record.locked().clone();
        // Awaited even when cancelled, as in `run`: the delete on the way out comes after it.
        let attempt = put(lease.etcd(), key, &current, id).await;
        if cancel.is_cancelled() {
            return Err(LeaseEnd::Cancelled);
        }
        match attempt {
            Ok(revision) => {
                info!(
                    key,
                    lease = format_args!("{id:x}"),
                    revision,
                    "key put back"
                );
                metrics::key_restored(key);
                return Ok(revision);
            }
            Err(e) if lease::is_lease_not_found(&e) => {
                return Err(LeaseEnd::Lost(format!(
                    "the key was deleted and lease {id:x} is gone"
                )));
            }
            Err(e) => {
                debug!(key, error = %crate::error::chain(&e), "putting the key back failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Err(LeaseEnd::Cancelled),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Puts `key` attached to lease `id`; returns the revision of the put.
async fn put(etcd: &Etcd, key: &str, value: &str, id: i64) -> Result<i64> {
    let resp = etcd
        .call("put", key, |mut c| async move {
            c.put(key, value, Some(PutOptions::new().with_lease(id)))
                .await
        })
        .await?;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// Deletes `key` if it is attached to lease `id`.
async fn delete_if_on(etcd: &Etcd, key: &str, id: i64) -> Result<()> {
    let txn = Txn::new()
        .when([Compare::lease(key, CompareOp::Equal, id)])
        .and_then([TxnOp::delete(key, None)]);
    etcd.call("delete", key, |mut c| {
        let txn = txn.clone();
        async move { c.txn(txn).await }
    })
    .await
    .map(drop)
}

//! The pool of backends: the updater task that turns discovery's membership into one backend per
//! address, starts and stops their connection tasks, keeps an instance whose key disappeared while
//! it could still serve for the removal grace, and rebuilds the picker when anything changed.
//!
//! Work follows the change, not the fleet: each membership snapshot is compared with the one
//! applied before it ([`Instances::diff`] skips what they share), and only the addresses a change
//! touches are looked at. Connection and health changes of the backends only *request* a picker
//! rebuild; this task coalesces the requests, so when thousands of backends connect at start the
//! picker is rebuilt a few times rather than once per backend, and never on a call's path.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info};

use super::{
    BalanceOptions, Shared,
    backend::{Backend, NoGrace},
    connection,
    subset::Subset,
    transport::{Dial, Target},
};
use crate::sync::Unpoisoned;
use crate::{
    discover::{Change, Departed, Instance, Instances, Membership},
    metrics,
};

/// What the updater task owns.
struct Pool {
    shared: Arc<Shared>,
    options: BalanceOptions,
    /// How every backend's connections are made.
    dial: Arc<Dial>,
    stop: CancellationToken,
    /// The ids registered at each address: one backend per address, described by its first id.
    ids_at: BTreeMap<Arc<str>, BTreeSet<String>>,
    /// Dropping one stops that backend's connection task.
    stops: BTreeMap<Arc<str>, DropGuard>,
    /// Addresses in removal grace: the only backends a grace check looks at.
    graced: BTreeSet<Arc<str>>,
    /// Every registered address ranked for this client; only the subset's members get backends.
    subset: Subset,
    /// The instances that went while announcing draining, as of the snapshot applied last.
    departed: Departed,
}

/// The updater task: applies membership snapshots as they come, ends removal graces, and rebuilds
/// the picker whenever something asked for it.
pub(super) async fn follow(
    mut membership: watch::Receiver<Membership>,
    shared: Arc<Shared>,
    options: BalanceOptions,
    stop: CancellationToken,
) {
    let mut pool = Pool {
        subset: Subset::new(&options.subset),
        dial: Arc::new(Dial::new(&options)),
        shared,
        options,
        stop,
        ids_at: BTreeMap::new(),
        stops: BTreeMap::new(),
        graced: BTreeSet::new(),
        departed: Departed::default(),
    };
    let mut membership_changed = true;
    loop {
        if membership_changed {
            let (instances, departed) = {
                let m = membership.borrow_and_update();
                (m.instances.clone(), m.departed.clone())
            };
            pool.departed = departed;
            pool.apply(instances);
        }
        pool.end_graces();
        metrics::in_grace(&pool.shared.service, pool.graced.len());
        pool.shared.rebuild_if_requested();
        let next_end = pool.next_grace_end();
        membership_changed = tokio::select! {
            _ = pool.stop.cancelled() => return,
            changed = membership.changed() => if changed.is_err() { return } else { true },
            _ = pool.shared.rebuild_wanted.notified() => false,
            _ = crate::sync::sleep_until_some(next_end) => false,
        };
    }
}

impl Pool {
    /// Makes the backends follow `instances`, looking only at the addresses whose instances
    /// changed since the snapshot applied before.
    fn apply(&mut self, instances: Instances) {
        let mut touched: BTreeSet<Arc<str>> = BTreeSet::new();
        let applied = self.shared.applied.locked().clone();
        let changes: Vec<Change> = applied.diff(&instances).collect();
        for change in changes {
            match change {
                Change::Added(new) => self.add_id(&new, &mut touched),
                Change::Removed(old) => self.remove_id(&old, &mut touched),
                Change::Updated { old, new } => {
                    self.remove_id(&old, &mut touched);
                    self.add_id(&new, &mut touched);
                }
            }
        }
        let status = self.subset.status();
        self.shared.subset.set(status);
        metrics::in_subset(&self.shared.service, status.members);
        for addr in &touched {
            self.sync(addr, &instances);
        }
        if !touched.is_empty() {
            self.shared.request_rebuild();
        }
        // Applied: from here a failed pick no longer waits for this snapshot. Recorded after the
        // new backends were counted as connecting, and before the rebuild, whose notification
        // wakes the calls waiting for it.
        *self.shared.applied.locked() = instances;
    }

    /// Records `instance` at its address; an address registered for the first time joins the
    /// subset's ranking. Every address whose backend may have to change goes into `touched`.
    fn add_id(&mut self, instance: &Instance, touched: &mut BTreeSet<Arc<str>>) {
        let addr: Arc<str> = instance.addr.as_str().into();
        let ids = self.ids_at.entry(addr.clone()).or_default();
        let first = ids.is_empty();
        ids.insert(instance.id.clone());
        if first {
            self.subset.insert(&addr).touch(touched);
        }
        touched.insert(addr);
    }

    /// Forgets `instance` at its address; an address no longer registered at all leaves the
    /// subset's ranking (and the best of the rest may take its place).
    fn remove_id(&mut self, instance: &Instance, touched: &mut BTreeSet<Arc<str>>) {
        let addr: Arc<str> = instance.addr.as_str().into();
        if let Some(ids) = self.ids_at.get_mut(&addr) {
            ids.remove(&instance.id);
            if ids.is_empty() {
                self.ids_at.remove(&addr);
                self.subset.remove(&addr).touch(touched);
            }
        }
        touched.insert(addr);
    }

    /// Makes the backend at `addr` match what is registered there now: created, described by
    /// another instance, updated, kept for the removal grace, or removed.
    fn sync(&mut self, addr: &Arc<str>, instances: &Instances) {
        // If several instances share an address, the first (by id) describes its backend. Only
        // the subset's members get one.
        let wanted = self
            .ids_at
            .get(addr)
            .filter(|_| self.subset.is_member(addr))
            .and_then(|ids| ids.first())
            .and_then(|id| instances.get(id));
        let shared = self.shared.clone();
        let mut backends = shared.backends.locked();
        let now = Instant::now();
        match (wanted, backends.get(addr).cloned()) {
            (None, None) => {}
            // Still registered, only out of this client's subset: it is alive, so it needs no
            // grace, and goes like a removed instance (the calls in flight on it finish).
            (None, Some(backend)) if self.ids_at.contains_key(addr) => {
                debug!(service = %shared.service, addr = %backend.addr, id = %backend.instance_id, "instance left this client's subset");
                backends.remove(addr);
                self.stops.remove(addr);
                self.graced.remove(addr);
            }
            (None, Some(backend)) => {
                if !self.keep_removed(&backend, now) {
                    backends.remove(addr);
                    self.stops.remove(addr);
                }
            }
            // Same instance: its metadata may have changed; registered again after a grace, it
            // simply carries on.
            (Some(instance), Some(backend)) if *backend.instance_id == *instance.id => {
                backend.set_metadata(&instance.metadata);
                if let Some(grace) = backend.end_grace() {
                    self.graced.remove(addr);
                    info!(service = %shared.service, addr = %backend.addr, id = %backend.instance_id, kept = ?now.saturating_duration_since(grace.since), "instance registered again during its removal grace; it continues");
                    metrics::grace_ended(&shared.service, "registered again");
                }
            }
            // Another instance now at this address (a restart under a new id): start afresh.
            (Some(instance), Some(_)) => {
                backends.remove(addr);
                self.stops.remove(addr);
                self.graced.remove(addr);
                self.start_backend(&mut backends, addr, instance);
            }
            (Some(instance), None) => self.start_backend(&mut backends, addr, instance),
        }
    }

    /// Whether a backend whose address is no longer registered stays, for its removal grace: an
    /// instance that can still serve is kept, since its key may be gone only because its lease
    /// expired while etcd had no quorum, and its new registration is on the way. Dropping it
    /// instead stops its connection task, which closes the connection once the calls in flight
    /// on it complete.
    fn keep_removed(&mut self, backend: &Arc<Backend>, now: Instant) -> bool {
        let service = &self.shared.service;
        if backend.grace().is_some() {
            return match backend.grace_over(now) {
                None => true,
                Some(why) => {
                    drop_after_grace(service, backend, why, now);
                    self.graced.remove(&backend.addr);
                    false
                }
            };
        }
        let why_not = if self.options.removal_grace.is_zero() {
            Some(NoGrace::Off)
        } else if self.departed.contains(&backend.instance_id) {
            // Its draining record and the removal may have come in one snapshot: the backend never
            // saw the record, but discovery did.
            Some(NoGrace::Draining)
        } else {
            backend.why_no_grace()
        };
        match why_not {
            None => {
                let grace = backend.start_grace(now, self.options.removal_grace);
                info!(service = %service, addr = %backend.addr, id = %backend.instance_id, grace = ?self.options.removal_grace, "key gone from etcd but the instance is connected and SERVING: removal deferred, still callable");
                metrics::removal_deferred(service);
                debug!(addr = %backend.addr, until = ?grace.until, "removal grace started");
                self.graced.insert(backend.addr.clone());
                true
            }
            Some(why) => {
                debug!(service = %service, addr = %backend.addr, id = %backend.instance_id, why = why.label(), "instance removed without grace");
                false
            }
        }
    }

    /// Creates the backend for `instance` at `addr` and starts its connection task.
    fn start_backend(
        &mut self,
        backends: &mut BTreeMap<Arc<str>, Arc<Backend>>,
        addr: &Arc<str>,
        instance: &Instance,
    ) {
        let target = match Target::new(addr, &self.dial) {
            Ok(target) => target,
            Err(error) => {
                tracing::warn!(addr = %addr, error, "skipping an instance whose address cannot be dialled");
                return;
            }
        };
        let backend = Arc::new(Backend::new(
            self.shared.service.clone(),
            addr.clone(),
            instance.id.as_str().into(),
            instance.metadata.clone(),
        ));
        let backend_stop = self.stop.child_token();
        let on_change = {
            let shared = Arc::downgrade(&self.shared);
            move || {
                if let Some(shared) = shared.upgrade() {
                    shared.request_rebuild();
                }
            }
        };
        tokio::spawn(connection::maintain(
            backend.clone(),
            target,
            self.options.health_check_interval,
            on_change,
            connection::FirstAttempt::new(&self.shared.connecting),
            backend_stop.clone(),
        ));
        backends.insert(addr.clone(), backend);
        self.stops.insert(addr.clone(), backend_stop.drop_guard());
    }

    /// Removes the backends whose removal grace is over (expired, or the instance can no longer
    /// serve). Looks at the backends in grace only.
    fn end_graces(&mut self) {
        if self.graced.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut backends = self.shared.backends.locked();
        let mut ended = false;
        self.graced.retain(|addr| {
            let Some(backend) = backends.get(addr) else {
                return false;
            };
            let Some(why) = backend.grace_over(now) else {
                return true;
            };
            drop_after_grace(&self.shared.service, backend, why, now);
            backends.remove(addr);
            self.stops.remove(addr);
            ended = true;
            false
        });
        if ended {
            self.shared.request_rebuild();
        }
    }

    /// When the first of the graces in progress ends at the latest.
    fn next_grace_end(&self) -> Option<Instant> {
        if self.graced.is_empty() {
            return None;
        }
        let backends = self.shared.backends.locked();
        self.graced
            .iter()
            .filter_map(|addr| backends.get(addr)?.grace())
            .map(|g| g.until)
            .min()
    }
}

/// Logs and counts the end of a grace that removes the instance.
fn drop_after_grace(service: &str, backend: &Backend, why: NoGrace, now: Instant) {
    let kept = backend
        .grace()
        .map_or(Duration::ZERO, |g| now.saturating_duration_since(g.since));
    info!(service, addr = %backend.addr, id = %backend.instance_id, why = why.label(), ?kept, "removal grace over; instance removed");
    metrics::grace_ended(service, why.label());
}

//! The pool of backends: the updater task that turns discovery's membership into one backend per
//! address, starts and stops their connection tasks, and keeps an instance whose key disappeared
//! while it could still serve for the removal grace.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Endpoint;
use tracing::{debug, info};

use super::{BalanceOptions, Shared, backend::Backend, connection};
use crate::{
    discover::{Instance, InstanceMap, Membership},
    metrics,
};

/// The updater task: turns membership snapshots into backends.
pub(super) async fn follow(
    mut membership: watch::Receiver<Membership>,
    shared: Arc<Shared>,
    options: BalanceOptions,
    stop: CancellationToken,
) {
    let mut stops: BTreeMap<Arc<str>, DropGuard> = BTreeMap::new();
    // Addresses in removal grace: the only backends a grace check looks at.
    let mut graced: BTreeSet<Arc<str>> = BTreeSet::new();
    let mut membership_changed = true;
    loop {
        if membership_changed {
            let instances = membership.borrow_and_update().instances.clone();
            reconcile(
                &shared,
                &instances,
                &options,
                &stop,
                &mut stops,
                &mut graced,
            );
            // Applied: from here a failed pick no longer waits for this snapshot. Recorded before
            // the rebuild, whose notification wakes the calls waiting for it.
            *shared.applied.lock().unwrap_or_else(|p| p.into_inner()) = instances;
        } else {
            end_graces(&shared, &mut stops, &mut graced);
        }
        metrics::in_grace(&shared.service, graced.len());
        shared.rebuild();
        let next_end = next_grace_end(&shared, &graced);
        membership_changed = tokio::select! {
            _ = stop.cancelled() => return,
            changed = membership.changed() => if changed.is_err() { return } else { true },
            _ = shared.grace_changed.notified(), if !graced.is_empty() => false,
            _ = sleep_until_some(next_end) => false,
        };
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// When the first of the graces in progress ends at the latest.
fn next_grace_end(shared: &Shared, graced: &BTreeSet<Arc<str>>) -> Option<Instant> {
    let backends = shared.backends.lock().unwrap_or_else(|p| p.into_inner());
    graced
        .iter()
        .filter_map(|addr| backends.get(addr)?.grace())
        .map(|g| g.until)
        .min()
}

/// Removes the backends whose removal grace is over (expired, or the instance can no longer
/// serve). Looks at the backends in grace only.
fn end_graces(
    shared: &Shared,
    stops: &mut BTreeMap<Arc<str>, DropGuard>,
    graced: &mut BTreeSet<Arc<str>>,
) {
    let now = Instant::now();
    let mut backends = shared.backends.lock().unwrap_or_else(|p| p.into_inner());
    graced.retain(|addr| {
        let Some(backend) = backends.get(addr) else {
            return false;
        };
        let Some(why) = backend.grace_over(now) else {
            return true;
        };
        drop_after_grace(&shared.service, backend, why, now);
        backends.remove(addr);
        stops.remove(addr);
        false
    });
}

/// Logs and counts the end of a grace that removes the instance.
fn drop_after_grace(service: &str, backend: &Backend, why: &'static str, now: Instant) {
    let kept = backend
        .grace()
        .map_or(Duration::ZERO, |g| now.saturating_duration_since(g.since));
    info!(service, addr = %backend.addr, id = %backend.instance_id, why, ?kept, "removal grace over; instance removed");
    metrics::grace_ended(service, why);
}

/// Makes the backends match `instances`: one per distinct address, plus those kept in removal
/// grace (recorded in `graced`). The caller rebuilds the picker.
fn reconcile(
    shared: &Arc<Shared>,
    instances: &InstanceMap,
    options: &BalanceOptions,
    stop: &CancellationToken,
    stops: &mut BTreeMap<Arc<str>, DropGuard>,
    graced: &mut BTreeSet<Arc<str>>,
) {
    // One backend per address; if several instances share one, the first (by id) describes it.
    let mut wanted: BTreeMap<Arc<str>, &Instance> = BTreeMap::new();
    for instance in instances.values() {
        wanted
            .entry(instance.addr.as_str().into())
            .or_insert(instance);
    }
    {
        let mut backends = shared.backends.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Dropping a guard stops that backend's maintainer, which closes its connection once the
        // calls in flight on it complete. An instance that can still serve is kept for the
        // removal grace instead: its key may be gone only because its lease expired while etcd
        // had no quorum, and its new registration is on the way.
        backends.retain(|addr, backend| {
            if wanted.contains_key(addr) {
                return true;
            }
            if backend.grace().is_some() {
                return match backend.grace_over(now) {
                    None => true,
                    Some(why) => {
                        drop_after_grace(&shared.service, backend, why, now);
                        graced.remove(addr);
                        stops.remove(addr);
                        false
                    }
                };
            }
            let why_not = if options.removal_grace.is_zero() {
                Some("removal grace off")
            } else {
                backend.why_no_grace()
            };
            match why_not {
                None => {
                    let grace = backend.start_grace(now, options.removal_grace);
                    info!(service = %shared.service, addr = %backend.addr, id = %backend.instance_id, grace = ?options.removal_grace, "key gone from etcd but the instance is connected and SERVING: removal deferred, still callable");
                    metrics::removal_deferred(&shared.service);
                    debug!(addr = %backend.addr, until = ?grace.until, "removal grace started");
                    graced.insert(addr.clone());
                    true
                }
                Some(why) => {
                    debug!(service = %shared.service, addr = %backend.addr, id = %backend.instance_id, why, "instance removed without grace");
                    stops.remove(addr);
                    false
                }
            }
        });
        for (addr, instance) in wanted {
            match backends.get(&addr) {
                // Same instance: its metadata may have changed; registered again after a grace,
                // it simply carries on.
                Some(backend) if *backend.instance_id == *instance.id => {
                    backend.set_metadata(&instance.metadata);
                    if let Some(grace) = backend.end_grace() {
                        graced.remove(&addr);
                        info!(service = %shared.service, addr = %backend.addr, id = %backend.instance_id, kept = ?now.saturating_duration_since(grace.since), "instance registered again during its removal grace; it continues");
                        metrics::grace_ended(&shared.service, "registered again");
                    }
                    continue;
                }
                // Another instance now at this address (a restart under a new id): start afresh.
                Some(_) => {
                    backends.remove(&addr);
                    stops.remove(&addr);
                    graced.remove(&addr);
                }
                None => {}
            }
            let Some(endpoint) = endpoint(&addr, options) else {
                continue;
            };
            let backend = Arc::new(Backend::new(
                shared.service.clone(),
                addr.clone(),
                instance.id.as_str().into(),
                instance.metadata.clone(),
            ));
            let backend_stop = stop.child_token();
            let on_change = {
                let shared = Arc::downgrade(shared);
                let backend = Arc::downgrade(&backend);
                move || {
                    if let Some(shared) = shared.upgrade() {
                        shared.rebuild();
                        // A backend in grace may have to leave now: wake the updater (a stored
                        // permit, so a change while it is busy is not lost).
                        if backend.upgrade().is_some_and(|b| b.grace().is_some()) {
                            shared.grace_changed.notify_one();
                        }
                    }
                }
            };
            tokio::spawn(connection::maintain(
                backend.clone(),
                endpoint,
                options.health_check_interval,
                on_change,
                backend_stop.clone(),
            ));
            backends.insert(addr.clone(), backend);
            stops.insert(addr, backend_stop.drop_guard());
        }
    }
}

/// The tonic endpoint for one instance. Discovery only admits dialable addresses, so this fails only
/// if the two disagree; the instance is then skipped with a warning.
fn endpoint(addr: &str, options: &BalanceOptions) -> Option<Endpoint> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).and_then(|endpoint| {
        // No `.timeout()`: deadlines are enforced per call, across retries, in `Shared::call`.
        let endpoint = endpoint
            .connect_timeout(options.connect_timeout)
            .http2_keep_alive_interval(options.keep_alive_interval)
            .keep_alive_timeout(options.keep_alive_timeout);
        match &options.tls {
            Some(tls) => endpoint.tls_config(tls.clone()),
            None => Ok(endpoint),
        }
    });
    match endpoint {
        Ok(endpoint) => Some(endpoint),
        Err(error) => {
            tracing::warn!(addr, %error, "skipping an instance whose address is not a valid URI or TLS setting");
            None
        }
    }
}

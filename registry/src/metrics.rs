//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: the library records, the
//! application decides where they go (the binaries export them for Prometheus with
//! `--metrics-addr`). Without an installed recorder every call here is a no-op.
//!
//! Names follow Prometheus conventions: a `registry_` prefix, units in the name, `_total` for
//! counters. Labels: `service` (the service name), `instance` (an instance's address), `prefix`
//! (the key prefix discovery watches), `key` (a registration's etcd key).

use std::{sync::RwLock, time::Duration};

use tokio::time::Instant;

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};

/// Calls answered by an instance (one per attempt), labelled `service`, `instance`.
pub const CALLS: &str = "registry_calls_total";
/// Attempts that failed on an instance (transport error, deadline, failing status).
pub const CALL_ERRORS: &str = "registry_call_errors_total";
/// Time from sending a call to its answer's headers, per `service`.
pub const CALL_DURATION: &str = "registry_call_duration_seconds";
/// Times an instance left the rotation, with `reason`: `connection`, `health` or `outlier`.
pub const EJECTIONS: &str = "registry_instance_ejections_total";
/// Times an instance came back into the rotation.
pub const READMISSIONS: &str = "registry_instance_readmissions_total";
/// Instances discovery knows of, per `service`.
pub const INSTANCES_KNOWN: &str = "registry_instances_known";
/// Instances in rotation (connected, serving, selected), per `service`.
pub const INSTANCES_READY: &str = "registry_instances_ready";
/// Membership changes applied from etcd, per watched `prefix`.
pub const DISCOVERY_UPDATES: &str = "registry_discovery_updates_total";
/// Full re-lists, per watched `prefix`, with `reason`: `compacted`, `cancelled` or `rebuilt`.
pub const DISCOVERY_RELISTS: &str = "registry_discovery_relists_total";
/// 1 while a registration's key is in etcd under a live lease, 0 otherwise; per `key`.
pub const REGISTERED: &str = "registry_registered";
/// Registrations after the first: a lost lease replaced; per `key`.
pub const REREGISTRATIONS: &str = "registry_reregistrations_total";
/// The key put back after someone deleted it; per `key`.
pub const KEY_RESTORES: &str = "registry_key_restores_total";
/// Removals deferred by the removal grace (the key was gone, the instance connected and
/// SERVING); per `service`.
pub const REMOVALS_DEFERRED: &str = "registry_removals_deferred_total";
/// Removal graces that ended, per `service`, with `reason`: `registered again`, `grace expired`,
/// `connection lost`, `NOT_SERVING`, `health check failed`, `announced draining`, `not connected`.
pub const GRACE_ENDED: &str = "registry_removal_grace_ended_total";
/// Instances kept callable in removal grace right now, per `service`.
pub const INSTANCES_IN_GRACE: &str = "registry_instances_in_grace";
/// Instances this client connects to: all known ones, or its subset when
/// [`Subsetting`](crate::Subsetting) applies; per `service`.
pub const INSTANCES_IN_SUBSET: &str = "registry_instances_in_subset";
/// Round trip of a lease keep-alive, from send to etcd's reply; per `key`.
pub const KEEPALIVE_RTT: &str = "registry_lease_keepalive_rtt_seconds";

/// Registers the descriptions (HELP lines) of every metric; call once after installing a recorder.
pub fn describe() {
    describe_counter!(CALLS, "Calls answered by an instance (one per attempt).");
    describe_counter!(CALL_ERRORS, "Attempts that failed on an instance.");
    describe_histogram!(
        CALL_DURATION,
        Unit::Seconds,
        "Time from sending a call to its answer."
    );
    describe_counter!(EJECTIONS, "Times an instance left the rotation, by reason.");
    describe_counter!(
        READMISSIONS,
        "Times an instance came back into the rotation."
    );
    describe_gauge!(INSTANCES_KNOWN, "Instances discovery knows of.");
    describe_gauge!(
        INSTANCES_READY,
        "Instances in rotation: connected, serving, selected."
    );
    describe_counter!(DISCOVERY_UPDATES, "Membership changes applied from etcd.");
    describe_counter!(
        DISCOVERY_RELISTS,
        "Full re-lists of a service's prefix, by reason."
    );
    describe_gauge!(REGISTERED, "1 while the key is in etcd under a live lease.");
    describe_counter!(REREGISTRATIONS, "Registrations that replaced a lost lease.");
    describe_counter!(
        KEY_RESTORES,
        "Times the key was put back after being deleted."
    );
    describe_counter!(
        REMOVALS_DEFERRED,
        "Removals deferred because the instance was connected and SERVING."
    );
    describe_counter!(GRACE_ENDED, "Removal graces that ended, by reason.");
    describe_gauge!(
        INSTANCES_IN_GRACE,
        "Instances whose key is gone, kept callable in removal grace."
    );
    describe_gauge!(
        INSTANCES_IN_SUBSET,
        "Instances this client connects to (its subset, or all when subsetting is off)."
    );
    describe_histogram!(KEEPALIVE_RTT, Unit::Seconds, "Lease keep-alive round trip.");
}

/// The per-call metrics of one instance, looked up once when its backend is created so the call
/// path does not build labels (with no recorder installed these are no-ops).
/// How often an instance's metric handles are fetched from the recorder again. Exporters drop
/// series that stay idle (the binaries' Prometheus exporter after [`IDLE_SERIES_DROPPED_AFTER`]),
/// so that addresses gone under churn do not pile up; a handle kept across such a drop would
/// update a series nobody sees. Fetching again more often than the idle timeout means a handle is
/// never older than that: a series that was dropped was idle, and is recreated on its next use.
const HANDLES_REFRESHED_EVERY: Duration = Duration::from_secs(60);

/// How long a counter or histogram series may go without an update before the binaries'
/// exporter drops it (gauges are kept: they are set when they change, not when they are true).
pub const IDLE_SERIES_DROPPED_AFTER: Duration = Duration::from_secs(300);

/// Per-instance call metrics: the handles, and when they were fetched.
#[derive(Debug)]
pub(crate) struct InstanceMetrics {
    service: String,
    instance: String,
    handles: RwLock<(Instant, InstanceHandles)>,
}

#[derive(Debug)]
struct InstanceHandles {
    calls: Counter,
    errors: Counter,
    duration: Histogram,
}

impl InstanceHandles {
    fn fetch(service: &str, instance: &str) -> Self {
        let labels = [
            ("service", service.to_owned()),
            ("instance", instance.to_owned()),
        ];
        Self {
            calls: counter!(CALLS, &labels),
            errors: counter!(CALL_ERRORS, &labels),
            duration: histogram!(CALL_DURATION, "service" => service.to_owned()),
        }
    }
}

impl InstanceMetrics {
    pub(crate) fn new(service: &str, instance: &str) -> Self {
        Self {
            service: service.to_owned(),
            instance: instance.to_owned(),
            handles: RwLock::new((Instant::now(), InstanceHandles::fetch(service, instance))),
        }
    }

    /// Records one attempt; `now` is the caller's clock reading (one per call).
    pub(crate) fn call(&self, now: Instant, elapsed: Duration, failed: bool) {
        let read = crate::sync::read(&self.handles);
        if now.saturating_duration_since(read.0) < HANDLES_REFRESHED_EVERY {
            record(&read.1, elapsed, failed);
            return;
        }
        drop(read);
        let mut write = crate::sync::write(&self.handles);
        *write = (now, InstanceHandles::fetch(&self.service, &self.instance));
        record(&write.1, elapsed, failed);
    }
}

fn record(handles: &InstanceHandles, elapsed: Duration, failed: bool) {
    handles.calls.increment(1);
    if failed {
        handles.errors.increment(1);
    }
    handles.duration.record(elapsed);
}

pub(crate) fn ejected(service: &str, instance: &str, reason: &'static str) {
    counter!(EJECTIONS, "service" => service.to_owned(), "instance" => instance.to_owned(), "reason" => reason)
        .increment(1);
}

pub(crate) fn readmitted(service: &str, instance: &str) {
    counter!(READMISSIONS, "service" => service.to_owned(), "instance" => instance.to_owned())
        .increment(1);
}

pub(crate) fn instances(service: &str, known: usize, ready: usize) {
    gauge!(INSTANCES_KNOWN, "service" => service.to_owned()).set(known as f64);
    gauge!(INSTANCES_READY, "service" => service.to_owned()).set(ready as f64);
}

pub(crate) fn removal_deferred(service: &str) {
    counter!(REMOVALS_DEFERRED, "service" => service.to_owned()).increment(1);
}

pub(crate) fn grace_ended(service: &str, reason: &'static str) {
    counter!(GRACE_ENDED, "service" => service.to_owned(), "reason" => reason).increment(1);
}

pub(crate) fn in_grace(service: &str, count: usize) {
    gauge!(INSTANCES_IN_GRACE, "service" => service.to_owned()).set(count as f64);
}

pub(crate) fn in_subset(service: &str, count: usize) {
    gauge!(INSTANCES_IN_SUBSET, "service" => service.to_owned()).set(count as f64);
}

pub(crate) fn discovery_update(prefix: &str) {
    counter!(DISCOVERY_UPDATES, "prefix" => prefix.to_owned()).increment(1);
}

pub(crate) fn relist(prefix: &str, reason: &'static str) {
    counter!(DISCOVERY_RELISTS, "prefix" => prefix.to_owned(), "reason" => reason).increment(1);
}

pub(crate) fn registered(key: &str, registered: bool) {
    gauge!(REGISTERED, "key" => key.to_owned()).set(if registered { 1.0 } else { 0.0 });
}

pub(crate) fn reregistered(key: &str) {
    counter!(REREGISTRATIONS, "key" => key.to_owned()).increment(1);
}

pub(crate) fn key_restored(key: &str) {
    counter!(KEY_RESTORES, "key" => key.to_owned()).increment(1);
}

pub(crate) fn keepalive_rtt(key: &str, rtt: Duration) {
    histogram!(KEEPALIVE_RTT, "key" => key.to_owned()).record(rtt);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use metrics::{Gauge, Key, KeyName, Metadata, Recorder, SharedString};

    use super::*;

    /// Counts how often counters are fetched from it.
    #[derive(Default)]
    struct Fetches(AtomicUsize);

    impl Recorder for Fetches {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            self.0.fetch_add(1, Ordering::Relaxed);
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn instance_handles_are_fetched_again_before_an_exporter_could_drop_them() {
        assert!(HANDLES_REFRESHED_EVERY < IDLE_SERIES_DROPPED_AFTER);
        let recorder = Fetches::default();
        metrics::with_local_recorder(&recorder, || {
            let start = Instant::now();
            let m = InstanceMetrics::new("s", "127.0.0.1:1");
            // calls and errors
            assert_eq!(recorder.0.load(Ordering::Relaxed), 2);
            m.call(start + Duration::from_secs(1), Duration::ZERO, false);
            m.call(start + Duration::from_secs(59), Duration::ZERO, true);
            assert_eq!(
                recorder.0.load(Ordering::Relaxed),
                2,
                "fresh handles reused"
            );
            let refreshed = start + HANDLES_REFRESHED_EVERY + Duration::from_secs(1);
            m.call(refreshed, Duration::ZERO, false);
            assert_eq!(
                recorder.0.load(Ordering::Relaxed),
                4,
                "old handles fetched again"
            );
            m.call(refreshed + Duration::from_secs(59), Duration::ZERO, false);
            assert_eq!(recorder.0.load(Ordering::Relaxed), 4);
        });
    }
}

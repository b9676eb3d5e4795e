//! One instance as the balancer sees it: its identity and metadata, its connection while it has
//! one, what its health checks say, its calls in flight (for `least_request`), its record of
//! consecutive failures (outlier ejection), and what the removal grace needs: whether its last
//! health check was answered, which connection it is on, and the grace in progress, if any.
//!
//! The connection itself is kept by the task in [`super::connection`]; this file is the state that
//! task, the picker and the calls share.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::transport::Connection;
use crate::metrics;
use crate::sync::Unpoisoned;

/// One instance the balancer may pick: its identity, what it says about itself, and, while
/// connected, its connection.
#[derive(Debug)]
pub(crate) struct Backend {
    /// The service, for metrics.
    pub(super) service: Arc<str>,
    pub(crate) addr: Arc<str>,
    pub(crate) instance_id: Arc<str>,
    /// The instance's metadata; replaced in place when its record changes.
    pub(super) metadata: Mutex<Arc<Value>>,
    pub(super) live: Mutex<Option<Live>>,
    /// What the instance's grpc.health.v1 service says; true when it has none.
    pub(super) serving: AtomicBool,
    /// Whether the last health check got an answer (false after a timeout or an error), so a
    /// removal grace is not given to an instance that stopped answering.
    pub(super) health_answered: AtomicBool,
    /// Counts the connections made, so a removal grace given on one connection ends with it
    /// even if a new one is up before the updater looks again.
    pub(super) connections: AtomicU64,
    /// Set while the instance's key is gone from etcd but the instance is kept callable (see
    /// [`crate::BalanceOptions::removal_grace`]).
    pub(super) grace: Mutex<Option<Grace>>,
    /// Calls sent and not yet answered, for `least_request`.
    pub(super) in_flight: AtomicUsize,
    pub(super) outlier: Mutex<Outlier>,
    /// When the ejection in progress ends ([`since_epoch`]), 0 when none: read by every pick,
    /// so it is an atomic rather than behind the outlier lock.
    ejected_until: AtomicU64,
    /// Whether the outlier record holds anything a success must clear: most calls succeed on an
    /// instance with a clean record and need not take the lock.
    outlier_dirty: AtomicBool,
    /// Mirrors whether `live` holds a connection, for the picks that only ask.
    connected: AtomicBool,
    pub(crate) metrics: metrics::InstanceMetrics,
}

/// A removal grace in progress: the instance's key disappeared while it was connected and
/// serving, and it stays callable until `until` unless something says it cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grace {
    /// When the key disappeared (as applied by the balancer).
    pub(crate) since: Instant,
    /// When the grace ends at the latest.
    pub(crate) until: Instant,
    /// The connection the grace was given on.
    connection: u64,
}

/// Why an instance whose key is gone is not (or no longer) kept for the removal grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoGrace {
    /// The balancer's option is zero.
    Off,
    NotConnected,
    /// Its record announced that it is leaving.
    Draining,
    NotServing,
    /// Its last health check got no answer.
    HealthCheckFailed,
    /// The connection the grace was given on closed.
    ConnectionLost,
    /// The grace ran its full length.
    Expired,
}

impl NoGrace {
    /// The text logs and the `reason` label of [`crate::metrics::GRACE_ENDED`] use.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Off => "removal grace off",
            Self::NotConnected => "not connected",
            Self::Draining => "announced draining",
            Self::NotServing => "NOT_SERVING",
            Self::HealthCheckFailed => "health check failed",
            Self::ConnectionLost => "connection lost",
            Self::Expired => "grace expired",
        }
    }
}

/// Passive outlier detection: consecutive failures eject an instance for a while.
#[derive(Debug, Clone)]
pub struct OutlierPolicy {
    /// Consecutive failed calls that eject an instance; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// First ejection's length; doubled for each ejection in a row, up to `max_ejection`.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Outlier {
    pub(super) consecutive: u32,
    /// Ejections since the instance last served a call.
    pub(super) ejections: u32,
}

/// `instant` as nanoseconds since the first time this was asked (never 0 for a later instant),
/// so that an instant fits in an atomic.
fn since_epoch(instant: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_nanos(1));
    u64::try_from(instant.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// A connection and the token its socket fires when it closes.
#[derive(Debug)]
pub(super) struct Live {
    pub(super) connection: Connection,
    pub(super) closed: CancellationToken,
}

impl Backend {
    pub(crate) fn new(
        service: Arc<str>,
        addr: Arc<str>,
        instance_id: Arc<str>,
        metadata: Value,
    ) -> Self {
        let metrics = metrics::InstanceMetrics::new(&service, &addr);
        Self {
            service,
            addr,
            instance_id,
            metadata: Mutex::new(Arc::new(metadata)),
            live: Mutex::new(None),
            serving: AtomicBool::new(true),
            health_answered: AtomicBool::new(true),
            connections: AtomicU64::new(0),
            grace: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            outlier: Mutex::new(Outlier::default()),
            ejected_until: AtomicU64::new(0),
            outlier_dirty: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            metrics,
        }
    }

    pub(crate) fn metadata(&self) -> Arc<Value> {
        self.metadata.locked().clone()
    }

    /// Replaces the metadata; true if it changed.
    pub(crate) fn set_metadata(&self, metadata: &Value) -> bool {
        let mut current = self.metadata.locked();
        if **current == *metadata {
            return false;
        }
        *current = Arc::new(metadata.clone());
        true
    }

    /// The `weight` metadata: a non-negative integer (number or text), 1 when absent or unreadable.
    pub(crate) fn weight(&self) -> u32 {
        super::select::text(&self.metadata(), "weight")
            .and_then(|w| w.parse().ok())
            .unwrap_or(1)
    }

    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Whether the record says the instance is leaving (metadata `draining` true, as a boolean
    /// or as text): it is sent nothing more and gets no removal grace.
    pub(crate) fn is_draining(&self) -> bool {
        crate::endpoint::is_draining(&self.metadata())
    }

    /// Why the instance may not be kept after its key disappeared, or `None` if it may: it must
    /// be connected, have answered its last health check with SERVING, and not be draining.
    pub(crate) fn why_no_grace(&self) -> Option<NoGrace> {
        if !self.is_ready() {
            Some(NoGrace::NotConnected)
        } else if self.is_draining() {
            Some(NoGrace::Draining)
        } else if !self.is_serving() {
            Some(NoGrace::NotServing)
        } else if !self.health_answered.load(Ordering::Acquire) {
            Some(NoGrace::HealthCheckFailed)
        } else {
            None
        }
    }

    /// The removal grace in progress, if any.
    pub(crate) fn grace(&self) -> Option<Grace> {
        *self.grace.locked()
    }

    /// Keeps the instance callable for `length` from `now` on its current connection.
    pub(crate) fn start_grace(&self, now: Instant, length: Duration) -> Grace {
        let grace = Grace {
            since: now,
            until: now + length,
            connection: self.connections.load(Ordering::Acquire),
        };
        *self.grace.locked() = Some(grace);
        grace
    }

    /// Ends the removal grace (the instance was registered again).
    pub(crate) fn end_grace(&self) -> Option<Grace> {
        self.grace.locked().take()
    }

    /// Why the grace in progress must end at `now`, or `None` while it holds (or there is none).
    pub(crate) fn grace_over(&self, now: Instant) -> Option<NoGrace> {
        let grace = self.grace()?;
        if grace.connection != self.connections.load(Ordering::Acquire) {
            return Some(NoGrace::ConnectionLost);
        }
        if let Some(why) = self.why_no_grace() {
            return Some(why);
        }
        (now >= grace.until).then_some(NoGrace::Expired)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a call in flight until the guard is dropped.
    pub(crate) fn start_call(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether the instance is ejected for failing (at `now`).
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && since_epoch(now) < until
    }

    pub(crate) fn record_success(&self) {
        if !self.outlier_dirty.load(Ordering::Acquire) {
            return;
        }
        let mut outlier = self.outlier.locked();
        outlier.consecutive = 0;
        outlier.ejections = 0;
        self.outlier_dirty.store(false, Ordering::Release);
    }

    /// Counts a failed call; ejects the instance when that makes `policy.consecutive_failures`
    /// in a row. Returns the ejection's length when it ejected.
    pub(crate) fn record_failure(&self, policy: &OutlierPolicy, now: Instant) -> Option<Duration> {
        let mut outlier = self.outlier.locked();
        if self.is_ejected(now) {
            // Calls already in flight when the instance was ejected: they say nothing new, and
            // counting them would turn one burst into an ever longer ejection.
            return None;
        }
        self.outlier_dirty.store(true, Ordering::Release);
        outlier.consecutive += 1;
        if policy.consecutive_failures == 0 || outlier.consecutive < policy.consecutive_failures {
            return None;
        }
        let doubling = 2u32.saturating_pow(outlier.ejections.min(16));
        let length = policy
            .base_ejection
            .saturating_mul(doubling)
            .min(policy.max_ejection);
        outlier.consecutive = 0;
        outlier.ejections += 1;
        self.ejected_until
            .store(since_epoch(now + length), Ordering::Release);
        Some(length)
    }

    /// A new connection is a fresh start: failures of the old one do not count.
    pub(super) fn reset_outlier(&self) {
        *self.outlier.locked() = Outlier::default();
        self.ejected_until.store(0, Ordering::Release);
        self.outlier_dirty.store(false, Ordering::Release);
    }

    /// The connection to call on, if the instance is connected.
    pub(crate) fn connection(&self) -> Option<Connection> {
        self.live().as_ref().map(|live| live.connection.clone())
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// A call failed at the transport level: stop picking this instance now and let the maintainer
    /// reconnect, rather than wait for the socket to report the same thing.
    pub(crate) fn report_broken(&self) {
        if let Some(live) = self.live().as_ref() {
            live.closed.cancel();
        }
    }

    pub(super) fn set(&self, live: Option<Live>) {
        let mut current = self.live();
        self.connected.store(live.is_some(), Ordering::Release);
        *current = live;
    }

    fn live(&self) -> MutexGuard<'_, Option<Live>> {
        self.live.locked()
    }
}

/// A call in flight on a backend; dropping it ends the call.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

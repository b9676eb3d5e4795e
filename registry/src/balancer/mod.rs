//! A client-side balanced channel: calls spread by a [`Policy`] (round robin by default) over the
//! instances that are usable right now, fed by [`Discovery`], usable anywhere a tonic `Channel` is
//! (`GreeterClient::new(channel)`).
//!
//! Shape of the machinery:
//! - an *updater* task follows discovery's snapshots and keeps one `Backend` per distinct address,
//!   adding and removing them as instances come and go (applied as events arrive, not lazily when a
//!   request happens to flow, unlike tonic's `balance_channel`);
//! - each backend has a *maintainer* task (`connection.rs`) holding one HTTP/2 connection and
//!   reconnecting it with backoff when its socket closes;
//! - the picker is an immutable snapshot of the usable backends (connected, SERVING, weight above 0,
//!   admitted by the [`Selector`]), rebuilt on every change; for round robin a call costs a read
//!   lock, an atomic increment and a channel clone;
//! - an instance whose key disappears from etcd while it is connected and answering SERVING is
//!   kept callable for a bounded *removal grace* ([`BalanceOptions::removal_grace`]): discovery
//!   reports the truth (the key is gone), the balancer knows whether the instance can still serve.
//!   It leaves on its re-registration (then it simply continues), a lost connection, NOT_SERVING,
//!   an unanswered health check, or the end of the grace. An instance whose record says it is
//!   draining leaves the rotation on that record and gets no grace;
//! - each call has one deadline; a failure that is safe to retry is sent again to another instance
//!   (`retry`); consecutive failures eject an instance for a while ([`OutlierPolicy`]).
//!
//! A call never waits for an instance to appear: with none registered, or none reachable, it fails
//! at once with `UNAVAILABLE` naming the service. Only while the channel is still starting (first
//! list not done, or an instance still making its first connection) does a call wait, and never
//! past its deadline.
//!
//! # Layout
//! - this file: [`BalancedChannel`], its options and what it reports;
//! - `pool`: the updater task, turning discovery's membership into one backend per address, with
//!   the removal grace;
//! - `backend`: one instance's state (identity, metadata, health, calls in flight, ejection, grace);
//! - `connection`: the task keeping one backend's HTTP/2 connection up and its health followed;
//! - `transport`: one HTTP/2 connection (TCP, TLS, hyper's handshake, the socket watched) and the
//!   handle calls are sent on;
//! - `picker`: the policies over the usable backends, rebuilt when they change;
//! - `call`: one call, with its deadline, waiting while the channel starts, and its retries;
//! - `retry`: what may be retried, the budget, request replay;
//! - `select`: choosing instances by metadata.

mod backend;
mod call;
mod connection;
mod picker;
mod pool;
pub(crate) mod retry;
pub(crate) mod select;
mod subset;
mod transport;

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::body::Body;

pub use backend::OutlierPolicy;
pub use picker::Policy;
pub use retry::RetryPolicy;
pub use select::Selector;
pub use subset::{SubsetStatus, Subsetting};

use crate::discover::{Discovery, Instances, Membership};
use crate::sync::Unpoisoned;
use backend::Backend;
use picker::Picker;
use retry::RetryBudget;

/// Boxed error type of the balanced channel's `Service` impl (what tonic's generated clients expect).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future of one call through [`BalancedChannel`].
pub(crate) type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send + 'static>>;

/// Tuning of the balanced channel.
#[derive(Debug, Clone)]
pub struct BalanceOptions {
    /// Deadline of every call that does not set a shorter one (`grpc-timeout`), retries included.
    pub call_timeout: Duration,
    /// Deadline for establishing a connection to one instance.
    pub connect_timeout: Duration,
    /// How long a connection with calls in flight may read nothing before it is probed with a
    /// health check; a frozen instance is dropped within `keep_alive_interval +
    /// keep_alive_timeout` of its last answer.
    pub keep_alive_interval: Duration,
    /// How long that probe may go unanswered before the connection is closed.
    pub keep_alive_timeout: Duration,
    /// Which failed calls are sent again, to another instance.
    pub retry: RetryPolicy,
    /// How calls are spread over the usable instances.
    pub policy: Policy,
    /// Which instances may be called, and which are preferred, by metadata.
    pub selector: Selector,
    /// Seed for the random choices of `random` and `least_request` (repeatable runs); `None` seeds
    /// from the system.
    pub seed: Option<u64>,
    /// When consecutive failures take an instance out of rotation for a while.
    pub outlier: OutlierPolicy,
    /// How often each connected instance is asked for its `grpc.health.v1` status.
    pub health_check_interval: Duration,
    /// TLS to the instances (from [`crate::Tls::balancer_config`]); `None` is plaintext.
    pub tls: Option<crate::tls::ClientTls>,
    /// How long an instance whose key disappeared from etcd stays callable while it is
    /// connected and its last health check answered SERVING; `Duration::ZERO` turns the grace
    /// off (removals then apply at once). It ends early on a re-registration of the same
    /// instance, a lost connection, NOT_SERVING, an unanswered health check, or a draining
    /// record. Covers lease expiries the instance could not prevent (etcd without quorum).
    pub removal_grace: Duration,
    /// Which instances this client connects to: all, or a subset of K of them once the service
    /// is large ([`Subsetting`]; by default subsets of 20 above 100 instances). The policy
    /// spreads calls within the subset.
    pub subset: Subsetting,
}

impl Default for BalanceOptions {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            // A connection is probed only when nothing has been read for `keep_alive_interval`
            // while calls are in flight (never when idle), so a frozen instance is dropped at most
            // 1.5 s after it stops answering. The probe is a health check, not an HTTP/2
            // ping, so no server counts it as ping abuse (GOAWAY "too_many_pings").
            keep_alive_interval: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_millis(500),
            retry: RetryPolicy::default(),
            policy: Policy::default(),
            selector: Selector::default(),
            seed: None,
            outlier: OutlierPolicy::default(),
            health_check_interval: Duration::from_secs(1),
            tls: None,
            // One default lease TTL: after quorum returns, a live server's new lease and PUT
            // follow the old lease's expiry within about a second, and a server that cannot
            // register again for a whole TTL is in trouble its clients should hear about.
            removal_grace: crate::DEFAULT_TTL,
            subset: Subsetting::default(),
        }
    }
}

/// The request header (gRPC metadata) carrying a call's key for [`Policy::ConsistentHash`]: calls
/// with the same key go to the same instance.
///
/// ```
/// let mut request = tonic::Request::new(());
/// request.metadata_mut().insert(registry::HASH_KEY, "user-42".parse().unwrap());
/// ```
pub const HASH_KEY: &str = "lb-hash-key";

/// The metadata key under which a failed call's status names the instance it went to (successful
/// calls carry [`ServedBy`] instead).
pub const INSTANCE: &str = "lb-instance";

/// What the channel knows about one instance right now: see [`BalancedChannel::instances`].
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    /// The address calls go to.
    pub addr: Arc<str>,
    /// The instance id registered for it.
    pub instance_id: Arc<str>,
    /// Its metadata.
    pub metadata: Arc<serde_json::Value>,
    /// Whether its connection is up.
    pub connected: bool,
    /// Whether it reports SERVING (or has no health service).
    pub serving: bool,
    /// Whether it is ejected for consecutive failures.
    pub ejected: bool,
    /// Whether calls may go to it now: connected, serving, selected, not ejected, not draining.
    pub in_rotation: bool,
    /// Calls in flight on it.
    pub in_flight: usize,
    /// Whether its record announces that it is leaving (metadata `draining`): sent nothing.
    pub draining: bool,
    /// Set while its key is gone from etcd but it is kept callable ([`BalanceOptions::removal_grace`]).
    pub removal_grace: Option<RemovalGrace>,
}

/// Why and until when an instance whose key is gone is still called: see [`InstanceStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovalGrace {
    /// When the channel applied the removal.
    pub since: Instant,
    /// When the instance leaves at the latest.
    pub until: Instant,
    /// Why it was kept, for display.
    pub why: &'static str,
}

/// What [`RemovalGrace::why`] says: the only reason an instance is kept.
const KEPT_WHY: &str = "key gone from etcd while connected and SERVING";

/// Which instance served a call: found in the response's extensions
/// (`response.extensions().get::<ServedBy>()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedBy {
    /// The address the call was sent to.
    pub addr: Arc<str>,
    /// The instance id registered for that address.
    pub instance_id: Arc<str>,
}

/// A gRPC channel that balances calls round robin over a service's live instances.
///
/// Cheap to clone; all clones share the connections. Background tasks (discovery, the updater, one
/// maintainer per instance) stop when the last clone is dropped.
///
/// ```no_run
/// use proto::helloworld::{greeter_client::GreeterClient, HelloRequest};
/// use registry::{BalanceOptions, BalancedChannel, Discovery, EtcdConfig};
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let etcd = EtcdConfig::new(["127.0.0.1:2379"])?.connect().await?;
/// let discovery = Discovery::builder("helloworld").start(&etcd)?;
/// let channel = BalancedChannel::new(discovery, BalanceOptions::default());
/// let mut client = GreeterClient::new(channel);
/// let reply = client.say_hello(HelloRequest { name: "world".into() }).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct BalancedChannel {
    shared: Arc<Shared>,
    owner: Arc<Owner>,
}

/// What keeps the background work alive: dropped with the last clone.
struct Owner {
    discovery: Discovery,
    _stop: DropGuard,
}

/// State shared by the channel clones, the updater and the maintainers.
struct Shared {
    service: Arc<str>,
    /// Discovery's snapshots: whether the first list has completed, and the instances it knows.
    membership: watch::Receiver<Membership>,
    /// The snapshot the updater last turned into backends: a snapshot of discovery's that is not
    /// this very one is known but not yet applied.
    applied: Mutex<Instances>,
    /// Backends whose first connection attempt has not ended yet.
    connecting: Arc<AtomicUsize>,
    /// Picker rebuilds asked for (by the updater, and by every connection or health change), and
    /// the request count the current picker reflects. While they differ, the picker may be
    /// behind, and a failed pick waits for the rebuild instead of failing.
    rebuild_requested: AtomicU64,
    rebuild_published: AtomicU64,
    /// Wakes the updater, which does the rebuilds.
    rebuild_wanted: Notify,
    /// Woken on every rebuild of the picker, for calls waiting for a first connection.
    changed: Notify,
    call_timeout: Duration,
    retry: RetryPolicy,
    budget: RetryBudget,
    policy: Policy,
    selector: Selector,
    seed: Option<u64>,
    outlier: OutlierPolicy,
    /// Every backend, by address; the updater is the only writer.
    backends: Mutex<BTreeMap<Arc<str>, Arc<Backend>>>,
    /// The policy over the usable backends (connected, serving, selected), in address order.
    picker: RwLock<Arc<Picker<Arc<Backend>>>>,
    /// Rotation counter shared by successive pickers, so a rebuild does not restart the rotation.
    next: AtomicUsize,
    /// Instances known and in this client's subset, as last applied.
    subset: subset::Counts,
}

impl BalancedChannel {
    /// Starts balancing over the instances `discovery` finds. Must be called inside a Tokio runtime.
    pub fn new(discovery: Discovery, options: BalanceOptions) -> Self {
        let shared = Arc::new(Shared {
            service: discovery.service().into(),
            membership: discovery.subscribe(),
            changed: Notify::new(),
            connecting: Arc::new(AtomicUsize::new(0)),
            rebuild_requested: AtomicU64::new(0),
            rebuild_published: AtomicU64::new(0),
            rebuild_wanted: Notify::new(),
            call_timeout: options.call_timeout,
            budget: RetryBudget::new(&options.retry),
            retry: options.retry.clone(),
            policy: options.policy,
            selector: options.selector.clone(),
            seed: options.seed,
            outlier: options.outlier.clone(),
            backends: Mutex::new(BTreeMap::new()),
            applied: Mutex::new(Instances::default()),
            picker: RwLock::new(Arc::new(Picker::new(
                options.policy,
                Vec::new(),
                options.seed,
            ))),
            next: AtomicUsize::new(0),
            subset: subset::Counts::default(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(pool::follow(
            discovery.subscribe(),
            shared.clone(),
            options,
            stop.clone(),
        ));
        Self {
            shared,
            owner: Arc::new(Owner {
                discovery,
                _stop: stop.drop_guard(),
            }),
        }
    }

    /// The discovery feeding this channel.
    pub fn discovery(&self) -> &Discovery {
        &self.owner.discovery
    }

    /// Addresses currently in rotation (connected, serving, admitted by the selector), in address
    /// order. Instances ejected for failing are still listed: their ejection ends by itself.
    pub fn ready_addrs(&self) -> Vec<Arc<str>> {
        self.shared
            .picker()
            .items()
            .iter()
            .map(|b| b.addr.clone())
            .collect()
    }

    /// Every instance the channel has a backend for (one per address), in address order, with its
    /// connection, health and rotation state: what a live view shows. With subsetting these are
    /// the subset's members (and instances in removal grace), not every known instance: see
    /// [`BalancedChannel::subset`].
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let picker = self.shared.picker();
        let now = Instant::now();
        let backends = self.shared.backends.locked();
        backends
            .values()
            .map(|b| {
                let ejected = b.is_ejected(now);
                InstanceStatus {
                    addr: b.addr.clone(),
                    instance_id: b.instance_id.clone(),
                    metadata: b.metadata(),
                    connected: b.is_ready(),
                    serving: b.is_serving(),
                    ejected,
                    in_rotation: !ejected && picker.items().iter().any(|p| p.addr == b.addr),
                    in_flight: b.in_flight(),
                    draining: b.is_draining(),
                    removal_grace: b.grace().map(|g| RemovalGrace {
                        since: g.since,
                        until: g.until,
                        why: KEPT_WHY,
                    }),
                }
            })
            .collect()
    }

    /// How many instances the channel knows and how many are in its subset (all, without
    /// subsetting): only those have backends, connections and health checks.
    pub fn subset(&self) -> SubsetStatus {
        self.shared.subset.get()
    }

    /// Addresses with a live connection, in rotation or not (e.g. not preferred by the selector, or
    /// reporting NOT_SERVING).
    pub fn connected_addrs(&self) -> Vec<Arc<str>> {
        self.shared.connected()
    }

    /// Waits until at least `min` instances are connected and in rotation.
    ///
    /// # Errors
    /// [`crate::Error::GaveUp`] after `timeout`.
    pub async fn wait_ready(&self, min: usize, timeout: Duration) -> crate::Result<()> {
        self.wait_until(min, timeout, "in rotation", |s| s.picker().items().len())
            .await
    }

    /// Waits until at least `min` instances are connected, whether or not in rotation.
    ///
    /// # Errors
    /// [`crate::Error::GaveUp`] after `timeout`.
    pub async fn wait_connected(&self, min: usize, timeout: Duration) -> crate::Result<()> {
        self.wait_until(min, timeout, "connected", |s| s.connected().len())
            .await
    }

    async fn wait_until(
        &self,
        min: usize,
        timeout: Duration,
        what: &str,
        count: impl Fn(&Shared) -> usize,
    ) -> crate::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Every change of connection, health or membership rebuilds the picker and notifies.
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = count(&self.shared);
            if now >= min {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(crate::Error::GaveUp {
                    what: format!(
                        "{min} instance(s) of service {:?} {what} ({now} so far, {} known)",
                        self.shared.service,
                        self.discovery().membership().instances.len()
                    ),
                    waited: timeout,
                });
            }
        }
    }
}

impl fmt::Debug for BalancedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("service", &self.shared.service)
            .field("ready", &self.ready_addrs())
            .finish()
    }
}

impl Shared {
    fn connected(&self) -> Vec<Arc<str>> {
        self.backends
            .locked()
            .values()
            .filter(|b| b.is_ready())
            .map(|b| b.addr.clone())
            .collect()
    }

    fn picker(&self) -> Arc<Picker<Arc<Backend>>> {
        // Poisoning cannot leave the Arc half-written; keep serving.
        crate::sync::read(&self.picker).clone()
    }
}

impl tower::Service<http::Request<Body>> for BalancedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: the instance is chosen per call, and a call with no instance fails at once
    /// rather than waiting here (waiting in `poll_ready` is how tonic's balancer hangs).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> ResponseFuture {
        Box::pin(self.shared.clone().call(request))
    }
}

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
//!   ([`crate::retry`]); consecutive failures eject an instance for a while ([`OutlierPolicy`]).
//!
//! A call never waits for an instance to appear: with none registered, or none reachable, it fails
//! at once with `UNAVAILABLE` naming the service. Only while the channel is still starting (first
//! list not done, or an instance still making its first connection) does a call wait, and never
//! past its deadline.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, RwLock, atomic::AtomicUsize},
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{
    Status,
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::ServiceExt;
use tracing::{debug, info, warn};

pub use crate::connection::OutlierPolicy;

use crate::{
    backoff::Backoff,
    connection::{self, Backend},
    discover::{Discovery, Instance, InstanceMap, Membership},
    error::chain,
    metrics,
    policy::{Candidate, Picker, Policy},
    retry::{
        Replay, RetryBudget, RetryPolicy, grpc_timeout, is_unavailable_response, never_sent,
        timed_out,
    },
    select::Selector,
};

/// Boxed error type of the balanced channel's `Service` impl (what tonic's generated clients expect).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future of one call through [`BalancedChannel`].
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send + 'static>>;

/// Tuning of the balanced channel.
#[derive(Debug, Clone)]
pub struct BalanceOptions {
    /// Deadline of every call that does not set a shorter one (`grpc-timeout`), retries included.
    pub call_timeout: Duration,
    /// Deadline for establishing a connection to one instance.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 keep-alive pings on a connection with calls in flight; a frozen instance
    /// is dropped after `keep_alive_interval + keep_alive_timeout`.
    pub keep_alive_interval: Duration,
    /// How long a keep-alive ping may go unanswered.
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
    /// TLS to the instances (e.g. from [`crate::tls::Tls::client_config`]); `None` is plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// How long an instance whose key disappeared from etcd stays callable while it is
    /// connected and its last health check answered SERVING; `Duration::ZERO` turns the grace
    /// off (removals then apply at once). It ends early on a re-registration of the same
    /// instance, a lost connection, NOT_SERVING, an unanswered health check, or a draining
    /// record. Covers lease expiries the instance could not prevent (etcd without quorum).
    pub removal_grace: Duration,
}

impl Default for BalanceOptions {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            // hyper pings only when nothing has been read for `keep_alive_interval` while calls
            // are in flight (never on idle connections, which grpc-go and grpc-core servers
            // punish with GOAWAY "too_many_pings"), so a frozen instance is dropped about 1.5 s
            // after it stops answering. Against grpc-core servers whose calls stay silent for
            // seconds, raise the interval: such servers also count pings during a silent call.
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
            removal_grace: crate::register::DEFAULT_TTL,
        }
    }
}

/// The request header (gRPC metadata) carrying a call's key for [`Policy::ConsistentHash`]: calls
/// with the same key go to the same instance.
///
/// ```
/// let mut request = tonic::Request::new(());
/// request.metadata_mut().insert(registry::balance::HASH_KEY, "user-42".parse().unwrap());
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
/// let discovery = Discovery::start(&etcd, "services", "helloworld")?;
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
    /// The instance set the updater last turned into backends. Discovery replaces its `Arc` on
    /// every change, so a snapshot whose `instances` is not this one is known but not yet applied.
    applied: Mutex<Arc<InstanceMap>>,
    /// Woken on every change of the rotation, for calls waiting for a first connection.
    changed: Notify,
    /// Woken when an instance in removal grace changes state, so the updater can end its grace.
    grace_changed: Notify,
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
}

impl BalancedChannel {
    /// Starts balancing over the instances `discovery` finds. Must be called inside a Tokio runtime.
    pub fn new(discovery: Discovery, options: BalanceOptions) -> Self {
        let shared = Arc::new(Shared {
            service: discovery.service().into(),
            membership: discovery.subscribe(),
            changed: Notify::new(),
            grace_changed: Notify::new(),
            call_timeout: options.call_timeout,
            budget: RetryBudget::new(&options.retry),
            retry: options.retry.clone(),
            policy: options.policy,
            selector: options.selector.clone(),
            seed: options.seed,
            outlier: options.outlier.clone(),
            backends: Mutex::new(BTreeMap::new()),
            applied: Mutex::new(Arc::default()),
            picker: RwLock::new(Arc::new(Picker::new(
                options.policy,
                Vec::new(),
                options.seed,
            ))),
            next: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(follow(
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
    /// connection, health and rotation state: what a live view shows.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let picker = self.shared.picker();
        let now = Instant::now();
        let backends = self
            .shared
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner());
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
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|b| b.is_ready())
            .map(|b| b.addr.clone())
            .collect()
    }

    fn picker(&self) -> Arc<Picker<Arc<Backend>>> {
        // Poisoning cannot leave the Arc half-written; keep serving.
        self.picker
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Rebuilds the picker from the backends that may be called: connected, reporting SERVING,
    /// weight above 0, not draining, not at the end of a removal grace, admitted by the selector,
    /// and preferred by it when any is.
    fn rebuild(&self) {
        let backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let usable: Vec<Arc<Backend>> = backends
            .values()
            .filter(|b| {
                b.is_ready()
                    && b.is_serving()
                    && b.weight() > 0
                    && !b.is_draining()
                    && b.grace_over(now).is_none()
                    && self.selector.admits(&b.metadata())
            })
            .cloned()
            .collect();
        let usable = self
            .selector
            .narrow(usable, |b| self.selector.prefers(&b.metadata()));
        metrics::instances(
            &self.service,
            self.membership.borrow().instances.len(),
            usable.len(),
        );
        let picker = Arc::new(Picker::new(self.policy, usable, self.seed));
        *self.picker.write().unwrap_or_else(|p| p.into_inner()) = picker;
        drop(backends);
        self.changed.notify_waiters();
    }

    /// Like [`Shared::pick`], but while the answer may still change for the better (discovery has
    /// not completed its first list, or an instance is still making its first connection) waits for
    /// it, until `deadline`. This is gRPC's behaviour for a channel that is still connecting;
    /// once everything known has been tried, a call fails at once.
    async fn pick_or_wait(
        &self,
        avoid: &[Arc<str>],
        key: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<(Arc<Backend>, Channel), Status> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Register interest before looking, so a change in between is not missed.
            changed.as_mut().enable();
            // Asked before picking: if nothing was starting then, everything known had already
            // been published to the picker, and a failed pick is the answer. Asked after, a
            // connection published in between would be missed and the call failed for nothing.
            let starting = self.still_starting();
            match self.pick(avoid, key) {
                Ok(picked) => return Ok(picked),
                Err(status) if !starting => return Err(status),
                Err(_) => {}
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "no instance of service {:?} became reachable before the call's deadline",
                    self.service
                )));
            }
        }
    }

    /// Whether a failed pick may still turn into a success without anything new happening: the
    /// first list is not done, discovery knows instances the updater has not applied yet, or a
    /// backend has not finished its first connection attempt. This one check is what "the
    /// channel is still starting" means, for every caller.
    fn still_starting(&self) -> bool {
        // The same lock order as `rebuild`: backends, then discovery's snapshot.
        let backends = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let membership = self.membership.borrow();
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        !membership.synced
            || !Arc::ptr_eq(&membership.instances, &applied)
            || backends.values().any(|b| b.is_connecting())
    }

    /// The policy's choice and its channel. Prefers, in order: an instance not in `avoid` (those a
    /// retried call already failed on) and not ejected; any instance not ejected; and, when every
    /// one is ejected, any instance at all (ejecting them all would turn a partial failure into an
    /// outage).
    fn pick(
        &self,
        avoid: &[Arc<str>],
        key: Option<&[u8]>,
    ) -> Result<(Arc<Backend>, Channel), Status> {
        let picker = self.picker();
        let now = Instant::now();
        let fresh = |b: &Arc<Backend>| b.is_ready() && !b.is_ejected(now);
        let choice = picker
            .pick(&self.next, key, |b| fresh(b) && !avoid.contains(&b.addr))
            .or_else(|| picker.pick(&self.next, key, fresh))
            .or_else(|| picker.pick(&self.next, key, |b| b.is_ready()));
        // The connection can drop between the check and here; the next rebuild removes it.
        choice
            .and_then(|backend| Some((backend.clone(), backend.channel()?)))
            .ok_or_else(|| self.unavailable())
    }

    /// Sends one attempt to `backend`, bounded by `deadline`, counting it in flight while it runs
    /// and recording its outcome.
    async fn send(
        &self,
        backend: &Arc<Backend>,
        channel: Channel,
        request: http::Request<Body>,
        deadline: Instant,
    ) -> Result<Result<http::Response<Body>, tonic::transport::Error>, tokio::time::error::Elapsed>
    {
        let in_flight = backend.start_call();
        let started = Instant::now();
        let outcome = tokio::time::timeout_at(deadline, channel.oneshot(request)).await;
        drop(in_flight);
        let attempt = match &outcome {
            Ok(Ok(response)) if !is_failure_response(response) => Attempt::Succeeded,
            // The caller's deadline, which may be far shorter than the instance needs: the call
            // failed, but that says nothing about the instance (a frozen one is found by the
            // keep-alive ping instead).
            Err(_) => Attempt::OutOfTime,
            Ok(Err(error)) if timed_out(error) => Attempt::OutOfTime,
            Ok(_) => Attempt::Failed,
        };
        self.record(backend, attempt, started.elapsed());
        outcome
    }

    /// Counts an attempt's outcome: in the metrics, and (unless the call ran out of its own time)
    /// towards the instance's outlier detection.
    fn record(&self, backend: &Backend, attempt: Attempt, elapsed: Duration) {
        backend.metrics.call(elapsed, attempt != Attempt::Succeeded);
        match attempt {
            Attempt::Succeeded => backend.record_success(),
            Attempt::OutOfTime => {}
            Attempt::Failed => {
                if let Some(length) = backend.record_failure(&self.outlier, Instant::now()) {
                    warn!(
                        service = %self.service,
                        addr = %backend.addr,
                        id = %backend.instance_id,
                        failures = self.outlier.consecutive_failures,
                        ejected_for = ?length,
                        "instance ejected after consecutive failures"
                    );
                    metrics::ejected(&self.service, &backend.addr, "outlier");
                }
            }
        }
    }

    fn unavailable(&self) -> Status {
        let known = self
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        Status::unavailable(if known == 0 {
            format!("no instances of service {:?} are registered", self.service)
        } else {
            format!(
                "none of the {known} instance(s) of service {:?} is reachable right now",
                self.service
            )
        })
    }

    /// One call: pick, send, and on a failure that is safe to retry, send again elsewhere, all
    /// within the call's deadline.
    async fn call(
        self: Arc<Self>,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        let timeout =
            grpc_timeout(&request).map_or(self.call_timeout, |t| t.min(self.call_timeout));
        let deadline = Instant::now() + timeout;
        let key = request
            .headers()
            .get(HASH_KEY)
            .map(|k| k.as_bytes().to_vec());
        let key = key.as_deref();
        if !self.retry.enabled() {
            let mut request = request;
            let (backend, channel) = self.pick_or_wait(&[], key, deadline).await?;
            // After the pick: time spent waiting for an instance is no longer the server's.
            set_grpc_timeout(request.headers_mut(), deadline);
            return match self.send(&backend, channel, request, deadline).await {
                Ok(Ok(response)) => Ok(served_by(response, &backend)),
                Ok(Err(error)) if timed_out(&error) => {
                    Err(deadline_exceeded(&backend, timeout).into())
                }
                Ok(Err(error)) => Err(transport_failure(&backend, &error).into()),
                Err(_) => Err(deadline_exceeded(&backend, timeout).into()),
            };
        }

        let idempotent = self.retry.is_idempotent(request.uri().path());
        let (mut parts, body) = request.into_parts();
        let body = Replay::new(body, self.retry.max_replay_bytes);
        let mut backoff = Backoff::new(self.retry.backoff_initial, self.retry.backoff_max);
        let mut tried: Vec<Arc<str>> = Vec::new();
        self.budget.deposit();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (backend, channel) = self.pick_or_wait(&tried, key, deadline).await?;
            set_grpc_timeout(&mut parts.headers, deadline);
            let request = http::Request::from_parts(parts.clone(), body.attempt());
            let (safe, failure) = match self.send(&backend, channel, request, deadline).await {
                Err(_) => return Err(deadline_exceeded(&backend, timeout).into()),
                Ok(Err(error)) if timed_out(&error) => {
                    return Err(deadline_exceeded(&backend, timeout).into());
                }
                Ok(Ok(response)) if idempotent && is_unavailable_response(&response) => {
                    (true, Ok(served_by(response, &backend)))
                }
                Ok(Ok(response)) => return Ok(served_by(response, &backend)),
                Ok(Err(error)) => (
                    idempotent || never_sent(&error),
                    Err(transport_failure(&backend, &error)),
                ),
            };
            let retry = safe
                && attempt < self.retry.max_attempts
                && body.replayable()
                && Instant::now() < deadline
                && self.budget.try_withdraw();
            if !retry {
                return failure.map_err(BoxError::from);
            }
            debug!(service = %self.service, addr = %backend.addr, attempt, "call failed before being processed; retrying on another instance");
            tried.push(backend.addr.clone());
            tokio::time::sleep_until((Instant::now() + backoff.next_delay()).min(deadline)).await;
        }
    }
}

/// How one attempt on an instance ended, as far as judging the instance goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Succeeded,
    /// The instance failed the call (a transport error, or a status saying it is failing).
    Failed,
    /// The call's deadline passed first.
    OutOfTime,
}

/// Tells the server how long the call has left (`grpc-timeout`), so it can give up when we do.
fn set_grpc_timeout(headers: &mut http::HeaderMap, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if let Ok(value) = http::HeaderValue::from_str(&format!("{}m", left.as_millis().max(1))) {
        headers.insert("grpc-timeout", value);
    }
}

impl Candidate for Arc<Backend> {
    fn ring_key(&self) -> &str {
        &self.addr
    }

    fn weight(&self) -> u32 {
        Backend::weight(self)
    }

    fn in_flight(&self) -> usize {
        Backend::in_flight(self)
    }
}

/// A trailers-only response whose status says the server is failing (rather than the request
/// being wrong): it counts towards outlier ejection.
fn is_failure_response(response: &http::Response<Body>) -> bool {
    // UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS.
    matches!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(b"2" | b"13" | b"14" | b"15")
    )
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

/// Marks a response with the instance that served it.
fn served_by(mut response: http::Response<Body>, backend: &Backend) -> http::Response<Body> {
    response.extensions_mut().insert(ServedBy {
        addr: backend.addr.clone(),
        instance_id: backend.instance_id.clone(),
    });
    response
}

/// The one place transport failures become gRPC statuses, naming the instance. Any failure at the
/// transport level means the connection is unusable, so the instance leaves the rotation now
/// rather than when its socket reports it.
fn transport_failure(backend: &Backend, error: &tonic::transport::Error) -> Status {
    backend.report_broken();
    blame(
        Status::unavailable(format!(
            "instance {} ({}) failed: {}",
            backend.addr,
            backend.instance_id,
            chain(error)
        )),
        backend,
    )
}

fn deadline_exceeded(backend: &Backend, timeout: Duration) -> Status {
    blame(
        Status::deadline_exceeded(format!(
            "no answer from instance {} ({}) within the call's {timeout:?} deadline",
            backend.addr, backend.instance_id
        )),
        backend,
    )
}

/// Names the instance a failed call went to in the status's metadata ([`INSTANCE`]).
fn blame(mut status: Status, backend: &Backend) -> Status {
    if let Ok(addr) = backend.addr.parse() {
        status.metadata_mut().insert(INSTANCE, addr);
    }
    status
}

/// The updater task: turns membership snapshots into backends.
async fn follow(
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

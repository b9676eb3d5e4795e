//! One instance's connection: a single HTTP/2 connection, reused by every call, whose loss is noticed
//! the moment the socket closes, and which is re-established in the background with backoff.
//!
//! tonic's lazily connected `Channel` reports itself ready even after its connection failed, so a
//! balancer built on it keeps picking a crashed instance until discovery removes it (tonic #2839,
//! #643, #1147): with a 10 s lease, that is up to 10 s of failed calls. Here instead the socket itself
//! reports: the connector wraps each TCP stream in a [`MonitoredStream`] that fires a token when the
//! stream hits end-of-file or an error, or is dropped (hyper drops it when HTTP/2 keep-alive pings go
//! unanswered or after a GOAWAY). On loopback a SIGKILLed server's socket is closed by the kernel, so
//! the instance is taken out of rotation before any call is sent to it.
//!
//! A new connection enters the rotation only once the server has answered a health check (the kernel
//! accepts TCP connections for a frozen process, so "connected" alone proves nothing), and while it
//! lives the instance's `grpc.health.v1` status is polled: NOT_SERVING takes it out of rotation.
//! Each backend also keeps its calls in flight (for `least_request`), its record of consecutive
//! failures (outlier ejection), and what the balancer's removal grace needs: whether its last health
//! check was answered, which connection it is on, and the grace in progress, if any.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    Code,
    transport::{Channel, Endpoint, Uri},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::{debug, info, warn};

use crate::{backoff::Backoff, error::chain, metrics};

/// One instance the balancer may pick: its identity, what it says about itself, and, while
/// connected, its channel.
#[derive(Debug)]
pub(crate) struct Backend {
    /// The service, for metrics.
    service: Arc<str>,
    pub(crate) addr: Arc<str>,
    pub(crate) instance_id: Arc<str>,
    /// The instance's metadata; replaced in place when its record changes.
    metadata: Mutex<Arc<Value>>,
    live: Mutex<Option<Live>>,
    /// Set once the first connection attempt has finished, either way. Until then the backend is
    /// "connecting" and calls may wait for it rather than fail.
    attempted: AtomicBool,
    /// What the instance's grpc.health.v1 service says; true when it has none.
    serving: AtomicBool,
    /// Whether the last health check got an answer (false after a timeout or an error), so a
    /// removal grace is not given to an instance that stopped answering.
    health_answered: AtomicBool,
    /// Counts the connections made, so a removal grace given on one connection ends with it
    /// even if a new one is up before the updater looks again.
    connections: AtomicU64,
    /// Set while the instance's key is gone from etcd but the instance is kept callable (see
    /// [`crate::balance::BalanceOptions::removal_grace`]).
    grace: Mutex<Option<Grace>>,
    /// Calls sent and not yet answered, for `least_request`.
    in_flight: AtomicUsize,
    outlier: Mutex<Outlier>,
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
struct Outlier {
    consecutive: u32,
    /// Ejections since the instance last served a call.
    ejections: u32,
    until: Option<Instant>,
}

/// A connected channel and the token its socket fires when it closes.
#[derive(Debug)]
struct Live {
    channel: Channel,
    closed: CancellationToken,
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
            attempted: AtomicBool::new(false),
            serving: AtomicBool::new(true),
            health_answered: AtomicBool::new(true),
            connections: AtomicU64::new(0),
            grace: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            outlier: Mutex::new(Outlier::default()),
            metrics,
        }
    }

    pub(crate) fn metadata(&self) -> Arc<Value> {
        lock(&self.metadata).clone()
    }

    /// Replaces the metadata; true if it changed.
    pub(crate) fn set_metadata(&self, metadata: &Value) -> bool {
        let mut current = lock(&self.metadata);
        if **current == *metadata {
            return false;
        }
        *current = Arc::new(metadata.clone());
        true
    }

    /// The `weight` metadata: a non-negative integer (number or text), 1 when absent or unreadable.
    pub(crate) fn weight(&self) -> u32 {
        crate::select::text(&self.metadata(), "weight")
            .and_then(|w| w.parse().ok())
            .unwrap_or(1)
    }

    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Whether the record says the instance is leaving (metadata `draining` true, as a boolean
    /// or as text): it is sent nothing more and gets no removal grace.
    pub(crate) fn is_draining(&self) -> bool {
        is_draining(&self.metadata())
    }

    /// Why the instance may not be kept after its key disappeared, or `None` if it may: it must
    /// be connected, have answered its last health check with SERVING, and not be draining.
    pub(crate) fn why_no_grace(&self) -> Option<&'static str> {
        if !self.is_ready() {
            Some("not connected")
        } else if self.is_draining() {
            Some("announced draining")
        } else if !self.is_serving() {
            Some("NOT_SERVING")
        } else if !self.health_answered.load(Ordering::Acquire) {
            Some("health check failed")
        } else {
            None
        }
    }

    /// The removal grace in progress, if any.
    pub(crate) fn grace(&self) -> Option<Grace> {
        *lock(&self.grace)
    }

    /// Keeps the instance callable for `length` from `now` on its current connection.
    pub(crate) fn start_grace(&self, now: Instant, length: Duration) -> Grace {
        let grace = Grace {
            since: now,
            until: now + length,
            connection: self.connections.load(Ordering::Acquire),
        };
        *lock(&self.grace) = Some(grace);
        grace
    }

    /// Ends the removal grace (the instance was registered again).
    pub(crate) fn end_grace(&self) -> Option<Grace> {
        lock(&self.grace).take()
    }

    /// Why the grace in progress must end at `now`, or `None` while it holds (or there is none).
    pub(crate) fn grace_over(&self, now: Instant) -> Option<&'static str> {
        let grace = self.grace()?;
        if grace.connection != self.connections.load(Ordering::Acquire) {
            return Some("connection lost");
        }
        if let Some(why) = self.why_no_grace() {
            return Some(why);
        }
        (now >= grace.until).then_some("grace expired")
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
        lock(&self.outlier).until.is_some_and(|until| now < until)
    }

    pub(crate) fn record_success(&self) {
        let mut outlier = lock(&self.outlier);
        outlier.consecutive = 0;
        outlier.ejections = 0;
    }

    /// Counts a failed call; ejects the instance when that makes `policy.consecutive_failures`
    /// in a row. Returns the ejection's length when it ejected.
    pub(crate) fn record_failure(&self, policy: &OutlierPolicy, now: Instant) -> Option<Duration> {
        let mut outlier = lock(&self.outlier);
        if outlier.until.is_some_and(|until| now < until) {
            // Calls already in flight when the instance was ejected: they say nothing new, and
            // counting them would turn one burst into an ever longer ejection.
            return None;
        }
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
        outlier.until = Some(now + length);
        Some(length)
    }

    /// The channel to call through, if the instance is connected.
    pub(crate) fn channel(&self) -> Option<Channel> {
        self.live().as_ref().map(|live| live.channel.clone())
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.live().is_some()
    }

    /// True until the first connection attempt has finished.
    pub(crate) fn is_connecting(&self) -> bool {
        !self.attempted.load(Ordering::Acquire)
    }

    /// A call failed at the transport level: stop picking this instance now and let the maintainer
    /// reconnect, rather than wait for the socket to report the same thing.
    pub(crate) fn report_broken(&self) {
        if let Some(live) = self.live().as_ref() {
            live.closed.cancel();
        }
    }

    fn set(&self, live: Option<Live>) {
        *self.live() = live;
    }

    fn live(&self) -> MutexGuard<'_, Option<Live>> {
        lock(&self.live)
    }
}

/// Whether `metadata` carries the draining announcement ([`crate::endpoint::DRAINING_KEY`] true).
pub(crate) fn is_draining(metadata: &Value) -> bool {
    crate::select::text(metadata, crate::endpoint::DRAINING_KEY).is_some_and(|v| v == "true")
}

/// Locks a mutex that is only held to copy or swap a field: a panic cannot leave the value
/// half-written, so a poisoned lock is safe to keep using.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A call in flight on a backend; dropping it ends the call.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps `backend` connected until `stop` fires: connect, wait for the socket to close, mark the
/// backend unusable, reconnect with capped backoff. `on_change` is called whenever the backend becomes
/// usable or unusable.
pub(crate) async fn maintain(
    backend: Arc<Backend>,
    endpoint: Endpoint,
    health_interval: Duration,
    on_change: impl Fn(),
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    let mut last_problem: Option<String> = None;
    let mut connected_before = false;
    let probe_timeout = endpoint
        .get_connect_timeout()
        .unwrap_or(Duration::from_secs(1));
    loop {
        let closed = CancellationToken::new();
        let connector = MonitoredConnector {
            closed: closed.clone(),
        };
        let connected = async {
            let channel = endpoint
                .connect_with_connector(connector)
                .await
                .map_err(|e| chain(&e))?;
            let serving = probe(&channel, probe_timeout).await?;
            Ok::<_, String>((channel, serving))
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => break,
            connected = connected => connected,
        };
        // Only the maintainer writes `attempted`. It is set once the attempt's outcome is visible
        // (the backend published and the picker rebuilt, or the failure known), never before: a
        // call that sees "not connecting" must also see the connection, or fail for a reason.
        let first = !backend.attempted.load(Ordering::Acquire);
        match connected {
            Ok((channel, serving)) => {
                info!(addr = %backend.addr, id = %backend.instance_id, serving, "connected; instance in rotation");
                if connected_before {
                    metrics::readmitted(&backend.service, &backend.addr);
                }
                connected_before = true;
                backend.serving.store(serving, Ordering::Release);
                backend.health_answered.store(true, Ordering::Release);
                backend.connections.fetch_add(1, Ordering::AcqRel);
                // A new connection is a fresh start: failures of the old one do not count.
                *lock(&backend.outlier) = Outlier::default();
                backend.set(Some(Live {
                    channel: channel.clone(),
                    closed: closed.clone(),
                }));
                on_change();
                backend.attempted.store(true, Ordering::Release);
                backoff.reset();
                last_problem = None;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = closed.cancelled() => {}
                    _ = watch_health(&backend, channel, health_interval, probe_timeout, &on_change) => {}
                }
                backend.set(None);
                on_change();
                metrics::ejected(&backend.service, &backend.addr, "connection");
                warn!(addr = %backend.addr, id = %backend.instance_id, "connection lost; instance out of rotation until it reconnects");
            }
            Err(problem) => {
                if last_problem.as_deref() != Some(problem.as_str()) {
                    warn!(addr = %backend.addr, id = %backend.instance_id, %problem, "cannot connect; retrying with backoff");
                    last_problem = Some(problem);
                } else {
                    debug!(addr = %backend.addr, "still cannot connect");
                }
                if first {
                    // Calls waiting for this backend's first connection can stop waiting.
                    backend.attempted.store(true, Ordering::Release);
                    on_change();
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
    backend.set(None);
    debug!(addr = %backend.addr, "connection maintainer stopped");
}

/// Proves a new connection is answered before the instance enters the rotation, and returns whether
/// the instance says it is serving. Connecting alone proves little: the kernel completes the TCP
/// handshake for a frozen (SIGSTOPped) process, and the HTTP/2 handshake does not wait for the
/// server. One `grpc.health.v1.Health/Check` does: any gRPC answer (even UNIMPLEMENTED, from a
/// server without a health service, which then counts as serving) means it processes requests.
async fn probe(channel: &Channel, timeout: Duration) -> Result<bool, String> {
    let mut health = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(timeout, health.check(request)).await {
        Err(_) => Err(format!("no answer to a health check within {timeout:?}")),
        Ok(Ok(reply)) => Ok(reply.get_ref().status() != ServingStatus::NotServing),
        Ok(Err(status)) => match status.code() {
            Code::Unimplemented | Code::NotFound => Ok(true),
            _ => Err(format!("health check failed: {status}")),
        },
    }
}

/// Follows the instance's health while the connection lives, so an instance that reports
/// NOT_SERVING (draining, or flipped by an operator) leaves the rotation and comes back when SERVING
/// again: a `grpc.health.v1.Health/Check` every `interval`, each bounded by `timeout`.
///
/// Polling rather than holding a `Health/Watch` stream open, on purpose: an open stream makes
/// hyper's keep-alive ping an otherwise idle connection every second, which grpc-go servers answer
/// with GOAWAY `too_many_pings` (their default allows a ping every 5 minutes without data), and it
/// would keep a draining server from finishing its graceful shutdown. A short unary call exchanges
/// data, so it neither provokes pings nor counts as abuse. An instance without a health service
/// (UNIMPLEMENTED) simply stays serving and is not asked again.
async fn watch_health(
    backend: &Backend,
    channel: Channel,
    interval: Duration,
    timeout: Duration,
    on_change: &impl Fn(),
) {
    let mut health = HealthClient::new(channel);
    loop {
        tokio::time::sleep(interval).await;
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let serving = match tokio::time::timeout(timeout, health.check(request)).await {
            Ok(Ok(reply)) => reply.get_ref().status() != ServingStatus::NotServing,
            Ok(Err(status)) if matches!(status.code(), Code::Unimplemented | Code::NotFound) => {
                return std::future::pending().await;
            }
            // No answer: the connection's own checks (socket, keep-alive) decide about the
            // rotation; but an instance in removal grace is only kept on the strength of its
            // answers, so it leaves now.
            Ok(Err(_)) | Err(_) => {
                if backend.health_answered.swap(false, Ordering::AcqRel) {
                    debug!(addr = %backend.addr, id = %backend.instance_id, "health check unanswered");
                    on_change();
                }
                continue;
            }
        };
        if !backend.health_answered.swap(true, Ordering::AcqRel) {
            on_change();
        }
        if backend.serving.swap(serving, Ordering::AcqRel) != serving {
            info!(addr = %backend.addr, id = %backend.instance_id, serving, "health changed");
            if serving {
                metrics::readmitted(&backend.service, &backend.addr);
            } else {
                metrics::ejected(&backend.service, &backend.addr, "health");
            }
            on_change();
        }
    }
}

/// A tower connector for tonic that dials TCP and wraps the stream in a [`MonitoredStream`].
#[derive(Debug, Clone)]
struct MonitoredConnector {
    closed: CancellationToken,
}

impl tower::Service<Uri> for MonitoredConnector {
    type Response = TokioIo<MonitoredStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let closed = self.closed.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{uri} has no host:port"),
                )
            })?;
            let stream = TcpStream::connect(authority.as_str()).await?;
            // gRPC messages are small and latency-bound: never wait to coalesce them.
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(MonitoredStream {
                inner: stream,
                closed,
            }))
        })
    }
}

/// A TCP stream that fires `closed` on end-of-file, on any I/O error, and when dropped.
#[derive(Debug)]
struct MonitoredStream {
    inner: TcpStream,
    closed: CancellationToken,
}

impl MonitoredStream {
    fn watch<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &result {
            self.closed.cancel();
        }
        result
    }
}

impl Drop for MonitoredStream {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl AsyncRead for MonitoredStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (before, had_room) = (buf.filled().len(), buf.remaining() > 0);
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            if had_room && buf.filled().len() == before {
                // Zero bytes into a non-empty buffer: the peer closed the connection.
                self.closed.cancel();
            }
        }
        self.watch(result)
    }
}

impl AsyncWrite for MonitoredStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.closed.cancel();
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn draining_is_read_as_a_boolean_or_as_text() {
        assert!(is_draining(&json!({"draining": true})));
        assert!(is_draining(&json!({"draining": "true"})));
        assert!(!is_draining(&json!({"draining": false})));
        assert!(!is_draining(&json!({"instance_id": "a"})));
        assert!(!is_draining(&json!(null)));
        assert!(!is_draining(&json!("draining")));
    }
}

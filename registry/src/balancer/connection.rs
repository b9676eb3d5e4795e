//! The connection task of one backend: connect, prove the connection is answered, follow the
//! instance's health while it lives, notice the moment its socket closes, reconnect with backoff.
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

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
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

use super::backend::{Backend, Live};
use crate::{backoff::Backoff, error::chain, metrics, problem::Problem};

/// Keeps `backend` connected until `stop` fires: connect, wait for the socket to close, mark the
/// backend unusable, reconnect with capped backoff. `on_change` is called whenever the backend becomes
/// usable or unusable.
pub(crate) async fn maintain(
    backend: Arc<Backend>,
    endpoint: Endpoint,
    health_interval: Duration,
    on_change: impl Fn(),
    mut first_attempt: FirstAttempt,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::reconnect();
    let mut problem = Problem::default();
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
        // The first attempt ends once its outcome is visible (the backend published and a picker
        // rebuild requested, or the failure known), never before: a call that sees "nothing
        // connecting" must also see the connection, or fail for a reason.
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
                backend.reset_outlier();
                backend.set(Some(Live {
                    channel: channel.clone(),
                    closed: closed.clone(),
                }));
                on_change();
                first_attempt.done();
                backoff.reset();
                problem.clear();
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
            Err(failed) => {
                if let Some(problem) = problem.text(failed) {
                    warn!(addr = %backend.addr, id = %backend.instance_id, problem, "cannot connect; retrying with backoff");
                } else {
                    debug!(addr = %backend.addr, "still cannot connect");
                }
                // Calls waiting for this backend's first connection can stop waiting (a no-op
                // after the first attempt).
                first_attempt.done();
                on_change();
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
    match check(&mut health, timeout).await {
        Health::Serving(serving) => Ok(serving),
        Health::NoService => Ok(true),
        Health::NoAnswer(why) => Err(why),
    }
}

/// What one `grpc.health.v1.Health/Check` said.
enum Health {
    /// An answer: SERVING (or anything but NOT_SERVING), or NOT_SERVING.
    Serving(bool),
    /// The server has no health service (UNIMPLEMENTED, or NOT_FOUND for the overall status):
    /// it counts as serving and is not asked again.
    NoService,
    /// No answer in time, or a failed call.
    NoAnswer(String),
}

/// Asks for the overall health (service ""), bounded by `timeout`: the one health request, made
/// by the first probe and by every poll after it.
async fn check(health: &mut HealthClient<Channel>, timeout: Duration) -> Health {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(timeout, health.check(request)).await {
        Err(_) => Health::NoAnswer(format!("no answer to a health check within {timeout:?}")),
        Ok(Ok(reply)) => Health::Serving(reply.get_ref().status() != ServingStatus::NotServing),
        Ok(Err(status)) => match status.code() {
            Code::Unimplemented | Code::NotFound => Health::NoService,
            _ => Health::NoAnswer(format!("health check failed: {status}")),
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
        let serving = match check(&mut health, timeout).await {
            Health::Serving(serving) => serving,
            Health::NoService => return std::future::pending().await,
            // No answer: the connection's own checks (socket, keep-alive) decide about the
            // rotation; but an instance in removal grace is only kept on the strength of its
            // answers, so it leaves now.
            Health::NoAnswer(_) => {
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

/// A backend's first connection attempt, counted in the channel's `connecting` while it lasts:
/// calls wait for it (within their deadline) rather than fail. Counted down once, when the
/// attempt's outcome is visible, or when the backend is dropped before it ends.
#[derive(Debug)]
pub(super) struct FirstAttempt(Option<Arc<AtomicUsize>>);

impl FirstAttempt {
    pub(super) fn new(connecting: &Arc<AtomicUsize>) -> Self {
        connecting.fetch_add(1, Ordering::SeqCst);
        Self(Some(connecting.clone()))
    }

    /// The first attempt's outcome is visible (published to the picker, or known to have failed).
    pub(super) fn done(&mut self) {
        if let Some(connecting) = self.0.take() {
            connecting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for FirstAttempt {
    fn drop(&mut self) {
        self.done();
    }
}

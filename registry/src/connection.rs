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

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
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

use crate::{backoff::Backoff, error::chain};

/// One instance the balancer may pick: its identity and, while connected, its channel.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) addr: Arc<str>,
    pub(crate) instance_id: Arc<str>,
    live: Mutex<Option<Live>>,
    /// Set once the first connection attempt has finished, either way. Until then the backend is
    /// "connecting" and calls may wait for it rather than fail.
    attempted: AtomicBool,
}

/// A connected channel and the token its socket fires when it closes.
#[derive(Debug)]
struct Live {
    channel: Channel,
    closed: CancellationToken,
}

impl Backend {
    pub(crate) fn new(addr: Arc<str>, instance_id: Arc<str>) -> Self {
        Self {
            addr,
            instance_id,
            live: Mutex::new(None),
            attempted: AtomicBool::new(false),
        }
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
        // The lock is only held to copy or swap a field; a panic cannot leave the value half-written,
        // so a poisoned lock is safe to keep using.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Keeps `backend` connected until `stop` fires: connect, wait for the socket to close, mark the
/// backend unusable, reconnect with capped backoff. `on_change` is called whenever the backend becomes
/// usable or unusable.
pub(crate) async fn maintain(
    backend: Arc<Backend>,
    endpoint: Endpoint,
    on_change: impl Fn(),
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    let mut last_problem: Option<String> = None;
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
            probe(&channel, probe_timeout).await?;
            Ok::<_, String>(channel)
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => break,
            connected = connected => connected,
        };
        let first = !backend.attempted.swap(true, Ordering::AcqRel);
        match connected {
            Ok(channel) => {
                info!(addr = %backend.addr, id = %backend.instance_id, "connected; instance in rotation");
                backend.set(Some(Live {
                    channel,
                    closed: closed.clone(),
                }));
                on_change();
                backoff.reset();
                last_problem = None;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = closed.cancelled() => {}
                }
                backend.set(None);
                on_change();
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

/// Proves a new connection is answered before the instance enters the rotation. Connecting alone
/// proves little: the kernel completes the TCP handshake for a frozen (SIGSTOPped) process, and the
/// HTTP/2 handshake does not wait for the server. One `grpc.health.v1.Health/Check` does: any gRPC
/// answer (even UNIMPLEMENTED, from a server without a health service) means the server is
/// processing requests; NOT_SERVING means it asked not to be used.
async fn probe(channel: &Channel, timeout: Duration) -> Result<(), String> {
    let mut health = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(timeout, health.check(request)).await {
        Err(_) => Err(format!("no answer to a health check within {timeout:?}")),
        Ok(Ok(reply)) if reply.get_ref().status() == ServingStatus::NotServing => {
            Err("the server reports NOT_SERVING".to_owned())
        }
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => match status.code() {
            Code::Unimplemented | Code::NotFound => Ok(()),
            _ => Err(format!("health check failed: {status}")),
        },
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

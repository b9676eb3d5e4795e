//! The HTTP/2 connection to one instance, and the handle calls are sent on: dial TCP, run TLS if
//! configured, hand the stream to hyper's HTTP/2 client, and watch the socket.
//!
//! The channel makes these connections itself, with hyper's connection API, rather than through
//! tonic's `Channel`: every `Channel` puts a buffer task between the caller and the connection
//! (a queue and a task wake-up per call, the balancer's heaviest cost; see docs/BENCHMARKS.md),
//! and adds reconnect and timeout layers this balancer does itself. A call here goes from the
//! caller's task straight to the connection's task, with what tonic's stack would have added to
//! the request done inline: the URI's scheme and authority, and a `user-agent`.
//!
//! The socket itself reports a lost connection: each stream is wrapped in a [`MonitoredStream`]
//! that fires a token when it hits end-of-file or an error, or is dropped (hyper drops it after a
//! GOAWAY). tonic's lazily connected `Channel` would report itself ready even after its
//! connection failed (tonic #2839, #643, #1147). The stream also counts the reads that brought
//! bytes, and the connection keeps a second handle on the socket ([`Liveness`]): that is how the
//! connection task tells a frozen instance (calls waiting, nothing read) and closes its socket.

use std::{
    future::Future,
    io,
    net::Shutdown,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::uri::{Authority, Scheme, Uri};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tracing::debug;

use super::{BalanceOptions, retry::CallBody};
use crate::{error::chain, tls::ClientTls};

/// How every connection of one channel is made: shared by its backends.
#[derive(Debug)]
pub(super) struct Dial {
    tls: Option<ClientTls>,
    scheme: Scheme,
    /// Bounds the TCP connect, the TLS handshake and the HTTP/2 handshake together.
    connect_timeout: Duration,
    /// How long a connection with calls waiting may read nothing before it is probed.
    pub(super) keep_alive_interval: Duration,
    /// How long that probe may go unanswered before the socket is closed.
    pub(super) keep_alive_timeout: Duration,
}

impl Dial {
    pub(super) fn new(options: &BalanceOptions) -> Self {
        Self {
            scheme: if options.tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            tls: options.tls.clone(),
            connect_timeout: options.connect_timeout,
            keep_alive_interval: options.keep_alive_interval,
            keep_alive_timeout: options.keep_alive_timeout,
        }
    }

    /// How long a new connection has to prove it is answered (its first health check).
    pub(super) fn probe_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

/// Where one backend's connections go.
#[derive(Debug, Clone)]
pub(super) struct Target {
    dial: Arc<Dial>,
    /// `host:port`, as dialled and as sent in `:authority`.
    authority: Authority,
}

impl Target {
    /// The target for `addr` (`host:port`). Discovery only admits dialable addresses, so this
    /// fails only if the two disagree.
    pub(super) fn new(addr: &str, dial: &Arc<Dial>) -> Result<Self, String> {
        let authority: Authority = addr
            .parse()
            .map_err(|e| format!("{addr:?} is not a host:port ({e})"))?;
        if authority.port_u16().is_none() {
            return Err(format!("{addr:?} has no port"));
        }
        Ok(Self {
            dial: dial.clone(),
            authority,
        })
    }

    pub(super) fn dial(&self) -> &Dial {
        &self.dial
    }

    /// Opens a connection: TCP, TLS when configured, the HTTP/2 handshake. `closed` fires when
    /// the connection ends, for whatever reason. The [`Liveness`] is for the connection task's
    /// stall check.
    pub(super) async fn connect(
        &self,
        closed: CancellationToken,
    ) -> Result<(Connection, Liveness), String> {
        let dial = &self.dial;
        let connected = async {
            let tcp = TcpStream::connect(self.authority.as_str())
                .await
                .map_err(|e| format!("TCP connect failed: {e}"))?;
            // gRPC messages are small and latency-bound: never wait to coalesce them.
            tcp.set_nodelay(true)
                .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
            let (tcp, socket) = second_handle(tcp)
                .map_err(|e| format!("cannot take a second handle on the socket: {e}"))?;
            let reads = Arc::new(AtomicU64::new(0));
            let liveness = Liveness {
                reads: reads.clone(),
                socket,
            };
            let stream = MonitoredStream {
                inner: tcp,
                closed: closed.clone(),
                reads,
            };
            let io: Box<dyn Io> = match &dial.tls {
                None => Box::new(stream),
                Some(tls) => Box::new(
                    tls.connect(host(&self.authority), stream)
                        .await
                        .map_err(|e| format!("TLS handshake failed: {e}"))?,
                ),
            };
            // No HTTP/2 keep-alive pings: the connection task's stall check does their work
            // (`connection::watch_stall`). hyper's keep-alive timer, polled with the connection,
            // cost about 1,650 instructions a call (callgrind; 2 % of a call), and servers count
            // pings as abuse (GOAWAY "too_many_pings") where they count no health check.
            let (send, connection) = http2::Builder::new(BoxingExecutor)
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("HTTP/2 handshake failed: {}", chain(&e)))?;
            Ok::<_, String>((send, connection, liveness))
        };
        let (send, connection, liveness) = tokio::time::timeout(dial.connect_timeout, connected)
            .await
            .map_err(|_| format!("no connection within {:?}", dial.connect_timeout))??;
        let addr = self.authority.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%addr, error = %chain(&error), "connection ended");
            }
            closed.cancel();
        });
        let connection = Connection {
            send,
            scheme: dial.scheme.clone(),
            authority: self.authority.clone(),
        };
        Ok((connection, liveness))
    }
}

/// The tokio stream, and a second handle on the same socket for [`Liveness::shut_down`].
fn second_handle(tcp: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    // Leaves the socket non-blocking, as tokio needs it.
    let std = tcp.into_std()?;
    let second = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, second))
}

/// A connection's socket as the stall check sees it: how many reads brought bytes, and a way to
/// close it from outside hyper.
#[derive(Debug)]
pub(super) struct Liveness {
    reads: Arc<AtomicU64>,
    /// The same socket as hyper's stream (a duplicated descriptor).
    socket: std::net::TcpStream,
}

impl Liveness {
    /// Reads that brought bytes so far. Counting is all a read pays: no clock.
    pub(super) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Whether the peer has sent bytes this process has not read yet: then the peer is alive and
    /// it is this process that is behind (a starved runtime reads late), whatever the counter says.
    pub(super) fn bytes_waiting(&self) -> bool {
        let mut byte = [0u8; 1];
        // Non-blocking: `WouldBlock` when nothing is waiting.
        matches!(self.socket.peek(&mut byte), Ok(n) if n > 0)
    }

    /// Shuts the socket down in both directions: hyper's next read sees end-of-file and its writes
    /// fail, so the connection ends and every call waiting on it fails (and is retried where
    /// that is safe) now rather than at its deadline.
    pub(super) fn shut_down(&self) {
        if let Err(e) = self.socket.shutdown(Shutdown::Both) {
            debug!(error = %e, "shutting a stalled socket down");
        }
    }
}

/// Spawns hyper's tasks (two per call: the request body's pipe and the wait for the response)
/// boxed. hyper's task type is an enum as large as its biggest variant, the whole connection
/// state; spawned unboxed, that is copied through every layer of tokio's spawn, on every call.
/// Boxed, it is written once and a pointer is what moves (callgrind: about 3,000 instructions of
/// copying a call saved).
#[derive(Debug, Clone, Copy)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let future: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(future);
        tokio::spawn(future);
    }
}

/// The host of `authority`, without the brackets of an IPv6 address: what a certificate names.
fn host(authority: &Authority) -> &str {
    let host = authority.host();
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A stream hyper can run HTTP/2 over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The handle calls are sent on; cheap to clone. Each clone sends on the same connection.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    send: http2::SendRequest<CallBody>,
    scheme: Scheme,
    authority: Authority,
}

/// What tonic's stack would send as `user-agent`; gRPC asks clients to identify themselves.
const USER_AGENT: http::HeaderValue =
    http::HeaderValue::from_static(concat!("registry/", env!("CARGO_PKG_VERSION"), " tonic"));

/// Adds our `user-agent` unless the caller set one. A call that keeps a copy of its headers for
/// a retry adds it before copying: the copy is made exactly as large as its contents, so adding a
/// header to it afterwards would grow it, on every call.
pub(super) fn identify(headers: &mut http::HeaderMap) {
    headers
        .entry(http::header::USER_AGENT)
        .or_insert(USER_AGENT);
}

impl Connection {
    /// Sends `request` on the connection. tonic's generated clients give only the path; the
    /// scheme and authority HTTP/2 requires are added here. Takes the handle by value: a call
    /// sends on the clone its pick gave it, so the connection's shared counts are touched once.
    pub(crate) fn send(
        mut self,
        request: http::Request<CallBody>,
    ) -> impl Future<Output = Result<http::Response<Body>, hyper::Error>> + Send + 'static {
        let (mut parts, body) = request.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        uri.path_and_query
            .get_or_insert(http::uri::PathAndQuery::from_static("/"));
        // Cannot fail: scheme, authority and path are all set.
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
        identify(&mut parts.headers);
        let response = self
            .send
            .send_request(http::Request::from_parts(parts, body));
        async move { Ok(response.await?.map(Body::new)) }
    }
}

/// For the health client (tonic's generated clients take a tower service).
impl tower::Service<http::Request<Body>> for Connection {
    type Response = http::Response<Body>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(request.map(CallBody::Direct)))
    }
}

/// A TCP stream that fires `closed` on end-of-file, on any I/O error, and when dropped.
#[derive(Debug)]
struct MonitoredStream {
    inner: TcpStream,
    closed: CancellationToken,
    /// Reads that brought bytes: [`Liveness::reads`].
    reads: Arc<AtomicU64>,
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
            if buf.filled().len() > before {
                self.reads.fetch_add(1, Ordering::Relaxed);
            } else if had_room {
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
    use super::*;

    #[test]
    fn a_target_needs_a_port_and_names_the_host_a_certificate_names() {
        let dial = Arc::new(Dial::new(&BalanceOptions::default()));
        assert!(
            Target::new("10.0.0.5", &dial)
                .unwrap_err()
                .contains("no port")
        );
        assert!(Target::new("not a host:1", &dial).is_err());
        let v6 = Target::new("[::1]:50051", &dial).unwrap();
        assert_eq!(host(&v6.authority), "::1");
        let v4 = Target::new("10.0.0.5:50051", &dial).unwrap();
        assert_eq!(host(&v4.authority), "10.0.0.5");
    }
}

//! Serving a tonic service on a listener the caller bound, and its whole life in etcd.
//!
//! [`Lifecycle::serve`] is the server side in one call. It serves a tonic [`Router`] on the
//! caller's listener (every accepted socket with `TCP_NODELAY`, see [`incoming`]), reports
//! SERVING through `grpc.health.v1`, registers the instance once the server is accepting, and on
//! the shutdown signal leaves before it closes the door:
//! 1. report NOT_SERVING, so clients that follow health checks stop picking it;
//! 2. announce the departure in etcd (the record rewritten with `draining: true`, bounded by
//!    [`Lifecycle::announce_timeout`]), then delete the key and revoke the lease: watchers see the
//!    DELETE at once instead of after the TTL;
//! 3. keep serving for [`Lifecycle::deregister_grace`], for calls picked before the news arrived;
//! 4. stop accepting and let in-flight calls finish within [`Lifecycle::drain_timeout`]; calls
//!    still running after it are cut.
//!
//! ```no_run
//! use registry::{EtcdConfig, Registration, serve::Lifecycle};
//! use tokio_util::sync::CancellationToken;
//! # async fn demo() -> Result<(), registry::Error> {
//! let etcd = EtcdConfig::new(["127.0.0.1:2379"])?.connect().await?;
//! // Bind first: the port is ours before anything is announced, and tests can bind port 0.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
//! let shutdown = CancellationToken::new(); // cancelled on SIGTERM by the caller
//! // The registered address comes from the listener: 127.0.0.1:<the port bound>.
//! let lifecycle = Lifecycle::with_bound_addr(&etcd, |addr| {
//!     Registration::builder("helloworld", addr.to_string().replace(':', "-"), addr.to_string())
//! })
//! .health_of("helloworld.Greeter");
//! // Your services, e.g. `.add_service(GreeterServer::new(greeter))`; `serve` adds the health
//! // service.
//! let router = tonic::transport::Server::builder().add_routes(tonic::service::Routes::default());
//! lifecycle.serve(router, listener, shutdown).await?;
//! # Ok(())
//! # }
//! ```

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{
    body::Body,
    service::Routes,
    transport::server::{Connected, Router, TcpConnectInfo, TcpIncoming},
};
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};
use tower::{Layer, Service};
use tracing::{info, warn};

use crate::{
    error::{Error, Result, chain},
    etcd::Etcd,
    register::RegistrationBuilder,
};

/// The connections accepted on `listener`, each with `TCP_NODELAY` set.
///
/// tonic's `Server::tcp_nodelay` only applies to listeners tonic binds itself; a stream handed to
/// `serve_with_incoming` (a plain `TcpListenerStream`) leaves Nagle's algorithm on. A gRPC reply is
/// then held back until the client's delayed ACK, about 40 ms per call with grpc-go clients, which
/// ACK late: measured on this project's machines, 1,500 calls/s at 16 in flight instead of 28,000.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// After revoking the lease, how long to keep serving by default: enough for a watch event to
/// reach clients on the same network and for them to drop the instance.
pub const DEFAULT_DEREGISTER_GRACE: Duration = Duration::from_millis(500);

/// How long in-flight calls may run once the listener is closed, by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the draining announcement may take by default: one etcd write, which only hangs when
/// etcd has no quorum, and then the revoke would not get through either.
pub const DEFAULT_ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long to wait for the first registration by default.
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The life of one server instance: serve, register, and on shutdown leave the rotation before
/// closing the door. Configure it with the builder methods, then call [`Lifecycle::serve`].
pub struct Lifecycle {
    etcd: Etcd,
    describe: Describe,
    health: HealthReporter,
    /// Whether [`Lifecycle::serve`] adds the health service itself: yes when the reporter is ours,
    /// no when the caller gave theirs (and serves it).
    serve_health: bool,
    health_of: Vec<String>,
    deregister_grace: Duration,
    drain_timeout: Duration,
    announce_draining: bool,
    announce_timeout: Duration,
    register_timeout: Duration,
    while_serving: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// What to register: known up front, or made from the address the listener is bound to.
enum Describe {
    Given(RegistrationBuilder),
    FromAddr(Box<dyn FnOnce(SocketAddr) -> RegistrationBuilder + Send>),
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let registration = match &self.describe {
            Describe::Given(builder) => format!("{builder:?}"),
            Describe::FromAddr(_) => "from the bound address".to_owned(),
        };
        f.debug_struct("Lifecycle")
            .field("etcd", &self.etcd)
            .field("registration", &registration)
            .field("health_of", &self.health_of)
            .field("deregister_grace", &self.deregister_grace)
            .field("drain_timeout", &self.drain_timeout)
            .field("announce_draining", &self.announce_draining)
            .field("announce_timeout", &self.announce_timeout)
            .field("register_timeout", &self.register_timeout)
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// Serves and registers `registration` (not started yet: [`Lifecycle::serve`] starts it once
    /// the server accepts calls) in `etcd`.
    pub fn new(etcd: &Etcd, registration: RegistrationBuilder) -> Self {
        Self::with(etcd, Describe::Given(registration))
    }

    /// Like [`Lifecycle::new`], with the registration made from the address the listener is bound
    /// to (the real port when it was bound to port 0). Suits a listener on a specific interface;
    /// one bound to `0.0.0.0` or `::` has no address clients can dial, so give the advertised
    /// address with [`Lifecycle::new`] instead.
    pub fn with_bound_addr(
        etcd: &Etcd,
        describe: impl FnOnce(SocketAddr) -> RegistrationBuilder + Send + 'static,
    ) -> Self {
        Self::with(etcd, Describe::FromAddr(Box::new(describe)))
    }

    fn with(etcd: &Etcd, describe: Describe) -> Self {
        Self {
            etcd: etcd.clone(),
            describe,
            health: HealthReporter::new(),
            serve_health: true,
            health_of: Vec::new(),
            deregister_grace: DEFAULT_DEREGISTER_GRACE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            announce_draining: true,
            announce_timeout: DEFAULT_ANNOUNCE_TIMEOUT,
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
            while_serving: None,
        }
    }

    /// Reports through `reporter` instead of a reporter of the lifecycle's own. The caller then
    /// serves the `grpc.health.v1` service made with it (from `tonic_health`'s `health_reporter()`)
    /// and [`Lifecycle::serve`] adds none.
    pub fn health_reporter(mut self, reporter: HealthReporter) -> Self {
        self.health = reporter;
        self.serve_health = false;
        self
    }

    /// Reports `service` (a fully qualified name such as `helloworld.Greeter`, or tonic's
    /// `NamedService::NAME`) SERVING while serving and NOT_SERVING on shutdown, like the whole
    /// server (`""`). Repeat for each service clients check by name.
    pub fn health_of(mut self, service: impl Into<String>) -> Self {
        self.health_of.push(service.into());
        self
    }

    /// The health reporter: flip the statuses by hand (an operator's switch) from a
    /// [`Lifecycle::while_serving`] task. Shutdown sets NOT_SERVING whatever was set before.
    pub fn reporter(&self) -> HealthReporter {
        self.health.clone()
    }

    /// After revoking the lease on shutdown, keep serving this long (default
    /// [`DEFAULT_DEREGISTER_GRACE`]) so clients can act on the DELETE before the listener closes.
    pub fn deregister_grace(mut self, grace: Duration) -> Self {
        self.deregister_grace = grace;
        self
    }

    /// Deadline for in-flight calls to finish once the listener is closed (default
    /// [`DEFAULT_DRAIN_TIMEOUT`]); calls still running after it are cut.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Whether to announce the departure (`draining: true` in the record) before revoking the
    /// lease (default yes): clients of this crate then stop calling at once, rather than keep the
    /// instance in their removal grace until a health check says NOT_SERVING.
    pub fn announce_draining(mut self, announce: bool) -> Self {
        self.announce_draining = announce;
        self
    }

    /// How long the draining announcement may take (default [`DEFAULT_ANNOUNCE_TIMEOUT`]); shutdown
    /// goes on without it after that.
    pub fn announce_timeout(mut self, timeout: Duration) -> Self {
        self.announce_timeout = timeout;
        self
    }

    /// How long to wait for the first registration (default [`DEFAULT_REGISTER_TIMEOUT`]) before
    /// [`Lifecycle::serve`] gives up with [`Error::NotRegistered`].
    pub fn register_timeout(mut self, timeout: Duration) -> Self {
        self.register_timeout = timeout;
        self
    }

    /// Runs `task` from the moment the instance is registered until shutdown begins, when it is
    /// dropped: before NOT_SERVING is reported, so a health switch run here cannot undo it.
    pub fn while_serving(mut self, task: impl Future<Output = ()> + Send + 'static) -> Self {
        self.while_serving = Some(Box::pin(task));
        self
    }

    /// Serves `router` on `listener` until `shutdown` is cancelled, registered in etcd meanwhile,
    /// then leaves as the [module docs](self) describe. Returns once the server has stopped.
    ///
    /// The health service is added to `router` unless [`Lifecycle::health_reporter`] was given.
    /// Shutdown requested before the registration completed skips the wait and leaves the same
    /// way.
    ///
    /// # Errors
    /// - [`Error::Listener`] if the listener's address cannot be read;
    /// - [`Error::InvalidName`], [`Error::InvalidAddr`] or [`Error::InvalidTtl`] for a registration
    ///   that cannot be started;
    /// - [`Error::NotRegistered`] if the key was not in etcd within [`Lifecycle::register_timeout`]
    ///   (the server stops; the registration is abandoned);
    /// - [`Error::Serve`] if serving failed.
    ///
    /// A failed announcement or deregistration is logged, not returned: the key then expires with
    /// its lease, and the server still drains.
    pub async fn serve<L, ResBody>(
        self,
        router: Router<L>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<()>
    where
        L: Layer<Routes>,
        L::Service: Service<http::Request<Body>, Response = http::Response<ResBody>>
            + Clone
            + Send
            + 'static,
        <L::Service as Service<http::Request<Body>>>::Future: Send,
        <L::Service as Service<http::Request<Body>>>::Error: Into<BoxError> + Send,
        ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let Lifecycle {
            etcd,
            describe,
            health,
            serve_health,
            health_of,
            deregister_grace,
            drain_timeout,
            announce_draining,
            announce_timeout,
            register_timeout,
            while_serving,
        } = self;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Listener { source })?;
        let builder = match describe {
            Describe::Given(builder) => builder,
            Describe::FromAddr(describe) => describe(local),
        };
        let router = if serve_health {
            router.add_service(HealthServer::new(HealthService::from_health_reporter(
                health.clone(),
            )))
        } else {
            router
        };
        set_health(&health, &health_of, ServingStatus::Serving).await;

        let stop_accepting = CancellationToken::new();
        let cut = CancellationToken::new();
        let served = router.serve_with_incoming_shutdown(
            Cuttable::incoming(incoming(listener), cut.clone()),
            stop_accepting.clone().cancelled_owned(),
        );
        let mut server = Serving {
            future: pin!(served),
            ended: None,
            local,
        };
        // Polled once before anything is put in etcd: from here the accept loop is running, so the
        // key never names a server that is not taking calls.
        if let Some(ended) = server.poll_once().await {
            return ended;
        }
        let registration = builder.start(&etcd)?;
        let key = registration.key().to_owned();
        info!(listen = %local, key, "serving");

        let registered = async {
            tokio::select! {
                registered = registration.wait_registered(register_timeout) => Some(registered),
                _ = shutdown.cancelled() => None,
            }
        };
        let registered = match server.until_ended(registered).await {
            Some(registered) => registered,
            None => return server.ended_early(registration).await,
        };
        match registered {
            Some(Ok(lease)) => info!(
                key,
                lease = format_args!("{lease:x}"),
                "registered; clients can now find this instance"
            ),
            Some(Err(e)) => {
                return Err(Error::NotRegistered {
                    key,
                    endpoints: etcd.config().endpoints.join(","),
                    waited: register_timeout,
                    source: Box::new(e),
                });
            }
            None => info!(key, "shutdown requested before registration completed"),
        }

        if !shutdown.is_cancelled() {
            let task = async move {
                if let Some(task) = while_serving {
                    task.await;
                }
                // A task that ends early must not end the serving.
                std::future::pending::<()>().await
            };
            let stop = async {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = task => {}
                }
            };
            if server.until_ended(stop).await.is_none() {
                return server.ended_early(registration).await;
            }
        }

        info!(key, "shutting down: 1/4 reporting NOT_SERVING");
        set_health(&health, &health_of, ServingStatus::NotServing).await;
        if announce_draining {
            info!(key, "shutting down: announcing draining in etcd");
            let announced = server
                .alongside(registration.announce_draining(announce_timeout))
                .await;
            if let Err(e) = announced {
                warn!(key, error = %chain(&e), "could not announce draining; clients learn of the departure from their health checks");
            }
        }
        info!(key, "shutting down: 2/4 revoking the lease");
        if let Err(e) = server.alongside(registration.deregister()).await {
            warn!(key, error = %chain(&e), "deregistration failed; the key expires with its lease");
        }
        info!(grace = ?deregister_grace, "shutting down: 3/4 serving while clients drop this instance");
        server.alongside(tokio::time::sleep(deregister_grace)).await;
        info!(deadline = ?drain_timeout, "shutting down: 4/4 draining in-flight calls");
        stop_accepting.cancel();
        match tokio::time::timeout(drain_timeout, server.finish()).await {
            Ok(served) => served?,
            Err(_) => {
                // tonic runs each connection in a task of its own, which dropping the server
                // future does not end: failing their sockets does, and their clients see the
                // calls fail instead of waiting for answers that will never come.
                cut.cancel();
                warn!(deadline = ?drain_timeout, "drain deadline passed; remaining calls were cut");
            }
        }
        info!(key, "stopped");
        Ok(())
    }
}

/// tonic's error bound for services and bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Reports the whole server (`""`) and each listed service.
async fn set_health(health: &HealthReporter, services: &[String], status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in services {
        health.set_service_status(service, status).await;
    }
}

/// The server future, polled in the caller's task alongside each step of the lifecycle (so no
/// `Send` or `'static` bound beyond tonic's own), and what it ended with if it ended.
struct Serving<'a, F> {
    future: Pin<&'a mut F>,
    ended: Option<Result<(), tonic::transport::Error>>,
    local: SocketAddr,
}

impl<F> Serving<'_, F>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    /// Polls the server once; returns its result if it ended at once (a listener that fails).
    async fn poll_once(&mut self) -> Option<Result<()>> {
        let polled = std::future::poll_fn(|cx| Poll::Ready(self.future.as_mut().poll(cx))).await;
        match polled {
            Poll::Ready(served) => Some(served.map_err(|source| Error::Serve {
                addr: self.local,
                source,
            })),
            Poll::Pending => None,
        }
    }

    /// Runs `step` while serving; `None` if the server ended first.
    async fn until_ended<T>(&mut self, step: impl Future<Output = T>) -> Option<T> {
        if self.ended.is_some() {
            return None;
        }
        tokio::select! {
            biased;
            served = self.future.as_mut() => {
                self.ended = Some(served);
                None
            }
            out = step => Some(out),
        }
    }

    /// Runs `step` to its end, serving meanwhile; a server that ends meanwhile is remembered.
    async fn alongside<T>(&mut self, step: impl Future<Output = T>) -> T {
        let mut step = pin!(step);
        match self.until_ended(step.as_mut()).await {
            Some(out) => out,
            None => step.await,
        }
    }

    /// Waits for the server to end.
    async fn finish(&mut self) -> Result<()> {
        let served = match self.ended.take() {
            Some(served) => served,
            None => self.future.as_mut().await,
        };
        served.map_err(|source| Error::Serve {
            addr: self.local,
            source,
        })
    }

    /// The server stopped before shutdown was asked for: deregister (the key would otherwise send
    /// clients to a closed port for up to a TTL) and report why it stopped.
    async fn ended_early(&mut self, registration: crate::Registration) -> Result<()> {
        let key = registration.key().to_owned();
        warn!(listen = %self.local, key, "the server stopped before shutdown was requested; deregistering");
        if let Err(e) = registration.deregister().await {
            warn!(key, error = %chain(&e), "deregistration failed; the key expires with its lease");
        }
        self.finish().await
    }
}

/// An accepted connection that fails once its drain deadline has passed.
///
/// Only reads check: hyper keeps a read pending on every HTTP/2 connection, so a failed read ends
/// the connection whatever its calls are doing, and writes stay as cheap as the bare socket's.
struct Cuttable {
    io: TcpStream,
    /// A child of the lifecycle's token: each connection waits on a node of its own, so checking
    /// it takes an uncontended lock rather than one shared by every connection.
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Cuttable {
    /// The connections of `incoming`, each cut when `cut` is cancelled.
    fn incoming(
        incoming: TcpIncoming,
        cut: CancellationToken,
    ) -> impl futures_core::Stream<Item = io::Result<Cuttable>> {
        CuttableIncoming { incoming, cut }
    }
}

struct CuttableIncoming {
    incoming: TcpIncoming,
    cut: CancellationToken,
}

impl futures_core::Stream for CuttableIncoming {
    type Item = io::Result<Cuttable>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let accepted = Pin::new(&mut self.incoming).poll_next(cx);
        accepted.map(|next| {
            next.map(|accepted| {
                accepted.map(|io| Cuttable {
                    io,
                    cut: Box::pin(self.cut.child_token().cancelled_owned()),
                })
            })
        })
    }
}

impl Connected for Cuttable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Cuttable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the drain deadline passed",
            )));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

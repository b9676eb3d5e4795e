//! In-process Greeter servers on real loopback sockets, for tests and benchmarks that need
//! instances without starting `server` processes (feature `grpc`).
//!
//! A [`TestServer`] answers `helloworld.Greeter/SayHello` with its instance id and address (the
//! reply's `instance_id` and `addr`), so a caller can tell which instance served each call. It
//! can be made slow, made to fail, report NOT_SERVING, or crash.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use proto::helloworld::{
    HelloReply, HelloRequest,
    greeter_server::{Greeter, GreeterServer},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

/// How a test server behaves.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Wait this long before answering each call.
    pub delay: Duration,
    /// Serve grpc.health.v1 (SERVING at start), controllable through [`TestServer::set_serving`].
    pub health: bool,
}

/// A Greeter that answers with a fixed instance id, or fails on purpose.
#[derive(Debug, Clone)]
struct TestGreeter {
    id: String,
    addr: String,
    delay: Duration,
    failing: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl Greeter for TestGreeter {
    async fn say_hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!("{} fails on purpose", self.id)));
        }
        Ok(Response::new(HelloReply {
            message: format!("hello from {}", self.id),
            instance_id: self.id.clone(),
            addr: self.addr.clone(),
        }))
    }
}

/// An in-process Greeter server; it stops serving when dropped.
pub struct TestServer {
    /// Where it listens, `host:port`.
    pub addr: String,
    failing: Arc<AtomicBool>,
    health: Option<HealthReporter>,
    /// Cancelled on drop. Connections end only through it: tonic spawns each connection as a
    /// task of its own that outlives the aborted accept loop unless a shutdown signal is wired.
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TestServer {
    /// Binds 127.0.0.1:0 (so the port is ours, with no race), then serves as `id`.
    pub async fn start(id: &str) -> Self {
        Self::start_on("127.0.0.1:0", id).await
    }

    /// Serves on `addr` (e.g. the address of a server that crashed, to bring it back).
    pub async fn start_on(addr: &str, id: &str) -> Self {
        Self::start_with(addr, id, Behaviour::default()).await
    }

    /// Serves on `addr` as `id`, behaving as `behaviour` says.
    ///
    /// # Panics
    ///
    /// When `addr` cannot be bound, naming it.
    pub async fn start_with(addr: &str, id: &str, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("testkit: binding a test server on {addr}: {e}"));
        Self::serve(listener, id, behaviour).await
    }

    /// Serves on an already bound `listener` as `id`, behaving as `behaviour` says.
    ///
    /// # Panics
    ///
    /// When the listener has no local address.
    pub async fn serve(listener: TcpListener, id: &str, behaviour: Behaviour) -> Self {
        let addr = listener
            .local_addr()
            .expect("testkit: a bound listener has an address")
            .to_string();
        let failing = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let greeter = TestGreeter {
            id: id.to_owned(),
            addr: addr.clone(),
            delay: behaviour.delay,
            failing: failing.clone(),
        };
        let (health, health_service) = if behaviour.health {
            let (reporter, service) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("", ServingStatus::Serving)
                .await;
            (Some(reporter), Some(service))
        } else {
            (None, None)
        };
        let serve = tonic::transport::Server::builder()
            .add_optional_service(health_service)
            .add_service(GreeterServer::new(greeter))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop.clone().cancelled_owned(),
            );
        let task = {
            let addr = addr.clone();
            tokio::spawn(async move {
                if let Err(e) = serve.await {
                    panic!("testkit: the test server on {addr} failed: {e}");
                }
            })
        };
        Self {
            addr,
            failing,
            health,
            stop,
            task,
        }
    }

    /// Makes every call fail with UNAVAILABLE (or succeed again).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Reports SERVING or NOT_SERVING.
    ///
    /// # Panics
    ///
    /// When the server was started without [`Behaviour::health`].
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health
            .as_ref()
            .expect("testkit: set_serving on a test server started without a health service")
            .set_service_status("", status)
            .await;
    }

    /// Waits until the server task ends (it only ends by failing: panics with the cause then).
    pub async fn wait(mut self) {
        if let Err(e) = (&mut self.task).await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Stops abruptly: the listener and every connection are dropped, as in a crash.
    pub fn crash(self) {
        // Dropping aborts the task.
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

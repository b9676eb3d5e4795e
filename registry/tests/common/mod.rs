//! Shared helpers for the registry's integration tests: a real etcd cluster, in-process Greeter
//! servers on real sockets, and async polling with a deadline.

#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

use std::{
    future::Future,
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
use registry::{Etcd, EtcdConfig};
use testkit::EtcdCluster;
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{ServingStatus, server::HealthReporter};

/// A three-member cluster and a client connected to all of it.
pub async fn cluster() -> (EtcdCluster, Etcd) {
    let cluster = EtcdCluster::start();
    let etcd = EtcdConfig::new(cluster.endpoints())
        .expect("the harness hands out valid endpoints")
        .connect()
        .await
        .expect("connecting to the test cluster");
    (cluster, etcd)
}

/// A balanced channel over the `greeter` service with `options`, once `ready` instances are in
/// rotation (panics after 10 s).
pub async fn ready_channel(
    etcd: &Etcd,
    options: registry::BalanceOptions,
    ready: usize,
) -> registry::BalancedChannel {
    let channel = registry::BalancedChannel::new(
        registry::Discovery::builder("greeter").start(etcd).unwrap(),
        options,
    );
    channel
        .wait_ready(ready, Duration::from_secs(10))
        .await
        .unwrap();
    channel
}

/// Polls `check` every 10 ms until it returns `Some`, panicking after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

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

/// An in-process Greeter server on a free loopback port.
pub struct TestServer {
    pub addr: String,
    failing: Arc<AtomicBool>,
    health: Option<HealthReporter>,
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
    /// Binds 127.0.0.1:0 first (so the port is ours), then serves.
    pub async fn start(id: &str) -> Self {
        Self::start_on("127.0.0.1:0", id).await
    }

    /// Serves on `addr` (e.g. the address of a server that crashed, to bring it back).
    pub async fn start_on(addr: &str, id: &str) -> Self {
        Self::start_with(addr, id, Behaviour::default()).await
    }

    pub async fn start_with(addr: &str, id: &str, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("bound address").to_string();
        let stop = CancellationToken::new();
        let failing = Arc::new(AtomicBool::new(false));
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
                registry::serve::incoming(listener),
                stop.clone().cancelled_owned(),
            );
        let task = tokio::spawn(async move {
            serve.await.expect("test server failed");
        });
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

    /// Reports SERVING or NOT_SERVING (the server must have been started with `health`).
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health
            .as_ref()
            .expect("started without a health service")
            .set_service_status("", status)
            .await;
    }

    /// Stops abruptly: the listener and every connection are dropped, as in a crash.
    pub fn crash(self) {
        self.task.abort();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

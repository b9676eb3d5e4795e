//! Shared helpers for the registry's integration tests: a real etcd cluster, in-process Greeter
//! servers on real sockets, and async polling with a deadline.

#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

use std::{future::Future, time::Duration};

use proto::helloworld::{
    HelloReply, HelloRequest,
    greeter_server::{Greeter, GreeterServer},
};
use registry::{Etcd, EtcdConfig};
use testkit::EtcdCluster;
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

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

/// A Greeter that answers with a fixed instance id.
#[derive(Debug, Clone)]
struct TestGreeter {
    id: String,
    addr: String,
}

#[tonic::async_trait]
impl Greeter for TestGreeter {
    async fn say_hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            message: format!("hello from {}", self.id),
            instance_id: self.id.clone(),
            addr: self.addr.clone(),
        }))
    }
}

/// An in-process Greeter server on a free loopback port.
#[derive(Debug)]
pub struct TestServer {
    pub addr: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Binds 127.0.0.1:0 first (so the port is ours), then serves.
    pub async fn start(id: &str) -> Self {
        Self::start_on("127.0.0.1:0", id).await
    }

    /// Serves on `addr` (e.g. the address of a server that crashed, to bring it back).
    pub async fn start_on(addr: &str, id: &str) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("bound address").to_string();
        let stop = CancellationToken::new();
        let greeter = TestGreeter {
            id: id.to_owned(),
            addr: addr.clone(),
        };
        let serve = tonic::transport::Server::builder()
            .add_service(GreeterServer::new(greeter))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        let task = tokio::spawn(async move {
            serve.await.expect("test server failed");
        });
        Self { addr, stop, task }
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

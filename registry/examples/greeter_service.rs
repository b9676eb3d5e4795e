//! A tonic service that registers itself in etcd, and a client that finds it through the registry:
//! the whole life of one instance in one program, written to be copied into your own service.
//!
//! ```text
//! scripts/etcd-cluster.sh start                      # or: docker compose up -d
//! cargo run -p registry --example greeter_service
//! ```
//!
//! It serves `helloworld.Greeter` and `grpc.health.v1.Health` on a free loopback port with a
//! [`Lifecycle`], which registers the instance as `services/greeter-example/<instance-id>` once
//! serving; discovers it with a [`BalancedChannel`], makes three calls, and shuts down the way a
//! server should: NOT_SERVING, deregister (the lease is revoked, so the key is deleted at once), a
//! short grace, then drain. etcd's endpoints come from
//! `ETCD_ENDPOINTS` (comma-separated `host:port`), else the demo cluster.
//!
//! `cargo test --workspace` compiles this file but does not run it: it needs a running cluster.
//! Guide: `docs/USE-IN-YOUR-SERVICE.md`.

use std::{error::Error, time::Duration};

use proto::helloworld::{
    HelloReply, HelloRequest,
    greeter_client::GreeterClient,
    greeter_server::{Greeter, GreeterServer},
};
use registry::{
    BalanceOptions, BalancedChannel, Discovery, Etcd, EtcdConfig, Lifecycle, Policy, Registration,
    RetryPolicy, Selector, ServedBy,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The demo cluster started by `scripts/etcd-cluster.sh` or `docker compose up`.
const DEMO_ENDPOINTS: &str = "127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793";
/// Instances live under `<namespace>/<service>/`; a Go client dials `etcd:///services/greeter-example`.
const NAMESPACE: &str = "services";
const SERVICE: &str = "greeter-example";
/// `SayHello` has no side effects, so a call that failed with UNAVAILABLE may be sent again.
const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";
/// How long the instance keeps serving after its key is gone, while clients drop it.
const DEREGISTER_GRACE: Duration = Duration::from_millis(500);
/// How long in-flight calls may take to finish once the listener is closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let endpoints = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| DEMO_ENDPOINTS.to_owned());
    // One handle per process, cloned where needed. It connects lazily: an etcd that is down is
    // reported by the first request (here, the registration `serve` starts), naming the endpoints.
    let etcd = EtcdConfig::new(endpoints.split(','))?.connect().await?;

    // Server, step 1: bind first, so the port is ours before anything is announced.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let instance_id = addr.replace(':', "-");

    // Server, step 2: describe the instance. Nothing is written yet: `serve` starts the
    // registration once the server accepts calls, and its task keeps the lease alive and puts the
    // key back after any etcd outage.
    let registration = Registration::builder(SERVICE, &instance_id, &addr)
        .namespace(NAMESPACE)
        .ttl(Duration::from_secs(10))
        .metadata("version", "v1");

    // Server, step 3: serve the Greeter, plus grpc.health.v1 (added by `serve`, SERVING for ""
    // and the Greeter). Clients put an instance in rotation only after it answered a health
    // check, and take it out when it reports NOT_SERVING. When `shutdown` fires, `serve` leaves
    // in this order: NOT_SERVING, the draining announcement, the lease revoked (the key deleted
    // at once), the grace, then the drain within its deadline.
    let greeter = ExampleGreeter {
        instance_id: instance_id.clone(),
        addr: addr.clone(),
    };
    let router = tonic::transport::Server::builder().add_service(GreeterServer::new(greeter));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(
        Lifecycle::new(&etcd, registration)
            .health_of("helloworld.Greeter")
            .register_timeout(Duration::from_secs(10))
            .deregister_grace(DEREGISTER_GRACE)
            .drain_timeout(DRAIN_TIMEOUT)
            .serve(router, listener, shutdown.clone()),
    );

    // The client half; whatever it returns, the server below still leaves cleanly.
    let called = call_three_times(&etcd).await;

    // Server, step 4: a real service cancels `shutdown` on SIGTERM (the `server` binary:
    // `server/src/main.rs` `on_signal`); here, after the calls.
    shutdown.cancel();
    server.await??;
    println!("stopped");
    called
}

/// The client side: discover the service, balance over its instances, call it.
async fn call_three_times(etcd: &Etcd) -> Result<(), Box<dyn Error>> {
    let discovery = Discovery::builder(SERVICE)
        .namespace(NAMESPACE)
        .start(etcd)?;
    let options = BalanceOptions {
        policy: Policy::RoundRobin,
        // Only instances that published version=v1; `prefer` would fall back to the others.
        selector: Selector::default().require("version", "v1"),
        // Calls that never reached a server are retried for any method; methods declared
        // idempotent also after UNAVAILABLE.
        retry: RetryPolicy::default().idempotent(SAY_HELLO),
        // One deadline per call, retries included.
        call_timeout: Duration::from_secs(2),
        ..BalanceOptions::default()
    };
    let channel = BalancedChannel::new(discovery, options);
    // Registered, connected, answered a health check, admitted by the selector.
    channel.wait_ready(1, Duration::from_secs(5)).await?;

    let mut client = GreeterClient::new(channel);
    for n in 1..=3 {
        let request = HelloRequest {
            name: format!("call {n}"),
        };
        let response = client.say_hello(request).await?;
        // The balanced channel marks each response with the instance it was sent to.
        let sent_to = response
            .extensions()
            .get::<ServedBy>()
            .map_or_else(|| "?".to_owned(), |s| s.addr.to_string());
        let reply = response.into_inner();
        println!(
            "call {n}: sent to {sent_to}, served by {}: {:?}",
            reply.instance_id, reply.message
        );
    }
    Ok(())
}

/// A Greeter that says which instance answered.
#[derive(Debug)]
struct ExampleGreeter {
    instance_id: String,
    addr: String,
}

#[tonic::async_trait]
impl Greeter for ExampleGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            message: format!("Hello {}", request.get_ref().name),
            instance_id: self.instance_id.clone(),
            addr: self.addr.clone(),
        }))
    }
}

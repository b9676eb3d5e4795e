//! `serve::Lifecycle` against a real etcd and a real tonic server on a port-0 listener: registered
//! only once answering; on shutdown NOT_SERVING, the draining record, the DELETE, the grace, the
//! drain, all within their deadlines; and the error when registration never completes.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use etcd_client::{EventType, WatchOptions};
use proto::helloworld::{
    HelloReply, HelloRequest,
    greeter_client::GreeterClient,
    greeter_server::{Greeter, GreeterServer},
};
use registry::{Error, Etcd, EtcdConfig, Registration, endpoint::DRAINING_KEY, serve::Lifecycle};
use testkit::EtcdCluster;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
    time::{Instant, timeout},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SERVICE: &str = "lifecycle";

/// A Greeter whose `SayHello("slow")` reports its arrival and then waits for the test's release;
/// every other name is answered at once.
#[derive(Clone)]
struct SlowGreeter {
    arrived: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

#[tonic::async_trait]
impl Greeter for SlowGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        if name == "slow" {
            let _ = self.arrived.send(());
            self.release.notified().await;
        }
        Ok(Response::new(HelloReply {
            message: format!("hello {name}"),
            ..Default::default()
        }))
    }
}

struct Started {
    addr: SocketAddr,
    key: String,
    shutdown: CancellationToken,
    serving: tokio::task::JoinHandle<registry::Result<()>>,
    arrived: mpsc::UnboundedReceiver<()>,
    release: Arc<Notify>,
}

/// Binds port 0 and serves a `SlowGreeter` through `lifecycle`, which registers the bound address.
async fn start(etcd: &Etcd, configure: impl FnOnce(Lifecycle) -> Lifecycle) -> Started {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key = format!("services/{SERVICE}/{}", instance_id(addr));
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let greeter = SlowGreeter {
        arrived: arrived_tx,
        release: release.clone(),
    };
    let lifecycle = Lifecycle::with_bound_addr(etcd, |addr| {
        Registration::builder(SERVICE, instance_id(addr), addr.to_string())
    })
    .health_of("helloworld.Greeter");
    let router = tonic::transport::Server::builder().add_service(GreeterServer::new(greeter));
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(configure(lifecycle).serve(router, listener, shutdown.clone()));
    Started {
        addr,
        key,
        shutdown,
        serving,
        arrived,
        release,
    }
}

fn instance_id(addr: SocketAddr) -> String {
    addr.to_string().replace(':', "-")
}

/// Every change under the service's prefix from now on, as (is a put, value). Opened before the
/// server starts, so the registration's put is among them.
async fn watch_service(etcd: &Etcd) -> mpsc::UnboundedReceiver<(bool, String)> {
    let prefix = format!("services/{SERVICE}/");
    let mut stream = etcd
        .client()
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // The watch is cancelled when the stream is dropped, at the end of the test.
        while let Ok(Some(response)) = stream.message().await {
            for event in response.events() {
                let value = event
                    .kv()
                    .map(|kv| kv.value_str().unwrap_or_default().to_owned())
                    .unwrap_or_default();
                if tx
                    .send((event.event_type() == EventType::Put, value))
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    rx
}

async fn next_event(
    events: &mut mpsc::UnboundedReceiver<(bool, String)>,
    what: &str,
) -> (bool, String) {
    timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 10 s"))
        .expect("the watch ended")
}

async fn channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
}

async fn health(channel: Channel, service: &str) -> Result<ServingStatus, Status> {
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(reply.into_inner().status())
}

/// Waits until `addr` refuses connections: the listener was closed, the drain has begun.
async fn wait_closed(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    // Each probe is dropped at once, so the server sees EOF and the drain does not wait for it.
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepted connections {within:?} later"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn one_member() -> (EtcdCluster, Etcd) {
    let cluster = EtcdCluster::start_with(1);
    let etcd = EtcdConfig::new(cluster.endpoints())
        .unwrap()
        .connect()
        .await
        .unwrap();
    (cluster, etcd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_once_answering_then_leaves_before_closing_the_door() {
    const GRACE: Duration = Duration::from_secs(2);
    const DRAIN: Duration = Duration::from_secs(5);
    let (_cluster, etcd) = one_member().await;
    let mut events = watch_service(&etcd).await;
    let mut server = start(&etcd, |l| l.deregister_grace(GRACE).drain_timeout(DRAIN)).await;

    let (put, value) = next_event(&mut events, "the registration").await;
    assert!(
        put && value.contains(&server.addr.to_string()) && !value.contains(DRAINING_KEY),
        "first event put={put} {value:?}"
    );
    // The moment the key is visible, a fresh connection gets answers.
    let connected = channel(server.addr)
        .await
        .expect("registered but not accepting");
    assert_eq!(
        health(connected.clone(), "").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        health(connected.clone(), "helloworld.Greeter")
            .await
            .unwrap(),
        ServingStatus::Serving
    );

    // A call in flight across the whole shutdown, on its own connection without a deadline.
    let slow_channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let slow = tokio::spawn(async move {
        GreeterClient::new(slow_channel)
            .say_hello(HelloRequest {
                name: "slow".into(),
            })
            .await
    });
    timeout(Duration::from_secs(5), server.arrived.recv())
        .await
        .expect("the slow call did not reach the server");
    let mut watch_health = HealthClient::new(connected.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch_health.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    server.shutdown.cancel();
    let cancelled = Instant::now();

    let next = timeout(Duration::from_secs(5), watch_health.message())
        .await
        .expect("health still SERVING 5 s after shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    // An open Watch is an in-flight call: the drain would wait for it.
    drop(watch_health);

    let (put, value) = next_event(&mut events, "the draining announcement").await;
    assert!(
        put && value.contains(&format!(r#"\"{DRAINING_KEY}\":true"#)),
        "expected the draining record, got put={put} {value:?}"
    );
    let (put, _) = next_event(&mut events, "the DELETE").await;
    assert!(!put, "expected the DELETE");
    let deleted = Instant::now();

    // During the grace, a new connection is still accepted and answered.
    let late = channel(server.addr)
        .await
        .expect("the listener closed before the grace");
    let reply = GreeterClient::new(late)
        .say_hello(HelloRequest {
            name: "late".into(),
        })
        .await
        .expect("a call during the grace failed");
    assert_eq!(reply.into_inner().message, "hello late");
    assert!(
        deleted.elapsed() < GRACE,
        "the grace call came too late to prove anything"
    );

    wait_closed(server.addr, GRACE + Duration::from_secs(2)).await;
    let closed = deleted.elapsed();
    // The DELETE can reach the watch a moment before the revoke's reply reaches the server.
    assert!(
        closed + Duration::from_millis(200) >= GRACE,
        "the listener closed {closed:?} after the DELETE, within the {GRACE:?} grace"
    );
    assert!(
        !server.serving.is_finished(),
        "stopped while a call was still in flight"
    );

    server.release.notify_one();
    let reply = slow.await.unwrap().expect("the in-flight call was cut");
    assert_eq!(reply.into_inner().message, "hello slow");
    timeout(DRAIN, &mut server.serving)
        .await
        .expect("serve did not return after the last call ended")
        .unwrap()
        .expect("serve failed");
    let total = cancelled.elapsed();
    eprintln!("shutdown took {total:?} (grace {GRACE:?}, drain deadline {DRAIN:?})");
    assert!(total < GRACE + DRAIN, "shutdown took {total:?}");
    assert!(
        etcd.client()
            .get(server.key.as_str(), None)
            .await
            .unwrap()
            .kvs()
            .is_empty(),
        "the key outlived the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_running_at_the_drain_deadline_is_cut() {
    const DRAIN: Duration = Duration::from_secs(1);
    let (_cluster, etcd) = one_member().await;
    let mut events = watch_service(&etcd).await;
    let mut server = start(&etcd, |l| {
        l.deregister_grace(Duration::ZERO).drain_timeout(DRAIN)
    })
    .await;
    let (put, _) = next_event(&mut events, "the registration").await;
    assert!(put, "expected the registration's put");
    // No client deadline: only the server can end this call.
    let slow_channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let slow = tokio::spawn(async move {
        GreeterClient::new(slow_channel)
            .say_hello(Request::new(HelloRequest {
                name: "slow".into(),
            }))
            .await
    });
    timeout(Duration::from_secs(5), server.arrived.recv())
        .await
        .expect("the slow call did not reach the server");

    server.shutdown.cancel();
    wait_closed(server.addr, Duration::from_secs(5)).await;
    let draining = Instant::now();
    timeout(DRAIN + Duration::from_secs(2), &mut server.serving)
        .await
        .expect("serve outlived its drain deadline")
        .unwrap()
        .expect("a cut call is not a serve failure");
    let drained = draining.elapsed();
    eprintln!("serve returned {drained:?} after the listener closed (deadline {DRAIN:?})");
    assert!(
        drained + Duration::from_millis(100) >= DRAIN,
        "returned after {drained:?}, before the {DRAIN:?} deadline"
    );
    // The call never finished on the server: the client sees it fail, not hang.
    let cut = timeout(Duration::from_secs(1), slow)
        .await
        .expect("the call still hangs after the drain deadline")
        .unwrap();
    assert!(cut.is_err(), "the call was not cut: {cut:?}");
    drop(server.release); // never released
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_that_never_completes_is_an_error_naming_key_and_endpoints() {
    const REGISTER: Duration = Duration::from_secs(1);
    // Nothing listens there.
    let dead = format!("127.0.0.1:{}", testkit::free_port());
    let etcd = EtcdConfig::new([dead.as_str()])
        .unwrap()
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    let server = start(&etcd, |l| l.register_timeout(REGISTER)).await;
    let result = timeout(REGISTER + Duration::from_secs(5), server.serving)
        .await
        .expect("serve kept waiting past its register timeout")
        .unwrap();
    let waited = started.elapsed();
    let err = result.expect_err("registered with no etcd");
    assert!(
        matches!(&err, Error::NotRegistered { key, waited, .. } if *key == server.key && *waited == REGISTER),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&server.key) && text.contains(&dead), "{text}");
    assert!(waited >= REGISTER, "gave up after {waited:?}");
    // The server stopped with it: nothing is left accepting on the port.
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_before_registration_completes_stops_without_waiting_for_etcd() {
    const REGISTER: Duration = Duration::from_secs(30);
    let dead = format!("127.0.0.1:{}", testkit::free_port());
    let etcd = EtcdConfig::new([dead.as_str()])
        .unwrap()
        .connect()
        .await
        .unwrap();
    let server = start(&etcd, |l| {
        l.register_timeout(REGISTER)
            .deregister_grace(Duration::ZERO)
            .announce_timeout(Duration::from_millis(200))
    })
    .await;
    // Serving while it waits for etcd: answered, and already SERVING.
    let connected = channel(server.addr)
        .await
        .expect("not serving while registering");
    assert_eq!(health(connected, "").await.unwrap(), ServingStatus::Serving);
    drop(server.arrived);

    server.shutdown.cancel();
    let cancelled = Instant::now();
    timeout(Duration::from_secs(10), server.serving)
        .await
        .expect("serve kept waiting for a registration after shutdown")
        .unwrap()
        .expect("a shutdown before registering is not an error");
    let took = cancelled.elapsed();
    eprintln!("stopped {took:?} after shutdown, never registered");
    assert!(took < REGISTER, "waited out the register timeout: {took:?}");
}

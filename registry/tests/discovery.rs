//! Discovery and balancing against a real etcd cluster and real Greeter servers on loopback.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::cluster;
use proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use registry::{BalanceOptions, BalancedChannel, Discovery, Registration, ServedBy};
use testkit::{TestServer, eventually};
use tokio::time::Instant;

fn ids(discovery: &Discovery) -> Vec<String> {
    discovery.membership().instances.keys().cloned().collect()
}

async fn call(client: &mut GreeterClient<BalancedChannel>) -> Result<String, tonic::Status> {
    let response = client
        .say_hello(HelloRequest {
            name: "test".into(),
        })
        .await?;
    let served = response.extensions().get::<ServedBy>().cloned();
    let reply = response.into_inner();
    // The balancer's record of where the call went must agree with who answered.
    assert_eq!(served.map(|s| s.addr.to_string()), Some(reply.addr.clone()));
    Ok(reply.instance_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_then_follows_puts_and_deletes_skipping_bad_records() {
    let (cluster, etcd) = cluster().await;
    // Present before discovery starts: ours, one exactly as Go's endpoints.Manager writes it, and
    // records that must be skipped without disturbing the rest.
    cluster.etcdctl_ok(&[
        "put",
        "services/greeter/a",
        r#"{"Op":0,"Addr":"127.0.0.1:1001","Metadata":{"instance_id":"a"}}"#,
    ]);
    cluster.etcdctl_ok(&[
        "put",
        "services/greeter/127.0.0.1:1002",
        r#"{"Op":0,"Addr":"127.0.0.1:1002","Metadata":null}"#,
    ]);
    cluster.etcdctl_ok(&["put", "services/greeter/garbage", "not json"]);
    cluster.etcdctl_ok(&["put", "services/greeter/no-addr", r#"{"Op":0}"#]);
    cluster.etcdctl_ok(&[
        "put",
        "services/greeter/nested/x",
        r#"{"Addr":"127.0.0.1:1003"}"#,
    ]);
    cluster.etcdctl_ok(&[
        "put",
        "services/greeter-canary/c",
        r#"{"Addr":"127.0.0.1:1004"}"#,
    ]);

    let discovery = Discovery::builder("greeter").start(&etcd).unwrap();
    discovery
        .wait_for_instances(2, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ids(&discovery), ["127.0.0.1:1002", "a"]);
    assert_eq!(
        discovery.membership().instances["127.0.0.1:1002"].addr,
        "127.0.0.1:1002"
    );

    // Changes arrive through the watch, without any request flowing.
    cluster.etcdctl_ok(&["put", "services/greeter/b", r#"{"addr":"127.0.0.1:1005"}"#]);
    eventually(Duration::from_secs(2), "b to be added", || {
        let ids = ids(&discovery);
        async move { (ids == ["127.0.0.1:1002", "a", "b"]).then_some(()) }
    })
    .await;
    cluster.etcdctl_ok(&["del", "services/greeter/a"]);
    // A record overwritten with garbage is dropped too: its old address is no longer advertised.
    cluster.etcdctl_ok(&["put", "services/greeter/b", "{broken"]);
    eventually(Duration::from_secs(2), "a and b to be removed", || {
        let ids = ids(&discovery);
        async move { (ids == ["127.0.0.1:1002"]).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_serves_three_instances_exactly_thirty_calls_each() {
    let (_cluster, etcd) = cluster().await;
    let servers = [
        TestServer::start("a").await,
        TestServer::start("b").await,
        TestServer::start("c").await,
    ];
    let mut registrations = Vec::new();
    for (server, id) in servers.iter().zip(["a", "b", "c"]) {
        let r = Registration::builder("greeter", id, &server.addr)
            .start(&etcd)
            .unwrap();
        r.wait_registered(Duration::from_secs(10)).await.unwrap();
        registrations.push(r);
    }
    let discovery = Discovery::builder("greeter").start(&etcd).unwrap();
    let channel = BalancedChannel::new(discovery, BalanceOptions::default());
    channel
        .wait_ready(3, Duration::from_secs(10))
        .await
        .unwrap();

    let mut client = GreeterClient::new(channel);
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for _ in 0..90 {
        let id = call(&mut client).await.unwrap();
        *served.entry(id.clone()).or_default() += 1;
        order.push(id);
    }
    assert_eq!(
        served,
        BTreeMap::from([("a".into(), 30), ("b".into(), 30), ("c".into(), 30)])
    );
    // Strict rotation: no instance twice in a row, every window of three covers all three.
    for window in order.windows(3) {
        let mut w = window.to_vec();
        w.sort();
        assert_eq!(w, ["a", "b", "c"], "{order:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_receives_calls_within_a_second_of_registering() {
    let (_cluster, etcd) = cluster().await;
    let first = TestServer::start("a").await;
    let r1 = Registration::builder("greeter", "a", &first.addr)
        .start(&etcd)
        .unwrap();
    r1.wait_registered(Duration::from_secs(10)).await.unwrap();
    let channel = BalancedChannel::new(
        Discovery::builder("greeter").start(&etcd).unwrap(),
        BalanceOptions::default(),
    );
    channel
        .wait_ready(1, Duration::from_secs(10))
        .await
        .unwrap();
    let mut client = GreeterClient::new(channel);

    let second = TestServer::start("b").await;
    let r2 = Registration::builder("greeter", "b", &second.addr)
        .start(&etcd)
        .unwrap();
    r2.wait_registered(Duration::from_secs(10)).await.unwrap();
    let registered = Instant::now();
    loop {
        if call(&mut client).await.unwrap() == "b" {
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(1),
            "b got no call within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!(
        "new instance served its first call {:?} after registering",
        registered.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_skipped_at_once_and_used_again_when_back() {
    let (_cluster, etcd) = cluster().await;
    let a = TestServer::start("a").await;
    let b = TestServer::start("b").await;
    let ra = Registration::builder("greeter", "a", &a.addr)
        .start(&etcd)
        .unwrap();
    let rb = Registration::builder("greeter", "b", &b.addr)
        .start(&etcd)
        .unwrap();
    ra.wait_registered(Duration::from_secs(10)).await.unwrap();
    rb.wait_registered(Duration::from_secs(10)).await.unwrap();
    let channel = BalancedChannel::new(
        Discovery::builder("greeter").start(&etcd).unwrap(),
        BalanceOptions::default(),
    );
    channel
        .wait_ready(2, Duration::from_secs(10))
        .await
        .unwrap();
    let mut client = GreeterClient::new(channel.clone());

    // Crash b without deregistering: its key stays in etcd for the whole TTL (10 s), so only the
    // connection's loss can take it out of rotation.
    let b_addr = b.addr.clone();
    b.crash();
    let crashed = Instant::now();
    eventually(Duration::from_secs(1), "b to leave the rotation", || {
        let ready = channel.ready_addrs();
        let b_addr = b_addr.clone();
        async move { (!ready.iter().any(|a| **a == *b_addr)).then_some(()) }
    })
    .await;
    eprintln!(
        "crashed instance left the rotation after {:?}",
        crashed.elapsed()
    );
    for _ in 0..20 {
        assert_eq!(call(&mut client).await.unwrap(), "a");
    }

    // Back on the same address (as a restarted process would be): reconnected with backoff.
    let listener = loop {
        match tokio::net::TcpListener::bind(&b_addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(
                    crashed.elapsed() < Duration::from_secs(5),
                    "rebinding {b_addr}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    drop(listener);
    let _b_again = TestServer::start_on(&b_addr, "b").await;
    eventually(Duration::from_secs(5), "b to be called again", || {
        let mut client = client.clone();
        async move { (call(&mut client).await.ok()? == "b").then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_instances_a_call_fails_fast_with_unavailable() {
    let (_cluster, etcd) = cluster().await;
    let discovery = Discovery::builder("nobody").start(&etcd).unwrap();
    // Wait for the first (empty) list, so the failure is "none registered", not "not synced yet".
    eventually(Duration::from_secs(10), "the first list", || {
        let synced = discovery.membership().synced;
        async move { synced.then_some(()) }
    })
    .await;
    let mut client = GreeterClient::new(BalancedChannel::new(discovery, BalanceOptions::default()));

    let started = Instant::now();
    let status = client
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    eprintln!("call with no instances failed after {elapsed:?}: {status}");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("\"nobody\""), "{status}");
    assert!(elapsed < Duration::from_millis(100), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_zero_and_kratos_records_are_read_when_asked_for() {
    let (cluster, etcd) = cluster().await;
    // go-zero: `<service>/<lease id>` -> "host:port".
    cluster.etcdctl_ok(&["put", "greet.rpc/7587867001", "127.0.0.1:8080"]);
    // kratos: `/microservices/<service>/<id>` -> ServiceInstance JSON.
    cluster.etcdctl_ok(&[
        "put",
        "/microservices/greeter/k-1",
        r#"{"id":"k-1","name":"greeter","version":"v2","metadata":{"zone":"a"},"endpoints":["grpc://127.0.0.1:9000?isSecure=false"]}"#,
    ]);

    let zero = Discovery::builder("greet.rpc")
        .format(registry::Format::GoZero)
        .start(&etcd)
        .unwrap();
    let found = zero
        .wait_for_instances(1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(found.instances["7587867001"].addr, "127.0.0.1:8080");

    let kratos = Discovery::builder("greeter")
        .namespace("microservices")
        .format(registry::Format::Kratos)
        .start(&etcd)
        .unwrap();
    let found = kratos
        .wait_for_instances(1, Duration::from_secs(10))
        .await
        .unwrap();
    let instance = &found.instances["k-1"];
    assert_eq!(instance.addr, "127.0.0.1:9000");
    assert_eq!(instance.metadata["version"], "v2");

    // Off by default: our own format does not read them.
    let ours = Discovery::builder("greet.rpc").start(&etcd).unwrap();
    let synced = ours.wait_synced(Duration::from_secs(10)).await.unwrap();
    assert!(synced.instances.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_changes_stream_as_tower_discover_changes() {
    use std::pin::pin;
    use tower::discover::Change;

    let (cluster, etcd) = cluster().await;
    let record = |addr: &str, id: &str| registry::Endpoint::new(addr, id).unwrap().encode();
    cluster.etcdctl_ok(&["put", "services/towered/a", &record("127.0.0.1:2001", "a")]);
    let discovery = Discovery::builder("towered").start(&etcd).unwrap();
    // What a tower balancer takes.
    fn is_discover<D: tower::discover::Discover>(_: &D) {}
    is_discover(&discovery.changes());
    let mut changes = pin!(discovery.changes());
    let mut next = async || {
        let polled = tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| futures_core::Stream::poll_next(changes.as_mut(), cx)),
        )
        .await
        .expect("a change within 10 s");
        match polled {
            Some(Ok(change)) => change,
            None => panic!("the stream ended"),
        }
    };
    let describe = |change: Change<String, registry::Instance>| match change {
        Change::Insert(id, instance) => format!("+{id}@{}", instance.addr),
        Change::Remove(id) => format!("-{id}"),
    };

    // What the first list found, then each change as it happens.
    assert_eq!(describe(next().await), "+a@127.0.0.1:2001");
    cluster.etcdctl_ok(&["put", "services/towered/b", &record("127.0.0.1:2002", "b")]);
    assert_eq!(describe(next().await), "+b@127.0.0.1:2002");
    // A moved instance is inserted again under its id (tower replaces it).
    cluster.etcdctl_ok(&["put", "services/towered/a", &record("127.0.0.1:2003", "a")]);
    assert_eq!(describe(next().await), "+a@127.0.0.1:2003");
    cluster.etcdctl_ok(&["del", "services/towered/b"]);
    assert_eq!(describe(next().await), "-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_too_large_for_one_grpc_message_is_listed_in_pages() {
    // 40,000 records of about 150 bytes: some 6 MB, more than the 4 MiB one gRPC message may
    // carry, so a single get of the prefix is refused; discovery must read it in pages.
    const COUNT: usize = 40_000;
    let (_cluster, etcd) = cluster().await;
    let metadata = r#"{"instance_id":"x","zone":"zone-a","version":"v1.2.3"}"#;
    let mut ops = Vec::with_capacity(COUNT);
    for i in 0..COUNT {
        let addr = format!("10.{}.{}.{}:50051", i / 65_536, (i / 256) % 256, i % 256);
        let value = format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":{metadata:?}}}"#);
        ops.push(etcd_client::TxnOp::put(
            format!("services/large/{i:06}"),
            value,
            None,
        ));
    }
    let mut client = etcd.client();
    for chunk in ops.chunks(100) {
        client
            .txn(etcd_client::Txn::new().and_then(chunk.to_vec()))
            .await
            .expect("writing the records");
    }
    let discovery = Discovery::builder("large").start(&etcd).unwrap();
    let listed = discovery
        .wait_for_instances(COUNT, Duration::from_secs(30))
        .await
        .expect("every record listed");
    assert_eq!(listed.instances.len(), COUNT);
    assert_eq!(listed.instances["039999"].addr, "10.0.156.63:50051");
    assert_eq!(listed.lists, 1, "one list, in pages");
}

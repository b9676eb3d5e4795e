//! A fresh channel under load: calls made the moment a `BalancedChannel` is created must wait for
//! what discovery already knows, not fail. Discovery publishes its first list before the balancer
//! has created backends for it, and each backend needs a first connection; a call that lands in
//! either gap used to fail with "no instances ... are registered" or "none of the 3 instance(s) ...
//! is reachable" while three healthy instances were registered.

mod common;

use std::time::Duration;

use common::cluster;
use proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use registry::{BalanceOptions, BalancedChannel, Discovery, Endpoint};
use testkit::TestServer;
use tokio::task::JoinSet;

/// Fresh channels, each hit at once by a burst of concurrent calls.
const CHANNELS: usize = 300;
const BURST: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_channels_under_a_burst_of_calls_fail_none() {
    let (cluster, etcd) = cluster().await;
    let mut servers = Vec::new();
    for i in 0..3 {
        let id = format!("s{i}");
        let server = TestServer::start(&id).await;
        let value = Endpoint::new(server.addr.clone(), &id).unwrap().encode();
        cluster.etcdctl_ok(&["put", &format!("services/greeter/{id}"), &value]);
        servers.push(server);
    }

    let mut failed = Vec::new();
    for round in 0..CHANNELS {
        let discovery = Discovery::builder("greeter").start(&etcd).unwrap();
        let channel = BalancedChannel::new(
            discovery,
            BalanceOptions {
                call_timeout: Duration::from_secs(5),
                ..BalanceOptions::default()
            },
        );
        let mut calls = JoinSet::new();
        for _ in 0..BURST {
            let mut client = GreeterClient::new(channel.clone());
            calls.spawn(async move {
                client
                    .say_hello(HelloRequest {
                        name: "startup".into(),
                    })
                    .await
            });
        }
        while let Some(result) = calls.join_next().await {
            if let Err(status) = result.expect("a call task panicked") {
                failed.push(format!("round {round}: {status}"));
            }
        }
    }
    println!(
        "STARTUP channels={CHANNELS} burst={BURST} calls={} failed={}",
        CHANNELS * BURST,
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} calls failed; first: {:?}",
        failed.len(),
        CHANNELS * BURST,
        failed.first()
    );
}

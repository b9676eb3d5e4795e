//! Shared helpers for the registry's integration tests: a real etcd cluster and a ready balanced
//! channel. In-process Greeter servers and async polling come from `testkit`.

#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

use std::time::Duration;

use registry::{Etcd, EtcdConfig};
use testkit::EtcdCluster;

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

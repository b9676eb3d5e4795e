//! Integration tests of the etcd harness against real etcd processes.
//!
//! Each test starts its own cluster, so they can run in parallel. Timings are printed with
//! `eprintln!` (visible with `cargo test -- --nocapture`) because they are what a test author
//! needs to know when choosing timeouts for fault tests.

use std::path::Path;
use std::time::{Duration, Instant};

use testkit::{EtcdCluster, wait_for, wait_until};

/// Reads `key` through member `i` alone, with a linearizable read (etcdctl's default): the
/// member must have caught up with the leader's commit index before it answers.
fn get_on(cluster: &EtcdCluster, i: usize, key: &str) -> String {
    cluster
        .etcdctl_on_ok(i, &["get", key, "--print-value-only"])
        .trim_end()
        .to_owned()
}

#[test]
fn a_put_is_visible_through_every_endpoint() {
    let starting = Instant::now();
    let cluster = EtcdCluster::start();
    eprintln!("cluster healthy after {:?}", starting.elapsed());
    assert_eq!(cluster.endpoints().len(), 3);
    assert_eq!(cluster.live_endpoints(), cluster.endpoints());

    cluster.etcdctl_ok(&["put", "k", "v"]);
    for i in 0..cluster.size() {
        assert_eq!(
            get_on(&cluster, i, "k"),
            "v",
            "through {}",
            cluster.endpoint(i)
        );
    }
}

#[test]
fn killing_the_leader_elects_another_and_a_restart_catches_up() {
    let mut cluster = EtcdCluster::start();
    let old = wait_for(Duration::from_secs(5), "a leader", || cluster.leader());

    cluster.kill(old);
    assert_eq!(cluster.pid(old), None);
    assert_eq!(cluster.live_endpoints().len(), 2);
    let killed = Instant::now();
    let new = wait_for(Duration::from_secs(10), "a new leader", || cluster.leader());
    assert_ne!(new, old, "the killed member cannot lead");
    eprintln!("new leader after {:?}", killed.elapsed());

    // The two survivors are a quorum. A put that races the election can fail with a timeout,
    // so it is retried; it is idempotent.
    wait_until(
        Duration::from_secs(15),
        "the survivors to accept a put",
        || {
            cluster
                .etcdctl(&["put", "after-kill", "yes"])
                .status
                .success()
        },
    );
    eprintln!("put accepted {:?} after the kill", killed.elapsed());

    let restarting = Instant::now();
    cluster.restart(old);
    eprintln!("restarted member healthy after {:?}", restarting.elapsed());
    assert!(cluster.is_healthy(old));
    assert_eq!(get_on(&cluster, old, "after-kill"), "yes");
    assert_eq!(cluster.live_endpoints().len(), 3);
}

#[test]
fn a_frozen_member_answers_again_after_thaw() {
    let mut cluster = EtcdCluster::start();
    // Freeze a follower, so the test measures the freeze rather than an election.
    let leader = wait_for(Duration::from_secs(5), "a leader", || cluster.leader());
    let frozen = (leader + 1) % cluster.size();

    cluster.freeze(frozen);
    assert!(!cluster.is_live(frozen));
    assert!(
        !cluster.is_healthy(frozen),
        "a stopped process cannot answer"
    );
    cluster.etcdctl_ok(&["put", "while-frozen", "yes"]);

    cluster.thaw(frozen);
    let thawed = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the thawed member to be healthy",
        || cluster.is_healthy(frozen),
    );
    eprintln!("thawed member healthy after {:?}", thawed.elapsed());
    assert_eq!(get_on(&cluster, frozen, "while-frozen"), "yes");
}

#[test]
fn wipe_starts_an_empty_cluster_on_the_same_endpoints() {
    let mut cluster = EtcdCluster::start();
    let endpoints = cluster.endpoints();
    cluster.etcdctl_ok(&["put", "before-wipe", "yes"]);
    let old_pids: Vec<Option<u32>> = (0..cluster.size()).map(|i| cluster.pid(i)).collect();

    let wiping = Instant::now();
    cluster.wipe();
    eprintln!("wipe took {:?}", wiping.elapsed());

    assert_eq!(cluster.endpoints(), endpoints);
    for (i, old) in old_pids.iter().enumerate() {
        assert_ne!(cluster.pid(i), *old, "member {i} was not restarted");
    }
    assert_eq!(cluster.etcdctl_ok(&["get", "before-wipe"]), "");
    cluster.etcdctl_ok(&["put", "after-wipe", "yes"]);
    for i in 0..cluster.size() {
        assert_eq!(get_on(&cluster, i, "after-wipe"), "yes");
    }
}

#[test]
fn dropping_the_cluster_ends_every_member_even_a_frozen_one() {
    let mut cluster = EtcdCluster::start();
    let pids: Vec<u32> = (0..cluster.size())
        .map(|i| cluster.pid(i).expect("every member runs after start"))
        .collect();
    cluster.freeze(1);
    let log = cluster.log_path(0);
    assert!(log.exists());

    drop(cluster);

    // Drop reaps every member, so their /proc entries are gone by the time it returns.
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "etcd pid {pid} survived the cluster"
        );
    }
    assert!(!log.exists(), "the temporary directory was not removed");
}

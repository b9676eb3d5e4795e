//! The fault suite: every etcd, network and instance fault the registry must survive, each against
//! real processes (a three-member etcd cluster, three `server` processes) under a steady client
//! load that counts every failed call.
//!
//! Each test prints one `FAULT` line with what it measured; `docs/RESILIENCE.md` tabulates them.
//! The tests take turns (one lock for the file): they kill and freeze processes on a 2-core
//! machine, and running two at once would measure the machine rather than the registry.

mod common;

use std::time::Duration;

use common::{
    Load, ServerProcess, dead_addr, failures, key_exists, lease_of, percentile, wait_registered,
};
use testkit::{EtcdCluster, wait_until};
use tokio::time::{Instant, sleep};

/// One call every 10 ms: 100 calls a second spread over the instances.
const EVERY: Duration = Duration::from_millis(10);

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A cluster, three servers with `server_args`, and a load on all etcd endpoints, warmed up.
async fn setup(
    logs: &std::path::Path,
    server_args: &[&str],
) -> (EtcdCluster, Vec<ServerProcess>, Load) {
    let cluster = EtcdCluster::start();
    let servers: Vec<_> = (0..3)
        .map(|_| ServerProcess::start(&cluster, logs, server_args))
        .collect();
    for server in &servers {
        wait_registered(&cluster, server);
    }
    let load = Load::start(cluster.endpoints(), EVERY).await;
    let addrs: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    load.wait_serving(&addrs, Duration::from_secs(10)).await;
    (cluster, servers, load)
}

fn assert_no_failures(name: &str, calls: &[common::Call]) {
    let failed = failures(calls);
    assert!(
        failed.is_empty(),
        "{name}: {} of {} calls failed, first: {:?}",
        failed.len(),
        calls.len(),
        failed.first()
    );
}

/// Waits until the load's discovery knows exactly `ids`.
async fn wait_membership(load: &Load, ids: &[String], timeout: Duration) -> Duration {
    let started = Instant::now();
    let mut wanted = ids.to_vec();
    wanted.sort();
    loop {
        let known: Vec<String> = load
            .channel
            .discovery()
            .membership()
            .instances
            .keys()
            .cloned()
            .collect();
        if known == wanted {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "membership still {known:?} after {timeout:?}, want {wanted:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

fn ids(servers: &[&ServerProcess]) -> Vec<String> {
    servers.iter().map(|s| s.id()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_etcd_leader_killed_then_restarted() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    // A 4 s lease: waiting 6 s after the kill proves the keep-alives moved to the survivors.
    let (mut cluster, servers, load) = setup(logs.path(), &["--ttl", "4s"]).await;
    let leases: Vec<_> = servers
        .iter()
        .map(|s| lease_of(&cluster, &s.key()))
        .collect();

    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader);
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(6) {
        for (server, lease) in servers.iter().zip(&leases) {
            assert_eq!(
                &lease_of(&cluster, &server.key()),
                lease,
                "{} lost its lease",
                server.key()
            );
        }
        sleep(Duration::from_millis(200)).await;
    }

    // Discovery's watch resumed on a survivor and misses nothing: a server registering now shows.
    let fourth = ServerProcess::start(&cluster, logs.path(), &["--ttl", "4s"]);
    wait_registered(&cluster, &fourth);
    let registered = Instant::now();
    load.wait_served_since(&[&fourth.addr], Some(registered), Duration::from_secs(5))
        .await;
    let to_fourth = registered.elapsed();

    cluster.restart(leader);
    let all = [&servers[0], &servers[1], &servers[2], &fourth];
    wait_membership(&load, &ids(&all), Duration::from_secs(5)).await;
    let calls = load.finish().await;
    println!(
        "FAULT f1 leader-kill: calls={} failed={} leases-kept=3/3 new-instance-called-after={to_fourth:?}",
        calls.len(),
        failures(&calls).len()
    );
    assert_no_failures("f1", &calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_quorum_lost_longer_than_the_ttl_then_restored() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (mut cluster, servers, load) = setup(logs.path(), &["--ttl", "3s"]).await;
    let before: Vec<_> = servers
        .iter()
        .map(|s| lease_of(&cluster, &s.key()))
        .collect();
    let all = ids(&servers.iter().collect::<Vec<_>>());

    cluster.kill(0);
    cluster.kill(1);
    let lost = Instant::now();
    // Longer than the TTL: every lease is past its deadline on the servers' side.
    while lost.elapsed() < Duration::from_secs(5) {
        let membership = load.channel.discovery().membership();
        assert_eq!(
            membership.instances.len(),
            3,
            "the client flushed its instances"
        );
        sleep(Duration::from_millis(100)).await;
    }
    assert!(load.channel.discovery().membership().problem.is_some());

    cluster.restart(0);
    cluster.restart(1);
    let restored = Instant::now();
    // Every server registered again: its key back, on a new lease.
    wait_until(
        Duration::from_secs(10),
        "every server to re-register",
        || {
            servers.iter().zip(&before).all(|(s, old)| {
                let now = lease_of(&cluster, &s.key());
                now.is_some() && now != *old
            })
        },
    );
    let reregistered = restored.elapsed();
    // The client re-synced without a restart.
    let started = Instant::now();
    while load.channel.discovery().membership().problem.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "discovery never re-synced"
        );
        sleep(Duration::from_millis(10)).await;
    }
    let resynced = restored.elapsed();
    wait_membership(&load, &all, Duration::from_secs(5)).await;
    let calls = load.finish().await;
    println!(
        "FAULT f2 quorum-loss-5s: calls={} failed={} re-registered-after-restore={reregistered:?} client-resynced-after={resynced:?}",
        calls.len(),
        failures(&calls).len()
    );
    assert_no_failures("f2", &calls);
    assert!(
        reregistered <= Duration::from_secs(3),
        "re-registration took {reregistered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_cluster_wiped_and_recreated_empty() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (mut cluster, servers, load) = setup(logs.path(), &["--ttl", "3s"]).await;

    cluster.wipe();
    let wiped = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "every server to re-register",
        || servers.iter().all(|s| key_exists(&cluster, &s.key())),
    );
    let reregistered = wiped.elapsed();
    let addrs: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    load.wait_served_since(&addrs, Some(Instant::now()), Duration::from_secs(10))
        .await;
    let revision = load.channel.discovery().membership().revision;
    let calls = load.finish().await;
    println!(
        "FAULT f3 wipe: calls={} failed={} re-registered-after={reregistered:?} client-revision-now={revision}",
        calls.len(),
        failures(&calls).len()
    );
    // The new cluster's revisions restart near 1: the client must have listed it afresh.
    assert!(
        revision < 100,
        "discovery still at an old-cluster revision {revision}"
    );
    assert_no_failures("f3", &calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f4_own_key_deleted_by_an_operator_is_put_back() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (cluster, servers, load) = setup(logs.path(), &[]).await;
    let victim = &servers[0];
    let lease = lease_of(&cluster, &victim.key());

    cluster.etcdctl_ok(&["del", &victim.key()]);
    let deleted = std::time::Instant::now();
    wait_until(Duration::from_secs(1), "the key to be put back", || {
        key_exists(&cluster, &victim.key())
    });
    let restored = deleted.elapsed();
    assert_eq!(
        lease_of(&cluster, &victim.key()),
        lease,
        "put back on another lease"
    );
    wait_until(Duration::from_secs(2), "the server to log why", || {
        victim.log_text().contains("our key was deleted")
    });
    let calls = load.finish().await;
    println!(
        "FAULT f4 key-deleted: calls={} failed={} put-back-after={restored:?}",
        calls.len(),
        failures(&calls).len()
    );
    assert_no_failures("f4", &calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f5_watch_compacted_while_disconnected_relists_and_converges() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start();
    let mut servers: Vec<_> = (0..3)
        .map(|_| ServerProcess::start(&cluster, logs.path(), &[]))
        .collect();
    for server in &servers {
        wait_registered(&cluster, server);
    }
    // The client talks to member 0 only, so taking member 0 away cuts its watch for sure.
    let load = Load::start(vec![cluster.endpoint(0)], EVERY).await;
    let addrs: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    load.wait_serving(&addrs, Duration::from_secs(10)).await;

    cluster.kill(0);
    // Meanwhile: one instance leaves, one joins, and the history of both is compacted away.
    let mut leaving = servers.pop().expect("three servers");
    leaving.child.signal(libc::SIGTERM);
    leaving
        .child
        .wait_timeout(Duration::from_secs(15))
        .expect("graceful stop");
    let joining = ServerProcess::start(&cluster, logs.path(), &[]);
    wait_registered(&cluster, &joining);
    let status = cluster.etcdctl_ok(&["endpoint", "status", "-w", "fields"]);
    let revision = status
        .lines()
        .find_map(|l| l.strip_prefix("\"Revision\" : "))
        .and_then(|r| r.trim().parse::<i64>().ok())
        .expect("the current revision");
    cluster.etcdctl_ok(&["compact", &revision.to_string()]);
    assert_eq!(
        load.channel.discovery().membership().instances.len(),
        3,
        "the cut-off client still shows the old set"
    );

    let lists_before = load.channel.discovery().membership().lists;
    cluster.restart(0);
    let back = Instant::now();
    let expected = ids(&[&servers[0], &servers[1], &joining]);
    let converged = wait_membership(&load, &expected, Duration::from_secs(15)).await;
    load.wait_served_since(&[&joining.addr], Some(back), Duration::from_secs(5))
        .await;
    // A member that has applied the compaction cancels the resumed watch and the client re-lists;
    // one that has not yet applied it can still replay the events, and the watch simply resumes.
    // Both converge; the line says which happened.
    let relisted = load.channel.discovery().membership().lists > lists_before;
    let calls = load.finish().await;
    println!(
        "FAULT f5 compaction: calls={} failed={} converged-after-member-back={converged:?} relisted={relisted}",
        calls.len(),
        failures(&calls).len()
    );
    assert_no_failures("f5", &calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f6_frozen_member_is_detected_and_streams_move() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (mut cluster, servers, load) = setup(logs.path(), &[]).await;
    let mut ids_now = ids(&servers.iter().collect::<Vec<_>>());

    // Whichever member carries the client's watch and the servers' keep-alives, one of these
    // rounds freezes it.
    let mut worst = Duration::ZERO;
    for member in 0..cluster.size() {
        cluster.freeze(member);
        let frozen = Instant::now();
        let probe = format!("probe-{member}");
        let key = format!("services/helloworld/{probe}");
        let value = format!(r#"{{"Op":0,"Addr":"{}","Metadata":null}}"#, dead_addr());
        // The frozen member may have been the leader: the put waits out the election.
        wait_until(
            Duration::from_secs(15),
            "a put through the live members",
            || cluster.etcdctl(&["put", &key, &value]).status.success(),
        );
        ids_now.push(probe);
        let seen = wait_membership(&load, &ids_now, Duration::from_secs(15)).await;
        worst = worst.max(frozen.elapsed());
        println!("  member {member} frozen: the client saw a new instance after {seen:?}");
        for server in &servers {
            assert!(
                key_exists(&cluster, &server.key()),
                "{} lost its key",
                server.key()
            );
        }
        cluster.thaw(member);
        wait_until(
            Duration::from_secs(10),
            "the thawed member to be healthy",
            || cluster.is_healthy(member),
        );
    }
    let calls = load.finish().await;
    println!(
        "FAULT f6 member-frozen: calls={} failed={} worst-detection-and-recovery={worst:?}",
        calls.len(),
        failures(&calls).len()
    );
    assert_no_failures("f6", &calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_server_crash_under_load_then_back() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (cluster, mut servers, load) = setup(logs.path(), &[]).await;

    let victim = &mut servers[1];
    victim.child.kill();
    let killed = Instant::now();
    while load
        .channel
        .ready_addrs()
        .iter()
        .any(|a| **a == *victim.addr)
    {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "still in rotation after 1 s"
        );
        sleep(Duration::from_millis(1)).await;
    }
    let ejected = killed.elapsed();
    // Load keeps flowing to the two survivors.
    load.wait_calls_since(killed, 50, Duration::from_secs(5))
        .await;

    // Back on the same address: registered again (its old key never expired: 10 s lease).
    victim.restart();
    let restarted = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the restarted server to register",
        || victim.log_text().matches("registered; clients").count() >= 2,
    );
    let back = load
        .wait_served_since(&[&victim.addr], Some(restarted), Duration::from_secs(10))
        .await;
    let victim_addr = victim.addr.clone();
    let calls = load.finish().await;
    let during: Vec<_> = calls
        .iter()
        .filter(|c| c.sent >= killed && c.sent < restarted)
        .collect();
    let to_dead = during
        .iter()
        .filter(|c| c.outcome.as_deref() == Ok(victim_addr.as_str()))
        .count();
    println!(
        "FAULT f7 server-sigkill: calls={} failed={} ejected-after={ejected:?} served-by-dead={to_dead} traffic-again-after-restart={back:?}",
        calls.len(),
        failures(&calls).len()
    );
    assert_eq!(to_dead, 0);
    assert_no_failures("f7", &calls);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f8_server_frozen_under_load_then_resumed() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (_cluster, mut servers, load) = setup(logs.path(), &[]).await;
    let victim_addr = servers[2].addr.clone();
    let healthy: Vec<String> = servers[..2].iter().map(|s| s.addr.clone()).collect();
    let before = Instant::now();
    // A baseline of latencies.
    load.wait_calls_since(before, 50, Duration::from_secs(5))
        .await;

    servers[2].child.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    while load
        .channel
        .ready_addrs()
        .iter()
        .any(|a| **a == *victim_addr)
    {
        assert!(
            frozen.elapsed() < Duration::from_secs(2),
            "still in rotation after 2 s"
        );
        sleep(Duration::from_millis(5)).await;
    }
    let ejected = frozen.elapsed();
    // The survivors carry the load.
    load.wait_calls_since(frozen + ejected, 100, Duration::from_secs(5))
        .await;

    servers[2].child.signal(libc::SIGCONT);
    let resumed = Instant::now();
    let back = load
        .wait_served_since(&[&victim_addr], Some(resumed), Duration::from_secs(10))
        .await;
    let calls = load.finish().await;
    let on_healthy = |c: &common::Call| c.outcome.as_ref().is_ok_and(|a| healthy.contains(a));
    let p99_before = percentile(&calls, 99.0, |c| {
        c.sent < frozen && c.sent >= before && on_healthy(c)
    });
    let p99_after = percentile(&calls, 99.0, |c| {
        c.sent >= frozen + ejected && c.sent < resumed && on_healthy(c)
    });
    let failed = failures(&calls).len();
    println!(
        "FAULT f8 server-sigstop: calls={} failed={failed} ejected-after={ejected:?} p99-healthy-before={p99_before:?} p99-healthy-after-ejection={p99_after:?} readmitted-after-sigcont={back:?}",
        calls.len()
    );
    // Calls already waiting on the frozen instance may fail; nothing else may.
    assert!(
        failed <= 10,
        "{failed} calls failed: {:?}",
        failures(&calls).first()
    );
    assert!(
        p99_after < Duration::from_millis(200),
        "survivors slowed down: p99 {p99_after:?} (before: {p99_before:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f9_rolling_restart_five_rounds() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (cluster, mut servers, load) = setup(logs.path(), &["--deregister-grace", "300ms"]).await;
    let started = Instant::now();
    for round in 1..=5 {
        for server in servers.iter_mut() {
            let registrations = server.log_text().matches("registered; clients").count();
            server.child.signal(libc::SIGTERM);
            let status = server
                .child
                .wait_timeout(Duration::from_secs(15))
                .expect("graceful stop");
            assert!(
                status.success(),
                "round {round}: {} exited {status:?}",
                server.addr
            );
            server.restart();
            let restarted = Instant::now();
            wait_until(Duration::from_secs(10), "re-registration", || {
                server.log_text().matches("registered; clients").count() > registrations
            });
            load.wait_served_since(&[&server.addr], Some(restarted), Duration::from_secs(10))
                .await;
        }
    }
    let took = started.elapsed();
    let calls = load.finish().await;
    println!(
        "FAULT f9 rolling-restart-5x3: calls={} failed={} took={took:?}",
        calls.len(),
        failures(&calls).len()
    );
    assert_no_failures("f9", &calls);
    drop(cluster);
}

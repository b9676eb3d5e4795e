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
    Load, ServerProcess, assert_leases_kept, dead_addr, failures, key_exists, lease_of, leases,
    wait_registered,
};
use testkit::{
    EtcdCluster,
    load::{assert_no_failures, percentile},
    wait_until,
};
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
    let before = leases(&cluster, &servers);

    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader);
    let killed = Instant::now();
    assert_leases_kept(
        &cluster,
        &servers,
        &before,
        killed,
        Duration::from_secs(6),
        "the leader's kill",
    )
    .await;

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

/// The leader frozen (SIGSTOP) for longer than the TTL. Nothing breaks a connection: keep-alive
/// streams on the leader fall silent, and those on followers too, each follower forwarding the
/// keep-alive to the frozen leader and waiting seconds for it. A lease is kept only if its
/// keep-alive gives up on the silent stream and reopens it while the survivors elect a new leader
/// (which extends every lease). Before that change, with a 4 s lease, a server lost its lease 4.06 s
/// into the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1b_etcd_leader_frozen_longer_than_the_ttl() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    // The default 10 s lease. At the worst moment to freeze, just after a refresh, the stall shows
    // at the next keep-alive (3.3 s) and is given up 0.5 s later; the 6 s left cover the election
    // and the reopen. Shorter leases held in most runs but not all: with 4 s and 5 s, one server
    // in a few had every etcd request unanswered for about 4.5 s after the freeze.
    let (mut cluster, servers, load) = setup(logs.path(), &[]).await;
    let before = leases(&cluster, &servers);

    let leader = cluster.leader().expect("a leader");
    cluster.freeze(leader);
    let frozen = Instant::now();
    // Longer than the TTL: only keep-alives that moved to the survivors keep the leases.
    assert_leases_kept(
        &cluster,
        &servers,
        &before,
        frozen,
        Duration::from_secs(12),
        "the leader froze",
    )
    .await;
    let reopened = servers
        .iter()
        .filter(|s| s.log_text().contains("keep-alive stream reopened"))
        .count();
    cluster.thaw(leader);
    let calls = load.finish().await;
    println!(
        "FAULT f1b leader-frozen: calls={} failed={} leases-kept=3/3 keep-alives-reopened={reopened}/3",
        calls.len(),
        failures(&calls).len()
    );
    assert_no_failures("f1b", &calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_quorum_lost_longer_than_the_ttl_then_restored() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (mut cluster, servers, load) = setup(logs.path(), &["--ttl", "3s"]).await;
    let before = leases(&cluster, &servers);
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
    let ejected = load
        .wait_out_of_rotation(
            &victim.addr,
            killed,
            Duration::from_secs(1),
            "the killed instance",
        )
        .await;
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
    let ejected = load
        .wait_out_of_rotation(
            &victim_addr,
            frozen,
            Duration::from_secs(2),
            "the frozen instance",
        )
        .await;
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

/// What the load's channel showed while a fault played out, sampled every 5 ms by a task of its
/// own (the test's own waits call `etcdctl`, far too slowly to see a short grace).
#[derive(Debug, Default, Clone)]
struct Seen {
    /// First and last sample with an instance in removal grace.
    grace_first: Option<Instant>,
    grace_last: Option<Instant>,
    /// Most instances in grace at once.
    max_in_grace: usize,
    /// Addresses that were ever in grace.
    graced: Vec<String>,
    /// Fewest instances in rotation in any sample.
    min_ready: Option<usize>,
}

impl Seen {
    fn kept_in_grace(&self) -> Duration {
        match (self.grace_first, self.grace_last) {
            (Some(first), Some(last)) => last - first,
            _ => Duration::ZERO,
        }
    }
}

/// Samples the channel until stopped; [`Monitor::stop`] returns what it saw.
struct Monitor {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Seen>,
}

impl Monitor {
    fn start(channel: &registry::BalancedChannel) -> Self {
        let channel = channel.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tokio::select! {
                    _ = &mut stopped => return seen,
                    _ = tick.tick() => {}
                }
                let now = Instant::now();
                let instances = channel.instances();
                let in_grace: Vec<_> = instances
                    .iter()
                    .filter(|i| i.removal_grace.is_some())
                    .collect();
                if !in_grace.is_empty() {
                    seen.grace_first.get_or_insert(now);
                    seen.grace_last = Some(now);
                }
                for i in &in_grace {
                    if !seen.graced.iter().any(|a| **a == *i.addr) {
                        seen.graced.push(i.addr.to_string());
                    }
                }
                seen.max_in_grace = seen.max_in_grace.max(in_grace.len());
                let ready = instances.iter().filter(|i| i.in_rotation).count();
                seen.min_ready = Some(seen.min_ready.map_or(ready, |m| m.min(ready)));
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> Seen {
        // The task only ends when told to; a send error means it already panicked, which the
        // join reports.
        let _ = self.stop.send(());
        self.task.await.expect("the monitor task")
    }
}

/// Leases that expire while their servers are alive, connected and serving: the servers reach
/// etcd through member 0 only. Members 0 and 1 die for longer than the TTL; member 1 comes back,
/// so the cluster has quorum again and its leader expires the overdue leases (watchers see the
/// DELETEs) while the servers still cannot reach etcd to register again. Once the client has seen
/// every DELETE, member 0 comes back and the servers register again on new leases.
struct Expiry {
    /// From quorum's return until the client saw the last DELETE.
    deleted_after_quorum: Duration,
    /// From member 0's return until the client knew every instance again.
    back_after_member: Duration,
}

async fn expire_leases_of_cut_off_servers(
    cluster: &mut EtcdCluster,
    servers: &[&ServerProcess],
    load: &Load,
) -> Expiry {
    let before: Vec<_> = servers
        .iter()
        .map(|s| lease_of(cluster, &s.key()))
        .collect();
    cluster.kill(0);
    cluster.kill(1);
    let lost = Instant::now();
    // The outage itself, longer than the 3 s TTL: what is measured is how the client rides it out.
    while lost.elapsed() < Duration::from_secs(5) {
        sleep(Duration::from_millis(100)).await;
    }
    cluster.restart(1);
    let quorum = Instant::now();
    // A new leader extends every lease by an election timeout and the TTL: the DELETEs come a few
    // seconds later.
    wait_membership(load, &[], Duration::from_secs(20)).await;
    let deleted_after_quorum = quorum.elapsed();
    cluster.restart(0);
    let member = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "every server to re-register",
        || {
            servers.iter().zip(&before).all(|(s, old)| {
                let now = lease_of(cluster, &s.key());
                now.is_some() && now != *old
            })
        },
    );
    wait_membership(load, &ids(servers), Duration::from_secs(5)).await;
    Expiry {
        deleted_after_quorum,
        back_after_member: member.elapsed(),
    }
}

/// One instance whose lease expires while it serves (see [`expire_leases_of_cut_off_servers`]),
/// with the client's removal grace `grace`. Returns the calls, what the channel showed, and the
/// timings.
async fn one_instance_through_lease_expiry(
    grace: Duration,
) -> (Vec<common::Call>, Seen, Expiry, String) {
    let logs = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start();
    let server = ServerProcess::start_on(&[cluster.endpoint(0)], logs.path(), &["--ttl", "3s"]);
    wait_registered(&cluster, &server);
    let options = registry::BalanceOptions {
        removal_grace: grace,
        ..registry::BalanceOptions::default()
    };
    let load = Load::start_with(cluster.endpoints(), EVERY, options).await;
    load.wait_serving(&[&server.addr], Duration::from_secs(10))
        .await;
    let monitor = Monitor::start(&load.channel);
    let expiry = expire_leases_of_cut_off_servers(&mut cluster, &[&server], &load).await;
    // A little traffic after the re-registration, so a late failure would be counted.
    load.wait_calls_since(Instant::now(), 50, Duration::from_secs(5))
        .await;
    let seen = monitor.stop().await;
    (load.finish().await, seen, expiry, server.addr.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f10_one_instance_quorum_lost_longer_than_the_ttl() {
    let _turn = TURN.lock().await;
    let grace = registry::BalanceOptions::default().removal_grace;
    let (calls, seen, expiry, addr) = one_instance_through_lease_expiry(grace).await;
    println!(
        "FAULT f10 one-instance-lease-expired: calls={} failed={} delete-after-quorum={:?} kept-in-grace={:?} re-registered-after-member-back={:?} min-in-rotation={:?}",
        calls.len(),
        failures(&calls).len(),
        expiry.deleted_after_quorum,
        seen.kept_in_grace(),
        expiry.back_after_member,
        seen.min_ready
    );
    assert!(
        seen.graced.contains(&addr),
        "the DELETE never put the instance in grace: {seen:?}"
    );
    assert_no_failures("f10", &calls);
}

/// The same fault with the grace off: what f10 would see without it (run with `--ignored`; its
/// failures depend on whether the DELETE beats the new PUT, so it asserts nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a baseline measurement, not a check"]
async fn f10_baseline_without_removal_grace() {
    let _turn = TURN.lock().await;
    let (calls, seen, expiry, _) = one_instance_through_lease_expiry(Duration::ZERO).await;
    println!(
        "FAULT f10-baseline grace-off: calls={} failed={} delete-after-quorum={:?} re-registered-after-member-back={:?} min-in-rotation={:?}",
        calls.len(),
        failures(&calls).len(),
        expiry.deleted_after_quorum,
        expiry.back_after_member,
        seen.min_ready
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_three_instances_whose_leases_expire_together() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start();
    let servers: Vec<_> = (0..3)
        .map(|_| ServerProcess::start_on(&[cluster.endpoint(0)], logs.path(), &["--ttl", "3s"]))
        .collect();
    for server in &servers {
        wait_registered(&cluster, server);
    }
    let load = Load::start(cluster.endpoints(), EVERY).await;
    let addrs: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    load.wait_serving(&addrs, Duration::from_secs(10)).await;
    let monitor = Monitor::start(&load.channel);
    let all: Vec<&ServerProcess> = servers.iter().collect();
    let expiry = expire_leases_of_cut_off_servers(&mut cluster, &all, &load).await;
    load.wait_calls_since(Instant::now(), 50, Duration::from_secs(5))
        .await;
    let seen = monitor.stop().await;
    let calls = load.finish().await;
    println!(
        "FAULT f11 three-leases-expire-together: calls={} failed={} delete-after-quorum={:?} max-in-grace={} kept-in-grace={:?} min-in-rotation={:?} re-registered-after-member-back={:?}",
        calls.len(),
        failures(&calls).len(),
        expiry.deleted_after_quorum,
        seen.max_in_grace,
        seen.kept_in_grace(),
        seen.min_ready,
        expiry.back_after_member
    );
    assert_eq!(
        seen.max_in_grace, 3,
        "not every instance was kept: {seen:?}"
    );
    assert!(
        seen.min_ready.is_some_and(|m| m >= 1),
        "the service went to zero instances in rotation: {seen:?}"
    );
    assert_no_failures("f11", &calls);
}

/// How a graceful departure reached the client.
#[derive(Debug)]
struct Departure {
    /// From SIGTERM until discovery saw the draining record (`None`: never, no announcement).
    draining_seen: Option<Duration>,
    /// From SIGTERM until the instance left the rotation.
    out: Duration,
    /// Why it left, as the channel said at that moment.
    cause: &'static str,
    /// Calls sent after it left the rotation that it served (must be 0).
    served_after_out: usize,
    /// Calls sent after discovery saw the draining record that it served (`usize::MAX`: never
    /// seen).
    served_after_draining: usize,
    /// Calls it served that were sent after its key was gone from discovery.
    served_after_delete: usize,
}

/// SIGTERMs `server` and follows its departure through the load's channel.
async fn depart(load: &Load, server: &mut ServerProcess) -> Departure {
    let id = server.id();
    let mut membership = load.channel.discovery().subscribe();
    // Discovery's own signal: the first snapshot with the draining record, and the first without
    // the key.
    let watcher = tokio::spawn(async move {
        let (mut draining, mut deleted) = (None, None);
        loop {
            let now = Instant::now();
            {
                let m = membership.borrow_and_update();
                match m.instances.get(&id) {
                    Some(i)
                        if i.metadata.get("draining").and_then(|d| d.as_bool()) == Some(true) =>
                    {
                        draining.get_or_insert(now);
                    }
                    Some(_) => {}
                    None => {
                        deleted = Some(now);
                        return (draining, deleted);
                    }
                }
            }
            if membership.changed().await.is_err() {
                return (draining, deleted);
            }
        }
    });
    let addr = server.addr.clone();
    server.child.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let (out, cause) = loop {
        let status = load
            .channel
            .instances()
            .into_iter()
            .find(|i| *i.addr == *addr);
        match status {
            Some(i) if i.in_rotation => {}
            Some(i) if i.draining => break (Instant::now(), "draining record"),
            Some(i) if !i.serving => break (Instant::now(), "NOT_SERVING health check"),
            Some(_) => break (Instant::now(), "connection"),
            // Gone from the channel: removed on the DELETE, or at the end of its grace.
            None => break (Instant::now(), "removed"),
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "{addr} still in rotation 5 s after SIGTERM"
        );
        sleep(Duration::from_millis(1)).await;
    };
    let (draining, deleted) = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the key to go within 10 s of SIGTERM")
        .expect("the membership watcher");
    let status = server
        .child
        .wait_timeout(Duration::from_secs(15))
        .expect("graceful stop");
    assert!(status.success(), "{addr} exited {status:?}");
    // Let the calls sent before the exit complete, so they are counted.
    load.wait_calls_since(Instant::now(), 20, Duration::from_secs(5))
        .await;
    let calls = load.calls();
    let served_since = |since: Instant| {
        calls
            .iter()
            .filter(|c| c.sent >= since && c.outcome.as_deref() == Ok(addr.as_str()))
            .count()
    };
    Departure {
        draining_seen: draining.map(|d| d - signalled),
        out: out - signalled,
        cause,
        served_after_out: served_since(out),
        served_after_draining: draining.map_or(usize::MAX, served_since),
        served_after_delete: deleted.map_or(0, served_since),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f12_graceful_shutdown_announced_before_the_revoke() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    // A long deregister grace: a client that had not noticed the departure would keep calling.
    let args = ["--deregister-grace", "1s"];
    let (cluster, mut servers, load) = setup(logs.path(), &args).await;

    // Announced (the default): every client stops on the draining record.
    let announced = depart(&load, &mut servers[0]).await;
    // Not announced, with the clients' removal grace on: the DELETE is deferred (connected,
    // last health answer SERVING) until the next health poll says NOT_SERVING.
    let mut silent = ServerProcess::start(
        &cluster,
        logs.path(),
        &[&args[..], &["--announce-draining", "false"]].concat(),
    );
    wait_registered(&cluster, &silent);
    load.wait_served_since(
        &[&silent.addr],
        Some(Instant::now()),
        Duration::from_secs(10),
    )
    .await;
    let unannounced = depart(&load, &mut silent).await;
    let calls = load.finish().await;

    // Before this change: no announcement and no grace, the DELETE itself.
    let before = {
        let options = registry::BalanceOptions {
            removal_grace: Duration::ZERO,
            ..registry::BalanceOptions::default()
        };
        let load = Load::start_with(cluster.endpoints(), EVERY, options).await;
        let mut old = ServerProcess::start(
            &cluster,
            logs.path(),
            &[&args[..], &["--announce-draining", "false"]].concat(),
        );
        wait_registered(&cluster, &old);
        load.wait_served_since(&[&old.addr], Some(Instant::now()), Duration::from_secs(10))
            .await;
        let departure = depart(&load, &mut old).await;
        let calls = load.finish().await;
        assert_no_failures("f12 (grace off)", &calls);
        departure
    };
    println!(
        "FAULT f12 graceful-shutdown: calls={} failed={} announced: draining-seen-after={:?} out-after={:?} cause={} served-after-out={} | unannounced+grace: out-after={:?} cause={} served-after-delete={} | unannounced,no-grace (before): out-after={:?} cause={}",
        calls.len(),
        failures(&calls).len(),
        announced.draining_seen,
        announced.out,
        announced.cause,
        announced.served_after_out,
        unannounced.out,
        unannounced.cause,
        unannounced.served_after_delete,
        before.out,
        before.cause
    );
    assert_no_failures("f12", &calls);
    for (name, d) in [
        ("announced", &announced),
        ("unannounced", &unannounced),
        ("before", &before),
    ] {
        assert_eq!(d.served_after_out, 0, "{name}: {d:?}");
    }
    assert!(announced.draining_seen.is_some(), "{announced:?}");
    // The 1 ms poll can miss the few milliseconds between the draining record and the DELETE on
    // a loaded machine (it saw "removed" once in CI); then no call may have reached the instance
    // after the client saw the draining record.
    assert!(
        announced.cause == "draining record" || announced.served_after_draining == 0,
        "{announced:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f13_drained_instance_gets_nothing_and_no_grace() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (cluster, servers, load) = setup(logs.path(), &[]).await;
    let victim = &servers[1];
    let lease = lease_of(&cluster, &victim.key()).expect("the victim's lease");
    let monitor = Monitor::start(&load.channel);

    // An operator drains the instance by hand: the same record, on the same lease, with
    // `draining: true`.
    let mut record = registry::Endpoint::new(victim.addr.clone(), &victim.id()).unwrap();
    if let Some(fields) = record.metadata.as_object_mut() {
        fields.insert("weight".into(), 1.into());
        fields.insert(registry::endpoint::DRAINING_KEY.into(), true.into());
    }
    cluster.etcdctl_ok(&[
        "put",
        &format!("--lease={lease}"),
        &victim.key(),
        &record.encode(),
    ]);
    let put = Instant::now();
    let left_after = load
        .wait_out_of_rotation(
            &victim.addr,
            put,
            Duration::from_secs(2),
            "a draining instance",
        )
        .await;
    let out = put + left_after;
    // 2 s of load while it stays registered, connected and SERVING, but drained.
    load.wait_calls_since(out, 200, Duration::from_secs(10))
        .await;
    let status = load
        .channel
        .instances()
        .into_iter()
        .find(|i| *i.addr == *victim.addr)
        .expect("the drained instance is still known");
    assert!(
        status.draining && status.connected && status.serving,
        "{status:?}"
    );
    // Deleting the key of a drained instance: no grace; the server's key guard puts its own
    // record (not drained) back, and it returns.
    cluster.etcdctl_ok(&["del", &victim.key()]);
    load.wait_served_since(
        &[&victim.addr],
        Some(Instant::now()),
        Duration::from_secs(5),
    )
    .await;
    let seen = monitor.stop().await;
    let calls = load.finish().await;
    let served_while_drained = calls
        .iter()
        .filter(|c| c.sent >= out && c.sent < out + Duration::from_secs(2))
        .filter(|c| c.outcome.as_deref() == Ok(victim.addr.as_str()))
        .count();
    println!(
        "FAULT f13 drained-by-record: calls={} failed={} out-of-rotation-after={left_after:?} served-while-drained={served_while_drained} graced={:?}",
        calls.len(),
        failures(&calls).len(),
        seen.graced
    );
    assert_eq!(served_while_drained, 0);
    assert!(
        !seen.graced.contains(&victim.addr),
        "a drained instance got a removal grace"
    );
    assert_no_failures("f13", &calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f14_killed_and_frozen_instances_get_no_grace() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    // Short leases, so both keys expire during the test.
    let (_cluster, mut servers, load) = setup(logs.path(), &["--ttl", "3s"]).await;
    let monitor = Monitor::start(&load.channel);
    let killed_addr = servers[1].addr.clone();
    let frozen_addr = servers[2].addr.clone();

    servers[1].child.kill();
    let killed = Instant::now();
    let kill_out = load
        .wait_out_of_rotation(
            &killed_addr,
            killed,
            Duration::from_secs(1),
            "the killed instance",
        )
        .await;
    servers[2].child.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let freeze_out = load
        .wait_out_of_rotation(
            &frozen_addr,
            frozen,
            Duration::from_secs(2),
            "the frozen instance",
        )
        .await;
    // Both leases expire (3 s TTL): the DELETEs must remove both at once, not defer them.
    wait_membership(&load, &ids(&[&servers[0]]), Duration::from_secs(10)).await;
    let gone = Instant::now();
    // The balancer applies discovery's snapshot a moment later, in its own task; a deferred
    // removal would keep the instance for the whole grace (10 s), far beyond this bound.
    while load.channel.instances().len() > 1 && gone.elapsed() < Duration::from_secs(1) {
        sleep(Duration::from_millis(5)).await;
    }
    let still_known = load.channel.instances().len();
    let seen = monitor.stop().await;
    servers[2].child.signal(libc::SIGCONT);
    let calls = load.finish().await;
    println!(
        "FAULT f14 killed-and-frozen-with-grace: calls={} failed={} killed-out-after={kill_out:?} frozen-out-after={freeze_out:?} keys-expired-after-kill={:?} graced={:?}",
        calls.len(),
        failures(&calls).len(),
        gone - killed,
        seen.graced
    );
    assert!(
        seen.graced.is_empty(),
        "an unreachable instance got a grace: {seen:?}"
    );
    assert_eq!(still_known, 1, "a removed instance was kept");
    // As in f8: calls already waiting on the frozen instance may fail; nothing else may.
    let failed = failures(&calls).len();
    assert!(
        failed <= 10,
        "{failed} calls failed: {:?}",
        failures(&calls).first()
    );
}

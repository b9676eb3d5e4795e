//! The faults only containers give, against the repository's own `docker-compose.yml` cluster:
//! `docker kill` of the member carrying the client's watch, `docker network disconnect` of a
//! member (a real partition: the member keeps answering, without a leader), and `docker pause` of
//! two members for longer than the lease TTL. Same load and counting as `faults.rs`: one call
//! every 10 ms through the balanced channel, every call recorded.
//!
//! They need a Docker engine, compose and an etcd image, so they are `#[ignore]`d in the default
//! `cargo test --workspace`; run them with `scripts/container-faults.sh` (CI does), or by hand:
//!
//! ```sh
//! scripts/build-etcd-image.sh   # no registry? a local image
//! ETCD_IMAGE=etcd-grpc-discovery/etcd:3.5.1-local \
//!   cargo test -p server --test containers -- --ignored --nocapture
//! ```
//!
//! Run that way, a missing engine or image fails the tests loudly; nothing is skipped. Each test
//! is its own compose project on free ports, removed when the test ends, also on a panic. Each
//! prints one `FAULT` line; `docs/RESILIENCE.md` tabulates them.

mod common;

use std::time::Duration;

use common::{
    Load, ServerProcess, assert_leases_kept, dead_addr, failures, key_exists, leases,
    wait_registered,
};
use testkit::{Cluster, ComposeCluster, load::assert_no_failures, wait_until};
use tokio::time::{Instant, sleep};

/// One call every 10 ms: 100 calls a second spread over the instances.
const EVERY: Duration = Duration::from_millis(10);

/// etcd's gauge of open watchers; the member whose count rises when the client starts carries
/// the client's watch.
const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";

/// One test at a time: they stop and freeze containers on a 2-core machine.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    cluster: ComposeCluster,
    servers: Vec<ServerProcess>,
    load: Load,
    /// Each member's watcher count before the client started.
    watchers_before: Vec<f64>,
    _logs: tempfile::TempDir,
}

/// A compose cluster, three servers with `server_args`, and the load on all three endpoints.
async fn setup(server_args: &[&str]) -> Setup {
    let logs = tempfile::tempdir().expect("a temporary directory for server logs");
    let cluster = ComposeCluster::start();
    let servers: Vec<_> = (0..3)
        .map(|_| ServerProcess::start(&cluster, logs.path(), server_args))
        .collect();
    for server in &servers {
        wait_registered(&cluster, server);
    }
    let watchers_before = watchers(&cluster);
    let load = Load::start(cluster.endpoints(), EVERY).await;
    let addrs: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    load.wait_serving(&addrs, Duration::from_secs(15)).await;
    Setup {
        cluster,
        servers,
        load,
        watchers_before,
        _logs: logs,
    }
}

fn watchers(cluster: &ComposeCluster) -> Vec<f64> {
    (0..3)
        .map(|i| {
            cluster
                .metric(i, WATCHERS)
                .unwrap_or_else(|| panic!("etcd{} reports no {WATCHERS}", i + 1))
        })
        .collect()
}

/// The member whose watcher count rose by the client's one watch since `before`.
fn watch_member(cluster: &ComposeCluster, before: &[f64]) -> usize {
    let now = watchers(cluster);
    let risen: Vec<usize> = (0..3).filter(|&i| now[i] > before[i]).collect();
    assert!(
        risen.len() == 1,
        "cannot tell which member carries the client's watch: watchers {before:?} before the \
         client, {now:?} after"
    );
    risen[0]
}

/// Puts a record under the service prefix through the members that answer (waiting out an
/// election if needed) and waits until the client's discovery lists it. Returns when the put
/// succeeded and when the client listed the record, both counted from `since`. A new instance
/// reaching the client proves its watch works again.
async fn probe_seen(
    cluster: &ComposeCluster,
    load: &Load,
    name: &str,
    since: Instant,
    timeout: Duration,
) -> (Duration, Duration) {
    let key = format!("services/helloworld/{name}");
    let value = format!(r#"{{"Op":0,"Addr":"{}","Metadata":null}}"#, dead_addr());
    wait_until(timeout, "a put through the members that answer", || {
        cluster.etcdctl(&["put", &key, &value]).status.success()
    });
    let put = since.elapsed();
    loop {
        if load
            .channel
            .discovery()
            .membership()
            .instances
            .contains_key(name)
        {
            return (put, since.elapsed());
        }
        assert!(
            since.elapsed() < timeout,
            "the client did not list {name} within {timeout:?}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that no call failed and that every server is still registered, then prints the
/// `FAULT` line: `name`, the calls, and `measured`.
fn report(
    name: &str,
    cluster: &ComposeCluster,
    servers: &[ServerProcess],
    calls: &[common::Call],
    measured: &str,
) {
    let failed = failures(calls);
    let registered = servers
        .iter()
        .filter(|s| key_exists(cluster, &s.key()))
        .count();
    println!(
        "FAULT {name}: image={} calls={} failed={} registered={registered}/{} {measured}",
        cluster.image(),
        calls.len(),
        failed.len(),
        servers.len()
    );
    assert_no_failures(name, calls);
    assert_eq!(registered, servers.len(), "{name}: a registration was lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and an etcd image: scripts/container-faults.sh"]
async fn c1_docker_kill_of_the_member_carrying_the_watch() {
    let _turn = TURN.lock().await;
    // A 4 s lease: 6 s of checks after the kill prove the keep-alives moved to the survivors.
    let Setup {
        mut cluster,
        servers,
        load,
        watchers_before,
        _logs,
    } = setup(&["--ttl", "4s"]).await;
    let victim = watch_member(&cluster, &watchers_before);
    let before = leases(&cluster, &servers);

    cluster.kill(victim);
    let killed = Instant::now();
    let (put, seen) = probe_seen(
        &cluster,
        &load,
        "probe-kill",
        killed,
        Duration::from_secs(20),
    )
    .await;
    let fault = format!("the kill of etcd{}", victim + 1);
    assert_leases_kept(
        &cluster,
        &servers,
        &before,
        killed,
        Duration::from_secs(6),
        &fault,
    )
    .await;
    let restarted = Instant::now();
    cluster.restart(victim);
    let rejoined = restarted.elapsed();
    let calls = load.finish().await;
    report(
        "c1 docker-kill-watch-member",
        &cluster,
        &servers,
        &calls,
        &format!(
            "killed=etcd{} leases-kept=3/3 put-ok-after-kill={put:?} change-seen-by-client-after-kill={seen:?} restarted-member-healthy-after={rejoined:?}",
            victim + 1
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and an etcd image: scripts/container-faults.sh"]
async fn c2_network_partition_of_a_member_then_of_the_clients_member() {
    let _turn = TURN.lock().await;
    let Setup {
        mut cluster,
        servers,
        load,
        watchers_before,
        _logs,
    } = setup(&[]).await;
    let watched = watch_member(&cluster, &watchers_before);
    let other = (watched + 1) % 3;
    let before = leases(&cluster, &servers);

    // First a member the client's watch is not on, then the one it is on.
    let mut measured = Vec::new();
    for (round, member) in [(1, other), (2, watched)] {
        cluster.partition(member);
        let cut = Instant::now();
        // A real partition: the member is alive and answers, but knows no leader.
        wait_until(
            Duration::from_secs(15),
            &format!("etcd{} to report that it has no leader", member + 1),
            || {
                cluster
                    .health_reply(member)
                    .is_some_and(|r| r.contains(r#""health":"false""#))
            },
        );
        let no_leader = cut.elapsed();
        let (put, seen) = probe_seen(
            &cluster,
            &load,
            &format!("probe-partition-{round}"),
            cut,
            Duration::from_secs(30),
        )
        .await;
        cluster.heal(member);
        let healed = cut.elapsed();
        let role = if member == watched {
            "client's watch member"
        } else {
            "other member"
        };
        println!(
            "  round {round}: etcd{} ({role}) partitioned: answered health=false after {no_leader:?}; a change put {put:?} after the cut reached the client {seen:?} after the cut; healthy again {:?} after the cut",
            member + 1,
            healed
        );
        measured.push(format!(
            "round{round}=etcd{}({}):put-at={put:?},seen-at={seen:?}",
            member + 1,
            if member == watched { "watch" } else { "other" }
        ));
    }
    let kept = leases(&cluster, &servers)
        .iter()
        .zip(&before)
        .filter(|(now, then)| now == then)
        .count();
    let calls = load.finish().await;
    report(
        "c2 network-partition",
        &cluster,
        &servers,
        &calls,
        &format!("{} leases-kept={kept}/3", measured.join(" ")),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and an etcd image: scripts/container-faults.sh"]
async fn c3_docker_pause_of_two_members_longer_than_the_ttl() {
    let _turn = TURN.lock().await;
    let Setup {
        mut cluster,
        servers,
        load,
        _logs,
        ..
    } = setup(&["--ttl", "3s"]).await;
    let before = leases(&cluster, &servers);
    let all: Vec<String> = servers.iter().map(ServerProcess::id).collect();

    // Whichever two: quorum is gone either way. The leader among them, if it is, makes the
    // survivor hold an election it cannot win.
    cluster.pause(0);
    cluster.pause(1);
    let paused = Instant::now();
    while paused.elapsed() < Duration::from_secs(5) {
        let known = load.channel.discovery().membership().instances.len();
        assert_eq!(
            known, 3,
            "the client flushed its instances during the pause"
        );
        sleep(Duration::from_millis(100)).await;
    }
    cluster.unpause(0);
    cluster.unpause(1);
    let resumed = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "both paused members to report healthy",
        || cluster.is_healthy(0) && cluster.is_healthy(1),
    );
    let quorum_back = resumed.elapsed();
    // Each server gave its lease up at its 3 s deadline, during the pause: registered again means
    // its key is back on a new lease.
    wait_until(
        Duration::from_secs(20),
        "every server to register again on a new lease",
        || {
            leases(&cluster, &servers)
                .iter()
                .zip(&before)
                .all(|(now, then)| now.is_some() && now != then)
        },
    );
    let registered = resumed.elapsed();
    let started = Instant::now();
    loop {
        let membership = load.channel.discovery().membership();
        let mut known: Vec<String> = membership.instances.keys().cloned().collect();
        known.sort();
        let mut want = all.clone();
        want.sort();
        if membership.problem.is_none() && known == want {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "discovery never re-synced: {known:?}, problem {:?}",
            membership.problem
        );
        sleep(Duration::from_millis(10)).await;
    }
    let resynced = resumed.elapsed();
    let calls = load.finish().await;
    report(
        "c3 docker-pause-2-of-3-for-5s",
        &cluster,
        &servers,
        &calls,
        &format!(
            "ttl=3s quorum-back-after-unpause={quorum_back:?} re-registered-on-new-leases-after-unpause={registered:?} client-resynced-after-unpause={resynced:?}"
        ),
    );
}

//! Distributed locks against a real three-member etcd cluster: mutual exclusion between processes,
//! takeover after a holder is killed, release on drop, `try_lock`, and a timed-out wait that leaves
//! nothing behind.
//!
//! The contending processes are this very test binary, started again to run only [`lock_child`]
//! with its instructions in environment variables; they are spawned through `testkit`, so they die
//! with the test.

mod common;

use std::{
    fs::OpenOptions,
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::cluster;
use registry::{Error, EtcdConfig, Lock, SharedLease};
use testkit::{ChildGuard, EtcdCluster, eventually};

/// Set in a child process: what it should do (`contend` or `hold`).
const CHILD_MODE: &str = "REGISTRY_LOCK_CHILD";
const CHILD_ENDPOINTS: &str = "REGISTRY_LOCK_ENDPOINTS";
const CHILD_NAME: &str = "REGISTRY_LOCK_NAME";
const CHILD_ID: &str = "REGISTRY_LOCK_ID";
const CHILD_ROUNDS: &str = "REGISTRY_LOCK_ROUNDS";
const CHILD_LOG: &str = "REGISTRY_LOCK_LOG";
/// The counter the holders increment with a plain read-then-write: overlapping holders lose updates.
const COUNTER: &str = "lock-test/counter";
/// The lease TTL of every contender.
const TTL: Duration = Duration::from_secs(2);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set by the parent test"))
}

/// The body of a child process; does nothing unless started by the tests below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the multi-process tests, which start it themselves"]
async fn lock_child() {
    let Ok(mode) = std::env::var(CHILD_MODE) else {
        eprintln!("lock_child runs only as a child of the multi-process lock tests");
        return;
    };
    let etcd = EtcdConfig::new(env(CHILD_ENDPOINTS).split(','))
        .expect("endpoints from the parent")
        .connect()
        .await
        .expect("connecting to etcd");
    let lease = SharedLease::start(&etcd, TTL).expect("a valid TTL");
    let locks = Lock::new(&lease);
    let name = env(CHILD_NAME);
    let id = env(CHILD_ID);
    match mode.as_str() {
        "contend" => {
            let rounds: usize = env(CHILD_ROUNDS).parse().expect("a number of rounds");
            let mut log = OpenOptions::new()
                .append(true)
                .open(env(CHILD_LOG))
                .expect("the shared log file");
            let mut client = etcd.client();
            for round in 0..rounds {
                let guard = locks
                    .lock(&name, Duration::from_secs(60))
                    .await
                    .expect("the lock within 60 s");
                // One write(2) per line on an O_APPEND file: lines of different processes never mix.
                log.write_all(format!("enter {id} {round}\n").as_bytes())
                    .expect("logging");
                let got = client
                    .get(COUNTER, None)
                    .await
                    .expect("reading the counter");
                let count: u64 = got
                    .kvs()
                    .first()
                    .map_or(0, |kv| kv.value_str().unwrap_or("0").parse().unwrap_or(0));
                // Hold the lock a little, as real work would: an overlapping holder would read
                // the same count meanwhile, and one of the two increments would be lost.
                tokio::time::sleep(Duration::from_millis(20)).await;
                client
                    .put(COUNTER, (count + 1).to_string(), None)
                    .await
                    .expect("writing the counter");
                log.write_all(format!("exit {id} {round}\n").as_bytes())
                    .expect("logging");
                guard.unlock().await.expect("the lock was held to the end");
            }
            lease.release().await.expect("revoking the lease");
        }
        "hold" => {
            let guard = locks
                .lock(&name, Duration::from_secs(60))
                .await
                .expect("the lock within 60 s");
            println!("HELD {}", guard.key());
            // Hold it until the parent kills this process.
            std::future::pending::<()>().await;
        }
        other => panic!("unknown child mode {other:?}"),
    }
}

/// Starts this test binary again as a child running [`lock_child`] in `mode`.
fn child(
    cluster: &EtcdCluster,
    mode: &str,
    name: &str,
    id: &str,
    extra: &[(&str, &str)],
) -> ChildGuard {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "lock_child",
        "--ignored",
        "--nocapture",
        "--quiet",
    ])
    .env(CHILD_MODE, mode)
    .env(CHILD_ENDPOINTS, cluster.endpoints().join(","))
    .env(CHILD_NAME, name)
    .env(CHILD_ID, id)
    .stdout(Stdio::piped());
    for (key, value) in extra {
        cmd.env(key, value);
    }
    testkit::spawn(&mut cmd)
}

fn keys_under(cluster: &EtcdCluster, prefix: &str) -> Vec<String> {
    cluster
        .etcdctl_ok(&["get", "--prefix", prefix, "--keys-only"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_never_hold_the_lock_at_once() {
    const PROCESSES: usize = 4;
    const ROUNDS: usize = 10;
    let (cluster, _etcd) = cluster().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log_path = dir.path().join("holders.log");
    std::fs::File::create(&log_path).expect("creating the log");
    let log = log_path.to_string_lossy().into_owned();
    let rounds = ROUNDS.to_string();

    let started = Instant::now();
    let mut children: Vec<ChildGuard> = (0..PROCESSES)
        .map(|i| {
            child(
                &cluster,
                "contend",
                "lock-test/counter-lock",
                &format!("p{i}"),
                &[(CHILD_ROUNDS, &rounds), (CHILD_LOG, &log)],
            )
        })
        .collect();
    for child in &mut children {
        let status = child
            .wait_timeout(Duration::from_secs(120))
            .expect("a contender did not finish within 120 s");
        assert!(status.success(), "a contender failed: {status}");
    }
    let elapsed = started.elapsed();

    // Every enter is followed by the same process's exit before anyone else enters.
    let text = std::fs::read_to_string(&log_path).expect("reading the log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2 * PROCESSES * ROUNDS, "{text}");
    for pair in lines.chunks(2) {
        let enter = pair[0].strip_prefix("enter ");
        let exit = pair[1].strip_prefix("exit ");
        assert!(
            enter.is_some() && enter == exit,
            "overlapping holders: {pair:?} in\n{text}"
        );
    }
    let counter = cluster.etcdctl_ok(&["get", COUNTER, "--print-value-only"]);
    assert_eq!(
        counter.trim(),
        (PROCESSES * ROUNDS).to_string(),
        "lost updates"
    );
    println!(
        "LOCK mutual-exclusion: {PROCESSES} processes x {ROUNDS} rounds, {} critical sections, no overlap, counter {}, in {elapsed:?}",
        lines.len() / 2,
        counter.trim()
    );
    assert!(keys_under(&cluster, "lock-test/counter-lock/").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_taken_over_within_its_ttl() {
    let (cluster, etcd) = cluster().await;
    let name = "lock-test/crash";
    let mut holder = child(&cluster, "hold", name, "holder", &[]);
    let stdout = holder.child_mut().stdout.take().expect("piped stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let held_key = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(key) = line.strip_prefix("HELD ") {
                    break key.to_owned();
                }
            }
            Err(e) => panic!("the holder did not take the lock within 30 s: {e}"),
        }
    };

    // A second contender, in this process, queues behind the holder.
    let lease = SharedLease::start(&etcd, TTL).unwrap();
    let locks = Lock::new(&lease);
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move {
            let guard = locks.lock(name, Duration::from_secs(60)).await;
            (guard, Instant::now())
        }
    });
    eventually(Duration::from_secs(10), "the waiter to queue", || async {
        (keys_under(&cluster, &format!("{name}/")).len() == 2).then_some(())
    })
    .await;
    assert!(!waiter.is_finished(), "got the lock while it was held");

    holder.kill();
    let killed = Instant::now();
    let (guard, acquired) = waiter.await.unwrap();
    let guard = guard.expect("the lock after the holder died");
    let takeover = acquired - killed;
    println!(
        "LOCK crash-takeover: holder SIGKILLed, lock taken over after {takeover:?} (TTL {TTL:?})"
    );
    assert!(
        takeover <= TTL + Duration::from_secs(4),
        "takeover took {takeover:?}"
    );
    assert_ne!(guard.key(), held_key);
    assert_eq!(keys_under(&cluster, &format!("{name}/")), [guard.key()]);
    guard.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_guard_hands_the_lock_to_the_next_contender_at_once() {
    let (cluster, etcd) = cluster().await;
    let name = "lock-test/drop";
    // A long TTL: a release within a second or two cannot be the lease expiring.
    let ttl = Duration::from_secs(10);
    let first = Lock::new(&SharedLease::start(&etcd, ttl).unwrap());
    let second = Lock::new(&SharedLease::start(&etcd, ttl).unwrap());

    let guard = first.lock(name, Duration::from_secs(10)).await.unwrap();
    assert!(guard.is_held());
    // Another guard of the same lease and name is excluded too, though it would share the key.
    assert!(first.try_lock(name).await.unwrap().is_none());
    let waiter = tokio::spawn({
        let second = second.clone();
        async move {
            let guard = second.lock(name, Duration::from_secs(30)).await;
            (guard, Instant::now())
        }
    });
    eventually(Duration::from_secs(10), "the waiter to queue", || async {
        (keys_under(&cluster, &format!("{name}/")).len() == 2).then_some(())
    })
    .await;

    drop(guard);
    let dropped = Instant::now();
    let (next, acquired) = waiter.await.unwrap();
    let next = next.expect("the lock after the drop");
    let handover = acquired - dropped;
    println!(
        "LOCK drop-release: next contender got the lock {handover:?} after the guard was dropped"
    );
    assert!(handover < Duration::from_secs(3), "took {handover:?}");
    assert_eq!(keys_under(&cluster, &format!("{name}/")), [next.key()]);
    next.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_and_a_timed_out_lock_leave_no_waiting_key() {
    let (cluster, etcd) = cluster().await;
    let name = "lock-test/try";
    let ours = Lock::new(&SharedLease::start(&etcd, TTL).unwrap());
    let theirs = Lock::new(&SharedLease::start(&etcd, TTL).unwrap());

    let held = theirs.try_lock(name).await.unwrap().expect("a free lock");
    let asked = Instant::now();
    assert!(ours.try_lock(name).await.unwrap().is_none());
    println!("LOCK try-lock: refused in {:?}", asked.elapsed());
    assert_eq!(keys_under(&cluster, &format!("{name}/")), [held.key()]);

    // etcd's lock RPC queues behind a key made by try_lock: both follow one layout.
    let asked = Instant::now();
    let err = ours.lock(name, Duration::from_secs(1)).await.unwrap_err();
    let waited = asked.elapsed();
    assert!(matches!(err, Error::LockTimeout { .. }), "{err}");
    assert!(err.to_string().contains(name), "{err}");
    assert!(waited < Duration::from_secs(4), "gave up after {waited:?}");
    // Our waiter key was withdrawn before lock() returned.
    assert_eq!(keys_under(&cluster, &format!("{name}/")), [held.key()]);

    held.unlock().await.unwrap();
    let mine = ours
        .try_lock(name)
        .await
        .unwrap()
        .expect("the lock once free");
    assert_eq!(keys_under(&cluster, &format!("{name}/")), [mine.key()]);
    mine.unlock().await.unwrap();
    assert!(keys_under(&cluster, &format!("{name}/")).is_empty());
}

//! Interoperability with Go services as Go teams write them: a Greeter that registers with etcd's
//! `naming/endpoints` Manager, and a stock grpc-go client that dials `etcd:///services/helloworld`
//! through etcd's resolver with `round_robin` (both in `interop/go/`, built from Debian's Go
//! packages at test time, with stubs generated from our own `proto/helloworld.proto`).
//!
//! - The Go client spreads its calls evenly over three of our servers, with no failure (it panicked
//!   on our records before their metadata became hashable).
//! - Without `grpc.WithAuthority`, h2 under our servers rejects every call: the one dial option the
//!   Go side needs, pinned here so that we notice if h2 ever accepts grpc-go's default authority.
//! - Our client gives the Go server its share, beside our servers.
//! - A graceful SIGTERM of one of our servers, then of the Go server, under about 200 calls/s from
//!   both clients fails no call.
//! - SIGKILL and SIGSTOP of one of our servers under load: what each client does is printed as a
//!   `GO-INTEROP` line (reported in docs/RESILIENCE.md, not asserted).
//!
//! Without Go or its packages these tests fail, naming the install command, rather than skip.

mod common;

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{Load, ServerProcess, failures, key_exists, wait_registered};
use testkit::{ChildGuard, EtcdCluster, wait_for, wait_until};
use tokio::time::{Instant, sleep};

/// One call every 10 ms from our client, and as many from the Go client: about 200 calls a second.
const EVERY: Duration = Duration::from_millis(10);

/// Bound for anything a Go peer does once started: registering, a short run, exiting on SIGTERM.
const GO_TIMEOUT: Duration = Duration::from_secs(15);

/// The tests kill and freeze processes on a 2-core machine: one at a time, as in the fault suite.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The built Go peers, once per test binary; `interop/go/build.sh` explains what it needs.
fn go_bin(peer: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let out = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-interop");
        let built = Command::new("bash")
            .arg(root.join("interop/go/build.sh"))
            .arg(&out)
            .stdin(Stdio::null())
            .output()
            .expect("running interop/go/build.sh");
        assert!(
            built.status.success(),
            "building the Go peers failed (scripts/test.sh installs what they need):\n{}{}",
            String::from_utf8_lossy(&built.stdout),
            String::from_utf8_lossy(&built.stderr)
        );
        out
    });
    out.join("bin").join(peer)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A child's stdout and stderr, both into `path`.
fn logged(cmd: &mut Command, path: &Path) -> ChildGuard {
    let file = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let err = file.try_clone().expect("duplicating a log handle");
    testkit::spawn(cmd.stdin(Stdio::null()).stdout(file).stderr(err))
}

/// `greeter_server`: registered by etcd's endpoints.Manager under a kept-alive 10 s lease.
struct GoServer {
    child: ChildGuard,
    addr: String,
    key: String,
    log: PathBuf,
}

impl GoServer {
    fn start(cluster: &EtcdCluster, logs: &Path) -> Self {
        let log = logs.join(format!("go-server-{}.log", rand_suffix()));
        let mut child = logged(
            Command::new(go_bin("greeter_server"))
                .args(["-etcd-endpoints", &cluster.endpoints().join(",")]),
            &log,
        );
        let (addr, key) = wait_for(GO_TIMEOUT, "the Go server's `registered` line", || {
            let text = read(&log);
            assert!(child.is_running(), "the Go server exited:\n{text}");
            let addr = text.lines().find_map(|l| l.strip_prefix("serving on "))?;
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("registered "))?
                .split(' ')
                .next()?;
            Some((addr.to_owned(), key.to_owned()))
        });
        Self {
            child,
            addr,
            key,
            log,
        }
    }

    /// SIGTERM: it deletes its endpoint, revokes, serves a 500 ms grace, stops gracefully and
    /// exits 0; returns how many calls it served.
    fn stop(&mut self) -> usize {
        self.child.signal(libc::SIGTERM);
        let status = self.child.wait_timeout(GO_TIMEOUT);
        let text = read(&self.log);
        assert!(
            status.is_some_and(|s| s.success()),
            "the Go server did not exit 0 on SIGTERM ({status:?}):\n{text}"
        );
        text.lines()
            .find_map(|l| l.strip_prefix("stopped after serving "))
            .and_then(|rest| rest.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no `stopped after serving N calls` line:\n{text}"))
    }
}

/// A distinct log name for each peer of a test.
fn rand_suffix() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One call as `greeter_client` printed it.
#[derive(Debug)]
struct GoCall {
    /// When it was sent, in Unix milliseconds.
    sent_ms: u128,
    /// `ok`, or the gRPC code.
    outcome: String,
    /// Where it was sent, `-` when it never reached a connection.
    peer: String,
    /// Who answered, `-` for a failure.
    instance: String,
    line: String,
}

/// A running `greeter_client`, dialing `etcd:///services/helloworld` with round_robin.
struct GoClient {
    child: ChildGuard,
    log: PathBuf,
}

/// What a finished `greeter_client` reported.
struct GoRun {
    exit: Option<i32>,
    calls: Vec<GoCall>,
    /// Its `instance ID COUNT` lines.
    per_instance: Vec<(String, usize)>,
    text: String,
}

impl GoRun {
    fn failed(&self) -> Vec<&GoCall> {
        self.calls.iter().filter(|c| c.outcome != "ok").collect()
    }

    fn count(&self, instance: &str) -> usize {
        self.per_instance
            .iter()
            .find(|(id, _)| id == instance)
            .map_or(0, |(_, n)| *n)
    }
}

impl GoClient {
    fn start(cluster: &EtcdCluster, logs: &Path, args: &[&str]) -> Self {
        let log = logs.join(format!("go-client-{}.log", rand_suffix()));
        let child = logged(
            Command::new(go_bin("greeter_client"))
                .args(["-etcd-endpoints", &cluster.endpoints().join(",")])
                .args(args),
            &log,
        );
        Self { child, log }
    }

    fn wait_warmed_up(&mut self) {
        wait_until(GO_TIMEOUT, "the Go client's `warmed up` line", || {
            let text = read(&self.log);
            assert!(self.child.is_running(), "the Go client exited:\n{text}");
            text.contains("warmed up: ")
        });
    }

    /// Waits for the client to end by itself (after `-requests` or `-duration`).
    fn finish(mut self) -> GoRun {
        let status = self.child.wait_timeout(Duration::from_secs(60));
        self.parse(status.and_then(|s| s.code()))
    }

    /// SIGTERM: the client stops sending, waits for its calls in flight and reports.
    fn stop(mut self) -> GoRun {
        self.child.signal(libc::SIGTERM);
        let status = self.child.wait_timeout(GO_TIMEOUT);
        self.parse(status.and_then(|s| s.code()))
    }

    fn parse(&self, exit: Option<i32>) -> GoRun {
        let text = read(&self.log);
        assert!(
            text.lines().any(|l| l.starts_with("total ")),
            "the Go client did not report (exit {exit:?}):\n{text}"
        );
        let calls = text
            .lines()
            .filter_map(|line| {
                let mut f = line.strip_prefix("call ")?.split(' ');
                Some(GoCall {
                    sent_ms: f.next()?.parse().ok()?,
                    outcome: f.next()?.to_owned(),
                    peer: f.next()?.to_owned(),
                    instance: f.next()?.to_owned(),
                    line: line.to_owned(),
                })
            })
            .collect();
        let per_instance = text
            .lines()
            .filter_map(|line| {
                let (id, n) = line.strip_prefix("instance ")?.rsplit_once(' ')?;
                Some((id.to_owned(), n.parse().ok()?))
            })
            .collect();
        GoRun {
            exit,
            calls,
            per_instance,
            text,
        }
    }
}

/// `N ms`, or `none` when there was no such call.
fn ms(value: Option<u128>) -> String {
    value.map_or_else(|| "none".to_owned(), |ms| format!("{ms} ms"))
}

fn unix_ms(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// A three-member cluster and `n` of our `server` processes, registered.
fn ours(n: usize, logs: &Path, args: &[&str]) -> (EtcdCluster, Vec<ServerProcess>) {
    let cluster = EtcdCluster::start();
    let servers: Vec<_> = (0..n)
        .map(|_| ServerProcess::start(&cluster, logs, args))
        .collect();
    for server in &servers {
        wait_registered(&cluster, server);
    }
    (cluster, servers)
}

/// SIGTERM to one of our servers: it must exit 0 after deregistering and draining.
fn stop_gracefully(server: &mut ServerProcess) {
    server.child.signal(libc::SIGTERM);
    let status = server.child.wait_timeout(GO_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "{} did not exit 0 on SIGTERM ({status:?}):\n{}",
        server.addr,
        server.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_go_client_spreads_evenly_over_three_of_our_servers() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (cluster, servers) = ours(3, logs.path(), &[]);

    let run = GoClient::start(
        &cluster,
        logs.path(),
        &["-requests", "300", "-warmup-instances", "3"],
    )
    .finish();
    assert_eq!(run.exit, Some(0), "{}", run.text);
    assert!(
        run.text.contains("total 300 calls, 0 failed"),
        "{}",
        run.text
    );
    // Each call was answered by the instance registered at the address it was sent to.
    for call in &run.calls {
        assert_eq!(call.instance, call.peer.replace(':', "-"), "{}", call.line);
    }
    // round_robin over three ready connections: 100 each, give or take the rotation's start.
    for server in &servers {
        let n = run.count(&server.id());
        assert!(
            (99..=101).contains(&n),
            "{} served {n}:\n{}",
            server.id(),
            run.text
        );
    }
    println!(
        "GO-INTEROP spread: go-client calls=300 failed=0 per-instance={:?}",
        run.per_instance
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_authority_option_h2_rejects_grpc_gos_default_authority() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (cluster, _servers) = ours(1, logs.path(), &[]);

    // grpc-go sends `:authority: services/helloworld`; h2 resets such a stream before tonic sees
    // it. If this starts passing, h2 accepts it and the README's dial option can go.
    let run =
        GoClient::start(&cluster, logs.path(), &["-requests", "3", "-authority", ""]).finish();
    assert_eq!(run.exit, Some(1), "{}", run.text);
    assert_eq!(run.failed().len(), 3, "{}", run.text);
    for call in run.failed() {
        assert!(
            call.outcome == "Internal" && call.line.contains("PROTOCOL_ERROR"),
            "{}",
            call.line
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_gives_a_go_server_registered_by_the_endpoints_manager_its_share() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (cluster, servers) = ours(2, logs.path(), &[]);
    let mut go = GoServer::start(&cluster, logs.path());
    // Exactly what Go's Manager writes, under a lease.
    let value = cluster.etcdctl_ok(&["get", &go.key, "--print-value-only"]);
    assert_eq!(
        value.trim(),
        format!(r#"{{"Op":0,"Addr":"{}","Metadata":null}}"#, go.addr)
    );

    let load = Load::start(cluster.endpoints(), EVERY).await;
    let all = [&*servers[0].addr, &*servers[1].addr, &*go.addr];
    load.wait_serving(&all, Duration::from_secs(10)).await;
    let counted = Instant::now();
    load.wait_calls_since(counted, 300, Duration::from_secs(10))
        .await;
    let calls = load.finish().await;
    assert!(failures(&calls).is_empty(), "{:?}", failures(&calls));
    let to_go = calls
        .iter()
        .filter(|c| c.outcome.as_deref() == Ok(go.addr.as_str()))
        .count();
    let window: Vec<_> = calls.iter().filter(|c| c.sent >= counted).collect();
    for addr in all {
        let n = window
            .iter()
            .filter(|c| c.outcome.as_deref() == Ok(addr))
            .count();
        let share = n as f64 / window.len() as f64;
        assert!(
            (0.30..=0.37).contains(&share),
            "{addr} got {n} of {} calls",
            window.len()
        );
    }
    // The Go side saw every call our client says it sent there, and no other.
    assert_eq!(go.stop(), to_go);
    println!(
        "GO-INTEROP share: our-client calls={} to-go-server={to_go}",
        calls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_sigterm_of_ours_and_of_the_go_server_fails_no_call_for_either_client() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    let (cluster, mut servers) = ours(3, logs.path(), &[]);
    let mut go = GoServer::start(&cluster, logs.path());
    let load = Load::start(cluster.endpoints(), EVERY).await;
    let all = [
        &*servers[0].addr,
        &*servers[1].addr,
        &*servers[2].addr,
        &*go.addr,
    ];
    load.wait_serving(&all, Duration::from_secs(10)).await;
    let mut go_client = GoClient::start(
        &cluster,
        logs.path(),
        &["-duration", "60s", "-rate", "100", "-warmup-instances", "4"],
    );
    go_client.wait_warmed_up();

    let ours_stopped = SystemTime::now();
    stop_gracefully(&mut servers[0]);
    let go_stopped = SystemTime::now();
    go.stop();
    // A second more of calls over the two that are left.
    let after = Instant::now();
    load.wait_calls_since(after, 100, Duration::from_secs(5))
        .await;
    let calls = load.finish().await;
    let run = go_client.stop();

    let last_go_call_to = |addr: &str, since: SystemTime| {
        run.calls
            .iter()
            .filter(|c| c.peer == addr && c.sent_ms >= unix_ms(since))
            .map(|c| c.sent_ms - unix_ms(since))
            .max()
    };
    println!(
        "GO-INTEROP sigterm: our-client calls={} failed={} go-client calls={} failed={} \
         go-client-last-call-sent-after-sigterm ours={} go-server={}",
        calls.len(),
        failures(&calls).len(),
        run.calls.len(),
        run.failed().len(),
        ms(last_go_call_to(&servers[0].addr, ours_stopped)),
        ms(last_go_call_to(&go.addr, go_stopped)),
    );
    assert!(failures(&calls).is_empty(), "ours: {:?}", failures(&calls));
    assert!(run.failed().is_empty(), "go: {:?}", run.failed());
    assert_eq!(run.exit, Some(0), "{}", run.text);
}

/// What one client did after one of our servers was killed or frozen at `at`.
fn report(fault: &str, at: SystemTime, victim: &str, ours: &[common::Call], go: &GoRun) {
    let go_after: Vec<_> = go
        .calls
        .iter()
        .filter(|c| c.sent_ms >= unix_ms(at))
        .collect();
    let go_last_to_victim = go_after
        .iter()
        .filter(|c| c.peer == victim)
        .map(|c| c.sent_ms - unix_ms(at))
        .max();
    println!(
        "GO-INTEROP {fault}: our-client calls={} failed={} | go-client calls={} failed={} \
         last-call-sent-to-victim-after={}",
        ours.len(),
        failures(ours).len(),
        go.calls.len(),
        go.failed().len(),
        ms(go_last_to_victim),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_sigstop_of_one_of_ours_reported_for_both_clients() {
    let _turn = TURN.lock().await;
    let logs = tempfile::tempdir().unwrap();
    // A 4 s lease bounds how long a frozen instance stays registered.
    let (cluster, mut servers) = ours(3, logs.path(), &["--ttl", "4s"]);

    for fault in ["sigkill", "sigstop"] {
        let victim = if fault == "sigkill" { 0 } else { 1 };
        let load = Load::start(cluster.endpoints(), EVERY).await;
        let addrs: Vec<&str> = servers[victim..].iter().map(|s| s.addr.as_str()).collect();
        load.wait_serving(&addrs, Duration::from_secs(10)).await;
        let warm = 3 - victim;
        let mut go_client = GoClient::start(
            &cluster,
            logs.path(),
            &[
                "-duration",
                "60s",
                "-rate",
                "100",
                "-warmup-instances",
                &warm.to_string(),
            ],
        );
        go_client.wait_warmed_up();

        let at = SystemTime::now();
        let started = Instant::now();
        let victim_addr = servers[victim].addr.clone();
        if fault == "sigkill" {
            servers[victim].child.kill();
        } else {
            servers[victim].child.signal(libc::SIGSTOP);
        }
        // Ours: out of rotation (a killed socket closes at once; a frozen one fails its health
        // checks); then long enough for a frozen instance's lease to expire, for the Go client.
        let ours_out = load
            .wait_out_of_rotation(&victim_addr, started, Duration::from_secs(5), fault)
            .await;
        let settle = if fault == "sigkill" { 2 } else { 7 };
        sleep(Duration::from_secs(settle)).await;
        let calls = load.finish().await;
        let run = go_client.stop();
        println!("GO-INTEROP {fault}: our-client out-of-rotation-after={ours_out:?}");
        report(fault, at, &victim_addr, &calls, &run);
        if fault == "sigstop" {
            servers[victim].child.signal(libc::SIGCONT);
        } else {
            // The next round starts from a clean membership: the killed server's lease expired.
            let key = servers[victim].key();
            wait_until(
                Duration::from_secs(10),
                "the killed server's key to expire",
                || !key_exists(&cluster, &key),
            );
        }
    }
}

//! Interoperability with gRPC peers that are not ours: a server and a client written with Python's
//! grpcio, from stubs generated out of the same `proto/helloworld.proto` (into a temporary directory,
//! at test time).
//!
//! - A Python server registered by another tool (`etcdctl put`, in the Go naming format) is
//!   discovered by our `client` binary and gets its share of the calls, beside our own servers.
//! - A Python server without a health service, or with metadata of its own, is called all the same.
//! - A Python server deleted from etcd by another tool, then stopped, costs no failed call.
//! - A Python client calls one of our servers directly and finds it SERVING.
//!
//! The scripts live in `interop/python/` (see `interop/README.md`). These tests need `python3` with
//! grpcio, grpcio-tools and grpcio-health-checking; without them they fail, naming the install
//! command, rather than skip: a skipped interop test would read as a passing one.

mod common;

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use common::{Server, client, run_ok};
use tempfile::TempDir;
use testkit::{ChildGuard, EtcdCluster, free_port, wait_for, wait_until};

/// What a machine without the Python packages needs.
const PIP_INSTALL: &str = "python3 -m pip install grpcio grpcio-tools grpcio-health-checking";

/// Bound for anything Python does once started: starting up, a client run, exiting on SIGTERM.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root, where `proto/` and `interop/` are.
fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `python3` with grpcio, and helloworld stubs generated for one test; both scripts import them.
struct Python {
    /// The stubs, and the logs of the Python processes of this test.
    dir: TempDir,
}

impl Python {
    /// Checks the Python packages and generates the stubs.
    ///
    /// # Panics
    /// If `python3` or a package is missing (naming the install command), or protoc fails.
    fn setup() -> Self {
        let check = Command::new("python3")
            .args(["-c", "import grpc, grpc_tools, grpc_health"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run python3 ({e}); the interop tests need it: install Python 3, then {PIP_INSTALL}")
            });
        assert!(
            check.status.success(),
            "the interop tests need the Python packages grpcio, grpcio-tools and \
             grpcio-health-checking; install them with: {PIP_INSTALL}\n{}",
            String::from_utf8_lossy(&check.stderr).trim_end()
        );

        let dir = tempfile::Builder::new()
            .prefix("interop-python-")
            .tempdir()
            .expect("creating a temporary directory");
        let protoc = Command::new("python3")
            .args(["-m", "grpc_tools.protoc"])
            .arg(format!("-I{}", repo_root().join("proto").display()))
            .arg(format!("--python_out={}", dir.path().display()))
            .arg(format!("--grpc_python_out={}", dir.path().display()))
            .arg("helloworld.proto")
            .output()
            .expect("running python3 -m grpc_tools.protoc");
        assert!(
            protoc.status.success(),
            "generating the Python stubs failed:\n{}",
            String::from_utf8_lossy(&protoc.stderr)
        );
        Self { dir }
    }

    /// `python3 interop/python/<script> --stubs <dir>`.
    fn script(&self, script: &str) -> Command {
        let mut cmd = Command::new("python3");
        cmd.arg(repo_root().join("interop/python").join(script))
            .arg("--stubs")
            .arg(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `greeter_client.py` with `args` to the end; its exit status and everything it printed.
    fn run_client(&self, args: &[&str]) -> (ExitStatus, String) {
        let log = self.dir.path().join("greeter_client.log");
        let (out, err) = log_file(&log);
        let mut process = testkit::spawn(
            self.script("greeter_client.py")
                .args(args)
                .stdout(out)
                .stderr(err),
        );
        let status = process
            .wait_timeout(PYTHON_TIMEOUT)
            .expect("greeter_client.py did not finish: each of its calls has a 5 s deadline");
        (status, read(&log))
    }
}

/// `greeter_server.py` on a free port; killed on drop if the test did not stop it.
struct PythonServer {
    process: ChildGuard,
    /// `127.0.0.1:PORT`.
    addr: String,
    /// `python-PORT`: what it answers as instance id, and the key suffix it is registered under.
    id: String,
    /// Its stdout and stderr: the readiness line, one line per call, its shutdown.
    log: PathBuf,
}

impl PythonServer {
    /// Starts the server and waits for its `serving on` line.
    fn start(python: &Python, args: &[&str]) -> Self {
        let port = free_port();
        let log = python.dir.path().join(format!("greeter_server-{port}.log"));
        let (out, err) = log_file(&log);
        let mut process = testkit::spawn(
            python
                .script("greeter_server.py")
                .args(["--port", &port.to_string()])
                .args(args)
                .stdout(out)
                .stderr(err),
        );
        let addr = format!("127.0.0.1:{port}");
        let ready = format!("serving on {addr}");
        let started = wait_for(
            PYTHON_TIMEOUT,
            &format!("the Python server's `{ready}` line"),
            || {
                if read(&log).contains(&ready) {
                    Some(true)
                } else if process.is_running() {
                    None
                } else {
                    Some(false)
                }
            },
        );
        assert!(started, "the Python server exited:\n{}", read(&log));
        Self {
            process,
            addr,
            id: format!("python-{port}"),
            log,
        }
    }

    /// Everything the server printed so far.
    fn output(&self) -> String {
        read(&self.log)
    }

    /// How many `SayHello` calls from our client (who greets "world") it has answered.
    fn said_hello(&self) -> usize {
        self.output()
            .lines()
            .filter(|l| l.starts_with("SayHello name=world "))
            .count()
    }

    /// Registers it the way another tool would: `etcdctl put` of a Go naming record, no lease.
    fn put_in_etcd(&self, cluster: &EtcdCluster, metadata: &str) {
        let key = format!("services/helloworld/{}", self.id);
        let value = format!(r#"{{"Op":0,"Addr":"{}","Metadata":{metadata}}}"#, self.addr);
        cluster.etcdctl_ok(&["put", &key, &value]);
    }

    /// Sends SIGTERM and checks that the server exits 0 after its shutdown.
    fn stop(&mut self) {
        self.process.signal(libc::SIGTERM);
        let status = self.process.wait_timeout(PYTHON_TIMEOUT);
        let output = self.output();
        assert!(
            status.is_some_and(|s| s.success()),
            "the Python server did not exit 0 on SIGTERM ({status:?}):\n{output}"
        );
        assert!(output.trim_end().ends_with("stopped"), "{output}");
    }
}

/// Creates (or empties) `path` and returns two handles to it, for a child's stdout and stderr. They
/// share one file offset, so neither overwrites what the other wrote.
fn log_file(path: &Path) -> (File, File) {
    let out = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("duplicating the handle of {}: {e}", path.display()));
    (out, err)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Asserts that `stdout` of the client shows `calls` calls sent to `addr` and answered by `id`, and
/// a table row giving `id` that count.
fn assert_served(stdout: &str, addr: &str, id: &str, calls: usize) {
    let served = stdout
        .lines()
        .filter(|l| l.starts_with("call ") && l.contains(&format!(" {addr} ")) && l.contains(id))
        .count();
    assert_eq!(served, calls, "calls to {addr} answered by {id}:\n{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(id) && l.trim_end().ends_with(&format!(" {calls}"))),
        "no table row for {id}:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_spreads_calls_over_our_servers_and_a_python_server_put_by_etcdctl() {
    let python = Python::setup();
    let cluster = EtcdCluster::start();
    let ours: Vec<_> = (0..2).map(|_| Server::start(&cluster)).collect();
    let mut theirs = PythonServer::start(&python, &[]);
    // Exactly what Go's endpoints.Manager writes for `endpoints.Endpoint{Addr: addr}`.
    theirs.put_in_etcd(&cluster, "null");

    // Not held up by the foreign server: no connect or health-probe timeout is waited out.
    let started = Instant::now();
    let stdout = run_ok(client(&cluster).args(["--requests", "9", "--interval", "10ms"]));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the client took {:?}",
        started.elapsed()
    );

    assert!(stdout.contains("total 9 calls, 0 failed"), "{stdout}");
    for server in &ours {
        assert_served(&stdout, &server.addr, &server.addr.replace(':', "-"), 3);
    }
    assert_served(&stdout, &theirs.addr, &theirs.id, 3);
    // The Python side saw the same three calls, with our client's request in them.
    assert_eq!(theirs.said_hello(), 3, "{}", theirs.output());

    theirs.stop();
    for server in ours {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_server_without_health_service_and_with_foreign_metadata_is_called_too() {
    let python = Python::setup();
    let cluster = EtcdCluster::start();
    let ours = Server::start(&cluster);
    // Like grpc's stock example servers: no grpc.health.v1, so the balancer's health probe gets
    // UNIMPLEMENTED, which proves the server answers gRPC.
    let mut theirs = PythonServer::start(&python, &["--no-health"]);
    assert!(
        theirs.output().contains("(health: no)"),
        "{}",
        theirs.output()
    );
    // Metadata of another tool's making, without our instance_id: the key names the instance.
    theirs.put_in_etcd(&cluster, r#"{"lang":"python","weight":1}"#);

    let stdout = run_ok(client(&cluster).args(["--requests", "4", "--interval", "10ms"]));
    assert!(stdout.contains("total 4 calls, 0 failed"), "{stdout}");
    assert_served(&stdout, &ours.addr, &ours.addr.replace(':', "-"), 2);
    assert_served(&stdout, &theirs.addr, &theirs.id, 2);

    theirs.stop();
    ours.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_server_deleted_with_etcdctl_then_stopped_costs_no_call() {
    let python = Python::setup();
    let cluster = EtcdCluster::start();
    let ours = Server::start(&cluster);
    let mut theirs = PythonServer::start(&python, &[]);
    theirs.put_in_etcd(&cluster, "null");

    let log = python.dir.path().join("client.log");
    let (out, err) = log_file(&log);
    let mut calling = testkit::spawn(
        client(&cluster)
            .args(["--duration", "3s", "--interval", "10ms"])
            .stdout(out)
            .stderr(err),
    );
    wait_until(PYTHON_TIMEOUT, "5 calls to the Python server", || {
        theirs.said_hello() >= 5
    });
    // The order a graceful shutdown needs, done by another tool: out of the registry first, stop
    // once clients have seen it. Stopping first fails a call now and then: one that crosses
    // grpcio's GOAWAY is answered CANCELLED, which is not safe to retry.
    cluster.etcdctl_ok(&["del", &format!("services/helloworld/{}", theirs.id)]);
    let left = format!("- instance {} left", theirs.id);
    wait_until(Duration::from_secs(5), &format!("`{left}`"), || {
        read(&log).contains(&left)
    });
    theirs.stop();

    let status = calling
        .wait_timeout(Duration::from_secs(10))
        .expect("the client did not finish its 3 s run");
    let text = read(&log);
    assert!(status.success(), "{text}");
    assert!(text.contains(", 0 failed"), "{text}");
    let calls: Vec<&str> = text.lines().filter(|l| l.starts_with("call ")).collect();
    let to_python = calls
        .iter()
        .filter(|l| l.contains(&format!(" {} ", theirs.addr)))
        .count();
    assert_eq!(
        to_python,
        theirs.said_hello(),
        "every call sent to the Python server was answered by it:\n{text}"
    );
    // The Python server left within the run's first second, so the last 100 calls (more than a
    // second's worth at 10 ms apart) all went to ours.
    for line in calls.iter().rev().take(100) {
        assert!(line.contains(&format!(" {} ", ours.addr)), "{line}\n{text}");
    }
    ours.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_gets_our_servers_identity_and_finds_it_serving() {
    let python = Python::setup();
    let cluster = EtcdCluster::start();
    let ours = Server::start(&cluster);
    let id = ours.addr.replace(':', "-");

    let (status, output) = python.run_client(&[
        "--target",
        &ours.addr,
        "--expect-instance-id",
        &id,
        "--expect-addr",
        &ours.addr,
    ]);
    assert!(status.success(), "{status}:\n{output}");
    for line in [
        format!(
            "SayHello: message='Hello python, from {id}' instance_id='{id}' addr='{}'",
            ours.addr
        ),
        "Health/Check '': SERVING".to_owned(),
        "Health/Check 'helloworld.Greeter': SERVING".to_owned(),
        "all checks passed".to_owned(),
    ] {
        assert!(
            output.lines().any(|l| l == line),
            "no line {line:?} in:\n{output}"
        );
    }

    // The script's checks can fail: a wrong expectation makes it exit 1, naming the check.
    let (status, output) = python.run_client(&[
        "--target",
        &ours.addr,
        "--expect-instance-id",
        "someone-else",
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("FAIL instance_id is 'someone-else'"),
        "{output}"
    );

    ours.stop().await;
}

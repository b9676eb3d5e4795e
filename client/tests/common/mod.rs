//! Helpers shared by the integration tests of the `client` binary: in-process servers (the `server`
//! library on real sockets) registered in a real etcd cluster, and the `client` command line.

#![allow(dead_code)] // each test file uses a different subset

use std::{process::Command, time::Duration};

use clap::Parser;
use testkit::{EtcdCluster, wait_until};
use tokio_util::sync::CancellationToken;

/// An in-process server instance; stopped gracefully (deregistered) on `stop`.
pub(crate) struct Server {
    /// `127.0.0.1:PORT`, as registered; the instance id is the same with `-` for `:`.
    pub(crate) addr: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Starts a server on a port-0 listener and waits until its key is in etcd.
    pub(crate) fn start(cluster: &EtcdCluster) -> Self {
        Self::start_with(cluster, &cluster.endpoints().join(","), &[])
    }

    /// Starts a server on a port-0 listener, reaching etcd at `endpoints` with `extra` flags, and
    /// waits until its key is in etcd; panics with the server's error if it stops first.
    pub(crate) fn start_with(cluster: &EtcdCluster, endpoints: &str, extra: &[&str]) -> Self {
        // Bound here and handed over, so no other test can take the port in between.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .expect("binding a loopback listener on port 0");
        let port = listener.local_addr().expect("the bound address").port();
        let args = [
            "server",
            "--etcd-endpoints",
            endpoints,
            "--deregister-grace",
            "0s",
        ];
        let config = server::Config::try_parse_from(args.iter().chain(extra)).unwrap();
        let shutdown = CancellationToken::new();
        let mut task = tokio::spawn(server::serve(config, listener, shutdown.clone()));
        let addr = format!("127.0.0.1:{port}");
        let key = format!("services/helloworld/127.0.0.1-{port}");
        wait_until(
            Duration::from_secs(15),
            &format!("{key} to register"),
            || {
                if task.is_finished() {
                    let ended = tokio::task::block_in_place(|| {
                        tokio::runtime::Handle::current().block_on(&mut task)
                    });
                    panic!("the server stopped before registering: {ended:?}");
                }
                !cluster
                    .etcdctl_ok(&["get", &key, "--keys-only"])
                    .trim()
                    .is_empty()
            },
        );
        Self {
            addr,
            shutdown,
            task,
        }
    }

    /// Shuts the server down (NOT_SERVING, lease revoked, drained) and checks that it ended well.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// The `client` binary, pointed at `cluster`.
pub(crate) fn client(cluster: &EtcdCluster) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_client"));
    cmd.args(["--etcd-endpoints", &cluster.endpoints().join(",")]);
    cmd
}

/// A running `client` whose stdout is collected line by line as it is printed, so a test can wait
/// for a line to appear.
pub(crate) struct Running {
    pub(crate) child: testkit::ChildGuard,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Starts `cmd` with stdout piped and a thread collecting its lines.
    pub(crate) fn start(cmd: &mut Command) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = testkit::spawn(cmd.stdout(std::process::Stdio::piped()));
        let stdout = child.child_mut().stdout.take().expect("stdout is piped");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            })
        };
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Waits up to `timeout` for a line containing `needle`.
    pub(crate) fn wait_for_line(&self, timeout: Duration, needle: &str) {
        wait_until(timeout, &format!("a line with {needle:?}"), || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
        });
    }

    /// Sends SIGINT (Ctrl-C), waits for the exit, and returns whether it succeeded and the output.
    pub(crate) fn interrupt(mut self) -> (bool, String) {
        self.child.signal(libc::SIGINT);
        let status = self
            .child
            .wait_timeout(Duration::from_secs(10))
            .expect("the client did not exit on SIGINT");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the output reader panicked");
        }
        (status.success(), self.lines.lock().unwrap().join("\n"))
    }
}

/// Runs `cmd` to completion and returns its stdout, failing the test (with stdout and stderr) if it
/// did not exit 0.
pub(crate) fn run_ok(cmd: &mut Command) -> String {
    let output = cmd.output().expect("running the client");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

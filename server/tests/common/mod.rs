//! Shared helpers for the server's process-level tests: server processes on real ports, etcd key
//! checks, and a steady call load through the balanced channel that records where every call went.

#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use registry::{BalanceOptions, BalancedChannel, Discovery, EtcdConfig, RetryPolicy, ServedBy};
use testkit::{ChildGuard, Cluster, free_port, wait_until};
use tokio::time::Instant;

/// A `server` process and where its log goes.
pub struct ServerProcess {
    pub child: ChildGuard,
    pub port: u16,
    pub addr: String,
    pub log: PathBuf,
    endpoints: String,
    extra: Vec<String>,
}

impl ServerProcess {
    /// Starts a server on a free port registering in `cluster` (local processes or containers).
    pub fn start(cluster: &impl Cluster, logs: &Path, extra: &[&str]) -> Self {
        Self::start_on(&cluster.endpoints(), logs, extra)
    }

    /// Starts a server on a free port that talks to etcd through `endpoints` only.
    pub fn start_on(endpoints: &[String], logs: &Path, extra: &[&str]) -> Self {
        let endpoints = endpoints.join(",");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let port = free_port();
        let log = logs.join(format!("server-{port}.log"));
        let child = spawn_server(port, &endpoints, &extra, &log);
        Self {
            child,
            port,
            addr: format!("127.0.0.1:{port}"),
            log,
            endpoints,
            extra,
        }
    }

    /// Starts the same server again, same port and flags, after it exited or was killed.
    pub fn restart(&mut self) {
        self.child = spawn_server(self.port, &self.endpoints, &self.extra, &self.log);
    }

    /// The instance id the server registers under.
    pub fn id(&self) -> String {
        self.addr.replace(':', "-")
    }

    pub fn key(&self) -> String {
        format!("services/helloworld/{}", self.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn spawn_server(port: u16, endpoints: &str, extra: &[String], log: &Path) -> ChildGuard {
    // Appending keeps the log of every incarnation of the server.
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("opening the server log");
    testkit::spawn(
        Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--port", &port.to_string(), "--etcd-endpoints", endpoints])
            .args(extra)
            // SERVER_RUST_LOG, e.g. "info,registry::etcd=debug", shows every etcd attempt.
            .env(
                "RUST_LOG",
                std::env::var("SERVER_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(file.try_clone().expect("cloning the log handle"))
            .stderr(file),
    )
}

/// The lease (hex) `key` is attached to, or `None` when the key is missing.
pub fn lease_of(cluster: &impl Cluster, key: &str) -> Option<String> {
    let out = cluster.etcdctl_ok(&["get", key, "-w", "fields"]);
    let lease = out
        .lines()
        .find_map(|l| l.strip_prefix("\"Lease\" : "))?
        .trim()
        .parse::<i64>()
        .ok()?;
    Some(format!("{lease:x}"))
}

/// Every server's lease, as the answering members report it.
pub fn leases(cluster: &impl Cluster, servers: &[ServerProcess]) -> Vec<Option<String>> {
    servers
        .iter()
        .map(|s| lease_of(cluster, &s.key()))
        .collect()
}

/// Checks every 200 ms, until `period` after `since` (the fault, described by `fault`), that every
/// server is still on its lease in `before`, and at least once however late it is called; panics
/// at the first change with the changed servers' logs.
pub async fn assert_leases_kept(
    cluster: &impl Cluster,
    servers: &[ServerProcess],
    before: &[Option<String>],
    since: Instant,
    period: Duration,
    fault: &str,
) {
    loop {
        let now = leases(cluster, servers);
        if now != before {
            let logs: Vec<String> = servers
                .iter()
                .zip(before.iter().zip(&now))
                .filter(|(_, (was, is))| was != is)
                .map(|(s, (was, is))| {
                    format!(
                        "--- {} (lease {was:?} -> {is:?}):\n{}",
                        s.key(),
                        s.log_text()
                    )
                })
                .collect();
            panic!(
                "a server lost its lease {:?} after {fault}: leases {before:?} -> {now:?}\n{}",
                since.elapsed(),
                logs.join("\n")
            );
        }
        if since.elapsed() >= period {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn key_exists(cluster: &impl Cluster, key: &str) -> bool {
    !cluster
        .etcdctl_ok(&["get", key, "--keys-only"])
        .trim()
        .is_empty()
}

pub fn wait_registered(cluster: &impl Cluster, server: &ServerProcess) {
    wait_until(
        Duration::from_secs(15),
        &format!("{} to register", server.key()),
        || key_exists(cluster, &server.key()),
    );
}

/// What happened to one call: the address that served it, or `code: message`.
pub type Call = testkit::load::Call<String>;

/// A steady, open-loop call rate (testkit's load generator) through a balanced channel configured
/// like the `client` binary (SayHello idempotent, three attempts).
pub struct Load {
    pub channel: BalancedChannel,
    load: testkit::load::Load<String>,
    /// Before the first call: "since" for waits that take any call.
    started: Instant,
}

impl Load {
    pub async fn start(endpoints: Vec<String>, every: Duration) -> Self {
        Self::start_with(endpoints, every, BalanceOptions::default()).await
    }

    /// Like [`Load::start`], with the channel's other options (removal grace, say) from `base`.
    pub async fn start_with(endpoints: Vec<String>, every: Duration, base: BalanceOptions) -> Self {
        let etcd = EtcdConfig::new(endpoints)
            .expect("valid endpoints")
            .connect()
            .await
            .expect("etcd client");
        let options = BalanceOptions {
            call_timeout: Duration::from_secs(2),
            retry: RetryPolicy::default().idempotent("/helloworld.Greeter/SayHello"),
            ..base
        };
        let channel = BalancedChannel::new(
            Discovery::builder("helloworld")
                .start(&etcd)
                .expect("valid names"),
            options,
        );
        // Like the `client` binary (`--min-instances 1`), start calling only once discovery has
        // listed an instance. Ticking at once made the first call race the initial list: on a
        // loaded machine it lost, and failed fast with "no instances ... are registered", which
        // the fault tests then counted as a failure of the fault under test.
        channel
            .discovery()
            .wait_for_instances(1, Duration::from_secs(15))
            .await
            .expect("the load's discovery lists an instance within 15 s");
        let started = Instant::now();
        let load = testkit::load::Load::start(every, {
            let channel = channel.clone();
            move || {
                let mut client = GreeterClient::new(channel.clone());
                async move {
                    let request = HelloRequest {
                        name: "load".into(),
                    };
                    match client.say_hello(request).await {
                        Ok(response) => Ok(response
                            .extensions()
                            .get::<ServedBy>()
                            .map(|s| s.addr.to_string())
                            .unwrap_or_default()),
                        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
                    }
                }
            }
        });
        Self {
            channel,
            load,
            started,
        }
    }

    /// Waits until every address in `addrs` has served a call.
    pub async fn wait_serving(&self, addrs: &[&str], timeout: Duration) {
        self.wait_served_since(addrs, None, timeout).await;
    }

    /// Waits until each of `addrs` served a call sent after `since` (any call with `None`); returns
    /// how long after `since` the last of them was answered.
    pub async fn wait_served_since(
        &self,
        addrs: &[&str],
        since: Option<Instant>,
        timeout: Duration,
    ) -> Duration {
        let last = self
            .load
            .wait_served_since(addrs, since.unwrap_or(self.started), timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        since.map_or(Duration::ZERO, |since| {
            last.saturating_duration_since(since)
        })
    }

    /// Waits until `addr` is out of the channel's rotation, polling every millisecond; returns how
    /// long after `since` that was seen. Panics, naming `what`, if it is still in rotation `bound`
    /// after `since`.
    pub async fn wait_out_of_rotation(
        &self,
        addr: &str,
        since: Instant,
        bound: Duration,
        what: &str,
    ) -> Duration {
        while self.channel.ready_addrs().iter().any(|a| **a == *addr) {
            assert!(
                since.elapsed() < bound,
                "{what} ({addr}) still in rotation after {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        since.elapsed()
    }

    /// Waits until `n` calls sent after `since` have completed.
    pub async fn wait_calls_since(&self, since: Instant, n: usize, timeout: Duration) {
        self.load
            .wait_calls_since(since, n, timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.load.calls()
    }

    /// Stops sending, waits for the calls in flight (each ends within its 2 s deadline), and
    /// returns every call made.
    pub async fn finish(self) -> Vec<Call> {
        tokio::time::timeout(Duration::from_secs(5), self.load.finish())
            .await
            .expect("calls still in flight 5 s after the load stopped")
    }
}

/// Calls that failed, for assertion messages.
pub fn failures(calls: &[Call]) -> Vec<&Call> {
    calls.iter().filter(|c| c.outcome.is_err()).collect()
}

/// A port nobody listens on (for records that must not be dialable).
pub fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

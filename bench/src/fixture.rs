//! What a scenario runs against: a three-member etcd cluster (testkit) and server processes, each
//! the bench binary itself re-executed with the hidden `serve` subcommand, so nothing has to be
//! built first.
//!
//! Every process is a [`testkit::ChildGuard`]: killed when its guard drops, and killed by the
//! kernel (`PR_SET_PDEATHSIG`) if the bench dies without running destructors. That signal fires
//! when the *spawning thread* exits, so processes are spawned only from the main thread (the
//! scenario futures run there, under `block_on`), never from `spawn_blocking`.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use registry::{Discovery, Etcd, EtcdConfig, Membership};
use testkit::{ChildGuard, EtcdCluster, free_port};
use tokio::time::Instant;

use crate::clients::{NAMESPACE, SERVICE};

/// How long a server may take to register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);

/// An etcd cluster, a client to it, and an observer of the service's membership.
pub struct Fixture {
    // Fields drop in declaration order: servers and clients before the cluster they talk to.
    /// Server processes.
    pub servers: Vec<ServerProcess>,
    /// A discovery the bench uses to see who is registered (not one of the measured clients).
    pub observer: Discovery,
    /// A client for the bench's own etcd requests.
    pub etcd: Etcd,
    /// The cluster (killed with the fixture).
    pub cluster: EtcdCluster,
    /// Logs of the server processes.
    pub logs: tempfile::TempDir,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("endpoints", &self.cluster.endpoints())
            .field("servers", &self.servers)
            .finish()
    }
}

impl Fixture {
    /// Starts a cluster and `servers` server processes with the extra server flags `extra`, and
    /// waits until all are registered.
    ///
    /// # Errors
    /// When etcd cannot be reached or a server does not register in time.
    pub async fn start(servers: usize, extra: &[&str]) -> anyhow::Result<Fixture> {
        let cluster = EtcdCluster::start();
        let etcd = EtcdConfig::new(cluster.endpoints())
            .context("cluster endpoints")?
            .connect()
            .await
            .context("connecting to the bench cluster")?;
        let observer = Discovery::builder(SERVICE)
            .namespace(NAMESPACE)
            .start(&etcd)
            .context("observer")?;
        let logs = tempfile::Builder::new()
            .prefix("bench-logs-")
            .tempdir()
            .context("creating a log directory")?;
        let mut fixture = Fixture {
            cluster,
            etcd,
            observer,
            servers: Vec::new(),
            logs,
        };
        for _ in 0..servers {
            let server = fixture.spawn_server(extra)?;
            fixture.servers.push(server);
        }
        for i in 0..servers {
            let id = fixture.servers[i].id();
            fixture.wait_member(&id, true, REGISTER_TIMEOUT).await?;
        }
        Ok(fixture)
    }

    /// Starts one more server process (not waiting for its registration).
    ///
    /// # Errors
    /// When its log file cannot be created.
    pub fn spawn_server(&self, extra: &[&str]) -> anyhow::Result<ServerProcess> {
        ServerProcess::start(&self.cluster.endpoints().join(","), self.logs.path(), extra)
    }

    /// The servers' addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// Waits until instance `id` is (or is no longer) registered, as the observer sees it.
    ///
    /// # Errors
    /// After `timeout`, naming the instance and the server logs.
    pub async fn wait_member(
        &self,
        id: &str,
        present: bool,
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let mut rx = self.observer.subscribe();
        let wanted = |m: &Membership| m.instances.contains_key(id) == present;
        match tokio::time::timeout(timeout, rx.wait_for(wanted)).await {
            Ok(Ok(_)) => Ok(Instant::now()),
            _ => bail!(
                "instance {id} {} within {timeout:?}; server logs in {}",
                if present {
                    "did not register"
                } else {
                    "did not leave"
                },
                self.logs.path().display()
            ),
        }
    }

    /// Waits until the observer knows exactly `n` instances.
    ///
    /// # Errors
    /// After `timeout`.
    pub async fn wait_count(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let mut rx = self.observer.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|m| m.instances.len() == n)).await {
            Ok(Ok(_)) => Ok(()),
            _ => bail!(
                "{} instances registered, not {n}, after {timeout:?}",
                self.observer.membership().instances.len()
            ),
        }
    }
}

/// A server process: the bench binary running `serve`, on a fixed port so it can be restarted
/// under the same address.
pub struct ServerProcess {
    /// The process.
    pub child: ChildGuard,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `127.0.0.1:<port>`, what it registers and clients dial.
    pub addr: String,
    log: PathBuf,
    endpoints: String,
    extra: Vec<String>,
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("addr", &self.addr)
            .field("pid", &self.child.pid())
            .finish()
    }
}

impl ServerProcess {
    fn start(endpoints: &str, logs: &Path, extra: &[&str]) -> anyhow::Result<ServerProcess> {
        let port = free_port();
        let log = logs.join(format!("server-{port}.log"));
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let child = spawn_server(port, endpoints, &extra, &log)?;
        Ok(ServerProcess {
            child,
            port,
            addr: format!("127.0.0.1:{port}"),
            log,
            endpoints: endpoints.to_owned(),
            extra,
        })
    }

    /// Starts the server again on the same port, after it exited or was killed.
    ///
    /// # Errors
    /// When the log file cannot be opened or the bench binary cannot be found.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn_server(self.port, &self.endpoints, &self.extra, &self.log)?;
        Ok(())
    }

    /// The instance id it registers under.
    pub fn id(&self) -> String {
        server::default_instance_id(&self.addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// The bench binary itself, for re-executing it with a hidden subcommand.
///
/// # Errors
/// When the running executable cannot be found.
pub fn bench_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating the bench executable to start server processes")
}

fn spawn_server(
    port: u16,
    endpoints: &str,
    extra: &[String],
    log: &Path,
) -> anyhow::Result<ChildGuard> {
    // Appending keeps every incarnation's log.
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let stderr = file.try_clone().context("cloning the log handle")?;
    Ok(testkit::spawn(
        Command::new(bench_exe()?)
            .args(["serve", "--", "--port", &port.to_string()])
            .args(["--etcd-endpoints", endpoints])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(file)
            .stderr(stderr),
    ))
}

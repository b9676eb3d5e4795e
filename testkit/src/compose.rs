//! The repository's `docker-compose.yml` cluster, brought up for real, with the faults only
//! containers give: `docker kill`, a network partition, `docker pause`.
//!
//! Each [`ComposeCluster`] is a compose project of its own (a unique `-p` name) on free host ports
//! (`ETCD1_PORT`..`ETCD3_PORT`, never the demo's 23791-23793), so tests never touch a cluster the
//! reader runs. Dropping it, including during a panic, runs `down --volumes`: its containers,
//! networks and volumes are gone. Whatever a test process killed by a signal leaves behind carries
//! the project prefix from `COMPOSE_TEST_PREFIX`, which `scripts/container-faults.sh` sweeps.
//!
//! The image is `$ETCD_IMAGE` if set (the one `scripts/build-etcd-image.sh` builds, on machines with
//! no registry), else the compose file's pinned official image.
//!
//! Members are numbered from 0 (`etcd1` is member 0), as in [`EtcdCluster`](crate::EtcdCluster).

use std::env;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::etcd::{expect_success, http_get, http_health, locate, remove_etcd_env};
use crate::port::free_port;

/// Bringing the cluster up: containers created, then every member healthy. The local image starts
/// in about 2 s on this project's machines; the margin is for a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a member has to report healthy again after its fault is undone.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes project names unique within this process; the pid makes them unique across processes.
static PROJECT_SEQ: AtomicU64 = AtomicU64::new(0);

/// What a test did to a member, so helpers use only members that can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// `docker kill`: the container exists, stopped.
    Killed,
    /// `docker pause`: the processes are frozen (cgroup freezer); connections hang.
    Paused,
    /// Disconnected from the peers network: alive and answering clients, but without a leader.
    Partitioned,
}

/// A three-member etcd cluster from `docker-compose.yml`, removed on drop.
///
/// ```no_run
/// use testkit::{Cluster, ComposeCluster};
///
/// let mut cluster = ComposeCluster::start();
/// cluster.etcdctl_ok(&["put", "greeting", "hello"]);
/// cluster.partition(0); // etcd1 loses its peers but keeps answering clients
/// cluster.heal(0);
/// ```
pub struct ComposeCluster {
    compose: Vec<String>,
    file: PathBuf,
    project: String,
    image: String,
    etcdctl: PathBuf,
    ports: Vec<u16>,
    states: Vec<State>,
}

impl ComposeCluster {
    /// Brings up `docker-compose.yml` as a new project on free ports and waits until every member
    /// reports healthy.
    ///
    /// # Panics
    ///
    /// Panics, saying what to install or build, if there is no Docker engine, no compose, no
    /// `etcdctl` or no image; and if the cluster is not healthy within 60 s (the message quotes
    /// `compose logs`).
    pub fn start() -> ComposeCluster {
        let compose = find_compose();
        let file = repo_root().join("docker-compose.yml");
        let prefix = env::var("COMPOSE_TEST_PREFIX").unwrap_or_else(|_| "etcdgd-test".to_owned());
        let seq = PROJECT_SEQ.fetch_add(1, Ordering::Relaxed);
        let project = format!("{prefix}-{}-{seq}", std::process::id());
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut cluster = ComposeCluster {
            compose,
            file,
            project,
            image: String::new(),
            etcdctl: locate("ETCDCTL_BIN", "etcdctl"),
            ports,
            states: vec![State::Running; 3],
        };
        cluster.image = cluster.configured_image();
        let present = docker(&["image", "inspect", &cluster.image])
            .status
            .success();
        assert!(
            present,
            "testkit: the etcd image {} is not on this machine. With a registry: docker pull {0}. \
             Without one: scripts/build-etcd-image.sh, then set \
             ETCD_IMAGE=etcd-grpc-discovery/etcd:3.5.1-local",
            cluster.image
        );
        let started = Instant::now();
        // From here on, `drop` removes whatever `up` managed to create.
        let out = cluster.compose(&["up", "--detach"]);
        if !out.status.success() {
            panic!(
                "testkit: `{} up --detach` failed ({}):\n{}",
                cluster.compose_line(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        cluster.await_healthy(&[0, 1, 2], READY_TIMEOUT);
        eprintln!(
            "testkit: compose project {} ({}), image {}, client ports {:?}, healthy after {:.1?}",
            cluster.project,
            cluster.compose.join(" "),
            cluster.image,
            cluster.ports,
            started.elapsed()
        );
        cluster
    }

    /// The compose project name (`docker ps --filter label=com.docker.compose.project=<name>`).
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The image the members run.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.port(i))
    }

    /// Whether member `i` answers `GET /health` with `{"health":"true"}` within about 2 s.
    pub fn is_healthy(&self, i: usize) -> bool {
        http_health(self.port(i))
    }

    /// Member `i`'s answer to `GET /health` (status line, headers, body), or `None` if it gave
    /// none within about 2 s. A partitioned member answers `{"health":"false",...}`.
    pub fn health_reply(&self, i: usize) -> Option<String> {
        http_get(self.port(i), "/health")
    }

    /// The value of the metric `name` (the first sample, without labels) that member `i`
    /// reports on `/metrics`, or `None` if it has no such metric or did not answer.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let reply = http_get(self.port(i), "/metrics")?;
        reply.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
    }

    /// The container id of member `i`.
    ///
    /// # Panics
    ///
    /// Panics if compose knows no container for it.
    pub fn container(&self, i: usize) -> String {
        let service = service(i);
        let out = self.compose(&["ps", "--all", "-q", &service]);
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || id.is_empty() {
            // v1's `ps` has no --all and lists stopped containers anyway.
            let out = self.compose(&["ps", "-q", &service]);
            let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(
                out.status.success() && !id.is_empty(),
                "testkit: compose project {} has no container for {service}",
                self.project
            );
            return id;
        }
        id
    }

    /// `docker kill` member `i`: SIGKILL, the container stops, its connections close.
    pub fn kill(&mut self, i: usize) {
        self.expect_state(i, State::Running, "kill");
        docker_ok(&["kill", &self.container(i)]);
        self.states[i] = State::Killed;
    }

    /// Starts killed member `i` again (same container, same data volume) and waits until it
    /// reports healthy.
    pub fn restart(&mut self, i: usize) {
        self.expect_state(i, State::Killed, "restart");
        docker_ok(&["start", &self.container(i)]);
        self.states[i] = State::Running;
        self.await_healthy(&[i], RECOVER_TIMEOUT);
    }

    /// `docker pause` member `i`: every process in the container is frozen, its sockets stay open
    /// and nothing answers.
    pub fn pause(&mut self, i: usize) {
        self.expect_state(i, State::Running, "pause");
        docker_ok(&["pause", &self.container(i)]);
        self.states[i] = State::Paused;
    }

    /// `docker unpause` member `i`. Does not wait for it to catch up: poll
    /// [`is_healthy`](ComposeCluster::is_healthy).
    pub fn unpause(&mut self, i: usize) {
        self.expect_state(i, State::Paused, "unpause");
        docker_ok(&["unpause", &self.container(i)]);
        self.states[i] = State::Running;
    }

    /// Cuts member `i` off from its peers (`docker network disconnect <project>_peers`): it keeps
    /// running and answering clients on its published port, but has no leader.
    pub fn partition(&mut self, i: usize) {
        self.expect_state(i, State::Running, "partition");
        docker_ok(&[
            "network",
            "disconnect",
            &self.peers_network(),
            &self.container(i),
        ]);
        self.states[i] = State::Partitioned;
    }

    /// Reconnects partitioned member `i` to its peers under its peer name, and waits until it
    /// reports healthy.
    pub fn heal(&mut self, i: usize) {
        self.expect_state(i, State::Partitioned, "heal");
        let alias = format!("{}-peer", service(i));
        docker_ok(&[
            "network",
            "connect",
            "--alias",
            &alias,
            &self.peers_network(),
            &self.container(i),
        ]);
        self.states[i] = State::Running;
        self.await_healthy(&[i], RECOVER_TIMEOUT);
    }

    /// Runs `etcdctl` (API v3, the host's) against the running members with
    /// `--command-timeout=5s`.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let endpoints = self.answering_endpoints();
        assert!(
            !endpoints.is_empty(),
            "testkit: etcdctl {args:?}: every member is killed, paused or partitioned"
        );
        let mut cmd = Command::new(&self.etcdctl);
        remove_etcd_env(&mut cmd);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--command-timeout=5s")
            .args(args)
            .stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("testkit: cannot run {}: {e}", self.etcdctl.display()))
    }

    /// The index of the member that leads, as the running members see it.
    pub fn leader(&self) -> Option<usize> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        // One object per endpoint: {"Endpoint":"http://127.0.0.1:P","Status":{..."member_id":M,
        // ..."leader":L...}}. The leader's entry is the one whose member_id equals its leader.
        text.split("{\"Endpoint\":").skip(1).find_map(|entry| {
            let member = number_after(entry, "\"member_id\":")?;
            let leader = number_after(entry, "\"leader\":")?;
            if member != leader {
                return None;
            }
            let port: u16 = entry.split('"').nth(1)?.rsplit(':').next()?.parse().ok()?;
            self.ports.iter().position(|&p| p == port)
        })
    }

    fn answering_endpoints(&self) -> Vec<String> {
        (0..3)
            .filter(|&i| self.states[i] == State::Running)
            .map(|i| self.endpoint(i))
            .collect()
    }

    fn port(&self, i: usize) -> u16 {
        *self.ports.get(i).unwrap_or_else(|| {
            panic!("testkit: no compose member {i}: the cluster has 3 (indices start at 0)")
        })
    }

    fn expect_state(&self, i: usize, state: State, action: &str) {
        let now = self.states[i];
        assert!(
            now == state,
            "testkit: cannot {action} {}: it is {now:?}, not {state:?}",
            service(i)
        );
    }

    fn peers_network(&self) -> String {
        // Compose v1 and v2 both name a project's networks <project>_<network>.
        format!("{}_peers", self.project)
    }

    fn configured_image(&self) -> String {
        let out = self.compose(&["config"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "testkit: `{} config` failed:\n{}",
            self.compose_line(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        text.lines()
            .find_map(|l| l.trim().strip_prefix("image:").map(|i| i.trim().to_owned()))
            .unwrap_or_else(|| panic!("testkit: {} names no image", self.file.display()))
    }

    fn await_healthy(&self, members: &[usize], timeout: Duration) {
        let started = Instant::now();
        let mut pending = members.to_vec();
        while !pending.is_empty() {
            pending.retain(|&i| !self.is_healthy(i));
            if started.elapsed() >= timeout && !pending.is_empty() {
                let logs = self.compose(&["logs", "--tail", "20"]);
                let names: Vec<String> = pending.iter().map(|&i| service(i)).collect();
                panic!(
                    "testkit: compose project {} (image {}): {} not healthy after {:.1?}\n{}{}",
                    self.project,
                    self.image,
                    names.join(", "),
                    started.elapsed(),
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn compose_line(&self) -> String {
        format!(
            "{} -p {} -f {}",
            self.compose.join(" "),
            self.project,
            self.file.display()
        )
    }

    /// Runs compose on this project, with the ports (and the image, if set) in its environment.
    fn compose(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .args(["--project-name", &self.project, "--file"])
            .arg(&self.file)
            .args(args)
            .stdin(Stdio::null());
        for (i, port) in self.ports.iter().enumerate() {
            cmd.env(format!("ETCD{}_PORT", i + 1), port.to_string());
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("testkit: cannot run {}: {e}", self.compose[0]))
    }
}

impl crate::Cluster for ComposeCluster {
    fn endpoints(&self) -> Vec<String> {
        (0..3).map(|i| self.endpoint(i)).collect()
    }

    fn etcdctl_ok(&self, args: &[&str]) -> String {
        expect_success(&self.answering_endpoints(), args, self.etcdctl(args))
    }
}

impl fmt::Debug for ComposeCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComposeCluster")
            .field("project", &self.project)
            .field("image", &self.image)
            .field("ports", &self.ports)
            .field("states", &self.states)
            .finish()
    }
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        // A paused container cannot be stopped cleanly; thaw it first so `down` does not wait.
        // Nothing here may panic: this may run while a test is already panicking.
        if self.states.contains(&State::Paused) {
            let _ = self.compose(&["unpause"]);
        }
        let out = self.compose(&["down", "--volumes", "--remove-orphans", "--timeout", "2"]);
        if !out.status.success() {
            eprintln!(
                "testkit: `{} down --volumes` failed ({}); remove the project by hand:\n{}",
                self.compose_line(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
    }
}

/// `etcd1`, `etcd2`, `etcd3`.
fn service(i: usize) -> String {
    format!("etcd{}", i + 1)
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn repo_root() -> PathBuf {
    // testkit/ is a member of the workspace at the repository root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `docker compose` (v2) if the plugin is there, else `docker-compose` (v1).
fn find_compose() -> Vec<String> {
    let docker_info = docker(&["info", "--format", "{{.ServerVersion}}"]);
    assert!(
        docker_info.status.success(),
        "testkit: no Docker engine answers (`docker info` failed: {}). The container tests need \
         one: start it (systemctl start docker), or run without them.",
        String::from_utf8_lossy(&docker_info.stderr).trim_end()
    );
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&["docker", "compose"]) {
        vec!["docker".into(), "compose".into()]
    } else if works(&["docker-compose"]) {
        vec!["docker-compose".into()]
    } else {
        panic!(
            "testkit: neither `docker compose` nor `docker-compose` works. Install one \
             (Debian: apt-get install -y docker-compose)."
        )
    }
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("testkit: cannot run docker: {e}. Install a Docker engine and its CLI.")
        })
}

fn docker_ok(args: &[&str]) {
    let out = docker(args);
    assert!(
        out.status.success(),
        "testkit: `docker {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
}

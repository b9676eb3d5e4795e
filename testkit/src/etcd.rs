//! A real etcd cluster on loopback, with fault injection.
//!
//! Each member is a separate `etcd` process with its own client and peer port, all under one
//! temporary directory, started with the command line an operator would use for a static
//! three-node cluster (`--initial-cluster`, a unique `--initial-cluster-token`). `--logger zap`
//! keeps etcd 3.4's logs free of a deprecation warning on every line.
//!
//! Members are numbered from 0 (`n1` is member 0) in every method that takes an index.

use std::collections::BTreeMap;
use std::env;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::port::free_port;
use crate::process::ChildGuard;

/// How long a whole cluster, or one restarted member, may take to report healthy. A cold start
/// takes 0.3 s to 2.6 s on a 2-core machine (see `launch_all`); the margin covers a loaded CI
/// machine.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How often readiness is polled.
const READY_POLL: Duration = Duration::from_millis(50);

/// How many lines of each member's log a panic message quotes.
const LOG_TAIL_LINES: usize = 20;

/// The install hint printed when a binary is missing.
const INSTALL_HINT: &str = "Debian/Ubuntu: `sudo apt-get install -y etcd-server etcd-client`";

/// Makes cluster tokens unique within this process; the pid makes them unique across processes.
static CLUSTER_SEQ: AtomicU64 = AtomicU64::new(0);

/// A running etcd cluster whose members are killed, and whose data is deleted, on drop.
///
/// ```no_run
/// use std::time::Duration;
///
/// let mut cluster = testkit::EtcdCluster::start();
/// cluster.etcdctl_ok(&["put", "greeting", "hello"]);
///
/// // Point the code under test at `cluster.endpoints()`, then break things.
/// let leader = testkit::wait_for(Duration::from_secs(5), "a leader", || cluster.leader());
/// cluster.kill(leader);
/// // ... assert that the code under test survives the election ...
/// cluster.restart(leader);
/// ```
///
/// # Threads
///
/// Members are spawned with `PR_SET_PDEATHSIG`, which fires when the spawning *thread* exits
/// (see [`process`](crate::process)). Start and restart a cluster on the thread that owns it
/// for the whole test: the test body, including the body of a `#[tokio::test]`. Never from
/// `tokio::task::spawn_blocking` (its threads exit after 10 s idle, killing the members) or
/// a lazily initialised `static` shared by several tests.
pub struct EtcdCluster {
    etcd: PathBuf,
    etcdctl: PathBuf,
    /// Holds `n<i>/` (data) and `n<i>.log` for every member; removed after the members are
    /// killed, because field drops run after [`Drop::drop`].
    dir: TempDir,
    /// `--initial-cluster-token`; a fresh one per [`EtcdCluster::wipe`], so a member that still
    /// remembers the old cluster cannot join the new one.
    token: String,
    members: Vec<Member>,
    options: ClusterOptions,
}

/// TLS files for the members' client URLs (PEM paths); see [`crate::certs`] to generate them.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// CA that etcdctl trusts, and that must sign client certificates when `client_cert_auth` is
    /// on.
    pub ca: PathBuf,
    /// The members' certificate (valid for 127.0.0.1).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Require clients to present a certificate signed by `ca`.
    pub client_cert_auth: bool,
}

/// How [`EtcdCluster::builder`] starts a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    members: usize,
    tls: Option<ServerTls>,
    args: Vec<String>,
    etcdctl_user: Option<String>,
    etcdctl_cert: Option<(PathBuf, PathBuf)>,
}

impl ClusterOptions {
    /// The number of members (default 3).
    pub fn members(mut self, members: usize) -> Self {
        self.members = members;
        self
    }

    /// Serve clients over TLS (`https://` client URLs; peers stay plaintext on loopback).
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The certificate and key etcdctl presents when `client_cert_auth` is on.
    pub fn etcdctl_cert(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.etcdctl_cert = Some((cert, key));
        self
    }

    /// One more etcd flag for every member, e.g. `--auth-token-ttl=2`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts the cluster and waits until every member reports healthy.
    ///
    /// # Panics
    ///
    /// As [`EtcdCluster::start_with`].
    pub fn start(self) -> EtcdCluster {
        EtcdCluster::launch_new(self)
    }
}

/// One etcd process and the ports it owns for the cluster's whole life.
struct Member {
    /// `n1`, `n2`, ...: etcd's `--name`.
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics`, whatever the client URLs speak (TLS, auth).
    metrics_port: u16,
    /// `https` when the cluster serves clients over TLS.
    scheme: &'static str,
    /// `None` while the member is killed.
    process: Option<ChildGuard>,
    /// Stopped with `SIGSTOP`: the process exists but answers nothing.
    frozen: bool,
}

impl Member {
    fn client_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn is_live(&self) -> bool {
        self.process.is_some() && !self.frozen
    }
}

/// Whether a member should form a new cluster or rejoin from its data directory.
#[derive(Clone, Copy)]
enum ClusterState {
    New,
    Existing,
}

impl ClusterState {
    fn as_flag(self) -> &'static str {
        match self {
            ClusterState::New => "new",
            ClusterState::Existing => "existing",
        }
    }
}

impl EtcdCluster {
    /// Starts a three-member cluster and waits until every member reports healthy.
    ///
    /// # Panics
    ///
    /// Panics if `etcd` or `etcdctl` cannot be found, or if the cluster is not healthy within
    /// 20 s (the message quotes each member's log).
    pub fn start() -> EtcdCluster {
        EtcdCluster::start_with(3)
    }

    /// Starts a cluster of `members` members and waits until every member reports healthy.
    ///
    /// The binaries are `$ETCD_BIN` and `$ETCDCTL_BIN` if set, otherwise `etcd` and `etcdctl`
    /// from `PATH`.
    ///
    /// # Panics
    ///
    /// Panics if `members` is 0, if a binary cannot be found, or if the cluster is not healthy
    /// within 20 s.
    pub fn start_with(members: usize) -> EtcdCluster {
        EtcdCluster::builder().members(members).start()
    }

    /// Options for a cluster with TLS or extra flags: `EtcdCluster::builder().tls(..).start()`.
    pub fn builder() -> ClusterOptions {
        ClusterOptions {
            members: 3,
            tls: None,
            args: Vec::new(),
            etcdctl_user: None,
            etcdctl_cert: None,
        }
    }

    /// Makes every later etcdctl call authenticate as `user:password` (after `auth enable`), or
    /// not at all with `None`.
    pub fn set_etcdctl_user(&mut self, user: Option<&str>) {
        self.options.etcdctl_user = user.map(str::to_owned);
    }

    /// Turns auth on: creates `root` with `root_password` and the root role, enables auth, and
    /// makes later etcdctl calls authenticate as root.
    ///
    /// # Panics
    ///
    /// Panics, quoting etcdctl, if a step fails.
    pub fn enable_auth(&mut self, root_password: &str) {
        for args in [
            vec!["role", "add", "root"],
            vec![
                "user",
                "add",
                "root",
                &format!("--new-user-password={root_password}"),
            ],
            vec!["user", "grant-role", "root", "root"],
            vec!["auth", "enable"],
        ] {
            self.etcdctl_ok(&args);
        }
        self.set_etcdctl_user(Some(&format!("root:{root_password}")));
    }

    /// Creates `user` with `password` and a role `<user>-role` allowed to read and write keys under
    /// `prefix` only.
    ///
    /// # Panics
    ///
    /// Panics, quoting etcdctl, if a step fails.
    pub fn add_user(&self, user: &str, password: &str, prefix: &str) {
        let role = format!("{user}-role");
        for args in [
            vec!["role", "add", &role],
            vec![
                "role",
                "grant-permission",
                &role,
                "--prefix=true",
                "readwrite",
                prefix,
            ],
            vec![
                "user",
                "add",
                user,
                &format!("--new-user-password={password}"),
            ],
            vec!["user", "grant-role", user, &role],
        ] {
            self.etcdctl_ok(&args);
        }
    }

    fn launch_new(options: ClusterOptions) -> EtcdCluster {
        let members = options.members;
        assert!(
            members > 0,
            "testkit: an etcd cluster needs at least one member"
        );
        let dir = tempfile::Builder::new()
            .prefix("testkit-etcd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("testkit: cannot create a temporary directory: {e}"));
        let members = (1..=members)
            .map(|n| Member {
                name: format!("n{n}"),
                client_port: free_port(),
                peer_port: free_port(),
                metrics_port: free_port(),
                scheme: if options.tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                process: None,
                frozen: false,
            })
            .collect();
        let etcd = locate("ETCD_BIN", "etcd");
        // To stderr, which the test harness captures and prints only for a failing test: every
        // failure then says which etcd it ran against (CI runs the suites on 3.4 and on 3.5).
        eprintln!(
            "testkit: etcd {} ({}), {} members",
            etcd_version(&etcd),
            etcd.display(),
            options.members
        );
        let mut cluster = EtcdCluster {
            etcd,
            etcdctl: locate("ETCDCTL_BIN", "etcdctl"),
            dir,
            token: new_token(),
            members,
            options,
        };
        cluster.launch_all(ClusterState::New);
        cluster
    }

    /// The number of members, running or not.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Client URLs (`http://127.0.0.1:PORT`) of all members, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Client URL of member `i`.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index.
    pub fn endpoint(&self, i: usize) -> String {
        self.member(i).client_url()
    }

    /// Client URLs of the members that are running and not frozen.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.is_live())
            .map(Member::client_url)
            .collect()
    }

    /// Whether member `i` is running and not frozen.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index.
    pub fn is_live(&self, i: usize) -> bool {
        self.member(i).is_live()
    }

    /// Process id of member `i`, or `None` while it is killed.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.member(i).process.as_ref().map(ChildGuard::pid)
    }

    /// Path of member `i`'s log file (etcd's zap log, plus anything it wrote to stderr).
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.log_file(self.member(i))
    }

    /// Whether member `i` answers `GET /health` with `{"health":"true"}` within about 2 s.
    ///
    /// etcd 3.4 reports healthy only when the member knows a leader and can serve a quorum read, so
    /// this is the readiness signal used by [`start`](EtcdCluster::start) and
    /// [`restart`](EtcdCluster::restart). A frozen member accepts the TCP connection (the kernel
    /// does that) but never answers, so it reports unhealthy after the read timeout.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index.
    pub fn is_healthy(&self, i: usize) -> bool {
        http_health(self.member(i).metrics_port)
    }

    /// Runs `etcdctl` (API v3) against the live members with `--command-timeout=5s`.
    ///
    /// `ETCD*` variables of the test's environment are not passed on: etcdctl reads every
    /// `ETCDCTL_*` variable as a flag and would clash with `--endpoints`.
    ///
    /// # Panics
    ///
    /// Panics if no member is live or etcdctl cannot be started.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let endpoints = self.live_endpoints();
        assert!(
            !endpoints.is_empty(),
            "testkit: etcdctl {args:?}: no live etcd member (all are killed or frozen)"
        );
        self.run_etcdctl(&endpoints, "5s", args)
    }

    /// Runs `etcdctl` like [`etcdctl`](EtcdCluster::etcdctl) and returns its stdout.
    ///
    /// # Panics
    ///
    /// Panics, quoting stderr, if etcdctl exits unsuccessfully.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        expect_success(&self.live_endpoints(), args, self.etcdctl(args))
    }

    /// Runs `etcdctl` against member `i` alone (even if it is frozen), with
    /// `--command-timeout=5s`.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index or etcdctl cannot be started.
    pub fn etcdctl_on(&self, i: usize, args: &[&str]) -> Output {
        self.run_etcdctl(&[self.endpoint(i)], "5s", args)
    }

    /// Runs `etcdctl` against member `i` alone and returns its stdout.
    ///
    /// # Panics
    ///
    /// Panics, quoting stderr, if etcdctl exits unsuccessfully.
    pub fn etcdctl_on_ok(&self, i: usize, args: &[&str]) -> String {
        expect_success(&[self.endpoint(i)], args, self.etcdctl_on(i, args))
    }

    /// Kills member `i` with `SIGKILL` and waits for it to exit. Its data directory is kept, so
    /// [`restart`](EtcdCluster::restart) brings it back with its data.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index or the member is not running.
    pub fn kill(&mut self, i: usize) {
        let member = self.member_mut(i);
        let Some(mut process) = member.process.take() else {
            panic!(
                "testkit: cannot kill etcd member {}: it is not running",
                member.name
            );
        };
        process.kill();
        member.frozen = false;
    }

    /// Starts killed member `i` again from its data directory and waits until it reports
    /// healthy, which needs a quorum of the cluster to be running.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index, the member is running, or it is not healthy within
    /// 20 s.
    pub fn restart(&mut self, i: usize) {
        let member = self.member(i);
        assert!(
            member.process.is_none(),
            "testkit: cannot restart etcd member {}: it is still running",
            member.name
        );
        let process = self.launch(i, ClusterState::Existing);
        self.members[i].process = Some(process);
        self.await_healthy(&[i]);
    }

    /// Stops member `i` with `SIGSTOP`: the process keeps its sockets open but answers nothing,
    /// like a machine that hangs or is cut off by a partition.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index or the member is not running.
    pub fn freeze(&mut self, i: usize) {
        let member = self.member_mut(i);
        let Some(process) = member.process.as_mut() else {
            panic!(
                "testkit: cannot freeze etcd member {}: it is not running",
                member.name
            );
        };
        process.signal(libc::SIGSTOP);
        member.frozen = true;
    }

    /// Resumes frozen member `i` with `SIGCONT`. It does not wait for the member to catch up;
    /// poll [`is_healthy`](EtcdCluster::is_healthy) for that.
    ///
    /// # Panics
    ///
    /// Panics if `i` is not a member index or the member is not running.
    pub fn thaw(&mut self, i: usize) {
        let member = self.member_mut(i);
        let Some(process) = member.process.as_mut() else {
            panic!(
                "testkit: cannot thaw etcd member {}: it is not running",
                member.name
            );
        };
        process.signal(libc::SIGCONT);
        member.frozen = false;
    }

    /// The index of the member that is currently leader, or `None` if no live member claims
    /// leadership (e.g. during an election).
    ///
    /// Each live member is asked for its own status. Right after a thaw, a former leader may
    /// still believe it leads in an old term, so the claim with the highest raft term wins.
    pub fn leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, member) in self.members.iter().enumerate() {
            if !member.is_live() {
                continue;
            }
            // Short timeouts: a member that does not answer quickly is not a useful leader.
            let out = self.run_etcdctl(
                &[member.client_url()],
                "2s",
                &["endpoint", "status", "--dial-timeout=1s", "-w", "fields"],
            );
            if !out.status.success() {
                continue;
            }
            let fields = String::from_utf8_lossy(&out.stdout);
            let (Some(id), Some(leader), Some(term)) = (
                status_field(&fields, "MemberID"),
                status_field(&fields, "Leader"),
                status_field(&fields, "RaftTerm"),
            ) else {
                continue;
            };
            if id != 0 && id == leader && best.is_none_or(|(t, _)| term > t) {
                best = Some((term, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// Replaces the cluster by a brand-new, empty one on the same ports: kills every member,
    /// deletes their data, and starts them with a new cluster token; waits until all are
    /// healthy.
    ///
    /// Clients that keep their endpoint list see a cluster that lost all its data, with new
    /// member and cluster ids and revisions starting from 1 again.
    ///
    /// # Panics
    ///
    /// Panics if a data directory cannot be deleted or the new cluster is not healthy within
    /// 20 s.
    pub fn wipe(&mut self) {
        for member in &mut self.members {
            if let Some(mut process) = member.process.take() {
                process.kill();
            }
            member.frozen = false;
        }
        for i in 0..self.members.len() {
            let data = self.data_dir(&self.members[i]);
            if data.exists() {
                fs::remove_dir_all(&data).unwrap_or_else(|e| {
                    panic!(
                        "testkit: cannot delete etcd data dir {}: {e}",
                        data.display()
                    )
                });
            }
        }
        self.token = new_token();
        self.launch_all(ClusterState::New);
    }

    fn member(&self, i: usize) -> &Member {
        self.members.get(i).unwrap_or_else(|| {
            panic!(
                "testkit: no etcd member {i}: the cluster has {} (indices start at 0)",
                self.members.len()
            )
        })
    }

    fn member_mut(&mut self, i: usize) -> &mut Member {
        let len = self.members.len();
        self.members.get_mut(i).unwrap_or_else(|| {
            panic!("testkit: no etcd member {i}: the cluster has {len} (indices start at 0)")
        })
    }

    fn data_dir(&self, member: &Member) -> PathBuf {
        self.dir.path().join(&member.name)
    }

    fn log_file(&self, member: &Member) -> PathBuf {
        self.dir.path().join(format!("{}.log", member.name))
    }

    /// Starts every member and waits for all of them: members of a new cluster wait for each
    /// other, so none can become healthy alone.
    ///
    /// All members are spawned at once, because staging them does not help with etcd 3.4: a new
    /// member first asks each peer's `GET /members` whether it already belongs to a cluster,
    /// giving each peer 1 s. A peer that is not listening yet refuses at once, but one that is
    /// listening often leaves an HTTP/1 request on its peer port unanswered for 5 s (seen on
    /// this machine even on a healthy cluster), so each such probe costs the full second. Spawned
    /// together, most probes hit closed ports: the cluster is healthy after 0.3 s to 2.6 s,
    /// depending on how many probes lose that race.
    fn launch_all(&mut self, state: ClusterState) {
        for i in 0..self.members.len() {
            let process = self.launch(i, state);
            self.members[i].process = Some(process);
        }
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.await_healthy(&all);
    }

    fn launch(&self, i: usize, state: ClusterState) -> ChildGuard {
        let member = &self.members[i];
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let log = self.log_file(member);
        // etcd writes its zap log to the file itself, but a failure before the logger exists
        // (a bad flag, a Go panic) only reaches stderr; appending both to one file puts every
        // reason for a failed start in the log tail we quote.
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("testkit: cannot open {}: {e}", log.display()));
        let client_url = member.client_url();
        let peer_url = member.peer_url();
        let mut cmd = Command::new(&self.etcd);
        cmd.arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.data_dir(member))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state.as_flag()])
            .args(["--logger", "zap", "--log-outputs"])
            .arg(&log)
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                member.metrics_port
            ))
            .args(&self.options.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(tls) = &self.options.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
            // etcd 3.4 requires a client certificate from everyone as soon as it has a trusted
            // CA, whatever `--client-cert-auth` says: pass the CA only when that is the point.
            if tls.client_cert_auth {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&tls.ca);
            }
        }
        // etcd reads every `ETCD_*` variable as a flag; one left over in the test's environment
        // (ETCD_BIN among them) would change or clash with the command line above.
        remove_etcd_env(&mut cmd);
        ChildGuard::spawn(&mut cmd)
    }

    /// Waits until every member in `indices` reports healthy.
    ///
    /// Fails fast if a member exits (a port taken by someone else, a corrupt data dir) instead
    /// of waiting out the deadline.
    fn await_healthy(&mut self, indices: &[usize]) {
        let started = Instant::now();
        let mut pending = indices.to_vec();
        let failure = loop {
            if let Some(reason) = self.exited_member(&pending) {
                break reason;
            }
            pending.retain(|&i| !http_health(self.members[i].metrics_port));
            if pending.is_empty() {
                return;
            }
            let elapsed = started.elapsed();
            if elapsed >= READY_TIMEOUT {
                let names: Vec<&str> = pending
                    .iter()
                    .map(|&i| self.members[i].name.as_str())
                    .collect();
                break format!(
                    "timed out after {elapsed:.1?} waiting for etcd members {} to report healthy",
                    names.join(", ")
                );
            }
            thread::sleep(READY_POLL);
        };
        panic!(
            "testkit: {failure} (etcd {})\n{}",
            etcd_version(&self.etcd),
            self.log_tails()
        );
    }

    /// Describes the first member of `indices` that is not running, if any.
    fn exited_member(&mut self, indices: &[usize]) -> Option<String> {
        for &i in indices {
            let member = &mut self.members[i];
            let Some(process) = member.process.as_mut() else {
                return Some(format!("etcd member {} is not running", member.name));
            };
            if let Some(status) = process.wait_timeout(Duration::ZERO) {
                return Some(format!(
                    "etcd member {} exited during startup with {status}",
                    member.name
                ));
            }
        }
        None
    }

    /// The last lines of every member's log, for panic messages.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for member in &self.members {
            let path = self.log_file(member);
            out.push_str(&format!(
                "--- {} (client {}, peer {}), tail of {} ---\n",
                member.name,
                member.client_url(),
                member.peer_url(),
                path.display()
            ));
            match fs::read(&path) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    let lines: Vec<&str> = text.lines().collect();
                    if lines.is_empty() {
                        out.push_str("(empty)\n");
                    }
                    for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                Err(e) => out.push_str(&format!("(cannot read: {e})\n")),
            }
        }
        out
    }

    fn run_etcdctl(&self, endpoints: &[String], command_timeout: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.etcdctl);
        remove_etcd_env(&mut cmd);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg(format!("--command-timeout={command_timeout}"));
        if let Some(tls) = &self.options.tls {
            cmd.arg("--cacert").arg(&tls.ca);
        }
        if let Some((cert, key)) = &self.options.etcdctl_cert {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        if let Some(user) = &self.options.etcdctl_user {
            cmd.arg(format!("--user={user}"));
        }
        cmd.args(args).stdin(Stdio::null());
        // A plain `output()`, not a `ChildGuard`: the call blocks this thread until etcdctl
        // exits, which its own command timeout bounds, so there is no moment at which the test
        // could drop or lose the process.
        cmd.output()
            .unwrap_or_else(|e| panic!("testkit: cannot run {}: {e}", self.etcdctl.display()))
    }
}

impl crate::Cluster for EtcdCluster {
    fn endpoints(&self) -> Vec<String> {
        EtcdCluster::endpoints(self)
    }

    fn etcdctl_ok(&self, args: &[&str]) -> String {
        EtcdCluster::etcdctl_ok(self, args)
    }
}

impl fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                let state = match (&m.process, m.frozen) {
                    (None, _) => "killed".to_owned(),
                    (Some(p), true) => format!("frozen pid {}", p.pid()),
                    (Some(p), false) => format!("pid {}", p.pid()),
                };
                format!("{} {} ({state})", m.name, m.client_url())
            })
            .collect();
        f.debug_struct("EtcdCluster")
            .field("dir", &self.dir.path())
            .field("token", &self.token)
            .field("members", &members)
            .finish()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Each guard sends SIGKILL and reaps its member (SIGKILL also ends a frozen process).
        // This runs before the fields drop, so `dir` is deleted only after no member can still
        // be writing to it.
        for member in &mut self.members {
            member.process = None;
        }
    }
}

/// The version `etcd --version` reports (`3.5.1`), or `unknown` if it does not say. Asked once per
/// binary and process.
pub(crate) fn etcd_version(etcd: &Path) -> String {
    static VERSIONS: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());
    let mut versions = VERSIONS.lock().unwrap_or_else(PoisonError::into_inner);
    versions
        .entry(etcd.to_path_buf())
        .or_insert_with(|| {
            Command::new(etcd)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .ok()
                .and_then(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .find_map(|l| l.strip_prefix("etcd Version: ").map(str::to_owned))
                })
                .unwrap_or_else(|| "unknown".to_owned())
        })
        .clone()
}

/// Finds a binary: `$env_var` if set, otherwise `name` on `PATH`.
pub(crate) fn locate(env_var: &str, name: &str) -> PathBuf {
    if let Some(path) = env::var_os(env_var) {
        let path = PathBuf::from(path);
        assert!(
            is_executable(&path),
            "testkit: {env_var}={} is not an executable file; point it at the `{name}` binary \
             or unset it to use `{name}` from PATH",
            path.display()
        );
        return path;
    }
    env::var_os("PATH")
        .iter()
        .flat_map(env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| {
            panic!(
                "testkit: `{name}` not found on PATH. Install etcd ({INSTALL_HINT}) \
                 or set {env_var} to the path of the `{name}` binary."
            )
        })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn new_token() -> String {
    let seq = CLUSTER_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("testkit-{}-{seq}", std::process::id())
}

pub(crate) fn remove_etcd_env(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        if key.as_encoded_bytes().starts_with(b"ETCD") {
            cmd.env_remove(&key);
        }
    }
}

/// Whether the member with client port `port` answers `GET /health` with `{"health":"true"}`.
pub(crate) fn http_health(port: u16) -> bool {
    http_get(port, "/health").is_some_and(|response| response.contains(r#""health":"true""#))
}

/// `GET path` on 127.0.0.1:`port`; the whole response (status line, headers, body) if the
/// server answered with any HTTP status within about 2 s.
///
/// HTTP/1.0 makes the server close the connection after the response, so reading to the end is
/// the whole answer, without parsing `Content-Length` or chunked encoding.
pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    // etcd bounds its own health read at 1 s; 2 s lets a slow "false" arrive rather than time out.
    let timeout = Some(Duration::from_secs(2));
    stream.set_read_timeout(timeout).ok()?;
    stream.set_write_timeout(timeout).ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    response.starts_with("HTTP/1.").then_some(response)
}

/// Reads a numeric field from `etcdctl endpoint status -w fields` output, whose lines look like
/// `"Leader" : 13510015062231200447`.
fn status_field(fields: &str, name: &str) -> Option<u64> {
    let key = format!("\"{name}\" :");
    fields
        .lines()
        .find_map(|line| line.strip_prefix(&key))
        .and_then(|value| value.trim().parse().ok())
}

pub(crate) fn expect_success(endpoints: &[String], args: &[&str], out: Output) -> String {
    if !out.status.success() {
        panic!(
            "testkit: `etcdctl --endpoints={} {}` failed ({}):\n{}",
            endpoints.join(","),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_fields() {
        let fields = "\"ClusterID\" : 10209395086029371855\n\
                      \"MemberID\" : 13510015062231200447\n\
                      \"Leader\" : 13510015062231200447\n\
                      \"RaftTerm\" : 2\n\
                      \"Version\" : \"3.4.23\"\n";
        assert_eq!(status_field(fields, "MemberID"), Some(13510015062231200447));
        assert_eq!(status_field(fields, "Leader"), Some(13510015062231200447));
        assert_eq!(status_field(fields, "RaftTerm"), Some(2));
        assert_eq!(status_field(fields, "Version"), None);
        assert_eq!(status_field(fields, "Missing"), None);
    }

    #[test]
    fn health_of_a_closed_port_is_false() {
        assert!(!http_health(free_port()));
    }
}

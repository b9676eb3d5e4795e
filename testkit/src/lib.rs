//! Test harness for the integration tests of this workspace: a real etcd cluster on loopback,
//! child processes that cannot outlive a test, free ports, and bounded waits.
//!
//! Registration and discovery are only tested for real against a real etcd, including its
//! failures: a killed leader, a hung member, a cluster that lost its data. This crate makes that
//! cheap enough to do in every test. It is synchronous and uses only `std` (plus `libc` for
//! signals and `tempfile` for data directories), so it works the same from a plain `#[test]` and
//! from inside `#[tokio::test]`.
//!
//! Everything here panics on failure with a message naming the member, port or command and what
//! to do about it: in a test, a panic *is* the error report.
//!
//! # Layout
//!
//! - [`etcd`]: [`EtcdCluster`], an etcd cluster (three members by default) in a temporary
//!   directory, with `etcdctl` helpers and fault injection (`kill`, `restart`, `freeze`, `thaw`,
//!   `wipe`, `leader`).
//! - [`compose`]: [`ComposeCluster`], the repository's `docker-compose.yml` cluster as a compose
//!   project of its own, with container faults (`kill`, `partition`, `pause`).
//! - [`cluster`]: [`Cluster`], what helpers need from either kind of cluster.
//! - [`certs`]: [`Certs`], a CA with server and client certificates generated at test time.
//! - [`process`]: [`ChildGuard`] and [`spawn`], for any process a test starts; killed and reaped
//!   on drop, and killed by the kernel if the test process dies first.
//! - [`port`]: [`free_port`], a loopback port never handed out twice in one process.
//! - [`http`]: a bare HTTP GET, to scrape metrics endpoints.
//! - [`sockets`]: the machine's established TCP connections (`/proc/net/tcp`), to count what a
//!   client really holds.
//! - [`wait`]: [`wait_until`] and [`wait_for`], polling with a deadline instead of sleeping
//!   (and `eventually`, their async form, with feature `grpc`).
//!
//! With feature `grpc`, for tests and benchmarks of gRPC clients:
//!
//! - `greeter`: `TestServer`, an in-process Greeter on a real loopback socket that says which
//!   instance served a call, and can be slowed, failed, marked NOT_SERVING or crashed.
//! - `load`: `Load`, an open-loop call rate through any client, recording every call.
//!
//! # Requirements
//!
//! `etcd` and `etcdctl` (3.4 or later) on `PATH`, or named by `ETCD_BIN` and `ETCDCTL_BIN`.
//! On Debian/Ubuntu: `sudo apt-get install -y etcd-server etcd-client`; etcd 3.5:
//! `eval "$(scripts/etcd-3.5.sh)"`. Every cluster reports the etcd version it runs on stderr,
//! which a failing test shows. Linux only (`PR_SET_PDEATHSIG`). [`ComposeCluster`] also needs a
//! Docker engine, compose (v2 or v1) and an etcd image.
//!
//! # Example
//!
//! ```no_run
//! use std::process::Command;
//! use std::time::Duration;
//!
//! let mut cluster = testkit::EtcdCluster::start();
//! let port = testkit::free_port();
//! let _server = testkit::spawn(
//!     Command::new("my-server")
//!         .arg("--listen")
//!         .arg(format!("127.0.0.1:{port}"))
//!         .arg("--etcd")
//!         .arg(cluster.endpoints().join(",")),
//! );
//!
//! // Wait for the server to register itself, then take its etcd member's leader away.
//! testkit::wait_until(Duration::from_secs(10), "my-server to register", || {
//!     !cluster.etcdctl_ok(&["get", "--prefix", "services/"]).is_empty()
//! });
//! if let Some(leader) = cluster.leader() {
//!     cluster.kill(leader);
//! }
//! // `_server` and `cluster` are killed when they go out of scope, even if an assertion fails.
//! ```

pub mod certs;
pub mod cluster;
pub mod compose;
pub mod etcd;
#[cfg(feature = "grpc")]
pub mod greeter;
pub mod http;
#[cfg(feature = "grpc")]
pub mod load;
pub mod port;
pub mod process;
pub mod sockets;
pub mod wait;

pub use certs::Certs;
pub use cluster::Cluster;
pub use compose::ComposeCluster;
pub use etcd::EtcdCluster;
pub use port::free_port;
pub use process::{ChildGuard, spawn};
pub use wait::{wait_for, wait_until};
#[cfg(feature = "grpc")]
pub use {greeter::TestServer, wait::eventually};

//! Helpers shared by the integration tests of the `client` binary: in-process servers (the `server`
//! library on real sockets) registered in a real etcd cluster, and the `client` command line.

use std::{process::Command, time::Duration};

use clap::Parser;
use testkit::{EtcdCluster, free_port, wait_until};
use tokio_util::sync::CancellationToken;

/// An in-process server instance; stopped gracefully (deregistered) on `stop`.
pub(crate) struct Server {
    /// `127.0.0.1:PORT`, as registered; the instance id is the same with `-` for `:`.
    pub(crate) addr: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Starts a server on a free port and waits until its key is in etcd.
    pub(crate) fn start(cluster: &EtcdCluster) -> Self {
        let port = free_port();
        let config = server::Config::try_parse_from([
            "server",
            "--port",
            &port.to_string(),
            "--etcd-endpoints",
            &cluster.endpoints().join(","),
            "--deregister-grace",
            "0s",
        ])
        .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(config, shutdown.clone()));
        let addr = format!("127.0.0.1:{port}");
        let key = format!("services/helloworld/127.0.0.1-{port}");
        wait_until(
            Duration::from_secs(15),
            &format!("{key} to register"),
            || {
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

//! The `server` binary as a real process against a real etcd cluster: registration, graceful
//! shutdown, crashes, and what the balanced client does about them.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use proto::helloworld::{HelloRequest, greeter_client::GreeterClient};
use registry::{BalanceOptions, BalancedChannel, Discovery, EtcdConfig, ServedBy};
use testkit::{ChildGuard, EtcdCluster, free_port, wait_until};

/// A server process and where its log goes.
struct ServerProcess {
    child: ChildGuard,
    addr: String,
    log: PathBuf,
}

impl ServerProcess {
    fn start(cluster: &EtcdCluster, logs: &Path, extra: &[&str]) -> Self {
        let port = free_port();
        let log = logs.join(format!("server-{port}.log"));
        let file = File::create(&log).expect("creating the server log");
        let child = testkit::spawn(
            Command::new(env!("CARGO_BIN_EXE_server"))
                .args(["--port", &port.to_string(), "--etcd-endpoints"])
                .arg(cluster.endpoints().join(","))
                .args(extra)
                .stdout(file.try_clone().expect("cloning the log handle"))
                .stderr(file),
        );
        Self {
            child,
            addr: format!("127.0.0.1:{port}"),
            log,
        }
    }

    fn key(&self) -> String {
        format!("services/helloworld/{}", self.addr.replace(':', "-"))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn key_exists(cluster: &EtcdCluster, key: &str) -> bool {
    !cluster
        .etcdctl_ok(&["get", key, "--keys-only"])
        .trim()
        .is_empty()
}

fn wait_registered(cluster: &EtcdCluster, server: &ServerProcess) {
    wait_until(
        Duration::from_secs(15),
        &format!("{} to register", server.key()),
        || key_exists(cluster, &server.key()),
    );
}

#[test]
fn a_killed_server_disappears_when_its_lease_expires() {
    let cluster = EtcdCluster::start();
    let logs = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&cluster, logs.path(), &["--ttl", "3s"]);
    wait_registered(&cluster, &server);

    server.child.kill();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the key to expire (TTL 3 s + 2 s)",
        || !key_exists(&cluster, &server.key()),
    );
    let gone = killed.elapsed();
    eprintln!("key of the SIGKILLed server (TTL 3 s) gone after {gone:?}");
    // Nobody revoked it: only the lease's expiry can have removed it.
    assert!(
        gone > Duration::from_secs(1),
        "gone after {gone:?}, too early for an expiry"
    );
}

#[test]
fn sigterm_deregisters_at_once_then_exits_zero() {
    let cluster = EtcdCluster::start();
    let logs = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&cluster, logs.path(), &[]);
    wait_registered(&cluster, &server);

    server.child.signal(libc::SIGTERM);
    let signalled = Instant::now();
    wait_until(Duration::from_secs(1), "the key to be deleted", || {
        !key_exists(&cluster, &server.key())
    });
    eprintln!("key deleted {:?} after SIGTERM", signalled.elapsed());
    let status = server
        .child
        .wait_timeout(Duration::from_secs(15))
        .expect("the server did not exit within 15 s of SIGTERM");
    let log = server.log_text();
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    for step in [
        "1/4 reporting NOT_SERVING",
        "2/4 revoking the lease",
        "4/4 draining",
        "stopped",
    ] {
        assert!(log.contains(step), "missing {step:?} in log:\n{log}");
    }
}

#[test]
fn bad_flags_exit_with_code_2_and_name_the_problem() {
    for (args, expected) in [
        (&["--port", "70000"][..], "--port"),
        (&["--port", "50051", "--etcd-endpoints", "nope"], "nope"),
        (&["--port", "50051", "--ttl", "1s"], "--ttl"),
        (&["--port", "50051", "--ttl", "soon"], "500ms"),
        (
            &["--port", "50051", "--host", "0.0.0.0"],
            "--advertise-addr",
        ),
        (&["--port", "50051", "--instance-id", "a/b"], "instance id"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_server"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn without_etcd_the_server_gives_up_after_etcd_timeout() {
    let logs = tempfile::tempdir().unwrap();
    let port = free_port();
    let dead_etcd = format!("127.0.0.1:{}", free_port());
    let log = logs.path().join("server.log");
    let started = Instant::now();
    let mut child = testkit::spawn(
        Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--port", &port.to_string(), "--etcd-endpoints", &dead_etcd])
            .args(["--etcd-timeout", "2s"])
            .stderr(File::create(&log).unwrap()),
    );
    let status = child
        .wait_timeout(Duration::from_secs(10))
        .expect("the server kept waiting for etcd past --etcd-timeout");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("could not register") && text.contains(&dead_etcd),
        "{text}"
    );
    eprintln!("gave up after {:?}", started.elapsed());
}

/// When each call completed and which address served it (or how it failed).
type CallLog = Vec<(Instant, Result<String, tonic::Code>)>;

/// Calls in a loop from a background task, recording where each call went.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    calls: Arc<Mutex<CallLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(channel: BalancedChannel, every: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (stop.clone(), calls.clone());
        let task = tokio::spawn(async move {
            let mut client = GreeterClient::new(channel);
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let result = client
                    .say_hello(HelloRequest {
                        name: "load".into(),
                    })
                    .await;
                let outcome = match result {
                    Ok(r) => Ok(r
                        .extensions()
                        .get::<ServedBy>()
                        .map(|s| s.addr.to_string())
                        .unwrap_or_default()),
                    Err(status) => Err(status.code()),
                };
                c.lock().unwrap().push((Instant::now(), outcome));
                tokio::time::sleep(every).await;
            }
        });
        Self { stop, calls, task }
    }

    fn served_by(&self, addr: &str) -> bool {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .any(|(_, r)| r.as_ref().is_ok_and(|a| a == addr))
    }

    async fn finish(self) -> CallLog {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.calls).unwrap().into_inner().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_stops_calling_a_killed_server_within_a_second() {
    let cluster = EtcdCluster::start();
    let logs = tempfile::tempdir().unwrap();
    let mut servers: Vec<_> = (0..3)
        .map(|_| ServerProcess::start(&cluster, logs.path(), &[]))
        .collect();
    for server in &servers {
        wait_registered(&cluster, server);
    }
    let etcd = EtcdConfig::new(cluster.endpoints())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let channel = BalancedChannel::new(
        Discovery::start(&etcd, "services", "helloworld").unwrap(),
        BalanceOptions::default(),
    );
    channel
        .wait_ready(3, Duration::from_secs(10))
        .await
        .unwrap();

    let load = Load::start(channel.clone(), Duration::from_millis(2));
    let victim = servers.remove(1);
    let victim_addr = victim.addr.clone();
    // Kill only once the victim is taking calls, so its connection is busy when it dies.
    let warm = Instant::now();
    while !load.served_by(&victim_addr) {
        assert!(
            warm.elapsed() < Duration::from_secs(5),
            "{victim_addr} never served a call"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut victim = victim;
    victim.child.kill();
    let killed = Instant::now();
    while channel.ready_addrs().iter().any(|a| **a == *victim_addr) {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "still in rotation after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!(
        "killed instance out of rotation after {:?}",
        killed.elapsed()
    );
    // Keep the load running a while longer to see that nothing goes to the dead instance.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = load.finish().await;

    let after: Vec<_> = calls.iter().filter(|(t, _)| *t >= killed).collect();
    let to_victim: Vec<_> = after
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|a| *a == victim_addr))
        .collect();
    let failed = after.iter().filter(|(_, r)| r.is_err()).count();
    let last_to_victim = to_victim.last().map(|(t, _)| t.duration_since(killed));
    eprintln!(
        "after SIGKILL: {} calls, {} failed, {} answered by the victim (last after {:?})",
        after.len(),
        failed,
        to_victim.len(),
        last_to_victim
    );
    assert!(after.len() > 100, "too few calls to judge: {}", after.len());
    // The key is still in etcd (10 s lease): only the dead connection can have stopped the calls.
    assert!(
        key_exists(&cluster, &victim.key()),
        "the lease should still hold the key"
    );
    assert!(!channel.ready_addrs().iter().any(|a| **a == *victim_addr));
    // Every call after the first second went to the survivors.
    let late_to_victim_or_failed = after
        .iter()
        .filter(|(t, r)| {
            t.duration_since(killed) > Duration::from_secs(1)
                && r.as_ref().map_or(true, |a| *a == victim_addr)
        })
        .count();
    assert_eq!(late_to_victim_or_failed, 0);
    // At most the calls in flight at the moment of the kill can fail.
    assert!(failed <= 2, "{failed} calls failed");
}

/// Service names listed by reflection v1 and v1alpha.
async fn reflected_services(channel: tonic::transport::Channel) -> (Vec<String>, Vec<String>) {
    use tonic_reflection::pb::{v1, v1alpha};
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut v1_client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut replies = v1_client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let v1_names = match replies
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected v1 reflection reply {other:?}"),
    };
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut alpha_client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut replies = alpha_client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let alpha_names = match replies
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected v1alpha reflection reply {other:?}"),
    };
    (v1_names, alpha_names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served_and_health_reports_the_drain() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let cluster = EtcdCluster::start();
    let logs = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&cluster, logs.path(), &["--deregister-grace", "3s"]);
    wait_registered(&cluster, &server);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = |service: &str| {
        let mut health = health.clone();
        let request = HealthCheckRequest {
            service: service.into(),
        };
        async move { health.check(request).await.unwrap().into_inner().status() }
    };
    assert_eq!(status("helloworld.Greeter").await, ServingStatus::Serving);
    assert_eq!(status("").await, ServingStatus::Serving);

    let (v1, v1alpha) = reflected_services(channel).await;
    for names in [&v1, &v1alpha] {
        assert!(names.iter().any(|n| n == "helloworld.Greeter"), "{names:?}");
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
    }

    // During the grace period the server still answers, and says it is going away.
    server.child.signal(libc::SIGTERM);
    let signalled = Instant::now();
    loop {
        let reply = health
            .check(HealthCheckRequest {
                service: "helloworld.Greeter".into(),
            })
            .await
            .unwrap();
        if reply.into_inner().status() == ServingStatus::NotServing {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "still SERVING 2 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = server
        .child
        .wait_timeout(Duration::from_secs(15))
        .expect("no exit after SIGTERM");
    assert!(status.success(), "{}", server.log_text());
}

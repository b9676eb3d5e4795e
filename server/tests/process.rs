//! The `server` binary as a real process against a real etcd cluster: registration, graceful
//! shutdown, health and reflection, bad flags, a missing etcd. (What clients see when servers
//! crash, freeze or restart is in `faults.rs`.)

mod common;

use std::{
    fs::File,
    process::Command,
    time::{Duration, Instant},
};

use common::{ServerProcess, key_exists, wait_registered};
use testkit::{EtcdCluster, free_port, wait_until};

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
    // Well under the 10 s TTL: the revoke, not expiry, deleted it (the figure is printed below).
    wait_until(Duration::from_secs(3), "the key to be deleted", || {
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
    // Environment values are checked like flags.
    for (var, value) in [
        ("ETCD_ENDPOINTS", "127.0.0.1:2379,garbage"),
        ("REGISTRY_TTL", "soon"),
        ("SERVER_PORT", "-1"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_server"))
            .env(var, value)
            .args(if var == "SERVER_PORT" {
                &[][..]
            } else {
                &["--port", "50051"][..]
            })
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(value.rsplit(',').next().unwrap_or(value)),
            "{var}={value}: {stderr}"
        );
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
    let mut server = ServerProcess::start(
        &cluster,
        logs.path(),
        &[
            "--deregister-grace",
            "3s",
            "--weight",
            "3",
            "--service-version",
            "v2",
            "--zone",
            "a",
            "--meta",
            "team=blue",
        ],
    );
    wait_registered(&cluster, &server);
    // The metadata flags end up in the record clients select on.
    let value = cluster.etcdctl_ok(&["get", &server.key(), "--print-value-only"]);
    let expected = format!(
        r#"{{"Op":0,"Addr":"{}","Metadata":"{{\"instance_id\":\"{}\",\"team\":\"blue\",\"version\":\"v2\",\"weight\":3,\"zone\":\"a\"}}"}}"#,
        server.addr,
        server.id()
    );
    assert_eq!(value.trim(), expected);
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

#[test]
fn metrics_show_the_registration_and_its_keep_alives() {
    let cluster = EtcdCluster::start();
    let logs = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = ServerProcess::start(
        &cluster,
        logs.path(),
        &["--ttl", "3s", "--metrics-addr", &metrics],
    );
    wait_registered(&cluster, &server);
    let registered = format!("registry_registered{{key=\"{}\"}}", server.key());
    let rtt_count = format!(
        "registry_lease_keepalive_rtt_seconds_count{{key=\"{}\"}}",
        server.key()
    );
    // Keep-alives go out every TTL/3 = 1 s: the round-trip count must keep growing.
    let first = testkit::wait_for(Duration::from_secs(5), "a keep-alive round trip", || {
        let text = testkit::http::get(&metrics, "/metrics");
        assert_eq!(
            testkit::http::sample(&text, &registered),
            Some(1.0),
            "{text}"
        );
        testkit::http::sample(&text, &rtt_count).filter(|&n| n >= 1.0)
    });
    testkit::wait_until(Duration::from_secs(5), "more keep-alives", || {
        let text = testkit::http::get(&metrics, "/metrics");
        testkit::http::sample(&text, &rtt_count).is_some_and(|n| n > first)
    });
    let text = testkit::http::get(&metrics, "/metrics");
    assert!(text.contains("# HELP registry_registered"), "{text}");
}

/// Reads `stderr` line by line until one contains `needle`; panics at its end.
fn read_until(stderr: &mut impl std::io::BufRead, needle: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        let read = stderr
            .read_line(&mut line)
            .expect("reading the server's stderr");
        assert!(read > 0, "stderr ended before a line with {needle:?}");
        if line.contains(needle) {
            return;
        }
    }
}

/// A `server` process on a free port whose stderr is a pipe the test reads (and may close), and the
/// key it registers under.
fn server_with_piped_stderr(
    cluster: &EtcdCluster,
) -> (
    testkit::ChildGuard,
    std::io::BufReader<std::process::ChildStderr>,
    String,
) {
    let port = free_port();
    let mut child = testkit::spawn(
        Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--port", &port.to_string()])
            .args(["--etcd-endpoints", &cluster.endpoints().join(",")])
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped()),
    );
    let stderr = child.child_mut().stderr.take().expect("stderr is piped");
    (
        child,
        std::io::BufReader::new(stderr),
        format!("services/helloworld/127.0.0.1-{port}"),
    )
}

/// SIGTERM with stderr closed: the server must exit 0 and revoke its key on the way out, not leave
/// it to expire.
fn assert_stops_and_deregisters(mut child: testkit::ChildGuard, cluster: &EtcdCluster, key: &str) {
    child.signal(libc::SIGTERM);
    let status = child
        .wait_timeout(Duration::from_secs(15))
        .expect("with its stderr closed, the server did not exit on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(!key_exists(cluster, key), "{key} outlived the server");
}

#[test]
fn a_closed_stderr_does_not_stop_sigterm_from_deregistering() {
    let cluster = EtcdCluster::start();
    let (child, mut stderr, key) = server_with_piped_stderr(&cluster);
    read_until(&mut stderr, "registered");
    // Like `2> >(head -2)` once head has exited: every later log line fails with EPIPE.
    drop(stderr);
    assert!(key_exists(&cluster, &key));
    assert_stops_and_deregisters(child, &cluster, &key);
}

#[test]
fn a_closed_stderr_before_registration_does_not_kill_the_server() {
    let cluster = EtcdCluster::start();
    let (mut child, mut stderr, key) = server_with_piped_stderr(&cluster);
    // Like `2> >(head -1)`: the reader leaves after the first line, before "registered".
    read_until(&mut stderr, "serving");
    drop(stderr);
    wait_until(Duration::from_secs(15), "the key to be registered", || {
        key_exists(&cluster, &key)
    });
    assert!(
        child.is_running(),
        "the server died after its stderr closed"
    );
    assert_stops_and_deregisters(child, &cluster, &key);
}

#[test]
fn an_auth_cluster_without_a_username_stops_the_server_at_once() {
    let mut cluster = EtcdCluster::start();
    cluster.enable_auth("root-Pa55-server");
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("server.log");
    let started = Instant::now();
    let mut child = testkit::spawn(
        Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--port", &free_port().to_string()])
            .args(["--etcd-endpoints", &cluster.endpoints().join(",")])
            .args(["--etcd-timeout", "10s"])
            .stderr(File::create(&log).unwrap()),
    );
    let status = child
        .wait_timeout(Duration::from_secs(8))
        .expect("the server kept waiting for an etcd that requires a username");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("authentication enabled") && text.contains("--etcd-username"),
        "{text}"
    );
    eprintln!("stopped after {:?}", started.elapsed());
}

#[test]
fn a_stderr_nobody_reads_does_not_stall_the_server() {
    let cluster = EtcdCluster::start();
    let port = free_port();
    let key = format!("services/helloworld/127.0.0.1-{port}");
    let mut child = testkit::spawn(
        Command::new(env!("CARGO_BIN_EXE_server"))
            .args(["--port", &port.to_string()])
            .args(["--etcd-endpoints", &cluster.endpoints().join(",")])
            // Enough log lines to fill the pipe's buffer many times over.
            .env("RUST_LOG", "trace")
            .stderr(std::process::Stdio::piped()),
    );
    // Held open and never read, like a paused `| less`: writes to a full pipe block.
    let _stderr = child.child_mut().stderr.take().expect("stderr is piped");
    wait_until(Duration::from_secs(15), "the key to be registered", || {
        key_exists(&cluster, &key)
    });
    child.signal(libc::SIGTERM);
    let status = child
        .wait_timeout(Duration::from_secs(15))
        .expect("with a full stderr pipe, the server did not exit on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(!key_exists(&cluster, &key), "{key} outlived the server");
}

//! The `client` binary against in-process servers (the `server` library, on real sockets) and a real
//! etcd cluster: what it prints and how it exits.

mod common;

use std::{process::Command, time::Duration};

use common::{Running, Server, client, run_ok};
use testkit::{EtcdCluster, free_port, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_spreads_calls_evenly_and_prints_who_served_each() {
    let cluster = EtcdCluster::start();
    let servers: Vec<_> = (0..3).map(|_| Server::start(&cluster)).collect();

    let stdout = run_ok(client(&cluster).args(["--requests", "9", "--interval", "10ms"]));

    let calls: Vec<_> = stdout.lines().filter(|l| l.starts_with("call ")).collect();
    assert_eq!(calls.len(), 9, "{stdout}");
    for server in &servers {
        let id = server.addr.replace(':', "-");
        // The address the call was sent to and the id in the reply agree, three times each.
        let served = calls
            .iter()
            .filter(|l| l.contains(&format!(" {} ", server.addr)) && l.contains(&id))
            .count();
        assert_eq!(served, 3, "{id}: {stdout}");
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&id) && l.trim_end().ends_with(" 3")),
            "no table row for {id}: {stdout}"
        );
    }
    assert!(stdout.contains("total 9 calls, 0 failed"), "{stdout}");
    for server in servers {
        server.stop().await;
    }
}

#[test]
fn with_nothing_registered_the_client_gives_up_after_wait() {
    let cluster = EtcdCluster::start();
    let output = client(&cluster).args(["--wait", "1s"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no instance of \"helloworld\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_mode_reports_instances_joining_and_leaving_without_failed_calls() {
    let cluster = EtcdCluster::start();
    let first = Server::start(&cluster);
    let second = Server::start(&cluster);

    let run = Running::start(client(&cluster).args(["--duration", "30s", "--interval", "20ms"]));
    run.wait_for_line(Duration::from_secs(10), "call    3 ");

    let third = Server::start(&cluster);
    let third_id = third.addr.replace(':', "-");
    run.wait_for_line(
        Duration::from_secs(5),
        &format!("+ instance {third_id} joined"),
    );
    run.wait_for_line(Duration::from_secs(5), &format!(" {} ", third.addr));

    let second_id = second.addr.replace(':', "-");
    second.stop().await;
    run.wait_for_line(
        Duration::from_secs(5),
        &format!("- instance {second_id} left"),
    );

    // Ctrl-C ends the run early; the client then prints its table and reports failures.
    let (success, text) = run.interrupt();
    assert!(success, "{text}");
    assert!(text.contains(", 0 failed"), "{text}");
    first.stop().await;
    third.stop().await;
}

#[test]
fn without_etcd_the_client_gives_up_after_etcd_timeout() {
    let dead_etcd = format!("127.0.0.1:{}", free_port());
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--etcd-endpoints", &dead_etcd, "--etcd-timeout", "1s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot list instances from etcd") && stderr.contains(&dead_etcd),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_skipped_with_one_warning_each_naming_the_key() {
    let cluster = EtcdCluster::start();
    let server = Server::start(&cluster);
    let huge = format!(
        r#"{{"Op":0,"Addr":"127.0.0.1:1","Metadata":"{}"}}"#,
        "x".repeat(70_000)
    );
    let bad: [(&str, &str); 7] = [
        ("garbage", "not json at all"),
        ("invalid-json", r#"{"Addr": "#),
        ("no-addr", r#"{"Op":0,"Metadata":null}"#),
        ("bad-addr", r#"{"Op":0,"Addr":"not an address"}"#),
        ("port-out-of-range", r#"{"Addr":"127.0.0.1:99999"}"#),
        ("huge", &huge),
        ("nested/deeper", r#"{"Addr":"127.0.0.1:1"}"#),
    ];
    for (id, value) in bad {
        cluster.etcdctl_ok(&["put", &format!("services/helloworld/{id}"), value]);
    }

    let output = client(&cluster)
        .args(["--requests", "3", "--interval", "10ms"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("total 3 calls, 0 failed"), "{stdout}");
    let calls_to_server = stdout
        .lines()
        .filter(|l| l.starts_with("call ") && l.contains(&server.addr))
        .count();
    assert_eq!(calls_to_server, 3, "{stdout}");
    for (id, _) in bad {
        let key = format!("services/helloworld/{id}");
        let warnings = stderr
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(&format!("key={key} ")))
            .count();
        assert_eq!(warnings, 1, "{key}: {stderr}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_per_instance_while_they_flow() {
    let cluster = EtcdCluster::start();
    let servers = [Server::start(&cluster), Server::start(&cluster)];
    let metrics = format!("127.0.0.1:{}", testkit::free_port());
    let mut child = testkit::spawn(
        client(&cluster)
            .args(["--forever", "--interval", "10ms", "--min-instances", "2"])
            .args(["--metrics-addr", &metrics])
            .stdout(std::process::Stdio::null()),
    );
    let calls = |text: &str, addr: &str| {
        let series = format!("registry_calls_total{{service=\"helloworld\",instance=\"{addr}\"}}");
        testkit::http::sample(text, &series)
    };
    let scrape = || {
        // The exporter starts with the client; until then the port refuses.
        testkit::wait_for(Duration::from_secs(10), "the metrics endpoint", || {
            std::net::TcpStream::connect(&metrics).ok()?;
            Some(testkit::http::get(&metrics, "/metrics"))
        })
    };
    let first = testkit::wait_for(Duration::from_secs(10), "calls on both instances", || {
        let text = scrape();
        Some((
            calls(&text, &servers[0].addr)?,
            calls(&text, &servers[1].addr)?,
        ))
    });
    wait_until(Duration::from_secs(5), "the counters to move", || {
        let text = scrape();
        calls(&text, &servers[0].addr).is_some_and(|n| n > first.0)
            && calls(&text, &servers[1].addr).is_some_and(|n| n > first.1)
    });
    let text = scrape();
    assert_eq!(
        testkit::http::sample(&text, "registry_instances_known{service=\"helloworld\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        testkit::http::sample(&text, "registry_instances_ready{service=\"helloworld\"}"),
        Some(2.0),
        "{text}"
    );
    child.signal(libc::SIGINT);
    child
        .wait_timeout(Duration::from_secs(10))
        .expect("client exits on SIGINT");
    for server in servers {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_membership_and_rotation_events_as_plain_lines() {
    let cluster = EtcdCluster::start();
    let first = Server::start(&cluster);
    let second = Server::start(&cluster);

    // stdout is a pipe, so the view degrades to plain lines.
    let run = Running::start(client(&cluster).args([
        "--interval",
        "20ms",
        "watch",
        "--refresh",
        "100ms",
    ]));
    for server in [&first, &second] {
        let id = server.addr.replace(':', "-");
        run.wait_for_line(Duration::from_secs(10), &format!("+ instance {id} joined"));
        run.wait_for_line(
            Duration::from_secs(10),
            &format!("{} ({id}) is in rotation", server.addr),
        );
    }

    let third = Server::start(&cluster);
    let third_id = third.addr.replace(':', "-");
    run.wait_for_line(
        Duration::from_secs(5),
        &format!("+ instance {third_id} joined"),
    );
    run.wait_for_line(
        Duration::from_secs(5),
        &format!("{} ({third_id}) is in rotation", third.addr),
    );

    let second_id = second.addr.replace(':', "-");
    second.stop().await;
    run.wait_for_line(
        Duration::from_secs(5),
        &format!("- instance {second_id} left"),
    );

    // Open-ended until Ctrl-C, then the table, and no call failed.
    let (success, text) = run.interrupt();
    assert!(success, "{text}");
    assert!(text.contains(", 0 failed"), "{text}");
    assert!(
        !text.contains("\u{1b}["),
        "escape codes in plain mode: {text}"
    );
    first.stop().await;
    third.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_into_head_the_client_stops_quietly() {
    use std::io::{BufRead, BufReader};
    let cluster = EtcdCluster::start();
    let server = Server::start(&cluster);
    let mut child = testkit::spawn(
        client(&cluster)
            .args(["--requests", "200", "--interval", "10ms"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let stdout = child.child_mut().stdout.take().expect("stdout is piped");
    let mut stderr = child.child_mut().stderr.take().expect("stderr is piped");
    // `| head -3`: read three lines, then close the pipe.
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .take(3)
        .map(|l| l.unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let started = std::time::Instant::now();
    let status = child
        .wait_timeout(Duration::from_secs(10))
        .expect("the client kept running with its stdout closed");
    let mut errors = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut errors).unwrap();
    assert_eq!(status.code(), Some(0), "{errors}");
    assert!(!errors.contains("panicked"), "{errors}");
    // It stopped at the closed pipe, not after its 200 calls (2 s at 10 ms).
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_keeps_that_many_calls_in_flight_and_reports_percentiles() {
    let cluster = EtcdCluster::start();
    let servers = [Server::start(&cluster), Server::start(&cluster)];
    // 4 slots, one call per 100 ms each: 40 calls in about 1 s, where one slot would take 4 s.
    let stdout = run_ok(client(&cluster).args([
        "--requests",
        "40",
        "--interval",
        "100ms",
        "--concurrency",
        "4",
        "--min-instances",
        "2",
    ]));
    let calls = stdout.lines().filter(|l| l.starts_with("call ")).count();
    assert_eq!(calls, 40, "{stdout}");
    let total = stdout
        .lines()
        .find(|l| l.starts_with("total "))
        .unwrap_or_else(|| panic!("no total in {stdout}"));
    eprintln!("{total}");
    assert!(total.contains("total 40 calls, 0 failed"), "{total}");
    assert!(total.contains("p50 ") && total.contains("p99 "), "{total}");
    let seconds: f64 = total
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no elapsed time in {total}"));
    assert!(
        seconds < 2.5,
        "40 calls over 4 slots took {seconds} s: {total}"
    );
    for server in &servers {
        assert!(stdout.contains(&server.addr), "{stdout}");
    }
    for server in servers {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_interval_calls_back_to_back_and_nonsense_exits_2() {
    let cluster = EtcdCluster::start();
    let server = Server::start(&cluster);
    let stdout = run_ok(client(&cluster).args(["--requests", "5", "--interval", "0s"]));
    assert!(stdout.contains("total 5 calls, 0 failed"), "{stdout}");
    // Flags after the subcommand apply as before it.
    let stdout = run_ok(Command::new(env!("CARGO_BIN_EXE_client")).args([
        "watch",
        "--etcd-endpoints",
        &cluster.endpoints().join(","),
        "--requests",
        "3",
        "--interval",
        "10ms",
    ]));
    assert!(stdout.contains("total 3 calls, 0 failed"), "{stdout}");
    for args in [
        &["watch", "--refresh", "0s"][..],
        &["--timeout", "0s"],
        &["--requests", "3", "--forever"],
        &["--hash-key", "user-1"],
        &["--min-instances", "0"],
    ] {
        let output = client(&cluster).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The same mistake in a file exits the same way, naming the file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client.toml"), "min-instances = 0\n").unwrap();
    let output = client(&cluster).current_dir(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("min-instances in ./client.toml"),
        "{stderr}"
    );
    server.stop().await;
}

#[test]
fn help_says_what_the_client_does() {
    let output = Command::new(env!("CARGO_BIN_EXE_client"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.starts_with("Calls helloworld.Greeter instances"),
        "{help}"
    );
    assert!(help.contains("./client.toml"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_callable_instance_is_explained_by_its_cause() {
    let cluster = EtcdCluster::start();
    let certs = testkit::Certs::generate();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let server = Server::start_with(
        &cluster,
        &cluster.endpoints().join(","),
        &[
            "--tls-cert",
            &path(&certs.server_cert),
            "--tls-key",
            &path(&certs.server_key),
            "--service-version",
            "v1",
        ],
    );
    // A TLS server called in plaintext.
    let output = client(&cluster).args(["--wait", "2s"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("serves TLS") && stderr.contains("--tls-ca"),
        "{stderr}"
    );
    assert!(!stderr.contains("start one with"), "{stderr}");

    // A selector nothing matches.
    let output = client(&cluster)
        .args(["--wait", "1s", "--select", "version=v9"])
        .args(["--tls-ca", &path(&certs.ca)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("none matches --select version=v9"),
        "{stderr}"
    );
    assert!(!stderr.contains("start one with"), "{stderr}");
    server.stop().await;
}

#[test]
fn an_auth_cluster_without_a_username_fails_fast_saying_so() {
    let mut cluster = EtcdCluster::start();
    cluster.enable_auth("root-Pa55-cli");
    let started = std::time::Instant::now();
    let output = client(&cluster)
        .args(["--etcd-timeout", "8s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("authentication enabled"), "{stderr}");
    assert!(stderr.contains("--etcd-username"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn an_endpoint_that_is_not_etcd_fails_fast_saying_so() {
    // A plain HTTP/1 server: answers anything with 400 and closes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--etcd-endpoints", &addr, "--etcd-timeout", "8s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not speak etcd's protocol"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

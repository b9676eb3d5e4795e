//! etcd with TLS and with auth, for real: certificates generated at test time (testkit's `Certs`),
//! users and roles created with etcdctl. Registration and discovery must work; a wrong password, an
//! untrusted certificate or a role that does not cover the prefix must fail fast with an error that
//! says what to fix; and no password or key material may reach a log line (every test's logs are
//! captured, at debug level for every crate, and searched).

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use registry::{
    Credentials, Error, EtcdConfig, RegistrationState, RegistryConfig, TlsFiles, error::chain,
};
use testkit::{Certs, EtcdCluster};

const ROOT_PASSWORD: &str = "root-Pa55word-7f3c";
const GREETER_PASSWORD: &str = "greeter-Pa55word-91ab";
const WRONG_PASSWORD: &str = "wrong-Pa55word-c0de";
const OUTSIDER_PASSWORD: &str = "outsider-Pa55word-5e5e";

/// Every log line of this test process, at debug level for every crate.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per process");
        logs
    })
    .clone()
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Asserts that none of `secrets` (and no PEM key block) appears in any captured log line, and
/// that there were log lines to search.
fn assert_no_secrets_logged(secrets: &[&str]) {
    let logs = captured_logs();
    let logs =
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(
        logs.lines().count() > 10,
        "too few log lines captured to be meaningful"
    );
    for secret in secrets {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
    assert!(
        !logs.contains("PRIVATE KEY"),
        "key material reached the logs"
    );
}

/// The captured warnings, to explain a failure.
fn warnings() -> String {
    let logs = captured_logs();
    let logs =
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    logs.lines()
        .filter(|line| line.contains("WARN"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn key_body(path: &std::path::Path) -> String {
    // A line from the middle of the PEM: base64 of the key itself.
    let text = std::fs::read_to_string(path).expect("reading a generated key");
    text.lines().nth(1).expect("a PEM body line").to_owned()
}

async fn registers_and_is_discovered(config: &RegistryConfig, id: &str) {
    let etcd = config.connect().await.expect("connecting");
    let registration = config
        .registration("secure", id, "127.0.0.1:50051")
        .start(&etcd)
        .expect("a valid registration");
    registration
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("not registered: {e}\n{}", warnings()));
    let discovery = config.discovery("secure").start(&etcd).expect("discovery");
    let found = discovery
        .wait_for_instances(1, Duration::from_secs(10))
        .await
        .expect("discovered");
    assert!(found.instances.keys().any(|k| k.ends_with(id)), "{found:?}");
    registration.deregister().await.expect("deregistered");
}

fn tls_config(cluster: &EtcdCluster, files: TlsFiles) -> registry::Result<RegistryConfig> {
    // Bare host:port endpoints: TLS settings make them https.
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("https://").to_owned())
        .collect();
    let etcd = EtcdConfig::builder()
        .endpoints(endpoints)
        .request_timeout(Duration::from_secs(5))
        .tls(files)
        .build()?;
    RegistryConfig::builder(etcd).build()
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_works_and_an_untrusted_certificate_fails_fast() {
    captured_logs();
    let certs = Certs::generate();
    let cluster = EtcdCluster::builder().tls(certs.etcd_server(false)).start();

    let trusted = tls_config(
        &cluster,
        TlsFiles {
            ca: Some(certs.ca.clone()),
            ..TlsFiles::default()
        },
    )
    .expect("valid TLS settings");
    assert!(
        trusted
            .etcd()
            .endpoints()
            .iter()
            .all(|e| e.starts_with("https://"))
    );
    registers_and_is_discovered(&trusted, "tls-1").await;

    // A CA that did not sign etcd's certificate: connect must say so, now, not retry for ever.
    let untrusted = tls_config(
        &cluster,
        TlsFiles {
            ca: Some(certs.other_ca.clone()),
            ..TlsFiles::default()
        },
    )
    .expect("valid TLS settings");
    let started = Instant::now();
    let err = untrusted
        .connect()
        .await
        .expect_err("an untrusted certificate must fail");
    let took = started.elapsed();
    let text = chain(&err);
    println!("untrusted certificate: failed after {took:?}: {text}");
    assert!(
        text.contains("certificate") || text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // Plain http against a TLS cluster is refused before any request.
    let mixed = EtcdConfig::builder()
        .endpoints(
            cluster
                .endpoints()
                .iter()
                .map(|e| e.replace("https://", "http://")),
        )
        .tls(TlsFiles {
            ca: Some(certs.ca.clone()),
            ..TlsFiles::default()
        })
        .build()
        .expect_err("http endpoints with TLS files");
    assert!(mixed.to_string().contains("etcd-endpoints"), "{mixed}");

    assert_no_secrets_logged(&[&key_body(&certs.server_key)]);
}

/// Connects with `files` to a cluster that must turn them away at or right after the handshake:
/// within 6 s, with an error that names `etcd-cert` and says `reason`. A connect that succeeds
/// fails the test with this process's logs, where the connection's own error shows.
async fn refused_at_connect(cluster: &EtcdCluster, files: TlsFiles, case: &str, reason: &str) {
    let config = tls_config(cluster, files).expect("valid TLS settings");
    let started = Instant::now();
    let Err(err) = config.connect().await else {
        let logs = captured_logs();
        let logs = logs.lock().unwrap_or_else(|p| p.into_inner());
        panic!(
            "{case}: connect must fail, but it succeeded; logs:\n{}",
            String::from_utf8_lossy(&logs)
        );
    };
    println!(
        "{case}: failed after {:?}: {}",
        started.elapsed(),
        chain(&err)
    );
    let text = err.to_string();
    assert!(
        text.contains("etcd-cert") && text.contains(reason),
        "{case}: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(6), "{case}");
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_with_client_certificates_requires_ours() {
    captured_logs();
    let certs = Certs::generate();
    let cluster = EtcdCluster::builder()
        .tls(certs.etcd_server(true))
        .etcdctl_cert(certs.client_cert.clone(), certs.client_key.clone())
        .start();

    let with_cert = tls_config(
        &cluster,
        TlsFiles {
            ca: Some(certs.ca.clone()),
            cert: Some(certs.client_cert.clone()),
            key: Some(certs.client_key.clone()),
        },
    )
    .expect("valid TLS settings");
    registers_and_is_discovered(&with_cert, "mtls-1").await;

    let missing = TlsFiles {
        ca: Some(certs.ca.clone()),
        ..TlsFiles::default()
    };
    refused_at_connect(&cluster, missing, "missing client certificate", "requires").await;

    // A client certificate from a CA that etcd does not trust is turned away the same way.
    let foreign = TlsFiles {
        ca: Some(certs.ca.clone()),
        cert: Some(certs.rogue_cert.clone()),
        key: Some(certs.rogue_key.clone()),
    };
    refused_at_connect(
        &cluster,
        foreign,
        "untrusted client certificate",
        "does not accept",
    )
    .await;
    assert_no_secrets_logged(&[
        &key_body(&certs.client_key),
        &key_body(&certs.server_key),
        &key_body(&certs.rogue_key),
    ]);
}

/// A cluster with auth on: `root`, `greeter` (readwrite on `services/`) and `outsider`
/// (readwrite on `elsewhere/` only). Simple tokens expire after 2 s unused.
fn auth_cluster() -> EtcdCluster {
    let mut cluster = EtcdCluster::builder().arg("--auth-token-ttl=2").start();
    cluster.add_user("greeter", GREETER_PASSWORD, "services/");
    cluster.add_user("outsider", OUTSIDER_PASSWORD, "elsewhere/");
    cluster.enable_auth(ROOT_PASSWORD);
    cluster
}

fn auth_config(cluster: &EtcdCluster, user: &str, password: &str) -> RegistryConfig {
    let etcd = EtcdConfig::builder()
        .endpoints(cluster.endpoints())
        .auth(Credentials::new(user, password))
        .build()
        .expect("valid settings");
    RegistryConfig::builder(etcd)
        .ttl(Duration::from_secs(3))
        .build()
        .expect("valid settings")
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_with_auth_works_refuses_wrong_passwords_and_names_missing_permissions() {
    captured_logs();
    let mut cluster = auth_cluster();

    // The right user registers and discovers, and outlives its token: tokens expire after 2 s
    // idle, and a member restart forgets every token, so a restart of each member in turn forces
    // both a refresh and the reopening of the keep-alive and watch streams with a new token.
    let greeter = auth_config(&cluster, "greeter", GREETER_PASSWORD);
    let etcd = greeter.connect().await.expect("greeter connects");
    let registration = greeter
        .registration("secure", "auth-1", "127.0.0.1:50051")
        .start(&etcd)
        .expect("a valid registration");
    registration
        .wait_registered(Duration::from_secs(10))
        .await
        .expect("registered with auth");
    let discovery = greeter.discovery("secure").start(&etcd).expect("discovery");
    discovery
        .wait_for_instances(1, Duration::from_secs(10))
        .await
        .expect("discovered with auth");
    for member in 0..cluster.size() {
        cluster.kill(member);
        cluster.restart(member);
    }
    // A new instance registered after the restarts is seen through the re-opened watch, and the
    // first one is still registered (its keep-alive re-authenticated).
    let second = greeter
        .registration("secure", "auth-2", "127.0.0.1:50052")
        .start(&etcd)
        .expect("a valid registration");
    second
        .wait_registered(Duration::from_secs(15))
        .await
        .expect("registered after every member restarted");
    let both = discovery
        .wait_for_instances(2, Duration::from_secs(15))
        .await
        .expect("the watch survives token loss");
    assert_eq!(both.instances.len(), 2, "{both:?}");
    let listed = cluster.etcdctl_ok(&["get", "--prefix", "--keys-only", "services/secure/"]);
    assert!(
        listed.contains("auth-1") && listed.contains("auth-2"),
        "{listed}"
    );
    second.deregister().await.expect("deregistered");
    registration.deregister().await.expect("deregistered");

    // A wrong password fails at connect, at once, naming the user (and not the password).
    let started = Instant::now();
    let err = auth_config(&cluster, "greeter", WRONG_PASSWORD)
        .connect()
        .await
        .expect_err("a wrong password must fail");
    println!(
        "wrong password: failed after {:?}: {err}",
        started.elapsed()
    );
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(err.to_string().contains("\"greeter\""), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A user whose role does not cover services/ gets a permission error that says what to grant.
    let outsider = auth_config(&cluster, "outsider", OUTSIDER_PASSWORD);
    let etcd = outsider.connect().await.expect("outsider connects");
    let denied = outsider
        .registration("secure", "auth-3", "127.0.0.1:50053")
        .start(&etcd)
        .expect("a valid registration");
    let mut state = denied.state();
    let reason = tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| matches!(s, RegistrationState::Lost { .. })),
    )
    .await
    .expect("registration reports the problem")
    .expect("state channel open")
    .clone();
    println!("permission denied: {reason:?}");
    let RegistrationState::Lost { reason } = reason else {
        unreachable!()
    };
    assert!(
        reason.contains("may not") && reason.contains("grant-permission"),
        "{reason}"
    );
    let discovery = outsider
        .discovery("secure")
        .start(&etcd)
        .expect("discovery");
    let err = discovery
        .wait_synced(Duration::from_secs(5))
        .await
        .expect_err("listing services/ is not allowed");
    println!("discovery without permission: {err}");
    assert!(err.to_string().contains("may not"), "{err}");
    drop(denied);

    assert_no_secrets_logged(&[
        ROOT_PASSWORD,
        GREETER_PASSWORD,
        WRONG_PASSWORD,
        OUTSIDER_PASSWORD,
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_that_may_write_but_not_watch_its_key_says_so_once() {
    let logs = captured_logs();
    // A role with write but not read permission: the key can be put, its guard cannot watch it.
    let mut cluster = EtcdCluster::start();
    for args in [
        vec!["role", "add", "writer-role"],
        vec![
            "role",
            "grant-permission",
            "writer-role",
            "--prefix=true",
            "write",
            "services/",
        ],
        vec![
            "user",
            "add",
            "writer",
            "--new-user-password=writer-Pa55word",
        ],
        vec!["user", "grant-role", "writer", "writer-role"],
    ] {
        cluster.etcdctl_ok(&args);
    }
    cluster.enable_auth(ROOT_PASSWORD);
    let writer = auth_config(&cluster, "writer", "writer-Pa55word");
    let etcd = writer.connect().await.expect("writer connects");
    let registration = writer
        .registration("writeonly", "w-1", "127.0.0.1:50054")
        .start(&etcd)
        .expect("a valid registration");
    registration
        .wait_registered(Duration::from_secs(10))
        .await
        .expect("a write-only role can put the key");

    // The key guard's watch is refused; it keeps retrying (an operator may grant the role), and
    // says so once rather than spinning in silence.
    let key = "services/writeonly/w-1";
    let warned = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains("cannot watch the key") && l.contains(key) && l.contains("WARN"))
            .count()
    };
    let started = Instant::now();
    while warned(&String::from_utf8_lossy(
        &logs.lock().unwrap_or_else(|p| p.into_inner()),
    )) == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no warning that the guard of {key} cannot watch it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several retries later (backoff up to 1 s), still one warning for the same problem.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text =
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert_eq!(warned(&text), 1, "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("still cannot watch the key") && l.contains(key)),
        "the guard stopped retrying:\n{text}"
    );
    // Deleting only if the key is still on our lease is a transaction that reads the key, so the
    // same role cannot deregister either: the error names the operation, the key and the user.
    let err = registration
        .deregister()
        .await
        .expect_err("a write-only role cannot compare before deleting");
    assert!(
        matches!(&err, Error::PermissionDenied { op, .. } if *op == "delete"),
        "{err:?}"
    );
}

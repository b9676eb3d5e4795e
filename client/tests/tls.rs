//! The binaries with security on, end to end: etcd over TLS with auth (the credentials from the
//! environment, as a deployment would pass them), and mutual TLS between client and server.
//! Logs are at debug level and must not contain the password.

mod common;

use std::process::Command;

use testkit::{Certs, EtcdCluster};

const ROOT_PASSWORD: &str = "root-Pa55-tls-e2e";
const PASSWORD: &str = "greeter-Pa55-tls-e2e";

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_auth_to_etcd_and_mutual_tls_to_the_server() {
    let certs = Certs::generate();
    let mut cluster = EtcdCluster::builder().tls(certs.etcd_server(false)).start();
    cluster.add_user("greeter", PASSWORD, "services/");
    cluster.enable_auth(ROOT_PASSWORD);
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("https://").to_owned())
        .collect();
    let endpoints = endpoints.join(",");
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("etcd-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    // The server: etcd TLS + auth (password from a file), mutual TLS on its gRPC port.
    let server = common::Server::start_with(
        &cluster,
        &endpoints,
        &[
            "--etcd-ca",
            &path(&certs.ca),
            "--etcd-username",
            "greeter",
            "--etcd-password-file",
            &path(&password_file),
            "--tls-cert",
            &path(&certs.server_cert),
            "--tls-key",
            &path(&certs.server_key),
            "--tls-ca",
            &path(&certs.ca),
        ],
    );

    let client = |tls: &[&str], password: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_client"));
        cmd.env("ETCD_ENDPOINTS", &endpoints)
            .env("ETCD_CA", &certs.ca)
            .env("ETCD_USERNAME", "greeter")
            .env("ETCD_PASSWORD", password)
            .env("RUST_LOG", "debug")
            .args(["--requests", "4", "--interval", "10ms", "--wait", "5s"])
            .args(tls);
        cmd.output().expect("running the client")
    };
    let (ca, cert, key_file) = (
        path(&certs.ca),
        path(&certs.client_cert),
        path(&certs.client_key),
    );

    // With the CA and a client certificate: every call is served over mutual TLS.
    let ok = client(
        &["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key_file],
        PASSWORD,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr),
    );
    assert!(ok.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&server.addr), "{stdout}");
    assert!(
        !stderr.contains(PASSWORD) && !stdout.contains(PASSWORD),
        "password in the output"
    );
    assert!(stderr.lines().count() > 10, "expected debug logs to search");

    // Without a client certificate the server refuses the handshake: no call succeeds.
    let refused = client(&["--tls-ca", &ca], PASSWORD);
    assert!(
        !refused.status.success(),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );

    // A wrong password: a clear error at once, without the password.
    let wrong = "not-the-Pa55";
    let denied = client(&["--tls-ca", &ca], wrong);
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success());
    assert!(
        stderr.contains("refused to authenticate user \"greeter\""),
        "{stderr}"
    );
    // The library names no flags; the binary says which settings to check.
    assert!(stderr.contains("--etcd-password-file"), "{stderr}");
    assert!(!stderr.contains(wrong), "{stderr}");

    server.stop().await;
}

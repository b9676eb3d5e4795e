//! Layered configuration of the `server` binary: defaults < config file < environment < flags,
//! `--print-config` naming each value's source with secrets redacted, and file mistakes reported
//! with the file and key.

use std::{path::Path, process::Command};

fn server(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_server"));
    cmd.current_dir(dir)
        .env_remove("SERVER_PORT")
        .env_remove("ETCD_PASSWORD")
        .env_remove("REGISTRY_CONFIG");
    cmd
}

fn line<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no line for {key} in:\n{report}"))
}

#[test]
fn layers_merge_in_order_and_print_config_names_each_source() {
    let dir = tempfile::tempdir().unwrap();
    // The conventional file in the working directory is found without --config.
    std::fs::write(
        dir.path().join("server.toml"),
        "port = 50001\nttl = \"20s\"\nnamespace = \"apps\"\netcd-username = \"greeter\"\nmeta = { zone = \"z1\" }\n",
    )
    .unwrap();
    let output = server(dir.path())
        .env("SERVER_PORT", "50002")
        .env("ETCD_PASSWORD", "hunter2-secret")
        .args(["--ttl", "7s", "--print-config"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(line(&report, "host").ends_with("# default"));
    assert!(line(&report, "namespace").contains("\"apps\"  # file ./server.toml"));
    assert!(line(&report, "meta").contains("{ \"zone\" = \"z1\" }"));
    // Environment beats the file, flags beat both.
    assert!(line(&report, "port").contains("50002  # environment SERVER_PORT"));
    assert!(line(&report, "ttl").contains("\"7s\"  # command line --ttl"));
    assert!(line(&report, "etcd-password").contains("\"<redacted>\"  # environment ETCD_PASSWORD"));
    assert!(!report.contains("hunter2"), "the password was printed");
    // The report is itself a valid config file: fed back, it yields the same values.
    let echoed = dir.path().join("echo.toml");
    std::fs::write(&echoed, report.replace("\"<redacted>\"", "\"x\"")).unwrap();
    let again = server(dir.path())
        .args(["--config", echoed.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(line(&again, "port").contains("50002  # file"), "{again}");
    assert!(line(&again, "ttl").contains("\"7s\"  # file"), "{again}");
}

#[test]
fn yaml_and_json_files_are_read_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("s.yaml", "port: 50011\ndrain-timeout: 3s\n"),
        ("s.json", "{\"port\": 50011, \"drain-timeout\": \"3s\"}"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let output = server(dir.path())
            .args(["--config", path.to_str().unwrap(), "--print-config"])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            line(&report, "port").contains("50011  # file"),
            "{name}: {report}"
        );
        assert!(
            line(&report, "drain-timeout").contains("\"3s\"  # file"),
            "{name}: {report}"
        );
    }
}

#[test]
fn config_file_mistakes_exit_2_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let cases = [
        (
            write("typo.toml", "prot = 1\n"),
            vec!["typo.toml", "unknown key \"prot\""],
        ),
        (
            write("type.toml", "port = \"x\"\n"),
            vec!["type.toml", "port"],
        ),
        (
            write("ttl.yaml", "port: 1\nttl: soon\n"),
            vec!["ttl.yaml", "500ms"],
        ),
        (write("conf.ini", "port=1\n"), vec!["conf.ini", "extension"]),
        (
            dir.path().join("missing.toml").to_str().unwrap().to_owned(),
            vec!["missing.toml", "does not exist"],
        ),
    ];
    for (path, expected) in cases {
        let output = server(dir.path())
            .args(["--config", &path])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{path}: {stderr}");
        for needle in expected {
            assert!(stderr.contains(needle), "{path}: no {needle:?} in {stderr}");
        }
    }
    // Two conventional files: ambiguous, so refused.
    write("server.toml", "port = 1\n");
    write("server.json", "{\"port\": 1}");
    let output = server(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("several config files"), "{stderr}");
}

/// Runs the server in `dir` and returns its exit code and stderr.
fn fails(cmd: &mut Command) -> (Option<i32>, String) {
    let output = cmd.output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn errors_name_where_the_bad_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    // The environment, not the flag it stands in for.
    let (code, stderr) = fails(server(dir.path()).env("SERVER_PORT", "abc"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("SERVER_PORT") && stderr.contains("abc"),
        "{stderr}"
    );
    assert!(!stderr.contains("'--port"), "{stderr}");

    // Two settings that exclude each other, both from the environment.
    let (code, stderr) = fails(
        server(dir.path())
            .env("ETCD_PASSWORD", "x")
            .env("ETCD_PASSWORD_FILE", "/nonexistent")
            .args(["--port", "1", "--etcd-username", "u"]),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("ETCD_PASSWORD (--etcd-password)")
            && stderr.contains("ETCD_PASSWORD_FILE (--etcd-password-file)"),
        "{stderr}"
    );

    // A value the file got past clap: named as the file's key.
    std::fs::write(dir.path().join("short.toml"), "port = 1\nttl = \"1s\"\n").unwrap();
    let (code, stderr) = fails(server(dir.path()).args(["--config", "short.toml"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("ttl in short.toml"), "{stderr}");
    assert!(!stderr.contains("--ttl"), "{stderr}");

    // A wrong type inside the flattened etcd settings still names the key and the file.
    std::fs::write(
        dir.path().join("type.toml"),
        "port = 1\netcd-timeout = true\n",
    )
    .unwrap();
    let (code, stderr) = fails(server(dir.path()).args(["--config", "type.toml"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("etcd-timeout in type.toml"), "{stderr}");

    // Endpoints from a file are checked like the flag's.
    std::fs::write(
        dir.path().join("ep.toml"),
        "port = 1\netcd-endpoints = [\"nope\"]\n",
    )
    .unwrap();
    let (code, stderr) = fails(server(dir.path()).args(["--config", "ep.toml"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("etcd-endpoints in ep.toml") && stderr.contains("nope"),
        "{stderr}"
    );
}

#[test]
fn a_comma_separated_endpoint_string_in_a_file_is_a_list() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("server.toml"),
        "port = 1\netcd-endpoints = \"127.0.0.1:1,127.0.0.1:2\"\n",
    )
    .unwrap();
    let output = server(dir.path()).arg("--print-config").output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Accepted, and reported as written (the report stays a valid file).
    assert!(
        line(&report, "etcd-endpoints").contains("\"127.0.0.1:1,127.0.0.1:2\"  # file"),
        "{report}"
    );
}

#[test]
fn every_configuration_mistake_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("pw");
    std::fs::write(&password, "s3cret\n").unwrap();
    let password = password.to_str().unwrap();
    let missing = dir.path().join("missing-pw");
    let missing = missing.to_str().unwrap();
    let both = dir.path().join("both.toml");
    std::fs::write(&both, format!("etcd-password-file = {password:?}\n")).unwrap();
    let both = both.to_str().unwrap();
    for (env, args, expected) in [
        (
            Some(("ETCD_PASSWORD", "x")),
            vec!["--port", "1", "--etcd-username", "u", "--config", both],
            "keep one",
        ),
        (
            None,
            vec![
                "--port",
                "1",
                "--etcd-username",
                "u",
                "--etcd-password-file",
                missing,
            ],
            "missing-pw",
        ),
        (
            None,
            vec!["--port", "1", "--host", "not-a-host"],
            "not-a-host",
        ),
        (
            None,
            vec!["--port", "1", "--etcd-username", "u"],
            "without a password",
        ),
        (
            None,
            vec!["--port", "1", "--etcd-timeout", "0s"],
            "more than zero",
        ),
        (
            None,
            vec!["--port", "1", "--tls-cert", missing, "--tls-key", missing],
            "missing-pw",
        ),
        // --print-config checks what it prints.
        (
            None,
            vec!["--port", "1", "--ttl", "1s", "--print-config"],
            "at least 2s",
        ),
    ] {
        let mut cmd = server(dir.path());
        if let Some((var, value)) = env {
            cmd.env(var, value);
        }
        let (code, stderr) = fails(cmd.args(&args));
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: no {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("in use"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_says_what_the_binary_does_and_names_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let output = server(dir.path()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        help.starts_with("A helloworld Greeter that registers itself in etcd."),
        "{help}"
    );
    assert!(help.contains("./server.toml"), "{help}");
    assert!(!help.contains("BINARY"), "{help}");
}

#[test]
fn bare_decimal_seconds_are_durations() {
    let dir = tempfile::tempdir().unwrap();
    let output = server(dir.path())
        .args(["--port", "1", "--deregister-grace", "0.5", "--print-config"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        line(&report, "deregister-grace").contains("\"500ms\""),
        "{report}"
    );
}

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

//! The binary as a newcomer runs it: `ca init`, `loopback` with its self-check, and config
//! errors from `run`.

#![allow(clippy::unwrap_used)]

use std::process::Command;

/// `hboned loopback --check-only` on ephemeral loopback ports.
fn loopback_check() -> Command {
    let mut cmd = hboned();
    cmd.args([
        "loopback",
        "--check-only",
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
    ]);
    cmd
}

fn hboned() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hboned"))
}

#[test]
fn loopback_check_only_carries_traffic_through_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let init = hboned()
        .args(["ca", "init", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let out = loopback_check()
        .arg("--ca-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("self-check passed"), "{stdout}");
    assert!(
        stderr.contains("X25519MLKEM768"),
        "post-quantum key exchange expected: {stderr}"
    );
}

#[test]
fn missing_ca_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = loopback_check()
        .arg("--ca-dir")
        .arg(dir.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("root-cert.pem"), "{stderr}");
}

/// `hboned run` on a config file holding `yaml`: whether it failed, and its stderr.
fn run_refused(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = hboned()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (!out.status.success(), stderr)
}

#[test]
fn run_with_a_missing_ca_directory_names_the_setting() {
    let (refused, stderr) = run_refused("ca: {rootDir: /nonexistent/no-such-ca}\n");
    assert!(refused, "{stderr}");
    assert!(
        stderr.contains("ca.rootDir") && stderr.contains("no-such-ca"),
        "{stderr}"
    );
}

#[test]
fn run_with_a_bad_config_lists_every_problem() {
    let (refused, stderr) = run_refused("trustDomain: \"Bad\"\nca: {certLifetimeSecs: 1}\n");
    assert!(refused, "{stderr}");
    assert!(
        stderr.contains("trustDomain") && stderr.contains("certLifetimeSecs"),
        "{stderr}"
    );
}

#[test]
fn quitquitquit_drains_and_exits_cleanly() {
    use std::io::{Read, Write};
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (admin, ready) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.yaml");
    std::fs::write(
        &config,
        format!("zdsSocket: null\nadminAddress: 127.0.0.1:{admin}\nreadinessAddress: 127.0.0.1:{ready}\nmetricsAddress: null\n"),
    )
    .unwrap();
    let mut proxy = hboned()
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut reply = String::new();
    while std::time::Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) {
            s.write_all(b"POST /quitquitquit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
            s.read_to_string(&mut reply).unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let status = loop {
        if let Some(status) = proxy.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = proxy.kill();
            panic!("hboned did not exit after /quitquitquit");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// With HBONED_LOG_FORMAT=json, every log line is JSON; the access log has one line per
/// connection and reporter, with addresses, identities and bytes.
#[test]
fn json_access_log_lines_describe_each_connection() {
    let out = loopback_check()
        .env("HBONED_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["target"] == "access").collect();
    // ztunnel's fields: `direction` names the reporting side.
    let directions: Vec<&str> = access
        .iter()
        .filter_map(|l| l["fields"]["direction"].as_str())
        .collect();
    assert!(
        directions.contains(&"outbound") && directions.contains(&"inbound"),
        "{access:?}"
    );
    for line in access {
        let f = &line["fields"];
        assert_eq!(f["message"], "connection complete");
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(f["bytes_sent"], 1024 * 1024, "{f}");
        assert_eq!(f["bytes_recv"], 1024 * 1024, "{f}");
        assert!(f["duration"].as_str().unwrap().ends_with("ms"), "{f}");
        assert!(f["dst.hbone_addr"].is_string(), "{f}");
        assert!(
            f["src.identity"].as_str().unwrap().starts_with("spiffe://"),
            "{f}"
        );
    }
}

/// `proxy ztunnel`, as Istio's chart starts the image, reads ztunnel's variables: one it cannot
/// read refuses the start and is named.
#[test]
fn proxy_ztunnel_reads_ztunnels_environment() {
    let out = hboned()
        .args(["proxy", "ztunnel"])
        .env("SECRET_TTL", "one day")
        .env("XDS_ON_DEMAND", "maybe")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("SECRET_TTL") && stderr.contains("XDS_ON_DEMAND"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The README's first commands run `cargo run` (scripts/demo, `cargo run -- loopback`): with
/// two binaries in the package (the proxy and hboned-cni), that needs `default-run` naming the
/// proxy, or cargo refuses to choose.
#[test]
fn cargo_run_runs_the_proxy() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("Cargo.toml");
    let bins = manifest.matches("[[bin]]").count();
    assert!(
        bins < 2 || manifest.contains("default-run = \"hboned\""),
        "{bins} binaries and no default-run = \"hboned\": `cargo run` would refuse"
    );
}

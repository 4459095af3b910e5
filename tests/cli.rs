//! The binary as a newcomer runs it: `ca init`, `loopback` with its self-check, and config
//! errors from `run`.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn hboned() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hboned"))
}

#[test]
fn run_check_only_carries_traffic_through_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let init = hboned()
        .args(["ca", "init", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let out = hboned()
        .args([
            "loopback",
            "--check-only",
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--ca-dir",
        ])
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
    let out = hboned()
        .args([
            "loopback",
            "--check-only",
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--ca-dir",
        ])
        .arg(dir.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("root-cert.pem"), "{stderr}");
}

#[test]
fn run_with_a_bad_config_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "trustDomain: \"Bad\"\nca: {certLifetimeSecs: 1}\n").unwrap();
    let out = hboned()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("trustDomain") && stderr.contains("certLifetimeSecs"),
        "{stderr}"
    );
}

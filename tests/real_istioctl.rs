//! `istioctl ztunnel-config` (istio/istio's own istioctl, built from the Go module proxy at the
//! commit pinned in tests/real/istio/go.mod) against node A's hboned of the two-node topology:
//! `workloads`, `services`, `policies`, `certificates`, `connections` and `log`, each printing
//! hboned's real state (a live tunnel a1 → b1 among the connections), read through the
//! Kubernetes port-forward istioctl always uses. The API server in between is the fake of
//! tests/real/istio/cmd/istioctl-apiserver (the pod, its DaemonSet and a SPDY port-forward on
//! the kubelet's own stream code); everything istioctl parses comes from hboned. Needs root and
//! Go; off CI each is skipped when missing, on CI (CI=true) that fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use hboned::testbed::{self, A1, APP_PORT, B1, Topology};
use support::real::{go_program, have_go};
use support::topo::{bin, can_run};

/// A process killed when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs istioctl in node A's netns (where hboned's admin page is on 127.0.0.1:15000), through
/// the API server at `api`; its stdout, or a panic with everything it printed.
fn istioctl(topo: &Topology, kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let program = go_program("istio", "istio.io/istio/istioctl/cmd/istioctl", "istioctl");
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.netns_name("na")])
        .arg(program)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        // SPDY, as the kubelet's stream code serves it (istioctl would try WebSockets first).
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")
        .env("HOME", kubeconfig.parent().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "istioctl {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The rows of a table istioctl printed whose cells include every one of `cells`.
fn rows_with<'a>(table: &'a str, cells: &[&str]) -> Vec<&'a str> {
    table
        .lines()
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            cells.iter().all(|c| words.contains(c))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istioctl_ztunnel_config_reads_hboneds_state() {
    if !can_run() || !have_go() {
        return;
    }
    let apiserver = go_program("istio", "./cmd/istioctl-apiserver", "istioctl-apiserver");
    let _istioctl = go_program("istio", "istio.io/istio/istioctl/cmd/istioctl", "istioctl");
    let topo = Topology::start(bin()).await.unwrap();
    let mut api = Killed(
        Command::new("ip")
            .args(["netns", "exec", &topo.netns_name("na")])
            .arg(apiserver)
            .args([
                "-target",
                "127.0.0.1:15000",
                "-pod",
                "ztunnel-a",
                "-node",
                "node-a",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(api.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"http://{addr}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\nusers:\n- name: test\n  user: {{token: test}}\ncurrent-context: test\n"
        ),
    )
    .unwrap();
    let pod = "ztunnel-a.istio-system";
    let run = |command: &str, extra: &[&str]| {
        let mut args = vec!["ztunnel-config", command, pod];
        args.extend_from_slice(extra);
        istioctl(&topo, &kubeconfig, &args)
    };

    // A live tunnel a1 → b1 while istioctl looks.
    let (_echo, _peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let mut live = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    support::topo::echoes(&mut live, b"held open").await;

    let workloads = run("workloads", &[]);
    for (pod, protocol) in [(A1, "HBONE"), (testbed::A2, "TCP"), (B1, "HBONE")] {
        let ip = format!("{},{}", pod.ip, pod.ip6);
        assert_eq!(
            rows_with(&workloads, &["demo", pod.name, &ip, protocol]).len(),
            1,
            "{}:\n{workloads}",
            pod.name
        );
    }
    let services = run("services", &[]);
    assert_eq!(
        rows_with(&services, &["demo", "echo", "198.18.100.10", "1/1"]).len(),
        1,
        "{services}"
    );
    let policies = run("policies", &[]);
    assert_eq!(
        rows_with(&policies, &["demo", "no-plaintext", "Deny"]).len(),
        1,
        "{policies}"
    );
    let certificates = run("certificates", &[]);
    assert!(
        rows_with(
            &certificates,
            &[
                "spiffe://cluster.local/ns/demo/sa/client",
                "Leaf",
                "Available",
                "true"
            ]
        )
        .len()
            == 1,
        "{certificates}"
    );
    let connections = run("connections", &[]);
    let b1_tunnel = "b1.demo:15008";
    assert_eq!(
        rows_with(&connections, &["a1.demo", "Outbound", b1_tunnel, "HBONE"]).len(),
        1,
        "{connections}"
    );

    assert!(run("log", &[]).contains("current log level is info"));
    assert!(
        run("log", &["--level", "debug"]).contains("current log level is debug"),
        "istioctl's --level reaches hboned"
    );
    assert!(run("log", &["-r"]).contains("current log level is info"));
    drop(live);
}

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

/// The image deploy/istio/ztunnel.yaml names.
const IMAGE: &str = "ghcr.io/example/hboned:0.1.0";

/// Istio's ztunnel chart as istioctl renders it (`manifest generate --set profile=ambient`,
/// its charts built in) with hboned's image and `values`: the ztunnel ServiceAccount and
/// DaemonSet.
fn rendered_ztunnel(values: &[&str]) -> Vec<serde_yaml_ng::Value> {
    let program = go_program("istio", "istio.io/istio/istioctl/cmd/istioctl", "istioctl");
    let mut args = vec![
        "manifest".to_owned(),
        "generate".to_owned(),
        "--set".to_owned(),
        "profile=ambient".to_owned(),
        "--set".to_owned(),
        format!("values.ztunnel.image={IMAGE}"),
    ];
    for v in values {
        args.extend(["--set".to_owned(), (*v).to_owned()]);
    }
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(program)
        .args(&args)
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "istioctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
        .filter(|doc: &serde_yaml_ng::Value| {
            matches!(doc["kind"].as_str(), Some("ServiceAccount" | "DaemonSet"))
                && doc["metadata"]["name"].as_str() == Some("ztunnel")
        })
        .collect()
}

/// deploy/istio/ztunnel.yaml is Istio's chart rendered with hboned's image, nothing else
/// changed (command, environment, mounts, securityContext, probes): regenerated with
/// `HBONED_RENDER_DEPLOY=1 cargo test --test real_istioctl -- deploy_istio`.
#[test]
fn deploy_istio_is_istios_chart_with_hboneds_image() {
    if !have_go() {
        return;
    }
    let chart = rendered_ztunnel(&[]);
    assert_eq!(chart.len(), 2, "the chart's ServiceAccount and DaemonSet");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/istio/ztunnel.yaml");
    if std::env::var("HBONED_RENDER_DEPLOY").is_ok() {
        let mut text = String::from(
            "# Istio's ztunnel chart (istioctl manifest generate --set profile=ambient, istio/istio at the\n\
             # commit pinned in tests/real/istio/go.mod) with hboned's image and nothing else changed;\n\
             # tests/real_istioctl.rs renders it again and fails on any difference. For a revisioned\n\
             # istiod, another cluster name or other addresses, render the chart with those values and\n\
             # set `values.ztunnel.image` to hboned's (README \"Under Istio\").\n",
        );
        for doc in &chart {
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(doc).unwrap());
        }
        std::fs::write(&path, text).unwrap();
    }
    let committed: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&std::fs::read_to_string(&path).unwrap())
            .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
            .filter(|doc: &serde_yaml_ng::Value| !doc.is_null())
            .collect();
    assert!(
        committed == chart,
        "deploy/istio/ztunnel.yaml is not the chart's rendering; regenerate it with \
         HBONED_RENDER_DEPLOY=1 cargo test --test real_istioctl -- deploy_istio"
    );
}

/// A revisioned istiod and another cluster name, rendered by the chart, are what hboned reads
/// from the DaemonSet's environment: the addresses of istiod-<revision> and the cluster id.
#[test]
fn the_charts_revision_and_cluster_values_reach_hboneds_configuration() {
    if !have_go() {
        return;
    }
    let chart = rendered_ztunnel(&[
        "revision=canary",
        "values.global.multiCluster.clusterName=east",
    ]);
    let daemonset = chart
        .iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .unwrap();
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["args"],
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>("[proxy, ztunnel]").unwrap(),
        "the chart starts `proxy ztunnel`, hboned's ztunnel mode"
    );
    let vars: Vec<(String, String)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let env = hboned::config::ztunnel::Environment::fixed(&refs, &[]);
    let config = hboned::config::Config::from_ztunnel_env(&env).unwrap();
    assert_eq!(
        config.xds.address,
        "https://istiod-canary.istio-system.svc:15012"
    );
    let ca = config.certificates.istio_ca.unwrap();
    assert_eq!(ca.address, "https://istiod-canary.istio-system.svc:15012");
    assert_eq!(config.cluster_id, "east");
}

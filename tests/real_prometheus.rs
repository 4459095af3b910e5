//! Istio's ztunnel Grafana dashboard against hboned, through a real Prometheus (Debian's
//! `prometheus` package, which .ci/run installs): Prometheus scrapes both nodes' proxies of the
//! two-node topology, with the `pod` and `app` labels its Kubernetes discovery would attach to a
//! ztunnel pod, and each PromQL expression of the dashboard (istio/istio
//! manifests/addons/dashboards/ztunnel.libsonnet, written out below with `$__rate_interval` as
//! 30s) returns data after traffic, DNS queries and one control-plane reconnect. Two panels
//! cannot: the container CPU and memory ones read cAdvisor's series, which the kubelet exports,
//! not the proxy. Needs
//! root and the `prometheus` binary; off CI each is skipped when missing, on CI (CI=true) that
//! fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hboned::testbed::{self, A1, APP_PORT, B1, node_ip};
use support::topo::{can_run, echoes, http_get, push, with_control_plane_on_b_and};

/// The dashboard's expressions hboned must answer.
const PANELS: [&str; 13] = [
    r#"sum by (tag) (istio_build{component="ztunnel"})"#,
    r#"sum by (pod) (rate(istio_tcp_connections_opened_total{pod=~"ztunnel-.*"}[30s]))"#,
    r#"-sum by (pod) (rate(istio_tcp_connections_closed_total{pod=~"ztunnel-.*"}[30s]))"#,
    r#"sum by (pod) (rate(istio_tcp_sent_bytes_total{pod=~"ztunnel-.*"}[30s]))"#,
    r#"sum by (pod) (rate(istio_tcp_received_bytes_total{pod=~"ztunnel-.*"}[30s]))"#,
    r#"sum by (pod) (rate(istio_xds_connection_terminations_total{pod=~"ztunnel-.*"}[30s]))"#,
    r#"sum by (url) (irate(istio_xds_message_total{pod=~"ztunnel-.*"}[30s]))"#,
    r#"sum by (pod) (workload_manager_active_proxy_count{pod=~"ztunnel-.*"})"#,
    r#"sum by (pod) (workload_manager_pending_proxy_count{pod=~"ztunnel-.*"})"#,
    r#"sum by (pod) (istio_tcp_connections_opened_total{app="ztunnel"}) - sum by (pod) (istio_tcp_connections_closed_total{app="ztunnel"})"#,
    r#"sum by (pod) (process_open_fds{app="ztunnel"})"#,
    r#"sum by (pod) (istio_tcp_sockets_open{app="ztunnel"})"#,
    r#"sum by (pod) (rate(istio_dns_requests_total{pod=~"ztunnel-.*"}[30s]))"#,
];

/// Where Prometheus listens inside node B.
const PROMETHEUS_PORT: u16 = 19090;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have_prometheus() -> bool {
    let found = Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "the dashboard test needs Debian's prometheus on CI"
        );
        eprintln!("skipped: needs prometheus (apt-get install prometheus)");
    }
    found
}

/// One A query for `name` from pod a1 to its DNS proxy (127.0.0.1:15053 in its netns, where
/// the capture would send port 53); whether an answer came.
fn ask_dns(topo: &testbed::Topology, name: &str) -> bool {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut q = Message::query();
    q.metadata.id = 7;
    q.add_query(Query::query(name.parse::<Name>().unwrap(), RecordType::A));
    let bytes = q.to_vec().unwrap();
    topo.netns(A1.name)
        .unwrap()
        .run(|| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.send_to(&bytes, "127.0.0.1:15053")?;
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf)?;
            Ok(Message::from_vec(&buf[..n]).is_ok_and(|m| !m.answers.is_empty()))
        })
        .unwrap_or(false)
}

/// Percent-encodes a query parameter.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The series `expr` evaluates to now, as Prometheus' HTTP API answers.
fn query(topo: &testbed::Topology, expr: &str) -> Vec<serde_json::Value> {
    let answer = http_get(
        topo,
        "nb",
        PROMETHEUS_PORT,
        &format!("/api/v1/query?query={}", encode(expr)),
    );
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| {
        panic!("Prometheus answered {answer:?} to {expr}: {e}");
    });
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_of_istios_ztunnel_dashboard_has_data() {
    if !can_run() || !have_prometheus() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Node A serves DNS in its pods (the queries below are for a service it knows: the
    // upstream named here is never asked).
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
    let (topo, mut ads, xds) = with_control_plane_on_b_and(|a| {
        a.dns.enabled = true;
        a.dns.resolv_conf = resolv.clone();
    })
    .await;
    let config = dir.path().join("prometheus.yml");
    // The labels Prometheus' Kubernetes discovery attaches to the ztunnel pods' targets.
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
- job_name: ztunnel
  static_configs:
  - targets: ['{a}:15020']
    labels: {{pod: ztunnel-a, app: ztunnel}}
  - targets: ['127.0.0.1:15020']
    labels: {{pod: ztunnel-b, app: ztunnel}}
",
            a = node_ip('a')
        ),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new("ip")
            .args(["netns", "exec", &topo.netns_name("nb"), "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );

    // Traffic a1 → b1, some of it still open.
    let (_echo, _peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    for _ in 0..3 {
        let mut s = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
        echoes(&mut s, b"for the dashboard").await;
    }
    let mut live = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut live, b"held open").await;
    // DNS queries from a1 to its proxy, over a few scrapes (a rate needs two samples).
    for _ in 0..3 {
        assert!(
            ask_dns(&topo, "echo.demo.svc.cluster.local"),
            "a1's DNS proxy answered"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // The control plane ends the stream once: node B reconnects.
    let _ = xds
        .responses
        .send(Err(tonic::Status::unavailable("a control plane restarts")));
    let mut again = ads.accept().await;
    let _ = again.next().await;
    let _ = again.next().await;
    push(
        &mut again,
        "after",
        hboned::xds::convert::ADDRESS_TYPE,
        Vec::new(),
        &[],
    )
    .await;

    let mut missing: Vec<&str> = PANELS.to_vec();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !http_get(&topo, "nb", PROMETHEUS_PORT, "/-/ready").starts_with("HTTP/1.1 200") {
            continue;
        }
        missing.retain(|expr| query(&topo, expr).is_empty());
    }
    assert!(
        missing.is_empty(),
        "panels without data: {missing:#?}\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    // The numbers say what happened: two proxies, a1 served by node A, the reconnect on B.
    let by_pod = |expr: &str| {
        query(&topo, expr)
            .iter()
            .map(|s| {
                (
                    s["metric"]["pod"].as_str().unwrap_or_default().to_owned(),
                    s["value"][1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        by_pod(PANELS[7]).get("ztunnel-a").map(String::as_str),
        Some("1"),
        "node A serves a1"
    );
    let terminations = query(
        &topo,
        r#"sum by (pod, reason) (istio_xds_connection_terminations_total)"#,
    );
    assert!(
        terminations
            .iter()
            .any(|s| s["metric"]["pod"] == "ztunnel-b" && s["metric"]["reason"] == "Error"),
        "{terminations:?}"
    );
    drop(live);
}

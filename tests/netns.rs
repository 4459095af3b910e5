//! The two-node integration test (docs/design.md §1, §3, §6), on real network namespaces, iptables
//! rules installed by `hboned redirect install`, and one `hboned run` per node. Needs root; off
//! CI it is skipped when not root, on CI (CI=true) it fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::ErrorKind;
use std::time::Duration;

use hboned::testbed::{self, A1, A2, APP_PORT, B1, B2, B3, B3_AS_SEEN_BY_A, Capture, Topology};
use support::agent::{AgentNode, ScratchNetns};
use support::topo::*;
use support::{Fnv, pattern, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_carry_pod_traffic_over_hbone_only() {
    if !can_run() {
        return;
    }
    let topo = Topology::start(bin()).await.unwrap();
    let prefix = topo.prefix().to_owned();
    let (_e1, peers_b1) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let (_e2, _) = testbed::spawn_echo(topo.listen(B2.name, APP_PORT).unwrap());
    let (_e3, peers_b3) = testbed::spawn_echo(topo.listen(B3.name, APP_PORT).unwrap());
    let (_e4, peers_a1) = testbed::spawn_echo(topo.listen(A1.name, APP_PORT).unwrap());
    let marker = b"hboned-PLAINTEXT-marker-7f3a";

    // The capture runs on the node-to-node link through (c) and (a).
    let (ns, iface, sentinel) = topo.node_link();
    let pcap = std::env::temp_dir().join(format!("{prefix}-link.pcap"));
    let capture = Capture::start(&ns, &iface, &pcap).await.unwrap();

    // (c) Inline hold: the very first connection (cold pool, no tunnel yet); the bytes are
    // written the moment connect() returns, before any tunnel exists, and must all arrive.
    let first = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    let mut early = marker.to_vec();
    early.extend_from_slice(&pattern(1, 64 * 1024));
    let back = within(20, testbed::echo_roundtrip(first, &early))
        .await
        .unwrap();
    assert_eq!(
        back, early,
        "(c) bytes written right after connect() were lost or changed"
    );

    // (a) Enrolled → enrolled, 8 MiB each way, checksummed.
    let mut data = Vec::new();
    while data.len() < 8 << 20 {
        data.extend_from_slice(marker);
        data.extend_from_slice(&pattern(data.len() as u64, 4000));
    }
    let stream = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    let back = within(60, testbed::echo_roundtrip(stream, &data))
        .await
        .unwrap();
    let (mut sent, mut got) = (Fnv::default(), Fnv::default());
    sent.update(&data);
    got.update(&back);
    assert_eq!(
        (back.len(), got),
        (data.len(), sent),
        "(a) data changed in the tunnel"
    );

    // IPv6 alike, inside the capture too: a1 → b1 over IPv6 through the tunnel.
    let mut v6_data = marker.to_vec();
    v6_data.extend_from_slice(&pattern(6, 256 * 1024));
    let s = topo.connect(A1.name, B1.addr6(APP_PORT)).await.unwrap();
    assert_eq!(
        within(20, testbed::echo_roundtrip(s, &v6_data))
            .await
            .unwrap(),
        v6_data
    );
    let seen = peers_b1.lock().unwrap().last().copied().unwrap();
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V6(A1.ip6),
        "IPv6 delivery keeps the client's address"
    );

    // (b) The link carried only TLS to/from 15008, never the plaintext.
    let segments = capture.stop(&topo.netns("na").unwrap(), sentinel).unwrap();
    let _ = std::fs::remove_file(&pcap);
    let with_data: Vec<_> = segments.iter().filter(|s| !s.payload.is_empty()).collect();
    let total: usize = with_data.iter().map(|s| s.payload.len()).sum();
    assert!(
        total > 2 * data.len(),
        "(b) the capture missed the transfer: {total} bytes"
    );
    for s in &with_data {
        assert!(
            s.src.port() == 15008 || s.dst.port() == 15008,
            "(b) non-HBONE segment {} → {}",
            s.src,
            s.dst
        );
        assert!(
            !s.payload.windows(marker.len()).any(|w| w == marker),
            "(b) plaintext on the wire"
        );
    }
    assert!(
        with_data.iter().any(|s| s.dst == B1.addr6(15008)),
        "the IPv6 transfer did not cross the link as HBONE"
    );
    let starts = |prefix: &[u8]| with_data.iter().any(|s| s.payload.starts_with(prefix));
    assert!(
        starts(&[0x16, 0x03, 0x01]),
        "(b) no TLS ClientHello to 15008 seen"
    );
    assert!(
        starts(&[0x17, 0x03, 0x03]),
        "(b) no TLS application data records seen"
    );

    // (f) The server app saw the client pod's IP.
    let peers = peers_b1.lock().unwrap().clone();
    assert!(
        !peers.is_empty()
            && peers
                .iter()
                .all(|p| p.ip() == A1.ip || p.ip() == std::net::IpAddr::V6(A1.ip6)),
        "(f) b1's app saw {peers:?}, not {}",
        A1.ip
    );

    // A service VIP resolves to its endpoint (b1) with the port translated, through HBONE.
    let before = peers_b1.lock().unwrap().len();
    let vip = std::net::SocketAddr::from((testbed::SERVICE_VIP, testbed::SERVICE_PORT));
    let s = topo.connect(A1.name, vip).await.unwrap();
    assert_eq!(
        within(20, testbed::echo_roundtrip(s, b"via the VIP"))
            .await
            .unwrap(),
        b"via the VIP"
    );
    let peers = peers_b1.lock().unwrap().clone();
    assert_eq!(
        peers.len(),
        before + 1,
        "the VIP connection did not reach b1's app"
    );
    assert_eq!(peers.last().unwrap().ip(), A1.ip);

    // (d) Enrolled ↔ not enrolled: plaintext both ways, no errors.
    let s = topo.connect(A1.name, B2.addr(APP_PORT)).await.unwrap();
    assert_eq!(
        within(20, testbed::echo_roundtrip(s, b"to b2"))
            .await
            .unwrap(),
        b"to b2"
    );
    let s = topo.connect(B2.name, A1.addr(APP_PORT)).await.unwrap();
    assert_eq!(
        within(20, testbed::echo_roundtrip(s, b"to a1"))
            .await
            .unwrap(),
        b"to a1"
    );
    let last = *peers_a1.lock().unwrap().last().unwrap();
    assert_eq!(
        last.ip(),
        B2.ip,
        "(d,f) inbound plaintext keeps the client's IP"
    );
    let s = topo.connect(B2.name, A1.addr6(APP_PORT)).await.unwrap();
    assert_eq!(
        within(20, testbed::echo_roundtrip(s, b"v6 to a1"))
            .await
            .unwrap(),
        b"v6 to a1"
    );
    let last = *peers_a1.lock().unwrap().last().unwrap();
    assert_eq!(
        last.ip(),
        std::net::IpAddr::V6(B2.ip6),
        "(d,f) IPv6 inbound plaintext"
    );

    // Policy on 15006: plaintext to a1's port 7001 is denied (reset, never delivered).
    let (_e5, peers_a1_denied) = testbed::spawn_echo(
        topo.listen(A1.name, testbed::DENIED_PLAINTEXT_PORT)
            .unwrap(),
    );
    // The reset can land before connect() even returns: both are a refusal.
    let denied = match topo
        .connect(B2.name, A1.addr(testbed::DENIED_PLAINTEXT_PORT))
        .await
    {
        Ok(s) => within(20, testbed::echo_roundtrip(s, b"let me in")).await,
        Err(e) => Err(e),
    };
    assert!(
        matches!(&denied, Err(e) if e.kind() == ErrorKind::ConnectionReset)
            || matches!(&denied, Ok(b) if b.is_empty()),
        "plaintext to a denied port must not be answered: {denied:?}"
    );
    assert!(
        peers_a1_denied.lock().unwrap().is_empty(),
        "the denied app was reached"
    );

    // (e) A peer presenting the wrong identity: refused, the client is reset, nothing arrives.
    // On a busy machine the reset can meet the connect itself.
    match topo.connect(A1.name, B3.addr(APP_PORT)).await {
        Ok(mut s) => {
            let _ = s.write_all(b"secret").await;
            let mut buf = [0u8; 16];
            let res = within(20, s.read(&mut buf)).await;
            assert!(
                matches!(&res, Err(e) if e.kind() == ErrorKind::ConnectionReset),
                "(e) expected a reset, got {res:?}"
            );
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "(e) {e}"),
    }
    assert!(
        peers_b3.lock().unwrap().is_empty(),
        "(e) b3's app must not be reached"
    );

    // Each proxy answers readiness (15021, in its node's netns) once its pods are served.
    for node in ["na", "nb"] {
        let reply = http_get(&topo, node, 15021, "/healthz/ready");
        assert!(reply.starts_with("HTTP/1.1 200"), "{node}: {reply}");
    }

    // Metrics after real traffic, with ztunnel's names and labels, in its order (15020 in each
    // node's netns). Config-file workloads have no canonical names: "unknown", as in ztunnel.
    let series = |reporter: &str,
                  service: &str,
                  dst: &str,
                  dst_sa: &str,
                  security: &str,
                  flags: &str| {
        let dst_principal = if dst_sa.is_empty() {
            "unknown".to_string()
        } else {
            format!("spiffe://cluster.local/ns/demo/sa/{dst_sa}")
        };
        let (svc, svc_ns, svc_name) = if service.is_empty() {
            ("unknown", "unknown", "unknown")
        } else {
            (service, "demo", "echo")
        };
        format!(
            "{{reporter=\"{reporter}\",source_workload=\"a1\",source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\",source_workload_namespace=\"demo\",source_principal=\"spiffe://cluster.local/ns/demo/sa/client\",source_app=\"unknown\",source_version=\"unknown\",source_cluster=\"demo\",destination_service=\"{svc}\",destination_service_namespace=\"{svc_ns}\",destination_service_name=\"{svc_name}\",destination_workload=\"{dst}\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",destination_workload_namespace=\"demo\",destination_principal=\"{dst_principal}\",destination_app=\"unknown\",destination_version=\"unknown\",destination_cluster=\"demo\",request_protocol=\"tcp\",response_flags=\"{flags}\",connection_security_policy=\"{security}\",source_region=\"unknown\",source_zone=\"unknown\",destination_region=\"unknown\",destination_zone=\"unknown\"}}"
        )
    };
    let labels = |reporter: &str, dst: &str, dst_sa: &str, security: &str, flags: &str| {
        series(reporter, "", dst, dst_sa, security, flags)
    };
    let to_b1 = |reporter| labels(reporter, "b1", "server", "mutual_tls", "-");
    let via_vip = series(
        "source",
        "echo.demo.svc.cluster.local",
        "b1",
        "server",
        "mutual_tls",
        "-",
    );
    // (c), (a), IPv6 and the VIP: four tunnels to b1, counted by both ends; the source names
    // the service the VIP one was addressed to.
    support::eventually(10, || {
        let node_a = http_get(&topo, "na", 15020, "/metrics");
        let direct = metric(
            &node_a,
            "istio_tcp_connections_closed_total",
            &to_b1("source"),
        );
        let vip = metric(&node_a, "istio_tcp_connections_closed_total", &via_vip);
        let b = metric(
            &http_get(&topo, "nb", 15020, "/stats/prometheus"),
            "istio_tcp_connections_closed_total",
            &to_b1("destination"),
        );
        direct == Some(3.0) && vip == Some(1.0) && b == Some(4.0)
    })
    .await;
    let node_a = http_get(&topo, "na", 15020, "/metrics");
    let node_b = http_get(&topo, "nb", 15020, "/metrics");
    assert_eq!(
        metric(
            &node_a,
            "istio_tcp_connections_opened_total",
            &to_b1("source")
        ),
        Some(3.0),
        "{node_a}"
    );
    let sent = metric(&node_b, "istio_tcp_sent_bytes_total", &to_b1("destination")).unwrap_or(0.0);
    assert!(
        sent >= data.len() as f64,
        "b1 received {sent} bytes through tunnels, sent {}",
        data.len()
    );
    // The plaintext passthrough a1 → b2, and the refused tunnel to b3.
    assert_eq!(
        metric(
            &node_a,
            "istio_tcp_connections_opened_total",
            &labels("source", "b2", "", "unknown", "-")
        ),
        Some(1.0),
        "{node_a}"
    );
    assert_eq!(
        metric(
            &node_a,
            "istio_tcp_connections_failed_total",
            &labels("source", "b3", B3_AS_SEEN_BY_A, "mutual_tls", "TLS_FAILURE")
        ),
        Some(1.0),
        "{node_a}"
    );
    // Opened before the tunnel was tried, closed with its failure (as ztunnel counts).
    assert_eq!(
        metric(
            &node_a,
            "istio_tcp_connections_opened_total",
            &labels("source", "b3", B3_AS_SEEN_BY_A, "mutual_tls", "-")
        ),
        Some(1.0),
        "{node_a}"
    );
    assert_eq!(
        metric(
            &node_a,
            "istio_tcp_connections_closed_total",
            &labels("source", "b3", B3_AS_SEEN_BY_A, "mutual_tls", "TLS_FAILURE")
        ),
        Some(1.0),
        "{node_a}"
    );
    assert_eq!(metric(&node_a, "hboned_enrolled_pods", ""), Some(1.0));
    assert_eq!(metric(&node_b, "hboned_enrolled_pods", ""), Some(2.0));
    assert!(node_b.contains("hboned_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/demo/sa/server\"}"), "{node_b}");

    // The admin page (localhost:15000 in the proxy's netns).
    let dump = http_get(&topo, "na", 15000, "/config_dump");
    assert!(dump.starts_with("HTTP/1.1 200"), "{dump}");
    let body = dump.split("\r\n\r\n").nth(1).unwrap();
    let dump: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(dump["pods"][0]["name"], "a1");
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 5);
    // ztunnel's shape for what `istioctl ztunnel-config workloads` reads.
    assert!(dump["workloads"][0]["workloadIps"].is_array(), "{dump}");
    let served = dump["workloadState"].as_object().unwrap();
    assert_eq!(served.len(), 1, "{dump}");
    assert_eq!(served.values().next().unwrap()["info"]["name"], "a1");
    // Certificates in ztunnel's shape (what `istioctl ztunnel-config certificates` reads).
    let cert = &dump["certificates"][0];
    assert_eq!(cert["identity"], "spiffe://cluster.local/ns/demo/sa/client");
    assert_eq!(cert["state"], "Available");
    let leaf = &cert["certChain"][0];
    assert!(
        leaf["serialNumber"].as_str().is_some_and(|s| !s.is_empty()),
        "{cert}"
    );
    assert!(
        leaf["expirationTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{cert}"
    );
    let pem = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        leaf["pem"].as_str().unwrap(),
    )
    .unwrap();
    assert!(pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
    assert_eq!(cert["rootCerts"].as_array().unwrap().len(), 1);
    assert_eq!(dump["policies"][0]["name"], "no-plaintext");
    assert_eq!(dump["config"]["node"], "node-a");
    let identities: Vec<&str> = dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["identity"].as_str())
        .collect();
    assert!(
        identities.contains(&"spiffe://cluster.local/ns/demo/sa/client"),
        "{identities:?}"
    );
    assert!(
        http(
            &topo,
            "na",
            15000,
            "POST",
            "/logging?level=hboned=debug,info"
        )
        .starts_with("HTTP/1.1 200")
    );
    assert!(http(&topo, "na", 15000, "POST", "/logging?level=%%%").starts_with("HTTP/1.1 400"));
    assert!(http_get(&topo, "na", 15000, "/nope").starts_with("HTTP/1.1 404"));

    // (g) Nothing is left behind.
    let mut topo = topo;
    assert!(
        topo.stop_proxies().iter().all(|exited| *exited),
        "(g) a proxy did not exit"
    );
    drop(topo);
    assert_eq!(
        Topology::leftover_namespaces(&prefix),
        Vec::<String>::new(),
        "(g) namespaces left"
    );
}

#[test]
fn namespaces_are_removed_when_a_test_fails() {
    if !can_run() {
        return;
    }
    let prefix = std::sync::Mutex::new(String::new());
    let outcome = std::panic::catch_unwind(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let topo = Topology::start(bin()).await.unwrap();
            *prefix.lock().unwrap() = topo.prefix().to_owned();
            panic!("a failing assertion while the topology is up");
        })
    });
    assert!(outcome.is_err());
    let prefix = prefix.lock().unwrap().clone();
    assert!(!prefix.is_empty());
    assert_eq!(Topology::leftover_namespaces(&prefix), Vec::<String>::new());
}

/// A scratch namespace for the ZDS test, deleted on drop.
/// A fake node agent enrolls a pod over ZDS (netns fd by SCM_RIGHTS), restarts (the pod is
/// re-enrolled, once), then removes it.
#[tokio::test]
async fn zds_agent_adds_and_removes_a_pod() {
    if !can_run() {
        return;
    }
    let pod = ScratchNetns::new(&format!("hbz{}", std::process::id() % 100_000));
    let mut node = AgentNode::start(bin()).await;
    assert_eq!(node.add("uid-1", &pod).await, "");
    // Idempotent: the same Add again succeeds and keeps serving.
    assert_eq!(node.add("uid-1", &pod).await, "");
    assert_eq!(node.snapshot_sent().await, "");

    // The pod's listeners now exist inside its namespace.
    let ns = hboned::netns::Netns::open(&pod.path()).unwrap();
    let probe = |ns: &hboned::netns::Netns| {
        ns.run(|| {
            std::net::TcpStream::connect_timeout(
                &"127.0.0.1:15008".parse().unwrap(),
                Duration::from_secs(2),
            )
        })
    };
    assert!(
        probe(&ns).is_ok(),
        "15008 is not listening in the enrolled pod"
    );
    let listeners = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.0, "ss", "-Hltn", "sport = :15008"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(listeners(), 1);

    // The agent restarts: the proxy reconnects, the agent replays its pods (the same Add)
    // and a snapshot; the pod stays enrolled once, with no second set of listeners.
    node.reconnect().await;
    assert_eq!(node.add("uid-1", &pod).await, "");
    assert_eq!(node.snapshot_sent().await, "");
    assert!(probe(&ns).is_ok(), "re-enrolled after the agent restarted");
    assert_eq!(listeners(), 1, "no duplicate listeners");

    assert_eq!(node.del("uid-1").await, "");
    support::eventually(10, || probe(&ns).is_err()).await;
}

/// A pod that cannot be enrolled yet (its 15008 held by a socket without SO_REUSEPORT) is
/// refused in the Ack, kept, and retried every 5 s, as ztunnel's in-pod manager does; the node
/// is not ready meanwhile, nor while the node agent is gone.
#[tokio::test]
async fn a_pod_enrolled_late_is_retried_and_readiness_waits_for_it() {
    if !can_run() {
        return;
    }
    let pod = ScratchNetns::new(&format!("hbq{}", std::process::id() % 100_000));
    let ns = hboned::netns::Netns::open(&pod.path()).unwrap();
    let squatter = ns
        .run(|| std::net::TcpListener::bind("0.0.0.0:15008"))
        .unwrap();
    let mut node = AgentNode::start(bin()).await;
    let refused = node.add("uid-1", &pod).await;
    assert!(refused.contains("15008"), "{refused}");
    assert_eq!(node.snapshot_sent().await, "");
    assert_eq!(node.readiness_status(), 503, "a pod waits for its retry");

    drop(squatter);
    support::eventually(15, || node.readiness_status() == 200).await;
    let probe = ns.run(|| {
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:15008".parse().unwrap(),
            Duration::from_secs(2),
        )
    });
    assert!(probe.is_ok(), "enrolled on retry");

    // The node agent goes away: not ready until its next snapshot.
    node.reconnect().await;
    support::eventually(10, || node.readiness_status() == 503).await;
    assert_eq!(node.add("uid-1", &pod).await, "");
    assert_eq!(node.snapshot_sent().await, "");
    support::eventually(10, || node.readiness_status() == 200).await;
}

/// `hboned redirect install` twice leaves one copy of the rules; `remove` twice leaves none.
#[test]
fn redirect_rules_install_and_remove_idempotently() {
    if !can_run() {
        return;
    }
    let pod = ScratchNetns::new(&format!("hbr{}", std::process::id() % 100_000));
    let hboned = |verb: &str| {
        let out = std::process::Command::new(bin())
            .args(["redirect", verb, "--netns"])
            .arg(pod.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let in_pod = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.0])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Per family: rules in our chains and jumps, policy rules, routes in table 100.
    let count = |v6: bool| {
        let (save, flag) = if v6 {
            ("ip6tables-save", "-6")
        } else {
            ("iptables-save", "-4")
        };
        let rules = in_pod(&[save]);
        let hbone_rules = rules
            .lines()
            .filter(|l| l.starts_with("-A") && l.contains("HBONE"))
            .count();
        let ip_rules = in_pod(&["ip", flag, "rule"])
            .lines()
            .filter(|l| l.contains("fwmark 0x111/0xfff lookup 100"))
            .count();
        let routes = in_pod(&["ip", flag, "route", "show", "table", "100"])
            .lines()
            .count();
        (hbone_rules, ip_rules, routes)
    };
    hboned("install");
    hboned("install");
    // 8 rules in our chains (2 of them the kubelet probe exemption) + 4 jumps into them; one
    // policy rule; one local route.
    assert_eq!((count(false), count(true)), ((12, 1, 1), (12, 1, 1)));
    hboned("remove");
    hboned("remove");
    assert_eq!((count(false), count(true)), ((0, 0, 0), (0, 0, 0)));
}

/// An upgrade of node A's proxy (the client side of the pod's tunnels).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_overlap_on_the_source_node() {
    if can_run() {
        upgrade_overlap('a').await;
    }
}

/// An upgrade of node B's proxy (the server side): node A's pooled connection gets GOAWAY
/// while a long-lived stream keeps it open, and every new connection from node A goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_overlap_on_the_destination_node() {
    if can_run() {
        upgrade_overlap('b').await;
    }
}

/// An upgrade as a hostNetwork DaemonSet does it: a second proxy starts beside `node`'s, in
/// the same netns with the same ports and addresses (SO_REUSEPORT; the admin port waits), the
/// first gets SIGTERM and drains. New connections a1 → b1 made during the drain all succeed, a
/// long-lived one opened through the first proxy survives the switch, and the first proxy exits
/// cleanly once that connection closed.
async fn upgrade_overlap(node: char) {
    let mut topo = Topology::start(bin()).await.unwrap();
    let (_echo, _peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let old = if node == 'a' { 0 } else { 1 };
    let mut long = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut long, b"before").await;

    // The new proxy: same config, pods, ports and admin addresses as the old one.
    let new = topo
        .spawn_extra_proxy(bin(), node, |c| c.drain_timeout_secs = 20)
        .unwrap();
    support::eventually(20, || topo.log(new).contains("metrics at /metrics")).await;
    assert!(topo.exited(new).is_none(), "{}", topo.log(new));
    let ns = format!("n{node}");
    let reply = http_get(&topo, &ns, 15021, "/healthz/ready");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // The old proxy drains: it stops listening, its live connection goes on; new connections
    // made meanwhile (20 over about 2 s) all succeed.
    topo.terminate(old).unwrap();
    for _ in 0..20 {
        let mut fresh = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
        echoes(&mut fresh, b"made during the drain").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        topo.exited(old).is_none(),
        "the old proxy must wait for its live connection"
    );
    echoes(&mut long, b"still alive during the drain").await;

    // Closing the long-lived connection lets the old proxy finish its drain and exit cleanly.
    long.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(10, long.read_to_end(&mut rest)).await.unwrap();
    drop(long);
    support::eventually(15, || topo.exited(old).is_some()).await;
    assert!(
        topo.exited(old).unwrap().success(),
        "the drained proxy exits cleanly"
    );
    assert!(topo.exited(new).is_none(), "the new proxy keeps serving");
    let mut after = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut after, b"after the old proxy left").await;
    // The successor took the admin port once the old proxy released it.
    support::eventually(10, || topo.log(new).contains("admin page at /config_dump")).await;
}

/// The empty forms of Istio policies on real traffic, served to node B's proxy over xDS by a
/// fake control plane inside node B: ALLOW with `rules: [{}]` (one rule, no clauses) allows
/// everything, HBONE and plaintext; DENY with `rules: [{}]` denies everything, and pushing it
/// resets the live connections at once, on 15008 as on 15006, counted closed as `denied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_on_real_traffic_and_changes_reset_live_connections() {
    use hboned::proto::istio::security::{Action, Authorization, Group, Scope};
    use hboned::xds::convert::{AUTHORIZATION_TYPE, authorization_resource};
    if !can_run() {
        return;
    }
    let (topo, _ads, mut xds) = with_control_plane_on_b().await;
    let (_echo, _peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    push(&mut xds, "p0", AUTHORIZATION_TYPE, Vec::new(), &[]).await;
    // Istio's `rules: [{}]`, as istiod sends it: one group with no rules.
    let everything = |name: &str, action: Action| Authorization {
        name: name.into(),
        namespace: "demo".into(),
        scope: Scope::Namespace as i32,
        action: action as i32,
        groups: vec![Group { rules: vec![] }],
        dry_run: false,
        extensions: Vec::new(),
    };
    let to_b1 = B1.addr(APP_PORT);

    // Live before any policy: one HBONE (a1) and one plaintext (a2, through 15006).
    let mut hbone_live = topo.connect(A1.name, to_b1).await.unwrap();
    echoes(&mut hbone_live, b"hbone before").await;
    let mut plain_live = topo.connect(A2.name, to_b1).await.unwrap();
    echoes(&mut plain_live, b"plaintext before").await;

    // ALLOW everything: new connections of both kinds get in; live ones stay.
    let allow = authorization_resource(
        "demo/allow-all",
        "1",
        everything("allow-all", Action::Allow),
    );
    push(&mut xds, "p1", AUTHORIZATION_TYPE, vec![allow], &[]).await;
    for pod in [A1.name, A2.name] {
        let mut s = topo.connect(pod, to_b1).await.unwrap();
        echoes(&mut s, b"allowed by ALLOW rules: [{}]").await;
    }
    echoes(&mut hbone_live, b"hbone still live").await;
    echoes(&mut plain_live, b"plaintext still live").await;

    // DENY everything: the live connections are reset at once, new ones are refused.
    let deny = authorization_resource("demo/deny-all", "1", everything("deny-all", Action::Deny));
    push(&mut xds, "p2", AUTHORIZATION_TYPE, vec![deny], &[]).await;
    assert_eq!(
        until_closed(&mut hbone_live).await,
        Err(ErrorKind::ConnectionReset),
        "live HBONE"
    );
    assert_eq!(
        until_closed(&mut plain_live).await,
        Err(ErrorKind::ConnectionReset),
        "live plaintext"
    );
    for pod in [A1.name, A2.name] {
        // Reset right after the handshake: connect() itself may already see it.
        let refused = match topo.connect(pod, to_b1).await {
            Ok(mut s) => {
                let _ = s.write_all(b"denied by DENY rules: [{}]").await;
                until_closed(&mut s).await
            }
            Err(e) => Err(e.kind()),
        };
        assert_eq!(refused, Err(ErrorKind::ConnectionReset), "new from {pod}");
    }
    // At least the live one of each kind (an allowed connection still closing when the DENY
    // arrived counts too), once the relays have recorded them.
    let closed_as_denied = |text: &str, security: &str| {
        let (src, principal) = match security {
            "unknown" => ("a2", "unknown"),
            _ => ("a1", "spiffe://cluster.local/ns/demo/sa/client"),
        };
        let labels = format!(
            "{{reporter=\"destination\",source_workload=\"{src}\",source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\",source_workload_namespace=\"demo\",source_principal=\"{principal}\",source_app=\"unknown\",source_version=\"unknown\",source_cluster=\"demo\",destination_service=\"unknown\",destination_service_namespace=\"unknown\",destination_service_name=\"unknown\",destination_workload=\"b1\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",destination_workload_namespace=\"demo\",destination_principal=\"spiffe://cluster.local/ns/demo/sa/server\",destination_app=\"unknown\",destination_version=\"unknown\",destination_cluster=\"demo\",request_protocol=\"tcp\",response_flags=\"DENY\",connection_security_policy=\"{security}\",source_region=\"unknown\",source_zone=\"unknown\",destination_region=\"unknown\",destination_zone=\"unknown\"}}"
        );
        metric(text, "istio_tcp_connections_closed_total", &labels).is_some_and(|n| n >= 1.0)
    };
    support::eventually(10, || {
        let text = http_get(&topo, "nb", 15020, "/metrics");
        closed_as_denied(&text, "mutual_tls") && closed_as_denied(&text, "unknown")
    })
    .await;

    // The DENY removed: the ALLOW applies again.
    push(
        &mut xds,
        "p3",
        AUTHORIZATION_TYPE,
        Vec::new(),
        &["demo/deny-all"],
    )
    .await;
    let mut s = topo.connect(A1.name, to_b1).await.unwrap();
    echoes(&mut s, b"allowed again").await;
}

/// The proxy's own HTTP ports listen on every address of the proxy's netns (15020, 15021) or
/// its localhost (15000). A tunnel or plaintext connection to those ports on a pod is dialed in
/// the pod's netns, never the proxy's, so it cannot reach them: it is refused (reset), while
/// the proxy's own ports answer in its netns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_cannot_reach_the_proxys_own_ports() {
    if !can_run() {
        return;
    }
    let topo = Topology::start(bin()).await.unwrap();
    for port in [15000, 15020, 15021] {
        for pod in [A1.name, A2.name] {
            let refused = match topo.connect(pod, B1.addr(port)).await {
                Ok(mut s) => {
                    let _ = s
                        .write_all(b"GET /config_dump HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await;
                    until_closed(&mut s).await
                }
                Err(e) => Err(e.kind()),
            };
            assert!(
                matches!(refused, Err(_) | Ok(0)),
                "{pod} → b1:{port} must not be answered: {refused:?}"
            );
        }
    }
    let reply = http_get(&topo, "nb", 15021, "/healthz/ready");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// Under Istio a local pod's identity is `spiffe://<its workload's trust_domain>/…`, which
/// istiod sends in WDS and no proxy-wide setting knows (Istio's chart never sets
/// TRUST_DOMAIN). Node B's proxy learns b1's workload over xDS with trust domain
/// `old.example`: b1's next connection to a1 presents that identity, and node A's proxy, taking
/// any trust domain its roots verify as ztunnel does, admits it and records it as the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_presents_the_trust_domain_its_workload_names() {
    use hboned::proto::istio::workload as pb;
    use hboned::xds::convert::{ADDRESS_TYPE, AUTHORIZATION_TYPE, workload_resource};
    if !can_run() {
        return;
    }
    let mut topo = Topology::create(bin()).unwrap();
    let listener = loopback_listener(&topo, "nb");
    let mut ads = support::fake_ads::FakeAds::serve(listener);
    let address = format!("http://{}", ads.addr);
    topo.start_proxies(
        bin(),
        |a| a.any_client_trust_domain = true,
        |b| b.xds.address = address,
    )
    .await
    .unwrap();
    let mut xds = ads.accept().await;
    assert_eq!(xds.next().await.type_url, ADDRESS_TYPE);
    assert_eq!(xds.next().await.type_url, AUTHORIZATION_TYPE);
    let b1 = pb::Workload {
        uid: "demo/b1".into(),
        name: "b1".into(),
        namespace: "demo".into(),
        service_account: "server".into(),
        trust_domain: "old.example".into(),
        addresses: vec![B1.ip.octets().to_vec(), B1.ip6.octets().to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        node: "node-b".into(),
        ..Default::default()
    };
    push(
        &mut xds,
        "a1",
        ADDRESS_TYPE,
        vec![workload_resource("demo/b1", "1", b1)],
        &[],
    )
    .await;
    let (_echo, _peers) = testbed::spawn_echo(topo.listen(A1.name, APP_PORT).unwrap());
    let moved = r#"source_principal="spiffe://old.example/ns/demo/sa/server""#;
    // The move follows the push: connect until a connection carries the new identity.
    within(20, async {
        loop {
            let mut s = topo.connect(B1.name, A1.addr(APP_PORT)).await.unwrap();
            echoes(&mut s, b"from b1").await;
            drop(s);
            tokio::time::sleep(Duration::from_millis(200)).await;
            if http_get(&topo, "na", 15020, "/metrics").contains(moved) {
                break;
            }
        }
    })
    .await;
    assert!(
        topo.logs()
            .contains("pod identity follows its workload's trust domain"),
        "node B logs the move"
    );
}

//! hboned in Cilium's place for its ztunnel, against Cilium's own code (tests/real/cilium,
//! github.com/cilium/cilium v1.20.2) and the real SPIRE (v1.13.3): on the two-node topology each
//! node runs Cilium's ZDS server, which installs Cilium's in-pod rules (CILIUM_* chains) in a pod
//! and hands it to the proxy, and serves Workloads over TLS xDS on 127.0.0.1:15012 in Cilium's
//! encoding; hboned runs as Cilium's chart runs its ztunnel (`proxy ztunnel`, the chart's
//! environment plus the SPIRE variables) with certificates from each node's SPIRE agent and a
//! pod's process from the container runtime (a CRI server on the CRI's own types). Needs root
//! and Go; off CI each is skipped when missing, on CI (CI=true) that fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hboned::config::Config;
use hboned::testbed::{self, A1, A2, APP_PORT, B1, B2, B3, Topology};
use support::cilium_agent::{CiliumAgent, CriRuntime, Pod, XdsTls};
use support::kubelet::PodProcess;
use support::spire::{Agent, DELEGATE, Server};
use support::topo::*;
use support::{eventually, within};

/// The user a1's application process runs as (SPIRE's unix attestor: `unix:uid:1001`).
const APP_USER: u32 = 1001;
const A1_UID: &str = "5d0c2c8e-0000-4000-8000-0000000000a1";

fn can_run_here() -> bool {
    can_run() && support::real::have_go()
}

fn node_ip(node: char) -> IpAddr {
    IpAddr::V4(testbed::node_ip(node))
}

fn cilium_pod(topo: &Topology, p: &testbed::Pod, uid: &str) -> Pod {
    Pod {
        uid: uid.into(),
        name: p.name.into(),
        namespace: "demo".into(),
        service_account: p.service_account.into(),
        netns: topo.netns_path(p.name),
        ips: vec![IpAddr::V4(p.ip), IpAddr::V6(p.ip6)],
        node_ip: node_ip(p.node),
    }
}

/// Cilium's bootstrap certificate for its xDS server, self-signed for localhost: the chart
/// mounts it as `/etc/ztunnel/bootstrap-root.crt`, both the server's certificate and the
/// root ztunnel trusts (XDS_ROOT_CA, CA_ROOT_CA).
fn bootstrap(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (
        dir.join("bootstrap-root.crt"),
        dir.join("bootstrap-private.key"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// `iptables-save` of a pod's namespace.
fn rules(topo: &Topology, pod: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.netns_name(pod), "iptables-save"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The environment Cilium's chart gives its ztunnel (templates/ztunnel/daemonset.yaml), with
/// the SPIRE variables of Cilium's SPIRE setup.
fn chart_env<'a>(
    node_ip: &'a str,
    bootstrap: &'a str,
    zds: &'a str,
    spire: &'a str,
    runtime: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("XDS_ADDRESS", "https://localhost:15012"),
        ("XDS_ROOT_CA", bootstrap),
        ("CA_ROOT_CA", bootstrap),
        ("CA_ADDRESS", "https://localhost:15012"),
        ("ISTIO_META_DNS_CAPTURE", "false"),
        ("INPOD_UDS", zds),
        ("NODE_NAME", node_ip),
        ("INSTANCE_IP", node_ip),
        ("ISTIO_META_ENABLE_HBONE", "true"),
        ("SPIRE_ENABLED", "true"),
        ("SPIRE_ADMIN_ENDPOINT_SOCKET", spire),
        ("CONTAINER_RUNTIME_SOCK_PATH", runtime),
    ]
}

/// The whole Cilium + SPIRE shape: the agent enrolls each pod (its rules first, then the
/// proxy's Ack), hboned learns the workloads from the agent's xDS and its certificates from
/// SPIRE (a1's by the PID the runtime names, whose only entry is `unix:uid:1001`; the others by
/// Cilium's selectors). a1 → b1 is TLS on the wire; plaintext to and from non-enrolled pods
/// passes; a disenrolled pod loses its rules and its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cilium_agent_enrolls_pods_for_hboned_on_spire_certificates() {
    if !can_run_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spire = Server::start(dir.path(), "cluster.local", "1h");
    spire.delegate_entry(0);
    for sa in ["server", "b3"] {
        spire.service_account_entry("demo", sa, 0);
    }
    spire.create_entry(
        "/ns/demo/sa/client",
        DELEGATE,
        &[&format!("unix:uid:{APP_USER}")],
        0,
    );
    let (agent_a, agent_b) = (
        Agent::start(&spire, "a", &[DELEGATE]),
        Agent::start(&spire, "b", &[DELEGATE]),
    );
    agent_a.wait_for_own_svid(&spire, DELEGATE);
    agent_b.wait_for_own_svid(&spire, DELEGATE);

    let mut topo = Topology::create_unenrolled(bin()).unwrap();
    let pods = [
        cilium_pod(&topo, &A1, A1_UID),
        cilium_pod(&topo, &B1, "5d0c2c8e-0000-4000-8000-0000000000b1"),
        cilium_pod(&topo, &B3, "5d0c2c8e-0000-4000-8000-0000000000b3"),
    ];
    let (cert, key) = bootstrap(dir.path());
    let mut agents = Vec::new();
    for node in ['a', 'b'] {
        let mut agent = CiliumAgent::start(
            Some(&topo.netns_name(&format!("n{node}"))),
            &dir.path().join(format!("zds-{node}.sock")),
            Some(XdsTls {
                listen: "127.0.0.1:15012",
                cert: &cert,
                key: &key,
            }),
            &dir.path().join(format!("cilium-{node}.log")),
        )
        .await;
        for p in &pods {
            agent.workload(p).await;
        }
        agent.seed(&[]).await;
        agents.push(agent);
    }
    // a1's application process, named by the container runtime of node A.
    let a1 = PodProcess::start_as(
        &topo.netns_name(A1.name),
        A1_UID,
        topo.prefix(),
        Some(APP_USER),
    );
    let runtime = CriRuntime::start(dir.path());
    runtime.set_pods(&[(A1_UID, a1.pid())]);

    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let (ip_a, ip_b) = (node_ip('a').to_string(), node_ip('b').to_string());
    let (zds_a, zds_b) = (
        s(&dir.path().join("zds-a.sock")),
        s(&dir.path().join("zds-b.sock")),
    );
    let (spire_a, spire_b) = (
        format!("unix://{}", agent_a.admin_socket.display()),
        format!("unix://{}", agent_b.admin_socket.display()),
    );
    let no_runtime = s(&dir.path().join("no-runtime.sock"));
    let (cert_s, runtime_s) = (s(&cert), s(&runtime.socket));
    topo.spawn_ztunnel_proxies(
        bin(),
        &chart_env(&ip_a, &cert_s, &zds_a, &spire_a, &runtime_s),
        &chart_env(&ip_b, &cert_s, &zds_b, &spire_b, &no_runtime),
    )
    .unwrap();
    within(60, agents[0].enroll(&pods[0])).await.unwrap();
    for p in &pods[1..] {
        within(60, agents[1].enroll(p)).await.unwrap();
    }
    for p in [A1.name, B1.name, B3.name] {
        assert!(
            rules(&topo, p).contains("CILIUM_OUTPUT"),
            "Cilium's rules in {p}"
        );
        eventually(30, || serves(&topo, p)).await;
    }

    let (_e1, peers_b1) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let (_e2, peers_b2) = testbed::spawn_echo(topo.listen(B2.name, APP_PORT).unwrap());
    let seen = transfer_seen(&topo, &A1, &B1, b"hboned-CILIUM-REAL-marker-e4", 256 * 1024).await;
    assert!(seen.hbone, "a1 ↔ b1 outside HBONE:\n{}", topo.logs());
    assert!(!seen.clear, "plaintext of an enrolled pod on the wire");
    assert_eq!(peers_b1.lock().unwrap().last().unwrap().ip(), A1.ip);
    // Enrolled → not enrolled (no Workload for it): plaintext, as Cilium means it.
    let mut s = topo.connect(A1.name, B2.addr(APP_PORT)).await.unwrap();
    echoes(&mut s, b"to a plain pod").await;
    assert_eq!(peers_b2.lock().unwrap().last().unwrap().ip(), A1.ip);
    // Not enrolled → enrolled: plaintext accepted (permissive).
    let mut s = topo.connect(A2.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut s, b"from a plain pod").await;

    // Cilium disenrolls a1 with a connection open. It removes its rules first
    // (DisenrollEndpoint: DeleteInPodRules, then DelWorkload), and with iptables-nft the nat
    // table goes with its last rule: the reset hboned sends the app when the pod is removed
    // can no longer be translated back and never reaches it. The connection cannot go on all
    // the same: the app's next segment goes to b1 directly, which knows no such connection and
    // resets it.
    let mut live = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut live, b"before the disenrollment").await;
    let done = tokio::time::timeout(Duration::from_secs(60), agents[0].disenroll(&pods[0])).await;
    assert!(matches!(done, Ok(Ok(()))), "{done:?}\n{}", agents[0].log());
    eventually(10, || topo.log(0).contains("pod removed")).await;
    let _ = tokio::io::AsyncWriteExt::write_all(&mut live, b"after").await;
    let ended = tokio::time::timeout(Duration::from_secs(20), until_closed(&mut live)).await;
    assert!(
        matches!(ended, Ok(Err(_)) | Ok(Ok(0))),
        "outlived its pod: {ended:?}\n{}",
        topo.logs()
    );
    assert!(!rules(&topo, A1.name).contains("CILIUM_OUTPUT"));
    eventually(10, || !serves(&topo, A1.name)).await;
    drop(runtime);
}

/// A proxy of node A (its ZDS from the real agent, certificates from the topology's CA), with
/// its own readiness port.
fn node_a(c: &mut Config, zds: &Path, readiness: u16) {
    c.pods.clear();
    c.zds_socket = Some(zds.to_owned());
    c.readiness_address = Some(([127, 0, 0, 1], readiness).into());
    c.admin_address = None;
    c.metrics_address = None;
    c.drain_timeout_secs = 5;
}

fn readiness(topo: &Topology, port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let answer = topo.netns("na").unwrap().run(|| {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    answer.ok()?.get(9..12)?.parse().ok()
}

/// A rolling update (maxSurge 1) under Cilium's agent: the new proxy's connection cancels the
/// old one's session (pkg/ztunnel/zds/server.go, Serve) and gets the snapshot; the two take the
/// session from each other until the old one leaves. Neither one's readiness flaps, the agent
/// keeps running, the old proxy's live connection drains, and at the end the new proxy alone
/// serves a1 (and a pod enrolled during the overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cilium_rolling_update_hands_the_node_over_without_flapping() {
    if !can_run_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut topo = Topology::create_unenrolled(bin()).unwrap();
    // Node B is an ordinary hboned node: its pods carry hboned's own rules.
    for pod in [B1.name, B3.name] {
        topo.install_rules(bin(), pod).unwrap();
    }
    let zds = dir.path().join("zds.sock");
    let mut agent = CiliumAgent::start(None, &zds, None, &dir.path().join("cilium-a.log")).await;
    let a1 = cilium_pod(&topo, &A1, A1_UID);
    let a2 = cilium_pod(&topo, &A2, "5d0c2c8e-0000-4000-8000-0000000000a2");
    agent.seed(std::slice::from_ref(&a1)).await;
    within(
        60,
        topo.start_proxies(bin(), |c| node_a(c, &zds, 15021), |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(readiness(&topo, 15021), Some(200));
    assert!(rules(&topo, A1.name).contains("CILIUM_OUTPUT"));
    let (_echo, _peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let mut live = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut live, b"through the old proxy").await;

    // The new proxy: both ready within seconds, and neither flaps while they overlap.
    let new = topo
        .spawn_extra_proxy(bin(), 'a', |c| node_a(c, &zds, 15031))
        .unwrap();
    eventually(30, || readiness(&topo, 15031) == Some(200)).await;
    // A pod enrolled during the overlap reaches whichever holds the session.
    within(60, agent.enroll(&a2)).await.unwrap();
    for _ in 0..50 {
        assert_eq!(readiness(&topo, 15021), Some(200), "the old proxy flapped");
        assert_eq!(readiness(&topo, 15031), Some(200), "the new proxy flapped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old proxy leaves: its live connection drains, new connections use the new proxy.
    topo.terminate(0).unwrap();
    echoes(&mut live, b"while the old proxy drains").await;
    eventually(30, || topo.exited(0).is_some()).await;
    assert!(agent.pid().is_some(), "the agent kept running");
    eventually(30, || serves(&topo, A1.name) && serves(&topo, A2.name)).await;
    let mut fresh = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut fresh, b"through the new proxy").await;
    assert_eq!(readiness(&topo, 15031), Some(200));
    assert!(topo.exited(new).is_none(), "{}", topo.logs());
    assert!(!agent.log().contains("panic"), "{}", agent.log());
}

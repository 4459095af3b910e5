//! hboned in "Cilium shape" (the AKS design): on each node a fake Cilium agent
//! (tests/support/cilium.rs) enrolls the node's pods over ZDS and serves every enrolled pod as a
//! Workload over xDS on a Unix socket, named by node IP; the proxies read no tables from their
//! config. Needs root; off CI it is skipped when not root, on CI (CI=true) it fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::IpAddr;
use std::path::Path;

use hboned::config::Config;
use hboned::testbed::{self, A1, A2, APP_PORT, B1, B2, PODS, Topology};
use support::agent::ZdsProxy;
use support::cilium::{Pod, Update, Xds, Zds};
use support::topo::*;
use support::within;

/// The node's IP on the node-to-node link.
fn node_ip(node: char) -> IpAddr {
    IpAddr::V4(hboned::testbed::node_ip(node))
}

/// The enrolled pods, as the agents know them (their namespaces opted in).
fn enrolled(topo: &Topology) -> Vec<Pod> {
    PODS.iter()
        .filter(|p| p.enrolled)
        .map(|p| Pod {
            uid: format!("uid-{}", p.name),
            name: p.name.into(),
            namespace: "demo".into(),
            service_account: p.service_account.into(),
            netns: topo.netns_path(p.name),
            ips: vec![IpAddr::V4(p.ip), IpAddr::V6(p.ip6)],
            node_ip: node_ip(p.node),
        })
        .collect()
}

/// A node proxy as Cilium's ztunnel runs: pods from ZDS, workloads from the agent's xDS socket,
/// the node named by its IP, nothing from the config file's tables.
fn cilium_node(c: &mut Config, zds: &Path, xds: &Path, node: char) {
    c.pods.clear();
    c.workloads.clear();
    c.services.clear();
    c.policies.clear();
    c.node = node_ip(node).to_string();
    c.zds_socket = Some(zds.to_owned());
    c.xds.address = format!("unix://{}", xds.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cilium_shape_encrypts_enrolled_pods_and_passes_the_rest() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::create(bin()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pods = enrolled(&topo);
    let mut zds = Vec::new();
    let mut xds_tasks = Vec::new();
    let mut sockets = Vec::new();
    for node in ['a', 'b'] {
        let on_node: Vec<Pod> = pods
            .iter()
            .filter(|p| p.node_ip == node_ip(node))
            .cloned()
            .collect();
        let zds_socket = dir.path().join(format!("ztunnel-{node}.sock"));
        let xds_socket = dir.path().join(format!("xds-{node}.sock"));
        zds.push(Zds::start(&zds_socket, on_node));
        let mut xds = Xds::start(&xds_socket);
        let all = pods.clone();
        xds_tasks.push(tokio::spawn(async move {
            let stream = xds.serve_stream(&all).await;
            (xds, stream)
        }));
        sockets.push((zds_socket, xds_socket));
    }
    let (a, b) = (sockets[0].clone(), sockets[1].clone());
    within(
        60,
        topo.start_proxies(
            bin(),
            |c| cilium_node(c, &a.0, &a.1, 'a'),
            |c| cilium_node(c, &b.0, &b.1, 'b'),
        ),
    )
    .await
    .unwrap();
    // Both streams were served (kept open: a dropped stream would be re-requested).
    let mut streams = Vec::new();
    for task in xds_tasks {
        streams.push(within(30, task).await.unwrap());
    }

    let (_e1, peers_b1) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let (_e2, peers_b2) = testbed::spawn_echo(topo.listen(B2.name, APP_PORT).unwrap());
    // Enrolled → enrolled: only TLS to 15008 on the wire, the marker never in the clear,
    // delivered from a1's own address.
    let seen = transfer_seen(&topo, &A1, &B1, b"hboned-CILIUM-marker-51c9", 256 * 1024).await;
    assert!(seen.hbone, "a1 ↔ b1 outside HBONE");
    assert!(!seen.clear, "plaintext of an enrolled pod on the wire");
    assert_eq!(peers_b1.lock().unwrap().last().unwrap().ip(), A1.ip);

    // Enrolled → not enrolled (unknown to Cilium's xDS): plaintext, as before.
    let mut s = topo.connect(A1.name, B2.addr(APP_PORT)).await.unwrap();
    echoes(&mut s, b"to a plain pod").await;
    assert_eq!(peers_b2.lock().unwrap().last().unwrap().ip(), A1.ip);
    // Not enrolled → enrolled: plaintext accepted (Cilium mTLS is permissive).
    let mut s = topo.connect(A2.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut s, b"from a plain pod").await;
    assert_eq!(peers_b1.lock().unwrap().last().unwrap().ip(), A2.ip);

    // Cilium's DelWorkload for a1 while its connection runs: the connection is reset.
    let mut live = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut live, b"before the Del").await;
    zds[0].send(Update::Del("uid-a1".into())).await.unwrap();
    let ended = within(20, until_closed(&mut live)).await;
    assert!(
        ended.is_err() || ended == Ok(0),
        "the connection outlived its pod: {ended:?}"
    );
    drop(streams);
}

/// Whether the pod in `netns` has the proxy's 15008 listening.
fn serves(netns: &support::agent::ScratchNetns) -> bool {
    let ns = hboned::netns::Netns::open(&netns.path()).unwrap();
    ns.run(|| {
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:15008".parse().unwrap(),
            std::time::Duration::from_secs(1),
        )
    })
    .is_ok()
}

/// A rolling update (maxSurge 1) under Cilium's agent: the new proxy connects while the old one
/// serves; the agent keeps both connections but serves one at a time, closes a third, and hands
/// its updates to the new proxy once the old one has left. The update that met the old proxy's
/// closed connection is lost, as in Cilium (it finds the connection gone only by writing to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_under_ciliums_agent_moves_the_node_to_the_new_proxy() {
    if !can_run() {
        return;
    }
    let id = std::process::id() % 100_000;
    let (p1, p2) = (
        support::agent::ScratchNetns::new(&format!("hbc1{id}")),
        support::agent::ScratchNetns::new(&format!("hbc2{id}")),
    );
    let pod = |uid: &str, netns: &support::agent::ScratchNetns| Pod {
        uid: uid.into(),
        name: uid.into(),
        namespace: "demo".into(),
        service_account: "app".into(),
        netns: netns.path(),
        ips: Vec::new(),
        node_ip: node_ip('a'),
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let agent = Zds::start(&socket, vec![pod("p1", &p1)]);

    let old = ZdsProxy::start(bin(), dir.path(), "old", &socket);
    support::eventually(20, || old.readiness_status() == 200).await;
    assert!(serves(&p1));

    // The new proxy connects and waits its turn; a third connection is closed at once.
    let new = ZdsProxy::start(bin(), dir.path(), "new", &socket);
    support::eventually(20, || agent.accepted() == 2).await;
    let third = hboned::socket::SeqPacket::connect(&socket).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = within(10, third.recv(&mut buf)).await.unwrap();
    assert_eq!(n, 0, "a third proxy connection is closed");
    assert_eq!(
        new.readiness_status(),
        503,
        "no snapshot for the waiting proxy"
    );

    // The old proxy leaves (SIGTERM: drain, ZDS closed).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut old = old;
    within(20, async {
        while old.child.try_wait().unwrap().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    // The next update meets the closed connection and is lost; the one after reaches the new
    // proxy, which serves the pod.
    let lost = agent.send(Update::Add(pod("p2", &p2))).await;
    assert!(lost.is_err(), "{lost:?}");
    agent.send(Update::Add(pod("p2", &p2))).await.unwrap();
    assert!(
        serves(&p2),
        "the new proxy serves the pod added after the handover"
    );
    agent.send(Update::Del("p2".into())).await.unwrap();
    support::eventually(10, || !serves(&p2)).await;
}

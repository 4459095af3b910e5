//! hboned under the first Cilium agents that served ZDS (tests/support/cilium.rs, a stand-in:
//! their code was never released, so the Go module proxy does not serve it; the released agent
//! runs for real in tests/real_cilium.rs). Such an agent dies of a second proxy connection, so
//! a proxy must keep to one connection for as long as its session lives: no parallel dial, no
//! reconnect while served. (A rollout that starts the new proxy while the old one lives crashes
//! that agent whatever the proxy does; deploy/cilium's DaemonSet therefore replaces its pod
//! with maxSurge 0.) Needs root; off CI it is skipped when not root, on CI it fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::agent::{ScratchNetns, ZdsProxy};
use support::cilium::{Update, Zds};
use support::cilium_agent::Pod;
use support::topo::*;
use support::within;

/// Whether the pod in `netns` has the proxy's 15008 listening.
fn serves(netns: &ScratchNetns) -> bool {
    hbone_listens(&hboned::netns::Netns::open(&netns.path()).unwrap())
}

/// One connection for the whole session: the snapshot, an Add, a Del and quiet time in between
/// never make hboned dial again, and the agent never sees a second connection. (When the agent
/// itself ends the session, on an Ack error, a proxy must connect again to hear of its pods,
/// and that agent dies of it: its own bug, fixed before any release.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hboned_keeps_to_one_connection_under_an_agent_that_dies_of_a_second() {
    if !can_run() {
        return;
    }
    let id = std::process::id() % 100_000;
    let (p1, p2) = (
        ScratchNetns::new(&format!("hbc1{id}")),
        ScratchNetns::new(&format!("hbc2{id}")),
    );
    let pod = |uid: &str, netns: &ScratchNetns| Pod {
        uid: uid.into(),
        name: uid.into(),
        namespace: "demo".into(),
        service_account: "app".into(),
        netns: netns.path(),
        ips: Vec::new(),
        node_ip: std::net::Ipv4Addr::LOCALHOST.into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let agent = Zds::start(&socket, vec![pod("p1", &p1)]);
    let proxy = ZdsProxy::start(bin(), dir.path(), "proxy", &socket);
    support::eventually(20, || proxy.readiness_status() == 200).await;
    assert!(serves(&p1));
    agent.send(Update::Add(pod("p2", &p2))).await.unwrap();
    assert!(serves(&p2));
    agent.send(Update::Del("p2".into())).await.unwrap();
    support::eventually(10, || !serves(&p2)).await;
    within(5, tokio::time::sleep(Duration::from_secs(3))).await;
    assert_eq!(agent.accepted(), 1, "a second connection");
    assert!(!agent.crashed());
    assert!(serves(&p1), "the proxy kept its pod");
}

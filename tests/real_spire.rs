//! hboned against the real SPIRE (server and agent v1.13.3, built from the Go module proxy by
//! tests/support/real.rs): on the two-node topology, each node's proxy takes its pods'
//! certificates from its own node's agent through the Delegated Identity API, as Cilium's
//! ztunnel does. Entries are registered as Cilium's operator registers them (one per service
//! account, `k8s:ns` + `k8s:sa`, parent `spiffe://<td>/ztunnel`) and hboned's own entry,
//! `spiffe://<td>/ztunnel` (`unix:uid:0`), is the agents' authorized delegate. The agents
//! attest with the unix workload attestor: a pod attested by PID is selected by `unix:uid`.
//! Needs root and Go; off CI each is skipped when missing, on CI (CI=true) that fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use hboned::config::{CertSourceKind, Config};
use hboned::testbed::{self, A1, APP_PORT, B1, B3, Topology};
use support::kubelet::PodProcess;
use support::spire::{Agent, DELEGATE, Server};
use support::topo::*;
use support::{eventually, within};

/// The user a pod's application process runs as (SPIRE's unix attestor: `unix:uid:1001`).
const APP_USER: u32 = 1001;

fn can_run_here() -> bool {
    can_run() && support::real::have_go()
}

/// Node proxies on SPIRE: each node's agent's admin socket, nothing else changed.
fn on_spire(c: &mut Config, agent: &Agent) {
    c.certificates.source = Some(CertSourceKind::Spire);
    c.certificates.spire_socket = Some(agent.admin_socket.clone());
    c.certificates.spire_timeout_secs = Some(20);
    // No runtime socket here: pods' processes are found in /proc.
    c.certificates.container_runtime_socket = Some(agent.dir().join("no-runtime.sock"));
}

/// The SPIRE server, an agent per node trusting `delegates`, hboned's own entry, and the
/// service-account entries of the topology's enrolled pods (`ttl`: their SVIDs' lifetime).
struct Spire {
    server: Server,
    a: Agent,
    b: Agent,
    /// Entry ids by service account.
    entries: Vec<(String, String)>,
}

fn spire(dir: &Path, delegates: &[&str], ttl: u32, by_selectors: &[&str]) -> Spire {
    let server = Server::start(dir, "cluster.local", "1h");
    server.delegate_entry(0);
    let entries = by_selectors
        .iter()
        .map(|sa| {
            (
                (*sa).to_owned(),
                server.service_account_entry("demo", sa, ttl),
            )
        })
        .collect();
    let a = Agent::start(&server, "a", delegates);
    let b = Agent::start(&server, "b", delegates);
    for agent in [&a, &b] {
        agent.wait_for_own_svid(&server, DELEGATE);
    }
    Spire {
        server,
        a,
        b,
        entries,
    }
}

/// The topology with each node's proxy on its node's agent, every enrolled pod served.
async fn topology_on(spire: &Spire) -> Topology {
    let mut topo = Topology::create(bin()).unwrap();
    within(
        60,
        topo.start_proxies(bin(), |c| on_spire(c, &spire.a), |c| on_spire(c, &spire.b)),
    )
    .await
    .unwrap();
    topo
}

/// Node A's config dump: the certificates it holds.
fn certificates(topo: &Topology, node: &str) -> Vec<serde_json::Value> {
    let dump = http_get(topo, node, 15000, "/config_dump");
    let body = dump.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
    json["certificates"].as_array().cloned().unwrap_or_default()
}

/// The serial numbers of `identity`'s leaf and of the roots it trusts, if it holds one.
fn held(topo: &Topology, node: &str, identity: &str) -> Option<(String, Vec<String>)> {
    let cert = certificates(topo, node)
        .into_iter()
        .find(|c| c["identity"] == identity && c["state"] == "Available")?;
    let serial = |c: &serde_json::Value| c["serialNumber"].as_str().unwrap_or_default().to_owned();
    let leaf = serial(&cert["certChain"][0]);
    let roots = cert["rootCerts"].as_array()?.iter().map(serial).collect();
    Some((leaf, roots))
}

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// A fresh connection a1 → b1 echoes (a tunnel could be built with the certificates held).
async fn tunnel_works(topo: &Topology) -> bool {
    match topo.connect(A1.name, B1.addr(APP_PORT)).await {
        Ok(mut s) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let msg = b"through SPIRE's certificates";
            if s.write_all(msg).await.is_err() {
                return false;
            }
            let mut back = [0u8; 28];
            matches!(
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await,
                Ok(Ok(_))
            ) && &back == msg
        }
        Err(_) => false,
    }
}

/// Selectors for b1 and b3 (Cilium's entries), the pod process for a1: node A subscribes by
/// the PID of a1's application process, which the agent attests (`unix:uid:1001`, the only
/// entry for a1's identity, 16-second SVIDs); node B by selectors. One tunnel carries only TLS;
/// b3, whose identity node A does not expect, is refused. When a1's process is replaced, the
/// next renewal's answer for the old pid is dropped and the subscription follows the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_spire_issues_by_pid_and_by_selectors_to_its_delegate() {
    if !can_run_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spire = spire(dir.path(), &[DELEGATE], 0, &["server", "b3"]);
    spire.server.create_entry(
        "/ns/demo/sa/client",
        DELEGATE,
        &[&format!("unix:uid:{APP_USER}")],
        16,
    );
    let mut topo = Topology::create(bin()).unwrap();
    // a1's pod: its application process as uid 1001, in a cgroup naming its UID.
    let a1_uid = "0f6e1b2a-1111-4000-8000-0000000000a1";
    let a1 = PodProcess::start_as(
        &topo.netns_name(A1.name),
        a1_uid,
        topo.prefix(),
        Some(APP_USER),
    );
    within(
        60,
        topo.start_proxies(
            bin(),
            |c| {
                on_spire(c, &spire.a);
                for p in &mut c.pods {
                    if p.name == A1.name {
                        p.uid = Some(a1_uid.into());
                    }
                }
            },
            |c| on_spire(c, &spire.b),
        ),
    )
    .await
    .unwrap();
    let (_echo, peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let seen = transfer_seen(&topo, &A1, &B1, b"hboned-SPIRE-marker-77e1", 256 * 1024).await;
    assert!(seen.hbone, "a1 ↔ b1 outside HBONE:\n{}", topo.logs());
    assert!(!seen.clear, "plaintext of an enrolled pod on the wire");
    assert_eq!(peers.lock().unwrap().last().unwrap().ip(), A1.ip);
    // Node A holds a1's SVID, issued by SPIRE (its root the server's bundle).
    let bundle = spire.server.bundle();
    let (_, roots) = held(&topo, "na", CLIENT).unwrap();
    assert_eq!(roots.len(), 1, "{roots:?}");
    assert!(held(&topo, "nb", SERVER).is_some());
    assert!(
        bundle.contains("BEGIN CERTIFICATE"),
        "the server's bundle: {bundle}"
    );
    // b3 is issued its own SVID, which node A does not expect for it: refused, reset.
    let (_echo_b3, peers_b3) = testbed::spawn_echo(topo.listen(B3.name, APP_PORT).unwrap());
    // The reset may come before the connect returns, or after the first write.
    if let Ok(mut s) = topo.connect(A1.name, B3.addr(APP_PORT)).await {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"to b3").await;
        let ended = until_closed(&mut s).await;
        assert!(ended.is_err() || ended == Ok(0), "b3 answered: {ended:?}");
    }
    assert!(peers_b3.lock().unwrap().is_empty(), "b3 was reached");

    // a1's container restarts: a new process, the old pid gone (and free for reuse).
    let restarted = PodProcess::start_as(
        &topo.netns_name(A1.name),
        a1_uid,
        topo.prefix(),
        Some(APP_USER),
    );
    let old_pid = a1.pid();
    drop(a1);
    let (leaf_before, _) = held(&topo, "na", CLIENT).unwrap();
    eventually(60, || {
        topo.log(0)
            .contains(&format!("pid {old_pid} no longer belongs to pod {a1_uid}"))
    })
    .await;
    eventually(60, || {
        held(&topo, "na", CLIENT).is_some_and(|(leaf, _)| leaf != leaf_before)
    })
    .await;
    assert!(tunnel_works(&topo).await, "{}", topo.logs());
    drop((restarted, spire));
}

/// A 16-second SVID lifetime: the agent renews at half of it, hboned picks each renewal up, and
/// one live tunnel outlives several. With the client's entry deleted, its last SVID expires
/// and new connections fail closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_spire_renewals_keep_a_live_tunnel_and_a_deleted_entry_fails_closed() {
    if !can_run_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spire = spire(dir.path(), &[DELEGATE], 16, &["client", "server", "b3"]);
    let topo = topology_on(&spire).await;
    let (_echo, _peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let mut live = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    let mut serials = std::collections::BTreeSet::new();
    let started = std::time::Instant::now();
    while serials.len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "fewer than 3 SVIDs in 60 s: {serials:?}\n{}",
            topo.logs()
        );
        echoes(&mut live, b"still here").await;
        if let Some((leaf, _)) = held(&topo, "na", CLIENT) {
            serials.insert(leaf);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // New connections use the renewed certificates too.
    assert!(tunnel_works(&topo).await, "{}", topo.logs());

    // The client's entry goes: its last SVID serves until it expires, then nothing does.
    let (_, client) = spire.entries.iter().find(|(sa, _)| sa == "client").unwrap();
    spire.server.delete_entry(client);
    let deleted = std::time::Instant::now();
    within(40, async {
        while tunnel_works(&topo).await {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(
        deleted.elapsed() > Duration::from_secs(2),
        "the last SVID stopped serving before it expired"
    );
    // Refused for good: no certificate, no plaintext fallback.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!tunnel_works(&topo).await);
    drop(live);
}

/// The agent restarts under running proxies: tunnels go on, and the subscriptions come back.
/// Then the server's X.509 authority is rotated (prepared, activated, the old one tainted and
/// revoked): the new root reaches hboned through the agent's bundle stream, the SVIDs move to
/// it, the old root leaves, and tunnels keep working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_spire_agent_restarts_and_authority_rotation_keep_tunnels_working() {
    if !can_run_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spire = spire(dir.path(), &[DELEGATE], 0, &["client", "server", "b3"]);
    let topo = topology_on(&spire).await;
    let (_echo, _peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    assert!(tunnel_works(&topo).await, "{}", topo.logs());
    let mut live = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut live, b"before the restart").await;

    // Agent A goes away: the live tunnel and new ones (cached certificates) carry on.
    spire.a.stop();
    echoes(&mut live, b"agent down").await;
    assert!(tunnel_works(&topo).await);
    spire.a.restart();

    // A new authority, prepared: both roots in every node's bundle.
    let (_, root_before) = held(&topo, "na", CLIENT).unwrap();
    assert_eq!(root_before.len(), 1);
    let (old, _new) = spire.server.rotate_authority();
    eventually(60, || {
        held(&topo, "na", CLIENT).is_some_and(|(_, roots)| roots.len() == 2)
            && held(&topo, "nb", SERVER).is_some_and(|(_, roots)| roots.len() == 2)
    })
    .await;
    // The old one tainted (agents re-issue every SVID from the new one), then revoked: one
    // root again, not the one before.
    spire
        .server
        .cli(&["localauthority", "x509", "taint", "-authorityID", &old]);
    let (leaf_before, _) = held(&topo, "na", CLIENT).unwrap();
    eventually(60, || {
        held(&topo, "na", CLIENT).is_some_and(|(leaf, _)| leaf != leaf_before)
    })
    .await;
    spire
        .server
        .cli(&["localauthority", "x509", "revoke", "-authorityID", &old]);
    eventually(60, || {
        let one_new = |node, id| {
            held(&topo, node, id).is_some_and(|(_, roots)| roots.len() == 1 && roots != root_before)
        };
        one_new("na", CLIENT) && one_new("nb", SERVER)
    })
    .await;
    assert!(tunnel_works(&topo).await, "{}", topo.logs());
    echoes(&mut live, b"after the rotation").await;
}

/// Agents that do not list hboned's entry among their authorized delegates refuse it: no
/// certificate, the connection reset (never plaintext), and the log names what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_spire_refuses_a_proxy_that_is_no_authorized_delegate() {
    if !can_run_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spire = spire(
        dir.path(),
        &["/someone-else"],
        0,
        &["client", "server", "b3"],
    );
    let topo = topology_on(&spire).await;
    let (_echo, peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    assert!(!tunnel_works(&topo).await, "a tunnel without a certificate");
    assert!(
        peers.lock().unwrap().is_empty(),
        "b1 was reached without a tunnel"
    );
    eventually(30, || {
        topo.log(0)
            .contains("caller not configured as an authorized delegate")
    })
    .await;
    assert!(
        topo.log(0).contains("authorized_delegates"),
        "{}",
        topo.log(0)
    );
}

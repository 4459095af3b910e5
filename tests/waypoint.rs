//! Waypoints on real network namespaces: node A's proxy sends a1's connections to a service
//! with a waypoint, and to a workload with one, to the waypoint — an HBONE server the test runs
//! in pod b2's namespace (b2's address is the waypoint Service's only endpoint), which records
//! what arrived and answers in the destination's stead — never to the destination itself; with
//! the waypoint gone, the connection fails rather than go around it. Needs root; skipped when
//! not root, failing instead on CI.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hboned::config::{GatewayConfig, ServiceConfig};
use hboned::testbed::{self, A1, APP_PORT, B1, B2, B3, SERVICE_PORT, SERVICE_VIP, Topology};
use support::topo::*;
use support::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The waypoint Service's VIP; its endpoint is b2's address.
const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 99);
const WAYPOINT_HOST: &str = "waypoint.demo.svc.cluster.local";

/// One CONNECT the waypoint took: its authority, the client's identity, its `forwarded`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Arrived {
    authority: String,
    client: Option<String>,
    forwarded: Option<String>,
}

/// The waypoint (as `demo/waypoint`, on b2): each CONNECT recorded and answered 200, its bytes
/// sent back behind `waypoint:`.
fn start_waypoint(topo: &Topology) -> (Arc<Mutex<Vec<Arrived>>>, tokio::task::JoinHandle<()>) {
    let arrived: Arc<Mutex<Vec<Arrived>>> = Arc::default();
    let log = arrived.clone();
    let task = support::peer::serve(topo, &B2, "waypoint", move |(req, mut respond, client)| {
        log.lock().unwrap().push(Arrived {
            authority: req
                .uri()
                .authority()
                .map(ToString::to_string)
                .unwrap_or_default(),
            client,
            forwarded: req
                .headers()
                .get("forwarded")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
        let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
            return;
        };
        let mut body = req.into_body();
        tokio::spawn(async move {
            let _ = send.send_data(Bytes::from_static(b"waypoint:"), false);
            while let Some(Ok(data)) = body.data().await {
                let _ = body.flow_control().release_capacity(data.len());
                let _ = send.send_data(data, false);
            }
            let _ = send.send_data(Bytes::new(), true);
        });
    });
    (arrived, task)
}

fn by_address(ip: Ipv4Addr) -> GatewayConfig {
    GatewayConfig {
        address: Some(IpAddr::V4(ip)),
        hostname: None,
        namespace: None,
        hbone_port: 15008,
    }
}

/// What came back for `data` from a connection a1 opens to `to` (EOF after it).
async fn exchange(topo: &Topology, to: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let stream = topo.connect(A1.name, to).await?;
    within(20, testbed::echo_roundtrip(stream, data)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_service_or_workload_with_a_waypoint_go_through_it() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::create(bin()).unwrap();
    let (_e1, peers_b1) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let (_e3, peers_b3) = testbed::spawn_echo(topo.listen(B3.name, APP_PORT).unwrap());
    let (arrived, waypoint) = start_waypoint(&topo);
    topo.start_proxies(
        bin(),
        |a| {
            // The waypoint Service, b2 its endpoint (and its service account `waypoint`).
            a.services.push(ServiceConfig {
                name: "waypoint".into(),
                namespace: "demo".into(),
                hostname: WAYPOINT_HOST.into(),
                vips: vec![IpAddr::V4(WAYPOINT_VIP)],
                ports: [(15008, 15008)].into(),
                subject_alt_names: Vec::new(),
                waypoint: None,
            });
            for w in &mut a.workloads {
                if w.name == B2.name {
                    w.service_account = "waypoint".into();
                    w.services
                        .insert(format!("demo/{WAYPOINT_HOST}"), [(15008, 15008)].into());
                }
                // b3 is behind the waypoint when addressed itself, named by hostname.
                if w.name == B3.name {
                    w.waypoint = Some(GatewayConfig {
                        address: None,
                        hostname: Some(WAYPOINT_HOST.into()),
                        namespace: None,
                        hbone_port: 15008,
                    });
                }
            }
            // The echo service is behind it, named by address.
            for s in &mut a.services {
                if s.name == "echo" {
                    s.waypoint = Some(by_address(WAYPOINT_VIP));
                }
            }
        },
        |_| {},
    )
    .await
    .unwrap();

    // To the service: the waypoint answers, the CONNECT names the VIP and port a1 asked for,
    // the waypoint saw a1's identity; b1 saw nothing.
    let back = exchange(
        &topo,
        SocketAddr::from((SERVICE_VIP, SERVICE_PORT)),
        b"to the service",
    )
    .await
    .unwrap();
    assert_eq!(back, b"waypoint:to the service");
    let first = arrived.lock().unwrap()[0].clone();
    assert_eq!(first.authority, format!("{SERVICE_VIP}:{SERVICE_PORT}"));
    assert_eq!(
        first.client.as_deref(),
        Some("spiffe://cluster.local/ns/demo/sa/client")
    );
    assert!(
        first
            .forwarded
            .as_deref()
            .is_some_and(|f| f.contains(&A1.ip.to_string())),
        "{first:?}"
    );
    // To b3's own address (a workload waypoint): through the waypoint as well.
    let back = exchange(&topo, B3.addr(APP_PORT), b"to the pod")
        .await
        .unwrap();
    assert_eq!(back, b"waypoint:to the pod");
    assert_eq!(
        arrived.lock().unwrap()[1].authority,
        B3.addr(APP_PORT).to_string()
    );
    assert!(
        peers_b1.lock().unwrap().is_empty(),
        "b1 reached around the waypoint"
    );
    assert!(
        peers_b3.lock().unwrap().is_empty(),
        "b3 reached around the waypoint"
    );
    // b1 itself has no waypoint of its own: addressed directly it is reached directly, as
    // under ztunnel (a service's waypoint governs traffic to the service).
    let back = exchange(&topo, B1.addr(APP_PORT), b"direct").await.unwrap();
    assert_eq!(back, b"direct");

    // The waypoint gone: the connection fails; nothing goes around it.
    waypoint.abort();
    let _ = waypoint.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = peers_b1.lock().unwrap().len();
    let failed = exchange(&topo, SocketAddr::from((SERVICE_VIP, SERVICE_PORT)), b"x").await;
    assert!(failed.as_ref().map_or(true, |b| b.is_empty()), "{failed:?}");
    let mut buf = [0u8; 1];
    if let Ok(mut s) = topo.connect(A1.name, B3.addr(APP_PORT)).await {
        let _ = s.write_all(b"y").await;
        let n = within(20, s.read(&mut buf)).await;
        assert!(
            n.map_or(true, |n| n == 0),
            "b3 answered around its waypoint"
        );
    }
    assert_eq!(peers_b1.lock().unwrap().len(), before);
    assert!(peers_b3.lock().unwrap().is_empty());
}

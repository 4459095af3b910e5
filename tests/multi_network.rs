//! Two networks on real network namespaces: node A's proxy is on `net-a` and sees b1 on
//! `net-b`, behind an east-west gateway — an HBONE server the test runs in pod b2's namespace
//! (as `eastwest`), which terminates the outer tunnel and passes its bytes to b1's proxy port
//! as an opaque stream, as Istio's east-west gateway does. a1's connection to the echo service
//! goes as double HBONE: the outer CONNECT to the gateway and the inner one, TLS and HTTP/2 of
//! its own inside it, to `echo.demo.svc.cluster.local:80`, which node B's proxy resolves to b1.
//! Needs root; skipped when not root, failing instead on CI.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hboned::config::GatewayConfig;
use hboned::testbed::{self, A1, APP_PORT, B1, B2, SERVICE_PORT, SERVICE_VIP, Topology};
use support::topo::*;
use support::{pattern, within};

/// What the gateway took: each CONNECT's authority and the client's identity.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The east-west gateway (as `demo/eastwest`, on b2): a CONNECT for the echo service is
/// answered 200 and its stream joined to a TCP connection to b1's HBONE port, byte for byte
/// (the inner tunnel passes through); anything else is 400.
fn start_gateway(topo: &Topology) -> (Seen, tokio::task::JoinHandle<()>) {
    let ns = Arc::new(topo.netns(B2.name).unwrap());
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let task = support::peer::serve(topo, &B2, "eastwest", move |(req, mut respond, client)| {
        let authority = req
            .uri()
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default();
        log.lock().unwrap().push((authority.clone(), client));
        let answer = |status| {
            let mut no = http::Response::new(());
            *no.status_mut() = status;
            no
        };
        if authority != format!("echo.demo.svc.cluster.local:{SERVICE_PORT}") {
            let _ = respond.send_response(answer(http::StatusCode::BAD_REQUEST), true);
            return;
        }
        // The socket is made in b2's namespace, where the gateway runs.
        let socket = ns.run(tokio::net::TcpSocket::new_v4).unwrap();
        tokio::spawn(async move {
            let Ok(mut upstream) = socket.connect(SocketAddr::from((B1.ip, 15008))).await else {
                let _ = respond.send_response(answer(http::StatusCode::SERVICE_UNAVAILABLE), true);
                return;
            };
            let Ok(send) = respond.send_response(http::Response::new(()), false) else {
                return;
            };
            let mut tunnel = hboned::proxy::H2Stream::new(send, req.into_body());
            let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut upstream).await;
        });
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_another_network_is_reached_through_its_gateway_with_double_hbone() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::create(bin()).unwrap();
    let (_e1, peers_b1) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let (seen, _gateway) = start_gateway(&topo);
    topo.start_proxies(
        bin(),
        |a| {
            a.xds.network = "net-a".into();
            for w in &mut a.workloads {
                if w.name == B1.name {
                    w.network = "net-b".into();
                    w.network_gateway = Some(GatewayConfig {
                        address: Some(B2.ip.into()),
                        hostname: None,
                        namespace: None,
                        hbone_port: 15008,
                    });
                }
                // The gateway, a workload of net-b.
                if w.name == B2.name {
                    w.network = "net-b".into();
                    w.service_account = "eastwest".into();
                }
            }
        },
        |_| {},
    )
    .await
    .unwrap();

    let data = pattern(3, 256 * 1024);
    let stream = topo
        .connect(A1.name, SocketAddr::from((SERVICE_VIP, SERVICE_PORT)))
        .await
        .unwrap();
    let back = within(30, testbed::echo_roundtrip(stream, &data))
        .await
        .unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the bytes changed on the way");
    // The outer CONNECT named the service by hostname and came from a1's identity; b1's app
    // got the connection (through node B's proxy, which took the inner CONNECT).
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(
            format!("echo.demo.svc.cluster.local:{SERVICE_PORT}"),
            Some("spiffe://cluster.local/ns/demo/sa/client".to_owned())
        )]
    );
    assert_eq!(peers_b1.lock().unwrap().len(), 1);
    // b1 by its own address, on another network: never dialed directly, never in plaintext.
    let direct = topo.connect(A1.name, B1.addr(APP_PORT)).await;
    if let Ok(s) = direct {
        let r = within(20, testbed::echo_roundtrip(s, b"x")).await;
        assert!(
            r.map_or(true, |b| b.is_empty()),
            "reached across networks directly"
        );
    }
    assert_eq!(peers_b1.lock().unwrap().len(), 1);
}

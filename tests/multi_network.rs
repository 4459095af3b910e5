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

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use hboned::config::GatewayConfig;
use hboned::testbed::{self, A1, APP_PORT, B1, B2, SERVICE_PORT, SERVICE_VIP, Topology};
use support::topo::*;
use support::{pattern, within};

/// What the gateway took: each CONNECT's authority and the client's identity.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;
/// The sizes of the DATA frames the gateway received.
type Frames = Arc<Mutex<Vec<usize>>>;

/// The east-west gateway (as `demo/eastwest`, on b2): a CONNECT for the echo service is
/// answered 200 and its stream joined to a TCP connection to b1's HBONE port, byte for byte
/// (the inner tunnel passes through); anything else is 400. Its HTTP/2 keeps the default
/// largest frame, 16 KiB, as Envoy (Istio's east-west gateway) does.
fn start_gateway(topo: &Topology) -> (Seen, Frames, tokio::task::JoinHandle<()>) {
    let ns = Arc::new(topo.netns(B2.name).unwrap());
    let seen: Seen = Arc::default();
    let frames: Frames = Arc::default();
    let (log, sizes) = (seen.clone(), frames.clone());
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
        let sizes = sizes.clone();
        tokio::spawn(async move {
            let Ok(upstream) = socket.connect(SocketAddr::from((B1.ip, 15008))).await else {
                let _ = respond.send_response(answer(http::StatusCode::SERVICE_UNAVAILABLE), true);
                return;
            };
            let Ok(send) = respond.send_response(http::Response::new(()), false) else {
                return;
            };
            let (up_rd, up_wr) = upstream.into_split();
            tokio::join!(
                frames_to(req.into_body(), up_wr, sizes),
                bytes_to(up_rd, send)
            );
        });
    });
    (seen, frames, task)
}

/// The stream's DATA to `up`, each frame's size kept in `sizes`.
async fn frames_to(
    mut body: h2::RecvStream,
    mut up: tokio::net::tcp::OwnedWriteHalf,
    sizes: Frames,
) {
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        sizes.lock().unwrap().push(data.len());
        if up.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = up.shutdown().await;
}

/// What `up` sends, onto the stream as it is granted; its end ends the stream.
async fn bytes_to(mut up: tokio::net::tcp::OwnedReadHalf, mut send: h2::SendStream<Bytes>) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = up.read(&mut buf).await {
        let mut chunk = Bytes::copy_from_slice(&buf[..n]);
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(granted)) => {
                    let piece = chunk.split_to(granted.min(chunk.len()));
                    if send.send_data(piece, false).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_another_network_is_reached_through_its_gateway_with_double_hbone() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::create(bin()).unwrap();
    let (_e1, peers_b1) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    let (seen, frames, _gateway) = start_gateway(&topo);
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

    let data = pattern(3, 1024 * 1024);
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
    // The outer stream's frames end on the outer TLS records' ends: node A cuts them to 16,375
    // bytes for this gateway's 16 KiB (h2 would cut at 16,384, a record and 9 bytes each).
    let frames = frames.lock().unwrap().clone();
    assert!(
        frames.iter().all(|&n| n <= 16_375),
        "frames of the outer stream: {frames:?}"
    );
    assert!(frames.contains(&16_375), "{frames:?}");
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

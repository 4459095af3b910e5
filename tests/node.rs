//! The node proxy run in-process: built from a typed config, served until a shutdown future the
//! test controls resolves, then drained. No namespaces, no root, no child process.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use hboned::app::Node;
use hboned::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A node with nothing enrolled and its HTTP ports on ephemeral loopback ports.
fn config() -> Config {
    let loopback = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    Config {
        readiness_address: loopback,
        metrics_address: loopback,
        admin_address: None,
        drain_timeout_secs: 5,
        ..Config::default()
    }
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_node_serves_until_its_shutdown_future_and_then_returns() {
    let node = Node::build(config(), hboned::admin::LogControl::inert()).unwrap();
    let readiness = node.readiness_address().unwrap();
    let metrics = node.metrics_address().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(node.serve(async {
        let _ = stopped.await;
    }));

    // No node agent and no control plane configured: ready at once.
    assert!(
        get(readiness, "/healthz/ready")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let text = get(metrics, "/metrics").await;
    assert!(
        text.contains("hboned_certificate_renewals_total 0"),
        "{text}"
    );
    assert!(!served.is_finished(), "serving until told to stop");

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("drained and returned within the drain timeout")
        .unwrap();
    // The node's own servers ended with it: nothing answers on their ports any more.
    for addr in [readiness, metrics] {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still answers after the node returned"
        );
    }
}

#[tokio::test]
async fn a_node_waiting_for_its_control_plane_is_not_ready() {
    // An xDS address nothing listens on: the node runs from its config, unready.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let mut config = config();
    config.xds.address = address;
    let node = Node::build(config, hboned::admin::LogControl::inert()).unwrap();
    let readiness = node.readiness_address().unwrap();
    assert!(
        get(readiness, "/healthz/ready")
            .await
            .starts_with("HTTP/1.1 503")
    );
    node.serve(async {}).await;
}

#[tokio::test]
async fn a_certificate_source_without_its_section_refuses_to_build() {
    let mut config = config();
    config.certificates.source = Some(hboned::config::CertSourceKind::Spire);
    let err = Node::build(config, hboned::admin::LogControl::inert()).unwrap_err();
    assert!(
        err.to_string().contains("certificates.spireSocket"),
        "{err:#}"
    );
}

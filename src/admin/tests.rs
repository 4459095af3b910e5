//! Tests of `admin`.

use super::*;

async fn get(addr: SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out[9..12].parse().unwrap()
}

#[tokio::test]
async fn ready_only_after_every_source() {
    let (zds_tx, zds) = watch::channel(false);
    let (xds_tx, xds) = watch::channel(false);
    let ready = all_ready(vec![zds, xds]);
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_readiness(listener, ready.clone()));
    assert_eq!(get(addr, "/healthz/ready").await, 503);
    zds_tx.send_replace(true);
    tokio::task::yield_now().await;
    assert_eq!(get(addr, "/healthz/ready").await, 503, "xDS not ready yet");
    xds_tx.send_replace(true);
    let mut r = ready.clone();
    tokio::time::timeout(std::time::Duration::from_secs(5), r.wait_for(|v| *v))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(get(addr, "/healthz/ready").await, 200);
    assert_eq!(get(addr, "/nope").await, 404);
}

#[tokio::test]
async fn nothing_to_wait_for_is_ready() {
    let ready = all_ready(vec![]);
    assert!(*ready.borrow());
}

//! Tests of `pool`: what a pooled connection's task holds for the connection's life.

use super::*;

/// A client HBONE connection's task holds the connection once, with its keepalive and what it
/// reports to: ~2.5 KiB (jemalloc's 2,560 class with tokio's 104 bytes), where an `async`
/// block awaiting an async fn around `select!` held it three times (7,472 bytes, the 8,192
/// class) for every pooled connection's life.
#[test]
fn a_connection_task_holds_its_connection_once() {
    type Conn = h2::client::Connection<
        PeerFrames<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        Bytes,
    >;
    fn size<Fut>(_: impl FnOnce(Conn) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }
    let settings = TunnelSettings::default();
    let peer: SocketAddr = "10.0.0.1:15008".parse().unwrap();
    let task = size(|conn| connection_task(conn, &settings, peer, None));
    let conn = std::mem::size_of::<Conn>();
    assert!(
        task <= conn + 128,
        "a connection's task is {task} bytes for a connection of {conn}"
    );
}

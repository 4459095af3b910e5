//! Socket options, in one place: TCP_NODELAY and keepalive on every proxied socket, SO_MARK and
//! SO_REUSEPORT for sockets in pod namespaces, SO_ORIGINAL_DST for redirected connections, and
//! IP_TRANSPARENT for delivering with the client's source address. This is the only module
//! (with `netns`) that touches raw socket options.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, Socket, TcpKeepalive};
use tokio::net::TcpStream;

/// The mark on every socket the proxy creates in a pod netns: the redirect rules skip it.
pub const PROXY_MARK: u32 = 0x539;
/// The mark the rules give to connections that arrived carrying [`PROXY_MARK`] (connmark), so
/// that replies route back to the proxy through table 100.
pub const CONN_MARK: u32 = 0x111;
/// The bits of the mark the rules look at.
pub const MARK_MASK: u32 = 0xfff;

/// Keepalive probes start after this much idle time.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(180);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(180);
const KEEPALIVE_RETRIES: u32 = 9;

/// TCP_NODELAY and TCP keepalive, for every socket the proxy reads or writes (DESIGN §4).
pub fn set_stream_options(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// Makes the next close of `stream` send RST instead of FIN: how a reset on the far side of a
/// tunnel is passed on to the application.
pub fn reset_on_close(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Marks a socket so the pod's redirect rules let its packets through.
pub fn set_mark(socket: &Socket, mark: u32) -> io::Result<()> {
    socket.set_mark(mark)
}

/// Lets an old and a new proxy listen on the same port during an upgrade.
pub fn set_reuse_port(socket: &Socket) -> io::Result<()> {
    socket.set_reuse_port(true)
}

/// Allows binding a non-local source address (the client's IP) before connecting.
pub fn set_transparent(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}

/// Where a redirected connection was headed: SO_ORIGINAL_DST (REDIRECT), else the socket's
/// local address (TPROXY keeps the original destination there).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match orig.ok().and_then(|a| a.as_socket()) {
        Some(addr) => Ok(addr),
        None => Ok(local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_are_applied() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        set_stream_options(&s).unwrap();
        assert!(s.nodelay().unwrap());
        assert!(SockRef::from(&s).keepalive().unwrap());
        reset_on_close(&s).unwrap();
        assert_eq!(SockRef::from(&s).linger().unwrap(), Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn original_dst_falls_back_to_the_local_address() {
        // No REDIRECT rule on loopback: the TPROXY fallback applies.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        assert_eq!(original_dst(&accepted).unwrap(), addr);
    }
}

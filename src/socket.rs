//! Socket options, in one place: TCP_NODELAY and keepalive on every proxied socket. This is the
//! only module (with `netns`) allowed to touch raw socket options; later additions (SO_MARK,
//! SO_ORIGINAL_DST, IP_TRANSPARENT) belong here too.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

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
}

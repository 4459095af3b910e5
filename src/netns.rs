//! The socket-creation seam. Every socket the proxy listens or dials on is made by a
//! [`SocketFactory`], so the same proxy code runs in the node's netns, inside a pod's netns
//! (where sockets must be created and marked), and in loopback tests.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::socket;

/// Creates the proxy's sockets. Implementations decide the network namespace and the marks.
pub trait SocketFactory: Send + Sync + fmt::Debug {
    /// An unconnected TCP socket of `addr`'s family.
    fn tcp_socket(&self, addr: SocketAddr) -> io::Result<TcpSocket>;
    /// A listener bound to `addr`.
    fn tcp_bind(&self, addr: SocketAddr) -> io::Result<TcpListener>;
}

/// Sockets in the current network namespace, with no mark: loopback tests and the node netns.
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultSocketFactory;

impl SocketFactory for DefaultSocketFactory {
    fn tcp_socket(&self, addr: SocketAddr) -> io::Result<TcpSocket> {
        if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    }

    fn tcp_bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.tcp_socket(addr)?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    }
}

/// Dials `dst` through `factory` within `timeout`, from `source` when given (port chosen by
/// the kernel), with the proxy's stream options set.
pub async fn dial(
    factory: &dyn SocketFactory,
    source: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = factory.tcp_socket(dst)?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out after {timeout:?}"),
            )
        })??;
    socket::set_stream_options(&stream)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn default_factory_binds_and_dials() {
        let f = DefaultSocketFactory;
        let l = f.tcp_bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let (dialed, accepted) =
            tokio::join!(dial(&f, None, addr, Duration::from_secs(5)), l.accept());
        let dialed = dialed.unwrap();
        assert!(dialed.nodelay().unwrap());
        assert_eq!(accepted.unwrap().1, dialed.local_addr().unwrap());
    }

    #[tokio::test]
    async fn dial_refused_is_an_error() {
        let f = DefaultSocketFactory;
        // Bind then drop, so the port is (almost certainly) closed.
        let addr = f
            .tcp_bind("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .local_addr()
            .unwrap();
        let err = dial(&f, None, addr, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
}

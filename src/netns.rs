//! The socket-creation seam. Every socket the proxy listens or dials on is made by a
//! [`SocketFactory`], so the same proxy code runs in the node's netns, inside a pod's netns
//! (where sockets are created by entering it and carry the proxy mark), and in loopback tests.
//!
//! A socket belongs to the network namespace it was created in, whatever thread uses it later.
//! [`Netns::run`] enters a namespace on the calling thread only, for the few syscalls that
//! create a socket, and always returns the thread to where it was.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use crate::socket;

/// Creates the proxy's sockets. Implementations decide the network namespace and the marks.
pub trait SocketFactory: Send + Sync + fmt::Debug {
    /// An unconnected TCP socket of `addr`'s family.
    fn tcp_socket(&self, addr: SocketAddr) -> io::Result<TcpSocket>;
    /// A listener bound to `addr`.
    fn tcp_bind(&self, addr: SocketAddr) -> io::Result<TcpListener>;
    /// A UDP socket bound to `addr` (the DNS proxy's server and upstream sockets).
    fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket>;
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

    fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let s = std::net::UdpSocket::bind(addr)?;
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s)
    }
}

/// A network namespace, held open by a file descriptor.
#[derive(Debug)]
pub struct Netns {
    file: File,
    name: String,
}

impl Netns {
    /// Opens a namespace by path (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open netns {}: {e}", path.display()),
            )
        })?;
        Ok(Netns {
            file,
            name: path.display().to_string(),
        })
    }

    /// Wraps a namespace fd received from the node agent.
    pub(crate) fn from_fd(fd: OwnedFd, name: String) -> Self {
        Netns {
            file: File::from(fd),
            name,
        }
    }

    /// The descriptor that holds the namespace (handed to a proxy over ZDS by the agent).
    #[cfg(feature = "kubernetes")]
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.as_fd()
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// A second handle on the same namespace (a duplicated descriptor).
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(Netns {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// The namespace's inode: equal inodes are the same namespace.
    pub(crate) fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.ino())
    }

    /// The namespace's global-scope unicast addresses (loopback and link-local left out).
    pub(crate) fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        let ifaddrs = self.run(|| Ok(nix::ifaddrs::getifaddrs()?))?;
        let mut out = Vec::new();
        for ifa in ifaddrs {
            let Some(addr) = ifa.address else { continue };
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let link_local = match ip {
                IpAddr::V4(v4) => v4.is_link_local(),
                IpAddr::V6(v6) => v6.is_unicast_link_local(),
            };
            if !ip.is_loopback() && !link_local && !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// Runs `f` with the calling thread inside this namespace, then moves the thread back.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(&self.file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("cannot enter netns {}: {e}", self.name)))?;
        let _back = Return(home);
        f()
    }
}

impl Netns {
    /// Lets connections waiting in a closing listener's accept queue move to another listener
    /// of its SO_REUSEPORT group (`net.ipv4.tcp_migrate_req`, Linux 5.14+), so a proxy that
    /// stops listening during an upgrade's drain resets none of them. Scoped to this netns.
    pub(crate) fn enable_accept_queue_migration(&self) -> io::Result<()> {
        self.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))
    }
}

/// Puts the thread back into its namespace, also when the closure panicked.
struct Return(File);

impl Drop for Return {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.0, CloneFlags::CLONE_NEWNET) {
            // A worker thread left in a pod's namespace would create later sockets there:
            // stopping is the only safe outcome.
            tracing::error!(error = %e, "cannot return a thread to its network namespace; aborting");
            std::process::abort();
        }
    }
}

/// Sockets inside a pod's namespace, each carrying the proxy mark (docs/design.md §3); listeners set
/// SO_REUSEPORT so an old and a new proxy can overlap, and IP_TRANSPARENT so connections a
/// TPROXY rule set hands over (istio-cni releases that use it) are accepted as well as
/// REDIRECTed ones, as ztunnel's in-pod listeners do.
#[derive(Debug, Clone)]
pub(crate) struct PodSocketFactory {
    netns: Arc<Netns>,
    mark: u32,
}

impl PodSocketFactory {
    pub(crate) fn new(netns: Arc<Netns>) -> Self {
        PodSocketFactory {
            netns,
            mark: socket::PROXY_MARK,
        }
    }

    fn raw(&self, addr: SocketAddr) -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket::set_mark(&s, self.mark)?;
        s.set_nonblocking(true)?;
        s.set_cloexec(true)?;
        Ok(s)
    }
}

impl SocketFactory for PodSocketFactory {
    fn tcp_socket(&self, addr: SocketAddr) -> io::Result<TcpSocket> {
        let s = self.netns.run(|| self.raw(addr))?;
        Ok(TcpSocket::from_std_stream(s.into()))
    }

    fn tcp_bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let s = self.netns.run(|| {
            let s = self.raw(addr)?;
            if addr.is_ipv6() {
                // IPv4 has its own listener; a dual-stack socket would take its port.
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            socket::set_reuse_port(&s)?;
            if let Err(e) = socket::set_transparent(&s, addr.is_ipv6()) {
                // Without CAP_NET_ADMIN: REDIRECT rules still work, TPROXY ones will not.
                tracing::debug!(%addr, error = %e, "pod listener without IP_TRANSPARENT");
            }
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(s)
        })?;
        TcpListener::from_std(s.into())
    }

    fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let s = self.netns.run(|| {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            socket::set_mark(&s, self.mark)?;
            s.set_nonblocking(true)?;
            s.set_cloexec(true)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&addr.into())?;
            Ok::<_, io::Error>(s)
        })?;
        UdpSocket::from_std(s.into())
    }
}

/// Dials `dst` through `factory` within `timeout`, with the proxy's stream options set. With
/// `source`, the socket binds that address first (IP_TRANSPARENT, so it may be the client's
/// IP, not ours); where the kernel refuses, it dials from its own address instead.
pub(crate) async fn dial(
    factory: &dyn SocketFactory,
    source: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = factory.tcp_socket(dst)?;
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == dst.is_ipv4()) {
        let sock = SockRef::from(&socket);
        // Best effort: without it the bind below still works, only slower under load.
        let _ = socket::set_bind_address_no_port(&sock);
        let bound = socket::set_transparent(&sock, ip.is_ipv6())
            .and_then(|()| socket.bind(SocketAddr::new(ip, 0)));
        if let Err(e) = bound {
            tracing::debug!(%ip, %dst, error = %e, "cannot dial from the client's address; using our own");
        }
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
mod tests;

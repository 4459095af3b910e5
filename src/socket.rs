//! Socket options, in one place: TCP_NODELAY and keepalive on every proxied socket, SO_MARK and
//! SO_REUSEPORT for sockets in pod namespaces, SO_ORIGINAL_DST for redirected connections, and
//! IP_TRANSPARENT for delivering with the client's source address. This is the only module
//! (with `netns`) that touches raw socket options.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, listen, recvmsg, sendmsg, socket, socketpair,
};
use socket2::{SockRef, Socket, TcpKeepalive};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

/// The mark on every socket the proxy creates in a pod netns: the redirect rules skip it.
pub(crate) const PROXY_MARK: u32 = 0x539;

/// Keepalive probes start after this much idle time.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(180);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(180);
const KEEPALIVE_RETRIES: u32 = 9;

/// TCP_NODELAY and TCP keepalive, for every socket the proxy reads or writes (docs/design.md §4).
pub(crate) fn set_stream_options(stream: &TcpStream) -> io::Result<()> {
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
pub(crate) fn set_mark(socket: &Socket, mark: u32) -> io::Result<()> {
    socket.set_mark(mark)
}

/// Lets an old and a new proxy listen on the same port during an upgrade.
pub(crate) fn set_reuse_port(socket: &Socket) -> io::Result<()> {
    socket.set_reuse_port(true)
}

/// Allows binding a non-local source address (the client's IP) before connecting.
pub(crate) fn set_transparent(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}

/// Defers the choice of a source port from `bind` to `connect` (IP_BIND_ADDRESS_NO_PORT):
/// binding the client's address with port 0 would otherwise search the ephemeral range for a
/// port free on that address alone, a search that grows with every connection from that client
/// (seen as seconds of CPU and CONNECT timeouts with 10,000 connections from one pod).
pub(crate) fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(io::Error::from)
}

/// Where a redirected connection was headed: SO_ORIGINAL_DST (REDIRECT), else the socket's
/// local address (TPROXY keeps the original destination there).
pub(crate) fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
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

/// Most file descriptors one datagram may carry (ZDS sends exactly one).
const MAX_FDS: usize = 4;

/// A Unix SOCK_SEQPACKET socket (the ZDS transport): one message per datagram, with file
/// descriptors passed by SCM_RIGHTS.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

/// Registers an owned descriptor with the runtime.
fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open, and always reports the
    // same number, for as long as it is owned, here by the AsyncFd.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

impl SeqPacket {
    /// Connects to a listening socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = seqpacket_socket()?;
        connect(fd.as_raw_fd(), &UnixAddr::new(path)?).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot connect to {}: {e}", path.display()),
            )
        })?;
        Ok(SeqPacket { fd: async_fd(fd)? })
    }

    /// Two connected ends (for tests and in-process agents).
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((
            SeqPacket { fd: async_fd(a)? },
            SeqPacket { fd: async_fd(b)? },
        ))
    }

    /// Sends one datagram, with `fds` attached.
    pub async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let cmsgs: &[ControlMessage] = if raw.is_empty() {
                &[]
            } else {
                &[ControlMessage::ScmRights(&raw)]
            };
            match guard.try_io(|fd| {
                sendmsg::<()>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(data)],
                    cmsgs,
                    MsgFlags::empty(),
                    None,
                )
                .map_err(io::Error::from)
            }) {
                Ok(res) => return res.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one datagram into `buf`: its length (0 at EOF) and the fds it carried. A
    /// datagram larger than `buf` is an error, never silently cut.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_once(fd.as_raw_fd(), buf)) {
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }
}

fn recv_once(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for raw in received {
                // SAFETY: the kernel just installed `raw` in our table for us; nothing else
                // owns it, so this OwnedFd is its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "datagram or its file descriptors truncated",
        ));
    }
    Ok((msg.bytes, fds))
}

/// A listening SOCK_SEQPACKET socket (the node agent's side; tests and the demo use it).
#[derive(Debug)]
pub struct SeqPacketListener {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacketListener {
    pub fn bind(path: &Path) -> io::Result<Self> {
        let fd = seqpacket_socket()?;
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        listen(&fd, Backlog::new(16)?)?;
        Ok(SeqPacketListener { fd: async_fd(fd)? })
    }

    pub async fn accept(&self) -> io::Result<SeqPacket> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                accept4(fd, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)
                    .map_err(io::Error::from)
            }) {
                Ok(res) => {
                    return Ok(SeqPacket {
                        fd: async_fd(res?)?,
                    });
                }
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! The upstream resolvers: read from a resolv.conf (its `nameserver` lines and its `timeout`
//! and `attempts` options, through hickory's parser), and asked with the client's own query
//! bytes over the transport the client used, UDP or TCP, from the pod's network namespace with
//! the proxy's mark (so the pod's DNS capture lets them out).
//!
//! The servers are tried in order, `attempts` rounds at most, each waiting `timeout`. An answer
//! is taken unless it is SERVFAIL or REFUSED, which are retried on the next server as a stub
//! resolver does (the last such one is relayed when no server does better); a server that
//! does not answer at all is skipped. A UDP answer with TC set is relayed as it is: the client
//! asks again over TCP, which is then forwarded over TCP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::SocketFactory;

/// Where names discovery does not know are asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upstream {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    attempts: usize,
}

/// Why the resolv.conf gave no upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} names no usable nameserver: {source}")]
    Parse {
        path: String,
        source: hickory_resolver::net::NetError,
    },
}

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("no upstream nameserver answered within {0:?}")]
    NoAnswer(Duration),
    #[error("the query is not one message")]
    BadQuery,
}

impl Upstream {
    /// The resolvers of the resolv.conf at `path`.
    pub(crate) fn from_resolv_conf(path: &Path) -> Result<Upstream, UpstreamConfigError> {
        let shown = path.display().to_string();
        let data = std::fs::read(path).map_err(|source| UpstreamConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let (config, opts) =
            hickory_resolver::system_conf::parse_resolv_conf(data).map_err(|source| {
                UpstreamConfigError::Parse {
                    path: shown,
                    source,
                }
            })?;
        let servers = config
            .name_servers()
            .iter()
            .map(|ns| {
                let port = ns.connections.first().map_or(53, |c| c.port);
                SocketAddr::new(ns.ip, port)
            })
            .collect();
        Ok(Upstream::new(servers, opts.timeout, opts.attempts))
    }

    pub(crate) fn new(servers: Vec<SocketAddr>, timeout: Duration, attempts: usize) -> Upstream {
        Upstream {
            servers,
            // resolv.conf's bounds: timeout 1..=30 s, attempts 1..=5.
            timeout: timeout.clamp(Duration::from_secs(1), Duration::from_secs(30)),
            attempts: attempts.clamp(1, 5),
        }
    }

    pub(crate) fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Asks the upstream `query` (a whole DNS message as the client sent it) over TCP when
    /// `tcp`, else UDP; returns the answer's bytes. `max_udp` bounds a UDP answer (the client's
    /// advertised size).
    pub(crate) async fn exchange(
        &self,
        sockets: &dyn SocketFactory,
        query: &[u8],
        tcp: bool,
        max_udp: usize,
    ) -> Result<Vec<u8>, UpstreamError> {
        if query.len() < 12 || (tcp && query.len() > usize::from(u16::MAX)) {
            return Err(UpstreamError::BadQuery);
        }
        let mut fallback = None;
        for _ in 0..self.attempts {
            for server in &self.servers {
                let asked = if tcp {
                    ask_tcp(sockets, *server, query, self.timeout).await
                } else {
                    ask_udp(sockets, *server, query, self.timeout, max_udp).await
                };
                let answer = match asked {
                    Ok(answer) => answer,
                    Err(e) => {
                        tracing::debug!(%server, tcp, error = %e, "upstream nameserver did not answer");
                        continue;
                    }
                };
                match response_code(&answer) {
                    ResponseCode::ServFail | ResponseCode::Refused => fallback = Some(answer),
                    _ => return Ok(answer),
                }
            }
            if fallback.is_some() {
                break;
            }
        }
        fallback.ok_or(UpstreamError::NoAnswer(
            self.timeout * (self.attempts * self.servers.len()) as u32,
        ))
    }
}

/// The RCODE of a message's header (the low 4 bits of its fourth byte).
fn response_code(message: &[u8]) -> ResponseCode {
    ResponseCode::from_low(message.get(3).map_or(2, |b| b & 0x0f))
}

/// The ID in a message's header.
fn id(message: &[u8]) -> Option<[u8; 2]> {
    Some([*message.first()?, *message.get(1)?])
}

async fn ask_udp(
    sockets: &dyn SocketFactory,
    server: SocketAddr,
    query: &[u8],
    timeout: Duration,
    max_udp: usize,
) -> std::io::Result<Vec<u8>> {
    let any = match server.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = sockets.udp_bind(SocketAddr::new(any, 0))?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let want = id(query);
    let mut buf = vec![0u8; max_udp.clamp(512, usize::from(u16::MAX))];
    let read = async {
        loop {
            // A datagram that is not the answer (another ID, too short) is dropped, as a
            // stub resolver does against spoofing; the wait goes on until the timeout.
            let n = socket.recv(&mut buf).await?;
            if n >= 12 && id(&buf[..n]) == want && buf[2] & 0x80 != 0 {
                buf.truncate(n);
                return Ok::<_, std::io::Error>(std::mem::take(&mut buf));
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

async fn ask_tcp(
    sockets: &dyn SocketFactory,
    server: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = sockets.tcp_socket(server)?.connect(server).await?;
        // RFC 1035 §4.2.2: each message behind its two-byte length, in one write.
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let want = id(query);
        loop {
            let len = usize::from(stream.read_u16().await?);
            let mut answer = vec![0u8; len];
            stream.read_exact(&mut answer).await?;
            if len >= 12 && id(&answer) == want {
                return Ok::<_, std::io::Error>(answer);
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

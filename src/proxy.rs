//! The data path. [`outbound`] holds and routes app connections, [`pool`] is the HBONE client
//! (connector side: TLS + HTTP/2 connections to peer proxies, pooled), [`inbound`] the HBONE
//! server (listener side), [`tunnel`] the HTTP/2
//! pieces both share, [`copy`] the byte relay. Wire formats live in `crate::hbone`, TLS in
//! `crate::tls`; sockets come only from a `crate::netns::SocketFactory`.

pub(crate) mod copy;
pub mod inbound;
pub(crate) mod live;
pub(crate) mod outbound;
pub(crate) mod passthrough;
pub(crate) mod pod;
pub(crate) mod pool;
pub(crate) mod tunnel;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::identity::manager::CertError;
use crate::tls::TlsError;

use crate::authz;
use crate::metrics::Outcome;

pub use inbound::{InboundServer, LocalWorkload};
pub use outbound::{Dice, Outbound, Route, Router, StateRouter};
pub use pool::{HboneClient, PoolKey};
pub use tunnel::{H2Stream, TunnelSettings};

/// Whether the pod a listener serves is still enrolled. Its live connections end when it is
/// removed (DelWorkload, its netns gone), not when the proxy drains: a drain lets them finish.
#[derive(Debug, Clone, Default)]
pub struct PodLife {
    removal: Option<std::sync::Arc<RemovalState>>,
    /// The pod's live connections (admin page); none outside a pod.
    connections: Option<std::sync::Arc<live::ConnectionTable>>,
}

/// The switch that ends a pod's live connections ([`Removal::remove`]); dropping it without
/// that, as a drain does, ends nothing.
#[derive(Debug)]
pub struct Removal(std::sync::Arc<RemovalState>);

/// A flag and a [`tokio::sync::Notify`], not a `watch`: every live connection waits on it, and
/// a `Notify` wait is 64 bytes where a `watch` wait is 144 (see `PodLife::removed`).
#[derive(Debug, Default)]
struct RemovalState {
    gone: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Removal {
    /// The pod is removed: its live connections end, and any that starts from now on at once.
    pub fn remove(&self) {
        self.0.gone.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }
}

impl PodLife {
    /// A pod's life and the switch that ends it.
    pub fn new() -> (Removal, PodLife) {
        let state = std::sync::Arc::new(RemovalState::default());
        let life = PodLife {
            removal: Some(state.clone()),
            connections: Some(Default::default()),
        };
        (Removal(state), life)
    }

    /// The pod's live connections, if it is a pod.
    pub fn connections(&self) -> Option<&std::sync::Arc<live::ConnectionTable>> {
        self.connections.as_ref()
    }

    /// Whether the pod was removed (never, for no pod).
    pub(crate) fn is_removed(&self) -> bool {
        self.removal
            .as_ref()
            .is_some_and(|r| r.gone.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Resolves once the pod is removed; never for a pod that stays, or for no pod.
    pub(crate) async fn removed(&self) {
        let Some(removal) = &self.removal else {
            return std::future::pending().await;
        };
        // Registered before the flag is read: a removal between the two still wakes this
        // (`notify_waiters` reaches every `Notified` created before it).
        let mut notified = std::pin::pin!(removal.notify.notified());
        notified.as_mut().enable();
        if !self.is_removed() {
            notified.await;
        }
    }
}

/// Why the proxy ended a live connection itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A policy change now denies it.
    Denied(authz::Decision),
    /// Its pod was removed.
    PodRemoved,
}

impl Stop {
    /// How the connection it stopped ended.
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Stop::Denied(_) => Outcome::Denied,
            Stop::PodRemoved => Outcome::PodRemoved,
        }
    }
}

/// Which side of the proxy an error came from, as pingora records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The peer proxy or application we connected to.
    Upstream,
    /// Our own state (certificates, configuration).
    Internal,
}

/// Errors of the HBONE data path; each knows its side and a short reason for metrics and logs.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] TlsError),
    #[error("TCP connect to {addr} failed: {source} (is port 15008 reachable between the nodes?)")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP/2 with {addr} failed: {source}")]
    Http2 { addr: SocketAddr, source: h2::Error },
    #[error("peer {addr} answered {status} to CONNECT {authority}")]
    Status {
        addr: SocketAddr,
        authority: crate::hbone::Authority,
        status: http::StatusCode,
    },
    #[error("{what} with {addr} timed out after {after:?}")]
    Timeout {
        what: &'static str,
        addr: SocketAddr,
        after: Duration,
    },
}

impl ProxyError {
    /// Where the failure lies: our own state (a certificate) or the peer (logged with it).
    pub(crate) fn side(&self) -> Side {
        match self {
            ProxyError::Certificate(_) | ProxyError::TlsConfig(_) => Side::Internal,
            _ => Side::Upstream,
        }
    }

    /// A short, stable reason string (a metrics label value).
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Certificate(_) => "no_certificate",
            ProxyError::TlsConfig(_) => "tls_config",
            ProxyError::Connect { .. } => "connect_failed",
            ProxyError::Tls { source, .. } if revoked(source) => "cert_revoked",
            ProxyError::Tls { .. } => "tls_failed",
            ProxyError::Http2 { .. } => "http2_failed",
            ProxyError::Status { .. } => "connect_refused",
            ProxyError::Timeout { .. } => "timeout",
        }
    }
}

/// Whether a TLS handshake failed because the peer's certificate is revoked (`crlPath`).
fn revoked(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            )
        })
}

/// Accepts the next connection on `listener`. Accept errors (out of file descriptors and the
/// like) are logged and retried after a pause instead of spinning or ending the listener.
async fn accept(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    let mut failures = 0u64;
    loop {
        match listener.accept().await {
            Ok(conn) => {
                if failures > 0 {
                    tracing::info!(listener = what, failures, "accepting again");
                }
                return conn;
            }
            Err(e) => {
                // One warning a streak: at the descriptor limit this repeats ten times a second.
                if failures == 0 {
                    tracing::warn!(listener = what, error = %e, "accept failed; retrying every 100 ms");
                } else {
                    tracing::debug!(listener = what, error = %e, "accept failed again");
                }
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs `fut` with a deadline, turning the elapsed case into [`ProxyError::Timeout`].
async fn deadline<T>(
    what: &'static str,
    addr: SocketAddr,
    after: Duration,
    fut: impl Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    tokio::time::timeout(after, fut)
        .await
        .unwrap_or(Err(ProxyError::Timeout { what, addr, after }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A removal ends the waits under way and any begun after it; dropping the switch (a
    /// drain) ends none, and outside a pod nothing does.
    #[tokio::test]
    async fn a_pods_removal_ends_its_connections_waits() {
        let (removal, life) = PodLife::new();
        let waiting = tokio::spawn({
            let life = life.clone();
            async move { life.removed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "ended before the removal");
        removal.remove();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait under way ends")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), life.removed())
            .await
            .expect("a wait begun after the removal ends at once");

        let (switch, life) = PodLife::new();
        drop(switch);
        let never = Duration::from_millis(50);
        assert!(tokio::time::timeout(never, life.removed()).await.is_err());
        assert!(
            tokio::time::timeout(never, PodLife::default().removed())
                .await
                .is_err()
        );
    }
}

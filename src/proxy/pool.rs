//! The HBONE client: TLS 1.3 + HTTP/2 connections to peer proxies, pooled per
//! (source identity, expected destination identities, peer address, source IP).
//!
//! A pooled connection carries at most min(`client_max_streams`, the peer's limit) streams.
//! Only one dial per key runs at a time: callers that find no free connection wait for the dial
//! in progress and then share its connection, so a burst of new app connections makes one
//! handshake, not a storm. Connections idle (no stream) for `pool_idle_timeout` are dropped by
//! a reaper task; a connection whose driver ended (error, missed PING) or that answered a
//! stream with GOAWAY or REFUSED_STREAM is never handed out again, and a stream it did not
//! process is retried once on a fresh connection (how new connections keep working while the
//! peer proxy drains in an upgrade, with its successor listening beside it). Nor is one whose
//! handshake's certificates (ours or the peer's leaf) have expired since: an identity whose
//! certificate ran out (its SPIRE entry deleted, say) opens no new stream on an old session;
//! the streams it carries run on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use rustls_pki_types::ServerName;

use super::tunnel::{H2Stream, MaxFrame, PeerFrames, TunnelSettings, drive_with_keepalive};
use super::{ProxyError, deadline};
use crate::hbone::ConnectRequest;
use crate::identity::{CertificateManager, Identity};
use crate::netns::{self, SocketFactory};
use crate::sync::Lock;
use crate::tls;

/// What makes two tunnels shareable over one connection (docs/design.md §4 pooling key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    source: Identity,
    expected: Vec<Identity>,
    peer: SocketAddr,
    source_ip: Option<IpAddr>,
}

impl PoolKey {
    /// `peer` is the destination proxy (`<podIP>:15008`); `expected` the identities the server
    /// may present; `source_ip` the address to dial from, when it must be pinned.
    pub fn new(
        source: Identity,
        mut expected: Vec<Identity>,
        peer: SocketAddr,
        source_ip: Option<IpAddr>,
    ) -> Self {
        expected.sort();
        expected.dedup();
        PoolKey {
            source,
            expected,
            peer,
            source_ip,
        }
    }

    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub(crate) fn source(&self) -> &Identity {
        &self.source
    }

    /// The identities the server may present, sorted (the route tests read them).
    #[cfg(test)]
    pub(crate) fn expected(&self) -> &[Identity] {
        &self.expected
    }
}

/// Counts of what the pool holds, for tests, metrics and the admin page.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub connections: usize,
    pub streams: usize,
    /// Connections dialed since start (each one TLS handshake).
    pub dials: usize,
}

/// One HTTP/2 connection to a peer proxy.
#[derive(Debug)]
struct PooledConn {
    send: h2::client::SendRequest<Bytes>,
    streams: AtomicUsize,
    max_streams: usize,
    closed: Arc<AtomicBool>,
    idle_since: Lock<Instant>,
    /// When the first certificate of the handshake (ours, or the peer's leaf) expires.
    expires: SystemTime,
    /// The peer's largest frame, which its streams cut what they send by.
    max_frame: MaxFrame,
}

impl PooledConn {
    fn limit(&self) -> usize {
        self.max_streams.min(self.send.current_max_send_streams())
    }

    /// Takes a stream slot if the connection is alive and has one free.
    fn try_reserve(self: &Arc<Self>) -> Option<StreamPermit> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        if SystemTime::now() >= self.expires {
            self.closed.store(true, Ordering::Release);
            return None;
        }
        let limit = self.limit();
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(StreamPermit { conn: self.clone() })
    }

    fn reapable(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.closed.load(Ordering::Acquire)
            || (self.streams.load(Ordering::Acquire) == 0
                && now.duration_since(*self.idle_since.lock()) >= idle_timeout)
    }
}

/// A reserved stream slot; released (and the idle clock restarted) on drop.
#[derive(Debug)]
pub(crate) struct StreamPermit {
    conn: Arc<PooledConn>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock() = Instant::now();
        }
    }
}

/// The connections of one key, and the lock that lets one dial run at a time.
#[derive(Debug, Default)]
struct KeyConns {
    dial: tokio::sync::Mutex<()>,
    conns: Lock<Vec<Arc<PooledConn>>>,
}

impl KeyConns {
    fn checkout(&self) -> Option<StreamPermit> {
        let conns = self.conns.lock();
        conns.iter().find_map(PooledConn::try_reserve)
    }
}

#[derive(Debug, Default)]
struct Pool {
    keys: Lock<HashMap<PoolKey, Arc<KeyConns>>>,
    dials: AtomicUsize,
}

impl Pool {
    fn entry(&self, key: &PoolKey) -> Arc<KeyConns> {
        let mut keys = self.keys.lock();
        keys.entry(key.clone()).or_default().clone()
    }

    fn reap(&self, idle_timeout: Duration) {
        let now = Instant::now();
        let mut keys = self.keys.lock();
        keys.retain(|_, entry| {
            let mut conns = entry.conns.lock();
            conns.retain(|c| !c.reapable(now, idle_timeout));
            // Keep the entry while someone (a dialer) holds it besides the map.
            !conns.is_empty() || Arc::strong_count(entry) > 1
        });
    }

    fn stats(&self) -> PoolStats {
        let keys = self.keys.lock();
        let mut stats = PoolStats {
            dials: self.dials.load(Ordering::Relaxed),
            ..PoolStats::default()
        };
        for entry in keys.values() {
            let conns = entry.conns.lock();
            for c in conns.iter().filter(|c| !c.closed.load(Ordering::Acquire)) {
                stats.connections += 1;
                stats.streams += c.streams.load(Ordering::Acquire);
            }
        }
        stats
    }
}

/// Opens HBONE streams to peer proxies over pooled connections.
#[derive(Debug)]
pub struct HboneClient {
    certs: Arc<CertificateManager>,
    sockets: Arc<dyn SocketFactory>,
    settings: Arc<TunnelSettings>,
    pool: Arc<Pool>,
}

impl HboneClient {
    /// Must be called inside a tokio runtime: it starts the idle-connection reaper, which stops
    /// when the client is dropped.
    pub fn new(
        certs: Arc<CertificateManager>,
        sockets: Arc<dyn SocketFactory>,
        settings: TunnelSettings,
    ) -> Self {
        let pool = Arc::new(Pool::default());
        spawn_reaper(Arc::downgrade(&pool), settings.pool_idle_timeout);
        HboneClient {
            certs,
            sockets,
            settings: Arc::new(settings),
            pool,
        }
    }

    /// Opens a CONNECT stream to `request.authority` through the peer proxy in `key`. Returns
    /// only once the peer answered 200, so the caller can hold the app's bytes until then.
    pub async fn connect(
        &self,
        key: &PoolKey,
        request: &ConnectRequest,
    ) -> Result<H2Stream, ProxyError> {
        let permit = self.checkout(key).await?;
        match self.open(&permit, key, request).await {
            Err(ProxyError::Http2 { source, .. })
                if never_processed(&source) || permit.conn.closed.load(Ordering::Acquire) =>
            {
                // The peer is going away (GOAWAY: a draining proxy whose successor listens
                // beside it), refused the stream, or the connection died between checkout and
                // use. The server did not process the stream and no app byte has left (hold
                // inline): retire the connection for new streams and try once on a fresh one.
                tracing::debug!(peer = %key.peer, error = %source, "stream not processed; retrying on a new connection");
                permit.conn.closed.store(true, Ordering::Release);
                drop(permit);
                let permit = self.checkout(key).await?;
                self.open(&permit, key, request)
                    .await
                    .map(|s| s.with_permit(permit))
            }
            res => res.map(|s| s.with_permit(permit)),
        }
    }

    /// Double HBONE (ztunnel's proxy_to_double_hbone): a CONNECT stream to the network
    /// gateway in `key` (pooled), then inside it a TLS handshake of its own with the source's
    /// certificate, the destination presenting one of `inner_expected`, HTTP/2, and
    /// `inner_request`. The inner connection is not pooled: the gateway picks an endpoint per
    /// outer stream, and the inner connection ends with its one stream.
    pub async fn connect_double(
        &self,
        key: &PoolKey,
        request: &ConnectRequest,
        inner_expected: Vec<Identity>,
        inner_request: &ConnectRequest,
    ) -> Result<H2Stream, ProxyError> {
        let outer = self.connect(key, request).await?;
        let s = &self.settings;
        let addr = key.peer;
        let cert = self.certs.fetch(&key.source).await?;
        let config = tls::client_config_checked(&cert, inner_expected, &s.peers)?;
        let mut tls = deadline("inner TLS handshake", addr, s.connect_timeout, async {
            tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), outer)
                .await
                .map_err(|source| ProxyError::Tls { addr, source })
        })
        .await?;
        tls::tune(tls.get_mut().1);
        let (tls, max_frame) = PeerFrames::client(tls);
        let h2err = |source| ProxyError::Http2 { addr, source };
        deadline("inner CONNECT", addr, s.connect_timeout, async {
            let (send, conn) = s
                .client_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(h2err)?;
            tokio::spawn(connection_task(conn, &self.settings, addr, None));
            // Moved in: the connection closes once its one stream has.
            send_connect(send, addr, inner_request, &max_frame).await
        })
        .await
    }

    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    async fn checkout(&self, key: &PoolKey) -> Result<StreamPermit, ProxyError> {
        let entry = self.pool.entry(key);
        if let Some(permit) = entry.checkout() {
            return Ok(permit);
        }
        let _dialing = entry.dial.lock().await;
        // Whoever held the lock before us may have dialed a connection we can share.
        if let Some(permit) = entry.checkout() {
            return Ok(permit);
        }
        // Boxed: a dial's state (TCP, TLS and HTTP/2 handshakes) is ~9 KiB, and every
        // connection's routing future would otherwise be that large, dialing or not.
        let conn = Box::pin(self.dial(key)).await?;
        let permit = conn.try_reserve();
        entry.conns.lock().push(conn);
        permit.ok_or_else(|| ProxyError::Http2 {
            addr: key.peer,
            source: h2::Error::from(h2::Reason::REFUSED_STREAM),
        })
    }

    async fn dial(&self, key: &PoolKey) -> Result<Arc<PooledConn>, ProxyError> {
        let s = &self.settings;
        let addr = key.peer;
        let cert = self.certs.fetch(&key.source).await?;
        let config = tls::client_config_checked(&cert, key.expected.clone(), &s.peers)?;
        let tcp = netns::dial(&*self.sockets, key.source_ip, addr, s.connect_timeout)
            .await
            .map_err(|source| ProxyError::Connect { addr, source })?;
        let mut tls = deadline("TLS handshake", addr, s.connect_timeout, async {
            tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|source| ProxyError::Tls { addr, source })
        })
        .await?;
        tls::tune(tls.get_mut().1);
        let session = tls.get_ref().1;
        let expires = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| tls::leaf_info(leaf).ok())
            .map(|leaf| leaf.not_after)
            .map_or(cert.not_after(), |peer| peer.min(cert.not_after()));
        let suite = session.negotiated_cipher_suite().map(|s| s.suite());
        let kx = session.negotiated_key_exchange_group().map(|g| g.name());
        let (tls, max_frame) = PeerFrames::client(tls);
        let (send, conn) = deadline("HTTP/2 handshake", addr, s.connect_timeout, async {
            s.client_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| ProxyError::Http2 { addr, source })
        })
        .await?;
        self.pool.dials.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(connection_task(conn, s, addr, Some(closed.clone())));
        tracing::info!(peer = %addr, source = %key.source, ?suite, ?kx, "HBONE connection established");
        Ok(Arc::new(PooledConn {
            send,
            streams: AtomicUsize::new(0),
            max_streams: s.client_max_streams,
            closed,
            idle_since: Lock::new(Instant::now()),
            expires,
            max_frame,
        }))
    }

    async fn open(
        &self,
        permit: &StreamPermit,
        key: &PoolKey,
        request: &ConnectRequest,
    ) -> Result<H2Stream, ProxyError> {
        let addr = key.peer;
        deadline("CONNECT", addr, self.settings.connect_timeout, async {
            send_connect(
                permit.conn.send.clone(),
                addr,
                request,
                &permit.conn.max_frame,
            )
            .await
        })
        .await
    }
}

/// The task that drives a client HBONE connection to the peer at `peer` for its life, with
/// its keepalive; `closed` (a pooled connection's) is set when it ends. Mapped rather than
/// awaited in an `async` block, which would hold the connection (~2.4 KiB) twice.
fn connection_task<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    settings: &TunnelSettings,
    peer: SocketAddr,
    closed: Option<Arc<AtomicBool>>,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ping = conn.ping_pong();
    drive_with_keepalive(conn, ping, settings).map(move |res| {
        if let Err(reason) = res {
            let pooled = closed.is_some();
            tracing::debug!(%peer, %reason, pooled, "HBONE connection closed");
        }
        if let Some(closed) = closed {
            closed.store(true, Ordering::Release);
        }
    })
}

/// Sends `request` on the HTTP/2 connection of `send` (to the peer at `addr`, whose largest
/// frame is `max_frame`): the stream, once the peer answered 200.
async fn send_connect(
    send: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    request: &ConnectRequest,
    max_frame: &MaxFrame,
) -> Result<H2Stream, ProxyError> {
    let h2err = |source| ProxyError::Http2 { addr, source };
    let mut send = send.ready().await.map_err(h2err)?;
    let (response, stream) = send.send_request(request.to_http(), false).map_err(h2err)?;
    drop(send);
    let response = response.await.map_err(h2err)?;
    if response.status() != http::StatusCode::OK {
        return Err(ProxyError::Status {
            addr,
            authority: request.authority.clone(),
            status: response.status(),
        });
    }
    // The peer's SETTINGS came before its answer: what it says is known by now.
    Ok(H2Stream::new(stream, response.into_body()).with_peer_max_frame(max_frame.get()))
}

/// Whether the peer cannot have processed a stream that failed with `e`: a GOAWAY (the stream
/// was above its last stream id, or sent after it) or REFUSED_STREAM (RFC 9113 §8.7).
fn never_processed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

fn spawn_reaper(pool: Weak<Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 4).max(Duration::from_millis(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            pool.reap(idle_timeout);
        }
    });
}

#[cfg(test)]
mod tests;

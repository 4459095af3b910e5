//! The HBONE server (listener side, port 15008) for one local workload: TLS accept presenting
//! the workload's certificate, HTTP/2, and per CONNECT stream: check the request, dial the app
//! through the socket factory, answer 200 only once that dial succeeded, then relay.
//!
//! Answers (docs/design.md §4): 400 for a method other than CONNECT, an unparsable authority, an
//! authority IP that is not this workload, or a target on the proxy's own ports; 503 when the
//! app cannot be dialed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, StatusCode};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};

use super::copy::{self, End, Ended};
use super::live;
use super::tunnel::{H2Stream, MaxFrame, PeerFrames, TunnelSettings, drive_with_keepalive};
use crate::authz;
use crate::drain::{self, Drain};
use crate::hbone::{self, Authority, ConnectRequest};
use crate::identity::manager::CertError;
use crate::identity::{CertificateManager, Identity, LiveIdentity, WorkloadCert};
use crate::metrics::{
    ConnectionLabels, ConnectionRecord, LogNames, Metrics, Outcome, Peer, Reporter,
};
use crate::netns::{self, SocketFactory};
use crate::ports::POD_LISTENERS;
use crate::socket;
use crate::state::SharedState;
use crate::sync::Lock;
use crate::tls::{self, TlsError};

/// An accepted HBONE connection, past its handshakes.
type ServerConnection =
    h2::server::Connection<PeerFrames<tokio_rustls::server::TlsStream<TcpStream>>, Bytes>;

/// The workload a server speaks for.
#[derive(Debug, Clone)]
pub struct LocalWorkload {
    pub identity: LiveIdentity,
    /// The workload's IPs: a CONNECT authority must name one of them.
    pub addresses: Vec<IpAddr>,
    /// Deliver to the app from the client's IP (IP_TRANSPARENT) instead of our own.
    pub preserve_source_ip: bool,
    /// The shared state: the policies checked per stream, and the names of peers for metrics
    /// and access logs. `None`: no policy applies, peers stay unnamed.
    pub state: Option<Arc<SharedState>>,
    /// Where connection metrics go, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
    /// The node's drain: live streams hold it open; HBONE connections get GOAWAY when it starts.
    pub drain: Option<Drain>,
    /// The pod's life: its live connections end when it is removed.
    pub pod: super::PodLife,
}

/// Admission of one CONNECT to the workload at `addresses` (a pure function of the request
/// head): 400 for another method, an unparsable authority, an authority IP that is not the
/// workload's, or one of the proxy's own ports. A hostname authority (double HBONE) passes
/// here; its service and port are found with the state ([`LocalWorkload::service_target`]).
pub fn admit<B>(request: &Request<B>, addresses: &[IpAddr]) -> Result<ConnectRequest, StatusCode> {
    let connect = ConnectRequest::from_http(request).map_err(|_| StatusCode::BAD_REQUEST)?;
    if let Authority::Addr(target) = connect.authority
        && (!addresses.contains(&target.ip()) || POD_LISTENERS.contains(&target.port()))
    {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(connect)
}

/// The facts a policy looks at for a connection from `peer` (as `client`) to `target`.
pub(crate) fn authz_facts<'a>(
    client: Option<&'a Identity>,
    peer: SocketAddr,
    target: SocketAddr,
) -> authz::Connection<'a> {
    authz::Connection {
        source: client,
        source_ip: peer.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
    }
}

/// Whether an optional wait has been woken (`None`, nothing to wait for, never is).
fn woke(
    wait: std::pin::Pin<&mut Option<tokio::sync::futures::Notified<'_>>>,
    cx: &mut std::task::Context<'_>,
) -> bool {
    wait.as_pin_mut().is_some_and(|w| w.poll(cx).is_ready())
}

impl LocalWorkload {
    /// Resolves when the proxy must end a connection itself: a policy change denies it (the
    /// facts `conn` gives, read again on every change: woken by the change, not a timer, so it
    /// reaches live connections at once), or the pod is removed. Never resolves for a workload
    /// with neither policies nor a pod.
    ///
    /// Every live inbound connection's task holds this future, so it is one loop over two
    /// `Notify` waits (192 bytes; a `select!` of a policy `watch` wait and the pod's removal
    /// was 312), and the facts come from a closure over what the task holds anyway rather than
    /// a copy of them. A plain fn around an `async move` block, as an async fn would hold its
    /// arguments twice.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold its arguments twice"
    )]
    pub(crate) fn stop<'a, 'c>(
        &'a self,
        conn: impl Fn() -> authz::Connection<'c> + 'a,
    ) -> impl std::future::Future<Output = super::Stop> + 'a {
        async move {
            loop {
                // Both waits are registered before the flag and the policies are read: a removal
                // or a change between the reads and the wait still wakes this.
                let mut removed =
                    std::pin::pin!(self.pod.removal.as_ref().map(|r| r.notify.notified()));
                let mut changed = std::pin::pin!(self.state.as_ref().map(|s| s.policy_changed()));
                for waiter in [removed.as_mut(), changed.as_mut()] {
                    if let Some(waiter) = waiter.as_pin_mut() {
                        waiter.enable();
                    }
                }
                if self.pod.is_removed() {
                    return super::Stop::PodRemoved;
                }
                if self.state.is_some() {
                    // Scoped: a decision kept alive across the wait below would be stored in the
                    // future of every live connection.
                    let decision = self.decide(&conn()).decision;
                    if !decision.is_allowed() {
                        return super::Stop::Denied(decision);
                    }
                }
                // Woken by either; the loop reads both again.
                std::future::poll_fn(|cx| {
                    if woke(removed.as_mut(), cx) || woke(changed.as_mut(), cx) {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                })
                .await;
            }
        }
    }

    /// The workload at `ip` as metrics name it (name from the state, if any).
    pub(crate) fn peer_at(&self, ip: IpAddr, identity: Option<&Identity>) -> Peer {
        let state = self.state.as_ref().map(|s| s.read());
        match state.as_ref().and_then(|s| s.workload_by_ip(ip)) {
            Some(w) => Peer::of(w, identity),
            None => Peer::new("", identity),
        }
    }

    /// Where a CONNECT to `hostname:port` goes in this workload (ztunnel's
    /// find_inbound_upstream, `SvcHostname`): the service of that hostname (its own
    /// namespace's first) must be one this workload is an endpoint of; the port is the
    /// workload's target port for the service port, else the service's; the address is the one
    /// the connection came to (`local`). `None`: no such service here (400).
    pub(crate) fn service_target(
        &self,
        hostname: &str,
        port: u16,
        local: IpAddr,
    ) -> Option<SocketAddr> {
        let state = self.state.as_ref()?.read();
        let me = state.workload_by_ip(local)?;
        let namespace = self.identity.get().namespace().to_owned();
        let service = state
            .services_by_hostname(hostname)
            .filter(|s| me.services.contains_key(&s.key()))
            .min_by_key(|s| (s.namespace != namespace, s.namespace.clone()))?;
        let target = me
            .services
            .get(&service.key())
            .and_then(|ports| ports.get(&port))
            .or_else(|| service.ports.get(&port))
            .copied()
            .filter(|t| *t != 0 && !POD_LISTENERS.contains(t))?;
        Some(SocketAddr::new(local, target))
    }

    /// Whether discovery says the workload at `ip` takes a PROXY protocol header first.
    pub(crate) fn wants_proxy_protocol(&self, ip: IpAddr) -> bool {
        self.state.as_ref().is_some_and(|s| {
            s.read()
                .workload_by_ip(ip)
                .is_some_and(|w| w.proxy_protocol.is_some())
        })
    }

    /// Whether `ip` is a workload peers reach over HBONE (an enrolled pod).
    pub(crate) fn reached_over_hbone(&self, ip: IpAddr) -> bool {
        self.state.as_ref().is_some_and(|s| {
            s.read()
                .workload_by_ip(ip)
                .is_some_and(|w| w.protocol == crate::state::Protocol::Hbone)
        })
    }

    /// Labels and access-log names for a connection from `src` to this workload at `dst`.
    pub(crate) fn labels(
        &self,
        src: IpAddr,
        client: Option<&Identity>,
        dst: IpAddr,
    ) -> (ConnectionLabels, LogNames) {
        let source = self.peer_at(src, client);
        let destination = self.peer_at(dst, Some(&self.identity.get()));
        let labels = ConnectionLabels::new(
            Reporter::Destination,
            &source,
            &destination,
            client.is_some(),
        );
        (labels, LogNames::of(&source, &destination))
    }

    /// The policy decision for one connection to this workload (the policies that apply to
    /// it, see `authz`). A dry-run decision that differs is logged and counted, not enforced.
    pub(crate) fn authorize(&self, conn: &authz::Connection<'_>) -> authz::Decision {
        let verdict = self.decide(conn);
        if let Some(dry_run) = verdict.dry_run {
            if let Some(m) = &self.metrics {
                m.dry_run_decision(dry_run.is_allowed());
            }
            if dry_run != verdict.decision {
                tracing::info!(
                    source = %conn.source_ip,
                    destination = %conn.destination_ip,
                    port = conn.destination_port,
                    enforced = ?verdict.decision,
                    ?dry_run,
                    "a dry-run policy would decide this connection differently"
                );
            }
        }
        verdict.decision
    }

    /// The policies' verdict on `conn`, with no logging or counting.
    fn decide(&self, conn: &authz::Connection<'_>) -> authz::Verdict {
        let Some(state) = &self.state else {
            return authz::Verdict {
                decision: authz::Decision::Allow,
                dry_run: None,
            };
        };
        let state = state.read();
        // Selector-scoped policies are those the destination workload lists.
        let selected = state
            .workload_by_ip(conn.destination_ip)
            .map(|w| w.authorization_policies.as_slice())
            .unwrap_or_default();
        authz::evaluate(
            state.policies_for(self.identity.get().namespace(), selected),
            conn,
        )
    }
}

/// Why an inbound connection (not a single stream) ended early.
#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] TlsError),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("HTTP/2 handshake failed: {0}")]
    Http2(h2::Error),
    #[error("handshake timed out")]
    Timeout,
}

/// Serves HBONE for one workload.
#[derive(Debug)]
pub struct InboundServer {
    workload: LocalWorkload,
    certs: Arc<CertificateManager>,
    sockets: Arc<dyn SocketFactory>,
    settings: Arc<TunnelSettings>,
    /// The server config of the current certificate; rebuilt when the certificate changes.
    tls: Lock<Option<(Arc<WorkloadCert>, Arc<ServerConfig>)>>,
}

impl InboundServer {
    pub fn new(
        workload: LocalWorkload,
        certs: Arc<CertificateManager>,
        sockets: Arc<dyn SocketFactory>,
        settings: TunnelSettings,
    ) -> Arc<Self> {
        Arc::new(InboundServer {
            workload,
            certs,
            sockets,
            settings: Arc::new(settings),
            tls: Lock::new(None),
        })
    }

    /// Accepts connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = super::accept(&listener, "inbound HBONE").await;
            let server = self.clone();
            // The connection, not only its streams, holds the drain open: after its last
            // stream it still has to write out the final frames and close cleanly (GOAWAY),
            // or a peer would see its last streams cut off by the process exiting.
            let live = self.workload.drain.as_ref().map(Drain::guard);
            let socket = self.workload.metrics.as_ref().map(Metrics::socket_open);
            tokio::spawn(async move {
                let (_live, _socket) = (live, socket);
                match server.connection(tcp, peer).await {
                    Ok(()) => {}
                    // A TCP probe (kubelet, a load balancer) connects and leaves without TLS.
                    Err(InboundError::Tls(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "connection closed before the TLS handshake");
                    }
                    Err(e) => tracing::info!(%peer, error = %e, "inbound HBONE connection failed"),
                }
            });
        }
    }

    /// The TLS and HTTP/2 handshakes of an accepted connection: the connection, the client's
    /// identity (shared by its streams), the client's largest frame, and the address the
    /// client dialed (where a hostname CONNECT is delivered).
    async fn handshakes(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<(ServerConnection, Option<Arc<Identity>>, MaxFrame, IpAddr), InboundError> {
        // Options are best effort: a socket that refuses them still works.
        let _ = socket::set_stream_options(&tcp);
        let local = tcp.local_addr().map_or_else(
            |_| {
                self.workload
                    .addresses
                    .first()
                    .copied()
                    .unwrap_or(peer.ip())
            },
            |a| a.ip(),
        );
        let config = self.server_config().await?;
        let handshake_timeout = self.settings.connect_timeout;
        let mut tls = tokio::time::timeout(
            handshake_timeout,
            tokio_rustls::TlsAcceptor::from(config).accept(tcp),
        )
        .await
        .map_err(|_| InboundError::Timeout)?
        .map_err(InboundError::Tls)?;
        tls::tune(tls.get_mut().1);
        // Shared by the connection's streams: each holds a pointer, not its own three strings.
        let client = tls::peer_identity(tls.get_ref().1.peer_certificates()).map(Arc::new);
        let (tls, max_frame) = PeerFrames::server(tls);
        let conn = tokio::time::timeout(
            handshake_timeout,
            self.settings.server_builder().handshake::<_, Bytes>(tls),
        )
        .await
        .map_err(|_| InboundError::Timeout)?
        .map_err(InboundError::Http2)?;
        Ok((conn, client, max_frame, local))
    }

    async fn server_config(&self) -> Result<Arc<ServerConfig>, InboundError> {
        let cert = self.certs.fetch(&self.workload.identity.get()).await?;
        let mut cache = self.tls.lock();
        if let Some((cached, config)) = cache.as_ref()
            && Arc::ptr_eq(cached, &cert)
        {
            return Ok(config.clone());
        }
        let config = tls::server_config_checked(&cert, &self.settings.peers)?;
        *cache = Some((cert, config.clone()));
        Ok(config)
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), InboundError> {
        // Boxed, and freed once done: the task holds the connection for its life, and the
        // handshakes' state (~4 KiB) inline would be held beside it all that time.
        let (mut conn, client, max_frame, local) = Box::pin(self.handshakes(tcp, peer)).await?;
        let ping = conn.ping_pong();
        // Pinned where it lives: the driver below holds it by reference, not a second copy.
        let accept_loop = std::pin::pin!(async {
            let mut draining = std::pin::pin!(drain::signaled(self.workload.drain.as_ref()));
            let mut goaway_sent = false;
            loop {
                tokio::select! {
                    next = conn.accept() => {
                        let Some(next) = next else { return Ok(()) };
                        let (request, respond) = next?;
                        let server = self.clone();
                        let client = client.clone();
                        let guard = self.workload.drain.as_ref().map(Drain::guard);
                        // The client's SETTINGS came before its first request.
                        let client_frame = max_frame.get();
                        // The admission and the dial run boxed, freed once the relay starts: the
                        // task holds only the relay's state for the stream's life.
                        let admitted = Box::pin(server.clone().admit(request, respond, client, (peer, local), client_frame));
                        tokio::spawn(server.relay(admitted, guard));
                    }
                    _ = &mut draining, if !goaway_sent => {
                        // GOAWAY: the client opens no new streams here; live ones finish.
                        conn.graceful_shutdown();
                        goaway_sent = true;
                    }
                }
            }
        });
        if let Err(reason) = drive_with_keepalive(accept_loop, ping, &self.settings).await {
            tracing::debug!(%peer, %reason, "inbound HBONE connection closed");
        }
        Ok(())
    }

    /// Checks a CONNECT request against this workload and dials its app: the stream to relay,
    /// or `None` once it was answered with a refusal. The client takes frames of `client_frame`
    /// bytes at most (0: not known).
    async fn admit(
        self: Arc<Self>,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        client: Option<Arc<Identity>>,
        (peer, local): (SocketAddr, IpAddr),
        client_frame: u32,
    ) -> Option<Admitted> {
        let target = admit(&request, &self.workload.addresses).and_then(|c| match c.authority {
            Authority::Addr(target) => Ok(target),
            Authority::Host(host, port) => self
                .workload
                .service_target(&host, port, local)
                .ok_or(StatusCode::BAD_REQUEST),
        });
        let target = match target {
            Ok(t) => t,
            Err(status) => {
                tracing::info!(%peer, uri = %request.uri(), %status, "refused CONNECT");
                let _ = respond.send_response(hbone::response(status), true);
                return None;
            }
        };
        let (labels, names) = self
            .workload
            .labels(peer.ip(), client.as_deref(), target.ip());
        let names = names.hbone(target);
        let record =
            ConnectionRecord::open(self.workload.metrics.as_ref(), labels, names, peer, target)
                .listed(self.workload.pod.connections(), || {
                    live::LiveConnection::new(live::Direction::Inbound, peer, target, target)
                        .carried(live::Carrier::Hbone)
                });
        match self
            .authorize_and_dial(&mut respond, client.as_deref(), peer, target)
            .await
        {
            Ok((app, send)) => Some(Admitted {
                tunnel: H2Stream::new(send, request.into_body()).with_peer_max_frame(client_frame),
                app,
                record,
                client,
            }),
            Err((outcome, answer)) => {
                if let Some(status) = answer {
                    let _ = respond.send_response(hbone::response(status), true);
                }
                record.finish(outcome, (0, 0));
                None
            }
        }
    }

    /// Authorizes an admitted CONNECT, dials its app and answers 200: the app's socket and the
    /// stream's sending half, or how it ended and what to answer (nothing when the client has
    /// already gone).
    async fn authorize_and_dial(
        &self,
        respond: &mut SendResponse<Bytes>,
        client: Option<&Identity>,
        peer: SocketAddr,
        target: SocketAddr,
    ) -> Result<(TcpStream, h2::SendStream<Bytes>), (Outcome, Option<StatusCode>)> {
        let decision = self.workload.authorize(&authz_facts(client, peer, target));
        if !decision.is_allowed() {
            tracing::info!(%peer, client = ?client.map(Identity::to_string), %target, ?decision, "denied by policy; answering 401");
            return Err((Outcome::Denied, Some(StatusCode::UNAUTHORIZED)));
        }
        // Its app wants a PROXY protocol header first (xDS `application_tunnel`), which this
        // proxy does not write: refused rather than delivered without it.
        if self.workload.wants_proxy_protocol(target.ip()) {
            tracing::info!(%peer, %target, "the workload takes tunnels with a PROXY protocol header, which hboned does not write; answering 503");
            return Err((
                Outcome::ProxyProtocol,
                Some(StatusCode::SERVICE_UNAVAILABLE),
            ));
        }
        // The HBONE connection was dialed from inside the client pod: its address is the pod's.
        let source = self.workload.preserve_source_ip.then_some(peer.ip());
        // Boxed: freed once dialed (the task keeps this future for the stream's whole life).
        let dial = Box::pin(netns::dial(
            &*self.sockets,
            source,
            target,
            self.settings.connect_timeout,
        ));
        // A client that resets the stream (or goes away) stops the dial at once: its work must
        // not outlive it (rapid reset, CVE-2023-44487 style, against a target whose dial hangs).
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        let dialed = tokio::select! {
            dialed = dial => dialed,
            reason = reset => {
                tracing::debug!(%peer, %target, ?reason, "stream reset by the client before the app answered; dial abandoned");
                return Err((Outcome::ClientReset, None));
            }
        };
        let app = dialed.map_err(|e| {
            tracing::info!(%peer, %target, error = %e, "cannot reach the app; answering 503");
            (
                Outcome::ConnectFailed,
                Some(StatusCode::SERVICE_UNAVAILABLE),
            )
        })?;
        match respond.send_response(hbone::response(StatusCode::OK), false) {
            Ok(send) => Ok((app, send)),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "client went away before 200");
                Err((Outcome::ClientReset, None))
            }
        }
    }

    /// Relays a stream once `admission` has admitted it and dialed its app, until either side
    /// ends, or a policy change or the pod's removal stops it.
    ///
    /// The stream's task is this future (spawned as it is, holding the drain guard `drain`), for
    /// the connection's whole life, so the admitted stream lives in it once: taken from the
    /// admission here (an `Admitted` passed by value would sit in the caller's future and twice
    /// in this one, as passed and as bound) and its fields used where they are. A plain fn
    /// around an `async move` block, as an async fn would hold its arguments twice.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold its arguments twice"
    )]
    fn relay(
        self: Arc<Self>,
        admission: impl std::future::Future<Output = Option<Admitted>> + Send + 'static,
        drain: Option<crate::drain::Guard>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        async move {
            let Some(mut stream) = admission.await else {
                return;
            };
            let (tunnel, app) = (&mut stream.tunnel, &mut stream.app);
            let ended = {
                // The facts are read from the record when a policy change asks for them, not
                // copied into this future.
                let (client, record) = (&stream.client, &stream.record);
                let conn = || authz_facts(client.as_deref(), record.src(), record.dst());
                let stop = std::pin::pin!(self.workload.stop(conn));
                copy::bidirectional_until(&mut *tunnel, &mut *app, stop, record.meters()).await
            };
            match &ended {
                Ended::Copied(Ok(_)) => {}
                // Pass a reset through to whichever side did not cause it.
                Ended::Copied(Err(e)) => match e.end {
                    End::A => {
                        let _ = socket::reset_on_close(app);
                    }
                    End::B => tunnel.reset(h2::Reason::CONNECT_ERROR),
                },
                Ended::Stopped { reason, .. } => {
                    let (peer, target) = (stream.record.src(), stream.record.dst());
                    tracing::info!(%peer, %target, why = ?reason, "ending this connection (a policy change denies it, or its pod was removed); resetting it");
                    tunnel.reset(h2::Reason::CONNECT_ERROR);
                    let _ = socket::reset_on_close(app);
                }
            }
            let (outcome, transferred) = ended.outcome(super::Stop::outcome);
            stream
                .record
                .finish(outcome, transferred.request_response());
            // Held (as captured, not moved into a local: that would store it twice) until the
            // relay has ended; a return above drops it with the future.
            drop(drain);
        }
    }
}

/// A CONNECT stream admitted and its app dialed, ready to relay. The peer and the target are
/// the record's source and destination.
struct Admitted {
    tunnel: H2Stream,
    app: TcpStream,
    record: ConnectionRecord,
    client: Option<Arc<Identity>>,
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod size_tests {
    use super::*;

    /// What a live stream's task holds: the relay's future, not the admission's and dial's.
    /// The task is one allocation, this future plus 104 bytes of tokio's (header, scheduler,
    /// id, tag, trailer) rounded up to 128: up to 792 bytes here it fits jemalloc's 896 class
    /// (880 before the relay was a future written out and an HTTP/2 stream's received bytes
    /// stayed with the stream while written: the 1,024 class; 1,168 before the relay's directions owned their halves and packed their fields
    /// and the stop signal was two `Notify` waits over facts read from the record: the 1,280
    /// class; 2,096 before the addresses were read from the record, the client identity shared
    /// per connection and the spawn's wrapping block removed: the 2,560 class; ~1,880 before
    /// the relay's directions were hand-written futures: the 2,048 class; ~1,250 before the
    /// pod's removal was a `Notify` wait instead of a `watch` one: the 1,536 class).
    #[test]
    fn a_live_stream_holds_only_the_relays_state() {
        fn size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<InboundServer>, Admitted) -> Fut,
            Fut: std::future::Future,
        {
            std::mem::size_of::<Fut>()
        }
        let relay =
            size(|s: Arc<InboundServer>, a| s.relay(Box::pin(std::future::ready(Some(a))), None));
        assert!(
            relay <= 792,
            "the inbound relay future is {relay} bytes: its task no longer fits 896 bytes"
        );
    }

    /// What an HBONE connection's task holds for the connection's life: the connection once,
    /// its accept loop and its keepalive, the handshakes boxed and gone. 3,008 bytes (tokio's
    /// cell 3,328, jemalloc's 3,584 class); 4,912 (the 5,120 class, 6,144 with the spawn's
    /// guards) while the handshakes and the moved-on TLS stream kept their places beside it.
    #[test]
    fn an_hbone_connection_holds_its_connection_once() {
        fn size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<InboundServer>, TcpStream, SocketAddr) -> Fut,
            Fut: std::future::Future,
        {
            std::mem::size_of::<Fut>()
        }
        let task = size(|s: Arc<InboundServer>, tcp, peer| s.connection(tcp, peer));
        let conn = std::mem::size_of::<ServerConnection>();
        assert!(
            task <= conn + 640,
            "an inbound HBONE connection's future is {task} bytes for a connection of {conn}"
        );
    }
}

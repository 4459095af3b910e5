//! The outbound side: an app connection the proxy accepted is held (not one byte read) while
//! its route is decided and, for an HBONE route, until the peer answered 200; then bytes flow.
//! A failed tunnel resets the app connection: an enrolled destination never gets plaintext.
//!
//! The routing decision is behind [`Router`] so it stays a pure function of the proxy's state
//! (the local-config and xDS routers plug in here); this module only executes a [`Route`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::copy::{self, End, Ended};
use super::live::{Carrier, Direction, LiveConnection};
use super::passthrough;
use super::pool::{HboneClient, PoolKey};
use super::tunnel::TunnelSettings;
use super::{PodLife, Stop};
use crate::drain::Drain;
use crate::hbone::{Authority, Baggage, ConnectRequest, TraceParent};
use crate::identity::{Identity, LiveIdentity};
use crate::metrics::Outcome;
use crate::metrics::{ConnectionLabels, ConnectionRecord, LogNames, Metrics, Peer, Reporter};
use crate::netns::SocketFactory;
use crate::proxy::H2Stream;
use crate::socket;
use crate::state::{ServiceRef, SharedState, State, Upstream};
use crate::xds::Resolver;

/// Where one outbound connection goes.
// One short-lived value per connection, never stored in bulk: boxing would only add an
// allocation per connection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through an HBONE tunnel to a peer proxy (or waypoint, or network gateway).
    Hbone {
        key: PoolKey,
        request: ConnectRequest,
        /// Double HBONE: the tunnel inside this one, to the destination behind a network
        /// gateway.
        inner: Option<Box<InnerTunnel>>,
        /// The two ends, for metrics and access logs.
        peers: (Peer, Peer),
        /// The service it was addressed to (through its VIP), for metrics.
        service: Option<ServiceRef>,
    },
    /// Plain TCP to a destination that is not enrolled.
    Passthrough {
        dst: SocketAddr,
        peers: (Peer, Peer),
    },
    /// Plain TCP to `host:port`, resolved when the connection is made.
    PassthroughHost {
        host: String,
        port: u16,
        peers: (Peer, Peer),
    },
    /// Refused (reset), with the reason for the log.
    Refuse { reason: &'static str },
}

/// The inner tunnel of double HBONE: its own TLS (the source's certificate, one of `expected`
/// presented back) and HTTP/2 inside the outer CONNECT stream, then `request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerTunnel {
    pub expected: Vec<Identity>,
    pub request: ConnectRequest,
}

/// Decides the route of a connection from `src` to its original destination `dst`.
pub trait Router: Send + Sync + std::fmt::Debug {
    fn route(&self, src: SocketAddr, dst: SocketAddr) -> Route;
}

/// Serves one outbound listener.
#[derive(Debug)]
pub struct Outbound {
    client: Arc<HboneClient>,
    sockets: Arc<dyn SocketFactory>,
    router: Arc<dyn Router>,
    resolver: Option<Arc<dyn Resolver>>,
    settings: TunnelSettings,
    metrics: Option<Arc<Metrics>>,
    drain: Option<Drain>,
    /// The source pod's life: its connections end when it is removed.
    pod: PodLife,
    /// Unknown destinations in the cluster's pod ranges, held (and refused when strict).
    cluster: Option<Arc<ClusterGuard>>,
}

/// What an outbound connection to an address of the cluster's pod ranges (`podCidrs`) that the
/// state does not know meets: it is held until discovery knows the address (a pod just
/// created, a watch behind) or `hold` passes, and then, with `strict`, refused rather than
/// passed through in plaintext — the address may be an enrolled pod discovery has not shown
/// yet (an API outage, a lagging watch).
#[derive(Debug)]
pub struct ClusterGuard {
    pub state: Arc<crate::state::SharedState>,
    pub cidrs: Vec<crate::authz::IpNet>,
    pub hold: Duration,
    pub strict: bool,
}

impl ClusterGuard {
    /// Whether a connection to `ip` may go on: true at once outside the ranges or when known,
    /// else once it is known within `hold`; past it, true only when not strict.
    pub async fn admit(&self, ip: std::net::IpAddr) -> bool {
        if !self.cidrs.iter().any(|n| n.contains(ip)) {
            return true;
        }
        let mut changes = self.state.changes();
        let known = async {
            loop {
                if self.state.read().knows(ip) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        match tokio::time::timeout(self.hold, known).await {
            Ok(()) => true,
            Err(_) => !self.strict,
        }
    }
}

impl Outbound {
    /// `resolver`, when given, is asked about destinations the state does not know yet
    /// (on-demand discovery); the connection stays held while it answers.
    pub fn new(
        client: Arc<HboneClient>,
        sockets: Arc<dyn SocketFactory>,
        router: Arc<dyn Router>,
        resolver: Option<Arc<dyn Resolver>>,
        settings: TunnelSettings,
        metrics: Option<Arc<Metrics>>,
        drain: Option<Drain>,
    ) -> Self {
        Outbound {
            client,
            sockets,
            router,
            resolver,
            settings,
            metrics,
            drain,
            pod: PodLife::default(),
            cluster: None,
        }
    }

    /// Holds (and with `strict` refuses) unknown destinations in the cluster's pod ranges.
    pub fn guarding(self, cluster: Option<Arc<ClusterGuard>>) -> Self {
        Outbound { cluster, ..self }
    }

    /// The same, for the connections of one pod: they end when it is removed.
    pub fn for_pod(self, pod: PodLife) -> Self {
        Outbound { pod, ..self }
    }

    /// Accepts until the task is dropped; `original_dst` recovers where each connection was
    /// headed (SO_ORIGINAL_DST in a pod, a fixed target in loopback mode).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        original_dst: impl Fn(&TcpStream) -> Option<SocketAddr> + Send + Sync + 'static,
    ) {
        loop {
            let (app, src) = super::accept(&listener, "outbound").await;
            // Read here (one getsockopt), so the connection's task is its `handle` alone.
            let Some(dst) = original_dst(&app) else {
                tracing::info!(%src, "no original destination; resetting");
                reset(app);
                continue;
            };
            tokio::spawn(self.clone().handle(app, src, dst));
        }
    }

    /// Routes and relays one app connection; on any failure the app sees a reset.
    ///
    /// The task keeps this future for the connection's whole life, and a future is as large as
    /// its largest state: so the routing and the dial (TCP, TLS and HTTP/2 handshakes) run in a
    /// boxed future freed once the tunnel is up, and only the relay's state stays (see
    /// `a_live_connection_holds_only_the_relays_state`). It is the task itself (spawned as it
    /// is, no block around it), and a plain fn that boxes the dial before its `async move`
    /// block: an async fn would hold its arguments for the connection's life (twice: as passed
    /// and as bound), the block holds only the boxed dial and the drain guard.
    pub(crate) fn handle(
        self: Arc<Self>,
        app: TcpStream,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let _ = socket::set_stream_options(&app);
        let live = self.drain.as_ref().map(Drain::guard);
        // Boxed here, not in the block: the block would hold the app's stream and both
        // addresses for the connection's life (96 bytes) only to hand them over.
        let routed = Box::pin(self.clone().route_and_connect(app, src, dst));
        async move {
            let Some((mut app, mut tunnel, record)) = routed.await else {
                return;
            };
            // The relay, here rather than in an `async fn` of its own: an async fn's arguments are
            // stored twice in its future (as passed and as bound), ~400 bytes for these.
            let removed = std::pin::pin!(self.pod.removed());
            let ended =
                copy::bidirectional_until(&mut app, &mut tunnel, removed, record.meters()).await;
            let (outcome, transferred) = ended.outcome(|()| Outcome::PodRemoved);
            match ended {
                Ended::Copied(Ok(_)) => {}
                // Pass a reset through to whichever side did not cause it.
                Ended::Copied(Err(e)) => match e.end {
                    End::A => tunnel.reset(h2::Reason::CONNECT_ERROR),
                    End::B => reset(app),
                },
                Ended::Stopped { .. } => {
                    // The record's addresses: the app's, and where the relay went (the
                    // destination, or the peer proxy of its tunnel).
                    let (src, to) = (record.src(), record.dst());
                    tracing::info!(%src, %to, "the source pod was removed; resetting its connection");
                    tunnel.reset(h2::Reason::CANCEL);
                    reset(app);
                }
            }
            record.finish(outcome, transferred.request_response());
            // The drain guard, held (as captured) until the relay has ended.
            drop(live);
        }
    }

    /// Routes one connection: a tunnel's app connection, tunnel and record to relay, or `None`
    /// once a plaintext relay has been started or a refusal or a failure has dealt with it.
    async fn route_and_connect(
        self: Arc<Self>,
        app: TcpStream,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Option<(TcpStream, H2Stream, ConnectionRecord)> {
        if let Some(resolver) = &self.resolver {
            // Unknown destinations are looked up first; nothing is read from the app meanwhile.
            resolver.ensure(dst.ip()).await;
        }
        if let Some(cluster) = &self.cluster
            && !cluster.admit(dst.ip()).await
        {
            tracing::warn!(%src, %dst, "an address of the cluster's pod ranges that discovery does not know; refused rather than sent in plaintext (strict)");
            reset(app);
            return None;
        }
        match self.router.route(src, dst) {
            Route::Hbone {
                key,
                request,
                inner,
                peers,
                service,
            } => {
                let labels = ConnectionLabels::new(Reporter::Source, &peers.0, &peers.1, true)
                    .for_service(service.as_ref());
                let names = LogNames::of(&peers.0, &peers.1).hbone(request.authority.clone());
                let record =
                    ConnectionRecord::open(self.metrics.as_ref(), labels, names, src, key.peer())
                        .listed(self.pod.connections(), || {
                            LiveConnection::new(Direction::Outbound, src, dst, key.peer())
                                .carried(Carrier::Hbone)
                        });
                let connected = match inner {
                    None => self.client.connect(&key, &request).await,
                    Some(inner) => {
                        let InnerTunnel {
                            expected,
                            request: inner_request,
                        } = *inner;
                        // Boxed: the inner handshakes' state is ~10 KiB, which every
                        // connection's routing would otherwise allocate.
                        Box::pin(self.client.connect_double(
                            &key,
                            &request,
                            expected,
                            &inner_request,
                        ))
                        .await
                    }
                };
                match connected {
                    Ok(tunnel) => Some((app, tunnel, record)),
                    Err(e) => {
                        tracing::warn!(%src, %dst, peer = %key.peer(), side = ?e.side(), reason = e.reason(), error = %e, "tunnel failed; resetting the app connection");
                        record.finish(Outcome::Tunnel(e.reason()), (0, 0));
                        reset(app);
                        None
                    }
                }
            }
            Route::Passthrough { dst, peers } => {
                let labels = ConnectionLabels::new(Reporter::Source, &peers.0, &peers.1, false);
                let names = LogNames::of(&peers.0, &peers.1);
                let record = ConnectionRecord::open(self.metrics.as_ref(), labels, names, src, dst)
                    .listed(self.pod.connections(), || {
                        LiveConnection::new(Direction::Outbound, src, dst, dst)
                    });
                tokio::spawn(self.plaintext(app, dst, record));
                None
            }
            Route::PassthroughHost { host, port, peers } => {
                let labels = ConnectionLabels::new(Reporter::Source, &peers.0, &peers.1, false);
                let names = LogNames::of(&peers.0, &peers.1);
                let timeout = self.settings.connect_timeout;
                // The system resolver, bounded like a dial; an address of the original
                // destination's family first.
                let lookup = tokio::net::lookup_host((host.as_str(), port));
                let resolved = tokio::time::timeout(timeout, lookup)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|addrs| {
                        let addrs: Vec<SocketAddr> = addrs.collect();
                        let same = addrs.iter().find(|a| a.is_ipv4() == dst.is_ipv4());
                        same.or(addrs.first()).copied()
                    });
                let Some(target) = resolved else {
                    tracing::info!(%src, %host, "hostname workload did not resolve; resetting");
                    ConnectionRecord::open(self.metrics.as_ref(), labels, names, src, dst)
                        .finish(Outcome::DnsFailed, (0, 0));
                    reset(app);
                    return None;
                };
                let record =
                    ConnectionRecord::open(self.metrics.as_ref(), labels, names, src, target)
                        .listed(self.pod.connections(), || {
                            LiveConnection::new(Direction::Outbound, src, dst, target)
                        });
                tokio::spawn(self.plaintext(app, target, record));
                None
            }
            Route::Refuse { reason } => {
                tracing::info!(%src, %dst, reason, "outbound connection refused");
                reset(app);
                None
            }
        }
    }

    /// The plaintext relay of `app` to `target`, recorded in `record`, as a task of its own:
    /// the connection's routing runs in a box sized for its largest state (the route, the
    /// record and a CONNECT in flight: ~3.5 KiB), and a relay awaited inside it would keep
    /// that box for the connection's life. Its drain guard is taken here, before the routing
    /// returns and the connection's task drops its own, so a drain never sees it gone.
    fn plaintext(
        self: Arc<Self>,
        app: TcpStream,
        target: SocketAddr,
        record: ConnectionRecord,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let live = self.drain.as_ref().map(Drain::guard);
        async move {
            let timeout = self.settings.connect_timeout;
            // No policy applies on the way out: only the pod's removal ends the relay.
            let removed = async {
                self.pod.removed().await;
                Stop::PodRemoved
            };
            let meters = record.meters().clone();
            passthrough::relay(
                app,
                &*self.sockets,
                (None, target),
                timeout,
                removed,
                &meters,
            )
            .await
            .record(record);
            drop(live);
        }
    }
}

/// Closes `app` with RST, so the application sees a failure rather than a clean EOF.
fn reset(app: TcpStream) {
    let _ = socket::reset_on_close(&app);
    drop(app);
}

/// Routes a pod's connections from the shared workload state (docs/design.md §1): enrolled
/// destinations through HBONE to `<podIP>:15008`, the rest as plain TCP.
#[derive(Debug)]
pub struct StateRouter {
    state: Arc<SharedState>,
    /// The source pod's identity, presented to the peer.
    source: LiveIdentity,
    /// The source pod's name, for baggage.
    source_name: String,
    /// The source pod's addresses: what finds its workload entry in the state.
    source_ips: Vec<IpAddr>,
    cluster_id: String,
}

/// The randomness one route decision uses, drawn by the caller so that the decision itself is
/// a pure function (and a test can fix it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dice {
    /// Chooses among a service's endpoints.
    pub pick: u64,
    /// The request's `traceparent`.
    pub trace: TraceParent,
}

impl Dice {
    pub fn roll() -> Self {
        Dice {
            pick: rand::random(),
            trace: TraceParent::random(),
        }
    }
}

impl Router for StateRouter {
    fn route(&self, src: SocketAddr, dst: SocketAddr) -> Route {
        // The lock and the randomness here; the decision is pure.
        self.decide(&self.state.read(), src, dst, Dice::roll())
    }
}

impl StateRouter {
    /// A CONNECT to `authority` for a connection from `src`, with ztunnel's headers.
    fn request(
        &self,
        authority: impl Into<Authority>,
        src: SocketAddr,
        service: Option<&ServiceRef>,
        source_identity: &Identity,
        dice: Dice,
    ) -> ConnectRequest {
        let mut request = ConnectRequest::new(authority);
        request.forwarded_for = Some(src);
        request.forwarded_host = service.map(|s| s.hostname.clone());
        let mut baggage = Baggage::default();
        baggage
            .push("k8s.cluster.name", &self.cluster_id)
            .push("k8s.namespace.name", source_identity.namespace())
            .push("k8s.pod.name", &self.source_name);
        request.baggage = baggage;
        request.traceparent = Some(dice.trace);
        request
    }

    /// The router of the pod `source_name` at `source_ips`, presenting `source`, in the
    /// cluster `cluster_id`.
    pub fn new(
        state: Arc<SharedState>,
        source: LiveIdentity,
        source_name: impl Into<String>,
        source_ips: Vec<IpAddr>,
        cluster_id: impl Into<String>,
    ) -> Self {
        StateRouter {
            state,
            source,
            source_name: source_name.into(),
            source_ips,
            cluster_id: cluster_id.into(),
        }
    }

    /// The whole route of a connection from this router's pod (`src`) to `dst`, decided from
    /// `state` alone: the target and CONNECT authority, the headers, the identities the peer
    /// may present, and both ends as metrics name them.
    pub fn decide(&self, state: &State, src: SocketAddr, dst: SocketAddr, dice: Dice) -> Route {
        let upstream = state.route(&self.source_ips, dst, dice.pick);
        let source_identity = self.source.get();
        // The source as ztunnel labels it: its workload entry when the state has one.
        let source = self
            .source_ips
            .iter()
            .find_map(|ip| state.workload_by_ip(*ip))
            .map_or_else(
                || Peer::new(&self.source_name, Some(&source_identity)),
                |w| Peer::of(w, Some(&source_identity)),
            );
        match upstream {
            Upstream::Hbone {
                workload,
                target,
                peer,
                expected,
                service,
            } => {
                let destination = Peer::of(&workload, Some(&workload.identity));
                let request = self.request(target, src, service.as_ref(), &source_identity, dice);
                Route::Hbone {
                    key: PoolKey::new(Identity::clone(&source_identity), expected, peer, None),
                    request,
                    inner: None,
                    peers: (source, destination),
                    service,
                }
            }
            Upstream::DoubleHbone {
                gateway,
                peer,
                gateway_expected,
                authority,
                expected,
                service,
            } => {
                // Metrics name the gateway as the destination, as ztunnel does.
                let destination = Peer::of(&gateway, Some(&gateway.identity));
                let authority = Authority::Host(authority.0, authority.1);
                let service = Some(service);
                let outer = self.request(
                    authority.clone(),
                    src,
                    service.as_ref(),
                    &source_identity,
                    dice,
                );
                let mut inner = outer.clone();
                inner.origin_network = Some(state.network().to_owned());
                Route::Hbone {
                    key: PoolKey::new(
                        Identity::clone(&source_identity),
                        gateway_expected,
                        peer,
                        None,
                    ),
                    request: outer,
                    inner: Some(Box::new(InnerTunnel {
                        expected,
                        request: inner,
                    })),
                    peers: (source, destination),
                    service,
                }
            }
            Upstream::Passthrough { target } => {
                // Plaintext: the destination is named if known, but has no principal.
                let destination = state
                    .workload_by_ip(target.ip())
                    .map_or_else(Peer::default, |w| Peer::of(w, None));
                Route::Passthrough {
                    dst: target,
                    peers: (source, destination),
                }
            }
            Upstream::PassthroughHost { host, port } => Route::PassthroughHost {
                host,
                port,
                peers: (source, Peer::default()),
            },
            Upstream::Refuse(reason) => Route::Refuse { reason },
        }
    }
}

#[cfg(test)]
mod tests;

//! Plain TCP: the outbound passthrough to non-enrolled destinations, and the inbound 15006
//! listener that delivers redirected plaintext from non-enrolled sources to the app. Both dial
//! through the pod's socket factory, so their sockets carry the proxy mark and skip the
//! redirect rules.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::Stop;
use super::copy::{self, End, Ended, Transferred};
use super::inbound::LocalWorkload;
use crate::metrics::Meters;
use crate::metrics::{ConnectionRecord, Outcome};
use crate::netns::{self, SocketFactory};
use crate::ports::POD_LISTENERS;
use crate::socket;

/// How a plain TCP relay ended.
#[derive(Debug)]
pub(crate) struct Relayed {
    pub outcome: Outcome,
    /// app → dst, dst → app.
    pub transferred: Transferred,
}

impl Relayed {
    /// Closes `record` with how the relay ended.
    pub(crate) fn record(self, record: ConnectionRecord) {
        record.finish(self.outcome, self.transferred.request_response());
    }
}

/// Relays `app` to `dst` over plain TCP, from `source` when given (the client's IP), until
/// both sides finish or `stop` resolves (a policy change, the pod removed: both sockets are
/// then reset).
pub(crate) async fn relay(
    mut app: TcpStream,
    sockets: &dyn SocketFactory,
    (source, dst): (Option<IpAddr>, SocketAddr),
    timeout: Duration,
    stop: impl Future<Output = Stop>,
    meters: &Meters,
) -> Relayed {
    let peer = app.peer_addr().ok();
    let mut upstream = match netns::dial(sockets, source, dst, timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(?peer, %dst, error = %e, "plaintext dial failed; resetting");
            let _ = socket::reset_on_close(&app);
            return Relayed {
                outcome: Outcome::ConnectFailed,
                transferred: Transferred::default(),
            };
        }
    };
    let stop = std::pin::pin!(stop);
    let ended = copy::bidirectional_until(&mut app, &mut upstream, stop, meters).await;
    match &ended {
        Ended::Copied(Ok(_)) => {}
        // Pass a reset through to whichever side did not cause it.
        Ended::Copied(Err(e)) => {
            let other = match e.end {
                End::A => &upstream,
                End::B => &app,
            };
            let _ = socket::reset_on_close(other);
        }
        Ended::Stopped { reason, .. } => {
            tracing::info!(?peer, %dst, why = ?reason, "ending this connection (a policy change denies it, or its pod was removed); resetting it");
            let _ = socket::reset_on_close(&app);
            let _ = socket::reset_on_close(&upstream);
        }
    }
    let (outcome, transferred) = ended.outcome(Stop::outcome);
    Relayed {
        outcome,
        transferred,
    }
}

/// Which plaintext an enrolled pod's 15006 takes (kubelet's probes never reach it: the pod's
/// rules let them through uncaptured).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum InboundPlaintext {
    /// Any, authorized by policy (permissive: the seed design, ambient's default).
    #[default]
    Accept,
    /// None from a pod that is itself reached over HBONE: it should have come through a
    /// tunnel, so its capture was bypassed (Kubernetes mode).
    RefuseMesh,
    /// None at all (strict).
    Refuse,
}

/// Serves the inbound plaintext listener (15006) of the pod `workload`: connections without an
/// identity, authorized by source and destination alone, as `plaintext` allows.
pub(crate) async fn serve_inbound_plaintext(
    listener: TcpListener,
    sockets: Arc<dyn SocketFactory>,
    workload: LocalWorkload,
    timeout: Duration,
    plaintext: InboundPlaintext,
) {
    let workload = Arc::new(workload);
    let local = &workload.addresses;
    loop {
        let (app, src) = super::accept(&listener, "inbound plaintext").await;
        let _ = socket::set_stream_options(&app);
        let dst = match socket::original_dst(&app) {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(%src, error = %e, "no original destination; resetting");
                let _ = socket::reset_on_close(&app);
                continue;
            }
        };
        if POD_LISTENERS.contains(&dst.port()) || !local.contains(&dst.ip()) {
            tracing::info!(%src, %dst, "plaintext for a proxy port or another address; resetting");
            let _ = socket::reset_on_close(&app);
            continue;
        }
        let conn = super::inbound::authz_facts(None, src, dst);
        let (labels, names) = workload.labels(src.ip(), None, dst.ip());
        let record = ConnectionRecord::open(workload.metrics.as_ref(), labels, names, src, dst)
            .listed(workload.pod.connections(), || {
                super::live::LiveConnection::new(super::live::Direction::Inbound, src, dst, dst)
            });
        // Strict takes no plaintext; refusing the mesh's takes none from an enrolled pod (its
        // capture was bypassed: it should have come through a tunnel); then the policies.
        let refused = match plaintext {
            InboundPlaintext::Refuse => Some("plaintext into an enrolled pod, refused (strict)"),
            InboundPlaintext::RefuseMesh if workload.reached_over_hbone(src.ip()) => {
                // An anomaly, not a policy: worth a warning.
                tracing::warn!(%src, %dst, "plaintext from an enrolled pod, which must use a tunnel (its capture was bypassed)");
                Some("plaintext from an enrolled pod")
            }
            _ if !workload.authorize(&conn).is_allowed() => {
                Some("plaintext connection denied by policy")
            }
            _ => None,
        };
        if let Some(why) = refused {
            tracing::info!(%src, %dst, "{why}; resetting");
            record.finish(Outcome::Denied, (0, 0));
            let _ = socket::reset_on_close(&app);
            continue;
        }
        let sockets = sockets.clone();
        let source = workload.preserve_source_ip.then_some(src.ip());
        let live = workload.drain.as_ref().map(crate::drain::Drain::guard);
        let socket = workload
            .metrics
            .as_ref()
            .map(crate::metrics::Metrics::socket_open);
        let workload = workload.clone();
        tokio::spawn(async move {
            let (_live, _socket) = (live, socket);
            let stop = workload.stop(|| super::inbound::authz_facts(None, src, dst));
            let meters = record.meters().clone();
            relay(app, &*sockets, (source, dst), timeout, stop, &meters)
                .await
                .record(record);
        });
    }
}

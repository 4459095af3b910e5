//! Plain TCP: the outbound passthrough to non-enrolled destinations, and the inbound 15006
//! listener that delivers redirected plaintext from non-enrolled sources to the app. Both dial
//! through the pod's socket factory, so their sockets carry the proxy mark and skip the
//! redirect rules.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::copy::{self, End, Transferred};
use super::inbound::LocalWorkload;
use crate::authz;
use crate::metrics;
use crate::netns::{self, SocketFactory};
use crate::socket;
use crate::state::PROXY_PORTS;

/// Relays `app` to `dst` over plain TCP, from `source` when given (the client's IP). Returns
/// what moved (app → dst, dst → app) and the error that ended it, if any.
pub async fn relay(
    mut app: TcpStream,
    sockets: &dyn SocketFactory,
    source: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> (Transferred, Option<String>) {
    let peer = app.peer_addr().ok();
    let mut upstream = match netns::dial(sockets, source, dst, timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(?peer, %dst, error = %e, "plaintext dial failed; resetting");
            let _ = socket::reset_on_close(&app);
            return (Transferred::default(), Some(format!("connect_failed: {e}")));
        }
    };
    match copy::bidirectional(&mut app, &mut upstream).await {
        Ok(t) => (t, None),
        Err(e) => {
            let other = match e.end {
                End::A => &upstream,
                End::B => &app,
            };
            let _ = socket::reset_on_close(other);
            (e.transferred, Some(e.source.to_string()))
        }
    }
}

/// Serves the inbound plaintext listener (15006) of the pod `workload`: connections without an
/// identity, authorized by source and destination alone.
pub async fn serve_inbound_plaintext(
    listener: TcpListener,
    sockets: Arc<dyn SocketFactory>,
    workload: LocalWorkload,
    timeout: Duration,
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
        if PROXY_PORTS.contains(&dst.port()) || !local.contains(&dst.ip()) {
            tracing::info!(%src, %dst, "plaintext for a proxy port or another address; resetting");
            let _ = socket::reset_on_close(&app);
            continue;
        }
        let decision = workload.authorize(&authz::Connection {
            source: None,
            source_ip: src.ip(),
            destination_ip: dst.ip(),
            destination_port: dst.port(),
        });
        let labels = workload.labels(src.ip(), None, dst.ip());
        if !decision.is_allowed() {
            tracing::info!(%src, %dst, ?decision, "plaintext connection denied by policy; resetting");
            if let Some(m) = &workload.metrics {
                m.failed(&labels.clone().failed("denied"));
            }
            metrics::access_log(&labels, src, dst, 0, 0, Duration::ZERO, Some("denied"));
            let _ = socket::reset_on_close(&app);
            continue;
        }
        let sockets = sockets.clone();
        let source = workload.preserve_source_ip.then_some(src.ip());
        let metrics = workload.metrics.clone();
        let live = workload.drain.as_ref().map(crate::drain::Drain::guard);
        let workload = workload.clone();
        tokio::spawn(async move {
            let _live = live;
            let started = std::time::Instant::now();
            if let Some(m) = &metrics {
                m.opened(&labels);
            }
            let conn = super::inbound::authz_facts(None, src, dst);
            let (t, error) = tokio::select! {
                done = relay(app, &*sockets, source, dst, timeout) => done,
                denied = workload.revoked(&conn) => {
                    // Dropping the relay closes both sockets.
                    tracing::info!(%src, %dst, ?denied, "a policy change now denies this connection; closing it");
                    (Transferred::default(), Some("denied".to_owned()))
                }
            };
            if let Some(m) = &metrics {
                m.closed(&labels, t.a_to_b, t.b_to_a);
            }
            metrics::access_log(
                &labels,
                src,
                dst,
                t.a_to_b,
                t.b_to_a,
                started.elapsed(),
                error.as_deref(),
            );
        });
    }
}

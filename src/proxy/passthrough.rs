//! Plain TCP: the outbound passthrough to non-enrolled destinations, and the inbound 15006
//! listener that delivers redirected plaintext from non-enrolled sources to the app. Both dial
//! through the pod's socket factory, so their sockets carry the proxy mark and skip the
//! redirect rules.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::copy::{self, End};
use super::inbound::LocalWorkload;
use crate::authz;
use crate::netns::{self, SocketFactory};
use crate::socket;
use crate::state::PROXY_PORTS;

/// Relays `app` to `dst` over plain TCP, from `source` when given (the client's IP).
pub async fn relay(
    mut app: TcpStream,
    sockets: &dyn SocketFactory,
    source: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) {
    let peer = app.peer_addr().ok();
    let mut upstream = match netns::dial(sockets, source, dst, timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(?peer, %dst, error = %e, "plaintext dial failed; resetting");
            let _ = socket::reset_on_close(&app);
            return;
        }
    };
    match copy::bidirectional(&mut app, &mut upstream).await {
        Ok(t) => {
            tracing::debug!(?peer, %dst, sent = t.a_to_b, received = t.b_to_a, "plaintext relay done")
        }
        Err(e) => {
            let other = match e.end {
                End::A => &upstream,
                End::B => &app,
            };
            let _ = socket::reset_on_close(other);
            tracing::debug!(?peer, %dst, error = %e.source, "plaintext relay failed");
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
        if !decision.is_allowed() {
            tracing::info!(%src, %dst, ?decision, "plaintext connection denied by policy; resetting");
            let _ = socket::reset_on_close(&app);
            continue;
        }
        let sockets = sockets.clone();
        let source = workload.preserve_source_ip.then_some(src.ip());
        tokio::spawn(async move { relay(app, &*sockets, source, dst, timeout).await });
    }
}

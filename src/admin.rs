//! The proxy's own HTTP endpoints, in its own netns: readiness on 15021 (`GET /healthz/ready`:
//! 200 once every configured enrollment and discovery source delivered its first full state,
//! 503 before), Prometheus metrics on 15020 (`/metrics`, `/stats/prometheus`), and the admin
//! page on localhost:15000 (`/config_dump`, `POST /quitquitquit`, `POST /logging?level=`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

mod dump;
pub(crate) mod log_filter;

fn respond(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// Answers one readiness request from the current state of `ready`.
pub(crate) fn readiness(req: &Request<Incoming>, ready: bool) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz/ready") if ready => respond(StatusCode::OK, "ready\n"),
        (&Method::GET, "/healthz/ready") => respond(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => respond(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves readiness on `listener` until the task is dropped.
pub async fn serve_readiness(listener: TcpListener, ready: watch::Receiver<bool>) {
    serve(listener, move |req| readiness(&req, *ready.borrow())).await
}

/// Answers a metrics request with `render()`'s text exposition.
pub(crate) fn metrics(
    req: &Request<Incoming>,
    render: impl Fn() -> String,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => {
            let mut resp = Response::new(Full::new(Bytes::from(render())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => respond(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Connections one of these ports holds at once; a new one past that closes the oldest.
pub(crate) const MAX_CONNECTIONS: usize = 128;
/// A request's head must arrive within this (a silent or half-sent request is closed).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection to these ports lives longer (keep-alive included).
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The connections a port holds, oldest first, each with the switch that closes it.
#[derive(Default)]
struct Held {
    next: u64,
    open: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

/// Serves HTTP/1.1 on `listener`, answering each request with `handler`; at most
/// [`MAX_CONNECTIONS`] at once, each closed when its request head is slower than
/// [`HEADER_READ_TIMEOUT`] or it outlives [`CONNECTION_LIFETIME`]. A connection past the cap
/// closes the oldest one rather than being refused: whoever holds many idle connections open
/// (anyone who can reach the port) cannot keep the kubelet's probe or a scrape out, since those
/// send their request as soon as they connect.
pub(crate) async fn serve<F>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = std::sync::Arc::new(handler);
    let held = std::sync::Arc::new(crate::sync::Lock::new(Held::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                tracing::debug!(error = %e, "accept failed on an admin port; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (close, closed) = tokio::sync::oneshot::channel();
        let id = {
            let mut held = held.lock();
            if held.open.len() >= MAX_CONNECTIONS
                && let Some((_, oldest)) = held.open.pop_front()
            {
                tracing::debug!(%peer, "too many connections on an admin port; closing the oldest");
                let _ = oldest.send(());
            }
            held.next += 1;
            let id = held.next;
            held.open.push_back((id, close));
            id
        };
        let handler = handler.clone();
        let held = held.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handler(req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, service);
            tokio::select! {
                ended = tokio::time::timeout(CONNECTION_LIFETIME, conn) => match ended {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTP connection failed"),
                    Err(_) => tracing::debug!(%peer, "HTTP connection closed at its lifetime"),
                },
                _ = closed => {}
            }
            held.lock().open.retain(|(other, _)| *other != id);
        });
    }
}

/// Binds one of the proxy's own listeners with SO_REUSEPORT, so a new proxy can start beside
/// a draining one in the same network namespace (a hostNetwork DaemonSet's rolling update).
/// The IPv6 wildcard (`[::]`, the default, as ztunnel binds) takes IPv4 too (dual stack), so a
/// kubelet probing an IPv6 or an IPv4 pod address is answered; where that cannot be bound
/// (IPv6 disabled, or an older proxy holding the port on IPv4 alone) it falls back to
/// `0.0.0.0` on the same port.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match bind_once(addr) {
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::info!(%addr, error = %e, fallback = %v4, "no dual-stack listener here; IPv4 only");
            bind_once(v4)
        }
        other => other,
    }
}

fn bind_once(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// Binds the admin listener, which takes no partner: while an older proxy still holds the
/// port (an upgrade's overlap), retries every second until it is free.
pub(crate) async fn bind_exclusive(addr: SocketAddr) -> TcpListener {
    let mut warned = false;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) => {
                if !warned {
                    tracing::warn!(%addr, error = %e, "admin address busy (a proxy draining beside this one?); retrying every second");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// True while every given source is: it follows them both ways (a node agent that goes away
/// makes the node unready again). A source whose sender is gone keeps its last value.
pub(crate) fn all_ready(mut sources: Vec<watch::Receiver<bool>>) -> watch::Receiver<bool> {
    let all = |sources: &[watch::Receiver<bool>]| sources.iter().all(|s| *s.borrow());
    let (tx, rx) = watch::channel(all(&sources));
    tokio::spawn(async move {
        let mut open = vec![true; sources.len()];
        loop {
            let ready = all(&sources);
            let changed = tx.send_if_modified(|r| std::mem::replace(r, ready) != ready);
            if changed {
                if ready {
                    tracing::info!("ready");
                } else {
                    tracing::warn!("not ready");
                }
            }
            let waits: Vec<_> = sources
                .iter_mut()
                .zip(&open)
                .enumerate()
                .filter(|(_, (_, open))| **open)
                .map(|(i, (s, _))| Box::pin(async move { (i, s.changed().await.is_ok()) }))
                .collect();
            if waits.is_empty() {
                // Nothing can change any more; keep the sender so readers see the last value.
                tx.closed().await;
                return;
            }
            tokio::select! {
                ((i, alive), _, _) = futures_util::future::select_all(waits) => {
                    if !alive {
                        open[i] = false;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

/// Why the log filter was not replaced (the old one stays).
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("not a log filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    #[error("cannot install the filter: {0}")]
    Reload(#[from] tracing_subscriber::reload::Error),
}

/// The process's log filter as the admin page reads and changes it, with ztunnel's rules
/// (`POST /logging`): no level lists the filter; a level is merged into the current filter (a
/// bare level replaces the default level, `target=level` that target's); `reset` starts again
/// from the filter the process started with.
pub struct LogControl {
    initial: String,
    current: crate::sync::Lock<String>,
    install: Box<InstallFilter>,
}

/// Puts a filter in force.
type InstallFilter = dyn Fn(&str) -> Result<(), LogLevelError> + Send + Sync;

impl LogControl {
    /// The filter `initial` is in force; `install` puts a new one in force.
    pub fn new(
        initial: impl Into<String>,
        install: impl Fn(&str) -> Result<(), LogLevelError> + Send + Sync + 'static,
    ) -> Self {
        let initial = initial.into();
        LogControl {
            current: crate::sync::Lock::new(initial.clone()),
            initial,
            install: Box::new(install),
        }
    }

    /// Controls nothing (tests, a process without a reloadable logger).
    pub fn inert() -> Self {
        LogControl::new("info", |_| Ok(()))
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().clone()
    }

    /// Merges `level` (already checked by `log_filter::parse`; may be empty) into the current
    /// filter, or into the initial one with `reset`; the filter now in force.
    pub fn change(&self, reset: bool, level: &str) -> Result<String, LogLevelError> {
        let mut current = self.current.lock();
        let base = if reset { &self.initial } else { &*current };
        let merged = log_filter::merge(base, level);
        (self.install)(&merged)?;
        *current = merged.clone();
        Ok(merged)
    }
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

/// What the admin page (localhost:15000) reads and controls.
pub(crate) struct AdminContext {
    /// The effective configuration, as loaded.
    pub config: serde_json::Value,
    pub state: std::sync::Arc<crate::state::SharedState>,
    pub certs: std::sync::Arc<crate::identity::CertificateManager>,
    pub pods: std::sync::Arc<crate::inpod::PodManager>,
    /// Notified by `POST /quitquitquit`: the process drains and exits as on SIGTERM.
    pub quit: std::sync::Arc<tokio::sync::Notify>,
    /// The log filter (`POST /logging?level=hboned=debug,info`).
    pub log: LogControl,
}

impl std::fmt::Debug for AdminContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminContext").finish_non_exhaustive()
    }
}

/// The admin page: `GET /config_dump`, `POST /quitquitquit`, `POST /logging?level=…`.
pub(crate) fn admin(
    method: &Method,
    path: &str,
    query: Option<&str>,
    ctx: &AdminContext,
) -> (StatusCode, String) {
    match (method, path) {
        (&Method::GET, "/config_dump") => (StatusCode::OK, config_dump(ctx).to_string() + "\n"),
        (&Method::POST, "/quitquitquit") => {
            ctx.quit.notify_one();
            (StatusCode::OK, "draining and exiting\n".into())
        }
        // ztunnel's `handle_logging`, which `istioctl ztunnel-config log` drives: no level
        // (or an empty one, istioctl's listing) and no `reset` answers the filter in force.
        (&Method::POST, "/logging") => {
            let pairs: Vec<&str> = query.unwrap_or_default().split('&').collect();
            let level = pairs.iter().find_map(|kv| kv.strip_prefix("level="));
            let reset = pairs
                .iter()
                .any(|kv| *kv == "reset" || kv.starts_with("reset="));
            let listed =
                |filter: String| (StatusCode::OK, format!("current log level is {filter}\n"));
            let level = match level {
                Some(raw) if !raw.is_empty() => match log_filter::parse(raw) {
                    Ok(level) => level,
                    Err(e) => {
                        return (
                            StatusCode::BAD_REQUEST,
                            format!("invalid level: {e}; nothing changed\n"),
                        );
                    }
                },
                _ if !reset => return listed(ctx.log.current()),
                _ => String::new(),
            };
            match ctx.log.change(reset, &level) {
                Ok(filter) => listed(filter),
                Err(e) => (
                    StatusCode::BAD_REQUEST,
                    format!("invalid level {level:?}: {e}; nothing changed\n"),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "GET /config_dump, POST /quitquitquit, POST /logging?level=...\n".into(),
        ),
    }
}

fn config_dump(ctx: &AdminContext) -> serde_json::Value {
    use serde_json::json;
    let (workloads, services, policies) = dump::state(&ctx.state.read());
    // ztunnel's shape (admin.rs, CertsDump), which `istioctl ztunnel-config certificates`
    // reads: identity, state, the chain presented and the roots trusted.
    let now = std::time::SystemTime::now();
    let certificates: Vec<_> = ctx
        .certs
        .held()
        .into_iter()
        .map(|(id, cert)| match cert {
            Some(c) => json!({
                "identity": id.to_string(),
                "state": if c.not_after() > now { "Available" } else { "Unavailable: expired" },
                "certChain": c.chain().iter().map(cert_dump).collect::<Vec<_>>(),
                "rootCerts": c.bundle().certs().iter().map(cert_dump).collect::<Vec<_>>(),
            }),
            None => json!({"identity": id.to_string(), "state": "Initializing",
                "certChain": [], "rootCerts": []}),
        })
        .collect();
    let enrolled = ctx.pods.pods();
    let connections: std::collections::HashMap<_, _> = ctx.pods.connections().into_iter().collect();
    let pods: Vec<_> = enrolled
        .iter()
        .map(|(info, id, addresses)| json!({"uid": info.uid, "name": info.name, "namespace": info.namespace, "identity": id.to_string(), "addresses": addresses}))
        .collect();
    // ztunnel's `workloadState` (WorkloadState in istioctl's api.go): the pods this proxy
    // serves, by uid.
    let workload_state: serde_json::Map<String, serde_json::Value> = enrolled
        .iter()
        .map(|(info, id, _)| {
            let info_json = json!({"name": info.name, "namespace": info.namespace,
                "trustDomain": id.trust_domain(), "serviceAccount": id.service_account()});
            let live = connections.get(&info.uid).map_or_else(
                || json!({"inbound": [], "outbound": []}),
                |table| table.dump(),
            );
            let state = json!({"state": "Up", "connections": live, "info": info_json});
            (info.uid.clone(), state)
        })
        .collect();
    json!({
        "config": ctx.config, "pods": pods, "workloads": workloads, "services": services,
        "policies": policies, "certificates": certificates, "workloadState": workload_state,
    })
}

/// One certificate as ztunnel's config dump shows it: the PEM (base64), serial number, and
/// validity as RFC 3339.
fn cert_dump(der: &rustls_pki_types::CertificateDer<'_>) -> serde_json::Value {
    use base64::Engine;
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    );
    let rfc3339 = |t: x509_parser::time::ASN1Time| {
        t.to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let (serial, from, to) = match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok((_, c)) => (
            c.raw_serial_as_string(),
            rfc3339(c.validity().not_before),
            rfc3339(c.validity().not_after),
        ),
        Err(_) => Default::default(),
    };
    serde_json::json!({
        "pem": base64::engine::general_purpose::STANDARD.encode(pem),
        "serialNumber": serial,
        "validFrom": from,
        "expirationTime": to,
    })
}

#[cfg(test)]
mod tests;

//! [`ConnectionRecord`]: one connection's metrics and access-log line from open to close,
//! recorded the same way on every path (outbound tunnel and passthrough, inbound HBONE and
//! plaintext), as ztunnel's ConnectionOpen → ConnectionClose guard does: opened when the proxy
//! takes the connection on (before any dial), closed exactly once with how it ended, failures
//! included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{ConnectionLabels, Metrics, Peer};
use crate::proxy::live::Addr;

/// Live byte counters a relay adds to as bytes move (metrics update while a connection runs,
/// not only at its end): `request` for a → b, `response` for b → a.
#[derive(Debug, Clone, Default)]
pub(crate) struct Meters {
    pub request: Option<prometheus_client::metrics::counter::Counter>,
    pub response: Option<prometheus_client::metrics::counter::Counter>,
}

/// What the access log says beyond the metric labels, as ztunnel's ConnectionResult does
/// (src/proxy/metrics.rs): each end's pod name (falling back to its canonical service), and for
/// a tunnel the address inside the CONNECT (`dst.hbone_addr`) next to the peer it went to.
/// The names are boxed `str`s (a pointer and a length, no capacity): a record lives in every
/// connection's task.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogNames {
    src: Option<Box<str>>,
    dst: Option<Box<str>>,
    hbone: Option<crate::hbone::Authority>,
}

impl LogNames {
    pub(crate) fn of(source: &Peer, destination: &Peer) -> Self {
        let name = |p: &Peer| {
            [&p.pod, &p.canonical_service]
                .into_iter()
                .find(|s| !s.is_empty())
                .map(|s| s.as_str().into())
        };
        LogNames {
            src: name(source),
            dst: name(destination),
            hbone: None,
        }
    }

    /// The connection was tunnelled: `authority` is what the CONNECT asked for.
    pub(crate) fn hbone(mut self, authority: impl Into<crate::hbone::Authority>) -> Self {
        self.hbone = Some(authority.into());
        self
    }
}

/// A connection being recorded; closed on [`ConnectionRecord::done`], on
/// [`ConnectionRecord::failed`], or, if neither, when dropped (as `dropped`).
#[derive(Debug)]
pub(crate) struct ConnectionRecord {
    metrics: Option<Arc<Metrics>>,
    labels: Arc<ConnectionLabels>,
    names: LogNames,
    /// Kept as 20-byte addresses (a `SocketAddr` is 32): every connection's task holds a
    /// record.
    src: Addr,
    dst: Addr,
    started: Instant,
    open: bool,
    meters: Meters,
    /// The connection's entry in its pod's live table, removed as the record closes.
    tracked: Option<crate::proxy::live::Tracked>,
}

impl ConnectionRecord {
    /// Counts the connection as opened, now.
    pub(crate) fn open(
        metrics: Option<&Arc<Metrics>>,
        labels: ConnectionLabels,
        names: LogNames,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        let mut meters = Meters::default();
        if let Some(m) = metrics {
            m.opened(&labels);
            let (request, response) = m.byte_counters(&labels);
            meters = Meters {
                request: Some(request),
                response: Some(response),
            };
        }
        let labels = match metrics {
            Some(m) => m.intern(labels),
            None => Arc::new(labels),
        };
        let record = ConnectionRecord {
            metrics: metrics.cloned(),
            labels,
            names,
            src: src.into(),
            dst: dst.into(),
            started: Instant::now(),
            open: true,
            meters,
            tracked: None,
        };
        record.log(None, None);
        record
    }

    /// Lists the connection in `table` (its pod's, if any) while it is open.
    pub(crate) fn listed(
        mut self,
        table: Option<&Arc<crate::proxy::live::ConnectionTable>>,
        conn: impl FnOnce() -> crate::proxy::live::LiveConnection,
    ) -> Self {
        self.tracked = table.map(|t| t.track(conn()));
        self
    }

    /// Where the connection came from, as opened.
    pub(crate) fn src(&self) -> SocketAddr {
        self.src.into()
    }

    /// Where it goes, as opened.
    pub(crate) fn dst(&self) -> SocketAddr {
        self.dst.into()
    }

    /// The live byte counters for this connection's relay (client → destination first).
    pub(crate) fn meters(&self) -> &Meters {
        &self.meters
    }

    /// Closes the connection with how it ended, after `request` bytes from the client and
    /// `response` back (for the access log: the metrics counted them as they moved). A failure
    /// is also counted in `istio_tcp_connections_failed_total`.
    pub(crate) fn finish(mut self, outcome: Outcome, (request, response): (u64, u64)) {
        self.close(&outcome, request, response);
    }

    fn close(&mut self, outcome: &Outcome, request: u64, response: u64) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        let failed = outcome.is_failure();
        if failed {
            self.labels = Arc::new((*self.labels).clone().failed(outcome.flag()));
        }
        self.tracked = None;
        if let Some(m) = &self.metrics {
            if failed {
                m.failed(&self.labels);
            }
            m.closed(&self.labels);
        }
        self.log(Some((request, response)), outcome.error().as_deref());
    }

    /// ztunnel's access log (src/proxy/metrics.rs, ConnectionResult): target `access`, "connection
    /// opened" at debug, "connection complete" at info, or at error with `error` when it failed;
    /// identities only for mutual TLS; unknown values left out; bytes as the reporting proxy
    /// moved them (`bytes_sent` is the request on the way out, the response on the way in).
    fn log(&self, bytes: Option<(u64, u64)>, error: Option<&str>) {
        let l: &ConnectionLabels = &self.labels;
        fn known(s: &str) -> Option<&str> {
            Some(s).filter(|s| *s != "unknown")
        }
        let mtls = l.connection_security_policy == "mutual_tls";
        let outbound = l.reporter == "source";
        let direction = if outbound { "outbound" } else { "inbound" };
        let src_identity = known(&l.source_principal).filter(|_| mtls);
        let dst_identity = known(&l.destination_principal).filter(|_| mtls);
        let hbone = self.names.hbone.as_ref().map(tracing::field::display);
        macro_rules! event {
            ($level:expr, $($rest:tt)*) => {
                tracing::event!(
                    target: "access",
                    $level,
                    src.addr = %self.src(),
                    src.workload = self.names.src.as_deref(),
                    src.namespace = known(&l.source_workload_namespace),
                    src.identity = src_identity,
                    dst.addr = %self.dst(),
                    dst.hbone_addr = hbone,
                    dst.service = known(&l.destination_service),
                    dst.workload = self.names.dst.as_deref(),
                    dst.namespace = known(&l.destination_workload_namespace),
                    dst.identity = dst_identity,
                    direction,
                    $($rest)*
                )
            };
        }
        let Some((request, response)) = bytes else {
            event!(tracing::Level::DEBUG, "connection opened");
            return;
        };
        let (sent, recv) = if outbound {
            (request, response)
        } else {
            (response, request)
        };
        let duration = format!("{}ms", self.started.elapsed().as_millis());
        match error {
            None => event!(
                tracing::Level::INFO,
                bytes_sent = sent,
                bytes_recv = recv,
                duration,
                "connection complete"
            ),
            Some(error) => event!(
                tracing::Level::ERROR,
                bytes_sent = sent,
                bytes_recv = recv,
                duration,
                error,
                "connection complete"
            ),
        }
    }
}

impl Drop for ConnectionRecord {
    /// A path that returned without saying how the connection ended (the client went away
    /// first) still closes it.
    fn drop(&mut self) {
        self.close(&Outcome::Dropped, 0, 0);
    }
}

/// How a connection the proxy took on ended: the one value its `response_flags` (ztunnel's
/// vocabulary, src/proxy/metrics.rs `ResponseFlags`) and its access log's `error` come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Relayed until both sides finished.
    Completed,
    /// Relayed until one side failed (a reset, an I/O error): the peers' doing, logged, not a
    /// proxy failure.
    Broken(String),
    /// A policy refused it, or a policy change ended it.
    Denied,
    /// Its pod was removed while it ran.
    PodRemoved,
    /// The client reset or left before the destination answered.
    ClientReset,
    /// The destination could not be dialed.
    ConnectFailed,
    /// The destination's host name did not resolve.
    DnsFailed,
    /// The tunnel to the peer proxy failed, for this reason (`ProxyError::reason`).
    Tunnel(&'static str),
    /// The destination takes a PROXY protocol header first, which this proxy does not write.
    ProxyProtocol,
    /// Dropped with no one saying how.
    Dropped,
}

impl Outcome {
    /// Whether the proxy counts it as failed (everything but a relay that ran to its end).
    pub(crate) fn is_failure(&self) -> bool {
        !matches!(self, Outcome::Completed | Outcome::Broken(_))
    }

    /// ztunnel's `response_flags`: `DENY` for a policy, `TLS_FAILURE`, `H2_HANDSHAKE_FAILURE`,
    /// `CERT_REVOKED`, `IDENTITY_ERROR` (no certificate of our own), and `CONNECT` for any other
    /// failure (ztunnel's default for an error it does not classify); `-` when none.
    pub(crate) fn flag(&self) -> &'static str {
        match self {
            Outcome::Completed | Outcome::Broken(_) => "-",
            Outcome::Denied => "DENY",
            Outcome::Tunnel("tls_failed") => "TLS_FAILURE",
            Outcome::Tunnel("http2_failed") => "H2_HANDSHAKE_FAILURE",
            Outcome::Tunnel("cert_revoked") => "CERT_REVOKED",
            Outcome::Tunnel("no_certificate" | "tls_config") => "IDENTITY_ERROR",
            _ => "CONNECT",
        }
    }

    /// The access log's `error`: our own reason, finer than the flag.
    pub(crate) fn error(&self) -> Option<std::borrow::Cow<'static, str>> {
        use std::borrow::Cow::{Borrowed, Owned};
        Some(match self {
            Outcome::Completed => return None,
            Outcome::Broken(e) => Owned(e.clone()),
            Outcome::Denied => Borrowed("denied"),
            Outcome::PodRemoved => Borrowed("pod_removed"),
            Outcome::ClientReset => Borrowed("client_reset"),
            Outcome::ConnectFailed => Borrowed("connect_failed"),
            Outcome::DnsFailed => Borrowed("dns_failed"),
            Outcome::Tunnel(reason) => Borrowed(reason),
            Outcome::ProxyProtocol => Borrowed("proxy_protocol"),
            Outcome::Dropped => Borrowed("dropped"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Reporter;

    /// Held by the tests here that emit access-log events: tracing caches each call site's
    /// interest process-wide, so one test meeting a call site with no subscriber while the
    /// other captures it can leave the capture without its events.
    static ACCESS_LOG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Every way a connection ends is one open and one close: done, failed (also counted as
    /// failed, with its reason as the flag), or dropped unsaid.
    #[test]
    fn every_outcome_is_one_open_and_one_close() {
        let _serial = ACCESS_LOG.lock().unwrap_or_else(|p| p.into_inner());
        let m = Metrics::new(Vec::new());
        let labels = ConnectionLabels::new(
            Reporter::Source,
            &Peer::new("a", None),
            &Peer::new("b", None),
            false,
        );
        let (src, dst) = (
            "10.0.0.1:1000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let record =
            ConnectionRecord::open(Some(&m), labels.clone(), LogNames::default(), src, dst);
        // The relay counts as bytes move, before the connection ends.
        let meters = record.meters().clone();
        meters.request.as_ref().unwrap().inc_by(5);
        meters.response.as_ref().unwrap().inc_by(7);
        record.finish(Outcome::Completed, (5, 7));
        ConnectionRecord::open(Some(&m), labels.clone(), LogNames::default(), src, dst)
            .finish(Outcome::ConnectFailed, (0, 0));
        drop(ConnectionRecord::open(
            Some(&m),
            labels,
            LogNames::default(),
            src,
            dst,
        ));
        let text = m.encode();
        let count = |name: &str, flag: &str| {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter(|l| l.contains(&format!("response_flags=\"{flag}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        assert_eq!(
            count("istio_tcp_connections_opened_total", "-"),
            3,
            "{text}"
        );
        assert_eq!(count("istio_tcp_connections_closed_total", "-"), 1);
        // A failed dial and a connection dropped unsaid: ztunnel's CONNECT, both failed.
        assert_eq!(count("istio_tcp_connections_closed_total", "CONNECT"), 2);
        assert_eq!(count("istio_tcp_connections_failed_total", "CONNECT"), 2);
        assert_eq!(count("istio_tcp_sent_bytes_total", "-"), 7, "the response");
        assert_eq!(
            count("istio_tcp_received_bytes_total", "-"),
            5,
            "the request"
        );
    }

    /// A writer the test subscriber prints into.
    #[derive(Clone, Default)]
    struct Captured(Arc<crate::sync::Lock<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The access log as JSON lines, for what `run` does inside a subscriber.
    fn access_lines(run: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // Another test may have met these call sites first, with no subscriber, and cached
            // "never"; ask again now that this one is in place.
            tracing::callsite::rebuild_interest_cache();
            run();
        });
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// ztunnel's field names and meanings (src/proxy/metrics.rs): pod names, identities only
    /// under mutual TLS, unknowns left out, bytes as this proxy moved them, `error` and the
    /// ERROR level only for a failure.
    #[test]
    fn access_log_reads_like_ztunnels() {
        let _serial = ACCESS_LOG.lock().unwrap_or_else(|p| p.into_inner());
        let id = |sa| crate::identity::Identity::new("cluster.local", "prod", sa).unwrap();
        let (client, server) = (id("web"), id("db"));
        let mut source = Peer::new("web", Some(&client));
        source.pod = "web-7d9f-x2".into();
        let destination = Peer::new("", Some(&server));
        let (src, peer, target): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.1.9:15008".parse().unwrap(),
            "10.0.1.2:5432".parse().unwrap(),
        );
        let lines = access_lines(|| {
            let labels = ConnectionLabels::new(Reporter::Source, &source, &destination, true);
            let names = LogNames::of(&source, &destination).hbone(target);
            ConnectionRecord::open(None, labels, names, src, peer)
                .finish(Outcome::Completed, (10, 20));
            let labels = ConnectionLabels::new(Reporter::Destination, &source, &destination, false);
            let names = LogNames::of(&source, &destination);
            ConnectionRecord::open(None, labels, names, src, target)
                .finish(Outcome::Denied, (0, 0));
        });
        let [opened, outbound, _, inbound] = &lines[..] else {
            panic!("{lines:?}");
        };
        assert_eq!(opened["level"], "DEBUG");
        assert_eq!(opened["fields"]["message"], "connection opened");
        assert_eq!(outbound["level"], "INFO");
        assert_eq!(outbound["target"], "access");
        let f = &outbound["fields"];
        assert_eq!(f["message"], "connection complete");
        assert_eq!(f["src.addr"], "10.0.0.1:40000");
        assert_eq!(f["src.workload"], "web-7d9f-x2");
        assert_eq!(f["src.namespace"], "prod");
        assert_eq!(f["src.identity"], "spiffe://cluster.local/ns/prod/sa/web");
        assert_eq!(f["dst.addr"], "10.0.1.9:15008");
        assert_eq!(f["dst.hbone_addr"], "10.0.1.2:5432");
        assert_eq!(f["dst.identity"], "spiffe://cluster.local/ns/prod/sa/db");
        assert_eq!(f["direction"], "outbound");
        assert_eq!(
            (&f["bytes_sent"], &f["bytes_recv"]),
            (&10.into(), &20.into())
        );
        assert!(f["duration"].as_str().unwrap().ends_with("ms"));
        for absent in ["dst.workload", "dst.service", "error"] {
            assert!(f.get(absent).is_none(), "{absent} in {f}");
        }
        assert_eq!(inbound["level"], "ERROR");
        let f = &inbound["fields"];
        assert_eq!(f["direction"], "inbound");
        assert_eq!(f["error"], "denied");
        assert!(f.get("src.identity").is_none(), "not mutual TLS: {f}");
    }
}

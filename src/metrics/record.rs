//! [`ConnectionRecord`]: one connection's metrics and access-log line from open to close,
//! recorded the same way on every path (outbound tunnel and passthrough, inbound HBONE and
//! plaintext), as ztunnel's ConnectionOpen → ConnectionClose guard does: opened when the proxy
//! takes the connection on (before any dial), closed exactly once with how it ended, failures
//! included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{ConnectionLabels, Metrics, access_log};
use crate::proxy::copy::Meters;

/// A connection being recorded; closed on [`ConnectionRecord::done`], on
/// [`ConnectionRecord::failed`], or, if neither, when dropped (as `dropped`).
#[derive(Debug)]
pub(crate) struct ConnectionRecord {
    metrics: Option<Arc<Metrics>>,
    labels: ConnectionLabels,
    src: SocketAddr,
    dst: SocketAddr,
    started: Instant,
    open: bool,
    meters: Meters,
}

impl ConnectionRecord {
    /// Counts the connection as opened, now.
    pub(crate) fn open(
        metrics: Option<&Arc<Metrics>>,
        labels: ConnectionLabels,
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
        ConnectionRecord {
            metrics: metrics.cloned(),
            labels,
            src,
            dst,
            started: Instant::now(),
            open: true,
            meters,
        }
    }

    /// The live byte counters for this connection's relay (client → destination first).
    pub(crate) fn meters(&self) -> &Meters {
        &self.meters
    }

    /// Relayed to its end: `request` bytes from the client, `response` back (for the access
    /// log: the metrics counted them as they moved); `error` when a side failed mid-way.
    pub(crate) fn done(mut self, request: u64, response: u64, error: Option<&str>) {
        self.close(None, request, response, error);
    }

    /// Ended by the proxy or a failure, with `reason` as `response_flags` (metrics-safe), after
    /// `request`/`response` bytes (0 when it failed before relaying). Counted in
    /// `istio_tcp_connections_failed_total` too.
    pub(crate) fn failed(mut self, reason: &str, request: u64, response: u64) {
        self.close(Some(reason), request, response, Some(reason));
    }

    fn close(&mut self, flag: Option<&str>, request: u64, response: u64, error: Option<&str>) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        let labels = match flag {
            Some(reason) => self.labels.clone().failed(reason),
            None => self.labels.clone(),
        };
        if let Some(m) = &self.metrics {
            if flag.is_some() {
                m.failed(&labels);
            }
            m.closed(&labels);
        }
        let elapsed = self.started.elapsed();
        access_log(
            &labels, self.src, self.dst, request, response, elapsed, error,
        );
    }
}

impl Drop for ConnectionRecord {
    /// A path that returned without saying how the connection ended (the client went away
    /// first) still closes it.
    fn drop(&mut self) {
        self.close(Some("dropped"), 0, 0, Some("dropped"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Peer, Reporter};

    /// Every way a connection ends is one open and one close: done, failed (also counted as
    /// failed, with its reason as the flag), or dropped unsaid.
    #[test]
    fn every_outcome_is_one_open_and_one_close() {
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
        let record = ConnectionRecord::open(Some(&m), labels.clone(), src, dst);
        // The relay counts as bytes move, before the connection ends.
        let meters = record.meters().clone();
        meters.request.as_ref().unwrap().inc_by(5);
        meters.response.as_ref().unwrap().inc_by(7);
        record.done(5, 7, None);
        ConnectionRecord::open(Some(&m), labels.clone(), src, dst).failed("connect_failed", 0, 0);
        drop(ConnectionRecord::open(Some(&m), labels, src, dst));
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
        assert_eq!(
            count("istio_tcp_connections_closed_total", "connect_failed"),
            1
        );
        assert_eq!(count("istio_tcp_connections_closed_total", "dropped"), 1);
        assert_eq!(
            count("istio_tcp_connections_failed_total", "connect_failed"),
            1
        );
        assert_eq!(count("istio_tcp_sent_bytes_total", "-"), 7, "the response");
        assert_eq!(
            count("istio_tcp_received_bytes_total", "-"),
            5,
            "the request"
        );
    }
}

//! The DNS proxy's series, named and labelled as ztunnel's (src/dns/metrics.rs):
//! `istio_dns_requests_total` (every query, answered locally or forwarded),
//! `istio_dns_upstream_requests_total`, `istio_dns_upstream_failures_total` and
//! `istio_dns_upstream_request_duration_seconds`, by query type, transport and the asking
//! pod's canonical service and revision.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// One query's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DnsLabels {
    /// `a`, `aaaa`, `srv`… (lower case), `unknown` for a query that had none.
    pub request_query_type: String,
    /// `udp` or `tcp`.
    pub request_protocol: &'static str,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

type Seconds = Family<DnsLabels, Histogram, fn() -> Histogram>;

/// The DNS proxy's counters, shared by every pod's server.
#[derive(Debug, Clone)]
pub(crate) struct DnsMetrics {
    pub requests: Family<DnsLabels, Counter>,
    pub upstream_requests: Family<DnsLabels, Counter>,
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: Seconds,
}

fn buckets() -> Histogram {
    // ztunnel's buckets.
    Histogram::new([0.0005, 0.001, 0.01, 0.1, 1.0, 5.0])
}

impl DnsMetrics {
    pub(super) fn register(registry: &mut Registry) -> DnsMetrics {
        let m = DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(buckets),
        };
        registry.register(
            "istio_dns_requests",
            "Total number of DNS requests (unstable)",
            m.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream (unstable)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Total number of DNS requests that failed to forward upstream (unstable)",
            m.upstream_failures.clone(),
        );
        registry.register_with_unit(
            "istio_dns_upstream_request_duration",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
            Unit::Seconds,
            m.upstream_duration.clone(),
        );
        m
    }
}

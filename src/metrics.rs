//! Prometheus metrics (docs/design.md §2, port 15020), named and labelled like ztunnel's so existing
//! dashboards work, and the per-connection access log. Labels are workload names, namespaces
//! and SPIFFE principals — never IPs or ports — so cardinality is bounded by the workloads.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::identity::Identity;

mod dns;
mod process;
pub(crate) use dns::{DnsLabels, DnsMetrics};
mod record;
pub(crate) use record::{ConnectionRecord, LogNames, Meters, Outcome};

/// One end of a connection, as metrics and access logs name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The workload's name (its Deployment, Job...; a pod's own name where there is none).
    pub workload: String,
    /// The pod's (or VM's) own name: what the access log calls the workload, as ztunnel's does.
    pub pod: String,
    pub namespace: String,
    /// The SPIFFE ID, when known (mutual TLS).
    pub principal: String,
    /// Canonical service and revision (also the `app` and `version` labels).
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
    /// Its locality, when it is a known workload (region, zone).
    pub locality: Option<(String, String)>,
}

impl Peer {
    pub(crate) fn new(workload: &str, identity: Option<&Identity>) -> Self {
        Peer {
            workload: workload.to_owned(),
            pod: workload.to_owned(),
            namespace: identity
                .map(|i| i.namespace().to_owned())
                .unwrap_or_default(),
            principal: identity.map(Identity::to_string).unwrap_or_default(),
            ..Peer::default()
        }
    }

    /// A known workload, as ztunnel labels it; `identity` when it proved one (mutual TLS).
    pub(crate) fn of(w: &crate::state::Workload, identity: Option<&Identity>) -> Self {
        Peer {
            workload: w.workload_name.clone(),
            pod: w.name.clone(),
            namespace: w.namespace.clone(),
            principal: identity.map(Identity::to_string).unwrap_or_default(),
            canonical_service: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            cluster: w.cluster_id.clone(),
            locality: Some((w.locality.region.clone(), w.locality.zone.clone())),
        }
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_owned()
    }
}

/// The locality labels of a connection between `source` and `destination`: present once
/// either is a known workload, `unknown` for what the other does not say.
fn locality(source: &Peer, destination: &Peer) -> Option<LocalityLabels> {
    if source.locality.is_none() && destination.locality.is_none() {
        return None;
    }
    let (src, dst) = (
        source.locality.clone().unwrap_or_default(),
        destination.locality.clone().unwrap_or_default(),
    );
    Some(LocalityLabels {
        source_region: or_unknown(&src.0),
        source_zone: or_unknown(&src.1),
        destination_region: or_unknown(&dst.0),
        destination_zone: or_unknown(&dst.1),
    })
}

/// ztunnel's TCP metric labels, in its order (src/proxy/metrics.rs, CommonTrafficLabels):
/// what Istio's dashboards and `istioctl` query.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConnectionLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
    #[prometheus(flatten)]
    pub locality: OptionalLabels<LocalityLabels>,
}

/// ztunnel's locality labels, added after the others once either end is a known workload
/// (src/proxy/metrics.rs, `LocalityLabels`): Istio's dashboards group traffic by them.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LocalityLabels {
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

/// Labels encoded only when present.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub(crate) struct OptionalLabels<T>(pub Option<T>);

impl<T: prometheus_client::encoding::EncodeLabelSet> prometheus_client::encoding::EncodeLabelSet
    for OptionalLabels<T>
{
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(labels) => labels.encode(encoder),
            None => Ok(()),
        }
    }
}

/// Which side of the tunnel reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reporter {
    Source,
    Destination,
}

impl ConnectionLabels {
    pub(crate) fn new(
        reporter: Reporter,
        source: &Peer,
        destination: &Peer,
        mutual_tls: bool,
    ) -> Self {
        ConnectionLabels {
            reporter: match reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            }
            .into(),
            source_workload: or_unknown(&source.workload),
            source_canonical_service: or_unknown(&source.canonical_service),
            source_canonical_revision: or_unknown(&source.canonical_revision),
            source_workload_namespace: or_unknown(&source.namespace),
            source_principal: or_unknown(&source.principal),
            source_app: or_unknown(&source.canonical_service),
            source_version: or_unknown(&source.canonical_revision),
            source_cluster: or_unknown(&source.cluster),
            destination_service: or_unknown(""),
            destination_service_namespace: or_unknown(""),
            destination_service_name: or_unknown(""),
            destination_workload: or_unknown(&destination.workload),
            destination_canonical_service: or_unknown(&destination.canonical_service),
            destination_canonical_revision: or_unknown(&destination.canonical_revision),
            destination_workload_namespace: or_unknown(&destination.namespace),
            destination_principal: or_unknown(&destination.principal),
            destination_app: or_unknown(&destination.canonical_service),
            destination_version: or_unknown(&destination.canonical_revision),
            destination_cluster: or_unknown(&destination.cluster),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "unknown" }.into(),
            locality: OptionalLabels(locality(source, destination)),
        }
    }

    /// The same connection, addressed to `service` (through its VIP).
    pub(crate) fn for_service(mut self, service: Option<&crate::state::ServiceRef>) -> Self {
        if let Some(s) = service {
            self.destination_service = or_unknown(&s.hostname);
            self.destination_service_namespace = or_unknown(&s.namespace);
            self.destination_service_name = or_unknown(&s.name);
        }
        self
    }

    /// The same connection, failed with ztunnel's `flag` (`Outcome::flag`).
    pub(crate) fn failed(mut self, flag: &str) -> Self {
        self.response_flags = flag.to_owned();
        self
    }
}

/// Holds one inbound socket in `istio_tcp_sockets_open`.
#[derive(Debug)]
pub(crate) struct SocketGuard(Gauge);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    component: &'static str,
    tag: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReporterLabel {
    reporter: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Every metric hboned exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    failed: Family<ConnectionLabels, Counter>,
    /// Pods this node serves.
    pub enrolled_pods: Gauge,
    cert_expiry: Family<IdentityLabel, Gauge>,
    dry_run: Family<DecisionLabel, Counter>,
    enrollment_failures: Family<ReasonLabel, Counter>,
    /// ztunnel's `istio_tcp_sockets_open{reporter="destination"}`: inbound sockets this proxy
    /// holds (the series taken once, not looked up per connection).
    inbound_sockets: Gauge,
    /// ztunnel's `workload_manager_active_proxy_count`: pods served.
    pub(crate) active_proxies: Gauge,
    /// ztunnel's `workload_manager_pending_proxy_count`: pods whose enrollment is retried.
    pub(crate) pending_proxies: Gauge,
    /// One shared copy of each label set live connections carry (23 owned strings, ~1.3 KiB
    /// with their heap, would otherwise be held by every connection). Bounded like the
    /// families themselves: by the workload pairs seen.
    interned: crate::sync::Lock<std::collections::HashSet<Arc<ConnectionLabels>>>,
    /// The DNS proxy's series.
    pub(crate) dns: DnsMetrics,
}

impl Metrics {
    /// `counters`: counters kept by other modules (renewals, xDS rejections), shared here.
    pub fn new(counters: Vec<(&str, &str, Counter)>) -> Arc<Self> {
        Self::build(counters, None)
    }

    /// A node proxy's metrics: [`Metrics::new`]'s, and its xDS client's if it has one.
    pub(crate) fn build(
        counters: Vec<(&str, &str, Counter)>,
        xds: Option<&crate::xds::XdsMetrics>,
    ) -> Arc<Self> {
        let mut registry = Registry::default();
        for (name, help, counter) in counters {
            registry.register(name, help, counter);
        }
        let opened = Family::<ConnectionLabels, Counter>::default();
        let closed = Family::<ConnectionLabels, Counter>::default();
        let sent = Family::<ConnectionLabels, Counter>::default();
        let received = Family::<ConnectionLabels, Counter>::default();
        let failed = Family::<ConnectionLabels, Counter>::default();
        let enrolled_pods = Gauge::default();
        let cert_expiry = Family::<IdentityLabel, Gauge>::default();
        let dry_run = Family::<DecisionLabel, Counter>::default();
        let enrollment_failures = Family::<ReasonLabel, Counter>::default();
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during the response (destination to client), per closed connection",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during the request (client to destination), per closed connection",
            received.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that failed",
            failed.clone(),
        );
        registry.register(
            "hboned_enrolled_pods",
            "Pods this node's proxy serves",
            enrolled_pods.clone(),
        );
        registry.register(
            "hboned_certificate_expiry_seconds",
            "Expiry of the current certificate, seconds since the epoch",
            cert_expiry.clone(),
        );
        registry.register(
            "hboned_policy_dry_run_decisions",
            "Connections to which dry-run policies applied, by the decision they would make",
            dry_run.clone(),
        );
        registry.register(
            "hboned_enrollment_failures",
            "Attempts to enroll a pod (Kubernetes mode) that failed, by reason: no_process (its namespace not found yet), listeners, rules, record (the pod's enrollment record not written)",
            enrollment_failures.clone(),
        );
        // What Istio's ztunnel dashboard plots besides the connection series: the build, the
        // xDS stream, the workload manager, inbound sockets and the process.
        let build = Family::<BuildLabel, Gauge>::default();
        build
            .get_or_create(&BuildLabel {
                component: "ztunnel",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build);
        let sockets_open = Family::<ReporterLabel, Gauge>::default();
        registry.register(
            "istio_tcp_sockets_open",
            "The current number of open TCP sockets",
            sockets_open.clone(),
        );
        let (active_proxies, pending_proxies) = (Gauge::default(), Gauge::default());
        registry.register(
            "workload_manager_active_proxy_count",
            "The total number current workloads with active proxies",
            active_proxies.clone(),
        );
        registry.register(
            "workload_manager_pending_proxy_count",
            "The total number current workloads with pending proxies",
            pending_proxies.clone(),
        );
        if let Some(xds) = xds {
            registry.register(
                "istio_xds_connection_terminations",
                "The total number of completed connections to xds server",
                xds.terminations.clone(),
            );
            registry.register(
                "istio_xds_message",
                "Total number of messages received",
                xds.messages.clone(),
            );
            registry.register_with_unit(
                "istio_xds_message",
                "Total number of bytes received",
                prometheus_client::registry::Unit::Bytes,
                xds.message_bytes.clone(),
            );
        }
        let dns = DnsMetrics::register(&mut registry);
        registry.register_collector(Box::new(process::ProcessCollector));
        Arc::new(Metrics {
            dns,
            registry,
            inbound_sockets: sockets_open
                .get_or_create(&ReporterLabel {
                    reporter: "destination",
                })
                .clone(),
            active_proxies,
            pending_proxies,
            opened,
            closed,
            sent,
            received,
            failed,
            enrolled_pods,
            cert_expiry,
            dry_run,
            enrollment_failures,
            interned: crate::sync::Lock::default(),
        })
    }

    /// An inbound socket (15008, 15006) is open until the guard is dropped, as ztunnel counts
    /// `istio_tcp_sockets_open{reporter="destination"}`.
    pub(crate) fn socket_open(self: &Arc<Self>) -> SocketGuard {
        self.inbound_sockets.inc();
        SocketGuard(self.inbound_sockets.clone())
    }

    /// One failed attempt to enroll a pod, for `reason`.
    pub fn enrollment_failed(&self, reason: &'static str) {
        self.enrollment_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The shared copy of `labels`.
    pub(crate) fn intern(&self, labels: ConnectionLabels) -> Arc<ConnectionLabels> {
        let mut interned = self.interned.lock();
        if let Some(shared) = interned.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        interned.insert(shared.clone());
        shared
    }

    pub(crate) fn opened(&self, labels: &ConnectionLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// A connection ended (its bytes were counted as they moved, [`Metrics::byte_counters`]).
    pub(crate) fn closed(&self, labels: &ConnectionLabels) {
        self.closed.get_or_create(labels).inc();
    }

    /// The byte counters of a connection's series, (request, response), for its relay to add to
    /// while it runs. Istio's standard metrics count the response as "sent" and the request as
    /// "received" (istio_tcp_sent_bytes_total: "bytes sent during response"), on both
    /// reporters, as ztunnel does.
    pub(crate) fn byte_counters(&self, labels: &ConnectionLabels) -> (Counter, Counter) {
        (
            self.received.get_or_create(labels).clone(),
            self.sent.get_or_create(labels).clone(),
        )
    }

    pub(crate) fn failed(&self, labels: &ConnectionLabels) {
        self.failed.get_or_create(labels).inc();
    }

    /// Dry-run policies applied to a connection and would have allowed (or denied) it.
    pub(crate) fn dry_run_decision(&self, allowed: bool) {
        let decision = if allowed { "allow" } else { "deny" };
        self.dry_run
            .get_or_create(&DecisionLabel { decision })
            .inc();
    }

    /// Sets the per-identity certificate expiry gauges (called before each scrape).
    pub(crate) fn set_certificate_expiries(&self, expiries: &[(Identity, std::time::SystemTime)]) {
        self.cert_expiry.clear();
        for (id, at) in expiries {
            let secs = at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            self.cert_expiry
                .get_or_create(&IdentityLabel {
                    identity: id.to_string(),
                })
                .set(i64::try_from(secs).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_carry_ztunnels_response_flags_and_our_reasons() {
        for (outcome, flag, error) in [
            (Outcome::Completed, "-", None),
            (
                Outcome::Broken("reset by peer".into()),
                "-",
                Some("reset by peer"),
            ),
            (Outcome::Denied, "DENY", Some("denied")),
            (
                Outcome::Tunnel("tls_failed"),
                "TLS_FAILURE",
                Some("tls_failed"),
            ),
            (
                Outcome::Tunnel("http2_failed"),
                "H2_HANDSHAKE_FAILURE",
                Some("http2_failed"),
            ),
            (
                Outcome::Tunnel("cert_revoked"),
                "CERT_REVOKED",
                Some("cert_revoked"),
            ),
            (
                Outcome::Tunnel("no_certificate"),
                "IDENTITY_ERROR",
                Some("no_certificate"),
            ),
            (
                Outcome::Tunnel("connect_failed"),
                "CONNECT",
                Some("connect_failed"),
            ),
            (Outcome::ConnectFailed, "CONNECT", Some("connect_failed")),
            (Outcome::PodRemoved, "CONNECT", Some("pod_removed")),
            (Outcome::ClientReset, "CONNECT", Some("client_reset")),
            (Outcome::DnsFailed, "CONNECT", Some("dns_failed")),
            (Outcome::ProxyProtocol, "CONNECT", Some("proxy_protocol")),
            (Outcome::Dropped, "CONNECT", Some("dropped")),
        ] {
            assert_eq!(outcome.flag(), flag, "{outcome:?}");
            assert_eq!(outcome.error().as_deref(), error, "{outcome:?}");
            assert_eq!(outcome.is_failure(), flag != "-", "{outcome:?}");
        }
    }

    #[test]
    fn locality_labels_follow_the_others_once_an_end_is_a_known_workload() {
        let unknown = Peer::new("a", None);
        let labels = ConnectionLabels::new(Reporter::Source, &unknown, &unknown, false);
        assert!(
            labels.locality.0.is_none(),
            "neither end known: no locality labels"
        );
        let known = Peer {
            locality: Some(("us-east1".into(), "us-east1-b".into())),
            ..Peer::new("b", None)
        };
        let m = Metrics::new(Vec::new());
        m.opened(&ConnectionLabels::new(
            Reporter::Source,
            &unknown,
            &known,
            true,
        ));
        let text = m.encode();
        assert!(
            text.contains("connection_security_policy=\"mutual_tls\",source_region=\"unknown\",source_zone=\"unknown\",destination_region=\"us-east1\",destination_zone=\"us-east1-b\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn exposition_uses_ztunnel_names_and_labels() {
        let renewals = Counter::default();
        renewals.inc();
        let m = Metrics::new(vec![("hboned_certificate_renewals", "renewals", renewals)]);
        let id = Identity::new("cluster.local", "prod", "web").unwrap();
        let labels = ConnectionLabels::new(
            Reporter::Source,
            &Peer::new("web", Some(&id)),
            &Peer::default(),
            true,
        );
        m.opened(&labels);
        let (request, response) = m.byte_counters(&labels);
        request.inc_by(100);
        response.inc_by(42);
        m.closed(&labels);
        m.failed(&labels.clone().failed(Outcome::ConnectFailed.flag()));
        m.enrolled_pods.set(3);
        m.enrollment_failed("rules");
        m.enrollment_failed("rules");
        m.dry_run_decision(false);
        m.set_certificate_expiries(&[(
            id,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000),
        )]);
        let text = m.encode();
        for line in [
            "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"web\",source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\",source_workload_namespace=\"prod\",source_principal=\"spiffe://cluster.local/ns/prod/sa/web\",source_app=\"unknown\",source_version=\"unknown\",source_cluster=\"unknown\",destination_service=\"unknown\",destination_service_namespace=\"unknown\",destination_service_name=\"unknown\",destination_workload=\"unknown\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",destination_app=\"unknown\",destination_version=\"unknown\",destination_cluster=\"unknown\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 1",
            "istio_tcp_sent_bytes_total{",
            "} 100",
            "} 42",
            "response_flags=\"CONNECT\",connection_security_policy=\"mutual_tls\"} 1",
            "hboned_enrolled_pods 3",
            "hboned_enrollment_failures_total{reason=\"rules\"} 2",
            "hboned_policy_dry_run_decisions_total{decision=\"deny\"} 1",
            "hboned_certificate_renewals_total 1",
            "hboned_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/prod/sa/web\"} 1900000000",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Istio's meaning: "sent" is the response (42 bytes back), "received" the request.
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(value("istio_tcp_sent_bytes_total{").as_deref(), Some("42"));
        assert_eq!(
            value("istio_tcp_received_bytes_total{").as_deref(),
            Some("100")
        );
    }
}

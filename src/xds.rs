//! Discovery over delta ADS (docs/design.md §5): one gRPC stream to the control plane carrying
//! `istio.workload.Address` and `istio.security.Authorization`, applied to the shared
//! [`State`](crate::state::State). Conversion and the (N)ACK decision are pure ([`convert`]); this module owns the
//! stream: reconnects with capped, jittered backoff, resends what it has
//! (`initial_resource_versions`), keeps serving the last good state while disconnected,
//! reports readiness once every subscribed type has been applied once, and resolves unknown
//! IPs on demand (subscribing `<network>/<ip>`, one request per IP however many wait).

pub mod convert;
// The node agent's xDS server (Kubernetes mode only).
#[cfg(feature = "kubernetes")]
pub(crate) mod server;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::backoff::Backoff;
use crate::identity::manager::BoxFuture;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::state::SharedState;
use crate::sync::Lock;
use convert::{ADDRESS_TYPE, AUTHORIZATION_TYPE, Tracked};

/// Largest xDS response accepted.
const MAX_RESPONSE: usize = 200 * 1024 * 1024;

/// How to reach and talk to the control plane.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// `http://host:port` or `https://host:port`.
    pub address: String,
    /// PEM root for an https control plane (else the connection is refused).
    pub root_ca: Option<PathBuf>,
    /// A file with a bearer token, read at every connect (tokens rotate).
    pub token_file: Option<PathBuf>,
    /// Sent as `clusterid` metadata and in the node metadata.
    pub cluster_id: String,
    /// The Node id (`ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` for istiod).
    pub node_id: String,
    /// Node metadata, besides what the client adds itself.
    pub node_metadata: BTreeMap<String, String>,
    /// Default trust domain for resources that name none.
    pub trust_domain: String,
    /// This proxy's network, the prefix of on-demand names.
    pub network: String,
    /// Subscribe to nothing up front; look addresses up as connections need them.
    pub on_demand: bool,
    /// How long a connection to an unknown address is held for the answer.
    pub on_demand_timeout: Duration,
}

impl XdsSettings {
    /// The settings from the config, when it names a control plane (`xds.address`).
    pub fn from_config(config: &crate::config::Config) -> Option<Self> {
        let xds = &config.xds;
        if xds.address.is_empty() {
            return None;
        }
        Some(XdsSettings {
            address: xds.address.clone(),
            root_ca: xds.root_ca.clone(),
            token_file: xds.token_file.clone(),
            cluster_id: config.cluster_id.clone(),
            node_id: if xds.node_id.is_empty() {
                config.node.clone()
            } else {
                xds.node_id.clone()
            },
            node_metadata: xds.node_metadata.clone(),
            trust_domain: config.trust_domain.clone(),
            network: xds.network.clone(),
            on_demand: xds.on_demand,
            on_demand_timeout: Duration::from_millis(xds.on_demand_timeout_ms.unwrap_or(5000)),
        })
    }
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum XdsError {
    #[error(transparent)]
    Channel(#[from] crate::control_plane::ChannelError),
    #[error(transparent)]
    Token(#[from] crate::control_plane::TokenError),
    #[error("cannot connect to the control plane: {0} (is the address right and reachable?)")]
    Connect(#[from] tonic::transport::Error),
    #[error("control plane stream failed: {0}")]
    Stream(#[from] tonic::Status),
}

/// Looks an address up before a connection is routed (on-demand discovery).
pub trait Resolver: Send + Sync + std::fmt::Debug {
    /// Resolves once `ip` is known or the lookup gave up; true when it is known.
    fn ensure(&self, ip: IpAddr) -> BoxFuture<'_, bool>;
}

/// The delta ADS client.
#[derive(Debug)]
pub struct XdsClient {
    settings: XdsSettings,
    state: Arc<SharedState>,
    tracked: Lock<Tracked>,
    /// The live stream's request sender, if connected.
    requests: Lock<Option<mpsc::UnboundedSender<DeltaDiscoveryRequest>>>,
    /// Names subscribed on demand; resent on every reconnect.
    on_demand: Lock<BTreeSet<String>>,
    /// Bumped after every applied response (on-demand waiters watch it).
    changed: watch::Sender<u64>,
    ready: watch::Sender<bool>,
    applied_types: Lock<HashSet<String>>,
    rejected: prometheus_client::metrics::counter::Counter,
    dropped: prometheus_client::metrics::counter::Counter,
    metrics: XdsMetrics,
}

/// ztunnel's xDS client metrics (src/xds/metrics.rs), which Istio's ztunnel dashboard plots:
/// `istio_xds_connection_terminations_total{reason}`, `istio_xds_message_total{url}` and
/// `istio_xds_message_bytes_total{url}` (the resources' bytes).
#[derive(Debug, Clone, Default)]
pub(crate) struct XdsMetrics {
    pub(crate) terminations: Family<ReasonLabel, Counter>,
    pub(crate) messages: Family<UrlLabel, Counter>,
    pub(crate) message_bytes: Family<UrlLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct UrlLabel {
    url: String,
}

impl XdsMetrics {
    fn terminated(&self, reason: &'static str) {
        self.terminations
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    fn received(
        &self,
        response: &crate::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse,
    ) {
        let url = UrlLabel {
            url: response.type_url.clone(),
        };
        self.messages.get_or_create(&url).inc();
        let bytes: usize = response
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|any| any.value.len())
            .sum();
        self.message_bytes.get_or_create(&url).inc_by(bytes as u64);
    }
}

/// ztunnel's `ConnectionTerminationReason` for how a stream ended (src/xds/client.rs,
/// `run_loop`): it never connected; the server ended it as servers do (a GOAWAY, a closing
/// transport: `Reconnect`); any other failure; or it completed.
fn termination_reason(result: &Result<(), XdsError>) -> &'static str {
    match result {
        Ok(()) => "Complete",
        Err(XdsError::Connect(_) | XdsError::Channel(_)) => "ConnectionError",
        Err(XdsError::Stream(status))
            if matches!(
                status.code(),
                tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            ) || (status.code() == tonic::Code::Unavailable
                && (status.message().contains("transport is closing")
                    || status.message().contains("received prior goaway"))) =>
        {
            "Reconnect"
        }
        Err(_) => "Error",
    }
}

impl XdsClient {
    pub fn new(settings: XdsSettings, state: Arc<SharedState>) -> Arc<Self> {
        Arc::new(XdsClient {
            settings,
            state,
            tracked: Lock::new(Tracked::default()),
            requests: Lock::new(None),
            on_demand: Lock::new(BTreeSet::new()),
            changed: watch::channel(0).0,
            ready: watch::channel(false).0,
            applied_types: Lock::new(HashSet::new()),
            rejected: Default::default(),
            dropped: Default::default(),
            metrics: XdsMetrics::default(),
        })
    }

    /// The client's metrics, to register with the metrics registry.
    pub(crate) fn metrics(&self) -> &XdsMetrics {
        &self.metrics
    }

    /// True once the first response of every subscribed type was applied.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Resources rejected (NACKed) since start: the metric behind the NACK log lines.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.get()
    }

    /// The rejection counter, to register with the metrics registry.
    pub(crate) fn rejected_counter(&self) -> prometheus_client::metrics::counter::Counter {
        self.rejected.clone()
    }

    /// The counter of unreadable policy entries dropped (each logged as it is), to register
    /// with the metrics registry.
    pub(crate) fn dropped_policy_entries_counter(
        &self,
    ) -> prometheus_client::metrics::counter::Counter {
        self.dropped.clone()
    }

    /// The types whose first response makes the client ready. With on-demand discovery nothing
    /// is subscribed for addresses up front, so only policies count.
    fn required_types(&self) -> &'static [&'static str] {
        if self.settings.on_demand {
            &[AUTHORIZATION_TYPE]
        } else {
            &[ADDRESS_TYPE, AUTHORIZATION_TYPE]
        }
    }

    /// Keeps a stream to the control plane up, forever.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(15));
        loop {
            let before = *self.changed.borrow();
            let ended = self.session().await;
            self.metrics.terminated(termination_reason(&ended));
            match ended {
                Ok(()) => tracing::warn!("control plane closed the stream; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, "xDS stream failed; serving the last good state and reconnecting")
                }
            }
            // A stream that delivered something was healthy: start the backoff over.
            if *self.changed.borrow() != before {
                backoff.reset();
            }
            backoff.wait().await;
        }
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, XdsError> {
        let root_ca = self.settings.root_ca.as_deref();
        let target = crate::control_plane::endpoint(&self.settings.address, root_ca)?;
        Ok(target.connect().await?)
    }

    /// The node this proxy announces itself as.
    fn node(&self) -> Node {
        use prost_types::{Struct, Value, value::Kind};
        let mut fields: BTreeMap<String, Value> = self
            .settings
            .node_metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Value {
                        kind: Some(Kind::StringValue(v.clone())),
                    },
                )
            })
            .collect();
        if !self.settings.cluster_id.is_empty() {
            fields.insert(
                "CLUSTER_ID".into(),
                Value {
                    kind: Some(Kind::StringValue(self.settings.cluster_id.clone())),
                },
            );
        }
        Node {
            id: self.settings.node_id.clone(),
            cluster: self.settings.cluster_id.clone(),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
        }
    }

    /// The first request of a type on a (re)connected stream.
    fn initial_request(
        &self,
        type_url: &str,
        on_demand: &BTreeSet<String>,
    ) -> DeltaDiscoveryRequest {
        let tracked = self.tracked.lock();
        let (subscribe, unsubscribe) = if self.settings.on_demand && type_url == ADDRESS_TYPE {
            // Delta xDS cannot subscribe to nothing: subscribe and unsubscribe `*` in one
            // request, as ztunnel does, plus the names already looked up (after a reconnect).
            let mut names = vec!["*".to_owned()];
            names.extend(on_demand.iter().cloned());
            (names, vec!["*".to_owned()])
        } else {
            (vec!["*".to_owned()], Vec::new())
        };
        DeltaDiscoveryRequest {
            node: Some(self.node()),
            type_url: type_url.to_owned(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            initial_resource_versions: tracked.versions(type_url),
            ..Default::default()
        }
    }

    /// One stream, until it ends.
    async fn session(&self) -> Result<(), XdsError> {
        let channel = self.channel().await?;
        // istiod sends every resource of a push in one response: take up to 200 MiB, as ztunnel
        // does (tonic's default of 4 MiB fails a large cluster's first push forever).
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE);
        let (tx, rx) = mpsc::unbounded_channel();
        {
            // Under the on-demand lock: a lookup either lands in these initial requests or is
            // sent on `tx` after it, never lost in between.
            let names = self.on_demand.lock();
            for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
                let _ = tx.send(self.initial_request(type_url, &names));
            }
            *self.requests.lock() = Some(tx.clone());
        }
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        crate::control_plane::add_metadata(
            &mut request,
            self.settings.token_file.as_deref(),
            &self.settings.cluster_id,
        )?;
        let result = async {
            let mut stream = client.delta_aggregated_resources(request).await?.into_inner();
            tracing::info!(address = %self.settings.address, on_demand = self.settings.on_demand, "xDS stream open");
            while let Some(response) = stream.message().await? {
                self.metrics.received(&response);
                let answer = self.handle(&response);
                let acked = answer.error_detail.is_none();
                if tx.send(answer).is_ok() && acked {
                    self.acked(&response.type_url);
                }
            }
            Ok(())
        }
        .await;
        *self.requests.lock() = None;
        result
    }

    /// Applies a response and returns its (N)ACK.
    fn handle(
        &self,
        response: &crate::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let applied = self.state.write(|state| {
            let mut tracked = self.tracked.lock();
            convert::apply_delta(state, &mut tracked, response, &self.settings.trust_domain)
        });
        if !applied.dropped.is_empty() {
            self.dropped.inc_by(applied.dropped.len() as u64);
            tracing::warn!(dropped = ?applied.dropped, "unreadable policy entries dropped; the rest of each policy applies, never allowing more than it says");
        }
        if applied.rejected.is_empty() {
            tracing::debug!(type_url = %response.type_url, upserted = applied.upserted, removed = applied.removed, "xDS update applied");
        } else {
            self.rejected.inc_by(applied.rejected.len() as u64);
            tracing::warn!(type_url = %response.type_url, rejected = ?applied.rejected, upserted = applied.upserted, "xDS resources rejected (NACK); keeping their last good versions");
        }
        self.changed.send_modify(|generation| *generation += 1);
        applied.ack
    }

    /// A response of `type_url` was applied and its ACK sent: once every subscribed type has
    /// had one, the client is ready. A NACKed response does not count (ztunnel's
    /// `xds/client.rs` unblocks readiness on ACKs only).
    fn acked(&self, type_url: &str) {
        let mut seen = self.applied_types.lock();
        seen.insert(type_url.to_owned());
        if !*self.ready.borrow() && self.required_types().iter().all(|t| seen.contains(*t)) {
            tracing::info!("xDS ready: every subscribed type applied and acknowledged");
            self.ready.send_replace(true);
        }
    }

    fn knows(&self, ip: IpAddr) -> bool {
        self.state.read().knows(ip)
    }

    /// Waits until `ip` is known: at once if it is, else (on-demand mode) subscribes to it and
    /// waits for the answer up to the configured timeout.
    pub async fn resolve(&self, ip: IpAddr) -> bool {
        let mut changed = self.changed.subscribe();
        if self.knows(ip) {
            return true;
        }
        if !self.settings.on_demand {
            return false;
        }
        let name = format!("{}/{ip}", self.settings.network);
        {
            let mut names = self.on_demand.lock();
            if names.insert(name.clone())
                && let Some(tx) = self.requests.lock().as_ref()
            {
                let _ = tx.send(DeltaDiscoveryRequest {
                    type_url: ADDRESS_TYPE.to_owned(),
                    resource_names_subscribe: vec![name],
                    ..Default::default()
                });
            }
        }
        let wait = async {
            while !self.knows(ip) {
                if changed.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(self.settings.on_demand_timeout, wait)
            .await
            .unwrap_or(false)
    }
}

impl Resolver for XdsClient {
    fn ensure(&self, ip: IpAddr) -> BoxFuture<'_, bool> {
        Box::pin(self.resolve(ip))
    }
}

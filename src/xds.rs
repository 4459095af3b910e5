//! Discovery over delta ADS (DESIGN §5): one gRPC stream to the control plane carrying
//! `istio.workload.Address` and `istio.security.Authorization`, applied to the shared
//! [`State`]. Conversion and the (N)ACK decision are pure ([`convert`]); this module owns the
//! stream: reconnects with capped, jittered backoff, resends what it has
//! (`initial_resource_versions`), keeps serving the last good state while disconnected,
//! reports readiness once every subscribed type has been applied once, and resolves unknown
//! IPs on demand (subscribing `<network>/<ip>`, one request per IP however many wait).

pub mod convert;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::identity::manager::BoxFuture;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::state::SharedState;
use convert::{ADDRESS_TYPE, AUTHORIZATION_TYPE, Tracked};

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
    pub node_id: String,
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

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("invalid control plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
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
    tracked: Mutex<Tracked>,
    /// The live stream's request sender, if connected.
    requests: Mutex<Option<mpsc::UnboundedSender<DeltaDiscoveryRequest>>>,
    /// Names subscribed on demand; resent on every reconnect.
    on_demand: Mutex<BTreeSet<String>>,
    /// Bumped after every applied response (on-demand waiters watch it).
    changed: watch::Sender<u64>,
    ready: watch::Sender<bool>,
    applied_types: Mutex<HashSet<String>>,
    rejected: prometheus_client::metrics::counter::Counter,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl XdsClient {
    pub fn new(settings: XdsSettings, state: Arc<SharedState>) -> Arc<Self> {
        Arc::new(XdsClient {
            settings,
            state,
            tracked: Mutex::new(Tracked::default()),
            requests: Mutex::new(None),
            on_demand: Mutex::new(BTreeSet::new()),
            changed: watch::channel(0).0,
            ready: watch::channel(false).0,
            applied_types: Mutex::new(HashSet::new()),
            rejected: Default::default(),
            dropped: Default::default(),
        })
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
    pub fn rejected_counter(&self) -> prometheus_client::metrics::counter::Counter {
        self.rejected.clone()
    }

    /// The counter of unreadable policy entries dropped (each logged as it is), to register
    /// with the metrics registry.
    pub fn dropped_policy_entries_counter(&self) -> prometheus_client::metrics::counter::Counter {
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
        let mut backoff = Duration::from_millis(100);
        loop {
            let before = *self.changed.borrow();
            match self.session().await {
                Ok(()) => tracing::warn!("control plane closed the stream; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, "xDS stream failed; serving the last good state and reconnecting")
                }
            }
            // A stream that delivered something was healthy: start the backoff over.
            if *self.changed.borrow() != before {
                backoff = Duration::from_millis(100);
            }
            let jitter =
                Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, XdsError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
        let address = &self.settings.address;
        let bad = |reason: String| XdsError::Address {
            address: address.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        if address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(path) = &self.settings.root_ca {
                let pem = std::fs::read(path).map_err(|source| XdsError::Read {
                    what: "control plane root CA",
                    path: path.display().to_string(),
                    source,
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        } else if !address.starts_with("http://") {
            return Err(bad("use http:// or https://".into()));
        }
        Ok(endpoint.connect().await?)
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
        let tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let (subscribe, unsubscribe) = if self.settings.on_demand && type_url == ADDRESS_TYPE {
            (on_demand.iter().cloned().collect(), vec!["*".to_owned()])
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
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        {
            // Under the on-demand lock: a lookup either lands in these initial requests or is
            // sent on `tx` after it, never lost in between.
            let names = self.on_demand.lock().unwrap_or_else(|p| p.into_inner());
            for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
                let _ = tx.send(self.initial_request(type_url, &names));
            }
            *self.requests.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        }
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        self.add_metadata(&mut request)?;
        let result = async {
            let mut stream = client.delta_aggregated_resources(request).await?.into_inner();
            tracing::info!(address = %self.settings.address, on_demand = self.settings.on_demand, "xDS stream open");
            while let Some(response) = stream.message().await? {
                let _ = tx.send(self.handle(&response));
            }
            Ok(())
        }
        .await;
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()) = None;
        result
    }

    fn add_metadata<T>(&self, request: &mut tonic::Request<T>) -> Result<(), XdsError> {
        use tonic::metadata::MetadataValue;
        if let Some(path) = &self.settings.token_file {
            let token = std::fs::read_to_string(path).map_err(|source| XdsError::Read {
                what: "token file",
                path: path.display().to_string(),
                source,
            })?;
            let value =
                MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|e| {
                    XdsError::Address {
                        address: path.display().to_string(),
                        reason: format!("token is not a valid header value: {e}"),
                    }
                })?;
            request.metadata_mut().insert("authorization", value);
        }
        if !self.settings.cluster_id.is_empty()
            && let Ok(value) = MetadataValue::try_from(self.settings.cluster_id.as_str())
        {
            request.metadata_mut().insert("clusterid", value);
        }
        Ok(())
    }

    /// Applies a response and returns its (N)ACK.
    fn handle(
        &self,
        response: &crate::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let applied = self.state.write(|state| {
            let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut seen = self.applied_types.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(response.type_url.clone());
        if !*self.ready.borrow() && self.required_types().iter().all(|t| seen.contains(*t)) {
            tracing::info!("xDS ready: every subscribed type applied");
            self.ready.send_replace(true);
        }
        applied.ack
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
            let mut names = self.on_demand.lock().unwrap_or_else(|p| p.into_inner());
            if names.insert(name.clone())
                && let Some(tx) = self
                    .requests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
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

//! The other end of [`super`]: a delta ADS server that serves a [`SharedState`] to proxies, as
//! istiod and the Cilium agent do. The node agent (`hboned agent`) runs it on a Unix socket, so
//! its proxy has the one discovery path every shape has. It serves `istio.workload.Address`
//! (workloads by uid, services by `namespace/hostname`) and answers `istio.security.Authorization`
//! with nothing: policies stay in the proxy's own config. Every subscription is a wildcard
//! (no on-demand names); each push is the difference to what the stream was last sent
//! (versions are a hash of the encoded resource), and a reconnecting client's
//! `initial_resource_versions` are taken as what it has, so it is sent only what changed and
//! told what went. Changes are batched for 100 ms.
//!
//! A server can be gated ([`XdsServer::gated`]): until its source of truth has listed once it
//! answers from a cache (the agent's last state, written by [`write_cache`]) or not at all, so a
//! proxy that reconnects to a restarted agent keeps its state instead of being told that
//! everything went; once listed, each stream is moved to the live state by one more delta.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::convert::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use crate::proto::istio::workload::{self as pb, address::Type};
use crate::state::{Protocol, Service, SharedState, State, Workload};

/// How long changes are gathered before a push.
const BATCH: Duration = Duration::from_millis(100);

/// Serves `state` over delta ADS; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct XdsServer {
    state: Arc<SharedState>,
    /// True once `state` is complete; the server waits for it (answering from `cached`
    /// meanwhile, if there is one).
    synced: Option<watch::Receiver<bool>>,
    cached: Option<Arc<SharedState>>,
}

impl XdsServer {
    pub(crate) fn new(state: Arc<SharedState>) -> XdsServer {
        XdsServer {
            state,
            synced: None,
            cached: None,
        }
    }

    /// Serves `state` only once `synced` is true, and `cached` until then (nothing without).
    pub(crate) fn gated(
        mut self,
        synced: watch::Receiver<bool>,
        cached: Option<Arc<SharedState>>,
    ) -> XdsServer {
        self.synced = Some(synced);
        self.cached = cached;
        self
    }

    /// Serves on a Unix socket at `path` (a stale socket file there is replaced; the socket is
    /// made readable and writable by its owner only) until the task is dropped. The agent binds
    /// first (`serve_listener`); the tests bind through this.
    #[cfg(test)]
    pub(crate) async fn serve_unix(self, path: PathBuf) -> std::io::Result<()> {
        self.serve_listener(bind_unix(&path)?).await
    }

    /// Serves on a bound Unix listener until the task is dropped.
    pub(crate) async fn serve_listener(
        self,
        listener: tokio::net::UnixListener,
    ) -> std::io::Result<()> {
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(self))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .map_err(std::io::Error::other)
    }
}

/// A Unix listener at `path`, replacing a socket an earlier run left, mode 0600.
pub(crate) fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream(self.clone(), request.into_inner(), tx));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// name → version, of one type.
type Versions = BTreeMap<String, String>;

/// One client stream until it ends.
async fn stream(
    server: XdsServer,
    mut requests: tonic::Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>>,
) {
    let mut synced = server
        .synced
        .clone()
        .unwrap_or_else(|| watch::channel(true).1);
    // The state answered from: the live one once synced, else the cache (or none yet).
    let source = |synced: bool| -> Option<Arc<SharedState>> {
        if synced {
            Some(server.state.clone())
        } else {
            server.cached.clone()
        }
    };
    let mut on_live = *synced.borrow_and_update();
    let mut current = source(on_live);
    let mut changes = current.as_ref().map(|s| s.changes());
    // What the client has, per subscribed type; types it asked for that were not answered yet.
    let mut subscribed: BTreeMap<String, Versions> = BTreeMap::new();
    let mut unanswered: BTreeMap<String, Versions> = BTreeMap::new();
    let mut nonce = 0u64;
    loop {
        if !on_live && *synced.borrow_and_update() {
            // Listed: over to the live state, by one more delta per type.
            on_live = true;
            current = source(true);
            changes = current.as_ref().map(|s| s.changes());
            if let Some(state) = &current
                && !push_all(state, &mut subscribed, &mut nonce, &responses).await
            {
                return;
            }
        }
        // Answer what was asked once there is something to answer from.
        if let Some(state) = &current {
            for (type_url, mut versions) in std::mem::take(&mut unanswered) {
                let snapshot = snapshot(&state.read(), &type_url);
                // The first answer goes even when empty: the client is ready once it has one.
                let push = delta(&type_url, &mut versions, snapshot, &mut nonce, true);
                subscribed.insert(type_url, versions);
                if let Some(p) = push
                    && responses.send(Ok(p)).await.is_err()
                {
                    return;
                }
            }
        }
        tokio::select! {
            request = requests.message() => {
                let request = match request {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "xDS client stream ended");
                        return;
                    }
                };
                if let Some(error) = &request.error_detail {
                    tracing::warn!(type_url = %request.type_url, nonce = %request.response_nonce, error = %error.message, "the proxy rejected a push");
                }
                let known = subscribed.contains_key(&request.type_url)
                    || unanswered.contains_key(&request.type_url);
                if known {
                    continue;
                }
                if request.type_url != ADDRESS_TYPE && request.type_url != AUTHORIZATION_TYPE {
                    tracing::warn!(type_url = %request.type_url, "a proxy subscribed to a type this server does not serve");
                    continue;
                }
                let has = request.initial_resource_versions.into_iter().collect();
                unanswered.insert(request.type_url, has);
            }
            changed = synced.changed(), if !on_live => {
                // Nobody will say it synced any more: stay on the cache, or end.
                if changed.is_err() {
                    if current.is_none() {
                        return;
                    }
                    on_live = true;
                }
            }
            changed = changed_or_never(changes.as_mut()) => {
                if !changed {
                    return;
                }
                tokio::time::sleep(BATCH).await;
                if let Some(c) = changes.as_mut() {
                    c.borrow_and_update();
                }
                if let Some(state) = &current
                    && !push_all(state, &mut subscribed, &mut nonce, &responses).await
                {
                    return;
                }
            }
        }
    }
}

/// Sends each subscribed type what changed in `state`; false when the client is gone.
async fn push_all(
    state: &SharedState,
    subscribed: &mut BTreeMap<String, Versions>,
    nonce: &mut u64,
    responses: &mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>>,
) -> bool {
    for (type_url, versions) in subscribed.iter_mut() {
        let current = snapshot(&state.read(), type_url);
        if let Some(p) = delta(type_url, versions, current, nonce, false)
            && responses.send(Ok(p)).await.is_err()
        {
            return false;
        }
    }
    true
}

/// Resolves when `changes` moved (true) or its sender went (false); never without one.
async fn changed_or_never(changes: Option<&mut watch::Receiver<u64>>) -> bool {
    match changes {
        Some(c) => c.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Writes every Address of `state` to `path` (a delta response in protobuf, through a temporary
/// file and a rename): the cache a restarted agent answers from until it has listed again.
pub(crate) fn write_cache(state: &State, path: &Path) -> std::io::Result<()> {
    let response = DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.to_owned(),
        resources: snapshot(state, ADDRESS_TYPE).into_values().collect(),
        ..Default::default()
    };
    let staged = path.with_extension("tmp");
    std::fs::write(&staged, response.encode_to_vec())?;
    std::fs::rename(&staged, path)
}

/// Reads a cache [`write_cache`] wrote into a new state; `None` when there is none or it does
/// not read back whole (a cache is never half-applied).
pub(crate) fn read_cache(path: &Path, trust_domain: &str) -> Option<State> {
    let bytes = std::fs::read(path).ok()?;
    let response = DeltaDiscoveryResponse::decode(bytes.as_slice())
        .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "the discovery cache does not decode; ignored"))
        .ok()?;
    let mut state = State::default();
    let mut tracked = super::convert::Tracked::default();
    let applied = super::convert::apply_delta(&mut state, &mut tracked, &response, trust_domain);
    if !applied.rejected.is_empty() {
        tracing::warn!(path = %path.display(), rejected = applied.rejected.len(), "the discovery cache holds entries that do not convert; ignored");
        return None;
    }
    Some(state)
}

/// Every resource of `type_url` in `state`, by name, with its version.
fn snapshot(state: &State, type_url: &str) -> BTreeMap<String, Resource> {
    if type_url != ADDRESS_TYPE {
        return BTreeMap::new();
    }
    let workloads = state.workloads().map(|w| {
        let address = pb::Address {
            r#type: Some(Type::Workload(encode_workload(w))),
        };
        (w.uid.clone(), address)
    });
    let services = state.services().map(|s| {
        let address = pb::Address {
            r#type: Some(Type::Service(encode_service(s))),
        };
        (s.key(), address)
    });
    workloads
        .chain(services)
        .map(|(name, address)| {
            let value = address.encode_to_vec();
            let resource = Resource {
                name: name.clone(),
                version: version(&value),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_owned(),
                    value,
                }),
                ..Default::default()
            };
            (name, resource)
        })
        .collect()
}

fn version(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// What the client lacks of `current` and what it has that is gone, as one response (none
/// when nothing differs, unless `always`); `has` becomes what it will have.
fn delta(
    type_url: &str,
    has: &mut Versions,
    current: BTreeMap<String, Resource>,
    nonce: &mut u64,
    always: bool,
) -> Option<DeltaDiscoveryResponse> {
    let removed: Vec<String> = has
        .keys()
        .filter(|name| !current.contains_key(*name))
        .cloned()
        .collect();
    let mut resources = Vec::new();
    for (name, r) in current {
        if has.get(&name) != Some(&r.version) {
            has.insert(name, r.version.clone());
            resources.push(r);
        }
    }
    for name in &removed {
        has.remove(name);
    }
    if resources.is_empty() && removed.is_empty() && !always {
        return None;
    }
    *nonce += 1;
    Some(DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        nonce: nonce.to_string(),
        resources,
        removed_resources: removed,
        ..Default::default()
    })
}

/// A workload as istiod would send it (the inverse of [`super::convert`]'s reading).
fn encode_workload(w: &Workload) -> pb::Workload {
    let ip = |a: &std::net::IpAddr| match a {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    pb::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        trust_domain: w.identity.trust_domain().to_owned(),
        service_account: w.identity.service_account().to_owned(),
        network: w.network.clone(),
        addresses: w.addresses.iter().map(ip).collect(),
        node: w.node.clone(),
        tunnel_protocol: match w.protocol {
            Protocol::Hbone => pb::TunnelProtocol::Hbone,
            Protocol::Tcp => pb::TunnelProtocol::None,
        } as i32,
        services: w
            .services
            .iter()
            .map(|(key, ports)| {
                let ports = ports
                    .iter()
                    .map(|(service, target)| pb::Port {
                        service_port: u32::from(*service),
                        target_port: u32::from(*target),
                        ..Default::default()
                    })
                    .collect();
                (key.clone(), pb::PortList { ports })
            })
            .collect(),
        status: if w.healthy {
            pb::WorkloadStatus::Healthy
        } else {
            pb::WorkloadStatus::Unhealthy
        } as i32,
        authorization_policies: w.authorization_policies.clone(),
        network_mode: if w.host_network {
            pb::NetworkMode::HostNetwork
        } else {
            pb::NetworkMode::Standard
        } as i32,
        workload_name: w.workload_name.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        cluster_id: w.cluster_id.clone(),
        locality: Some(pb::Locality {
            region: w.locality.region.clone(),
            zone: w.locality.zone.clone(),
            subzone: w.locality.subzone.clone(),
        }),
        hostname: w.hostname.clone(),
        capacity: Some(w.capacity),
        waypoint: w.waypoint.as_ref().map(encode_gateway),
        network_gateway: w.network_gateway.as_ref().map(encode_gateway),
        ..Default::default()
    }
}

/// A waypoint or network gateway as istiod sends it.
fn encode_gateway(g: &crate::state::Gateway) -> pb::GatewayAddress {
    use crate::state::GatewayDestination;
    use pb::gateway_address::Destination;
    let destination = match &g.destination {
        GatewayDestination::Address { network, ip } => Destination::Address(pb::NetworkAddress {
            network: network.clone(),
            address: match ip {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            },
            length: None,
        }),
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => Destination::Hostname(pb::NamespacedHostname {
            namespace: namespace.clone(),
            hostname: hostname.clone(),
        }),
    };
    pb::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: u32::from(g.port),
    }
}

/// A service as istiod would send it.
fn encode_service(s: &Service) -> pb::Service {
    use crate::state::balance::{Mode, Scope};
    use pb::load_balancing::{HealthPolicy, Mode as PbMode, Scope as PbScope};
    let lb = &s.load_balancing;
    let load_balancing = (!lb.preferences.is_empty() || lb.mode != Mode::Any || lb.allow_unhealthy)
        .then(|| pb::LoadBalancing {
            routing_preference: lb
                .preferences
                .iter()
                .map(|p| {
                    let scope = match p {
                        Scope::Region => PbScope::Region,
                        Scope::Zone => PbScope::Zone,
                        Scope::Subzone => PbScope::Subzone,
                        Scope::Node => PbScope::Node,
                        Scope::Cluster => PbScope::Cluster,
                        Scope::Network => PbScope::Network,
                    };
                    scope as i32
                })
                .collect(),
            mode: match lb.mode {
                Mode::Any => PbMode::UnspecifiedMode,
                Mode::Strict => PbMode::Strict,
                Mode::Failover => PbMode::Failover,
                Mode::Passthrough => PbMode::Passthrough,
            } as i32,
            health_policy: if lb.allow_unhealthy {
                HealthPolicy::AllowAll
            } else {
                HealthPolicy::OnlyHealthy
            } as i32,
        });
    pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(|vip| pb::NetworkAddress {
                network: String::new(),
                address: match vip {
                    std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                    std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
                },
                length: s
                    .vip_ranges
                    .iter()
                    .find(|(net, _)| net == vip)
                    .map(|(_, len)| u32::from(*len)),
            })
            .collect(),
        ports: s
            .ports
            .iter()
            .map(|(service, target)| pb::Port {
                service_port: u32::from(*service),
                target_port: u32::from(*target),
                ..Default::default()
            })
            .collect(),
        subject_alt_names: s
            .subject_alt_names
            .iter()
            .map(|id| id.to_string())
            .collect(),
        load_balancing,
        visibility: if s.namespace_only {
            pb::service::Visibility::Namespace
        } else {
            pb::service::Visibility::Public
        } as i32,
        waypoint: s.waypoint.as_ref().map(encode_gateway),
        weighted_waypoints: s
            .weighted_waypoints
            .iter()
            .map(|(g, weight)| pb::WeightedWaypoint {
                destination: Some(encode_gateway(g)),
                weight: *weight,
            })
            .collect(),
        ingress_use_waypoint: s.ingress_use_waypoint,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;

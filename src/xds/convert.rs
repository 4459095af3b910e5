//! xDS resources → the proxy's state, as pure functions: decoding and validating one resource,
//! and applying one delta response to a [`State`] (what to upsert, what to remove, what to
//! reject). A rejected resource leaves the last good version in place.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use prost::Message;

use crate::authz::{
    Action, Clause, IpNet, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch,
};
use crate::identity::Identity;
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::proto::google::rpc::Status;
use crate::proto::istio::security::{self as pb_security, Authorization, string_match::MatchType};
use crate::proto::istio::workload::{self as pb, address::Type};
use crate::state::{Gateway, GatewayDestination, Protocol, Service, State, Unsupported, Workload};

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// gRPC INVALID_ARGUMENT, the code of a NACK's error_detail.
const INVALID_ARGUMENT: i32 = 3;

/// Why one resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("resource has no body")]
    Empty,
    #[error("resource is a {0}, not of the response's type")]
    WrongType(String),
    #[error("cannot decode: {0}")]
    Decode(#[source] prost::DecodeError),
    #[error("workload has no uid")]
    NoUid,
    #[error("address of {0} bytes is neither IPv4 (4) nor IPv6 (16)")]
    BadIp(usize),
    #[error("bad identity: {0}")]
    Identity(#[source] crate::identity::IdentityError),
    #[error("port {0} is out of range")]
    BadPort(u32),
    #[error("tunnel protocol {0} is not one this proxy knows (NONE, HBONE, LEGACY_ISTIO_MTLS)")]
    UnknownTunnel(i32),
    #[error("application tunnel protocol {0} is not one this proxy knows (NONE, PROXY)")]
    UnknownApplicationTunnel(i32),
    #[error("address {0}/{1}: the prefix is longer than the address")]
    BadPrefix(IpAddr, u32),
    #[error("service visibility {0} is not one this proxy knows (PUBLIC, NAMESPACE)")]
    UnknownVisibility(i32),
    #[error("policy has no name")]
    NoName,
    #[error("{0} names no destination (neither an address nor a hostname)")]
    NoGatewayDestination(&'static str),
}

/// A waypoint or network gateway reference (ztunnel's `GatewayAddress::try_from`: one with
/// no destination is an error, never a gateway to nowhere).
fn gateway(g: &pb::GatewayAddress, what: &'static str) -> Result<Gateway, ConvertError> {
    use pb::gateway_address::Destination;
    let destination = match &g.destination {
        Some(Destination::Address(a)) => GatewayDestination::Address {
            network: a.network.clone(),
            ip: ip(&a.address)?,
        },
        Some(Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        },
        None => return Err(ConvertError::NoGatewayDestination(what)),
    };
    Ok(Gateway {
        destination,
        port: port(g.hbone_mtls_port)?,
    })
}

fn ip(bytes: &[u8]) -> Result<IpAddr, ConvertError> {
    match bytes.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(bytes).map_err(|_| ConvertError::BadIp(4))?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).map_err(|_| ConvertError::BadIp(16))?,
        )),
        n => Err(ConvertError::BadIp(n)),
    }
}

fn port(p: u32) -> Result<u16, ConvertError> {
    u16::try_from(p).map_err(|_| ConvertError::BadPort(p))
}

/// A workload resource, with `trust_domain` as the default for workloads that name none.
pub(crate) fn workload(w: pb::Workload, trust_domain: &str) -> Result<Workload, ConvertError> {
    if w.uid.is_empty() {
        return Err(ConvertError::NoUid);
    }
    let td = if w.trust_domain.is_empty() {
        trust_domain
    } else {
        &w.trust_domain
    };
    let identity =
        Identity::new(td, &w.namespace, &w.service_account).map_err(ConvertError::Identity)?;
    let addresses = w
        .addresses
        .iter()
        .map(|a| ip(a))
        .collect::<Result<_, _>>()?;
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        let mut ports = BTreeMap::new();
        for p in &list.ports {
            let target = if p.target_port == 0 {
                p.service_port
            } else {
                p.target_port
            };
            ports.insert(port(p.service_port)?, port(target)?);
        }
        services.insert(key.clone(), ports);
    }
    // A protocol this proxy does not know is refused (NACK): plaintext would be a guess that
    // sends cleartext to a workload that expects a tunnel.
    let mut unsupported = None;
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(pb::TunnelProtocol::None) => Protocol::Tcp,
        // A sidecar: its traffic is refused (below), never sent in plaintext.
        Ok(pb::TunnelProtocol::LegacyIstioMtls) => {
            unsupported = Some(Unsupported::LegacyIstioMtls);
            Protocol::Tcp
        }
        Err(_) => return Err(ConvertError::UnknownTunnel(w.tunnel_protocol)),
    };
    // Behind a waypoint: connections addressed to it go through the waypoint.
    let waypoint = w
        .waypoint
        .as_ref()
        .map(|g| gateway(g, "waypoint"))
        .transpose()?;
    let network_gateway = w
        .network_gateway
        .as_ref()
        .map(|g| gateway(g, "network_gateway"))
        .transpose()?;
    // `native_tunnel` workloads
    // take their tunnels at their own address, where every tunnel goes; `extensions` are
    // opaque and ignored, as ztunnel ignores them.
    let proxy_protocol = match w.application_tunnel {
        Some(t) if t.protocol == pb::application_tunnel::Protocol::Proxy as i32 => {
            Some(port(t.port)?)
        }
        Some(t) if t.protocol != pb::application_tunnel::Protocol::None as i32 => {
            return Err(ConvertError::UnknownApplicationTunnel(t.protocol));
        }
        _ => None,
    };
    Ok(Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        identity,
        network: w.network,
        addresses,
        node: w.node,
        protocol,
        services,
        healthy: w.status == pb::WorkloadStatus::Healthy as i32,
        authorization_policies: w.authorization_policies,
        host_network: w.network_mode == pb::NetworkMode::HostNetwork as i32,
        workload_name: w.workload_name,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        cluster_id: w.cluster_id,
        locality: w
            .locality
            .map(|l| crate::state::balance::Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            })
            .unwrap_or_default(),
        hostname: w.hostname,
        // Unset: 1 (workload.proto).
        capacity: w.capacity.unwrap_or(1),
        unsupported,
        proxy_protocol,
        waypoint,
        network_gateway,
    })
}

pub(crate) fn service(s: pb::Service) -> Result<Service, ConvertError> {
    let vips: Vec<IpAddr> = s
        .addresses
        .iter()
        .map(|a| ip(&a.address))
        .collect::<Result<_, _>>()?;
    // A CIDR address (ServiceEntry `addresses: [10.0.0.0/16]`) stands for its whole range; a
    // full-length prefix is the address alone.
    let mut vip_ranges = Vec::new();
    for (a, vip) in s.addresses.iter().zip(&vips) {
        let full = if vip.is_ipv4() { 32 } else { 128 };
        match a.length {
            None => {}
            Some(len) if len == full => {}
            Some(len) if len < full => vip_ranges.push((*vip, len as u8)),
            Some(len) => return Err(ConvertError::BadPrefix(*vip, len)),
        }
    }
    let visibility = pb::service::Visibility::try_from(s.visibility)
        .map_err(|_| ConvertError::UnknownVisibility(s.visibility))?;
    // A waypoint (or several, by weight) sees every connection to the service.
    let waypoint = s
        .waypoint
        .as_ref()
        .map(|g| gateway(g, "waypoint"))
        .transpose()?;
    let mut weighted_waypoints = Vec::with_capacity(s.weighted_waypoints.len());
    for ww in &s.weighted_waypoints {
        let g = ww
            .destination
            .as_ref()
            .ok_or(ConvertError::NoGatewayDestination("weighted waypoint"))?;
        weighted_waypoints.push((gateway(g, "weighted waypoint")?, ww.weight));
    }
    // A target port of 0 is a named one (`targetPort: http`): istiod resolves it per pod, in
    // each workload's own port list, and leaves out the pods without that port
    // (pilot/pkg/serviceregistry/kube/controller/ambient). It is kept as 0: no fallback.
    let mut ports = BTreeMap::new();
    for p in &s.ports {
        ports.insert(port(p.service_port)?, port(p.target_port)?);
    }
    // A name that is no SPIFFE ID can never match a peer's certificate (exactly one SPIFFE
    // URI SAN each): it is left out, and the service keeps the names that can.
    let subject_alt_names = s
        .subject_alt_names
        .iter()
        .filter_map(|n| match Identity::parse(n) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::debug!(service = %s.hostname, name = %n, error = %e, "subject alt name left out");
                None
            }
        })
        .collect();
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports,
        subject_alt_names,
        load_balancing: s.load_balancing.map(load_balancing).unwrap_or_default(),
        vip_ranges,
        namespace_only: visibility == pb::service::Visibility::Namespace,
        unsupported: None,
        waypoint,
        weighted_waypoints,
        ingress_use_waypoint: s.ingress_use_waypoint,
    })
}

/// A service's load balancing; unknown scopes are skipped, an unknown mode is no preference.
fn load_balancing(lb: pb::LoadBalancing) -> crate::state::balance::LoadBalancing {
    use crate::state::balance::{LoadBalancing, Mode, Scope};
    use pb::load_balancing::{HealthPolicy, Mode as PbMode, Scope as PbScope};
    let preferences = lb
        .routing_preference
        .iter()
        .filter_map(|s| match PbScope::try_from(*s).ok()? {
            PbScope::Region => Some(Scope::Region),
            PbScope::Zone => Some(Scope::Zone),
            PbScope::Subzone => Some(Scope::Subzone),
            PbScope::Node => Some(Scope::Node),
            PbScope::Cluster => Some(Scope::Cluster),
            PbScope::Network => Some(Scope::Network),
            PbScope::UnspecifiedScope => None,
        })
        .collect();
    let mode = match PbMode::try_from(lb.mode) {
        Ok(PbMode::Strict) => Mode::Strict,
        Ok(PbMode::Failover) => Mode::Failover,
        Ok(PbMode::Passthrough) => Mode::Passthrough,
        _ => Mode::Any,
    };
    LoadBalancing {
        preferences,
        mode,
        allow_unhealthy: lb.health_policy == HealthPolicy::AllowAll as i32,
    }
}

/// Converts a policy into the evaluator's form, once, here at the xDS boundary.
///
/// What cannot be read is never a reason to allow more (ztunnel, `src/rbac.rs`, drops an
/// unreadable address entry too, but would let an ALLOW widen; rejecting a whole DENY policy
/// would fail open):
/// - an unreadable entry (a bad address or prefix length, a port past 65535, a string match
///   with no type) is dropped and named in the returned list (logged and counted by the
///   caller); the rest of the policy applies. In an ALLOW policy the match that held it
///   matches nothing instead, so the ALLOW cannot widen; in a DENY policy a match left with no
///   condition matches every connection, so the DENY cannot vanish;
/// - an unknown action makes the policy a DENY of everything in its scope; an unknown scope
///   makes it a NAMESPACE policy (its own namespace);
/// - extensions (which nothing here understands) make a match carrying them an unreadable one,
///   and an ALLOW policy carrying them allow nothing; a DENY carrying them stays as it is.
pub fn policy(p: Authorization) -> Result<(Policy, Vec<String>), ConvertError> {
    use crate::proto::istio::security::{Action as PbAction, Scope as PbScope};
    if p.name.is_empty() {
        return Err(ConvertError::NoName);
    }
    let key = format!("{}/{}", p.namespace, p.name);
    let mut dropped = Vec::new();
    let action = match PbAction::try_from(p.action) {
        Ok(PbAction::Allow) => Some(Action::Allow),
        Ok(PbAction::Deny) => Some(Action::Deny),
        Err(_) => {
            dropped.push(format!(
                "{key}: unknown action {}; denying everything it covers",
                p.action
            ));
            None
        }
    };
    let scope = match PbScope::try_from(p.scope) {
        Ok(PbScope::Global) => Scope::Global,
        Ok(PbScope::Namespace) => Scope::Namespace,
        Ok(PbScope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => {
            dropped.push(format!(
                "{key}: unknown scope {}; applying it to its namespace",
                p.scope
            ));
            Scope::Namespace
        }
    };
    let extended = !p.extensions.is_empty();
    if extended {
        let names: Vec<&str> = p.extensions.iter().map(|e| e.name.as_str()).collect();
        dropped.push(format!("{key}: extensions {names:?} are not understood"));
    }
    let rules = match action {
        // A rule with no clauses matches everything.
        None => vec![Rule::default()],
        // No rule: allows nothing.
        Some(Action::Allow) if extended => Vec::new(),
        Some(action) => p
            .groups
            .into_iter()
            .map(|r| Rule {
                clauses: r
                    .rules
                    .into_iter()
                    .map(|c| Clause {
                        matches: c
                            .matches
                            .iter()
                            .map(|m| policy_match(m, action, &key, &mut dropped))
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    };
    let policy = Policy {
        name: p.name,
        namespace: p.namespace,
        scope,
        action: action.unwrap_or(Action::Deny),
        rules,
        dry_run: p.dry_run,
    };
    Ok((policy, dropped))
}

/// One match, its unreadable entries dropped (see [`policy`]).
fn policy_match(
    m: &pb_security::Match,
    action: Action,
    key: &str,
    dropped: &mut Vec<String>,
) -> Match {
    let before = dropped.len();
    if !m.extensions.is_empty() {
        let names: Vec<&str> = m.extensions.iter().map(|e| e.name.as_str()).collect();
        dropped.push(format!(
            "{key}: a match's extensions {names:?} are not understood"
        ));
    }
    let mut strings = |list: &[pb_security::StringMatch], field: &str| -> Vec<StringMatch> {
        list.iter()
            .filter_map(|s| {
                let converted = s.match_type.as_ref().map(|t| match t {
                    MatchType::Exact(v) => StringMatch::Exact(v.clone()),
                    MatchType::Prefix(v) => StringMatch::Prefix(v.clone()),
                    MatchType::Suffix(v) => StringMatch::Suffix(v.clone()),
                    MatchType::Presence(()) => StringMatch::Presence,
                });
                if converted.is_none() {
                    dropped.push(format!("{key}: {field}: a string match with no type"));
                }
                converted
            })
            .collect()
    };
    let namespaces = strings(&m.namespaces, "namespaces");
    let not_namespaces = strings(&m.not_namespaces, "notNamespaces");
    let principals = strings(&m.principals, "principals");
    let not_principals = strings(&m.not_principals, "notPrincipals");
    let mut nets = |list: &[pb_security::Address], field: &str| -> Vec<IpNet> {
        list.iter()
            .filter_map(|a| {
                let net = ip(&a.address)
                    .map_err(|e| e.to_string())
                    .and_then(|addr| IpNet::new(addr, a.length).map_err(|e| e.to_string()));
                net.map_err(|e| dropped.push(format!("{key}: {field}: {e}")))
                    .ok()
            })
            .collect()
    };
    let source_ips = nets(&m.source_ips, "sourceIps");
    let not_source_ips = nets(&m.not_source_ips, "notSourceIps");
    let destination_ips = nets(&m.destination_ips, "destinationIps");
    let not_destination_ips = nets(&m.not_destination_ips, "notDestinationIps");
    let mut ports = |list: &[u32], field: &str| -> Vec<u16> {
        list.iter()
            .filter_map(|p| {
                port(*p)
                    .map_err(|e| dropped.push(format!("{key}: {field}: {e}")))
                    .ok()
            })
            .collect()
    };
    let destination_ports = ports(&m.destination_ports, "destinationPorts");
    let not_destination_ports = ports(&m.not_destination_ports, "notDestinationPorts");
    let accounts = |list: &[pb_security::ServiceAccountMatch]| -> Vec<ServiceAccountMatch> {
        list.iter()
            .map(|a| ServiceAccountMatch {
                namespace: a.namespace.clone(),
                service_account: a.service_account.clone(),
            })
            .collect()
    };
    let converted = Match {
        namespaces,
        not_namespaces,
        principals,
        not_principals,
        source_ips,
        not_source_ips,
        destination_ips,
        not_destination_ips,
        destination_ports,
        not_destination_ports,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
    };
    if dropped.len() == before {
        return converted;
    }
    match action {
        // No condition: this match matches nothing, and the ALLOW cannot widen.
        Action::Allow => Match::default(),
        // Every entry gone: a condition every connection meets, so the DENY still holds.
        Action::Deny if converted.is_empty() => Match {
            source_ips: vec![IpNet::ANY_V4, IpNet::ANY_V6],
            ..Match::default()
        },
        Action::Deny => converted,
    }
}

/// What a resource name stands for in the state, so a removal by name finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Workload(String),
    Service(String),
    Policy(String),
}

/// What the client has accepted from the control plane: per type, name → (version, key).
#[derive(Debug, Default, Clone)]
pub struct Tracked {
    pub by_type: HashMap<String, HashMap<String, (String, Key)>>,
}

impl Tracked {
    /// The versions to send as `initial_resource_versions` on a reconnect.
    pub(crate) fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.by_type
            .get(type_url)
            .map(|m| m.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// The outcome of one response: counts for logs and metrics, and the (N)ACK to send.
#[derive(Debug, Clone)]
pub struct Applied {
    pub upserted: usize,
    pub removed: usize,
    /// `name: reason` for every rejected resource.
    pub rejected: Vec<String>,
    /// `policy: what` for every unreadable policy entry dropped (the policy itself applied).
    pub dropped: Vec<String>,
    pub ack: DeltaDiscoveryRequest,
}

/// Applies one delta response to `state`. Good resources apply even when others are rejected;
/// a rejected one keeps its last good version. The returned request ACKs the nonce, or NACKs
/// it with an error_detail naming each rejected resource.
pub fn apply_delta(
    state: &mut State,
    tracked: &mut Tracked,
    response: &DeltaDiscoveryResponse,
    trust_domain: &str,
) -> Applied {
    let type_url = response.type_url.as_str();
    let known = tracked.by_type.entry(type_url.to_owned()).or_default();
    let (mut upserted, mut removed, mut rejected) = (0, 0, Vec::new());
    let mut dropped = Vec::new();
    for r in &response.resources {
        match convert_one(type_url, r.resource.as_ref(), trust_domain) {
            Ok(Converted::Workload(w)) => {
                let key = Key::Workload(w.uid.clone());
                state.upsert_workload(*w);
                known.insert(r.name.clone(), (r.version.clone(), key));
                upserted += 1;
            }
            Ok(Converted::Service(s)) => {
                let key = Key::Service(s.key());
                state.upsert_service(s);
                known.insert(r.name.clone(), (r.version.clone(), key));
                upserted += 1;
            }
            Ok(Converted::Policy(p, unreadable)) => {
                let key = Key::Policy(p.key());
                dropped.extend(unreadable);
                state.upsert_policy(p);
                known.insert(r.name.clone(), (r.version.clone(), key));
                upserted += 1;
            }
            Err(e) => rejected.push(format!("{}: {e}", r.name)),
        }
    }
    for name in &response.removed_resources {
        let Some((_, key)) = known.remove(name) else {
            continue;
        };
        let gone = match key {
            Key::Workload(uid) => state.remove_workload(&uid).is_some(),
            Key::Service(k) => state.remove_service(&k).is_some(),
            Key::Policy(k) => state.remove_policy(&k).is_some(),
        };
        removed += usize::from(gone);
    }
    let error_detail = (!rejected.is_empty()).then(|| Status {
        code: INVALID_ARGUMENT,
        message: format!(
            "rejected {} resource(s): {}",
            rejected.len(),
            rejected.join("; ")
        ),
        details: Vec::new(),
    });
    Applied {
        upserted,
        removed,
        rejected,
        dropped,
        ack: DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            response_nonce: response.nonce.clone(),
            error_detail,
            ..Default::default()
        },
    }
}

enum Converted {
    // Boxed: a workload is several times the size of the other two.
    Workload(Box<Workload>),
    Service(Service),
    Policy(Policy, Vec<String>),
}

fn convert_one(
    type_url: &str,
    any: Option<&prost_types::Any>,
    trust_domain: &str,
) -> Result<Converted, ConvertError> {
    let any = any.ok_or(ConvertError::Empty)?;
    if any.type_url != type_url {
        return Err(ConvertError::WrongType(any.type_url.clone()));
    }
    let decode = ConvertError::Decode;
    match type_url {
        ADDRESS_TYPE => match pb::Address::decode(any.value.as_slice())
            .map_err(decode)?
            .r#type
        {
            Some(Type::Workload(w)) => {
                workload(w, trust_domain).map(|w| Converted::Workload(Box::new(w)))
            }
            Some(Type::Service(s)) => service(s).map(Converted::Service),
            None => Err(ConvertError::Empty),
        },
        AUTHORIZATION_TYPE => {
            let (p, dropped) =
                policy(Authorization::decode(any.value.as_slice()).map_err(decode)?)?;
            Ok(Converted::Policy(p, dropped))
        }
        other => Err(ConvertError::WrongType(other.to_owned())),
    }
}

/// Wraps a workload as an xDS `Address` resource (tests, benches, fake control planes).
pub fn workload_resource(
    name: &str,
    version: &str,
    w: pb::Workload,
) -> crate::proto::envoy::service::discovery::v3::Resource {
    let address = pb::Address {
        r#type: Some(Type::Workload(w)),
    };
    resource(name, version, ADDRESS_TYPE, address.encode_to_vec())
}

/// Wraps a service as an xDS `Address` resource.
pub fn service_resource(
    name: &str,
    version: &str,
    s: pb::Service,
) -> crate::proto::envoy::service::discovery::v3::Resource {
    let address = pb::Address {
        r#type: Some(Type::Service(s)),
    };
    resource(name, version, ADDRESS_TYPE, address.encode_to_vec())
}

fn resource(
    name: &str,
    version: &str,
    type_url: &str,
    value: Vec<u8>,
) -> crate::proto::envoy::service::discovery::v3::Resource {
    crate::proto::envoy::service::discovery::v3::Resource {
        name: name.to_owned(),
        version: version.to_owned(),
        resource: Some(prost_types::Any {
            type_url: type_url.to_owned(),
            value,
        }),
        ..Default::default()
    }
}

/// Wraps a policy as an xDS resource.
pub fn authorization_resource(
    name: &str,
    version: &str,
    p: Authorization,
) -> crate::proto::envoy::service::discovery::v3::Resource {
    resource(name, version, AUTHORIZATION_TYPE, p.encode_to_vec())
}

#[cfg(test)]
mod tests;

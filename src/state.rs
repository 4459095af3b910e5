//! The proxy's view of the mesh: workloads by uid and by IP, services by `ns/hostname` and by
//! VIP, authorization policies by scope, and the outbound routing decision. Pure: no I/O, no
//! clock; whoever feeds it (the local config file, xDS) converts into these types first.
//! [`SharedState`] is the handle the proxy shares it through.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::authz::{Policy, Scope};
use crate::identity::Identity;

pub(crate) mod balance;
pub(crate) mod from_config;
mod shared;
pub use shared::SharedState;

/// How a workload takes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Plain TCP: not enrolled, reached by passthrough.
    #[serde(alias = "NONE")]
    Tcp,
    /// Enrolled: reached through an HBONE tunnel to its node's proxy.
    Hbone,
}

/// One workload (a pod, or anything else with IPs and an identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    /// The network its addresses belong to (empty: the default network).
    pub network: String,
    pub addresses: Vec<IpAddr>,
    pub node: String,
    pub protocol: Protocol,
    /// `ns/hostname` → service port → target port.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// Unhealthy workloads are never picked as a service endpoint.
    pub healthy: bool,
    /// WORKLOAD_SELECTOR policies (`namespace/name`) that select this workload.
    pub authorization_policies: Vec<String>,
    /// It shares its node's address (hostNetwork): never looked up by address, where the
    /// answer could be any pod of the node (ztunnel's NetworkMode::HOST_NETWORK).
    pub host_network: bool,
    /// For metrics: the workload's own name (its Deployment or Job; `*_workload` labels), its
    /// canonical service and revision (`*_canonical_*`, `*_app`, `*_version`), its cluster.
    pub workload_name: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub cluster_id: String,
    /// Where it runs, for locality-aware load balancing.
    pub locality: balance::Locality,
    /// Its DNS name, for a workload known by name rather than address (resolved per
    /// connection with the system resolver).
    pub hostname: String,
    /// Its share of a service's load against the other endpoints (xDS default: 1).
    pub capacity: u32,
    /// What discovery asks of traffic to it that this proxy cannot do: such traffic is
    /// refused, never sent another way.
    pub unsupported: Option<Unsupported>,
    /// The port its app takes a PROXY protocol header on first (xDS `application_tunnel`):
    /// this proxy delivers plain TCP, so tunnels into it are refused.
    pub proxy_protocol: Option<u16>,
    /// The waypoint its traffic goes through when addressed to the workload itself (xDS
    /// `waypoint`; a service's own waypoint governs traffic to the service).
    pub waypoint: Option<Gateway>,
    /// The east-west gateway clients of other networks reach it through (xDS
    /// `network_gateway`).
    pub network_gateway: Option<Gateway>,
}

/// A waypoint or network gateway as discovery names it (xDS `GatewayAddress`): an address or
/// a service's hostname, and the port its HBONE listener takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gateway {
    pub destination: GatewayDestination,
    /// The HBONE port (`hbone_mtls_port`; 15008).
    pub port: u16,
}

/// Where a [`Gateway`] is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    /// A service VIP or a workload address, in `network`.
    Address { network: String, ip: IpAddr },
    /// A service by its hostname in `namespace`.
    Hostname { namespace: String, hostname: String },
}

impl std::fmt::Display for GatewayDestination {
    /// As ztunnel's config dump writes it: `network/ip` or `namespace/hostname`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayDestination::Address { network, ip } => write!(f, "{network}/{ip}"),
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => write!(f, "{namespace}/{hostname}"),
        }
    }
}

/// Something discovery asks of a workload's or service's traffic that this proxy does not do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// It takes a sidecar's Istio mTLS (`LEGACY_ISTIO_MTLS`), not HBONE.
    LegacyIstioMtls,
}

impl Unsupported {
    /// Why its traffic is refused, for the log.
    pub fn reason(self) -> &'static str {
        match self {
            Unsupported::LegacyIstioMtls => {
                "it takes Istio mTLS (a sidecar), which hboned does not speak"
            }
        }
    }
}

/// The service a connection was addressed to (through its VIP), as metrics name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

/// A service: VIPs in front of the workloads that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// Service port → target port (a workload's own mapping wins; 0: a named target port, which
    /// only the workloads' mappings resolve).
    pub ports: BTreeMap<u16, u16>,
    /// Extra identities its endpoints may present.
    pub subject_alt_names: Vec<Identity>,
    /// How an endpoint is chosen.
    pub load_balancing: balance::LoadBalancing,
    /// VIPs that stand for a range (a CIDR ServiceEntry): every address in it is the service.
    pub vip_ranges: Vec<(IpAddr, u8)>,
    /// Reached through its addresses only by clients of its own namespace (xDS `visibility`).
    pub namespace_only: bool,
    /// What discovery asks of its traffic that this proxy cannot do.
    pub unsupported: Option<Unsupported>,
    /// The waypoint every connection to the service goes through (xDS `waypoint`).
    pub waypoint: Option<Gateway>,
    /// Several waypoints, each taking connections in proportion to its weight (a waypoint
    /// canary); when non-empty (and some weight is not 0) it is used in place of `waypoint`.
    pub weighted_waypoints: Vec<(Gateway, u32)>,
    /// Ingress gateways should send the service's traffic through its waypoint (xDS
    /// `ingress_use_waypoint`). Read by ingress gateways, not by ztunnel or hboned: kept for
    /// the config dump.
    pub ingress_use_waypoint: bool,
}

impl Service {
    /// A service of `namespace` named `hostname` at `vips` with `ports` (service port →
    /// target port), everything else as discovery leaves it by default: no SANs, standard
    /// load balancing, public, no waypoint.
    pub(crate) fn new(
        name: &str,
        namespace: &str,
        hostname: &str,
        vips: Vec<IpAddr>,
        ports: BTreeMap<u16, u16>,
    ) -> Service {
        Service {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            hostname: hostname.to_owned(),
            vips,
            ports,
            subject_alt_names: Vec::new(),
            load_balancing: balance::LoadBalancing::default(),
            vip_ranges: Vec::new(),
            namespace_only: false,
            unsupported: None,
            waypoint: None,
            weighted_waypoints: Vec::new(),
            ingress_use_waypoint: false,
        }
    }

    /// The key workloads use to name this service.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The waypoint a connection goes through: one of the weighted ones in proportion to
    /// their weights (`pick` the caller's random number), else the single one (ztunnel's
    /// sample_weighted_waypoint: weights all 0 fall back to `waypoint`).
    pub(crate) fn pick_waypoint(&self, pick: u64) -> Option<&Gateway> {
        let total: u64 = self
            .weighted_waypoints
            .iter()
            .map(|(_, w)| u64::from(*w))
            .sum();
        if total == 0 {
            return self.waypoint.as_ref();
        }
        let mut at = pick % total;
        for (gateway, weight) in &self.weighted_waypoints {
            let weight = u64::from(*weight);
            if at < weight {
                return Some(gateway);
            }
            at -= weight;
        }
        self.waypoint.as_ref()
    }
}

/// Where an outbound connection goes, decided from the state alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Through HBONE to the server at `peer`: the destination's proxy (`<podIP>:15008`), or
    /// the waypoint in front of it.
    Hbone {
        /// The workload at `peer` (the waypoint, when through one).
        workload: Arc<Workload>,
        /// The CONNECT authority: `<podIP>:<targetPort>`, or through a waypoint the address
        /// the client asked for (a service VIP and port, or the pod's).
        target: SocketAddr,
        /// The HBONE server dialed.
        peer: SocketAddr,
        /// Identities the peer may present.
        expected: Vec<Identity>,
        /// The service, when reached through its VIP.
        service: Option<ServiceRef>,
    },
    /// To a service endpoint on another network, through that network's east-west gateway:
    /// an outer HBONE tunnel to the gateway, an inner one (TLS and HTTP/2 of its own) to the
    /// destination inside it, both with the CONNECT authority `hostname:port` (ztunnel's
    /// double HBONE, `build_request_through_gateway`).
    DoubleHbone {
        /// The gateway, dialed at `peer`, expected to present one of `gateway_expected`.
        gateway: Arc<Workload>,
        peer: SocketAddr,
        gateway_expected: Vec<Identity>,
        /// The service's hostname and the port the client asked for.
        authority: (String, u16),
        /// Who may answer inside: the identities of the service's endpoints on that network
        /// (the gateway picks one) and the service's SANs.
        expected: Vec<Identity>,
        service: ServiceRef,
    },
    /// Plain TCP to `target` (not enrolled, or unknown).
    Passthrough { target: SocketAddr },
    /// Plain TCP to `host:port`, resolved with the system resolver when the connection is made
    /// (a hostname workload, e.g. a DNS ServiceEntry endpoint).
    PassthroughHost { host: String, port: u16 },
    /// Refused, with a reason for the log.
    Refuse(&'static str),
}

/// Workloads and services, indexed for the data path's lookups.
#[derive(Debug, Default, Clone)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    /// IP → workload in the proxy's own network: one hash probe on the data path.
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// (network, IP) → workload for the other networks (the same IP may exist on two).
    by_remote_ip: HashMap<(String, IpAddr), Arc<Workload>>,
    /// The workloads that name each service (`ns/hostname`): a VIP connection's candidates
    /// without a scan of every workload.
    by_service: HashMap<String, Vec<Arc<Workload>>>,
    /// How many HBONE workloads of other networks have each IP: a connection to one of these,
    /// unknown in our own network, must not go out in plaintext.
    remote_hbone_ips: HashMap<IpAddr, usize>,
    /// The proxy's own network: where [`State::workload_by_ip`] looks.
    network: String,
    services: HashMap<String, Arc<Service>>,
    by_vip: HashMap<IpAddr, String>,
    /// Hostname (lower case) → the keys of the services of that name, one per namespace that
    /// has one: what the DNS proxy answers from.
    by_hostname: HashMap<String, Vec<String>>,
    /// (network address, prefix length, service key) of the services' VIP ranges.
    vip_ranges: Vec<(IpAddr, u8, String)>,
    /// Authorization policies by `namespace/name` (evaluated by `authz`).
    policies: HashMap<String, Arc<Policy>>,
    /// GLOBAL policies, and NAMESPACE policies by namespace: the candidates of one decision
    /// without a scan of every policy.
    global_policies: Vec<Arc<Policy>>,
    namespace_policies: HashMap<String, Vec<Arc<Policy>>>,
    /// Bumped whenever what a policy decision could depend on changes (a policy, or the
    /// policies a workload selects), so live connections know when to re-check.
    policy_generation: u64,
}

impl State {
    /// Adds or replaces a workload (by uid), re-indexing its IPs.
    pub fn upsert_workload(&mut self, w: Workload) {
        let old = self.unindex_workload(&w.uid.clone());
        let old_selected = old
            .as_ref()
            .map_or(&[][..], |o| &o.authorization_policies[..]);
        if old_selected != &w.authorization_policies[..] {
            self.policy_generation += 1;
        }
        let w = Arc::new(w);
        let indexed = if w.host_network {
            &[][..]
        } else {
            &w.addresses[..]
        };
        for ip in indexed {
            if w.network == self.network {
                self.by_ip.insert(*ip, w.clone());
            } else {
                let key = (w.network.clone(), *ip);
                if let Some(replaced) = self.by_remote_ip.insert(key, w.clone()) {
                    self.forget_remote_hbone(&replaced, *ip);
                }
                if w.protocol == Protocol::Hbone {
                    *self.remote_hbone_ips.entry(*ip).or_default() += 1;
                }
            }
        }
        for key in w.services.keys() {
            self.by_service
                .entry(key.clone())
                .or_default()
                .push(w.clone());
        }
        self.workloads.insert(w.uid.clone(), w);
    }

    fn forget_remote_hbone(&mut self, w: &Workload, ip: IpAddr) {
        if w.protocol != Protocol::Hbone {
            return;
        }
        if let Some(n) = self.remote_hbone_ips.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.remote_hbone_ips.remove(&ip);
            }
        }
    }

    pub(crate) fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        self.unindex_workload(uid).inspect(|old| {
            if !old.authorization_policies.is_empty() {
                self.policy_generation += 1;
            }
        })
    }

    fn unindex_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        for key in old.services.keys() {
            if let Some(members) = self.by_service.get_mut(key) {
                members.retain(|w| !Arc::ptr_eq(w, &old));
                if members.is_empty() {
                    self.by_service.remove(key);
                }
            }
        }
        for ip in &old.addresses {
            if old.network == self.network {
                if self.by_ip.get(ip).is_some_and(|w| Arc::ptr_eq(w, &old)) {
                    self.by_ip.remove(ip);
                }
            } else {
                let key = (old.network.clone(), *ip);
                if self
                    .by_remote_ip
                    .get(&key)
                    .is_some_and(|w| Arc::ptr_eq(w, &old))
                {
                    self.by_remote_ip.remove(&key);
                    self.forget_remote_hbone(&old, *ip);
                }
            }
        }
        Some(old)
    }

    /// Adds or replaces a service (by `ns/hostname`), re-indexing its VIPs.
    pub(crate) fn upsert_service(&mut self, s: Service) {
        let key = s.key();
        self.remove_service(&key);
        for vip in &s.vips {
            self.by_vip.insert(*vip, key.clone());
        }
        for (net, len) in &s.vip_ranges {
            self.vip_ranges.push((*net, *len, key.clone()));
        }
        self.by_hostname
            .entry(s.hostname.to_ascii_lowercase())
            .or_default()
            .push(key.clone());
        self.services.insert(key, Arc::new(s));
    }

    pub(crate) fn remove_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        for vip in &old.vips {
            if self.by_vip.get(vip).is_some_and(|k| k == key) {
                self.by_vip.remove(vip);
            }
        }
        self.vip_ranges.retain(|(_, _, k)| k != key);
        let host = old.hostname.to_ascii_lowercase();
        if let Some(keys) = self.by_hostname.get_mut(&host) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_hostname.remove(&host);
            }
        }
        Some(old)
    }

    /// The services named `hostname` (any case), one per namespace that has one.
    pub(crate) fn services_by_hostname(
        &self,
        hostname: &str,
    ) -> impl Iterator<Item = &Arc<Service>> {
        self.by_hostname
            .get(&hostname.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter_map(|k| self.services.get(k))
    }

    /// The workloads behind a service (those that name it), in no particular order.
    pub(crate) fn service_workloads(&self, svc: &Service) -> &[Arc<Workload>] {
        self.by_service.get(&svc.key()).map_or(&[], Vec::as_slice)
    }

    /// Adds or replaces a policy (by `namespace/name`).
    pub fn upsert_policy(&mut self, p: Policy) {
        let key = p.key();
        self.remove_policy(&key);
        let p = Arc::new(p);
        match p.scope {
            Scope::Global => self.global_policies.push(p.clone()),
            Scope::Namespace => self
                .namespace_policies
                .entry(p.namespace.clone())
                .or_default()
                .push(p.clone()),
            // Found through the workloads that list them.
            Scope::WorkloadSelector => {}
        }
        self.policies.insert(key, p);
        self.policy_generation += 1;
    }

    pub fn remove_policy(&mut self, key: &str) -> Option<Arc<Policy>> {
        let old = self.policies.remove(key)?;
        self.global_policies.retain(|p| !Arc::ptr_eq(p, &old));
        if let Some(list) = self.namespace_policies.get_mut(&old.namespace) {
            list.retain(|p| !Arc::ptr_eq(p, &old));
            if list.is_empty() {
                self.namespace_policies.remove(&old.namespace);
            }
        }
        self.policy_generation += 1;
        Some(old)
    }

    pub fn policy(&self, key: &str) -> Option<&Arc<Policy>> {
        self.policies.get(key)
    }

    /// Every policy held.
    pub(crate) fn all_policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values().map(|p| p.as_ref())
    }

    /// The policies that apply to a workload in `namespace` that selects `selected` (its
    /// `authorization_policies`): exactly those `authz::applies` accepts, from the indexes.
    pub fn policies_for<'a>(
        &'a self,
        namespace: &'a str,
        selected: &'a [String],
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        let scoped = self.namespace_policies.get(namespace).into_iter().flatten();
        let chosen = selected
            .iter()
            .filter_map(|key| self.policies.get(key))
            .filter(|p| p.scope == Scope::WorkloadSelector);
        self.global_policies
            .iter()
            .chain(scoped)
            .chain(chosen)
            .map(|p| p.as_ref())
    }

    /// Changes whenever a policy decision could change (see [`SharedState::policy_changes`]).
    pub(crate) fn policy_generation(&self) -> u64 {
        self.policy_generation
    }

    /// Whether `ip` is a known workload address or service VIP.
    pub fn knows(&self, ip: IpAddr) -> bool {
        self.workload_by_ip(ip).is_some() || self.by_vip.contains_key(&ip)
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// A state whose lookups are in `network` (the proxy's own).
    pub(crate) fn with_network(network: &str) -> Self {
        State {
            network: network.to_owned(),
            ..State::default()
        }
    }

    /// The proxy's own network (empty: the default one).
    pub(crate) fn network(&self) -> &str {
        &self.network
    }

    /// The workload at `ip` in the proxy's own network.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The workload at `ip` in `network`.
    pub fn workload_by_network_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        if network == self.network {
            self.by_ip.get(&ip)
        } else {
            self.by_remote_ip.get(&(network.to_owned(), ip))
        }
    }

    pub(crate) fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        match self.by_vip.get(&ip) {
            Some(k) => self.services.get(k),
            // The longest range that holds `ip` (few services have ranges: a scan of them).
            None if !self.vip_ranges.is_empty() => self
                .vip_ranges
                .iter()
                .filter(|(net, len, _)| in_range(ip, *net, *len))
                .max_by_key(|(_, len, _)| *len)
                .and_then(|(_, _, k)| self.services.get(k)),
            None => None,
        }
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub(crate) fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// Endpoints of a service, in uid order, with their target port for `port`.
    fn endpoints(&self, svc: &Service, port: u16) -> Vec<(Arc<Workload>, u16)> {
        let key = svc.key();
        let mut eps: Vec<_> = self
            .by_service
            .get(&key)
            .into_iter()
            .flatten()
            .filter_map(|w| {
                let ports = w.services.get(&key)?;
                // The workload's own mapping, else the service's; a named target port (0) that
                // the workload does not resolve leaves it out, as in ztunnel.
                let target = ports
                    .get(&port)
                    .copied()
                    .or_else(|| svc.ports.get(&port).copied().filter(|t| *t != 0))?;
                Some((w.clone(), target))
            })
            .collect();
        eps.sort_by(|a, b| a.0.uid.cmp(&b.0.uid));
        eps
    }

    /// Decides where a connection from a pod with `source_ips` to `dst` goes. `pick` is the
    /// caller's random number, for the choice among a service's endpoints.
    pub fn route(&self, source_ips: &[IpAddr], dst: SocketAddr, pick: u64) -> Upstream {
        let ip = dst.ip();
        if crate::ports::POD_LISTENERS.contains(&dst.port())
            && (ip.is_loopback() || source_ips.contains(&ip))
        {
            return Upstream::Refuse("destination is the proxy itself");
        }
        let source = source_ips.iter().find_map(|ip| self.workload_by_ip(*ip));
        // A service visible only to its own namespace is, to any other client, no service.
        let visible = |svc: &&Arc<Service>| {
            !svc.namespace_only || source.is_some_and(|w| w.namespace == svc.namespace)
        };
        if let Some(svc) = self.service_by_vip(ip).filter(visible) {
            if let Some(unsupported) = svc.unsupported {
                return Upstream::Refuse(unsupported.reason());
            }
            // A service with a waypoint: every connection to it goes there, authority
            // unchanged (ztunnel's build_request, fetch_service_waypoint).
            if let Some(waypoint) = svc.pick_waypoint(pick) {
                let service = ServiceRef {
                    hostname: svc.hostname.clone(),
                    name: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                };
                return self.via_waypoint(waypoint, source.map(|w| &**w), dst, Some(service), pick);
            }
            if svc.load_balancing.mode == balance::Mode::Passthrough {
                return Upstream::Passthrough { target: dst };
            }
            let eps = self.endpoints(svc, dst.port());
            let lb = &svc.load_balancing;
            let Some((w, port)) = balance::choose(&eps, lb, source.map(|w| &**w), pick) else {
                return if svc.ports.contains_key(&dst.port()) || !eps.is_empty() {
                    Upstream::Refuse("service has no endpoints")
                } else {
                    Upstream::Refuse("service has no such port")
                };
            };
            let (w, port) = (&w, &port);
            if w.network != self.network {
                return self.through_network_gateway(w, svc, dst, source.map(|w| &**w), pick);
            }
            let Some(addr) = w.addresses.iter().find(|a| a.is_ipv4() == ip.is_ipv4()) else {
                // Known by name: resolved at connect time. Only in plaintext: a tunnel's peer
                // and identity cannot be checked against a name resolved later (fail closed).
                if !w.hostname.is_empty() && w.addresses.is_empty() {
                    return match w.protocol {
                        Protocol::Tcp => Upstream::PassthroughHost {
                            host: w.hostname.clone(),
                            port: *port,
                        },
                        Protocol::Hbone => Upstream::Refuse("HBONE to a hostname workload"),
                    };
                }
                return Upstream::Refuse("endpoint has no address of the VIP's family");
            };
            let target = SocketAddr::new(*addr, *port);
            return self.to_workload(
                w.clone(),
                target,
                svc.subject_alt_names.clone(),
                Some(ServiceRef {
                    hostname: svc.hostname.clone(),
                    name: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                }),
            );
        }
        match self.workload_by_ip(ip) {
            // Addressed to a workload with a waypoint: through it, unless the client is that
            // waypoint (ztunnel's fetch_workload_waypoint, check_from_waypoint).
            Some(w) => match &w.waypoint {
                Some(waypoint) if !self.is_gateway(waypoint, source.map(|w| &**w)) => {
                    self.via_waypoint(waypoint, source.map(|w| &**w), dst, None, pick)
                }
                _ => self.to_workload(w.clone(), dst, Vec::new(), None),
            },
            // An enrolled workload of another network, reachable only through an east-west
            // gateway this proxy does not use: refused, never sent in plaintext.
            None if self.remote_hbone_ips.contains_key(&ip) => {
                Upstream::Refuse("an HBONE workload on another network")
            }
            None => Upstream::Passthrough { target: dst },
        }
    }

    /// Through `waypoint` to `dst`: the waypoint's HBONE port on one of its workloads (of
    /// `dst`'s family where it has one), expecting its identity and its service's SANs. A
    /// waypoint that cannot be found, has no endpoint, or is on another network refuses the
    /// connection: it is never sent around the waypoint.
    fn via_waypoint(
        &self,
        waypoint: &Gateway,
        source: Option<&Workload>,
        dst: SocketAddr,
        service: Option<ServiceRef>,
        pick: u64,
    ) -> Upstream {
        match self.resolve_gateway(waypoint, source, dst.is_ipv4(), pick, false) {
            Ok((workload, peer, mut expected)) => {
                expected.insert(0, workload.identity.clone());
                Upstream::Hbone {
                    workload,
                    target: dst,
                    peer,
                    expected,
                    service,
                }
            }
            Err(reason) => Upstream::Refuse(reason),
        }
    }

    /// The workload a gateway's traffic goes to, the address dialed (its HBONE port), and the
    /// extra identities it may present (its service's SANs), as ztunnel's fetch_waypoint
    /// finds them: an address is a service VIP (one of its endpoints, by its load balancing)
    /// or a workload's own address; a hostname is a service of that namespace.
    /// With `remote`, a network gateway: its address may be a workload of another network
    /// (the gateway's own), reached at that address.
    fn resolve_gateway(
        &self,
        gateway: &Gateway,
        source: Option<&Workload>,
        v4: bool,
        pick: u64,
        remote: bool,
    ) -> Result<(Arc<Workload>, SocketAddr, Vec<Identity>), &'static str> {
        const UNKNOWN: &str = "its waypoint is not known to discovery";
        let service = match &gateway.destination {
            GatewayDestination::Address { network, ip } if *network != self.network => {
                if !remote {
                    return Err("its waypoint is on another network");
                }
                let w = self
                    .workload_by_network_ip(network, *ip)
                    .ok_or("its network gateway is not known to discovery")?;
                return Ok((w.clone(), SocketAddr::new(*ip, gateway.port), Vec::new()));
            }
            GatewayDestination::Address { ip, .. } => match self.service_by_vip(*ip) {
                Some(svc) => svc,
                None => {
                    let w = self.workload_by_ip(*ip).ok_or(UNKNOWN)?;
                    return Ok((w.clone(), SocketAddr::new(*ip, gateway.port), Vec::new()));
                }
            },
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => self
                .services_by_hostname(hostname)
                .find(|s| s.namespace == *namespace)
                .ok_or(UNKNOWN)?,
        };
        let endpoints = self.endpoints(service, gateway.port);
        let (w, port) = balance::choose(&endpoints, &service.load_balancing, source, pick)
            .ok_or("its waypoint has no endpoints")?;
        let ip = w
            .addresses
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .or_else(|| w.addresses.first())
            .ok_or("its waypoint has no address")?;
        if w.network != self.network && !remote {
            return Err("its waypoint is on another network");
        }
        Ok((
            w.clone(),
            SocketAddr::new(*ip, port),
            service.subject_alt_names.clone(),
        ))
    }

    /// A service endpoint `w` on another network: through its network's gateway, double HBONE.
    /// No gateway, or one discovery does not know: refused (never sent in plaintext, never
    /// dialed directly across networks).
    fn through_network_gateway(
        &self,
        w: &Workload,
        svc: &Service,
        dst: SocketAddr,
        source: Option<&Workload>,
        pick: u64,
    ) -> Upstream {
        let Some(gateway) = &w.network_gateway else {
            return Upstream::Refuse("an endpoint on another network without a network gateway");
        };
        let (gateway, peer, mut gateway_expected) =
            match self.resolve_gateway(gateway, source, dst.is_ipv4(), pick, true) {
                Ok(found) => found,
                Err(reason) => return Upstream::Refuse(reason),
            };
        gateway_expected.insert(0, gateway.identity.clone());
        // The gateway forwards by hostname to any endpoint of the service there.
        let mut expected: Vec<Identity> = self
            .service_workloads(svc)
            .iter()
            .filter(|e| e.network == w.network)
            .map(|e| e.identity.clone())
            .chain(svc.subject_alt_names.iter().cloned())
            .collect();
        expected.sort_by_key(ToString::to_string);
        expected.dedup();
        Upstream::DoubleHbone {
            gateway,
            peer,
            gateway_expected,
            authority: (svc.hostname.clone(), dst.port()),
            expected,
            service: ServiceRef {
                hostname: svc.hostname.clone(),
                name: svc.name.clone(),
                namespace: svc.namespace.clone(),
            },
        }
    }

    /// Whether `source` is one of the workloads behind `gateway` (traffic from a waypoint to
    /// the workloads it serves does not go back through it).
    fn is_gateway(&self, gateway: &Gateway, source: Option<&Workload>) -> bool {
        let Some(source) = source else {
            return false;
        };
        let service = match &gateway.destination {
            GatewayDestination::Address { ip, .. } => match self.service_by_vip(*ip) {
                Some(svc) => svc,
                None => return source.addresses.contains(ip),
            },
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => match self
                .services_by_hostname(hostname)
                .find(|s| s.namespace == *namespace)
            {
                Some(svc) => svc,
                None => return false,
            },
        };
        self.service_workloads(service)
            .iter()
            .any(|w| w.uid == source.uid && w.identity == source.identity)
    }

    fn to_workload(
        &self,
        workload: Arc<Workload>,
        target: SocketAddr,
        mut expected: Vec<Identity>,
        service: Option<ServiceRef>,
    ) -> Upstream {
        if let Some(unsupported) = workload.unsupported {
            return Upstream::Refuse(unsupported.reason());
        }
        match workload.protocol {
            Protocol::Tcp => Upstream::Passthrough { target },
            Protocol::Hbone => {
                expected.insert(0, workload.identity.clone());
                Upstream::Hbone {
                    workload,
                    target,
                    peer: SocketAddr::new(target.ip(), crate::ports::HBONE),
                    expected,
                    service,
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// Whether `ip` lies in `net/len` (same family only).
fn in_range(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

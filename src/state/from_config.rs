//! The config file's workload, service and policy tables as state entries. Entries were
//! validated when the file was parsed (`config::validate`); converting one here cannot fail
//! for a parsed config, and one that does anyway is skipped, never fatal.

use super::{Gateway, GatewayDestination, Service, State, Workload};
use crate::config::{Config, GatewayConfig, ServiceConfig, WorkloadConfig};
use crate::identity::{Identity, IdentityError};

impl State {
    /// The config's workload, service and policy tables, on the config's network.
    pub fn from_config(config: &Config) -> State {
        let mut state = State::with_network(&config.xds.network);
        for w in config
            .workloads
            .iter()
            .filter_map(|w| workload(config, w).ok())
        {
            state.upsert_workload(w);
        }
        for s in config
            .services
            .iter()
            .filter_map(|s| service(config, s).ok())
        {
            state.upsert_service(s);
        }
        for p in config.policies.iter().filter_map(|p| p.to_policy().ok()) {
            state.upsert_policy(p);
        }
        state
    }
}

/// A workload entry, its trust domain defaulting to the mesh's.
pub(crate) fn workload(config: &Config, w: &WorkloadConfig) -> Result<Workload, IdentityError> {
    let trust_domain = if w.trust_domain.is_empty() {
        &config.trust_domain
    } else {
        &w.trust_domain
    };
    let network = if w.network.is_empty() {
        config.xds.network.clone()
    } else {
        w.network.clone()
    };
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        identity: Identity::new(trust_domain, &w.namespace, &w.service_account)?,
        network: network.clone(),
        addresses: w.workload_ips.clone(),
        node: w.node.clone(),
        protocol: w.protocol,
        services: w.services.clone(),
        healthy: true,
        authorization_policies: Vec::new(),
        host_network: false,
        // A config-file workload has no controller name: its own name stands in.
        workload_name: w.name.clone(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        cluster_id: config.cluster_id.clone(),
        locality: Default::default(),
        hostname: String::new(),
        capacity: 1,
        unsupported: None,
        proxy_protocol: None,
        waypoint: w
            .waypoint
            .as_ref()
            .and_then(|g| gateway(&config.xds.network, g, &w.namespace)),
        network_gateway: w
            .network_gateway
            .as_ref()
            .and_then(|g| gateway(&network, g, &w.namespace)),
    })
}

/// A waypoint or network gateway entry (validated: exactly one of address and hostname), an
/// address taken on `network`.
fn gateway(network: &str, g: &GatewayConfig, namespace: &str) -> Option<Gateway> {
    let destination = match (&g.address, &g.hostname) {
        (Some(ip), None) => GatewayDestination::Address {
            network: network.to_owned(),
            ip: *ip,
        },
        (None, Some(hostname)) => GatewayDestination::Hostname {
            namespace: g.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
            hostname: hostname.clone(),
        },
        _ => return None,
    };
    Some(Gateway {
        destination,
        port: g.hbone_port,
    })
}

/// A service entry.
pub(crate) fn service(config: &Config, s: &ServiceConfig) -> Result<Service, IdentityError> {
    Ok(Service {
        subject_alt_names: s
            .subject_alt_names
            .iter()
            .map(|n| Identity::parse(n))
            .collect::<Result<_, _>>()?,
        waypoint: s
            .waypoint
            .as_ref()
            .and_then(|g| gateway(&config.xds.network, g, &s.namespace)),
        ..Service::new(
            &s.name,
            &s.namespace,
            &s.hostname,
            s.vips.clone(),
            s.ports.clone(),
        )
    })
}

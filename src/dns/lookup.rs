//! Which names the DNS proxy answers itself, and with what: a pure function of the state, the
//! asking pod's namespace and the query, as ztunnel's `Store::lookup` decides it
//! (src/dns/server.rs): a name, its Kubernetes expansions for the client's namespace and the
//! same with a search domain stripped, each tried as itself and then as wildcards, is looked up
//! among the services' hostnames; a service in the client's namespace wins. A name no service
//! has, or a query other than A/AAAA, is the upstream's.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use hickory_proto::rr::{Name, RecordType};

use crate::state::{Service, State};

/// The cluster's DNS domain and the names derived from it.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    /// `cluster.local.`
    domain: Name,
    /// `svc.cluster.local.`
    svc_domain: Name,
}

/// Why a cluster domain cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("dns.clusterDomain {0:?} is not a DNS name")]
pub(crate) struct BadDomain(String);

impl Zone {
    pub(crate) fn new(cluster_domain: &str) -> Result<Zone, BadDomain> {
        let bad = || BadDomain(cluster_domain.to_owned());
        let domain = fqdn(Name::from_str(cluster_domain).map_err(|_| bad())?);
        if domain.is_root() {
            return Err(bad());
        }
        let svc_domain = label("svc")
            .and_then(|svc| svc.append_domain(&domain).ok())
            .ok_or_else(bad)?;
        Ok(Zone { domain, svc_domain })
    }

    /// The search domains of a pod in `namespace`, as kubelet writes them into its
    /// resolv.conf (ztunnel assumes the same: `SystemForwarder::search_domains`).
    fn search_domains(&self, namespace: &str) -> Vec<Name> {
        let mut out = Vec::with_capacity(3);
        if let Some(ns) = self.namespaced(namespace) {
            out.push(ns);
        }
        out.push(self.svc_domain.clone());
        out.push(self.domain.clone());
        out
    }

    /// `<namespace>.svc.<domain>.`
    fn namespaced(&self, namespace: &str) -> Option<Name> {
        label(namespace)?.append_domain(&self.svc_domain).ok()
    }

    /// The Kubernetes names `name` may stand for, given what it looks like (ztunnel's
    /// `to_kube_fqdns`): `svc` → `svc.<ns>.svc.<domain>`; `svc.ns` → `svc.ns.svc.<domain>` (and
    /// `host.subdomain.<ns>.svc.<domain>`); `svc.ns.svc` → `svc.ns.svc.<domain>`;
    /// `host.subdomain.ns` → `….svc.<domain>`.
    fn kube_names(&self, name: &Name, namespaced: Option<&Name>) -> Vec<Name> {
        let ends_in_svc = |n: &Name| {
            n.iter()
                .next_back()
                .is_some_and(|l| l.eq_ignore_ascii_case(b"svc"))
        };
        let mut out = Vec::new();
        let mut push = |base: &Name| {
            if let Ok(n) = name.clone().append_domain(base) {
                out.push(n);
            }
        };
        match name.num_labels() {
            1 => namespaced.into_iter().for_each(&mut push),
            2 => {
                push(&self.svc_domain);
                namespaced.into_iter().for_each(&mut push);
            }
            3 => {
                if ends_in_svc(name) {
                    push(&self.domain);
                }
                push(&self.svc_domain);
            }
            4 if ends_in_svc(name) => push(&self.domain),
            _ => {}
        }
        out
    }
}

/// `name`, absolute.
fn fqdn(mut name: Name) -> Name {
    name.set_fqdn(true);
    name
}

/// One label as a relative name (`None` if it is not a valid label).
fn label(s: &str) -> Option<Name> {
    Name::from_str(s).ok().filter(|n| n.num_labels() == 1)
}

/// What the proxy does with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Not a name discovery knows (or not an address query): ask the upstream resolvers.
    Forward,
    /// Ours: the addresses of the query's family under `name` (none: the name exists but has
    /// no address of that family, answered NOERROR with no records, never NXDOMAIN). With
    /// `cname`, the name asked for was found with a search domain stripped: the answer starts
    /// with a CNAME from it to `name`.
    Local {
        cname: Option<Name>,
        name: Name,
        addresses: Vec<IpAddr>,
    },
}

/// The answer to a `qtype` query for `name` from a pod in `namespace`. `pick` rotates the
/// addresses (ztunnel shuffles them), so that clients taking the first spread over them.
pub(crate) fn resolve(
    state: &State,
    zone: &Zone,
    namespace: &str,
    name: &Name,
    qtype: RecordType,
    pick: u64,
) -> Answer {
    let want_v4 = match qtype {
        RecordType::A => true,
        RecordType::AAAA => false,
        _ => return Answer::Forward,
    };
    let name = fqdn(name.to_lowercase());
    let Some((service, alias)) = find(state, zone, namespace, &name) else {
        return Answer::Forward;
    };
    let mut addresses: Vec<IpAddr> = if service.vips.is_empty() {
        // Headless: each endpoint's address of the family.
        state
            .service_workloads(&service)
            .iter()
            .filter_map(|w| w.addresses.iter().copied().find(|a| a.is_ipv4() == want_v4))
            .collect()
    } else {
        service
            .vips
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == want_v4)
            .collect()
    };
    addresses.sort_unstable();
    addresses.dedup();
    if !addresses.is_empty() {
        let n = addresses.len();
        addresses.rotate_left((pick % n as u64) as usize);
    }
    match alias.stripped {
        // Found under the name with a search domain stripped: CNAME the asked name to it.
        Some(stripped) if !alias.wildcard => Answer::Local {
            cname: Some(stripped.clone()),
            name: stripped,
            addresses,
        },
        _ => Answer::Local {
            cname: None,
            name,
            addresses,
        },
    }
}

/// How a name tried for the query found its service.
#[derive(Debug)]
struct Alias {
    /// The asked name with a search domain taken off, if this alias came from it.
    stripped: Option<Name>,
    /// The match was a wildcard hostname (`*.example.com`).
    wildcard: bool,
}

/// The service `name` stands for, from `namespace`'s point of view, and the alias that found it.
fn find(state: &State, zone: &Zone, namespace: &str, name: &Name) -> Option<(Arc<Service>, Alias)> {
    let namespaced = zone.namespaced(namespace);
    let mut aliases: Vec<(Name, Option<Name>)> = vec![(name.clone(), None)];
    for n in zone.kube_names(name, namespaced.as_ref()) {
        aliases.push((n, None));
    }
    for domain in zone.search_domains(namespace) {
        let Some(stripped) = trim_domain(name, &domain) else {
            continue;
        };
        aliases.push((stripped.clone(), Some(stripped.clone())));
        for n in zone.kube_names(&stripped, namespaced.as_ref()) {
            aliases.push((n, Some(stripped.clone())));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (alias, stripped) in aliases {
        if !seen.insert(alias.clone()) {
            continue;
        }
        for (candidate, wildcard) in wildcards(&alias) {
            let host = candidate.to_utf8();
            let host = host.strip_suffix('.').unwrap_or(&host);
            if let Some(service) = best(state, zone, namespace, host) {
                return Some((service, Alias { stripped, wildcard }));
            }
        }
    }
    None
}

/// Among the services named `host`, the one a client in `namespace` gets: its own namespace's,
/// else the first by namespace. A service without VIPs is only a DNS name when it is a
/// Kubernetes headless service (in the cluster's `svc` domain); one visible only to its own
/// namespace does not exist for the others.
fn best(state: &State, zone: &Zone, namespace: &str, host: &str) -> Option<Arc<Service>> {
    let svc_suffix = zone.svc_domain.to_utf8();
    let svc_suffix = format!(".{}", svc_suffix.strip_suffix('.').unwrap_or(&svc_suffix));
    state
        .services_by_hostname(host)
        .filter(|s| !s.vips.is_empty() || s.hostname.to_ascii_lowercase().ends_with(&svc_suffix))
        .filter(|s| !s.namespace_only || s.namespace == namespace)
        .min_by_key(|s| (s.namespace != namespace, s.namespace.clone()))
        .cloned()
}

/// `name` with `domain` taken off its end, if it ends with it and has more labels.
fn trim_domain(name: &Name, domain: &Name) -> Option<Name> {
    if name.num_labels() > domain.num_labels() && domain.zone_of(name) {
        let keep = name.num_labels() - domain.num_labels();
        Name::from_labels(name.iter().take(keep as usize))
            .ok()
            .map(fqdn)
    } else {
        None
    }
}

/// `name` itself, then wildcards of decreasing specificity: `a.b.c` → `a.b.c`, `*.b.c`, `*.c`.
fn wildcards(name: &Name) -> Vec<(Name, bool)> {
    let mut out = vec![(name.clone(), false)];
    let mut n = name.clone();
    while n.num_labels() > 1 {
        out.push((n.clone().into_wildcard(), true));
        n = n.base_name();
    }
    out
}

#[cfg(test)]
mod tests;

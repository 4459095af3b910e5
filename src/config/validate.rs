//! Validation of a parsed [`Config`]: every problem at once, each naming its key, so an
//! operator fixes the file in one pass. Checks here are about the file itself; nothing is
//! connected to or opened.

use std::ops::RangeInclusive;

use super::Config;
use crate::identity::Identity;

/// Every semantic problem, not just the first.
pub(super) fn problems(config: &Config) -> Vec<String> {
    let mut p = Vec::new();
    if Identity::new(&config.trust_domain, "x", "x").is_err() {
        p.push(format!(
            "trustDomain {:?} is not a valid trust domain",
            config.trust_domain
        ));
    }
    let xds = &config.xds.address;
    if !xds.is_empty() && !is_http_url(xds) && !is_unix_url(xds) {
        p.push(format!(
            "xds.address {xds:?} must start with http://, https:// or unix://"
        ));
    }
    let certs = &config.certificates;
    if let Err(e) = config.certificate_source() {
        p.push(e.to_string());
    }
    if let Some(kube) = &config.kubernetes {
        p.extend(kubernetes_problems(config, kube));
    }
    if let Some(ca) = &certs.istio_ca
        && !is_http_url(&ca.address)
        && !is_unix_url(&ca.address)
    {
        p.push(format!(
            "certificates.istioCa.address {:?} must start with http://, https:// or unix://",
            ca.address
        ));
    }
    for (key, value, range) in numeric_settings(config) {
        if let Some(v) = value
            && !range.contains(&v)
        {
            p.push(format!(
                "{key} is {v}, outside {}..={}",
                range.start(),
                range.end()
            ));
        }
    }
    if config.dns.enabled && crate::dns::lookup::Zone::new(&config.dns.cluster_domain).is_err() {
        p.push(format!(
            "dns.clusterDomain {:?} is not a DNS name",
            config.dns.cluster_domain
        ));
    }
    let mut uids = std::collections::HashSet::new();
    for (i, cidr) in config.pod_cidrs.iter().enumerate() {
        if let Err(e) = cidr.parse::<crate::authz::IpNet>() {
            p.push(format!("podCidrs[{i}]: {e}"));
        }
    }
    for (i, pod) in config.pods.iter().enumerate() {
        if Identity::new(&config.trust_domain, &pod.namespace, &pod.service_account).is_err() {
            p.push(format!(
                "pods[{i}] ({}): namespace/serviceAccount do not form a SPIFFE ID",
                pod.name
            ));
        }
        if !uids.insert(pod.uid()) {
            p.push(format!("pods[{i}]: duplicate uid {}", pod.uid()));
        }
    }
    for (i, w) in config.workloads.iter().enumerate() {
        let trust_domain = if w.trust_domain.is_empty() {
            &config.trust_domain
        } else {
            &w.trust_domain
        };
        if let Err(e) = Identity::new(trust_domain, &w.namespace, &w.service_account) {
            p.push(format!("workloads[{i}] ({}): {e}", w.uid));
        }
        if w.workload_ips.is_empty() {
            p.push(format!("workloads[{i}] ({}): workloadIps is empty", w.uid));
        }
        if let Some(e) = w.waypoint.as_ref().and_then(waypoint_problem) {
            p.push(format!("workloads[{i}] ({}): waypoint {e}", w.uid));
        }
        if let Some(e) = w.network_gateway.as_ref().and_then(waypoint_problem) {
            p.push(format!("workloads[{i}] ({}): networkGateway {e}", w.uid));
        }
    }
    for (i, s) in config.services.iter().enumerate() {
        if let Some(e) = s
            .subject_alt_names
            .iter()
            .find_map(|n| Identity::parse(n).err())
        {
            p.push(format!("services[{i}] ({}): {e}", s.hostname));
        }
        if let Some(e) = s.waypoint.as_ref().and_then(waypoint_problem) {
            p.push(format!("services[{i}] ({}): waypoint {e}", s.hostname));
        }
    }
    for (i, policy) in config.policies.iter().enumerate() {
        if policy.name.is_empty() {
            p.push(format!("policies[{i}]: name is empty"));
        }
        if let Err(e) = policy.to_policy() {
            p.push(format!("policies[{i}] ({}): {e}", policy.name));
        }
    }
    p
}

/// What is wrong with a waypoint entry, if anything: it names one address or one hostname.
fn waypoint_problem(w: &super::GatewayConfig) -> Option<&'static str> {
    match (&w.address, &w.hostname) {
        (Some(_), Some(_)) => Some("has both an address and a hostname"),
        (None, None) => Some("has neither an address nor a hostname"),
        (None, Some(h)) if h.is_empty() => Some("hostname is empty"),
        _ if w.hbone_port == 0 => Some("hbonePort is 0"),
        _ => None,
    }
}

/// Kubernetes mode is the node agent: it must not share pods with another one (istio-cni or
/// Cilium over ZDS, istiod or Cilium over xDS, the config file's pods), needs the node's name
/// for its pod watch, and keeps the built-in CA's key off nodes unless told otherwise.
fn kubernetes_problems(config: &Config, kube: &super::KubernetesConfig) -> Vec<String> {
    let mut p = Vec::new();
    let conflict = "another node agent or control plane would manage the same pods";
    if config.zds_socket.is_some() {
        p.push(format!(
            "kubernetes and zdsSocket are both set: {conflict} (remove zdsSocket)"
        ));
    }
    if !config.xds.address.is_empty() {
        p.push(format!(
            "kubernetes and xds.address are both set: {conflict} (remove xds.address)"
        ));
    }
    if !config.pods.is_empty() {
        p.push("kubernetes and pods are both set: pods come from the API server in Kubernetes mode (remove pods)".to_owned());
    }
    if config.node.is_empty() {
        p.push(
            "kubernetes needs node (the node's name, HBONED_NODE from spec.nodeName)".to_owned(),
        );
    }
    if kube.namespace_labels.is_empty() {
        p.push("kubernetes.namespaceLabels is empty: no namespace could opt in".to_owned());
    }
    for label in &kube.namespace_labels {
        if let Err(e) = super::LabelMatch::parse(label) {
            p.push(format!("kubernetes.namespaceLabels: {e}"));
        }
    }
    if config.certificates.kind(true) == crate::config::CertSourceKind::Builtin
        && !kube.allow_builtin_ca
    {
        p.push("certificates.source is builtin in Kubernetes mode: every node would hold the CA key and could mint any identity; use spire (the default here), or set kubernetes.allowBuiltinCa for a one-node development cluster".to_owned());
    }
    if let Some(url) = &kube.api_server
        && !is_http_url(url)
    {
        p.push(format!(
            "kubernetes.apiServer {url:?} must start with http:// or https://"
        ));
    }
    p
}

fn is_http_url(address: &str) -> bool {
    address.starts_with("http://") || address.starts_with("https://")
}

/// `unix://PATH`, with a path.
fn is_unix_url(address: &str) -> bool {
    address
        .strip_prefix("unix://")
        .is_some_and(|p| !p.is_empty())
}

/// Every numeric setting with the range it must fall in, checked at load: a value past
/// them (a lifetime of 2^64 seconds) would only fail later, at every use.
fn numeric_settings(config: &Config) -> [(&'static str, Option<u64>, RangeInclusive<u64>); 7] {
    [
        // Istio's CA caps workload certificates at 90 days (MAX_WORKLOAD_CERT_TTL).
        (
            "ca.certLifetimeSecs",
            config.ca.cert_lifetime_secs,
            60..=90 * 24 * 3600,
        ),
        (
            "connectTimeoutSecs",
            Some(config.connect_timeout_secs),
            1..=300,
        ),
        (
            "drainTimeoutSecs",
            Some(config.drain_timeout_secs),
            0..=3600,
        ),
        (
            "certificates.files.pollSecs",
            config.certificates.files.as_ref().map(|f| f.poll_secs),
            1..=3600,
        ),
        (
            "xds.onDemandTimeoutMs",
            config.xds.on_demand_timeout_ms,
            1..=60_000,
        ),
        ("dns.port", Some(u64::from(config.dns.port)), 1..=65_535),
        (
            "dns.maxUpstreamQueries",
            Some(config.dns.max_upstream_queries as u64),
            1..=65_536,
        ),
    ]
}

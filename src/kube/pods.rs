//! What Kubernetes mode reads from API objects, as pure functions: which namespaces opt in
//! ([`LabelMatch`]), the few facts kept about a pod ([`PodFacts`]), the workload a pod
//! becomes, and whether this node's agent should enroll it. No I/O, no clock.
//!
//! A pod is reached over HBONE only once its enrollment is recorded on it: the agent of its
//! node sets [`REDIRECTION_ANNOTATION`] when the pod's listeners and rules are in, and takes it
//! away when they go (Istio's `ambient.istio.io/redirection` does the same for its peers). A pod
//! whose enrollment failed, or on a node without hboned, stays reachable in plaintext.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

pub(crate) use crate::config::LabelMatch;
use crate::identity::Identity;
use crate::state::{Protocol, Workload};

/// The annotation that records a pod's enrollment: `enabled` while its node's proxy serves it.
pub(crate) const REDIRECTION_ANNOTATION: &str = "hboned.io/redirection";
/// Its value while the pod is enrolled.
pub(crate) const REDIRECTION_ENABLED: &str = "enabled";
/// A pod label that keeps a pod of an opted-in namespace out (`none`), as Istio's
/// `istio.io/dataplane-mode=none` does for ambient.
pub(crate) const OPT_OUT_LABEL: &str = "hboned.io/dataplane-mode";
/// The value of [`OPT_OUT_LABEL`] that opts a pod out.
pub(crate) const OPT_OUT: &str = "none";

/// Whether a namespace with `labels` is opted in by any of `matches`.
pub(crate) fn opted_in(matches: &[LabelMatch], labels: Option<&BTreeMap<String, String>>) -> bool {
    labels.is_some_and(|l| matches.iter().any(|m| m.matches(l)))
}

/// What is kept of a pod: enough to enroll it and to describe it as a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// It shares its node's network namespace: never enrolled, never reached by its address.
    pub host_network: bool,
    /// Succeeded or Failed: its sandbox is gone or going.
    pub terminal: bool,
    /// Its Ready condition (an endpoint only when ready).
    pub ready: bool,
    /// Its node's agent recorded it enrolled ([`REDIRECTION_ANNOTATION`]).
    pub redirected: bool,
    /// Labelled out of the mesh ([`OPT_OUT_LABEL`]).
    pub opted_out: bool,
    /// Its controller's name (a Deployment's, from the ReplicaSet's), else its own.
    pub workload_name: String,
    pub canonical_name: String,
    pub canonical_revision: String,
}

impl PodFacts {
    /// The facts of `pod`; `None` for an object without uid, name or namespace (nothing to key
    /// it by). Unparsable IPs are left out.
    pub fn of(pod: &Pod) -> Option<PodFacts> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().filter(|s| !s.is_empty())?;
        let name = meta.name.clone().filter(|s| !s.is_empty())?;
        let namespace = meta.namespace.clone().filter(|s| !s.is_empty())?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()?.parse().ok())
        {
            ips.push(ip);
        }
        let phase = status.and_then(|s| s.phase.as_deref());
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let labels = meta.labels.as_ref();
        // The first of these labels present, even with an empty value (Istio's lookupLabelValue).
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.and_then(|l| l.get(*k)))
                .cloned()
        };
        let workload_name = controller_name(pod).unwrap_or_else(|| name.clone());
        // Istio's canonical service labels, then the recommended and the classic app labels,
        // else the workload's name and "latest" (istio/istio's labels.CanonicalService).
        let canonical_name = label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload_name.clone());
        let canonical_revision = label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_owned());
        Some(PodFacts {
            uid,
            name,
            namespace,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminal: matches!(phase, Some("Succeeded" | "Failed")),
            ready,
            redirected: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION))
                .is_some_and(|v| v == REDIRECTION_ENABLED),
            opted_out: labels
                .and_then(|l| l.get(OPT_OUT_LABEL))
                .is_some_and(|v| v == OPT_OUT),
            workload_name,
            canonical_name,
            canonical_revision,
        })
    }

    /// Whether peers reach it over HBONE: its namespace opted in and its node's proxy serves it.
    pub fn served(&self, namespace_opted_in: bool) -> bool {
        namespace_opted_in && self.redirected && !self.opted_out && !self.host_network
    }

    /// Whether this node's agent enrolls it, given whether its namespace opted in: a running,
    /// not opted-out pod with an address and a network namespace of its own.
    pub fn enrollable(&self, namespace_opted_in: bool) -> bool {
        namespace_opted_in
            && !self.opted_out
            && !self.host_network
            && !self.terminal
            && !self.ips.is_empty()
    }

    /// The workload this pod is, reached by HBONE when its namespace opted in and its
    /// enrollment is recorded; `None` without an address (nothing to route to yet) or when
    /// namespace and service account do not form a SPIFFE ID.
    pub fn workload(
        &self,
        namespace_opted_in: bool,
        trust_domain: &str,
        cluster_id: &str,
    ) -> Option<Workload> {
        if self.ips.is_empty() || self.terminal {
            return None;
        }
        let identity = Identity::new(trust_domain, &self.namespace, &self.service_account).ok()?;
        let hbone = self.served(namespace_opted_in);
        Some(Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            identity,
            network: String::new(),
            addresses: self.ips.clone(),
            node: self.node.clone(),
            protocol: if hbone {
                Protocol::Hbone
            } else {
                Protocol::Tcp
            },
            services: BTreeMap::new(),
            healthy: self.ready,
            authorization_policies: Vec::new(),
            host_network: self.host_network,
            workload_name: self.workload_name.clone(),
            canonical_name: self.canonical_name.clone(),
            canonical_revision: self.canonical_revision.clone(),
            cluster_id: cluster_id.to_owned(),
            locality: Default::default(),
            hostname: String::new(),
            capacity: 1,
            unsupported: None,
            proxy_protocol: None,
            waypoint: None,
            network_gateway: None,
        })
    }
}

/// The controlling owner's name; a ReplicaSet's without its pod-template-hash suffix (the
/// Deployment's name), as istiod derives a pod's workload name (istio/istio pkg/kube
/// GetDeployMetaFromPod).
fn controller_name(pod: &Pod) -> Option<String> {
    let owner = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    if owner.kind == "ReplicaSet"
        && let Some(hash) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
        && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
    {
        return Some(deployment.to_owned());
    }
    Some(owner.name.clone())
}

#[cfg(test)]
mod tests;

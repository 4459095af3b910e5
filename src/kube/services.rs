//! Services in Kubernetes mode (`kubernetes.services`): a Service with a cluster IP becomes a
//! state service (its VIPs, service port → target port), and the EndpointSlices naming it say
//! which pods back it and on which port each of its named ports lands, which becomes each
//! pod's workload `services` map — the same shape istiod sends over xDS. Pure: [`Index`] takes
//! objects and answers which pods' maps changed; the agent applies them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::state::Service;

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServicePort {
    name: String,
    port: u16,
    /// A numeric target port; `None` when named (the slices resolve it).
    target: Option<u16>,
}

/// What is kept of a Service with a cluster IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceFacts {
    name: String,
    namespace: String,
    hostname: String,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
}

impl ServiceFacts {
    /// `None` for an object without name or namespace, an ExternalName service, or a
    /// headless one (no VIP: clients reach its pods by their own addresses).
    pub(crate) fn of(svc: &KubeService, cluster_domain: &str) -> Option<ServiceFacts> {
        let name = svc.metadata.name.clone()?;
        let namespace = svc.metadata.namespace.clone()?;
        let spec = svc.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let vips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .fold(Vec::new(), |mut v, ip| {
                if !v.contains(&ip) {
                    v.push(ip);
                }
                v
            });
        if vips.is_empty() {
            return None;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
                let target = match &p.target_port {
                    None => Some(port),
                    Some(IntOrString::Int(t)) => u16::try_from(*t).ok().filter(|t| *t != 0),
                    Some(IntOrString::String(_)) => None,
                };
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port,
                    target,
                })
            })
            .collect();
        Some(ServiceFacts {
            hostname: format!("{name}.{namespace}.svc.{cluster_domain}"),
            name,
            namespace,
            vips,
            ports,
        })
    }

    /// `namespace/name`, how slices name it.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The state's service (`ns/hostname`): a named target port is 0 there, resolved by each
    /// endpoint's own map.
    pub(crate) fn to_state(&self) -> Service {
        Service::new(
            &self.name,
            &self.namespace,
            &self.hostname,
            self.vips.clone(),
            self.ports
                .iter()
                .map(|p| (p.port, p.target.unwrap_or(0)))
                .collect(),
        )
    }

    /// An endpoint's map for this service: each service port to the port its slice gives for
    /// the same port name (else the numeric target port).
    fn endpoint_ports(&self, slice_ports: &[(String, u16)]) -> BTreeMap<u16, u16> {
        self.ports
            .iter()
            .filter_map(|p| {
                let by_name = slice_ports
                    .iter()
                    .find(|(n, _)| *n == p.name)
                    .map(|(_, t)| *t);
                Some((p.port, by_name.or(p.target)?))
            })
            .collect()
    }
}

/// What is kept of an EndpointSlice: its service, its ports, the pods it lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SliceFacts {
    service: String,
    ports: Vec<(String, u16)>,
    pods: BTreeSet<String>,
}

impl SliceFacts {
    /// `(namespace/slice name, facts)`; `None` without the `kubernetes.io/service-name` label.
    pub(crate) fn of(slice: &EndpointSlice) -> Option<(String, SliceFacts)> {
        let meta = &slice.metadata;
        let namespace = meta.namespace.clone()?;
        let service = meta.labels.as_ref()?.get("kubernetes.io/service-name")?;
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        let pods = slice
            .endpoints
            .iter()
            .filter_map(|e| {
                let r = e.target_ref.as_ref()?;
                (r.kind.as_deref() == Some("Pod")).then(|| r.uid.clone())?
            })
            .collect();
        Some((
            format!("{namespace}/{}", meta.name.clone()?),
            SliceFacts {
                service: format!("{namespace}/{service}"),
                ports,
                pods,
            },
        ))
    }
}

/// Services, slices, and which pods each backs.
#[derive(Debug, Default)]
pub(crate) struct Index {
    services: HashMap<String, ServiceFacts>,
    slices: HashMap<String, SliceFacts>,
    /// Pod uid → the slices listing it.
    by_pod: HashMap<String, BTreeSet<String>>,
    /// Service (`namespace/name`) → its slices.
    by_service: HashMap<String, BTreeSet<String>>,
}

impl Index {
    /// Records a service; the pods whose maps may have changed.
    pub(crate) fn apply_service(&mut self, facts: ServiceFacts) -> BTreeSet<String> {
        let key = facts.key();
        if self.services.get(&key) == Some(&facts) {
            return BTreeSet::new();
        }
        self.services.insert(key.clone(), facts);
        self.pods_of_service(&key)
    }

    /// Forgets a service (`namespace/name`); its state key and the pods that lost it.
    pub(crate) fn remove_service(&mut self, key: &str) -> Option<(String, BTreeSet<String>)> {
        let gone = self.services.remove(key)?;
        let state_key = gone.to_state().key();
        Some((state_key, self.pods_of_service(key)))
    }

    /// Records a slice; the pods it listed before or lists now.
    pub(crate) fn apply_slice(&mut self, key: String, facts: SliceFacts) -> BTreeSet<String> {
        let mut touched = self.remove_slice(&key);
        for uid in &facts.pods {
            self.by_pod
                .entry(uid.clone())
                .or_default()
                .insert(key.clone());
            touched.insert(uid.clone());
        }
        self.by_service
            .entry(facts.service.clone())
            .or_default()
            .insert(key.clone());
        self.slices.insert(key, facts);
        touched
    }

    /// Forgets a slice; the pods it listed.
    pub(crate) fn remove_slice(&mut self, key: &str) -> BTreeSet<String> {
        let Some(old) = self.slices.remove(key) else {
            return BTreeSet::new();
        };
        if let Some(slices) = self.by_service.get_mut(&old.service) {
            slices.remove(key);
            if slices.is_empty() {
                self.by_service.remove(&old.service);
            }
        }
        for uid in &old.pods {
            if let Some(slices) = self.by_pod.get_mut(uid) {
                slices.remove(key);
                if slices.is_empty() {
                    self.by_pod.remove(uid);
                }
            }
        }
        old.pods
    }

    /// A pod's `services` map: `ns/hostname` → service port → the pod's port.
    pub(crate) fn services_of(&self, uid: &str) -> BTreeMap<String, BTreeMap<u16, u16>> {
        let mut out = BTreeMap::new();
        for slice in self.by_pod.get(uid).into_iter().flatten() {
            let Some(slice) = self.slices.get(slice) else {
                continue;
            };
            let Some(svc) = self.services.get(&slice.service) else {
                continue;
            };
            let ports = svc.endpoint_ports(&slice.ports);
            if !ports.is_empty() {
                out.insert(format!("{}/{}", svc.namespace, svc.hostname), ports);
            }
        }
        out
    }

    /// Every known service key (`namespace/name`), for a relist's sweep.
    pub(crate) fn service_keys(&self) -> impl Iterator<Item = &String> {
        self.services.keys()
    }

    /// Every known slice key, for a relist's sweep.
    pub(crate) fn slice_keys(&self) -> impl Iterator<Item = &String> {
        self.slices.keys()
    }

    fn pods_of_service(&self, key: &str) -> BTreeSet<String> {
        self.by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.get(slice))
            .flat_map(|s| s.pods.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests;

//! The Pod the watches read: a [`Pod`] with only the fields Kubernetes mode uses, deserialized
//! straight from the API server's JSON. Every node watches every pod of the cluster; a real
//! pod is 8–15 KiB of JSON (containers with their environment and probes, volumes, managed
//! fields, container statuses), of which hboned needs a few hundred bytes. The rest is skipped
//! as it is parsed instead of being built into objects and dropped, so neither the initial
//! list nor the watch holds whole pods, even briefly. The bytes on the wire are the API
//! server's to choose (it serves no projection of a Pod); what is kept is this.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Deserialize;

use super::pods::REDIRECTION_ANNOTATION;

/// A Pod as the watches keep it; see the module docs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlimPod(pub Pod);

impl kube::Resource for SlimPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

impl<'de> Deserialize<'de> for SlimPod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Raw::deserialize(d).map(Raw::into_pod).map(SlimPod)
    }
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Raw {
    metadata: RawMeta,
    spec: Option<RawSpec>,
    status: Option<RawStatus>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    /// Only hboned's own: the rest (often the largest part of a pod's metadata) is skipped.
    #[serde(deserialize_with = "ours")]
    annotations: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<RawOwner>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawOwner {
    api_version: String,
    kind: String,
    name: String,
    uid: String,
    controller: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    host_network: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawStatus {
    phase: Option<String>,
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<RawPodIp>>,
    conditions: Option<Vec<RawCondition>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawPodIp {
    ip: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

/// Of an annotation map, only [`REDIRECTION_ANNOTATION`]; the other values are skipped unread.
fn ours<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of annotations")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == REDIRECTION_ANNOTATION {
                    kept.insert(key.into_owned(), map.next_value::<String>()?);
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(Some(kept))
        }
    }
    d.deserialize_option(Visitor)
}

impl Raw {
    fn into_pod(self) -> Pod {
        let meta = self.metadata;
        Pod {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                labels: meta.labels,
                annotations: meta.annotations,
                owner_references: meta.owner_references.map(|owners| {
                    owners
                        .into_iter()
                        .map(|o| OwnerReference {
                            api_version: o.api_version,
                            kind: o.kind,
                            name: o.name,
                            uid: o.uid,
                            controller: o.controller,
                            block_owner_deletion: None,
                        })
                        .collect()
                }),
                ..ObjectMeta::default()
            },
            spec: self.spec.map(|s| PodSpec {
                node_name: s.node_name,
                service_account_name: s.service_account_name,
                host_network: s.host_network,
                ..PodSpec::default()
            }),
            status: self.status.map(|s| PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                pod_ips: s
                    .pod_ips
                    .map(|ips| ips.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
                conditions: s.conditions.map(|cs| {
                    cs.into_iter()
                        .map(|c| PodCondition {
                            type_: c.type_,
                            status: c.status,
                            ..PodCondition::default()
                        })
                        .collect()
                }),
                ..PodStatus::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests;

//! `/config_dump` in ztunnel's shape: the field names and JSON types that
//! `istioctl ztunnel-config` decodes (istio/istio `istioctl/pkg/writer/ztunnel/configdump/api.go`:
//! `ZtunnelWorkload`, `ZtunnelService`, `ZtunnelPolicy`, `CertsDump`, `WorkloadState`).
//! Go's decoder fails the whole dump on one field of the wrong JSON type, so each value here
//! has the type istioctl declares; hboned's own extras (`pods`, `config`) sit beside them.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::state::balance::{LoadBalancing, Mode, Scope};
use crate::state::{Protocol, Service, State, Workload};

/// ztunnel's network address text: `network/ip` (an empty network for the default one).
fn network_address(network: &str, ip: std::net::IpAddr) -> String {
    format!("{network}/{ip}")
}

/// One workload (`ZtunnelWorkload`).
pub(crate) fn workload(w: &Workload) -> Value {
    let services: BTreeMap<&String, BTreeMap<String, u16>> = w
        .services
        .iter()
        .map(|(k, ports)| (k, ports.iter().map(|(s, t)| (s.to_string(), *t)).collect()))
        .collect();
    json!({
        "uid": w.uid,
        "workloadIps": w.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "protocol": match w.protocol { Protocol::Hbone => "HBONE", Protocol::Tcp => "TCP" },
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.identity.service_account(),
        "trustDomain": w.identity.trust_domain(),
        "workloadName": w.workload_name,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "clusterId": w.cluster_id,
        "locality": {
            "region": w.locality.region, "zone": w.locality.zone, "subzone": w.locality.subzone,
        },
        "node": w.node,
        "network": w.network,
        "status": if w.healthy { "Healthy" } else { "Unhealthy" },
        "hostname": w.hostname,
        "capacity": w.capacity,
        "services": services,
        "authorizationPolicies": w.authorization_policies,
        "networkMode": if w.host_network { "HostNetwork" } else { "Standard" },
        // What discovery asks that hboned refuses to fake (its traffic is refused).
        "refused": w.unsupported.map(|u| u.reason()),
        "waypoint": w.waypoint.as_ref().map(gateway),
        "networkGateway": w.network_gateway.as_ref().map(gateway),
        "applicationTunnel": w.proxy_protocol.map(|port| json!({"protocol": "PROXY", "port": port})),
    })
}

fn load_balancer(lb: &LoadBalancing) -> Value {
    let scope = |s: &Scope| match s {
        Scope::Region => "Region",
        Scope::Zone => "Zone",
        Scope::Subzone => "Subzone",
        Scope::Node => "Node",
        Scope::Cluster => "Cluster",
        Scope::Network => "Network",
    };
    json!({
        "mode": match lb.mode {
            Mode::Any => "Standard",
            Mode::Strict => "Strict",
            Mode::Failover => "Failover",
            Mode::Passthrough => "Passthrough",
        },
        "routingPreferences": lb.preferences.iter().map(scope).collect::<Vec<_>>(),
        "healthPolicy": if lb.allow_unhealthy { "AllowAll" } else { "OnlyHealthy" },
    })
}

/// One service (`ZtunnelService`), with its endpoints: the workloads that name it.
pub(crate) fn service(s: &Service, state: &State) -> Value {
    let key = s.key();
    let endpoints: BTreeMap<&str, Value> = state
        .workloads()
        .filter_map(|w| Some((w, w.services.get(&key)?)))
        .map(|(w, ports)| {
            let port: BTreeMap<String, u16> =
                ports.iter().map(|(s, t)| (s.to_string(), *t)).collect();
            (
                w.uid.as_str(),
                json!({"workloadUid": w.uid, "service": key, "port": port}),
            )
        })
        .collect();
    let (v4, v6) = (
        s.vips.iter().any(std::net::IpAddr::is_ipv4),
        s.vips.iter().any(std::net::IpAddr::is_ipv6),
    );
    let families = match (v4, v6) {
        (true, true) => "Dual",
        (false, true) => "IPv6",
        _ => "IPv4",
    };
    let ports: BTreeMap<String, u16> = s.ports.iter().map(|(p, t)| (p.to_string(), *t)).collect();
    json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": s.vips.iter().map(|ip| network_address(state.network(), *ip)).collect::<Vec<_>>(),
        "ports": ports,
        "loadBalancer": load_balancer(&s.load_balancing),
        "endpoints": endpoints,
        "subjectAltNames": s.subject_alt_names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ipFamilies": families,
        "vipRanges": s.vip_ranges.iter().map(|(net, len)| format!("{net}/{len}")).collect::<Vec<_>>(),
        "visibility": if s.namespace_only { "Namespace" } else { "Public" },
        "refused": s.unsupported.map(|u| u.reason()),
        "waypoint": s.waypoint.as_ref().map(gateway),
        "ingressUseWaypoint": s.ingress_use_waypoint,
    })
}

/// A waypoint or network gateway as ztunnel dumps it (`GatewayAddress`): the destination as
/// `network/ip` or `namespace/hostname` (what istioctl matches against services and VIPs).
fn gateway(g: &crate::state::Gateway) -> Value {
    json!({"destination": g.destination.to_string(), "hboneMtlsPort": g.port})
}

/// Workloads and services sorted by key, policies by `namespace/name`.
pub(crate) fn state(state: &State) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let mut workloads: Vec<&std::sync::Arc<Workload>> = state.workloads().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&std::sync::Arc<Service>> = state.services().collect();
    services.sort_by_key(|s| s.key());
    let mut policies: Vec<_> = state.all_policies().collect();
    policies.sort_by_key(|p| (&p.namespace, &p.name));
    (
        workloads.into_iter().map(|w| workload(w)).collect(),
        services.into_iter().map(|s| service(s, state)).collect(),
        policies
            .into_iter()
            .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Action, Clause, Match, Policy, Rule, Scope as PolicyScope, StringMatch};
    use crate::identity::Identity;

    /// The JSON type istioctl declares for each field it reads (api.go): a string, a number,
    /// a list, an object (map or struct) or a boolean.
    fn assert_types(v: &Value, fields: &[(&str, &str)]) {
        for (name, kind) in fields {
            let f = &v[*name];
            let ok = match *kind {
                "string" => f.is_string(),
                "number" => f.is_number(),
                "list" => f.is_array(),
                "object" => f.is_object(),
                _ => unreachable!(),
            };
            assert!(ok, "{name} should be a {kind} in {v}");
        }
    }

    fn fixture() -> State {
        let mut state = State::default();
        let mut w = crate::state::tests::workload("pod-1", "10.0.0.5", "db", Protocol::Hbone);
        w.services.insert(
            "prod/db.prod.svc.cluster.local".into(),
            [(5432, 5433)].into(),
        );
        state.upsert_workload(w);
        state.upsert_service(Service {
            subject_alt_names: vec![Identity::new("cluster.local", "prod", "db").unwrap()],
            ..Service::new(
                "db",
                "prod",
                "db.prod.svc.cluster.local",
                vec!["10.96.0.7".parse().unwrap()],
                [(5432, 5433)].into(),
            )
        });
        state.upsert_policy(Policy {
            name: "allow-web".into(),
            namespace: "prod".into(),
            scope: PolicyScope::Namespace,
            action: Action::Allow,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        namespaces: vec![StringMatch::Presence],
                        principals: vec![StringMatch::Exact("cluster.local/ns/prod/sa/web".into())],
                        ..Match::default()
                    }],
                }],
            }],
            dry_run: false,
        });
        state
    }

    #[test]
    fn workloads_services_and_policies_have_istioctls_types() {
        let state = fixture();
        let (workloads, services, policies) = self::state(&state);
        let w = &workloads[0];
        assert_types(
            w,
            &[
                ("uid", "string"),
                ("workloadIps", "list"),
                ("protocol", "string"),
                ("name", "string"),
                ("namespace", "string"),
                ("serviceAccount", "string"),
                ("workloadName", "string"),
                ("canonicalName", "string"),
                ("canonicalRevision", "string"),
                ("clusterId", "string"),
                ("trustDomain", "string"),
                ("locality", "object"),
                ("node", "string"),
                ("status", "string"),
                ("hostname", "string"),
                ("authorizationPolicies", "list"),
            ],
        );
        assert_eq!(w["workloadIps"][0], "10.0.0.5");
        assert_eq!(w["protocol"], "HBONE");
        assert_eq!(w["status"], "Healthy");

        let s = &services[0];
        assert_types(
            s,
            &[
                ("name", "string"),
                ("namespace", "string"),
                ("hostname", "string"),
                ("vips", "list"),
                ("ports", "object"),
                ("loadBalancer", "object"),
                ("endpoints", "object"),
                ("subjectAltNames", "list"),
                ("ipFamilies", "string"),
            ],
        );
        assert_eq!(s["vips"][0], "/10.96.0.7");
        assert_eq!(s["ports"]["5432"], 5433);
        let ep = &s["endpoints"][w["uid"].as_str().unwrap()];
        assert_eq!(ep["port"]["5432"], 5433, "{s}");
        assert_types(
            &s["loadBalancer"],
            &[
                ("mode", "string"),
                ("routingPreferences", "list"),
                ("healthPolicy", "string"),
            ],
        );

        // ZtunnelPolicy: scope and action as ztunnel names them, rules as [[[match]]], string
        // matches as {"Exact": …} and {"Presence": …}.
        let p = &policies[0];
        assert_eq!(p["scope"], "Namespace");
        assert_eq!(p["action"], "Allow");
        let m = &p["rules"][0][0][0];
        assert_eq!(
            m["principals"][0]["Exact"], "cluster.local/ns/prod/sa/web",
            "{p}"
        );
        assert!(m["namespaces"][0]["Presence"].is_array(), "{p}");
    }
}

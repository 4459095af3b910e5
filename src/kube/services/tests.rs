//! Tests of `kube::services`: Services and EndpointSlices as the API server sends them.

use super::*;

fn service(json: serde_json::Value) -> KubeService {
    serde_json::from_value(json).unwrap()
}

fn web() -> ServiceFacts {
    ServiceFacts::of(
        &service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http-alt", "protocol": "TCP"},
                    {"name": "admin", "port": 9000, "targetPort": 9001},
                    {"name": "dns", "port": 53, "protocol": "UDP"}
                ]
            }
        })),
        "cluster.local",
    )
    .unwrap()
}

fn slice(name: &str, pods: &[&str], http_port: i32) -> (String, SliceFacts) {
    let s: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": http_port, "protocol": "TCP"}, {"name": "admin", "port": 9001}],
        "endpoints": pods.iter().map(|uid| serde_json::json!({
            "addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": uid, "namespace": "shop", "uid": uid}
        })).collect::<Vec<_>>()
    }))
    .unwrap();
    SliceFacts::of(&s).unwrap()
}

#[test]
fn a_service_becomes_vips_and_ports_and_its_slices_give_each_pod_its_map() {
    let web = web();
    let state = web.to_state();
    assert_eq!(state.key(), "shop/web.shop.svc.cluster.local");
    assert_eq!(state.vips.len(), 2);
    // Named target ports are 0 on the service; UDP ports are left out.
    assert_eq!(state.ports, BTreeMap::from([(80, 0), (9000, 9001)]));

    let mut index = Index::default();
    assert!(index.apply_service(web.clone()).is_empty(), "no slice yet");
    let (key, facts) = slice("web-abc", &["p1", "p2"], 8080);
    assert_eq!(
        index.apply_slice(key, facts),
        BTreeSet::from(["p1".into(), "p2".into()])
    );
    let map = index.services_of("p1");
    assert_eq!(
        map["shop/web.shop.svc.cluster.local"],
        BTreeMap::from([(80, 8080), (9000, 9001)])
    );
    assert!(index.services_of("p3").is_empty());

    // The slice drops p2: p2 loses the service.
    let (key, facts) = slice("web-abc", &["p1"], 8080);
    assert_eq!(
        index.apply_slice(key, facts),
        BTreeSet::from(["p1".into(), "p2".into()])
    );
    assert!(index.services_of("p2").is_empty());
    // The service goes: p1 loses it too, and the state key is returned for removal.
    let (state_key, pods) = index.remove_service("shop/web").unwrap();
    assert_eq!(state_key, "shop/web.shop.svc.cluster.local");
    assert_eq!(pods, BTreeSet::from(["p1".into()]));
    assert!(index.services_of("p1").is_empty());
    assert_eq!(index.remove_slice("web-abc-missing"), BTreeSet::new());
}

#[test]
fn headless_external_and_odd_services_are_skipped() {
    let headless = service(serde_json::json!({
        "metadata": {"name": "db", "namespace": "shop"}, "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
    }));
    assert_eq!(ServiceFacts::of(&headless, "cluster.local"), None);
    let external = service(serde_json::json!({
        "metadata": {"name": "ext", "namespace": "shop"}, "spec": {"type": "ExternalName", "externalName": "example.org"}
    }));
    assert_eq!(ServiceFacts::of(&external, "cluster.local"), None);
    assert_eq!(
        ServiceFacts::of(
            &service(serde_json::json!({"metadata": {"name": "x"}})),
            "c"
        ),
        None
    );
    // Out-of-range ports are dropped, the rest kept; no targetPort means the same port.
    let odd = service(serde_json::json!({
        "metadata": {"name": "odd", "namespace": "n"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 70000}, {"port": 81}, {"port": 82, "targetPort": 0}]}
    }));
    let f = ServiceFacts::of(&odd, "cluster.local").unwrap();
    assert_eq!(f.to_state().ports, BTreeMap::from([(81, 81), (82, 0)]));
    // A slice without its service label names no service.
    let unlabelled: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "s", "namespace": "n"}, "addressType": "IPv4", "endpoints": []
    }))
    .unwrap();
    assert_eq!(SliceFacts::of(&unlabelled), None);
}

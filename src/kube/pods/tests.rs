//! Tests of `kube::pods`: pods as the API server sends them, and their empty and odd forms.

use super::*;

/// A pod as the API server's JSON has it (fields as in k8s.io/api core/v1).
fn pod(json: serde_json::Value) -> Pod {
    serde_json::from_value(json).unwrap()
}

fn running() -> Pod {
    pod(serde_json::json!({
        "metadata": {
            "name": "web-7d4b9c-x2x", "namespace": "shop", "uid": "0b5c1e4e-0000-4000-8000-000000000001",
            "labels": {"app": "web", "version": "v2", "pod-template-hash": "7d4b9c"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c", "uid": "r", "controller": true}]
        },
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "c"}]},
        "status": {
            "phase": "Running", "podIP": "10.0.0.5",
            "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }))
}

/// A running pod recorded as enrolled by its node's agent.
fn enrolled() -> Pod {
    let mut p = running();
    p.metadata.annotations = Some(BTreeMap::from([(
        REDIRECTION_ANNOTATION.to_owned(),
        REDIRECTION_ENABLED.to_owned(),
    )]));
    p
}

#[test]
fn a_running_pod_becomes_an_hbone_workload_when_its_namespace_opted_in_and_it_is_served() {
    let f = PodFacts::of(&enrolled()).unwrap();
    assert_eq!(
        f.ips,
        vec![
            "10.0.0.5".parse::<IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
    assert_eq!(
        (f.node.as_str(), f.service_account.as_str()),
        ("node-a", "web")
    );
    assert_eq!(
        f.workload_name, "web",
        "the Deployment's name, not the ReplicaSet's"
    );
    assert_eq!(
        (f.canonical_name.as_str(), f.canonical_revision.as_str()),
        ("web", "v2")
    );
    let w = f.workload(true, "example.org", "c1").unwrap();
    assert_eq!(w.protocol, Protocol::Hbone);
    assert_eq!(
        w.identity.to_string(),
        "spiffe://example.org/ns/shop/sa/web"
    );
    assert!(w.healthy);
    assert_eq!(w.uid, "0b5c1e4e-0000-4000-8000-000000000001");
    assert_eq!(
        f.workload(false, "example.org", "c1").unwrap().protocol,
        Protocol::Tcp
    );
    assert!(f.enrollable(true));
    assert!(!f.enrollable(false));
}

/// Istio waits for `ambient.istio.io/redirection`; hboned for its own record. Without it
/// (enrollment pending or failed, a node without hboned) or with another value, peers stay
/// in plaintext, so the pod remains reachable.
#[test]
fn an_opted_in_pod_is_reached_over_hbone_only_once_its_enrollment_is_recorded() {
    let f = PodFacts::of(&running()).unwrap();
    assert!(!f.redirected);
    assert!(f.enrollable(true), "its own node still enrolls it");
    assert_eq!(
        f.workload(true, "example.org", "c1").unwrap().protocol,
        Protocol::Tcp
    );
    for value in ["", "disabled", "Enabled"] {
        let mut p = running();
        p.metadata.annotations = Some(BTreeMap::from([(
            REDIRECTION_ANNOTATION.to_owned(),
            value.to_owned(),
        )]));
        assert!(!PodFacts::of(&p).unwrap().redirected, "{value:?}");
    }
    let f = PodFacts::of(&enrolled()).unwrap();
    assert!(f.redirected && f.served(true) && !f.served(false));
}

#[test]
fn pods_without_an_address_a_namespace_of_their_own_or_a_future_are_not_enrolled() {
    let mut p = running();
    p.status.as_mut().unwrap().pod_ips = None;
    p.status.as_mut().unwrap().pod_ip = None;
    let f = PodFacts::of(&p).unwrap();
    assert!(!f.enrollable(true));
    assert_eq!(f.workload(true, "", ""), None, "nothing to route to yet");

    let mut p = running();
    p.spec.as_mut().unwrap().host_network = Some(true);
    let f = PodFacts::of(&p).unwrap();
    assert!(
        !f.enrollable(true),
        "a hostNetwork pod shares the node's namespace"
    );
    let w = f.workload(true, "", "").unwrap();
    assert_eq!((w.protocol, w.host_network), (Protocol::Tcp, true));

    let mut p = running();
    p.status.as_mut().unwrap().phase = Some("Succeeded".into());
    assert!(!PodFacts::of(&p).unwrap().enrollable(true));

    // Only podIP (older API servers, single stack).
    let mut p = running();
    p.status.as_mut().unwrap().pod_ips = None;
    assert_eq!(PodFacts::of(&p).unwrap().ips.len(), 1);
}

#[test]
fn objects_without_identity_fields_are_skipped_and_odd_values_are_survived() {
    assert_eq!(
        PodFacts::of(&pod(serde_json::json!({"metadata": {"name": "x"}}))),
        None
    );
    let bare = pod(serde_json::json!({"metadata": {"name": "x", "namespace": "n", "uid": "u"}}));
    let f = PodFacts::of(&bare).unwrap();
    assert!(f.ips.is_empty() && !f.ready && !f.host_network);
    assert_eq!(
        (f.workload_name.as_str(), f.canonical_revision.as_str()),
        ("x", "latest")
    );
    let mut p = running();
    p.status.as_mut().unwrap().pod_ips = Some(vec![
        k8s_openapi::api::core::v1::PodIP {
            ip: "not-an-ip".into(),
        },
        k8s_openapi::api::core::v1::PodIP {
            ip: "10.0.0.9".into(),
        },
    ]);
    assert_eq!(
        PodFacts::of(&p).unwrap().ips,
        vec!["10.0.0.9".parse::<IpAddr>().unwrap()]
    );
    // A label present with an empty value is taken as it is, as Istio does; absent ones fall
    // through to the next.
    let mut p = running();
    let labels = p.metadata.labels.as_mut().unwrap();
    labels.insert("app.kubernetes.io/name".into(), String::new());
    labels.remove("version");
    let f = PodFacts::of(&p).unwrap();
    assert_eq!(
        (f.canonical_name.as_str(), f.canonical_revision.as_str()),
        ("", "latest")
    );
    // A not-ready pod is a workload, but not a healthy endpoint.
    let mut p = running();
    p.status.as_mut().unwrap().conditions = None;
    assert!(
        !PodFacts::of(&p)
            .unwrap()
            .workload(true, "", "")
            .unwrap()
            .healthy
    );
}

#[test]
fn namespace_labels_match_by_value_or_presence() {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let cilium = LabelMatch::parse("io.cilium/mtls-enabled=true").unwrap();
    let any = LabelMatch::parse("mesh.example/enrolled").unwrap();
    let both = [cilium.clone(), any];
    assert!(opted_in(
        &both,
        Some(&labels(&[("io.cilium/mtls-enabled", "true")]))
    ));
    assert!(!opted_in(
        &both,
        Some(&labels(&[("io.cilium/mtls-enabled", "false")]))
    ));
    assert!(opted_in(
        &both,
        Some(&labels(&[("mesh.example/enrolled", "")]))
    ));
    assert!(!opted_in(&both, None));
    assert!(!opted_in(
        &[],
        Some(&labels(&[("io.cilium/mtls-enabled", "true")]))
    ));
    for bad in ["", "=true", "a b=c", "a=b=c", "a,b=c"] {
        assert!(LabelMatch::parse(bad).is_err(), "{bad:?}");
    }
}

/// `hboned.io/dataplane-mode: none` keeps a pod of an opted-in namespace out: not enrolled,
/// not reached over HBONE even if an earlier record says so (that record is taken away).
#[test]
fn a_pod_labelled_out_is_neither_enrolled_nor_tunneled_to() {
    let mut p = enrolled();
    p.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(OPT_OUT_LABEL.to_owned(), OPT_OUT.to_owned());
    let f = PodFacts::of(&p).unwrap();
    assert!(f.opted_out && !f.enrollable(true) && !f.served(true));
    assert_eq!(
        f.workload(true, "example.org", "c1").unwrap().protocol,
        Protocol::Tcp
    );
    // Another value is no opt-out.
    p.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(OPT_OUT_LABEL.to_owned(), "ambient".to_owned());
    assert!(PodFacts::of(&p).unwrap().enrollable(true));
}

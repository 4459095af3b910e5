//! Tests of `state::balance`: the endpoint choice as a table, like ztunnel's load-balancing
//! tests (health policy, STRICT, FAILOVER, capacity weights).

use super::*;
use crate::identity::Identity;
use crate::state::Protocol;

fn wl(uid: &str, zone: &str, node: &str, healthy: bool, capacity: u32) -> Arc<Workload> {
    Arc::new(Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "ns".into(),
        identity: Identity::new("cluster.local", "ns", "sa").unwrap(),
        network: String::new(),
        addresses: Vec::new(),
        node: node.into(),
        protocol: Protocol::Hbone,
        services: Default::default(),
        healthy,
        authorization_policies: Vec::new(),
        host_network: false,
        workload_name: uid.into(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        cluster_id: "c1".into(),
        locality: Locality {
            region: "r1".into(),
            zone: zone.into(),
            subzone: String::new(),
        },
        hostname: String::new(),
        capacity,
        unsupported: None,
        proxy_protocol: None,
        waypoint: None,
        network_gateway: None,
    })
}

/// Every endpoint `choose` can return for any pick, with how often over 0..100.
fn outcomes(
    eps: &[Arc<Workload>],
    lb: &LoadBalancing,
    source: Option<&Workload>,
) -> Vec<(String, usize)> {
    let eps: Vec<(Arc<Workload>, u16)> = eps.iter().map(|w| (w.clone(), 80)).collect();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for pick in 0..100 {
        if let Some((w, _)) = choose(&eps, lb, source, pick) {
            *counts.entry(w.uid.clone()).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}

#[test]
fn endpoint_choice_follows_the_policy() {
    let source = wl("src", "z1", "n1", true, 1);
    let same_zone = wl("same-zone", "z1", "n2", true, 1);
    let same_node = wl("same-node", "z1", "n1", true, 1);
    let other_zone = wl("other-zone", "z2", "n3", true, 1);
    let sick = wl("sick", "z1", "n1", false, 1);
    let all = [
        same_zone.clone(),
        same_node.clone(),
        other_zone.clone(),
        sick.clone(),
    ];
    let lb = |preferences: Vec<Scope>, mode, allow_unhealthy| LoadBalancing {
        preferences,
        mode,
        allow_unhealthy,
    };
    let names = |o: Vec<(String, usize)>| o.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    let cases: Vec<(&str, LoadBalancing, Vec<&str>)> = vec![
        (
            "no policy: every healthy endpoint",
            LoadBalancing::default(),
            vec!["other-zone", "same-node", "same-zone"],
        ),
        (
            "ALLOW_ALL: the unhealthy one too",
            lb(vec![], Mode::Any, true),
            vec!["other-zone", "same-node", "same-zone", "sick"],
        ),
        (
            "STRICT zone: only the source's zone",
            lb(vec![Scope::Zone], Mode::Strict, false),
            vec!["same-node", "same-zone"],
        ),
        (
            "STRICT zone + node: only the source's node",
            lb(vec![Scope::Zone, Scope::Node], Mode::Strict, false),
            vec!["same-node"],
        ),
        (
            "FAILOVER node then zone: the best match wins",
            lb(vec![Scope::Node, Scope::Zone], Mode::Failover, false),
            vec!["same-node"],
        ),
        (
            "FAILOVER region: all match equally",
            lb(vec![Scope::Region], Mode::Failover, false),
            vec!["other-zone", "same-node", "same-zone"],
        ),
    ];
    for (name, policy, want) in cases {
        assert_eq!(
            names(outcomes(&all, &policy, Some(&source))),
            want,
            "{name}"
        );
    }
    // FAILOVER falls back when no endpoint shares the first preference.
    let failover = lb(vec![Scope::Node, Scope::Zone], Mode::Failover, false);
    let away = [same_zone.clone(), other_zone.clone()];
    assert_eq!(
        names(outcomes(&away, &failover, Some(&source))),
        vec!["other-zone", "same-zone"],
        "nobody on the node: any zone, as ranks are equal (0)"
    );
    // STRICT with nothing matching, or no known source: nothing.
    let strict_node = lb(vec![Scope::Node], Mode::Strict, false);
    assert!(outcomes(&away, &strict_node, Some(&source)).is_empty());
    assert!(outcomes(&all, &strict_node, None).is_empty());
}

#[test]
fn capacity_weights_the_choice() {
    let small = wl("small", "z1", "n1", true, 1);
    let big = wl("big", "z1", "n1", true, 3);
    let drained = wl("drained", "z1", "n1", true, 0);
    let counts = outcomes(&[small, big, drained], &LoadBalancing::default(), None);
    assert_eq!(
        counts,
        vec![("big".to_string(), 75), ("small".to_string(), 25)],
        "three to one; capacity 0 takes nothing"
    );
    let zeros = [wl("a", "z", "n", true, 0), wl("b", "z", "n", true, 0)];
    let even = outcomes(&zeros, &LoadBalancing::default(), None);
    assert_eq!(even, vec![("a".to_string(), 50), ("b".to_string(), 50)]);
}

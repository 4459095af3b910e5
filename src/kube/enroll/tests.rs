//! Tests of `kube::enroll`: which of this node's pods are enrolled, and where stale rules are
//! looked for.

use super::*;

fn facts(uid: &str, namespace: &str, ips: &[&str], host_network: bool) -> PodFacts {
    PodFacts {
        uid: uid.into(),
        name: format!("{uid}-name"),
        namespace: namespace.into(),
        service_account: "sa".into(),
        node: "n".into(),
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        host_network,
        terminal: false,
        ready: true,
        redirected: false,
        opted_out: false,
        workload_name: uid.into(),
        canonical_name: uid.into(),
        canonical_revision: "latest".into(),
    }
}

#[test]
fn pods_of_opted_in_namespaces_are_enrolled_and_the_rest_swept() {
    let local: BTreeMap<String, PodFacts> = [
        facts("a", "mesh", &["10.0.0.1"], false),
        facts("b", "plain", &["10.0.0.2"], false),
        facts("c", "mesh", &["10.0.0.3"], true),
        facts("d", "mesh", &[], false),
    ]
    .into_iter()
    .map(|f| (f.uid.clone(), f))
    .collect();
    let opted = HashSet::from(["mesh".to_owned()]);
    let d = Desired::compute(&local, &opted, true);
    assert_eq!(d.enroll.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(d.enroll["a"].service_account, "sa");
    // b: its namespace is not opted in; c shares the node's namespace (never touched); d has
    // no address yet.
    assert_eq!(d.others.keys().collect::<Vec<_>>(), ["b"]);
    assert!(d.synced);
    let none = Desired::compute(&local, &HashSet::new(), false);
    assert!(none.enroll.is_empty() && !none.synced);
    assert_eq!(none.others.len(), 2);
}

/// Pods recorded as enrolled (an earlier run's annotation) that should not be: their records
/// are to be taken away; an enrolled pod's record stays.
#[test]
fn records_of_pods_that_should_not_be_enrolled_are_stale() {
    let recorded = |mut f: PodFacts| {
        f.redirected = true;
        f
    };
    let local: BTreeMap<String, PodFacts> = [
        recorded(facts("a", "mesh", &["10.0.0.1"], false)),
        recorded(facts("b", "plain", &["10.0.0.2"], false)),
        facts("c", "plain", &["10.0.0.3"], false),
    ]
    .into_iter()
    .map(|f| (f.uid.clone(), f))
    .collect();
    let d = Desired::compute(&local, &HashSet::from(["mesh".to_owned()]), true);
    assert_eq!(d.enroll.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(
        d.stale,
        BTreeMap::from([("b".to_owned(), ("plain".to_owned(), "b-name".to_owned()))])
    );
}

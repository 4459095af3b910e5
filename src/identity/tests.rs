//! Tests of `identity`.

use super::*;

#[test]
fn formats_and_parses_round_trip() {
    let id = Identity::new("example.org", "prod", "web").unwrap();
    assert_eq!(id.to_string(), "spiffe://example.org/ns/prod/sa/web");
    assert_eq!(Identity::parse(&id.to_string()).unwrap(), id);
    assert_eq!(
        "spiffe://example.org/ns/prod/sa/web"
            .parse::<Identity>()
            .unwrap(),
        id
    );
}

#[test]
fn empty_fields_take_defaults() {
    let id = Identity::new("", "ns1", "").unwrap();
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/ns1/sa/default");
    assert_eq!(id.trust_domain(), "cluster.local");
    assert_eq!(id.service_account(), "default");
}

#[test]
fn rejects_malformed_ids() {
    type Check = fn(&IdentityError) -> bool;
    let cases: &[(&str, Check)] = &[
        ("http://cluster.local/ns/a/sa/b", |e| {
            matches!(e, IdentityError::NotSpiffe(_))
        }),
        ("spiffe://cluster.local", |e| {
            matches!(e, IdentityError::Path(_))
        }),
        ("spiffe://cluster.local/ns/a", |e| {
            matches!(e, IdentityError::Path(_))
        }),
        ("spiffe://cluster.local/ns/a/sa/b/extra", |e| {
            matches!(e, IdentityError::Path(_))
        }),
        ("spiffe://cluster.local/sa/b/ns/a", |e| {
            matches!(e, IdentityError::Path(_))
        }),
        ("spiffe://cluster.local/ns//sa/b", |e| {
            matches!(e, IdentityError::Path(_))
        }),
        ("spiffe:///ns/a/sa/b", |e| {
            matches!(e, IdentityError::TrustDomain(_))
        }),
        ("spiffe://Cluster.Local/ns/a/sa/b", |e| {
            matches!(e, IdentityError::TrustDomain(_))
        }),
        ("spiffe://td/ns/a b/sa/b", |e| {
            matches!(
                e,
                IdentityError::Segment {
                    field: "namespace",
                    ..
                }
            )
        }),
        ("spiffe://td/ns/a/sa/..", |e| {
            matches!(
                e,
                IdentityError::Segment {
                    field: "service account",
                    ..
                }
            )
        }),
    ];
    for (input, check) in cases {
        let err = Identity::parse(input).expect_err(input);
        assert!(check(&err), "{input}: unexpected error {err:?}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn new_rejects_bad_namespace() {
    assert!(matches!(
        Identity::new("td", "", "sa"),
        Err(IdentityError::Segment {
            field: "namespace",
            ..
        })
    ));
}

#[test]
fn local_pods_are_found_by_identity_until_they_leave() {
    let pods = LocalPods::default();
    let a = Identity::new("td", "ns", "a").unwrap();
    let b = Identity::new("td", "ns", "b").unwrap();
    pods.insert("uid-2", &a);
    pods.insert("uid-1", &a);
    pods.clone().insert("uid-3", &b);
    assert_eq!(pods.with_identity(&a), ["uid-1", "uid-2"]);
    // A re-enrolled pod with another identity moves.
    pods.insert("uid-2", &b);
    assert_eq!(pods.with_identity(&a), ["uid-1"]);
    assert_eq!(pods.with_identity(&b), ["uid-2", "uid-3"]);
    pods.remove("uid-1");
    assert!(pods.with_identity(&a).is_empty());
    pods.clear();
    assert!(pods.with_identity(&b).is_empty());
}

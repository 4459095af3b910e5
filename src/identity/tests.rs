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

//! Tests of the SPIRE source's pure parts: the request (pid or selectors, never both, as the
//! agent requires), the bundle as the agent keys it, and the hints by status code. The streams
//! themselves run against a real agent in `tests/real_spire.rs`.

use super::*;
use crate::identity::ca::BuiltinCa;

fn id() -> Identity {
    Identity::new("example.org", "shop", "web").unwrap()
}

#[test]
fn a_request_names_a_pid_or_the_selectors_never_both() {
    let by_pid = request(
        &id(),
        &Workload::Pid(PodPid {
            pod_uid: "u".into(),
            pid: 4242,
        }),
    );
    assert_eq!(by_pid.pid, 4242);
    assert!(by_pid.selectors.is_empty());
    let by_selectors = request(&id(), &Workload::Selectors);
    assert_eq!(by_selectors.pid, 0);
    let selectors: Vec<(String, String)> = by_selectors
        .selectors
        .into_iter()
        .map(|s| (s.r#type, s.value))
        .collect();
    assert_eq!(
        selectors,
        [
            ("k8s".to_owned(), "ns:shop".to_owned()),
            ("k8s".to_owned(), "sa:web".to_owned())
        ]
    );
}

#[test]
fn the_bundle_is_read_under_the_trust_domains_spiffe_id() {
    let now = std::time::SystemTime::now();
    let (a, b) = (
        BuiltinCa::generate(now).unwrap(),
        BuiltinCa::generate(now).unwrap(),
    );
    let der = |ca: &BuiltinCa| -> Vec<u8> {
        let pem = ca.root_pem().as_bytes().to_vec();
        rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    };
    let (a, b) = (der(&a), der(&b));
    let mut both = a.clone();
    both.extend_from_slice(&b);
    let update = |key: &str, der: Vec<u8>| SubscribeToX509BundlesResponse {
        ca_certificates: HashMap::from([(key.to_owned(), der.into())]),
    };
    // As the agent sends it: `spiffe://<td>`, the roots concatenated.
    let certs = trust_domain_bundle("example.org", &update("spiffe://example.org", both)).unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[0].as_ref(), a.as_slice());
    assert_eq!(certs[1].as_ref(), b.as_slice());
    // The bare name is taken too; another trust domain's bundle is not ours.
    let bare = update("example.org", a.clone());
    assert_eq!(trust_domain_bundle("example.org", &bare).unwrap().len(), 1);
    let other = update("spiffe://other.org", a.clone());
    assert!(matches!(
        trust_domain_bundle("example.org", &other),
        Err(SpireError::NoBundle(td)) if td == "example.org"
    ));
    // Empty and malformed bundles are refused, never taken as "trust nothing" or half a root.
    let empty = update("spiffe://example.org", Vec::new());
    assert!(matches!(
        trust_domain_bundle("example.org", &empty),
        Err(SpireError::NoBundle(_))
    ));
    let cut = update("spiffe://example.org", a[..40].to_vec());
    assert!(matches!(
        trust_domain_bundle("example.org", &cut),
        Err(SpireError::Bundle { .. })
    ));
}

#[test]
fn refusals_say_what_to_check() {
    let refused = SpireError::Subscribe {
        stream: "SVID",
        status: tonic::Status::permission_denied("caller not configured as an authorized delegate"),
    };
    let text = refused.to_string();
    assert!(
        text.contains("caller not configured as an authorized delegate"),
        "{text}"
    );
    assert!(text.contains("authorized_delegates"), "{text}");
    let down = SpireError::Stream {
        stream: "bundle",
        status: tonic::Status::unavailable("connection refused"),
    };
    assert!(down.to_string().contains("admin socket"), "{down}");
}

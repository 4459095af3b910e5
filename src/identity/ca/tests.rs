//! Tests of `ca`.

use super::*;

#[test]
fn issues_one_uri_san_p256_leaf() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let id = Identity::new("cluster.local", "ns", "sa").unwrap();
    let cert = ca.issue(&id, SystemTime::now()).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.chain()[0].as_ref()).unwrap();
    let sans = parsed.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = sans
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        names,
        vec!["URI(spiffe://cluster.local/ns/ns/sa/sa)".to_string()]
    );
    assert_eq!(
        parsed.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    assert_eq!(lifetime, DEFAULT_LEAF_LIFETIME + BACKDATE);
}

#[test]
fn root_round_trips_through_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    ca.write_dir(dir.path()).unwrap();
    let loaded = BuiltinCa::load_dir(dir.path()).unwrap();
    assert_eq!(loaded.root_pem(), ca.root_pem());
    let id = Identity::new("td", "a", "b").unwrap();
    // A leaf from the reloaded CA chains to the original root.
    let cert = loaded.issue(&id, SystemTime::now()).unwrap();
    assert_eq!(cert.bundle().certs(), ca.bundle().certs());
}

#[test]
fn missing_root_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = BuiltinCa::load_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains(ROOT_CERT_FILE), "{err}");
}

#[test]
fn garbage_root_is_an_error_not_a_panic() {
    assert!(BuiltinCa::from_pem("not pem", "not pem").is_err());
}

#[test]
fn lifetime_is_configurable() {
    let ca = BuiltinCa::generate(SystemTime::now())
        .unwrap()
        .with_lifetime(Duration::from_secs(600));
    let id = Identity::new("td", "a", "b").unwrap();
    let now = SystemTime::now();
    let cert = ca.issue(&id, now).unwrap();
    let left = cert.not_after().duration_since(now).unwrap();
    assert!(left <= Duration::from_secs(600) && left > Duration::from_secs(598));
}

#[test]
fn sign_csr_requires_exactly_one_spiffe_uri() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let csr = |sans: Vec<SanType>| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    };
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let good = ca
        .sign_csr(
            &csr(vec![uri("spiffe://td/ns/a/sa/b")]),
            SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap();
    assert_eq!(good.len(), 2, "leaf and root");
    assert_eq!(good[1], ca.root_pem());
    for sans in [
        vec![],
        vec![uri("spiffe://td/ns/a/sa/b"), uri("spiffe://td/ns/a/sa/c")],
        vec![uri("https://example.com/")],
    ] {
        assert!(
            ca.sign_csr(&csr(sans), SystemTime::now(), Duration::from_secs(600))
                .is_err()
        );
    }
    assert!(
        ca.sign_csr("not a csr", SystemTime::now(), Duration::from_secs(600))
            .is_err()
    );
}

#[test]
fn short_lifetimes_are_not_born_past_their_renewal_point() {
    for secs in [4, 60, 120, 3600] {
        let lifetime = Duration::from_secs(secs);
        let ca = BuiltinCa::generate(SystemTime::now())
            .unwrap()
            .with_lifetime(lifetime);
        let now = SystemTime::now();
        let cert = ca
            .issue(&Identity::new("td", "a", "b").unwrap(), now)
            .unwrap();
        assert!(
            !cert.wants_refresh_at(now),
            "{secs} s: due for renewal at birth"
        );
    }
}

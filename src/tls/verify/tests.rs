//! Verifier tests: direct calls for each rejection reason, and real in-memory handshakes for
//! the cases that only a handshake shows (no client certificate at all).

use std::time::{Duration, SystemTime};

use rustls::{CertificateError, Error};
use rustls_pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::identity::ca::BuiltinCa;
use crate::identity::{Identity, WorkloadCert};
use crate::tls::{client_config, server_config};

fn id(td: &str, ns: &str, sa: &str) -> Identity {
    Identity::new(td, ns, sa).unwrap()
}

fn now() -> UnixTime {
    UnixTime::now()
}

fn leaf(ca: &BuiltinCa, who: &Identity) -> WorkloadCert {
    ca.issue(who, SystemTime::now()).unwrap()
}

fn server_verify(
    bundle_of: &BuiltinCa,
    cert: &WorkloadCert,
    expected: Vec<Identity>,
) -> Result<(), Error> {
    let v = SpiffeServerVerifier::new(bundle_of.bundle(), expected);
    let name = ServerName::try_from("ignored.example").unwrap();
    v.verify_server_cert(&cert.chain()[0], &cert.chain()[1..], &name, &[], now())
        .map(|_| ())
}

fn client_verify(bundle_of: &BuiltinCa, cert: &WorkloadCert, td: &str) -> Result<(), Error> {
    let v = SpiffeClientVerifier::new(bundle_of.bundle(), Some(td.into()));
    v.verify_client_cert(&cert.chain()[0], &cert.chain()[1..], now())
        .map(|_| ())
}

fn is_identity_mismatch(e: &Error) -> bool {
    matches!(e, Error::InvalidCertificate(CertificateError::Other(o)) if o.0.to_string().contains("presented"))
}

#[test]
fn server_with_expected_identity_is_accepted() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let b = id("cluster.local", "ns", "server");
    let cert = leaf(&ca, &b);
    server_verify(&ca, &cert, vec![id("cluster.local", "x", "other"), b]).unwrap();
}

#[test]
fn server_with_wrong_identity_is_refused() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let cert = leaf(&ca, &id("cluster.local", "ns", "impostor"));
    let err = server_verify(&ca, &cert, vec![id("cluster.local", "ns", "server")]).unwrap_err();
    assert!(is_identity_mismatch(&err), "{err:?}");
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/ns/sa/impostor"),
        "{err}"
    );
}

#[test]
fn client_in_trust_domain_is_accepted() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let cert = leaf(&ca, &id("cluster.local", "ns", "client"));
    client_verify(&ca, &cert, "cluster.local").unwrap();
}

#[test]
fn client_of_another_trust_domain_is_refused() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let cert = leaf(&ca, &id("evil.example", "ns", "client"));
    let err = client_verify(&ca, &cert, "cluster.local").unwrap_err();
    assert!(is_identity_mismatch(&err), "{err:?}");
}

#[test]
fn a_server_that_takes_any_trust_domain_takes_a_verified_client_of_another() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let cert = leaf(&ca, &id("old.example", "ns", "client"));
    let any = SpiffeClientVerifier::new(ca.bundle(), None);
    any.verify_client_cert(&cert.chain()[0], &cert.chain()[1..], now())
        .unwrap();
    // Still only what the roots verify.
    let foreign = BuiltinCa::generate(SystemTime::now()).unwrap();
    let theirs = leaf(&foreign, &id("old.example", "ns", "client"));
    assert!(
        any.verify_client_cert(&theirs.chain()[0], &theirs.chain()[1..], now())
            .is_err()
    );
}

#[test]
fn expired_certificates_are_refused_both_ways() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let who = id("cluster.local", "ns", "a");
    let t = SystemTime::now();
    let cert = ca
        .issue_between(
            &who,
            t - Duration::from_secs(7200),
            t - Duration::from_secs(3600),
        )
        .unwrap();
    let expired = |e: Error| matches!(e, Error::InvalidCertificate(CertificateError::Expired));
    assert!(expired(
        server_verify(&ca, &cert, vec![who.clone()]).unwrap_err()
    ));
    assert!(expired(
        client_verify(&ca, &cert, "cluster.local").unwrap_err()
    ));
}

#[test]
fn not_yet_valid_certificates_are_refused() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let who = id("cluster.local", "ns", "a");
    let t = SystemTime::now();
    let cert = ca
        .issue_between(
            &who,
            t + Duration::from_secs(3600),
            t + Duration::from_secs(7200),
        )
        .unwrap();
    let err = server_verify(&ca, &cert, vec![who]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(CertificateError::NotValidYet)
        ),
        "{err:?}"
    );
}

#[test]
fn chain_not_rooted_in_bundle_is_refused_both_ways() {
    let ours = BuiltinCa::generate(SystemTime::now()).unwrap();
    let theirs = BuiltinCa::generate(SystemTime::now()).unwrap();
    let who = id("cluster.local", "ns", "a");
    let cert = leaf(&theirs, &who);
    // Both generated roots share a subject name, so webpki tries our anchor and the signature
    // check fails (BadSignature); a root of another name gives UnknownIssuer. Both refuse.
    let unknown = |e: Error| {
        matches!(
            e,
            Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            )
        )
    };
    assert!(unknown(server_verify(&ours, &cert, vec![who]).unwrap_err()));
    assert!(unknown(
        client_verify(&ours, &cert, "cluster.local").unwrap_err()
    ));
}

#[test]
fn merged_bundle_accepts_both_roots() {
    let old = BuiltinCa::generate(SystemTime::now()).unwrap();
    let new = BuiltinCa::generate(SystemTime::now()).unwrap();
    let who = id("cluster.local", "ns", "a");
    let merged = std::sync::Arc::new(old.bundle().merged(&new.bundle()));
    for ca in [&old, &new] {
        let cert = leaf(ca, &who);
        let v = SpiffeServerVerifier::new(merged.clone(), vec![who.clone()]);
        let name = ServerName::try_from("x").unwrap();
        v.verify_server_cert(&cert.chain()[0], &[], &name, &[], now())
            .unwrap();
    }
}

#[test]
fn garbage_certificate_is_bad_encoding() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let v = SpiffeClientVerifier::new(ca.bundle(), Some("cluster.local".into()));
    let junk = rustls_pki_types::CertificateDer::from(vec![0x30, 0x03, 0x01, 0x02, 0x03]);
    let err = v.verify_client_cert(&junk, &[], now()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(CertificateError::BadEncoding)
        ),
        "{err:?}"
    );
}

/// Runs a handshake over an in-memory pipe; returns (client result, server result).
async fn handshake(
    client: std::sync::Arc<rustls::ClientConfig>,
    server: std::sync::Arc<rustls::ServerConfig>,
) -> (
    std::io::Result<Option<Identity>>,
    std::io::Result<Option<Identity>>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("ignored.example").unwrap().to_owned();
    let c = async move {
        let mut s = tokio_rustls::TlsConnector::from(client)
            .connect(name, a)
            .await?;
        s.write_all(b"ping").await?;
        s.flush().await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(crate::tls::peer_identity(s.get_ref().1.peer_certificates()))
    };
    let s = async move {
        let mut s = tokio_rustls::TlsAcceptor::from(server).accept(b).await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        s.write_all(b"pong").await?;
        s.flush().await?;
        let negotiated = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]));
        Ok(crate::tls::peer_identity(s.get_ref().1.peer_certificates()))
    };
    tokio::join!(c, s)
}

#[tokio::test]
async fn handshake_exchanges_identities() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let (a, b) = (
        id("cluster.local", "ns", "a"),
        id("cluster.local", "ns", "b"),
    );
    let client = client_config(&leaf(&ca, &a), vec![b.clone()]).unwrap();
    let server = server_config(&leaf(&ca, &b)).unwrap();
    let (c, s) = handshake(client, server).await;
    assert_eq!(c.unwrap(), Some(b));
    assert_eq!(s.unwrap(), Some(a));
}

#[tokio::test]
async fn handshake_without_client_certificate_fails() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let b = id("cluster.local", "ns", "b");
    let server = server_config(&leaf(&ca, &b)).unwrap();
    let verifier = SpiffeServerVerifier::new(ca.bundle(), vec![b]);
    let mut client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let (c, s) = handshake(std::sync::Arc::new(client), server).await;
    let s = s.unwrap_err().to_string();
    assert!(
        s.contains("NoCertificatesPresented") || s.contains("certificate"),
        "{s}"
    );
    assert!(c.is_err());
}

#[tokio::test]
async fn handshake_with_wrong_server_identity_fails_on_the_client() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let a = id("cluster.local", "ns", "a");
    let client = client_config(&leaf(&ca, &a), vec![id("cluster.local", "ns", "b")]).unwrap();
    let server = server_config(&leaf(&ca, &id("cluster.local", "ns", "mallory"))).unwrap();
    let (c, _s) = handshake(client, server).await;
    let err = c.unwrap_err().to_string();
    assert!(err.contains("mallory"), "{err}");
}

/// SPIFFE X509-SVID: exactly one URI SAN, a SPIFFE ID. A foreign ID listed first and ours
/// second must not get in (it would be named by the foreign one), nor a leaf with none.
#[test]
fn only_a_leaf_with_exactly_one_spiffe_uri_is_accepted() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let ours = id("cluster.local", "ns", "web");
    let rows: [(&str, &[&str], bool); 6] = [
        (
            "one SPIFFE ID",
            &["spiffe://cluster.local/ns/ns/sa/web"],
            true,
        ),
        (
            "foreign first, ours second",
            &[
                "spiffe://evil.example/ns/ns/sa/web",
                "spiffe://cluster.local/ns/ns/sa/web",
            ],
            false,
        ),
        (
            "ours first, foreign second",
            &[
                "spiffe://cluster.local/ns/ns/sa/web",
                "spiffe://evil.example/ns/ns/sa/web",
            ],
            false,
        ),
        (
            "ours twice",
            &[
                "spiffe://cluster.local/ns/ns/sa/web",
                "spiffe://cluster.local/ns/ns/sa/web",
            ],
            false,
        ),
        ("no URI SAN", &[], false),
        (
            "one URI, not SPIFFE",
            &["https://cluster.local/ns/ns/sa/web"],
            false,
        ),
    ];
    let name = ServerName::try_from("ignored.example").unwrap();
    for (row, uris, ok) in rows {
        let chain = ca.issue_with_uris(&ours, uris);
        let client = SpiffeClientVerifier::new(ca.bundle(), Some("cluster.local".into()))
            .verify_client_cert(&chain[0], &[], now())
            .map(|_| ());
        let server = SpiffeServerVerifier::new(ca.bundle(), vec![ours.clone()])
            .verify_server_cert(&chain[0], &[], &name, &[], now())
            .map(|_| ());
        assert_eq!(client.is_ok(), ok, "as a client, {row}: {client:?}");
        assert_eq!(server.is_ok(), ok, "as a server, {row}: {server:?}");
        if !ok {
            assert!(is_identity_mismatch(&client.unwrap_err()), "{row}");
        }
        let named = crate::tls::peer_identity(Some(&chain));
        assert_eq!(named.is_some(), ok, "{row}: named {named:?}");
        // A source handing us such a leaf is refused before we ever present it.
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(
            rcgen::KeyPair::generate().unwrap().serialize_der().into(),
        );
        let loaded = WorkloadCert::new(ours.clone(), chain, key, ca.bundle());
        assert_eq!(loaded.is_ok(), ok, "{row}: loaded as our own certificate");
    }
}

/// The record cipher is a local choice: a client sealing with ring's AES-GCM and a server with
/// aws-lc-rs's (and the other way) talk, over the suite both prefer.
#[tokio::test]
async fn ring_and_aws_lc_record_ciphers_interoperate() {
    use crate::tls::{AesGcm, client_config_with, provider_for, server_config_with};
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let (a, b) = (
        id("cluster.local", "ns", "a"),
        id("cluster.local", "ns", "b"),
    );
    for (client_side, server_side) in [(AesGcm::Ring, AesGcm::AwsLc), (AesGcm::AwsLc, AesGcm::Ring)]
    {
        let client = client_config_with(
            std::sync::Arc::new(provider_for(client_side)),
            &leaf(&ca, &a),
            vec![b.clone()],
            &Default::default(),
        )
        .unwrap();
        let server = server_config_with(
            std::sync::Arc::new(provider_for(server_side)),
            &leaf(&ca, &b),
            &Default::default(),
        )
        .unwrap();
        let (c, s) = handshake(client, server).await;
        assert_eq!(c.unwrap(), Some(b.clone()));
        assert_eq!(s.unwrap(), Some(a.clone()));
    }
}

/// The faster library wins by 10%; a forced choice wins outright; both seal measurably.
#[test]
fn the_faster_aes_gcm_is_chosen() {
    use crate::tls::{AesGcm, choose_aes_gcm, measure_aes_gcm};
    let cases = [
        (None, 3.2e9, 6.6e9, AesGcm::Ring),
        (None, 6.6e9, 3.2e9, AesGcm::AwsLc),
        (None, 6.0e9, 6.3e9, AesGcm::AwsLc),
        (Some("ring"), 9.0e9, 1.0e9, AesGcm::Ring),
        (Some("aws-lc"), 1.0e9, 9.0e9, AesGcm::AwsLc),
        (Some("bogus"), 1.0e9, 9.0e9, AesGcm::Ring),
    ];
    for (forced, aws, ring, want) in cases {
        assert_eq!(
            choose_aes_gcm(forced, aws, ring),
            want,
            "{forced:?} {aws} {ring}"
        );
    }
    let (aws, ring) = measure_aes_gcm();
    assert!(aws > 0.0 && ring > 0.0, "{aws} {ring}");
}

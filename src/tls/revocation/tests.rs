//! Revocation lists: read in both encodings, refused peers both ways, and a bad or missing
//! file never leaves fewer revocations than were in force.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, Error};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::*;
use crate::identity::ca::BuiltinCa;
use crate::identity::{Identity, WorkloadCert};
use crate::tls::verify::{SpiffeClientVerifier, SpiffeServerVerifier};

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "ns", sa).unwrap()
}

fn issue(ca: &BuiltinCa, sa: &str) -> WorkloadCert {
    ca.issue(&id(sa), SystemTime::now()).unwrap()
}

/// Both verifiers' answers for `cert` under `revocations`: (as a client, as a server).
fn verdicts(
    ca: &BuiltinCa,
    cert: &WorkloadCert,
    revocations: &Arc<Revocations>,
) -> (Result<(), Error>, Result<(), Error>) {
    let leaf = &cert.chain()[0];
    let rest = &cert.chain()[1..];
    let client = SpiffeClientVerifier::new(ca.bundle(), None)
        .revoking(Some(revocations.clone()))
        .verify_client_cert(leaf, rest, UnixTime::now())
        .map(|_| ());
    let name = ServerName::try_from("ignored.example").unwrap();
    let server = SpiffeServerVerifier::new(ca.bundle(), vec![cert.identity().clone()])
        .revoking(Some(revocations.clone()))
        .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
        .map(|_| ());
    (client, server)
}

fn revoked(r: &Result<(), Error>) -> bool {
    matches!(r, Err(Error::InvalidCertificate(CertificateError::Revoked)))
}

fn leaf_of(cert: &WorkloadCert) -> CertificateDer<'static> {
    cert.chain()[0].clone()
}

#[test]
fn a_revoked_peer_is_refused_both_ways_and_the_others_pass() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let (bad, good) = (issue(&ca, "bad"), issue(&ca, "good"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crl.pem");
    let pem = ca
        .revocation_list(&[leaf_of(&bad)], SystemTime::now())
        .unwrap();
    std::fs::write(&path, pem).unwrap();
    let revocations = Arc::new(Revocations::load(&path).unwrap());
    assert_eq!(revocations.lists().len(), 1);
    let (as_client, as_server) = verdicts(&ca, &bad, &revocations);
    assert!(revoked(&as_client), "{as_client:?}");
    assert!(revoked(&as_server), "{as_server:?}");
    let (as_client, as_server) = verdicts(&ca, &good, &revocations);
    as_client.unwrap();
    as_server.unwrap();
}

#[test]
fn der_and_pem_among_other_items_are_read() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let victim = issue(&ca, "victim");
    let pem = ca
        .revocation_list(&[leaf_of(&victim)], SystemTime::now())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crl");
    // A bundle file may carry the root beside the list: other PEM items are skipped.
    std::fs::write(&path, format!("{}{pem}", ca.root_pem())).unwrap();
    let listed = Arc::new(Revocations::load(&path).unwrap());
    assert_eq!(listed.lists().len(), 1);
    assert!(revoked(&verdicts(&ca, &victim, &listed).0));
    assert!(verdicts(&ca, &issue(&ca, "bystander"), &listed).0.is_ok());
    let der = rustls_pemfile::crls(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    std::fs::write(&path, der.as_ref()).unwrap();
    let one = Arc::new(Revocations::load(&path).unwrap());
    assert!(revoked(&verdicts(&ca, &victim, &one).1));
}

#[test]
fn an_unreadable_file_stops_the_start_and_never_replaces_lists_in_force() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let bad = issue(&ca, "bad");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crl.pem");
    std::fs::write(&path, "not a list").unwrap();
    let e = Revocations::load(&path).unwrap_err();
    assert!(e.to_string().contains("crl.pem"), "{e}");
    std::fs::write(
        &path,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(Revocations::load(&path).is_err());

    let pem = ca
        .revocation_list(&[leaf_of(&bad)], SystemTime::now())
        .unwrap();
    std::fs::write(&path, &pem).unwrap();
    let revocations = Arc::new(Revocations::load(&path).unwrap());
    std::fs::write(&path, "truncated garbage").unwrap();
    assert!(revocations.reload().is_err());
    assert!(revoked(&verdicts(&ca, &bad, &revocations).0), "kept");
    std::fs::remove_file(&path).unwrap();
    assert!(
        !revocations.reload().unwrap(),
        "a missing file keeps the lists"
    );
    assert!(revoked(&verdicts(&ca, &bad, &revocations).0));
}

#[test]
fn a_list_that_appears_or_changes_applies_on_reload_and_an_empty_one_revokes_nothing() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let bad = issue(&ca, "bad");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crl.pem");
    let revocations = Arc::new(Revocations::load(&path).unwrap());
    assert!(revocations.lists().is_empty());
    assert!(verdicts(&ca, &bad, &revocations).0.is_ok());
    let pem = ca
        .revocation_list(&[leaf_of(&bad)], SystemTime::now())
        .unwrap();
    std::fs::write(&path, &pem).unwrap();
    assert!(revocations.reload().unwrap());
    assert!(!revocations.reload().unwrap(), "same bytes: no change");
    assert!(revoked(&verdicts(&ca, &bad, &revocations).0));
    std::fs::write(&path, "").unwrap();
    assert!(revocations.reload().unwrap());
    assert!(verdicts(&ca, &bad, &revocations).0.is_ok());
}

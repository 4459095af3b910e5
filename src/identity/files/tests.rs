//! Tests of `files`: loading, errors that name the file, and pick-up of rotated files.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;
use crate::identity::CertificateManager;
use crate::identity::ca::BuiltinCa;

/// Writes a certificate for `id` from `ca` (and `bundle` as the trust bundle) into `dir`.
fn write(dir: &Path, ca: &BuiltinCa, id: &Identity, bundle: &str) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = ca
        .sign_csr(&csr, SystemTime::now(), Duration::from_secs(3600))
        .unwrap();
    std::fs::write(dir.join("cert.pem"), &chain[0]).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("bundle.pem"), bundle).unwrap();
}

fn source(dir: &Path) -> FileSource {
    FileSource {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        bundle: dir.join("bundle.pem"),
        poll: Duration::from_millis(50),
    }
}

fn id() -> Identity {
    Identity::new("cluster.local", "ns", "web").unwrap()
}

#[tokio::test]
async fn loads_and_picks_up_rotated_files_and_roots() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (
        BuiltinCa::generate(SystemTime::now()).unwrap(),
        BuiltinCa::generate(SystemTime::now()).unwrap(),
    );
    write(dir.path(), &old_ca, &id(), old_ca.root_pem());
    let mgr = CertificateManager::new(Arc::new(source(dir.path())));
    let first = mgr.fetch(&id()).await.unwrap();
    assert_eq!(first.bundle().certs().len(), 1);

    // Root rotation, step 1: the bundle now trusts both roots; the leaf is unchanged.
    let both = format!("{}{}", old_ca.root_pem(), new_ca.root_pem());
    std::fs::write(dir.path().join("bundle.pem"), &both).unwrap();
    let mut cert = first.clone();
    for _ in 0..100 {
        cert = mgr.fetch(&id()).await.unwrap();
        if cert.bundle().certs().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        cert.bundle().certs().len(),
        2,
        "the overlapping bundle was not picked up"
    );
    assert_eq!(cert.chain(), first.chain());

    // Step 2: a leaf from the new root.
    write(dir.path(), &new_ca, &id(), &both);
    for _ in 0..100 {
        cert = mgr.fetch(&id()).await.unwrap();
        if cert.chain() != first.chain() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(
        cert.chain(),
        first.chain(),
        "the rotated leaf was not picked up"
    );
}

#[tokio::test]
async fn errors_name_the_file_or_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let err = source(dir.path())
        .fetch(&id())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cert.pem") && err.contains("certificate files"),
        "{err}"
    );
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    write(dir.path(), &ca, &id(), ca.root_pem());
    let other = Identity::new("cluster.local", "ns", "someone-else").unwrap();
    let err = source(dir.path())
        .fetch(&other)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("someone-else") && err.contains("sa/web"),
        "{err}"
    );
    std::fs::write(dir.path().join("key.pem"), "no key here").unwrap();
    let err = source(dir.path())
        .fetch(&id())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("key.pem"), "{err}");
}

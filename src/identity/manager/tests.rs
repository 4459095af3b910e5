//! Tests of `manager`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::identity::ca::BuiltinCa;

/// A source that issues from a CA until told to fail, and counts its calls.
struct Flaky {
    ca: BuiltinCa,
    fail: std::sync::atomic::AtomicBool,
    calls: AtomicUsize,
    validity: Duration,
}

impl CertSource for Flaky {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(CertError::Source {
                    identity: id.to_string(),
                    source_name: "test",
                    reason: "down".into(),
                });
            }
            let now = SystemTime::now();
            // Already past half of life when issued, so every fetch refreshes.
            self.ca
                .issue_between(id, now - self.validity, now + self.validity / 2)
                .map_err(|e| CertError::Invalid {
                    identity: id.to_string(),
                    reason: e.to_string(),
                })
        })
    }
    fn name(&self) -> &'static str {
        "test"
    }
}

fn flaky(validity: Duration) -> Arc<Flaky> {
    Arc::new(Flaky {
        ca: BuiltinCa::generate(SystemTime::now()).unwrap(),
        fail: false.into(),
        calls: AtomicUsize::new(0),
        validity,
    })
}

#[tokio::test]
async fn caches_fresh_certificates() {
    let ca = Arc::new(BuiltinCa::generate(SystemTime::now()).unwrap());
    let mgr = CertificateManager::new(ca);
    let id = Identity::new("td", "a", "b").unwrap();
    let a = mgr.fetch(&id).await.unwrap();
    let b = mgr.fetch(&id).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    mgr.forget(&id);
    let c = mgr.fetch(&id).await.unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
}

#[tokio::test]
async fn keeps_a_valid_certificate_while_the_source_fails() {
    let src = flaky(Duration::from_secs(3600));
    let mgr = CertificateManager::new(src.clone());
    let id = Identity::new("td", "a", "b").unwrap();
    let first = mgr.fetch(&id).await.unwrap();
    src.fail.store(true, Ordering::SeqCst);
    let again = mgr.fetch(&id).await.unwrap();
    assert!(Arc::ptr_eq(&first, &again));
    assert_eq!(
        src.calls.load(Ordering::SeqCst),
        2,
        "a refresh was attempted"
    );
}

#[tokio::test]
async fn fails_closed_when_the_certificate_expired() {
    let src = flaky(Duration::from_secs(2));
    let mgr = CertificateManager::new(src.clone());
    let id = Identity::new("td", "a", "b").unwrap();
    mgr.fetch(&id).await.unwrap();
    src.fail.store(true, Ordering::SeqCst);
    // The certificate was issued valid for one more second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = mgr.fetch(&id).await.unwrap_err().to_string();
    assert!(
        err.contains("expired") && err.contains("spiffe://td/ns/a/sa/b"),
        "{err}"
    );
}

#[tokio::test]
async fn no_certificate_names_identity_and_source() {
    let src = flaky(Duration::from_secs(3600));
    src.fail.store(true, Ordering::SeqCst);
    let mgr = CertificateManager::new(src);
    let id = Identity::new("td", "a", "b").unwrap();
    let err = mgr.fetch(&id).await.unwrap_err().to_string();
    assert!(
        err.contains("spiffe://td/ns/a/sa/b") && err.contains("test"),
        "{err}"
    );
}

#[test]
fn refresh_point_is_half_of_life() {
    let ca = BuiltinCa::generate(SystemTime::now()).unwrap();
    let id = Identity::new("td", "a", "b").unwrap();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let cert = ca
        .issue_between(&id, start, start + Duration::from_secs(3600))
        .unwrap();
    assert!(!cert.wants_refresh_at(start + Duration::from_secs(1799)));
    assert!(cert.wants_refresh_at(start + Duration::from_secs(1800)));
    assert!(cert.is_valid_at(start + Duration::from_secs(3599)));
    assert!(!cert.is_valid_at(start + Duration::from_secs(3600)));
}

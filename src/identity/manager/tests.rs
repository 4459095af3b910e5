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
                return Err(CertError::from_source(
                    id,
                    "test",
                    crate::identity::ca::CaError::Root("down".into()),
                ));
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

/// The built-in CA, counting fetches and the source's `forget`s.
#[derive(Default)]
struct Counting {
    ca: Option<BuiltinCa>,
    fetches: AtomicUsize,
    forgets: AtomicUsize,
}

impl CertSource for Counting {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.ca.as_ref().expect("a CA").fetch(id)
    }
    fn name(&self) -> &'static str {
        "test"
    }
    fn forget(&self, _id: &Identity) {
        self.forgets.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_identity_is_served_but_not_kept_until_held_again() {
    let src = Arc::new(Counting {
        ca: Some(BuiltinCa::generate(SystemTime::now()).unwrap()),
        ..Counting::default()
    });
    let mgr = CertificateManager::new(src.clone());
    let id = Identity::new("td", "a", "b").unwrap();
    let held =
        |mgr: &CertificateManager| mgr.held().into_iter().map(|(i, _)| i).collect::<Vec<_>>();
    mgr.fetch(&id).await.unwrap();
    assert_eq!(held(&mgr), std::slice::from_ref(&id));
    mgr.forget(&id);
    assert!(held(&mgr).is_empty());
    assert_eq!(src.forgets.load(Ordering::SeqCst), 1);
    // A late caller (a connection begun before the pod left) still gets a certificate, but
    // the identity is not brought back: nothing held, nothing renewed, the source told again.
    let before = src.fetches.load(Ordering::SeqCst);
    let late = mgr.fetch(&id).await.unwrap();
    assert_eq!(late.identity(), &id);
    mgr.fetch(&id).await.unwrap();
    assert_eq!(src.fetches.load(Ordering::SeqCst), before + 2, "not cached");
    assert!(held(&mgr).is_empty());
    assert_eq!(src.forgets.load(Ordering::SeqCst), 3);
    // A pod with the identity again: kept and cached from then on.
    mgr.hold(&id);
    let a = mgr.fetch(&id).await.unwrap();
    let b = mgr.fetch(&id).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(held(&mgr), std::slice::from_ref(&id));
    // Retirement ends on its own: long after a forget, a fetch keeps the identity again.
    let other = Identity::new("td", "a", "c").unwrap();
    mgr.forget(&other);
    tokio::time::advance(RETIRED_FOR + Duration::from_secs(1)).await;
    mgr.fetch(&other).await.unwrap();
    assert!(held(&mgr).contains(&other));
}

#[tokio::test]
async fn keeps_a_valid_certificate_while_the_source_fails() {
    let src = flaky(Duration::from_secs(3600));
    let mgr = CertificateManager::new(src.clone());
    let id = Identity::new("td", "a", "b").unwrap();
    src.fail.store(true, Ordering::SeqCst);
    assert!(
        mgr.fetch(&id).await.is_err(),
        "no certificate yet: fail closed"
    );
    src.fail.store(false, Ordering::SeqCst);
    // The failure is remembered for a moment (no hammering), then the source is asked again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let first = mgr.fetch(&id).await.unwrap();
    src.fail.store(true, Ordering::SeqCst);
    // Already past half of its life: the background renewal tries, fails, and the valid
    // certificate keeps being served.
    let calls = src.calls.load(Ordering::SeqCst);
    for _ in 0..200 {
        if mgr.metrics().renewal_failures.get() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(mgr.metrics().renewal_failures.get() > 0);
    assert!(
        src.calls.load(Ordering::SeqCst) > calls,
        "a renewal was attempted"
    );
    let again = mgr.fetch(&id).await.unwrap();
    assert!(Arc::ptr_eq(&first, &again));
}

/// A source issuing from a CA at the manager's (paused) clock.
struct Clocked {
    ca: BuiltinCa,
    clock: Clock,
}

impl CertSource for Clocked {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        Box::pin(async move {
            self.ca
                .issue(id, (self.clock)())
                .map_err(|e| CertError::Invalid {
                    identity: id.to_string(),
                    reason: e.to_string(),
                })
        })
    }
    fn name(&self) -> &'static str {
        "clocked"
    }
}

#[tokio::test(start_paused = true)]
async fn rotation_renews_before_expiry_with_no_gap() {
    let start = tokio::time::Instant::now();
    let base = SystemTime::now();
    let clock: Clock = Arc::new(move || base + start.elapsed());
    let ca = BuiltinCa::generate(base)
        .unwrap()
        .with_lifetime(Duration::from_secs(3600));
    let src = Arc::new(Clocked {
        ca,
        clock: clock.clone(),
    });
    let mgr = CertificateManager::with_clock(src, clock.clone());
    let id = Identity::new("td", "a", "b").unwrap();
    let mut seen: Vec<Arc<WorkloadCert>> = vec![mgr.fetch(&id).await.unwrap()];
    // Three simulated hours, checked every simulated minute.
    for _ in 0..180 {
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        let now = clock();
        let cert = mgr.fetch(&id).await.unwrap();
        assert!(
            cert.is_valid_at(now),
            "a gap: no valid certificate at {now:?}"
        );
        let last = seen.last().unwrap();
        if !Arc::ptr_eq(last, &cert) {
            // Renewed while the previous one was still valid, around its half-life.
            assert!(last.is_valid_at(now), "renewed only after expiry");
            assert!(last.wants_refresh_at(now));
            seen.push(cert);
        }
    }
    // 1 h certificates renewed every 30 min over 3 h.
    assert!(
        (6..=7).contains(&(seen.len() - 1)),
        "{} renewals",
        seen.len() - 1
    );
    assert_eq!(mgr.metrics().renewals.get() as usize, seen.len() - 1);
    assert_eq!(mgr.expiries().len(), 1);
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

/// Any source's own error is kept, typed, in a `CertError` (the manager names no source).
#[test]
fn a_sources_error_is_kept_typed() {
    let id = Identity::new("cluster.local", "ns", "sa").unwrap();
    let e = CertError::from_source(
        &id,
        "test",
        crate::identity::ca::CaError::Root("down".into()),
    );
    let CertError::Source { reason, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(
        reason
            .downcast_ref::<crate::identity::ca::CaError>()
            .is_some()
    );
    assert!(e.to_string().contains("down"), "{e}");
}

//! Workload certificates and the per-identity cache in front of a certificate source.
//!
//! [`CertSource`] is the seam for where certificates come from (the built-in CA today; files,
//! SPIRE and the Istio CA plug in the same way). [`CertificateManager`] keeps one certificate
//! per identity, fetches on first use, renews it in the background at half of its lifetime
//! (see `schedule`), and keeps serving a still-valid certificate while the source fails. It
//! never serves an expired one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::Identity;
use crate::sync::Lock;
use crate::tls::{self, TrustBundle};

/// A boxed future, so that [`CertSource`] stays object safe.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why no usable certificate could be had for an identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {identity} from the {source_name}: {reason}")]
    Source {
        identity: String,
        source_name: &'static str,
        /// The source's own error, typed (`SourceError::downcast_ref`); shown in this one's
        /// message rather than chained, so it is not printed twice.
        reason: SourceError,
    },
    #[error("invalid certificate for {identity}: {reason}")]
    Invalid { identity: String, reason: String },
    #[error("certificate for {identity} expired and the {source_name} gave no new one: {reason}")]
    Expired {
        identity: String,
        source_name: &'static str,
        reason: Box<CertError>,
    },
}

/// What went wrong inside a certificate source, as that source's own error (shared, so a
/// failure remembered for fast retries is the same value the first caller saw). Any source's
/// error fits: the manager names no source, and a new one adds no variant here.
#[derive(Debug, Clone)]
pub struct SourceError(Arc<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceError {
    /// The source's own error is this one's display; its cause is this one's cause.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl SourceError {
    /// A source's own error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SourceError(Arc::new(e))
    }

    /// The source's own error, if it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref()
    }
}

impl CertError {
    /// A source's failure for `identity`.
    pub(crate) fn from_source(
        identity: &Identity,
        source_name: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        CertError::Source {
            identity: identity.to_string(),
            source_name,
            reason: SourceError::new(e),
        }
    }
}

/// Where workload certificates come from.
pub trait CertSource: Send + Sync + 'static {
    /// Fetches a fresh certificate for `id`.
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>>;
    /// A short name for logs and errors ("built-in CA", "SPIRE", ...).
    fn name(&self) -> &'static str;
    /// Sources whose material can change at any time (files) are asked again this often.
    fn poll_interval(&self) -> Option<std::time::Duration> {
        None
    }
    /// The identity left the node: drop whatever the source keeps for it (subscriptions).
    fn forget(&self, _id: &Identity) {}
}

/// A workload's certificate chain and key, ready for rustls, with the bundle that verifies peers.
#[derive(Clone)]
pub struct WorkloadCert {
    identity: Identity,
    certified: Arc<CertifiedKey>,
    bundle: Arc<TrustBundle>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Checks that the leaf names `identity` and loads the key; the chain is leaf first.
    pub(crate) fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Arc<TrustBundle>,
    ) -> Result<Self, CertError> {
        let invalid = |reason: String| CertError::Invalid {
            identity: identity.to_string(),
            reason,
        };
        let leaf = chain.first().ok_or_else(|| invalid("empty chain".into()))?;
        let info = tls::leaf_info(leaf).map_err(|e| invalid(e.to_string()))?;
        // An X.509-SVID names exactly one SPIFFE ID; peers refuse any other shape.
        match tls::verify::svid_identity(&info.uris) {
            Ok(named) if named == identity => {}
            Ok(named) => {
                return Err(invalid(format!(
                    "leaf names {named}, not the requested identity"
                )));
            }
            Err(e) => return Err(invalid(e.to_string())),
        }
        let signer = tls::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| invalid(format!("private key: {e}")))?;
        let certified = Arc::new(CertifiedKey::new(chain, signer));
        Ok(WorkloadCert {
            identity,
            certified,
            bundle,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Leaf first, then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// The roots this certificate's peers must chain to.
    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    pub(crate) fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Valid at `now`.
    pub(crate) fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Past half of its lifetime at `now`: time to fetch a new one.
    pub fn wants_refresh_at(&self, now: SystemTime) -> bool {
        let half = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
            / 2;
        now >= self.not_before + half
    }
}

/// The time source: `SystemTime::now` in production, a paused-time clock in tests.
pub(crate) type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// After a failed fetch, callers within this window get the same error at once instead of
/// asking the source again: an unreachable CA is not hammered by every new connection.
const FAIL_FAST: std::time::Duration = std::time::Duration::from_secs(1);

/// The least time between two renewal attempts of one identity.
const RENEW_FLOOR: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a forgotten identity stays retired (see [`Slots::retired`]): far longer than any
/// connection takes to ask for its certificate, so one that began before its pod left or moved
/// cannot bring the identity back, and short enough that the set stays small under churn.
const RETIRED_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// One identity's certificate and the machinery that keeps it fresh.
#[derive(Default)]
struct Slot {
    current: Lock<Option<Arc<WorkloadCert>>>,
    /// Serializes fetches for this identity (first fetch, renewals).
    fetching: tokio::sync::Mutex<()>,
    last_failure: Lock<Option<(tokio::time::Instant, CertError)>>,
    renewer: Lock<Option<tokio::task::JoinHandle<()>>>,
}

impl Slot {
    fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.current.lock().clone()
    }

    /// Stores `cert` unless it is the very certificate and bundle already held (a file source
    /// re-read); a new bundle alone (root rotation) is a change.
    fn store(&self, cert: WorkloadCert) -> Arc<WorkloadCert> {
        let mut current = self.current.lock();
        if let Some(old) = current.as_ref()
            && old.chain() == cert.chain()
            && old.bundle().certs() == cert.bundle().certs()
        {
            return old.clone();
        }
        let cert = Arc::new(cert);
        *current = Some(cert.clone());
        cert
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(task) = self.renewer.get_mut().take() {
            task.abort();
        }
    }
}

/// The identities a [`CertificateManager`] keeps certificates for, and those it forgot lately.
#[derive(Default)]
struct Slots {
    held: HashMap<Identity, Arc<Slot>>,
    /// Identities forgotten within [`RETIRED_FOR`], and when. A fetch for one (a connection
    /// that began before its pod left the node or moved to another trust domain, a pod's first
    /// fetch still queued when it moved) is served once and not kept: without this, it would
    /// bring the identity back and renew it for nobody from then on. [`CertificateManager::hold`]
    /// takes an identity out (a pod with it enrolled again).
    retired: HashMap<Identity, tokio::time::Instant>,
}

impl Slots {
    fn is_retired(&self, id: &Identity) -> bool {
        self.retired
            .get(id)
            .is_some_and(|at| at.elapsed() < RETIRED_FOR)
    }
}

/// Counters for the metrics endpoint (shared atomics: clones count together).
#[derive(Debug, Default)]
pub struct CertMetrics {
    pub renewals: prometheus_client::metrics::counter::Counter,
    pub renewal_failures: prometheus_client::metrics::counter::Counter,
}

/// One certificate per identity: fetched on first use, then renewed in the background at half
/// of its lifetime (retrying with capped, jittered backoff while the source fails), used while
/// still valid when renewals fail, and refused once expired (fail closed).
pub struct CertificateManager {
    source: Arc<dyn CertSource>,
    slots: Lock<Slots>,
    clock: Clock,
    metrics: Arc<CertMetrics>,
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("source", &self.source.name())
            .finish_non_exhaustive()
    }
}

impl CertificateManager {
    pub fn new(source: Arc<dyn CertSource>) -> Self {
        Self::with_clock(source, Arc::new(SystemTime::now))
    }

    pub(crate) fn with_clock(source: Arc<dyn CertSource>, clock: Clock) -> Self {
        CertificateManager {
            source,
            slots: Lock::new(Slots::default()),
            clock,
            metrics: Arc::new(CertMetrics::default()),
        }
    }

    pub fn metrics(&self) -> &CertMetrics {
        &self.metrics
    }

    /// Identities held and each one's current certificate (`None` while there is none).
    pub(crate) fn held(&self) -> Vec<(Identity, Option<Arc<WorkloadCert>>)> {
        let slots = self.slots.lock();
        let mut held: Vec<_> = slots
            .held
            .iter()
            .map(|(id, slot)| (id.clone(), slot.current()))
            .collect();
        held.sort_by(|a, b| a.0.cmp(&b.0));
        held
    }

    /// Identities held and the expiry of each one's current certificate.
    pub(crate) fn expiries(&self) -> Vec<(Identity, SystemTime)> {
        let slots = self.slots.lock();
        slots
            .held
            .iter()
            .filter_map(|(id, slot)| slot.current().map(|c| (id.clone(), c.not_after())))
            .collect()
    }

    /// The certificate for `id`. A held certificate is returned while valid (renewal runs in
    /// the background); with none, or an expired one, the source is asked now. Must be called
    /// inside a tokio runtime (the renewal task is spawned on first use). An identity forgotten
    /// lately is fetched once and not kept (see [`Slots::retired`]).
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let slot = {
            let mut slots = self.slots.lock();
            match slots.held.get(id) {
                Some(slot) => Some(slot.clone()),
                None if slots.is_retired(id) => None,
                None => Some(slots.held.entry(id.clone()).or_default().clone()),
            }
        };
        let Some(slot) = slot else {
            return self.fetch_once(id).await;
        };
        if let Some(cert) = slot.current()
            && cert.is_valid_at((self.clock)())
        {
            return Ok(cert);
        }
        let result = self.fetch_now(id, &slot).await;
        let mut renewer = slot.renewer.lock();
        if renewer.is_none() {
            let task = renew_loop(
                Arc::downgrade(&slot),
                id.clone(),
                self.source.clone(),
                self.clock.clone(),
                self.metrics.clone(),
                u32::from(result.is_err()),
            );
            *renewer = Some(tokio::spawn(task));
        }
        result
    }

    async fn fetch_now(&self, id: &Identity, slot: &Slot) -> Result<Arc<WorkloadCert>, CertError> {
        let _one_at_a_time = slot.fetching.lock().await;
        let now = (self.clock)();
        let held = slot.current();
        if let Some(cert) = held.as_ref().filter(|c| c.is_valid_at(now)) {
            return Ok(cert.clone());
        }
        let recent_failure = slot
            .last_failure
            .lock()
            .as_ref()
            .filter(|(at, _)| at.elapsed() < FAIL_FAST)
            .map(|(_, e)| e.clone());
        let outcome = match recent_failure {
            Some(e) => Err(e),
            None => self.source.fetch(id).await,
        };
        match outcome {
            Ok(cert) => Ok(slot.store(cert)),
            Err(err) => {
                *slot.last_failure.lock() = Some((tokio::time::Instant::now(), err.clone()));
                Err(match held {
                    Some(_) => CertError::Expired {
                        identity: id.to_string(),
                        source_name: self.source.name(),
                        reason: Box::new(err),
                    },
                    None => err,
                })
            }
        }
    }

    /// A retired identity's certificate, for one caller: nothing kept, and whatever the source
    /// opened for it (a SPIRE subscription) closed again unless a pod took the identity since.
    async fn fetch_once(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        tracing::debug!(identity = %id, "certificate of a retired identity, fetched for one connection");
        let result = self.fetch_now(id, &Slot::default()).await;
        let slots = self.slots.lock();
        if !slots.held.contains_key(id) {
            self.source.forget(id);
        }
        result
    }

    /// A pod with identity `id` is served from now on: a fetch keeps and renews its certificate
    /// again even if the identity was forgotten lately (see [`Slots::retired`]).
    pub fn hold(&self, id: &Identity) {
        self.slots.lock().retired.remove(id);
    }

    /// Forgets the certificate of an identity no longer on this node (stops its renewals); a
    /// fetch for it within [`RETIRED_FOR`] does not bring it back, unless [`Self::hold`] does.
    pub fn forget(&self, id: &Identity) {
        let mut slots = self.slots.lock();
        slots.held.remove(id);
        slots.retired.retain(|_, at| at.elapsed() < RETIRED_FOR);
        slots
            .retired
            .insert(id.clone(), tokio::time::Instant::now());
        self.source.forget(id);
    }
}

/// Renews one identity's certificate on the [`super::schedule`] until the slot is forgotten.
async fn renew_loop(
    slot: std::sync::Weak<Slot>,
    id: Identity,
    source: Arc<dyn CertSource>,
    clock: Clock,
    metrics: Arc<CertMetrics>,
    mut failures: u32,
) {
    loop {
        let validity = {
            let Some(slot) = slot.upgrade() else { return };
            slot.current().map(|c| (c.not_before(), c.not_after()))
        };
        let mut delay = super::schedule::next_attempt(validity, failures, clock(), rand::random());
        if let Some(poll) = source.poll_interval() {
            delay = delay.min(poll);
        }
        // A source that hands back a certificate already past its renewal point (an old file,
        // a CA issuing very short lifetimes) must not turn this loop into a busy spin.
        delay = delay.max(RENEW_FLOOR);
        tokio::time::sleep(delay).await;
        let Some(slot) = slot.upgrade() else { return };
        let _one_at_a_time = slot.fetching.lock().await;
        match source.fetch(&id).await {
            Ok(cert) => {
                let before = slot.current();
                let stored = slot.store(cert);
                if before.is_none_or(|b| !Arc::ptr_eq(&b, &stored)) {
                    metrics.renewals.inc();
                    tracing::info!(identity = %id, not_after = ?stored.not_after(), "certificate renewed");
                }
                *slot.last_failure.lock() = None;
                failures = 0;
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                metrics.renewal_failures.inc();
                tracing::warn!(identity = %id, error = %err, failures, "certificate renewal failed; keeping the current certificate while it is valid");
                *slot.last_failure.lock() = Some((tokio::time::Instant::now(), err));
            }
        }
    }
}

#[cfg(test)]
mod tests;

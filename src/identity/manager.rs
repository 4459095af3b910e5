//! Workload certificates and the per-identity cache in front of a certificate source.
//!
//! [`CertSource`] is the seam for where certificates come from (the built-in CA today; files,
//! SPIRE and the Istio CA plug in the same way). [`CertificateManager`] keeps one certificate
//! per identity, fetches on first use, refreshes one past half of its lifetime, and keeps
//! serving a still-valid certificate while the source fails. It never serves an expired one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::Identity;
use crate::tls::{self, TrustBundle};

/// A boxed future, so that [`CertSource`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why no usable certificate could be had for an identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {identity} from the {source_name}: {reason}")]
    Source {
        identity: String,
        source_name: &'static str,
        reason: String,
    },
    #[error("invalid certificate for {identity}: {reason}")]
    Invalid { identity: String, reason: String },
    #[error("certificate for {identity} expired and the {source_name} gave no new one: {reason}")]
    Expired {
        identity: String,
        source_name: &'static str,
        reason: String,
    },
}

/// Where workload certificates come from.
pub trait CertSource: Send + Sync + 'static {
    /// Fetches a fresh certificate for `id`.
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>>;
    /// A short name for logs and errors ("built-in CA", "SPIRE", ...).
    fn name(&self) -> &'static str;
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
    pub fn new(
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
        if !info.uris.iter().any(|u| u == &identity.to_string()) {
            return Err(invalid(format!(
                "leaf names {:?}, not the requested identity",
                info.uris
            )));
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

    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
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

type Slot = Arc<tokio::sync::Mutex<Option<Arc<WorkloadCert>>>>;

/// One certificate per identity, fetched from a [`CertSource`] on first use.
pub struct CertificateManager {
    source: Arc<dyn CertSource>,
    slots: Mutex<HashMap<Identity, Slot>>,
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
        CertificateManager {
            source,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The certificate for `id`: cached while in its first half of life, else fetched. A fetch
    /// failure falls back to the cached certificate while it is still valid (fail closed after).
    /// Concurrent callers for one identity share one fetch.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(id.clone()).or_default().clone()
        };
        let mut cached = slot.lock().await;
        let now = SystemTime::now();
        if let Some(cert) = cached.as_ref()
            && cert.is_valid_at(now)
            && !cert.wants_refresh_at(now)
        {
            return Ok(cert.clone());
        }
        match self.source.fetch(id).await {
            Ok(cert) => {
                let cert = Arc::new(cert);
                *cached = Some(cert.clone());
                Ok(cert)
            }
            Err(err) => match cached.as_ref() {
                Some(cert) if cert.is_valid_at(now) => {
                    tracing::warn!(identity = %id, error = %err, "certificate renewal failed; using the current certificate until it expires");
                    Ok(cert.clone())
                }
                Some(_) => Err(CertError::Expired {
                    identity: id.to_string(),
                    source_name: self.source.name(),
                    reason: err.to_string(),
                }),
                None => Err(err),
            },
        }
    }

    /// Forgets the certificate of an identity no longer on this node.
    pub fn forget(&self, id: &Identity) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(id);
    }
}

#[cfg(test)]
mod tests;

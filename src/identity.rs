//! Workload identity: the SPIFFE ID type, and (in submodules) where certificates come from.
//!
//! An [`Identity`] is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. This module
//! owns parsing, formatting and validation; it does no I/O. The built-in CA lives in
//! [`ca`], the certificate cache in [`manager`]. [`LocalPods`] tells a source that attests a
//! pod itself (SPIRE by PID) which enrolled pods carry an identity.

pub mod ca;
pub(crate) mod files;
pub mod istio_ca;
pub mod manager;
pub(crate) mod schedule;
pub mod spire;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::sync::Lock;

pub use manager::{CertSource, CertificateManager, WorkloadCert};

/// The trust domain used when a workload names none.
pub(crate) const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The service account used when a workload names none.
pub(crate) const DEFAULT_SERVICE_ACCOUNT: &str = "default";

const SCHEME: &str = "spiffe://";

/// A workload's SPIFFE identity, always in the Kubernetes shape `ns/<ns>/sa/<sa>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string or a set of fields is not a usable SPIFFE identity.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    NotSpiffe(String),
    #[error("{0:?} has an invalid trust domain: use lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    #[error("{0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Path(String),
    #[error("{value:?} is not a valid {field}: use letters, digits, '.', '-' or '_'")]
    Segment { field: &'static str, value: String },
}

impl Identity {
    /// Builds an identity from workload fields, applying the defaults for an empty trust domain
    /// (`cluster.local`) and an empty service account (`default`).
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let trust_domain = if trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN
        } else {
            trust_domain
        };
        let service_account = if service_account.is_empty() {
            DEFAULT_SERVICE_ACCOUNT
        } else {
            service_account
        };
        check_trust_domain(trust_domain)?;
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>` strictly: a certificate that carries an empty
    /// segment is malformed, so the defaults of [`Identity::new`] do not apply here.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe(uri.to_owned()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::Path(uri.to_owned()))?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError::Path(uri.to_owned()));
        };
        if trust_domain.is_empty() {
            return Err(IdentityError::TrustDomain(uri.to_owned()));
        }
        if ns.is_empty() || sa.is_empty() {
            return Err(IdentityError::Path(uri.to_owned()));
        }
        Identity::new(trust_domain, ns, sa)
    }

    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse(s)
    }
}

fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::TrustDomain(td.to_owned()))
    }
}

fn check_segment(field: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Segment {
            field,
            value: value.to_owned(),
        })
    }
}

/// A local pod's identity as it is now. The node agent names the pod's namespace and service
/// account, which never change; its trust domain is the one the pod's workload in discovery
/// carries (istiod sends each workload's `trust_domain`, the proxy-wide setting stands in until
/// the workload is known), so it may change once the pod runs. Cheap to clone; every clone sees
/// the change.
#[derive(Clone)]
pub struct LiveIdentity(Arc<std::sync::RwLock<Arc<Identity>>>);

impl LiveIdentity {
    pub fn new(identity: Identity) -> Self {
        LiveIdentity(Arc::new(std::sync::RwLock::new(Arc::new(identity))))
    }

    /// The identity now.
    pub fn get(&self) -> Arc<Identity> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Moves the identity to `trust_domain`; the identity it had, if that changed it.
    pub(crate) fn set_trust_domain(
        &self,
        trust_domain: &str,
    ) -> Result<Option<Identity>, IdentityError> {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        if current.trust_domain == trust_domain {
            return Ok(None);
        }
        let moved = Identity::new(trust_domain, &current.namespace, &current.service_account)?;
        let old = std::mem::replace(&mut *current, Arc::new(moved));
        Ok(Some(Arc::unwrap_or_clone(old)))
    }
}

impl From<Identity> for LiveIdentity {
    fn from(identity: Identity) -> Self {
        LiveIdentity::new(identity)
    }
}

impl fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LiveIdentity({})", self.get())
    }
}

impl fmt::Display for LiveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}

/// The pods enrolled on this node (by UID) and their identities: written by the pod registry
/// as pods come and go, read by a certificate source that attests a pod from one of its
/// processes. Cheap to clone; every clone is the same registry.
#[derive(Debug, Default, Clone)]
pub struct LocalPods(Arc<Lock<HashMap<String, Identity>>>);

impl LocalPods {
    /// Pod `uid`, enrolled with `identity` (again: the identity replaced).
    pub fn insert(&self, uid: &str, identity: &Identity) {
        self.0.lock().insert(uid.to_owned(), identity.clone());
    }

    /// Pod `uid` left the node.
    pub fn remove(&self, uid: &str) {
        self.0.lock().remove(uid);
    }

    /// Every pod left the node (the proxy drains).
    pub fn clear(&self) {
        self.0.lock().clear();
    }

    /// The UIDs of the enrolled pods with `identity`, sorted.
    pub fn with_identity(&self, identity: &Identity) -> Vec<String> {
        let mut uids: Vec<String> = self
            .0
            .lock()
            .iter()
            .filter(|(_, id)| *id == identity)
            .map(|(uid, _)| uid.clone())
            .collect();
        uids.sort_unstable();
        uids
    }
}

#[cfg(test)]
mod tests;

//! Certificate revocation lists (ztunnel's `CRL_PATH`, which Istio's chart sets when
//! `peerCaCrl.enabled`): one file of PEM (one or more `X509 CRL` blocks) or DER, read at start
//! and again whenever its bytes change. A peer whose leaf or intermediate a list revokes is
//! refused both ways, on the next handshake after the list arrives.
//!
//! Fails closed where ztunnel logs and goes on: a file that is there but unreadable stops the
//! proxy at start, and a later unreadable version keeps the lists read before (never none). A
//! file not there yet (its volume still being written) means no revocations until it appears,
//! as in ztunnel. An empty file revokes nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::CertificateRevocationListDer;
use webpki::{CertRevocationList, OwnedCertRevocationList};

/// Why a revocation file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("cannot read the revocation list {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the revocation list {path} is not PEM or DER CRLs: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// The revocation lists in force, and the file they come from.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    /// The file's bytes the lists were read from, to notice a change.
    current: RwLock<(Vec<u8>, Arc<Vec<CertRevocationList<'static>>>)>,
}

impl Revocations {
    /// Reads `path` (absent: nothing revoked until it appears).
    pub fn load(path: &Path) -> Result<Self, RevocationError> {
        let (bytes, lists) = match std::fs::read(path) {
            Ok(bytes) => {
                let lists = parse(path, &bytes)?;
                (bytes, lists)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "the revocation list is not there yet; nothing is revoked until it appears");
                (Vec::new(), Vec::new())
            }
            Err(source) => {
                return Err(RevocationError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Revocations {
            path: path.to_owned(),
            current: RwLock::new((bytes, Arc::new(lists))),
        })
    }

    /// The lists in force now.
    pub(crate) fn lists(&self) -> Arc<Vec<CertRevocationList<'static>>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Reads the file again; the lists change only if its bytes did and they parse. Whether
    /// they changed.
    pub fn reload(&self) -> Result<bool, RevocationError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            // Removed (a ConfigMap update swaps a symlink): keep what we have until it is back.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(RevocationError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        if self.current.read().unwrap_or_else(|p| p.into_inner()).0 == bytes {
            return Ok(false);
        }
        let lists = parse(&self.path, &bytes)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (bytes, Arc::new(lists));
        Ok(true)
    }

    /// Reloads every `period` for as long as `self` is held elsewhere.
    pub fn watch(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(me) = weak.upgrade() else { return };
                match me.reload() {
                    Ok(true) => {
                        tracing::info!(path = %me.path.display(), lists = me.lists().len(), "revocation list reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "revocation list not reloaded; the previous one stays in force")
                    }
                }
            }
        });
    }
}

/// The CRLs in `bytes`: PEM blocks (other PEM items skipped), or one DER list.
fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<CertRevocationList<'static>>, RevocationError> {
    let bad = |reason: String| RevocationError::Parse {
        path: path.to_owned(),
        reason,
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let ders: Vec<CertificateRevocationListDer<'static>> = if bytes.starts_with(b"-----BEGIN") {
        let mut reader = std::io::BufReader::new(bytes);
        let mut ders = Vec::new();
        for item in rustls_pemfile::read_all(&mut reader) {
            match item {
                Ok(rustls_pemfile::Item::Crl(der)) => ders.push(der),
                Ok(_) => {}
                Err(e) => return Err(bad(format!("PEM: {e}"))),
            }
        }
        if ders.is_empty() {
            return Err(bad("no X509 CRL block".to_owned()));
        }
        ders
    } else {
        vec![CertificateRevocationListDer::from(bytes.to_vec())]
    };
    ders.iter()
        .enumerate()
        .map(|(i, der)| {
            OwnedCertRevocationList::from_der(der.as_ref())
                .map(CertRevocationList::from)
                .map_err(|e| bad(format!("list {}: {e:?}", i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests;

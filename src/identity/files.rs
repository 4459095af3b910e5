//! Certificates from files (DESIGN §7): a PEM chain (leaf first), its PKCS#8/SEC1 key and a PEM
//! trust bundle, written by something else (cert-manager, a CSI driver, an init container).
//! The files are read again every `poll` so rotated material, a new root included, is picked
//! up without a restart; one set of files serves one identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::Identity;
use super::manager::{BoxFuture, CertError, CertSource, WorkloadCert};
use crate::tls::TrustBundle;

const NAME: &str = "certificate files";

/// A [`CertSource`] reading a certificate, key and bundle from disk.
#[derive(Debug, Clone)]
pub struct FileSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    /// How often the files are read again.
    pub poll: Duration,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

impl FileSource {
    fn load(&self, id: &Identity) -> Result<WorkloadCert, String> {
        let chain = rustls_pemfile::certs(&mut read(&self.cert)?.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", self.cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{} holds no CERTIFICATE", self.cert.display()));
        }
        let key = rustls_pemfile::private_key(&mut read(&self.key)?.as_slice())
            .map_err(|e| format!("{}: {e}", self.key.display()))?
            .ok_or_else(|| format!("{} holds no private key", self.key.display()))?;
        let bundle_pem = String::from_utf8(read(&self.bundle)?)
            .map_err(|_| format!("{} is not text", self.bundle.display()))?;
        let bundle = TrustBundle::from_pem(&bundle_pem)
            .map_err(|e| format!("{}: {e}", self.bundle.display()))?;
        WorkloadCert::new(id.clone(), chain, key, Arc::new(bundle)).map_err(|e| e.to_string())
    }
}

impl CertSource for FileSource {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        Box::pin(async move {
            self.load(id).map_err(|reason| CertError::Source {
                identity: id.to_string(),
                source_name: NAME,
                reason,
            })
        })
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(self.poll)
    }
}

#[cfg(test)]
mod tests;

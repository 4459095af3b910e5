//! Certificates from files (docs/design.md §7): a PEM chain (leaf first), its PKCS#8/SEC1 key and a PEM
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
pub(crate) struct FileSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    /// How often the files are read again.
    pub poll: Duration,
}

/// Why the files gave no certificate; each names the file to check.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FilesError {
    #[error("cannot read {path}: {source} (certificates.files)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid PEM: {source}")]
    Pem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} holds no CERTIFICATE")]
    NoCertificate(PathBuf),
    #[error("{0} holds no private key")]
    NoKey(PathBuf),
    #[error("{0} is not text")]
    NotText(PathBuf),
    #[error("{path}: {source}")]
    Bundle {
        path: PathBuf,
        source: crate::tls::TlsError,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, FilesError> {
    std::fs::read(path).map_err(|source| FilesError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The chain, key and bundle as the files hold them now.
type Material = (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
    TrustBundle,
);

impl FileSource {
    fn material(&self) -> Result<Material, FilesError> {
        let pem = |path: &Path| {
            let path = path.to_owned();
            move |source| FilesError::Pem { path, source }
        };
        let chain = rustls_pemfile::certs(&mut read(&self.cert)?.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem(&self.cert))?;
        if chain.is_empty() {
            return Err(FilesError::NoCertificate(self.cert.clone()));
        }
        let key = rustls_pemfile::private_key(&mut read(&self.key)?.as_slice())
            .map_err(pem(&self.key))?
            .ok_or_else(|| FilesError::NoKey(self.key.clone()))?;
        let bundle_pem = String::from_utf8(read(&self.bundle)?)
            .map_err(|_| FilesError::NotText(self.bundle.clone()))?;
        let bundle = TrustBundle::from_pem(&bundle_pem).map_err(|source| FilesError::Bundle {
            path: self.bundle.clone(),
            source,
        })?;
        Ok((chain, key, bundle))
    }
}

impl CertSource for FileSource {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        Box::pin(async move {
            let (chain, key, bundle) = self
                .material()
                .map_err(|e| CertError::from_source(id, NAME, e))?;
            WorkloadCert::new(id.clone(), chain, key, Arc::new(bundle))
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

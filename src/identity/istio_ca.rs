//! The Istio CA as a certificate source (docs/design.md §7): for each identity, a fresh P-256 key and a
//! CSR with one URI SAN, sent to `istio.v1.auth.IstioCertificateService/CreateCertificate` over
//! TLS with a bearer token, impersonating the workload (`ImpersonatedIdentity`), as ztunnel does.
//! The key never leaves this process.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;
use super::manager::{BoxFuture, CertError, CertSource, WorkloadCert};
use crate::proto::istio::v1::auth::IstioCertificateRequest;
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::tls::TrustBundle;

const NAME: &str = "Istio CA";

/// Where the Istio CA is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct IstioCaSettings {
    /// `https://istiod.istio-system.svc:15012` (or `http://` in tests).
    pub address: String,
    /// PEM root that signed the CA endpoint's certificate.
    pub root_ca: Option<PathBuf>,
    /// Bearer token file, re-read for every request (projected tokens rotate).
    pub token_file: Option<PathBuf>,
    pub cluster_id: String,
    /// Requested certificate lifetime.
    pub lifetime: Duration,
}

/// A [`CertSource`] backed by the Istio CA.
#[derive(Debug)]
pub struct IstioCa {
    settings: IstioCaSettings,
    /// The channel, and the root file's bytes it was built with: when istiod rotates its root
    /// (the file changes), the next request builds a new channel that trusts the new one, as
    /// ztunnel rebuilds its CA client.
    channel: crate::sync::Lock<(Option<Vec<u8>>, tonic::transport::Channel)>,
}

/// Why the Istio CA gave no certificate; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum IstioCaError {
    #[error("cannot make a key pair: {0}")]
    Key(rcgen::Error),
    #[error("{0} cannot go into a certificate request (not IA5)")]
    NotIa5(String),
    #[error("cannot build the certificate request: {0}")]
    Csr(rcgen::Error),
    #[error(transparent)]
    Token(#[from] crate::control_plane::TokenError),
    #[error("CreateCertificate: {message} ({code:?}); is the CA reachable and the token valid?")]
    Call { code: tonic::Code, message: String },
    #[error("the CA's certificate chain is not PEM: {0}")]
    Chain(std::io::Error),
    #[error("the CA returned no certificate")]
    Empty,
    #[error("the CA returned no root with the leaf")]
    NoRoot,
    #[error("the CA's root: {0}")]
    Root(crate::tls::TlsError),
}

impl IstioCa {
    /// Prepares the (lazily connected) channel; fails only on a bad address or root file.
    pub fn new(settings: IstioCaSettings) -> Result<Self, crate::control_plane::ChannelError> {
        let root = settings
            .root_ca
            .as_deref()
            .and_then(|p| std::fs::read(p).ok());
        let channel = Self::connect(&settings)?;
        Ok(IstioCa {
            channel: crate::sync::Lock::new((root, channel)),
            settings,
        })
    }

    fn connect(
        settings: &IstioCaSettings,
    ) -> Result<tonic::transport::Channel, crate::control_plane::ChannelError> {
        let target =
            crate::control_plane::endpoint(&settings.address, settings.root_ca.as_deref())?
                .with(|e| e.timeout(Duration::from_secs(15)));
        Ok(target.connect_lazy())
    }

    /// The channel to use now: a new one if the root file changed since the last was built
    /// (a root that cannot be read or parsed keeps the channel there is).
    fn channel(&self) -> tonic::transport::Channel {
        let mut current = self.channel.lock();
        if let Some(path) = &self.settings.root_ca
            && let Ok(root) = std::fs::read(path)
            && current.0.as_deref() != Some(root.as_slice())
        {
            match Self::connect(&self.settings) {
                Ok(channel) => {
                    tracing::info!(path = %path.display(), "the CA's root changed; reconnecting with the new one");
                    *current = (Some(root), channel);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the CA's new root is unusable; keeping the connection there is")
                }
            }
        }
        current.1.clone()
    }

    /// A CSR for `id`, signed by a fresh key: (CSR PEM, key).
    fn csr(id: &Identity) -> Result<(String, KeyPair), IstioCaError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(IstioCaError::Key)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id
            .to_string()
            .try_into()
            .map_err(|_| IstioCaError::NotIa5(id.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(IstioCaError::Csr)?;
        Ok((csr, key))
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCert, CertError> {
        use prost_types::{Struct, Value, value::Kind};
        let failed = |e: IstioCaError| CertError::from_source(id, NAME, e);
        let (csr, key) = Self::csr(id).map_err(failed)?;
        let metadata = Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                Value {
                    kind: Some(Kind::StringValue(id.to_string())),
                },
            )]
            .into(),
        };
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.settings.lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        });
        crate::control_plane::add_metadata(
            &mut request,
            self.settings.token_file.as_deref(),
            &self.settings.cluster_id,
        )
        .map_err(|e| failed(e.into()))?;
        let response = IstioCertificateServiceClient::new(self.channel())
            .create_certificate(request)
            .await
            .map_err(|status| {
                failed(IstioCaError::Call {
                    code: status.code(),
                    message: status.message().to_owned(),
                })
            })?
            .into_inner();
        let (chain, roots) = split_chain(&response.cert_chain).map_err(failed)?;
        let bundle = TrustBundle::new(roots).map_err(|e| failed(IstioCaError::Root(e)))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCert::new(id.clone(), chain, key, std::sync::Arc::new(bundle))
    }
}

/// The certificates to present (leaf, intermediates) and the roots to trust, from istiod's
/// `cert_chain`: the leaf first, its intermediates, and last the root set, one PEM element that
/// holds every root during a root rotation (all of them are trusted, none is sent). A single
/// element holding the leaf and a root is read the same way.
fn split_chain(
    elements: &[String],
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), IstioCaError> {
    let parse = |pem: &String| {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(IstioCaError::Chain)
    };
    let mut parsed = elements.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
    parsed.retain(|certs| !certs.is_empty());
    let (chain, roots) = match parsed.len() {
        0 => return Err(IstioCaError::Empty),
        1 => {
            let mut certs = parsed.remove(0);
            if certs.len() < 2 {
                return Err(IstioCaError::NoRoot);
            }
            let root = certs.split_off(certs.len() - 1);
            (certs, root)
        }
        n => {
            let roots = parsed.remove(n - 1);
            (parsed.into_iter().flatten().collect(), roots)
        }
    };
    Ok((chain, roots))
}

impl CertSource for IstioCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        Box::pin(async move { self.request(id).await })
    }

    fn name(&self) -> &'static str {
        NAME
    }
}

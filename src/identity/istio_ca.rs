//! The Istio CA as a certificate source (DESIGN §7): for each identity, a fresh P-256 key and a
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
    channel: tonic::transport::Channel,
}

impl IstioCa {
    /// Prepares the (lazily connected) channel; fails only on a bad address or root file.
    pub fn new(settings: IstioCaSettings) -> Result<Self, CertError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
        let bad = |reason: String| CertError::Source {
            identity: String::new(),
            source_name: NAME,
            reason,
        };
        let mut endpoint = Endpoint::from_shared(settings.address.clone())
            .map_err(|e| bad(format!("address {:?}: {e}", settings.address)))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15));
        if settings.address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(path) = &settings.root_ca {
                let pem = std::fs::read(path)
                    .map_err(|e| bad(format!("root CA {}: {e}", path.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        Ok(IstioCa {
            channel: endpoint.connect_lazy(),
            settings,
        })
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCert, String> {
        use prost_types::{Struct, Value, value::Kind};
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id
            .to_string()
            .try_into()
            .map_err(|_| "identity is not IA5".to_string())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| format!("building the CSR: {e}"))?;
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
        if let Some(path) = &self.settings.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| format!("token file {}: {e}", path.display()))?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| "the token is not a valid header value".to_string())?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Ok(value) = self.settings.cluster_id.parse() {
            request.metadata_mut().insert("clusterid", value);
        }
        let response = IstioCertificateServiceClient::new(self.channel.clone())
            .create_certificate(request)
            .await
            .map_err(|status| {
                format!(
                    "CreateCertificate: {} ({:?}); is the CA reachable and the token valid?",
                    status.message(),
                    status.code()
                )
            })?
            .into_inner();
        let mut chain = Vec::new();
        for pem in &response.cert_chain {
            for der in rustls_pemfile::certs(&mut pem.as_bytes()) {
                chain.push(der.map_err(|e| format!("certificate chain: {e}"))?);
            }
        }
        // The last certificate is the root: it goes into the trust bundle, not on the wire.
        let root: CertificateDer<'static> = match chain.len() {
            0 => return Err("the CA returned no certificate".into()),
            1 => return Err("the CA returned no root with the leaf".into()),
            _ => chain.pop().ok_or("empty chain")?,
        };
        let bundle = TrustBundle::new(vec![root]).map_err(|e| format!("root: {e}"))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCert::new(id.clone(), chain, key, std::sync::Arc::new(bundle))
            .map_err(|e| e.to_string())
    }
}

impl CertSource for IstioCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        Box::pin(async move {
            self.request(id).await.map_err(|reason| CertError::Source {
                identity: id.to_string(),
                source_name: NAME,
                reason,
            })
        })
    }

    fn name(&self) -> &'static str {
        NAME
    }
}

//! SPIFFE certificate verifiers: chain to the trust bundle with webpki, then check the
//! certificate's one URI SAN: an X.509-SVID carries exactly one, a SPIFFE ID (SPIFFE
//! X509-SVID §2), so a certificate with none, two, or a non-SPIFFE one is refused both ways and
//! nobody is ever named by a URI that was not the one verified. DNS names and SNI are never
//! looked at. Pure functions of their inputs (the time comes from
//! rustls), so they are unit-tested with certificates from the built-in CA.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::KeyUsage;

use super::revocation::Revocations;
use super::{NO_HINTS, TrustBundle, leaf_info, provider};
use crate::identity::Identity;

/// The client's check of a server: chain (serverAuth), then its SPIFFE ID equal to an expected
/// identity (the destination workload's, or one of its service's `subject_alt_names`).
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: Vec<String>,
    revocations: Option<Arc<Revocations>>,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(bundle: Arc<TrustBundle>, expected: Vec<Identity>) -> Self {
        let expected = expected.iter().map(Identity::to_string).collect();
        SpiffeServerVerifier {
            bundle,
            expected,
            revocations: None,
        }
    }

    /// Also refuses a chain that `revocations` revokes.
    pub(crate) fn revoking(mut self, revocations: Option<Arc<Revocations>>) -> Self {
        self.revocations = revocations;
        self
    }
}

/// The server's check of a client: chain (clientAuth), then its SPIFFE ID in the trust domain
/// (`None`: any trust domain, as ztunnel).
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
    trust_domain: Option<String>,
    revocations: Option<Arc<Revocations>>,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(bundle: Arc<TrustBundle>, trust_domain: Option<String>) -> Self {
        SpiffeClientVerifier {
            bundle,
            trust_domain,
            revocations: None,
        }
    }

    /// Also refuses a chain that `revocations` revokes.
    pub(crate) fn revoking(mut self, revocations: Option<Arc<Revocations>>) -> Self {
        self.revocations = revocations;
        self
    }
}

/// Why a peer's identity was refused (carried inside `rustls::Error` to the caller's log).
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityMismatch {
    #[error("server presented {presented:?}, expected one of {expected:?}")]
    Server {
        presented: Vec<String>,
        expected: Vec<String>,
    },
    #[error("client presented {presented:?}, not in trust domain {trust_domain:?}")]
    Client {
        presented: Vec<String>,
        trust_domain: String,
    },
    #[error(
        "certificate presented {presented:?}: an X.509-SVID has exactly one URI SAN, a SPIFFE ID"
    )]
    NotAnSvid { presented: Vec<String> },
}

/// The SPIFFE ID of a leaf whose URI SANs are `uris`: exactly one, and a SPIFFE ID.
pub(crate) fn svid_identity(uris: &[String]) -> Result<Identity, IdentityMismatch> {
    match uris {
        [one] => Identity::parse(one).map_err(|_| IdentityMismatch::NotAnSvid {
            presented: uris.to_vec(),
        }),
        _ => Err(IdentityMismatch::NotAnSvid {
            presented: uris.to_vec(),
        }),
    }
}

fn verify_chain(
    bundle: &TrustBundle,
    revocations: Option<&Revocations>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
) -> Result<Vec<String>, rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let lists = revocations.map(Revocations::lists).unwrap_or_default();
    let lists: Vec<&webpki::CertRevocationList<'_>> = lists.iter().collect();
    // Every certificate of the chain is looked up; a list of another issuer says nothing of
    // it, and an expired list still revokes what it names (as ztunnel, which ignores
    // nextUpdate).
    let revocation = webpki::RevocationOptionsBuilder::new(&lists).ok().map(|b| {
        b.with_depth(webpki::RevocationCheckDepth::Chain)
            .with_status_policy(webpki::UnknownStatusPolicy::Allow)
            .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
            .build()
    });
    cert.verify_for_usage(
        provider().signature_verification_algorithms.all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        revocation,
        None,
    )
    .map_err(map_webpki_error)?;
    leaf_info(end_entity)
        .map(|info| info.uris)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

fn map_webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let kind = match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertRevoked => CertificateError::Revoked,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(WebpkiError(other)))),
    };
    rustls::Error::InvalidCertificate(kind)
}

#[derive(Debug, thiserror::Error)]
#[error("certificate rejected: {0:?}")]
struct WebpkiError(webpki::Error);

fn mismatch(e: IdentityMismatch) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// The configs enable TLS 1.3 only, so a TLS 1.2 signature never reaches a verifier.
fn tls12_refused() -> rustls::Error {
    rustls::Error::General("HBONE requires TLS 1.3".into())
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let uris = verify_chain(
            &self.bundle,
            self.revocations.as_deref(),
            end_entity,
            intermediates,
            now,
            KeyUsage::server_auth(),
        )?;
        let presented = svid_identity(&uris).map_err(mismatch)?.to_string();
        if self.expected.contains(&presented) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(mismatch(IdentityMismatch::Server {
                presented: uris,
                expected: self.expected.clone(),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        NO_HINTS
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let uris = verify_chain(
            &self.bundle,
            self.revocations.as_deref(),
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
        )?;
        let presented = svid_identity(&uris).map_err(mismatch)?;
        match &self.trust_domain {
            Some(td) if presented.trust_domain() != td => Err(mismatch(IdentityMismatch::Client {
                presented: uris,
                trust_domain: td.clone(),
            })),
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

#[cfg(test)]
mod tests;

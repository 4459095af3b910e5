//! The built-in certificate authority: the embedded default certificate source.
//!
//! It loads a root (certificate + key, PEM) or generates one, and issues short-lived ECDSA P-256
//! workload certificates carrying exactly one URI SAN, the SPIFFE ID. It keeps keys in memory
//! only; writing a root to disk is an explicit call (`hboned ca init`). Not for production
//! trust: a real deployment points hboned at SPIRE, the Istio CA, or files.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;
use super::manager::{BoxFuture, CertError, CertSource, WorkloadCert};
use crate::tls::TrustBundle;

/// File names of a root inside a CA directory (certs-dev/ or a configured one).
pub(crate) const ROOT_CERT_FILE: &str = "root-cert.pem";
pub(crate) const ROOT_KEY_FILE: &str = "root-key.pem";

/// Default lifetime of an issued workload certificate.
pub(crate) const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// Lifetime of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Issued certificates start this much in the past, to absorb clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

/// Errors of the built-in CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write CA file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid CA root: {0}")]
    Root(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate issued is unusable: {0}")]
    Issued(#[source] Box<crate::identity::manager::CertError>),
    #[error("validity period out of range")]
    Validity,
}

/// A CA that signs workload certificates with one root key.
pub struct BuiltinCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    key_pem: String,
    bundle: Arc<TrustBundle>,
    lifetime: Duration,
}

impl std::fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinCa")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl BuiltinCa {
    /// Generates a fresh self-signed root valid for ten years from `now`.
    pub fn generate(now: SystemTime) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "hboned");
        dn.push(
            DnType::CommonName,
            "hboned built-in root (development only)",
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = to_offset(now.checked_sub(BACKDATE).ok_or(CaError::Validity)?)?;
        params.not_after = to_offset(now.checked_add(ROOT_LIFETIME).ok_or(CaError::Validity)?)?;
        let root = params.self_signed(&key)?;
        let root_pem = root.pem();
        let key_pem = key.serialize_pem();
        Self::from_parts(root.der().clone(), root_pem, key_pem, key)
    }

    /// Loads a root from PEM text (certificate, PKCS#8 key).
    pub(crate) fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| CaError::Root(format!("root key: {e}")))?;
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| CaError::Root("no CERTIFICATE block in the root file".into()))?
            .map_err(|e| CaError::Root(format!("root certificate: {e}")))?;
        Self::from_parts(der, cert_pem.to_owned(), key_pem.to_owned(), key)
    }

    /// Loads `root-cert.pem` and `root-key.pem` from a directory.
    pub(crate) fn load_dir(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| CaError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(ROOT_CERT_FILE)?, &read(ROOT_KEY_FILE)?)
    }

    /// Writes the root certificate and key into `dir` (the key readable by the owner only).
    pub fn write_dir(&self, dir: &Path) -> Result<(), CaError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.join(name);
            let err = |source| CaError::Write {
                path: path.display().to_string(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(err)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .map_err(err)?;
            file.write_all(text.as_bytes()).map_err(err)
        };
        write(ROOT_CERT_FILE, &self.root_pem, 0o644)?;
        write(ROOT_KEY_FILE, &self.key_pem, 0o600)
    }

    fn from_parts(
        der: CertificateDer<'static>,
        root_pem: String,
        key_pem: String,
        key: KeyPair,
    ) -> Result<Self, CaError> {
        let bundle = TrustBundle::new(vec![der.clone()])
            .map_err(|e| CaError::Root(format!("root is not a usable trust anchor: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| CaError::Root(format!("root certificate: {e}")))?;
        Ok(BuiltinCa {
            issuer,
            root_pem,
            key_pem,
            bundle: Arc::new(bundle),
            lifetime: DEFAULT_LEAF_LIFETIME,
        })
    }

    /// Sets the lifetime of certificates issued from now on.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The trust bundle that verifies what this CA issues.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.clone()
    }

    /// Issues a certificate for `id` valid from shortly before `now` for the configured lifetime.
    pub fn issue(&self, id: &Identity, now: SystemTime) -> Result<WorkloadCert, CaError> {
        let not_before = now
            .checked_sub(backdate(self.lifetime))
            .ok_or(CaError::Validity)?;
        let not_after = now.checked_add(self.lifetime).ok_or(CaError::Validity)?;
        self.issue_between(id, not_before, not_after)
    }

    /// Issues a certificate for `id` with an explicit validity window (tests use it for expired
    /// and not-yet-valid certificates).
    pub(crate) fn issue_between(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = leaf_params(id, not_before, not_after)?.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCert::new(
            id.clone(),
            vec![leaf.der().clone()],
            key_der,
            self.bundle.clone(),
        )
        .map_err(|e| CaError::Issued(Box::new(e)))
    }
}

impl BuiltinCa {
    /// A certificate revocation list (PEM) signed by this root, revoking `certs` (leaf DER) as
    /// of `now`: what an operator puts at `crlPath` to cut off a workload.
    pub fn revocation_list(
        &self,
        certs: &[rustls_pki_types::CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<String, CaError> {
        use x509_parser::prelude::FromDer;
        let revoked_certs = certs
            .iter()
            .map(|der| {
                let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
                    .map_err(|e| CaError::Root(format!("not a certificate: {e}")))?;
                Ok(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: to_offset(now)?,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: to_offset(now.checked_sub(BACKDATE).ok_or(CaError::Validity)?)?,
            next_update: to_offset(now.checked_add(ROOT_LIFETIME).ok_or(CaError::Validity)?)?,
            crl_number: random_serial(),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

#[cfg(test)]
impl BuiltinCa {
    /// A leaf chain for `id` whose URI SANs are `uris` instead (tests of the one-URI-SAN
    /// rule).
    pub(crate) fn issue_with_uris(
        &self,
        id: &Identity,
        uris: &[&str],
    ) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        let now = SystemTime::now();
        let mut params = leaf_params(id, now - Duration::from_secs(60), now + self.lifetime)
            .expect("leaf parameters");
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("an IA5 URI")))
            .collect();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf = params.signed_by(&key, &self.issuer).expect("signed leaf");
        vec![leaf.der().clone()]
    }
}

impl BuiltinCa {
    /// Signs a CSR the way a mesh CA does: the CSR must carry exactly one URI SAN, a SPIFFE ID;
    /// subject and other extensions are replaced by the CA's own. Returns the chain as PEM, leaf
    /// first, root last (the Istio CA's response format).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Vec<String>, CaError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Root(format!("invalid CSR: {e}")))?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str()),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(CaError::Root(format!(
                "CSR must carry exactly one URI SAN, found {}",
                uris.len()
            )));
        };
        let id = Identity::parse(uri).map_err(|e| CaError::Root(format!("CSR SAN: {e}")))?;
        let not_before = now
            .checked_sub(backdate(lifetime))
            .ok_or(CaError::Validity)?;
        let not_after = now.checked_add(lifetime).ok_or(CaError::Validity)?;
        let leaf =
            leaf_params(&id, not_before, not_after)?.signed_by(&csr.public_key, &self.issuer)?;
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }
}

impl CertSource for BuiltinCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        Box::pin(async move {
            self.issue(id, SystemTime::now())
                .map_err(|e| CertError::from_source(id, "built-in CA", e))
        })
    }

    fn name(&self) -> &'static str {
        "built-in CA"
    }
}

/// A workload leaf: exactly one URI SAN (the SPIFFE ID), no subject, not a CA, usable for
/// TLS client and server authentication, with a random serial.
fn leaf_params(
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id
        .to_string()
        .try_into()
        .map_err(|_| CaError::Root(format!("identity {id} is not an IA5 string")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    Ok(params)
}

/// How far back `not_before` is set: a minute of clock skew, but never so much of a short
/// lifetime that the certificate is born past its renewal point (half of its lifetime).
fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 4)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime, CaError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| CaError::Validity)?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).map_err(|_| CaError::Validity)?)
        .map_err(|_| CaError::Validity)
}

#[cfg(test)]
mod tests;

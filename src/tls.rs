//! rustls configuration for HBONE, per docs/design.md §4: TLS 1.3 only, the two AES-GCM suites,
//! ALPN `h2`, no SNI, no resumption, mandatory client certificates, and SPIFFE verification
//! (in [`verify`]) instead of DNS names.
//!
//! Configs are built per workload certificate (server) or per dial (client, since the expected
//! peer identities differ per destination); both are cheap next to a handshake.

pub mod revocation;
pub(crate) mod verify;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::TrustAnchor;

use crate::identity::{Identity, WorkloadCert};

pub(crate) use verify::{SpiffeClientVerifier, SpiffeServerVerifier};

/// What a peer's certificate must pass besides its chain to the bundle and its identity.
#[derive(Debug, Clone, Default)]
pub struct PeerChecks {
    /// A server takes a client of any trust domain its roots verify, as ztunnel does (trust
    /// domain aliases and migrations rely on it; authorization policies still see the
    /// client's identity). Off: only a client of the server's own trust domain.
    pub any_client_trust_domain: bool,
    /// Revoked certificates, refused both ways.
    pub revocations: Option<Arc<revocation::Revocations>>,
}

/// The ALPN protocol HBONE negotiates.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// How many bytes of records a connection may hold unsent (rustls' default is 64 KiB). One
/// write from HTTP/2 (a DATA frame, up to the 1 MiB frames we allow) is sealed and handed to
/// the socket in one `writev` up to this much; with 64 KiB, a 128 KiB read from an app left as
/// two writes.
pub(crate) const SEND_BUFFER_LIMIT: usize = 256 * 1024;

/// Applies [`SEND_BUFFER_LIMIT`] to an established connection.
pub(crate) fn tune<S>(conn: &mut rustls::ConnectionCommon<S>) {
    conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
}

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate is not valid PEM: {0}")]
    Pem(#[source] std::io::Error),
    #[error("certificate is not valid DER: {0}")]
    Der(#[from] x509_parser::error::X509Error),
    #[error("certificate cannot be a trust anchor: {0:?}")]
    Anchor(#[source] webpki::Error),
    #[error("trust bundle is empty")]
    EmptyBundle,
    #[error("rustls rejected the configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Whose AES-GCM carries the records. Key exchange (incl. the post-quantum hybrid) and
/// signatures are aws-lc-rs's either way; the wire is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AesGcm {
    AwsLc,
    Ring,
}

impl AesGcm {
    pub fn name(self) -> &'static str {
        match self {
            AesGcm::AwsLc => "aws-lc-rs",
            AesGcm::Ring => "ring",
        }
    }
}

/// Bytes per second each library seals with AES-256-GCM in 16 KiB records on this CPU
/// (aws-lc-rs, ring): the best of five rounds of 32 records each, about 1 ms in all.
pub fn measure_aes_gcm() -> (f64, f64) {
    const RECORD: usize = 16 * 1024;
    const ROUNDS: usize = 5;
    const PER_ROUND: usize = 32;
    fn best(mut seal: impl FnMut(&mut Vec<u8>)) -> f64 {
        let mut record = vec![0x5au8; RECORD];
        let mut fastest = std::time::Duration::MAX;
        for _ in 0..ROUNDS {
            let t = std::time::Instant::now();
            for _ in 0..PER_ROUND {
                record.truncate(RECORD);
                seal(&mut record);
            }
            fastest = fastest.min(t.elapsed());
        }
        (RECORD * PER_ROUND) as f64 / fastest.as_secs_f64().max(1e-9)
    }
    let key = [7u8; 32];
    let aws = {
        use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let Ok(unbound) = UnboundKey::new(&AES_256_GCM, &key) else {
            return (0.0, 0.0);
        };
        let k = LessSafeKey::new(unbound);
        best(|r| {
            let _ =
                k.seal_in_place_append_tag(Nonce::assume_unique_for_key([1; 12]), Aad::empty(), r);
        })
    };
    let ring = {
        use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let Ok(unbound) = UnboundKey::new(&AES_256_GCM, &key) else {
            return (aws, 0.0);
        };
        let k = LessSafeKey::new(unbound);
        best(|r| {
            let _ =
                k.seal_in_place_append_tag(Nonce::assume_unique_for_key([1; 12]), Aad::empty(), r);
        })
    };
    (aws, ring)
}

/// The faster of the two, by the rates [`measure_aes_gcm`] returned; `forced` (from
/// `HBONED_AES_GCM=ring|aws-lc`) wins. aws-lc-rs unless ring is at least 10% faster: the
/// measurement takes a millisecond on a machine that may be busy.
pub fn choose_aes_gcm(forced: Option<&str>, aws: f64, ring: f64) -> AesGcm {
    match forced {
        Some("ring") => AesGcm::Ring,
        Some("aws-lc" | "aws-lc-rs") => AesGcm::AwsLc,
        _ if ring > aws * 1.1 => AesGcm::Ring,
        _ => AesGcm::AwsLc,
    }
}

/// The crypto provider: docs/design.md §4's two AES-GCM suites from the library that seals
/// faster on this CPU (measured once, at first use; on CPUs without AVX-512 ring's is about
/// twice aws-lc-rs's), key exchange and signatures from aws-lc-rs. The post-quantum hybrid
/// X25519MLKEM768 is offered first, then X25519 and P-256.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let forced = std::env::var("HBONED_AES_GCM").ok();
            let (aws_rate, ring_rate) = match forced.as_deref() {
                Some("ring" | "aws-lc" | "aws-lc-rs") => (0.0, 0.0),
                _ => measure_aes_gcm(),
            };
            if let Some(v) = forced.as_deref()
                && !matches!(v, "ring" | "aws-lc" | "aws-lc-rs")
            {
                tracing::warn!(
                    value = v,
                    "HBONED_AES_GCM is not ring or aws-lc; measuring instead"
                );
            }
            let choice = choose_aes_gcm(forced.as_deref(), aws_rate, ring_rate);
            tracing::info!(
                aes_gcm = choice.name(),
                aws_lc_gbps = aws_rate * 8.0 / 1e9,
                ring_gbps = ring_rate * 8.0 / 1e9,
                forced = forced.as_deref().unwrap_or(""),
                "record cipher chosen"
            );
            Arc::new(provider_for(choice))
        })
        .clone()
}

/// Makes aws-lc-rs the process's default rustls provider, for what builds rustls configs
/// without naming one (tonic's TLS to the control plane). rustls cannot pick a default itself
/// with both of its providers compiled in. Idempotent.
pub fn install_process_default() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// docs/design.md §4's provider with `aes_gcm`'s record cipher.
pub(crate) fn provider_for(aes_gcm: AesGcm) -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::{self as aws, kx_group};
    let cipher_suites = match aes_gcm {
        AesGcm::AwsLc => vec![
            aws::cipher_suite::TLS13_AES_256_GCM_SHA384,
            aws::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        AesGcm::Ring => vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
    };
    CryptoProvider {
        cipher_suites,
        kx_groups: vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
        ],
        ..aws::default_provider()
    }
}

/// Trust anchors (the roots a peer's chain must end in), parsed once.
#[derive(Debug)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    pub(crate) fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        if certs.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(TlsError::Anchor)
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle { certs, anchors })
    }

    /// Parses every CERTIFICATE block of a PEM text.
    pub(crate) fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let certs = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::Pem)?;
        Self::new(certs)
    }

    /// Two bundles as one (root rotation: trust the old and the new root during the overlap).
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut certs = self.certs.clone();
        let mut anchors = self.anchors.clone();
        for (c, a) in other.certs.iter().zip(&other.anchors) {
            if !certs.contains(c) {
                certs.push(c.clone());
                anchors.push(a.clone());
            }
        }
        TrustBundle { certs, anchors }
    }

    /// The root certificates.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

/// What hboned needs from a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    /// URI SANs in certificate order.
    pub uris: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Reads the URI SANs and validity of a DER certificate.
pub fn leaf_info(der: &CertificateDer<'_>) -> Result<LeafInfo, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(x509_parser::error::X509Error::from)?;
    let mut uris = Vec::new();
    if let Some(san) = cert.subject_alternative_name()? {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uris.push((*uri).to_owned());
            }
        }
    }
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(LeafInfo {
        uris,
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
    })
}

/// The identity a verified peer presented: the one URI SAN of its leaf (the verifiers refuse
/// any other shape, so this is the identity they checked).
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>) -> Option<Identity> {
    let leaf = certs?.first()?;
    verify::svid_identity(&leaf_info(leaf).ok()?.uris).ok()
}

/// Client config for one dial: present `cert`, accept a server only if it is one of `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(provider(), cert, expected, &PeerChecks::default())
}

/// [`client_config`] with `checks`.
pub fn client_config_checked(
    cert: &WorkloadCert,
    expected: Vec<Identity>,
    checks: &PeerChecks,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(provider(), cert, expected, checks)
}

/// [`client_config`] with a given crypto provider.
pub(crate) fn client_config_with(
    provider: Arc<CryptoProvider>,
    cert: &WorkloadCert,
    expected: Vec<Identity>,
    checks: &PeerChecks,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = SpiffeServerVerifier::new(cert.bundle().clone(), expected)
        .revoking(checks.revocations.clone());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(FixedCert(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Server config for one workload: present `cert`, require a client of its trust domain.
pub fn server_config(cert: &WorkloadCert) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(provider(), cert, &PeerChecks::default())
}

/// [`server_config`] with `checks`.
pub fn server_config_checked(
    cert: &WorkloadCert,
    checks: &PeerChecks,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(provider(), cert, checks)
}

/// [`server_config`] with a given crypto provider.
pub(crate) fn server_config_with(
    provider: Arc<CryptoProvider>,
    cert: &WorkloadCert,
    checks: &PeerChecks,
) -> Result<Arc<ServerConfig>, TlsError> {
    let trust_domain =
        (!checks.any_client_trust_domain).then(|| cert.identity().trust_domain().to_owned());
    let verifier = SpiffeClientVerifier::new(cert.bundle().clone(), trust_domain)
        .revoking(checks.revocations.clone());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(FixedCert(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Always presents one certificate (there is no SNI to choose by).
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// No CA hints are sent: the client has exactly one certificate to offer anyway.
const NO_HINTS: &[DistinguishedName] = &[];

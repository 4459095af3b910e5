//! SPIRE as a certificate source (docs/design.md §7), through the agent's Delegated Identity API on its
//! admin Unix socket. Each identity gets one long-lived subscription, by the Kubernetes
//! selectors `k8s:ns:<namespace>` and `k8s:sa:<service account>`, plus the agent's bundle
//! stream; every SVID or bundle update SPIRE pushes rebuilds the certificate, and the manager
//! picks it up on its next poll. A lost stream is re-opened with backoff; the last certificate
//! keeps serving meanwhile (the manager fails closed once it expires).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::Identity;
use super::manager::{BoxFuture, CertError, CertSource, WorkloadCert};
use crate::backoff::Backoff;
use crate::proto::spire::api::agent::delegatedidentity::v1::delegated_identity_client::DelegatedIdentityClient;
use crate::proto::spire::api::agent::delegatedidentity::v1::{
    SubscribeToX509BundlesRequest, SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse,
};
use crate::proto::spire::api::types::Selector;
use crate::sync::Lock;
use crate::tls::TrustBundle;

const NAME: &str = "SPIRE agent";
/// How long a first fetch waits for SPIRE's answer.
const FIRST_ANSWER: Duration = Duration::from_secs(10);
/// How often the manager looks for pushed updates.
const POLL: Duration = Duration::from_secs(1);

type Latest = watch::Receiver<Option<Result<WorkloadCert, CertError>>>;

/// Why the SPIRE agent gave no (usable) SVID; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum SpireError {
    #[error("cannot subscribe: {0} (is the SPIRE agent's admin socket right?)")]
    Subscribe(String),
    #[error("the {0} stream ended")]
    Ended(&'static str),
    #[error("{stream} stream: {message}")]
    Stream {
        stream: &'static str,
        message: String,
    },
    #[error("no SVID for {identity} among the {count} SPIRE returned")]
    NoSvid { identity: String, count: usize },
    #[error("bundle: {0}")]
    Bundle(String),
    #[error("bundle: {0}")]
    BundleTls(crate::tls::TlsError),
    #[error("no answer from the SPIRE agent within {0:?}")]
    Timeout(Duration),
    #[error("the SPIRE subscription stopped")]
    Stopped,
}

/// A [`CertSource`] backed by a SPIRE agent.
#[derive(Debug)]
pub struct Spire {
    channel: tonic::transport::Channel,
    subscriptions: Lock<HashMap<Identity, (Latest, tokio::task::JoinHandle<()>)>>,
}

impl Spire {
    /// `socket`: the agent's admin socket (e.g. `/run/spire/admin/socket`). Connects lazily.
    pub fn new(socket: PathBuf) -> Result<Self, CertError> {
        let target = crate::control_plane::Target::unix(socket);
        Ok(Spire {
            channel: target.connect_lazy(),
            subscriptions: Lock::new(HashMap::new()),
        })
    }

    fn subscription(&self, id: &Identity) -> Latest {
        let mut subs = self.subscriptions.lock();
        if let Some((latest, _)) = subs.get(id) {
            return latest.clone();
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(subscribe(self.channel.clone(), id.clone(), tx));
        subs.insert(id.clone(), (rx.clone(), task));
        rx
    }
}

/// Keeps one identity's SVID and bundle streams open, publishing every rebuilt certificate.
async fn subscribe(
    channel: tonic::transport::Channel,
    id: Identity,
    tx: watch::Sender<Option<Result<WorkloadCert, CertError>>>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let err = stream_once(channel.clone(), &id, &tx).await;
        tracing::warn!(identity = %id, error = %err, "SPIRE subscription ended; re-subscribing");
        if tx.borrow().as_ref().is_none_or(|r| r.is_err()) {
            tx.send_replace(Some(Err(CertError::from_source(&id, NAME, err))));
        }
        backoff.wait().await;
    }
}

/// One pair of streams until either ends; returns why.
async fn stream_once(
    channel: tonic::transport::Channel,
    id: &Identity,
    tx: &watch::Sender<Option<Result<WorkloadCert, CertError>>>,
) -> SpireError {
    let mut client = DelegatedIdentityClient::new(channel);
    let selectors = vec![
        Selector {
            r#type: "k8s".into(),
            value: format!("ns:{}", id.namespace()),
        },
        Selector {
            r#type: "k8s".into(),
            value: format!("sa:{}", id.service_account()),
        },
    ];
    let svids = client
        .subscribe_to_x509svi_ds(SubscribeToX509sviDsRequest { selectors })
        .await;
    let bundles = client
        .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
        .await;
    let (mut svids, mut bundles) = match (svids, bundles) {
        (Ok(s), Ok(b)) => (s.into_inner(), b.into_inner()),
        (Err(e), _) | (_, Err(e)) => {
            return SpireError::Subscribe(e.message().to_owned());
        }
    };
    let mut svid: Option<SubscribeToX509sviDsResponse> = None;
    let mut bundle: Option<Vec<CertificateDer<'static>>> = None;
    loop {
        tokio::select! {
            msg = svids.message() => match msg {
                Ok(Some(m)) => svid = Some(m),
                Ok(None) => return SpireError::Ended("SVID"),
                Err(e) => return SpireError::Stream { stream: "SVID", message: e.message().to_owned() },
            },
            msg = bundles.message() => match msg {
                Ok(Some(m)) => match m.ca_certificates.get(id.trust_domain()).map(|der| split_der(der)) {
                    Some(Ok(certs)) => bundle = Some(certs),
                    Some(Err(e)) => tracing::warn!(identity = %id, error = %e, "SPIRE sent an unreadable bundle; keeping the last one"),
                    None => tracing::warn!(identity = %id, "SPIRE sent no bundle for the trust domain"),
                },
                Ok(None) => return SpireError::Ended("bundle"),
                Err(e) => return SpireError::Stream { stream: "bundle", message: e.message().to_owned() },
            },
        }
        if let (Some(s), Some(b)) = (&svid, &bundle) {
            match build(id, s, b) {
                Ok(cert) => {
                    tx.send_replace(Some(Ok(cert)));
                }
                Err(e) => {
                    tracing::warn!(identity = %id, error = %e, "SPIRE sent an unusable SVID; keeping the last one")
                }
            }
        }
    }
}

/// The SVID for `id` from a response, with the bundle, as a certificate.
fn build(
    id: &Identity,
    response: &SubscribeToX509sviDsResponse,
    bundle: &[CertificateDer<'static>],
) -> Result<WorkloadCert, CertError> {
    let want_path = format!("/ns/{}/sa/{}", id.namespace(), id.service_account());
    let with_key = response
        .x509_svids
        .iter()
        .find(|s| {
            s.x509_svid
                .as_ref()
                .and_then(|v| v.id.as_ref())
                .is_some_and(|sid| sid.trust_domain == id.trust_domain() && sid.path == want_path)
        })
        .ok_or_else(|| {
            let e = SpireError::NoSvid {
                identity: id.to_string(),
                count: response.x509_svids.len(),
            };
            CertError::from_source(id, NAME, e)
        })?;
    let chain: Vec<CertificateDer<'static>> = with_key
        .x509_svid
        .as_ref()
        .map(|v| {
            v.cert_chain
                .iter()
                .map(|c| CertificateDer::from(c.to_vec()))
                .collect()
        })
        .unwrap_or_default();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(with_key.x509_svid_key.to_vec()));
    let bundle = TrustBundle::new(bundle.to_vec())
        .map_err(|e| CertError::from_source(id, NAME, SpireError::BundleTls(e)))?;
    WorkloadCert::new(id.clone(), chain, key, Arc::new(bundle))
}

/// Splits concatenated DER certificates.
fn split_der(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>, SpireError> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| SpireError::Bundle(e.to_string()))?;
        let len = der.len() - rest.len();
        certs.push(CertificateDer::from(der[..len].to_vec()));
        der = rest;
    }
    Ok(certs)
}

impl CertSource for Spire {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, CertError>> {
        Box::pin(async move {
            let err = |e: SpireError| CertError::from_source(id, NAME, e);
            let mut latest = self.subscription(id);
            let answer = tokio::time::timeout(FIRST_ANSWER, latest.wait_for(Option::is_some))
                .await
                .map_err(|_| err(SpireError::Timeout(FIRST_ANSWER)))?
                .map_err(|_| err(SpireError::Stopped))?
                .clone();
            answer.unwrap_or(Err(err(SpireError::Stopped)))
        })
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(POLL)
    }

    fn forget(&self, id: &Identity) {
        if let Some((_, task)) = self.subscriptions.lock().remove(id) {
            task.abort();
        }
    }
}

//! SPIRE as a certificate source (docs/design.md §7), through the agent's Delegated Identity API on its
//! admin Unix socket. Each identity gets one long-lived subscription: by the PID of a process of
//! an enrolled pod with that identity when one is found (the agent's Kubernetes attestor then
//! supplies the pod's own selectors, so entries keyed by pod UID match, as Cilium registers
//! them), else by the selectors `k8s:ns:<namespace>` and `k8s:sa:<service account>`. Trust comes
//! from the agent's bundle stream, or from a bundle file when one is configured (Cilium's
//! `CA_ROOT_CA=/run/spire/bundle/bundle.crt`, re-read at every SVID). Every update SPIRE pushes
//! rebuilds the certificate, and the manager picks it up on its next poll. A lost stream is
//! re-opened with backoff (a new PID looked up); the last certificate keeps serving meanwhile
//! (the manager fails closed once it expires).

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
    SubscribeToX509BundlesRequest, SubscribeToX509sviDsByPidRequest, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse,
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

/// Finds a process of an enrolled pod with this identity (its pid as the agent sees it).
pub type PidFinder = Arc<dyn Fn(&Identity) -> Option<u32> + Send + Sync>;

/// What every subscription shares.
struct Agent {
    channel: tonic::transport::Channel,
    pids: Lock<Option<PidFinder>>,
    bundle_file: Option<PathBuf>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("bundle_file", &self.bundle_file)
            .finish_non_exhaustive()
    }
}

/// A [`CertSource`] backed by a SPIRE agent.
#[derive(Debug)]
pub struct Spire {
    agent: Arc<Agent>,
    subscriptions: Lock<HashMap<Identity, (Latest, tokio::task::JoinHandle<()>)>>,
}

impl Spire {
    /// `socket`: the agent's admin socket (e.g. `/run/spire/sockets/admin.sock`). Connects
    /// lazily. Trust from the agent's bundle stream unless `bundle_file` (PEM) is given.
    pub fn new(socket: PathBuf, bundle_file: Option<PathBuf>) -> Result<Self, CertError> {
        let target = crate::control_plane::Target::unix(socket);
        Ok(Spire {
            agent: Arc::new(Agent {
                channel: target.connect_lazy(),
                pids: Lock::new(None),
                bundle_file,
            }),
            subscriptions: Lock::new(HashMap::new()),
        })
    }

    fn subscription(&self, id: &Identity) -> Latest {
        let mut subs = self.subscriptions.lock();
        if let Some((latest, _)) = subs.get(id) {
            return latest.clone();
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(subscribe(self.agent.clone(), id.clone(), tx));
        subs.insert(id.clone(), (rx.clone(), task));
        rx
    }
}

/// Keeps one identity's SVID and bundle streams open, publishing every rebuilt certificate.
async fn subscribe(
    agent: Arc<Agent>,
    id: Identity,
    tx: watch::Sender<Option<Result<WorkloadCert, CertError>>>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let err = stream_once(&agent, &id, &tx).await;
        tracing::warn!(identity = %id, error = %err, "SPIRE subscription ended; re-subscribing");
        if tx.borrow().as_ref().is_none_or(|r| r.is_err()) {
            tx.send_replace(Some(Err(CertError::from_source(&id, NAME, err))));
        }
        backoff.wait().await;
    }
}

/// The CA certificates in a PEM bundle file.
fn read_bundle(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, SpireError> {
    let pem = std::fs::read(path)
        .map_err(|e| SpireError::Bundle(format!("cannot read {}: {e}", path.display())))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| SpireError::Bundle(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(SpireError::Bundle(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// One subscription (and the bundle stream, unless trust comes from a file) until it ends;
/// returns why.
async fn stream_once(
    agent: &Agent,
    id: &Identity,
    tx: &watch::Sender<Option<Result<WorkloadCert, CertError>>>,
) -> SpireError {
    let mut client = DelegatedIdentityClient::new(agent.channel.clone());
    let finder = agent.pids.lock().clone();
    let pid = finder.as_ref().and_then(|find| find(id));
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
    let by_pid = match pid.and_then(|p| i32::try_from(p).ok()) {
        Some(pid) => {
            tracing::debug!(identity = %id, pid, "subscribing to SPIRE by the pod's process");
            let request = SubscribeToX509sviDsByPidRequest { pid };
            match client.subscribe_to_x509svi_ds_by_pid(request).await {
                Ok(s) => Some(s),
                // An agent that cannot attest the process (it exited; no Kubernetes
                // attestor): the selectors, this once.
                Err(e) => {
                    tracing::warn!(identity = %id, pid, error = e.message(), "SPIRE could not subscribe by PID; using the selectors");
                    None
                }
            }
        }
        None => None,
    };
    let subscribed_by_pid = by_pid.is_some();
    let svids = match by_pid {
        Some(stream) => Ok(stream),
        None => {
            client
                .subscribe_to_x509svi_ds(SubscribeToX509sviDsRequest { selectors })
                .await
        }
    };
    let mut svids = match svids {
        Ok(s) => s.into_inner(),
        Err(e) => return SpireError::Subscribe(e.message().to_owned()),
    };
    // Trust: the bundle file, re-read with every SVID, or the agent's bundle stream.
    let mut bundles = match &agent.bundle_file {
        Some(_) => None,
        None => match client
            .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
            .await
        {
            Ok(b) => Some(b.into_inner()),
            Err(e) => return SpireError::Subscribe(e.message().to_owned()),
        },
    };
    let mut svid: Option<SubscribeToX509sviDsResponse> = None;
    let mut bundle: Option<Vec<CertificateDer<'static>>> = None;
    loop {
        let bundle_msg = async {
            match bundles.as_mut() {
                Some(b) => b.message().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = svids.message() => match msg {
                Ok(Some(m)) => {
                    svid = Some(m);
                    if let Some(path) = &agent.bundle_file {
                        match read_bundle(path) {
                            Ok(certs) => bundle = Some(certs),
                            Err(e) => tracing::warn!(identity = %id, error = %e, "unreadable bundle file; keeping the last one"),
                        }
                    }
                }
                Ok(None) => return SpireError::Ended("SVID"),
                Err(e) => return SpireError::Stream { stream: "SVID", message: e.message().to_owned() },
            },
            msg = bundle_msg => match msg {
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
                    tracing::warn!(identity = %id, error = %e, "SPIRE sent an unusable SVID; keeping the last one");
                    // Selectors that match no entry (SPIRE entries keyed by pod): once a
                    // process of the pod is known, subscribe again by its PID.
                    if !subscribed_by_pid && finder.as_ref().and_then(|find| find(id)).is_some() {
                        return SpireError::NoSvid {
                            identity: id.to_string(),
                            count: s.x509_svids.len(),
                        };
                    }
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

    /// From now on, subscriptions name a process of the pod when `find` knows one.
    fn find_pod_processes_with(&self, find: PidFinder) {
        *self.agent.pids.lock() = Some(find);
    }
}

//! SPIRE as a certificate source, through the agent's Delegated Identity API on its admin Unix
//! socket (spire-api-sdk `delegatedidentity.proto`, served by spire
//! `pkg/agent/api/delegatedidentity/v1/service.go`). hboned must be an authorized delegate of
//! the agent: an entry for hboned's own process whose SPIFFE ID is listed in the agent's
//! `authorized_delegates` (Cilium registers `spiffe://<td>/ztunnel`).
//!
//! Each identity gets one long-lived `SubscribeToX509SVIDs` stream. Its request names a
//! workload one of two ways, never both: by `pid`, a process of an application container of an
//! enrolled pod with that identity ([`process`]: CRI, else `/proc`), which the agent attests
//! itself; or by the selectors `k8s:ns:<namespace>` and `k8s:sa:<service account>`, the ones
//! Cilium's operator registers one entry per service account with (`spiffe://<td>/ns/<ns>/sa/<sa>`,
//! parent `spiffe://<td>/ztunnel`; cilium `operator/pkg/ztunnel/config/config.go`). A PID is
//! used when one is found, checked again after every answer (PIDs are reused); a subscription
//! by PID that brings no SVID for this identity within a few seconds (an agent without the
//! Kubernetes attestor), or stops bringing it, turns to the selectors. Trust comes from the agent's bundle stream, keyed by the trust
//! domain's SPIFFE ID (`spiffe://<td>`). Every update the agent pushes rebuilds the
//! certificate, picked up by the manager on its next poll. A lost stream is opened again with
//! backoff; the last certificate keeps serving meanwhile and the manager fails closed once it
//! expires (an entry deleted: new connections fail once its SVID has expired).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spire_api::pb::spire::api::agent::delegatedidentity::v1::delegated_identity_client::DelegatedIdentityClient;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse,
};
use spire_api::pb::spire::api::types::Selector;
use tokio::sync::watch;

use super::manager::{BoxFuture, CertError, CertSource, WorkloadCert};
use super::{Identity, LocalPods};
use crate::backoff::Backoff;
use crate::sync::Lock;
use crate::tls::TrustBundle;

pub(crate) mod process;

pub use process::{PodPid, PodProcesses, ProcessError};

const NAME: &str = "SPIRE agent";
/// How often the manager looks for pushed updates.
const POLL: Duration = Duration::from_secs(1);
/// How long a subscription by PID may go without this identity's SVID before the selectors
/// are tried (the agent's first answers can precede its next sync with the server).
const PID_GRACE: Duration = Duration::from_secs(5);

type Latest = watch::Receiver<Option<Result<WorkloadCert, CertError>>>;

/// Why the SPIRE agent gave no (usable) SVID; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum SpireError {
    #[error("the SPIRE agent refused the {stream} subscription{}", hint(.status))]
    Subscribe {
        stream: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error("the {0} stream ended")]
    Ended(&'static str),
    #[error("the {stream} stream failed{}", hint(.status))]
    Stream {
        stream: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error(
        "no SVID for {identity} among the {count} SPIRE returned (is there an entry for it, parented to hboned's own entry?)"
    )]
    NoSvid { identity: String, count: usize },
    #[error("pid {} no longer belongs to pod {}: the answer SPIRE gave for it is discarded", .0.pid, .0.pod_uid)]
    PidReused(PodPid),
    #[error("cannot check the pod's process")]
    Process(#[source] ProcessError),
    #[error("the SPIRE agent's bundle for {trust_domain} is unreadable")]
    Bundle {
        trust_domain: String,
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    #[error("the SPIRE agent's bundle holds no certificate for {0}")]
    NoBundle(String),
    #[error("the SPIRE agent's bundle is not a usable trust bundle")]
    BundleTls(#[source] crate::tls::TlsError),
    #[error("no answer from the SPIRE agent within {0:?} (SPIRE_TIMEOUT)")]
    Timeout(Duration),
    #[error("the SPIRE subscription stopped")]
    Stopped,
}

/// What to check, by the agent's status code.
fn hint(status: &tonic::Status) -> String {
    let what = match status.code() {
        tonic::Code::PermissionDenied => {
            "; is hboned an authorized delegate (its own entry's SPIFFE ID in the agent's authorized_delegates)?"
        }
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            "; is the SPIRE agent's admin socket right, and the agent running?"
        }
        tonic::Code::Internal => "; the agent could not attest the process",
        _ => "",
    };
    format!(": {}{what}", status.message())
}

/// How to reach the agent, and where pods' processes are found.
#[derive(Debug, Clone)]
pub struct SpireSettings {
    /// The agent's admin socket (e.g. `/run/spire/sockets/admin.sock`).
    pub socket: PathBuf,
    /// How long a first fetch waits for the agent's answer (`SPIRE_TIMEOUT`).
    pub timeout: Duration,
    /// The enrolled pods, by identity.
    pub pods: LocalPods,
    /// Where a pod's processes are found for attestation by PID.
    pub processes: PodProcesses,
}

/// What every subscription shares.
#[derive(Debug)]
struct Agent {
    channel: tonic::transport::Channel,
    settings: SpireSettings,
}

/// How a stream names its workload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Workload {
    Pid(PodPid),
    Selectors,
}

impl Agent {
    /// A process of an application container of some enrolled pod with `id`.
    async fn process_of(&self, id: &Identity) -> Option<PodPid> {
        for uid in self.settings.pods.with_identity(id) {
            match self.settings.processes.pids(&uid).await {
                Ok(pids) => {
                    if let Some(&pid) = pids.first() {
                        return Some(PodPid { pod_uid: uid, pid });
                    }
                }
                Err(e) => {
                    tracing::warn!(identity = %id, pod = %uid, error = %e, "cannot find the pod's processes; SPIRE gets the selectors instead")
                }
            }
        }
        None
    }
}

/// A [`CertSource`] backed by a SPIRE agent.
#[derive(Debug)]
pub struct Spire {
    agent: Arc<Agent>,
    subscriptions: Lock<HashMap<Identity, (Latest, tokio::task::JoinHandle<()>)>>,
}

impl Spire {
    /// Connects lazily; trust comes from the agent's bundle stream.
    pub fn new(settings: SpireSettings) -> Self {
        let target = crate::control_plane::Target::unix(settings.socket.clone());
        Spire {
            agent: Arc::new(Agent {
                channel: target.connect_lazy(),
                settings,
            }),
            subscriptions: Lock::new(HashMap::new()),
        }
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
    let mut by_selectors = false;
    loop {
        let workload = match by_selectors {
            true => None,
            false => agent.process_of(&id).await,
        };
        let workload = workload.map_or(Workload::Selectors, Workload::Pid);
        tracing::debug!(identity = %id, ?workload, "subscribing to SPIRE");
        let err = stream_once(&agent, &id, &workload, &tx).await;
        // An answer by PID without this identity: the selectors, at once and this once.
        by_selectors = matches!(err, SpireError::NoSvid { .. }) && workload != Workload::Selectors;
        if by_selectors {
            tracing::info!(identity = %id, ?workload, "SPIRE issued no SVID for the identity to the pod's process; subscribing by the k8s:ns and k8s:sa selectors");
            continue;
        }
        tracing::warn!(identity = %id, error = %err, "SPIRE subscription ended; subscribing again");
        if tx.borrow().as_ref().is_none_or(|r| r.is_err()) {
            tx.send_replace(Some(Err(CertError::from_source(&id, NAME, err))));
        }
        backoff.wait().await;
    }
}

/// The request for `workload`: its pid, or the selectors of Cilium's entries.
fn request(id: &Identity, workload: &Workload) -> SubscribeToX509sviDsRequest {
    match workload {
        Workload::Pid(p) => SubscribeToX509sviDsRequest {
            selectors: Vec::new(),
            // A pid beyond i32 cannot exist on Linux (pid_max ≤ 2^22).
            pid: i32::try_from(p.pid).unwrap_or(0),
        },
        Workload::Selectors => SubscribeToX509sviDsRequest {
            selectors: vec![
                Selector {
                    r#type: "k8s".into(),
                    value: format!("ns:{}", id.namespace()),
                },
                Selector {
                    r#type: "k8s".into(),
                    value: format!("sa:{}", id.service_account()),
                },
            ],
            pid: 0,
        },
    }
}

/// One SVID subscription with its bundle stream, until it ends; returns why.
async fn stream_once(
    agent: &Agent,
    id: &Identity,
    workload: &Workload,
    tx: &watch::Sender<Option<Result<WorkloadCert, CertError>>>,
) -> SpireError {
    let mut client = DelegatedIdentityClient::new(agent.channel.clone());
    let mut svids = match client.subscribe_to_x509svi_ds(request(id, workload)).await {
        Ok(s) => s.into_inner(),
        Err(status) => {
            return SpireError::Subscribe {
                stream: "SVID",
                status,
            };
        }
    };
    let mut bundles = match client
        .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
        .await
    {
        Ok(b) => b.into_inner(),
        Err(status) => {
            return SpireError::Subscribe {
                stream: "bundle",
                status,
            };
        }
    };
    let mut svid: Option<SubscribeToX509sviDsResponse> = None;
    let mut bundle: Option<Vec<CertificateDer<'static>>> = None;
    // By PID: the first SVID for this identity must come within the grace.
    let grace = tokio::time::sleep(PID_GRACE);
    tokio::pin!(grace);
    loop {
        let waiting = matches!(workload, Workload::Pid(_)) && svid.is_none();
        tokio::select! {
            () = &mut grace, if waiting => {
                return SpireError::NoSvid { identity: id.to_string(), count: 0 };
            }
            msg = svids.message() => match msg {
                Ok(Some(m)) => {
                    if let Workload::Pid(p) = workload {
                        match agent.settings.processes.still_of(p).await {
                            Ok(true) => {}
                            Ok(false) => return SpireError::PidReused(p.clone()),
                            Err(e) => return SpireError::Process(e),
                        }
                        match (find_svid(id, &m).is_some(), svid.is_some()) {
                            (true, _) => {}
                            // Not yet: the agent may still sync the entry.
                            (false, false) => continue,
                            // Gone (the entry deleted, the pod's selectors changed).
                            (false, true) => {
                                return SpireError::NoSvid { identity: id.to_string(), count: m.x509_svids.len() };
                            }
                        }
                    }
                    svid = Some(m);
                }
                Ok(None) => return SpireError::Ended("SVID"),
                Err(status) => return SpireError::Stream { stream: "SVID", status },
            },
            msg = bundles.message() => match msg {
                Ok(Some(m)) => match trust_domain_bundle(id.trust_domain(), &m) {
                    Ok(certs) => bundle = Some(certs),
                    Err(e) => tracing::warn!(identity = %id, error = %e, "SPIRE sent an unusable bundle; keeping the last one"),
                },
                Ok(None) => return SpireError::Ended("bundle"),
                Err(status) => return SpireError::Stream { stream: "bundle", status },
            },
        }
        if let (Some(s), Some(b)) = (&svid, &bundle) {
            match build(id, s, b) {
                Ok(cert) => {
                    tx.send_replace(Some(Ok(cert)));
                }
                Err(e) => {
                    tracing::warn!(identity = %id, error = %e, "SPIRE sent no usable SVID; keeping the last one until it expires")
                }
            }
        }
    }
}

/// The SVID (with its key) for `id` in an answer.
fn find_svid<'a>(
    id: &Identity,
    response: &'a SubscribeToX509sviDsResponse,
) -> Option<&'a spire_api::pb::spire::api::agent::delegatedidentity::v1::X509svidWithKey> {
    let want_path = format!("/ns/{}/sa/{}", id.namespace(), id.service_account());
    response.x509_svids.iter().find(|s| {
        s.x509_svid
            .as_ref()
            .and_then(|v| v.id.as_ref())
            .is_some_and(|sid| sid.trust_domain == id.trust_domain() && sid.path == want_path)
    })
}

/// The SVID for `id` from an answer, with the bundle, as a certificate.
fn build(
    id: &Identity,
    response: &SubscribeToX509sviDsResponse,
    bundle: &[CertificateDer<'static>],
) -> Result<WorkloadCert, CertError> {
    let with_key = find_svid(id, response).ok_or_else(|| {
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

/// The CA certificates of `trust_domain` in a bundle update. The agent keys its map by the
/// trust domain's SPIFFE ID (`td.IDString()`, `spiffe://<td>`); the bare name is taken too.
fn trust_domain_bundle(
    trust_domain: &str,
    update: &SubscribeToX509BundlesResponse,
) -> Result<Vec<CertificateDer<'static>>, SpireError> {
    let der = update
        .ca_certificates
        .get(&format!("spiffe://{trust_domain}"))
        .or_else(|| update.ca_certificates.get(trust_domain))
        .ok_or_else(|| SpireError::NoBundle(trust_domain.to_owned()))?;
    let certs = split_der(der).map_err(|source| SpireError::Bundle {
        trust_domain: trust_domain.to_owned(),
        source,
    })?;
    if certs.is_empty() {
        return Err(SpireError::NoBundle(trust_domain.to_owned()));
    }
    Ok(certs)
}

/// Splits concatenated DER certificates (the agent's `marshalBundle`).
fn split_der(
    mut der: &[u8],
) -> Result<Vec<CertificateDer<'static>>, x509_parser::nom::Err<x509_parser::error::X509Error>> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)?;
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
            let timeout = self.agent.settings.timeout;
            let answer = tokio::time::timeout(timeout, latest.wait_for(Option::is_some))
                .await
                .map_err(|_| err(SpireError::Timeout(timeout)))?
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

#[cfg(test)]
mod tests;

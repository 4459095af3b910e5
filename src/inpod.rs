//! Enrolled pods: the registry of the pods this node serves (each with its identity and its
//! proxy, `proxy::pod`), their retries and trust domains; and, in [`zds`], the ZDS client
//! through which a node agent adds and removes them (docs/design.md §6). Pods listed in the
//! config file go through the same [`PodManager::add`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::identity::{Identity, LiveIdentity};
use crate::netns::Netns;
use crate::proxy::pod::PodProxy;
pub(crate) use crate::proxy::pod::PodProxyContext;
use crate::sync::Lock;

mod zds;

pub(crate) use zds::run_zds;
pub use zds::{ZdsError, zds_session};

/// Who a pod is (ZDS `WorkloadInfo` plus its uid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// What the node proxy needs to serve pods, shared by all of them.
#[derive(Debug, Clone)]
pub(crate) struct NodeContext {
    /// What every pod's proxy is built from.
    pub proxy: PodProxyContext,
    /// The trust domain a pod's identity has until its workload names one.
    pub trust_domain: String,
    /// The enrolled pods by identity, kept for certificate sources that attest a pod.
    pub local_pods: crate::identity::LocalPods,
}

/// The operations a node agent drives; [`PodManager`] is the real one, tests use a double.
pub trait PodHandler: Send + Sync {
    /// Enroll (or re-enroll) a pod; the same uid and netns again is a no-op.
    fn add(&self, info: PodInfo, netns: Netns) -> Result<(), PodError>;
    /// Stop serving a pod; unknown uids are fine.
    fn remove(&self, uid: &str);
    /// Mark an enrolled pod as still present during a snapshot.
    fn keep(&self, uid: &str) -> Result<(), PodError>;
    /// A new agent session starts: forget which pods it has named so far.
    fn begin_snapshot(&self);
    /// The snapshot is complete: remove pods it did not name.
    fn snapshot_sent(&self);
}

struct RunningPod {
    info: PodInfo,
    netns_inode: u64,
    identity: LiveIdentity,
    addresses: Vec<IpAddr>,
    /// Its proxy: listeners closed when dropped (live connections run on), live connections
    /// ended on removal.
    proxy: PodProxy,
}

/// The pods this node serves.
pub(crate) struct PodManager {
    ctx: NodeContext,
    pods: Lock<HashMap<String, RunningPod>>,
    named: Lock<HashSet<String>>,
    /// Pods whose enrollment failed for a reason that may pass, retried until they start.
    pending: Lock<HashMap<String, (PodInfo, Netns)>>,
    /// Whether `pending` is empty.
    settled: watch::Sender<bool>,
}

impl std::fmt::Debug for PodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodManager")
            .field("pods", &self.pods().len())
            .finish()
    }
}

impl PodManager {
    pub(crate) fn new(ctx: NodeContext) -> Self {
        PodManager {
            ctx,
            pods: Lock::new(HashMap::new()),
            named: Lock::new(HashSet::new()),
            pending: Lock::new(HashMap::new()),
            settled: watch::channel(true).0,
        }
    }

    /// True while no pod waits for a retry of its enrollment (a readiness source: the node is
    /// not ready while one of its pods is not served).
    pub(crate) fn settled(&self) -> watch::Receiver<bool> {
        self.settled.subscribe()
    }

    /// Records (or forgets) a pod whose enrollment failed for a reason that may pass.
    fn set_pending(&self, uid: &str, pod: Option<(PodInfo, Netns)>) {
        let mut pending = self.pending.lock();
        match pod {
            Some(pod) => {
                pending.insert(uid.to_owned(), pod);
            }
            None => {
                pending.remove(uid);
            }
        }
        self.settled.send_replace(pending.is_empty());
        self.ctx
            .proxy
            .metrics
            .pending_proxies
            .set(pending.len() as i64);
    }

    /// Retries pods whose enrollment failed every `period` (ztunnel's in-pod manager does the
    /// same; istio-cni sends a pod once), until the manager is dropped or drains.
    pub(crate) fn retry_pending(self: &Arc<Self>, period: Duration) {
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                if manager.ctx.proxy.drain.is_draining() {
                    return;
                }
                let waiting: Vec<(PodInfo, Netns)> = manager
                    .pending
                    .lock()
                    .values()
                    .filter_map(|(info, ns)| Some((info.clone(), ns.try_clone().ok()?)))
                    .collect();
                for (info, netns) in waiting {
                    manager.retry(info, netns);
                }
            }
        });
    }

    fn retry(&self, info: PodInfo, netns: Netns) {
        let inode = netns.inode().ok();
        match self.start(&info, &netns) {
            Ok(running) => {
                // Still wanted, with the same netns? (A Del or a newer Add may have come.)
                let mut pending = self.pending.lock();
                let same = pending
                    .get(&info.uid)
                    .is_some_and(|(i, ns)| *i == info && ns.inode().ok() == inode);
                if !same {
                    return;
                }
                pending.remove(&info.uid);
                self.settled.send_replace(pending.is_empty());
                self.ctx
                    .proxy
                    .metrics
                    .pending_proxies
                    .set(pending.len() as i64);
                drop(pending);
                tracing::info!(uid = %info.uid, "pod enrolled on retry");
                self.insert(running);
            }
            Err(e) => tracing::debug!(uid = %info.uid, error = %e, "pod still cannot be enrolled"),
        }
    }

    /// Serves `running` from now on, and fetches its certificate at once, so the pod's first
    /// connection does not wait for it (after the insert: a source that attests the pod, SPIRE
    /// by PID, finds it in [`NodeContext::local_pods`]).
    fn insert(&self, running: RunningPod) {
        let certs = self.ctx.proxy.certs.clone();
        let identity = Identity::clone(&running.identity.get());
        let live = running.identity.clone();
        let uid = running.info.uid.clone();
        self.ctx.local_pods.insert(&uid, &identity);
        certs.hold(&identity);
        {
            let mut pods = self.pods.lock();
            pods.insert(uid.clone(), running);
            self.ctx.proxy.metrics.enrolled_pods.set(pods.len() as i64);
            self.ctx.proxy.metrics.active_proxies.set(pods.len() as i64);
            let prefetch = tokio::spawn(async move {
                // The identity as it is when the task runs: the pod may have moved to another
                // trust domain meanwhile.
                let identity = live.get();
                if let Err(e) = certs.fetch(&identity).await {
                    tracing::warn!(%identity, error = %e, "no certificate yet for an enrolled pod");
                }
            });
            if let Some(p) = pods.get_mut(&uid) {
                p.proxy.hold(prefetch);
            }
        }
        // The pod's trust domain was read from the state before its listeners were set up; a
        // workload that arrived since found the pod not yet here, and the state may not change
        // again for a long time: read it again now the pod is in the table.
        self.follow_workloads();
    }

    /// The enrolled pods, with their identity and addresses.
    pub(crate) fn pods(&self) -> Vec<(PodInfo, Identity, Vec<IpAddr>)> {
        self.each(|p| {
            let identity = Identity::clone(&p.identity.get());
            (p.info.clone(), identity, p.addresses.clone())
        })
    }

    /// The enrolled pods' live connections, by uid.
    pub(crate) fn connections(&self) -> Vec<(String, Arc<crate::proxy::live::ConnectionTable>)> {
        self.each(|p| Some((p.info.uid.clone(), p.proxy.connections.clone()?)))
            .into_iter()
            .flatten()
            .collect()
    }

    fn each<T>(&self, f: impl FnMut(&RunningPod) -> T) -> Vec<T> {
        self.pods.lock().values().map(f).collect()
    }

    /// Closes every pod's listeners (drain): live connections keep running, new ones go to
    /// whichever proxy still listens on the same ports (SO_REUSEPORT), or are refused.
    pub(crate) fn stop_listening(&self) {
        let mut pods = self.pods.lock();
        pods.clear();
        self.ctx.local_pods.clear();
        self.pending.lock().clear();
        self.ctx.proxy.metrics.pending_proxies.set(0);
        self.ctx.proxy.metrics.enrolled_pods.set(0);
        self.ctx.proxy.metrics.active_proxies.set(0);
    }

    /// After every change of the state, moves each enrolled pod to the trust domain its
    /// workload names (see [`PodManager::follow_workloads`]). Called before the first pod is
    /// enrolled: a change between a pod's enrollment and the subscription would be missed.
    pub(crate) fn follow_trust_domains(self: &Arc<Self>) {
        let manager = Arc::downgrade(self);
        let mut changes = self.ctx.proxy.state.changes();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                manager.follow_workloads();
            }
        });
    }

    /// Moves each enrolled pod to the trust domain its workload in discovery names, as
    /// ztunnel takes a local pod's identity from its workload (istiod sends `trust_domain`,
    /// which a proxy-wide setting cannot know). Its live connections keep the certificate they
    /// started with; new ones present the new one.
    pub(crate) fn follow_workloads(&self) {
        let moved: Vec<(String, Identity, Identity)> = {
            let state = self.ctx.proxy.state.read();
            let pods = self.pods.lock();
            pods.values()
                .filter_map(|p| {
                    let td = workload_trust_domain(&state, &p.info, &p.addresses)?;
                    match p.identity.set_trust_domain(&td) {
                        Ok(Some(old)) => {
                            Some((p.info.uid.clone(), old, Identity::clone(&p.identity.get())))
                        }
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(uid = %p.info.uid, error = %e, "the pod's workload names an unusable trust domain; identity kept");
                            None
                        }
                    }
                })
                .collect()
        };
        for (uid, old, new) in moved {
            tracing::info!(%uid, from = %old, to = %new, "pod identity follows its workload's trust domain");
            self.ctx.local_pods.insert(&uid, &new);
            self.ctx.proxy.certs.hold(&new);
            let still_used = self.pods.lock().values().any(|p| *p.identity.get() == old);
            if !still_used {
                self.ctx.proxy.certs.forget(&old);
            }
            let certs = self.ctx.proxy.certs.clone();
            tokio::spawn(async move {
                if let Err(e) = certs.fetch(&new).await {
                    tracing::warn!(identity = %new, error = %e, "no certificate yet for an enrolled pod");
                }
            });
        }
    }

    /// Creates a pod's listeners in its netns and starts serving them. Must run inside the
    /// tokio runtime.
    fn start(&self, info: &PodInfo, netns: &Netns) -> Result<RunningPod, PodError> {
        let ctx = &self.ctx;
        let uid = || info.uid.clone();
        // Checked before anything is set up: a name that makes no identity never will.
        Identity::new(&ctx.trust_domain, &info.namespace, &info.service_account)
            .map_err(|source| PodError::Identity { uid: uid(), source })?;
        let netns_inode = netns
            .inode()
            .map_err(|source| PodError::Netns { uid: uid(), source })?;
        let netns = Arc::new(
            netns
                .try_clone()
                .map_err(|source| PodError::Netns { uid: uid(), source })?,
        );
        let addresses = netns
            .addresses()
            .map_err(|source| PodError::Addresses { uid: uid(), source })?;
        let trust_domain = workload_trust_domain(&ctx.proxy.state.read(), info, &addresses)
            .unwrap_or_else(|| ctx.trust_domain.clone());
        let identity = Identity::new(&trust_domain, &info.namespace, &info.service_account)
            .map_err(|source| PodError::Identity { uid: uid(), source })?;
        let identity = LiveIdentity::new(identity);
        let proxy = PodProxy::start(
            &ctx.proxy,
            &info.name,
            &info.namespace,
            &identity,
            netns.clone(),
            &addresses,
        )
        .map_err(|e| PodError::Listen {
            uid: uid(),
            port: e.port,
            netns: netns.name().to_owned(),
            source: e.source,
        })?;
        tracing::info!(uid = %info.uid, %identity, ?addresses, netns = netns.name(), "pod enrolled");
        Ok(RunningPod {
            info: info.clone(),
            netns_inode,
            identity,
            addresses,
            proxy,
        })
    }
}

impl PodHandler for PodManager {
    fn add(&self, info: PodInfo, netns: Netns) -> Result<(), PodError> {
        self.named.lock().insert(info.uid.clone());
        let inode = netns.inode().ok();
        {
            let pods = self.pods.lock();
            if let Some(running) = pods.get(&info.uid)
                && Some(running.netns_inode) == inode
                && running.info == info
            {
                return Ok(());
            }
        }
        // A changed pod (new netns or identity) is restarted: stop the old listeners first, so
        // the new ones can bind.
        self.remove(&info.uid);
        let running = match self.start(&info, &netns) {
            Ok(running) => running,
            // Its identity will not change by waiting; anything else (a port still held, a
            // namespace not yet set up) may: keep the pod and retry.
            Err(e @ PodError::Identity { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(uid = %info.uid, error = %e, "pod not enrolled; retrying");
                let uid = info.uid.clone();
                self.set_pending(&uid, Some((info, netns)));
                return Err(e);
            }
        };
        self.insert(running);
        Ok(())
    }

    fn remove(&self, uid: &str) {
        if self.pending.lock().contains_key(uid) {
            self.set_pending(uid, None);
        }
        let removed = {
            let mut pods = self.pods.lock();
            let removed = pods.remove(uid);
            self.ctx.local_pods.remove(uid);
            self.ctx.proxy.metrics.enrolled_pods.set(pods.len() as i64);
            self.ctx.proxy.metrics.active_proxies.set(pods.len() as i64);
            removed
        };
        if let Some(pod) = removed {
            // The pod is gone (DelWorkload, its netns deleted): so are its connections.
            pod.proxy.removal.remove();
            let still_used = self
                .pods
                .lock()
                .values()
                .any(|p| p.identity.get() == pod.identity.get());
            if !still_used {
                self.ctx.proxy.certs.forget(&pod.identity.get());
            }
            tracing::info!(%uid, "pod removed");
        }
    }

    fn keep(&self, uid: &str) -> Result<(), PodError> {
        if !self.pods.lock().contains_key(uid) {
            return Err(PodError::NotEnrolled(uid.to_owned()));
        }
        self.named.lock().insert(uid.to_owned());
        Ok(())
    }

    fn begin_snapshot(&self) {
        self.named.lock().clear();
    }

    fn snapshot_sent(&self) {
        let named = self.named.lock().clone();
        let stale: Vec<String> = self
            .pods
            .lock()
            .keys()
            .filter(|uid| !named.contains(*uid))
            .cloned()
            .collect();
        for uid in stale {
            self.remove(&uid);
        }
    }
}

impl PodManager {
    /// Follows pods enrolled from a netns path (the config file's pods): when the path is gone
    /// (`ip netns del`, the process behind `/proc/PID/ns/net` exited) or names another
    /// namespace, the pod is removed, its listeners and tasks with it. Checks every `period`,
    /// until the manager is dropped.
    pub(crate) fn follow_netns_paths(
        self: &Arc<Self>,
        pods: Vec<(String, PathBuf)>,
        period: Duration,
    ) {
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut pods = pods;
            while !pods.is_empty() {
                tokio::time::sleep(period).await;
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                pods.retain(|(uid, path)| {
                    let enrolled = manager
                        .pods
                        .lock()
                        .get(uid)
                        .map(|p| p.netns_inode);
                    let now = std::fs::metadata(path).map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        m.ino()
                    });
                    match (enrolled, now) {
                        (Some(inode), Ok(current)) if inode == current => true,
                        (Some(_), _) => {
                            tracing::info!(%uid, path = %path.display(), "pod netns gone; removing the pod");
                            manager.remove(uid);
                            false
                        }
                        // Removed some other way: stop following it.
                        (None, _) => false,
                    }
                });
            }
        });
    }
}

/// Why a pod could not be enrolled or kept; the ZDS Ack carries it to the node agent.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("cannot open the netns {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {uid}: {source}")]
    Identity {
        uid: String,
        source: crate::identity::IdentityError,
    },
    #[error("pod {uid}: cannot inspect its netns: {source}")]
    Netns { uid: String, source: std::io::Error },
    #[error("pod {uid}: cannot read its addresses: {source}")]
    Addresses { uid: String, source: std::io::Error },
    #[error(
        "pod {uid}: cannot listen on port {port} in {netns}: {source} (is another proxy without SO_REUSEPORT holding it?)"
    )]
    Listen {
        uid: String,
        port: u16,
        netns: String,
        source: std::io::Error,
    },
    #[error("keep for pod {0}, which is not enrolled: send AddWorkload with its netns")]
    NotEnrolled(String),
    /// The node agent could not hand the pod to its proxy.
    #[error("pod {uid}: the proxy does not serve it: {reason}")]
    Proxy { uid: String, reason: String },
}

/// The trust domain discovery gives the pod `info` at `addresses`: that of the workload of the
/// same name and namespace at one of them.
fn workload_trust_domain(
    state: &crate::state::State,
    info: &PodInfo,
    addresses: &[IpAddr],
) -> Option<String> {
    addresses
        .iter()
        .filter_map(|ip| state.workload_by_ip(*ip))
        .find(|w| w.namespace == info.namespace && (w.name.is_empty() || w.name == info.name))
        .map(|w| w.identity.trust_domain().to_owned())
}

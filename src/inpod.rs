//! Enrolled pods: for each one, the 15001/15006/15008 listeners created inside its network
//! namespace and the tasks serving them; and the ZDS client through which a node agent adds
//! and removes pods (docs/design.md §6). Pods listed in the config file go through the same
//! [`PodManager::add`].

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::identity::{CertificateManager, Identity, LiveIdentity};
use crate::netns::{Netns, PodSocketFactory, SocketFactory};
use crate::ports;
use crate::proto::zds;
use crate::proxy::{
    HboneClient, InboundServer, LocalWorkload, Outbound, PodLife, StateRouter, TunnelSettings,
    passthrough,
};
use crate::socket::{self, SeqPacket};
use crate::state::SharedState;
use crate::sync::Lock;

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
    pub certs: Arc<CertificateManager>,
    pub state: Arc<SharedState>,
    pub tunnel: TunnelSettings,
    pub trust_domain: String,
    pub cluster_id: String,
    pub preserve_source_ip: bool,
    /// On-demand discovery of unknown destinations (xDS), if enabled.
    pub resolver: Option<Arc<dyn crate::xds::Resolver>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub drain: crate::drain::Drain,
    /// The enrolled pods by identity, kept for certificate sources that attest a pod.
    pub local_pods: crate::identity::LocalPods,
    /// Which plaintext a pod's 15006 takes.
    pub plaintext: crate::proxy::passthrough::InboundPlaintext,
    /// Unknown destinations in the cluster's pod ranges: held, refused when strict.
    pub cluster: Option<Arc<crate::proxy::outbound::ClusterGuard>>,
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
    /// Its live connections (the admin page's `workloadState`).
    connections: Option<Arc<crate::proxy::live::ConnectionTable>>,
    tasks: Vec<JoinHandle<()>>,
    /// `send(true)` ends the pod's live connections (on removal; a drain just drops it).
    removal: watch::Sender<bool>,
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        // Closing the listeners stops new connections; live ones run to their end.
        for t in &self.tasks {
            t.abort();
        }
    }
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
        self.ctx.metrics.pending_proxies.set(pending.len() as i64);
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
                if manager.ctx.drain.is_draining() {
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
                self.ctx.metrics.pending_proxies.set(pending.len() as i64);
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
        let certs = self.ctx.certs.clone();
        let identity = Identity::clone(&running.identity.get());
        let uid = running.info.uid.clone();
        self.ctx.local_pods.insert(&uid, &identity);
        let mut pods = self.pods.lock();
        pods.insert(uid.clone(), running);
        self.ctx.metrics.enrolled_pods.set(pods.len() as i64);
        self.ctx.metrics.active_proxies.set(pods.len() as i64);
        let prefetch = tokio::spawn(async move {
            if let Err(e) = certs.fetch(&identity).await {
                tracing::warn!(%identity, error = %e, "no certificate yet for an enrolled pod");
            }
        });
        if let Some(p) = pods.get_mut(&uid) {
            p.tasks.push(prefetch);
        }
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
        self.each(|p| Some((p.info.uid.clone(), p.connections.clone()?)))
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
        self.ctx.metrics.pending_proxies.set(0);
        self.ctx.metrics.enrolled_pods.set(0);
        self.ctx.metrics.active_proxies.set(0);
    }

    /// After every change of the state, moves each enrolled pod to the trust domain its
    /// workload names (see [`PodManager::follow_workloads`]).
    pub(crate) fn follow_trust_domains(self: &Arc<Self>) {
        let manager = Arc::downgrade(self);
        let mut changes = self.ctx.state.changes();
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
            let state = self.ctx.state.read();
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
            let still_used = self.pods.lock().values().any(|p| *p.identity.get() == old);
            if !still_used {
                self.ctx.certs.forget(&old);
            }
            let certs = self.ctx.certs.clone();
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
        let trust_domain = workload_trust_domain(&ctx.state.read(), info, &addresses)
            .unwrap_or_else(|| ctx.trust_domain.clone());
        let identity = Identity::new(&trust_domain, &info.namespace, &info.service_account)
            .map_err(|source| PodError::Identity { uid: uid(), source })?;
        let identity = LiveIdentity::new(identity);
        if let Err(e) = netns.enable_accept_queue_migration() {
            // An older kernel: an upgrade's overlap may then reset a connection or two.
            tracing::debug!(pod = %info.uid, error = %e, "cannot enable tcp_migrate_req");
        }
        let sockets: Arc<dyn SocketFactory> = Arc::new(PodSocketFactory::new(netns.clone()));
        // IPv4 always; IPv6 (v6-only sockets) too when the pod has an IPv6 address.
        let mut unspecified = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
        if addresses.iter().any(IpAddr::is_ipv6) {
            unspecified.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        }
        let bind = |ip: IpAddr, port| {
            sockets
                .tcp_bind(SocketAddr::new(ip, port))
                .map_err(|source| PodError::Listen {
                    uid: uid(),
                    port,
                    netns: netns.name().to_owned(),
                    source,
                })
        };
        let client = Arc::new(HboneClient::new(
            ctx.certs.clone(),
            sockets.clone(),
            ctx.tunnel.clone(),
        ));
        let router = Arc::new(StateRouter {
            state: ctx.state.clone(),
            source: identity.clone(),
            source_name: info.name.clone(),
            source_ips: addresses.clone(),
            cluster_id: ctx.cluster_id.clone(),
        });
        // Removing the pod (not draining the node) ends its live connections.
        let (removal, life) = PodLife::new();
        let connections = life.connections().cloned();
        let outbound = Arc::new(
            Outbound::new(
                client,
                sockets.clone(),
                router,
                ctx.resolver.clone(),
                ctx.tunnel.clone(),
                Some(ctx.metrics.clone()),
                Some(ctx.drain.clone()),
            )
            .for_pod(life.clone())
            .guarding(ctx.cluster.clone()),
        );
        let workload = LocalWorkload {
            identity: identity.clone(),
            addresses: addresses.clone(),
            preserve_source_ip: ctx.preserve_source_ip,
            state: Some(ctx.state.clone()),
            metrics: Some(ctx.metrics.clone()),
            drain: Some(ctx.drain.clone()),
            pod: life,
        };
        let inbound = InboundServer::new(
            workload.clone(),
            ctx.certs.clone(),
            sockets.clone(),
            ctx.tunnel.clone(),
        );
        // Bind everything before spawning anything, so a failure leaves no half-served pod.
        let mut listeners = Vec::new();
        for ip in unspecified {
            listeners.push((
                bind(ip, ports::OUTBOUND)?,
                bind(ip, ports::INBOUND_PLAINTEXT)?,
                bind(ip, ports::HBONE)?,
            ));
        }
        let mut tasks = Vec::new();
        for (outbound_l, plaintext_l, hbone_l) in listeners {
            tasks.push(tokio::spawn(
                outbound
                    .clone()
                    .serve(outbound_l, |s| socket::original_dst(s).ok()),
            ));
            tasks.push(tokio::spawn(inbound.clone().serve(hbone_l)));
            tasks.push(tokio::spawn(passthrough::serve_inbound_plaintext(
                plaintext_l,
                sockets.clone(),
                workload.clone(),
                ctx.tunnel.connect_timeout,
                ctx.plaintext,
            )));
        }
        tracing::info!(uid = %info.uid, %identity, ?addresses, netns = netns.name(), "pod enrolled");
        Ok(RunningPod {
            info: info.clone(),
            netns_inode,
            identity,
            addresses,
            connections,
            tasks,
            removal,
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
            self.ctx.metrics.enrolled_pods.set(pods.len() as i64);
            self.ctx.metrics.active_proxies.set(pods.len() as i64);
            removed
        };
        if let Some(pod) = removed {
            // The pod is gone (DelWorkload, its netns deleted): so are its connections.
            pod.removal.send_replace(true);
            let still_used = self
                .pods
                .lock()
                .values()
                .any(|p| p.identity.get() == pod.identity.get());
            if !still_used {
                self.ctx.certs.forget(&pod.identity.get());
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

/// Why one ZDS request was refused (the Ack's error; the session goes on).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("cannot decode WorkloadRequest: {0}")]
    Decode(prost::DecodeError),
    #[error("request refused: {0} (at most {MAX_ZDS_MESSAGE} bytes)")]
    Oversized(std::io::Error),
    #[error("AddWorkload {uid} must carry exactly one netns fd, got {got}")]
    Descriptors { uid: String, got: usize },
    #[error("AddWorkload {0} has no workload_info")]
    NoWorkloadInfo(String),
    #[error("AddWorkload has an empty uid")]
    EmptyUid,
    #[error("WorkloadRequest without a payload (a newer agent?)")]
    NoPayload,
    #[error(transparent)]
    Pod(#[from] PodError),
}

/// Why a ZDS session ended.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Largest ZDS datagram accepted.
const MAX_ZDS_MESSAGE: usize = 64 * 1024;

/// Largest reply sent: Cilium's agent reads each reply into a 1 KiB buffer
/// (cilium/cilium `pkg/ztunnel/zds/server.go`, readMsg), and on SOCK_SEQPACKET a longer one
/// would arrive cut and fail to decode there.
const MAX_ZDS_REPLY: usize = 1024;

/// The Ack for `result`, its error cut (at a character boundary, marked `…`) so that the whole
/// reply fits in [`MAX_ZDS_REPLY`].
fn ack(result: Result<(), RequestError>) -> Vec<u8> {
    let mut error = result.err().map(|e| e.to_string()).unwrap_or_default();
    // Tags and lengths take at most 8 bytes; the marker 3.
    let room = MAX_ZDS_REPLY - 8 - 3;
    if error.len() > room {
        let mut cut = room;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
        error.push('…');
    }
    zds::WorkloadResponse {
        payload: Some(zds::workload_response::Payload::Ack(zds::Ack { error })),
    }
    .encode_to_vec()
}

/// Serves one agent connection: hello, then one acknowledged request per datagram, until the
/// agent closes it. `ready` turns true at the first completed snapshot.
pub async fn zds_session(
    conn: &SeqPacket,
    handler: &dyn PodHandler,
    ready: &watch::Sender<bool>,
) -> Result<(), ZdsError> {
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
    };
    conn.send(&hello.encode_to_vec(), &[]).await?;
    handler.begin_snapshot();
    let mut buf = vec![0u8; MAX_ZDS_MESSAGE];
    loop {
        let result = match conn.recv(&mut buf).await {
            // A zero-length datagram reads like EOF on SOCK_SEQPACKET; both end the session.
            Ok((0, _)) => return Ok(()),
            Ok((n, fds)) => match zds::WorkloadRequest::decode(&buf[..n]) {
                Ok(request) => handle_request(request, fds, handler, ready),
                Err(e) => Err(RequestError::Decode(e)),
            },
            // One oversized datagram (or too many descriptors) is refused; SEQPACKET keeps the
            // boundaries, so the next one is whole again. Descriptors it carried are closed.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(RequestError::Oversized(e))
            }
            Err(e) => return Err(e.into()),
        };
        if let Err(error) = &result {
            tracing::warn!(%error, "ZDS request refused");
        }
        conn.send(&ack(result), &[]).await?;
    }
}

fn handle_request(
    request: zds::WorkloadRequest,
    mut fds: Vec<std::os::fd::OwnedFd>,
    handler: &dyn PodHandler,
    ready: &watch::Sender<bool>,
) -> Result<(), RequestError> {
    use zds::workload_request::Payload;
    match request.payload {
        Some(Payload::Add(add)) => {
            if fds.len() != 1 {
                return Err(RequestError::Descriptors {
                    uid: add.uid,
                    got: fds.len(),
                });
            }
            let Some(info) = add.workload_info else {
                return Err(RequestError::NoWorkloadInfo(add.uid));
            };
            if add.uid.is_empty() {
                return Err(RequestError::EmptyUid);
            }
            let netns = Netns::from_fd(fds.remove(0), format!("netns of pod {}", add.uid));
            let pod = PodInfo {
                uid: add.uid,
                name: info.name,
                namespace: info.namespace,
                service_account: info.service_account,
            };
            Ok(handler.add(pod, netns)?)
        }
        Some(Payload::Del(del)) => {
            handler.remove(&del.uid);
            Ok(())
        }
        Some(Payload::Keep(keep)) => Ok(handler.keep(&keep.uid)?),
        Some(Payload::SnapshotSent(_)) => {
            handler.snapshot_sent();
            ready.send_replace(true);
            Ok(())
        }
        None => Err(RequestError::NoPayload),
    }
}

/// Keeps a session with the agent at `path` up, reconnecting with capped, jittered backoff.
/// How long the node stays ready after losing its ZDS session: a session another proxy took
/// over comes back within it (Cilium's agent cancels the previous connection on each new one,
/// cilium `pkg/ztunnel/zds/server.go` Serve, so an old and a new proxy take it from each other
/// during a rolling update). Past it, with no session holding a snapshot, the node is not ready.
const SESSION_GRACE: Duration = Duration::from_secs(10);
/// A session that lasted this long was not a takeover: the next reconnect starts quickly again.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Follows the node agent's ZDS socket forever: connects, runs a session, reconnects with
/// backoff (reset only after a session that lasted). `ready` is true once a session's snapshot
/// arrived, and stays so through a reconnect unless [`SESSION_GRACE`] passes without one.
pub(crate) async fn run_zds(path: &Path, handler: Arc<dyn PodHandler>, ready: watch::Sender<bool>) {
    let (session_tx, session_rx) = watch::channel(false);
    let sessions = async {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(15));
        loop {
            match SeqPacket::connect(path) {
                Ok(conn) => {
                    tracing::info!(path = %path.display(), "connected to the node agent (ZDS)");
                    let started = std::time::Instant::now();
                    match zds_session(&conn, &*handler, &session_tx).await {
                        Ok(()) => tracing::warn!(
                            "node agent closed the ZDS connection (another proxy took the session, or the agent restarts); reconnecting"
                        ),
                        Err(e) => tracing::warn!(error = %e, "ZDS session failed; reconnecting"),
                    }
                    session_tx.send_replace(false);
                    if started.elapsed() >= STABLE_SESSION {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "node agent not reachable yet")
                }
            }
            backoff.wait().await;
        }
    };
    tokio::join!(
        sessions,
        publish_readiness(session_rx, &ready, SESSION_GRACE)
    );
}

/// Mirrors "a session holds a snapshot" into `ready`: true at once, false only after `grace`
/// without one.
async fn publish_readiness(
    mut session: watch::Receiver<bool>,
    ready: &watch::Sender<bool>,
    grace: Duration,
) {
    loop {
        if *session.borrow_and_update() {
            ready.send_replace(true);
            if session.changed().await.is_err() {
                return;
            }
            continue;
        }
        let held = tokio::time::timeout(grace, session.wait_for(|held| *held))
            .await
            .map(|r| r.is_ok());
        match held {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                if *ready.borrow() {
                    tracing::warn!(?grace, "no ZDS session with the node agent: not ready");
                }
                ready.send_replace(false);
                if session.wait_for(|held| *held).await.is_err() {
                    return;
                }
            }
        }
    }
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

#[cfg(test)]
mod tests;

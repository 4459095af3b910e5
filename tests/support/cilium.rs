//! A fake Cilium agent for one node, doing what cilium/cilium's `pkg/ztunnel` does for its
//! ztunnel:
//! - ZDS (`pkg/ztunnel/zds/server.go`): a SOCK_SEQPACKET server. At most two proxy connections
//!   are kept (maxZtunnelConnections), a third is closed at once; one is served at a time
//!   (activeMu), the next waiting until it ends. The proxy's hello is read first, into a 1 KiB
//!   buffer. The initial snapshot (one AddWorkload per enrolled pod with its netns descriptor,
//!   each acknowledged, then SnapshotSent) is sent once per agent run, to the first connection;
//!   then every update (AddWorkload, DelWorkload) is sent and its Ack read into a 1 KiB buffer.
//!   An Ack carrying an error, or a failed write, ends that connection and the update is lost.
//!   It never sends KeepWorkload.
//! - The in-pod redirect rules are installed before the AddWorkload (EnrollEndpoint); here the
//!   test topology installs them when it builds the pods.
//! - xDS (`pkg/ztunnel/xds`): delta ADS only, here plaintext gRPC on a Unix socket (newer
//!   agents' /var/run/cilium/xds.sock). Address resources are Workloads only, one per enrolled
//!   pod: resource name and uid the pod UID, `node` the node's IP, HBONE, the pod's addresses
//!   (endpoint_event.go, ToXDSAddress); each event is one response with a fresh nonce.
//!   Authorization gets one empty response. A NACK is only logged.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hboned::proto::istio::workload as pb;
use hboned::proto::zds;
use hboned::socket::{SeqPacket, SeqPacketListener};
use hboned::xds::convert::{ADDRESS_TYPE, AUTHORIZATION_TYPE, workload_resource};
use prost::Message;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::fake_ads::{AdsStream, FakeAds};

/// Cilium's read buffer for every message from the proxy.
const READ_BUFFER: usize = 1024;

/// An enrolled pod, as the agent knows it.
#[derive(Debug, Clone)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Its network namespace (a path the agent opens for the descriptor).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// The node's IP (Cilium's `Workload.node`).
    pub node_ip: IpAddr,
}

impl Pod {
    /// The Workload Cilium's xDS server sends for this pod.
    pub fn workload(&self) -> pb::Workload {
        pb::Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            node: self.node_ip.to_string(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            addresses: self
                .ips
                .iter()
                .map(|ip| match ip {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// One ZDS update for the active connection.
#[derive(Debug)]
pub enum Update {
    Add(Pod),
    Del(String),
}

type Queued = (Update, oneshot::Sender<Result<(), String>>);

/// The agent's ZDS side; dropped: its socket closes.
pub struct Zds {
    pub socket: PathBuf,
    updates: mpsc::UnboundedSender<Queued>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Zds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Zds {
    /// Listens on `socket`; the first connection gets `snapshot`.
    pub fn start(socket: &Path, snapshot: Vec<Pod>) -> Zds {
        let listener = SeqPacketListener::bind(socket).expect("bind the ZDS socket");
        let (updates, rx) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(listener, snapshot, rx, accepted.clone()));
        Zds {
            socket: socket.to_owned(),
            updates,
            accepted,
            task,
        }
    }

    /// Queues an update for whichever connection is active; resolves with its outcome (an Ack
    /// error, or the connection lost: the update is gone, as in Cilium).
    pub async fn send(&self, update: Update) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.updates.send((update, tx)).expect("agent running");
        super::within(30, rx)
            .await
            .unwrap_or_else(|_| Err("agent gone".into()))
    }

    /// Proxy connections accepted so far (kept or closed).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(
    listener: SeqPacketListener,
    snapshot: Vec<Pod>,
    updates: mpsc::UnboundedReceiver<Queued>,
    accepted: Arc<AtomicUsize>,
) {
    // activeMu, holding what the active connection consumes.
    let active = Arc::new(Mutex::new((Some(snapshot), updates)));
    let slots = Arc::new(tokio::sync::Semaphore::new(2));
    loop {
        let Ok(conn) = listener.accept().await else {
            return;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(conn);
            continue;
        };
        let active = active.clone();
        tokio::spawn(async move {
            let mut guard = active.lock().await;
            let (snapshot, updates) = &mut *guard;
            let _ = handle(&conn, snapshot, updates).await;
            drop(slot);
        });
    }
}

/// handleConn: hello, the snapshot if still unsent, then updates until one fails.
async fn handle(
    conn: &SeqPacket,
    snapshot: &mut Option<Vec<Pod>>,
    updates: &mut mpsc::UnboundedReceiver<Queued>,
) -> Result<(), String> {
    let mut buf = [0u8; READ_BUFFER];
    let (n, _) = conn.recv(&mut buf).await.map_err(|e| e.to_string())?;
    zds::ZdsHello::decode(&buf[..n]).map_err(|e| e.to_string())?;
    if let Some(pods) = snapshot.take() {
        for pod in pods {
            send_and_wait_for_ack(conn, &Update::Add(pod)).await?;
        }
        let sent = zds::workload_request::Payload::SnapshotSent(zds::SnapshotSent {});
        send_payload(conn, sent, None).await?;
    }
    while let Some((update, done)) = updates.recv().await {
        let result = send_and_wait_for_ack(conn, &update).await;
        let failed = result.is_err();
        let _ = done.send(result);
        if failed {
            return Err("connection ended".into());
        }
    }
    Ok(())
}

async fn send_and_wait_for_ack(conn: &SeqPacket, update: &Update) -> Result<(), String> {
    match update {
        Update::Add(pod) => {
            let netns = std::fs::File::open(&pod.netns).map_err(|e| e.to_string())?;
            let add = zds::workload_request::Payload::Add(zds::AddWorkload {
                uid: pod.uid.clone(),
                workload_info: Some(zds::WorkloadInfo {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                }),
            });
            send_payload(conn, add, Some(&netns)).await
        }
        Update::Del(uid) => {
            let del = zds::workload_request::Payload::Del(zds::DelWorkload { uid: uid.clone() });
            send_payload(conn, del, None).await
        }
    }
}

async fn send_payload(
    conn: &SeqPacket,
    payload: zds::workload_request::Payload,
    netns: Option<&std::fs::File>,
) -> Result<(), String> {
    let msg = zds::WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec();
    let fds: Vec<_> = netns.iter().map(|f| f.as_fd()).collect();
    conn.send(&msg, &fds).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; READ_BUFFER];
    let (n, _) = conn.recv(&mut buf).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the proxy closed the connection".into());
    }
    let response = zds::WorkloadResponse::decode(&buf[..n]).map_err(|e| e.to_string())?;
    match response.payload {
        Some(zds::workload_response::Payload::Ack(a)) if !a.error.is_empty() => {
            Err(format!("ztunnel responded with an ack error: {}", a.error))
        }
        _ => Ok(()),
    }
}

/// The agent's xDS side on a Unix socket.
pub struct Xds {
    pub socket: PathBuf,
    ads: FakeAds,
}

impl Xds {
    pub fn start(socket: &Path) -> Xds {
        Xds {
            socket: socket.to_owned(),
            ads: FakeAds::serve_unix(socket),
        }
    }

    /// The proxy's stream: its two subscriptions read, every workload sent in one response
    /// per pod and Authorization's one empty response; ACKs are read and otherwise ignored
    /// (Cilium only logs a NACK).
    pub async fn serve_stream(&mut self, pods: &[Pod]) -> AdsStream {
        let mut stream = self.ads.accept().await;
        let mut types = [stream.next().await.type_url, stream.next().await.type_url];
        types.sort();
        assert_eq!(types, [AUTHORIZATION_TYPE, ADDRESS_TYPE]);
        for (i, pod) in pods.iter().enumerate() {
            let resource = workload_resource(&pod.uid, "", pod.workload());
            stream.send(ADDRESS_TYPE, &format!("nonce-{i}"), vec![resource], &[]);
            let _ack = stream.next().await;
        }
        stream.send(AUTHORIZATION_TYPE, "authz-0", Vec::new(), &[]);
        let _ack = stream.next().await;
        stream
    }
}

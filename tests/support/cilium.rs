//! A stand-in for the first Cilium agents that served ZDS, which the Go module proxy does not
//! serve: cilium/cilium's main branch before v1.19.0 (never in a release; v1.18 has no
//! `pkg/ztunnel`, v1.19.0 already cancels the previous connection, and tests/real_cilium.rs
//! runs that code). Their `pkg/ztunnel/zds/server.go` behaved so, and so does this one:
//! - Serve closes the `zcInitialized` channel on every accept, so the agent panics ("close of
//!   closed channel") on its second proxy connection, whether or not the first still lives;
//!   here the agent stops: listener and connections closed, [`Zds::crashed`] set.
//! - handleConn reads the proxy's hello into a 1 KiB buffer; InitialSnapshot waits for the
//!   first connection, then sends one AddWorkload per pod (its netns descriptor attached, each
//!   acknowledged) and SnapshotSent; then every update (AddWorkload, DelWorkload) is sent and
//!   its Ack read into a 1 KiB buffer. An Ack carrying an error, or a failed write, ends the
//!   connection and the update is lost. It never sends KeepWorkload.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use hboned::proto::zds;
use hboned::socket::{SeqPacket, SeqPacketListener};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::cilium_agent::Pod;

/// Cilium's read buffer for every message from the proxy.
const READ_BUFFER: usize = 1024;

/// One ZDS update for the connection.
#[derive(Debug)]
pub(crate) enum Update {
    Add(Pod),
    Del(String),
}

type Queued = (Update, oneshot::Sender<Result<(), String>>);

/// The agent's ZDS side; dropped: its socket closes.
pub(crate) struct Zds {
    pub socket: PathBuf,
    updates: mpsc::UnboundedSender<Queued>,
    accepted: Arc<AtomicUsize>,
    crashed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Zds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Zds {
    /// Listens on `socket`; the first connection gets `snapshot`.
    pub(crate) fn start(socket: &Path, snapshot: Vec<Pod>) -> Zds {
        let listener = SeqPacketListener::bind(socket).expect("bind the ZDS socket");
        let (updates, rx) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let crashed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(serve(
            listener,
            snapshot,
            rx,
            accepted.clone(),
            crashed.clone(),
        ));
        Zds {
            socket: socket.to_owned(),
            updates,
            accepted,
            crashed,
            task,
        }
    }

    /// Queues an update for the connection; resolves with its outcome (an Ack error, or the
    /// connection lost: the update is gone, as in Cilium).
    pub(crate) async fn send(&self, update: Update) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.updates
            .send((update, tx))
            .map_err(|_| "agent gone".to_owned())?;
        super::within(30, rx)
            .await
            .unwrap_or_else(|_| Err("agent gone".into()))
    }

    /// Proxy connections accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Whether the agent died of a second connection.
    pub(crate) fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }
}

async fn serve(
    listener: SeqPacketListener,
    snapshot: Vec<Pod>,
    updates: mpsc::UnboundedReceiver<Queued>,
    accepted: Arc<AtomicUsize>,
    crashed: Arc<AtomicBool>,
) {
    let Ok(conn) = listener.accept().await else {
        return;
    };
    accepted.fetch_add(1, Ordering::SeqCst);
    let handler = tokio::spawn(async move {
        let _ = handle(&conn, snapshot, updates).await;
    });
    // close(s.zcInitialized) again on the next accept: the agent panics, taking every
    // connection with it.
    if listener.accept().await.is_ok() {
        accepted.fetch_add(1, Ordering::SeqCst);
        crashed.store(true, Ordering::SeqCst);
    }
    handler.abort();
}

/// handleConn with InitialSnapshot: hello, the snapshot, then updates until one fails.
async fn handle(
    conn: &SeqPacket,
    snapshot: Vec<Pod>,
    mut updates: mpsc::UnboundedReceiver<Queued>,
) -> Result<(), String> {
    let mut buf = [0u8; READ_BUFFER];
    let (n, _) = conn.recv(&mut buf).await.map_err(|e| e.to_string())?;
    zds::ZdsHello::decode(&buf[..n]).map_err(|e| e.to_string())?;
    for pod in snapshot {
        send_and_wait_for_ack(conn, &Update::Add(pod)).await?;
    }
    let sent = zds::workload_request::Payload::SnapshotSent(zds::SnapshotSent {});
    send_payload(conn, sent, None).await?;
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

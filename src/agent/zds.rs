//! The agent's end of ZDS: it hands the proxy each enrolled pod's network namespace, as
//! istio-cni's node agent (cni/pkg/nodeagent/ztunnelserver.go) and the Cilium agent do. One
//! proxy holds the session at a time, the newest: during a rolling update the new proxy takes
//! it over and the old one is let go. A proxy that connects is sent every pod the agent
//! serves (AddWorkload, the netns descriptor by SCM_RIGHTS), then SnapshotSent — but only once
//! the agent is primed (its first enrollment pass done): a restarted agent's snapshot would
//! otherwise name no pod and the proxy would drop them all. Each enrollment is one AddWorkload
//! and each removal one DelWorkload, every request waiting for the proxy's Ack; with no proxy
//! connected, a pod is kept for the next one's snapshot. As a [`PodHandler`] it is what the enroller serves pods through, so an
//! enrollment only succeeds once the proxy listens in the pod.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};

use crate::inpod::{PodError, PodHandler, PodInfo};
use crate::netns::Netns;
use crate::proto::zds;
use crate::socket::{SeqPacket, SeqPacketListener};

/// How long the proxy may take to acknowledge one request.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One request from the enroller, answered on `reply`.
enum Command {
    Add {
        info: PodInfo,
        netns: Netns,
        reply: std::sync::mpsc::SyncSender<Result<(), String>>,
    },
    Remove {
        uid: String,
        reply: std::sync::mpsc::SyncSender<Result<(), String>>,
    },
}

/// The handle the enroller holds; the session runs in [`ZdsServer::serve`].
#[derive(Clone)]
pub(crate) struct ZdsServer {
    commands: mpsc::UnboundedSender<Command>,
    connected: watch::Receiver<bool>,
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsServer")
            .field("connected", &*self.connected.borrow())
            .finish()
    }
}

/// The session side, run by [`ZdsServer::serve`].
#[derive(Debug)]
pub(crate) struct Session {
    listener: SeqPacketListener,
    commands: mpsc::UnboundedReceiver<Command>,
    connected: watch::Sender<bool>,
}

/// The proxy holding the session, and whether its snapshot was sent.
struct Holder {
    conn: SeqPacket,
    snapshot_sent: bool,
}

impl ZdsServer {
    /// Listens at `path` (a stale socket there is replaced, the new one mode 0600).
    pub(crate) fn bind(path: &Path) -> std::io::Result<(ZdsServer, Session)> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && meta.file_type().is_socket()
        {
            std::fs::remove_file(path)?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = SeqPacketListener::bind(path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (connected_tx, connected) = watch::channel(false);
        Ok((
            ZdsServer {
                commands: tx,
                connected,
            },
            Session {
                listener,
                commands: rx,
                connected: connected_tx,
            },
        ))
    }

    /// True while a proxy holds the session and has its snapshot.
    pub(crate) fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Sends `command` built around a reply channel and waits for the answer (blocking: the
    /// enroller runs on the blocking pool).
    fn ask(
        &self,
        command: impl FnOnce(std::sync::mpsc::SyncSender<Result<(), String>>) -> Command,
    ) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.commands.send(command(tx)).is_err() {
            return Err("the ZDS server stopped".into());
        }
        match rx.recv_timeout(ACK_TIMEOUT * 2) {
            Ok(result) => result,
            Err(_) => Err("no answer from the ZDS server".into()),
        }
    }
}

impl PodHandler for ZdsServer {
    fn add(&self, info: PodInfo, netns: Netns) -> Result<(), PodError> {
        let uid = info.uid.clone();
        self.ask(|reply| Command::Add { info, netns, reply })
            .map_err(|reason| PodError::Proxy { uid, reason })
    }

    fn remove(&self, uid: &str) {
        if let Err(e) = self.ask(|reply| Command::Remove {
            uid: uid.to_owned(),
            reply,
        }) {
            tracing::warn!(pod = %uid, error = %e, "the proxy did not take the pod's removal; its next session's snapshot leaves it out");
        }
    }

    fn keep(&self, _uid: &str) -> Result<(), PodError> {
        Ok(())
    }

    fn begin_snapshot(&self) {}

    fn snapshot_sent(&self) {}
}

/// What the agent serves, by uid.
type Served = BTreeMap<String, (PodInfo, Netns)>;

impl Session {
    /// Runs the session side until the handle is dropped: takes each new proxy, brings it up to
    /// date (its snapshot once `primed` is true), then passes on the enroller's requests.
    pub(crate) async fn serve(mut self, mut primed: watch::Receiver<bool>) {
        let mut served: Served = BTreeMap::new();
        let mut proxy: Option<Holder> = None;
        loop {
            if let Some(holder) = proxy.as_mut().filter(|h| !h.snapshot_sent)
                && *primed.borrow_and_update()
            {
                let snapshot = zds::workload_request::Payload::SnapshotSent(zds::SnapshotSent {});
                match request(&holder.conn, &snapshot, None).await {
                    Ok(()) => {
                        holder.snapshot_sent = true;
                        tracing::info!(pods = served.len(), "ZDS snapshot sent to the proxy");
                        self.connected.send_replace(true);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the proxy did not take the ZDS snapshot");
                        proxy = None;
                    }
                }
            }
            tokio::select! {
                conn = self.listener.accept() => match conn {
                    Ok(conn) => {
                        if proxy.is_some() {
                            tracing::info!("a new proxy connected over ZDS; it takes the session over");
                        }
                        self.connected.send_replace(false);
                        proxy = None;
                        match greet(&conn, &served).await {
                            Ok(()) => {
                                tracing::info!(pods = served.len(), "proxy connected over ZDS");
                                proxy = Some(Holder { conn, snapshot_sent: false });
                            }
                            Err(e) => tracing::warn!(error = %e, "a proxy's ZDS session failed at its start"),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot accept a ZDS connection");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                command = self.commands.recv() => {
                    let Some(command) = command else { return };
                    self.handle(command, &mut served, &mut proxy).await;
                }
                changed = primed.changed(), if proxy.as_ref().is_some_and(|h| !h.snapshot_sent) => {
                    if changed.is_err() {
                        // The agent stopped priming: whatever it has is all it will have.
                        primed = watch::channel(true).1;
                    }
                }
                gone = closed(proxy.as_ref().map(|h| &h.conn)) => {
                    tracing::warn!(reason = %gone, "the proxy left the ZDS session; its pods wait for the next one");
                    proxy = None;
                    self.connected.send_replace(false);
                }
            }
        }
    }

    async fn handle(&self, command: Command, served: &mut Served, proxy: &mut Option<Holder>) {
        match command {
            Command::Add { info, netns, reply } => {
                // Without a proxy the pod waits for the next one's snapshot: a restarted agent
                // takes over pods whose rules are in before any proxy is back. (The CNI
                // endpoint refuses new pods while no proxy is connected.)
                let result = match proxy.as_ref() {
                    None => Ok(()),
                    Some(h) => request(&h.conn, &add(&info), Some(&netns)).await,
                };
                match &result {
                    Ok(()) => {
                        served.insert(info.uid.clone(), (info, netns));
                    }
                    Err(_) => {
                        served.remove(&info.uid);
                    }
                }
                self.lost_if_broken(&result, proxy);
                let _ = reply.send(result);
            }
            Command::Remove { uid, reply } => {
                served.remove(&uid);
                let result = match proxy.as_ref() {
                    // The next session's snapshot leaves it out.
                    None => Ok(()),
                    Some(h) => {
                        let del = zds::workload_request::Payload::Del(zds::DelWorkload {
                            uid: uid.clone(),
                        });
                        request(&h.conn, &del, None).await
                    }
                };
                self.lost_if_broken(&result, proxy);
                let _ = reply.send(result);
            }
        }
    }

    /// A request that failed on the socket (not a refusal) ends the session.
    fn lost_if_broken(&self, result: &Result<(), String>, proxy: &mut Option<Holder>) {
        if let Err(e) = result
            && e.starts_with(BROKEN)
        {
            *proxy = None;
            self.connected.send_replace(false);
        }
    }
}

/// Marks an error of the socket itself (as opposed to the proxy refusing a request).
const BROKEN: &str = "ZDS session broken: ";

fn add(info: &PodInfo) -> zds::workload_request::Payload {
    zds::workload_request::Payload::Add(zds::AddWorkload {
        uid: info.uid.clone(),
        workload_info: Some(zds::WorkloadInfo {
            name: info.name.clone(),
            namespace: info.namespace.clone(),
            service_account: info.service_account.clone(),
        }),
    })
}

/// Reads the proxy's hello, then sends every served pod.
async fn greet(conn: &SeqPacket, served: &Served) -> Result<(), String> {
    let mut buf = vec![0u8; 1024];
    let hello = tokio::time::timeout(ACK_TIMEOUT, conn.recv(&mut buf))
        .await
        .map_err(|_| "no hello from the proxy".to_owned())?
        .map_err(|e| format!("{BROKEN}{e}"))?;
    let version = zds::ZdsHello::decode(&buf[..hello.0])
        .map_err(|e| format!("cannot decode the proxy's hello: {e}"))?
        .version;
    if version != zds::Version::V1 as i32 {
        return Err(format!("the proxy speaks ZDS version {version}, not 1"));
    }
    for (uid, (info, netns)) in served {
        if let Err(e) = request(conn, &add(info), Some(netns)).await {
            if e.starts_with(BROKEN) {
                return Err(e);
            }
            tracing::warn!(pod = %uid, error = %e, "the proxy refused a pod of its snapshot");
        }
    }
    Ok(())
}

/// One request and its Ack; `Err` holds the proxy's refusal, or a [`BROKEN`] socket.
async fn request(
    conn: &SeqPacket,
    payload: &zds::workload_request::Payload,
    netns: Option<&Netns>,
) -> Result<(), String> {
    let msg = zds::WorkloadRequest {
        payload: Some(payload.clone()),
    }
    .encode_to_vec();
    let fds: Vec<_> = netns.iter().map(|n| n.fd()).collect();
    conn.send(&msg, &fds)
        .await
        .map_err(|e| format!("{BROKEN}{e}"))?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(ACK_TIMEOUT, conn.recv(&mut buf))
        .await
        .map_err(|_| format!("{BROKEN}no Ack within {ACK_TIMEOUT:?}"))?
        .map_err(|e| format!("{BROKEN}{e}"))?;
    if n == 0 {
        return Err(format!("{BROKEN}the proxy closed the connection"));
    }
    match zds::WorkloadResponse::decode(&buf[..n]) {
        Ok(zds::WorkloadResponse {
            payload: Some(zds::workload_response::Payload::Ack(ack)),
        }) if ack.error.is_empty() => Ok(()),
        Ok(zds::WorkloadResponse {
            payload: Some(zds::workload_response::Payload::Ack(ack)),
        }) => Err(ack.error),
        Ok(_) => Err("the proxy answered without an Ack".into()),
        Err(e) => Err(format!("cannot decode the proxy's answer: {e}")),
    }
}

/// Resolves when the idle session's proxy goes (it sends nothing unasked); never without one.
async fn closed(proxy: Option<&SeqPacket>) -> String {
    let Some(conn) = proxy else {
        return std::future::pending().await;
    };
    let mut buf = [0u8; 64];
    loop {
        match conn.recv(&mut buf).await {
            Ok((0, _)) => return "the connection closed".into(),
            Ok(_) => tracing::debug!("an unasked message from the proxy, ignored"),
            Err(e) => return e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;

//! The ZDS client: the session with the node agent (istio-cni, Cilium's agent, `hboned agent`)
//! over its SEQPACKET socket, as ztunnel speaks it (docs/design.md §6): the hello, each
//! request acknowledged, a pod's netns descriptor with its AddWorkload, the snapshot; and the
//! reconnecting loop that keeps a session and tells readiness whether one is up.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;

use super::{PodError, PodHandler, PodInfo};
use crate::backoff::Backoff;
use crate::netns::Netns;
use crate::proto::zds;
use crate::socket::SeqPacket;

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

#[cfg(test)]
mod tests;

//! ZDS protocol tests over a socketpair, with a recording handler (no netns, no root).

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::Mutex;

use super::*;
use crate::socket;

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
    known: Mutex<HashSet<String>>,
}

impl PodHandler for Recorder {
    fn add(&self, info: PodInfo, netns: Netns) -> Result<(), PodError> {
        assert!(netns.inode().is_ok(), "a live netns fd arrives");
        self.known.lock().unwrap().insert(info.uid.clone());
        self.events.lock().unwrap().push(format!(
            "add {} {}/{}/{}",
            info.uid, info.namespace, info.name, info.service_account
        ));
        Ok(())
    }
    fn remove(&self, uid: &str) {
        self.events.lock().unwrap().push(format!("del {uid}"));
    }
    fn keep(&self, uid: &str) -> Result<(), PodError> {
        self.events.lock().unwrap().push(format!("keep {uid}"));
        if self.known.lock().unwrap().contains(uid) {
            Ok(())
        } else {
            Err(PodError::NotEnrolled(uid.to_owned()))
        }
    }
    fn begin_snapshot(&self) {
        self.events.lock().unwrap().push("begin".into());
    }
    fn snapshot_sent(&self) {
        self.events.lock().unwrap().push("snapshot".into());
    }
}

fn request(payload: zds::workload_request::Payload) -> Vec<u8> {
    zds::WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add(uid: &str) -> Vec<u8> {
    request(zds::workload_request::Payload::Add(zds::AddWorkload {
        uid: uid.into(),
        workload_info: Some(zds::WorkloadInfo {
            name: "pod".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
        }),
    }))
}

async fn ack(agent: &SeqPacket) -> String {
    let mut buf = [0u8; 1024];
    let (n, _) = agent.recv(&mut buf).await.unwrap();
    let resp = zds::WorkloadResponse::decode(&buf[..n]).unwrap();
    match resp.payload {
        Some(zds::workload_response::Payload::Ack(a)) => a.error,
        None => panic!("response without ack: {:?}", &buf[..n]),
    }
}

#[tokio::test]
async fn session_acks_every_request_and_reports_readiness() {
    let (proxy, agent) = SeqPacket::pair().unwrap();
    let recorder = Arc::new(Recorder::default());
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let handler = recorder.clone();
    let session = tokio::spawn(async move { zds_session(&proxy, &*handler, &ready_tx).await });

    let mut buf = [0u8; 64];
    let (n, _) = agent.recv(&mut buf).await.unwrap();
    assert_eq!(
        zds::ZdsHello::decode(&buf[..n]).unwrap().version,
        zds::Version::V1 as i32
    );

    let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
    agent.send(&add("uid-1"), &[netns.as_fd()]).await.unwrap();
    assert_eq!(ack(&agent).await, "");
    // Add without its netns fd: refused with a reason, session goes on.
    agent.send(&add("uid-2"), &[]).await.unwrap();
    assert!(ack(&agent).await.contains("exactly one netns fd"));
    agent
        .send(
            &request(zds::workload_request::Payload::Keep(zds::KeepWorkload {
                uid: "uid-1".into(),
            })),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ack(&agent).await, "");
    agent
        .send(
            &request(zds::workload_request::Payload::Keep(zds::KeepWorkload {
                uid: "ghost".into(),
            })),
            &[],
        )
        .await
        .unwrap();
    assert!(ack(&agent).await.contains("ghost"));
    assert!(!*ready_rx.borrow_and_update());
    agent
        .send(
            &request(zds::workload_request::Payload::SnapshotSent(
                zds::SnapshotSent {},
            )),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ack(&agent).await, "");
    assert!(
        *ready_rx.borrow_and_update(),
        "ready after the first snapshot"
    );
    agent
        .send(
            &request(zds::workload_request::Payload::Del(zds::DelWorkload {
                uid: "uid-1".into(),
            })),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ack(&agent).await, "");
    // Garbage and an empty request: errors, not a crash.
    agent.send(&[0xff, 0xff, 0xff], &[]).await.unwrap();
    assert!(ack(&agent).await.contains("decode"));
    // Only an unknown field (field 9, empty): a payload this proxy does not know.
    agent.send(&[0x4a, 0x00], &[]).await.unwrap();
    assert!(ack(&agent).await.contains("without a payload"));
    drop(agent);
    session.await.unwrap().unwrap();

    let events = recorder.events.lock().unwrap().clone();
    assert_eq!(
        events,
        [
            "begin",
            "add uid-1 ns/pod/sa",
            "keep uid-1",
            "keep ghost",
            "snapshot",
            "del uid-1"
        ]
    );
}

#[tokio::test]
async fn run_zds_reconnects_to_a_restarted_agent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    let recorder: Arc<dyn PodHandler> = Arc::new(Recorder::default());
    let (ready_tx, _ready_rx) = watch::channel(false);
    let client_path = path.clone();
    let client = tokio::spawn(async move { run_zds(&client_path, recorder, ready_tx).await });
    for _ in 0..2 {
        let listener = loop {
            match socket::SeqPacketListener::bind(&path) {
                Ok(l) => break l,
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        };
        let agent = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = agent.recv(&mut buf).await.unwrap();
        assert!(zds::ZdsHello::decode(&buf[..n]).is_ok());
        drop(agent);
        drop(listener);
        std::fs::remove_file(&path).unwrap();
    }
    client.abort();
}

/// Every reply fits the 1 KiB buffer Cilium's agent reads it into, however long the error.
#[tokio::test]
async fn replies_fit_in_a_kibibyte() {
    let (proxy, agent) = SeqPacket::pair().unwrap();
    let recorder = Arc::new(Recorder::default());
    let (ready_tx, _ready_rx) = watch::channel(false);
    let handler = recorder.clone();
    let session = tokio::spawn(async move { zds_session(&proxy, &*handler, &ready_tx).await });
    let mut buf = [0u8; 64];
    agent.recv(&mut buf).await.unwrap();
    // A 3,000-byte uid and no netns fd: the refusal names the uid, cut to fit.
    let uid = "ü".repeat(1500);
    agent.send(&add(&uid), &[]).await.unwrap();
    let error = ack(&agent).await;
    assert!(error.starts_with("AddWorkload üü"), "{error}");
    assert!(error.ends_with('…'), "{error}");
    assert!(error.len() < 1024);
    drop(agent);
    session.await.unwrap().unwrap();
}

/// A session that ends and comes back within the grace (another proxy took it over for a
/// while) leaves the node ready; one that stays away past it does not; a new snapshot makes
/// the node ready again at once.
#[tokio::test(start_paused = true)]
async fn readiness_survives_a_session_taken_over_within_the_grace() {
    let grace = Duration::from_secs(10);
    let (session, session_rx) = watch::channel(false);
    let (ready_tx, ready) = watch::channel(false);
    let publisher = tokio::spawn(async move {
        publish_readiness(session_rx, &ready_tx, grace).await;
    });
    let settle = || tokio::time::sleep(Duration::from_millis(1));
    settle().await;
    assert!(!*ready.borrow(), "not ready before a snapshot");
    session.send_replace(true);
    settle().await;
    assert!(*ready.borrow(), "ready with the first snapshot");
    // Taken over, back after 9 s: ready throughout.
    session.send_replace(false);
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(*ready.borrow());
    session.send_replace(true);
    settle().await;
    // Away past the grace: not ready, until the next snapshot.
    session.send_replace(false);
    tokio::time::sleep(Duration::from_millis(9_990)).await;
    assert!(*ready.borrow());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!*ready.borrow(), "not ready once the grace has passed");
    session.send_replace(true);
    settle().await;
    assert!(*ready.borrow());
    drop(session);
    publisher.await.unwrap();
}

//! The agent's ZDS server against the proxy's own client (`inpod::zds_session`), each proxy a
//! recording handler: what the enroller asks arrives, refusals come back, the newest proxy
//! takes the session and is brought up to date. No netns, no root (this process's own
//! namespace stands in for a pod's).

use std::sync::{Arc, Mutex};

use super::*;

/// A proxy's pod handler that records what it is told and refuses uids starting with `bad`.
#[derive(Default)]
struct Proxy {
    events: Mutex<Vec<String>>,
}

impl Proxy {
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

impl PodHandler for Proxy {
    fn add(&self, info: PodInfo, netns: Netns) -> Result<(), PodError> {
        assert!(netns.inode().is_ok());
        if info.uid.starts_with("bad") {
            return Err(PodError::NotEnrolled(info.uid));
        }
        self.events.lock().unwrap().push(format!(
            "add {} {}/{}/{}",
            info.uid, info.namespace, info.name, info.service_account
        ));
        Ok(())
    }
    fn remove(&self, uid: &str) {
        self.events.lock().unwrap().push(format!("del {uid}"));
    }
    fn keep(&self, _: &str) -> Result<(), PodError> {
        Ok(())
    }
    fn begin_snapshot(&self) {
        self.events.lock().unwrap().push("begin".into());
    }
    fn snapshot_sent(&self) {
        self.events.lock().unwrap().push("snapshot".into());
    }
}

fn info(uid: &str) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        name: format!("{uid}-pod"),
        namespace: "demo".into(),
        service_account: "app".into(),
    }
}

fn netns() -> Netns {
    Netns::open(Path::new("/proc/self/ns/net")).unwrap()
}

/// A proxy connected to `path` running the client's session in a task.
fn connect(path: &Path) -> (Arc<Proxy>, tokio::task::JoinHandle<()>) {
    let proxy = Arc::new(Proxy::default());
    let handler = proxy.clone();
    let conn = SeqPacket::connect(path).unwrap();
    let task = tokio::spawn(async move {
        let (ready, _) = watch::channel(false);
        let _ = crate::inpod::zds_session(&conn, &*handler, &ready).await;
    });
    (proxy, task)
}

async fn add(server: &ZdsServer, uid: &str) -> Result<(), PodError> {
    let server = server.clone();
    let uid = uid.to_owned();
    tokio::task::spawn_blocking(move || server.add(info(&uid), netns()))
        .await
        .unwrap()
}

async fn remove(server: &ZdsServer, uid: &str) {
    let server = server.clone();
    let uid = uid.to_owned();
    tokio::task::spawn_blocking(move || server.remove(&uid))
        .await
        .unwrap()
}

/// Waits (up to 10 s) until `proxy` was told `n` things.
async fn wait_events(proxy: &Proxy, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proxy.events().len() < n && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_connected(server: &ZdsServer, want: bool) {
    let mut c = server.connected();
    tokio::time::timeout(Duration::from_secs(10), c.wait_for(|c| *c == want))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_proxy_holds_the_session_and_gets_every_served_pod() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    let (server, session) = ZdsServer::bind(&path).unwrap();
    let (primed_tx, primed) = watch::channel(false);
    let serving = tokio::spawn(session.serve(primed));

    // No proxy yet: the pod waits for the first one.
    add(&server, "early").await.unwrap();
    remove(&server, "early").await;

    // A proxy connects before the agent's first pass: pods go to it as they are enrolled, and
    // the snapshot only once the agent is primed.
    let (first, first_task) = connect(&path);
    add(&server, "p1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(first.events(), ["begin", "add p1 demo/p1-pod/app"]);
    assert!(!*server.connected().borrow());
    primed_tx.send_replace(true);
    wait_connected(&server, true).await;
    // The proxy's refusal is the enrollment's failure, with the proxy's reason.
    let err = add(&server, "bad-1").await.unwrap_err().to_string();
    assert!(err.contains("not enrolled"), "{err}");
    add(&server, "p2").await.unwrap();
    remove(&server, "p2").await;
    assert_eq!(
        first.events(),
        [
            "begin",
            "add p1 demo/p1-pod/app",
            "snapshot",
            "add p2 demo/p2-pod/app",
            "del p2"
        ]
    );

    // A second proxy (a rolling update): it is sent what is served, the first one let go.
    let (second, _second_task) = connect(&path);
    tokio::time::timeout(Duration::from_secs(10), first_task)
        .await
        .expect("the first proxy's session ends")
        .unwrap();
    wait_connected(&server, true).await;
    wait_events(&second, 3).await;
    assert_eq!(
        second.events(),
        ["begin", "add p1 demo/p1-pod/app", "snapshot"]
    );
    remove(&server, "p1").await;
    assert_eq!(second.events().last().unwrap(), "del p1");

    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_leaves_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    let (server, session) = ZdsServer::bind(&path).unwrap();
    let serving = tokio::spawn(session.serve(watch::channel(true).1));
    let (_proxy, task) = connect(&path);
    wait_connected(&server, true).await;
    add(&server, "p1").await.unwrap();
    task.abort();
    let _ = task.await;
    wait_connected(&server, false).await;
    // Meanwhile p2 comes and p1 goes: the proxy that comes back is sent p2 only.
    add(&server, "p2").await.unwrap();
    remove(&server, "p1").await;
    let (again, _task) = connect(&path);
    wait_connected(&server, true).await;
    wait_events(&again, 3).await;
    assert_eq!(
        again.events(),
        ["begin", "add p2 demo/p2-pod/app", "snapshot"]
    );
    serving.abort();
}

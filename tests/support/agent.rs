//! A fake node agent for the netns tests: a scratch pod namespace, and `hboned run` in this
//! process's namespace following a ZDS socket the test holds. It speaks as istio-cni's
//! ztunnel server does (cni/pkg/nodeagent/ztunnelserver.go): the proxy connects and says hello,
//! then each AddWorkload carries the pod's netns descriptor and every request is acknowledged.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hboned::proto::zds;
use hboned::socket::{SeqPacket, SeqPacketListener};
use prost::Message;

use super::within;

/// A network namespace of its own, with loopback up; deleted on drop.
pub(crate) struct ScratchNetns(pub String);

impl ScratchNetns {
    pub(crate) fn new(name: &str) -> Self {
        let run = |args: &[&str]| {
            assert!(
                std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap()
                    .success()
            )
        };
        run(&["netns", "add", name]);
        let guard = ScratchNetns(name.to_owned());
        run(&["-n", name, "link", "set", "lo", "up"]);
        guard
    }

    pub(crate) fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// `hboned run` following the ZDS socket `zds` and nothing else, readiness on a free loopback
/// port; killed on drop (its log shown on failure).
pub(crate) struct ZdsProxy {
    pub child: std::process::Child,
    /// Where the proxy serves readiness.
    pub readiness: std::net::SocketAddr,
    log: PathBuf,
}

impl ZdsProxy {
    /// Starts `bin run` with its config and log in `dir`, named `name`.
    pub(crate) fn start(bin: &Path, dir: &Path, name: &str, zds: &Path) -> ZdsProxy {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let readiness = free.local_addr().unwrap();
        drop(free);
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "zdsSocket: {}\nreadinessAddress: {readiness}\nmetricsAddress: 127.0.0.1:0\nadminAddress: 127.0.0.1:0\ndrainTimeoutSecs: 1\n",
                zds.display()
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = std::process::Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        ZdsProxy {
            child,
            readiness,
            log,
        }
    }

    /// The readiness endpoint's status code, once its listener is up; 0 when it never answers.
    pub(crate) fn readiness_status(&self) -> u16 {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match std::net::TcpStream::connect_timeout(&self.readiness, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return 0,
            }
        };
        let _ = s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
    }
}

impl Drop for ZdsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// `hboned run` enrolling pods from a fake agent (istio-cni's behaviour).
pub(crate) struct AgentNode {
    agent: SeqPacketListener,
    conn: Option<SeqPacket>,
    proxy: ZdsProxy,
    _dir: tempfile::TempDir,
}

impl AgentNode {
    /// Starts the proxy and takes its first connection (hello read).
    pub(crate) async fn start(bin: &Path) -> AgentNode {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ztunnel.sock");
        let agent = SeqPacketListener::bind(&sock).unwrap();
        let proxy = ZdsProxy::start(bin, dir.path(), "node", &sock);
        let conn = accept_hello(&agent).await;
        AgentNode {
            agent,
            conn: Some(conn),
            proxy,
            _dir: dir,
        }
    }

    /// The agent restarts: its connection closes, and the proxy's next one is taken (hello
    /// read).
    pub(crate) async fn reconnect(&mut self) {
        self.conn = None;
        self.conn = Some(accept_hello(&self.agent).await);
    }

    /// Sends one request (with descriptors) and returns the Ack's error ("" for success).
    pub(crate) async fn request(
        &self,
        payload: zds::workload_request::Payload,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> String {
        let msg = zds::WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        let conn = self.conn.as_ref().expect("connected");
        conn.send(&msg, fds).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = within(20, conn.recv(&mut buf)).await.unwrap();
        match zds::WorkloadResponse::decode(&buf[..n]).unwrap().payload {
            Some(zds::workload_response::Payload::Ack(a)) => a.error,
            None => panic!("no ack"),
        }
    }

    /// AddWorkload for the pod in `netns` (its descriptor passed along).
    pub(crate) async fn add(&self, uid: &str, netns: &ScratchNetns) -> String {
        let file = std::fs::File::open(netns.path()).unwrap();
        let add = zds::workload_request::Payload::Add(zds::AddWorkload {
            uid: uid.into(),
            workload_info: Some(zds::WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        });
        self.request(add, &[file.as_fd()]).await
    }

    pub(crate) async fn snapshot_sent(&self) -> String {
        let snapshot = zds::workload_request::Payload::SnapshotSent(zds::SnapshotSent {});
        self.request(snapshot, &[]).await
    }

    pub(crate) async fn del(&self, uid: &str) -> String {
        let del = zds::workload_request::Payload::Del(zds::DelWorkload { uid: uid.into() });
        self.request(del, &[]).await
    }

    /// The readiness endpoint's status code, once its listener is up; 0 when it never answers.
    pub(crate) fn readiness_status(&self) -> u16 {
        self.proxy.readiness_status()
    }
}

async fn accept_hello(agent: &SeqPacketListener) -> SeqPacket {
    let conn = within(20, agent.accept()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = within(20, conn.recv(&mut buf)).await.unwrap();
    assert_eq!(
        zds::ZdsHello::decode(&buf[..n]).unwrap().version,
        zds::Version::V1 as i32
    );
    conn
}

//! hboned enrolled by istio-cni's own ZDS server (tests/real/istio/cmd/istio-cni: istio/istio's
//! cni/pkg/nodeagent ztunnelServer, at the commit pinned in tests/real/istio/go.mod, driven as
//! the node agent's pod events drive it): the proxy connects and takes the snapshot, a pod
//! added gets its listeners inside its network namespace (the netns descriptor passed by the
//! real server), a pod deleted loses them, and after the agent restarts with the node's pods
//! its snapshot keeps the pods it names and removes the one it no longer does. Needs root and
//! Go; off CI each is skipped when missing, on CI (CI=true) that fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::agent::{ScratchNetns, ZdsProxy};
use support::real::{Driver, go_program, have_go};
use support::topo::{bin, can_run};
use support::{eventually, within};

/// istio-cni's ZDS server on `socket`, with `pods` already on the node; killed on drop.
struct IstioCni(Driver);

impl IstioCni {
    fn start(socket: &std::path::Path, pods: &[String], log: &std::path::Path) -> IstioCni {
        let mut command = Command::new(go_program("istio", "./cmd/istio-cni", "istio-cni"));
        command.arg("-socket").arg(socket);
        for p in pods {
            command.args(["-pod", p]);
        }
        let mut driver = Driver::start(command, log);
        assert_eq!(driver.line(), "listening", "istio-cni did not start");
        IstioCni(driver)
    }

    /// One command; istio-cni's answer ("ok" or "error: ...").
    fn command(&mut self, line: &str) -> String {
        self.0.command(line)
    }

    /// Adds a pod, retrying while no proxy is connected yet ("no ztunnel connection").
    async fn add(&mut self, uid: &str, name: &str, netns: &ScratchNetns) {
        let line = format!("add {uid} {name} demo client {}", netns.path().display());
        within(30, async {
            loop {
                let reply = self.command(&line);
                if reply == "ok" {
                    return;
                }
                assert!(reply.contains("no ztunnel connection"), "{line}: {reply}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }
}

/// Whether hboned serves the pod in `netns`: 15008 answers inside it.
fn serves(netns: &ScratchNetns) -> bool {
    let ns = hboned::netns::Netns::open(&netns.path()).unwrap();
    ns.run(|| {
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:15008".parse().unwrap(),
            Duration::from_secs(2),
        )
    })
    .is_ok()
}

#[tokio::test]
async fn istio_cnis_zds_server_enrolls_removes_and_resyncs_pods() {
    if !can_run() || !have_go() {
        return;
    }
    let _built = go_program("istio", "./cmd/istio-cni", "istio-cni");
    let id = std::process::id() % 100_000;
    let (p1, p2, p3) = (
        ScratchNetns::new(&format!("hbi{id}a")),
        ScratchNetns::new(&format!("hbi{id}b")),
        ScratchNetns::new(&format!("hbi{id}c")),
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let mut cni = IstioCni::start(&socket, &[], &dir.path().join("istio-cni.log"));
    let proxy = ZdsProxy::start(bin(), dir.path(), "node", &socket);

    // The (empty) snapshot makes the proxy ready; a pod added is served.
    eventually(30, || proxy.readiness_status() == 200).await;
    cni.add("uid-1", "p1", &p1).await;
    assert!(serves(&p1), "p1 enrolled");
    // Deleted: its listeners go.
    assert_eq!(cni.command("del uid-1"), "ok");
    eventually(10, || !serves(&p1)).await;

    // Two pods, then the agent restarts knowing only p2 (p3 left the node meanwhile).
    cni.add("uid-2", "p2", &p2).await;
    cni.add("uid-3", "p3", &p3).await;
    assert!(serves(&p2) && serves(&p3));
    drop(cni);
    let node_pods = [format!("uid-2,p2,demo,client,{}", p2.path().display())];
    let _cni = IstioCni::start(&socket, &node_pods, &dir.path().join("istio-cni-2.log"));
    // The proxy reconnects; the snapshot keeps p2 and removes p3.
    eventually(30, || !serves(&p3)).await;
    assert!(serves(&p2), "p2 stays enrolled through the agent's restart");
    eventually(30, || proxy.readiness_status() == 200).await;
    drop(proxy);
    let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("pod enrolled") && l.contains("uid-2"))
            .count(),
        1,
        "p2 enrolled once, not restarted by the snapshot:\n{log}"
    );
}

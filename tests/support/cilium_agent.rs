//! The ztunnel side of the real Cilium agent (tests/real/cilium, github.com/cilium/cilium
//! v1.20.2): its ZDS server and in-pod rules, and Workloads over xDS in its own encoding, run by
//! the driver `cilium-agent` inside a node's namespace and driven over its stdin (see the
//! driver's doc comment). Also the CRI runtime stand-in on the CRI's own Go types
//! (tests/real/cri). Both processes are killed on drop.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::real::go_program;

/// A pod as the agent knows it.
#[derive(Debug, Clone)]
pub(crate) struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    pub node_ip: IpAddr,
}

impl Pod {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "uid": self.uid, "name": self.name, "namespace": self.namespace,
            "serviceAccount": self.service_account, "netns": self.netns,
            "ips": self.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "nodeIP": self.node_ip.to_string(),
        })
    }
}

/// Where the agent serves xDS: Cilium's address, with the bootstrap certificate and key.
pub(crate) struct XdsTls<'a> {
    pub listen: &'a str,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// A running agent driver.
pub(crate) struct CiliumAgent {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl CiliumAgent {
    /// Starts the agent in namespace `netns` (a name under /var/run/netns; `None`: this one)
    /// with its ZDS socket at `zds` and, when given, xDS over TLS; returns once it listens.
    pub(crate) async fn start(
        netns: Option<&str>,
        zds: &Path,
        xds: Option<XdsTls<'_>>,
        log: &Path,
    ) -> Self {
        let bin = go_program("cilium", "./cmd/cilium-agent", "cilium-agent");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        command.arg("-zds").arg(zds);
        if let Some(x) = xds {
            command
                .args(["-xds-listen", x.listen, "-xds-cert"])
                .arg(x.cert)
                .arg("-xds-key")
                .arg(x.key);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut agent = CiliumAgent {
            child,
            stdin,
            stdout,
            log: log.to_owned(),
        };
        let first = agent.line(Duration::from_secs(60)).await;
        assert_eq!(first.as_deref(), Some("ready"), "{}", agent.log());
        agent
    }

    async fn line(&mut self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, self.stdout.next_line())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }

    /// Sends one command; `Ok` when the agent answered "ok", else its error.
    async fn command(&mut self, command: serde_json::Value) -> Result<(), String> {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        match self.line(Duration::from_secs(60)).await {
            Some(answer) if answer == "ok" => Ok(()),
            Some(answer) => Err(answer),
            None => Err(format!("no answer to {command}; log:\n{}", self.log())),
        }
    }

    /// The agent's initial snapshot (its restored endpoints), sent to every proxy that connects.
    pub(crate) async fn seed(&mut self, pods: &[Pod]) {
        let pods: Vec<_> = pods.iter().map(Pod::json).collect();
        self.command(serde_json::json!({"op": "seed", "pods": pods}))
            .await
            .unwrap();
    }

    /// EnrollEndpoint: Cilium's rules in the pod, then AddWorkload to the proxy; returns once
    /// the proxy acknowledged it.
    pub(crate) async fn enroll(&mut self, pod: &Pod) -> Result<(), String> {
        self.command(serde_json::json!({"op": "enroll", "pod": pod.json()}))
            .await
    }

    /// DisenrollEndpoint: Cilium's rules removed, then DelWorkload.
    pub(crate) async fn disenroll(&mut self, pod: &Pod) -> Result<(), String> {
        self.command(serde_json::json!({"op": "disenroll", "pod": pod.json()}))
            .await
    }

    /// The pod's CiliumEndpoint, as the agent's watcher sees it (xDS).
    pub(crate) async fn workload(&mut self, pod: &Pod) {
        self.command(serde_json::json!({"op": "workload", "pod": pod.json()}))
            .await
            .unwrap();
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The container runtime stand-in: answers CRI calls from a JSON file of the node's pods.
pub(crate) struct CriRuntime {
    child: std::process::Child,
    pub socket: PathBuf,
    pods: PathBuf,
}

impl Drop for CriRuntime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CriRuntime {
    pub(crate) fn start(dir: &Path) -> CriRuntime {
        let bin = go_program("cri", "./cmd/cri-runtime", "cri-runtime");
        let (socket, pods) = (dir.join("containerd.sock"), dir.join("cri-pods.json"));
        std::fs::write(&pods, "[]").unwrap();
        let mut child = std::process::Command::new(bin)
            .arg("-socket")
            .arg(&socket)
            .arg("-pods")
            .arg(&pods)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut out, &mut first).unwrap();
        assert_eq!(first.trim(), "ready");
        CriRuntime {
            child,
            socket,
            pods,
        }
    }

    /// Sets the node's pods: (pod UID, the pid of its one running application container).
    pub(crate) fn set_pods(&self, pods: &[(&str, u32)]) {
        let json: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, (uid, pid))| {
                serde_json::json!({
                    "uid": uid, "sandbox": format!("sandbox-{i}"), "ready": true,
                    "containers": [
                        {"id": format!("app-{i}"), "pid": pid, "running": true, "createdAt": 2},
                        {"id": format!("init-{i}"), "pid": 0, "running": false, "createdAt": 1},
                    ],
                })
            })
            .collect();
        std::fs::write(&self.pods, serde_json::to_string(&json).unwrap()).unwrap();
    }
}

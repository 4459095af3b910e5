//! The plain-relay baseline of the netns benchmark: the same pod-to-pod path through two
//! user-space relays with no TLS and no HTTP/2 — socat with 128 KiB buffers in each node's
//! namespace (a2 → node A → node B → b2) — so the report shows the floor any two-proxy tunnel
//! sits on here, next to hboned's figures. Skipped (with a line saying so) without `socat`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ECHO, SINK, SOURCE, Topology, ticks};
use crate::testbed::{B2, node_ip};
/// First of the relay's ports: node A listens on `FIRST_PORT + 2i` and node B on the next one,
/// for the i-th target of [`TARGETS`].
const FIRST_PORT: u16 = 7200;
const TARGETS: [u16; 3] = [SINK, SOURCE, ECHO];

/// The running socat processes, two per target; killed when dropped.
pub(super) struct PlainRelay {
    children: Vec<Child>,
}

impl Drop for PlainRelay {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl PlainRelay {
    /// Starts the relays; `None` when socat is not installed.
    pub(super) async fn start(topo: &Topology) -> anyhow::Result<Option<Self>> {
        if Command::new("socat").arg("-V").output().is_err() {
            return Ok(None);
        }
        let mut relay = Self { children: vec![] };
        for (i, target) in TARGETS.into_iter().enumerate() {
            let (a_port, b_port) = ports(i);
            let b2 = B2.addr(target);
            for (node, listen, to) in [
                ("na", a_port, format!("{}:{b_port}", node_ip('b'))),
                ("nb", b_port, b2.to_string()),
            ] {
                let child = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &topo.netns_name(node),
                        "socat",
                        "-b",
                        "131072",
                    ])
                    .arg(format!(
                        "TCP-LISTEN:{listen},fork,reuseaddr,nodelay,backlog=1024"
                    ))
                    .arg(format!("TCP:{to},nodelay"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                relay.children.push(child);
            }
        }
        for (i, _) in TARGETS.iter().enumerate() {
            let (a_port, b_port) = ports(i);
            relay.wait_listening("na", a_port, topo).await?;
            relay.wait_listening("nb", b_port, topo).await?;
        }
        Ok(Some(relay))
    }

    /// Where a2 connects to reach `target` on b2 through both relays.
    pub(super) fn entry(target: u16) -> SocketAddr {
        let i = TARGETS.iter().position(|&t| t == target).unwrap_or(0);
        SocketAddr::from((node_ip('a'), ports(i).0))
    }

    /// The relays' CPU time, their finished per-connection children included (socat forks one
    /// per connection and reaps it): waits until no child is left, so a sample after a transfer
    /// counts all of it.
    pub(super) async fn cpu(&self) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let pids: Vec<u32> = self.children.iter().map(Child::id).collect();
        while pids.iter().any(|&p| has_children(p)) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "socat's per-connection children did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut total = Duration::ZERO;
        for pid in pids {
            let f = super::stat_fields(pid)?;
            // utime, stime, cutime, cstime.
            total += ticks(f[11] + f[12] + f[13] + f[14]);
        }
        Ok(total)
    }

    async fn wait_listening(
        &mut self,
        node: &str,
        port: u16,
        topo: &Topology,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &topo.netns_name(node), "ss", "-Hltn"])
                .arg(format!("sport = :{port}"))
                .output()?;
            if !out.stdout.is_empty() {
                return Ok(());
            }
            for child in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("socat exited at start ({status})");
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "socat not listening on {port} in {node} after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn ports(i: usize) -> (u16, u16) {
    let a = FIRST_PORT + 2 * i as u16;
    (a, a + 1)
}

fn has_children(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .is_ok_and(|c| !c.trim().is_empty())
}

//! A two-node topology in network namespaces, for `hboned demo`, the integration test and the
//! netns throughput measurement. Needs root, iproute2, iptables and tcpdump.
//!
//! ```text
//!  pod a1 (enrolled, sa client)  ─┐                          ┌─ pod b1 (enrolled, sa server)
//!  pod a2 (not enrolled)         ─┼─ node A ══ veth ══ node B ┼─ pod b2 (not enrolled)
//!                                 │  hboned                hboned └─ pod b3 (enrolled, sa b3)
//! ```
//! Node A's workload table names b3's service account wrongly, so a1 → b3 must fail closed.
//! Every address is in 198.18.0.0/15 (the benchmarking range) or fd00:198:18::/48, inside
//! namespaces made here;
//! [`Topology`]'s `Drop` kills the proxies and deletes every namespace, also on a panic.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::authz::config::{
    MatchConfig, PolicyAction, PolicyConfig, PolicyScope, StringMatchConfig,
};
use crate::config::{Config, PodConfig, ServiceConfig, WorkloadConfig};
use crate::netns::Netns;
use crate::state::Protocol;

pub(crate) mod bench;
pub use bench::curves;
mod capture;
pub mod dns;
pub use capture::{Capture, Segment, parse_pcap};

/// One pod of the topology.
#[derive(Debug, Clone, Copy)]
pub struct Pod {
    pub name: &'static str,
    pub node: char,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub enrolled: bool,
    pub service_account: &'static str,
}

pub const A1: Pod = pod("a1", 'a', 11, true, "client");
pub const A2: Pod = pod("a2", 'a', 12, false, "plain-a");
pub const B1: Pod = pod("b1", 'b', 21, true, "server");
pub const B2: Pod = pod("b2", 'b', 22, false, "plain-b");
pub const B3: Pod = pod("b3", 'b', 23, true, "b3");
pub const PODS: [Pod; 5] = [A1, A2, B1, B2, B3];
/// What node A wrongly believes b3's service account is.
pub const B3_AS_SEEN_BY_A: &str = "someone-else";
/// The app port every test server listens on.
pub const APP_PORT: u16 = 7000;
/// On node A, a policy denies plaintext (identity-less) connections to this port of a1.
pub const DENIED_PLAINTEXT_PORT: u16 = 7001;
/// A service whose only endpoint is b1: `VIP:SERVICE_PORT` → `b1:APP_PORT`.
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
pub const SERVICE_PORT: u16 = 80;
const SERVICE_HOST: &str = "echo.demo.svc.cluster.local";

/// A node's address on the node-to-node link (node A: 198.18.0.1, node B: 198.18.0.2).
pub const fn node_ip(node: char) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, if node == 'a' { 1 } else { 2 })
}

const fn pod(name: &'static str, node: char, subnet: u8, enrolled: bool, sa: &'static str) -> Pod {
    Pod {
        name,
        node,
        ip: Ipv4Addr::new(198, 18, subnet, 2),
        ip6: Ipv6Addr::new(0xfd00, 198, 18, subnet as u16, 0, 0, 0, 2),
        enrolled,
        service_account: sa,
    }
}

impl Pod {
    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.ip.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    pub fn gateway6(&self) -> Ipv6Addr {
        let s = self.ip6.segments();
        Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 1)
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }
}

/// Runs a command, failing with its stderr.
fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespaces, links and proxies; torn down on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    proxies: Vec<Child>,
    /// Log names of the proxies started after the nodes' first two.
    extra_names: Vec<String>,
    /// Open-descriptor limits (soft, hard) the next proxies start with.
    nofile: Option<(u64, u64)>,
    dir: PathBuf,
}

impl Topology {
    /// Checks for root and the tools, then builds everything and starts one proxy per node
    /// (`bin run --config ...`), returning once every enrolled pod is served.
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        let mut topo = Topology::create(bin)?;
        topo.start_proxies(bin, |_| {}, |_| {}).await?;
        Ok(topo)
    }

    /// The namespaces, links and enrolled pods' rules, without proxies: for a test that must
    /// set something up inside a node first (see [`Topology::start_proxies`]).
    pub fn create(bin: &Path) -> anyhow::Result<Self> {
        Self::create_with_rules(bin, true)
    }

    /// The namespaces and links only: no pod has rules until a node agent (Kubernetes mode)
    /// installs them.
    pub fn create_unenrolled(bin: &Path) -> anyhow::Result<Self> {
        Self::create_with_rules(bin, false)
    }

    fn create_with_rules(bin: &Path, rules: bool) -> anyhow::Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the netns topology needs root (network namespaces, iptables, SO_MARK)");
        }
        for tool in ["ip", "iptables", "tcpdump"] {
            sh(&["sh", "-c", &format!("command -v {tool}")])
                .with_context(|| format!("{tool} is not installed"))?;
        }
        // Unique per process and per topology, short enough for interface names (≤15 bytes).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let prefix = format!("hb{:03}{n}", std::process::id() % 1000);
        let dir = std::env::temp_dir().join(format!("hboned-{prefix}"));
        std::fs::create_dir_all(&dir)?;
        // One root for both nodes, made for this topology (node mode reads no ./certs-dev).
        crate::identity::ca::BuiltinCa::generate(std::time::SystemTime::now())?
            .write_dir(&dir.join("ca"))?;
        let mut topo = Topology {
            prefix,
            namespaces: Vec::new(),
            proxies: Vec::new(),
            extra_names: Vec::new(),
            nofile: None,
            dir,
        };
        topo.build()?;
        for pod in PODS.iter().filter(|p| p.enrolled && rules) {
            topo.install_rules(bin, pod.name)?;
        }
        Ok(topo)
    }

    /// `hboned redirect install` in pod `pod`'s namespace: hboned's rule set, as a node agent
    /// installs it.
    pub fn install_rules(&self, bin: &Path, pod: &str) -> anyhow::Result<()> {
        let out = Command::new(bin)
            .args(["redirect", "install", "--netns"])
            .arg(self.netns_path(pod))
            .output()?;
        if !out.status.success() {
            bail!(
                "hboned redirect install failed for {pod}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts one proxy per node, each config changed by `adjust_a` / `adjust_b`, and returns
    /// once every enrolled pod is served.
    pub async fn start_proxies(
        &mut self,
        bin: &Path,
        adjust_a: impl FnOnce(&mut Config),
        adjust_b: impl FnOnce(&mut Config),
    ) -> anyhow::Result<()> {
        self.spawn_proxies(bin, adjust_a, adjust_b)?;
        self.wait_ready().await
    }

    /// Starts one proxy per node without waiting for any pod to be served.
    pub fn spawn_proxies(
        &mut self,
        bin: &Path,
        adjust_a: impl FnOnce(&mut Config),
        adjust_b: impl FnOnce(&mut Config),
    ) -> anyhow::Result<()> {
        self.spawn_named(bin, 'a', "node-a", adjust_a)?;
        self.spawn_named(bin, 'b', "node-b", adjust_b)
    }

    pub fn netns_name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    pub fn netns_path(&self, short: &str) -> PathBuf {
        Path::new("/var/run/netns").join(self.netns_name(short))
    }

    /// The node-to-node link as seen from node A, where captures run: (netns, interface, a
    /// closed port on node B for [`Capture::stop`]'s sentinel).
    pub fn node_link(&self) -> (String, String, SocketAddr) {
        (
            self.netns_name("na"),
            format!("{}ab", self.prefix),
            SocketAddr::from((node_ip('b'), 9)),
        )
    }

    fn add_netns(&mut self, short: &str) -> anyhow::Result<String> {
        let name = self.netns_name(short);
        sh(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        // No duplicate address detection: interfaces created later would otherwise hold their
        // link-local addresses tentative for a second or two and stall neighbor discovery.
        for knob in [
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ] {
            sh(&["ip", "netns", "exec", &name, "sysctl", "-qw", knob])?;
        }
        Ok(name)
    }

    /// Two nodes joined by a veth, each pod behind its node on a veth of its own; dual stack
    /// (198.18.x.0/24 and fd00:198:18:x::/64, with `nodad` so IPv6 is usable at once).
    fn build(&mut self) -> anyhow::Result<()> {
        let p = self.prefix.clone();
        let ip = |ns: &str, args: &[&str]| sh(&[&["ip", "-n", ns][..], args].concat());
        let na = self.add_netns("na")?;
        let nb = self.add_netns("nb")?;
        let (ab, ba) = (format!("{p}ab"), format!("{p}ba"));
        sh(&[
            "ip", "link", "add", &ab, "netns", &na, "type", "veth", "peer", "name", &ba, "netns",
            &nb,
        ])?;
        for (ns, dev, host) in [(&na, &ab, 1), (&nb, &ba, 2)] {
            ip(
                ns,
                &["addr", "add", &format!("198.18.0.{host}/24"), "dev", dev],
            )?;
            ip(
                ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("fd00:198:18::{host}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            )?;
            ip(ns, &["link", "set", dev, "up"])?;
            for knob in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
                sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", knob])?;
            }
        }
        for pod in PODS {
            let ns = self.add_netns(pod.name)?;
            let (node_ns, other_ns, peer) = if pod.node == 'a' {
                (&na, &nb, 1)
            } else {
                (&nb, &na, 2)
            };
            let host_dev = format!("{p}{}", pod.name);
            sh(&[
                "ip", "link", "add", &host_dev, "netns", node_ns, "type", "veth", "peer", "name",
                "eth0", "netns", &ns,
            ])?;
            ip(
                node_ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", pod.gateway()),
                    "dev",
                    &host_dev,
                ],
            )?;
            ip(
                node_ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", pod.gateway6()),
                    "dev",
                    &host_dev,
                    "nodad",
                ],
            )?;
            ip(node_ns, &["link", "set", &host_dev, "up"])?;
            ip(
                &ns,
                &["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"],
            )?;
            ip(
                &ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", pod.ip6),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            ip(&ns, &["link", "set", "eth0", "up"])?;
            ip(
                &ns,
                &["route", "add", "default", "via", &pod.gateway().to_string()],
            )?;
            ip(
                &ns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &pod.gateway6().to_string(),
                ],
            )?;
            let [a, b, c, _] = pod.ip.octets();
            ip(
                other_ns,
                &[
                    "route",
                    "add",
                    &format!("{a}.{b}.{c}.0/24"),
                    "via",
                    &format!("198.18.0.{peer}"),
                ],
            )?;
            ip(
                other_ns,
                &[
                    "-6",
                    "route",
                    "add",
                    &format!("{}/64", pod.gateway6()),
                    "via",
                    &format!("fd00:198:18::{peer}"),
                ],
            )?;
        }
        Ok(())
    }

    /// The config of one node's proxy, built from the typed [`Config`].
    fn config(&self, node: char) -> Config {
        let mut config = Config {
            cluster_id: "demo".into(),
            node: format!("node-{node}"),
            connect_timeout_secs: 5,
            ..Config::default()
        };
        config.ca.root_dir = Some(self.dir.join("ca"));
        config.pods = PODS
            .iter()
            .filter(|p| p.node == node && p.enrolled)
            .map(|pod| PodConfig {
                uid: Some(format!("demo/{}", pod.name)),
                name: pod.name.into(),
                namespace: "demo".into(),
                service_account: pod.service_account.into(),
                netns: self.netns_path(pod.name),
            })
            .collect();
        config.workloads = PODS
            .iter()
            .map(|pod| {
                let service_account = if node == 'a' && pod.name == B3.name {
                    B3_AS_SEEN_BY_A
                } else {
                    pod.service_account
                };
                let mut services = BTreeMap::new();
                if pod.name == B1.name {
                    services.insert(
                        format!("demo/{SERVICE_HOST}"),
                        BTreeMap::from([(SERVICE_PORT, APP_PORT)]),
                    );
                }
                WorkloadConfig {
                    uid: format!("demo/{}", pod.name),
                    name: pod.name.into(),
                    namespace: "demo".into(),
                    service_account: service_account.into(),
                    trust_domain: String::new(),
                    workload_ips: vec![IpAddr::V4(pod.ip), IpAddr::V6(pod.ip6)],
                    node: format!("node-{}", pod.node),
                    protocol: if pod.enrolled {
                        Protocol::Hbone
                    } else {
                        Protocol::Tcp
                    },
                    services,
                    waypoint: None,
                    network: String::new(),
                    network_gateway: None,
                }
            })
            .collect();
        config.services = vec![ServiceConfig {
            name: "echo".into(),
            namespace: "demo".into(),
            hostname: SERVICE_HOST.into(),
            vips: vec![IpAddr::V4(SERVICE_VIP)],
            ports: BTreeMap::from([(SERVICE_PORT, APP_PORT)]),
            subject_alt_names: Vec::new(),
            waypoint: None,
        }];
        if node == 'a' {
            // Plaintext (no identity) to a1's port DENIED_PLAINTEXT_PORT is refused.
            config.policies = vec![PolicyConfig {
                name: "no-plaintext".into(),
                namespace: "demo".into(),
                scope: PolicyScope::Namespace,
                action: PolicyAction::Deny,
                dry_run: false,
                rules: vec![vec![vec![MatchConfig {
                    destination_ports: vec![u32::from(DENIED_PLAINTEXT_PORT)],
                    not_principals: vec![StringMatchConfig {
                        presence: Some(true),
                        ..StringMatchConfig::default()
                    }],
                    ..MatchConfig::default()
                }]]],
            }];
        }
        config
    }

    /// Starts one more proxy on `node` (an upgrade's new proxy), its config changed by
    /// `adjust`, with its own log; returns its index for [`Topology::terminate`].
    pub fn spawn_extra_proxy(
        &mut self,
        bin: &Path,
        node: char,
        adjust: impl FnOnce(&mut Config),
    ) -> anyhow::Result<usize> {
        let name = format!("node-{node}-{}", self.proxies.len());
        self.spawn_named(bin, node, &name, adjust)?;
        self.extra_names.push(name);
        Ok(self.proxies.len() - 1)
    }

    /// Starts the next proxies with these open-descriptor limits (`prlimit --nofile`).
    pub fn limit_descriptors(&mut self, soft: u64, hard: u64) {
        self.nofile = Some((soft, hard));
    }

    /// The process id of proxy `index`.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.proxies.get(index).map(Child::id)
    }

    /// Kills proxy `index` with SIGKILL (a crash: no drain).
    pub fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        let child = self.proxies.get_mut(index).context("no such proxy")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM to proxy `index` (0: node A's, 1: node B's, then extra ones).
    pub fn terminate(&self, index: usize) -> anyhow::Result<()> {
        let child = self.proxies.get(index).context("no such proxy")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// The exit status of proxy `index`, if it has exited.
    pub fn exited(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        self.proxies.get_mut(index)?.try_wait().ok().flatten()
    }

    fn spawn_named(
        &mut self,
        bin: &Path,
        node: char,
        name: &str,
        adjust: impl FnOnce(&mut Config),
    ) -> anyhow::Result<()> {
        let mut typed = self.config(node);
        adjust(&mut typed);
        let config = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&config, serde_yaml_ng::to_string(&typed)?)?;
        let args = [
            OsStr::new("run"),
            OsStr::new("--config"),
            config.as_os_str(),
        ];
        self.spawn_process(bin, node, name, &args, &[])
    }

    /// Starts one proxy per node as a DaemonSet that configures it by environment runs it
    /// (`hboned proxy ztunnel`, as Istio's and Cilium's charts do), each with its variables;
    /// nothing is read from a config file. Returns without waiting for any pod.
    pub fn spawn_ztunnel_proxies(
        &mut self,
        bin: &Path,
        env_a: &[(&str, &str)],
        env_b: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let args = [OsStr::new("proxy"), OsStr::new("ztunnel")];
        self.spawn_process(bin, 'a', "node-a", &args, env_a)?;
        self.spawn_process(bin, 'b', "node-b", &args, env_b)
    }

    /// `bin args…` inside node `node`'s namespace with `env` added, its log named `name`.
    fn spawn_process(
        &mut self,
        bin: &Path,
        node: char,
        name: &str,
        args: &[&OsStr],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns_name(&format!("n{node}"))]);
        if let Some((soft, hard)) = self.nofile {
            command.args(["prlimit", &format!("--nofile={soft}:{hard}")]);
        }
        let child = command
            .arg(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("HBONED_CONFIG")
            .envs(env.iter().copied())
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting hboned")?;
        self.proxies.push(child);
        Ok(())
    }

    /// The directory of this topology's files (configs, logs, the CA root).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA both proxies issue from: for a test's own HBONE peer (a waypoint, a gateway).
    pub fn ca(&self) -> anyhow::Result<crate::identity::ca::BuiltinCa> {
        Ok(crate::identity::ca::BuiltinCa::load_dir(
            &self.dir.join("ca"),
        )?)
    }

    /// Waits until every enrolled pod's HBONE listener accepts.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for pod in PODS.iter().filter(|p| p.enrolled) {
            let ns = self.netns(pod.name)?;
            loop {
                let probe = self
                    .connect_from(&ns, SocketAddr::from(([127, 0, 0, 1], 15008)))
                    .await;
                if probe.is_ok() {
                    break;
                }
                for child in &mut self.proxies {
                    if let Some(status) = child.try_wait()? {
                        bail!("hboned exited early ({status}):\n{}", self.logs());
                    }
                }
                if Instant::now() > deadline {
                    bail!(
                        "pod {} was not served within 30 s:\n{}",
                        pod.name,
                        self.logs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Every proxy's log (the nodes' first ones, then extra ones), for failure messages.
    pub fn logs(&self) -> String {
        (0..self.proxies.len().max(2))
            .map(|i| format!("--- hboned {} ---\n{}", self.proxy_name(i), self.log(i)))
            .collect()
    }

    /// The log of proxy `index` so far (see [`Topology::terminate`] for the numbering).
    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.proxy_name(index))))
            .unwrap_or_default()
    }

    fn proxy_name(&self, index: usize) -> String {
        match index {
            0 => "node-a".into(),
            1 => "node-b".into(),
            i => self.extra_names.get(i - 2).cloned().unwrap_or_default(),
        }
    }

    pub fn netns(&self, short: &str) -> anyhow::Result<Netns> {
        Ok(Netns::open(&self.netns_path(short))?)
    }

    /// A listener on `port` inside a pod (an app socket: no mark).
    pub fn listen(&self, short: &str, port: u16) -> anyhow::Result<TcpListener> {
        let ns = self.netns(short)?;
        let std = ns.run(|| {
            // A dual-stack app socket ([::], v6only off) takes both families.
            let l = std::net::TcpListener::bind(("::", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        Ok(TcpListener::from_std(std)?)
    }

    /// Connects from inside a pod, as its app would (no mark: the redirect applies).
    pub async fn connect(&self, short: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        let ns = self.netns(short).map_err(std::io::Error::other)?;
        self.connect_from(&ns, to).await
    }

    async fn connect_from(&self, ns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = ns.run(|| {
            if to.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
        })?;
        tokio::time::timeout(Duration::from_secs(10), socket.connect(to))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {to} timed out"),
                )
            })?
    }

    /// Stops the proxies and starts the nodes' two afresh (no extra ones), returning once every
    /// enrolled pod is served.
    pub async fn restart_proxies(&mut self, bin: &Path) -> anyhow::Result<()> {
        self.stop_proxies();
        self.proxies.clear();
        self.extra_names.clear();
        self.start_proxies(bin, |_| {}, |_| {}).await
    }

    /// Stops the proxies (SIGTERM, then SIGKILL) and reports whether each exited.
    pub fn stop_proxies(&mut self) -> Vec<bool> {
        self.proxies
            .iter_mut()
            .map(|child| {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                child.wait().is_ok()
            })
            .collect()
    }

    /// Names of this topology's namespaces that still exist.
    pub fn leftover_namespaces(prefix: &str) -> Vec<String> {
        sh(&["ip", "netns", "list"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .map(str::to_owned)
            .collect()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.stop_proxies();
        for ns in self.namespaces.drain(..).rev() {
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Echoes every connection on `listener`, recording each peer address (IPv4 unmapped).
pub fn spawn_echo(
    listener: TcpListener,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<std::sync::Mutex<Vec<SocketAddr>>>,
) {
    let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = peers.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            // The app socket is dual-stack: IPv4 peers show up v4-mapped.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (task, peers)
}

/// Sends `data` on `stream` right after connect (no wait), reads the echo to EOF.
pub async fn echo_roundtrip(stream: TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = stream.into_split();
    let (sent, got) = tokio::join!(
        async {
            w.write_all(data).await?;
            w.shutdown().await
        },
        async {
            let mut back = Vec::with_capacity(data.len());
            r.read_to_end(&mut back).await.map(|_| back)
        }
    );
    sent?;
    got
}

/// What `hboned demo` prints: traffic through the topology and what the wire carried.
pub async fn run(bin: &Path, throughput: bool, bench: bool) -> anyhow::Result<()> {
    println!("building two nodes and five pods in network namespaces...");
    let mut topo = Topology::start(bin).await?;
    let (_echo_b1, peers_b1) = spawn_echo(topo.listen(B1.name, APP_PORT)?);
    let (_echo_b2, _) = spawn_echo(topo.listen(B2.name, APP_PORT)?);
    let (_echo_a1, peers_a1) = spawn_echo(topo.listen(A1.name, APP_PORT)?);
    let marker = b"PLAINTEXT-MARKER-hboned-demo";
    let mut data = Vec::new();
    while data.len() < 4 << 20 {
        data.extend_from_slice(marker);
    }
    let (ns, iface, sentinel) = topo.node_link();
    let pcap = std::env::temp_dir().join(format!("{}-link.pcap", topo.prefix()));
    let capture = Capture::start(&ns, &iface, &pcap).await?;
    let started = Instant::now();
    let back = echo_roundtrip(topo.connect(A1.name, B1.addr(APP_PORT)).await?, &data).await?;
    let took = started.elapsed();
    let segments = capture.stop(&topo.netns("na")?, sentinel)?;
    let _ = std::fs::remove_file(&pcap);
    anyhow::ensure!(back == data, "the echo through the tunnel differs");
    let with_data: Vec<&Segment> = segments.iter().filter(|s| !s.payload.is_empty()).collect();
    let all_hbone = with_data
        .iter()
        .all(|s| s.src.port() == 15008 || s.dst.port() == 15008);
    let leaked = with_data
        .iter()
        .any(|s| s.payload.windows(marker.len()).any(|w| w == marker));
    let bytes: usize = with_data.iter().map(|s| s.payload.len()).sum();
    println!(
        "a1 (enrolled) → b1 (enrolled): {} MiB echoed intact in {:.0} ms",
        data.len() >> 20,
        took.as_secs_f64() * 1e3
    );
    println!(
        "  b1's app saw the client as {:?} (a1 is {})",
        peers_b1.lock().unwrap_or_else(|p| p.into_inner()).last(),
        A1.ip
    );
    println!(
        "  node link capture: {} TCP segments with payload, {} bytes; all to/from port 15008: {}; plaintext marker seen: {}",
        with_data.len(),
        bytes,
        all_hbone,
        leaked
    );
    anyhow::ensure!(
        all_hbone && !leaked,
        "the node link carried something other than HBONE"
    );

    let back = echo_roundtrip(topo.connect(A1.name, B2.addr(APP_PORT)).await?, b"hello b2").await?;
    println!(
        "a1 (enrolled) → b2 (not enrolled): plaintext passthrough echoed {:?}",
        String::from_utf8_lossy(&back)
    );
    let back = echo_roundtrip(topo.connect(B2.name, A1.addr(APP_PORT)).await?, b"hello a1").await?;
    println!(
        "b2 (not enrolled) → a1 (enrolled): plaintext via 15006 echoed {:?}, a1's app saw {:?}",
        String::from_utf8_lossy(&back),
        peers_a1.lock().unwrap_or_else(|p| p.into_inner()).last()
    );
    let _b3 = spawn_echo(topo.listen(B3.name, APP_PORT)?);
    // The proxy resets the connection as soon as the dial fails, which can be before this task
    // sees its connect complete: then the connect itself reports the reset.
    let refused = match topo.connect(A1.name, B3.addr(APP_PORT)).await {
        Ok(stream) => echo_roundtrip(stream, b"secret").await,
        Err(e) => Err(e),
    };
    println!(
        "a1 → b3 (node A expects sa {B3_AS_SEEN_BY_A}, b3 presents sa {}): {}",
        B3.service_account,
        match refused {
            Ok(b) if b.is_empty() => "closed, nothing delivered".to_string(),
            Ok(b) => format!("UNEXPECTED echo {b:?}"),
            Err(e) => format!("reset ({e})"),
        }
    );
    if throughput || bench {
        let _apps = bench::start_apps(&topo)?;
        // The report first, on proxies started anew: it measures memory as a fresh process has it.
        if bench {
            topo.restart_proxies(bin).await?;
            println!("{}", bench::report(&topo, 3).await?);
        }
        if throughput {
            println!("{}", bench::throughput(&topo, 3).await?);
        }
    }
    if std::env::var_os("HBONED_DEMO_LOGS").is_some() {
        println!("{}", topo.logs());
    }
    println!("tearing down...");
    drop(topo);
    println!("done");
    Ok(())
}

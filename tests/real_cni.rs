//! Kubernetes mode as a cluster runs it: per node a privileged `hboned agent` and an
//! unprivileged proxy (`hboned run` as uid 65532 with only NET_ADMIN, NET_RAW and SYS_ADMIN, in a
//! namespace of its own), pods made by the real CNI tooling — `cnitool` (the CNI project's own
//! runtime-side client: CNI_COMMAND, CNI_NETNS, CNI_CONTAINERID, CNI_IFNAME, CNI_ARGS and the
//! network configuration on stdin) running the reference `ptp` and `host-local` plugins, then
//! `hboned-cni`, which the agent chained into the node's configuration itself. Two nodes joined
//! by a veth; the API server is the fake of tests/support/kube_api.rs. Shown here: a pod's rules
//! and listeners are in when its ADD returns, so the first connection of a process started right
//! after is tunneled; a kube-proxy-shaped ClusterIP (DNAT in the node) stays TLS; a pod of a
//! namespace that did not opt in is left alone, and its plaintext refused by the strict proxies,
//! which also refuse an unknown address of the pod ranges rather than send it in plaintext; with the agent down an ADD fails and the
//! proxy keeps serving; a restarted agent takes its pods back without the proxy dropping them;
//! DEL lets a pod go; with the API server away, a restarted agent and proxy serve the agent's
//! last state; `hboned agent uninstall` leaves no rule and no plugin behind. Needs root
//! and Go; off CI each is skipped when missing, on CI (CI=true) that fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hboned::netns::Netns;
use hboned::testbed::Capture;
use support::agent::ScratchNetns;
use support::kube_api::{FakeApi, PodDef};
use support::kubelet::PodProcess;
use support::real::{go_program, have_go};
use support::topo::{bin, can_run};
use support::{eventually, sh};

const LABEL: (&str, &str) = ("io.cilium/mtls-enabled", "true");
const REDIRECTION: &str = "hboned.io/redirection";
/// The proxy's user: not root.
const PROXY_UID: u32 = 65532;
/// NET_ADMIN (12), NET_RAW (13), SYS_ADMIN (21): all the proxy holds.
const PROXY_CAPS: u64 = (1 << 12) | (1 << 13) | (1 << 21);
const NETWORK: &str = "hboned-test";
const APP_PORT: u16 = 7000;
const VIP: &str = "198.18.100.10";

fn netns(name: &str) -> Netns {
    Netns::open(&Path::new("/var/run/netns").join(name)).unwrap()
}

/// The proxy container's command in deploy/standalone/daemonset.yaml.
fn deployed_proxy_command() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/standalone/daemonset.yaml"
    ))
    .unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["metadata"]["name"] == "hboned" {
            let command = &doc["spec"]["template"]["spec"]["containers"][0]["command"];
            return command
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect();
        }
    }
    panic!("no proxy DaemonSet in deploy/standalone/daemonset.yaml");
}

/// One node: its namespace, its proxy's, its CNI directories and sockets, and the two processes.
struct Node {
    name: &'static str,
    ns: ScratchNetns,
    proxy_ns: ScratchNetns,
    dir: PathBuf,
    api_url: String,
    agent: Option<Child>,
    proxy: Option<Child>,
}

impl Node {
    fn agent_config(&self) -> PathBuf {
        self.dir.join("agent.yaml")
    }

    fn conflist(&self) -> PathBuf {
        self.dir.join("net.d/10-hboned-test.conflist")
    }

    fn start_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        self.agent = Some(
            Command::new("ip")
                .args(["netns", "exec", &self.ns.0])
                .arg(self.dir.join("hboned"))
                .args(["agent", "--config"])
                .arg(self.agent_config())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The proxy, started with the command deploy/standalone's DaemonSet gives it (setpriv to
    /// user 65532 with three ambient capabilities), its binary and config swapped for ours.
    fn start_proxy(&mut self) {
        let log = std::fs::File::create(self.dir.join("proxy.log")).unwrap();
        let mut command = deployed_proxy_command()
            .into_iter()
            .map(|arg| match arg.as_str() {
                "/usr/local/bin/hboned" => self.dir.join("hboned").display().to_string(),
                "/etc/hboned/proxy.yaml" => self.dir.join("proxy.yaml").display().to_string(),
                _ => arg,
            });
        let program = command.next().unwrap();
        self.proxy = Some(
            Command::new("ip")
                .args(["netns", "exec", &self.proxy_ns.0, &program])
                .args(command)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn stop_proxy(&mut self) {
        if let Some(mut c) = self.proxy.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "--- agent {} ---\n{}\n--- proxy {} ---\n{}",
            self.name,
            read("agent.log"),
            self.name,
            read("proxy.log")
        )
    }

    /// `cnitool <command>` for pod `pod` as the runtime runs it in the node's namespace; its
    /// output and whether it succeeded.
    fn cnitool(&self, command: &str, pod: &PodDef, netns: &str) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns.0])
            .arg(self.dir.join("bin/cnitool"))
            .args([command, NETWORK])
            .arg(Path::new("/var/run/netns").join(netns))
            .env("NETCONFPATH", self.dir.join("net.d"))
            .env("CNI_PATH", self.dir.join("bin"))
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                    pod.namespace, pod.name, pod.uid
                ),
            )
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_proxy();
        self.stop_agent();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// GET `path` on 127.0.0.1:`port` inside `ns`; the whole answer, or "" when nobody answers.
fn http_get(ns: &str, port: u16, path: &str) -> String {
    netns(ns)
        .run(|| {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .unwrap_or_default()
}

fn ready(ns: &str) -> bool {
    http_get(ns, 15021, "/healthz/ready").starts_with("HTTP/1.1 200")
}

/// Whether something listens on `port` in namespace `ns`.
fn listens(ns: &str, port: u16) -> bool {
    let out = sh(&["ip", "netns", "exec", ns, "ss", "-Hltn"]);
    out.contains(&format!(":{port} "))
}

fn has_rules(ns: &str) -> bool {
    hboned::redirect::installed(&netns(ns)).unwrap()
}

/// A process in `ns` that connects to `to` the moment it starts, sends `marker` and reads it
/// back (the echo server's answer); what it read.
fn connect_at_start(ns: &str, to: SocketAddr, marker: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf %s {marker} >&3 && head -c {} <&3",
        to.ip(),
        to.port(),
        marker.len()
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "10", "bash", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `file` in `dir` (a log, its ANSI colours taken out) holds `text`.
fn nodes_log_has(dir: &Path, file: &str, text: &str) -> bool {
    let log = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let mut plain = String::new();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain.contains(text)
}

/// An echo server on `port` in `ns` (every address), on a thread; runs until the test ends.
fn echo(ns: &str, port: u16) {
    let listener = netns(ns)
        .run(|| std::net::TcpListener::bind(("0.0.0.0", port)))
        .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// What a capture of the node link saw: (a payload held `marker`, a segment went to 15008).
async fn seen(capture: Capture, from: &str, marker: &str) -> (bool, bool) {
    let segments = capture
        .stop(&netns(from), "198.18.0.2:9".parse().unwrap())
        .unwrap();
    let clear = segments.iter().any(|s| {
        s.payload
            .windows(marker.len())
            .any(|w| w == marker.as_bytes())
    });
    let hbone = segments.iter().any(|s| s.dst.port() == 15008);
    (clear, hbone)
}

fn pod(uid: &str, name: &str, namespace: &str, node: &str, sa: &str) -> PodDef {
    PodDef {
        uid: uid.into(),
        name: name.into(),
        namespace: namespace.into(),
        node: node.into(),
        service_account: sa.into(),
        ips: Vec::new(),
        enrolled: false,
    }
}

/// The pod's address from a CNI result.
fn result_ip(result: &str) -> IpAddr {
    let start = result.find('{').unwrap();
    let v: serde_json::Value = serde_json::from_str(&result[start..]).unwrap();
    let address = v["ips"][0]["address"].as_str().unwrap();
    address.split('/').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_unprivileged_proxy_enroll_pods_in_their_cni_add() {
    if !can_run() || !have_go() {
        return;
    }
    let cnitool = go_program(
        "cni",
        "github.com/containernetworking/cni/cnitool",
        "cnitool",
    );
    let ptp = go_program(
        "cni",
        "github.com/containernetworking/plugins/plugins/main/ptp",
        "ptp",
    );
    let host_local = go_program(
        "cni",
        "github.com/containernetworking/plugins/plugins/ipam/host-local",
        "host-local",
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let open = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    open(root);
    // One root both proxies trust (the built-in CA: SPIRE's part is the real_spire tests').
    let ca = hboned::identity::ca::BuiltinCa::generate(std::time::SystemTime::now()).unwrap();
    ca.write_dir(&root.join("ca")).unwrap();
    for f in ["", "root-cert.pem", "root-key.pem"] {
        let p = root.join("ca").join(f);
        use std::os::unix::fs::PermissionsExt;
        let mode = if f.is_empty() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    let api = FakeApi::new();
    api.apply_namespace("demo", &[LABEL]);
    api.apply_namespace("plain", &[]);
    let p = format!("hc{}", std::process::id() % 100_000);
    let mut nodes = Vec::new();
    for (name, host, subnet) in [("a", 1u8, 210u8), ("b", 2, 220)] {
        let ns = ScratchNetns::new(&format!("{p}n{name}"));
        let proxy_ns = ScratchNetns::new(&format!("{p}p{name}"));
        let node_dir = root.join(name);
        for d in ["net.d", "bin", "run"] {
            std::fs::create_dir_all(node_dir.join(d)).unwrap();
        }
        open(&node_dir);
        open(&node_dir.join("run"));
        std::fs::copy(bin(), node_dir.join("hboned")).unwrap();
        for (from, to) in [
            (&cnitool, "cnitool"),
            (&ptp, "ptp"),
            (&host_local, "host-local"),
        ] {
            std::fs::copy(from, node_dir.join("bin").join(to)).unwrap();
        }
        std::fs::write(
            node_dir.join("net.d/10-hboned-test.conflist"),
            format!(
                r#"{{"cniVersion":"1.0.0","name":"{NETWORK}","plugins":[{{"type":"ptp","ipMasq":false,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"198.18.{subnet}.0/24"}}]],"routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{}"}}}}]}}"#,
                node_dir.join("ipam").display()
            ),
        )
        .unwrap();
        let listener = netns(&ns.0)
            .run(|| {
                let l = std::net::TcpListener::bind("127.0.0.1:0")?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .unwrap();
        let api_url = api.serve(listener);
        let run = node_dir.join("run");
        std::fs::write(
            node_dir.join("agent.yaml"),
            format!(
                "node: node-{name}\nreadinessAddress: 127.0.0.1:15021\nmetricsAddress: 127.0.0.1:15020\nadminAddress: null\n\
                 kubernetes:\n  apiServer: {api_url}\n\
                 agent:\n  zdsSocket: {run}/zds.sock\n  xdsSocket: {run}/xds.sock\n  cniSocket: {run}/cni.sock\n  proxyUid: {PROXY_UID}\n  stateDir: {run}/state\n\
                 \x20 cni:\n    confDir: {d}/net.d\n    binDir: {d}/bin\n    plugin: {plugin}\n",
                run = run.display(),
                d = node_dir.display(),
                plugin = env!("CARGO_BIN_EXE_hboned-cni"),
            ),
        )
        .unwrap();
        std::fs::write(
            node_dir.join("proxy.yaml"),
            format!(
                "node: node-{name}\nzdsSocket: {run}/zds.sock\nxds:\n  address: unix://{run}/xds.sock\n  onDemandTimeoutMs: 1000\n\
                 refuseMeshPlaintext: true\nstrict: true\npodCidrs: [198.18.210.0/24, 198.18.220.0/24]\n\
                 ca:\n  rootDir: {ca}\nreadinessAddress: 127.0.0.1:15021\nmetricsAddress: 127.0.0.1:15020\nadminAddress: 127.0.0.1:15000\ndrainTimeoutSecs: 1\n",
                run = run.display(),
                ca = root.join("ca").display(),
            ),
        )
        .unwrap();
        let _ = host;
        nodes.push(Node {
            name: if name == "a" { "a" } else { "b" },
            ns,
            proxy_ns,
            dir: node_dir,
            api_url,
            agent: None,
            proxy: None,
        });
    }
    let (na, nb) = (nodes[0].ns.0.clone(), nodes[1].ns.0.clone());
    let (ab, ba) = (format!("{p}ab"), format!("{p}ba"));
    sh(&[
        "ip", "link", "add", &ab, "netns", &na, "type", "veth", "peer", "name", &ba, "netns", &nb,
    ]);
    for (ns, dev, host, other) in [
        (&na, &ab, 1, "198.18.220.0/24"),
        (&nb, &ba, 2, "198.18.210.0/24"),
    ] {
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("198.18.0.{host}/24"),
            "dev",
            dev,
        ]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        let via = format!("198.18.0.{}", 3 - host);
        sh(&["ip", "-n", ns, "route", "add", other, "via", &via]);
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
    }
    let _ = &nodes[0].api_url;

    for node in &mut nodes {
        node.start_agent();
        node.start_proxy();
    }
    for node in &nodes {
        let (ns, proxy_ns) = (node.ns.0.clone(), node.proxy_ns.0.clone());
        eventually(30, || ready(&ns) && ready(&proxy_ns)).await;
        // Ready means the plugin is in the node's configuration.
        let conflist = std::fs::read_to_string(node.conflist()).unwrap();
        assert!(
            conflist.contains("hboned-cni"),
            "{conflist}\nagent readiness: {}\n{}",
            http_get(&ns, 15021, "/healthz/ready"),
            node.logs()
        );
        // The proxy holds no privilege beyond the three capabilities, as a user of its own.
        let pid = node.proxy.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .trim()
                .to_owned()
        };
        assert!(
            field("Uid:").starts_with(&PROXY_UID.to_string()),
            "{status}"
        );
        assert_eq!(
            u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
            PROXY_CAPS,
            "{status}"
        );
    }

    // b1: its ADD returns with its rules and listeners in.
    let b1 = pod(
        "00000000-0000-4000-8000-0000000000b1",
        "b1",
        "demo",
        "node-b",
        "server",
    );
    api.apply_pod(&b1);
    let b1_ns = ScratchNetns::new(&format!("{p}b1"));
    let (ok, out) = nodes[1].cnitool("add", &b1, &b1_ns.0);
    assert!(ok, "{out}\n{}", nodes[1].logs());
    let b1_ip = result_ip(&out);
    assert!(
        has_rules(&b1_ns.0) && listens(&b1_ns.0, 15008),
        "{}",
        nodes[1].logs()
    );
    let _b1_pause = PodProcess::start(&b1_ns.0, &b1.uid, &p);
    // The kubelet reports its address; the agent recorded the enrollment meanwhile.
    eventually(10, || {
        api.pod_annotation("demo", "b1", REDIRECTION).is_some()
    })
    .await;
    api.apply_pod(&PodDef {
        ips: vec![b1_ip],
        enrolled: true,
        ..b1.clone()
    });
    echo(&b1_ns.0, APP_PORT);
    let a_proxy = nodes[0].proxy_ns.0.clone();
    eventually(20, || {
        let dump = http_get(&a_proxy, 15000, "/config_dump");
        dump.contains(&b1.uid) && dump.contains(&b1_ip.to_string())
    })
    .await;

    // a1: a process started the moment its ADD returned connects to b1 at once; tunneled.
    let a1 = pod(
        "00000000-0000-4000-8000-0000000000a1",
        "a1",
        "demo",
        "node-a",
        "client",
    );
    api.apply_pod(&a1);
    let a1_ns = ScratchNetns::new(&format!("{p}a1"));
    let capture = Capture::start(&na, &ab, &root.join("first.pcap"))
        .await
        .unwrap();
    let (ok, out) = nodes[0].cnitool("add", &a1, &a1_ns.0);
    assert!(ok, "{out}\n{}", nodes[0].logs());
    let to_b1 = SocketAddr::new(b1_ip, APP_PORT);
    let back = connect_at_start(&a1_ns.0, to_b1, "hboned-FIRST-e41c");
    assert_eq!(back, "hboned-FIRST-e41c", "{}", nodes[0].logs());
    let (clear, hbone) = seen(capture, &na, "hboned-FIRST-e41c").await;
    assert!(
        !clear && hbone,
        "a1's first connection: clear {clear}, hbone {hbone}"
    );
    let a1_ip = result_ip(&out);
    let _a1_pause = PodProcess::start(&a1_ns.0, &a1.uid, &p);
    eventually(10, || {
        api.pod_annotation("demo", "a1", REDIRECTION).is_some()
    })
    .await;
    api.apply_pod(&PodDef {
        ips: vec![a1_ip],
        enrolled: true,
        ..a1.clone()
    });

    // A ClusterIP, translated by kube-proxy in the node (DNAT): still a tunnel.
    api.apply_service("demo", "echo", VIP.parse().unwrap(), 80, "app");
    api.apply_slice("demo", "echo", "app", APP_PORT, &[(&b1.uid, b1_ip)]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &na,
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        &format!("{VIP}/32"),
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &to_b1.to_string(),
    ]);
    eventually(20, || {
        http_get(&a_proxy, 15000, "/config_dump").contains(VIP)
    })
    .await;
    let capture = Capture::start(&na, &ab, &root.join("vip.pcap"))
        .await
        .unwrap();
    let vip = SocketAddr::new(VIP.parse().unwrap(), 80);
    assert_eq!(
        connect_at_start(&a1_ns.0, vip, "hboned-VIP-77d0"),
        "hboned-VIP-77d0"
    );
    let (clear, hbone) = seen(capture, &na, "hboned-VIP-77d0").await;
    assert!(
        !clear && hbone,
        "a1 → ClusterIP: clear {clear}, hbone {hbone}"
    );

    // a2, in a namespace that did not opt in: its ADD passes and nothing of ours is in it; the
    // proxies are strict, so its plaintext into b1 is refused there.
    let a2 = pod(
        "00000000-0000-4000-8000-0000000000a2",
        "a2",
        "plain",
        "node-a",
        "default",
    );
    api.apply_pod(&a2);
    let a2_ns = ScratchNetns::new(&format!("{p}a2"));
    let (ok, out) = nodes[0].cnitool("add", &a2, &a2_ns.0);
    assert!(ok, "{out}");
    assert!(!has_rules(&a2_ns.0) && !listens(&a2_ns.0, 15008));
    assert_eq!(connect_at_start(&a2_ns.0, to_b1, "plain-refused"), "");
    assert!(
        nodes_log_has(&nodes[1].dir, "proxy.log", "refused (strict)"),
        "{}",
        nodes[1].logs()
    );

    // An address of the pod ranges discovery does not know: held, then refused (strict), and
    // nothing of it reaches the wire in plaintext.
    let capture = Capture::start(&na, &ab, &root.join("unknown.pcap"))
        .await
        .unwrap();
    let unknown: SocketAddr = "198.18.220.77:7000".parse().unwrap();
    assert_eq!(connect_at_start(&a1_ns.0, unknown, "hboned-UNKNOWN-c3"), "");
    let segments = capture
        .stop(&netns(&na), "198.18.0.2:9".parse().unwrap())
        .unwrap();
    assert!(
        !segments.iter().any(|s| s.dst.ip() == unknown.ip()),
        "a connection to an unknown pod address left the node"
    );

    // Agent A down: an ADD fails (no pod of an opted-in namespace starts uncaptured), and
    // the proxy goes on serving a1.
    nodes[0].stop_agent();
    let a3 = pod(
        "00000000-0000-4000-8000-0000000000a3",
        "a3",
        "demo",
        "node-a",
        "client",
    );
    api.apply_pod(&a3);
    let a3_ns = ScratchNetns::new(&format!("{p}a3"));
    let (ok, out) = nodes[0].cnitool("add", &a3, &a3_ns.0);
    assert!(!ok, "an ADD succeeded without the agent: {out}");
    assert!(out.contains("not reachable"), "{out}");
    // The runtime cleans a failed ADD up with a DEL (the CNI spec), which succeeds without the
    // agent.
    let (ok, out) = nodes[0].cnitool("del", &a3, &a3_ns.0);
    assert!(ok, "{out}");
    assert_eq!(
        connect_at_start(&a1_ns.0, to_b1, "agent-down"),
        "agent-down"
    );

    // Agent A back: it takes a1 over (from its process) before its snapshot, so the proxy
    // never drops it; the runtime's retry of a3's ADD now succeeds.
    nodes[0].start_agent();
    let na2 = na.clone();
    eventually(30, || {
        ready(&na2)
            && ready(&a_proxy)
            && nodes_log_has(
                &nodes[0].dir,
                "agent.log",
                "ZDS snapshot sent to the proxy pods=1",
            )
    })
    .await;
    assert_eq!(
        connect_at_start(&a1_ns.0, to_b1, "agent-back"),
        "agent-back"
    );
    assert!(
        !nodes[0].logs().contains("pod removed"),
        "{}",
        nodes[0].logs()
    );
    let (ok, out) = nodes[0].cnitool("add", &a3, &a3_ns.0);
    assert!(ok, "{out}\n{}", nodes[0].logs());
    assert!(has_rules(&a3_ns.0) && listens(&a3_ns.0, 15008));
    eventually(10, || {
        api.pod_annotation("demo", "a3", REDIRECTION).is_some()
    })
    .await;

    // DEL lets a3 go: rules, listeners and record.
    let (ok, out) = nodes[0].cnitool("del", &a3, &a3_ns.0);
    assert!(ok, "{out}");
    let a3_name = a3_ns.0.clone();
    eventually(10, || !listens(&a3_name, 15008)).await;
    assert!(!has_rules(&a3_ns.0));
    eventually(10, || {
        api.pod_annotation("demo", "a3", REDIRECTION).is_none()
    })
    .await;

    // The API server away, then agent A and its proxy both restarted: the agent serves its
    // last state (the pods it enrolled, the workloads it knew) and a1 stays tunneled.
    let state_dir = nodes[0].dir.join("run/state");
    let (a1_uid, b1_uid) = (a1.uid.clone(), b1.uid.clone());
    eventually(30, || {
        let has = |f: &str, what: &str| {
            std::fs::read(state_dir.join(f))
                .is_ok_and(|b| b.windows(what.len()).any(|w| w == what.as_bytes()))
        };
        has("pods.json", &a1_uid) && has("discovery.pb", &a1_uid) && has("discovery.pb", &b1_uid)
    })
    .await;
    api.set_unavailable(true);
    nodes[0].stop_proxy();
    nodes[0].stop_agent();
    nodes[0].start_agent();
    nodes[0].start_proxy();
    let na3 = na.clone();
    eventually(30, || ready(&na3) && ready(&a_proxy)).await;
    let capture = Capture::start(&na, &ab, &root.join("outage.pcap"))
        .await
        .unwrap();
    assert_eq!(
        connect_at_start(&a1_ns.0, to_b1, "hboned-OUTAGE-5a1"),
        "hboned-OUTAGE-5a1",
        "{}",
        nodes[0].logs()
    );
    let (clear, hbone) = seen(capture, &na, "hboned-OUTAGE-5a1").await;
    assert!(
        !clear && hbone,
        "a1 during the outage: clear {clear}, hbone {hbone}"
    );
    api.set_unavailable(false);

    // Uninstall on node A: no plugin, no rule, no node chain left.
    nodes[0].stop_proxy();
    nodes[0].stop_agent();
    let out = Command::new("ip")
        .args(["netns", "exec", &na])
        .arg(nodes[0].dir.join("hboned"))
        .args(["agent", "uninstall", "--config"])
        .arg(nodes[0].agent_config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conflist = std::fs::read_to_string(nodes[0].conflist()).unwrap();
    assert!(!conflist.contains("hboned-cni"), "{conflist}");
    assert!(!nodes[0].dir.join("bin/hboned-cni").exists());
    for ns in [&a1_ns.0, &a2_ns.0, &a3_ns.0] {
        assert!(!has_rules(ns), "rules left in {ns}");
    }
    let chains = sh(&["ip", "netns", "exec", &na, "iptables", "-t", "nat", "-S"]);
    assert!(!chains.contains("HBONE"), "{chains}");
    for (pod, ns) in [(&a1, &a1_ns), (&a2, &a2_ns), (&a3, &a3_ns)] {
        let _ = nodes[0].cnitool("del", pod, &ns.0);
    }
    let _ = nodes[1].cnitool("del", &b1, &b1_ns.0);
}

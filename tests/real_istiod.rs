//! hboned under istiod's own discovery code: tests/real/istio/cmd/istiod runs istio/istio's
//! `pilot/test/xds.NewFakeDiscoveryServer` (istiod's DiscoveryServer, its real WDS and
//! Authorization generators and ambient index, ambient on as istiod's chart turns it on) over
//! an in-memory Kubernetes loaded from the YAML below, serving delta ADS inside node B; both
//! nodes' proxies discover everything from it (their config files name no workload, service
//! or policy). The mesh's trust domain is `example.org`, which no proxy setting names: each pod
//! takes it from its workload, as ztunnel does. Shown on real traffic: a1 → b1 over HBONE
//! with a1's `example.org` identity, allowed by istiod's translation of an ALLOW policy on
//! principals; the same through the Service's cluster IP; b3 (another service account) denied;
//! plaintext from a2 denied by the same policy (no principal); a Pod deleted from the API
//! leaves the proxies' state. Every certificate comes from istiod's own CA server
//! (`security/pkg/server/ca`, over TLS for istiod.istio-system.svc, which `/etc/netns/*/hosts`
//! resolves as cluster DNS would): each proxy authenticates with its ztunnel pod's service
//! account token and impersonates its pods, as the CA's node authorizer allows
//! (CA_TRUSTED_NODE_ACCOUNTS=istio-system/ztunnel). Needs root and Go; off CI each is skipped
//! when missing, on CI (CI=true) that fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use hboned::testbed::{
    self, A1, A2, APP_PORT, B1, B3, Pod, SERVICE_PORT, SERVICE_VIP, Topology, node_ip,
};
use support::real::{Driver, go_program, have_go};
use support::topo::{bin, can_run, echoes, http_get, until_closed};
use support::{eventually, within};

const TRUST_DOMAIN: &str = "example.org";

/// istiod's driver, killed when the test ends; its stdin takes commands.
struct Istiod {
    driver: Driver,
    /// Delta ADS (istiod's 15010).
    addr: String,
    /// The CA (istiod's 15012: TLS for istiod.istio-system.svc).
    ca: String,
}

/// The ztunnel pod of `node`: its uid, and the service account token the API server accepts
/// for it.
fn ztunnel(node: char) -> (String, String) {
    let n = if node == 'a' { 1 } else { 2 };
    (
        format!("00000000-0000-4000-8000-00000000ff0{n}"),
        format!("token-of-ztunnel-{node}"),
    )
}

impl Istiod {
    /// Starts istiod in node B's netns on B's link address with `objects` (a YAML file).
    fn start(topo: &Topology, objects: &std::path::Path, log: &std::path::Path) -> Istiod {
        let program = go_program("istio", "./cmd/istiod", "istiod");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &topo.netns_name("nb")])
            .arg(program)
            .args(["-listen", &format!("{}:0", node_ip('b'))])
            .args(["-trust-domain", TRUST_DOMAIN, "-objects"])
            .arg(objects)
            .args(["-ca-listen", &format!("{}:0", node_ip('b'))])
            .arg("-ca-root")
            .arg(objects.with_file_name("root-cert.pem"))
            .args(['a', 'b'].map(|node| {
                let (uid, token) = ztunnel(node);
                format!("-token={token}=istio-system/ztunnel/ztunnel-{node}/{uid}")
            }))
            // As istiod's chart sets them for ambient; read when the process starts.
            .env("PILOT_ENABLE_AMBIENT", "true")
            .env("CA_TRUSTED_NODE_ACCOUNTS", "istio-system/ztunnel");
        let mut driver = Driver::start(command, log);
        let mut listening = |what: &str| {
            let line = driver.line();
            line.strip_prefix(&format!("{what} listening on "))
                .unwrap_or_else(|| panic!("istiod did not start its {what}: {line:?}"))
                .to_owned()
        };
        let addr = listening("xds");
        let ca = listening("ca");
        Istiod { driver, addr, ca }
    }

    /// Sends one command; panics unless istiod answers "ok".
    fn command(&mut self, line: &str) {
        assert_eq!(self.driver.command(line), "ok", "istiod: {line}");
    }
}

/// `/etc/netns/<netns>/hosts`, which `ip netns exec` mounts over /etc/hosts for what it starts
/// there (the proxies): istiod.istio-system.svc is node B's address, as cluster DNS would say.
/// Removed when dropped.
struct Hosts(Vec<std::path::PathBuf>);

impl Hosts {
    fn install(topo: &Topology) -> Hosts {
        let dirs =
            ["na", "nb"].map(|n| std::path::Path::new("/etc/netns").join(topo.netns_name(n)));
        for dir in &dirs {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(
                dir.join("hosts"),
                format!(
                    "127.0.0.1 localhost\n{} istiod.istio-system.svc\n",
                    node_ip('b')
                ),
            )
            .unwrap();
        }
        Hosts(dirs.to_vec())
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A Pod as the API server holds it once scheduled and running. Enrolled pods carry the
/// annotation istio-cni writes once it has redirected them (istiod then marks the workload
/// HBONE).
fn pod(p: &Pod, enrolled: bool) -> String {
    let annotation = if enrolled {
        "\n  annotations: {ambient.istio.io/redirection: enabled}"
    } else {
        ""
    };
    // b2 runs the waypoint (the Gateway's pods carry its name, as istiod's deployment controller
    // labels them).
    let waypoint = if p.name == testbed::B2.name {
        ", gateway.networking.k8s.io/gateway-name: waypoint"
    } else {
        ""
    };
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  uid: 00000000-0000-4000-8000-0000000000{uid:02x}
  labels: {{app: {name}{waypoint}}}{annotation}
spec:
  nodeName: node-{node}
  serviceAccountName: {sa}
  containers: [{{name: app, image: app}}]
status:
  phase: Running
  conditions: [{{type: Ready, status: \"True\"}}]
  podIP: {ip}
  podIPs: [{{ip: {ip}}}, {{ip: {ip6}}}]
",
        name = p.name,
        uid = p.ip.octets()[2],
        node = p.node,
        sa = p.service_account,
        ip = p.ip,
        ip6 = p.ip6,
    )
}

fn cluster_objects() -> String {
    let mut docs = vec![
        "apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient}
"
        .to_owned(),
        "apiVersion: v1
kind: Namespace
metadata:
  name: istio-system
"
        .to_owned(),
    ];
    // The ztunnel DaemonSet's pods: the CA's node authorizer checks a caller against them.
    for node in ['a', 'b'] {
        let (uid, _) = ztunnel(node);
        docs.push(format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: ztunnel-{node}
  namespace: istio-system
  uid: {uid}
  labels: {{app: ztunnel}}
spec:
  nodeName: node-{node}
  serviceAccountName: ztunnel
  containers: [{{name: istio-proxy, image: hboned}}]
status:
  phase: Running
  podIP: {ip}
",
            ip = node_ip(node)
        ));
    }
    for (p, enrolled) in [
        (&A1, true),
        (&A2, false),
        (&B1, true),
        (&testbed::B2, false),
        (&B3, true),
    ] {
        docs.push(pod(p, enrolled));
    }
    // net-b's east-west gateway (the Gateway `istioctl multicluster expose` writes: class
    // istio-remote, the network label, an HBONE listener, its address in the status).
    docs.push(format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: eastwest
  namespace: istio-system
  labels: {{topology.istio.io/network: net-b}}
spec:
  gatewayClassName: istio-remote
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
status:
  addresses: [{{type: IPAddress, value: \"{b2}\"}}]
",
        b2 = testbed::B2.ip
    ));
    docs.push(format!(
        "apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: demo
spec:
  selector: {{app: b1}}
  clusterIP: {SERVICE_VIP}
  clusterIPs: [{SERVICE_VIP}]
  ports: [{{name: tcp, port: {SERVICE_PORT}, targetPort: {APP_PORT}, protocol: TCP}}]
"
    ));
    // A waypoint (the Gateway istioctl's `waypoint apply` writes, ready: its address in the
    // status), its Service in front of b2, and a Service of b1's that uses it.
    docs.push(format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: demo
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
status:
  addresses: [{{type: Hostname, value: waypoint.demo.svc.cluster.local}}]
---
apiVersion: v1
kind: Service
metadata:
  name: waypoint
  namespace: demo
spec:
  selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}
  clusterIP: {WAYPOINT_VIP}
  clusterIPs: [{WAYPOINT_VIP}]
  ports: [{{name: mesh, port: 15008, targetPort: 15008, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo-wp
  namespace: demo
  labels: {{istio.io/use-waypoint: waypoint}}
spec:
  selector: {{app: b1}}
  clusterIP: {BEHIND_WAYPOINT_VIP}
  clusterIPs: [{BEHIND_WAYPOINT_VIP}]
  ports: [{{name: tcp, port: {SERVICE_PORT}, targetPort: {APP_PORT}, protocol: TCP}}]
"
    ));
    // A ServiceEntry whose address is a range (every address in it is the service), and
    // STRICT mTLS for the namespace (istiod turns it into a DENY of plaintext).
    docs.push(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: range
  namespace: demo
spec:
  hosts: [range.example]
  addresses: [198.18.200.0/24]
  ports: [{number: 80, name: tcp, protocol: TCP}]
  resolution: NONE
  location: MESH_INTERNAL
"
        .to_owned(),
    );
    docs.push(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: demo
spec:
  mtls: {mode: STRICT}
"
        .to_owned(),
    );
    // Only a1's service account may reach b1.
    docs.push(format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: only-client
  namespace: demo
spec:
  selector: {{matchLabels: {{app: b1}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [\"{TRUST_DOMAIN}/ns/demo/sa/client\"]}}}}]
"
    ));
    docs.join("---\n")
}

/// The waypoint Service's cluster IP, and that of the Service that uses the waypoint.
const WAYPOINT_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 100, 98);
const BEHIND_WAYPOINT_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 100, 97);

/// Whether a connection from `from` to `to` is refused (reset, at once or after a write).
async fn refused(topo: &Topology, from: &str, to: std::net::SocketAddr) -> bool {
    match topo.connect(from, to).await {
        Ok(mut s) => {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"knock").await;
            until_closed(&mut s).await.is_err()
        }
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hboned_serves_what_istiods_own_discovery_sends() {
    if !can_run() || !have_go() {
        return;
    }
    let _built = go_program("istio", "./cmd/istiod", "istiod");
    let mut topo = Topology::create(bin()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects.yaml");
    std::fs::write(&objects, cluster_objects()).unwrap();
    let mut istiod = Istiod::start(&topo, &objects, &dir.path().join("istiod.log"));
    let address = format!("http://{}", istiod.addr);
    let _hosts = Hosts::install(&topo);
    let ca_port = istiod.ca.rsplit(':').next().unwrap().to_owned();
    let ca = format!("https://istiod.istio-system.svc:{ca_port}");
    let root = dir.path().join("root-cert.pem");
    let tokens = dir.path().to_owned();
    let from_istiod = |node: char| {
        let address = address.clone();
        let token = tokens.join(format!("token-{node}"));
        std::fs::write(&token, ztunnel(node).1).unwrap();
        let ca = ca.clone();
        let root = root.clone();
        move |c: &mut hboned::config::Config| {
            use hboned::config::{CertSourceKind, IstioCaConfig};
            // Certificates from istiod's CA, each impersonating a pod of this node.
            c.certificates.source = Some(CertSourceKind::IstioCa);
            c.certificates.istio_ca = Some(IstioCaConfig {
                address: ca,
                root_ca: Some(root),
                token_file: Some(token),
            });
            c.workloads.clear();
            c.services.clear();
            c.policies.clear();
            c.xds.address = address;
            // As `hboned proxy ztunnel` sets them in the chart's DaemonSet pod: the node istiod
            // accepts from a ztunnel, and ztunnel's rule for clients' trust domains.
            let env = std::collections::HashMap::from([
                ("POD_NAME", format!("ztunnel-{node}")),
                ("POD_NAMESPACE", "istio-system".to_owned()),
                ("INSTANCE_IP", node_ip(node).to_string()),
                ("NODE_NAME", format!("node-{node}")),
            ]);
            let (id, metadata) =
                hboned::config::ztunnel::istiod_node(&|k| env.get(k).cloned()).unwrap();
            c.xds.node_id = id;
            c.xds.node_metadata = metadata;
            c.any_client_trust_domain = true;
            // The cluster istiod serves (CLUSTER_ID): the CA looks the caller up in it.
            c.cluster_id = "Kubernetes".into();
        }
    };
    topo.start_proxies(bin(), from_istiod('a'), from_istiod('b'))
        .await
        .unwrap();

    // Both proxies hold istiod's workloads, and their pods have moved to its trust domain.
    let dump = |node: &str| http_get(&topo, node, 15000, "/config_dump");
    // What a node's dump still lacks (empty once synced), named first in a failure so a
    // truncated log still says which.
    let lacks = |d: &str| {
        let mut missing = Vec::new();
        if !d.contains("Kubernetes//Pod/demo/b3") {
            missing.push("istiod's workload b3");
        }
        if !d.contains("demo/only-client") {
            missing.push("istiod's policy demo/only-client");
        }
        if !d.contains(&format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/")) {
            missing.push("a pod in istiod's trust domain");
        }
        if d.contains("spiffe://cluster.local/ns/demo/sa/") {
            missing.push("every pod out of the configured trust domain");
        }
        missing
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !["na", "nb"].iter().all(|n| lacks(&dump(n)).is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "not synced from istiod: A lacks {:?}, B lacks {:?}\nA: {}\nB: {}\n{}",
            lacks(&dump("na")),
            lacks(&dump("nb")),
            dump("na"),
            dump("nb"),
            topo.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let a = dump("na");
    assert!(a.contains("\"echo.demo.svc.cluster.local\""), "{a}");
    // The ServiceEntry's range, whole; PeerAuthentication STRICT as istiod translates it.
    assert!(a.contains("\"198.18.200.0/24\""), "{a}");
    assert!(a.contains("istio_converted_static_strict"), "{a}");
    // Each pod's certificate issued by istiod's CA to its node's proxy, impersonating the pod.
    let issued = |node: &str, sa: &str| {
        let d = dump(node);
        let id = format!("\"identity\":\"spiffe://{TRUST_DOMAIN}/ns/demo/sa/{sa}\",\"rootCerts\"");
        d.contains(&id) && d.contains("\"state\":\"Available\"")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !(issued("na", "client") && issued("nb", "server") && issued("nb", "b3")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no certificates from istiod's CA:\n{}\n{}",
            topo.logs(),
            std::fs::read_to_string(dir.path().join("istiod.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("CA")
                    || l.contains("impersonat")
                    || l.contains("authenticat"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let (_echo, peers) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
    // a1 → b1 and a1 → the Service: HBONE, allowed by principal.
    let mut s = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
    echoes(&mut s, b"a1 to b1 under istiod").await;
    let vip = std::net::SocketAddr::from((SERVICE_VIP, SERVICE_PORT));
    let mut s = topo.connect(A1.name, vip).await.unwrap();
    echoes(&mut s, b"a1 to echo's cluster IP").await;
    assert!(peers.lock().unwrap().iter().all(|p| p.ip() == A1.ip));
    let principal = format!("source_principal=\"spiffe://{TRUST_DOMAIN}/ns/demo/sa/client\"");
    eventually(10, || {
        http_get(&topo, "nb", 15020, "/metrics").contains(&principal)
    })
    .await;
    // b3 (service account b3) and a2 (plaintext, no principal): denied by the same policy.
    assert!(refused(&topo, B3.name, B1.addr(APP_PORT)).await, "b3 → b1");
    assert!(refused(&topo, A2.name, B1.addr(APP_PORT)).await, "a2 → b1");
    assert_eq!(peers.lock().unwrap().len(), 2, "nothing denied reached b1");

    // The Service that uses the waypoint: istiod names the waypoint by hostname, and a1's
    // connection to it goes to the waypoint's pod (b2) on its HBONE port, never to b1. (The
    // listener here speaks no TLS: the connection then fails, it does not go around.)
    let waypoint = "\"destination\":\"demo/waypoint.demo.svc.cluster.local\"";
    eventually(30, || dump("na").contains(waypoint)).await;
    let at_waypoint = topo
        .netns(testbed::B2.name)
        .unwrap()
        .run(|| {
            let l = std::net::TcpListener::bind((testbed::B2.ip, 15008))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .unwrap();
    let at_waypoint = tokio::net::TcpListener::from_std(at_waypoint).unwrap();
    let before = peers.lock().unwrap().len();
    let behind = std::net::SocketAddr::from((BEHIND_WAYPOINT_VIP, SERVICE_PORT));
    let (accepted, refused_at_a1) = tokio::join!(
        within(20, at_waypoint.accept()),
        refused(&topo, A1.name, behind)
    );
    let (_, from) = accepted.unwrap();
    assert_eq!(
        from.ip(),
        std::net::IpAddr::V4(A1.ip),
        "the tunnel to the waypoint"
    );
    assert!(
        refused_at_a1,
        "no waypoint speaking HBONE here: the connection fails"
    );
    assert_eq!(
        peers.lock().unwrap().len(),
        before,
        "b1 reached around its waypoint"
    );

    // net-b's gateway, as istiod sends it to every ztunnel: a workload of net-b at the
    // gateway's address with the gateway's service account, kept apart from b2 (the same
    // address on the proxy's own network). A pod on net-b itself comes only from another
    // cluster (istiod puts a cluster's pods on its system namespace's network), which the
    // fake server, one cluster, cannot serve: tests/multi_network.rs covers the route.
    let gateway = format!(
        "\"name\":\"NetworkGateway/net-b/{}/15008\",\"namespace\":\"istio-system\",\"network\":\"net-b\"",
        testbed::B2.ip
    );
    eventually(30, || dump("na").contains(&gateway)).await;
    assert!(dump("na").contains("\"serviceAccount\":\"eastwest-istio-remote\""));

    // b3's Pod deleted from the API server: gone from both proxies' state.
    istiod.command("delete pod demo b3");
    within(30, async {
        while ["na", "nb"]
            .iter()
            .any(|n| dump(n).contains("Kubernetes//Pod/demo/b3"))
        {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// The lines `istiod -proto-shape` prints, for hboned's own copy `proto` (under proto/):
/// "Message.field N" per field and "Enum.VALUE N" per enum value, nested names by their path,
/// sorted.
fn our_shape(proto: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(proto))
            .unwrap();
    // (kind, name) of the blocks we are in.
    let mut scopes: Vec<(&str, String)> = Vec::new();
    let mut lines = Vec::new();
    let path = |scopes: &[(&str, String)]| {
        scopes
            .iter()
            .filter(|(kind, _)| *kind != "oneof")
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join(".")
    };
    for raw in text.lines() {
        let line = raw.split("//").next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [kind @ ("message" | "enum" | "oneof"), name, "{"] => {
                scopes.push((kind, (*name).to_owned()))
            }
            ["}"] => {
                scopes.pop();
            }
            ["syntax" | "package" | "import" | "reserved", ..] => {}
            _ => {
                let (lhs, number) = line.trim_end_matches(';').split_once('=').unwrap();
                let number = number.trim();
                let name = lhs.split_whitespace().last().unwrap();
                lines.push(format!("{}.{name} {number}", path(&scopes)));
            }
        }
    }
    lines.sort();
    lines
}

/// Every message and enum hboned reads from istiod has istiod's own shape: the same fields and
/// values, by name and number (istio/istio pkg/workloadapi, at the pinned commit).
#[test]
fn the_discovery_protos_have_istiods_shape() {
    if !have_go() {
        return;
    }
    let program = go_program("istio", "./cmd/istiod", "istiod");
    for (which, ours, at_least) in [
        ("workload", "proto/istio/workload/workload.proto", 90),
        (
            "authorization",
            "proto/istio/security/authorization.proto",
            30,
        ),
    ] {
        let out = Command::new(&program)
            .args(["-proto-shape", which])
            .output()
            .unwrap();
        assert!(out.status.success(), "{which}");
        let istiod: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let ours = our_shape(ours);
        let missing: Vec<&String> = istiod.iter().filter(|l| !ours.contains(l)).collect();
        let extra: Vec<&String> = ours.iter().filter(|l| !istiod.contains(l)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{which}: missing from hboned's proto: {missing:#?}\nnot in istiod's: {extra:#?}"
        );
        assert!(istiod.len() > at_least, "{which}: {istiod:?}");
    }
}

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
//! leaves the proxies' state. Needs root and Go; off CI each is skipped when missing, on CI
//! (CI=true) that fails instead.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};

use hboned::testbed::{
    self, A1, A2, APP_PORT, B1, B3, Pod, SERVICE_PORT, SERVICE_VIP, Topology, node_ip,
};
use support::real::{go_program, have_go};
use support::topo::{bin, can_run, echoes, http_get, until_closed};
use support::{eventually, within};

const TRUST_DOMAIN: &str = "example.org";

/// istiod's driver, killed when the test ends; its stdin takes commands.
struct Istiod {
    child: Child,
    stdin: ChildStdin,
    replies: BufReader<std::process::ChildStdout>,
    addr: String,
}

impl Istiod {
    /// Starts istiod in node B's netns on B's link address with `objects` (a YAML file).
    fn start(topo: &Topology, objects: &std::path::Path, log: &std::path::Path) -> Istiod {
        let program = go_program("istio", "./cmd/istiod", "istiod");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &topo.netns_name("nb")])
            .arg(program)
            .args(["-listen", &format!("{}:0", node_ip('b'))])
            .args(["-trust-domain", TRUST_DOMAIN, "-objects"])
            .arg(objects)
            // As istiod's chart sets it for ambient; read when the process starts.
            .env("PILOT_ENABLE_AMBIENT", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut replies = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        replies.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("xds listening on ")
            .unwrap_or_else(|| panic!("istiod did not start: {line:?}"))
            .to_owned();
        Istiod {
            child,
            stdin,
            replies,
            addr,
        }
    }

    /// Sends one command; panics unless istiod answers "ok".
    fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        let mut reply = String::new();
        self.replies.read_line(&mut reply).unwrap();
        assert_eq!(reply.trim(), "ok", "istiod: {line}");
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  uid: 00000000-0000-4000-8000-0000000000{uid:02x}
  labels: {{app: {name}}}{annotation}
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
    ];
    for (p, enrolled) in [
        (&A1, true),
        (&A2, false),
        (&B1, true),
        (&testbed::B2, false),
        (&B3, true),
    ] {
        docs.push(pod(p, enrolled));
    }
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
    let from_istiod = |node: char| {
        let address = address.clone();
        move |c: &mut hboned::config::Config| {
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
        }
    };
    topo.start_proxies(bin(), from_istiod('a'), from_istiod('b'))
        .await
        .unwrap();

    // Both proxies hold istiod's workloads, and their pods have moved to its trust domain.
    let dump = |node: &str| http_get(&topo, node, 15000, "/config_dump");
    let synced = |d: &str| {
        d.contains("Kubernetes//Pod/demo/b3")
            && d.contains("demo/only-client")
            && d.contains(&format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/"))
            && !d.contains("spiffe://cluster.local/ns/demo/sa/")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !["na", "nb"].iter().all(|n| synced(&dump(n))) {
        assert!(
            std::time::Instant::now() < deadline,
            "not synced from istiod:\nA: {}\nB: {}\n{}",
            dump("na"),
            dump("nb"),
            topo.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let a = dump("na");
    assert!(a.contains("\"echo.demo.svc.cluster.local\""), "{a}");

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

//! Kubernetes mode against a fake API server (tests/support/kube_api.rs). Discovery runs in
//! this process on loopback (no root); the two-node tests in network namespaces (root) drive
//! `hboned run` with `kubernetes:` from the same fake: labelling a namespace enrolls its pods
//! and their traffic becomes TLS on the wire, and so on.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hboned::kube::{LabelMatch, Settings};
use hboned::state::{Protocol, SharedState, State};
use support::kube_api::{FakeApi, PodDef};
use support::{eventually, within};

const LABEL: (&str, &str) = ("io.cilium/mtls-enabled", "true");

fn pod(uid: &str, namespace: &str, node: &str, ip: &str) -> PodDef {
    PodDef {
        uid: uid.into(),
        name: format!("{uid}-pod"),
        namespace: namespace.into(),
        node: node.into(),
        service_account: "app".into(),
        ips: vec![ip.parse().unwrap()],
        // Served by its node's agent (which records that on the pod) whenever its namespace
        // is opted in; tests that follow the record itself change this.
        enrolled: true,
    }
}

fn settings() -> Settings {
    Settings {
        node: "node-a".into(),
        labels: vec![LabelMatch::parse("io.cilium/mtls-enabled=true").unwrap()],
        trust_domain: "cluster.local".into(),
        cluster_id: "c1".into(),
        services: true,
        cluster_domain: "cluster.local".into(),
    }
}

fn protocol(state: &SharedState, uid: &str) -> Option<Protocol> {
    state.read().workload(uid).map(|w| w.protocol)
}

async fn discovering(api: &FakeApi) -> (Arc<SharedState>, hboned::kube::Running) {
    let url = api.serve_loopback();
    let client = hboned::kube::client(&hboned::config::KubernetesConfig {
        api_server: Some(url),
        ..Default::default()
    })
    .unwrap();
    let state = Arc::new(SharedState::new(State::default()));
    let (tx, mut synced) = tokio::sync::watch::channel(false);
    let running = hboned::kube::discover(client, settings(), state.clone(), tx);
    within(20, synced.wait_for(|s| *s)).await.unwrap();
    (state, running)
}

#[tokio::test]
async fn pods_become_workloads_and_follow_their_namespaces_opt_in() {
    let api = FakeApi::new();
    api.apply_namespace("mesh", &[LABEL]);
    api.apply_namespace("plain", &[("team", "x")]);
    api.apply_pod(&pod("p1", "mesh", "node-a", "10.1.0.1"));
    let p2 = PodDef {
        enrolled: false,
        ..pod("p2", "plain", "node-b", "10.1.0.2")
    };
    api.apply_pod(&p2);
    let (state, _running) = discovering(&api).await;

    assert_eq!(protocol(&state, "p1"), Some(Protocol::Hbone));
    assert_eq!(protocol(&state, "p2"), Some(Protocol::Tcp));
    {
        let s = state.read();
        let w = s.workload_by_ip("10.1.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/mesh/sa/app"
        );
        assert_eq!((w.node.as_str(), w.cluster_id.as_str()), ("node-a", "c1"));
    }

    // Labelling a namespace switches its pods to HBONE once their nodes' agents recorded
    // them served (not before: a pod not served yet stays reachable in plaintext);
    // unlabelling switches them back.
    api.apply_namespace("plain", &[("team", "x"), LABEL]);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        protocol(&state, "p2"),
        Some(Protocol::Tcp),
        "not served yet"
    );
    api.patch_pod(
        "plain",
        "p2-pod",
        serde_json::json!({"metadata": {"annotations": {"hboned.io/redirection": "enabled"}}}),
    );
    eventually(10, || protocol(&state, "p2") == Some(Protocol::Hbone)).await;
    api.apply_namespace("mesh", &[]);
    eventually(10, || protocol(&state, "p1") == Some(Protocol::Tcp)).await;

    // A new pod, then its deletion.
    api.apply_pod(&pod("p3", "plain", "node-b", "10.1.0.3"));
    eventually(10, || protocol(&state, "p3") == Some(Protocol::Hbone)).await;
    api.delete_pod("plain", "p3-pod");
    eventually(10, || protocol(&state, "p3").is_none()).await;
    assert!(
        state
            .read()
            .workload_by_ip("10.1.0.3".parse::<IpAddr>().unwrap())
            .is_none()
    );
}

/// A Service and its EndpointSlice: the VIP becomes a state service and the pod's workload
/// maps the service port to the port the slice gives for the named target port.
#[tokio::test]
async fn services_and_endpoint_slices_give_vips_and_pod_ports() {
    let api = FakeApi::new();
    api.apply_namespace("mesh", &[LABEL]);
    api.apply_pod(&pod("p1", "mesh", "node-b", "10.5.0.1"));
    let vip: IpAddr = "10.96.5.10".parse().unwrap();
    api.apply_service("mesh", "web", vip, 80, "http");
    api.apply_slice(
        "mesh",
        "web",
        "http",
        8080,
        &[("p1", "10.5.0.1".parse().unwrap())],
    );
    let (state, _running) = discovering(&api).await;
    let key = "mesh/web.mesh.svc.cluster.local";
    let target = |state: &SharedState| {
        let s = state.read();
        let w = s.workload("p1")?;
        w.services.get(key)?.get(&80).copied()
    };
    assert_eq!(target(&state), Some(8080));
    let route = state.read().route(&[], SocketAddr::new(vip, 80), 0);
    match route {
        hboned::state::Upstream::Hbone { target, .. } => {
            assert_eq!(target, "10.5.0.1:8080".parse().unwrap())
        }
        other => panic!("the VIP did not route to p1 over HBONE: {other:?}"),
    }
    // The slice moves the named port: the map follows.
    api.apply_slice(
        "mesh",
        "web",
        "http",
        9090,
        &[("p1", "10.5.0.1".parse().unwrap())],
    );
    eventually(10, || target(&state) == Some(9090)).await;
    // p1 leaves the slice: it no longer backs the service.
    api.apply_slice("mesh", "web", "http", 9090, &[]);
    eventually(10, || target(&state).is_none()).await;
}

/// Watches end and the history is compacted while a pod is added: the watchers resume from a
/// version the server no longer has, get 410 Gone, and list again, which finds the pod.
#[tokio::test]
async fn a_410_gone_makes_the_watch_list_again() {
    let api = FakeApi::new();
    api.apply_namespace("mesh", &[LABEL]);
    api.apply_pod(&pod("p1", "mesh", "node-b", "10.2.0.1"));
    let (state, _running) = discovering(&api).await;
    let lists = api.lists_of("/api/v1/pods");
    assert_eq!(lists, 1);

    api.restart_compacted(&[pod("p2", "mesh", "node-b", "10.2.0.2")]);
    eventually(20, || protocol(&state, "p2") == Some(Protocol::Hbone)).await;
    assert!(api.lists_of("/api/v1/pods") > lists, "{:?}", api.requests());
    assert!(
        protocol(&state, "p1").is_some(),
        "the relist kept what is still there"
    );

    // A pod deleted while nobody watched is gone after the next relist too.
    let mut gone = pod("p1", "mesh", "node-b", "10.2.0.1");
    gone.name = "p1-pod".into();
    api.restart_compacted(&[]);
    api.delete_pod("mesh", "p1-pod");
    eventually(20, || protocol(&state, "p1").is_none()).await;
}

/// A bookmark moves a quiet watch's version forward: after other kinds' changes and a
/// compaction, the pod watch resumes where the bookmark left it instead of listing again.
#[tokio::test]
async fn bookmarks_spare_a_quiet_watch_the_relist() {
    let api = FakeApi::new();
    api.apply_namespace("mesh", &[LABEL]);
    api.apply_pod(&pod("p1", "mesh", "node-b", "10.3.0.1"));
    let (state, _running) = discovering(&api).await;
    let requested = |api: &FakeApi| {
        api.requests()
            .iter()
            .any(|r| r.starts_with("/api/v1/pods?") && r.contains("allowWatchBookmarks=true"))
    };
    eventually(10, || requested(&api)).await;
    // Other objects change; the pod watch sees none of it but the bookmark.
    for i in 0..5 {
        api.apply_namespace(&format!("other{i}"), &[]);
    }
    // Every watch has received the bookmark once it is in their stream; then restart.
    api.bookmark();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let lists = api.lists_of("/api/v1/pods");
    api.compact();
    api.end_watches();
    api.apply_pod(&pod("p2", "mesh", "node-b", "10.3.0.2"));
    eventually(20, || protocol(&state, "p2") == Some(Protocol::Hbone)).await;
    assert_eq!(api.lists_of("/api/v1/pods"), lists, "{:?}", api.requests());
}

/// An API server that answers 503 is retried with back-off, not in a loop, and the state
/// keeps serving meanwhile; once it is back, changes made meanwhile arrive.
#[tokio::test]
async fn an_unavailable_api_server_is_retried_with_backoff() {
    let api = FakeApi::new();
    api.apply_namespace("mesh", &[LABEL]);
    api.apply_pod(&pod("p1", "mesh", "node-b", "10.6.0.1"));
    let (state, _running) = discovering(&api).await;
    api.set_unavailable(true);
    let start = api.requests().len();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mid = api.requests().len();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (first, second) = (mid - start, api.requests().len() - mid);
    // kube-client retries a 503 from 5 ms doubling, the watcher backs off from 0.8 s: tens of
    // requests at most, fewer as time goes (a loop would make thousands).
    assert!(
        first + second <= 60,
        "{first} + {second} requests in 6 s against a down API server"
    );
    assert!(
        second <= first,
        "not backing off: {first} then {second} requests"
    );
    assert!(
        protocol(&state, "p1").is_some(),
        "the last state keeps serving"
    );
    api.set_unavailable(false);
    api.apply_pod(&pod("p2", "mesh", "node-b", "10.6.0.2"));
    eventually(30, || protocol(&state, "p2").is_some()).await;
}

/// The fake refuses what kube-apiserver refuses, so a wrong selector in hboned would show.
#[tokio::test]
async fn the_fake_api_server_refuses_what_the_real_one_does() {
    let api = FakeApi::new();
    let url = api.serve_loopback();
    let get = |path: &str| {
        let url = format!("{url}{path}");
        async move {
            let addr = url
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap()
                .to_owned();
            let path = &url[7 + addr.len()..];
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let bad = get("/api/v1/pods?fieldSelector=spec.nodeNames%3Dx").await;
    assert!(
        bad.starts_with("HTTP/1.1 400") && bad.contains("field label not supported"),
        "{bad}"
    );
    assert!(get("/api/v1/secrets").await.starts_with("HTTP/1.1 404"));
    api.apply_pod(&pod("p1", "mesh", "node-a", "10.4.0.1"));
    let list = get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a").await;
    assert!(
        list.contains("\"kind\":\"PodList\"") && list.contains("p1-pod"),
        "{list}"
    );
    assert!(
        !list.contains("\"kind\":\"Pod\""),
        "list items carry no kind: {list}"
    );
    let other = get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-b").await;
    assert!(!other.contains("p1-pod"));
}

mod netns {
    //! Two nodes in network namespaces, each `hboned run` in Kubernetes mode on the fake API
    //! server (reached on 127.0.0.1 inside its node). The first test has nothing but hboned
    //! and a SPIRE agent (tests/support/spire.rs; pods attested by PID); the rollout test
    //! allows the built-in CA (one root for both nodes). Needs root; off CI it is skipped
    //! when not root, on CI it fails instead.

    use std::net::{IpAddr, SocketAddr};

    use hboned::config::{Config, KubernetesConfig};
    use hboned::testbed::{
        self, A1, A2, APP_PORT, B1, B2, B3, DENIED_PLAINTEXT_PORT, PODS, Topology,
    };

    use super::LABEL;
    const REDIRECTION: &str = "hboned.io/redirection";
    use super::support::kube_api::{FakeApi, PodDef};
    use super::support::kubelet::PodProcess;
    use super::support::spire::{Agent, DELEGATE, Server};
    use super::support::topo::*;
    use super::support::{eventually, within};

    /// The namespace of a topology pod: the enrolled ones in `demo`, the others in `plain`.
    fn namespace(p: &testbed::Pod) -> &'static str {
        if p.enrolled { "demo" } else { "plain" }
    }

    fn uid(topo: &Topology, p: &testbed::Pod) -> String {
        let n = topo
            .prefix()
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        format!(
            "{:08x}-0000-4000-8000-{:012x}",
            n & 0xffff_ffff,
            p.ip.octets()[2]
        )
    }

    fn def(topo: &Topology, p: &testbed::Pod) -> PodDef {
        PodDef {
            uid: uid(topo, p),
            name: p.name.into(),
            namespace: namespace(p).into(),
            node: format!("node-{}", p.node),
            service_account: p.service_account.into(),
            ips: vec![IpAddr::V4(p.ip), IpAddr::V6(p.ip6)],
            // The agents of the test's nodes record enrollments themselves.
            enrolled: false,
        }
    }

    /// A node in Kubernetes mode: nothing from the config's tables but node A's plaintext
    /// policy (a namespace DENY of identity-less connections to a1's port 7001); certificates
    /// from SPIRE at `spire` (the mode's default source), else the built-in CA, allowed.
    fn kube_node(c: &mut Config, api: &str, spire: Option<&std::path::Path>) {
        c.pods.clear();
        c.workloads.clear();
        c.services.clear();
        c.kubernetes = Some(KubernetesConfig {
            api_server: Some(api.to_owned()),
            allow_builtin_ca: spire.is_none(),
            services: true,
            ..KubernetesConfig::default()
        });
        match spire {
            Some(socket) => {
                c.certificates.spire_socket = Some(socket.to_owned());
                // No container runtime here: the pods' processes are found in /proc.
                c.certificates.container_runtime_socket = Some(socket.with_extension("no-cri"));
            }
            None => c.certificates.source = Some(hboned::config::CertSourceKind::Builtin),
        }
    }

    /// The real SPIRE (tests/support/spire.rs): a server, an agent per node, hboned (root) as
    /// the authorized delegate, and one entry per service account of the labelled namespace's
    /// pods, registered as Cilium's operator does (`k8s:ns` + `k8s:sa`). The agents attest with
    /// the unix attestor, which gives the pods' processes no `k8s` selectors: hboned's
    /// subscription by PID finds no SVID there and turns to the selectors, which match.
    fn spire(dir: &std::path::Path) -> (Server, Agent, Agent) {
        let server = Server::start(dir, "cluster.local", "1h");
        server.delegate_entry(0);
        for p in PODS.iter().filter(|p| p.enrolled) {
            server.service_account_entry(namespace(p), p.service_account, 0);
        }
        let a = Agent::start(&server, "a", &[DELEGATE]);
        let b = Agent::start(&server, "b", &[DELEGATE]);
        a.wait_for_own_svid(&server, DELEGATE);
        b.wait_for_own_svid(&server, DELEGATE);
        (server, a, b)
    }

    /// Whether the proxy of `node` takes `pod` for one reached over HBONE (its `/config_dump`).
    fn sees_hbone(topo: &Topology, node: &str, pod: &str) -> bool {
        let dump = http_get(topo, node, 15000, "/config_dump");
        let body = dump.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|d| d["workloads"].as_array().cloned())
            .is_some_and(|ws| {
                ws.iter()
                    .any(|w| w["name"] == pod && w["protocol"] == "HBONE")
            })
    }

    fn has_rules(topo: &Topology, pod: &str) -> bool {
        hboned::redirect::installed(&topo.netns(pod).unwrap()).unwrap()
    }

    /// A nat chain in a namespace, as `iptables -S` prints it.
    fn nat_chain(topo: &Topology, netns: &str, chain: &str) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &topo.netns_name(netns)])
            .args(["iptables", "-t", "nat", "-S", chain])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The node's probe chain.
    fn probe_chain(topo: &Topology, node: &str) -> String {
        nat_chain(topo, node, "HBONE_POSTRT")
    }

    fn ready(topo: &Topology, node: &str) -> bool {
        use std::io::{Read, Write};
        let answer = topo.netns(node).unwrap().run(|| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 15021));
            let mut s =
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1))?;
            s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        answer.is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// The topology without rules, its pods running (a process each, in a cgroup naming its
    /// UID) and known to a fake API server, namespace `demo` labelled with `demo_labels`.
    fn cluster(demo_labels: &[(&str, &str)]) -> (Topology, FakeApi, Vec<PodProcess>) {
        let topo = Topology::create_unenrolled(bin()).unwrap();
        let api = FakeApi::new();
        api.apply_namespace("demo", demo_labels);
        api.apply_namespace("plain", &[]);
        let processes = PODS
            .iter()
            .map(|p| PodProcess::start(&topo.netns_name(p.name), &uid(&topo, p), topo.prefix()))
            .collect();
        for p in &PODS {
            api.apply_pod(&def(&topo, p));
        }
        (topo, api, processes)
    }

    /// Serves the fake API inside both nodes' namespaces; the URL each node uses.
    fn serve_api(topo: &Topology, api: &FakeApi) -> (String, String) {
        (
            api.serve(loopback_listener(topo, "na")),
            api.serve(loopback_listener(topo, "nb")),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn labelling_a_namespace_enrolls_its_pods_and_unlabelling_lets_them_go() {
        if !can_run() || !super::support::real::have_go() {
            return;
        }
        let bin = bin();
        let (mut topo, api, _processes) = cluster(&[]);
        // An earlier run's rules in a pod that is not enrolled (its namespace never opted in).
        topo.install_rules(bin, A2.name).unwrap();
        assert!(has_rules(&topo, A2.name));

        let (url_a, url_b) = serve_api(&topo, &api);
        let dir = tempfile::tempdir().unwrap();
        let (_server, agent_a, agent_b) = spire(dir.path());
        topo.spawn_proxies(
            bin,
            |c| kube_node(c, &url_a, Some(&agent_a.admin_socket)),
            |c| kube_node(c, &url_b, Some(&agent_b.admin_socket)),
        )
        .unwrap();
        eventually(30, || ready(&topo, "na") && ready(&topo, "nb")).await;

        // Nothing opted in: no pod served, the stale rules gone, traffic plain and working.
        eventually(10, || !has_rules(&topo, A2.name)).await;
        for p in PODS {
            assert!(
                !serves(&topo, p.name),
                "{} served before its namespace opted in",
                p.name
            );
        }
        let (_e1, peers_b1) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());
        let (_e3, _) = testbed::spawn_echo(topo.listen(B3.name, APP_PORT).unwrap());
        let (_e2, _) = testbed::spawn_echo(topo.listen(B2.name, APP_PORT).unwrap());
        let (_e7, peers_a1) =
            testbed::spawn_echo(topo.listen(A1.name, DENIED_PLAINTEXT_PORT).unwrap());
        let Seen { clear, .. } =
            transfer_seen(&topo, &A1, &B1, b"hboned-KUBE-before-label", 64 * 1024).await;
        assert!(clear, "before the label, a1 → b1 is plain TCP");

        // The label: demo's pods are enrolled on both nodes; a1 → b1 is TLS on the wire.
        api.apply_namespace("demo", &[LABEL]);
        eventually(30, || {
            [A1, B1, B3]
                .iter()
                .all(|p| serves(&topo, p.name) && has_rules(&topo, p.name))
        })
        .await;
        assert!(!serves(&topo, A2.name) && !has_rules(&topo, B2.name));
        // Node A tunnels to b1 once its watch has seen node B record b1's enrollment; until
        // then b1 is a pod out of the mesh to it (plaintext, as to any such pod).
        eventually(30, || sees_hbone(&topo, "na", B1.name)).await;
        let Seen { clear, hbone } =
            transfer_seen(&topo, &A1, &B1, b"hboned-KUBE-labelled-91b3", 64 * 1024).await;
        assert!(!clear, "plaintext of an enrolled pod on the wire");
        assert!(hbone, "a1 ↔ b1 outside HBONE");
        assert_eq!(peers_b1.lock().unwrap().last().unwrap().ip(), A1.ip);
        // To and from a pod that is not enrolled: plaintext, still working.
        let mut s = topo.connect(A1.name, B2.addr(APP_PORT)).await.unwrap();
        echoes(&mut s, b"to plain").await;

        // Each node recorded its pods' enrollment on them: that is what made its peers use
        // HBONE (a pod not served has no record, and stays reachable in plaintext).
        let record = |p: &testbed::Pod| api.pod_annotation(namespace(p), p.name, REDIRECTION);
        for p in [A1, B1, B3] {
            assert_eq!(record(&p).as_deref(), Some("enabled"), "{}", p.name);
        }
        assert_eq!(record(&A2), None);
        // A pod of the namespace whose process never shows (its sandbox gone): not enrolled,
        // not recorded, its failed attempts counted.
        let ghost = PodDef {
            uid: "0000dead-0000-4000-8000-000000000001".into(),
            name: "ghost".into(),
            enrolled: false,
            ips: vec!["198.18.11.99".parse().unwrap()],
            ..def(&topo, &A1)
        };
        api.apply_pod(&ghost);
        eventually(20, || {
            http_get(&topo, "na", 15020, "/metrics")
                .contains("hboned_enrollment_failures_total{reason=\"no_process\"}")
        })
        .await;
        assert_eq!(api.pod_annotation("demo", "ghost", REDIRECTION), None);
        // ... and reported on it, once, as an Event an operator sees in `kubectl describe`.
        eventually(10, || {
            api.events()
                .iter()
                .any(|e| e["regarding"]["name"] == "ghost" && e["reason"] == "EnrollmentFailed")
        })
        .await;
        let ghost_events: Vec<_> = api
            .events()
            .into_iter()
            .filter(|e| e["regarding"]["name"] == "ghost")
            .collect();
        assert_eq!(ghost_events.len(), 1, "{ghost_events:?}");
        let event = &ghost_events[0];
        assert_eq!(event["type"], "Warning");
        assert_eq!(
            event["regarding"]["uid"],
            "0000dead-0000-4000-8000-000000000001"
        );
        assert!(
            event["note"].as_str().unwrap().contains("no_process"),
            "{event}"
        );
        api.delete_pod("demo", "ghost");
        // Plaintext from an enrolled pod that slipped past its capture (a socket carrying the
        // proxy's own mark) is refused at b1: an enrolled pod's traffic must come tunneled.
        let bypass = topo.netns(A1.name).unwrap().run(|| {
            use std::io::{Read, Write};
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_mark(0x539)?;
            s.connect_timeout(&B1.addr(APP_PORT).into(), std::time::Duration::from_secs(5))?;
            let mut s = std::net::TcpStream::from(s);
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            s.write_all(b"around the tunnel")?;
            let mut back = [0u8; 17];
            s.read_exact(&mut back)
        });
        assert!(bypass.is_err(), "plaintext from an enrolled pod reached b1");
        assert!(
            topo.log(1).contains("plaintext from an enrolled pod"),
            "{}",
            topo.log(1)
        );

        // Kubelet's probe from the node reaches a1's app uncaptured (from the probe address),
        // even on the port whose plaintext the policy denies; a2's plaintext there is refused.
        assert!(
            probe_chain(&topo, "na").contains(&format!("-d {}/32", A1.ip)),
            "{}",
            probe_chain(&topo, "na")
        );
        let mut probe = topo
            .connect("na", A1.addr(DENIED_PLAINTEXT_PORT))
            .await
            .unwrap();
        echoes(&mut probe, b"probe").await;
        assert_eq!(
            peers_a1.lock().unwrap().last().unwrap().ip(),
            "169.254.7.127".parse::<IpAddr>().unwrap()
        );
        // Refused: the reset may already meet the connect.
        if let Ok(mut refused) = topo.connect(A2.name, A1.addr(DENIED_PLAINTEXT_PORT)).await {
            let ended = until_closed(&mut refused).await;
            assert!(ended.is_err() || ended == Ok(0), "{ended:?}");
        }
        assert_eq!(
            peers_a1.lock().unwrap().len(),
            1,
            "a2's plaintext reached the app"
        );

        // A Service in front of b1 (named target port, resolved by its EndpointSlice): a1's
        // connection to the VIP reaches b1 through the tunnel (nothing else routes the VIP).
        api.apply_service(
            "demo",
            "echo",
            IpAddr::V4(testbed::SERVICE_VIP),
            testbed::SERVICE_PORT,
            "app",
        );
        api.apply_slice(
            "demo",
            "echo",
            "app",
            APP_PORT,
            &[(&uid(&topo, &B1), IpAddr::V4(B1.ip))],
        );
        let vip = SocketAddr::from((testbed::SERVICE_VIP, testbed::SERVICE_PORT));
        eventually(10, || {
            let ns = topo.netns(A1.name).unwrap();
            ns.run(|| std::net::TcpStream::connect_timeout(&vip, std::time::Duration::from_secs(2)))
                .is_ok_and(|mut s| {
                    use std::io::{Read, Write};
                    let mut back = [0u8; 3];
                    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                        .is_ok()
                        && s.write_all(b"vip").is_ok()
                        && s.read_exact(&mut back).is_ok()
                        && &back == b"vip"
                })
        })
        .await;
        assert_eq!(peers_b1.lock().unwrap().last().unwrap().ip(), A1.ip);

        // b1 deleted while a connection to it runs: the connection ends, and b1's listeners,
        // rules and probe rule go.
        let mut live = topo.connect(A1.name, B1.addr(APP_PORT)).await.unwrap();
        echoes(&mut live, b"before the delete").await;
        api.delete_pod("demo", B1.name);
        let ended = within(20, until_closed(&mut live)).await;
        assert!(
            ended.is_err() || ended == Ok(0),
            "the connection outlived its pod: {ended:?}"
        );
        eventually(20, || !serves(&topo, B1.name) && !has_rules(&topo, B1.name)).await;
        eventually(10, || {
            !probe_chain(&topo, "nb").contains(&B1.ip.to_string())
        })
        .await;
        assert!(serves(&topo, B3.name), "b3 is still served");

        // The label removed: rules and listeners go, and a1 → b3 is plain again.
        api.apply_namespace("demo", &[]);
        eventually(30, || {
            [A1, B3]
                .iter()
                .all(|p| !serves(&topo, p.name) && !has_rules(&topo, p.name))
        })
        .await;
        eventually(10, || record(&A1).is_none() && record(&B3).is_none()).await;
        let Seen { clear, .. } =
            transfer_seen(&topo, &A1, &B3, b"hboned-KUBE-unlabelled", 64 * 1024).await;
        assert!(clear, "after the label went, a1 → b3 is plain TCP");
        assert!(!probe_chain(&topo, "na").contains(&A1.ip.to_string()));
    }

    /// How many jumps into our nat OUTPUT chain the pod has (one: no agent added a second).
    fn jumps(topo: &Topology, pod: &str) -> usize {
        nat_chain(topo, pod, "OUTPUT")
            .matches("-j HBONE_OUTPUT")
            .count()
    }

    /// A rolling update with maxSurge 1: a second agent starts on node A beside the first, takes
    /// the same pods (its listeners beside the old ones, the rules left as they are), and the
    /// old one's exit changes nothing: a1's rules stay and its traffic stays TLS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rolling_update_hands_the_pods_over_with_their_rules_in_place() {
        if !can_run() {
            return;
        }
        let bin = bin();
        let (mut topo, api, _processes) = cluster(&[LABEL]);
        let (url_a, url_b) = serve_api(&topo, &api);
        topo.spawn_proxies(
            bin,
            |c| kube_node(c, &url_a, None),
            |c| kube_node(c, &url_b, None),
        )
        .unwrap();
        eventually(30, || {
            [A1, B1, B3]
                .iter()
                .all(|p| serves(&topo, p.name) && has_rules(&topo, p.name))
        })
        .await;
        let (_e1, _) = testbed::spawn_echo(topo.listen(B1.name, APP_PORT).unwrap());

        let new = topo
            .spawn_extra_proxy(bin, 'a', |c| kube_node(c, &url_a, None))
            .unwrap();
        eventually(30, || topo.log(new).contains("pod enrolled")).await;
        assert_eq!(
            jumps(&topo, A1.name),
            1,
            "the second agent duplicated the rules"
        );
        topo.terminate(0).unwrap();
        within(30, async {
            while topo.exited(0).is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            has_rules(&topo, A1.name),
            "the old agent's exit took the rules"
        );
        assert!(serves(&topo, A1.name), "the new agent serves a1");
        assert!(probe_chain(&topo, "na").contains(&A1.ip.to_string()));
        let Seen { clear, hbone } =
            transfer_seen(&topo, &A1, &B1, b"hboned-KUBE-after-rollout", 64 * 1024).await;
        assert!(!clear && hbone, "a1 → b1 left the tunnel after the rollout");
        assert!(!topo.log(0).contains("unenrolled"), "{}", topo.log(0));
    }
}

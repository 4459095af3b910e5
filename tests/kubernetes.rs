//! Kubernetes mode against a fake API server (tests/support/kube_api.rs). Discovery runs in
//! this process on loopback (no root); the two-node tests in network namespaces (root) drive
//! `hboned run` with `kubernetes:` from the same fake: labelling a namespace enrolls its pods
//! and their traffic becomes TLS on the wire, and so on.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::IpAddr;
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
    }
}

fn settings() -> Settings {
    Settings {
        node: "node-a".into(),
        labels: vec![LabelMatch::parse("io.cilium/mtls-enabled=true").unwrap()],
        trust_domain: "cluster.local".into(),
        cluster_id: "c1".into(),
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
    api.apply_pod(&pod("p2", "plain", "node-b", "10.1.0.2"));
    let (state, _running) = discovering(&api).await;

    assert_eq!(protocol(&state, "p1"), Some(Protocol::Hbone));
    assert_eq!(protocol(&state, "p2"), Some(Protocol::Tcp));
    {
        let s = state.read();
        let w = s.workload_by_ip("10.1.0.1".parse().unwrap()).unwrap();
        assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/mesh/sa/app");
        assert_eq!((w.node.as_str(), w.cluster_id.as_str()), ("node-a", "c1"));
    }

    // Labelling a namespace switches its pods to HBONE; unlabelling switches them back.
    api.apply_namespace("plain", &[("team", "x"), LABEL]);
    eventually(10, || protocol(&state, "p2") == Some(Protocol::Hbone)).await;
    api.apply_namespace("mesh", &[]);
    eventually(10, || protocol(&state, "p1") == Some(Protocol::Tcp)).await;

    // A new pod, then its deletion.
    api.apply_pod(&pod("p3", "plain", "node-b", "10.1.0.3"));
    eventually(10, || protocol(&state, "p3") == Some(Protocol::Hbone)).await;
    api.delete_pod("plain", "p3-pod");
    eventually(10, || protocol(&state, "p3").is_none()).await;
    assert!(state.read().workload_by_ip("10.1.0.3".parse::<IpAddr>().unwrap()).is_none());
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
    assert!(protocol(&state, "p1").is_some(), "the relist kept what is still there");

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

/// The fake refuses what kube-apiserver refuses, so a wrong selector in hboned would show.
#[tokio::test]
async fn the_fake_api_server_refuses_what_the_real_one_does() {
    let api = FakeApi::new();
    let url = api.serve_loopback();
    let get = |path: &str| {
        let url = format!("{url}{path}");
        async move {
            let addr = url.trim_start_matches("http://").split('/').next().unwrap().to_owned();
            let path = &url[7 + addr.len()..];
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let bad = get("/api/v1/pods?fieldSelector=spec.nodeNames%3Dx").await;
    assert!(bad.starts_with("HTTP/1.1 400") && bad.contains("field label not supported"), "{bad}");
    assert!(get("/api/v1/services").await.starts_with("HTTP/1.1 404"));
    api.apply_pod(&pod("p1", "mesh", "node-a", "10.4.0.1"));
    let list = get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a").await;
    assert!(list.contains("\"kind\":\"PodList\"") && list.contains("p1-pod"), "{list}");
    assert!(!list.contains("\"kind\":\"Pod\""), "list items carry no kind: {list}");
    let other = get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-b").await;
    assert!(!other.contains("p1-pod"));
}

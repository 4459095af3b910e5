//! The agent's CNI endpoint (`hboned::agent::cni::Endpoint`) against the fake API server, asked
//! as `hboned-cni` asks it (`hboned::cni::ask` on its Unix socket), the enroller played by the
//! test: which ADDs become enrollments, and that every doubt fails the ADD rather than letting
//! a pod of an opted-in namespace start uncaptured. Loopback only; no root.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use hboned::agent::cni::Endpoint;
use hboned::cni::{Command, Reply, Request, ask};
use hboned::kube::LabelMatch;
use hboned::kube::enroll::CniCall;
use support::kube_api::{FakeApi, PodDef};

fn pod(name: &str, namespace: &str) -> PodDef {
    PodDef {
        uid: format!("uid-{name}"),
        name: name.into(),
        namespace: namespace.into(),
        node: "node-a".into(),
        service_account: "app".into(),
        // The kubelet has not reported addresses yet at ADD time.
        ips: Vec::new(),
        enrolled: false,
    }
}

fn request(command: Command, p: &PodDef, ips: &[&str]) -> Request {
    Request {
        command,
        container_id: "c0ffee".into(),
        netns: "/var/run/netns/cni-1".into(),
        pod_namespace: p.namespace.clone(),
        pod_name: p.name.clone(),
        pod_uid: Some(p.uid.clone()),
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_enrolls_what_the_api_server_opts_in_and_fails_closed_otherwise() {
    let api = FakeApi::new();
    api.apply_namespace("demo", &[("io.cilium/mtls-enabled", "true")]);
    api.apply_namespace("plain", &[]);
    for p in [pod("web", "demo"), pod("db", "plain"), pod("out", "demo")] {
        api.apply_pod(&p);
    }
    api.patch_pod(
        "demo",
        "out",
        serde_json::json!({"metadata": {"labels": {"hboned.io/dataplane-mode": "none"}}}),
    );
    let client = hboned::kube::client(&hboned::config::KubernetesConfig {
        api_server: Some(api.serve_loopback()),
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let (calls_tx, mut calls) = tokio::sync::mpsc::channel(8);
    let (proxy_tx, proxy) = tokio::sync::watch::channel(true);
    let endpoint = Endpoint {
        client,
        labels: vec![LabelMatch::parse("io.cilium/mtls-enabled=true").unwrap()],
        calls: calls_tx,
        proxy,
    };
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let _serving = tokio::spawn(endpoint.serve(listener));
    // The enroller: says yes, and tells the test what it was asked.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(call) = calls.recv().await {
            let reply = match call {
                CniCall::Enroll {
                    uid, pod, reply, ..
                } => {
                    let _ = seen_tx.send(format!("enroll {uid} {:?}", pod.ips));
                    reply
                }
                CniCall::Release { name, reply, .. } => {
                    let _ = seen_tx.send(format!("release {name}"));
                    reply
                }
                CniCall::Check { name, reply, .. } => {
                    let _ = seen_tx.send(format!("check {name}"));
                    reply
                }
            };
            let _ = reply.send(Ok(()));
        }
    });
    let call = |r: Request| {
        let socket = socket.clone();
        async move {
            tokio::task::spawn_blocking(move || ask(&socket, &r, Duration::from_secs(20)))
                .await
                .unwrap()
                .unwrap()
        }
    };
    let web = pod("web", "demo");

    // An opted-in pod: enrolled, with the CNI's addresses (sorted).
    let reply = call(request(Command::Add, &web, &["fd00::7", "10.1.0.7"])).await;
    assert_eq!(reply, Reply::default());
    assert_eq!(
        seen.recv().await.unwrap(),
        "enroll uid-web [10.1.0.7, fd00::7]"
    );
    // Not opted in, or opted out: nothing to do, the ADD passes.
    assert_eq!(
        call(request(Command::Add, &pod("db", "plain"), &["10.1.0.8"])).await,
        Reply::default()
    );
    assert_eq!(
        call(request(Command::Add, &pod("out", "demo"), &["10.1.0.9"])).await,
        Reply::default()
    );
    // DEL and CHECK reach the enroller.
    call(request(Command::Del, &web, &[])).await;
    assert_eq!(seen.recv().await.unwrap(), "release web");
    call(request(Command::Check, &web, &["10.1.0.7"])).await;
    assert_eq!(seen.recv().await.unwrap(), "check web");

    // Every doubt fails the ADD.
    let refused = |r: Reply, want: &str| {
        let e = r.error.unwrap_or_default();
        assert!(e.contains(want), "{e:?} does not say {want:?}");
    };
    refused(
        call(request(Command::Add, &web, &[])).await,
        "names no address",
    );
    let mut stale = request(Command::Add, &web, &["10.1.0.7"]);
    stale.pod_uid = Some("uid-of-an-earlier-web".into());
    refused(call(stale).await, "deleted and created again");
    refused(
        call(request(Command::Add, &pod("ghost", "demo"), &["10.1.0.10"])).await,
        "cannot read pod demo/ghost",
    );
    proxy_tx.send_replace(false);
    refused(
        call(request(Command::Add, &web, &["10.1.0.7"])).await,
        "no proxy is connected",
    );
    proxy_tx.send_replace(true);
    // The API server away (kube's client retries a 503 until the endpoint's 10 s are over).
    api.set_unavailable(true);
    refused(
        call(request(Command::Add, &web, &["10.1.0.7"])).await,
        "pod demo/web",
    );
    api.set_unavailable(false);
    // Nothing else reached the enroller.
    assert!(seen.try_recv().is_err());
}

//! Kubernetes mode's watch path: a fake API server (a child process: its memory and work are
//! not counted) holds N pods (100,000 by default, `HBONED_KUBE_PODS` to change) in 1,000
//! namespaces, half of them opted in, each filled out as real pods are (two containers with
//! environment, probes and mounts, volumes, tolerations, managed fields, container statuses:
//! 8–15 KiB of JSON); hboned's discovery, in this process, lists them all (pages of 500, as
//! kube-rs asks), then follows a stream of pod updates. Reports the time to list and apply, pod
//! events per second on the watch, the bytes the API server sent, the memory hboned keeps per
//! pod (live heap bytes counted by this binary's allocator after the sync minus before it) and
//! this process's peak RSS. Run: `cargo bench --bench kube_watch`. Not a criterion bench: one
//! long pass, bytes and rates.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hboned::kube::{LabelMatch, Settings};
use hboned::state::{SharedState, State};

// The fake is test code: it unwraps freely.
#[allow(dead_code, clippy::unwrap_used)]
#[path = "../tests/support/kube_api.rs"]
mod kube_api;
use kube_api::PodDef;

#[path = "support/counting.rs"]
mod counting;
use counting::LIVE;

fn pod(i: usize) -> PodDef {
    PodDef {
        uid: format!("{:08x}-0000-4000-8000-{:012x}", i / 65_536, i),
        name: format!("app-{i}"),
        namespace: format!("ns{}", i % 1000),
        node: format!("node-{}", i % 500),
        service_account: format!("sa{}", i % 50),
        ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            0x0a00_0000 + i as u32,
        ))],
        enrolled: i.is_multiple_of(2),
    }
}

/// What a pod of a Deployment carries besides what [`PodDef`] gives it; `i` varies its size.
fn realistic(i: usize) -> serde_json::Value {
    use serde_json::json;
    let hash = format!("{:010x}", i.wrapping_mul(2_654_435_761) & 0xff_ffff_ffff);
    let env = |container: &str| -> Vec<serde_json::Value> {
        (0..10 + (i % 8) * 4)
            .map(|k| {
                if k % 3 == 0 {
                    json!({"name": format!("{}_SECRET_{k}", container.to_uppercase()),
                        "valueFrom": {"secretKeyRef": {"name": format!("app-{i}-secrets"), "key": format!("key-{k}")}}})
                } else {
                    json!({"name": format!("{}_SETTING_{k}", container.to_uppercase()),
                        "value": format!("https://service-{k}.ns{}.svc.cluster.local:8080/v1/path", i % 1000)})
                }
            })
            .collect()
    };
    let container = |name: &str, port: u16| {
        json!({
            "name": name,
            "image": format!("registry.example.com/team/{name}:1.4.{}", i % 30),
            "imagePullPolicy": "IfNotPresent",
            "command": ["/usr/local/bin/server"],
            "args": ["--config=/etc/app/config.yaml", "--log-level=info", format!("--port={port}")],
            "env": env(name),
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"},
                      {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": port, "scheme": "HTTP"},
                "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": port, "scheme": "HTTP"},
                "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/app", "readOnly": true},
                {"name": "data", "mountPath": "/var/lib/app"},
                {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                "runAsNonRoot": true, "runAsUser": 10001, "capabilities": {"drop": ["ALL"]}},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File"
        })
    };
    let status = |name: &str| {
        json!({"name": name, "ready": true, "restartCount": i % 3, "started": true,
            "image": format!("registry.example.com/team/{name}:1.4.{}", i % 30),
            "imageID": format!("registry.example.com/team/{name}@sha256:{hash}{hash}{hash}{hash}{hash}{hash}abcd"),
            "containerID": format!("containerd://{hash}{hash}{hash}{hash}{hash}{hash}abcd"),
            "state": {"running": {"startedAt": "2026-11-30T10:00:00Z"}},
            "lastState": {}})
    };
    json!({
        "metadata": {
            "generateName": format!("app-{i}-{hash}-"),
            "creationTimestamp": "2026-11-30T09:59:58Z",
            "labels": {"app": format!("app-{i}"), "pod-template-hash": hash,
                "app.kubernetes.io/name": format!("app-{}", i % 400), "app.kubernetes.io/version": "1.4.2",
                "app.kubernetes.io/part-of": "shop", "team": "payments", "tier": "backend"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                "kubectl.kubernetes.io/restartedAt": "2026-11-30T09:59:00Z",
                "checksum/config": format!("{hash}{hash}{hash}{hash}{hash}{hash}abcd")},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{i}-{hash}"),
                "uid": format!("{:08x}-1111-4000-8000-{:012x}", i / 65_536, i), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-11-30T09:59:58Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
                    "f:ownerReferences": {".": {}, "k:{\"uid\":\"x\"}": {}}},
                    "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:args": {}, "f:command": {}, "f:env": {".": {}},
                        "f:image": {}, "f:imagePullPolicy": {}, "f:livenessProbe": {".": {}, "f:httpGet": {".": {}, "f:path": {}, "f:port": {}}},
                        "f:name": {}, "f:ports": {".": {}}, "f:readinessProbe": {".": {}}, "f:resources": {".": {}, "f:limits": {}, "f:requests": {}},
                        "f:securityContext": {".": {}}, "f:volumeMounts": {".": {}}}},
                        "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {},
                        "f:securityContext": {}, "f:serviceAccountName": {}, "f:terminationGracePeriodSeconds": {}, "f:volumes": {".": {}}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                 "time": "2026-11-30T10:00:03Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"ContainersReady\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                    "k:{\"type\":\"Initialized\"}": {".": {}, "f:status": {}, "f:type": {}},
                    "k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}, "f:type": {}}},
                    "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {".": {}}, "f:startTime": {}}}}
            ]
        },
        "spec": {
            "containers": [container("app", 8080), container("sidecar", 8081)],
            "volumes": [
                {"name": "config", "configMap": {"name": format!("app-{i}-config"), "defaultMode": 420}},
                {"name": "data", "emptyDir": {}},
                {"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler", "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0, "securityContext": {"fsGroup": 10001},
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "hostIP": format!("10.128.{}.{}", (i % 500) / 250, i % 250),
            "qosClass": "Burstable", "startTime": "2026-11-30T09:59:58Z",
            "containerStatuses": [status("app"), status("sidecar")]
        }
    })
}

/// This process's peak and current resident set (VmHWM, VmRSS), in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Bytes a process has written (its `/proc/PID/io` wchar): the fake's answers.
fn written(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn pods() -> usize {
    std::env::var("HBONED_KUBE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn main() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    };
    if std::env::var_os("HBONED_KUBE_FAKE").is_some() {
        runtime().block_on(serve_fake(pods()));
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    hboned::tls::install_process_default();
    runtime().block_on(run(pods()));
}

/// The child: an API server for this bench alone, lean enough for 100,000 whole pods (each
/// kept as its JSON bytes; tests/support/kube_api.rs keeps JSON values and a change history,
/// many times that). It answers what discovery asks, as kube-apiserver does: Namespaces and
/// Pods listed in pages (`limit`, `continue`), `fieldSelector=spec.nodeName=` on Pods, and
/// watches that stay open and carry the updates it is told to make (`update M` on stdin,
/// answered `done`). Prints its URL and the mean pod size first.
// Bench-only server: a failure here is a broken bench, said at once.
#[allow(clippy::unwrap_used)]
async fn serve_fake(n: usize) {
    use std::io::{BufRead, Write};
    let mut pods: Vec<(String, Vec<u8>)> = Vec::with_capacity(n);
    let mut bytes = 0usize;
    for i in 0..n {
        let p = pod(i);
        let json = pod_json(&p, i);
        bytes += json.len();
        pods.push((p.node.clone(), json));
    }
    let namespaces: Vec<Vec<u8>> = (0..1000)
        .map(|ns| {
            let labels = if ns % 2 == 0 {
                serde_json::json!({"kubernetes.io/metadata.name": format!("ns{ns}"), "io.cilium/mtls-enabled": "true"})
            } else {
                serde_json::json!({"kubernetes.io/metadata.name": format!("ns{ns}")})
            };
            serde_json::to_vec(&serde_json::json!({"metadata": {"name": format!("ns{ns}"),
                "uid": format!("ns-{ns}"), "resourceVersion": "1", "labels": labels}}))
            .unwrap()
        })
        .collect();
    let fake = Arc::new(Lean {
        pods,
        namespaces,
        watchers: std::sync::Mutex::new(Vec::new()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!(
        "http://{} {}",
        listener.local_addr().unwrap(),
        bytes / n.max(1)
    );
    std::io::stdout().flush().unwrap();
    let server = fake.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let fake = server.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let fake = fake.clone();
                    async move { Ok::<_, std::convert::Infallible>(fake.answer(&req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let lines = tokio::task::spawn_blocking(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { return };
            if let Some(m) = line.strip_prefix("update ") {
                let m: usize = m.parse().unwrap();
                for i in 0..m {
                    let mut p = pod(i);
                    p.ips = vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                        0x0b00_0000 + i as u32,
                    ))];
                    let mut event = br#"{"type":"MODIFIED","object":"#.to_vec();
                    event.extend(pod_json(&p, i));
                    event.extend(b"}\n");
                    fake.send(&p.node, bytes::Bytes::from(event));
                }
                println!("done");
                std::io::stdout().flush().unwrap();
            }
        }
    });
    let _ = lines.await;
}

/// One pod as the API server sends it: [`PodDef`]'s object filled out by [`realistic`].
// Bench-only server: a failure here is a broken bench, said at once.
#[allow(clippy::unwrap_used)]
fn pod_json(p: &PodDef, i: usize) -> Vec<u8> {
    let mut object = serde_json::to_value(p.object()).unwrap();
    kube_api_merge(&mut object, &realistic(i));
    object["metadata"]["resourceVersion"] = serde_json::json!("1");
    serde_json::to_vec(&object).unwrap()
}

/// The lean fake's objects and open watches (a pod watch's node filter, its sender).
struct Lean {
    pods: Vec<(String, Vec<u8>)>,
    namespaces: Vec<Vec<u8>>,
    watchers: std::sync::Mutex<
        Vec<(
            Option<String>,
            tokio::sync::mpsc::UnboundedSender<bytes::Bytes>,
        )>,
    >,
}

// Bench-only server: a failure here is a broken bench, said at once.
#[allow(clippy::unwrap_used)]
impl Lean {
    fn send(&self, node: &str, event: bytes::Bytes) {
        let watchers = self.watchers.lock().unwrap();
        for (filter, tx) in watchers.iter() {
            if filter.as_deref().is_none_or(|f| f == node) {
                let _ = tx.send(event.clone());
            }
        }
    }

    fn answer(
        &self,
        req: &hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>>
    {
        use http_body_util::BodyExt;
        let query: std::collections::BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%2F", "/")))
            .collect();
        let node = query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName="))
            .map(str::to_owned);
        let is_pods = req.uri().path() == "/api/v1/pods";
        if query.get("watch").is_some_and(|w| w == "true") {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
            if is_pods {
                self.watchers.lock().unwrap().push((node, tx));
            } else {
                // Namespaces do not change here; the watch stays open.
                std::mem::forget(tx);
            }
            let stream = futures_util::StreamExt::map(
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                |b| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)),
            );
            let body = http_body_util::StreamBody::new(stream).boxed();
            let mut resp = hyper::Response::new(body);
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            return resp;
        }
        let items: Vec<&[u8]> = if is_pods {
            self.pods
                .iter()
                .filter(|(n, _)| node.as_deref().is_none_or(|f| f == n))
                .map(|(_, b)| b.as_slice())
                .collect()
        } else {
            self.namespaces.iter().map(Vec::as_slice).collect()
        };
        let offset: usize = query
            .get("continue")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let page: Vec<&[u8]> = items.iter().skip(offset).take(limit).copied().collect();
        let more = offset + page.len() < items.len();
        let kind = if is_pods { "PodList" } else { "NamespaceList" };
        let mut out =
            format!(r#"{{"kind":"{kind}","apiVersion":"v1","metadata":{{"resourceVersion":"1""#);
        if more {
            out.push_str(&format!(r#","continue":"{}""#, offset + page.len()));
        }
        out.push_str(r#"},"items":["#);
        let mut body = out.into_bytes();
        for (k, item) in page.iter().enumerate() {
            if k > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(b"]}");
        let mut resp =
            hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)).boxed());
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        resp
    }
}

/// A merge patch, to size the objects as the fake holds them.
fn kube_api_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                kube_api_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn run(n: usize) {
    use std::io::{BufRead, Write};
    let exe = std::env::current_exe().expect("this bench's path");
    let mut child = std::process::Command::new(exe)
        .env("HBONED_KUBE_FAKE", "1")
        .env("HBONED_KUBE_PODS", n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the fake API server");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut input = child.stdin.take().expect("stdin");
    let mut line = String::new();
    out.read_line(&mut line).expect("the fake's URL");
    let mut words = line.split_whitespace();
    let url = words.next().expect("URL").to_owned();
    let mean_size: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);

    let state = Arc::new(SharedState::new(State::default()));
    let client = hboned::kube::client(&hboned::config::KubernetesConfig {
        api_server: Some(url),
        ..Default::default()
    })
    .expect("client");
    let settings = Settings {
        node: "node-0".into(),
        labels: vec![LabelMatch::parse("io.cilium/mtls-enabled=true").expect("label")],
        trust_domain: "cluster.local".into(),
        cluster_id: "bench".into(),
        services: false,
        cluster_domain: "cluster.local".into(),
    };
    let (peak_before, _) = rss();
    let sent_before = written(child.id());
    let before = LIVE.load(Ordering::Relaxed);
    let (tx, mut synced) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let running = hboned::kube::discover(client, settings, state.clone(), tx);
    synced.wait_for(|s| *s).await.expect("synced");
    let listed = started.elapsed();
    let sent = written(child.id()) - sent_before;
    assert_eq!(
        state.read().workloads().count(),
        n,
        "every pod is a workload"
    );
    // Let the client's buffers go before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = LIVE.load(Ordering::Relaxed) - before;
    let (peak, resident) = rss();

    // Updates: each pod of the first M gets a new address; done when the last one shows.
    let m = (n / 5).max(1);
    let started = Instant::now();
    writeln!(input, "update {m}").expect("to the fake");
    let last = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + (m - 1) as u32));
    while state.read().workload_by_ip(last).is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let updated = started.elapsed();
    running.stop();
    drop(input);
    let _ = child.wait();

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "Kubernetes watch path, {n} pods in 1,000 namespaces (half opted in), {:.1} KiB of JSON each",
        mean_size as f64 / 1024.0
    );
    println!("| measure | value |\n|---|---|");
    println!(
        "| initial list + apply (pages of 500) | {:.2} s ({:.0} pods/s) |",
        listed.as_secs_f64(),
        n as f64 / listed.as_secs_f64()
    );
    println!(
        "| bytes received from the API server for it | {:.0} MiB |",
        mib(sent)
    );
    println!(
        "| watch updates applied (the fake re-encodes each) | {m} in {:.2} s ({:.0} events/s) |",
        updated.as_secs_f64(),
        m as f64 / updated.as_secs_f64()
    );
    println!(
        "| memory kept per pod (workload, indexes, agent's map) | {:.0} B |",
        kept as f64 / n as f64
    );
    println!(
        "| peak RSS of the watching process (before the sync: {:.0} MiB) | {:.0} MiB; {:.0} MiB after |",
        mib(peak_before),
        mib(peak),
        mib(resident)
    );
}

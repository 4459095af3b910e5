//! A fake Kubernetes API server for Kubernetes mode: Namespaces and Pods over list and watch
//! with real JSON (k8s-openapi types), as kube-apiserver serves them
//! (k8s.io/apiserver pkg/endpoints/handlers and pkg/storage/cacher):
//! - one resource version counter for every object; lists carry it in `metadata` and their
//!   items carry no `kind`/`apiVersion`; `limit` pages with an opaque `continue` token that
//!   keeps the first page's resource version;
//! - a watch from `resourceVersion=N` replays the events after N, then streams new ones, one
//!   JSON object per line (`ADDED`/`MODIFIED`/`DELETED` with the whole object);
//! - a watch from a version older than the kept history gets HTTP 200 and one `ERROR` event
//!   with a 410 Status ("too old resource version", reason Expired), then the stream ends
//!   (cacher.go's newErrWatcher);
//! - `allowWatchBookmarks=true` watches get `BOOKMARK` events (only `kind`, `apiVersion` and
//!   `metadata.resourceVersion`) when the test asks, and before a watch ends at its timeout;
//! - field selectors: Pods by `spec.nodeName` (an object that stops or starts matching arrives
//!   as `DELETED`/`ADDED`); any other field label is 400 "field label not supported";
//! - `PATCH /api/v1/namespaces/{ns}/pods/{name}` with `application/merge-patch+json` applies an
//!   RFC 7386 merge patch (a `null` removes a key), bumps the version and answers the object;
//!   a missing pod is 404, another content type 415 (pkg/endpoints/handlers/patch.go);
//! - `GET /api/v1/namespaces/{name}` and `GET /api/v1/namespaces/{ns}/pods/{name}` answer the
//!   one object with its `kind` and `apiVersion`, or 404 NotFound with the message
//!   `<resource> "<name>" not found` (pkg/endpoints/handlers/get.go, storage's NewNotFound);
//! - `POST /apis/events.k8s.io/v1/namespaces/{ns}/events` creates an Event: 201 with the object,
//!   a `metadata.name` taken is 409 AlreadyExists, an object whose `metadata.namespace` is not
//!   the path's is 400 (pkg/endpoints/handlers/create.go);
//! - unknown paths are 404 with a Status body.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodCondition, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

/// A pod as the test describes it.
#[derive(Debug, Clone)]
pub(crate) struct PodDef {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// Its node's agent recorded it enrolled (hboned.io/redirection: enabled), as a node
    /// outside the test would have.
    pub enrolled: bool,
}

impl PodDef {
    /// The Pod object: running, ready, with its addresses.
    pub(crate) fn object(&self) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                uid: Some(self.uid.clone()),
                labels: Some(BTreeMap::from([("app".into(), self.name.clone())])),
                annotations: self
                    .enrolled
                    .then(|| BTreeMap::from([("hboned.io/redirection".into(), "enabled".into())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(self.node.clone()).filter(|n| !n.is_empty()),
                service_account_name: Some(self.service_account.clone()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: self.ips.first().map(|ip| ip.to_string()),
                pod_ips: Some(
                    self.ips
                        .iter()
                        .map(|ip| PodIP { ip: ip.to_string() })
                        .collect(),
                ),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }
}

/// The resources served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Namespaces,
        Kind::Pods,
        Kind::Services,
        Kind::EndpointSlices,
    ];

    fn path(self) -> &'static str {
        match self {
            Kind::Namespaces => "/api/v1/namespaces",
            Kind::Pods => "/api/v1/pods",
            Kind::Services => "/api/v1/services",
            Kind::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Kind::Namespaces => "Namespace",
            Kind::Pods => "Pod",
            Kind::Services => "Service",
            Kind::EndpointSlices => "EndpointSlice",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// A change: its version, kind, the object before (if any) and after (`None`: deleted).
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    before: Option<Value>,
    after: Option<Value>,
}

struct Watcher {
    kind: Kind,
    node: Option<String>,
    bookmarks: bool,
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<Change>,
    /// Watches from a version below this get 410.
    oldest: u64,
    watchers: Vec<Watcher>,
    /// Every request's path and query, in order.
    requests: Vec<String>,
    /// The longest a watch stays open (a real server's `--min-request-timeout` jitter).
    max_watch: Option<Duration>,
    /// Every request answered 503 (an API server that is down behind its load balancer).
    unavailable: bool,
    /// Events created (events.k8s.io/v1), in order.
    events: Vec<Value>,
}

/// The fake API server; cheap to clone, shared by every listener.
#[derive(Clone)]
pub(crate) struct FakeApi {
    store: Arc<Mutex<Store>>,
}

impl FakeApi {
    pub(crate) fn new() -> FakeApi {
        FakeApi {
            store: Arc::new(Mutex::new(Store {
                rv: 100,
                oldest: 0,
                ..Store::default()
            })),
        }
    }

    /// Serves on `listener` (non-blocking, bound wherever the proxy can reach it); returns its
    /// `http://` URL.
    pub(crate) fn serve(&self, listener: std::net::TcpListener) -> String {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let api = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let api = api.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move {
                            if req.method() == hyper::Method::PATCH {
                                return Ok::<_, Infallible>(api.patch(req).await);
                            }
                            if req.method() == hyper::Method::POST {
                                return Ok::<_, Infallible>(api.create_event(req).await);
                            }
                            Ok::<_, Infallible>(api.handle(req))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        url
    }

    /// On 127.0.0.1 of this process.
    pub(crate) fn serve_loopback(&self) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        self.serve(l)
    }

    /// While set, every request is answered 503 ServiceUnavailable and open watches end.
    pub(crate) fn set_unavailable(&self, down: bool) {
        let mut s = self.store.lock().unwrap();
        s.unavailable = down;
        if down {
            s.watchers.clear();
        }
    }

    /// Watches end after at most `d` (each then ends with a bookmark, if asked for).
    pub(crate) fn set_max_watch(&self, d: Duration) {
        self.store.lock().unwrap().max_watch = Some(d);
    }

    pub(crate) fn apply_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("ns-{name}")),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        self.put(
            Kind::Namespaces,
            name.into(),
            Some(serde_json::to_value(ns).unwrap()),
        );
    }

    /// Creates or replaces a pod's spec and status (as its controller and kubelet do); the
    /// annotations it already carries stay.
    pub(crate) fn apply_pod(&self, pod: &PodDef) {
        let key = format!("{}/{}", pod.namespace, pod.name);
        let mut object = serde_json::to_value(pod.object()).unwrap();
        let mut s = self.store.lock().unwrap();
        if let Some(annotations) = s
            .objects
            .get(&(Kind::Pods, key.clone()))
            .and_then(|o| o["metadata"].get("annotations").cloned())
        {
            object["metadata"]["annotations"] = annotations;
        }
        put_locked(&mut s, Kind::Pods, key, Some(object));
    }

    /// Applies a merge patch to pod `namespace/name`, as another client of the API would.
    pub(crate) fn patch_pod(&self, namespace: &str, name: &str, patch: Value) {
        let key = format!("{namespace}/{name}");
        let mut s = self.store.lock().unwrap();
        let mut object = s.objects[&(Kind::Pods, key.clone())].clone();
        merge_patch(&mut object, &patch);
        put_locked(&mut s, Kind::Pods, key, Some(object));
    }

    /// The annotation `key` of pod `namespace/name`, if set.
    pub(crate) fn pod_annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        let s = self.store.lock().unwrap();
        s.objects
            .get(&(Kind::Pods, format!("{namespace}/{name}")))?["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_owned)
    }

    /// A ClusterIP Service with one TCP port whose target port is named `target`.
    pub(crate) fn apply_service(
        &self,
        namespace: &str,
        name: &str,
        vip: IpAddr,
        port: u16,
        target: &str,
    ) {
        use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let svc = Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                uid: Some(format!("svc-{namespace}-{name}")),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(vip.to_string()),
                cluster_ips: Some(vec![vip.to_string()]),
                ports: Some(vec![ServicePort {
                    name: Some(target.into()),
                    port: i32::from(port),
                    target_port: Some(IntOrString::String(target.into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let key = format!("{namespace}/{name}");
        self.put(
            Kind::Services,
            key,
            Some(serde_json::to_value(svc).unwrap()),
        );
    }

    /// The EndpointSlice the control plane would write for `service`: its pods (uid, IP) on
    /// port `port` named `port_name`.
    pub(crate) fn apply_slice(
        &self,
        namespace: &str,
        service: &str,
        port_name: &str,
        port: u16,
        pods: &[(&str, IpAddr)],
    ) {
        use k8s_openapi::api::core::v1::ObjectReference;
        use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-x1")),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".into(),
                    service.into(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some(port_name.into()),
                port: Some(i32::from(port)),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
            endpoints: pods
                .iter()
                .map(|(uid, ip)| Endpoint {
                    addresses: vec![ip.to_string()],
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        namespace: Some(namespace.into()),
                        uid: Some((*uid).into()),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        };
        let key = format!("{namespace}/{service}-x1");
        self.put(
            Kind::EndpointSlices,
            key,
            Some(serde_json::to_value(slice).unwrap()),
        );
    }

    pub(crate) fn delete_pod(&self, namespace: &str, name: &str) {
        self.put(Kind::Pods, format!("{namespace}/{name}"), None);
    }

    /// Forgets the history up to now (etcd compaction): a watch resuming from an older
    /// version than the current one gets 410 Gone.
    pub(crate) fn compact(&self) {
        let mut s = self.store.lock().unwrap();
        s.oldest = s.rv;
        s.history.clear();
    }

    /// An API server restart that the watches did not see through: every open watch ends,
    /// `pods` change meanwhile, and the history is compacted; watches resuming from where
    /// they were get 410 Gone and must list again to learn of `pods`.
    pub(crate) fn restart_compacted(&self, pods: &[PodDef]) {
        let mut s = self.store.lock().unwrap();
        s.watchers.clear();
        for pod in pods {
            let key = format!("{}/{}", pod.namespace, pod.name);
            put_locked(
                &mut s,
                Kind::Pods,
                key,
                Some(serde_json::to_value(pod.object()).unwrap()),
            );
        }
        s.oldest = s.rv;
        s.history.clear();
    }

    /// Ends every open watch; clients resume from their last version.
    pub(crate) fn end_watches(&self) {
        self.store.lock().unwrap().watchers.clear();
    }

    /// Sends a bookmark with the current version to every watch that asked for them.
    pub(crate) fn bookmark(&self) {
        let mut s = self.store.lock().unwrap();
        let rv = s.rv;
        s.watchers
            .retain(|w| !w.bookmarks || w.tx.try_send(Ok(line(&bookmark(w.kind, rv)))).is_ok());
    }

    /// The requests so far (`path?query`).
    pub(crate) fn requests(&self) -> Vec<String> {
        self.store.lock().unwrap().requests.clone()
    }

    /// How many list (non-watch) requests were made for `path`.
    pub(crate) fn lists_of(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.split('?').next() == Some(path) && !r.contains("watch=true"))
            .count()
    }

    fn put(&self, kind: Kind, key: String, object: Option<Value>) {
        put_locked(&mut self.store.lock().unwrap(), kind, key, object);
    }

    /// The Events created so far.
    pub(crate) fn events(&self) -> Vec<Value> {
        self.store.lock().unwrap().events.clone()
    }

    /// A POST: only Events are created here.
    async fn create_event(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Body> {
        let path = req.uri().path().to_owned();
        self.store
            .lock()
            .unwrap()
            .requests
            .push(format!("POST {path}"));
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"] = parts.as_slice() else {
            return status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            );
        };
        let ns = (*ns).to_owned();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(400, "BadRequest", "cannot read the body"),
        };
        let Ok(mut event) = serde_json::from_slice::<Value>(&body) else {
            return status(400, "BadRequest", "the body is not JSON");
        };
        if let Some(other) = event["metadata"]["namespace"].as_str()
            && other != ns
        {
            return status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
        let mut s = self.store.lock().unwrap();
        let name = event["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if s.events.iter().any(|e| {
            e["metadata"]["name"] == name.as_str() && e["metadata"]["namespace"] == ns.as_str()
        }) {
            return status(
                409,
                "AlreadyExists",
                &format!("events.events.k8s.io \"{name}\" already exists"),
            );
        }
        s.rv += 1;
        event["metadata"]["namespace"] = json!(ns);
        event["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.events.push(event.clone());
        respond(201, serde_json::to_vec(&event).unwrap())
    }

    /// A merge patch of one pod.
    async fn patch(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
        let path = req.uri().path().to_owned();
        self.store
            .lock()
            .unwrap()
            .requests
            .push(format!("PATCH {path}"));
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let ["api", "v1", "namespaces", ns, "pods", name] = parts.as_slice() else {
            return status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            );
        };
        let merge = req
            .headers()
            .get("content-type")
            .is_some_and(|c| c.as_bytes().starts_with(b"application/merge-patch+json"));
        if !merge {
            return status(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format",
            );
        }
        let key = format!("{ns}/{name}");
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(400, "BadRequest", "cannot read the body"),
        };
        let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
            return status(400, "BadRequest", "the patch is not JSON");
        };
        let mut s = self.store.lock().unwrap();
        let Some(mut object) = s.objects.get(&(Kind::Pods, key.clone())).cloned() else {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        };
        merge_patch(&mut object, &patch);
        put_locked(&mut s, Kind::Pods, key.clone(), Some(object));
        let mut answer = s.objects[&(Kind::Pods, key)].clone();
        answer["kind"] = json!("Pod");
        answer["apiVersion"] = json!("v1");
        respond(200, serde_json::to_vec(&answer).unwrap())
    }

    fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
        let path = req.uri().path().to_owned();
        let query: BTreeMap<String, String> = req.uri().query().map(url_pairs).unwrap_or_default();
        self.store.lock().unwrap().requests.push(format!(
            "{path}{}",
            req.uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        ));
        if self.store.lock().unwrap().unavailable {
            return status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            );
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let one = match parts.as_slice() {
            ["api", "v1", "namespaces", name] => {
                Some((Kind::Namespaces, (*name).to_owned(), "namespaces", *name))
            }
            ["api", "v1", "namespaces", ns, "pods", name] => {
                Some((Kind::Pods, format!("{ns}/{name}"), "pods", *name))
            }
            _ => None,
        };
        if let Some((kind, key, resource, name)) = one {
            let s = self.store.lock().unwrap();
            return match s.objects.get(&(kind, key)) {
                Some(object) => {
                    let mut object = object.clone();
                    object["kind"] = json!(kind.kind());
                    object["apiVersion"] = json!(kind.api_version());
                    respond(200, serde_json::to_vec(&object).unwrap())
                }
                None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
            };
        }
        let kind = match Kind::ALL.into_iter().find(|k| k.path() == path) {
            Some(kind) => kind,
            None => {
                return status(
                    404,
                    "NotFound",
                    &format!("the server could not find the requested resource ({path})"),
                );
            }
        };
        let node = match query.get("fieldSelector").map(String::as_str) {
            None | Some("") => None,
            Some(sel) => match (kind, sel.strip_prefix("spec.nodeName=")) {
                (Kind::Pods, Some(node)) => Some(node.to_owned()),
                _ => {
                    let field = sel.split(['=', '!']).next().unwrap_or(sel);
                    return status(
                        400,
                        "BadRequest",
                        &format!("field label not supported: {field}"),
                    );
                }
            },
        };
        if query.get("watch").map(String::as_str) == Some("true") {
            self.watch(kind, node, &query)
        } else {
            self.list(kind, node.as_deref(), &query)
        }
    }

    fn list(
        &self,
        kind: Kind,
        node: Option<&str>,
        query: &BTreeMap<String, String>,
    ) -> hyper::Response<Body> {
        let s = self.store.lock().unwrap();
        let (rv, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => match token
                .split_once(':')
                .and_then(|(r, o)| Some((r.parse().ok()?, o.parse().ok()?)))
            {
                Some(t) => t,
                None => return status(400, "BadRequest", "continue key is not valid"),
            },
            None => (s.rv, 0usize),
        };
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, _), o)| *k == kind && matches(o, node))
            .skip(offset)
            .take(limit.saturating_add(1))
            .map(|(_, o)| {
                let mut o = o.clone();
                let map = o.as_object_mut().unwrap();
                map.remove("kind");
                map.remove("apiVersion");
                o
            })
            .collect();
        let more = items.len() > limit;
        let items: Vec<Value> = items.into_iter().take(limit).collect();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if more {
            metadata["continue"] = json!(format!("{rv}:{}", offset + limit));
        }
        let body = json!({"kind": format!("{}List", kind.kind()), "apiVersion": kind.api_version(), "metadata": metadata, "items": items});
        respond(200, serde_json::to_vec(&body).unwrap())
    }

    fn watch(
        &self,
        kind: Kind,
        node: Option<String>,
        query: &BTreeMap<String, String>,
    ) -> hyper::Response<Body> {
        let (tx, rx) = mpsc::channel(100_000);
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs);
        {
            let mut s = self.store.lock().unwrap();
            if from != 0 && from < s.oldest {
                let gone = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", s.oldest - 1),
                    "reason": "Expired", "code": 410}});
                let _ = tx.try_send(Ok(line(&gone)));
                drop(tx);
                return stream_response(rx);
            }
            if from == 0 {
                // "0": any version; start with the current objects as ADDED.
                for ((k, _), o) in &s.objects {
                    if *k == kind && matches(o, node.as_deref()) {
                        let _ = tx.try_send(Ok(line(&json!({"type": "ADDED", "object": o}))));
                    }
                }
            } else {
                for change in s.history.iter().filter(|c| c.rv > from) {
                    if let Some(e) = event_for(change, kind, node.as_deref()) {
                        let _ = tx.try_send(Ok(line(&e)));
                    }
                }
            }
            let max = s.max_watch;
            s.watchers.push(Watcher {
                kind,
                node,
                bookmarks,
                tx: tx.clone(),
            });
            // The watch ends at its timeout (a bookmark first, when asked for).
            let lifetime = match (timeout, max) {
                (Some(t), Some(m)) => Some(t.min(m)),
                (t, m) => t.or(m),
            };
            if let Some(lifetime) = lifetime {
                // Weak: a watch ended early (end_watches) must not be held open by its timer.
                let (store, weak) = (self.store.clone(), tx.downgrade());
                drop(tx);
                tokio::spawn(async move {
                    tokio::time::sleep(lifetime).await;
                    let Some(tx) = weak.upgrade() else { return };
                    let mut s = store.lock().unwrap();
                    if bookmarks {
                        let _ = tx.try_send(Ok(line(&bookmark(kind, s.rv))));
                    }
                    s.watchers.retain(|w| !w.tx.same_channel(&tx));
                });
            }
        }
        stream_response(rx)
    }
}

impl Default for FakeApi {
    fn default() -> Self {
        FakeApi::new()
    }
}

/// Stores a change (`None`: deletion) under the next version and tells the watches.
fn put_locked(s: &mut Store, kind: Kind, key: String, object: Option<Value>) {
    s.rv += 1;
    let rv = s.rv;
    let after = object.map(|mut o| {
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
        o
    });
    let before = match &after {
        Some(o) => s.objects.insert((kind, key), o.clone()),
        None => s.objects.remove(&(kind, key)),
    };
    if before.is_none() && after.is_none() {
        return;
    }
    let change = Change {
        rv,
        kind,
        before,
        after,
    };
    s.watchers
        .retain(|w| match event_for(&change, w.kind, w.node.as_deref()) {
            Some(e) => w.tx.try_send(Ok(line(&e))).is_ok(),
            None => !w.tx.is_closed(),
        });
    s.history.push(change);
}

/// The event a watch of `kind` (on `node`, for pods) sees for `change`, if any.
fn event_for(change: &Change, kind: Kind, node: Option<&str>) -> Option<Value> {
    if change.kind != kind {
        return None;
    }
    let was = change.before.as_ref().is_some_and(|o| matches(o, node));
    let is = change.after.as_ref().is_some_and(|o| matches(o, node));
    let (kind, object) = match (was, is) {
        (false, true) => ("ADDED", change.after.clone()?),
        (true, true) => ("MODIFIED", change.after.clone()?),
        (true, false) => {
            // A deletion carries the last state with the deletion's version.
            let mut o = change.after.clone().or_else(|| change.before.clone())?;
            o["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", o)
        }
        (false, false) => return None,
    };
    Some(json!({"type": kind, "object": object}))
}

fn matches(object: &Value, node: Option<&str>) -> bool {
    node.is_none_or(|n| object["spec"]["nodeName"].as_str() == Some(n))
}

fn bookmark(kind: Kind, rv: u64) -> Value {
    json!({"type": "BOOKMARK", "object": {"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}}})
}

fn line(v: &Value) -> Frame<Bytes> {
    let mut bytes = serde_json::to_vec(v).unwrap();
    bytes.push(b'\n');
    Frame::data(Bytes::from(bytes))
}

fn url_pairs(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Percent-decoding (and `+` as a space) of one query component.
fn decode(s: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(fields) = target {
        for (key, change) in changes {
            if change.is_null() {
                fields.remove(key);
            } else {
                merge_patch(fields.entry(key.clone()).or_insert(Value::Null), change);
            }
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> hyper::Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    respond(code, serde_json::to_vec(&body).unwrap())
}

fn respond(code: u16, body: Vec<u8>) -> hyper::Response<Body> {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

fn stream_response(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> hyper::Response<Body> {
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = hyper::Response::new(BodyExt::boxed(body));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

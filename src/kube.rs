//! Kubernetes mode: hboned as its own node agent, with no Istio or Cilium beside it. Three
//! watches on the API server (kube-rs; list, then watch with bookmarks, a re-list on 410
//! Gone, back-off on errors): Namespaces (which opted in by label), this node's Pods
//! (`spec.nodeName`) and every Pod. One task, [`Agent`], turns their events into the workload
//! state (every pod a workload, HBONE when its namespace opted in) and into the set of this
//! node's pods to enroll, which [`enroll`] reconciles in the pods' namespaces (redirect rules,
//! listeners). Deciding is pure ([`pods`]); finding a pod's namespace reads `/proc`
//! (`procfs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use crate::config::KubernetesConfig;
use crate::inpod::PodHandler;
use crate::state::SharedState;

pub mod enroll;
pub(crate) mod pods;
pub(crate) mod services;
pub(crate) mod slim;

pub use crate::config::LabelMatch;
pub use enroll::{Desired, LocalPod};
pub use pods::PodFacts;
pub use slim::SlimPod;

/// Why the API server cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubernetes.apiServer {url:?} is not a URL: {source}")]
    Url {
        url: String,
        source: http::uri::InvalidUri,
    },
    #[error(
        "not running in a cluster ({0}); set kubernetes.apiServer (e.g. http://127.0.0.1:8001 behind `kubectl proxy`)"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client for `kubernetes.apiServer`, else the in-cluster service account. Needs a tokio
/// runtime (the client's connection pool lives on it).
pub fn client(settings: &KubernetesConfig) -> Result<kube::Client, KubeError> {
    let config = match &settings.api_server {
        Some(url) => kube::Config::new(url.parse().map_err(|source| KubeError::Url {
            url: url.clone(),
            source,
        })?),
        None => kube::Config::incluster().map_err(KubeError::InCluster)?,
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}

/// What the agent needs besides its client.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    pub labels: Vec<LabelMatch>,
    pub trust_domain: String,
    pub cluster_id: String,
    /// Watch Services and EndpointSlices (`kubernetes.services`).
    pub services: bool,
    pub cluster_domain: String,
}

impl Settings {
    /// From the config file (`node`, `trustDomain`, `clusterId` and `kubernetes:`).
    pub fn from_config(
        config: &crate::config::Config,
        kube: &KubernetesConfig,
    ) -> Result<Settings, crate::config::BadLabel> {
        Ok(Settings {
            node: config.node.clone(),
            labels: kube
                .namespace_labels
                .iter()
                .map(|l| LabelMatch::parse(l))
                .collect::<Result<_, _>>()?,
            trust_domain: config.trust_domain.clone(),
            cluster_id: config.cluster_id.clone(),
            services: kube.services,
            cluster_domain: kube.cluster_domain.clone(),
        })
    }
}

/// The running agent: its watch task and (when it enrolls) the enroller; both stop on
/// [`Running::stop`] or drop, leaving every rule in place for the next proxy.
#[derive(Debug)]
pub struct Running {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops watching and enrolling (a drain: the pods stay enrolled for a successor).
    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How `hboned agent` enrolls besides the watches: the CNI plugin's calls, and the state file
/// its enrolled set is kept in across restarts. The one-process mode has neither.
#[derive(Debug, Default)]
pub struct AgentExtras {
    pub cni: Option<tokio::sync::mpsc::Receiver<enroll::CniCall>>,
    pub state_file: Option<std::path::PathBuf>,
    /// Told when every watch has listed once (the discovery state is whole).
    pub synced: Option<watch::Sender<bool>>,
}

/// Starts the full agent: discovery into `state` and enrollment of this node's pods through
/// `pods` (and, with `extras`, in the CNI plugin's ADDs, kept in a state file), failed attempts
/// counted in `metrics`. `ready` turns true once every watch has listed and the first
/// enrollment pass ran (or the state file's pods are served again).
pub fn start(
    client: kube::Client,
    settings: Settings,
    state: Arc<SharedState>,
    pods: Arc<dyn PodHandler>,
    metrics: Arc<crate::metrics::Metrics>,
    ready: watch::Sender<bool>,
    extras: AgentExtras,
) -> Running {
    let (desired_tx, desired_rx) = watch::channel(Arc::new(Desired::default()));
    let (records_tx, records_rx) = tokio::sync::mpsc::unbounded_channel();
    let (failures_tx, failures_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut enroller = enroll::Enroller::new(pods, ready)
        .recording(records_tx)
        .reporting(failures_tx)
        .counting(metrics.clone());
    if let Some(path) = extras.state_file {
        enroller = enroller.persisting(path);
    }
    let mut agent = Agent::new(settings.clone(), state, Some(desired_tx));
    agent.synced_tx = extras.synced;
    Running {
        tasks: vec![
            tokio::spawn(agent.run(client.clone(), true)),
            tokio::spawn(enroller.run(desired_rx, extras.cni)),
            tokio::spawn(enroll::record_enrollments(
                client.clone(),
                records_rx,
                Some(metrics),
            )),
            tokio::spawn(enroll::report_failures(
                client,
                settings.node.clone(),
                failures_rx,
            )),
        ],
    }
}

/// Starts discovery alone (every Pod into `state`, nothing enrolled): for tests and the watch
/// benchmark, which must not touch the host's rules. `synced` turns true once all watches
/// listed.
pub fn discover(
    client: kube::Client,
    settings: Settings,
    state: Arc<SharedState>,
    synced: watch::Sender<bool>,
) -> Running {
    let mut agent = Agent::new(settings, state, None);
    agent.synced_tx = Some(synced);
    Running {
        tasks: vec![tokio::spawn(agent.run(client, false))],
    }
}

/// One watch's initial listing: the keys seen since its `Init`, to drop what it no longer has
/// at `InitDone`.
#[derive(Debug, Default)]
struct Listing {
    seen: Option<HashSet<String>>,
    done: bool,
}

impl Listing {
    fn begin(&mut self) {
        self.seen = Some(HashSet::new());
    }

    fn saw(&mut self, key: &str) {
        if let Some(seen) = &mut self.seen {
            seen.insert(key.to_owned());
        }
    }

    /// Ends the listing (the watch has now listed once) and returns those of `known` it did
    /// not have: what a re-list no longer has is gone. Nothing outside a listing.
    fn finish<'a>(&mut self, known: impl Iterator<Item = &'a String>) -> Vec<String> {
        self.done = true;
        let Some(seen) = self.seen.take() else {
            return Vec::new();
        };
        known.filter(|k| !seen.contains(*k)).cloned().collect()
    }
}

/// The watches' state, owned by one task: namespaces' opt-in, the workloads it put in the
/// shared state, this node's pods.
struct Agent {
    settings: Settings,
    state: Arc<SharedState>,
    /// Opted-in namespaces.
    opted: HashSet<String>,
    /// Every namespace's opt-in as last seen (to notice a change).
    namespaces: HashMap<String, bool>,
    /// uid → (namespace, enrollment recorded) of each workload this agent added to the state.
    workloads: HashMap<String, (String, bool)>,
    /// This node's pods, by uid.
    local: BTreeMap<String, PodFacts>,
    desired: Option<watch::Sender<Arc<Desired>>>,
    /// This node's pods or the opt-ins changed since the desired set was last computed.
    local_dirty: bool,
    synced_tx: Option<watch::Sender<bool>>,
    listings: [Listing; 5],
    /// Services, their slices, and which pods back them (with `services` on).
    index: services::Index,
}

const NAMESPACES: usize = 0;
const ALL_PODS: usize = 1;
const LOCAL_PODS: usize = 2;
const SERVICES: usize = 3;
const SLICES: usize = 4;

/// A watch's events, or nothing when the watch is off.
type Events<K> = std::pin::Pin<Box<dyn Stream<Item = Event<K>> + Send>>;

impl Agent {
    fn new(
        settings: Settings,
        state: Arc<SharedState>,
        desired: Option<watch::Sender<Arc<Desired>>>,
    ) -> Agent {
        Agent {
            settings,
            state,
            opted: HashSet::new(),
            namespaces: HashMap::new(),
            workloads: HashMap::new(),
            local: BTreeMap::new(),
            desired,
            local_dirty: true,
            synced_tx: None,
            listings: Default::default(),
            index: services::Index::default(),
        }
    }

    async fn run(mut self, client: kube::Client, local: bool) {
        let mut namespaces = Box::pin(watched::<Namespace>(
            kube::Api::all(client.clone()),
            watcher::Config::default(),
        ));
        // Pods in their slim form (kube/slim.rs): the watches never hold a whole pod.
        let mut all = Box::pin(watched::<SlimPod>(
            kube::Api::all(client.clone()),
            watcher::Config::default(),
        ));
        let fields = format!("spec.nodeName={}", self.settings.node);
        let mut mine: Events<SlimPod> = self.optional(LOCAL_PODS, local, || {
            watched(
                kube::Api::all(client.clone()),
                watcher::Config::default().fields(&fields),
            )
        });
        let with_services = self.settings.services;
        let mut services: Events<KubeService> = self.optional(SERVICES, with_services, || {
            watched(kube::Api::all(client.clone()), watcher::Config::default())
        });
        let mut slices: Events<EndpointSlice> = self.optional(SLICES, with_services, || {
            watched(kube::Api::all(client.clone()), watcher::Config::default())
        });
        loop {
            tokio::select! {
                Some(e) = namespaces.next() => self.namespace_event(e),
                Some(e) = all.next() => self.pod_event(e),
                Some(e) = mine.next() => self.local_event(e),
                Some(e) = services.next() => self.service_event(e),
                Some(e) = slices.next() => self.slice_event(e),
                else => return,
            }
            self.publish();
        }
    }

    /// The watch `make` builds when `on`; otherwise nothing, and its listing counts as done.
    fn optional<K, S>(&mut self, listing: usize, on: bool, make: impl FnOnce() -> S) -> Events<K>
    where
        K: Send + 'static,
        S: Stream<Item = Event<K>> + Send + 'static,
    {
        if on {
            Box::pin(make())
        } else {
            self.listings[listing].done = true;
            Box::pin(futures_util::stream::pending())
        }
    }

    fn namespace_event(&mut self, event: Event<Namespace>) {
        match event {
            Event::Init => self.listings[NAMESPACES].begin(),
            Event::InitApply(ns) | Event::Apply(ns) => {
                let Some(name) = ns.metadata.name.clone() else {
                    return;
                };
                self.listings[NAMESPACES].saw(&name);
                let on = pods::opted_in(&self.settings.labels, ns.metadata.labels.as_ref());
                self.set_opted(name, on);
            }
            Event::Delete(ns) => {
                if let Some(name) = ns.metadata.name {
                    self.namespaces.remove(&name);
                    self.set_opted(name, false);
                }
            }
            Event::InitDone => {
                for name in self.listings[NAMESPACES].finish(self.namespaces.keys()) {
                    self.namespaces.remove(&name);
                    self.set_opted(name, false);
                }
            }
        }
    }

    /// Records a namespace's opt-in; on a change, its workloads switch protocol.
    fn set_opted(&mut self, name: String, on: bool) {
        let before = self.opted.contains(&name);
        if on {
            self.opted.insert(name.clone());
        } else {
            self.opted.remove(&name);
        }
        self.namespaces.insert(name.clone(), on);
        if before == on {
            return;
        }
        self.local_dirty = true;
        tracing::info!(namespace = %name, enrolled = on, "namespace opt-in changed");
        // HBONE for the pods whose enrollment is recorded (pods::PodFacts::served).
        let uids: Vec<(&String, bool)> = self
            .workloads
            .iter()
            .filter(|(_, (ns, _))| *ns == name)
            .map(|(uid, (_, redirected))| (uid, *redirected))
            .collect();
        self.state.write(|s| {
            for (uid, redirected) in uids {
                let protocol = if on && redirected {
                    crate::state::Protocol::Hbone
                } else {
                    crate::state::Protocol::Tcp
                };
                if let Some(w) = s.workload(uid)
                    && !w.host_network
                    && w.protocol != protocol
                {
                    let mut w = (**w).clone();
                    w.protocol = protocol;
                    s.upsert_workload(w);
                }
            }
        });
    }

    fn pod_event(&mut self, event: Event<SlimPod>) {
        match event {
            Event::Init => self.listings[ALL_PODS].begin(),
            Event::InitApply(SlimPod(pod)) | Event::Apply(SlimPod(pod)) => {
                let Some(facts) = PodFacts::of(&pod) else {
                    return;
                };
                self.listings[ALL_PODS].saw(&facts.uid);
                self.apply_workload(&facts);
            }
            Event::Delete(SlimPod(pod)) => {
                if let Some(uid) = pod.metadata.uid {
                    self.remove_workload(&uid);
                }
            }
            Event::InitDone => {
                for uid in self.listings[ALL_PODS].finish(self.workloads.keys()) {
                    self.remove_workload(&uid);
                }
            }
        }
    }

    fn apply_workload(&mut self, facts: &PodFacts) {
        let opted = self.opted.contains(&facts.namespace);
        let workload = facts.workload(
            opted,
            &self.settings.trust_domain,
            &self.settings.cluster_id,
        );
        match workload {
            Some(mut w) => {
                w.services = self.index.services_of(&w.uid);
                self.workloads.insert(
                    facts.uid.clone(),
                    (facts.namespace.clone(), facts.redirected),
                );
                self.state.write(|s| s.upsert_workload(w));
            }
            None => self.remove_workload(&facts.uid),
        }
    }

    fn remove_workload(&mut self, uid: &str) {
        if self.workloads.remove(uid).is_some() {
            self.state.write(|s| s.remove_workload(uid));
        }
    }

    fn service_event(&mut self, event: Event<KubeService>) {
        match event {
            Event::Init => self.listings[SERVICES].begin(),
            Event::InitApply(svc) | Event::Apply(svc) => {
                let (Some(ns), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
                    return;
                };
                let key = format!("{ns}/{name}");
                self.listings[SERVICES].saw(&key);
                match services::ServiceFacts::of(&svc, &self.settings.cluster_domain) {
                    Some(facts) => {
                        let state = facts.to_state();
                        self.state.write(|s| s.upsert_service(state));
                        let touched = self.index.apply_service(facts);
                        self.refresh_services(touched);
                    }
                    // Now headless or ExternalName: no VIP to translate any more.
                    None => self.remove_service(&key),
                }
            }
            Event::Delete(svc) => {
                if let (Some(ns), Some(name)) = (svc.metadata.namespace, svc.metadata.name) {
                    self.remove_service(&format!("{ns}/{name}"));
                }
            }
            Event::InitDone => {
                for key in self.listings[SERVICES].finish(self.index.service_keys()) {
                    self.remove_service(&key);
                }
            }
        }
    }

    fn remove_service(&mut self, key: &str) {
        if let Some((state_key, touched)) = self.index.remove_service(key) {
            self.state.write(|s| s.remove_service(&state_key));
            self.refresh_services(touched);
        }
    }

    fn slice_event(&mut self, event: Event<EndpointSlice>) {
        match event {
            Event::Init => self.listings[SLICES].begin(),
            Event::InitApply(slice) | Event::Apply(slice) => {
                let Some((key, facts)) = services::SliceFacts::of(&slice) else {
                    return;
                };
                self.listings[SLICES].saw(&key);
                let touched = self.index.apply_slice(key, facts);
                self.refresh_services(touched);
            }
            Event::Delete(slice) => {
                if let Some((key, _)) = services::SliceFacts::of(&slice) {
                    let touched = self.index.remove_slice(&key);
                    self.refresh_services(touched);
                }
            }
            Event::InitDone => {
                for key in self.listings[SLICES].finish(self.index.slice_keys()) {
                    let touched = self.index.remove_slice(&key);
                    self.refresh_services(touched);
                }
            }
        }
    }

    /// Re-derives the `services` map of these pods' workloads.
    fn refresh_services(&mut self, uids: std::collections::BTreeSet<String>) {
        let index = &self.index;
        let known = &self.workloads;
        self.state.write(|s| {
            for uid in uids.iter().filter(|u| known.contains_key(*u)) {
                let services = index.services_of(uid);
                if let Some(w) = s.workload(uid)
                    && w.services != services
                {
                    let mut w = (**w).clone();
                    w.services = services;
                    s.upsert_workload(w);
                }
            }
        });
    }

    fn local_event(&mut self, event: Event<SlimPod>) {
        self.local_dirty = true;
        match event {
            Event::Init => self.listings[LOCAL_PODS].begin(),
            Event::InitApply(SlimPod(pod)) | Event::Apply(SlimPod(pod)) => {
                let Some(facts) = PodFacts::of(&pod) else {
                    return;
                };
                self.listings[LOCAL_PODS].saw(&facts.uid);
                self.local.insert(facts.uid.clone(), facts);
            }
            Event::Delete(SlimPod(pod)) => {
                if let Some(uid) = pod.metadata.uid {
                    self.local.remove(&uid);
                }
            }
            Event::InitDone => {
                for uid in self.listings[LOCAL_PODS].finish(self.local.keys()) {
                    self.local.remove(&uid);
                }
            }
        }
    }

    /// Hands the enroller the pods it should serve (when it changed), and says when every
    /// watch has listed once.
    fn publish(&mut self) {
        let synced = self.listings.iter().all(|l| l.done);
        if let Some(tx) = &self.synced_tx {
            tx.send_if_modified(|s| std::mem::replace(s, synced) != synced);
        }
        let Some(tx) = &self.desired else {
            return;
        };
        // Only this node's pods and the opt-ins make the desired set (and the first sync).
        if !self.local_dirty && tx.borrow().synced == synced {
            return;
        }
        self.local_dirty = false;
        let next = Desired::compute(&self.local, &self.opted, synced);
        tx.send_if_modified(|current| {
            if **current == next {
                false
            } else {
                *current = Arc::new(next);
                true
            }
        });
    }
}

/// A watcher's events with kube-rs's default back-off on errors (which are logged); a 410
/// Gone makes the watcher list again, which it reports as `Init` .. `InitDone`.
fn watched<K>(api: kube::Api<K>, config: watcher::Config) -> impl Stream<Item = Event<K>> + Send
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    watcher::watcher(api, config)
        .default_backoff()
        .filter_map(move |r| {
            let out = match r {
                Ok(event) => Some(event),
                Err(e) => {
                    tracing::warn!(kind = %kind, error = %e, "Kubernetes watch failed; retrying with back-off");
                    None
                }
            };
            std::future::ready(out)
        })
}

//! Enrollment of this node's pods in Kubernetes mode: the agent hands over the pods that
//! should be served ([`Desired`]); the [`Enroller`] makes it so, level-triggered. A new pod gets
//! its listeners first (through the same [`PodHandler`] as ZDS) and then the redirect rules,
//! so none of its connections meets a port with nobody behind it (istio-cni's order too); a
//! pod that goes, or whose namespace lost its label, loses both. After the first full listing
//! it sweeps this node's other pods for rules an earlier run left (a pod whose traffic is
//! redirected to a proxy that does not serve it is blackholed), and it keeps the node's probe
//! chain equal to the enrolled pods' addresses. Each enrollment is recorded on its pod
//! ([`super::pods::REDIRECTION_ANNOTATION`]) once listeners and rules are in, and the record
//! taken away when they go (so peers use HBONE only to pods that are served); the API calls
//! run in [`record_enrollments`]. Stopping it (a drain) changes nothing, so a successor takes
//! the pods over as they are.
//!
//! With the CNI plugin installed (`hboned agent`), a new pod is enrolled in its CNI ADD
//! ([`CniCall`]), by the namespace the runtime names, before any of its containers starts; the
//! watches then confirm it (a pod the watch has not shown yet is kept for [`CNI_GRACE`]). A
//! CNI DEL of the sandbox that was enrolled lets the pod go. Pods that were running before the
//! plugin are found through `/proc` as without it.
//!
//! With a state file ([`Enroller::persisting`]) the enrolled set is written down after every
//! change, and read back at start: a restarted agent serves the pods that still carry its rules
//! at once, before (or without) the API server, and its proxy is never told to drop them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::pods::PodFacts;
use crate::inpod::{PodHandler, PodInfo};
use crate::netns::Netns;
use crate::redirect;

/// A pod of this node to enroll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
}

/// What the enroller should make true.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every watch has listed at least once: absence now means "not wanted".
    pub synced: bool,
    /// This node's pods to serve, by uid.
    pub enroll: BTreeMap<String, LocalPod>,
    /// This node's other pods with a namespace of their own (uid → IPs): where rules left by
    /// an earlier run are looked for.
    pub others: BTreeMap<String, Vec<IpAddr>>,
    /// This node's pods recorded as enrolled that should not be (uid → namespace, name): an
    /// earlier run's records to take away.
    pub stale: BTreeMap<String, (String, String)>,
}

impl Desired {
    /// From this node's pods and the opted-in namespaces.
    pub fn compute(
        local: &BTreeMap<String, PodFacts>,
        opted: &HashSet<String>,
        synced: bool,
    ) -> Desired {
        let mut desired = Desired {
            synced,
            ..Desired::default()
        };
        for (uid, pod) in local {
            if pod.enrollable(opted.contains(&pod.namespace)) {
                desired.enroll.insert(
                    uid.clone(),
                    LocalPod {
                        name: pod.name.clone(),
                        namespace: pod.namespace.clone(),
                        service_account: pod.service_account.clone(),
                        // Sorted, as the CNI plugin sends them: equal sets compare equal.
                        ips: {
                            let mut ips = pod.ips.clone();
                            ips.sort_unstable();
                            ips
                        },
                    },
                );
            } else {
                if !pod.host_network && !pod.ips.is_empty() {
                    desired.others.insert(uid.clone(), pod.ips.clone());
                }
                if pod.redirected {
                    desired
                        .stale
                        .insert(uid.clone(), (pod.namespace.clone(), pod.name.clone()));
                }
            }
        }
        desired
    }
}

/// A failed attempt to enroll a pod, to report on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The metric's reason (`no_process`, `listeners`, `rules`).
    pub reason: &'static str,
    pub message: String,
}

/// How often one pod's failures of one kind are reported again: its retries every 2 s would
/// otherwise flood the API server (kube's recorder would patch a series within 6 minutes).
const REPORT_AGAIN_AFTER: Duration = Duration::from_secs(10 * 60);

/// Reports failed enrollments as Kubernetes Events on their pods (events.k8s.io/v1, type
/// Warning, reason `EnrollmentFailed`, reported by `hboned` on `node`): what `kubectl describe
/// pod` shows an operator. One per pod and kind of failure per [`REPORT_AGAIN_AFTER`]; an Event
/// the API server refuses is logged and dropped (a later failure reports again).
pub async fn report_failures(
    client: kube::Client,
    node: String,
    mut failures: mpsc::UnboundedReceiver<Failure>,
) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "hboned".into(),
            instance: Some(node),
        },
    );
    let mut last: HashMap<(String, &'static str), Instant> = HashMap::new();
    while let Some(f) = failures.recv().await {
        last.retain(|_, at| at.elapsed() < REPORT_AGAIN_AFTER);
        let key = (f.uid.clone(), f.reason);
        if last.contains_key(&key) {
            continue;
        }
        last.insert(key, Instant::now());
        // An Event's note holds at most 1 KiB.
        let mut note = format!("{} ({})", f.message, f.reason);
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "EnrollmentFailed".into(),
            note: Some(note),
            action: "Enroll".into(),
            secondary: None,
        };
        let pod = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(f.name.clone()),
            namespace: Some(f.namespace.clone()),
            uid: Some(f.uid.clone()),
            ..Default::default()
        };
        if let Err(e) = recorder.publish(&event, &pod).await {
            tracing::warn!(pod = %f.uid, name = %f.name, error = %e, "cannot report the failed enrollment as an Event");
        }
    }
}

/// One pod of the state file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Persisted {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    ips: Vec<IpAddr>,
    /// The namespace the runtime named; none: found from the pod's processes.
    netns: Option<PathBuf>,
    container_id: Option<String>,
}

/// How many times a failed rule removal is tried (a pass every 2 s while any is left).
const REMOVAL_ATTEMPTS: u32 = 150;

/// How often this node's pods that should have no rules are checked for some.
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// How often pods that could not be enrolled yet (no process found, rules failed) are retried.
const RETRY: Duration = Duration::from_secs(2);

/// An enrollment to record on a pod (or to take away).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub enrolled: bool,
}

struct Enrolled {
    pod: LocalPod,
    /// The pod's namespace, kept to take the rules out again.
    netns: Netns,
    /// The namespace's path, when the runtime named one (CNI).
    netns_path: Option<PathBuf>,
    /// Enrolled by a CNI ADD (or taken back from the state file): when, and for which sandbox.
    cni: Option<(Instant, String)>,
    /// The watches have shown the pod as it is enrolled.
    seen: bool,
}

/// How long a pod enrolled by its CNI ADD is kept before the watches show it.
pub const CNI_GRACE: Duration = Duration::from_secs(120);

/// A request of the CNI plugin, decided upon by the agent's CNI endpoint (which read the pod
/// from the API server); answered on `reply` with the reason of a failure.
#[derive(Debug)]
pub enum CniCall {
    /// Enroll the pod in the namespace at `netns` (sandbox `container_id`).
    Enroll {
        uid: String,
        pod: LocalPod,
        netns: PathBuf,
        container_id: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Let the pod go, if `container_id` is the sandbox that was enrolled.
    Release {
        uid: Option<String>,
        namespace: String,
        name: String,
        container_id: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Whether the pod is served.
    Check {
        namespace: String,
        name: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Reconciles enrolled pods with [`Desired`]; see the module docs.
pub struct Enroller {
    pods: Arc<dyn PodHandler>,
    ready: watch::Sender<bool>,
    /// Where enrollments go to be recorded on their pods.
    records: Option<mpsc::UnboundedSender<Record>>,
    /// Where failed attempts are counted.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Where failed attempts go to be reported on their pods.
    failures: Option<mpsc::UnboundedSender<Failure>>,
    enrolled: HashMap<String, Enrolled>,
    /// Pods a CNI DEL let go, not to be found again through `/proc` while they linger in the
    /// API (uid → the sandbox).
    released: HashMap<String, String>,
    /// The addresses the probe chain was last written with.
    probe_ips: Option<Vec<IpAddr>>,
    /// Namespaces whose rules could not be removed yet (uid, namespace, attempts), retried
    /// every pass up to [`REMOVAL_ATTEMPTS`] times.
    leftovers: Vec<(String, Option<Netns>, u32)>,
    /// When this node's other pods were last swept for rules an earlier run left.
    swept_at: Option<Instant>,
    /// Where the enrolled set is kept across restarts, and what was last written there.
    state_file: Option<PathBuf>,
    written: Option<Vec<u8>>,
    swept: bool,
    proc: PathBuf,
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroller")
            .field("enrolled", &self.enrolled.len())
            .finish_non_exhaustive()
    }
}

impl Enroller {
    pub fn new(pods: Arc<dyn PodHandler>, ready: watch::Sender<bool>) -> Enroller {
        Enroller {
            pods,
            ready,
            records: None,
            metrics: None,
            failures: None,
            enrolled: HashMap::new(),
            released: HashMap::new(),
            probe_ips: None,
            state_file: None,
            written: None,
            leftovers: Vec::new(),
            swept_at: None,
            swept: false,
            proc: PathBuf::from("/proc"),
        }
    }

    /// Writes the enrolled set to `path` after every change and takes it back from there at
    /// start.
    pub fn persisting(mut self, path: PathBuf) -> Enroller {
        self.state_file = Some(path);
        self
    }

    /// Records every enrollment, and every one taken away, through `records`.
    pub fn recording(mut self, records: mpsc::UnboundedSender<Record>) -> Enroller {
        self.records = Some(records);
        self
    }

    /// Counts failed attempts in `metrics` (`hboned_enrollment_failures`).
    pub fn counting(mut self, metrics: Arc<crate::metrics::Metrics>) -> Enroller {
        self.metrics = Some(metrics);
        self
    }

    /// Counts a failed attempt and reports it on the pod (as a Kubernetes Event).
    fn failed(&self, uid: &str, pod: &LocalPod, reason: &'static str, message: String) {
        if let Some(m) = &self.metrics {
            m.enrollment_failed(reason);
        }
        if let Some(failures) = &self.failures {
            let _ = failures.send(Failure {
                uid: uid.to_owned(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                reason,
                message,
            });
        }
    }

    /// Reports every failed attempt through `failures` (see [`report_failures`]).
    pub fn reporting(mut self, failures: mpsc::UnboundedSender<Failure>) -> Enroller {
        self.failures = Some(failures);
        self
    }

    fn record(&self, uid: &str, namespace: &str, name: &str, enrolled: bool) {
        if let Some(records) = &self.records {
            let _ = records.send(Record {
                uid: uid.to_owned(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                enrolled,
            });
        }
    }

    /// Follows `desired` (and the CNI plugin's calls, when given) until its sender goes; the
    /// blocking work (iptables, `/proc`, the proxy's answers) runs on the blocking pool, one
    /// pass or call at a time.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Arc<Desired>>,
        mut cni: Option<mpsc::Receiver<CniCall>>,
    ) {
        let mut pass = true;
        let mut pending = false;
        if self.state_file.is_some() {
            match self.blocking(Enroller::restore).await {
                Some((back, restored)) => {
                    self = back;
                    // What it served before is served again: the proxy may have its snapshot.
                    if restored {
                        self.ready.send_replace(true);
                    }
                }
                None => return,
            }
        }
        loop {
            if pass {
                let want = desired.borrow_and_update().clone();
                if want.synced {
                    match self.blocking(move |e| e.reconcile(&want)).await {
                        Some((back, p)) => {
                            self = back;
                            pending = p;
                        }
                        None => return,
                    }
                    self.ready.send_replace(true);
                }
            }
            if let Some(m) = &self.metrics {
                m.enrolled_pods.set(self.enrolled.len() as i64);
            }
            self.persist();
            pass = true;
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY), if pending => {}
                // A pass now and then, for the periodic sweep.
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
                call = next_call(cni.as_mut()) => match call {
                    Some(call) => {
                        match self.blocking(move |e| e.cni(call)).await {
                            Some((back, ())) => self = back,
                            None => return,
                        }
                        pass = false;
                    }
                    None => cni = None,
                },
            }
        }
    }

    /// Runs `f` on the blocking pool; `None` when it panicked (enrollment stops, logged).
    async fn blocking<T: Send + 'static>(
        mut self,
        f: impl FnOnce(&mut Enroller) -> T + Send + 'static,
    ) -> Option<(Enroller, T)> {
        match tokio::task::spawn_blocking(move || {
            let out = f(&mut self);
            (self, out)
        })
        .await
        {
            Ok(done) => Some(done),
            Err(e) => {
                tracing::error!(error = %e, "the enrollment pass failed; stopping enrollment");
                None
            }
        }
    }

    /// Writes the enrolled set when it changed (a temporary file renamed over the last one).
    fn persist(&mut self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let mut pods: Vec<Persisted> = self
            .enrolled
            .iter()
            .map(|(uid, e)| Persisted {
                uid: uid.clone(),
                name: e.pod.name.clone(),
                namespace: e.pod.namespace.clone(),
                service_account: e.pod.service_account.clone(),
                ips: e.pod.ips.clone(),
                netns: e.netns_path.clone(),
                container_id: e.cni.as_ref().map(|(_, c)| c.clone()),
            })
            .collect();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        let Ok(bytes) = serde_json::to_vec_pretty(&pods) else {
            return;
        };
        if self.written.as_ref() == Some(&bytes) {
            return;
        }
        let staged = path.with_extension("tmp");
        let result = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&staged, &bytes))
            .and_then(|()| std::fs::rename(&staged, path));
        match result {
            Ok(()) => self.written = Some(bytes),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the agent's state; a restart without the API server would not find its pods")
            }
        }
    }

    /// Takes back the pods of the state file that still carry the rules; true when there was
    /// a state to take back (even an empty one).
    fn restore(&mut self) -> bool {
        let Some(path) = self.state_file.clone() else {
            return false;
        };
        let pods: Vec<Persisted> = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(pods) => pods,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "the agent's state file is unreadable; starting from the API server alone");
                    return false;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the agent's state file");
                return false;
            }
        };
        let by_proc: HashMap<String, Vec<IpAddr>> = pods
            .iter()
            .filter(|p| p.netns.is_none())
            .map(|p| (p.uid.clone(), p.ips.clone()))
            .collect();
        let mut found = crate::procfs::find_pod_netns(&self.proc, &by_proc);
        for p in pods {
            let netns = match &p.netns {
                Some(path) => Netns::open(path).ok(),
                None => found.remove(&p.uid),
            };
            let Some(netns) = netns else {
                tracing::info!(pod = %p.uid, name = %p.name, "a pod of the agent's last state is gone");
                continue;
            };
            if !matches!(redirect::installed(&netns), Ok(true)) {
                tracing::info!(pod = %p.uid, name = %p.name, "a pod of the agent's last state lost its rules; left to the API server's view");
                continue;
            }
            let pod = LocalPod {
                name: p.name,
                namespace: p.namespace,
                service_account: p.service_account,
                ips: p.ips,
            };
            let info = PodInfo {
                uid: p.uid.clone(),
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            };
            let kept = match netns.try_clone() {
                Ok(k) => k,
                Err(_) => continue,
            };
            if let Err(e) = self.pods.add(info, netns) {
                tracing::warn!(pod = %p.uid, error = %e, "cannot serve a pod of the agent's last state");
                continue;
            }
            tracing::info!(pod = %p.uid, name = %pod.name, "pod of the agent's last state served again");
            self.enrolled.insert(
                p.uid,
                Enrolled {
                    pod,
                    netns: kept,
                    netns_path: p.netns,
                    // Kept until the watches show it (or show it gone).
                    cni: Some((Instant::now(), p.container_id.unwrap_or_default())),
                    seen: false,
                },
            );
        }
        true
    }

    /// One call of the CNI plugin.
    fn cni(&mut self, call: CniCall) {
        match call {
            CniCall::Enroll {
                uid,
                pod,
                netns,
                container_id,
                reply,
            } => {
                let result = self.cni_enroll(&uid, pod, &netns, container_id);
                self.update_probe_chain();
                let _ = reply.send(result);
            }
            CniCall::Release {
                uid,
                namespace,
                name,
                container_id,
                reply,
            } => {
                let uid = uid.or_else(|| self.uid_of(&namespace, &name));
                if let Some(uid) = uid {
                    let ours = self.enrolled.get(&uid).is_some_and(|e| match &e.cni {
                        Some((_, sandbox)) => *sandbox == container_id,
                        // Found through /proc: its sandbox is the one going.
                        None => true,
                    });
                    if ours {
                        self.unenroll(&uid);
                        self.released.insert(uid, container_id);
                        self.update_probe_chain();
                    }
                }
                let _ = reply.send(Ok(()));
            }
            CniCall::Check {
                namespace,
                name,
                reply,
            } => {
                let result = match self.uid_of(&namespace, &name) {
                    Some(_) => Ok(()),
                    None => Err(format!("pod {namespace}/{name} is not enrolled")),
                };
                let _ = reply.send(result);
            }
        }
    }

    fn uid_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.enrolled
            .iter()
            .find(|(_, e)| e.pod.namespace == namespace && e.pod.name == name)
            .map(|(uid, _)| uid.clone())
    }

    /// Enrolls a pod by the namespace its CNI ADD names; the same sandbox again is a no-op,
    /// a new one replaces the old.
    fn cni_enroll(
        &mut self,
        uid: &str,
        pod: LocalPod,
        path: &std::path::Path,
        container_id: String,
    ) -> Result<(), String> {
        let netns = Netns::open(path).map_err(|e| e.to_string())?;
        if let Some(e) = self.enrolled.get(uid) {
            let same = matches!((e.netns.inode(), netns.inode()), (Ok(a), Ok(b)) if a == b);
            if same {
                return Ok(());
            }
            self.unenroll(uid);
        }
        self.released.remove(uid);
        self.enroll(uid, &pod, netns)?;
        if let Some(e) = self.enrolled.get_mut(uid) {
            e.cni = Some((Instant::now(), container_id));
            e.netns_path = Some(path.to_owned());
        }
        Ok(())
    }

    /// One pass; true when some pod is still to be enrolled.
    fn reconcile(&mut self, want: &Desired) -> bool {
        // Gone, or changed (a new sandbox comes with new addresses): let go, then enroll anew.
        // A pod its CNI ADD enrolled is kept until the watches could have shown it.
        for (uid, e) in &mut self.enrolled {
            e.seen |= want.enroll.get(uid) == Some(&e.pod);
        }
        let gone: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(uid, e)| {
                let waiting = !e.seen
                    && !want.enroll.contains_key(*uid)
                    && e.cni
                        .as_ref()
                        .is_some_and(|(at, _)| at.elapsed() < CNI_GRACE);
                want.enroll.get(*uid) != Some(&e.pod) && !waiting
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.unenroll(&uid);
        }
        self.released.retain(|uid, _| want.enroll.contains_key(uid));
        let missing: HashMap<String, Vec<IpAddr>> = want
            .enroll
            .iter()
            .filter(|(uid, _)| {
                !self.enrolled.contains_key(*uid) && !self.released.contains_key(*uid)
            })
            .map(|(uid, pod)| (uid.clone(), pod.ips.clone()))
            .collect();
        let mut pending = false;
        if !missing.is_empty() {
            let mut found = crate::procfs::find_pod_netns(&self.proc, &missing);
            for (uid, pod) in &want.enroll {
                if !missing.contains_key(uid) {
                    continue;
                }
                match found.remove(uid) {
                    Some(netns) => pending |= self.enroll(uid, pod, netns).is_err(),
                    None => {
                        tracing::debug!(pod = %uid, name = %pod.name, "no process of the pod found yet; retrying");
                        self.failed(
                            uid,
                            pod,
                            "no_process",
                            "no process of the pod shows its network namespace yet (retried every 2 s)".into(),
                        );
                        pending = true;
                    }
                }
            }
        }
        // The sweep runs after the first listing and then every SWEEP_EVERY: rules can be left
        // by a crash between a removal's steps, or by a pod that changed namespace opt-in
        // while no agent ran.
        if !self.swept || self.swept_at.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            self.sweep(&want.others);
            self.swept = true;
            self.swept_at = Some(Instant::now());
        }
        self.retry_leftovers();
        pending |= !self.leftovers.is_empty();
        // A record of a pod served here is right, even when the watches do not show the pod
        // as enrollable yet (its CNI ADD came before the kubelet reported its addresses).
        for (uid, (namespace, name)) in &want.stale {
            if !self.enrolled.contains_key(uid) {
                self.record(uid, namespace, name, false);
            }
        }
        self.update_probe_chain();
        pending
    }

    /// Listeners first, then rules; on a rule failure the pod is let go and retried. The
    /// error says why, for the CNI plugin's answer.
    fn enroll(&mut self, uid: &str, pod: &LocalPod, netns: Netns) -> Result<(), String> {
        let info = PodInfo {
            uid: uid.to_owned(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        };
        let kept = match netns.try_clone() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(pod = %uid, error = %e, "cannot keep the pod's namespace open");
                let why = format!("cannot keep the pod's namespace open: {e}");
                self.failed(uid, pod, "listeners", why.clone());
                return Err(why);
            }
        };
        if let Err(e) = self.pods.add(info, netns) {
            tracing::warn!(pod = %uid, name = %pod.name, error = %e, "cannot serve the pod; retrying");
            self.failed(uid, pod, "listeners", e.to_string());
            return Err(e.to_string());
        }
        if let Err(e) = redirect::install(&kept) {
            tracing::error!(pod = %uid, name = %pod.name, error = %e, "cannot install the redirect rules; retrying");
            let why = format!("cannot install the redirect rules: {e}");
            self.failed(uid, pod, "rules", why.clone());
            self.pods.remove(uid);
            return Err(why);
        }
        tracing::info!(pod = %uid, name = %pod.name, namespace = %pod.namespace, "pod enrolled");
        self.record(uid, &pod.namespace, &pod.name, true);
        self.enrolled.insert(
            uid.to_owned(),
            Enrolled {
                pod: pod.clone(),
                netns: kept,
                netns_path: None,
                cni: None,
                seen: false,
            },
        );
        Ok(())
    }

    /// Rules out first, then listeners (the mirror of [`Enroller::enroll`]).
    fn unenroll(&mut self, uid: &str) {
        let Some(gone) = self.enrolled.remove(uid) else {
            return;
        };
        if let Err(e) = redirect::remove(&gone.netns) {
            // Retried every pass until done; a deleted pod's namespace takes them with it (its
            // last holder, this descriptor, goes with the retry).
            tracing::warn!(pod = %uid, error = %e, "cannot remove the redirect rules; retrying");
            self.leftovers
                .push((uid.to_owned(), gone.netns.try_clone().ok(), 1));
        }
        self.pods.remove(uid);
        self.record(uid, &gone.pod.namespace, &gone.pod.name, false);
        tracing::info!(pod = %uid, name = %gone.pod.name, "pod unenrolled");
    }

    /// Tries the removals that failed again; those that succeed (or whose namespace is gone)
    /// are done.
    fn retry_leftovers(&mut self) {
        self.leftovers.retain_mut(|(uid, netns, attempts)| {
            let Some(netns) = netns else { return false };
            *attempts += 1;
            match redirect::remove(netns) {
                Ok(()) => {
                    tracing::info!(pod = %uid, "removed the redirect rules on a retry");
                    false
                }
                Err(e) if *attempts >= REMOVAL_ATTEMPTS => {
                    tracing::error!(pod = %uid, error = %e, attempts = *attempts, "giving up removing the redirect rules; the periodic sweep looks again");
                    false
                }
                Err(e) => {
                    tracing::debug!(pod = %uid, error = %e, "the redirect rules are still not removed");
                    true
                }
            }
        });
    }

    /// Removes our rules from this node's pods that should have none.
    fn sweep(&self, others: &BTreeMap<String, Vec<IpAddr>>) {
        if others.is_empty() {
            return;
        }
        let wanted: HashMap<String, Vec<IpAddr>> = others
            .iter()
            .map(|(u, ips)| (u.clone(), ips.clone()))
            .collect();
        for (uid, netns) in crate::procfs::find_pod_netns(&self.proc, &wanted) {
            match redirect::installed(&netns) {
                Ok(true) => match redirect::remove(&netns) {
                    Ok(()) => {
                        tracing::info!(pod = %uid, "removed redirect rules an earlier run left in a pod that is not enrolled")
                    }
                    Err(e) => {
                        tracing::error!(pod = %uid, error = %e, "cannot remove stale redirect rules")
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(pod = %uid, error = %e, "cannot check a pod for stale redirect rules")
                }
            }
        }
    }

    fn update_probe_chain(&mut self) {
        let mut ips: Vec<IpAddr> = self
            .enrolled
            .values()
            .flat_map(|e| e.pod.ips.iter().copied())
            .collect();
        ips.sort_unstable();
        if self.probe_ips.as_ref() == Some(&ips) {
            return;
        }
        let node = match Netns::open(&self.proc.join("self/ns/net")) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the node's namespace for the probe rules");
                return;
            }
        };
        match redirect::set_probe_snat(&node, &ips) {
            Ok(()) => self.probe_ips = Some(ips),
            Err(e) => {
                tracing::error!(error = %e, "cannot update the kubelet probe rules; probes to enrolled pods will be captured")
            }
        }
    }
}

/// The next CNI call, or never when there is no plugin.
async fn next_call(cni: Option<&mut mpsc::Receiver<CniCall>>) -> Option<CniCall> {
    match cni {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Records enrollments on their pods through the API server, the latest wish per pod, each
/// retried with backoff until the API server took it or the pod is gone (404); failures are
/// counted in `metrics`.
pub async fn record_enrollments(
    client: kube::Client,
    mut records: mpsc::UnboundedReceiver<Record>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut pending: BTreeMap<String, Record> = BTreeMap::new();
    loop {
        if pending.is_empty() {
            match records.recv().await {
                Some(r) => {
                    pending.insert(r.uid.clone(), r);
                }
                None => return,
            }
        }
        while let Ok(r) = records.try_recv() {
            pending.insert(r.uid.clone(), r);
        }
        let mut failed = false;
        for (uid, record) in std::mem::take(&mut pending) {
            if let Err(e) = annotate(&client, &record).await {
                tracing::warn!(pod = %uid, name = %record.name, error = %e, "cannot record the pod's enrollment on it; retrying");
                if let Some(m) = &metrics {
                    m.enrollment_failed("record");
                }
                failed = true;
                // A newer wish that came meanwhile wins.
                pending.entry(uid).or_insert(record);
            }
        }
        if !failed {
            backoff.reset();
            continue;
        }
        tokio::select! {
            () = backoff.wait() => {}
            r = records.recv() => match r {
                Some(r) => {
                    pending.insert(r.uid.clone(), r);
                }
                None => return,
            },
        }
    }
}

/// One merge patch of the pod's enrollment annotation; a pod that is gone needs none.
async fn annotate(client: &kube::Client, record: &Record) -> Result<(), kube::Error> {
    use super::pods::{REDIRECTION_ANNOTATION, REDIRECTION_ENABLED};
    let value = record.enrolled.then_some(REDIRECTION_ENABLED);
    let patch = serde_json::json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), &record.namespace);
    match api
        .patch(
            &record.name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;

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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

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
                        ips: pod.ips.clone(),
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
}

/// Reconciles enrolled pods with [`Desired`]; see the module docs.
pub struct Enroller {
    pods: Arc<dyn PodHandler>,
    ready: watch::Sender<bool>,
    /// Where enrollments go to be recorded on their pods.
    records: Option<mpsc::UnboundedSender<Record>>,
    /// Where failed attempts are counted.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    enrolled: HashMap<String, Enrolled>,
    /// The addresses the probe chain was last written with.
    probe_ips: Option<Vec<IpAddr>>,
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
            enrolled: HashMap::new(),
            probe_ips: None,
            swept: false,
            proc: PathBuf::from("/proc"),
        }
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

    fn failed(&self, reason: &'static str) {
        if let Some(m) = &self.metrics {
            m.enrollment_failed(reason);
        }
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

    /// Follows `desired` until its sender goes; the blocking work (iptables, `/proc`) runs on
    /// the blocking pool, one pass at a time.
    pub async fn run(mut self, mut desired: watch::Receiver<Arc<Desired>>) {
        loop {
            let want = desired.borrow_and_update().clone();
            let mut pending = false;
            if want.synced {
                let done = tokio::task::spawn_blocking(move || {
                    let pending = self.reconcile(&want);
                    (self, pending)
                })
                .await;
                match done {
                    Ok((back, p)) => {
                        self = back;
                        pending = p;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the enrollment pass failed; stopping enrollment");
                        return;
                    }
                }
                self.ready.send_replace(true);
            }
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY), if pending => {}
            }
        }
    }

    /// One pass; true when some pod is still to be enrolled.
    fn reconcile(&mut self, want: &Desired) -> bool {
        // Gone, or changed (a new sandbox comes with new addresses): let go, then enroll anew.
        let gone: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(uid, e)| want.enroll.get(*uid) != Some(&e.pod))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.unenroll(&uid);
        }
        let missing: HashMap<String, Vec<IpAddr>> = want
            .enroll
            .iter()
            .filter(|(uid, _)| !self.enrolled.contains_key(*uid))
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
                    Some(netns) => pending |= !self.enroll(uid, pod, netns),
                    None => {
                        tracing::debug!(pod = %uid, name = %pod.name, "no process of the pod found yet; retrying");
                        self.failed("no_process");
                        pending = true;
                    }
                }
            }
        }
        if !self.swept {
            self.sweep(&want.others);
            self.swept = true;
        }
        for (uid, (namespace, name)) in &want.stale {
            self.record(uid, namespace, name, false);
        }
        self.update_probe_chain();
        pending
    }

    /// Listeners first, then rules; on a rule failure the pod is let go and retried.
    fn enroll(&mut self, uid: &str, pod: &LocalPod, netns: Netns) -> bool {
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
                self.failed("listeners");
                return false;
            }
        };
        if let Err(e) = self.pods.add(info, netns) {
            tracing::warn!(pod = %uid, name = %pod.name, error = %e, "cannot serve the pod; retrying");
            self.failed("listeners");
            return false;
        }
        if let Err(e) = redirect::install(&kept) {
            tracing::error!(pod = %uid, name = %pod.name, error = %e, "cannot install the redirect rules; retrying");
            self.failed("rules");
            self.pods.remove(uid);
            return false;
        }
        tracing::info!(pod = %uid, name = %pod.name, namespace = %pod.namespace, "pod enrolled");
        self.record(uid, &pod.namespace, &pod.name, true);
        self.enrolled.insert(
            uid.to_owned(),
            Enrolled {
                pod: pod.clone(),
                netns: kept,
            },
        );
        true
    }

    /// Rules out first, then listeners (the mirror of [`Enroller::enroll`]).
    fn unenroll(&mut self, uid: &str) {
        let Some(gone) = self.enrolled.remove(uid) else {
            return;
        };
        if let Err(e) = redirect::remove(&gone.netns) {
            // A deleted pod's namespace may already be empty of interfaces; the rules go with it.
            tracing::debug!(pod = %uid, error = %e, "cannot remove the redirect rules");
        }
        self.pods.remove(uid);
        self.record(uid, &gone.pod.namespace, &gone.pod.name, false);
        tracing::info!(pod = %uid, name = %gone.pod.name, "pod unenrolled");
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

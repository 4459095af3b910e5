//! Finding a pod's processes from the host, as istio-cni does
//! (cni/pkg/nodeagent/podcgroupns_linux.go): every process in `/proc` whose cgroup path names
//! the pod's UID is one of the pod's. The oldest one's `ns/net` is the pod's namespace (Kubernetes
//! mode), taken only when it holds one of the pod's IPs (a process of one pod can sit in
//! another's netns) and never when it is the host's own; the oldest that is not the sandbox is
//! the process SPIRE attests the pod from (`identity::spire`). Parsing is pure; the scan reads
//! `/proc` (the host's, with hostPID).

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::netns::Netns;

/// The pod UID a `/proc/PID/cgroup` file names, canonical (dashed, lower case); `None` when no
/// line names one or two lines name different pods.
///
/// Each line is `hierarchy:controllers:path`; a pod's container sits under a path segment
/// `pod<uid>` (separators `-` with cgroupfs, `_` with systemd's slices) followed by the
/// container's own segment, e.g. `/kubepods/burstable/pod2c48913c-.../9bca8d...` or
/// `/kubepods.slice/.../kubepods-burstable-pod2c48913c_b29f_....slice/cri-containerd-....scope`.
/// Paths relative to a cgroup namespace (`/../../pod.../...`) work the same.
pub(crate) fn pod_uid(cgroup: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in cgroup.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let path = path.strip_suffix(".scope").unwrap_or(path);
        if let Some(uid) = uid_in_path(path) {
            match &found {
                Some(other) if *other != uid => return None,
                _ => found = Some(uid),
            }
        }
    }
    found
}

/// The UID in one cgroup path: `pod` after punctuation, 32 hex digits in 8-4-4-4-12 groups
/// (each separator optional), punctuation, then a container segment that ends the path.
fn uid_in_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut from = 0;
    while let Some(at) = path[from..].find("pod").map(|i| i + from) {
        from = at + 3;
        if at == 0 || !bytes[at - 1].is_ascii_punctuation() {
            continue;
        }
        let Some((uid, end)) = hex_groups(&bytes[at + 3..]) else {
            continue;
        };
        let rest = &bytes[at + 3 + end..];
        // Punctuation after the UID, and a container segment (non-punctuation) at the end.
        if rest.first().is_some_and(u8::is_ascii_punctuation)
            && rest.last().is_some_and(|b| !b.is_ascii_punctuation())
        {
            return Some(uid);
        }
    }
    None
}

/// Reads 8-4-4-4-12 hex digits, each group optionally after one punctuation character;
/// returns the dashed lower-case UID and the bytes consumed.
fn hex_groups(bytes: &[u8]) -> Option<(String, usize)> {
    let mut uid = String::with_capacity(36);
    let mut i = 0;
    for (n, len) in [8usize, 4, 4, 4, 12].into_iter().enumerate() {
        if n > 0 {
            if bytes.get(i).is_some_and(u8::is_ascii_punctuation) {
                i += 1;
            }
            uid.push('-');
        }
        let group = bytes.get(i..i + len)?;
        if !group.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        uid.extend(group.iter().map(|b| b.to_ascii_lowercase() as char));
        i += len;
    }
    Some((uid, i))
}

/// The start time of a process (clock ticks since boot), field 22 of `/proc/PID/stat`,
/// counted after the command name's closing parenthesis (which may hold spaces).
pub(crate) fn start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// A process of a pod, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodProcess {
    /// The pod's UID (from the process's cgroup path).
    pub uid: String,
    pub pid: u32,
    /// Start time, clock ticks since boot (orders a pod's processes, oldest first).
    pub started: u64,
    /// The pod sandbox's own process (the pause container: command `pause`, the only binary
    /// of the pause image containerd and CRI-O start for every sandbox), not an application's.
    pub sandbox: bool,
}

/// Every process under `proc` in a pod that `wanted` accepts (by UID), in no order. Processes
/// come and go during the scan: one whose files cannot be read is skipped.
pub(crate) fn pod_processes(proc: &Path, wanted: impl Fn(&str) -> bool) -> Vec<PodProcess> {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Some(uid) = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|c| pod_uid(&c))
        else {
            continue;
        };
        if !wanted(&uid) {
            continue;
        }
        let Some(started) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| start_time(&s))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        found.push(PodProcess {
            uid,
            pid,
            started,
            sandbox: comm.trim_end() == "pause",
        });
    }
    found
}

/// The application processes of pod `uid` (its sandbox left out), oldest first: a process
/// the SPIRE agent's Kubernetes attestor can map to a container of the pod's status.
pub(crate) fn application_pids(proc: &Path, uid: &str) -> Vec<u32> {
    let mut processes: Vec<PodProcess> = pod_processes(proc, |u| u == uid)
        .into_iter()
        .filter(|p| !p.sandbox)
        .collect();
    processes.sort_by_key(|p| (p.started, p.pid));
    processes.into_iter().map(|p| p.pid).collect()
}

/// The network namespaces of the pods in `wanted` (UID → the pod's IPs), found among the
/// processes under `proc`. A pod with no process yet, or whose candidate namespace holds none
/// of its IPs, is left out (its enrollment is retried).
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))] // the node agent's
pub(crate) fn find_pod_netns(
    proc: &Path,
    wanted: &HashMap<String, Vec<IpAddr>>,
) -> HashMap<String, Netns> {
    let host = std::fs::metadata(proc.join("self/ns/net")).ok();
    let in_host_netns = |pid: u32| {
        let ns = std::fs::metadata(proc.join(format!("{pid}/ns/net"))).ok();
        match (&host, ns) {
            (Some(h), Some(m)) => h.ino() == m.ino() && h.dev() == m.dev(),
            // Unreadable: not a candidate either.
            (_, None) => true,
            (None, Some(_)) => false,
        }
    };
    // UID → (start time, pid) of its oldest process outside the host's namespace.
    let mut oldest: HashMap<String, (u64, u32)> = HashMap::new();
    for p in pod_processes(proc, |uid| wanted.contains_key(uid)) {
        if in_host_netns(p.pid) {
            continue;
        }
        let slot = oldest.entry(p.uid).or_insert((p.started, p.pid));
        if (p.started, p.pid) < *slot {
            *slot = (p.started, p.pid);
        }
    }
    let mut found = HashMap::new();
    for (uid, (_, pid)) in oldest {
        let Ok(netns) = Netns::open(&proc.join(format!("{pid}/ns/net"))) else {
            continue;
        };
        let ips = &wanted[&uid];
        match netns.addresses() {
            Ok(have) if have.iter().any(|ip| ips.contains(ip)) => {
                found.insert(uid, netns);
            }
            Ok(_) => {
                tracing::warn!(pod = %uid, pid, "the namespace of the pod's oldest process holds none of its IPs; not enrolling it from there")
            }
            Err(e) => {
                tracing::debug!(pod = %uid, pid, error = %e, "cannot read the addresses of a pod's namespace")
            }
        }
    }
    found
}

/// Every network namespace of the node but the one `proc`'s `self` is in: those of its
/// processes, and those pinned under `pinned` (`/var/run/netns`, where container runtimes keep
/// a sandbox's namespace), each once. What an uninstall sweeps for rules.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))] // the node agent's
pub(crate) fn other_namespaces(proc: &Path, pinned: &Path) -> Vec<Netns> {
    let own = std::fs::metadata(proc.join("self/ns/net"))
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let processes = std::fs::read_dir(proc)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    let pins = std::fs::read_dir(pinned)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path());
    let mut seen = std::collections::HashSet::new();
    own.map(|o| seen.insert(o));
    let mut out = Vec::new();
    for path in processes.chain(pins) {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if let Ok(netns) = Netns::open(&path) {
            out.push(netns);
        }
    }
    out
}

#[cfg(test)]
mod tests;

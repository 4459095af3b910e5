//! `hboned-cni`, the chained CNI plugin of Kubernetes mode, and the little protocol it speaks
//! with the node agent. The container runtime runs the plugin as the CNI spec says: the
//! command and the pod in `CNI_*` environment variables, the network configuration (with the
//! previous plugin's result) on stdin, a result or an error as JSON on stdout. On ADD it asks
//! the agent, over the agent's Unix socket, to enroll the pod in `CNI_NETNS` and returns only
//! once the pod's listeners and rules are in — so the pod's first process starts captured — or
//! fails the ADD (the agent down, the enrollment failed): the runtime then tears the sandbox
//! down and retries, and no pod of an enrolled namespace runs uncaptured. DEL asks the agent to
//! let the pod go and never fails (the spec's rule for DEL; a pod's rules die with its
//! namespace). Pods that are not Kubernetes pods (no `K8S_POD_*` arguments) pass through.
//!
//! The wire between plugin and agent: one JSON [`Request`] line, one JSON [`Reply`] line.

use std::io::{BufRead, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The plugin's name in the network configuration (`"type"`) and its file in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "hboned-cni";
/// Where the agent listens for the plugin unless the network configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/hboned/cni.sock";
/// The CNI versions the plugin reads and writes.
pub const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0"];
/// How long the plugin waits for the agent's answer unless configured otherwise: the agent
/// hands the pod to the proxy and installs rules, which takes well under a second.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request or reply line.
pub const MAX_LINE: u64 = 64 * 1024;

/// What the plugin asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    pub pod_namespace: String,
    pub pod_name: String,
    /// `K8S_POD_UID` when the runtime passes it (containerd and CRI-O do).
    pub pod_uid: Option<String>,
    /// The pod's addresses, from the previous plugin's result (ADD only).
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Add,
    Del,
    Check,
}

/// The agent's answer: no error, or why the pod is not served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The network configuration fields the plugin reads (the rest is the runtime's).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    prev_result: Option<serde_json::Value>,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// A CNI error result (the spec's well-known codes).
#[derive(Debug)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

// The CNI spec's well-known error codes (containernetworking/cni SPEC.md, "Error"; 1–99 are
// the spec's, 100 and up a plugin's own).
/// Incompatible CNI version.
const INCOMPATIBLE_VERSION: u32 = 1;
/// Invalid necessary environment variables.
const INVALID_ENVIRONMENT: u32 = 4;
/// Failed to decode content.
const DECODE_FAILURE: u32 = 6;
/// Invalid network config.
const INVALID_CONFIG: u32 = 7;
/// Try again later: the agent is not there (yet).
const TRY_AGAIN_LATER: u32 = 11;
/// Plugin not available (STATUS).
const NOT_AVAILABLE: u32 = 50;
/// The agent refused the pod (a plugin-specific code, 100 and up).
const ENROLLMENT_FAILED: u32 = 100;

impl CniError {
    fn new(code: u32, msg: &str, details: impl std::fmt::Display) -> CniError {
        CniError {
            code,
            msg: msg.to_owned(),
            details: details.to_string(),
        }
    }
}

/// Runs the plugin once: `env` reads the environment, `stdin` holds the configuration,
/// `stdout` takes the result; returns the exit code. Diagnostics go to `stderr`.
pub fn run_plugin(
    env: impl Fn(&str) -> Option<String>,
    stdin: impl Read,
    mut stdout: impl Write,
    mut stderr: impl Write,
) -> i32 {
    let mut version = "1.0.0".to_owned();
    match plugin(&env, stdin, &mut version) {
        Ok(Some(out)) => {
            let _ = writeln!(stdout, "{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = writeln!(stderr, "{PLUGIN_TYPE}: {}: {}", e.msg, e.details);
            let error = serde_json::json!({
                "cniVersion": version,
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            });
            let _ = writeln!(stdout, "{error}");
            1
        }
    }
}

fn plugin(
    env: &impl Fn(&str) -> Option<String>,
    stdin: impl Read,
    version: &mut String,
) -> Result<Option<String>, CniError> {
    let command = env("CNI_COMMAND")
        .ok_or_else(|| CniError::new(INVALID_ENVIRONMENT, "CNI_COMMAND is not set", ""))?;
    if command == "VERSION" {
        let out = serde_json::json!({
            "cniVersion": SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
            "supportedVersions": SUPPORTED_VERSIONS,
        });
        return Ok(Some(out.to_string()));
    }
    let mut raw = Vec::new();
    stdin
        .take(MAX_LINE * 16)
        .read_to_end(&mut raw)
        .map_err(|e| CniError::new(DECODE_FAILURE, "cannot read the network configuration", e))?;
    let conf: NetConf = serde_json::from_slice(&raw)
        .map_err(|e| CniError::new(DECODE_FAILURE, "cannot decode the network configuration", e))?;
    version.clone_from(&conf.cni_version);
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            "unsupported CNI version",
            format!(
                "{} (supported: {})",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
    let timeout = conf
        .timeout_secs
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let command = match command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "STATUS" => {
            return match std::os::unix::net::UnixStream::connect(&socket) {
                Ok(_) => Ok(None),
                Err(e) => Err(CniError::new(
                    NOT_AVAILABLE,
                    "the hboned node agent is not reachable",
                    format!("{}: {e}", socket.display()),
                )),
            };
        }
        // Garbage collection (CNI 1.1): the agent sweeps on its own.
        "GC" => return Ok(None),
        other => {
            return Err(CniError::new(
                INVALID_ENVIRONMENT,
                "unknown CNI_COMMAND",
                other,
            ));
        }
    };
    let args = parse_args(&env("CNI_ARGS").unwrap_or_default());
    let pass_through = || -> Result<Option<String>, CniError> {
        match (command, &conf.prev_result) {
            (Command::Add, Some(prev)) => Ok(Some(result(prev, &conf.cni_version))),
            _ => Ok(None),
        }
    };
    let (Some(pod_namespace), Some(pod_name)) = (
        args.get("K8S_POD_NAMESPACE").cloned(),
        args.get("K8S_POD_NAME").cloned(),
    ) else {
        // Not a Kubernetes pod: nothing of ours.
        return pass_through();
    };
    let prev = match (command, &conf.prev_result) {
        (Command::Add, None) => {
            return Err(CniError::new(
                INVALID_CONFIG,
                "hboned-cni is a chained plugin: it needs a previous plugin's result",
                "put it after the network's main plugin in the conflist",
            ));
        }
        (_, prev) => prev,
    };
    let ips = prev.as_ref().map(prev_ips).transpose()?.unwrap_or_default();
    let request = Request {
        command,
        container_id: env("CNI_CONTAINERID").unwrap_or_default(),
        netns: env("CNI_NETNS").map(PathBuf::from).unwrap_or_default(),
        pod_namespace,
        pod_name,
        pod_uid: args.get("K8S_POD_UID").cloned(),
        ips,
    };
    if request.command != Command::Del && request.netns.as_os_str().is_empty() {
        return Err(CniError::new(
            INVALID_ENVIRONMENT,
            "CNI_NETNS is not set",
            "",
        ));
    }
    match ask(&socket, &request, timeout) {
        Ok(Reply { error: None }) => pass_through(),
        Ok(Reply { error: Some(e) }) => match command {
            // DEL does not fail: what it would remove goes with the namespace (SPEC.md, DEL:
            // "plugins should generally complete a DEL action without error even if some
            // resources are missing").
            Command::Del => Ok(None),
            _ => Err(CniError::new(
                ENROLLMENT_FAILED,
                "the hboned node agent did not enroll the pod",
                e,
            )),
        },
        Err(e) => match command {
            Command::Del => Ok(None),
            _ => Err(CniError::new(
                TRY_AGAIN_LATER,
                "the hboned node agent is not reachable; the pod cannot start uncaptured",
                e,
            )),
        },
    }
}

/// `K=V;K=V` (CNI_ARGS) as a map.
fn parse_args(args: &str) -> std::collections::BTreeMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The addresses of a previous result (`ips[].address`, CIDR notation).
fn prev_ips(prev: &serde_json::Value) -> Result<Vec<IpAddr>, CniError> {
    let mut out = Vec::new();
    for ip in prev
        .get("ips")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let address = ip.get("address").and_then(|a| a.as_str()).unwrap_or("");
        let host = address.split('/').next().unwrap_or("");
        let parsed = host.parse().map_err(|_| {
            CniError::new(
                DECODE_FAILURE,
                "the previous result holds an address that is not one",
                address,
            )
        })?;
        out.push(parsed);
    }
    out.sort_unstable();
    Ok(out)
}

/// The previous result, passed on in the configuration's version.
fn result(prev: &serde_json::Value, version: &str) -> String {
    let mut out = prev.clone();
    if let Some(obj) = out.as_object_mut() {
        obj.insert("cniVersion".into(), version.into());
    }
    out.to_string()
}

/// One request to the agent at `socket` and its reply.
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, String> {
    let mut conn = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    conn.write_all(&line)
        .map_err(|e| format!("cannot send to {}: {e}", socket.display()))?;
    let mut answer = String::new();
    std::io::BufReader::new(conn.take(MAX_LINE))
        .read_line(&mut answer)
        .map_err(|e| format!("no answer from {}: {e}", socket.display()))?;
    serde_json::from_str(&answer).map_err(|e| format!("cannot decode the agent's answer: {e}"))
}

#[cfg(test)]
mod tests;

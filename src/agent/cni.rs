//! The agent's side of the CNI plugin: the socket `hboned-cni` asks (one JSON request line, one
//! reply line, [`crate::cni`]), and the plugin's place in the node's CNI configuration.
//!
//! An ADD is decided here from the API server (the pod and its namespace, read afresh: the
//! watches may not have seen a pod that was just bound) and carried out by the enroller; when
//! the API server cannot be read the ADD fails, so a pod never starts uncaptured for lack of an
//! answer, and while no proxy holds the ZDS session (the pod's traffic would go to nobody).
//! The plugin is installed as istio-cni installs its own: its binary copied into the CNI
//! bin directory, an entry appended to the node's primary network configuration (the first
//! file by name in the conf directory, as the runtime picks it; a single-plugin `.conf` becomes
//! a `.conflist`), the entry put back when another agent rewrites the file, and both taken
//! out again on uninstall.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::cni::{Command, MAX_LINE, PLUGIN_TYPE, Reply, Request};
use crate::kube::enroll::{CniCall, LocalPod};
use crate::kube::pods::{LabelMatch, PodFacts, opted_in};

/// How long one API read may take before the ADD fails.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the enroller may take for one call.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(25);

/// What the endpoint needs to decide.
#[derive(Clone)]
pub struct Endpoint {
    pub client: kube::Client,
    pub labels: Vec<LabelMatch>,
    pub calls: mpsc::Sender<CniCall>,
    /// Whether a proxy holds the ZDS session: a new pod is enrolled only with one there.
    pub proxy: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Serves the plugin on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::UnixListener) {
        let endpoint = Arc::new(self);
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let endpoint = endpoint.clone();
                    tokio::spawn(async move { endpoint.answer(conn).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a CNI plugin connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn answer(&self, conn: tokio::net::UnixStream) {
        let (read, mut write) = conn.into_split();
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(read.take(MAX_LINE));
        let read = reader.read_line(&mut line);
        let reply = match tokio::time::timeout(API_TIMEOUT, read).await {
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    let result = self.decide(&request).await;
                    match &result {
                        Ok(()) => {
                            tracing::debug!(pod = %format!("{}/{}", request.pod_namespace, request.pod_name), command = ?request.command, "CNI call answered")
                        }
                        Err(e) => {
                            tracing::warn!(pod = %format!("{}/{}", request.pod_namespace, request.pod_name), command = ?request.command, error = %e, "CNI call failed")
                        }
                    }
                    Reply {
                        error: result.err(),
                    }
                }
                Err(e) => Reply {
                    error: Some(format!("cannot decode the plugin's request: {e}")),
                },
            },
            Ok(Err(e)) => Reply {
                error: Some(format!("cannot read the plugin's request: {e}")),
            },
            Err(_) => return,
        };
        let Ok(mut out) = serde_json::to_vec(&reply) else {
            return;
        };
        out.push(b'\n');
        let _ = write.write_all(&out).await;
    }

    async fn decide(&self, request: &Request) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let call = match request.command {
            Command::Add | Command::Check => {
                let Some((uid, pod)) = self.enrollable(request).await? else {
                    // Not ours to serve (namespace not opted in, the pod opted out).
                    return Ok(());
                };
                if request.command == Command::Add && !*self.proxy.borrow() {
                    return Err("no proxy is connected to the node agent: the pod would start with its traffic redirected to nobody".into());
                }
                if request.command == Command::Check {
                    CniCall::Check {
                        namespace: pod.namespace,
                        name: pod.name,
                        reply: tx,
                    }
                } else {
                    CniCall::Enroll {
                        uid,
                        pod,
                        netns: request.netns.clone(),
                        container_id: request.container_id.clone(),
                        reply: tx,
                    }
                }
            }
            Command::Del => CniCall::Release {
                uid: request.pod_uid.clone(),
                namespace: request.pod_namespace.clone(),
                name: request.pod_name.clone(),
                container_id: request.container_id.clone(),
                reply: tx,
            },
        };
        self.calls
            .send(call)
            .await
            .map_err(|_| "the node agent's enroller stopped".to_owned())?;
        match tokio::time::timeout(ENROLL_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the node agent's enroller dropped the call".into()),
            Err(_) => Err(format!("no enrollment within {ENROLL_TIMEOUT:?}")),
        }
    }

    /// The pod as the enroller takes it when the API server says it should be served.
    async fn enrollable(&self, request: &Request) -> Result<Option<(String, LocalPod)>, String> {
        let (namespace, name) = (&request.pod_namespace, &request.pod_name);
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), namespace);
        let namespaces: kube::Api<Namespace> = kube::Api::all(self.client.clone());
        let read = async { tokio::try_join!(pods.get(name), namespaces.get(namespace)) };
        let (pod, ns) = tokio::time::timeout(API_TIMEOUT, read)
            .await
            .map_err(|_| format!("the API server did not answer for pod {namespace}/{name} within {API_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot read pod {namespace}/{name} or its namespace from the API server: {e}"))?;
        let mut facts = PodFacts::of(&pod)
            .ok_or_else(|| format!("pod {namespace}/{name} from the API server has no uid"))?;
        if let Some(uid) = &request.pod_uid
            && *uid != facts.uid
        {
            return Err(format!(
                "pod {namespace}/{name} is {} at the API server, not {uid} (deleted and created again?)",
                facts.uid
            ));
        }
        // The addresses are the CNI's: the API server has none yet.
        facts.ips.clone_from(&request.ips);
        facts.terminal = false;
        let opted = opted_in(&self.labels, ns.metadata.labels.as_ref());
        if request.ips.is_empty() && opted && !facts.opted_out && !facts.host_network {
            // A pod to serve, but nothing to serve it by: refused, not let through uncaptured.
            return Err(format!(
                "the previous plugin's result names no address for pod {namespace}/{name}; it cannot be enrolled"
            ));
        }
        if !facts.enrollable(opted) {
            return Ok(None);
        }
        // Sorted, as the watches' view of the pod is: equal sets compare equal.
        let mut ips = request.ips.clone();
        ips.sort_unstable();
        let pod = LocalPod {
            name: facts.name,
            namespace: facts.namespace,
            service_account: facts.service_account,
            ips,
        };
        Ok(Some((facts.uid, pod)))
    }
}

/// Where the plugin goes on the node.
#[derive(Debug, Clone)]
pub struct Install {
    /// The runtime's CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The runtime's CNI plugin directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The plugin binary to copy there.
    pub plugin: PathBuf,
    /// The agent's socket, written into the plugin's entry.
    pub agent_socket: PathBuf,
}

/// Why the plugin cannot be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no CNI network configuration in {0} yet (the network's own plugin writes it first)")]
    NoConfig(PathBuf),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a CNI network configuration: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Install {
    /// The primary network configuration: the first `.conf`, `.conflist` or `.json` by name.
    pub fn primary(&self) -> Result<PathBuf, InstallError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(io(&self.conf_dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("conf" | "conflist" | "json")
                    )
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .next()
            .ok_or_else(|| InstallError::NoConfig(self.conf_dir.clone()))
    }

    fn entry(&self) -> serde_json::Value {
        serde_json::json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket,
        })
    }

    /// Copies the binary and adds the entry (replacing an older one of ours); true when the
    /// configuration changed.
    pub fn install(&self) -> Result<bool, InstallError> {
        let target = self.bin_dir.join(PLUGIN_TYPE);
        let staged = self.bin_dir.join(format!(".{PLUGIN_TYPE}.new"));
        std::fs::create_dir_all(&self.bin_dir).map_err(io(&self.bin_dir))?;
        std::fs::copy(&self.plugin, &staged).map_err(io(&self.plugin))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))
                .map_err(io(&staged))?;
        }
        std::fs::rename(&staged, &target).map_err(io(&target))?;
        let path = self.primary()?;
        let conf = read_json(&path)?;
        let wanted = with_plugin(&conf, self.entry()).map_err(|reason| InstallError::Invalid {
            path: path.clone(),
            reason,
        })?;
        if wanted == conf {
            return Ok(false);
        }
        // A single-plugin `.conf` is written back as a `.conflist` of the same name.
        let out = if path.extension().is_some_and(|e| e == "conflist") {
            path.clone()
        } else {
            path.with_extension("conflist")
        };
        write_json(&out, &wanted)?;
        if out != path {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        tracing::info!(conf = %out.display(), "hboned-cni added to the node's CNI configuration");
        Ok(true)
    }

    /// Takes the entry out of the primary configuration and the binary out of the bin dir.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        match self.primary() {
            Ok(path) => {
                let conf = read_json(&path)?;
                let without = without_plugin(&conf);
                if without != conf {
                    write_json(&path, &without)?;
                    tracing::info!(conf = %path.display(), "hboned-cni taken out of the node's CNI configuration");
                }
            }
            Err(InstallError::NoConfig(_)) => {}
            Err(e) => return Err(e),
        }
        let target = self.bin_dir.join(PLUGIN_TYPE);
        match std::fs::remove_file(&target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&target)(e)),
        }
    }

    /// Keeps the entry in place (another agent may rewrite the file), checking every `every`;
    /// `installed` says whether it is in.
    pub async fn keep(self, every: Duration, installed: tokio::sync::watch::Sender<bool>) {
        loop {
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.install()).await {
                Ok(Ok(_)) => {
                    installed.send_replace(true);
                }
                Ok(Err(e)) => {
                    installed.send_replace(false);
                    tracing::warn!(error = %e, "cannot install hboned-cni; pods start without enrollment at ADD until it is");
                }
                Err(e) => tracing::error!(error = %e, "the CNI install task failed"),
            }
            tokio::time::sleep(every).await;
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, InstallError> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| InstallError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes through a temporary file and a rename: the runtime never reads half a file.
fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), InstallError> {
    let staged = path.with_extension("hboned.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| InstallError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    std::fs::write(&staged, text).map_err(io(&staged))?;
    std::fs::rename(&staged, path).map_err(io(path))
}

/// `conf` with `entry` last in its plugin list (a single-plugin configuration made a list).
fn with_plugin(
    conf: &serde_json::Value,
    entry: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let obj = conf.as_object().ok_or("not a JSON object")?;
    let mut out = if let Some(plugins) = obj.get("plugins") {
        if !plugins.is_array() {
            return Err("\"plugins\" is not a list".into());
        }
        conf.clone()
    } else if obj.contains_key("type") {
        let mut single = obj.clone();
        single.remove("cniVersion");
        single.remove("name");
        serde_json::json!({
            "cniVersion": obj.get("cniVersion").cloned().unwrap_or("1.0.0".into()),
            "name": obj.get("name").cloned().unwrap_or("k8s-pod-network".into()),
            "plugins": [serde_json::Value::Object(single)],
        })
    } else {
        return Err("neither \"plugins\" nor \"type\"".into());
    };
    let out_plugins = out["plugins"]
        .as_array_mut()
        .ok_or("\"plugins\" is not a list")?;
    out_plugins.retain(|p| p.get("type").and_then(|t| t.as_str()) != Some(PLUGIN_TYPE));
    out_plugins.push(entry);
    Ok(out)
}

/// `conf` without any entry of ours.
fn without_plugin(conf: &serde_json::Value) -> serde_json::Value {
    let mut out = conf.clone();
    if let Some(plugins) = out.get_mut("plugins").and_then(|p| p.as_array_mut()) {
        plugins.retain(|p| p.get("type").and_then(|t| t.as_str()) != Some(PLUGIN_TYPE));
    }
    out
}

#[cfg(test)]
mod tests;

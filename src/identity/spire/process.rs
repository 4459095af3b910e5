//! Finding the process SPIRE attests a pod from: an application container's, never the sandbox
//! (pause), whose process is in no container of the pod's status and so gets no selectors from
//! SPIRE's Kubernetes attestor. As Cilium's ztunnel does it (cilium/ztunnel
//! `src/container_runtime.rs`): ask the container runtime over CRI when its socket exists
//! (ListPodSandbox by the `io.kubernetes.pod.uid` label, ListContainers of that sandbox,
//! ContainerStatus with verbose info, whose `info` JSON holds the container's `pid`), else
//! scan `/proc` for the pod's processes by the UID in their cgroup path ([`crate::procfs`]).
//! The delegate must make sure the PID still is the pod's after SPIRE answered (PIDs are
//! reused: spire `pkg/agent/api/delegatedidentity/v1/service.go`, SubscribeToX509SVIDs);
//! [`PodProcesses::still_of`] is that check.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::proto::cri::runtime_service_client::RuntimeServiceClient;
use crate::proto::cri::{
    ContainerFilter, ContainerState, ContainerStateValue, ContainerStatusRequest,
    ListContainersRequest, ListPodSandboxRequest, PodSandboxFilter, PodSandboxState,
};

/// The label every runtime sets on a pod's sandbox: the pod's UID (kubelet's
/// `kubelet/types/labels.go`, KubernetesPodUIDLabel).
const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
/// How long one CRI call may take.
const CRI_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a pod's processes could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "the container runtime at {socket} answered {call} with an error (is CONTAINER_RUNTIME_SOCK_PATH the runtime's CRI socket?)"
    )]
    Cri {
        socket: PathBuf,
        call: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error(
        "the container runtime has no status info for container {container} (runtimes other than containerd and CRI-O may not report a pid)"
    )]
    NoInfo { container: String },
    #[error("the container runtime's info for container {container} holds no pid")]
    Info {
        container: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A pod's process as SPIRE was given it: checked again once SPIRE answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPid {
    pub pod_uid: String,
    pub pid: u32,
}

/// Where a pod's application processes are found: the container runtime (CRI) when its socket
/// exists, else `/proc`.
#[derive(Debug, Clone)]
pub struct PodProcesses {
    cri_socket: PathBuf,
    cri: tonic::transport::Channel,
    proc: PathBuf,
}

impl PodProcesses {
    /// The runtime's CRI socket (`CONTAINER_RUNTIME_SOCK_PATH`, containerd's
    /// `/run/containerd/containerd.sock` by default) and the host's `/proc` (hostPID).
    pub fn new(cri_socket: PathBuf, proc: PathBuf) -> Self {
        let cri = crate::control_plane::Target::unix(cri_socket.clone())
            .with(|e| e.timeout(CRI_TIMEOUT))
            .connect_lazy();
        PodProcesses {
            cri_socket,
            cri,
            proc,
        }
    }

    /// The pids of pod `uid`'s application containers, the first one preferred. The runtime's
    /// socket is looked for at every call: a runtime that starts later is used from then on.
    pub async fn pids(&self, uid: &str) -> Result<Vec<u32>, ProcessError> {
        if self.cri_socket.exists() {
            self.ask_runtime(uid).await
        } else {
            Ok(crate::procfs::application_pids(&self.proc, uid))
        }
    }

    /// Whether `p.pid` still is a process of its pod.
    pub async fn still_of(&self, p: &PodPid) -> Result<bool, ProcessError> {
        Ok(self.pids(&p.pod_uid).await?.contains(&p.pid))
    }

    /// The ready sandbox of the pod, its running containers (oldest first), each one's pid.
    async fn ask_runtime(&self, uid: &str) -> Result<Vec<u32>, ProcessError> {
        let mut client = RuntimeServiceClient::new(self.cri.clone());
        let err = |call: &'static str| {
            let socket = self.cri_socket.clone();
            move |status| ProcessError::Cri {
                socket,
                call,
                status,
            }
        };
        let filter = PodSandboxFilter {
            label_selector: HashMap::from([(POD_UID_LABEL.to_owned(), uid.to_owned())]),
            ..Default::default()
        };
        let sandboxes = client
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(filter),
            })
            .await
            .map_err(err("ListPodSandbox"))?
            .into_inner()
            .items;
        // A pod whose sandbox was replaced has the old one NOTREADY beside the new.
        let Some(sandbox) = sandboxes
            .iter()
            .filter(|s| s.state == PodSandboxState::SandboxReady as i32)
            .max_by_key(|s| s.created_at)
        else {
            return Ok(Vec::new());
        };
        let mut containers = client
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: sandbox.id.clone(),
                    state: Some(ContainerStateValue {
                        state: ContainerState::ContainerRunning as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await
            .map_err(err("ListContainers"))?
            .into_inner()
            .containers;
        containers.sort_by_key(|c| c.created_at);
        let mut pids = Vec::with_capacity(containers.len());
        for container in containers {
            let status = client
                .container_status(ContainerStatusRequest {
                    container_id: container.id.clone(),
                    verbose: true,
                })
                .await
                .map_err(err("ContainerStatus"))?
                .into_inner();
            let pid = container_pid(&container.id, &status.info)?;
            // 0: the container's process is gone (containerd reports it so once exited).
            if pid != 0 {
                pids.push(pid);
            }
        }
        Ok(pids)
    }
}

/// The pid in a verbose ContainerStatus's `info`: a JSON document under `info` with a `pid`
/// field (containerd `internal/cri/server/container_status.go`, toCRIContainerInfo; CRI-O
/// `server/container_status.go` writes the same key).
fn container_pid(container: &str, info: &HashMap<String, String>) -> Result<u32, ProcessError> {
    #[derive(serde::Deserialize)]
    struct Info {
        pid: u32,
    }
    let json = info.get("info").ok_or_else(|| ProcessError::NoInfo {
        container: container.to_owned(),
    })?;
    let parsed: Info = serde_json::from_str(json).map_err(|source| ProcessError::Info {
        container: container.to_owned(),
        source,
    })?;
    Ok(parsed.pid)
}

#[cfg(test)]
mod tests;

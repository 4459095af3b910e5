//! Tests of the PID lookup: the CRI calls against a runtime that answers as containerd does
//! (a tonic server of the same protos here; `tests/real_cilium.rs` runs one built on the CRI's
//! own Go types), the `/proc` fallback, and the runtime's info parsed as containerd writes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_stream::wrappers::UnixListenerStream;

use super::*;
use crate::proto::cri::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use crate::proto::cri::*;

const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

/// A runtime with one pod: an old NOTREADY sandbox, the ready one, its two running containers
/// (the second created first) and an exited init container; what it was asked is recorded.
#[derive(Default, Clone)]
struct Containerd {
    calls: Arc<Mutex<Vec<String>>>,
    /// The `info` JSON per container id.
    info: HashMap<String, String>,
}

#[tonic::async_trait]
impl RuntimeService for Containerd {
    async fn list_pod_sandbox(
        &self,
        request: tonic::Request<ListPodSandboxRequest>,
    ) -> Result<tonic::Response<ListPodSandboxResponse>, tonic::Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let uid = filter
            .label_selector
            .get(POD_UID_LABEL)
            .cloned()
            .unwrap_or_default();
        self.calls
            .lock()
            .unwrap()
            .push(format!("ListPodSandbox {uid}"));
        let items = if uid == UID {
            vec![
                PodSandbox {
                    id: "old".into(),
                    state: PodSandboxState::SandboxNotready as i32,
                    created_at: 1,
                    ..Default::default()
                },
                PodSandbox {
                    id: "sb".into(),
                    state: PodSandboxState::SandboxReady as i32,
                    created_at: 2,
                    ..Default::default()
                },
            ]
        } else {
            Vec::new()
        };
        Ok(tonic::Response::new(ListPodSandboxResponse { items }))
    }

    async fn list_containers(
        &self,
        request: tonic::Request<ListContainersRequest>,
    ) -> Result<tonic::Response<ListContainersResponse>, tonic::Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let running_only = filter
            .state
            .is_some_and(|s| s.state == ContainerState::ContainerRunning as i32);
        self.calls.lock().unwrap().push(format!(
            "ListContainers {} running={running_only}",
            filter.pod_sandbox_id
        ));
        let all = [
            ("app", 20, ContainerState::ContainerRunning),
            ("sidecar", 10, ContainerState::ContainerRunning),
            ("init", 5, ContainerState::ContainerExited),
        ];
        let containers = all
            .into_iter()
            .filter(|(_, _, state)| !running_only || *state == ContainerState::ContainerRunning)
            .filter(|_| filter.pod_sandbox_id == "sb")
            .map(|(id, created_at, state)| Container {
                id: id.into(),
                pod_sandbox_id: "sb".into(),
                state: state as i32,
                created_at,
            })
            .collect();
        Ok(tonic::Response::new(ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: tonic::Request<ContainerStatusRequest>,
    ) -> Result<tonic::Response<ContainerStatusResponse>, tonic::Status> {
        let request = request.into_inner();
        self.calls.lock().unwrap().push(format!(
            "ContainerStatus {} verbose={}",
            request.container_id, request.verbose
        ));
        let mut info = HashMap::new();
        if request.verbose
            && let Some(json) = self.info.get(&request.container_id)
        {
            info.insert("info".to_owned(), json.clone());
        }
        Ok(tonic::Response::new(ContainerStatusResponse {
            status: None,
            info,
        }))
    }
}

/// containerd's verbose info document (toCRIContainerInfo), trimmed to a few of its fields.
fn containerd_info(pid: u32) -> String {
    format!(
        r#"{{"sandboxID":"sb","pid":{pid},"removing":false,"snapshotKey":"k","snapshotter":"overlayfs","runtimeType":"io.containerd.runc.v2","runtimeOptions":null,"config":{{}},"runtimeSpec":{{}}}}"#
    )
}

async fn serve(runtime: Containerd) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("containerd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(runtime))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    (dir, socket)
}

#[tokio::test]
async fn the_runtime_names_the_running_containers_pids_of_the_ready_sandbox() {
    let runtime = Containerd {
        info: HashMap::from([
            ("app".to_owned(), containerd_info(4242)),
            ("sidecar".to_owned(), containerd_info(4100)),
        ]),
        ..Default::default()
    };
    let calls = runtime.calls.clone();
    let (_dir, socket) = serve(runtime).await;
    let processes = PodProcesses::new(socket, PathBuf::from("/nonexistent"));
    // Oldest container first; the exited init container is not asked for.
    assert_eq!(processes.pids(UID).await.unwrap(), vec![4100, 4242]);
    assert_eq!(
        *calls.lock().unwrap(),
        [
            format!("ListPodSandbox {UID}"),
            "ListContainers sb running=true".into(),
            "ContainerStatus sidecar verbose=true".into(),
            "ContainerStatus app verbose=true".into(),
        ]
    );
    let pod = |pid| PodPid {
        pod_uid: UID.into(),
        pid,
    };
    assert!(processes.still_of(&pod(4242)).await.unwrap());
    assert!(
        !processes.still_of(&pod(4243)).await.unwrap(),
        "a pid no longer the pod's"
    );
    // A pod the runtime does not know has no process.
    assert!(
        processes
            .pids("11111111-2222-3333-4444-555555555555")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_runtime_without_a_pid_in_its_info_is_an_error_naming_the_container() {
    let runtime = Containerd {
        info: HashMap::from([("sidecar".to_owned(), r#"{"sandboxID":"sb"}"#.to_owned())]),
        ..Default::default()
    };
    let (_dir, socket) = serve(runtime).await;
    let processes = PodProcesses::new(socket, PathBuf::from("/nonexistent"));
    let err = processes.pids(UID).await.unwrap_err();
    assert!(
        matches!(&err, ProcessError::Info { container, .. } if container == "sidecar"),
        "{err}"
    );
}

#[tokio::test]
async fn without_the_runtime_socket_proc_is_scanned() {
    let proc = tempfile::tempdir().unwrap();
    let dir = proc.path().join("77");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup"), format!("0::/kubepods/pod{UID}/app\n")).unwrap();
    std::fs::write(
        dir.join("stat"),
        "77 (server) S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 500 1 1",
    )
    .unwrap();
    std::fs::write(dir.join("comm"), "server\n").unwrap();
    let processes = PodProcesses::new(proc.path().join("no-runtime.sock"), proc.path().to_owned());
    assert_eq!(processes.pids(UID).await.unwrap(), vec![77]);
}

#[test]
fn the_pid_is_read_from_the_info_document() {
    let info = HashMap::from([("info".to_owned(), containerd_info(31))]);
    assert_eq!(container_pid("c", &info).unwrap(), 31);
    assert!(matches!(
        container_pid("c", &HashMap::new()),
        Err(ProcessError::NoInfo { .. })
    ));
    let bad = HashMap::from([("info".to_owned(), "not json".to_owned())]);
    assert!(matches!(
        container_pid("c", &bad),
        Err(ProcessError::Info { .. })
    ));
    let negative = HashMap::from([("info".to_owned(), r#"{"pid":-1}"#.to_owned())]);
    assert!(container_pid("c", &negative).is_err());
}

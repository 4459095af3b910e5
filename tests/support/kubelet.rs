//! What the container runtime leaves on a node for a pod, as Kubernetes mode looks for it: a
//! process (the sandbox's "pause", here `sleep`) inside the pod's network namespace, in a
//! cgroup whose path names the pod's UID the way kubelet's cgroupfs driver does
//! (`.../kubepods/besteffort/pod<uid>/<container id>`). Made under a test-owned directory of a
//! writable cgroup hierarchy; the process is killed and the directories removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One pod's sandbox process.
pub(crate) struct PodProcess {
    child: Child,
    /// Directories made, innermost first (removed in this order).
    dirs: Vec<PathBuf>,
}

/// The first cgroup hierarchy this machine lets us make groups in: v2 (unified), or v1's
/// `pids` controller, whichever is mounted.
fn hierarchy() -> PathBuf {
    for candidate in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup",
    ] {
        let p = Path::new(candidate);
        if p.join("cgroup.procs").exists() {
            return p.to_owned();
        }
    }
    panic!("no writable cgroup hierarchy under /sys/fs/cgroup");
}

impl PodProcess {
    /// Starts the pod's process in netns `netns` (a name under /var/run/netns), in a cgroup
    /// named after `uid`; `scope` keeps different tests' groups apart.
    pub(crate) fn start(netns: &str, uid: &str, scope: &str) -> PodProcess {
        Self::start_as(netns, uid, scope, None)
    }

    /// Like [`PodProcess::start`], the process running as user and group `user` (an app
    /// container's process, as SPIRE's unix attestor sees it).
    pub(crate) fn start_as(netns: &str, uid: &str, scope: &str, user: Option<u32>) -> PodProcess {
        let root = hierarchy().join(format!("hboned-test-{scope}"));
        let pod_dir = root.join("kubepods/besteffort").join(format!("pod{uid}"));
        let container = pod_dir.join(format!("{:0>64}", uid.replace('-', "")));
        std::fs::create_dir_all(&container).unwrap();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]);
        if let Some(user) = user {
            let id = user.to_string();
            command.args(["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"]);
        }
        let child = command
            .args(["sleep", "100000"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // `ip netns exec` (and setpriv) exec the command: the child is the sleep itself.
        std::fs::write(container.join("cgroup.procs"), child.id().to_string()).unwrap();
        let mut dirs = vec![container, pod_dir.clone()];
        let mut up = pod_dir.parent().map(Path::to_owned);
        while let Some(dir) = up {
            if !dir.starts_with(&root) {
                break;
            }
            up = dir.parent().map(Path::to_owned);
            dirs.push(dir);
        }
        PodProcess { child, dirs }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in &self.dirs {
            // Fails while another pod of the same scope still has its group below: that one
            // removes the shared parents when it goes.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

//! Tests of `procfs`: cgroup paths as each runtime and cgroup driver writes them.

use super::*;

const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

#[test]
fn the_pod_uid_is_read_from_every_cgroup_layout() {
    let cases = [
        // cgroupfs driver, v1
        "11:pids:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961",
        // systemd driver, v2, containerd
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-9bca8d63d5fa61.scope",
        // seen through a cgroup namespace
        "0::/../../pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961",
        // docker in docker (kind)
        "1:name=systemd:/docker/8d461fa5/kubepods/besteffort/pod2c48913c-b29f-11e7-9350-020968147796/aff34703e5e1",
        // upper-case hex is canonicalised
        "0::/kubepods/pod2C48913C-B29F-11E7-9350-020968147796/abc",
    ];
    for text in cases {
        assert_eq!(pod_uid(text).as_deref(), Some(UID), "{text}");
    }
    // Several hierarchies naming the same pod agree.
    let v1 = format!("12:memory:/kubepods/pod{UID}/c1\n11:pids:/kubepods/pod{UID}/c1\n0::/\n");
    assert_eq!(pod_uid(&v1).as_deref(), Some(UID));
}

#[test]
fn paths_that_name_no_pod_or_two_pods_give_none() {
    for text in [
        "",
        "0::/",
        "0::/system.slice/containerd.service",
        // the pod's own directory, nothing after it
        "0::/kubepods/pod2c48913c-b29f-11e7-9350-020968147796/",
        // not preceded by punctuation
        "0::/kubepodspod2c48913c-b29f-11e7-9350-020968147796/abc",
        // too short
        "0::/kubepods/pod2c48913c-b29f-11e7-9350-02096814779/abc",
        // no colon-separated path at all
        "garbage",
    ] {
        assert_eq!(pod_uid(text), None, "{text:?}");
    }
    let two = format!(
        "1:pids:/kubepods/pod{UID}/c\n2:memory:/kubepods/pod11111111-2222-3333-4444-555555555555/c\n"
    );
    assert_eq!(pod_uid(&two), None);
}

#[test]
fn the_start_time_is_read_after_the_command_name() {
    let stat =
        "4242 (pause (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
    assert_eq!(start_time(stat), Some(987654));
    assert_eq!(start_time("1 (init) S 0"), None);
    assert_eq!(start_time("no paren"), None);
}

#[test]
fn a_scan_of_an_empty_or_missing_proc_finds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wanted = HashMap::from([(UID.to_owned(), vec!["10.0.0.1".parse().unwrap()])]);
    assert!(find_pod_netns(dir.path(), &wanted).is_empty());
    assert!(find_pod_netns(&dir.path().join("missing"), &wanted).is_empty());
    // This process is in no pod: the real /proc yields nothing for a made-up UID.
    assert!(find_pod_netns(Path::new("/proc"), &wanted).is_empty());
}

/// A process directory as `/proc/PID` shows it: its cgroup file, stat (start time) and comm.
fn fake_process(proc: &Path, pid: u32, cgroup: &str, started: u64, comm: &str) {
    let dir = proc.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup"), cgroup).unwrap();
    let stat = format!(
        "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {started} 1000 10"
    );
    std::fs::write(dir.join("stat"), stat).unwrap();
    std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
}

#[test]
fn application_processes_leave_out_the_sandbox_and_other_pods() {
    let proc = tempfile::tempdir().unwrap();
    let other = "11111111-2222-3333-4444-555555555555";
    let path =
        |uid: &str, container: &str| format!("0::/kubepods/besteffort/pod{uid}/{container}\n");
    // The sandbox is the pod's oldest process; the app's sidecar started after its main process.
    fake_process(proc.path(), 40, &path(UID, "sandbox"), 100, "pause");
    fake_process(proc.path(), 57, &path(UID, "sidecar"), 300, "envoy");
    fake_process(proc.path(), 55, &path(UID, "app"), 200, "server");
    fake_process(proc.path(), 60, &path(other, "app"), 50, "server");
    fake_process(
        proc.path(),
        70,
        "0::/system.slice/containerd.service\n",
        10,
        "containerd",
    );
    assert_eq!(application_pids(proc.path(), UID), vec![55, 57]);
    assert_eq!(application_pids(proc.path(), other), vec![60]);
    // A pod with only its sandbox running has no process to attest.
    let only_sandbox = tempfile::tempdir().unwrap();
    fake_process(only_sandbox.path(), 40, &path(UID, "sandbox"), 100, "pause");
    assert!(application_pids(only_sandbox.path(), UID).is_empty());
    let all = pod_processes(proc.path(), |_| true);
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.iter().any(|p| p.pid == 40 && p.sandbox));
}

//! Tests of `kube::procfs`: cgroup paths as each runtime and cgroup driver writes them.

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

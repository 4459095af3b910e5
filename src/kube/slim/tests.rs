//! The slim pod reads what the full one does, and nothing more.

use super::*;
use crate::kube::pods::PodFacts;

const POD: &str = r#"{
  "metadata": {
    "name": "web-7d9f8c6b5-x2x9q", "namespace": "shop", "uid": "6f1c0c3e-0000-4000-8000-000000000001",
    "resourceVersion": "4711", "generateName": "web-7d9f8c6b5-",
    "labels": {"app": "web", "pod-template-hash": "7d9f8c6b5", "version": "v3", "hboned.io/dataplane-mode": "none"},
    "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-30T09:59:00Z",
      "hboned.io/redirection": "enabled", "checksum/config": "abc\"def"},
    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5",
      "uid": "u-rs", "controller": true, "blockOwnerDeletion": true}],
    "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1",
      "fieldsV1": {"f:status": {"f:podIPs": {".": {}}}}}]
  },
  "spec": {
    "nodeName": "node-3", "serviceAccountName": "web", "hostNetwork": false,
    "containers": [{"name": "app", "image": "web:3", "env": [{"name": "A", "value": "1"}]}],
    "volumes": [{"name": "data", "emptyDir": {}}]
  },
  "status": {
    "phase": "Running", "podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}],
    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-30T10:00:00Z"}],
    "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "web:3",
      "imageID": "x", "state": {"running": {"startedAt": "2026-11-30T10:00:00Z"}}}]
  }
}"#;

#[test]
fn the_slim_pod_gives_the_same_facts_as_the_whole_one() {
    let full: Pod = serde_json::from_str(POD).unwrap();
    let slim: SlimPod = serde_json::from_str(POD).unwrap();
    let facts = PodFacts::of(&slim.0).unwrap();
    assert_eq!(facts, PodFacts::of(&full).unwrap());
    assert!(facts.redirected && facts.opted_out && facts.ready);
    assert_eq!(facts.workload_name, "web");
    assert_eq!(facts.ips.len(), 2);
    // Nothing else is kept.
    let meta = &slim.0.metadata;
    assert_eq!(
        meta.annotations
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["hboned.io/redirection"]
    );
    assert!(meta.managed_fields.is_none() && meta.generate_name.is_none());
    assert!(slim.0.spec.as_ref().unwrap().containers.is_empty());
    assert!(slim.0.status.as_ref().unwrap().container_statuses.is_none());
    use kube::Resource;
    assert_eq!(SlimPod::url_path(&(), None), "/api/v1/pods");
    assert_eq!(slim.meta().resource_version.as_deref(), Some("4711"));
}

#[test]
fn a_pod_with_little_or_odd_content_still_reads() {
    let bare: SlimPod =
        serde_json::from_str(r#"{"metadata": {"name": "p", "annotations": null}}"#).unwrap();
    assert_eq!(bare.0.metadata.name.as_deref(), Some("p"));
    assert!(bare.0.metadata.annotations.is_none());
    assert!(PodFacts::of(&bare.0).is_none(), "no uid: not a pod to keep");
    // A wrong type where hboned reads is an error, as with the whole Pod.
    assert!(serde_json::from_str::<SlimPod>(r#"{"spec": {"hostNetwork": "yes"}}"#).is_err());
    assert!(serde_json::from_str::<Pod>(r#"{"spec": {"hostNetwork": "yes"}}"#).is_err());
}

//! The manifests tell one story each. deploy/standalone/: the ConfigMap holds a valid agent
//! config (Kubernetes mode) and a proxy config that follows the agent's sockets with SPIRE,
//! the SPIRE ClusterSPIFFEID selects the namespaces the config opts in and names pods as hboned
//! expects, the agent's DaemonSet gives enrollment what it needs, the proxy's holds three
//! capabilities and nothing of the host, and the RBAC (the agent's alone) reads what the
//! watches need and nothing more. deploy/cilium/:
//! the environment is Cilium's chart's plus SPIRE, and what it names is mounted. (The Kubernetes
//! schemas are checked by kubernetes-validate in .ci/run; it has none for SPIRE's CRD.)

#![allow(clippy::unwrap_used)]

use serde_yaml_ng::Value;

fn documents(file: &str) -> Vec<Value> {
    manifests(&format!("standalone/{file}"))
}

fn manifests(file: &str) -> Vec<Value> {
    let text =
        std::fs::read_to_string(format!("{}/deploy/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn parsed(key: &str) -> hboned::config::Config {
    let map = &documents("configmap.yaml")[0];
    let text = map["data"][key].as_str().unwrap();
    let env = |k: &str| (k == "HBONED_NODE").then(|| "node-1".to_owned());
    hboned::config::Config::parse(text, &env).unwrap()
}

/// The agent's config.
fn config() -> hboned::config::Config {
    parsed("agent.yaml")
}

/// Where a container's volumes are mounted.
fn mount_paths(container: &Value) -> Vec<&str> {
    container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect()
}

/// One of deploy/standalone/daemonset.yaml's DaemonSets, by name.
fn daemonset(name: &str) -> Value {
    documents("daemonset.yaml")
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap()
}

#[test]
fn the_agent_is_kubernetes_mode_and_the_proxy_follows_its_sockets_with_spire() {
    let agent = config();
    assert!(agent.kubernetes.is_some());
    let cni = agent.agent.cni.as_ref().expect("the plugin is installed");
    let proxy = parsed("proxy.yaml");
    assert!(proxy.kubernetes.is_none());
    assert_eq!(proxy.zds_socket.as_ref(), Some(&agent.agent.zds_socket));
    assert_eq!(
        proxy.xds.address,
        format!("unix://{}", agent.agent.xds_socket.display())
    );
    assert!(proxy.refuse_mesh_plaintext);
    assert_eq!(
        proxy.certificates.kind(false),
        hboned::config::CertSourceKind::Spire
    );
    // The agent's mounts hold its sockets and the CNI directories it names.
    let pod = &daemonset("hboned-agent")["spec"]["template"]["spec"];
    let mounts = mount_paths(&pod["containers"][0]);
    for path in [&cni.conf_dir, &cni.bin_dir] {
        assert!(
            mounts.contains(&path.to_str().unwrap()),
            "{path:?} not mounted"
        );
    }
    let sockets = agent.agent.zds_socket.parent().unwrap().to_str().unwrap();
    assert!(mounts.contains(&sockets));
    // The proxy's user is the one the agent hands the sockets to.
    let command = &daemonset("hboned")["spec"]["template"]["spec"]["containers"][0]["command"];
    let reuid = format!("--reuid={}", agent.agent.proxy_uid.unwrap());
    assert!(
        command
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a.as_str() == Some(&reuid)),
        "{command:?}"
    );
}

#[test]
fn the_proxy_holds_three_capabilities_and_nothing_of_the_host() {
    let ds = daemonset("hboned");
    let pod = &ds["spec"]["template"]["spec"];
    for key in ["hostPID", "hostNetwork", "hostIPC"] {
        assert!(pod[key].is_null() || pod[key] == false, "{key} set");
    }
    assert_eq!(pod["automountServiceAccountToken"], false);
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    // setpriv spends SETUID, SETGID and SETPCAP and keeps the three.
    let command: Vec<&str> = container["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "setpriv");
    let three = "-all,+net_admin,+net_raw,+sys_admin";
    for flag in ["--inh-caps", "--ambient-caps", "--bounding-set"] {
        assert!(
            command.contains(&format!("{flag}={three}").as_str()),
            "{command:?}"
        );
    }
    assert!(!command.iter().any(|a| a.starts_with("--reuid=0")));
    let mounts = mount_paths(container);
    assert_eq!(
        mounts,
        ["/etc/hboned", "/var/run/hboned", "/run/spire/sockets"]
    );
}

#[test]
fn spire_names_the_pods_of_the_namespaces_the_config_opts_in() {
    let labels = config().kubernetes.unwrap().namespace_labels;
    let ids = documents("spire.yaml");
    let mesh = ids
        .iter()
        .find(|d| d["metadata"]["name"] == "hboned-mesh")
        .unwrap();
    assert_eq!(mesh["kind"], "ClusterSPIFFEID");
    assert_eq!(mesh["apiVersion"], "spire.spiffe.io/v1alpha1");
    let selector = mesh["spec"]["namespaceSelector"]["matchLabels"]
        .as_mapping()
        .unwrap();
    let selected: Vec<String> = selector
        .iter()
        .map(|(k, v)| format!("{}={}", k.as_str().unwrap(), v.as_str().unwrap()))
        .collect();
    assert_eq!(
        selected, labels,
        "ClusterSPIFFEID and config select different namespaces"
    );
    // The template, filled in as the controller manager does, is the identity hboned uses.
    let template = mesh["spec"]["spiffeIDTemplate"].as_str().unwrap();
    let id = template
        .replace("{{ .TrustDomain }}", "cluster.local")
        .replace("{{ .PodMeta.Namespace }}", "shop")
        .replace("{{ .PodSpec.ServiceAccountName }}", "web");
    let want = hboned::identity::Identity::new("cluster.local", "shop", "web").unwrap();
    assert_eq!(id, want.to_string());
    // The proxy's own identity, the delegate the SPIRE agent must authorize.
    assert!(
        ids.iter()
            .any(|d| d["metadata"]["name"] == "hboned-delegate")
    );
}

#[test]
fn the_agent_gives_enrollment_what_it_needs_and_rbac_no_more() {
    let ds = daemonset("hboned-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"], true,
        "pods that ran before the plugin are found from their processes"
    );
    assert_eq!(
        pod["hostNetwork"], true,
        "the probe rule lives in the node's namespace"
    );
    let mounts = mount_paths(&pod["containers"][0]);
    for path in ["/run/hboned", "/var/run/netns", "/run/xtables.lock"] {
        assert!(mounts.contains(&path), "{path} not mounted: {mounts:?}");
    }
    // The RBAC is bound to the agent's account, not the proxy's.
    let binding = documents("rbac.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap();
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);
    assert_ne!(
        binding["subjects"][0]["name"],
        daemonset("hboned")["spec"]["template"]["spec"]["serviceAccountName"]
    );
    // Exactly what the config's watches and the enrollment record need.
    let services = config().kubernetes.unwrap().services;
    assert!(services, "cluster IPs translated by default");
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for doc in documents("rbac.yaml")
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
    {
        for rule in doc["rules"].as_sequence().unwrap() {
            let list = |key: &str| -> Vec<String> {
                rule[key]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        granted.push((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    granted.sort();
    let mut needed: Vec<(String, String, String)> = Vec::new();
    let mut need = |group: &str, resource: &str, verbs: &[&str]| {
        for verb in verbs {
            needed.push((group.into(), resource.into(), (*verb).into()));
        }
    };
    let read = ["get", "list", "watch"];
    need("", "pods", &read);
    need("", "pods", &["patch"]);
    need("", "namespaces", &read);
    need("", "services", &read);
    need("discovery.k8s.io", "endpointslices", &read);
    need("events.k8s.io", "events", &["create"]);
    needed.sort();
    assert_eq!(granted, needed);
}

/// deploy/cilium: Cilium's chart with SPIRE. The environment, read as `proxy ztunnel` reads it,
/// selects SPIRE on the mounted admin socket and the mounted runtime socket; no ConfigMap is
/// required, no hostPID; the ServiceAccount is the one Cilium registers as SPIRE's delegate;
/// one proxy at a time during an update (pre-release agents die of a second connection).
#[test]
fn the_cilium_daemonset_runs_hboned_on_spire_as_ciliums_chart_does() {
    let docs = manifests("cilium/ztunnel.yaml");
    let account = docs.iter().find(|d| d["kind"] == "ServiceAccount").unwrap();
    assert_eq!(account["metadata"]["name"], "ztunnel-cilium");
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "ztunnel-cilium");
    assert!(
        pod.get("hostPID").is_none(),
        "Cilium's chart runs it without hostPID"
    );
    assert_eq!(pod["hostNetwork"], true);
    let strategy = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        (&strategy["maxSurge"], &strategy["maxUnavailable"]),
        (&0.into(), &1.into())
    );
    let volumes = pod["volumes"].as_sequence().unwrap();
    assert!(
        volumes.iter().all(|v| v.get("configMap").is_none()),
        "a ConfigMap the pod needs to start"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["args"], Value::from(vec!["proxy", "ztunnel"]));
    let env: Vec<(String, String)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            let value = e["value"].as_str().unwrap_or("10.0.0.1").to_owned();
            (e["name"].as_str().unwrap().to_owned(), value)
        })
        .collect();
    let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mounted = mount_paths(container);
    let under_mount = |path: &std::path::Path| mounted.iter().any(|m| path.starts_with(m));
    let bootstrap = "/etc/ztunnel/bootstrap-root.crt";
    assert!(under_mount(std::path::Path::new(bootstrap)));
    let environment = hboned::config::ztunnel::Environment::fixed(&vars, &[bootstrap]);
    let c = hboned::config::Config::from_ztunnel_env(&environment).unwrap();
    assert_eq!(
        c.certificates.kind(false),
        hboned::config::CertSourceKind::Spire
    );
    let spire = c.certificates.spire_socket.clone().unwrap();
    assert!(under_mount(&spire), "{} not mounted", spire.display());
    let runtime = c.certificates.container_runtime_socket.clone().unwrap();
    assert!(under_mount(&runtime), "{} not mounted", runtime.display());
    assert!(under_mount(c.zds_socket.as_deref().unwrap()));
    assert_eq!(c.xds.address, "https://localhost:15012");
    assert_eq!(
        c.xds.root_ca.as_deref(),
        Some(std::path::Path::new(bootstrap))
    );
}

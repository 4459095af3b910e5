//! Tests of `config`.

use super::*;
use crate::identity::Identity;
use crate::state::{Protocol, State};
use crate::xds::XdsSettings;

fn no_env(_: &str) -> Option<String> {
    None
}

const SAMPLE: &str = r#"
trustDomain: example.org
node: node-a
clusterId: c1
pods:
  - name: a1
    namespace: default
    serviceAccount: client
    netns: /var/run/netns/pod-a1
workloads:
  - uid: default/b1
    name: b1
    namespace: default
    serviceAccount: server
    workloadIps: [10.1.2.2]
    node: node-b
    protocol: HBONE
    services:
      default/web.default.svc.cluster.local: {80: 8080}
  - uid: default/plain
    name: plain
    namespace: default
    workloadIps: [10.1.2.3]
services:
  - name: web
    namespace: default
    hostname: web.default.svc.cluster.local
    vips: [10.96.0.1]
    ports: {80: 8080}
"#;

#[test]
fn parses_a_full_config() {
    let c = Config::parse(SAMPLE, &no_env).unwrap();
    assert_eq!(c.node, "node-a");
    assert_eq!(c.pods[0].uid(), "default/a1");
    assert!(c.preserve_source_ip);
    let state = State::from_config(&c);
    let b1 = state.workload_by_ip("10.1.2.2".parse().unwrap()).unwrap();
    assert_eq!(
        b1.identity.to_string(),
        "spiffe://example.org/ns/default/sa/server"
    );
    assert_eq!(b1.protocol, Protocol::Hbone);
    let plain = state.workload("default/plain").unwrap();
    assert_eq!(plain.protocol, Protocol::Tcp);
    assert_eq!(plain.identity.service_account(), "default");
    assert!(state.service_by_vip("10.96.0.1".parse().unwrap()).is_some());
}

#[test]
fn embedded_default_parses() {
    let c = Config::parse(EMBEDDED_DEFAULT, &no_env).unwrap();
    assert_eq!(c.trust_domain, "cluster.local");
    assert!(c.pods.is_empty());
}

#[test]
fn env_overrides_apply() {
    let env = |k: &str| match k {
        "HBONED_NODE" => Some("from-env".to_string()),
        "HBONED_ZDS_SOCKET" => Some("/tmp/zds.sock".to_string()),
        _ => None,
    };
    let c = Config::parse(SAMPLE, &env).unwrap();
    assert_eq!(c.node, "from-env");
    assert_eq!(c.zds_socket.as_deref(), Some(Path::new("/tmp/zds.sock")));
}

#[test]
fn every_problem_is_reported_at_once() {
    let bad = r#"
trustDomain: "Bad Domain"
ca: {certLifetimeSecs: 5}
workloads:
  - uid: w
    name: w
    namespace: "bad ns"
    workloadIps: []
services:
  - name: s
    namespace: default
    hostname: s
    vips: [10.0.0.1]
    subjectAltNames: ["not-spiffe"]
"#;
    let env = |k: &str| (k == "HBONED_CERT_LIFETIME_SECS").then(|| "soon".to_string());
    let err = Config::parse(bad, &env).unwrap_err();
    let ConfigError::Invalid(problems) = &err else {
        panic!("{err}");
    };
    assert_eq!(problems.len(), 6, "{err}");
    let text = err.to_string();
    for needle in [
        "trustDomain",
        "certLifetimeSecs",
        "workloadIps is empty",
        "workloads[0] (w)",
        "not-spiffe",
        "HBONED_CERT_LIFETIME_SECS",
    ] {
        assert!(text.contains(needle), "missing {needle}: {text}");
    }
}

#[test]
fn xds_settings_follow_the_config() {
    let c = Config::parse(SAMPLE, &no_env).unwrap();
    assert!(
        XdsSettings::from_config(&c).is_none(),
        "no address: local file only"
    );
    let yaml = format!(
        "{SAMPLE}xds:\n  address: https://istiod.istio-system.svc:15012\n  rootCa: /etc/istio/root.pem\n  tokenFile: /var/run/token\n  onDemand: true\n  onDemandTimeoutMs: 250\n  nodeMetadata: {{NAMESPACE: istio-system}}\n"
    );
    let x = XdsSettings::from_config(&Config::parse(&yaml, &no_env).unwrap()).unwrap();
    assert_eq!(x.node_id, "node-a", "the node id defaults to the node name");
    assert_eq!(x.cluster_id, "c1");
    assert!(x.on_demand);
    assert_eq!(x.on_demand_timeout, Duration::from_millis(250));
    assert_eq!(x.root_ca.as_deref(), Some(Path::new("/etc/istio/root.pem")));
    assert_eq!(x.node_metadata["NAMESPACE"], "istio-system");
    let env = |k: &str| (k == "HBONED_XDS_ADDRESS").then(|| "http://10.0.0.1:15010".to_string());
    let metrics = |k: &str| (k == "HBONED_METRICS_ADDRESS").then(|| "[::1]:9091".to_string());
    let c = Config::parse("{}", &metrics).unwrap();
    assert_eq!(c.metrics_address, Some("[::1]:9091".parse().unwrap()));
    let bad = |k: &str| (k == "HBONED_METRICS_ADDRESS").then(|| "everywhere".to_string());
    let err = Config::parse("{}", &bad).unwrap_err().to_string();
    assert!(err.contains("HBONED_METRICS_ADDRESS"), "{err}");
    // The defaults are dual stack, as ztunnel's.
    let d = Config::default();
    assert_eq!(d.readiness_address, Some("[::]:15021".parse().unwrap()));
    assert_eq!(d.metrics_address, Some("[::]:15020".parse().unwrap()));
    let from_env = XdsSettings::from_config(&Config::parse(SAMPLE, &env).unwrap()).unwrap();
    assert_eq!(from_env.address, "http://10.0.0.1:15010");
    assert_eq!(from_env.on_demand_timeout, Duration::from_secs(5));
    let err = Config::parse(
        "xds: {address: \"istiod:15012\", onDemandTimeoutMs: 0}\n",
        &no_env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("http://") && err.contains("onDemandTimeoutMs"),
        "{err}"
    );
    // A node agent's socket (Cilium's /var/run/cilium/xds.sock); a scheme without a path is not.
    let unix = "xds: {address: \"unix:///var/run/cilium/xds.sock\"}\n";
    assert!(Config::parse(&format!("{SAMPLE}{unix}"), &no_env).is_ok());
    let err = Config::parse("xds: {address: \"unix://\"}\n", &no_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unix://"), "{err}");
}

#[test]
fn certificate_sources_are_validated() {
    let c = Config::parse(SAMPLE, &no_env).unwrap();
    assert_eq!(c.certificates.kind(false), CertSourceKind::Builtin);
    let files = format!(
        "{SAMPLE}certificates: {{source: files, files: {{cert: /c, key: /k, bundle: /b}}}}\n"
    );
    let c = Config::parse(&files, &no_env).unwrap();
    assert_eq!(c.certificates.files.unwrap().poll_secs, 5);
    let missing = format!("{SAMPLE}certificates: {{source: istioCa}}\n");
    let err = Config::parse(&missing, &no_env).unwrap_err().to_string();
    assert!(err.contains("certificates.istioCa is missing"), "{err}");
    let bad = format!("{SAMPLE}certificates: {{source: istioCa, istioCa: {{address: istiod}}}}\n");
    assert!(
        Config::parse(&bad, &no_env)
            .unwrap_err()
            .to_string()
            .contains("http://")
    );
    assert!(
        Config::parse(
            &format!("{SAMPLE}certificates: {{source: vault}}\n"),
            &no_env
        )
        .is_err()
    );
    let spire = format!("{SAMPLE}certificates: {{source: spire}}\n");
    let err = Config::parse(&spire, &no_env).unwrap_err().to_string();
    assert!(err.contains("spireSocket"), "{err}");
}

#[test]
fn policies_load_and_bad_ones_are_reported() {
    let yaml = format!(
        "{SAMPLE}policies:\n  - name: no-plaintext\n    namespace: default\n    action: deny\n    rules: [[[{{destinationPorts: [7001], notPrincipals: [{{presence: true}}], sourceIps: [10.0.0.0/8, \"fd00::1\"]}}]]]\n"
    );
    let c = Config::parse(&yaml, &no_env).unwrap();
    let state = State::from_config(&c);
    let p = state.policy("default/no-plaintext").unwrap();
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.destination_ports, [7001]);
    let nets: Vec<String> = m.source_ips.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["10.0.0.0/8", "fd00::1/128"]);
    assert_eq!(state.policies_for("default", &[]).count(), 1);
    assert_eq!(state.policies_for("other", &[]).count(), 0);
    let bad = format!(
        "{SAMPLE}policies:\n  - {{name: p, namespace: n, action: allow, rules: [[[{{sourceIps: [10.0.0.0/40]}}]]]}}\n"
    );
    let err = Config::parse(&bad, &no_env).unwrap_err().to_string();
    assert!(
        err.contains("policies[0]") && err.contains("prefix"),
        "{err}"
    );
}

#[test]
fn unknown_keys_and_bad_ips_are_parse_errors() {
    let err = Config::parse("nodee: x\n", &no_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nodee"), "{err}");
    let err = Config::parse(
        "workloads: [{uid: a, name: a, namespace: d, workloadIps: [999.1.1.1]}]",
        &no_env,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("invalid IP"), "{err}");
}

/// The empty forms in the config file read as Istio reads them: `rules: []` matches nothing,
/// `[[]]` (a rule with no clauses) and `[[[]]]` (a clause with no matches) everything, and
/// `[[[{}]]]` (a match with no conditions) nothing.
#[test]
fn policy_empty_forms_decide_as_in_istio() {
    use crate::authz::{self, Decision};
    let web = Identity::new("cluster.local", "default", "web").unwrap();
    let conn = authz::Connection {
        source: Some(&web),
        source_ip: "10.0.0.1".parse().unwrap(),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 80,
    };
    let decide = |action: &str, rules: &str| {
        let yaml = format!(
            "{SAMPLE}policies:\n  - {{name: p, namespace: default, action: {action}, rules: {rules}}}\n"
        );
        let state = State::from_config(&Config::parse(&yaml, &no_env).unwrap());
        authz::evaluate(state.policies_for("default", &[]), &conn).decision
    };
    let denied = || Decision::Denied {
        policy: "default/p".into(),
    };
    let rows = [
        ("allow", "[]", Decision::NotAllowed),
        ("deny", "[]", Decision::Allow),
        ("allow", "[[]]", Decision::Allow),
        ("deny", "[[]]", denied()),
        ("allow", "[[[]]]", Decision::Allow),
        ("deny", "[[[]]]", denied()),
        ("allow", "[[[{}]]]", Decision::NotAllowed),
        ("deny", "[[[{}]]]", Decision::Allow),
    ];
    for (action, rules, want) in rows {
        assert_eq!(decide(action, rules), want, "{action} rules: {rules}");
    }
}

/// Numbers past their range are refused at load, naming the key and the range, instead of
/// failing at every use later (a 2^64-second lifetime overflows every issuance).
#[test]
#[rustfmt::skip]
fn numeric_settings_are_range_checked_at_load() {
    let rows = [
        ("ca: {certLifetimeSecs: 18446744073709551615}", "ca.certLifetimeSecs is 18446744073709551615, outside 60..=7776000"),
        ("ca: {certLifetimeSecs: 59}", "ca.certLifetimeSecs is 59"),
        ("connectTimeoutSecs: 0", "connectTimeoutSecs is 0, outside 1..=300"),
        ("connectTimeoutSecs: 100000", "connectTimeoutSecs is 100000"),
        ("drainTimeoutSecs: 18446744073709551615", "drainTimeoutSecs is 18446744073709551615"),
        ("certificates: {source: files, files: {cert: /c, key: /k, bundle: /b, pollSecs: 0}}", "certificates.files.pollSecs is 0"),
        ("xds: {onDemandTimeoutMs: 0}", "xds.onDemandTimeoutMs is 0"),
    ];
    for (yaml, needle) in rows {
        let err = Config::parse(&format!("{SAMPLE}{yaml}\n"), &no_env)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{yaml}: {err}");
    }
    let env = |k: &str| (k == "HBONED_CERT_LIFETIME_SECS").then(|| u64::MAX.to_string());
    let err = Config::parse(SAMPLE, &env).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("ca.certLifetimeSecs is 18446744073709551615"), "{err}");
    // The edges are accepted.
    let ok = format!("{SAMPLE}ca: {{certLifetimeSecs: 7776000}}\nconnectTimeoutSecs: 300\ndrainTimeoutSecs: 0\n");
    assert!(Config::parse(&ok, &no_env).is_ok());
}

/// The README's list of environment overrides is the table's.
#[test]
fn every_override_is_in_the_readme() {
    let readme = include_str!("../../README.md");
    let start = readme.find("Environment overrides:").unwrap();
    let listed = &readme[start..start + readme[start..].find("\n\n").unwrap()];
    for o in env::OVERRIDES {
        assert!(
            listed.contains(&format!("`{}`", o.var)),
            "README lacks {}",
            o.var
        );
    }
    assert_eq!(listed.matches("`HBONED_").count(), env::OVERRIDES.len());
}

/// An unset lifetime is the source's default: ztunnel's SECRET_TTL (24 h) from the Istio CA,
/// one hour from the built-in CA; a set one is used by any source.
#[test]
fn certificate_lifetime_defaults_by_source() {
    let builtin = Config::parse("{}", &no_env).unwrap();
    assert_eq!(builtin.cert_lifetime(), Duration::from_secs(3600));
    let istio = "certificates: {source: istioCa, istioCa: {address: \"https://istiod:15012\"}}\n";
    let c = Config::parse(istio, &no_env).unwrap();
    assert_eq!(c.cert_lifetime(), Duration::from_secs(24 * 3600));
    let set = format!("{istio}ca: {{certLifetimeSecs: 600}}\n");
    assert_eq!(
        Config::parse(&set, &no_env).unwrap().cert_lifetime(),
        Duration::from_secs(600)
    );
}

/// Kubernetes mode is its own node agent: refused beside another agent's or control plane's
/// settings, needs the node's name, and keeps the built-in CA off nodes unless allowed.
#[test]
fn kubernetes_mode_is_refused_beside_another_agent_and_with_the_builtin_ca() {
    let ok = "node: n1\nkubernetes: {}\n";
    let c = Config::parse(ok, &no_env).unwrap();
    let kube = c.kubernetes.as_ref().unwrap();
    assert_eq!(kube.namespace_labels, ["io.cilium/mtls-enabled=true"]);
    assert_eq!(
        c.certificates.kind(true),
        CertSourceKind::Spire,
        "SPIRE by default"
    );
    assert!(matches!(
        c.certificate_source().unwrap(),
        crate::config::CertSource::Spire(p) if p == std::path::Path::new("/run/spire/sockets/admin.sock")
    ));
    // Outside Kubernetes mode the default stays the built-in CA.
    assert_eq!(
        Config::parse(SAMPLE, &no_env)
            .unwrap()
            .certificates
            .kind(false),
        CertSourceKind::Builtin
    );

    let refused = |extra: &str, want: &str| {
        let err = Config::parse(&format!("{ok}{extra}"), &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{extra:?}: {err}");
    };
    refused(
        "zdsSocket: /var/run/ztunnel/ztunnel.sock\n",
        "kubernetes and zdsSocket",
    );
    refused(
        "xds: {address: \"unix:///var/run/cilium/xds.sock\"}\n",
        "kubernetes and xds.address",
    );
    refused(
        "pods: [{name: p, namespace: n, netns: /var/run/netns/p}]\n",
        "kubernetes and pods",
    );
    refused(
        "certificates: {source: builtin}\n",
        "kubernetes.allowBuiltinCa",
    );
    let err = Config::parse("kubernetes: {}\n", &no_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("kubernetes needs node"), "{err}");
    let err = Config::parse(
        "node: n\nkubernetes: {namespaceLabels: [\"a b\", \"\"], apiServer: \"localhost:6443\"}\n",
        &no_env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("\"a b\"") && err.contains("apiServer"),
        "{err}"
    );
    let err = Config::parse("node: n\nkubernetes: {namespaceLabels: []}\n", &no_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("namespaceLabels is empty"), "{err}");
    // Allowed explicitly: the built-in CA for a one-node development cluster.
    let dev = "node: n1\ncertificates: {source: builtin}\nkubernetes: {allowBuiltinCa: true}\n";
    assert!(Config::parse(dev, &no_env).is_ok());
    // The node name from the environment, as the DaemonSet sets it.
    let env = |k: &str| (k == "HBONED_NODE").then(|| "from-env".to_owned());
    assert_eq!(
        Config::parse("kubernetes: {}\n", &env).unwrap().node,
        "from-env"
    );
}

/// Waypoints in the file: by address or by hostname (in the entry's namespace unless named),
/// one of the two, read into the state as discovery's would be.
#[test]
fn waypoints_in_the_file() {
    let yaml = "
workloads:
- {uid: w1, name: w1, namespace: demo, workloadIps: [10.0.0.1], protocol: HBONE,
   waypoint: {address: 10.96.0.99}}
services:
- {name: s, namespace: demo, hostname: s.demo.svc.cluster.local, vips: [10.96.0.1],
   waypoint: {hostname: waypoint.mesh.svc.cluster.local, namespace: mesh, hbonePort: 15009}}
";
    let config = Config::parse(yaml, &no_env).unwrap();
    let state = State::from_config(&config);
    let w = state.workload("w1").unwrap();
    assert_eq!(
        w.waypoint.as_ref().unwrap().destination.to_string(),
        "/10.96.0.99"
    );
    let s = state.services().next().unwrap();
    let wp = s.waypoint.as_ref().unwrap();
    assert_eq!(
        (wp.destination.to_string(), wp.port),
        ("mesh/waypoint.mesh.svc.cluster.local".to_owned(), 15009)
    );
    for (bad, why) in [
        ("{address: 10.0.0.9, hostname: x}", "both"),
        ("{hbonePort: 15008}", "neither"),
        ("{hostname: \"\"}", "hostname is empty"),
    ] {
        let yaml = format!(
            "services:\n- {{name: s, namespace: demo, hostname: s.demo, vips: [10.96.0.1], waypoint: {bad}}}\n"
        );
        let err = Config::parse(&yaml, &no_env).unwrap_err().to_string();
        assert!(err.contains("services[0]") && err.contains(why), "{err}");
    }
}

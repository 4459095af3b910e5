//! Tests of `config::ztunnel`: the environment Istio's ztunnel chart sets, read as ztunnel
//! reads it.

use super::*;
use crate::config::{ConfigError, EMBEDDED_DEFAULT};

/// What Istio's ztunnel DaemonSet gives the container (manifests/charts/ztunnel): the downward
/// API variables, CLUSTER_ID, and the mounted root and projected token.
fn istio_chart(extra: &[(&'static str, &'static str)]) -> Environment {
    let mut vars = vec![
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("CLUSTER_ID", "prod-east"),
        ("POD_NAME", "ztunnel-x7k2p"),
        ("POD_NAMESPACE", "istio-system"),
        ("NODE_NAME", "node-1"),
        ("INSTANCE_IP", "10.0.0.5"),
        ("SERVICE_ACCOUNT", "ztunnel"),
        ("ISTIO_META_ENABLE_HBONE", "true"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
    ];
    vars.extend_from_slice(extra);
    Environment::fixed(&vars, &[ROOT_CERT, TOKEN])
}

#[test]
fn the_istio_chart_environment_reads_as_ztunnel_reads_it() {
    let c = Config::from_ztunnel_env(&istio_chart(&[])).unwrap();
    assert_eq!(c.xds.address, "https://istiod.istio-system.svc:15012");
    assert_eq!(c.xds.root_ca.as_deref(), Some(Path::new(ROOT_CERT)));
    assert_eq!(c.xds.token_file.as_deref(), Some(Path::new(TOKEN)));
    assert_eq!(
        c.xds.node_id,
        "ztunnel~10.0.0.5~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local"
    );
    let meta = &c.xds.node_metadata;
    assert_eq!(meta["NAME"], "ztunnel-x7k2p");
    assert_eq!(meta["NAMESPACE"], "istio-system");
    assert_eq!(meta["INSTANCE_IPS"], "10.0.0.5");
    assert_eq!(meta["NODE_NAME"], "node-1");
    assert_eq!(
        meta["ENABLE_HBONE"], "true",
        "ISTIO_META_* without the prefix"
    );
    assert_eq!(c.cluster_id, "prod-east");
    assert_eq!(c.node, "node-1");
    assert_eq!(c.certificates.kind(false), CertSourceKind::IstioCa);
    let ca = c.certificates.istio_ca.as_ref().unwrap();
    assert_eq!(ca.address, "https://istiod.istio-system.svc:15012");
    assert_eq!(ca.root_ca.as_deref(), Some(Path::new(ROOT_CERT)));
    assert_eq!(ca.token_file.as_deref(), Some(Path::new(TOKEN)));
    assert_eq!(
        c.cert_lifetime().as_secs(),
        24 * 3600,
        "SECRET_TTL's default"
    );
    assert_eq!(
        c.zds_socket.as_deref(),
        Some(Path::new("/var/run/ztunnel/ztunnel.sock"))
    );
    assert_eq!(c.drain_timeout_secs, 25, "the grace period less 5 s");
    assert!(!c.xds.on_demand);
}

#[test]
fn variables_change_what_ztunnel_lets_them_change() {
    let c = Config::from_ztunnel_env(&istio_chart(&[
        ("XDS_ADDRESS", "istiod.custom:15012"),
        ("CA_ADDRESS", "https://ca.custom:15012"),
        ("ISTIO_META_CLUSTER_ID", "from-meta"),
        ("SECRET_TTL", "12h30m"),
        ("INPOD_UDS", "/run/agent.sock"),
        ("NETWORK", "net-1"),
        ("XDS_ON_DEMAND", "true"),
        ("CONNECTION_TERMINATION_DEADLINE", "7s"),
        ("TRUST_DOMAIN", "example.org"),
    ]))
    .unwrap();
    assert_eq!(
        c.xds.address, "https://istiod.custom:15012",
        "https when no scheme"
    );
    assert_eq!(
        c.certificates.istio_ca.as_ref().unwrap().address,
        "https://ca.custom:15012"
    );
    assert_eq!(c.cluster_id, "from-meta", "ISTIO_META_CLUSTER_ID wins");
    assert_eq!(c.cert_lifetime().as_secs(), 12 * 3600 + 30 * 60);
    assert_eq!(c.zds_socket.as_deref(), Some(Path::new("/run/agent.sock")));
    assert_eq!(c.xds.network, "net-1");
    assert!(c.xds.on_demand);
    assert_eq!(c.drain_timeout_secs, 7);
    assert_eq!(c.trust_domain, "example.org");
}

#[test]
fn hboned_overrides_win_over_ztunnel_variables() {
    let env = istio_chart(&[
        ("XDS_ADDRESS", "https://istiod.custom:15012"),
        ("HBONED_XDS_ADDRESS", "http://10.0.0.9:15010"),
        ("SECRET_TTL", "24h"),
        ("HBONED_CERT_LIFETIME_SECS", "3600"),
        ("HBONED_NODE", "from-hboned"),
    ]);
    let c = Config::from_ztunnel_env(&env).unwrap();
    assert_eq!(c.xds.address, "http://10.0.0.9:15010");
    assert_eq!(c.cert_lifetime().as_secs(), 3600);
    assert_eq!(c.node, "from-hboned");
}

#[test]
fn outside_a_cluster_and_with_the_fake_ca() {
    let env = Environment::fixed(&[("FAKE_CA", "true"), ("XDS_ADDRESS", "")], &[]);
    let c = Config::from_ztunnel_env(&env).unwrap();
    assert!(
        c.xds.address.is_empty(),
        "an empty XDS_ADDRESS turns xDS off"
    );
    assert_eq!(c.certificates.kind(false), CertSourceKind::Builtin);
    assert_eq!(c.cluster_id, "Kubernetes");
    assert_eq!(c.drain_timeout_secs, 5);
    assert!(c.xds.node_id.is_empty(), "no pod: no istiod node id");
    let local = Config::from_ztunnel_env(&Environment::fixed(&[], &[])).unwrap();
    assert_eq!(local.xds.address, "https://localhost:15012");
    assert_eq!(local.xds.token_file, None, "no token mounted: none sent");
    assert_eq!(local.xds.root_ca, None);
}

#[test]
fn what_hboned_cannot_honour_is_refused_by_name() {
    let env = istio_chart(&[
        ("SECRET_TTL", "a day"),
        ("XDS_ROOT_CA", "SYSTEM"),
        (
            "CA_ROOT_CA",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        ),
        ("AUTH_TOKEN", "eyJhbGciOi"),
        ("XDS_ON_DEMAND", "maybe"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "soon"),
    ]);
    let err = Config::from_ztunnel_env(&env).unwrap_err();
    let ConfigError::Invalid(problems) = &err else {
        panic!("{err}");
    };
    for var in [
        "SECRET_TTL",
        "XDS_ROOT_CA=SYSTEM",
        "CA_ROOT_CA holds a PEM",
        "AUTH_TOKEN",
        "XDS_ON_DEMAND",
        "TERMINATION_GRACE_PERIOD_SECONDS",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(var)),
            "{var} missing: {err}"
        );
    }
}

#[test]
fn durations_as_ztunnel_writes_them() {
    let secs = |s: &str| parse_duration(s).map(|d| d.as_millis());
    assert_eq!(secs("24h"), Some(86_400_000));
    assert_eq!(secs("1h30m"), Some(5_400_000));
    assert_eq!(secs("90s"), Some(90_000));
    assert_eq!(secs("500ms"), Some(500));
    assert_eq!(secs("3600"), Some(3_600_000), "a bare number is seconds");
    for bad in ["", "h", "5d", "1.5h", "-1h", "10x", "99999999999999999999h"] {
        assert_eq!(secs(bad), None, "{bad:?}");
    }
}

#[test]
fn in_a_pod_run_mode_announces_the_node_istiod_accepts() {
    let pod = |k: &str| match k {
        "POD_NAME" => Some("hboned-abc".to_string()),
        "POD_NAMESPACE" => Some("hboned".to_string()),
        "INSTANCE_IP" => Some("10.0.0.7".to_string()),
        _ => None,
    };
    let c = Config::parse(EMBEDDED_DEFAULT, &pod).unwrap();
    assert_eq!(
        c.xds.node_id,
        "ztunnel~10.0.0.7~hboned-abc.hboned~hboned.svc.cluster.local"
    );
    assert_eq!(c.xds.node_metadata["NAME"], "hboned-abc");
    let configured = "xds: {nodeId: mine, nodeMetadata: {NAME: kept}}\n";
    let c = Config::parse(configured, &pod).unwrap();
    assert_eq!(c.xds.node_id, "mine", "a configured id wins");
    assert_eq!(c.xds.node_metadata["NAME"], "kept");
}

/// What Cilium's newer chart sets for its ztunnel DaemonSet (`encryption.ztunnel`, templates/
/// ztunnel/daemonset.yaml: xDS and the CA over TLS on localhost:15012 with the bootstrap root as
/// both XDS_ROOT_CA and CA_ROOT_CA, the agent's ZDS socket), plus the SPIRE variables of
/// Cilium's SPIRE guide: SPIRE mode, the agent's admin socket, the runtime's CRI socket.
#[test]
fn ciliums_chart_with_spire_enabled_selects_spire_and_ignores_the_bootstrap_root() {
    let bootstrap = "/etc/ztunnel/bootstrap-root.crt";
    let env = Environment::fixed(
        &[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("XDS_ADDRESS", "https://localhost:15012"),
            ("XDS_ROOT_CA", bootstrap),
            ("CA_ROOT_CA", bootstrap),
            ("CA_ADDRESS", "https://localhost:15012"),
            ("INPOD_UDS", "/var/run/cilium/ztunnel.sock"),
            ("NODE_NAME", "10.224.0.4"),
            ("SPIRE_ENABLED", "true"),
            (
                "SPIRE_ADMIN_ENDPOINT_SOCKET",
                "unix:///run/spire/sockets/admin.sock",
            ),
            ("SPIRE_TIMEOUT", "30s"),
            (
                "CONTAINER_RUNTIME_SOCK_PATH",
                "/run/k3s/containerd/containerd.sock",
            ),
        ],
        &[bootstrap],
    );
    let c = Config::from_ztunnel_env(&env).unwrap();
    assert_eq!(c.xds.address, "https://localhost:15012");
    assert_eq!(c.xds.root_ca.as_deref(), Some(Path::new(bootstrap)));
    assert_eq!(c.node, "10.224.0.4");
    assert_eq!(
        c.zds_socket.as_deref(),
        Some(Path::new("/var/run/cilium/ztunnel.sock"))
    );
    let certs = &c.certificates;
    assert_eq!(certs.kind(false), CertSourceKind::Spire);
    assert_eq!(
        certs.spire_socket.as_deref(),
        Some(Path::new("/run/spire/sockets/admin.sock"))
    );
    assert_eq!(certs.spire_timeout_secs, Some(30));
    assert_eq!(
        certs.container_runtime_socket.as_deref(),
        Some(Path::new("/run/k3s/containerd/containerd.sock"))
    );
    // The bootstrap root is not a CA for workloads: no Istio CA section is made from it.
    assert!(certs.istio_ca.is_none());
}

/// Without SPIRE_ENABLED the same chart takes Cilium's built-in CA through the Istio CA
/// protocol; USE_SPIRE (an older chart's switch) still selects SPIRE, with every default.
#[test]
fn spire_mode_is_off_unless_switched_on_and_older_charts_still_switch_it() {
    let bootstrap = "/etc/ztunnel/bootstrap-root.crt";
    let chart = [
        ("CA_ROOT_CA", bootstrap),
        ("CA_ADDRESS", "https://localhost:15012"),
    ];
    let c = Config::from_ztunnel_env(&Environment::fixed(&chart, &[bootstrap])).unwrap();
    assert_eq!(c.certificates.kind(false), CertSourceKind::IstioCa);
    let off = [("SPIRE_ENABLED", "false"), ("CA_ROOT_CA", bootstrap)];
    let c = Config::from_ztunnel_env(&Environment::fixed(&off, &[bootstrap])).unwrap();
    assert_eq!(c.certificates.kind(false), CertSourceKind::IstioCa);
    let older = Environment::fixed(&[("USE_SPIRE", "true")], &[]);
    let c = Config::from_ztunnel_env(&older).unwrap();
    let certs = &c.certificates;
    assert_eq!(certs.kind(false), CertSourceKind::Spire);
    assert_eq!(
        certs.spire_socket.as_deref(),
        Some(Path::new("/run/spire/sockets/admin.sock"))
    );
    // Defaults applied where the source is built: 10 s, containerd's socket.
    assert_eq!(certs.spire_timeout_secs, None);
    assert_eq!(certs.container_runtime_socket, None);
    // The SPIFFE `unix:/path` form.
    let short = Environment::fixed(
        &[
            ("SPIRE_ENABLED", "1"),
            ("SPIRE_ADMIN_ENDPOINT_SOCKET", "unix:/tmp/admin.sock"),
        ],
        &[],
    );
    let c = Config::from_ztunnel_env(&short).unwrap();
    assert_eq!(
        c.certificates.spire_socket.as_deref(),
        Some(Path::new("/tmp/admin.sock"))
    );
}

#[test]
fn bad_spire_variables_are_refused_by_name() {
    let bad = Environment::fixed(
        &[
            ("SPIRE_ENABLED", "yes"),
            ("USE_SPIRE", "true"),
            ("SPIRE_ADMIN_ENDPOINT_SOCKET", "tcp://127.0.0.1:8081"),
            ("SPIRE_TIMEOUT", "soon"),
        ],
        &[],
    );
    let err = Config::from_ztunnel_env(&bad).unwrap_err().to_string();
    for var in [
        "SPIRE_ENABLED",
        "SPIRE_ADMIN_ENDPOINT_SOCKET",
        "SPIRE_TIMEOUT",
    ] {
        assert!(err.contains(var), "{var}: {err}");
    }
    let zero = Environment::fixed(&[("SPIRE_ENABLED", "true"), ("SPIRE_TIMEOUT", "0s")], &[]);
    let err = Config::from_ztunnel_env(&zero).unwrap_err().to_string();
    assert!(err.contains("SPIRE_TIMEOUT"), "{err}");
}

#[test]
fn the_dns_proxy_is_on_unless_dns_capture_says_otherwise() {
    let c = Config::from_ztunnel_env(&istio_chart(&[])).unwrap();
    assert!(c.dns.enabled, "on by default, as ztunnel has it");
    assert_eq!(c.dns.port, 15053);
    assert_eq!(c.dns.cluster_domain, "cluster.local");
    for (value, on) in [
        ("true", true),
        ("TRUE", true),
        ("false", false),
        ("no", false),
    ] {
        let c =
            Config::from_ztunnel_env(&istio_chart(&[("ISTIO_META_DNS_CAPTURE", value)])).unwrap();
        assert_eq!(c.dns.enabled, on, "ISTIO_META_DNS_CAPTURE={value}");
    }
    let c = Config::from_ztunnel_env(&istio_chart(&[
        ("ISTIO_META_DNS_PROXY_ADDR", "localhost:15054"),
        ("CLUSTER_DOMAIN", "corp.internal"),
    ]))
    .unwrap();
    assert_eq!(
        (c.dns.port, c.dns.cluster_domain.as_str()),
        (15054, "corp.internal")
    );
    // An empty CLUSTER_DOMAIN is no domain: the default stands.
    let c = Config::from_ztunnel_env(&istio_chart(&[("CLUSTER_DOMAIN", "")])).unwrap();
    assert_eq!(c.dns.cluster_domain, "cluster.local");
    let err = Config::from_ztunnel_env(&istio_chart(&[(
        "ISTIO_META_DNS_PROXY_ADDR",
        "10.0.0.5:53",
    )]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("ISTIO_META_DNS_PROXY_ADDR"), "{err}");
    // hboned's own switch wins.
    let c = Config::from_ztunnel_env(&istio_chart(&[("HBONED_DNS_ENABLED", "false")])).unwrap();
    assert!(!c.dns.enabled);
}

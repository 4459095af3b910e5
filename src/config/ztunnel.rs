//! ztunnel's environment, read with ztunnel's meaning and defaults, for `hboned proxy ztunnel`:
//! the command and environment Istio's ztunnel chart gives its DaemonSet. The `HBONED_*`
//! overrides apply on top and win. Sources: ztunnel's `src/config.rs` (variables, defaults,
//! the `./var/run/secrets/...` paths relative to the working directory, `/` in the image) and
//! `src/xds/client.rs` (the node id and metadata istiod expects).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{CertSourceKind, Config, IstioCaConfig};

/// istiod in the cluster, as ztunnel assumes when `KUBERNETES_SERVICE_HOST` is set.
const IN_CLUSTER_ISTIOD: &str = "https://istiod.istio-system.svc:15012";
/// Outside a cluster ztunnel assumes a local istiod.
const LOCAL_ISTIOD: &str = "https://localhost:15012";
/// The mesh root istiod's ConfigMap is mounted at.
const ROOT_CERT: &str = "./var/run/secrets/istio/root-cert.pem";
/// The projected service account token with the `istio-ca` audience.
const TOKEN: &str = "./var/run/secrets/tokens/istio-token";
/// ztunnel's certificate lifetime request (SECRET_TTL's default).
const SECRET_TTL: Duration = Duration::from_secs(24 * 3600);
/// ztunnel's cluster id when none is set.
const CLUSTER_ID: &str = "Kubernetes";
/// The SPIRE agent's admin socket Cilium's ztunnel DaemonSet mounts (SPIRE_ADMIN_ENDPOINT_SOCKET,
/// a SPIFFE endpoint address).
const SPIRE_ADMIN_SOCKET: &str = "unix:///run/spire/sockets/admin.sock";
/// ztunnel's drain deadline when the pod's grace period is not passed in.
const TERMINATION_DEADLINE: Duration = Duration::from_secs(5);

/// A process environment: its variables and which files exist (injectable for tests).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
    files: Vec<PathBuf>,
    /// Look at the real filesystem (the process environment); else only `files` exist.
    real_files: bool,
}

impl Environment {
    /// This process's environment and filesystem.
    pub fn process() -> Self {
        Environment {
            vars: std::env::vars().collect(),
            files: Vec::new(),
            real_files: true,
        }
    }

    /// `vars`, with only `files` existing.
    pub fn fixed(vars: &[(&str, &str)], files: &[&str]) -> Self {
        Environment {
            vars: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            files: files.iter().map(PathBuf::from).collect(),
            real_files: false,
        }
    }

    /// A variable's value.
    pub fn get(&self, key: &str) -> Option<String> {
        self.vars.get(key).cloned()
    }

    fn exists(&self, path: &Path) -> bool {
        if self.real_files {
            path.exists()
        } else {
            self.files.iter().any(|f| f == path)
        }
    }
}

/// The xDS node istiod accepts from a ztunnel: id `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`
/// and metadata NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME (ztunnel's `xds/client.rs`; the IP is
/// 1.1.1.1 when INSTANCE_IP is unset). `None` outside a pod (no POD_NAME or POD_NAMESPACE).
pub fn istiod_node(
    get: &dyn Fn(&str) -> Option<String>,
) -> Option<(String, BTreeMap<String, String>)> {
    let pod = get("POD_NAME")?;
    let namespace = get("POD_NAMESPACE")?;
    let ip = get("INSTANCE_IP").unwrap_or_else(|| "1.1.1.1".into());
    let id = format!("ztunnel~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local");
    let metadata = BTreeMap::from([
        ("NAME".to_owned(), pod),
        ("NAMESPACE".to_owned(), namespace),
        ("INSTANCE_IPS".to_owned(), ip),
        ("NODE_NAME".to_owned(), get("NODE_NAME").unwrap_or_default()),
    ]);
    Some((id, metadata))
}

/// The configuration ztunnel would run with in `env`; what cannot be read is returned as
/// problems, each naming its variable.
pub(super) fn config(env: &Environment) -> (Config, Vec<String>) {
    let mut problems = Vec::new();
    let mut config = Config::default();
    let in_cluster = env.get("KUBERNETES_SERVICE_HOST").is_some();
    let istiod = if in_cluster {
        IN_CLUSTER_ISTIOD
    } else {
        LOCAL_ISTIOD
    };
    if let Some(td) = env.get("TRUST_DOMAIN") {
        config.trust_domain = td;
    }
    // ztunnel's servers take any identity the roots verify; a local pod's trust domain is its
    // workload's (istiod's WDS), TRUST_DOMAIN only stands in until that is known.
    config.any_client_trust_domain = true;
    config.crl_path = env
        .get("CRL_PATH")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    dns(env, &mut config, &mut problems);
    config.cluster_id = env
        .get("ISTIO_META_CLUSTER_ID")
        .or_else(|| env.get("CLUSTER_ID"))
        .unwrap_or_else(|| CLUSTER_ID.into());
    config.node = env.get("NODE_NAME").unwrap_or_default();
    config.zds_socket = Some(env.get("INPOD_UDS").map_or_else(
        || PathBuf::from("/var/run/ztunnel/ztunnel.sock"),
        PathBuf::from,
    ));
    // Control plane.
    let xds = &mut config.xds;
    xds.address = with_scheme(env.get("XDS_ADDRESS").unwrap_or_else(|| istiod.into()));
    xds.root_ca = root_cert(env, "XDS_ROOT_CA", &mut problems);
    xds.token_file = token(env, &mut problems);
    xds.network = env.get("NETWORK").unwrap_or_default();
    xds.on_demand = flag(env, "XDS_ON_DEMAND", &mut problems);
    if let Some((id, metadata)) = istiod_node(&|k| env.get(k)) {
        xds.node_id = id;
        xds.node_metadata = metadata;
    }
    // ISTIO_META_* go into the node metadata without their prefix, as ztunnel's proxy
    // metadata does.
    for (key, value) in &env.vars {
        if let Some(name) = key.strip_prefix("ISTIO_META_")
            && !name.is_empty()
        {
            xds.node_metadata.insert(name.to_owned(), value.clone());
        }
    }
    // Certificates: the Istio CA unless FAKE_CA, or SPIRE with SPIRE_ENABLED (the cilium/ztunnel
    // fork's `src/config.rs`; USE_SPIRE, an older Cilium chart's name, too): the Delegated
    // Identity API on SPIRE_ADMIN_ENDPOINT_SOCKET, pods' processes from the runtime at
    // CONTAINER_RUNTIME_SOCK_PATH, peer trust from the agent's bundle stream. CA_ROOT_CA is
    // then not read: the newer chart points it at the xDS bootstrap root, not SPIRE's.
    if flag(env, "FAKE_CA", &mut problems) {
        config.certificates.source = Some(CertSourceKind::Builtin);
    } else if flag(env, "SPIRE_ENABLED", &mut problems) | flag(env, "USE_SPIRE", &mut problems) {
        let certs = &mut config.certificates;
        certs.source = Some(CertSourceKind::Spire);
        let endpoint = env
            .get("SPIRE_ADMIN_ENDPOINT_SOCKET")
            .unwrap_or_else(|| SPIRE_ADMIN_SOCKET.into());
        match spiffe_socket(&endpoint) {
            Some(path) => certs.spire_socket = Some(path),
            None => problems.push(format!(
                "SPIRE_ADMIN_ENDPOINT_SOCKET={endpoint:?} is not a unix:// socket address"
            )),
        }
        if let Some(v) = env.get("SPIRE_TIMEOUT") {
            match parse_duration(&v) {
                Some(d) if !d.is_zero() => certs.spire_timeout_secs = Some(d.as_secs().max(1)),
                _ => problems.push(format!(
                    "SPIRE_TIMEOUT={v:?} is not a positive duration (like 10s)"
                )),
            }
        }
        certs.container_runtime_socket = env.get("CONTAINER_RUNTIME_SOCK_PATH").map(PathBuf::from);
    } else {
        let address = with_scheme(env.get("CA_ADDRESS").unwrap_or_else(|| istiod.into()));
        config.certificates.source = Some(CertSourceKind::IstioCa);
        config.certificates.istio_ca = Some(IstioCaConfig {
            address,
            root_ca: root_cert(env, "CA_ROOT_CA", &mut problems),
            token_file: config.xds.token_file.clone(),
        });
    }
    let ttl = match env.get("SECRET_TTL") {
        Some(v) => parse_duration(&v).unwrap_or_else(|| {
            problems.push(format!(
                "SECRET_TTL={v:?} is not a duration (like 24h, 90m or 3600s)"
            ));
            SECRET_TTL
        }),
        None => SECRET_TTL,
    };
    config.ca.cert_lifetime_secs = Some(ttl.as_secs());
    config.drain_timeout_secs = drain_deadline(env, &mut problems).as_secs();
    (config, problems)
}

/// The DNS proxy as ztunnel's `construct_config` sets it (src/config.rs): on unless the proxy
/// metadata's `DNS_CAPTURE` (`ISTIO_META_DNS_CAPTURE`) is other than "true"; its address from
/// `DNS_PROXY_ADDR` (localhost only here), the cluster's domain from `CLUSTER_DOMAIN`.
fn dns(env: &Environment, config: &mut Config, problems: &mut Vec<String>) {
    config.dns.enabled = env
        .get("ISTIO_META_DNS_CAPTURE")
        .is_none_or(|v| v.eq_ignore_ascii_case("true"));
    if let Some(domain) = env.get("CLUSTER_DOMAIN").filter(|d| !d.is_empty()) {
        config.dns.cluster_domain = domain;
    }
    if let Some(addr) = env.get("ISTIO_META_DNS_PROXY_ADDR") {
        let port = addr.rsplit_once(':').and_then(|(host, port)| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let local = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            port.parse::<u16>().ok().filter(|p| local && *p != 0)
        });
        match port {
            Some(port) => config.dns.port = port,
            None => problems.push(format!(
                "ISTIO_META_DNS_PROXY_ADDR={addr:?} is not a localhost address with a port (the DNS proxy listens on the pod's localhost)"
            )),
        }
    }
}

/// ztunnel's `validate_uri`: an address without a scheme is https.
fn with_scheme(address: String) -> String {
    if address.is_empty() || address.contains("://") {
        address
    } else {
        format!("https://{address}")
    }
}

/// The path of a SPIFFE Workload Endpoint address: `unix:///path` or `unix:/path` (a bare
/// absolute path is taken too).
fn spiffe_socket(address: &str) -> Option<PathBuf> {
    let path = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
        .unwrap_or(address);
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// XDS_ROOT_CA / CA_ROOT_CA: a file (the mounted mesh root by default). ztunnel also takes
/// `SYSTEM` (the system roots) and inline PEM; hboned trusts only roots it is given as a file.
fn root_cert(env: &Environment, var: &str, problems: &mut Vec<String>) -> Option<PathBuf> {
    let value = env.get(var);
    let path = PathBuf::from(value.as_deref().unwrap_or(ROOT_CERT));
    if env.exists(&path) {
        return Some(path);
    }
    match value {
        Some(v) if v == "SYSTEM" => problems.push(format!(
            "{var}=SYSTEM: hboned has no system roots; mount the control plane's root and name its file"
        )),
        Some(v) if v.contains("-----BEGIN") => problems.push(format!(
            "{var} holds a PEM inline: hboned reads roots from files; mount it and name the file"
        )),
        Some(v) => problems.push(format!("{var}={v:?}: no such file")),
        // The default root is not mounted: connect without one (fails unless plain http).
        None => {}
    }
    None
}

/// AUTH_TOKEN: the token file (the projected istio-token by default, when it exists).
fn token(env: &Environment, problems: &mut Vec<String>) -> Option<PathBuf> {
    match env.get("AUTH_TOKEN") {
        Some(v) if env.exists(Path::new(&v)) => Some(PathBuf::from(v)),
        Some(_) => {
            problems.push(
                "AUTH_TOKEN holds a token inline: hboned reads tokens from a file (they rotate); name the file"
                    .into(),
            );
            None
        }
        None => env.exists(Path::new(TOKEN)).then(|| PathBuf::from(TOKEN)),
    }
}

fn flag(env: &Environment, var: &str, problems: &mut Vec<String>) -> bool {
    match env.get(var).as_deref() {
        None => false,
        Some("true" | "1") => true,
        Some("false" | "0") => false,
        Some(v) => {
            problems.push(format!("{var}={v:?} is not true or false"));
            false
        }
    }
}

/// CONNECTION_TERMINATION_DEADLINE, else TERMINATION_GRACE_PERIOD_SECONDS less a margin (5 s
/// above 10 s, else 1 s; at least 1 s), else 5 s: ztunnel's drain deadline.
fn drain_deadline(env: &Environment, problems: &mut Vec<String>) -> Duration {
    if let Some(v) = env.get("CONNECTION_TERMINATION_DEADLINE") {
        return parse_duration(&v).unwrap_or_else(|| {
            problems.push(format!(
                "CONNECTION_TERMINATION_DEADLINE={v:?} is not a duration"
            ));
            TERMINATION_DEADLINE
        });
    }
    match env.get("TERMINATION_GRACE_PERIOD_SECONDS") {
        Some(v) => match v.parse::<u64>() {
            Ok(secs) => {
                let margin = if secs > 10 { 5 } else { 1 };
                Duration::from_secs(secs.saturating_sub(margin).max(1))
            }
            Err(_) => {
                problems.push(format!(
                    "TERMINATION_GRACE_PERIOD_SECONDS={v:?} is not a number of seconds"
                ));
                TERMINATION_DEADLINE
            }
        },
        None => TERMINATION_DEADLINE,
    }
}

/// A Go-style duration: `24h`, `1h30m`, `90s`, `500ms`, or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit] {
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            _ => return None,
        };
        total = total.checked_add(part)?;
        rest = &rest[unit..];
    }
    Some(total)
}

#[cfg(test)]
mod tests;

//! Configuration: a YAML file (or the embedded default), then `HBONED_*` environment
//! overrides from an injectable source, then validation that reports every problem at once.
//! The workload and service tables are a subset of ztunnel's local-config format.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::authz;
use crate::identity::{DEFAULT_TRUST_DOMAIN, Identity};
use crate::state::{Protocol, Service, Workload};

/// The configuration `hboned run` uses without `--config`: built-in CA, no static pods, pods
/// enrolled over ZDS when a node agent's socket is there.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/default.yaml");

/// The whole configuration of one node's proxy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The mesh's trust domain; workloads without one get it.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Cluster name, sent in baggage (`k8s.cluster.name`).
    #[serde(default)]
    pub cluster_id: String,
    /// This node's name; workloads whose `node` equals it are local.
    #[serde(default)]
    pub node: String,
    /// The built-in CA.
    #[serde(default)]
    pub ca: CaConfig,
    /// Where workload certificates come from.
    #[serde(default)]
    pub certificates: CertificatesConfig,
    /// The node agent's ZDS socket; pods are enrolled from it when set.
    #[serde(default)]
    pub zds_socket: Option<PathBuf>,
    /// Pods enrolled from this file (standalone mode), each by its netns path.
    #[serde(default)]
    pub pods: Vec<PodConfig>,
    /// Known workloads (the local equivalent of xDS `Address` resources).
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// Known services.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// L4 authorization policies (README "Authorization policies"), in addition to those from
    /// xDS.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    /// Deliver inbound traffic with the client's source IP (IP_TRANSPARENT).
    #[serde(default = "yes")]
    pub preserve_source_ip: bool,
    /// Seconds to wait for a connect or handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Where `GET /healthz/ready` is served (in the proxy's netns); `null` turns it off.
    #[serde(default = "default_readiness")]
    pub readiness_address: Option<std::net::SocketAddr>,
    /// Where Prometheus metrics are served (in the proxy's netns); `null` turns them off.
    #[serde(default = "default_metrics")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The admin page (`/config_dump`, `/quitquitquit`, `/logging`); keep it on localhost.
    /// `null` turns it off.
    #[serde(default = "default_admin")]
    pub admin_address: Option<std::net::SocketAddr>,
    /// On SIGTERM, how long live connections may run on before the process exits (seconds).
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: u64,
    /// The control plane (xDS); without an address, the workload tables above are all there is.
    #[serde(default)]
    pub xds: XdsConfig,
}

/// The control plane connection.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct XdsConfig {
    /// `https://istiod.istio-system.svc:15012` or `http://...`; empty: no control plane.
    #[serde(default)]
    pub address: String,
    /// PEM root that signed the control plane's certificate.
    #[serde(default)]
    pub root_ca: Option<PathBuf>,
    /// A bearer token file (e.g. a projected service account token), read at every connect.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The xDS node id; defaults to `node`.
    #[serde(default)]
    pub node_id: String,
    /// Extra node metadata sent to the control plane.
    #[serde(default)]
    pub node_metadata: BTreeMap<String, String>,
    /// This proxy's network (prefix of on-demand names `<network>/<ip>`).
    #[serde(default)]
    pub network: String,
    /// Subscribe to no addresses up front; look each unknown destination up when needed.
    #[serde(default)]
    pub on_demand: bool,
    /// How long a connection to an unknown destination is held for its lookup (ms).
    #[serde(default)]
    pub on_demand_timeout_ms: Option<u64>,
}

/// The built-in CA's settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaConfig {
    /// Directory with root-cert.pem and root-key.pem; unset: certs-dev/ if present, else an
    /// ephemeral root.
    #[serde(default)]
    pub root_dir: Option<PathBuf>,
    /// Lifetime of issued workload certificates, in seconds.
    #[serde(default = "default_cert_lifetime")]
    pub cert_lifetime_secs: u64,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            root_dir: None,
            cert_lifetime_secs: default_cert_lifetime(),
        }
    }
}

/// The certificate source.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificatesConfig {
    /// `builtin` (default: the built-in CA of `ca`), `files`, `istioCa` or `spire`.
    #[serde(default)]
    pub source: CertSourceKind,
    /// The SPIRE agent's admin socket (Delegated Identity API).
    #[serde(default)]
    pub spire_socket: Option<PathBuf>,
    #[serde(default)]
    pub files: Option<FilesConfig>,
    #[serde(default)]
    pub istio_ca: Option<IstioCaConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CertSourceKind {
    #[default]
    Builtin,
    Files,
    IstioCa,
    Spire,
}

/// Certificate, key and bundle files (one identity).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilesConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    /// Seconds between re-reads.
    #[serde(default = "default_poll")]
    pub poll_secs: u64,
}

/// The Istio CA endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioCaConfig {
    /// `https://istiod.istio-system.svc:15012`.
    pub address: String,
    #[serde(default)]
    pub root_ca: Option<PathBuf>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

fn default_readiness() -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::from((
        [0, 0, 0, 0],
        crate::admin::READINESS_PORT,
    )))
}

fn default_metrics() -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::from((
        [0, 0, 0, 0],
        crate::admin::METRICS_PORT,
    )))
}

fn default_admin() -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        crate::admin::ADMIN_PORT,
    )))
}

fn default_drain() -> u64 {
    30
}

fn default_poll() -> u64 {
    5
}

/// A pod enrolled from the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodConfig {
    /// Unique id; defaults to `namespace/name`.
    #[serde(default)]
    pub uid: Option<String>,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    /// `/var/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
}

impl PodConfig {
    pub fn uid(&self) -> String {
        self.uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", self.namespace, self.name))
    }
}

/// A workload entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadConfig {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub trust_domain: String,
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub node: String,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// `ns/hostname` → service port → target port.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
}

/// A service entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// Service port → target port.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// An authorization policy, shaped like `istio.security.Authorization`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    pub namespace: String,
    /// `namespace` (default: workloads in `namespace`) or `global`.
    #[serde(default)]
    pub scope: PolicyScope,
    pub action: PolicyAction,
    #[serde(default)]
    pub dry_run: bool,
    /// Rules OR; each rule's clauses AND; each clause's matches OR. `[]` matches nothing;
    /// `[[]]` (a rule with no clauses) matches everything, as istiod encodes `rules: [{}]`.
    pub rules: Vec<Vec<Vec<MatchConfig>>>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyScope {
    #[default]
    Namespace,
    Global,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// One match: every field given must hold (`not*` fields must not).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MatchConfig {
    pub namespaces: Vec<StringMatchConfig>,
    pub not_namespaces: Vec<StringMatchConfig>,
    pub principals: Vec<StringMatchConfig>,
    pub not_principals: Vec<StringMatchConfig>,
    /// `10.0.0.0/8`, `fd00::/64` or a bare address.
    pub source_ips: Vec<String>,
    pub not_source_ips: Vec<String>,
    pub destination_ips: Vec<String>,
    pub not_destination_ips: Vec<String>,
    pub destination_ports: Vec<u32>,
    pub not_destination_ports: Vec<u32>,
    pub service_accounts: Vec<ServiceAccountConfig>,
    pub not_service_accounts: Vec<ServiceAccountConfig>,
}

/// Exactly one of `exact`, `prefix`, `suffix` or `presence: true`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StringMatchConfig {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub presence: Option<bool>,
}

impl StringMatchConfig {
    fn to_match(&self) -> Result<authz::StringMatch, PolicyError> {
        use authz::StringMatch as S;
        match (&self.exact, &self.prefix, &self.suffix, self.presence) {
            (Some(v), None, None, None) => Ok(S::Exact(v.clone())),
            (None, Some(v), None, None) => Ok(S::Prefix(v.clone())),
            (None, None, Some(v), None) => Ok(S::Suffix(v.clone())),
            (None, None, None, Some(true)) => Ok(S::Presence),
            _ => Err(PolicyError::StringMatch),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountConfig {
    #[serde(default)]
    pub namespace: String,
    pub service_account: String,
}

/// Why a policy of the config file cannot be read. The file is the operator's: a bad entry
/// refuses the whole config rather than being dropped (as an unreadable xDS entry is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("a string match takes exactly one of exact, prefix, suffix or presence: true")]
    StringMatch,
    #[error(transparent)]
    Net(#[from] authz::NetError),
    #[error("port {0} is out of range")]
    Port(u32),
}

impl PolicyConfig {
    /// The policy as the evaluator takes it. `rules: []` matches nothing, `rules: [[]]` (a
    /// rule with no clauses) and `rules: [[[]]]` (a clause with no matches) match everything,
    /// `rules: [[[{}]]]` (a match with no conditions) matches nothing.
    pub fn to_policy(&self) -> Result<authz::Policy, PolicyError> {
        let rules = self
            .rules
            .iter()
            .map(|rule| {
                let clauses = rule
                    .iter()
                    .map(|clause| {
                        let matches: Result<_, _> =
                            clause.iter().map(MatchConfig::to_match).collect();
                        matches.map(|matches| authz::Clause { matches })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(authz::Rule { clauses })
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(authz::Policy {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            scope: match self.scope {
                PolicyScope::Namespace => authz::Scope::Namespace,
                PolicyScope::Global => authz::Scope::Global,
            },
            action: match self.action {
                PolicyAction::Allow => authz::Action::Allow,
                PolicyAction::Deny => authz::Action::Deny,
            },
            rules,
            dry_run: self.dry_run,
        })
    }
}

impl MatchConfig {
    fn to_match(&self) -> Result<authz::Match, PolicyError> {
        let strings = |list: &[StringMatchConfig]| -> Result<Vec<_>, PolicyError> {
            list.iter().map(StringMatchConfig::to_match).collect()
        };
        let nets = |list: &[String]| -> Result<Vec<authz::IpNet>, PolicyError> {
            Ok(list.iter().map(|n| n.parse()).collect::<Result<_, _>>()?)
        };
        let ports = |list: &[u32]| -> Result<Vec<u16>, PolicyError> {
            list.iter()
                .map(|p| u16::try_from(*p).map_err(|_| PolicyError::Port(*p)))
                .collect()
        };
        let accounts = |list: &[ServiceAccountConfig]| -> Vec<authz::ServiceAccountMatch> {
            list.iter()
                .map(|a| authz::ServiceAccountMatch {
                    namespace: a.namespace.clone(),
                    service_account: a.service_account.clone(),
                })
                .collect()
        };
        Ok(authz::Match {
            namespaces: strings(&self.namespaces)?,
            not_namespaces: strings(&self.not_namespaces)?,
            principals: strings(&self.principals)?,
            not_principals: strings(&self.not_principals)?,
            source_ips: nets(&self.source_ips)?,
            not_source_ips: nets(&self.not_source_ips)?,
            destination_ips: nets(&self.destination_ips)?,
            not_destination_ips: nets(&self.not_destination_ips)?,
            destination_ports: ports(&self.destination_ports)?,
            not_destination_ports: ports(&self.not_destination_ports)?,
            service_accounts: accounts(&self.service_accounts),
            not_service_accounts: accounts(&self.not_service_accounts),
        })
    }
}

/// Why a configuration was refused; every problem found is listed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config is not valid YAML for hboned: {0}")]
    Parse(String),
    #[error("invalid config:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}
fn default_cert_lifetime() -> u64 {
    3600
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_protocol() -> Protocol {
    Protocol::Tcp
}
fn yes() -> bool {
    true
}

impl Config {
    /// Parses YAML, applies `HBONED_*` overrides from `env`, and validates.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config: Config =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut problems = config.apply_env(env);
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Reads `path` (or the embedded default when `None`) with the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => EMBEDDED_DEFAULT.to_owned(),
        };
        Self::parse(&text, &|k| std::env::var(k).ok())
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(v) = env("HBONED_NODE") {
            self.node = v;
        }
        if let Some(v) = env("HBONED_TRUST_DOMAIN") {
            self.trust_domain = v;
        }
        if let Some(v) = env("HBONED_CLUSTER_ID") {
            self.cluster_id = v;
        }
        if let Some(v) = env("HBONED_ZDS_SOCKET") {
            self.zds_socket = (!v.is_empty()).then(|| PathBuf::from(v));
        }
        if let Some(v) = env("HBONED_XDS_ADDRESS") {
            self.xds.address = v;
        }
        if let Some(v) = env("HBONED_CA_DIR") {
            self.ca.root_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = env("HBONED_CERT_LIFETIME_SECS") {
            match v.parse() {
                Ok(n) => self.ca.cert_lifetime_secs = n,
                Err(_) => problems.push(format!(
                    "HBONED_CERT_LIFETIME_SECS={v:?} is not a number of seconds"
                )),
            }
        }
        problems
    }

    /// Every semantic problem, not just the first.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if Identity::new(&self.trust_domain, "x", "x").is_err() {
            p.push(format!(
                "trustDomain {:?} is not a valid trust domain",
                self.trust_domain
            ));
        }
        let xds = &self.xds.address;
        if !xds.is_empty() && !xds.starts_with("http://") && !xds.starts_with("https://") {
            p.push(format!(
                "xds.address {xds:?} must start with http:// or https://"
            ));
        }
        let certs = &self.certificates;
        match certs.source {
            CertSourceKind::Files if certs.files.is_none() => {
                p.push("certificates.source is files but certificates.files is missing".into())
            }
            CertSourceKind::IstioCa if certs.istio_ca.is_none() => {
                p.push("certificates.source is istioCa but certificates.istioCa is missing".into())
            }
            CertSourceKind::Spire if certs.spire_socket.is_none() => p.push(
                "certificates.source is spire but certificates.spireSocket is missing".into(),
            ),
            _ => {}
        }
        if let Some(ca) = &certs.istio_ca
            && !ca.address.starts_with("http://")
            && !ca.address.starts_with("https://")
        {
            p.push(format!(
                "certificates.istioCa.address {:?} must start with http:// or https://",
                ca.address
            ));
        }
        for (key, value, range) in self.numeric_settings() {
            if let Some(v) = value
                && !range.contains(&v)
            {
                p.push(format!(
                    "{key} is {v}, outside {}..={}",
                    range.start(),
                    range.end()
                ));
            }
        }
        let mut uids = std::collections::HashSet::new();
        for (i, pod) in self.pods.iter().enumerate() {
            if Identity::new(&self.trust_domain, &pod.namespace, &pod.service_account).is_err() {
                p.push(format!(
                    "pods[{i}] ({}): namespace/serviceAccount do not form a SPIFFE ID",
                    pod.name
                ));
            }
            if !uids.insert(pod.uid()) {
                p.push(format!("pods[{i}]: duplicate uid {}", pod.uid()));
            }
        }
        for (i, w) in self.workloads.iter().enumerate() {
            if let Err(e) = self.workload(w) {
                p.push(format!("workloads[{i}] ({}): {e}", w.uid));
            }
            if w.workload_ips.is_empty() {
                p.push(format!("workloads[{i}] ({}): workloadIps is empty", w.uid));
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            if let Err(e) = self.service(s) {
                p.push(format!("services[{i}] ({}): {e}", s.hostname));
            }
        }
        for (i, policy) in self.policies.iter().enumerate() {
            if policy.name.is_empty() {
                p.push(format!("policies[{i}]: name is empty"));
            }
            if let Err(e) = policy.to_policy() {
                p.push(format!("policies[{i}] ({}): {e}", policy.name));
            }
        }
        p
    }

    /// Every numeric setting with the range it must fall in, checked at load: a value past
    /// them (a lifetime of 2^64 seconds) would only fail later, at every use.
    fn numeric_settings(&self) -> [(&'static str, Option<u64>, std::ops::RangeInclusive<u64>); 5] {
        [
            // Istio's CA caps workload certificates at 90 days (MAX_WORKLOAD_CERT_TTL).
            (
                "ca.certLifetimeSecs",
                Some(self.ca.cert_lifetime_secs),
                60..=90 * 24 * 3600,
            ),
            (
                "connectTimeoutSecs",
                Some(self.connect_timeout_secs),
                1..=300,
            ),
            ("drainTimeoutSecs", Some(self.drain_timeout_secs), 0..=3600),
            (
                "certificates.files.pollSecs",
                self.certificates.files.as_ref().map(|f| f.poll_secs),
                1..=3600,
            ),
            (
                "xds.onDemandTimeoutMs",
                self.xds.on_demand_timeout_ms,
                1..=60_000,
            ),
        ]
    }

    /// Converts a workload entry, defaulting its trust domain to the mesh's.
    pub fn workload(&self, w: &WorkloadConfig) -> Result<Workload, String> {
        let td = if w.trust_domain.is_empty() {
            &self.trust_domain
        } else {
            &w.trust_domain
        };
        let identity =
            Identity::new(td, &w.namespace, &w.service_account).map_err(|e| e.to_string())?;
        Ok(Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity,
            network: self.xds.network.clone(),
            addresses: w.workload_ips.clone(),
            node: w.node.clone(),
            protocol: w.protocol,
            services: w.services.clone(),
            healthy: true,
            authorization_policies: Vec::new(),
        })
    }

    pub fn service(&self, s: &ServiceConfig) -> Result<Service, String> {
        let subject_alt_names = s
            .subject_alt_names
            .iter()
            .map(|n| Identity::parse(n).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            vips: s.vips.clone(),
            ports: s.ports.clone(),
            subject_alt_names,
        })
    }

    /// The workload and service tables as a [`crate::state::State`].
    pub fn state(&self) -> crate::state::State {
        let mut state = crate::state::State::with_network(&self.xds.network);
        // Entries were validated by `parse`; an invalid one here is skipped, not fatal.
        for w in self.workloads.iter().filter_map(|w| self.workload(w).ok()) {
            state.upsert_workload(w);
        }
        for s in self.services.iter().filter_map(|s| self.service(s).ok()) {
            state.upsert_service(s);
        }
        for p in self.policies.iter().filter_map(|p| p.to_policy().ok()) {
            state.upsert_policy(p);
        }
        state
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }

    /// The xDS client's settings, when a control plane is configured.
    pub fn xds_settings(&self) -> Option<crate::xds::XdsSettings> {
        if self.xds.address.is_empty() {
            return None;
        }
        let node_id = if self.xds.node_id.is_empty() {
            self.node.clone()
        } else {
            self.xds.node_id.clone()
        };
        Some(crate::xds::XdsSettings {
            address: self.xds.address.clone(),
            root_ca: self.xds.root_ca.clone(),
            token_file: self.xds.token_file.clone(),
            cluster_id: self.cluster_id.clone(),
            node_id,
            node_metadata: self.xds.node_metadata.clone(),
            trust_domain: self.trust_domain.clone(),
            network: self.xds.network.clone(),
            on_demand: self.xds.on_demand,
            on_demand_timeout: Duration::from_millis(self.xds.on_demand_timeout_ms.unwrap_or(5000)),
        })
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    pub fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.ca.cert_lifetime_secs)
    }
}

#[cfg(test)]
mod tests;

//! Configuration: the schema of the YAML file (or the embedded default), its defaults (one
//! place: the `Default` impls below), `HBONED_*` environment overrides from an injectable source
//! ([`env`]), and validation that reports every problem at once ([`validate`]). What each part
//! of the proxy makes of its settings lives with that part (`State::from_config`,
//! `XdsSettings::from_config`, `authz::PolicyConfig::to_policy`, ...): this module imports no
//! runtime module. The workload and service tables are a subset of ztunnel's local-config
//! format.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::authz::PolicyConfig;
use crate::identity::DEFAULT_TRUST_DOMAIN;
use crate::ports;
use crate::state::Protocol;

pub use labels::{BadLabel, LabelMatch};

mod env;
mod labels;
mod validate;
pub mod ztunnel;

/// The configuration `hboned run` uses without `--config`: built-in CA, no static pods, pods
/// enrolled over ZDS when a node agent's socket is there.
pub(crate) const EMBEDDED_DEFAULT: &str = include_str!("../config/default.yaml");

/// The whole configuration of one node's proxy. A key left out of the file takes its value
/// from `Config::default()`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// The mesh's trust domain; workloads without one get it.
    pub trust_domain: String,
    /// Cluster name, sent in baggage (`k8s.cluster.name`).
    pub cluster_id: String,
    /// This node's name; workloads whose `node` equals it are local.
    pub node: String,
    /// The built-in CA.
    pub ca: CaConfig,
    /// Where workload certificates come from.
    pub certificates: CertificatesConfig,
    /// The node agent's ZDS socket; pods are enrolled from it when set.
    pub zds_socket: Option<PathBuf>,
    /// Pods enrolled from this file (standalone mode), each by its netns path.
    pub pods: Vec<PodConfig>,
    /// Known workloads (the local equivalent of xDS `Address` resources).
    pub workloads: Vec<WorkloadConfig>,
    /// Known services.
    pub services: Vec<ServiceConfig>,
    /// L4 authorization policies (README "Authorization policies"), in addition to those from
    /// xDS.
    pub policies: Vec<PolicyConfig>,
    /// Deliver inbound traffic with the client's source IP (IP_TRANSPARENT).
    pub preserve_source_ip: bool,
    /// Seconds to wait for a connect or handshake.
    pub connect_timeout_secs: u64,
    /// Where `GET /healthz/ready` is served (in the proxy's netns); `null` turns it off.
    pub readiness_address: Option<SocketAddr>,
    /// Where Prometheus metrics are served (in the proxy's netns); `null` turns them off.
    pub metrics_address: Option<SocketAddr>,
    /// The admin page (`/config_dump`, `/quitquitquit`, `/logging`); keep it on localhost.
    /// `null` turns it off.
    pub admin_address: Option<SocketAddr>,
    /// On SIGTERM, how long live connections may run on before the process exits (seconds).
    pub drain_timeout_secs: u64,
    /// The control plane (xDS); without an address, the workload tables above are all there is.
    pub xds: XdsConfig,
    /// Kubernetes mode: hboned is its own node agent (enrolls this node's pods of labelled
    /// namespaces) and discovers workloads from the API server. Present: on. Refused with
    /// `zdsSocket`, `xds.address` or `pods`, which would mean a second agent for the same pods.
    pub kubernetes: Option<KubernetesConfig>,
    /// Refuse plaintext into an enrolled pod whose source is an enrolled pod (its capture was
    /// bypassed; it should have come through a tunnel). Always on in Kubernetes mode; set it on
    /// the proxy of `hboned agent`.
    pub refuse_mesh_plaintext: bool,
    /// Refuse all plaintext into enrolled pods (kubelet's probes still pass, uncaptured), and
    /// refuse rather than pass through connections to addresses of `podCidrs` that discovery
    /// does not know. Off: permissive, as the seed design and ambient's default.
    pub strict: bool,
    /// The cluster's pod address ranges (CIDRs): a connection to an address there that
    /// discovery does not know yet is held until it does (up to `xds.onDemandTimeoutMs`), and
    /// with `strict` refused after that.
    pub pod_cidrs: Vec<String>,
    /// Take an HBONE client of any trust domain the roots verify, as ztunnel does (Istio's
    /// trust-domain aliases and migrations rely on it; policies still see the client's
    /// identity). Off: only clients of the server's own trust domain.
    pub any_client_trust_domain: bool,
    /// A file of certificate revocation lists (PEM or DER), reread when it changes: a peer
    /// certificate it revokes is refused both ways. ztunnel's `CRL_PATH`.
    pub crl_path: Option<PathBuf>,
    /// `hboned agent`'s own settings (Kubernetes mode's node agent, with `kubernetes:`); the
    /// proxy does not read them.
    pub agent: AgentConfig,
    /// The DNS proxy in each enrolled pod (README "DNS proxy").
    pub dns: DnsConfig,
}

/// The DNS proxy each enrolled pod gets when DNS capture is on: what the pod's port-53
/// traffic (redirected to `port` on its localhost, as istio-cni's DNS capture does) is
/// answered with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Serve DNS in each enrolled pod. Off by default; on under `hboned proxy ztunnel` unless
    /// `ISTIO_META_DNS_CAPTURE` says otherwise, as ztunnel has it.
    pub enabled: bool,
    /// The port on the pod's localhost (127.0.0.1, and ::1 where the pod has IPv6).
    pub port: u16,
    /// The cluster's DNS domain: `<service>.<namespace>.svc.<clusterDomain>`.
    pub cluster_domain: String,
    /// The upstream resolvers (their `nameserver` lines, `timeout` and `attempts` options) for
    /// names discovery does not know; read once at start.
    pub resolv_conf: PathBuf,
    /// Upstream queries one pod may have in flight; past it a query is answered SERVFAIL at
    /// once (a flood costs no memory).
    pub max_upstream_queries: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: false,
            port: ports::DNS,
            cluster_domain: "cluster.local".to_owned(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            max_upstream_queries: 64,
        }
    }
}

/// The node agent's sockets and its CNI plugin (README "Kubernetes mode").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where the proxy takes pods from (ZDS; the proxy's `zdsSocket`).
    pub zds_socket: PathBuf,
    /// Where the proxy discovers workloads and services (delta xDS; the proxy's
    /// `xds.address: unix://...`).
    pub xds_socket: PathBuf,
    /// Where the CNI plugin asks for enrollments.
    pub cni_socket: PathBuf,
    /// Install the CNI plugin into the node's CNI configuration; unset: pods are found
    /// through `/proc` once they run (their first connections uncaptured).
    pub cni: Option<CniConfig>,
    /// The user the proxy runs as, when not root: the ZDS and xDS sockets are made its own
    /// (mode 0600) so that it alone can connect.
    pub proxy_uid: Option<u32>,
    /// Where the agent keeps its last state (`pods.json`: the enrolled pods; `discovery.pb`:
    /// the workloads and services), which a restarted agent serves again before (or without)
    /// the API server. Keep it on a tmpfs: after a reboot nothing in it holds.
    pub state_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            zds_socket: PathBuf::from("/var/run/hboned/zds.sock"),
            xds_socket: PathBuf::from("/var/run/hboned/xds.sock"),
            cni_socket: PathBuf::from(crate::cni::DEFAULT_AGENT_SOCKET),
            cni: None,
            proxy_uid: None,
            state_dir: PathBuf::from("/var/run/hboned/state"),
        }
    }
}

/// Where the CNI plugin goes on the node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CniConfig {
    /// The runtime's network configuration directory.
    pub conf_dir: PathBuf,
    /// The runtime's plugin directory.
    pub bin_dir: PathBuf,
    /// The plugin binary to install; unset: `hboned-cni` beside the running `hboned`.
    pub plugin: Option<PathBuf>,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dir: PathBuf::from("/opt/cni/bin"),
            plugin: None,
        }
    }
}

/// Kubernetes mode's settings (README "Kubernetes mode").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Namespace labels that opt a namespace in, each `key=value` (or `key` alone: any value);
    /// a namespace carrying any of them is enrolled.
    pub namespace_labels: Vec<String>,
    /// The API server (`https://...` or `http://...`); unset: the in-cluster service account,
    /// else the kubeconfig (`KUBECONFIG`, `~/.kube/config`).
    pub api_server: Option<String>,
    /// Allow the built-in CA in this mode (one-node development only: every node would hold
    /// the CA key and could mint any identity).
    pub allow_builtin_ca: bool,
    /// Watch Services and EndpointSlices and translate their cluster IPs, so a connection to
    /// a ClusterIP between enrolled pods is tunneled (off only where the CNI translates VIPs at
    /// connect time, as Cilium's socket load balancer does: otherwise such connections leave
    /// in plaintext). On by default.
    pub services: bool,
    /// The cluster's DNS domain, for service hostnames (`<svc>.<ns>.svc.<domain>`).
    pub cluster_domain: String,
    /// `strict` for this mode (the same as the top-level key).
    pub strict: bool,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            namespace_labels: vec![DEFAULT_NAMESPACE_LABEL.to_owned()],
            api_server: None,
            allow_builtin_ca: false,
            services: true,
            cluster_domain: "cluster.local".to_owned(),
            strict: false,
        }
    }
}

/// The label that opts a namespace in, as Cilium's mTLS mode names it.
pub const DEFAULT_NAMESPACE_LABEL: &str = "io.cilium/mtls-enabled=true";
/// The SPIRE agent's admin socket where Cilium and SPIRE's charts put it: Kubernetes mode's
/// certificate source when none is named.
pub const DEFAULT_SPIRE_SOCKET: &str = "/run/spire/sockets/admin.sock";
/// How long a first SPIRE certificate is waited for (Cilium's `SPIRE_TIMEOUT` default).
pub const DEFAULT_SPIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// containerd's CRI socket, where a pod's processes are asked for (Cilium's
/// `CONTAINER_RUNTIME_SOCK_PATH` default).
pub const DEFAULT_CONTAINER_RUNTIME_SOCKET: &str = "/run/containerd/containerd.sock";

impl Default for Config {
    fn default() -> Self {
        Config {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            cluster_id: String::new(),
            node: String::new(),
            ca: CaConfig::default(),
            certificates: CertificatesConfig::default(),
            zds_socket: None,
            pods: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            policies: Vec::new(),
            preserve_source_ip: true,
            connect_timeout_secs: 10,
            // Dual stack, as ztunnel binds them (IPv4 alone where IPv6 is off: admin::bind).
            readiness_address: Some(SocketAddr::from((
                std::net::Ipv6Addr::UNSPECIFIED,
                ports::READINESS,
            ))),
            metrics_address: Some(SocketAddr::from((
                std::net::Ipv6Addr::UNSPECIFIED,
                ports::METRICS,
            ))),
            admin_address: Some(SocketAddr::from(([127, 0, 0, 1], ports::ADMIN))),
            drain_timeout_secs: 30,
            xds: XdsConfig::default(),
            kubernetes: None,
            refuse_mesh_plaintext: false,
            strict: false,
            pod_cidrs: Vec::new(),
            any_client_trust_domain: false,
            crl_path: None,
            agent: AgentConfig::default(),
            dns: DnsConfig::default(),
        }
    }
}

/// The control plane connection.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct XdsConfig {
    /// `https://istiod.istio-system.svc:15012`, `http://...`, or `unix:///var/run/cilium/xds.sock`
    /// (gRPC in cleartext on a node-local socket); empty: no control plane.
    pub address: String,
    /// PEM root that signed the control plane's certificate.
    pub root_ca: Option<PathBuf>,
    /// A bearer token file (e.g. a projected service account token), read at every connect.
    pub token_file: Option<PathBuf>,
    /// The xDS node id; defaults to `node`.
    pub node_id: String,
    /// Extra node metadata sent to the control plane.
    pub node_metadata: BTreeMap<String, String>,
    /// This proxy's network (prefix of on-demand names `<network>/<ip>`).
    pub network: String,
    /// Subscribe to no addresses up front; look each unknown destination up when needed.
    pub on_demand: bool,
    /// How long a connection to an unknown destination is held for its lookup (ms; 5000 when
    /// unset).
    pub on_demand_timeout_ms: Option<u64>,
}

/// The built-in CA's settings (both unset by default).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CaConfig {
    /// Directory with root-cert.pem and root-key.pem; unset: an ephemeral root, generated at
    /// start, that no other node trusts.
    pub root_dir: Option<PathBuf>,
    /// Lifetime of issued workload certificates, in seconds; unset: one hour, or 24 hours from
    /// the Istio CA (ztunnel's SECRET_TTL).
    pub cert_lifetime_secs: Option<u64>,
}

/// The certificate lifetime asked for when none is configured.
const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(3600);
/// ... and from the Istio CA: ztunnel's SECRET_TTL default.
const ISTIO_CA_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The certificate source, as the file spells it; [`CertificatesConfig::kind`] reads it as
/// one typed choice.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CertificatesConfig {
    /// `builtin` (the built-in CA of `ca`), `files`, `istioCa` or `spire`; unset: `builtin`,
    /// or `spire` in Kubernetes mode.
    pub source: Option<CertSourceKind>,
    /// The SPIRE agent's admin socket (Delegated Identity API); with `source: spire`. Unset in
    /// Kubernetes mode: `/run/spire/sockets/admin.sock`.
    pub spire_socket: Option<PathBuf>,
    /// With `source: spire`: how long a first certificate waits for the agent, in seconds
    /// (Cilium's `SPIRE_TIMEOUT`). Unset: 10.
    pub spire_timeout_secs: Option<u64>,
    /// With `source: spire`: the container runtime's CRI socket, asked for the process of a
    /// pod's application container that SPIRE attests the pod from; when it does not exist,
    /// `/proc` is scanned instead. Unset: containerd's `/run/containerd/containerd.sock`.
    pub container_runtime_socket: Option<PathBuf>,
    /// The certificate, key and bundle files; with `source: files`.
    pub files: Option<FilesConfig>,
    /// The Istio CA endpoint; with `source: istioCa`.
    pub istio_ca: Option<IstioCaConfig>,
}

/// The `certificates.source` key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CertSourceKind {
    /// The built-in CA (section `ca`).
    #[default]
    Builtin,
    /// Files on disk (section `certificates.files`).
    Files,
    /// The Istio CA (section `certificates.istioCa`).
    IstioCa,
    /// The SPIRE agent (`certificates.spireSocket`).
    Spire,
}

/// The certificate source chosen, with its settings: what the proxy builds its source from.
#[derive(Debug, Clone, Copy)]
pub enum CertSource<'a> {
    /// The built-in CA.
    Builtin(&'a CaConfig),
    /// Files on disk.
    Files(&'a FilesConfig),
    /// The Istio CA.
    IstioCa(&'a IstioCaConfig),
    /// The SPIRE agent's admin socket.
    Spire(&'a Path),
}

/// A certificate source named without the section it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("certificates.source is {kind} but certificates.{section} is missing")]
pub(crate) struct MissingSection {
    kind: &'static str,
    section: &'static str,
}

impl CertificatesConfig {
    /// The source named, else the mode's default (SPIRE in Kubernetes mode).
    pub fn kind(&self, kubernetes: bool) -> CertSourceKind {
        match (self.source, kubernetes) {
            (Some(kind), _) => kind,
            (None, true) => CertSourceKind::Spire,
            (None, false) => CertSourceKind::Builtin,
        }
    }
}

impl Config {
    /// The chosen certificate source with its section (`ca` for the built-in CA, which always
    /// has one).
    pub(crate) fn certificate_source(&self) -> Result<CertSource<'_>, MissingSection> {
        let certs = &self.certificates;
        let missing = |kind, section| MissingSection { kind, section };
        match certs.kind(self.kubernetes.is_some()) {
            CertSourceKind::Builtin => Ok(CertSource::Builtin(&self.ca)),
            CertSourceKind::Files => certs
                .files
                .as_ref()
                .map(CertSource::Files)
                .ok_or(missing("files", "files")),
            CertSourceKind::IstioCa => certs
                .istio_ca
                .as_ref()
                .map(CertSource::IstioCa)
                .ok_or(missing("istioCa", "istioCa")),
            CertSourceKind::Spire => match (&certs.spire_socket, &self.kubernetes) {
                (Some(path), _) => Ok(CertSource::Spire(path)),
                (None, Some(_)) => Ok(CertSource::Spire(Path::new(DEFAULT_SPIRE_SOCKET))),
                (None, None) => Err(missing("spire", "spireSocket")),
            },
        }
    }
}

/// Certificate, key and bundle files (one identity).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilesConfig {
    /// The workload certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The trust bundle (PEM roots).
    pub bundle: PathBuf,
    /// Seconds between re-reads.
    #[serde(default = "FilesConfig::default_poll_secs")]
    pub poll_secs: u64,
}

impl FilesConfig {
    fn default_poll_secs() -> u64 {
        5
    }
}

/// The Istio CA endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioCaConfig {
    /// `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// PEM root that signed the CA endpoint's certificate.
    #[serde(default)]
    pub root_ca: Option<PathBuf>,
    /// A bearer token file (e.g. a projected service account token), read at every request.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// A pod enrolled from the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodConfig {
    /// Unique id; defaults to `namespace/name`.
    #[serde(default)]
    pub uid: Option<String>,
    /// The pod's name.
    pub name: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's service account (`default` when empty).
    #[serde(default)]
    pub service_account: String,
    /// `/var/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
}

impl PodConfig {
    /// The uid, or `namespace/name` when none is given.
    pub(crate) fn uid(&self) -> String {
        self.uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", self.namespace, self.name))
    }
}

/// A workload entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Unique id.
    pub uid: String,
    /// The workload's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its service account (`default` when empty).
    #[serde(default)]
    pub service_account: String,
    /// Its trust domain; empty: the mesh's (`trustDomain`).
    #[serde(default)]
    pub trust_domain: String,
    /// Its addresses.
    pub workload_ips: Vec<IpAddr>,
    /// The node it runs on; equal to `node`: a local workload.
    #[serde(default)]
    pub node: String,
    /// `HBONE` (enrolled: reached through a tunnel) or `TCP` (default: plain).
    #[serde(default = "WorkloadConfig::default_protocol")]
    pub protocol: Protocol,
    /// `ns/hostname` → service port → target port.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// The waypoint connections addressed to this workload go through.
    #[serde(default)]
    pub waypoint: Option<GatewayConfig>,
    /// Its network; empty: the proxy's own (`xds.network`).
    #[serde(default)]
    pub network: String,
    /// On another network: the east-west gateway it is reached through (double HBONE); its
    /// `address` is on the workload's network.
    #[serde(default)]
    pub network_gateway: Option<GatewayConfig>,
}

/// A waypoint or network gateway: a service VIP or workload address, or a service's hostname,
/// and its HBONE port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// A service VIP (one of its endpoints is dialed) or a workload's address.
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// Or a service's hostname …
    #[serde(default)]
    pub hostname: Option<String>,
    /// … in this namespace (default: the entry's own).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The port its HBONE listener takes.
    #[serde(default = "GatewayConfig::default_port")]
    pub hbone_port: u16,
}

impl GatewayConfig {
    fn default_port() -> u16 {
        ports::HBONE
    }
}

impl WorkloadConfig {
    fn default_protocol() -> Protocol {
        Protocol::Tcp
    }
}

/// A service entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceConfig {
    /// The service's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its hostname (`name.namespace.svc.cluster.local`).
    pub hostname: String,
    /// Its virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Service port → target port.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    /// SPIFFE IDs its endpoints may present besides their own.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// The waypoint every connection to the service goes through.
    #[serde(default)]
    pub waypoint: Option<GatewayConfig>,
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
    Parse(#[source] serde_yaml_ng::Error),
    #[error("invalid config:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Parses YAML, applies `HBONED_*` overrides from `env`, and validates.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config: Config = serde_yaml_ng::from_str(text).map_err(ConfigError::Parse)?;
        let mut problems = env::apply(&mut config, env);
        problems.extend(validate::problems(&config));
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// `hboned proxy ztunnel`: the configuration ztunnel builds from `env` (its variables, its
    /// defaults), then the `HBONED_*` overrides, then validation.
    pub fn from_ztunnel_env(env: &ztunnel::Environment) -> Result<Self, ConfigError> {
        let (mut config, mut problems) = ztunnel::config(env);
        problems.extend(env::apply(&mut config, &|k| env.get(k)));
        problems.extend(validate::problems(&config));
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

    /// `connectTimeoutSecs` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }

    /// `drainTimeoutSecs` as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// `ca.certLifetimeSecs` as a duration, else the source's default.
    pub fn cert_lifetime(&self) -> Duration {
        let kind = self.certificates.kind(self.kubernetes.is_some());
        match (self.ca.cert_lifetime_secs, kind) {
            (Some(secs), _) => Duration::from_secs(secs),
            (None, CertSourceKind::IstioCa) => ISTIO_CA_CERT_LIFETIME,
            (None, _) => DEFAULT_CERT_LIFETIME,
        }
    }
}

#[cfg(test)]
mod tests;

//! The node proxy in three steps: [`Node::build`] turns a [`Config`] into running parts (state,
//! discovery, certificates, enrolled pods, the ZDS client, the proxy's own HTTP ports);
//! [`Node::serve`] waits for the shutdown future the caller passes in (or the admin page's
//! quit) and then drains. Tests run a node in-process with any future as its shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::admin::LogControl;
use crate::config::Config;
use crate::drain::Drain;
use crate::identity::CertificateManager;
use crate::inpod::{NodeContext, PodError, PodHandler, PodInfo, PodManager, PodProxyContext};
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::proxy::TunnelSettings;
use crate::state::{SharedState, State};
use crate::xds::{Resolver, XdsClient, XdsSettings};

/// A running node proxy, between [`Node::build`] and the end of [`Node::serve`].
#[derive(Debug)]
pub struct Node {
    drain: Drain,
    drain_timeout: Duration,
    manager: Arc<PodManager>,
    zds: Option<tokio::task::JoinHandle<()>>,
    /// The node's own tasks (the xDS client, the readiness, metrics and admin servers):
    /// stopped, and waited for, when the drain ends.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    kube: Option<KubeAgent>,
    quit: Arc<tokio::sync::Notify>,
    readiness: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
}

impl Node {
    /// How many pods the node serves now.
    pub fn pods_served(&self) -> usize {
        self.manager.pods().len()
    }

    /// Starts every part of the node inside the current tokio runtime. Fails on what the node
    /// cannot run without (its certificate source, its readiness and metrics ports); a broken
    /// config pod is reported and skipped.
    pub fn build(config: Config, log: LogControl) -> anyhow::Result<Node> {
        raise_descriptor_limit();
        // The enrolled pods by identity: the pod registry writes it, SPIRE attests from it.
        let local_pods = crate::identity::LocalPods::default();
        let source = super::certs::source(&config, &local_pods)?;
        tracing::info!(source = source.name(), "workload certificates source");
        let state = Arc::new(SharedState::new(State::from_config(&config)));
        let xds = XdsSettings::from_config(&config).map(|s| XdsClient::new(s, state.clone()));
        let resolver: Option<Arc<dyn Resolver>> = match &xds {
            Some(client) if config.xds.on_demand => Some(client.clone()),
            _ => None,
        };
        let mut tasks = Vec::new();
        if let Some(client) = &xds {
            tracing::info!(address = %config.xds.address, on_demand = config.xds.on_demand, "discovering workloads over xDS (on top of the config file's tables)");
            tasks.push(tokio::spawn(client.clone().run()));
        }
        let certs = Arc::new(CertificateManager::new(source.clone()));
        let metrics = node_metrics(&certs, xds.as_ref());
        let drain = Drain::default();
        let manager = Arc::new(PodManager::new(NodeContext {
            proxy: PodProxyContext {
                drain: drain.clone(),
                metrics: metrics.clone(),
                certs: certs.clone(),
                state: state.clone(),
                tunnel: TunnelSettings {
                    connect_timeout: config.connect_timeout(),
                    peers: peer_checks(&config)?,
                    ..TunnelSettings::default()
                },
                cluster_id: config.cluster_id.clone(),
                preserve_source_ip: config.preserve_source_ip,
                resolver,
                plaintext: inbound_plaintext(&config),
                cluster: cluster_guard(&config, &state),
                dns: dns_settings(&config)?,
            },
            trust_domain: config.trust_domain.clone(),
            local_pods,
        }));
        tracing::info!(node = %config.node, trust_domain = %config.trust_domain, pods = config.pods.len(), workloads = config.workloads.len(), services = config.services.len(), "hboned node proxy starting");
        manager.follow_trust_domains();
        enroll_config_pods(&config, &manager);
        manager.retry_pending(Duration::from_secs(5));
        let (ready_tx, zds_ready) = tokio::sync::watch::channel(config.zds_socket.is_none());
        let (kube_tx, kube_ready) = tokio::sync::watch::channel(config.kubernetes.is_none());
        // Ready once the node agent's snapshot arrived (and while it stays connected), no pod waits
        // for a retry of its enrollment, the control plane's first state was acknowledged, and
        // (Kubernetes mode) every watch listed and the first enrollment pass ran.
        let mut sources = vec![zds_ready, kube_ready, manager.settled()];
        sources.extend(xds.as_ref().map(|c| c.ready()));
        let readiness = match config.readiness_address {
            Some(addr) => {
                let (bound, task) = serve_readiness(addr, crate::admin::all_ready(sources))?;
                tasks.push(task);
                Some(bound)
            }
            None => None,
        };
        let metrics_addr = match config.metrics_address {
            Some(addr) => {
                let (bound, task) = serve_metrics(addr, metrics.clone(), Some(certs.clone()))?;
                tasks.push(task);
                Some(bound)
            }
            None => None,
        };
        // The node agent last, once the proxy's own ports answer: a probe during the first
        // enrollments sees "not ready", never a refused connection.
        let zds = config.zds_socket.clone().map(|path| {
            tracing::info!(path = %path.display(), "enrolling pods from the node agent (ZDS)");
            let handler: Arc<dyn PodHandler> = manager.clone();
            tokio::spawn(async move { crate::inpod::run_zds(&path, handler, ready_tx).await })
        });
        let kube = match &config.kubernetes {
            Some(settings) => Some(start_kubernetes(
                &config, settings, &state, &manager, &metrics, kube_tx,
            )?),
            None => None,
        };
        let quit = Arc::new(tokio::sync::Notify::new());
        if let Some(addr) = config.admin_address {
            let admin = crate::admin::AdminContext {
                config: serde_json::to_value(&config)?,
                state,
                certs,
                pods: manager.clone(),
                quit: quit.clone(),
                log,
            };
            tasks.push(tokio::spawn(serve_admin(addr, admin)));
        }
        Ok(Node {
            drain,
            drain_timeout: config.drain_timeout(),
            manager,
            zds,
            tasks,
            kube,
            quit,
            readiness,
            metrics: metrics_addr,
        })
    }

    /// Where readiness is served, when it is.
    pub fn readiness_address(&self) -> Option<SocketAddr> {
        self.readiness
    }

    /// Where metrics are served, when they are.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Serves until `shutdown` resolves or the admin page asks to quit, then drains.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => {}
            _ = self.quit.notified() => tracing::info!("quit requested on the admin page"),
        }
        self.drain().await;
    }

    /// Stops accepting (a proxy started beside this one takes new connections), sends GOAWAY
    /// on the HBONE connections, and lets live connections finish up to the drain timeout.
    async fn drain(self) {
        let deadline = self.drain_timeout;
        tracing::info!(live = self.drain.active(), ?deadline, "draining");
        self.drain.start();
        // No more enrollments: an Add during the drain must not open listeners again.
        if let Some(zds) = self.zds {
            zds.abort();
        }
        // Nor in Kubernetes mode; the pods keep their rules for the proxy that takes over.
        if let Some(kube) = &self.kube {
            kube.stop();
        }
        self.manager.stop_listening();
        if self.drain.wait(deadline).await {
            tracing::info!("drained; exiting");
        } else {
            tracing::warn!(
                live = self.drain.active(),
                "drain deadline passed; closing the remaining connections"
            );
        }
        // Readiness and metrics answered through the drain; now the node's own tasks end.
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

#[cfg(feature = "kubernetes")]
type KubeAgent = crate::kube::Running;

/// A build without Kubernetes mode never has an agent to stop.
#[cfg(not(feature = "kubernetes"))]
#[derive(Debug)]
enum KubeAgent {}

#[cfg(not(feature = "kubernetes"))]
impl KubeAgent {
    fn stop(&self) {
        match *self {}
    }
}

#[cfg(not(feature = "kubernetes"))]
fn start_kubernetes(
    _: &Config,
    _: &crate::config::KubernetesConfig,
    _: &Arc<SharedState>,
    _: &Arc<PodManager>,
    _: &Arc<Metrics>,
    _: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<KubeAgent> {
    anyhow::bail!("this build of hboned has no Kubernetes mode (cargo feature `kubernetes`)")
}

/// Kubernetes mode: watches the API server, enrolls this node's pods of opted-in namespaces.
#[cfg(feature = "kubernetes")]
fn start_kubernetes(
    config: &Config,
    settings: &crate::config::KubernetesConfig,
    state: &Arc<SharedState>,
    manager: &Arc<PodManager>,
    metrics: &Arc<Metrics>,
    ready: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<crate::kube::Running> {
    let client = crate::kube::client(settings)?;
    tracing::info!(node = %config.node, labels = ?settings.namespace_labels, "Kubernetes mode: enrolling this node's pods of labelled namespaces");
    let handler: Arc<dyn PodHandler> = manager.clone();
    Ok(crate::kube::start(
        client,
        crate::kube::Settings::from_config(config, settings)?,
        state.clone(),
        handler,
        metrics.clone(),
        ready,
        crate::kube::AgentExtras::default(),
    ))
}

/// The checks of peers' certificates `config` asks for; its revocation list read (and then
/// watched), or the reason it cannot be.
fn peer_checks(config: &Config) -> anyhow::Result<crate::tls::PeerChecks> {
    let revocations = match &config.crl_path {
        Some(path) => {
            let revocations = Arc::new(crate::tls::revocation::Revocations::load(path)?);
            revocations.watch(Duration::from_secs(2));
            tracing::info!(path = %path.display(), lists = revocations.lists().len(), "refusing peers the revocation lists name");
            Some(revocations)
        }
        None => None,
    };
    Ok(crate::tls::PeerChecks {
        any_client_trust_domain: config.any_client_trust_domain,
        revocations,
    })
}

/// Which plaintext enrolled pods take: none with `strict`; none from enrolled pods in
/// Kubernetes mode or with `refuseMeshPlaintext`; else any (policy decides).
fn inbound_plaintext(config: &Config) -> crate::proxy::passthrough::InboundPlaintext {
    use crate::proxy::passthrough::InboundPlaintext;
    let strict = config.strict || config.kubernetes.as_ref().is_some_and(|k| k.strict);
    if strict {
        InboundPlaintext::Refuse
    } else if config.refuse_mesh_plaintext || config.kubernetes.is_some() {
        InboundPlaintext::RefuseMesh
    } else {
        InboundPlaintext::Accept
    }
}

/// The pods' DNS proxy, when `dns.enabled`: its upstream read from the resolv.conf now, so
/// a missing one stops the start rather than every pod's first lookup.
fn dns_settings(config: &Config) -> anyhow::Result<Option<crate::dns::DnsSettings>> {
    let settings = crate::dns::DnsSettings::from_config(&config.dns)
        .context("dns: the DNS proxy cannot start")?;
    if let Some(dns) = &settings {
        tracing::info!(port = dns.port(), upstream = ?dns.upstream().servers(), "DNS proxy on in each enrolled pod");
    }
    Ok(settings)
}

/// The hold (and strict refusal) of unknown addresses in `podCidrs`, when any are given.
fn cluster_guard(
    config: &Config,
    state: &Arc<SharedState>,
) -> Option<Arc<crate::proxy::outbound::ClusterGuard>> {
    // Validated at load: entries that do not parse were reported there.
    let cidrs: Vec<crate::authz::IpNet> = config
        .pod_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    if cidrs.is_empty() {
        return None;
    }
    Some(Arc::new(crate::proxy::outbound::ClusterGuard {
        state: state.clone(),
        cidrs,
        hold: Duration::from_millis(config.xds.on_demand_timeout_ms.unwrap_or(5000)),
        strict: config.strict || config.kubernetes.as_ref().is_some_and(|k| k.strict),
    }))
}

/// The registry with the certificate and xDS counters.
fn node_metrics(certs: &CertificateManager, xds: Option<&Arc<XdsClient>>) -> Arc<Metrics> {
    let mut counters = vec![
        (
            "hboned_certificate_renewals",
            "Certificate renewals",
            certs.metrics().renewals.clone(),
        ),
        (
            "hboned_certificate_renewal_failures",
            "Failed certificate renewals",
            certs.metrics().renewal_failures.clone(),
        ),
    ];
    if let Some(client) = xds {
        counters.push((
            "hboned_xds_rejected_resources",
            "xDS resources rejected (NACKed)",
            client.rejected_counter(),
        ));
        counters.push((
            "hboned_xds_policy_entries_dropped",
            "Unreadable authorization policy entries dropped from xDS policies",
            client.dropped_policy_entries_counter(),
        ));
    }
    Metrics::build(counters, xds.map(|c| c.metrics()))
}

/// Enrolls the config file's pods, and removes each one when its netns path goes (there is no
/// node agent to say so). One broken entry does not take the others down: it is reported.
fn enroll_config_pods(config: &Config, manager: &Arc<PodManager>) {
    for pod in &config.pods {
        let info = PodInfo {
            uid: pod.uid(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        };
        let result = Netns::open(&pod.netns)
            .map_err(|source| PodError::Open {
                path: pod.netns.clone(),
                source,
            })
            .and_then(|ns| manager.add(info, ns));
        if let Err(e) = result {
            tracing::error!(pod = %pod.uid(), error = %e, "cannot enroll pod from the config");
        }
    }
    let by_path = config
        .pods
        .iter()
        .map(|p| (p.uid(), p.netns.clone()))
        .collect();
    manager.follow_netns_paths(by_path, Duration::from_secs(2));
}

/// Serves readiness on `addr`: the address bound, and the task serving it.
pub(super) fn serve_readiness(
    addr: SocketAddr,
    ready: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = crate::admin::bind(addr)
        .with_context(|| format!("binding the readiness listener on {addr} (readinessAddress)"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "readiness at /healthz/ready");
    let task = tokio::spawn(crate::admin::serve_readiness(listener, ready));
    Ok((bound, task))
}

/// Serves `metrics` (with the expiries of `certs`' certificates, where there are any: the node
/// agent has none of its own): the address bound, and the task serving it.
pub(super) fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    certs: Option<Arc<CertificateManager>>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = crate::admin::bind(addr)
        .with_context(|| format!("binding the metrics listener on {addr} (metricsAddress)"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics at /metrics and /stats/prometheus");
    let task = tokio::spawn(crate::admin::serve(listener, move |req| {
        crate::admin::metrics(&req, || {
            if let Some(certs) = &certs {
                metrics.set_certificate_expiries(&certs.expiries());
            }
            metrics.encode()
        })
    }));
    Ok((bound, task))
}

/// The admin page; its port is taken once a predecessor beside this proxy has let it go.
async fn serve_admin(addr: SocketAddr, admin: crate::admin::AdminContext) {
    let admin = Arc::new(admin);
    let listener = crate::admin::bind_exclusive(addr).await;
    if let Ok(bound) = listener.local_addr() {
        tracing::info!(addr = %bound, "admin page at /config_dump");
    }
    crate::admin::serve(listener, move |req| {
        let (status, body) =
            crate::admin::admin(req.method(), req.uri().path(), req.uri().query(), &admin);
        let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *resp.status_mut() = status;
        resp
    })
    .await
}

/// Raises the soft limit on open descriptors to the hard one, as ztunnel does: every proxied
/// connection costs two or three descriptors, and the soft default (often 1,024) is reached by
/// a few hundred connections. Accept loops back off at the limit rather than spin.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-descriptor limit"),
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-descriptor limit")
            }
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-descriptor limit"),
    }
}

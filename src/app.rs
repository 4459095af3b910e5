//! Wiring for the binary: builds the CA, certificate manager, workload state, pod manager and
//! ZDS client from a [`Config`], and runs them until SIGINT/SIGTERM. No protocol logic here.
//!
//! [`run_node`] is the node proxy. [`run_loopback`] is a self-contained mode for machines
//! without namespaces: one "client" and one "server" workload on 127.0.0.1, an HBONE server,
//! an outbound listener tunneling to a built-in echo app, and a self-check through the tunnel.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::hbone::{Baggage, ConnectRequest, TraceParent};
use crate::identity::ca::{self, BuiltinCa};
use crate::identity::{CertificateManager, Identity};
use crate::inpod::{NodeContext, PodHandler, PodInfo, PodManager};
use crate::netns::Netns;
use crate::netns::{DefaultSocketFactory, SocketFactory};
use crate::proxy::{
    HboneClient, InboundServer, LocalWorkload, Outbound, PoolKey, Route, Router, TunnelSettings,
};

/// Settings of a loopback run.
#[derive(Debug, Clone)]
pub struct LoopbackSettings {
    /// Where apps connect to be tunneled (the stand-in for the 15001 capture).
    pub outbound: SocketAddr,
    /// The HBONE server's address (15008).
    pub inbound: SocketAddr,
    /// A directory holding root-cert.pem and root-key.pem; `None` tries certs-dev/, then
    /// generates an ephemeral root.
    pub ca_dir: Option<PathBuf>,
    /// Workload certificate lifetime.
    pub cert_lifetime: Duration,
    /// Exit after the self-check instead of serving.
    pub check_only: bool,
}

/// Loads the CA root: the configured directory, else ./certs-dev, else a fresh ephemeral root.
pub fn load_ca(dir: Option<&std::path::Path>, lifetime: Duration) -> anyhow::Result<BuiltinCa> {
    let ca = match dir {
        Some(dir) => BuiltinCa::load_dir(dir).with_context(|| {
            format!(
                "loading the CA root from {} (ca.rootDir; `hboned ca init --dir {}` writes one)",
                dir.display(),
                dir.display()
            )
        })?,
        None if std::path::Path::new("certs-dev")
            .join(ca::ROOT_CERT_FILE)
            .exists() =>
        {
            tracing::warn!("using the development root in certs-dev/: never use it in production");
            BuiltinCa::load_dir(std::path::Path::new("certs-dev"))?
        }
        None => {
            tracing::warn!(
                "no CA root configured: generated an ephemeral root that no other node trusts"
            );
            BuiltinCa::generate(SystemTime::now())?
        }
    };
    Ok(ca.with_lifetime(lifetime))
}

/// Runs the node proxy: enrolls the config's pods, follows the node agent over ZDS when a
/// socket is configured, and serves until SIGINT/SIGTERM.
pub async fn run_node(
    config: Config,
    set_log_level: crate::admin::LogLevelSetter,
) -> anyhow::Result<()> {
    raise_descriptor_limit();
    let source = cert_source(&config)?;
    tracing::info!(source = source.name(), "workload certificates source");
    let tunnel = TunnelSettings {
        connect_timeout: config.connect_timeout(),
        ..TunnelSettings::default()
    };
    let state = Arc::new(crate::state::SharedState::new(config.state()));
    let ctx_state = state.clone();
    let xds = config
        .xds_settings()
        .map(|settings| crate::xds::XdsClient::new(settings, state.clone()));
    let resolver: Option<Arc<dyn crate::xds::Resolver>> = match &xds {
        Some(client) if config.xds.on_demand => Some(client.clone()),
        _ => None,
    };
    if let Some(client) = &xds {
        tracing::info!(address = %config.xds.address, on_demand = config.xds.on_demand, "discovering workloads over xDS (on top of the config file's tables)");
        tokio::spawn(client.clone().run());
    }
    let certs = Arc::new(CertificateManager::new(source));
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
    if let Some(client) = &xds {
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
    let metrics = crate::metrics::Metrics::new(counters);
    let drain = crate::drain::Drain::default();
    let ctx = NodeContext {
        drain: drain.clone(),
        metrics: metrics.clone(),
        certs: certs.clone(),
        state,
        tunnel,
        trust_domain: config.trust_domain.clone(),
        cluster_id: config.cluster_id.clone(),
        preserve_source_ip: config.preserve_source_ip,
        resolver,
    };
    let manager = Arc::new(PodManager::new(ctx));
    tracing::info!(node = %config.node, trust_domain = %config.trust_domain, pods = config.pods.len(), workloads = config.workloads.len(), services = config.services.len(), "hboned node proxy starting");
    for pod in &config.pods {
        let info = PodInfo {
            uid: pod.uid(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        };
        // One broken pod entry must not take the others down: report it and go on.
        let result = Netns::open(&pod.netns)
            .map_err(|e| e.to_string())
            .and_then(|ns| manager.add(info, ns));
        if let Err(e) = result {
            tracing::error!(pod = %pod.uid(), error = %e, "cannot enroll pod from the config");
        }
    }
    // Without a node agent to say so, a config pod is gone when its netns is.
    let by_path = config
        .pods
        .iter()
        .map(|p| (p.uid(), p.netns.clone()))
        .collect();
    manager.follow_netns_paths(by_path, Duration::from_secs(2));
    let (ready_tx, zds_ready) = tokio::sync::watch::channel(config.zds_socket.is_none());
    let zds = config.zds_socket.clone().map(|path| {
        tracing::info!(path = %path.display(), "enrolling pods from the node agent (ZDS)");
        let handler: Arc<dyn PodHandler> = manager.clone();
        tokio::spawn(async move { crate::inpod::run_zds(&path, handler, ready_tx).await })
    });
    // Ready once the node agent's first snapshot and the control plane's first state arrived.
    let mut sources = vec![zds_ready];
    sources.extend(xds.as_ref().map(|c| c.ready()));
    let ready = crate::admin::all_ready(sources);
    if let Some(addr) = config.readiness_address {
        let listener = crate::admin::bind(addr).with_context(|| {
            format!("binding the readiness listener on {addr} (readinessAddress)")
        })?;
        tracing::info!(addr = %listener.local_addr()?, "readiness at /healthz/ready");
        tokio::spawn(crate::admin::serve_readiness(listener, ready));
    }
    if let Some(addr) = config.metrics_address {
        let listener = crate::admin::bind(addr)
            .with_context(|| format!("binding the metrics listener on {addr} (metricsAddress)"))?;
        tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics and /stats/prometheus");
        let (metrics, certs) = (metrics.clone(), certs.clone());
        tokio::spawn(crate::admin::serve(listener, move |req| {
            crate::admin::metrics(&req, || {
                metrics.set_certificate_expiries(&certs.expiries());
                metrics.encode()
            })
        }));
    }
    println!(
        "hboned: serving {} pod(s); Ctrl-C stops",
        manager.pods().len()
    );
    let quit = Arc::new(tokio::sync::Notify::new());
    if let Some(addr) = config.admin_address {
        let admin = Arc::new(crate::admin::AdminContext {
            config: serde_json::to_value(&config)?,
            state: ctx_state,
            certs: certs.clone(),
            pods: manager.clone(),
            quit: quit.clone(),
            set_log_level,
        });
        tokio::spawn(async move {
            let listener = crate::admin::bind_exclusive(addr).await;
            if let Ok(bound) = listener.local_addr() {
                tracing::info!(addr = %bound, "admin page at /config_dump");
            }
            crate::admin::serve(listener, move |req| {
                let (status, body) =
                    crate::admin::admin(req.method(), req.uri().path(), req.uri().query(), &admin);
                let mut resp =
                    http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                *resp.status_mut() = status;
                resp
            })
            .await
        });
    }
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = quit.notified() => tracing::info!("quit requested on the admin page"),
    }
    // Drain: stop accepting (a proxy started beside this one takes new connections), GOAWAY the
    // HBONE connections, and let live connections finish up to the deadline.
    let deadline = config.drain_timeout();
    tracing::info!(live = drain.active(), ?deadline, "draining");
    drain.start();
    // No more enrollments: an Add during the drain must not open listeners again.
    if let Some(zds) = zds {
        zds.abort();
    }
    manager.stop_listening();
    if drain.wait(deadline).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            live = drain.active(),
            "drain deadline passed; closing the remaining connections"
        );
    }
    Ok(())
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

/// The configured certificate source.
fn cert_source(config: &Config) -> anyhow::Result<Arc<dyn crate::identity::CertSource>> {
    use crate::config::CertSourceKind;
    use crate::identity::istio_ca::{IstioCa, IstioCaSettings};
    let certs = &config.certificates;
    Ok(match (certs.source, &certs.files, &certs.istio_ca) {
        (CertSourceKind::Files, Some(f), _) => Arc::new(crate::identity::files::FileSource {
            cert: f.cert.clone(),
            key: f.key.clone(),
            bundle: f.bundle.clone(),
            poll: Duration::from_secs(f.poll_secs),
        }),
        (CertSourceKind::IstioCa, _, Some(c)) => Arc::new(IstioCa::new(IstioCaSettings {
            address: c.address.clone(),
            root_ca: c.root_ca.clone(),
            token_file: c.token_file.clone(),
            cluster_id: config.cluster_id.clone(),
            lifetime: config.cert_lifetime(),
        })?),
        (CertSourceKind::Spire, _, _) => match &certs.spire_socket {
            Some(socket) => Arc::new(crate::identity::spire::Spire::new(socket.clone())?),
            None => anyhow::bail!(
                "certificates.source is spire but certificates.spireSocket is missing"
            ),
        },
        // Validation guarantees the sections exist; the built-in CA is the default.
        _ => Arc::new(load_ca(
            config.ca.root_dir.as_deref(),
            config.cert_lifetime(),
        )?),
    })
}

/// Tunnels every connection to one fixed workload: the loopback mode's whole routing table.
#[derive(Debug)]
struct FixedRouter {
    key: PoolKey,
    target: SocketAddr,
}

impl Router for FixedRouter {
    fn route(&self, src: SocketAddr, _dst: SocketAddr) -> Route {
        let mut request = ConnectRequest::new(self.target);
        request.forwarded_for = Some(src);
        let mut baggage = Baggage::default();
        baggage
            .push("k8s.namespace.name", "default")
            .push("service.name", "echo");
        request.baggage = baggage;
        request.traceparent = Some(TraceParent::random());
        let source = crate::metrics::Peer::new("client", Some(self.key.source()));
        let destination = crate::metrics::Peer::new("echo", None);
        Route::Hbone {
            key: self.key.clone(),
            request,
            peers: (source, destination),
        }
    }
}

/// Runs the loopback proxy until SIGINT/SIGTERM (or only the self-check).
pub async fn run_loopback(settings: LoopbackSettings) -> anyhow::Result<()> {
    let drain = crate::drain::Drain::default();
    let ca = Arc::new(load_ca(settings.ca_dir.as_deref(), settings.cert_lifetime)?);
    let certs = Arc::new(CertificateManager::new(ca));
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let tunnel = TunnelSettings::default();
    let client_id = Identity::new("", "default", "client")?;
    let server_id = Identity::new("", "default", "server")?;

    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(serve_echo(echo));

    let inbound_listener = sockets
        .tcp_bind(settings.inbound)
        .with_context(|| format!("binding the HBONE listener on {}", settings.inbound))?;
    let inbound_addr = inbound_listener.local_addr()?;
    let workload = LocalWorkload {
        identity: server_id.clone(),
        addresses: vec![echo_addr.ip()],
        preserve_source_ip: false,
        state: None,
        metrics: None,
        drain: Some(drain.clone()),
    };
    let server = InboundServer::new(workload, certs.clone(), sockets.clone(), tunnel.clone());
    tokio::spawn(server.serve(inbound_listener));

    let client = Arc::new(HboneClient::new(certs, sockets.clone(), tunnel.clone()));
    let router = Arc::new(FixedRouter {
        key: PoolKey::new(
            client_id.clone(),
            vec![server_id.clone()],
            inbound_addr,
            None,
        ),
        target: echo_addr,
    });
    let outbound_listener = sockets
        .tcp_bind(settings.outbound)
        .with_context(|| format!("binding the outbound listener on {}", settings.outbound))?;
    let outbound_addr = outbound_listener.local_addr()?;
    let outbound = Outbound::new(
        client.clone(),
        sockets,
        router,
        None,
        tunnel,
        None,
        Some(drain.clone()),
    );
    tokio::spawn(outbound.serve(outbound_listener, |s| s.local_addr().ok()));

    tracing::info!(%outbound_addr, %inbound_addr, app = %echo_addr, client = %client_id, server = %server_id, "loopback HBONE proxy up");
    self_check(outbound_addr).await?;
    if settings.check_only {
        // Let the self-check's connections finish on both proxies (their access-log lines
        // included) before exiting.
        drain.start();
        drain.wait(Duration::from_secs(5)).await;
        return Ok(());
    }
    println!(
        "hboned: connect to {outbound_addr} (e.g. `nc {} {}`): what you send is echoed back through an mTLS HBONE tunnel. Ctrl-C stops.",
        outbound_addr.ip(),
        outbound_addr.port()
    );
    shutdown_signal().await;
    tracing::info!(pool = ?client.stats(), "shutting down");
    Ok(())
}

/// Sends 1 MiB through the outbound listener and checks the echo.
async fn self_check(outbound: SocketAddr) -> anyhow::Result<()> {
    const LEN: usize = 1024 * 1024;
    let started = Instant::now();
    let data: Vec<u8> = (0..LEN).map(|i| (i * 31 % 251) as u8).collect();
    let mut app = TcpStream::connect(outbound).await?;
    let (mut rd, mut wr) = app.split();
    let mut back = vec![0u8; LEN];
    let (w, r) = tokio::join!(
        async {
            wr.write_all(&data).await?;
            wr.shutdown().await
        },
        rd.read_exact(&mut back)
    );
    w.context("self-check: writing through the tunnel")?;
    r.context("self-check: reading the echo (is the HBONE server up?)")?;
    if back != data {
        bail!("self-check: the echo differs from what was sent");
    }
    let line = format!(
        "self-check passed: 1 MiB echoed through the HBONE tunnel (TLS 1.3 mTLS, HTTP/2 CONNECT) in {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    tracing::info!("{line}");
    println!("hboned: {line}");
    Ok(())
}

async fn serve_echo(listener: tokio::net::TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

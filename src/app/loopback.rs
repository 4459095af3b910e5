//! Loopback mode, for machines without namespaces or root: one "client" and one "server"
//! workload on 127.0.0.1, an HBONE server, an outbound listener tunneling to a built-in echo
//! app, and a self-check through the tunnel at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::hbone::{Baggage, ConnectRequest, TraceParent};
use crate::identity::ca::{self, BuiltinCa};
use crate::identity::{CertificateManager, Identity};
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
    /// A directory holding root-cert.pem and root-key.pem; `None` tries ./certs-dev, then
    /// generates an ephemeral root.
    pub ca_dir: Option<PathBuf>,
    /// Workload certificate lifetime.
    pub cert_lifetime: Duration,
    /// Exit after the self-check instead of serving.
    pub check_only: bool,
}

/// The loopback CA: `--ca-dir`, else ./certs-dev when run from a checkout (the CLI's documented
/// default), else an ephemeral root. Client and server share it, so any root works here.
fn loopback_ca(dir: Option<&Path>, lifetime: Duration) -> anyhow::Result<BuiltinCa> {
    let dev = Path::new("certs-dev");
    let ca = match dir {
        Some(dir) => super::certs::load_root(dir)?,
        None if dev.join(ca::ROOT_CERT_FILE).exists() => {
            tracing::warn!("using the development root in certs-dev/: never use it in production");
            BuiltinCa::load_dir(dev)?
        }
        None => BuiltinCa::generate(SystemTime::now())?,
    };
    Ok(ca.with_lifetime(lifetime))
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
            inner: None,
            peers: (source, destination),
            service: None,
        }
    }
}

/// Runs the loopback proxy until `shutdown` resolves (or only the self-check); what a user at
/// the terminal should read goes to `announce`.
pub async fn run_loopback(
    settings: LoopbackSettings,
    announce: impl Fn(&str),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let drain = crate::drain::Drain::default();
    let ca = Arc::new(loopback_ca(
        settings.ca_dir.as_deref(),
        settings.cert_lifetime,
    )?);
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
        identity: server_id.clone().into(),
        addresses: vec![echo_addr.ip()],
        preserve_source_ip: false,
        state: None,
        metrics: None,
        drain: Some(drain.clone()),
        pod: Default::default(),
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
    let outbound = std::sync::Arc::new(Outbound::new(
        client.clone(),
        sockets,
        router,
        None,
        tunnel,
        None,
        Some(drain.clone()),
    ));
    tokio::spawn(outbound.serve(outbound_listener, |s| s.local_addr().ok()));

    tracing::info!(%outbound_addr, %inbound_addr, app = %echo_addr, client = %client_id, server = %server_id, "loopback HBONE proxy up");
    announce(&self_check(outbound_addr).await?);
    if settings.check_only {
        // Let the self-check's connections finish on both proxies (their access-log lines
        // included) before exiting.
        drain.start();
        drain.wait(Duration::from_secs(5)).await;
        return Ok(());
    }
    announce(&format!(
        "connect to {outbound_addr} (e.g. `nc {} {}`): what you send is echoed back through an mTLS HBONE tunnel. Ctrl-C stops.",
        outbound_addr.ip(),
        outbound_addr.port()
    ));
    shutdown.await;
    tracing::info!(pool = ?client.stats(), "shutting down");
    Ok(())
}

/// Sends 1 MiB through the outbound listener and checks the echo; the line that says so.
async fn self_check(outbound: SocketAddr) -> anyhow::Result<String> {
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
    Ok(line)
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

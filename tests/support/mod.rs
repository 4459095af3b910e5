//! Shared pieces of the loopback tests: a CA, an HBONE server for one workload on 127.0.0.1, a
//! client, and small target apps. Everything binds 127.0.0.1:0.

#![allow(dead_code, clippy::unwrap_used)]

pub(crate) mod agent;
pub(crate) mod cilium;
pub(crate) mod cilium_agent;
pub(crate) mod fake_ads;
pub(crate) mod kube_api;
pub(crate) mod kubelet;
pub(crate) mod peer;
pub(crate) mod real;
pub(crate) mod spire;
pub(crate) mod topo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use hboned::hbone::ConnectRequest;
use hboned::identity::ca::BuiltinCa;
use hboned::identity::{CertificateManager, Identity};
use hboned::netns::{DefaultSocketFactory, SocketFactory};
use hboned::proxy::{HboneClient, InboundServer, LocalWorkload, PoolKey, TunnelSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Runs a command to its end and returns its output, failing the test (with its stderr) if
/// it fails.
pub(crate) fn sh(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "test", sa).unwrap()
}

/// A CA shared by both ends, the way two nodes of one cluster share a root.
pub(crate) fn ca() -> Arc<BuiltinCa> {
    Arc::new(BuiltinCa::generate(SystemTime::now()).unwrap())
}

/// A running HBONE server presenting `identity` for the workload at 127.0.0.1.
pub(crate) struct Server {
    pub addr: SocketAddr,
    pub identity: Identity,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stops accepting (its connections go on), as a draining proxy does.
    pub(crate) fn stop_accepting(&self) {
        self.task.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn server(ca: Arc<BuiltinCa>, identity: Identity) -> Server {
    server_with_policies(ca, identity, None).await
}

/// Like [`server`], enforcing the policies in `policies`.
pub(crate) async fn server_with_policies(
    ca: Arc<BuiltinCa>,
    identity: Identity,
    policies: Option<Arc<hboned::state::SharedState>>,
) -> Server {
    server_with(ca, identity, policies, None).await
}

/// Like [`server_with_policies`], counting connections in `metrics`.
pub(crate) async fn server_with(
    ca: Arc<BuiltinCa>,
    identity: Identity,
    policies: Option<Arc<hboned::state::SharedState>>,
    metrics: Option<Arc<hboned::metrics::Metrics>>,
) -> Server {
    let workload = LocalWorkload {
        state: policies,
        metrics,
        ..localhost_workload(identity)
    };
    serve(
        certs_of(ca),
        workload,
        any_port(),
        TunnelSettings::default(),
    )
}

/// A server on `addr` (port 0: any) whose connections follow `drain`.
pub(crate) fn server_on(
    ca: Arc<BuiltinCa>,
    identity: Identity,
    addr: SocketAddr,
    drain: Option<hboned::drain::Drain>,
) -> Server {
    let workload = LocalWorkload {
        drain,
        ..localhost_workload(identity)
    };
    serve(certs_of(ca), workload, addr, TunnelSettings::default())
}

/// A server for the workload at 127.0.0.1 with these tunnel settings (short timeouts).
pub(crate) fn server_with_settings(
    ca: Arc<BuiltinCa>,
    identity: Identity,
    settings: TunnelSettings,
) -> Server {
    serve(
        certs_of(ca),
        localhost_workload(identity),
        any_port(),
        settings,
    )
}

fn certs_of(ca: Arc<BuiltinCa>) -> Arc<CertificateManager> {
    Arc::new(CertificateManager::new(ca))
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The workload at 127.0.0.1 presenting `identity`: no policies, metrics or drain.
pub(crate) fn localhost_workload(identity: Identity) -> LocalWorkload {
    LocalWorkload {
        identity: identity.into(),
        addresses: vec!["127.0.0.1".parse().unwrap()],
        preserve_source_ip: false,
        state: None,
        metrics: None,
        drain: None,
        pod: Default::default(),
    }
}

/// Serves HBONE for `workload` on `addr` (port 0: any), certificates from `certs`.
pub(crate) fn serve(
    certs: Arc<CertificateManager>,
    workload: LocalWorkload,
    addr: SocketAddr,
    settings: TunnelSettings,
) -> Server {
    let identity = hboned::identity::Identity::clone(&workload.identity.get());
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let listener = sockets.tcp_bind(addr).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = InboundServer::new(workload, certs, sockets, settings);
    let task = tokio::spawn(server.serve(listener));
    Server {
        addr,
        identity,
        task,
    }
}

pub(crate) fn client(ca: Arc<BuiltinCa>, settings: TunnelSettings) -> HboneClient {
    let certs = Arc::new(CertificateManager::new(ca));
    HboneClient::new(certs, Arc::new(DefaultSocketFactory), settings)
}

pub(crate) fn key(source: &Identity, server: &Server) -> PoolKey {
    PoolKey::new(
        source.clone(),
        vec![server.identity.clone()],
        server.addr,
        None,
    )
}

pub(crate) fn request(target: SocketAddr) -> ConnectRequest {
    ConnectRequest::new(target)
}

/// A TCP app on 127.0.0.1 that counts accepted connections and runs `handler` on each.
pub(crate) struct App {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

pub(crate) async fn app<F, Fut>(handler: F) -> App
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(s));
        }
    });
    App {
        addr,
        accepted,
        task,
    }
}

/// Echoes everything back, then closes its write side when the client does.
pub(crate) async fn echo_app() -> App {
    app(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// FNV-1a over a byte stream: the same value however the stream was chunked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub(crate) fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic, non-repeating-looking test data.
pub(crate) fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8
        })
        .collect()
}

/// Fails the test instead of hanging it.
pub(crate) async fn within<T>(secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .expect("timed out")
}

/// Waits until `cond` holds (polling), failing after `secs`.
pub(crate) async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) {
    within(secs, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Reads until EOF.
pub(crate) async fn read_all(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

//! Certificate sources end to end: a fake Istio CA (a real tonic server on loopback) issues the
//! certificates both ends of a real HBONE tunnel present.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hboned::identity::ca::BuiltinCa;
use hboned::identity::istio_ca::{IstioCa, IstioCaSettings};
use hboned::identity::{CertificateManager, Identity};
use hboned::netns::{DefaultSocketFactory, SocketFactory};
use hboned::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use hboned::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use hboned::proxy::{HboneClient, PoolKey, TunnelSettings};
use support::{echo_app, request, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the fake CA saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    clusterid: Option<String>,
    impersonated: Option<String>,
}

struct FakeIstioCa {
    ca: BuiltinCa,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Set: every request fails UNAVAILABLE, as from a CA that is down.
    down: Arc<std::sync::atomic::AtomicBool>,
    /// Roots (PEM) added to the last chain element, as istiod's CA answers during a root
    /// rotation (security/pkg/server/ca/server.go appends its whole root bundle).
    extra_roots: String,
}

#[tonic::async_trait]
impl IstioCertificateService for FakeIstioCa {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let header = |k: &str| {
            request
                .metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("the CA is down"));
        }
        let (authorization, clusterid) = (header("authorization"), header("clusterid"));
        let body = request.into_inner();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        self.seen.lock().unwrap().push(Seen {
            authorization,
            clusterid,
            impersonated,
        });
        let lifetime = Duration::from_secs(u64::try_from(body.validity_duration).unwrap_or(3600));
        let mut chain = self
            .ca
            .sign_csr(&body.csr, SystemTime::now(), lifetime)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if let Some(roots) = chain.last_mut() {
            roots.push_str(&self.extra_roots);
        }
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

async fn start_fake_ca() -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
) {
    let (addr, seen, task, _down) = start_fake_ca_with_switch().await;
    (addr, seen, task)
}

async fn start_fake_ca_with_switch() -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    start_fake_ca_with(String::new()).await
}

async fn start_fake_ca_with(
    extra_roots: String,
) -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fake = FakeIstioCa {
        ca: BuiltinCa::generate(SystemTime::now()).unwrap(),
        seen: seen.clone(),
        down: down.clone(),
        extra_roots,
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (addr, seen, task, down)
}

/// Runs an HBONE server presenting `server_id` (certificates from `server_certs`) and a client
/// presenting `client_id`, and echoes `msg` through a tunnel between them.
async fn echo_through_a_tunnel(
    client_certs: Arc<CertificateManager>,
    server_certs: Arc<CertificateManager>,
    client_id: &Identity,
    server_id: &Identity,
    msg: &[u8],
) {
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let srv = serve_as(server_id, server_certs);
    let hbone_addr = srv.addr;
    let app = echo_app().await;
    let hbone = HboneClient::new(client_certs, sockets, TunnelSettings::default());
    let key = PoolKey::new(client_id.clone(), vec![server_id.clone()], hbone_addr, None);
    let mut stream = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    stream.write_all(msg).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    within(10, stream.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back, msg);
}

fn istio_ca(addr: std::net::SocketAddr, token: &std::path::Path) -> Arc<IstioCa> {
    istio_ca_for(addr, token, Duration::from_secs(3600))
}

/// An Istio CA source asking for certificates that live `lifetime`.
fn istio_ca_for(
    addr: std::net::SocketAddr,
    token: &std::path::Path,
    lifetime: Duration,
) -> Arc<IstioCa> {
    Arc::new(
        IstioCa::new(IstioCaSettings {
            address: format!("http://{addr}"),
            root_ca: None,
            token_file: Some(token.to_owned()),
            cluster_id: "c1".into(),
            lifetime,
        })
        .unwrap(),
    )
}

/// An HBONE server on 127.0.0.1 presenting `server_id` with certificates from `certs`.
fn serve_as(server_id: &Identity, certs: Arc<CertificateManager>) -> support::Server {
    let workload = support::localhost_workload(server_id.clone());
    let any = "127.0.0.1:0".parse().unwrap();
    support::serve(certs, workload, any, TunnelSettings::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ca_certificates_carry_a_real_tunnel() {
    let (addr, seen, _server) = start_fake_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let client_id = Identity::new("cluster.local", "test", "client").unwrap();
    let server_id = Identity::new("cluster.local", "test", "server").unwrap();

    let client_certs = Arc::new(CertificateManager::new(istio_ca(addr, &token)));
    let server_certs = Arc::new(CertificateManager::new(istio_ca(addr, &token)));
    echo_through_a_tunnel(
        client_certs.clone(),
        server_certs,
        &client_id,
        &server_id,
        b"issued by the Istio CA",
    )
    .await;

    let cert = client_certs.fetch(&client_id).await.unwrap();
    assert_eq!(
        cert.chain().len(),
        1,
        "the root stays out of the presented chain"
    );
    let seen = seen.lock().unwrap().clone();
    let mut impersonated: Vec<String> =
        seen.iter().filter_map(|s| s.impersonated.clone()).collect();
    impersonated.sort();
    assert_eq!(impersonated, [client_id.to_string(), server_id.to_string()]);
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer t0ken")),
        "{seen:?}"
    );
    assert!(seen.iter().all(|s| s.clusterid.as_deref() == Some("c1")));
}

/// During a root rotation istiod's last chain element holds every root: all are trusted, none
/// is presented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_ca_root_set_is_trusted_whole() {
    let next_root = BuiltinCa::generate(SystemTime::now()).unwrap();
    let (addr, _seen, _server, _down) = start_fake_ca_with(next_root.root_pem().to_owned()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let client_id = Identity::new("cluster.local", "test", "client").unwrap();
    let server_id = Identity::new("cluster.local", "test", "server").unwrap();
    let client_certs = Arc::new(CertificateManager::new(istio_ca(addr, &token)));
    let cert = client_certs.fetch(&client_id).await.unwrap();
    assert_eq!(cert.chain().len(), 1, "no root is presented");
    assert_eq!(cert.bundle().certs().len(), 2, "both roots are trusted");
    // A server whose certificate the next root signed is trusted by the client.
    let server_certs = Arc::new(CertificateManager::new(Arc::new(next_root)));
    let server_cert = server_certs.fetch(&server_id).await.unwrap();
    assert!(
        cert.bundle()
            .certs()
            .contains(server_cert.bundle().certs().first().unwrap())
    );
}

#[tokio::test]
async fn unreachable_istio_ca_fails_closed_with_a_clear_error() {
    // A port nothing listens on.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let certs = CertificateManager::new(istio_ca(addr, &token));
    let id = Identity::new("cluster.local", "test", "client").unwrap();
    let err = within(20, certs.fetch(&id)).await.unwrap_err().to_string();
    assert!(
        err.contains("spiffe://cluster.local/ns/test/sa/client") && err.contains("Istio CA"),
        "{err}"
    );
}

/// istiod rotates the root its CA endpoint is served under (the file the chart mounts as
/// CA_ROOT_CA changes): the next certificate request trusts the new root, as ztunnel rebuilds
/// its CA client; before, every renewal after the rotation failed its TLS handshake.
#[tokio::test]
async fn a_rotated_ca_root_is_trusted_from_the_next_request() {
    use hboned::identity::CertSource;
    hboned::tls::install_process_default();
    let dir = tempfile::tempdir().unwrap();
    let (token, root) = (dir.path().join("token"), dir.path().join("root-cert.pem"));
    std::fs::write(&token, "t").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // The CA endpoint under a root (its serving certificate self-signed for localhost).
    let serve = |listener: tokio::net::TcpListener| {
        let serving = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(&root, serving.cert.pem()).unwrap();
        let identity = tonic::transport::Identity::from_pem(
            serving.cert.pem(),
            serving.signing_key.serialize_pem(),
        );
        let fake = FakeIstioCa {
            ca: BuiltinCa::generate(SystemTime::now()).unwrap(),
            seen: Arc::default(),
            down: Arc::default(),
            extra_roots: String::new(),
        };
        // The accepted connections, to cut them when this endpoint goes away (tonic's
        // connection tasks outlive its server).
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let seen = accepted.clone();
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            move |conn| {
                if let Ok(c) = &conn {
                    seen.lock()
                        .unwrap()
                        .push(std::os::fd::AsRawFd::as_raw_fd(c));
                }
                conn
            },
        );
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .unwrap()
                .add_service(IstioCertificateServiceServer::new(fake))
                .serve_with_incoming(incoming)
                .await;
        });
        (task, accepted)
    };
    let (first, connections) = serve(listener);
    let ca = IstioCa::new(IstioCaSettings {
        address: format!("https://localhost:{port}"),
        root_ca: Some(root.clone()),
        token_file: Some(token),
        cluster_id: "c1".into(),
        lifetime: Duration::from_secs(3600),
    })
    .unwrap();
    let id = Identity::new("cluster.local", "test", "client").unwrap();
    within(20, ca.fetch(&id)).await.unwrap();

    // The endpoint comes back under a new root on the same port; the file follows.
    first.abort();
    let _ = first.await;
    for fd in connections.lock().unwrap().drain(..) {
        // A connection still open (its task runs on): shut down, not closed.
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let _second = serve(listener);
    within(20, ca.fetch(&id))
        .await
        .expect("a certificate under the new root");
}

/// A TLS + HTTP/2 peer that records the client certificate of every connection, answers every
/// CONNECT with 200 and echoes the stream.
async fn recording_peer(
    ca: &BuiltinCa,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let cert = ca
        .issue(
            &Identity::new("cluster.local", "test", "server").unwrap(),
            SystemTime::now(),
        )
        .unwrap();
    let config = hboned::tls::server_config(&cert).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, tx) = (config.clone(), tx.clone());
            tokio::spawn(async move {
                let tls = tokio_rustls::TlsAcceptor::from(config)
                    .accept(tcp)
                    .await
                    .unwrap();
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                tx.send(leaf).unwrap();
                let mut conn = h2::server::handshake(tls).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    let mut stream = hboned::proxy::H2Stream::new(send, req.into_body());
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = stream.shutdown().await;
                    });
                }
            });
        }
    });
    (addr, rx)
}

async fn ping(stream: &mut hboned::proxy::H2Stream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within(10, stream.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_tunnel_survives_rotations_and_new_tunnels_use_the_new_certificate() {
    let ca = Arc::new(
        BuiltinCa::generate(SystemTime::now())
            .unwrap()
            .with_lifetime(Duration::from_secs(4)),
    );
    let (addr, mut presented) = recording_peer(&ca).await;
    let certs = Arc::new(CertificateManager::new(ca.clone()));
    let client_id = Identity::new("cluster.local", "test", "client").unwrap();
    let server_id = Identity::new("cluster.local", "test", "server").unwrap();
    let key = PoolKey::new(client_id.clone(), vec![server_id], addr, None);
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let first_client = HboneClient::new(certs.clone(), sockets.clone(), TunnelSettings::default());
    let mut long_lived = within(
        10,
        first_client.connect(&key, &request("127.0.0.1:9".parse().unwrap())),
    )
    .await
    .unwrap();
    ping(&mut long_lived, b"before").await;
    let first_cert = within(10, presented.recv()).await.unwrap();

    // Wait through two rotations (2 s each for a 4 s lifetime), pinging on the old tunnel.
    let mut distinct = vec![certs.fetch(&client_id).await.unwrap().chain()[0].to_vec()];
    while distinct.len() < 3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ping(&mut long_lived, b"during").await;
        let now = certs.fetch(&client_id).await.unwrap().chain()[0].to_vec();
        if distinct.last() != Some(&now) {
            distinct.push(now);
        }
        assert!(distinct.len() < 3 || certs.metrics().renewals.get() >= 2);
    }
    // The tunnel opened with the first certificate still carries bytes, after it expired.
    ping(&mut long_lived, b"after two rotations").await;

    // A new connection (a new client: no pooled connection to reuse) presents the current one.
    let second_client = HboneClient::new(certs.clone(), sockets, TunnelSettings::default());
    let mut fresh = within(
        10,
        second_client.connect(&key, &request("127.0.0.1:9".parse().unwrap())),
    )
    .await
    .unwrap();
    ping(&mut fresh, b"fresh").await;
    let second_cert = within(10, presented.recv()).await.unwrap();
    assert_ne!(
        second_cert, first_cert,
        "the new tunnel presented the old certificate"
    );
    assert_eq!(
        &second_cert,
        distinct.last().unwrap(),
        "the new tunnel presented the current certificate"
    );
}

#[tokio::test]
async fn unreachable_spire_agent_fails_closed_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    use hboned::identity::spire::{PodProcesses, Spire, SpireSettings};
    let certs = CertificateManager::new(Arc::new(Spire::new(SpireSettings {
        socket: dir.path().join("missing.sock"),
        timeout: Duration::from_secs(5),
        pods: Default::default(),
        processes: PodProcesses::new(dir.path().join("no-runtime.sock"), "/proc".into()),
    })));
    let id = Identity::new("cluster.local", "test", "client").unwrap();
    let err = within(20, certs.fetch(&id)).await.unwrap_err().to_string();
    assert!(
        err.contains("SPIRE agent") && err.contains("spiffe://cluster.local/ns/test/sa/client"),
        "{err}"
    );
    assert!(err.contains("missing.sock"), "{err}");
}

/// The CA goes away before a renewal: the certificate in hand keeps serving new tunnels while
/// it is valid, then new tunnels fail closed with an error naming the expiry (never a tunnel
/// on an expired certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_down_at_renewal_keeps_the_valid_certificate_then_fails_closed() {
    let (addr, _seen, _server, down) = start_fake_ca_with_switch().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let client_id = Identity::new("cluster.local", "test", "client").unwrap();
    let server_id = Identity::new("cluster.local", "test", "server").unwrap();
    // The client's certificate lives 6 s; the server's an hour (fetched before the CA goes).
    let client_certs = Arc::new(CertificateManager::new(istio_ca_for(
        addr,
        &token,
        Duration::from_secs(6),
    )));
    let server_certs = Arc::new(CertificateManager::new(istio_ca(addr, &token)));
    server_certs.fetch(&server_id).await.unwrap();
    let first = client_certs.fetch(&client_id).await.unwrap();
    down.store(true, std::sync::atomic::Ordering::SeqCst);

    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let srv = serve_as(&server_id, server_certs);
    let hbone_addr = srv.addr;
    let app = echo_app().await;
    let key = PoolKey::new(client_id.clone(), vec![server_id.clone()], hbone_addr, None);
    // Each attempt is a fresh client: a new TLS handshake with the certificate of the moment.
    let fresh_tunnel = || {
        let hbone = HboneClient::new(
            client_certs.clone(),
            sockets.clone(),
            TunnelSettings::default(),
        );
        let (key, app) = (key.clone(), app.addr);
        async move { hbone.connect(&key, &request(app)).await.map(|_| ()) }
    };
    // Past the renewal point the renewal fails, and the valid certificate still serves.
    support::eventually(10, || client_certs.metrics().renewal_failures.get() > 0).await;
    assert!(
        SystemTime::now() < first.not_after(),
        "still within the lifetime"
    );
    within(10, fresh_tunnel())
        .await
        .expect("the valid certificate keeps serving");
    // Past the expiry: fail closed, with the reason.
    let wait = first
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(500)).await;
    let err = within(10, fresh_tunnel()).await.unwrap_err();
    assert!(
        matches!(
            err,
            hboned::proxy::ProxyError::Certificate(
                hboned::identity::manager::CertError::Expired { .. }
            )
        ),
        "{err}"
    );
}

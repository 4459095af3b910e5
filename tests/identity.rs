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
use hboned::proxy::{HboneClient, InboundServer, LocalWorkload, PoolKey, TunnelSettings};
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
        let chain = self
            .ca
            .sign_csr(&body.csr, SystemTime::now(), lifetime)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let fake = FakeIstioCa {
        ca: BuiltinCa::generate(SystemTime::now()).unwrap(),
        seen: seen.clone(),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (addr, seen, task)
}

fn istio_ca(addr: std::net::SocketAddr, token: &std::path::Path) -> Arc<IstioCa> {
    Arc::new(
        IstioCa::new(IstioCaSettings {
            address: format!("http://{addr}"),
            root_ca: None,
            token_file: Some(token.to_owned()),
            cluster_id: "c1".into(),
            lifetime: Duration::from_secs(3600),
        })
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ca_certificates_carry_a_real_tunnel() {
    let (addr, seen, _server) = start_fake_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let client_id = Identity::new("cluster.local", "test", "client").unwrap();
    let server_id = Identity::new("cluster.local", "test", "server").unwrap();

    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let listener = sockets.tcp_bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hbone_addr = listener.local_addr().unwrap();
    let server_certs = Arc::new(CertificateManager::new(istio_ca(addr, &token)));
    let workload = LocalWorkload {
        identity: server_id.clone(),
        addresses: vec!["127.0.0.1".parse().unwrap()],
        preserve_source_ip: false,
    };
    tokio::spawn(
        InboundServer::new(
            workload,
            server_certs,
            sockets.clone(),
            TunnelSettings::default(),
        )
        .serve(listener),
    );
    let app = echo_app().await;
    let client_certs = Arc::new(CertificateManager::new(istio_ca(addr, &token)));
    let hbone = HboneClient::new(client_certs.clone(), sockets, TunnelSettings::default());
    let key = PoolKey::new(client_id.clone(), vec![server_id.clone()], hbone_addr, None);
    let mut stream = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    stream.write_all(b"issued by the Istio CA").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    within(10, stream.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back, b"issued by the Istio CA");

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

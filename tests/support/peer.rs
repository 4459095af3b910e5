//! An HBONE server a test runs in one of the topology's pods, in place of a waypoint or an
//! east-west gateway: TLS with a certificate of the topology's CA (clients must present one
//! too), HTTP/2, and each CONNECT handed to the test with the client's identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use hboned::identity::Identity;
use hboned::testbed::{Pod, Topology};

/// One CONNECT: the request, where to answer it, the client's SPIFFE ID.
pub(crate) type Connect = (
    http::Request<h2::RecvStream>,
    h2::server::SendResponse<Bytes>,
    Option<String>,
);

/// Serves HBONE on `pod`'s address, port 15008, as `demo/<service_account>`, calling
/// `on_connect` for each CONNECT, until the returned task is aborted (its connections with it).
pub(crate) fn serve(
    topo: &Topology,
    pod: &Pod,
    service_account: &str,
    on_connect: impl Fn(Connect) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let id = Identity::new("cluster.local", "demo", service_account).unwrap();
    let cert = topo.ca().unwrap().issue(&id, SystemTime::now()).unwrap();
    let tls = tokio_rustls::TlsAcceptor::from(hboned::tls::server_config(&cert).unwrap());
    let listener = topo
        .netns(pod.name)
        .unwrap()
        .run(|| {
            let l = std::net::TcpListener::bind(SocketAddr::from((pod.ip, 15008)))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let on_connect = Arc::new(on_connect);
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, on_connect) = (tls.clone(), on_connect.clone());
            conns.spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let client = hboned::tls::peer_identity(stream.get_ref().1.peer_certificates())
                    .map(|i| i.to_string());
                let Ok(mut h2) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = h2.accept().await {
                    on_connect((req, respond, client.clone()));
                }
            });
        }
    })
}

//! A scripted control plane: a real tonic ADS server on 127.0.0.1 that hands every new stream
//! to the test, which reads the client's requests and sends responses itself.

use hboned::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use hboned::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Whether istiod would take this node (pilot/pkg/model/context.go,
/// ParseServiceNodeWithMetadata): an id of four `~`-separated parts, a proxy type istiod knows,
/// and a valid IP in the second part unless the metadata lists INSTANCE_IPS.
pub(crate) fn istiod_accepts(
    node: &hboned::proto::envoy::config::core::v3::Node,
) -> Result<(), String> {
    let parts: Vec<&str> = node.id.split('~').collect();
    let [kind, ip, _id, _domain] = parts[..] else {
        return Err(format!("missing parts in the service node {:?}", node.id));
    };
    if !["sidecar", "router", "waypoint", "ztunnel"].contains(&kind) {
        return Err(format!("invalid node type {kind:?} in {:?}", node.id));
    }
    let has_ips = node
        .metadata
        .as_ref()
        .is_some_and(|m| m.fields.contains_key("INSTANCE_IPS"));
    if !has_ips && ip.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("invalid IP address {ip:?} in the service node"));
    }
    Ok(())
}

/// One client stream, as the server sees it.
pub(crate) struct AdsStream {
    pub requests: tonic::Streaming<DeltaDiscoveryRequest>,
    pub responses: mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, tonic::Status>>,
    pub metadata: tonic::metadata::MetadataMap,
}

impl AdsStream {
    /// The next request, failing the test after 10 s.
    pub(crate) async fn next(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.requests.message())
            .await
            .expect("no request from the client")
            .expect("stream error")
            .expect("stream ended")
    }

    pub(crate) fn send(
        &self,
        type_url: &str,
        nonce: &str,
        resources: Vec<Resource>,
        removed: &[&str],
    ) {
        self.responses
            .send(Ok(DeltaDiscoveryResponse {
                type_url: type_url.into(),
                nonce: nonce.into(),
                resources,
                removed_resources: removed.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }))
            .expect("client stream gone");
    }
}

struct Fake {
    streams: mpsc::UnboundedSender<AdsStream>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Fake {
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let metadata = request.metadata().clone();
        let _ = self.streams.send(AdsStream {
            requests: request.into_inner(),
            responses: tx,
            metadata,
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// A running fake control plane; dropping it stops the server and its streams.
pub(crate) struct FakeAds {
    pub addr: std::net::SocketAddr,
    pub streams: mpsc::UnboundedReceiver<AdsStream>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAds {
    /// Serves on `addr` (use port 0 for any).
    pub(crate) async fn start(addr: std::net::SocketAddr) -> FakeAds {
        Self::start_with(addr, None).await
    }

    /// Serves TLS with the given (certificate PEM, key PEM).
    pub(crate) async fn start_tls(addr: std::net::SocketAddr, cert: &str, key: &str) -> FakeAds {
        hboned::tls::install_process_default();
        Self::start_with(addr, Some(tonic::transport::Identity::from_pem(cert, key))).await
    }

    /// Serves plaintext on `listener` (bound by the caller, e.g. inside a test's network
    /// namespace; non-blocking).
    pub(crate) fn serve(listener: std::net::TcpListener) -> FakeAds {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        Self::serve_with(listener, None)
    }

    /// Serves plaintext gRPC on a Unix socket at `path`, as Cilium's agent serves xDS on
    /// /var/run/cilium/xds.sock (`addr` is unspecified then).
    pub(crate) fn serve_unix(path: &std::path::Path) -> FakeAds {
        let listener = tokio::net::UnixListener::bind(path).expect("bind the xDS socket");
        let (tx, streams) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(Fake { streams: tx }))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await;
        });
        FakeAds {
            addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            streams,
            task,
        }
    }

    async fn start_with(
        addr: std::net::SocketAddr,
        tls: Option<tonic::transport::Identity>,
    ) -> FakeAds {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        Self::serve_with(listener, tls)
    }

    fn serve_with(
        listener: tokio::net::TcpListener,
        tls: Option<tonic::transport::Identity>,
    ) -> FakeAds {
        let addr = listener.local_addr().expect("addr");
        let (tx, streams) = mpsc::unbounded_channel();
        let mut builder = tonic::transport::Server::builder();
        if let Some(identity) = tls {
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .expect("server TLS config");
        }
        let task = tokio::spawn(async move {
            let _ = builder
                .add_service(AggregatedDiscoveryServiceServer::new(Fake { streams: tx }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        FakeAds {
            addr,
            streams,
            task,
        }
    }

    /// The next client stream, failing the test after 10 s.
    pub(crate) async fn accept(&mut self) -> AdsStream {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.streams.recv())
            .await
            .expect("the client did not connect")
            .expect("server gone")
    }
}

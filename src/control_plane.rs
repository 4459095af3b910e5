//! The gRPC plumbing shared by every client of the control plane: the xDS stream (`xds`), the
//! Istio CA (`identity::istio_ca`) and the SPIRE agent (`identity::spire`). One way to build the
//! channel (plain `http://`, `https://` with an optional PEM root, or `unix://PATH` — the Unix
//! socket a node agent such as Cilium's serves xDS on) and one way to add the metadata istiod
//! reads: `authorization: Bearer <token>` from a file re-read at every call (projected service
//! account tokens rotate) and `clusterid`. No protocol logic here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Why a channel to the control plane cannot be built; each names the setting to check.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid control plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("control plane address {0:?} must start with http://, https:// or unix://")]
    Scheme(String),
    #[error("cannot read the control plane's root CA {path}: {source}")]
    RootCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up TLS to the control plane: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// Why the per-call metadata cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token in {0} is not a valid header value (a stray control character?)")]
    Header(PathBuf),
}

/// Where a channel goes: a network endpoint, or a Unix socket (gRPC in cleartext on it: only
/// processes of the node reach it, as with the node agent's other sockets).
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Network(Endpoint),
    Unix { endpoint: Endpoint, path: PathBuf },
}

impl Target {
    /// The socket at `path`: 5 s connect timeout, HTTP/2 keepalive every 30 s.
    pub(crate) fn unix(path: PathBuf) -> Self {
        let endpoint = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30));
        Target::Unix { endpoint, path }
    }

    /// The same target with `f` applied to its endpoint settings (a request timeout, say).
    pub(crate) fn with(self, f: impl FnOnce(Endpoint) -> Endpoint) -> Self {
        match self {
            Target::Network(e) => Target::Network(f(e)),
            Target::Unix { endpoint, path } => Target::Unix {
                endpoint: f(endpoint),
                path,
            },
        }
    }

    /// A channel that connects on first use (and again after a failure).
    pub(crate) fn connect_lazy(self) -> tonic::transport::Channel {
        match self {
            Target::Network(e) => e.connect_lazy(),
            Target::Unix { endpoint, path } => endpoint.connect_with_connector_lazy(unix(path)),
        }
    }

    /// A channel connected now.
    pub(crate) async fn connect(
        self,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        match self {
            Target::Network(e) => e.connect().await,
            Target::Unix { endpoint, path } => endpoint.connect_with_connector(unix(path)).await,
        }
    }
}

/// A connector that dials the Unix socket at `path`, naming it in the error.
fn unix(
    path: PathBuf,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::UnixStream>>>
             + Send,
> + Clone
+ Send {
    tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

/// The target for `address`: `http://`, `https://` (verified against `root_ca` when given,
/// else the system roots; 5 s connect timeout, TCP_NODELAY, HTTP/2 keepalive every 30 s), or
/// `unix://PATH`. Callers add their own request timeout.
pub(crate) fn endpoint(address: &str, root_ca: Option<&Path>) -> Result<Target, ChannelError> {
    if let Some(path) = address.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(ChannelError::Address {
                address: address.to_owned(),
                reason: "no socket path after unix://".into(),
            });
        }
        return Ok(Target::unix(PathBuf::from(path)));
    }
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|e| ChannelError::Address {
            address: address.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    if address.starts_with("https://") {
        // tonic builds its rustls config with the process default.
        crate::tls::install_process_default();
        let mut tls = ClientTlsConfig::new();
        if let Some(path) = root_ca {
            let pem = std::fs::read(path).map_err(|source| ChannelError::RootCa {
                path: path.to_owned(),
                source,
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls)?;
    } else if !address.starts_with("http://") {
        return Err(ChannelError::Scheme(address.to_owned()));
    }
    Ok(Target::Network(endpoint))
}

/// Adds `authorization: Bearer <token>` (the file read now) and, when set, `clusterid`.
pub(crate) fn add_metadata<T>(
    request: &mut tonic::Request<T>,
    token_file: Option<&Path>,
    cluster_id: &str,
) -> Result<(), TokenError> {
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| TokenError::Header(path.to_owned()))?;
        request.metadata_mut().insert("authorization", value);
    }
    if !cluster_id.is_empty()
        && let Ok(value) = MetadataValue::try_from(cluster_id)
    {
        request.metadata_mut().insert("clusterid", value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_a_known_scheme() {
        assert!(endpoint("http://127.0.0.1:15010", None).is_ok());
        // TLS with both rustls providers compiled in: the process default is set first.
        assert!(endpoint("https://istiod.istio-system.svc:15012", None).is_ok());
        assert!(matches!(
            endpoint("istiod:15012", None),
            Err(ChannelError::Scheme(_) | ChannelError::Address { .. })
        ));
        let missing = endpoint(
            "https://istiod:15012",
            Some(Path::new("/nonexistent/root.pem")),
        );
        assert!(matches!(missing, Err(ChannelError::RootCa { .. })));
        assert!(matches!(
            endpoint("unix:///var/run/cilium/xds.sock", None),
            Ok(Target::Unix { path, .. }) if path == Path::new("/var/run/cilium/xds.sock")
        ));
        assert!(matches!(
            endpoint("unix://", None),
            Err(ChannelError::Address { .. })
        ));
    }

    /// A `unix://` channel reaches a gRPC server on that socket, and a missing socket's error
    /// names its path.
    #[tokio::test]
    async fn unix_targets_dial_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xds.sock");
        let missing = endpoint(&format!("unix://{}", path.display()), None)
            .unwrap()
            .connect()
            .await
            .unwrap_err();
        let chain = std::iter::successors(Some(&missing as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ");
        assert!(chain.contains("xds.sock"), "{chain}");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepted = tokio::spawn(async move { listener.accept().await.is_ok() });
        let target = endpoint(&format!("unix://{}", path.display()), None).unwrap();
        // The HTTP/2 handshake needs a server; the dial itself is what is checked here.
        let _ = tokio::time::timeout(Duration::from_millis(500), target.connect()).await;
        assert!(accepted.await.unwrap());
    }

    #[test]
    fn metadata_carries_the_token_read_now_and_the_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "abc\n").unwrap();
        let mut request = tonic::Request::new(());
        add_metadata(&mut request, Some(&token), "c1").unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer abc"
        );
        assert_eq!(request.metadata().get("clusterid").unwrap(), "c1");
        std::fs::write(&token, "bad\u{1}token").unwrap();
        let mut request = tonic::Request::new(());
        assert!(matches!(
            add_metadata(&mut request, Some(&token), ""),
            Err(TokenError::Header(_))
        ));
        let mut request = tonic::Request::new(());
        add_metadata(&mut request, None, "").unwrap();
        assert!(request.metadata().is_empty());
    }
}

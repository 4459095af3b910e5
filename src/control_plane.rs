//! The gRPC plumbing shared by every client of the control plane: the xDS stream (`xds`) and
//! the Istio CA (`identity::istio_ca`). One way to build the channel (plain `http://` or
//! `https://` with an optional PEM root) and one way to add the per-call metadata istiod
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
    #[error("control plane address {0:?} must start with http:// or https://")]
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

/// The endpoint for `address` (`http://` or `https://`, the latter verified against
/// `root_ca` when given, else the system roots): 5 s connect timeout, TCP_NODELAY, HTTP/2
/// keepalive every 30 s. Callers add their own request timeout.
pub(crate) fn endpoint(address: &str, root_ca: Option<&Path>) -> Result<Endpoint, ChannelError> {
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|e| ChannelError::Address {
            address: address.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    if address.starts_with("https://") {
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
    Ok(endpoint)
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
        assert!(matches!(
            endpoint("istiod:15012", None),
            Err(ChannelError::Scheme(_) | ChannelError::Address { .. })
        ));
        let missing = endpoint(
            "https://istiod:15012",
            Some(Path::new("/nonexistent/root.pem")),
        );
        assert!(matches!(missing, Err(ChannelError::RootCa { .. })));
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

//! The node's certificate source, built from the typed choice in the config
//! ([`crate::config::CertSource`]): one arm per source, no fallback.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;

use crate::config::{CertSource, Config, DEFAULT_CONTAINER_RUNTIME_SOCKET, DEFAULT_SPIRE_TIMEOUT};
use crate::identity::CertSource as Source;
use crate::identity::LocalPods;
use crate::identity::ca::BuiltinCa;
use crate::identity::files::FileSource;
use crate::identity::istio_ca::{IstioCa, IstioCaSettings};
use crate::identity::spire::{PodProcesses, Spire, SpireSettings};

/// The configured certificate source; `pods` are the node's enrolled pods, for a source that
/// attests a pod from its processes (SPIRE).
pub(crate) fn source(config: &Config, pods: &LocalPods) -> anyhow::Result<Arc<dyn Source>> {
    // `Config::parse` refused a source without its section; this only repeats the check.
    Ok(match config.certificate_source()? {
        CertSource::Builtin(ca) => {
            Arc::new(builtin_ca(ca.root_dir.as_deref())?.with_lifetime(config.cert_lifetime()))
        }
        CertSource::Files(f) => Arc::new(FileSource {
            cert: f.cert.clone(),
            key: f.key.clone(),
            bundle: f.bundle.clone(),
            poll: Duration::from_secs(f.poll_secs),
        }),
        CertSource::IstioCa(c) => Arc::new(IstioCa::new(IstioCaSettings {
            address: c.address.clone(),
            root_ca: c.root_ca.clone(),
            token_file: c.token_file.clone(),
            cluster_id: config.cluster_id.clone(),
            lifetime: config.cert_lifetime(),
        })?),
        CertSource::Spire(socket) => {
            let certs = &config.certificates;
            let runtime = certs
                .container_runtime_socket
                .clone()
                .unwrap_or_else(|| DEFAULT_CONTAINER_RUNTIME_SOCKET.into());
            Arc::new(Spire::new(SpireSettings {
                socket: socket.to_owned(),
                timeout: certs
                    .spire_timeout_secs
                    .map_or(DEFAULT_SPIRE_TIMEOUT, Duration::from_secs),
                pods: pods.clone(),
                processes: PodProcesses::new(runtime, "/proc".into()),
            }))
        }
    })
}

/// The built-in CA's root: `ca.rootDir`, or an ephemeral root that no other node trusts.
/// Nothing is picked up from the working directory.
fn builtin_ca(dir: Option<&Path>) -> anyhow::Result<BuiltinCa> {
    match dir {
        Some(dir) => load_root(dir),
        None => {
            tracing::warn!(
                "no CA root configured (ca.rootDir): generated an ephemeral root that no other node trusts"
            );
            Ok(BuiltinCa::generate(SystemTime::now())?)
        }
    }
}

/// Loads a root (root-cert.pem, root-key.pem) from `dir`, naming the key to check on failure.
pub(crate) fn load_root(dir: &Path) -> anyhow::Result<BuiltinCa> {
    BuiltinCa::load_dir(dir).with_context(|| {
        format!(
            "loading the CA root from {} (ca.rootDir; `hboned ca init --dir {}` writes one)",
            dir.display(),
            dir.display()
        )
    })
}

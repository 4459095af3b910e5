//! Wiring for the binary, no protocol logic: [`node`] builds the node proxy from a
//! [`crate::config::Config`], serves it until the shutdown future the caller passes resolves,
//! and drains; `agent` is Kubernetes mode's node agent (`hboned agent`), which serves a
//! proxy; [`loopback`] is a self-contained mode for machines without namespaces;
//! `certs` picks the certificate source the config names.

#[cfg(feature = "kubernetes")]
mod agent;
mod certs;
pub(crate) mod loopback;
pub(crate) mod node;

#[cfg(feature = "kubernetes")]
pub use agent::{Uninstalled, run_agent, uninstall};
pub use loopback::{LoopbackSettings, run_loopback};
pub use node::Node;

/// Resolves on SIGINT or SIGTERM: the binary's shutdown future.
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

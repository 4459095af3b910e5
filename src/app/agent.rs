//! `hboned agent`: Kubernetes mode's node agent, the privileged half of the agent/proxy
//! split. It follows the API server (the same watches as the single-process mode), enrolls this
//! node's pods of opted-in namespaces — in their CNI ADD when the plugin is installed, else once
//! their processes show in `/proc` — installs and removes their rules, and records each
//! enrollment on its pod. It does not proxy: each pod's network namespace goes to the proxy over
//! ZDS, and the workloads and services the proxy routes by go over delta xDS, both on Unix
//! sockets, the contracts istio-cni and istiod (or the Cilium agent) serve ztunnel. So the
//! proxy, the process that faces the network, runs unprivileged with one enrollment path and
//! one discovery path in every shape. [`uninstall`] takes everything the agent put on the node
//! away again.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::agent::cni::{Endpoint, Install};
use crate::agent::zds::ZdsServer;
use crate::config::Config;
use crate::inpod::PodHandler;
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::state::{SharedState, State};
use crate::xds::server::XdsServer;

/// How often the plugin's entry in the CNI configuration is checked.
const CNI_RECHECK: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` resolves. Rules stay on shutdown (a restarted agent, or
/// its successor, takes the pods over); [`uninstall`] removes them.
pub async fn run_agent(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let kube = config.kubernetes.as_ref().context(
        "hboned agent needs `kubernetes:` in its config (the API server, the namespace labels)",
    )?;
    let agent = &config.agent;
    let client = crate::kube::client(kube)?;
    let settings = crate::kube::Settings::from_config(&config, kube)?;
    let state = Arc::new(SharedState::new(State::from_config(&config)));
    let metrics = Metrics::new(Vec::new());
    // The last state: what the proxy is served until the watches have listed again.
    let discovery_cache = agent.state_dir.join("discovery.pb");
    let cached = crate::xds::server::read_cache(&discovery_cache, &config.trust_domain);
    if let Some(c) = &cached {
        tracing::info!(path = %discovery_cache.display(), workloads = c.workloads().count(), "serving the last discovery state until the API server is listed again");
    }
    let (synced_tx, synced) = tokio::sync::watch::channel(false);

    let (zds, session) = ZdsServer::bind(&agent.zds_socket).with_context(|| {
        format!(
            "serving ZDS (agent.zdsSocket {})",
            agent.zds_socket.display()
        )
    })?;
    let xds_listener = crate::xds::server::bind_unix(&agent.xds_socket).with_context(|| {
        format!(
            "serving xDS (agent.xdsSocket {})",
            agent.xds_socket.display()
        )
    })?;
    let cni_listener = crate::xds::server::bind_unix(&agent.cni_socket).with_context(|| {
        format!(
            "serving the CNI plugin (agent.cniSocket {})",
            agent.cni_socket.display()
        )
    })?;
    if let Some(uid) = agent.proxy_uid {
        for socket in [&agent.zds_socket, &agent.xds_socket] {
            nix::unistd::chown(socket, Some(nix::unistd::Uid::from_raw(uid)), None).with_context(
                || {
                    format!(
                        "handing {} to the proxy's user {uid} (agent.proxyUid)",
                        socket.display()
                    )
                },
            )?;
        }
    }
    let (calls_tx, calls_rx) = tokio::sync::mpsc::channel(64);
    let endpoint = Endpoint {
        client: client.clone(),
        labels: settings.labels.clone(),
        calls: calls_tx,
        proxy: zds.connected(),
    };
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let mut tasks = vec![
        tokio::spawn(session.serve(ready.clone())),
        tokio::spawn({
            let server = XdsServer::new(state.clone()).gated(
                synced.clone(),
                cached.map(|c| Arc::new(SharedState::new(c))),
            );
            async move {
                if let Err(e) = server.serve_listener(xds_listener).await {
                    tracing::error!(error = %e, "the xDS server stopped; the proxy keeps its last state");
                }
            }
        }),
        tokio::spawn(endpoint.serve(cni_listener)),
    ];
    tasks.push(tokio::spawn(keep_cache(
        state.clone(),
        synced,
        discovery_cache,
    )));
    // Ready once the first enrollment pass ran (or the last state is served again) and, with
    // `agent.cni`, the plugin is in the node's configuration.
    let mut sources = vec![ready];
    if let Some(install) = install(&config)? {
        tracing::info!(conf_dir = %install.conf_dir.display(), bin_dir = %install.bin_dir.display(), "installing hboned-cni into the node's CNI configuration");
        let (installed_tx, installed) = tokio::sync::watch::channel(false);
        sources.push(installed);
        tasks.push(tokio::spawn(install.keep(CNI_RECHECK, installed_tx)));
    }
    if let Some(addr) = config.readiness_address {
        tasks.push(super::node::serve_readiness(addr, crate::admin::all_ready(sources))?.1);
    }
    if let Some(addr) = config.metrics_address {
        tasks.push(super::node::serve_metrics(addr, metrics.clone(), None)?.1);
    }
    tracing::info!(node = %config.node, labels = ?kube.namespace_labels, zds = %agent.zds_socket.display(), xds = %agent.xds_socket.display(), cni = %agent.cni_socket.display(), "hboned agent: enrolling this node's pods of labelled namespaces for its proxy");
    let handler: Arc<dyn PodHandler> = Arc::new(zds);
    let running = crate::kube::start(
        client,
        settings,
        state,
        handler,
        metrics,
        ready_tx,
        crate::kube::AgentExtras {
            cni: Some(calls_rx),
            state_file: Some(agent.state_dir.join("pods.json")),
            synced: Some(synced_tx),
        },
    );
    shutdown.await;
    tracing::info!("hboned agent stopping; the pods keep their rules for the next agent");
    running.stop();
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// How often the discovery state is written down (when it changed).
const CACHE_EVERY: Duration = Duration::from_secs(10);

/// Writes the discovery state to `path` every [`CACHE_EVERY`] when it changed, once the watches
/// have listed (a partial state must not become the next start's cache).
async fn keep_cache(
    state: Arc<SharedState>,
    mut synced: tokio::sync::watch::Receiver<bool>,
    path: PathBuf,
) {
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut changes = state.changes();
    loop {
        changes.borrow_and_update();
        let snapshot = state.read().clone();
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)?;
            }
            crate::xds::server::write_cache(&snapshot, &target)
        })
        .await;
        if let Ok(Err(e)) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the discovery cache");
        }
        tokio::time::sleep(CACHE_EVERY).await;
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// The plugin's install, when `agent.cni` asks for one.
fn install(config: &Config) -> anyhow::Result<Option<Install>> {
    let Some(cni) = &config.agent.cni else {
        return Ok(None);
    };
    let plugin = match &cni.plugin {
        Some(p) => p.clone(),
        None => beside_this_binary(crate::cni::PLUGIN_TYPE)?,
    };
    Ok(Some(Install {
        conf_dir: cni.conf_dir.clone(),
        bin_dir: cni.bin_dir.clone(),
        plugin,
        agent_socket: config.agent.cni_socket.clone(),
    }))
}

fn beside_this_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the hboned binary")?;
    Ok(exe.with_file_name(name))
}

/// What an uninstall found and did.
#[derive(Debug, Default)]
pub struct Uninstalled {
    /// Namespaces whose rules were removed.
    pub cleaned: usize,
    /// Namespaces whose rules could not be removed, with why.
    pub failed: Vec<String>,
}

/// Takes the agent off the node: the plugin out of the CNI configuration and bin directory,
/// the rules out of every namespace of the node (found through `/proc` and `/var/run/netns`),
/// the probe chain out of the node's own. Run it with the agent stopped (its DaemonSet
/// deleted), as root in the node's namespaces.
pub fn uninstall(config: &Config) -> anyhow::Result<Uninstalled> {
    if let Some(install) = install(config)? {
        install.uninstall()?;
    }
    let proc = std::path::Path::new("/proc");
    let mut out = Uninstalled::default();
    for netns in crate::procfs::other_namespaces(proc, std::path::Path::new("/var/run/netns")) {
        match crate::redirect::installed(&netns) {
            Ok(true) => match crate::redirect::remove(&netns) {
                Ok(()) => out.cleaned += 1,
                Err(e) => out.failed.push(format!("{}: {e}", netns.name())),
            },
            Ok(false) => {}
            Err(e) => out.failed.push(format!("{}: {e}", netns.name())),
        }
    }
    let node = Netns::open(&proc.join("self/ns/net"))?;
    crate::redirect::remove_probe_snat(&node)?;
    Ok(out)
}

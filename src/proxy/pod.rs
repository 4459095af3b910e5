//! One enrolled pod's proxy: its three listeners bound inside its network namespace (15001
//! outbound, 15006 inbound plaintext, 15008 inbound HBONE; IPv4, and IPv6 when the pod has an
//! IPv6 address), the HBONE client, router and servers behind them, and the tasks serving
//! them. `inpod` decides which pods are served; this builds and runs what serves one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::live::ConnectionTable;
use super::passthrough::{self, InboundPlaintext};
use super::{
    HboneClient, InboundServer, LocalWorkload, Outbound, PodLife, StateRouter, TunnelSettings,
};
use crate::identity::{CertificateManager, LiveIdentity};
use crate::netns::{Netns, PodSocketFactory, SocketFactory};
use crate::ports;
use crate::socket;
use crate::state::SharedState;

/// What every pod's proxy on a node is built from.
#[derive(Debug, Clone)]
pub(crate) struct PodProxyContext {
    pub certs: Arc<CertificateManager>,
    pub state: Arc<SharedState>,
    pub tunnel: TunnelSettings,
    pub cluster_id: String,
    pub preserve_source_ip: bool,
    /// On-demand discovery of unknown destinations (xDS), if enabled.
    pub resolver: Option<Arc<dyn crate::xds::Resolver>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub drain: crate::drain::Drain,
    /// Which plaintext a pod's 15006 takes.
    pub plaintext: InboundPlaintext,
    /// Unknown destinations in the cluster's pod ranges: held, refused when strict.
    pub cluster: Option<Arc<super::outbound::ClusterGuard>>,
    /// The DNS proxy each pod gets, when on.
    pub dns: Option<crate::dns::DnsSettings>,
}

/// A pod's proxy, serving until dropped: then its listeners close and live connections run to
/// their end, unless `removal` ended them first.
#[derive(Debug)]
pub(crate) struct PodProxy {
    tasks: Vec<JoinHandle<()>>,
    /// Ends the pod's live connections (on removal; a drain just drops it).
    pub removal: super::Removal,
    /// Its live connections (the admin page's `workloadState`).
    pub connections: Option<Arc<ConnectionTable>>,
}

/// A listener of the pod's that could not be bound.
#[derive(Debug)]
pub(crate) struct ListenError {
    pub port: u16,
    pub source: std::io::Error,
}

impl PodProxy {
    /// Binds every listener of the pod in `netns` (nothing is spawned unless all bind, so a
    /// failure leaves no half-served pod), then serves them. Must run inside the tokio runtime.
    pub(crate) fn start(
        ctx: &PodProxyContext,
        name: &str,
        namespace: &str,
        identity: &LiveIdentity,
        netns: Arc<Netns>,
        addresses: &[IpAddr],
    ) -> Result<PodProxy, ListenError> {
        if let Err(e) = netns.enable_accept_queue_migration() {
            // An older kernel: an upgrade's overlap may then reset a connection or two.
            tracing::debug!(netns = netns.name(), error = %e, "cannot enable tcp_migrate_req");
        }
        let sockets: Arc<dyn SocketFactory> = Arc::new(PodSocketFactory::new(netns));
        // IPv4 always; IPv6 (v6-only sockets) too when the pod has an IPv6 address.
        let mut unspecified = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
        if addresses.iter().any(IpAddr::is_ipv6) {
            unspecified.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        }
        let bind = |ip: IpAddr, port| {
            sockets
                .tcp_bind(SocketAddr::new(ip, port))
                .map_err(|source| ListenError { port, source })
        };
        let ipv6 = unspecified.len() > 1;
        let mut listeners = Vec::new();
        for ip in unspecified {
            listeners.push((
                bind(ip, ports::OUTBOUND)?,
                bind(ip, ports::INBOUND_PLAINTEXT)?,
                bind(ip, ports::HBONE)?,
            ));
        }

        let client = Arc::new(HboneClient::new(
            ctx.certs.clone(),
            sockets.clone(),
            ctx.tunnel.clone(),
        ));
        let router = Arc::new(StateRouter::new(
            ctx.state.clone(),
            identity.clone(),
            name,
            addresses.to_vec(),
            ctx.cluster_id.clone(),
        ));
        // Removing the pod (not draining the node) ends its live connections.
        let (removal, life) = PodLife::new();
        let connections = life.connections().cloned();
        let outbound = Arc::new(
            Outbound::new(
                client,
                sockets.clone(),
                router,
                ctx.resolver.clone(),
                ctx.tunnel.clone(),
                Some(ctx.metrics.clone()),
                Some(ctx.drain.clone()),
            )
            .for_pod(life.clone())
            .guarding(ctx.cluster.clone()),
        );
        let workload = LocalWorkload {
            identity: identity.clone(),
            addresses: addresses.to_vec(),
            preserve_source_ip: ctx.preserve_source_ip,
            state: Some(ctx.state.clone()),
            metrics: Some(ctx.metrics.clone()),
            drain: Some(ctx.drain.clone()),
            pod: life,
        };
        let inbound = InboundServer::new(
            workload.clone(),
            ctx.certs.clone(),
            sockets.clone(),
            ctx.tunnel.clone(),
        );
        let mut tasks = Vec::new();
        if let Some(dns) = &ctx.dns {
            let client = crate::dns::DnsClient {
                namespace: namespace.to_owned(),
                addresses: addresses.to_vec(),
            };
            let served = crate::dns::start(
                dns,
                sockets.clone(),
                client,
                ctx.state.clone(),
                ctx.metrics.clone(),
                ipv6,
            )
            .map_err(|source| ListenError {
                port: dns.port(),
                source,
            })?;
            tracing::debug!(pod = name, udp = %served.udp, tcp = %served.tcp, "DNS proxy serving");
            tasks.push(served.task);
        }
        for (outbound_l, plaintext_l, hbone_l) in listeners {
            tasks.push(tokio::spawn(
                outbound
                    .clone()
                    .serve(outbound_l, |s| socket::original_dst(s).ok()),
            ));
            tasks.push(tokio::spawn(inbound.clone().serve(hbone_l)));
            tasks.push(tokio::spawn(passthrough::serve_inbound_plaintext(
                plaintext_l,
                sockets.clone(),
                workload.clone(),
                ctx.tunnel.connect_timeout,
                ctx.plaintext,
            )));
        }
        Ok(PodProxy {
            tasks,
            removal,
            connections,
        })
    }

    /// Runs `task` for as long as the pod's proxy serves (its certificate's prefetch).
    pub(crate) fn hold(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        // Closing the listeners stops new connections; live ones run to their end.
        for t in &self.tasks {
            t.abort();
        }
    }
}

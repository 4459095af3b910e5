//! The DNS proxy in each enrolled pod, as ztunnel runs it (src/dns/server.rs,
//! src/dns/handler.rs): UDP and TCP on the pod's localhost port 15053, where DNS capture
//! (istio-cni's `ambient.dnsCapture`, on by default) redirects the pod's port-53 traffic.
//!
//! A query for a name discovery knows (a service's hostname, short forms through the pod's
//! search domains, ServiceEntry hosts with their allocated addresses; [`lookup`]) is answered
//! here, authoritatively; anything else goes to the node's upstream resolvers ([`upstream`])
//! with the client's own bytes, over the transport it came in. Served by hickory-server, which
//! also truncates a UDP answer that does not fit the client's size (TC set; the client asks
//! again over TCP). Upstream failure is SERVFAIL; an upstream NXDOMAIN is relayed. A pod may
//! have at most `dns.maxUpstreamQueries` upstream queries in flight; past that, SERVFAIL at once.

pub(crate) mod lookup;
pub(crate) mod upstream;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::config::DnsConfig;
use crate::metrics::{DnsLabels, Metrics};
use crate::netns::SocketFactory;
use crate::state::SharedState;
use lookup::{Answer, Zone};
use upstream::Upstream;

/// TTL of the records answered locally (ztunnel's).
const TTL: u32 = 30;
/// A TCP client that sends no query for this long is closed (ztunnel's).
const TCP_IDLE: Duration = Duration::from_secs(5);
/// Responses queued per TCP connection (ztunnel's).
const TCP_RESPONSE_BUFFER: usize = 32;

/// What every pod's DNS proxy on the node shares.
#[derive(Debug, Clone)]
pub(crate) struct DnsSettings {
    port: u16,
    zone: Zone,
    upstream: Arc<Upstream>,
    max_upstream_queries: usize,
}

/// Why the DNS proxy cannot be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DnsSetupError {
    #[error(transparent)]
    Domain(#[from] lookup::BadDomain),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamConfigError),
}

impl DnsSettings {
    /// The settings of `config`, `None` when the proxy is off. Reads the resolv.conf.
    pub(crate) fn from_config(config: &DnsConfig) -> Result<Option<DnsSettings>, DnsSetupError> {
        if !config.enabled {
            return Ok(None);
        }
        Ok(Some(DnsSettings {
            port: config.port,
            zone: Zone::new(&config.cluster_domain)?,
            upstream: Arc::new(Upstream::from_resolv_conf(&config.resolv_conf)?),
            max_upstream_queries: config.max_upstream_queries.max(1),
        }))
    }

    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Settings without a config file (the testbed's loopback proxy).
    #[cfg(feature = "testbed")]
    pub(crate) fn for_tests(
        port: u16,
        zone: Zone,
        upstream: Upstream,
        max_upstream_queries: usize,
    ) -> DnsSettings {
        DnsSettings {
            port,
            zone,
            upstream: Arc::new(upstream),
            max_upstream_queries,
        }
    }

    /// The port on each pod's localhost.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

/// The pod a DNS proxy serves.
#[derive(Debug, Clone)]
pub(crate) struct DnsClient {
    /// Its namespace: where short names are looked for first.
    pub namespace: String,
    /// Its addresses: its workload, for the metrics' source labels.
    pub addresses: Vec<IpAddr>,
}

/// A pod's DNS proxy, serving until its task is aborted (and with it every query in progress).
#[derive(Debug)]
pub(crate) struct Served {
    pub task: JoinHandle<()>,
    /// Where it took UDP and TCP on 127.0.0.1 (the configured port, unless that was 0).
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
}

/// Binds the pod's DNS sockets through `sockets` (its netns, with the proxy's mark):
/// 127.0.0.1, and ::1 when `ipv6` (skipped if the pod has no IPv6 loopback), then serves them.
pub(crate) fn start(
    settings: &DnsSettings,
    sockets: Arc<dyn SocketFactory>,
    client: DnsClient,
    state: Arc<SharedState>,
    metrics: Arc<Metrics>,
    ipv6: bool,
) -> std::io::Result<Served> {
    let handler = Handler {
        zone: settings.zone.clone(),
        upstream: settings.upstream.clone(),
        in_flight: Arc::new(Semaphore::new(settings.max_upstream_queries)),
        sockets: sockets.clone(),
        client,
        state,
        metrics,
    };
    let mut server = hickory_server::Server::new(handler);
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), settings.port);
    let (udp, tcp) = (sockets.udp_bind(v4)?, sockets.tcp_bind(v4)?);
    let bound = (udp.local_addr()?, tcp.local_addr()?);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
    if ipv6 {
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), settings.port);
        match (sockets.udp_bind(v6), sockets.tcp_bind(v6)) {
            (Ok(udp), Ok(tcp)) => {
                server.register_socket(udp);
                server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "no IPv6 loopback in the pod: DNS on 127.0.0.1 only");
            }
        }
    }
    let task = tokio::spawn(async move {
        // Aborting this task drops the server, whose own tasks end with it.
        if let Err(e) = server.block_until_done().await {
            tracing::warn!(error = %e, "DNS proxy stopped");
        }
    });
    Ok(Served {
        task,
        udp: bound.0,
        tcp: bound.1,
    })
}

/// Answers one pod's queries.
#[derive(Debug)]
struct Handler {
    zone: Zone,
    upstream: Arc<Upstream>,
    in_flight: Arc<Semaphore>,
    sockets: Arc<dyn SocketFactory>,
    client: DnsClient,
    state: Arc<SharedState>,
    metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        if request.metadata.message_type != MessageType::Query {
            return send_error(request, response, ResponseCode::FormErr).await;
        }
        if request.metadata.op_code != OpCode::Query {
            return send_error(request, response, ResponseCode::NotImp).await;
        }
        let labels = self.labels(request);
        self.metrics.dns.requests.get_or_create(&labels).inc();
        let Ok(info) = request.request_info() else {
            // Not exactly one question.
            return send_error(request, response, ResponseCode::FormErr).await;
        };
        let name = Name::from(info.query.name().clone());
        let qtype = info.query.query_type();
        let answer = lookup::resolve(
            &self.state.read(),
            &self.zone,
            &self.client.namespace,
            &name,
            qtype,
            rand::random(),
        );
        match answer {
            Answer::Local {
                cname,
                name: target,
                addresses,
            } => {
                tracing::debug!(target: "dns", %name, %qtype, records = addresses.len(), "answered");
                send_local(request, response, &name, cname, target, &addresses).await
            }
            Answer::Forward => self.forward(request, response, labels).await,
        }
    }
}

impl Handler {
    /// The query's metric labels: its type and transport, the pod's canonical service.
    fn labels(&self, request: &Request) -> DnsLabels {
        let (service, revision) = {
            let state = self.state.read();
            self.client
                .addresses
                .iter()
                .find_map(|ip| state.workload_by_ip(*ip))
                .map(|w| (w.canonical_name.clone(), w.canonical_revision.clone()))
                .unwrap_or_default()
        };
        let unknown = |s: String| if s.is_empty() { "unknown".into() } else { s };
        DnsLabels {
            request_query_type: request.request_info().map_or_else(
                |_| "unknown".into(),
                |i| i.query.query_type().to_string().to_ascii_lowercase(),
            ),
            request_protocol: match request.protocol() {
                Protocol::Tcp => "tcp",
                _ => "udp",
            },
            source_canonical_service: unknown(service),
            source_canonical_revision: unknown(revision),
        }
    }

    /// Asks the upstream with the client's bytes and relays its answer.
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        response: R,
        labels: DnsLabels,
    ) -> ResponseInfo {
        let dns = &self.metrics.dns;
        dns.upstream_requests.get_or_create(&labels).inc();
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            dns.upstream_failures.get_or_create(&labels).inc();
            tracing::debug!(target: "dns", "too many upstream queries in flight: SERVFAIL");
            return send_error(request, response, ResponseCode::ServFail).await;
        };
        let tcp = request.protocol() == Protocol::Tcp;
        let max_udp = request
            .edns
            .as_ref()
            .map_or(512, |e| usize::from(e.max_payload()));
        let started = Instant::now();
        let exchanged = self
            .upstream
            .exchange(&*self.sockets, request.as_slice(), tcp, max_udp)
            .await;
        dns.upstream_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        let answer = exchanged
            .map_err(|e| e.to_string())
            .and_then(|bytes| Message::from_vec(&bytes).map_err(|e| e.to_string()));
        match answer {
            Ok(answer) => send_relayed(request, response, answer).await,
            Err(e) => {
                dns.upstream_failures.get_or_create(&labels).inc();
                tracing::debug!(target: "dns", error = %e, "upstream failed: SERVFAIL");
                send_error(request, response, ResponseCode::ServFail).await
            }
        }
    }
}

/// Our own answer: the CNAME if the name was found under a stripped search domain, then the
/// addresses (none: NOERROR with no records, the name exists).
async fn send_local<R: ResponseHandler>(
    request: &Request,
    mut response: R,
    asked: &Name,
    cname: Option<Name>,
    target: Name,
    addresses: &[IpAddr],
) -> ResponseInfo {
    let mut records = Vec::with_capacity(addresses.len() + 1);
    if let Some(canonical) = cname {
        records.push(Record::from_rdata(
            asked.clone(),
            TTL,
            RData::CNAME(CNAME(canonical)),
        ));
    }
    for ip in addresses {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(A(*v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
        };
        records.push(Record::from_rdata(target.clone(), TTL, data));
    }
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.recursion_available = true;
    let edns = response_edns(request);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let message = builder.build(metadata, records.iter(), None, None, None);
    send(request, &mut response, message).await
}

/// The upstream's answer, relayed: its code, flags and sections under the client's ID.
async fn send_relayed<R: ResponseHandler>(
    request: &Request,
    mut response: R,
    answer: Message,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = answer.metadata.response_code;
    metadata.truncation = answer.metadata.truncation;
    metadata.recursion_available = answer.metadata.recursion_available;
    metadata.authentic_data = answer.metadata.authentic_data;
    let edns = response_edns(request);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let message = builder.build(
        metadata,
        answer.answers.iter(),
        answer.authorities.iter(),
        None,
        answer.additionals.iter(),
    );
    send(request, &mut response, message).await
}

async fn send_error<R: ResponseHandler>(
    request: &Request,
    mut response: R,
    code: ResponseCode,
) -> ResponseInfo {
    let message =
        MessageResponseBuilder::from_message_request(request).error_msg(&request.metadata, code);
    send(request, &mut response, message).await
}

async fn send<'a, R: ResponseHandler>(
    request: &Request,
    response: &mut R,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(target: "dns", error = %e, "cannot send the DNS answer");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            hickory_proto::op::Header {
                metadata,
                counts: Default::default(),
            }
            .into()
        }
    }
}

/// The answer's EDNS when the query had one: the client's size (at least 512) and version.
fn response_edns(request: &Request) -> Option<Edns> {
    let asked = request.edns.as_ref()?;
    let mut edns = Edns::new();
    edns.set_max_payload(asked.max_payload().max(512));
    edns.set_version(asked.version());
    edns.set_dnssec_ok(asked.flags().dnssec_ok);
    Some(edns)
}

#[cfg(test)]
mod tests;

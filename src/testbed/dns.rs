//! The DNS proxy on loopback, for `benches/dns.rs`: one pod's proxy (as `proxy::pod` starts it,
//! but with the node's own sockets) over a state of services, and a plain upstream resolver
//! that answers every A query with one address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use tokio::task::JoinHandle;

use crate::dns::lookup::Zone;
use crate::dns::upstream::Upstream;
use crate::dns::{DnsClient, DnsSettings};
use crate::metrics::Metrics;
use crate::netns::DefaultSocketFactory;
use crate::state::{Service, SharedState, State};

/// A DNS proxy serving on 127.0.0.1 (UDP) until dropped.
#[derive(Debug)]
pub struct LoopbackDns {
    pub udp: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for LoopbackDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy for a pod in namespace `demo` that knows `services` (hostname, VIP) and asks
/// `upstream` for everything else. Must run inside the tokio runtime.
pub fn loopback_dns(
    services: &[(&str, IpAddr)],
    upstream: SocketAddr,
) -> std::io::Result<LoopbackDns> {
    let mut state = State::default();
    for (hostname, vip) in services {
        let name = hostname.split('.').next().unwrap_or_default();
        state.upsert_service(Service::new(
            name,
            "demo",
            hostname,
            vec![*vip],
            [(80, 80)].into(),
        ));
    }
    let settings = DnsSettings::for_tests(
        0,
        Zone::new("cluster.local").map_err(std::io::Error::other)?,
        Upstream::new(vec![upstream], Duration::from_secs(2), 1),
        1024,
    );
    let served = crate::dns::start(
        &settings,
        Arc::new(DefaultSocketFactory),
        DnsClient {
            namespace: "demo".into(),
            addresses: Vec::new(),
        },
        Arc::new(SharedState::new(state)),
        Metrics::new(Vec::new()),
        false,
    )?;
    Ok(LoopbackDns {
        udp: served.udp,
        task: served.task,
    })
}

/// An upstream resolver on 127.0.0.1 (UDP) answering every query with `answer` as its A
/// record, until dropped.
#[derive(Debug)]
pub struct PlainResolver {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for PlainResolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PlainResolver {
    pub async fn start(answer: Ipv4Addr) -> std::io::Result<PlainResolver> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                m.metadata.recursion_available = true;
                for question in &q.queries {
                    m.add_query(question.clone());
                    m.add_answer(Record::from_rdata(
                        question.name().clone(),
                        60,
                        RData::A(A(answer)),
                    ));
                }
                if let Ok(out) = m.to_vec() {
                    let _ = socket.send_to(&out, from).await;
                }
            }
        });
        Ok(PlainResolver { addr, task })
    }
}

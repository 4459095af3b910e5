//! The DNS proxy over loopback: real UDP and TCP sockets, hickory-server answering, an upstream
//! the test runs (hickory messages over UDP and TCP, recording the transport of each query).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::lookup::Zone;
use super::upstream::Upstream;
use super::{DnsClient, DnsSettings, Served, start};
use crate::metrics::Metrics;
use crate::netns::DefaultSocketFactory;
use crate::state::{Service, SharedState, State};

/// An upstream nameserver: answers `www.example.org` (203.0.113.7), NXDOMAIN for
/// `missing.example.org`, 40 A records for `big.example.org` (over UDP without room: TC and no
/// records), SERVFAIL for `broken.example.org`, and holds `hold.example.org` until released.
struct FakeUpstream {
    addr: SocketAddr,
    /// (name, "udp"/"tcp") of each query, in order.
    seen: Arc<Mutex<Vec<(String, &'static str)>>>,
    /// Each permit added releases one held query.
    release: Arc<Semaphore>,
}

fn answer(query: &Message, tcp: bool, max_udp: usize) -> Option<Message> {
    let q = query.queries.first()?;
    let name = q.name().to_ascii();
    let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    let a = |ip: [u8; 4]| Record::from_rdata(q.name().clone(), 60, RData::A(A(Ipv4Addr::from(ip))));
    match name.trim_end_matches('.') {
        "www.example.org" => {
            reply.add_answer(a([203, 0, 113, 7]));
        }
        "missing.example.org" => reply.metadata.response_code = ResponseCode::NXDomain,
        "broken.example.org" => reply.metadata.response_code = ResponseCode::ServFail,
        "big.example.org" => {
            for i in 0..40 {
                reply.add_answer(a([198, 51, 100, i]));
            }
            if !tcp && reply.to_vec().ok()?.len() > max_udp {
                reply.answers.clear();
                reply.metadata.truncation = true;
            }
        }
        _ => reply.metadata.response_code = ResponseCode::NXDomain,
    }
    Some(reply)
}

impl FakeUpstream {
    async fn start() -> FakeUpstream {
        // UDP and TCP on one port: a free UDP port's TCP twin may be taken (by another test's
        // connection), so try a few.
        let mut attempts = 0;
        let (udp, tcp, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, tcp, addr),
                Err(e) if attempts < 20 => {
                    attempts += 1;
                    eprintln!("{addr} taken for TCP ({e}); another port");
                }
                Err(e) => panic!("no port free for both UDP and TCP: {e}"),
            }
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(Semaphore::new(0));
        let (seen2, release2) = (seen.clone(), release.clone());
        tokio::spawn(async move {
            let udp = Arc::new(udp);
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let name = query.queries[0].name().to_ascii();
                seen2.lock().unwrap().push((name.clone(), "udp"));
                let max = query
                    .edns
                    .as_ref()
                    .map_or(512, |e| usize::from(e.max_payload()));
                let (udp, release) = (udp.clone(), release2.clone());
                tokio::spawn(async move {
                    if name.starts_with("hold.") {
                        release.acquire().await.unwrap().forget();
                    }
                    if let Some(reply) = answer(&query, false, max) {
                        let _ = udp.send_to(&reply.to_vec().unwrap(), from).await;
                    }
                });
            }
        });
        let seen3 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else {
                    return;
                };
                let seen = seen3.clone();
                tokio::spawn(async move {
                    while let Ok(len) = s.read_u16().await {
                        let mut msg = vec![0u8; usize::from(len)];
                        if s.read_exact(&mut msg).await.is_err() {
                            return;
                        }
                        let query = Message::from_vec(&msg).unwrap();
                        seen.lock()
                            .unwrap()
                            .push((query.queries[0].name().to_ascii(), "tcp"));
                        let reply = answer(&query, true, 0).unwrap().to_vec().unwrap();
                        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
                        out.extend(reply);
                        let _ = s.write_all(&out).await;
                    }
                });
            }
        });
        FakeUpstream {
            addr,
            seen,
            release,
        }
    }
}

fn service(hostname: &str, vips: Vec<IpAddr>) -> Service {
    let name = hostname.split('.').next().unwrap();
    Service::new(name, "demo", hostname, vips, BTreeMap::from([(80, 8080)]))
}

struct Proxy {
    served: Served,
    metrics: Arc<Metrics>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.served.task.abort();
    }
}

async fn proxy(upstream: Vec<SocketAddr>, max_upstream_queries: usize) -> Proxy {
    let mut state = State::default();
    state.upsert_service(service(
        "echo.demo.svc.cluster.local",
        vec!["10.96.0.20".parse().unwrap()],
    ));
    // Sixty addresses: more than 512 bytes of answer.
    let many = (0..60u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(240, 240, 1, i)))
        .collect();
    state.upsert_service(service("many.example", many));
    let settings = DnsSettings {
        port: 0,
        zone: Zone::new("cluster.local").unwrap(),
        upstream: Arc::new(Upstream::new(upstream, Duration::from_secs(1), 1)),
        max_upstream_queries,
    };
    let metrics = Metrics::new(Vec::new());
    let served = start(
        &settings,
        Arc::new(DefaultSocketFactory),
        DnsClient {
            namespace: "demo".into(),
            addresses: Vec::new(),
        },
        Arc::new(SharedState::new(state)),
        metrics.clone(),
        false,
    )
    .unwrap();
    Proxy { served, metrics }
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.id = rand::random();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.edns = Some(e);
    }
    m
}

async fn over_udp(to: SocketAddr, q: &Message) -> Message {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&q.to_vec().unwrap(), to).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(10), s.recv(&mut buf))
        .await
        .expect("no DNS answer")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

async fn over_tcp(to: SocketAddr, q: &Message) -> Message {
    let mut s = TcpStream::connect(to).await.unwrap();
    let bytes = q.to_vec().unwrap();
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend(bytes);
    s.write_all(&out).await.unwrap();
    let len = s.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addresses(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn known_names_are_answered_here_with_authority() {
    let up = FakeUpstream::start().await;
    let p = proxy(vec![up.addr], 8).await;
    for m in [
        over_udp(p.served.udp, &query("echo.", RecordType::A, None)).await,
        over_tcp(
            p.served.tcp,
            &query("echo.demo.svc.cluster.local.", RecordType::A, None),
        )
        .await,
    ] {
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(addresses(&m), vec!["10.96.0.20".parse::<IpAddr>().unwrap()]);
    }
    // The name exists without an IPv6 address: no records, not NXDOMAIN.
    let m = over_udp(p.served.udp, &query("echo.", RecordType::AAAA, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(up.seen.lock().unwrap().is_empty(), "nothing went upstream");
    let text = p.metrics.encode();
    assert!(
        text.contains("istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"udp\""),
        "{text}"
    );
}

#[tokio::test]
async fn other_names_are_forwarded_over_the_transport_they_came_in() {
    let up = FakeUpstream::start().await;
    let p = proxy(vec![up.addr], 8).await;
    let m = over_udp(
        p.served.udp,
        &query("www.example.org.", RecordType::A, None),
    )
    .await;
    assert_eq!(
        addresses(&m),
        vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
    );
    assert!(!m.metadata.authoritative);
    let m = over_tcp(
        p.served.tcp,
        &query("www.example.org.", RecordType::A, None),
    )
    .await;
    assert_eq!(
        addresses(&m),
        vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
    );
    // NXDOMAIN is relayed as it is.
    let m = over_udp(
        p.served.udp,
        &query("missing.example.org.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        *up.seen.lock().unwrap(),
        vec![
            ("www.example.org.".to_owned(), "udp"),
            ("www.example.org.".to_owned(), "tcp"),
            ("missing.example.org.".to_owned(), "udp"),
        ]
    );
    let text = p.metrics.encode();
    assert!(
        text.contains(
            "istio_dns_upstream_requests_total{request_query_type=\"a\",request_protocol=\"tcp\""
        ),
        "{text}"
    );
    assert!(
        text.contains("istio_dns_upstream_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() {
    let up = FakeUpstream::start().await;
    let p = proxy(vec![up.addr], 8).await;
    // Ours: sixty A records do not fit 512 bytes.
    let m = over_udp(p.served.udp, &query("many.example.", RecordType::A, None)).await;
    assert!(m.metadata.truncation, "TC set");
    assert!(addresses(&m).len() < 60);
    let m = over_udp(
        p.served.udp,
        &query("many.example.", RecordType::A, Some(4096)),
    )
    .await;
    assert!(!m.metadata.truncation, "fits the EDNS size");
    assert_eq!(addresses(&m).len(), 60);
    let m = over_tcp(p.served.tcp, &query("many.example.", RecordType::A, None)).await;
    assert_eq!(addresses(&m).len(), 60);
    // The upstream's: its TC is passed on; over TCP the whole answer comes.
    let m = over_udp(
        p.served.udp,
        &query("big.example.org.", RecordType::A, None),
    )
    .await;
    assert!(m.metadata.truncation);
    let m = over_tcp(
        p.served.tcp,
        &query("big.example.org.", RecordType::A, None),
    )
    .await;
    assert!(!m.metadata.truncation);
    assert_eq!(addresses(&m).len(), 40);
}

#[tokio::test]
async fn an_upstream_that_fails_is_servfail_and_counted() {
    let up = FakeUpstream::start().await;
    // Nothing listens on the first server (its UDP port is closed: refused at once); the
    // second answers SERVFAIL for broken.example.org.
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let p = proxy(vec![closed, up.addr], 8).await;
    let m = over_udp(
        p.served.udp,
        &query("www.example.org.", RecordType::A, None),
    )
    .await;
    assert_eq!(addresses(&m).len(), 1, "the next server answered");
    let m = over_udp(
        p.served.udp,
        &query("broken.example.org.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let dead = proxy(vec![closed], 8).await;
    let m = over_udp(
        dead.served.udp,
        &query("www.example.org.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let text = dead.metrics.encode();
    assert!(
        text.contains("istio_dns_upstream_failures_total{"),
        "{text}"
    );
}

#[tokio::test]
async fn a_flood_gets_servfail_past_the_in_flight_bound() {
    let up = FakeUpstream::start().await;
    let p = proxy(vec![up.addr], 2).await;
    let udp = p.served.udp;
    // Two held upstream, then eight more while they are: those are refused at once.
    let held: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                over_udp(udp, &query("hold.example.org.", RecordType::A, None)).await
            })
        })
        .collect();
    while up.seen.lock().unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..8 {
        let m = over_udp(udp, &query("www.example.org.", RecordType::A, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
    assert_eq!(
        up.seen.lock().unwrap().len(),
        2,
        "none of the eight went upstream"
    );
    up.release.add_permits(2);
    for h in held {
        // The fake answers NXDOMAIN for names it does not know.
        assert_eq!(
            h.await.unwrap().metadata.response_code,
            ResponseCode::NXDomain
        );
    }
    // With the two answered, upstream queries go through again.
    let m = over_udp(udp, &query("www.example.org.", RecordType::A, None)).await;
    assert_eq!(addresses(&m).len(), 1);
}

#[tokio::test]
async fn malformed_and_non_queries_get_an_error_not_silence() {
    let up = FakeUpstream::start().await;
    let p = proxy(vec![up.addr], 8).await;
    let mut q = query("echo.", RecordType::A, None);
    q.metadata.op_code = OpCode::Update;
    let m = over_udp(p.served.udp, &q).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    let mut q = query("echo.", RecordType::A, None);
    q.add_query(Query::query(
        Name::from_str("echo.").unwrap(),
        RecordType::AAAA,
    ));
    let m = over_udp(p.served.udp, &q).await;
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Garbage is dropped; the server goes on answering.
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(b"\x00\x01garbage", p.served.udp).await.unwrap();
    let m = over_udp(p.served.udp, &query("echo.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
}

#[test]
fn the_upstream_comes_from_resolv_conf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resolv.conf");
    std::fs::write(
        &path,
        "search demo.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10\noptions ndots:5 timeout:2 attempts:3\n",
    )
    .unwrap();
    let up = Upstream::from_resolv_conf(&path).unwrap();
    assert_eq!(
        up,
        Upstream::new(
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[fd00::10]:53".parse().unwrap()
            ],
            Duration::from_secs(2),
            3
        )
    );
    std::fs::write(&path, "search x\n").unwrap();
    let e = Upstream::from_resolv_conf(&path).unwrap_err().to_string();
    assert!(e.contains("no usable nameserver"), "{e}");
    let e = Upstream::from_resolv_conf(&dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read"), "{e}");
}

//! The DNS proxy on real network namespaces: pod a1 under istio-cni's DNS capture rules (its
//! port-53 UDP and TCP redirected to 15053 in its netns; cni/pkg/iptables/iptables.go,
//! `AppendInpodRules` with `redirectDNS`), resolving through the glibc resolver (`getent`, with
//! a kubelet-style resolv.conf) a service name, a ServiceEntry host with an allocated address,
//! and an external name that node A's proxy forwards to a DNS server the test runs in pod b2.
//! Needs root; skipped when not root, failing instead on CI.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use hboned::config::ServiceConfig;
use hboned::testbed::{A1, B2, SERVICE_VIP, Topology};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use support::topo::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The nameserver a1's resolv.conf names, as kubelet writes the cluster DNS service's VIP:
/// nothing answers there; only the capture reaches a resolver.
const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// What the test's upstream answers for `www.example.org`.
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// A ServiceEntry host and the address istiod would allocate it (the 240.240/16 class E range).
const SERVICE_ENTRY: &str = "api.external.example";
const ALLOCATED: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 1);

/// istio-cni's DNS capture rules in a pod (cni/pkg/iptables/iptables.go): UDP and TCP to port
/// 53 not from the proxy (mark 0x539) to 15053, and the proxy's upstream traffic in its own
/// conntrack zone. Inserted first in nat OUTPUT, before the TCP capture, as istio orders them.
const ISTIO_DNS_CAPTURE: &str = "\
*raw
-A OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1
-A PREROUTING -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1
COMMIT
*nat
-I OUTPUT 1 ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
-I OUTPUT 2 ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
COMMIT
";

/// `/etc/netns/<a1>/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf, as
/// kubelet writes a pod's; removed when dropped.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn install(topo: &Topology, pod: &str) -> ResolvConf {
        let dir = PathBuf::from("/etc/netns").join(topo.netns_name(pod));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "search demo.svc.cluster.local svc.cluster.local cluster.local\nnameserver {CLUSTER_DNS}\noptions ndots:5 timeout:2 attempts:2\n"
            ),
        )
        .unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The upstream resolver: on b2's address, port 53, UDP and TCP; `www.example.org` is
/// [`EXTERNAL`], every other name NXDOMAIN. Records (name, client address, transport).
type Seen = Arc<Mutex<Vec<(String, IpAddr, &'static str)>>>;

fn reply(query: &[u8]) -> Option<(String, Vec<u8>)> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let name = question.name().to_ascii();
    let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(question.clone());
    if name.eq_ignore_ascii_case("www.example.org.") && question.query_type() == RecordType::A {
        m.add_answer(Record::from_rdata(
            question.name().clone(),
            60,
            RData::A(A(EXTERNAL)),
        ));
    } else if !name.eq_ignore_ascii_case("www.example.org.") {
        m.metadata.response_code = ResponseCode::NXDomain;
    }
    Some((name, m.to_vec().ok()?))
}

fn start_upstream(topo: &Topology) -> Seen {
    let seen: Seen = Arc::default();
    let at = SocketAddr::from((B2.ip, 53));
    let ns = topo.netns(B2.name).unwrap();
    let (udp, tcp) = ns
        .run(|| {
            let udp = std::net::UdpSocket::bind(at)?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(at)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })
        .unwrap();
    let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
    let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            if let Some((name, out)) = reply(&buf[..n]) {
                s.lock().unwrap().push((name, from.ip(), "udp"));
                let _ = udp.send_to(&out, from).await;
            }
        }
    });
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, from)) = tcp.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                while let Ok(len) = c.read_u16().await {
                    let mut q = vec![0u8; usize::from(len)];
                    if c.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    let Some((name, out)) = reply(&q) else { return };
                    s.lock().unwrap().push((name, from.ip(), "tcp"));
                    let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                    framed.extend(out);
                    let _ = c.write_all(&framed).await;
                }
            });
        }
    });
    seen
}

/// `getent ahostsv4 <name>` in the pod's namespace: the glibc resolver, through its resolv.conf.
async fn getent(topo: &Topology, pod: &str, name: &str) -> Vec<Ipv4Addr> {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.netns_name(pod),
            "getent",
            "ahostsv4",
            name,
        ])
        .output()
        .await
        .unwrap();
    let mut ips: Vec<Ipv4Addr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// One DNS query over TCP from the pod to the cluster DNS address (captured to 15053).
async fn over_tcp_from(topo: &Topology, pod: &str, name: &str) -> Message {
    let mut q = Message::query();
    q.metadata.id = 4242;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let bytes = q.to_vec().unwrap();
    let mut stream = topo
        .connect(pod, SocketAddr::from((CLUSTER_DNS, 53)))
        .await
        .unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend(bytes);
    stream.write_all(&framed).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut answer = vec![0u8; usize::from(len)];
    stream.read_exact(&mut answer).await.unwrap();
    Message::from_vec(&answer).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_resolves_services_service_entries_and_external_names_through_its_proxy() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::create(bin()).unwrap();
    // istio-cni's DNS capture in a1, besides the TCP capture.
    let netns = topo.netns_name(A1.name);
    let restore = std::process::Command::new("ip")
        .args(["netns", "exec", &netns, "iptables-restore", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(ISTIO_DNS_CAPTURE.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(restore.success(), "istio-cni's DNS rules");
    let _resolv = ResolvConf::install(&topo, A1.name);
    let upstream_conf = topo.dir().join("upstream-resolv.conf");
    std::fs::write(
        &upstream_conf,
        format!("nameserver {}\noptions timeout:2\n", B2.ip),
    )
    .unwrap();
    let seen = start_upstream(&topo);
    topo.start_proxies(
        bin(),
        |c| {
            c.dns.enabled = true;
            c.dns.resolv_conf = upstream_conf.clone();
            c.services.push(ServiceConfig {
                name: "api".into(),
                namespace: "demo".into(),
                hostname: SERVICE_ENTRY.into(),
                vips: vec![IpAddr::V4(ALLOCATED)],
                ports: [(443, 443)].into(),
                subject_alt_names: Vec::new(),
                waypoint: None,
            });
        },
        |_| {},
    )
    .await
    .unwrap();

    // A service by its short name (search domains), answered by the proxy.
    assert_eq!(getent(&topo, A1.name, "echo").await, vec![SERVICE_VIP]);
    assert_eq!(
        getent(&topo, A1.name, "echo.demo.svc.cluster.local").await,
        vec![SERVICE_VIP]
    );
    // A ServiceEntry host: its allocated address (glibc asks with a search domain appended
    // first; the proxy strips it and answers with a CNAME).
    assert_eq!(getent(&topo, A1.name, SERVICE_ENTRY).await, vec![ALLOCATED]);
    assert!(
        seen.lock().unwrap().is_empty(),
        "known names never reach the upstream: {:?}",
        seen.lock().unwrap()
    );
    // An external name: forwarded from a1's own namespace (the proxy's mark lets it out
    // uncaptured) to the upstream in b2.
    assert_eq!(
        getent(&topo, A1.name, "www.example.org").await,
        vec![EXTERNAL]
    );
    {
        let seen = seen.lock().unwrap();
        let forwarded: Vec<_> = seen
            .iter()
            .filter(|(n, _, _)| n == "www.example.org.")
            .collect();
        assert!(!forwarded.is_empty(), "{seen:?}");
        assert!(
            forwarded
                .iter()
                .all(|(_, from, proto)| *from == IpAddr::V4(A1.ip) && *proto == "udp"),
            "forwarded from a1 over UDP: {seen:?}"
        );
    }
    // A name nobody knows: NXDOMAIN, as the upstream said.
    assert!(getent(&topo, A1.name, "nowhere.invalid").await.is_empty());

    // Over TCP, captured alike; an external name goes upstream over TCP.
    let m = over_tcp_from(&topo, A1.name, "echo.demo.svc.cluster.local.").await;
    assert_eq!(m.metadata.id, 4242);
    assert!(m.metadata.authoritative);
    assert_eq!(
        m.answers.iter().map(|r| r.data.clone()).collect::<Vec<_>>(),
        vec![RData::A(A(SERVICE_VIP))]
    );
    let m = over_tcp_from(&topo, A1.name, "www.example.org.").await;
    assert_eq!(
        m.answers.iter().map(|r| r.data.clone()).collect::<Vec<_>>(),
        vec![RData::A(A(EXTERNAL))]
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|(n, from, proto)| n == "www.example.org."
                && *from == IpAddr::V4(A1.ip)
                && *proto == "tcp"),
        "forwarded over TCP: {:?}",
        seen.lock().unwrap()
    );

    // Counted as ztunnel counts them.
    let metrics = http_get(&topo, "na", 15020, "/metrics");
    assert!(
        metrics
            .contains("istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"udp\""),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "istio_dns_upstream_requests_total{request_query_type=\"a\",request_protocol=\"tcp\""
        ),
        "{metrics}"
    );
}

//! Helpers of the network-namespace tests (tests/netns.rs, tests/faults.rs): HTTP to the
//! proxies' own ports inside a node, metrics, the proxy binary, and byte-stream checks.

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use hboned::testbed::Topology;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::within;

/// GET `path` on 127.0.0.1:`port` inside a namespace of the topology; the whole response.
pub(crate) fn http_get(topo: &Topology, netns: &str, port: u16, path: &str) -> String {
    http(topo, netns, port, "GET", path)
}

/// `method path` on 127.0.0.1:`port` inside a namespace of the topology; the whole response.
/// A refused connection is tried again for up to 10 s: a proxy binds its admin page after its
/// pods are served (and retries while a draining proxy holds the port), so a test that starts
/// on "pods served" can be ahead of it on a loaded machine.
pub(crate) fn http(topo: &Topology, netns: &str, port: u16, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    topo.netns(netns)
        .unwrap()
        .run(|| {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut s = loop {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Err(e)
                        if e.kind() == ErrorKind::ConnectionRefused
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    connected => break connected?,
                }
            };
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .unwrap()
}

/// Deletes a pod's namespace under the proxies (`ip netns del`), as a pod's deletion does.
pub(crate) fn delete_netns(topo: &Topology, pod: &str) {
    let name = topo.netns_name(pod);
    let deleted = std::process::Command::new("ip")
        .args(["netns", "del", &name])
        .status()
        .unwrap();
    assert!(deleted.success(), "ip netns del {name}");
}

/// The value of `name{labels}` in a Prometheus text exposition.
pub(crate) fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let series = format!("{name}{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a proxy serves the pod in `netns`: its HBONE port answers inside the pod.
pub(crate) fn hbone_listens(netns: &hboned::netns::Netns) -> bool {
    netns
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], 15008)),
                Duration::from_millis(500),
            )
        })
        .is_ok()
}

/// Whether a proxy serves pod `pod` of the topology.
pub(crate) fn serves(topo: &Topology, pod: &str) -> bool {
    hbone_listens(&topo.netns(pod).unwrap())
}

pub(crate) fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hboned"))
}

/// False (and a note) when these tests cannot run here; a panic on CI, where they must.
pub(crate) fn can_run() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "the netns tests must run as root on CI"
    );
    eprintln!("skipped: needs root (network namespaces, iptables)");
    false
}

/// Reads until the connection ends; `Err` with the kind when it was reset.
pub(crate) async fn until_closed(s: &mut tokio::net::TcpStream) -> Result<usize, ErrorKind> {
    let mut buf = [0u8; 1024];
    let mut total = 0;
    within(10, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) => return Err(e.kind()),
            }
        }
    })
    .await
}

/// Writes `msg` and expects it echoed back.
pub(crate) async fn echoes(s: &mut tokio::net::TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within(10, s.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, msg);
}

/// Sends one delta response and waits for its ACK.
pub(crate) async fn push(
    xds: &mut super::fake_ads::AdsStream,
    nonce: &str,
    type_url: &str,
    resources: Vec<hboned::proto::envoy::service::discovery::v3::Resource>,
    removed: &[&str],
) {
    xds.send(type_url, nonce, resources, removed);
    let ack = xds.next().await;
    assert_eq!(
        (ack.response_nonce.as_str(), ack.error_detail),
        (nonce, None)
    );
}

/// The topology with node B's proxy on a fake control plane that listens inside node B's netns
/// (the proxy reaches it on 127.0.0.1 there): returns once both proxies serve and the stream
/// has subscribed to addresses and policies, with the first (empty) address push ACKed.
pub(crate) async fn with_control_plane_on_b() -> (
    Topology,
    super::fake_ads::FakeAds,
    super::fake_ads::AdsStream,
) {
    with_control_plane_on_b_and(|_| {}).await
}

/// [`with_control_plane_on_b`], node A's config changed by `adjust_a`.
pub(crate) async fn with_control_plane_on_b_and(
    adjust_a: impl FnOnce(&mut hboned::config::Config),
) -> (
    Topology,
    super::fake_ads::FakeAds,
    super::fake_ads::AdsStream,
) {
    use hboned::xds::convert::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
    let mut topo = Topology::create(bin()).unwrap();
    let listener = loopback_listener(&topo, "nb");
    let mut ads = super::fake_ads::FakeAds::serve(listener);
    let address = format!("http://{}", ads.addr);
    topo.start_proxies(bin(), adjust_a, |b| b.xds.address = address)
        .await
        .unwrap();
    let mut xds = ads.accept().await;
    assert_eq!(xds.next().await.type_url, ADDRESS_TYPE);
    assert_eq!(xds.next().await.type_url, AUTHORIZATION_TYPE);
    push(&mut xds, "a0", ADDRESS_TYPE, Vec::new(), &[]).await;
    (topo, ads, xds)
}

/// A non-blocking listener on 127.0.0.1 (a free port) inside a namespace of the topology: where
/// a fake control plane or API server serves the proxy of that node.
pub(crate) fn loopback_listener(topo: &Topology, netns: &str) -> std::net::TcpListener {
    topo.netns(netns)
        .unwrap()
        .run(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .unwrap()
}

/// What a capture of the node link saw of one transfer.
pub(crate) struct Seen {
    /// The marker appeared in some segment's payload.
    pub clear: bool,
    /// Every segment between the two pods went to or from port 15008.
    pub hbone: bool,
}

/// Echoes `marker` followed by `len` pattern bytes from pod `from` to `to`'s app port under a
/// capture of the node link (asserting the echo and that the transfer was captured).
pub(crate) async fn transfer_seen(
    topo: &Topology,
    from: &hboned::testbed::Pod,
    to: &hboned::testbed::Pod,
    marker: &[u8],
    len: usize,
) -> Seen {
    use hboned::testbed::{self, APP_PORT, Capture};
    use std::net::IpAddr;
    let (ns, iface, sentinel) = topo.node_link();
    let pcap =
        std::env::temp_dir().join(format!("{}-{}{}.pcap", topo.prefix(), from.name, to.name));
    let capture = Capture::start(&ns, &iface, &pcap).await.unwrap();
    let mut data = marker.to_vec();
    data.extend_from_slice(&super::pattern(7, len));
    let s = topo.connect(from.name, to.addr(APP_PORT)).await.unwrap();
    assert_eq!(
        within(20, testbed::echo_roundtrip(s, &data)).await.unwrap(),
        data
    );
    let segments = capture.stop(&topo.netns("na").unwrap(), sentinel).unwrap();
    let _ = std::fs::remove_file(&pcap);
    let between = |s: &testbed::Segment| {
        let ends = [s.src.ip(), s.dst.ip()];
        ends.contains(&IpAddr::V4(from.ip)) && ends.contains(&IpAddr::V4(to.ip))
    };
    let flows: Vec<_> = segments
        .iter()
        .filter(|s| !s.payload.is_empty() && between(s))
        .collect();
    assert!(
        flows.iter().map(|s| s.payload.len()).sum::<usize>() >= data.len(),
        "the {} → {} transfer was not captured",
        from.name,
        to.name
    );
    Seen {
        clear: segments
            .iter()
            .any(|s| s.payload.windows(marker.len()).any(|w| w == marker)),
        hbone: flows
            .iter()
            .all(|s| s.src.port() == 15008 || s.dst.port() == 15008),
    }
}

//! Tests of `proxy::outbound`: the route decision as a table, as ztunnel tests its
//! build_request: for each destination, where the bytes go, what the CONNECT says, which
//! identities the peer may present, and how metrics name both ends. Pure: a fixed state and
//! fixed dice, no sockets.

use super::*;
use crate::config::{Config, ServiceConfig, WorkloadConfig};
use crate::state::Protocol;

fn workload(name: &str, ip: &str, sa: &str, protocol: Protocol) -> WorkloadConfig {
    WorkloadConfig {
        uid: format!("demo/{name}"),
        name: name.into(),
        namespace: "demo".into(),
        service_account: sa.into(),
        trust_domain: String::new(),
        workload_ips: vec![ip.parse().unwrap()],
        node: String::new(),
        protocol,
        services: Default::default(),
        waypoint: None,
        network: String::new(),
        network_gateway: None,
    }
}

/// a1 (the source, enrolled), b1 (enrolled, behind the echo service), b2 (plain).
fn state() -> State {
    let mut b1 = workload("b1", "10.0.2.1", "server", Protocol::Hbone);
    b1.services.insert(
        "demo/echo.demo.svc.cluster.local".into(),
        [(80, 8080)].into(),
    );
    let config = Config {
        cluster_id: "c1".into(),
        workloads: vec![
            workload("a1", "10.0.1.1", "client", Protocol::Hbone),
            b1,
            workload("b2", "10.0.2.2", "plain", Protocol::Tcp),
        ],
        services: vec![ServiceConfig {
            name: "echo".into(),
            namespace: "demo".into(),
            hostname: "echo.demo.svc.cluster.local".into(),
            vips: vec!["10.96.0.1".parse().unwrap()],
            ports: [(80, 0)].into(),
            subject_alt_names: vec!["spiffe://cluster.local/ns/demo/sa/echo-san".into()],
            waypoint: None,
        }],
        ..Config::default()
    };
    State::from_config(&config)
}

fn router() -> StateRouter {
    StateRouter::new(
        Arc::new(SharedState::default()),
        Identity::new("cluster.local", "demo", "client")
            .unwrap()
            .into(),
        "a1-pod",
        vec!["10.0.1.1".parse().unwrap()],
        "c1",
    )
}

const DICE: Dice = Dice {
    pick: 7,
    trace: TraceParent {
        trace_id: 0x0123,
        span_id: 0x45,
        flags: 0,
    },
};

/// One line per route: kind, target, CONNECT host, expected peer identities (service accounts),
/// and the destination as metrics name it.
fn summary(route: &Route) -> String {
    match route {
        Route::Hbone {
            key,
            request,
            peers,
            service,
            ..
        } => {
            let expected: Vec<String> = key
                .expected()
                .iter()
                .map(|i| i.service_account().to_owned())
                .collect();
            format!(
                "hbone {} via {} host={} expect={} dst={} svc={}",
                request.authority,
                key.peer(),
                request.forwarded_host.as_deref().unwrap_or("-"),
                expected.join(","),
                peers.1.workload,
                service.as_ref().map_or("-", |s| s.name.as_str()),
            )
        }
        Route::Passthrough { dst, peers } => format!(
            "plain {dst} dst={} principal={}",
            if peers.1.workload.is_empty() {
                "-"
            } else {
                &peers.1.workload
            },
            if peers.1.principal.is_empty() {
                "-"
            } else {
                &peers.1.principal
            },
        ),
        Route::PassthroughHost { host, port, .. } => format!("plain-host {host}:{port}"),
        Route::Refuse { reason } => format!("refuse {reason}"),
    }
}

#[test]
fn routes_as_a_table() {
    let (state, router) = (state(), router());
    let src: SocketAddr = "10.0.1.1:40000".parse().unwrap();
    let cases = [
        (
            "an enrolled pod: HBONE to its node's 15008, its identity only",
            "10.0.2.1:8080",
            "hbone 10.0.2.1:8080 via 10.0.2.1:15008 host=- expect=server dst=b1 svc=-",
        ),
        (
            "the service VIP: an endpoint's target port, the service host and its SANs",
            "10.96.0.1:80",
            "hbone 10.0.2.1:8080 via 10.0.2.1:15008 host=echo.demo.svc.cluster.local expect=echo-san,server dst=b1 svc=echo",
        ),
        (
            "a pod that is not enrolled: plaintext, named but without a principal",
            "10.0.2.2:9000",
            "plain 10.0.2.2:9000 dst=b2 principal=-",
        ),
        (
            "an address nobody has: plaintext, unnamed",
            "192.0.2.9:443",
            "plain 192.0.2.9:443 dst=- principal=-",
        ),
        (
            "the service on a port it does not have",
            "10.96.0.1:81",
            "refuse service has no such port",
        ),
        (
            "the proxy's own port on the source's address: a loop",
            "10.0.1.1:15001",
            "refuse destination is the proxy itself",
        ),
    ];
    for (name, dst, want) in cases {
        let route = router.decide(&state, src, dst.parse().unwrap(), DICE);
        assert_eq!(summary(&route), want, "{name}");
    }
}

#[test]
fn the_connect_request_carries_the_source_and_the_dice() {
    let src: SocketAddr = "10.0.1.1:40000".parse().unwrap();
    let vip = "10.96.0.1:80".parse().unwrap();
    let route = router().decide(&state(), src, vip, DICE);
    // Pure: the same inputs decide the same route.
    assert_eq!(route, router().decide(&state(), src, vip, DICE));
    let Route::Hbone { request, peers, .. } = route else {
        panic!("expected HBONE");
    };
    assert_eq!(request.forwarded_for, Some(src));
    assert_eq!(
        request.traceparent,
        Some(DICE.trace),
        "the caller's randomness"
    );
    let mut baggage = Baggage::default();
    baggage
        .push("k8s.cluster.name", "c1")
        .push("k8s.namespace.name", "demo")
        .push("k8s.pod.name", "a1-pod");
    assert_eq!(request.baggage, baggage);
    // The source as metrics name it: its workload entry (name, cluster), its identity.
    assert_eq!(peers.0.workload, "a1");
    assert_eq!(peers.0.cluster, "c1");
    assert_eq!(
        peers.0.principal,
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(
        peers.1.principal,
        "spiffe://cluster.local/ns/demo/sa/server"
    );
}

/// A connection's task is its `handle` future for the connection's whole life: the dial's
/// state (TLS and HTTP/2 handshakes, 13 KB inline before it was boxed) must not stay in it, nor
/// the labels' 23 strings in the record (shared per label set), nor any part twice (3,376
/// bytes before the relay's parts were each stored once; 1,808 after; 1,680 once `handle` was
/// the task itself and its arguments were held once; ~1,050 once the relay's directions were
/// hand-written futures; ~890 once the dial was boxed before the task's block and the pod's
/// removal was a `Notify` wait; 880 until the relay's directions owned their halves and
/// packed their fields; 760 until the relay was a future written out and an HTTP/2 stream's
/// received bytes stayed with the stream while written). tokio allocates the task as one cell:
/// a 32-byte header, the scheduler and id (16), this future and its tag (8), a 48-byte trailer,
/// rounded up to 128 bytes. Up to 664 bytes here, that is 768, one of jemalloc's size classes;
/// 8 bytes more and it takes the 896 class.
#[test]
fn a_live_connection_holds_only_the_relays_state() {
    let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let handle = future_size(move |(o, s): (Arc<Outbound>, TcpStream)| o.handle(s, a, a));
    assert!(
        handle <= 664,
        "the outbound handle future is {handle} bytes: its task no longer fits 768 bytes"
    );
    let record = std::mem::size_of::<crate::metrics::ConnectionRecord>();
    assert!(record <= 256, "a connection record is {record} bytes");
}

/// Every connection's routing is boxed at the size of its largest state, whichever route it
/// takes, and a connection storm allocates one per connection at once: the rare dials (a new
/// pooled connection's TCP, TLS and HTTP/2 handshakes, ~9 KiB; double HBONE's inner ones,
/// ~10 KiB) are boxed on their own, so a connection that takes a pooled stream (most of
/// them) allocates under a page. A plaintext relay is a task of its own, sized for the relay,
/// rather than running inside that box for the connection's life.
#[test]
fn routing_is_boxed_without_the_dials_and_plaintext_relays_apart() {
    let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let routing =
        future_size(move |(o, s): (Arc<Outbound>, TcpStream)| o.route_and_connect(s, a, a));
    assert!(
        routing <= 4096,
        "the routing future is {routing} bytes: a dial's state is in it again"
    );
    let plain = future_size(
        move |(o, s, r): (Arc<Outbound>, TcpStream, ConnectionRecord)| o.plaintext(s, a, r),
    );
    // With tokio's 104 bytes around it, 1,536 bytes (a jemalloc class): was 768 for the
    // connection's task plus the routing's box (~13 KiB) for the connection's life.
    assert!(
        plain <= 1432,
        "a plaintext relay's future is {plain} bytes: its task no longer fits 1,536 bytes"
    );
}

/// The size of the future `make` returns, read from its type: `make` is never called.
fn future_size<Args, Fut: std::future::Future>(_make: impl FnOnce(Args) -> Fut) -> usize {
    std::mem::size_of::<Fut>()
}

fn guard(strict: bool) -> (Arc<crate::state::SharedState>, ClusterGuard) {
    let state = Arc::new(crate::state::SharedState::default());
    let guard = ClusterGuard {
        state: state.clone(),
        cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        hold: Duration::from_millis(200),
        strict,
    };
    (state, guard)
}

#[tokio::test]
async fn an_unknown_pod_address_is_held_until_known_and_refused_when_strict() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let (state, strict) = guard(true);
    // Outside the pod ranges: nothing to hold.
    assert!(strict.admit(ip("192.0.2.7")).await);
    // Never known: refused once the hold is over.
    let started = std::time::Instant::now();
    assert!(!strict.admit(ip("10.244.1.9")).await);
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Known while held: let through as soon as discovery has it.
    let later = state.clone();
    let known = tokio::spawn(async move { strict.admit(ip("10.244.1.10")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    later.write(|s| {
        s.upsert_workload(crate::state::tests::workload(
            "p",
            "10.244.1.10",
            "sa",
            Protocol::Hbone,
        ))
    });
    assert!(known.await.unwrap());
    // Not strict: held, then passed through.
    let (_, permissive) = guard(false);
    assert!(permissive.admit(ip("10.244.1.9")).await);
}

/// Every connection to `to` in plaintext: to its address, or by name (`localhost` and its
/// port, as a hostname workload's).
#[derive(Debug)]
struct PlainTo {
    to: SocketAddr,
    by_name: bool,
}

impl Router for PlainTo {
    fn route(&self, _: SocketAddr, _: SocketAddr) -> Route {
        let peers = (Peer::default(), Peer::default());
        match self.by_name {
            false => Route::Passthrough {
                dst: self.to,
                peers,
            },
            true => Route::PassthroughHost {
                host: "localhost".into(),
                port: self.to.port(),
                peers,
            },
        }
    }
}

/// A plaintext relay is a task of its own with a drain guard of its own: a drain waits for it
/// while its connection is open (the connection's task, whose guard it replaced, has ended),
/// and it lets go once the connection closes. Both plaintext routes: to an address, and to a
/// name resolved as the connection is made.
#[tokio::test]
async fn a_plaintext_relay_holds_the_drain_until_its_connection_ends() {
    for by_name in [false, true] {
        plaintext_relay_holds_the_drain(by_name).await;
    }
}

async fn plaintext_relay_holds_the_drain(by_name: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let sockets: Arc<dyn SocketFactory> = Arc::new(crate::netns::DefaultSocketFactory);
    let ca = crate::identity::ca::BuiltinCa::generate(std::time::SystemTime::now()).unwrap();
    let certs = Arc::new(crate::identity::CertificateManager::new(Arc::new(ca)));
    let settings = TunnelSettings::default();
    let client = Arc::new(HboneClient::new(certs, sockets.clone(), settings.clone()));
    let drain = Drain::default();
    let outbound = Arc::new(Outbound::new(
        client,
        sockets,
        Arc::new(PlainTo { to, by_name }),
        None,
        settings,
        None,
        Some(drain.clone()),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let entry = listener.local_addr().unwrap();
    tokio::spawn(outbound.serve(listener, move |_| Some(to)));

    let mut app = TcpStream::connect(entry).await.unwrap();
    app.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(
        drain.active(),
        1,
        "the live plaintext relay holds one guard (by name: {by_name})"
    );
    drain.start();
    assert!(
        !drain.wait(Duration::from_millis(200)).await,
        "a drain finished while a plaintext relay was live"
    );
    drop(app);
    assert!(
        drain.wait(Duration::from_secs(5)).await,
        "the relay's guard outlived its connection"
    );
}

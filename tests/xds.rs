//! The delta ADS client against a scripted control plane (a real tonic server on loopback).

#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hboned::proto::istio::security::Authorization;
use hboned::proto::istio::workload as pb;
use hboned::state::SharedState;
use hboned::xds::convert::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, authorization_resource, service_resource, workload_resource,
};
use hboned::xds::{XdsClient, XdsSettings};
use support::fake_ads::{AdsStream, FakeAds};
use support::{eventually, within};

/// The node id a ztunnel in a pod announces (and hboned in a pod, config/ztunnel.rs).
const NODE_ID: &str = "ztunnel~10.0.0.5~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local";

fn settings(addr: SocketAddr, on_demand: bool, token: Option<std::path::PathBuf>) -> XdsSettings {
    XdsSettings {
        address: format!("http://{addr}"),
        root_ca: None,
        token_file: token,
        cluster_id: "c1".into(),
        node_id: NODE_ID.into(),
        node_metadata: [("NAMESPACE".to_string(), "istio-system".to_string())].into(),
        trust_domain: "cluster.local".into(),
        network: String::new(),
        on_demand,
        on_demand_timeout: Duration::from_millis(1500),
    }
}

fn workload(uid: &str, ip: [u8; 4]) -> pb::Workload {
    pb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "test".into(),
        service_account: "server".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn knows(state: &SharedState, addr: &str) -> bool {
    state.read().knows(ip(addr))
}

/// An outbound listener on 127.0.0.1 for a pod "client" at 127.0.0.1, routing from `state`
/// (looking unknown addresses up through `resolver`), every connection taken as headed to
/// `dst`; returns where apps connect.
async fn serve_outbound(
    state: Arc<SharedState>,
    resolver: Option<Arc<XdsClient>>,
    certs: Arc<hboned::identity::CertificateManager>,
    dst: SocketAddr,
) -> SocketAddr {
    use hboned::netns::{DefaultSocketFactory, SocketFactory};
    use hboned::proxy::{HboneClient, Outbound, StateRouter, TunnelSettings};
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let router = Arc::new(StateRouter::new(
        state,
        hboned::identity::Identity::new("cluster.local", "test", "client")
            .unwrap()
            .into(),
        "client",
        vec![ip("127.0.0.1")],
        "c1",
    ));
    let client = Arc::new(HboneClient::new(
        certs,
        sockets.clone(),
        TunnelSettings::default(),
    ));
    let resolver = resolver.map(|r| r as Arc<dyn hboned::xds::Resolver>);
    let outbound = Arc::new(Outbound::new(
        client,
        sockets,
        router,
        resolver,
        TunnelSettings::default(),
        None,
        None,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(outbound.serve(listener, move |_| Some(dst)));
    addr
}

/// Starts a client against `fake` and reads its two initial requests.
async fn connect(
    fake: &mut FakeAds,
    settings: XdsSettings,
) -> (
    Arc<XdsClient>,
    Arc<SharedState>,
    AdsStream,
    tokio::task::JoinHandle<()>,
) {
    let state = Arc::new(SharedState::default());
    let client = XdsClient::new(settings, state.clone());
    let task = tokio::spawn(client.clone().run());
    let mut stream = fake.accept().await;
    let first = stream.next().await;
    let second = stream.next().await;
    assert_eq!(
        (first.type_url.as_str(), second.type_url.as_str()),
        (ADDRESS_TYPE, AUTHORIZATION_TYPE)
    );
    (client, state, stream, task)
}

async fn expect_ack(stream: &mut AdsStream, nonce: &str) {
    let ack = stream.next().await;
    assert_eq!(ack.response_nonce, nonce);
    assert!(
        ack.error_detail.is_none(),
        "unexpected NACK: {:?}",
        ack.error_detail
    );
}

#[tokio::test]
async fn initial_sync_update_removal_and_readiness() {
    let mut fake = FakeAds::start("127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let state = Arc::new(SharedState::default());
    let client = XdsClient::new(settings(fake.addr, false, Some(token)), state.clone());
    let _task = tokio::spawn(client.clone().run());
    let mut s = fake.accept().await;
    assert_eq!(s.metadata.get("authorization").unwrap(), "Bearer s3cret");
    assert_eq!(s.metadata.get("clusterid").unwrap(), "c1");
    let first = s.next().await;
    assert_eq!(first.type_url, ADDRESS_TYPE);
    assert_eq!(first.resource_names_subscribe, ["*"]);
    let node = first.node.unwrap();
    assert_eq!(node.id, NODE_ID);
    support::fake_ads::istiod_accepts(&node).unwrap();
    assert!(node.metadata.unwrap().fields.contains_key("CLUSTER_ID"));
    assert_eq!(s.next().await.type_url, AUTHORIZATION_TYPE);
    let mut ready = client.ready();
    assert!(!*ready.borrow());

    let svc = pb::Service {
        name: "web".into(),
        namespace: "test".into(),
        hostname: "web.test.svc".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
            length: None,
        }],
        ..Default::default()
    };
    s.send(
        ADDRESS_TYPE,
        "a1",
        vec![
            workload_resource("w1", "1", workload("w1", [10, 0, 0, 1])),
            workload_resource("w2", "1", workload("w2", [10, 0, 0, 2])),
            service_resource("test/web.test.svc", "1", svc),
        ],
        &[],
    );
    expect_ack(&mut s, "a1").await;
    assert!(knows(&state, "10.0.0.1") && knows(&state, "10.0.0.2") && knows(&state, "10.96.0.1"));
    assert!(!*ready.borrow(), "not ready before the policies arrived");
    let policy = Authorization {
        name: "p".into(),
        namespace: "test".into(),
        ..Default::default()
    };
    s.send(
        AUTHORIZATION_TYPE,
        "p1",
        vec![authorization_resource("test/p", "1", policy)],
        &[],
    );
    expect_ack(&mut s, "p1").await;
    within(5, ready.wait_for(|r| *r)).await.unwrap();
    assert!(state.read().policy("test/p").is_some());

    // Update: w1 moves.
    s.send(
        ADDRESS_TYPE,
        "a2",
        vec![workload_resource("w1", "2", workload("w1", [10, 0, 0, 11]))],
        &[],
    );
    expect_ack(&mut s, "a2").await;
    assert!(!knows(&state, "10.0.0.1") && knows(&state, "10.0.0.11"));
    // Removal.
    s.send(ADDRESS_TYPE, "a3", vec![], &["w2"]);
    expect_ack(&mut s, "a3").await;
    assert!(!knows(&state, "10.0.0.2"));
}

/// Ready once every type had a response applied and ACKed; a NACKed one does not count
/// (ztunnel's xds/client.rs unblocks readiness on ACKs only).
#[tokio::test]
async fn readiness_waits_for_an_acknowledged_response_of_each_type() {
    let mut fake = FakeAds::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = fake.addr;
    let (client, _state, mut s, _task) = connect(&mut fake, settings(addr, false, None)).await;
    let ready = client.ready();
    let mut bad = workload("bad", [10, 0, 0, 1]);
    bad.addresses = vec![vec![1, 2, 3]];
    s.send(
        ADDRESS_TYPE,
        "a1",
        vec![workload_resource("bad", "1", bad)],
        &[],
    );
    let nack = s.next().await;
    assert!(nack.error_detail.is_some(), "the bad address is NACKed");
    s.send(AUTHORIZATION_TYPE, "p1", vec![], &[]);
    expect_ack(&mut s, "p1").await;
    assert!(!*ready.borrow(), "no address response was ACKed yet");
    s.send(
        ADDRESS_TYPE,
        "a2",
        vec![workload_resource("w1", "1", workload("w1", [10, 0, 0, 1]))],
        &[],
    );
    expect_ack(&mut s, "a2").await;
    let mut ready = ready;
    within(5, ready.wait_for(|r| *r)).await.unwrap();
}

/// istiod sends a push as one response; a large cluster's is well past tonic's default 4 MiB
/// limit (ztunnel accepts 200 MiB).
#[tokio::test]
async fn a_push_of_more_than_4_mib_applies() {
    let mut fake = FakeAds::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = fake.addr;
    let (client, state, mut s, _task) = connect(&mut fake, settings(addr, false, None)).await;
    let padding = "x".repeat(1000);
    let resources: Vec<_> = (0..5500u32)
        .map(|i| {
            let uid = format!("w{i}");
            let mut w = workload(&uid, [10, 1, (i / 250) as u8, (i % 250) as u8 + 1]);
            w.canonical_name = padding.clone();
            workload_resource(&uid, "1", w)
        })
        .collect();
    let size: usize = resources
        .iter()
        .map(|r| r.resource.as_ref().unwrap().value.len())
        .sum();
    assert!(size > 5 * 1024 * 1024, "{size} bytes");
    s.send(ADDRESS_TYPE, "big", resources, &[]);
    expect_ack(&mut s, "big").await;
    assert!(knows(&state, "10.1.21.250"));
    assert_eq!(client.rejected_total(), 0);
}

#[tokio::test]
async fn malformed_resources_are_nacked_while_the_rest_applies() {
    let mut fake = FakeAds::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = fake.addr;
    let (client, state, mut s, _task) = connect(&mut fake, settings(addr, false, None)).await;
    s.send(
        ADDRESS_TYPE,
        "a1",
        vec![workload_resource("w1", "1", workload("w1", [10, 0, 0, 1]))],
        &[],
    );
    expect_ack(&mut s, "a1").await;

    let mut bad_ip = workload("w1", [10, 0, 0, 1]);
    bad_ip.addresses = vec![vec![10, 0, 0]];
    let mut bad_identity = workload("w3", [10, 0, 0, 3]);
    bad_identity.namespace = "not a namespace".into();
    s.send(
        ADDRESS_TYPE,
        "a2",
        vec![
            workload_resource("w1", "2", bad_ip),
            workload_resource("w3", "1", bad_identity),
            workload_resource("w4", "1", workload("w4", [10, 0, 0, 4])),
        ],
        &[],
    );
    let nack = s.next().await;
    assert_eq!(nack.response_nonce, "a2");
    let detail = nack.error_detail.expect("a NACK");
    assert!(
        detail.message.contains("w1") && detail.message.contains("w3"),
        "{}",
        detail.message
    );
    assert!(knows(&state, "10.0.0.1"), "w1 keeps its last good version");
    assert!(knows(&state, "10.0.0.4"), "the good resource applied");
    assert!(!knows(&state, "10.0.0.3"));
    assert_eq!(client.rejected_total(), 2);
}

#[tokio::test]
async fn control_plane_restart_keeps_state_and_resyncs() {
    let mut fake = FakeAds::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = fake.addr;
    let (_client, state, mut s, _task) = connect(&mut fake, settings(addr, false, None)).await;
    s.send(
        ADDRESS_TYPE,
        "a1",
        vec![workload_resource("w1", "7", workload("w1", [10, 0, 0, 1]))],
        &[],
    );
    expect_ack(&mut s, "a1").await;

    drop(s);
    drop(fake);
    // While the control plane is gone, the last state keeps serving.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(knows(&state, "10.0.0.1"));

    let mut fake = FakeAds::start(addr).await;
    let mut s = fake.accept().await;
    let first = s.next().await;
    assert_eq!(first.type_url, ADDRESS_TYPE);
    assert_eq!(
        first
            .initial_resource_versions
            .get("w1")
            .map(String::as_str),
        Some("7")
    );
    assert_eq!(s.next().await.type_url, AUTHORIZATION_TYPE);
    s.send(
        ADDRESS_TYPE,
        "b1",
        vec![workload_resource("w2", "1", workload("w2", [10, 0, 0, 2]))],
        &[],
    );
    expect_ack(&mut s, "b1").await;
    assert!(knows(&state, "10.0.0.1") && knows(&state, "10.0.0.2"));
}

#[tokio::test]
async fn on_demand_hit_miss_and_timeout() {
    let mut fake = FakeAds::start("127.0.0.1:0".parse().unwrap()).await;
    let state = Arc::new(SharedState::default());
    let client = XdsClient::new(settings(fake.addr, true, None), state.clone());
    let _task = tokio::spawn(client.clone().run());
    let mut s = fake.accept().await;
    let first = s.next().await;
    assert_eq!(first.type_url, ADDRESS_TYPE);
    // Nothing subscribed up front, spelled as ztunnel spells it (xds/client.rs): `*` subscribed
    // and unsubscribed in one request.
    assert_eq!(first.resource_names_subscribe, ["*"]);
    assert_eq!(first.resource_names_unsubscribe, ["*"]);
    let _auth = s.next().await;

    // Three concurrent misses for one IP: one subscription.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.resolve(ip("10.0.0.9")).await })
        })
        .collect();
    let sub = s.next().await;
    assert_eq!(sub.resource_names_subscribe, ["/10.0.0.9"]);
    s.send(
        ADDRESS_TYPE,
        "o1",
        vec![workload_resource("w9", "1", workload("w9", [10, 0, 0, 9]))],
        &[],
    );
    for w in waiters {
        assert!(
            within(5, w).await.unwrap(),
            "resolved once the answer arrived"
        );
    }
    expect_ack(&mut s, "o1").await;
    // A hit answers at once, with no request.
    assert!(within(1, client.resolve(ip("10.0.0.9"))).await);
    // A miss the control plane never answers gives up after the timeout.
    assert!(!within(5, client.resolve(ip("10.0.0.10"))).await);
    assert_eq!(s.next().await.resource_names_subscribe, ["/10.0.0.10"]);
    // No duplicate requests were sent for 10.0.0.9.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), s.requests.message())
            .await
            .is_err()
    );
}

/// A connection to a destination nobody knows yet is held (not one byte lost) until the control
/// plane answers, then tunneled through HBONE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_to_an_unknown_destination_is_held_then_delivered() {
    use hboned::netns::{DefaultSocketFactory, SocketFactory};
    use hboned::proxy::{InboundServer, LocalWorkload, TunnelSettings};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = support::ca();
    // The destination "pod": its app and its HBONE server on 127.0.0.7.
    let answered = Arc::new(AtomicBool::new(false));
    let seen_after_answer = Arc::new(AtomicBool::new(false));
    let (a, s2) = (answered.clone(), seen_after_answer.clone());
    let app_listener = tokio::net::TcpListener::bind("127.0.0.7:0").await.unwrap();
    let app_addr = app_listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = app_listener.accept().await.unwrap();
        s2.store(a.load(Ordering::SeqCst), Ordering::SeqCst);
        let (mut r, mut w) = sock.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let certs = Arc::new(hboned::identity::CertificateManager::new(ca.clone()));
    let server_id = hboned::identity::Identity::new("cluster.local", "test", "server").unwrap();
    let hbone_listener = sockets
        .tcp_bind("127.0.0.7:15008".parse().unwrap())
        .unwrap();
    let inbound = InboundServer::new(
        LocalWorkload {
            identity: server_id.into(),
            addresses: vec![ip("127.0.0.7")],
            preserve_source_ip: false,
            state: None,
            metrics: None,
            drain: None,
            pod: Default::default(),
        },
        certs.clone(),
        sockets.clone(),
        TunnelSettings::default(),
    );
    tokio::spawn(inbound.serve(hbone_listener));

    // The source side: empty state, on-demand xDS, outbound listener.
    let mut fake = FakeAds::start("127.0.0.1:0".parse().unwrap()).await;
    let state = Arc::new(SharedState::default());
    let xds = XdsClient::new(settings(fake.addr, true, None), state.clone());
    tokio::spawn(xds.clone().run());
    let out_addr = serve_outbound(state, Some(xds), certs, app_addr).await;

    let mut s = fake.accept().await;
    let _ = s.next().await;
    let _ = s.next().await;
    // The app connects and writes at once, before its destination is known.
    let mut app = tokio::net::TcpStream::connect(out_addr).await.unwrap();
    let data = support::pattern(3, 200_000);
    app.write_all(&data).await.unwrap();
    app.shutdown().await.unwrap();
    let sub = s.next().await;
    assert_eq!(sub.resource_names_subscribe, ["/127.0.0.7"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    answered.store(true, Ordering::SeqCst);
    s.send(
        ADDRESS_TYPE,
        "o1",
        vec![workload_resource(
            "server",
            "1",
            workload("server", [127, 0, 0, 7]),
        )],
        &[],
    );
    let mut back = Vec::new();
    within(10, app.read_to_end(&mut back)).await.unwrap();
    assert_eq!(
        back, data,
        "the held bytes arrived intact through the tunnel"
    );
    eventually(5, || seen_after_answer.load(Ordering::SeqCst)).await;
}

/// A service whose endpoint is known by name (a DNS ServiceEntry): the connection to its VIP is
/// resolved with the system resolver when made, and relayed in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostname_endpoint_is_resolved_when_the_connection_is_made() {
    let app = support::echo_app().await;
    let mut w = workload("dns", [0, 0, 0, 0]);
    w.addresses.clear();
    w.hostname = "localhost".into();
    w.tunnel_protocol = pb::TunnelProtocol::None as i32;
    w.services.insert(
        "test/ext.test.svc".into(),
        pb::PortList {
            ports: vec![pb::Port {
                service_port: 80,
                target_port: u32::from(app.addr.port()),
                app_protocol: 0,
            }],
        },
    );
    let svc = pb::Service {
        name: "ext".into(),
        namespace: "test".into(),
        hostname: "ext.test.svc".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 9],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 0,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let state = Arc::new(SharedState::default());
    state.write(|s| {
        let response = hboned::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n".into(),
            resources: vec![
                workload_resource("dns", "1", w),
                service_resource("test/ext.test.svc", "1", svc),
            ],
            ..Default::default()
        };
        let applied = hboned::xds::convert::apply_delta(
            s,
            &mut hboned::xds::convert::Tracked::default(),
            &response,
            "cluster.local",
        );
        assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
    });
    let certs = Arc::new(hboned::identity::CertificateManager::new(support::ca()));
    let vip = SocketAddr::from(([10, 96, 0, 9], 80));
    let addr = serve_outbound(state, None, certs, vip).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    support::topo::echoes(&mut s, b"through a name").await;
}

/// An https control plane is reached through TLS with the configured root; with another root
/// the connection is refused and no stream is ever opened.
#[tokio::test]
async fn tls_to_the_control_plane_uses_the_configured_root() {
    let dir = tempfile::tempdir().unwrap();
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (root, wrong_root) = (dir.path().join("root.pem"), dir.path().join("other.pem"));
    std::fs::write(&root, server.cert.pem()).unwrap();
    std::fs::write(&wrong_root, other.cert.pem()).unwrap();
    let mut fake = FakeAds::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        &server.cert.pem(),
        &server.signing_key.serialize_pem(),
    )
    .await;
    let tls_settings = |root_ca: &std::path::Path| XdsSettings {
        address: format!("https://localhost:{}", fake.addr.port()),
        root_ca: Some(root_ca.to_owned()),
        ..settings(fake.addr, false, None)
    };

    let state = Arc::new(SharedState::default());
    let wrong = XdsClient::new(tls_settings(&wrong_root), state.clone());
    let wrong_task = tokio::spawn(wrong.run());
    assert!(
        tokio::time::timeout(Duration::from_millis(800), fake.streams.recv())
            .await
            .is_err(),
        "a control plane signed by another root must not be talked to"
    );
    wrong_task.abort();

    let client = XdsClient::new(tls_settings(&root), state.clone());
    let _task = tokio::spawn(client.run());
    let mut s = fake.accept().await;
    assert_eq!(s.next().await.type_url, ADDRESS_TYPE);
    let _ = s.next().await;
    s.send(
        ADDRESS_TYPE,
        "t1",
        vec![workload_resource("w1", "1", workload("w1", [10, 0, 0, 1]))],
        &[],
    );
    expect_ack(&mut s, "t1").await;
    assert!(knows(&state, "10.0.0.1"));
}

/// The fake control plane's node check is istiod's: what hboned announces in a pod passes, the
/// node name alone (what it sent before) does not.
#[test]
fn istiod_takes_the_node_hboned_announces_in_a_pod() {
    use hboned::proto::envoy::config::core::v3::Node;
    let env = hboned::config::ztunnel::Environment::fixed(
        &[
            ("POD_NAME", "hboned-abc"),
            ("POD_NAMESPACE", "hboned"),
            ("INSTANCE_IP", "10.0.0.7"),
            ("FAKE_CA", "true"),
            ("XDS_ADDRESS", "http://127.0.0.1:15010"),
        ],
        &[],
    );
    let config = hboned::config::Config::from_ztunnel_env(&env).unwrap();
    let node = |id: &str| Node {
        id: id.into(),
        ..Default::default()
    };
    support::fake_ads::istiod_accepts(&node(&config.xds.node_id)).unwrap();
    for refused in [
        "node-a",
        "ztunnel~not-an-ip~p.ns~ns.svc.cluster.local",
        "gateway~10.0.0.7~p.ns~ns.svc.cluster.local",
        "ztunnel~10.0.0.7~p.ns",
    ] {
        assert!(
            support::fake_ads::istiod_accepts(&node(refused)).is_err(),
            "{refused}"
        );
    }
}

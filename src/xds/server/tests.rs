//! The server read back by this crate's own client: what it encodes converts back to the
//! same entries, and a proxy following it over a Unix socket ends with the agent's state.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;

use super::*;
use crate::identity::Identity;
use crate::state::balance::{LoadBalancing, Locality, Mode, Scope};
use crate::state::tests::workload;
use crate::xds::{XdsClient, XdsSettings};

fn full_workload() -> Workload {
    let mut w = workload("pod-1", "10.0.0.7", "web", Protocol::Hbone);
    w.addresses.push("fd00::7".parse().unwrap());
    w.namespace = "default".into();
    w.services.insert(
        "default/web.default.svc.cluster.local".into(),
        BTreeMap::from([(80, 8080), (443, 8443)]),
    );
    w.healthy = false;
    w.authorization_policies = vec!["default/allow-web".into()];
    w.workload_name = "web".into();
    w.canonical_name = "web".into();
    w.canonical_revision = "v2".into();
    w.cluster_id = "c1".into();
    w.locality = Locality {
        region: "r".into(),
        zone: "z".into(),
        subzone: "s".into(),
    };
    w.capacity = 3;
    w.waypoint = Some(crate::state::Gateway {
        destination: crate::state::GatewayDestination::Address {
            network: "n1".into(),
            ip: "10.96.0.99".parse().unwrap(),
        },
        port: 15008,
    });
    w
}

fn service() -> Service {
    Service {
        name: "web".into(),
        namespace: "default".into(),
        hostname: "web.default.svc.cluster.local".into(),
        vips: vec!["10.96.0.10".parse().unwrap()],
        ports: BTreeMap::from([(80, 8080), (81, 0)]),
        subject_alt_names: vec![Identity::new("cluster.local", "default", "web").unwrap()],
        load_balancing: LoadBalancing {
            preferences: vec![Scope::Zone, Scope::Node],
            mode: Mode::Failover,
            allow_unhealthy: true,
        },
        vip_ranges: Vec::new(),
        namespace_only: false,
        unsupported: None,
        waypoint: Some(waypoint_by_name()),
        weighted_waypoints: vec![(waypoint_by_name(), 7)],
        ingress_use_waypoint: true,
    }
}

fn waypoint_by_name() -> crate::state::Gateway {
    crate::state::Gateway {
        destination: crate::state::GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into(),
        },
        port: 15008,
    }
}

#[test]
fn what_is_served_reads_back_as_the_same_entries() {
    let w = full_workload();
    let back = crate::xds::convert::workload(encode_workload(&w), "other.domain").unwrap();
    assert_eq!(back, w);
    let mut plain = workload("pod-2", "10.0.0.8", "default", Protocol::Tcp);
    plain.host_network = true;
    let back = crate::xds::convert::workload(encode_workload(&plain), "cluster.local").unwrap();
    assert_eq!(back, plain);
    let s = service();
    assert_eq!(crate::xds::convert::service(encode_service(&s)).unwrap(), s);
    let mut default_lb = service();
    default_lb.load_balancing = LoadBalancing::default();
    assert!(encode_service(&default_lb).load_balancing.is_none());
}

#[test]
fn a_push_carries_only_what_changed_and_names_what_went() {
    let mut state = State::default();
    state.upsert_workload(full_workload());
    state.upsert_service(service());
    let mut has = Versions::new();
    let mut nonce = 0;
    let first = delta(
        ADDRESS_TYPE,
        &mut has,
        snapshot(&state, ADDRESS_TYPE),
        &mut nonce,
        true,
    )
    .unwrap();
    assert_eq!(first.resources.len(), 2);
    assert!(first.removed_resources.is_empty());
    // Nothing changed: nothing to send.
    assert!(
        delta(
            ADDRESS_TYPE,
            &mut has,
            snapshot(&state, ADDRESS_TYPE),
            &mut nonce,
            false
        )
        .is_none()
    );
    let mut changed = full_workload();
    changed.healthy = true;
    state.upsert_workload(changed);
    state.remove_service("default/web.default.svc.cluster.local");
    let next = delta(
        ADDRESS_TYPE,
        &mut has,
        snapshot(&state, ADDRESS_TYPE),
        &mut nonce,
        false,
    )
    .unwrap();
    let names: Vec<_> = next.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["pod-1"]);
    assert_eq!(
        next.removed_resources,
        ["default/web.default.svc.cluster.local"]
    );
    assert_ne!(next.nonce, first.nonce);
    // A client that reconnects with versions it has is sent only what differs; a name it has
    // that is gone is removed.
    let mut reconnected: Versions = has.clone();
    reconnected.insert("gone-pod".into(), "1".into());
    let again = delta(
        ADDRESS_TYPE,
        &mut reconnected,
        snapshot(&state, ADDRESS_TYPE),
        &mut nonce,
        true,
    )
    .unwrap();
    assert!(again.resources.is_empty());
    assert_eq!(again.removed_resources, ["gone-pod"]);
    // Authorization is answered, with nothing.
    assert!(snapshot(&state, AUTHORIZATION_TYPE).is_empty());
}

fn client(path: &Path, proxy: Arc<SharedState>) -> Arc<XdsClient> {
    XdsClient::new(
        XdsSettings {
            address: format!("unix://{}", path.display()),
            root_ca: None,
            token_file: None,
            cluster_id: "c1".into(),
            node_id: "node-a".into(),
            node_metadata: BTreeMap::new(),
            trust_domain: "cluster.local".into(),
            network: String::new(),
            on_demand: false,
            on_demand_timeout: Duration::from_secs(1),
        },
        proxy,
    )
}

async fn until(what: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !what() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_gated_server_answers_from_its_cache_then_moves_the_proxy_to_the_live_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xds.sock");
    // The agent's last state, written and read back as a restarted agent does.
    let mut last = State::default();
    last.upsert_workload(full_workload());
    last.upsert_service(service());
    let cache = dir.path().join("discovery.pb");
    write_cache(&last, &cache).unwrap();
    let cached = read_cache(&cache, "cluster.local").unwrap();
    assert_eq!(
        cached.workload("pod-1").map(|w| (**w).clone()),
        Some(full_workload())
    );
    // Not listed yet: the live state is empty, and must not be what the proxy is told.
    let live = Arc::new(SharedState::default());
    let (synced_tx, synced) = watch::channel(false);
    let server =
        XdsServer::new(live.clone()).gated(synced, Some(Arc::new(SharedState::new(cached))));
    let serving = tokio::spawn(server.serve_unix(path.clone()));
    let proxy = Arc::new(SharedState::default());
    let c = client(&path, proxy.clone());
    let mut ready = c.ready();
    let task = tokio::spawn(c.clone().run());
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    assert!(proxy.read().workload("pod-1").is_some());
    // Listed: pod-1 went meanwhile, pod-3 came.
    live.write(|s| s.upsert_workload(workload("pod-3", "10.0.0.9", "db", Protocol::Hbone)));
    synced_tx.send_replace(true);
    until(|| {
        let s = proxy.read();
        s.workload("pod-1").is_none() && s.workload("pod-3").is_some()
    })
    .await;
    task.abort();
    serving.abort();
}

#[tokio::test]
async fn a_gated_server_without_a_cache_answers_only_once_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xds.sock");
    let live = Arc::new(SharedState::default());
    let (synced_tx, synced) = watch::channel(false);
    let serving = tokio::spawn(
        XdsServer::new(live.clone())
            .gated(synced, None)
            .serve_unix(path.clone()),
    );
    let proxy = Arc::new(SharedState::default());
    proxy.write(|s| s.upsert_workload(workload("kept", "10.0.0.5", "a", Protocol::Hbone)));
    let c = client(&path, proxy.clone());
    let ready = c.ready();
    let task = tokio::spawn(c.clone().run());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!*ready.borrow(), "answered before listing");
    assert!(proxy.read().workload("kept").is_some());
    live.write(|s| s.upsert_workload(workload("pod-3", "10.0.0.9", "db", Protocol::Hbone)));
    synced_tx.send_replace(true);
    until(|| proxy.read().workload("pod-3").is_some()).await;
    task.abort();
    serving.abort();
}

#[tokio::test]
async fn a_proxy_following_the_socket_ends_with_the_agents_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xds.sock");
    let agent = Arc::new(SharedState::default());
    agent.write(|s| {
        s.upsert_workload(full_workload());
        s.upsert_service(service());
    });
    let server = tokio::spawn(XdsServer::new(agent.clone()).serve_unix(path.clone()));
    let proxy = Arc::new(SharedState::default());
    let client = client(&path, proxy.clone());
    let mut ready = client.ready();
    let task = tokio::spawn(client.clone().run());
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        proxy.read().workload("pod-1").map(|w| (**w).clone()),
        Some(full_workload())
    );
    assert!(
        proxy
            .read()
            .service_by_vip("10.96.0.10".parse().unwrap())
            .is_some()
    );

    agent.write(|s| {
        s.remove_workload("pod-1");
        s.upsert_workload(workload("pod-3", "10.0.0.9", "db", Protocol::Hbone));
    });
    let followed = async {
        loop {
            {
                let s = proxy.read();
                if s.workload("pod-1").is_none() && s.workload("pod-3").is_some() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), followed)
        .await
        .unwrap();
    task.abort();
    server.abort();
}

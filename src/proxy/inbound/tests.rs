//! Where a hostname CONNECT (double HBONE's inner request) is delivered in the local workload,
//! as ztunnel's find_inbound_upstream resolves `SvcHostname`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::LocalWorkload;
use crate::identity::Identity;
use crate::state::tests::workload;
use crate::state::{Protocol, Service, SharedState, State};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const ECHO: &str = "echo.demo.svc.cluster.local";

/// b1 (10.0.2.1) is an endpoint of demo's echo (80 → 7000 its own mapping; 81 → the service's
/// 8081; 82 → 15008, a proxy port); `other`'s service of the same hostname it is not.
fn local() -> LocalWorkload {
    let mut state = State::default();
    state.upsert_service(Service::new(
        "echo",
        "demo",
        ECHO,
        vec![ip("10.96.0.1")],
        BTreeMap::from([(80, 0), (81, 8081), (82, 15008)]),
    ));
    state.upsert_service(Service::new(
        "echo",
        "other",
        ECHO,
        vec![ip("10.96.0.2")],
        BTreeMap::from([(80, 9000)]),
    ));
    let mut b1 = workload("b1", "10.0.2.1", "server", Protocol::Hbone);
    b1.services.insert(
        format!("demo/{ECHO}"),
        BTreeMap::from([(80, 7000), (82, 15008)]),
    );
    state.upsert_workload(b1);
    LocalWorkload {
        identity: Identity::new("cluster.local", "demo", "server")
            .unwrap()
            .into(),
        addresses: vec![ip("10.0.2.1")],
        preserve_source_ip: false,
        state: Some(Arc::new(SharedState::new(state))),
        metrics: None,
        drain: None,
        pod: Default::default(),
    }
}

#[test]
fn a_hostname_connect_goes_to_the_workloads_target_port_for_that_service() {
    let w = local();
    let at = |host: &str, port: u16| w.service_target(host, port, ip("10.0.2.1"));
    assert_eq!(at(ECHO, 80), Some(SocketAddr::from(([10, 0, 2, 1], 7000))));
    assert_eq!(
        at(ECHO, 81),
        Some(SocketAddr::from(([10, 0, 2, 1], 8081))),
        "the service's mapping when the workload has none"
    );
    // Refused (400): a port neither maps, a proxy port, a hostname nobody has, an address that
    // is no workload here.
    assert_eq!(at(ECHO, 9999), None);
    assert_eq!(at(ECHO, 82), None);
    assert_eq!(at("nope.demo.svc.cluster.local", 80), None);
    assert_eq!(w.service_target(ECHO, 80, ip("10.0.2.9")), None);
    // Without discovery, nothing to resolve against.
    let blind = LocalWorkload {
        state: None,
        ..w.clone()
    };
    assert_eq!(blind.service_target(ECHO, 80, ip("10.0.2.1")), None);
}

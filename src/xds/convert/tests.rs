//! Table tests of conversion and of applying delta responses.

use super::*;
use crate::proto::istio::security::{Address as Net, Clause, Match, Rule};

fn wl(uid: &str, ip: &[u8]) -> pb::Workload {
    pb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<crate::proto::envoy::service::discovery::v3::Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn workload_fields_convert() {
    let mut w = wl("u1", &[10, 0, 0, 1]);
    w.addresses
        .push(vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    w.services.insert(
        "ns/web.ns.svc".into(),
        pb::PortList {
            ports: vec![
                pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                },
                pb::Port {
                    service_port: 443,
                    target_port: 0,
                    app_protocol: 0,
                },
            ],
        },
    );
    w.status = pb::WorkloadStatus::Unhealthy as i32;
    let c = workload(w, "cluster.local").unwrap();
    assert_eq!(c.identity.to_string(), "spiffe://cluster.local/ns/ns/sa/sa");
    assert_eq!(
        c.addresses,
        vec![
            "10.0.0.1".parse::<IpAddr>().unwrap(),
            "fd00::1".parse().unwrap()
        ]
    );
    assert_eq!(c.protocol, Protocol::Hbone);
    assert_eq!(
        c.services["ns/web.ns.svc"],
        BTreeMap::from([(80, 8080), (443, 443)])
    );
    assert!(!c.healthy);
}

#[test]
fn bad_workloads_are_rejected_with_a_reason() {
    type Change = fn(&mut pb::Workload);
    let cases: &[(&str, Change, ConvertError)] = &[
        ("no uid", |w| w.uid.clear(), ConvertError::NoUid),
        (
            "3-byte IP",
            |w| w.addresses = vec![vec![1, 2, 3]],
            ConvertError::BadIp(3),
        ),
        (
            "port too big",
            |w| {
                w.services.insert(
                    "a/b".into(),
                    pb::PortList {
                        ports: vec![pb::Port {
                            service_port: 70000,
                            target_port: 1,
                            app_protocol: 0,
                        }],
                    },
                );
            },
            ConvertError::BadPort(70000),
        ),
    ];
    for (name, change, want) in cases {
        let mut w = wl("u", &[1, 2, 3, 4]);
        change(&mut w);
        assert_eq!(workload(w, "td").unwrap_err(), *want, "{name}");
    }
    let mut w = wl("u", &[1, 2, 3, 4]);
    w.namespace = "bad ns".into();
    assert!(matches!(workload(w, "td"), Err(ConvertError::Identity(_))));
}

#[test]
fn tcp_and_unknown_protocols_are_not_tunneled() {
    for proto in [pb::TunnelProtocol::None as i32, 42] {
        let mut w = wl("u", &[1, 2, 3, 4]);
        w.tunnel_protocol = proto;
        assert_eq!(workload(w, "td").unwrap().protocol, Protocol::Tcp);
    }
}

#[test]
fn service_converts_and_rejects_bad_sans() {
    let s = pb::Service {
        name: "web".into(),
        namespace: "ns".into(),
        hostname: "web.ns.svc".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        subject_alt_names: vec!["spiffe://td/ns/ns/sa/web".into()],
    };
    let c = service(s.clone()).unwrap();
    assert_eq!(c.key(), "ns/web.ns.svc");
    assert_eq!(c.ports, BTreeMap::from([(80, 8080)]));
    let mut bad = s;
    bad.subject_alt_names = vec!["not-spiffe".into()];
    assert!(matches!(service(bad), Err(ConvertError::Identity(_))));
}

#[test]
fn policy_addresses_are_validated() {
    let policy = |net: Net| Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    source_ips: vec![net],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    assert!(
        authorization(policy(Net {
            address: vec![10, 0, 0, 0],
            length: 8
        }))
        .is_ok()
    );
    assert!(matches!(
        authorization(policy(Net {
            address: vec![10, 0, 0, 0],
            length: 33
        })),
        Err(ConvertError::BadPrefix { .. })
    ));
    assert!(matches!(
        authorization(policy(Net {
            address: vec![10],
            length: 8
        })),
        Err(ConvertError::BadIp(1))
    ));
    assert_eq!(
        authorization(Authorization::default()).unwrap_err(),
        ConvertError::NoName
    );
}

#[test]
fn delta_applies_good_resources_and_nacks_bad_ones() {
    let mut state = State::default();
    let mut tracked = Tracked::default();
    let r = response(
        ADDRESS_TYPE,
        "n1",
        vec![
            workload_resource("good", "1", wl("good", &[10, 0, 0, 1])),
            workload_resource("u-bad", "1", wl("u-bad", &[10, 0, 0, 2])),
        ],
        &[],
    );
    let applied = apply_delta(&mut state, &mut tracked, &r, "td");
    assert_eq!((applied.upserted, applied.rejected.len()), (2, 0));
    assert_eq!(applied.ack.response_nonce, "n1");
    assert!(applied.ack.error_detail.is_none());

    // A bad update to "u-bad" and a bad new identity: both NACKed, the good one still applies,
    // and "u-bad" keeps its last good version.
    let mut bad_identity = wl("ident", &[10, 0, 0, 3]);
    bad_identity.service_account = "no spaces allowed".into();
    let r = response(
        ADDRESS_TYPE,
        "n2",
        vec![
            workload_resource("u-bad", "2", wl("u-bad", &[1, 2, 3])),
            workload_resource("ident", "1", bad_identity),
            workload_resource("new", "1", wl("new", &[10, 0, 0, 4])),
        ],
        &[],
    );
    let applied = apply_delta(&mut state, &mut tracked, &r, "td");
    assert_eq!(applied.upserted, 1);
    let detail = applied.ack.error_detail.expect("a NACK");
    assert!(
        detail.message.contains("u-bad") && detail.message.contains("ident"),
        "{}",
        detail.message
    );
    assert_eq!(
        state.workload("u-bad").unwrap().addresses,
        vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
    );
    assert!(state.workload("new").is_some() && state.workload("ident").is_none());
    assert_eq!(tracked.versions(ADDRESS_TYPE)["u-bad"], "1");

    // Removal by resource name.
    let r = response(ADDRESS_TYPE, "n3", vec![], &["good", "never-seen"]);
    let applied = apply_delta(&mut state, &mut tracked, &r, "td");
    assert_eq!(applied.removed, 1);
    assert!(state.workload("good").is_none());
    assert!(!tracked.versions(ADDRESS_TYPE).contains_key("good"));
}

#[test]
fn wrong_or_missing_bodies_are_rejected() {
    let mut state = State::default();
    let mut tracked = Tracked::default();
    let mut wrong = workload_resource("w", "1", wl("w", &[1, 1, 1, 1]));
    if let Some(any) = wrong.resource.as_mut() {
        any.type_url = AUTHORIZATION_TYPE.into();
    }
    let mut garbage = workload_resource("g", "1", wl("g", &[1, 1, 1, 2]));
    if let Some(any) = garbage.resource.as_mut() {
        any.value = vec![0xff; 7];
    }
    let empty = crate::proto::envoy::service::discovery::v3::Resource {
        name: "e".into(),
        ..Default::default()
    };
    let r = response(ADDRESS_TYPE, "n", vec![wrong, garbage, empty], &[]);
    let applied = apply_delta(&mut state, &mut tracked, &r, "td");
    assert_eq!(applied.rejected.len(), 3, "{:?}", applied.rejected);
}

#[test]
fn services_and_policies_apply_and_remove() {
    let mut state = State::default();
    let mut tracked = Tracked::default();
    let svc = pb::Service {
        name: "web".into(),
        namespace: "ns".into(),
        hostname: "web.ns.svc".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
        }],
        ..Default::default()
    };
    apply_delta(
        &mut state,
        &mut tracked,
        &response(
            ADDRESS_TYPE,
            "a",
            vec![service_resource("ns/web.ns.svc", "1", svc)],
            &[],
        ),
        "td",
    );
    assert!(state.service_by_vip("10.96.0.1".parse().unwrap()).is_some());
    let policy = Authorization {
        name: "deny".into(),
        namespace: "ns".into(),
        ..Default::default()
    };
    apply_delta(
        &mut state,
        &mut tracked,
        &response(
            AUTHORIZATION_TYPE,
            "b",
            vec![authorization_resource("ns/deny", "1", policy)],
            &[],
        ),
        "td",
    );
    assert!(state.policy("ns/deny").is_some());
    apply_delta(
        &mut state,
        &mut tracked,
        &response(AUTHORIZATION_TYPE, "c", vec![], &["ns/deny"]),
        "td",
    );
    assert!(state.policy("ns/deny").is_none());
    apply_delta(
        &mut state,
        &mut tracked,
        &response(ADDRESS_TYPE, "d", vec![], &["ns/web.ns.svc"]),
        "td",
    );
    assert!(state.service_by_vip("10.96.0.1".parse().unwrap()).is_none());
}

//! Table tests of conversion and of applying delta responses.

use super::*;
use crate::authz;
use crate::proto::istio::security::{Address as Net, Group, Match, Rules};

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
    w.workload_name = "web".into();
    w.canonical_name = "web-app".into();
    w.canonical_revision = "v1".into();
    w.cluster_id = "c1".into();
    let c = workload(w, "cluster.local").unwrap();
    // What ztunnel's metric labels name a workload by.
    let peer = crate::metrics::Peer::of(&c, None);
    assert_eq!(
        (
            peer.workload.as_str(),
            peer.canonical_service.as_str(),
            peer.canonical_revision.as_str(),
            peer.cluster.as_str()
        ),
        ("web", "web-app", "v1", "c1")
    );
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

/// NONE is plain TCP; a protocol this proxy does not speak is refused (NACK), never guessed
/// as plaintext.
#[test]
fn none_is_plain_tcp_and_unknown_protocols_are_refused() {
    let mut w = wl("u", &[1, 2, 3, 4]);
    w.tunnel_protocol = pb::TunnelProtocol::None as i32;
    assert_eq!(workload(w, "td").unwrap().protocol, Protocol::Tcp);
    let mut w = wl("u", &[1, 2, 3, 4]);
    w.tunnel_protocol = 42;
    assert!(matches!(
        workload(w, "td"),
        Err(ConvertError::UnknownTunnel(42))
    ));
}

/// A hostNetwork workload shares its node's address: kept by uid, never found by address.
/// Every field istiod may set is read: what hboned cannot honour marks the workload refused
/// (its traffic is refused), the rest is kept or, like ztunnel, ignored; an enum value nobody
/// defined is a NACK.
#[test]
fn waypoints_sidecars_and_application_tunnels_are_read() {
    use crate::state::Unsupported;
    let gateway = || pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: "ns".into(),
                hostname: "waypoint.ns.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    };
    let behind = pb::Workload {
        waypoint: Some(gateway()),
        ..wl("w1", &[10, 0, 0, 1])
    };
    let behind = workload(behind, "td").unwrap();
    assert_eq!(behind.unsupported, None);
    assert_eq!(
        behind.waypoint,
        Some(crate::state::Gateway {
            destination: crate::state::GatewayDestination::Hostname {
                namespace: "ns".into(),
                hostname: "waypoint.ns.svc.cluster.local".into(),
            },
            port: 15008,
        })
    );
    let nowhere = pb::Workload {
        waypoint: Some(pb::GatewayAddress {
            destination: None,
            hbone_mtls_port: 15008,
        }),
        ..wl("w0", &[10, 0, 0, 9])
    };
    assert!(matches!(
        workload(nowhere, "td"),
        Err(ConvertError::NoGatewayDestination("waypoint"))
    ));
    let sidecar = pb::Workload {
        tunnel_protocol: pb::TunnelProtocol::LegacyIstioMtls as i32,
        ..wl("w2", &[10, 0, 0, 2])
    };
    let sidecar = workload(sidecar, "td").unwrap();
    assert_eq!(sidecar.unsupported, Some(Unsupported::LegacyIstioMtls));
    let proxy = pb::Workload {
        application_tunnel: Some(pb::ApplicationTunnel {
            protocol: pb::application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        }),
        native_tunnel: true,
        network_gateway: Some(gateway()),
        extensions: vec![pb::Extension {
            name: "x".into(),
            config: None,
        }],
        ..wl("w3", &[10, 0, 0, 3])
    };
    let proxy = workload(proxy, "td").unwrap();
    assert_eq!(
        (proxy.proxy_protocol, proxy.unsupported),
        (Some(15088), None)
    );
    assert!(proxy.network_gateway.is_some());
    let unknown = pb::Workload {
        application_tunnel: Some(pb::ApplicationTunnel {
            protocol: 7,
            port: 1,
        }),
        ..wl("w4", &[10, 0, 0, 4])
    };
    assert!(matches!(
        workload(unknown, "td"),
        Err(ConvertError::UnknownApplicationTunnel(7))
    ));
}

/// CIDR addresses, visibility and waypoints of a service.
#[test]
fn service_ranges_visibility_and_waypoints_are_read() {
    let base = pb::Service {
        name: "range".into(),
        namespace: "ns".into(),
        hostname: "range.example".into(),
        addresses: vec![
            pb::NetworkAddress {
                network: String::new(),
                address: vec![10, 200, 0, 0],
                length: Some(16),
            },
            pb::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 9],
                length: Some(32),
            },
        ],
        visibility: pb::service::Visibility::Namespace as i32,
        ..Default::default()
    };
    let s = service(base.clone()).unwrap();
    assert_eq!(s.vip_ranges, vec![("10.200.0.0".parse().unwrap(), 16)]);
    assert!(s.namespace_only);
    assert_eq!(s.unsupported, None);
    let at = |ip: [u8; 4]| pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: String::new(),
                address: ip.to_vec(),
                length: None,
            },
        )),
        hbone_mtls_port: 15008,
    };
    let weighted = pb::Service {
        waypoint: Some(at([10, 96, 0, 50])),
        weighted_waypoints: vec![
            pb::WeightedWaypoint {
                destination: Some(at([10, 96, 0, 51])),
                weight: 90,
            },
            pb::WeightedWaypoint {
                destination: Some(at([10, 96, 0, 52])),
                weight: 10,
            },
        ],
        ingress_use_waypoint: true,
        ..base.clone()
    };
    let weighted = service(weighted).unwrap();
    assert_eq!(weighted.unsupported, None);
    assert!(weighted.waypoint.is_some() && weighted.ingress_use_waypoint);
    assert_eq!(
        weighted
            .weighted_waypoints
            .iter()
            .map(|(g, w)| (g.destination.to_string(), *w))
            .collect::<Vec<_>>(),
        vec![
            ("/10.96.0.51".to_owned(), 90),
            ("/10.96.0.52".to_owned(), 10)
        ]
    );
    let nowhere = pb::Service {
        weighted_waypoints: vec![pb::WeightedWaypoint {
            destination: None,
            weight: 1,
        }],
        ..base.clone()
    };
    assert!(matches!(
        service(nowhere),
        Err(ConvertError::NoGatewayDestination("weighted waypoint"))
    ));
    let mut too_long = base.clone();
    too_long.addresses[0].length = Some(33);
    assert!(matches!(
        service(too_long),
        Err(ConvertError::BadPrefix(_, 33))
    ));
    let odd = pb::Service {
        visibility: 9,
        ..base
    };
    assert!(matches!(
        service(odd),
        Err(ConvertError::UnknownVisibility(9))
    ));
}

#[test]
fn host_network_workloads_are_not_indexed_by_address() {
    let mut w = wl("host", &[10, 0, 0, 9]);
    w.network_mode = pb::NetworkMode::HostNetwork as i32;
    let host = workload(w, "td").unwrap();
    assert!(host.host_network);
    let mut state = crate::state::State::default();
    state.upsert_workload(host);
    state.upsert_workload(workload(wl("pod", &[10, 0, 0, 8]), "td").unwrap());
    assert!(state.workload("host").is_some());
    assert!(state.workload_by_ip("10.0.0.9".parse().unwrap()).is_none());
    assert!(state.workload_by_ip("10.0.0.8".parse().unwrap()).is_some());
}

/// A subject alt name that is no SPIFFE ID is left out; the service and its other names stay.
#[test]
fn service_converts_and_keeps_its_valid_sans() {
    let s = pb::Service {
        name: "web".into(),
        namespace: "ns".into(),
        hostname: "web.ns.svc".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        subject_alt_names: vec!["spiffe://td/ns/ns/sa/web".into()],
        load_balancing: None,
        ..Default::default()
    };
    let c = service(s.clone()).unwrap();
    assert_eq!(c.key(), "ns/web.ns.svc");
    assert_eq!(c.ports, BTreeMap::from([(80, 8080)]));
    let mut mixed = s;
    mixed.subject_alt_names = vec!["not-spiffe".into(), "spiffe://td/ns/ns/sa/web".into()];
    let c = service(mixed).unwrap();
    assert_eq!(c.subject_alt_names.len(), 1);
    assert_eq!(
        c.subject_alt_names[0].to_string(),
        "spiffe://td/ns/ns/sa/web"
    );
}

fn pb_policy(action: i32, scope: i32, matches: Vec<Match>) -> Authorization {
    Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        scope,
        action,
        groups: vec![Group {
            rules: vec![Rules { matches }],
        }],
        dry_run: false,
        extensions: Vec::new(),
    }
}

fn v4(a: [u8; 4], length: u32) -> Net {
    Net {
        address: a.to_vec(),
        length,
    }
}

/// The one match of a converted one-match policy, and how many entries were dropped.
fn converted_match(action: pb_security::Action, m: Match) -> (authz::Match, usize) {
    let (p, dropped) = policy(pb_policy(action as i32, 1, vec![m])).unwrap();
    (p.rules[0].clauses[0].matches[0].clone(), dropped.len())
}

#[test]
#[rustfmt::skip]
fn policy_entries_convert_and_unreadable_ones_never_widen_a_policy() {
    use pb_security::Action::{Allow, Deny};
    use pb_security::StringMatch as PbString;
    let any = || vec![IpNet::ANY_V4, IpNet::ANY_V6];
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    let rows: Vec<(&str, pb_security::Action, Match, authz::Match, usize)> = vec![
        ("a good prefix converts", Allow,
            Match { source_ips: vec![v4([10, 0, 0, 0], 8)], ..Default::default() },
            authz::Match { source_ips: vec![net("10.0.0.0/8")], ..Default::default() }, 0),
        ("ports convert", Deny,
            Match { destination_ports: vec![80], not_destination_ports: vec![22], ..Default::default() },
            authz::Match { destination_ports: vec![80], not_destination_ports: vec![22], ..Default::default() }, 0),
        ("ALLOW, a bad prefix length: the match matches nothing", Allow,
            Match { source_ips: vec![v4([10, 0, 0, 0], 33), v4([10, 1, 0, 0], 16)], destination_ports: vec![80], ..Default::default() },
            authz::Match::default(), 1),
        ("ALLOW, a 1-byte address: the match matches nothing", Allow,
            Match { not_source_ips: vec![Net { address: vec![10], length: 8 }], ..Default::default() },
            authz::Match::default(), 1),
        ("ALLOW, a port past 65535: the match matches nothing", Allow,
            Match { destination_ports: vec![70_000], ..Default::default() },
            authz::Match::default(), 1),
        ("DENY, a bad entry is dropped, the rest of the match stays", Deny,
            Match { source_ips: vec![v4([10, 0, 0, 0], 33), v4([10, 1, 0, 0], 16)], destination_ports: vec![80], ..Default::default() },
            authz::Match { source_ips: vec![net("10.1.0.0/16")], destination_ports: vec![80], ..Default::default() }, 1),
        ("DENY, a bad not_ entry is dropped", Deny,
            Match { not_destination_ports: vec![70_000, 22], ..Default::default() },
            authz::Match { not_destination_ports: vec![22], ..Default::default() }, 1),
        ("DENY, every entry bad: the match holds for every connection", Deny,
            Match { source_ips: vec![v4([10, 0, 0, 0], 40)], ..Default::default() },
            authz::Match { source_ips: any(), ..Default::default() }, 1),
        ("DENY, a string match with no type is dropped", Deny,
            Match { principals: vec![PbString { match_type: None }], destination_ports: vec![80], ..Default::default() },
            authz::Match { destination_ports: vec![80], ..Default::default() }, 1),
        ("an empty match stays empty (it matches nothing, as in Istio)", Deny,
            Match::default(), authz::Match::default(), 0),
    ];
    for (row, action, m, want, dropped) in rows {
        assert_eq!(converted_match(action, m), (want, dropped), "row: {row}");
    }
}

#[test]
fn policy_empty_forms_and_unknown_enums() {
    use authz::{Action, Rule as DomainRule, Scope};
    let with_rules = |groups: Vec<Group>| Authorization {
        groups,
        ..pb_policy(0, 1, vec![])
    };
    let (p, _) = policy(with_rules(vec![])).unwrap();
    assert!(
        p.rules.is_empty(),
        "no rules stays no rules (matches nothing)"
    );
    let (p, _) = policy(with_rules(vec![Group { rules: vec![] }])).unwrap();
    assert_eq!(
        p.rules,
        vec![DomainRule::default()],
        "a rule with no clauses stays (matches everything)"
    );
    let (p, _) = policy(pb_policy(1, 1, vec![])).unwrap();
    assert_eq!(
        p.rules[0].clauses[0].matches,
        vec![],
        "a clause with no matches stays"
    );
    // An action we cannot read: a DENY of everything in scope.
    let (p, dropped) = policy(pb_policy(7, 0, vec![Match::default()])).unwrap();
    assert_eq!((p.action, p.scope), (Action::Deny, Scope::Global));
    assert_eq!(p.rules, vec![DomainRule::default()]);
    assert!(dropped[0].contains("unknown action 7"), "{dropped:?}");
    // A scope we cannot read: the policy's own namespace.
    let (p, dropped) = policy(pb_policy(0, 9, vec![])).unwrap();
    assert_eq!((p.action, p.scope), (Action::Allow, Scope::Namespace));
    assert!(dropped[0].contains("unknown scope 9"), "{dropped:?}");
    assert_eq!(
        policy(Authorization::default()).unwrap_err(),
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
            length: None,
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

/// Extensions nothing here understands never widen a policy: an ALLOW carrying them allows
/// nothing, a match carrying them is an unreadable one; a DENY stays as it is.
#[test]
fn policy_extensions_never_widen_a_policy() {
    use crate::proto::istio::workload::Extension;
    let ext = || Extension {
        name: "istio.io/future".into(),
        config: None,
    };
    let allow = Authorization {
        extensions: vec![ext()],
        ..pb_policy(0, 1, vec![Match::default()])
    };
    let (p, dropped) = policy(allow).unwrap();
    assert!(p.rules.is_empty(), "the ALLOW allows nothing");
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    let deny = Authorization {
        extensions: vec![ext()],
        ..pb_policy(1, 1, vec![Match::default()])
    };
    let (p, _) = policy(deny).unwrap();
    assert_eq!(p.rules.len(), 1, "the DENY keeps its rules");
    let extended = Match {
        destination_ports: vec![80],
        extensions: vec![ext()],
        ..Match::default()
    };
    let (m, dropped) = converted_match(pb_security::Action::Allow, extended);
    assert_eq!(
        (m, dropped),
        (authz::Match::default(), 1),
        "the ALLOW match matches nothing"
    );
}

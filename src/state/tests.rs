//! Table tests of the store and the routing decision.

use super::*;
use crate::authz::{Policy, Scope};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A healthy workload in `default` with one address (shared with other modules' tests).
pub(crate) fn workload(uid: &str, addr: &str, sa_name: &str, protocol: Protocol) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        identity: Identity::new("cluster.local", "default", sa_name).unwrap(),
        network: String::new(),
        addresses: vec![ip(addr)],
        node: "n".into(),
        protocol,
        services: BTreeMap::new(),
        healthy: true,
        authorization_policies: Vec::new(),
        host_network: false,
        workload_name: String::new(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        cluster_id: String::new(),
        locality: Default::default(),
        hostname: String::new(),
        capacity: 1,
        unsupported: None,
        proxy_protocol: None,
        waypoint: None,
        network_gateway: None,
    }
}

fn with_service(mut w: Workload, key: &str, ports: &[(u16, u16)]) -> Workload {
    w.services
        .insert(key.into(), ports.iter().copied().collect());
    w
}

fn service(vip: &str, ports: &[(u16, u16)]) -> Service {
    Service {
        name: "web".into(),
        namespace: "default".into(),
        hostname: "web.default.svc.cluster.local".into(),
        vips: vec![ip(vip)],
        ports: ports.iter().copied().collect(),
        subject_alt_names: vec![Identity::new("cluster.local", "default", "web-san").unwrap()],
        load_balancing: Default::default(),
        vip_ranges: Vec::new(),
        namespace_only: false,
        unsupported: None,
        waypoint: None,
        weighted_waypoints: Vec::new(),
        ingress_use_waypoint: false,
    }
}

const SVC: &str = "default/web.default.svc.cluster.local";

fn state() -> State {
    let mut s = State::default();
    s.upsert_workload(workload("a", "10.0.1.2", "a", Protocol::Hbone));
    s.upsert_workload(with_service(
        workload("b", "10.0.2.2", "b", Protocol::Hbone),
        SVC,
        &[(80, 8080)],
    ));
    s.upsert_workload(with_service(
        workload("c", "10.0.2.3", "c", Protocol::Hbone),
        SVC,
        &[],
    ));
    s.upsert_workload(workload("plain", "10.0.2.9", "p", Protocol::Tcp));
    s.upsert_service(service("10.96.0.10", &[(80, 9090), (443, 8443)]));
    s
}

#[test]
fn routes() {
    let s = state();
    let src = [ip("10.0.1.2")];
    type Want = fn(&Upstream) -> bool;
    let cases: &[(&str, &str, u64, Want)] = &[
        (
            "enrolled pod → HBONE, same port",
            "10.0.2.2:8080",
            0,
            |u| {
                matches!(u, Upstream::Hbone { target, service: None, expected, .. }
                if *target == sa("10.0.2.2:8080") && expected.len() == 1)
            },
        ),
        ("non-enrolled pod → passthrough", "10.0.2.9:80", 0, |u| {
            *u == Upstream::Passthrough {
                target: sa("10.0.2.9:80"),
            }
        }),
        ("unknown IP → passthrough", "192.0.2.1:443", 0, |u| {
            *u == Upstream::Passthrough {
                target: sa("192.0.2.1:443"),
            }
        }),
        (
            "VIP → endpoint b with its own port mapping",
            "10.96.0.10:80",
            0,
            |u| matches!(u, Upstream::Hbone { target, service: Some(_), .. } if *target == sa("10.0.2.2:8080")),
        ),
        (
            "VIP → endpoint c with the service's mapping",
            "10.96.0.10:80",
            1,
            |u| matches!(u, Upstream::Hbone { target, .. } if *target == sa("10.0.2.3:9090")),
        ),
        (
            "VIP pick wraps around",
            "10.96.0.10:80",
            2,
            |u| matches!(u, Upstream::Hbone { target, .. } if *target == sa("10.0.2.2:8080")),
        ),
        (
            "VIP on an unknown port → refused",
            "10.96.0.10:22",
            0,
            |u| *u == Upstream::Refuse("service has no such port"),
        ),
        (
            "own proxy port on own IP → loop refused",
            "10.0.1.2:15008",
            0,
            |u| matches!(u, Upstream::Refuse(_)),
        ),
        (
            "proxy port on loopback → loop refused",
            "127.0.0.1:15001",
            0,
            |u| matches!(u, Upstream::Refuse(_)),
        ),
        (
            "another pod's 15008 is just a destination",
            "10.0.2.2:15008",
            0,
            |u| matches!(u, Upstream::Hbone { .. }),
        ),
    ];
    for (name, dst, pick, want) in cases {
        let got = s.route(&src, sa(dst), *pick);
        assert!(want(&got), "{name}: got {got:?}");
    }
}

#[test]
fn service_route_expects_endpoint_and_san_identities() {
    let s = state();
    let Upstream::Hbone {
        expected, service, ..
    } = s.route(&[], sa("10.96.0.10:443"), 1)
    else {
        panic!("expected HBONE");
    };
    let names: Vec<String> = expected.iter().map(|i| i.to_string()).collect();
    assert_eq!(
        names,
        [
            "spiffe://cluster.local/ns/default/sa/c",
            "spiffe://cluster.local/ns/default/sa/web-san"
        ]
    );
    let service = service.unwrap();
    assert_eq!(service.hostname, "web.default.svc.cluster.local");
    assert_eq!(
        (service.name.as_str(), service.namespace.as_str()),
        ("web", "default")
    );
}

#[test]
fn the_same_ip_on_two_networks_is_two_workloads() {
    let mut s = State::with_network("net-a");
    let mut a = workload("a", "10.0.0.5", "a", Protocol::Hbone);
    a.network = "net-a".into();
    let mut b = workload("b", "10.0.0.5", "b", Protocol::Hbone);
    b.network = "net-b".into();
    s.upsert_workload(a);
    s.upsert_workload(b);
    assert_eq!(
        s.workload_by_ip(ip("10.0.0.5")).unwrap().uid,
        "a",
        "own network first"
    );
    assert_eq!(
        s.workload_by_network_ip("net-b", ip("10.0.0.5"))
            .unwrap()
            .uid,
        "b"
    );
    s.remove_workload("b");
    assert!(s.workload_by_network_ip("net-b", ip("10.0.0.5")).is_none());
    assert!(s.workload_by_ip(ip("10.0.0.5")).is_some());
}

/// An enrolled workload known only on another network is not ours to reach directly (that
/// takes an east-west gateway): refused, never passed through in plaintext; a plain one there,
/// or an address nobody has, passes through.
#[test]
fn an_hbone_workload_on_another_network_is_never_reached_in_plaintext() {
    let mut s = State::with_network("net-a");
    let mut remote = workload("remote", "10.9.0.5", "r", Protocol::Hbone);
    remote.network = "net-b".into();
    s.upsert_workload(remote);
    let mut plain = workload("plain", "10.9.0.6", "p", Protocol::Tcp);
    plain.network = "net-b".into();
    s.upsert_workload(plain);
    assert_eq!(
        s.route(&[], sa("10.9.0.5:80"), 0),
        Upstream::Refuse("an HBONE workload on another network")
    );
    assert!(matches!(
        s.route(&[], sa("10.9.0.6:80"), 0),
        Upstream::Passthrough { .. }
    ));
    // Removed (or moved to plain TCP): no longer refused.
    let mut moved = workload("remote", "10.9.0.5", "r", Protocol::Tcp);
    moved.network = "net-b".into();
    s.upsert_workload(moved);
    assert!(matches!(
        s.route(&[], sa("10.9.0.5:80"), 0),
        Upstream::Passthrough { .. }
    ));
}

#[test]
fn unhealthy_endpoints_are_not_picked() {
    let mut s = state();
    let mut c = (**s.workload("c").unwrap()).clone();
    c.healthy = false;
    s.upsert_workload(c);
    for pick in 0..4 {
        let Upstream::Hbone { target, .. } = s.route(&[], sa("10.96.0.10:80"), pick) else {
            panic!("expected HBONE");
        };
        assert_eq!(target, sa("10.0.2.2:8080"));
    }
}

#[test]
fn service_without_endpoints_is_refused() {
    let mut s = State::default();
    s.upsert_service(service("10.96.0.11", &[(80, 80)]));
    assert_eq!(
        s.route(&[], sa("10.96.0.11:80"), 0),
        Upstream::Refuse("service has no endpoints")
    );
}

/// A named target port (service target 0, as istiod sends `targetPort: http`) reaches only the
/// endpoints whose own port list resolves it; the others are left out, never sent to the
/// service port.
#[test]
fn named_target_ports_leave_out_endpoints_that_do_not_resolve_them() {
    let mut s = State::default();
    s.upsert_service(service("10.96.0.12", &[(80, 0)]));
    s.upsert_workload(with_service(
        workload("has-http", "10.0.3.1", "a", Protocol::Hbone),
        SVC,
        &[(80, 8080)],
    ));
    s.upsert_workload(with_service(
        workload("no-http", "10.0.3.2", "a", Protocol::Hbone),
        SVC,
        &[],
    ));
    for pick in 0..4 {
        let Upstream::Hbone { target, .. } = s.route(&[], sa("10.96.0.12:80"), pick) else {
            panic!("expected HBONE");
        };
        assert_eq!(target, sa("10.0.3.1:8080"), "pick {pick}");
    }
    s.remove_workload("has-http");
    assert_eq!(
        s.route(&[], sa("10.96.0.12:80"), 0),
        Upstream::Refuse("service has no endpoints")
    );
}

/// A service in PASSTHROUGH mode picks no endpoint: the connection goes to the VIP as it is.
#[test]
fn a_passthrough_service_is_not_balanced() {
    let mut s = state();
    let mut svc = service("10.96.0.10", &[(80, 9090)]);
    svc.load_balancing.mode = crate::state::balance::Mode::Passthrough;
    s.upsert_service(svc);
    assert_eq!(
        s.route(&[], sa("10.96.0.10:80"), 0),
        Upstream::Passthrough {
            target: sa("10.96.0.10:80")
        }
    );
}

/// An endpoint known by name is resolved when the connection is made, in plaintext only: a
/// tunnel's peer cannot be checked against a name resolved later (fail closed).
#[test]
fn hostname_endpoints_are_resolved_later_and_never_tunneled() {
    let mut s = State::default();
    s.upsert_service(service("10.96.0.13", &[(80, 8080)]));
    let mut named = with_service(workload("named", "10.0.4.1", "n", Protocol::Tcp), SVC, &[]);
    named.addresses.clear();
    named.hostname = "db.example.com".into();
    s.upsert_workload(named.clone());
    assert_eq!(
        s.route(&[], sa("10.96.0.13:80"), 0),
        Upstream::PassthroughHost {
            host: "db.example.com".into(),
            port: 8080
        }
    );
    named.protocol = Protocol::Hbone;
    s.upsert_workload(named);
    assert_eq!(
        s.route(&[], sa("10.96.0.13:80"), 0),
        Upstream::Refuse("HBONE to a hostname workload")
    );
}

#[test]
fn replace_and_remove_reindex() {
    let mut s = state();
    // b moves to a new IP: the old one no longer resolves to it.
    s.upsert_workload(workload("b", "10.0.2.20", "b", Protocol::Hbone));
    assert!(s.workload_by_ip(ip("10.0.2.2")).is_none());
    assert_eq!(s.workload_by_ip(ip("10.0.2.20")).unwrap().uid, "b");
    assert!(s.remove_workload("b").is_some());
    assert!(s.workload_by_ip(ip("10.0.2.20")).is_none());
    assert!(s.remove_workload("b").is_none());
    s.remove_service(SVC);
    assert!(s.service_by_vip(ip("10.96.0.10")).is_none());
}

#[test]
fn removing_an_old_owner_keeps_the_new_owner_of_an_ip() {
    let mut s = State::default();
    s.upsert_workload(workload("old", "10.0.0.5", "x", Protocol::Hbone));
    s.upsert_workload(workload("new", "10.0.0.5", "y", Protocol::Hbone));
    s.remove_workload("old");
    assert_eq!(s.workload_by_ip(ip("10.0.0.5")).unwrap().uid, "new");
}

fn policy(name: &str, namespace: &str, scope: Scope) -> Policy {
    Policy {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        action: crate::authz::Action::Deny,
        rules: Vec::new(),
        dry_run: false,
    }
}

/// The keys of the policies `s` hands over for a workload, sorted.
fn keys(s: &State, namespace: &str, selected: &[String]) -> Vec<String> {
    let mut k: Vec<String> = s
        .policies_for(namespace, selected)
        .map(Policy::key)
        .collect();
    k.sort();
    k
}

#[test]
fn policies_are_indexed_by_scope() {
    let mut s = State::default();
    s.upsert_policy(policy("g", "istio-system", Scope::Global));
    s.upsert_policy(policy("n", "prod", Scope::Namespace));
    s.upsert_policy(policy("other", "dev", Scope::Namespace));
    s.upsert_policy(policy("sel", "prod", Scope::WorkloadSelector));
    assert_eq!(keys(&s, "prod", &[]), ["istio-system/g", "prod/n"]);
    // A selected key naming a NAMESPACE policy does not pull it in twice or elsewhere.
    let selected = [
        "prod/sel".to_owned(),
        "dev/other".to_owned(),
        "x/missing".to_owned(),
    ];
    assert_eq!(
        keys(&s, "prod", &selected),
        ["istio-system/g", "prod/n", "prod/sel"]
    );
    assert_eq!(keys(&s, "dev", &[]), ["dev/other", "istio-system/g"]);
    // Every candidate is one `authz::applies` accepts, and none it accepts is missing.
    for (ns, sel) in [
        ("prod", &selected[..]),
        ("dev", &[][..]),
        ("none", &selected[..]),
    ] {
        let mut applying: Vec<String> = s
            .all_policies()
            .filter(|p| crate::authz::applies(p, ns, sel))
            .map(Policy::key)
            .collect();
        applying.sort();
        assert_eq!(keys(&s, ns, sel), applying, "{ns}");
    }
    // Replacing moves a policy between indexes; removing takes it out of them.
    s.upsert_policy(policy("n", "prod", Scope::Global));
    assert_eq!(
        keys(&s, "dev", &[]),
        ["dev/other", "istio-system/g", "prod/n"]
    );
    s.remove_policy("prod/n");
    s.remove_policy("istio-system/g");
    assert_eq!(keys(&s, "prod", &[]), Vec::<String>::new());
}

#[test]
fn the_policy_generation_moves_with_what_decisions_depend_on() {
    use futures_util::FutureExt;
    let shared = SharedState::default();
    // Whether `change` woke a policy waiter enabled before it.
    let moved = |change: &dyn Fn(&mut State)| {
        let mut waiter = std::pin::pin!(shared.policy_changed());
        waiter.as_mut().enable();
        shared.write(change);
        waiter.now_or_never().is_some()
    };
    let w = || workload("w", "10.0.0.1", "w", Protocol::Hbone);
    assert!(
        !moved(&|s| s.upsert_workload(w())),
        "a workload that selects no policy"
    );
    assert!(
        moved(&|s| s.upsert_policy(policy("p", "prod", Scope::Namespace))),
        "a new policy"
    );
    let mut selecting = w();
    selecting.authorization_policies = vec!["prod/p".into()];
    assert!(
        moved(&|s| s.upsert_workload(selecting.clone())),
        "a workload now selecting a policy"
    );
    assert!(
        !moved(&|s| s.upsert_workload(selecting.clone())),
        "the same selection again"
    );
    assert!(
        !moved(&|s| s.upsert_service(service("10.96.0.1", &[(80, 8080)]))),
        "a service"
    );
    assert!(
        moved(&|s| drop(s.remove_workload("w"))),
        "a selecting workload removed"
    );
    assert!(
        moved(&|s| drop(s.remove_policy("prod/p"))),
        "a policy removed"
    );
    assert!(
        !moved(&|s| drop(s.remove_policy("prod/p"))),
        "removing what is not there"
    );
}

/// A sidecar's Istio mTLS is refused, never sent another way.
#[test]
fn istio_mtls_is_refused() {
    let mut s = state();
    let mut sidecar = workload("sc", "10.0.2.21", "sc", Protocol::Tcp);
    sidecar.unsupported = Some(Unsupported::LegacyIstioMtls);
    s.upsert_workload(sidecar);
    assert_eq!(
        s.route(&[ip("10.0.1.2")], sa("10.0.2.21:80"), 0),
        Upstream::Refuse(Unsupported::LegacyIstioMtls.reason())
    );
}

const WAYPOINT_VIP: &str = "10.96.0.99";

/// `state()` with a waypoint: its Service (VIP 10.96.0.99, port 15008, SAN `wp-san`) in front
/// of the workload `wp` (10.0.3.1, service account `waypoint`).
fn with_waypoint() -> State {
    let mut s = state();
    let mut wp_svc = service(WAYPOINT_VIP, &[(15008, 15008)]);
    wp_svc.name = "waypoint".into();
    wp_svc.hostname = "waypoint.default.svc.cluster.local".into();
    wp_svc.subject_alt_names = vec![Identity::new("cluster.local", "default", "wp-san").unwrap()];
    s.upsert_service(wp_svc);
    s.upsert_workload(with_service(
        workload("wp", "10.0.3.1", "waypoint", Protocol::Tcp),
        "default/waypoint.default.svc.cluster.local",
        &[(15008, 15008)],
    ));
    s
}

fn by_address(vip: &str) -> Gateway {
    Gateway {
        destination: GatewayDestination::Address {
            network: String::new(),
            ip: ip(vip),
        },
        port: 15008,
    }
}

fn by_hostname(namespace: &str, hostname: &str) -> Gateway {
    Gateway {
        destination: GatewayDestination::Hostname {
            namespace: namespace.into(),
            hostname: hostname.into(),
        },
        port: 15008,
    }
}

/// Where a route goes: (the peer dialed, the CONNECT authority, the first expected identity).
fn hop(u: &Upstream) -> Option<(SocketAddr, SocketAddr, String)> {
    match u {
        Upstream::Hbone {
            peer,
            target,
            expected,
            ..
        } => Some((*peer, *target, expected[0].to_string())),
        _ => None,
    }
}

/// A service with a waypoint (named by address or hostname): its connections go to the
/// waypoint's HBONE port, the CONNECT authority the VIP and port the client asked for, the
/// waypoint's identity and SANs expected (ztunnel's build_request).
#[test]
fn a_service_with_a_waypoint_is_reached_through_it() {
    let waypoint_id = "spiffe://cluster.local/ns/default/sa/waypoint".to_owned();
    for gateway in [
        by_address(WAYPOINT_VIP),
        by_hostname("default", "waypoint.default.svc.cluster.local"),
    ] {
        let mut s = with_waypoint();
        let mut svc = service("10.96.0.10", &[(80, 8080)]);
        svc.waypoint = Some(gateway.clone());
        s.upsert_service(svc);
        let u = s.route(&[ip("10.0.1.2")], sa("10.96.0.10:80"), 0);
        assert_eq!(
            hop(&u),
            Some((
                sa("10.0.3.1:15008"),
                sa("10.96.0.10:80"),
                waypoint_id.clone()
            )),
            "{gateway:?}"
        );
        let Upstream::Hbone {
            expected,
            service,
            workload,
            ..
        } = u
        else {
            unreachable!()
        };
        assert_eq!(workload.uid, "wp");
        assert!(expected.iter().any(|i| i.service_account() == "wp-san"));
        assert_eq!(service.unwrap().hostname, "web.default.svc.cluster.local");
    }
}

/// A workload with a waypoint, addressed directly: through the waypoint, authority the pod's
/// address; not when the client is the waypoint itself, and not when the workload is reached
/// through a service without one (ztunnel checks the workload's waypoint only then).
#[test]
fn a_workload_with_a_waypoint_is_reached_through_it_unless_from_it() {
    let mut s = with_waypoint();
    let mut behind = workload("w", "10.0.2.20", "w", Protocol::Hbone);
    behind.waypoint = Some(by_address(WAYPOINT_VIP));
    s.upsert_workload(with_service(behind, SVC, &[(80, 8080)]));
    let (peer, target, _) = hop(&s.route(&[ip("10.0.1.2")], sa("10.0.2.20:8080"), 0)).unwrap();
    assert_eq!((peer, target), (sa("10.0.3.1:15008"), sa("10.0.2.20:8080")));
    // From the waypoint: straight to the workload's proxy.
    let (peer, _, _) = hop(&s.route(&[ip("10.0.3.1")], sa("10.0.2.20:8080"), 0)).unwrap();
    assert_eq!(peer, sa("10.0.2.20:15008"));
}

/// A waypoint that cannot be found, has no endpoint or is on another network: refused, never
/// bypassed.
#[test]
fn a_waypoint_that_cannot_be_reached_fails_closed() {
    let cases = [
        by_address("10.96.0.77"),
        by_hostname("default", "nowhere.default.svc.cluster.local"),
        by_hostname("other", "waypoint.default.svc.cluster.local"),
        Gateway {
            destination: GatewayDestination::Address {
                network: "far".into(),
                ip: ip(WAYPOINT_VIP),
            },
            port: 15008,
        },
    ];
    for gateway in cases {
        let mut s = with_waypoint();
        let mut svc = service("10.96.0.10", &[(80, 8080)]);
        svc.waypoint = Some(gateway.clone());
        s.upsert_service(svc);
        let mut behind = workload("w", "10.0.2.20", "w", Protocol::Hbone);
        behind.waypoint = Some(gateway.clone());
        s.upsert_workload(behind);
        for dst in ["10.96.0.10:80", "10.0.2.20:8080"] {
            assert!(
                matches!(s.route(&[ip("10.0.1.2")], sa(dst), 0), Upstream::Refuse(_)),
                "{gateway:?} {dst}"
            );
        }
    }
    // Its only endpoint gone.
    let mut s = with_waypoint();
    s.remove_workload("wp");
    let mut svc = service("10.96.0.10", &[(80, 8080)]);
    svc.waypoint = Some(by_address(WAYPOINT_VIP));
    s.upsert_service(svc);
    assert_eq!(
        s.route(&[ip("10.0.1.2")], sa("10.96.0.10:80"), 0),
        Upstream::Refuse("its waypoint has no endpoints")
    );
}

/// Weighted waypoints share connections by weight (a canary); weights all 0 fall back to the
/// single waypoint.
#[test]
fn weighted_waypoints_share_connections_by_weight() {
    let mut s = with_waypoint();
    let mut canary = service("10.96.0.98", &[(15008, 15008)]);
    canary.hostname = "canary.default.svc.cluster.local".into();
    s.upsert_service(canary);
    s.upsert_workload(with_service(
        workload("wp2", "10.0.3.2", "waypoint", Protocol::Tcp),
        "default/canary.default.svc.cluster.local",
        &[(15008, 15008)],
    ));
    let mut svc = service("10.96.0.10", &[(80, 8080)]);
    svc.weighted_waypoints = vec![(by_address(WAYPOINT_VIP), 3), (by_address("10.96.0.98"), 1)];
    s.upsert_service(svc.clone());
    let peers: Vec<SocketAddr> = (0..4)
        .map(|pick| {
            hop(&s.route(&[ip("10.0.1.2")], sa("10.96.0.10:80"), pick))
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(
        peers,
        vec![
            sa("10.0.3.1:15008"),
            sa("10.0.3.1:15008"),
            sa("10.0.3.1:15008"),
            sa("10.0.3.2:15008")
        ]
    );
    svc.weighted_waypoints = vec![(by_address("10.96.0.98"), 0)];
    svc.waypoint = Some(by_address(WAYPOINT_VIP));
    s.upsert_service(svc);
    assert_eq!(
        hop(&s.route(&[ip("10.0.1.2")], sa("10.96.0.10:80"), 3))
            .unwrap()
            .0,
        sa("10.0.3.1:15008")
    );
}

/// A CIDR ServiceEntry: every address of its range is the service (the longest range wins),
/// and the range leaves with the service.
#[test]
fn every_address_of_a_service_range_reaches_the_service() {
    let mut s = state();
    let mut range = service("10.200.0.0", &[(80, 8080)]);
    range.vip_ranges = vec![(ip("10.200.0.0"), 16)];
    s.upsert_service(range);
    let src = [ip("10.0.1.2")];
    for dst in ["10.200.0.0:80", "10.200.7.9:80", "10.200.255.255:80"] {
        assert!(
            matches!(
                s.route(&src, sa(dst), 0),
                Upstream::Hbone {
                    service: Some(_),
                    ..
                }
            ),
            "{dst}"
        );
    }
    assert_eq!(
        s.route(&src, sa("10.201.0.1:80"), 0),
        Upstream::Passthrough {
            target: sa("10.201.0.1:80")
        },
        "outside the range"
    );
    s.remove_service(SVC);
    assert!(matches!(
        s.route(&src, sa("10.200.7.9:80"), 0),
        Upstream::Passthrough { .. }
    ));
}

/// `visibility: NAMESPACE`: the service's addresses reach it only from its own namespace; to
/// any other client they are addresses of nothing known.
#[test]
fn a_namespace_service_is_unknown_to_other_namespaces() {
    let mut s = state();
    let mut svc = service("10.96.0.10", &[(80, 9090)]);
    svc.namespace_only = true;
    s.upsert_service(svc);
    let mut stranger = workload("x", "10.0.1.3", "x", Protocol::Hbone);
    stranger.namespace = "other".into();
    s.upsert_workload(stranger);
    assert!(matches!(
        s.route(&[ip("10.0.1.2")], sa("10.96.0.10:80"), 0),
        Upstream::Hbone {
            service: Some(_),
            ..
        }
    ));
    assert_eq!(
        s.route(&[ip("10.0.1.3")], sa("10.96.0.10:80"), 0),
        Upstream::Passthrough {
            target: sa("10.96.0.10:80")
        }
    );
}

#[test]
fn ranges_hold_what_their_prefix_says() {
    assert!(in_range(ip("10.1.2.3"), ip("10.1.0.0"), 16));
    assert!(!in_range(ip("10.2.0.0"), ip("10.1.0.0"), 16));
    assert!(in_range(ip("1.2.3.4"), ip("0.0.0.0"), 0));
    assert!(in_range(ip("fd00::5"), ip("fd00::"), 120));
    assert!(!in_range(ip("fd00::1:0"), ip("fd00::"), 120));
    assert!(
        !in_range(ip("10.1.2.3"), ip("fd00::"), 0),
        "families never mix"
    );
}

/// `web` with one endpoint on the proxy's network and one on `net-b` behind the east-west
/// gateway `ew` (198.51.100.1, network `net-b`), as istiod describes a multi-network mesh.
fn two_networks(gateway: Option<Gateway>) -> State {
    let mut s = State::with_network("net-a");
    let mut svc = service("10.96.0.10", &[(80, 8080)]);
    svc.load_balancing = balance::LoadBalancing::default();
    s.upsert_service(svc);
    let mut remote = with_service(
        workload("far", "10.8.0.5", "far", Protocol::Hbone),
        SVC,
        &[(80, 8080)],
    );
    remote.network = "net-b".into();
    remote.network_gateway = gateway;
    s.upsert_workload(remote);
    let mut ew = workload("ew", "198.51.100.1", "eastwest", Protocol::Tcp);
    ew.network = "net-b".into();
    s.upsert_workload(ew);
    s
}

fn gateway_at(network: &str, addr: &str) -> Gateway {
    Gateway {
        destination: GatewayDestination::Address {
            network: network.into(),
            ip: ip(addr),
        },
        port: 15008,
    }
}

/// A service endpoint on another network is reached through its network's gateway with double
/// HBONE: the outer tunnel to the gateway (its identity), the inner to `hostname:port` (the
/// identities of the service's endpoints there and its SANs); without a known gateway,
/// refused. A local endpoint of the same service is reached directly as always.
#[test]
fn an_endpoint_on_another_network_is_reached_through_its_gateway() {
    let s = two_networks(Some(gateway_at("net-b", "198.51.100.1")));
    let Upstream::DoubleHbone {
        gateway,
        peer,
        gateway_expected,
        authority,
        expected,
        service,
    } = s.route(&[ip("10.0.1.2")], sa("10.96.0.10:80"), 0)
    else {
        panic!("not double HBONE");
    };
    assert_eq!(gateway.uid, "ew");
    assert_eq!(peer, sa("198.51.100.1:15008"));
    assert_eq!(gateway_expected[0].service_account(), "eastwest");
    assert_eq!(authority, ("web.default.svc.cluster.local".to_owned(), 80));
    let expected: Vec<&str> = expected.iter().map(Identity::service_account).collect();
    assert_eq!(expected, vec!["far", "web-san"]);
    assert_eq!(service.hostname, "web.default.svc.cluster.local");

    for gateway in [None, Some(gateway_at("net-b", "198.51.100.9"))] {
        let s = two_networks(gateway);
        assert!(
            matches!(
                s.route(&[ip("10.0.1.2")], sa("10.96.0.10:80"), 0),
                Upstream::Refuse(_)
            ),
            "never across networks without the gateway"
        );
    }

    // A local endpoint too: it is picked by the load balancing like any other, and reached
    // directly when it is.
    let mut s = two_networks(Some(gateway_at("net-b", "198.51.100.1")));
    let mut local = with_service(
        workload("near", "10.0.2.9", "near", Protocol::Hbone),
        SVC,
        &[(80, 8080)],
    );
    local.network = "net-a".into();
    s.upsert_workload(local);
    let kinds: std::collections::BTreeSet<&str> = (0..8)
        .map(
            |pick| match s.route(&[ip("10.0.1.2")], sa("10.96.0.10:80"), pick) {
                Upstream::Hbone { peer, .. } if peer == sa("10.0.2.9:15008") => "direct",
                Upstream::DoubleHbone { .. } => "double",
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        vec!["direct", "double"]
    );
}

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use hickory_proto::rr::{Name, RecordType};

use super::{Answer, Zone, resolve};
use crate::state::tests::workload;
use crate::state::{Protocol, Service, State};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn n(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

fn service(name: &str, namespace: &str, hostname: &str, vips: &[&str]) -> Service {
    let vips = vips.iter().map(|v| ip(v)).collect();
    Service::new(
        name,
        namespace,
        hostname,
        vips,
        BTreeMap::from([(80, 8080)]),
    )
}

fn state() -> State {
    let mut s = State::default();
    s.upsert_service(service(
        "echo",
        "demo",
        "echo.demo.svc.cluster.local",
        &["10.96.0.20", "fd00::20"],
    ));
    s.upsert_service(service(
        "echo",
        "other",
        "echo.other.svc.cluster.local",
        &["10.96.0.30"],
    ));
    // A ServiceEntry host with an address istiod allocated, and a wildcard one.
    s.upsert_service(service(
        "api",
        "demo",
        "api.external.example",
        &["240.240.0.1"],
    ));
    s.upsert_service(service("wild", "demo", "*.wild.example", &["240.240.0.2"]));
    // The same ServiceEntry host in two namespaces: the client's own wins.
    s.upsert_service(service("shared", "aaa", "shared.example", &["240.240.0.3"]));
    s.upsert_service(service(
        "shared",
        "demo",
        "shared.example",
        &["240.240.0.4"],
    ));
    // Headless: no VIP, its endpoints' addresses.
    s.upsert_service(service("db", "demo", "db.demo.svc.cluster.local", &[]));
    let key = "demo/db.demo.svc.cluster.local".to_owned();
    for (uid, addr) in [("db-0", "10.0.0.5"), ("db-1", "10.0.0.6")] {
        let mut w = workload(uid, addr, "db", Protocol::Hbone);
        w.services
            .insert(key.clone(), BTreeMap::from([(5432, 5432)]));
        s.upsert_workload(w);
    }
    // A ServiceEntry without addresses (DNS resolution): not ours to answer.
    s.upsert_service(service("plain", "demo", "plain.example", &[]));
    s
}

fn zone() -> Zone {
    Zone::new("cluster.local").unwrap()
}

fn ask(state: &State, ns: &str, name: &str, qtype: RecordType) -> Answer {
    resolve(state, &zone(), ns, &n(name), qtype, 0)
}

fn local(name: &str, addrs: &[&str]) -> Answer {
    Answer::Local {
        cname: None,
        name: n(name),
        addresses: addrs.iter().map(|a| ip(a)).collect(),
    }
}

#[test]
fn a_service_is_found_by_every_form_of_its_name() {
    let s = state();
    for name in [
        "echo.demo.svc.cluster.local.",
        "ECHO.Demo.svc.cluster.local.",
        "echo.",
        "echo.demo.",
        "echo.demo.svc.",
    ] {
        let Answer::Local { addresses, .. } = ask(&s, "demo", name, RecordType::A) else {
            panic!("{name} forwarded");
        };
        assert_eq!(addresses, vec![ip("10.96.0.20")], "{name}");
    }
    // The short name is the client's namespace's service.
    let Answer::Local { addresses, .. } = ask(&s, "other", "echo.", RecordType::A) else {
        panic!("forwarded");
    };
    assert_eq!(addresses, vec![ip("10.96.0.30")]);
    // Under the name asked.
    assert_eq!(
        ask(&s, "demo", "echo.demo.", RecordType::AAAA),
        local("echo.demo.", &["fd00::20"])
    );
}

#[test]
fn a_name_with_a_search_domain_appended_is_a_cname_to_the_name() {
    let s = state();
    let asked = "echo.demo.svc.cluster.local.demo.svc.cluster.local.";
    assert_eq!(
        ask(&s, "demo", asked, RecordType::A),
        Answer::Local {
            cname: Some(n("echo.demo.svc.cluster.local.")),
            name: n("echo.demo.svc.cluster.local."),
            addresses: vec![ip("10.96.0.20")],
        }
    );
}

#[test]
fn service_entries_resolve_to_their_allocated_addresses() {
    let s = state();
    assert_eq!(
        ask(&s, "demo", "api.external.example.", RecordType::A),
        local("api.external.example.", &["240.240.0.1"])
    );
    assert_eq!(
        ask(&s, "demo", "a.b.wild.example.", RecordType::A),
        local("a.b.wild.example.", &["240.240.0.2"])
    );
    assert_eq!(
        ask(&s, "demo", "shared.example.", RecordType::A),
        local("shared.example.", &["240.240.0.4"])
    );
    assert_eq!(
        ask(&s, "zzz", "shared.example.", RecordType::A),
        local("shared.example.", &["240.240.0.3"]),
        "another namespace gets the first by namespace"
    );
}

#[test]
fn a_known_name_without_an_address_of_the_family_has_no_records_not_nxdomain() {
    let s = state();
    assert_eq!(
        ask(&s, "demo", "api.external.example.", RecordType::AAAA),
        local("api.external.example.", &[])
    );
}

#[test]
fn a_headless_service_answers_its_endpoints() {
    let s = state();
    let Answer::Local { addresses, .. } = ask(&s, "demo", "db.", RecordType::A) else {
        panic!("forwarded");
    };
    assert_eq!(addresses, vec![ip("10.0.0.5"), ip("10.0.0.6")]);
    // Rotated by the pick.
    let Answer::Local { addresses, .. } = resolve(&s, &zone(), "demo", &n("db."), RecordType::A, 1)
    else {
        panic!("forwarded");
    };
    assert_eq!(addresses, vec![ip("10.0.0.6"), ip("10.0.0.5")]);
}

#[test]
fn unknown_names_and_other_types_go_upstream() {
    let s = state();
    for (name, qtype) in [
        ("www.example.org.", RecordType::A),
        ("nope.demo.svc.cluster.local.", RecordType::A),
        ("plain.example.", RecordType::A),
        ("echo.demo.svc.cluster.local.", RecordType::TXT),
        ("echo.demo.svc.cluster.local.", RecordType::SRV),
    ] {
        assert_eq!(
            ask(&s, "demo", name, qtype),
            Answer::Forward,
            "{name} {qtype}"
        );
    }
}

#[test]
fn a_namespace_only_service_does_not_exist_for_other_namespaces() {
    let mut s = state();
    let mut svc = service(
        "private",
        "demo",
        "private.demo.svc.cluster.local",
        &["10.96.0.40"],
    );
    svc.namespace_only = true;
    s.upsert_service(svc);
    assert!(matches!(
        ask(&s, "demo", "private.", RecordType::A),
        Answer::Local { .. }
    ));
    assert_eq!(
        ask(&s, "other", "private.demo.", RecordType::A),
        Answer::Forward
    );
}

#[test]
fn a_removed_service_is_forgotten() {
    let mut s = state();
    s.remove_service("demo/api.external.example");
    assert_eq!(
        ask(&s, "demo", "api.external.example.", RecordType::A),
        Answer::Forward
    );
}

#[test]
fn a_cluster_domain_must_be_a_name() {
    assert!(Zone::new("cluster.local").is_ok());
    assert!(Zone::new("").is_err());
    assert!(Zone::new(".").is_err());
}

//! Table tests of the evaluator, row by row against the semantics in the module docs: the empty
//! forms, how rules, clauses, matches, fields and entries combine, the decision order, dry run,
//! scopes, identity-less clients, and every match field with its `not_` form.

use super::*;

/// `Match { field: vec![..], .. }` with the rest empty.
macro_rules! m {
    ($($field:ident: [$($e:expr),* $(,)?]),* $(,)?) => {
        Match { $($field: vec![$($e),*],)* ..Default::default() }
    };
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn prefix(s: &str) -> StringMatch {
    StringMatch::Prefix(s.into())
}

fn suffix(s: &str) -> StringMatch {
    StringMatch::Suffix(s.into())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn sa(namespace: &str, service_account: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

fn rule(clauses: Vec<Clause>) -> Rule {
    Rule { clauses }
}

fn clause(matches: Vec<Match>) -> Clause {
    Clause { matches }
}

/// A NAMESPACE policy in `prod`.
fn policy(name: &str, action: Action, rules: Vec<Rule>) -> Policy {
    Policy {
        name: name.into(),
        namespace: "prod".into(),
        scope: Scope::Namespace,
        action,
        rules,
        dry_run: false,
    }
}

fn allow(rules: Vec<Rule>) -> Policy {
    policy("allow", Action::Allow, rules)
}

fn deny(rules: Vec<Rule>) -> Policy {
    policy("deny", Action::Deny, rules)
}

fn dry(p: Policy) -> Policy {
    Policy { dry_run: true, ..p }
}

/// One rule with one clause with these matches.
fn only(matches: Vec<Match>) -> Vec<Rule> {
    vec![rule(vec![clause(matches)])]
}

/// The connection most rows look at: `source` (10.1.0.5) → 10.2.0.7:8080.
fn conn(source: Option<&Identity>) -> Connection<'_> {
    Connection {
        source,
        source_ip: "10.1.0.5".parse().unwrap(),
        destination_ip: "10.2.0.7".parse().unwrap(),
        destination_port: 8080,
    }
}

const ALLOWED: Decision = Decision::Allow;
const NOT_ALLOWED: Decision = Decision::NotAllowed;

fn denied() -> Decision {
    Decision::Denied {
        policy: "prod/deny".into(),
    }
}

/// (row, policies, client identity, expected decision), for a client prod/web unless `None`.
type Row = (&'static str, Vec<Policy>, bool, Decision);

fn check(rows: Vec<Row>) {
    let web = id("prod", "web");
    for (row, policies, with_identity, want) in rows {
        let source = with_identity.then_some(&web);
        let got = evaluate(&policies, &conn(source)).decision;
        assert_eq!(got, want, "row: {row}");
    }
}

#[test]
#[rustfmt::skip]
fn empty_forms() {
    check(vec![
        ("ALLOW, no rules: matches nothing", vec![allow(vec![])], true, NOT_ALLOWED),
        ("DENY, no rules: matches nothing", vec![deny(vec![])], true, ALLOWED),
        ("ALLOW, a rule with no clauses: matches everything", vec![allow(vec![rule(vec![])])], true, ALLOWED),
        ("DENY, a rule with no clauses: matches everything", vec![deny(vec![rule(vec![])])], true, denied()),
        ("DENY, a rule with no clauses, plaintext too", vec![deny(vec![rule(vec![])])], false, denied()),
        ("ALLOW, a clause with no matches: matches everything", vec![allow(only(vec![]))], true, ALLOWED),
        ("DENY, a clause with no matches: matches everything", vec![deny(only(vec![]))], true, denied()),
        ("ALLOW, a match with no conditions: matches nothing", vec![allow(only(vec![Match::default()]))], true, NOT_ALLOWED),
        ("DENY, a match with no conditions: matches nothing", vec![deny(only(vec![Match::default()]))], true, ALLOWED),
        (
            "an empty match is skipped, the others still count",
            vec![deny(only(vec![Match::default(), m!(destination_ports: [8080])]))],
            true,
            denied(),
        ),
        (
            "an empty match next to an empty clause: the empty clause holds, the other does not",
            vec![deny(vec![rule(vec![clause(vec![]), clause(vec![Match::default()])])])],
            true,
            ALLOWED,
        ),
    ]);
}

#[test]
#[rustfmt::skip]
fn how_rules_clauses_matches_fields_and_entries_combine() {
    let hit = || m!(destination_ports: [8080]);
    let miss = || m!(destination_ports: [443]);
    check(vec![
        ("rules OR: one of two", vec![deny(vec![rule(vec![clause(vec![miss()])]), rule(vec![clause(vec![hit()])])])], true, denied()),
        ("rules OR: neither", vec![deny(vec![rule(vec![clause(vec![miss()])]), rule(vec![clause(vec![miss()])])])], true, ALLOWED),
        ("clauses AND: both hold", vec![deny(vec![rule(vec![clause(vec![hit()]), clause(vec![hit()])])])], true, denied()),
        ("clauses AND: one fails", vec![deny(vec![rule(vec![clause(vec![hit()]), clause(vec![miss()])])])], true, ALLOWED),
        ("matches OR: one of two", vec![deny(only(vec![miss(), hit()]))], true, denied()),
        ("matches OR: neither", vec![deny(only(vec![miss(), miss()]))], true, ALLOWED),
        ("fields AND: all hold", vec![deny(only(vec![m!(namespaces: [exact("prod")], destination_ports: [8080], source_ips: [net("10.1.0.0/24")])]))], true, denied()),
        ("fields AND: one fails", vec![deny(only(vec![m!(namespaces: [exact("prod")], destination_ports: [443])]))], true, ALLOWED),
        ("entries OR", vec![deny(only(vec![m!(destination_ports: [443, 8080])]))], true, denied()),
        ("not_ entries exclude", vec![deny(only(vec![m!(destination_ports: [8080], not_source_ips: [net("10.1.0.5")])]))], true, ALLOWED),
        ("not_ entries that miss exclude nothing", vec![deny(only(vec![m!(destination_ports: [8080], not_source_ips: [net("10.9.0.0/16")])]))], true, denied()),
    ]);
}

#[test]
#[rustfmt::skip]
fn the_decision() {
    let everything = || vec![rule(vec![])];
    let web = || only(vec![m!(principals: [suffix("/sa/web")])]);
    let db = || only(vec![m!(principals: [suffix("/sa/db")])]);
    check(vec![
        ("no policy: allow", vec![], true, ALLOWED),
        ("a matching DENY denies", vec![deny(web())], true, denied()),
        ("a DENY that does not match, no ALLOW: allow", vec![deny(db())], true, ALLOWED),
        ("a matching DENY wins over a matching ALLOW", vec![allow(everything()), deny(web())], true, denied()),
        ("...in either order", vec![deny(web()), allow(everything())], true, denied()),
        ("an ALLOW applies and none matches: deny", vec![allow(db())], true, NOT_ALLOWED),
        ("one matching ALLOW among several is enough", vec![allow(db()), policy("other", Action::Allow, web())], true, ALLOWED),
        ("a dry-run DENY is not enforced", vec![dry(deny(everything()))], true, ALLOWED),
        ("a dry-run ALLOW does not make ALLOW policies apply", vec![dry(allow(db()))], true, ALLOWED),
    ]);
}

#[test]
fn dry_run_is_evaluated_and_reported_apart() {
    let web = id("prod", "web");
    let c = conn(Some(&web));
    let everything = || vec![rule(vec![])];
    let v = evaluate(&[dry(deny(everything()))], &c);
    assert_eq!(v.decision, ALLOWED);
    assert_eq!(v.dry_run, Some(denied()));
    let db = only(vec![m!(principals: [suffix("/sa/db")])]);
    let v = evaluate(&[allow(everything()), dry(allow(db))], &c);
    assert_eq!(v.decision, ALLOWED);
    assert_eq!(v.dry_run, Some(ALLOWED), "the enforced ALLOW still matches");
    let v = evaluate(&[deny(everything())], &c);
    assert_eq!(v.dry_run, None, "no dry-run policy, no dry-run decision");
    // A dry-run policy seen before the enforced ones still sees them.
    let v = evaluate(&[dry(allow(everything())), deny(everything())], &c);
    assert_eq!((v.decision, v.dry_run), (denied(), Some(denied())));
}

#[test]
#[rustfmt::skip]
fn a_client_without_identity() {
    let ns = |s| vec![deny(only(vec![m!(namespaces: [s])]))];
    let not_ns = |s| vec![deny(only(vec![m!(destination_ports: [8080], not_namespaces: [s])]))];
    let principal = |s| vec![deny(only(vec![m!(principals: [s])]))];
    check(vec![
        ("namespace presence fails", ns(StringMatch::Presence), false, ALLOWED),
        ("namespace prefix \"\" matches", ns(prefix("")), false, denied()),
        ("namespace exact \"\" matches", ns(exact("")), false, denied()),
        ("namespace exact prod fails", ns(exact("prod")), false, ALLOWED),
        ("not_namespaces presence holds", not_ns(StringMatch::Presence), false, denied()),
        ("principal presence fails", principal(StringMatch::Presence), false, ALLOWED),
        ("principal prefix \"\" fails (no spiffe:// to strip)", principal(prefix("")), false, ALLOWED),
        (
            "not_principals presence holds: the deny-plaintext idiom",
            vec![deny(only(vec![m!(not_principals: [StringMatch::Presence])]))],
            false,
            denied(),
        ),
        ("...and spares a client with an identity", vec![deny(only(vec![m!(not_principals: [StringMatch::Presence])]))], true, ALLOWED),
        ("service accounts fail", vec![deny(only(vec![m!(service_accounts: [sa("", "")])]))], false, ALLOWED),
        ("source and destination fields still apply", vec![deny(only(vec![m!(source_ips: [net("10.1.0.0/16")])]))], false, denied()),
    ]);
}

#[test]
#[rustfmt::skip]
fn every_match_field_and_its_not_form() {
    let rows: Vec<(&str, Match, bool)> = vec![
        ("namespaces exact hit", m!(namespaces: [exact("prod")]), true),
        ("namespaces exact miss", m!(namespaces: [exact("dev")]), false),
        ("namespaces prefix", m!(namespaces: [prefix("pr")]), true),
        ("namespaces suffix", m!(namespaces: [suffix("od")]), true),
        ("namespaces presence", m!(namespaces: [StringMatch::Presence]), true),
        ("not_namespaces hit", m!(not_namespaces: [exact("prod")]), false),
        ("not_namespaces miss", m!(not_namespaces: [exact("dev")]), true),
        ("principals exact (no scheme)", m!(principals: [exact("cluster.local/ns/prod/sa/web")]), true),
        ("principals with the scheme never match", m!(principals: [exact("spiffe://cluster.local/ns/prod/sa/web")]), false),
        ("principals miss", m!(principals: [exact("cluster.local/ns/prod/sa/db")]), false),
        ("principals prefix", m!(principals: [prefix("cluster.local/ns/prod/")]), true),
        ("principals suffix", m!(principals: [suffix("/sa/web")]), true),
        ("principals presence", m!(principals: [StringMatch::Presence]), true),
        ("not_principals hit", m!(not_principals: [prefix("cluster.local/ns/prod/")]), false),
        ("not_principals miss", m!(not_principals: [exact("other")]), true),
        ("source_ips hit", m!(source_ips: [net("10.1.0.0/16")]), true),
        ("source_ips miss", m!(source_ips: [net("10.9.0.0/16")]), false),
        ("source_ips bare address", m!(source_ips: [net("10.1.0.5")]), true),
        ("source_ips odd prefix", m!(source_ips: [net("10.1.0.4/31")]), true),
        ("source_ips odd prefix miss", m!(source_ips: [net("10.1.0.6/31")]), false),
        ("source_ips /0 of the family", m!(source_ips: [IpNet::ANY_V4]), true),
        ("source_ips other family", m!(source_ips: [IpNet::ANY_V6]), false),
        ("not_source_ips hit", m!(not_source_ips: [net("10.0.0.0/8")]), false),
        ("not_source_ips miss", m!(not_source_ips: [net("192.0.2.0/24")]), true),
        ("destination_ips hit", m!(destination_ips: [net("10.2.0.7/32")]), true),
        ("destination_ips miss", m!(destination_ips: [net("10.2.0.8/32")]), false),
        ("not_destination_ips hit", m!(not_destination_ips: [net("10.2.0.0/24")]), false),
        ("not_destination_ips miss", m!(not_destination_ips: [net("10.3.0.0/24")]), true),
        ("destination_ports hit", m!(destination_ports: [80, 8080]), true),
        ("destination_ports miss", m!(destination_ports: [443]), false),
        ("not_destination_ports hit", m!(not_destination_ports: [8080]), false),
        ("not_destination_ports miss", m!(not_destination_ports: [22]), true),
        ("service_accounts hit", m!(service_accounts: [sa("prod", "web")]), true),
        ("service_accounts: an empty namespace is no wildcard", m!(service_accounts: [sa("", "web")]), false),
        ("service_accounts wrong namespace", m!(service_accounts: [sa("dev", "web")]), false),
        ("service_accounts wrong account", m!(service_accounts: [sa("prod", "db")]), false),
        ("not_service_accounts hit", m!(not_service_accounts: [sa("prod", "web")]), false),
        ("not_service_accounts miss", m!(not_service_accounts: [sa("prod", "db")]), true),
    ];
    let web = id("prod", "web");
    for (row, m, want) in rows {
        let got = evaluate(&[allow(only(vec![m]))], &conn(Some(&web)));
        assert_eq!(got.decision.is_allowed(), want, "row: {row}");
    }
}

#[test]
fn ipv6_prefixes() {
    let web = id("prod", "web");
    let c = Connection {
        source_ip: "fd00:1::5".parse().unwrap(),
        ..conn(Some(&web))
    };
    let from = |n: &str| allow(only(vec![m!(source_ips: [net(n)])]));
    for (n, want) in [
        ("fd00:1::/64", true),
        ("fd00:2::/64", false),
        ("fd00:1::5", true),
        ("fd00:1::4/127", true),
        ("fd00:1::6/127", false),
        ("::/0", true),
        ("10.1.0.0/16", false),
    ] {
        assert_eq!(evaluate(&[from(n)], &c).decision.is_allowed(), want, "{n}");
    }
}

#[test]
fn prefixes_parse_and_refuse() {
    assert_eq!(net("10.1.2.3").to_string(), "10.1.2.3/32");
    assert_eq!(net("fd00::/8").to_string(), "fd00::/8");
    for bad in [
        "10.0.0.0/33",
        "fd00::/129",
        "10.0.0/8",
        "10.0.0.0/x",
        "",
        "/8",
    ] {
        assert!(bad.parse::<IpNet>().is_err(), "{bad:?} must be refused");
    }
    assert!(IpNet::new("10.0.0.0".parse().unwrap(), 4_294_967_295).is_err());
}

#[test]
#[rustfmt::skip]
fn scope_decides_where_a_policy_applies() {
    let with = |scope| Policy {
        scope,
        ..deny(vec![])
    };
    let selected = ["prod/deny".to_owned()];
    let rows = [
        ("GLOBAL: everywhere", Scope::Global, "dev", &[][..], true),
        ("NAMESPACE: its own namespace", Scope::Namespace, "prod", &[][..], true),
        ("NAMESPACE: not another", Scope::Namespace, "dev", &[][..], false),
        ("WORKLOAD_SELECTOR: a workload that lists it", Scope::WorkloadSelector, "prod", &selected[..], true),
        ("WORKLOAD_SELECTOR: listed from another namespace", Scope::WorkloadSelector, "dev", &selected[..], true),
        ("WORKLOAD_SELECTOR: a workload that does not", Scope::WorkloadSelector, "prod", &[][..], false),
    ];
    for (row, scope, namespace, selected, want) in rows {
        assert_eq!(applies(&with(scope), namespace, selected), want, "row: {row}");
    }
    let other = ["prod/denial".to_owned(), "prod".to_owned(), "/deny".to_owned()];
    assert!(!applies(&with(Scope::WorkloadSelector), "prod", &other));
}

//! Table tests of the evaluator: every match field and its `not_` form, the order of DENY and
//! ALLOW, and the edge cases of the semantics.

use super::*;

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

fn exact(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}

fn prefix(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Prefix(s.into())),
    }
}

fn suffix(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Suffix(s.into())),
    }
}

fn presence() -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}

fn net(addr: &str, length: u32) -> Net {
    let address = match addr.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    Net { address, length }
}

fn policy(name: &str, action: Action, matches: Vec<Match>) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: "prod".into(),
        scope: Scope::Namespace as i32,
        action: action as i32,
        rules: vec![Rule {
            clauses: vec![Clause { matches }],
        }],
        dry_run: false,
    }
}

/// The connection most cases look at: prod/web (10.1.0.5) → 10.2.0.7:8080.
fn conn(source: Option<&Identity>) -> Connection<'_> {
    Connection {
        source,
        source_ip: "10.1.0.5".parse().unwrap(),
        destination_ip: "10.2.0.7".parse().unwrap(),
        destination_port: 8080,
    }
}

/// One ALLOW policy with one match: does the connection from prod/web get in?
fn allowed_by(m: Match) -> bool {
    let web = id("prod", "web");
    evaluate([&policy("p", Action::Allow, vec![m])], &conn(Some(&web))).is_allowed()
}

#[test]
fn every_match_field_and_its_not_form() {
    let cases: Vec<(&str, Match, bool)> = vec![
        (
            "namespaces exact hit",
            Match {
                namespaces: vec![exact("prod")],
                ..Default::default()
            },
            true,
        ),
        (
            "namespaces exact miss",
            Match {
                namespaces: vec![exact("dev")],
                ..Default::default()
            },
            false,
        ),
        (
            "namespaces prefix",
            Match {
                namespaces: vec![prefix("pr")],
                ..Default::default()
            },
            true,
        ),
        (
            "namespaces suffix",
            Match {
                namespaces: vec![suffix("od")],
                ..Default::default()
            },
            true,
        ),
        (
            "namespaces presence",
            Match {
                namespaces: vec![presence()],
                ..Default::default()
            },
            true,
        ),
        (
            "namespaces OR within the list",
            Match {
                namespaces: vec![exact("dev"), exact("prod")],
                ..Default::default()
            },
            true,
        ),
        (
            "not_namespaces hit",
            Match {
                not_namespaces: vec![exact("prod")],
                ..Default::default()
            },
            false,
        ),
        (
            "not_namespaces miss",
            Match {
                not_namespaces: vec![exact("dev")],
                ..Default::default()
            },
            true,
        ),
        (
            "principals exact",
            Match {
                principals: vec![exact("cluster.local/ns/prod/sa/web")],
                ..Default::default()
            },
            true,
        ),
        (
            "principals miss",
            Match {
                principals: vec![exact("cluster.local/ns/prod/sa/db")],
                ..Default::default()
            },
            false,
        ),
        (
            "principals suffix",
            Match {
                principals: vec![suffix("/sa/web")],
                ..Default::default()
            },
            true,
        ),
        (
            "not_principals hit",
            Match {
                not_principals: vec![prefix("cluster.local/ns/prod/")],
                ..Default::default()
            },
            false,
        ),
        (
            "not_principals miss",
            Match {
                not_principals: vec![exact("other")],
                ..Default::default()
            },
            true,
        ),
        (
            "source_ips hit",
            Match {
                source_ips: vec![net("10.1.0.0", 16)],
                ..Default::default()
            },
            true,
        ),
        (
            "source_ips miss",
            Match {
                source_ips: vec![net("10.9.0.0", 16)],
                ..Default::default()
            },
            false,
        ),
        (
            "source_ips /32",
            Match {
                source_ips: vec![net("10.1.0.5", 32)],
                ..Default::default()
            },
            true,
        ),
        (
            "source_ips odd prefix",
            Match {
                source_ips: vec![net("10.1.0.4", 31)],
                ..Default::default()
            },
            true,
        ),
        (
            "source_ips odd prefix miss",
            Match {
                source_ips: vec![net("10.1.0.6", 31)],
                ..Default::default()
            },
            false,
        ),
        (
            "source_ips other family",
            Match {
                source_ips: vec![net("::", 0)],
                ..Default::default()
            },
            false,
        ),
        (
            "not_source_ips hit",
            Match {
                not_source_ips: vec![net("10.0.0.0", 8)],
                ..Default::default()
            },
            false,
        ),
        (
            "not_source_ips miss",
            Match {
                not_source_ips: vec![net("192.0.2.0", 24)],
                ..Default::default()
            },
            true,
        ),
        (
            "destination_ips hit",
            Match {
                destination_ips: vec![net("10.2.0.7", 32)],
                ..Default::default()
            },
            true,
        ),
        (
            "destination_ips miss",
            Match {
                destination_ips: vec![net("10.2.0.8", 32)],
                ..Default::default()
            },
            false,
        ),
        (
            "not_destination_ips hit",
            Match {
                not_destination_ips: vec![net("10.2.0.0", 24)],
                ..Default::default()
            },
            false,
        ),
        (
            "destination_ports hit",
            Match {
                destination_ports: vec![80, 8080],
                ..Default::default()
            },
            true,
        ),
        (
            "destination_ports miss",
            Match {
                destination_ports: vec![443],
                ..Default::default()
            },
            false,
        ),
        (
            "not_destination_ports hit",
            Match {
                not_destination_ports: vec![8080],
                ..Default::default()
            },
            false,
        ),
        (
            "not_destination_ports miss",
            Match {
                not_destination_ports: vec![22],
                ..Default::default()
            },
            true,
        ),
        (
            "service_accounts hit",
            Match {
                service_accounts: vec![ServiceAccountMatch {
                    namespace: "prod".into(),
                    service_account: "web".into(),
                }],
                ..Default::default()
            },
            true,
        ),
        (
            "service_accounts any namespace",
            Match {
                service_accounts: vec![ServiceAccountMatch {
                    namespace: String::new(),
                    service_account: "web".into(),
                }],
                ..Default::default()
            },
            true,
        ),
        (
            "service_accounts wrong namespace",
            Match {
                service_accounts: vec![ServiceAccountMatch {
                    namespace: "dev".into(),
                    service_account: "web".into(),
                }],
                ..Default::default()
            },
            false,
        ),
        (
            "not_service_accounts hit",
            Match {
                not_service_accounts: vec![ServiceAccountMatch {
                    namespace: "prod".into(),
                    service_account: "web".into(),
                }],
                ..Default::default()
            },
            false,
        ),
        (
            "fields AND: one fails",
            Match {
                namespaces: vec![exact("prod")],
                destination_ports: vec![443],
                ..Default::default()
            },
            false,
        ),
        (
            "fields AND: all hold",
            Match {
                namespaces: vec![exact("prod")],
                destination_ports: vec![8080],
                source_ips: vec![net("10.1.0.0", 24)],
                ..Default::default()
            },
            true,
        ),
        ("an empty match matches all", Match::default(), true),
    ];
    for (name, m, want) in cases {
        assert_eq!(allowed_by(m), want, "{name}");
    }
}

#[test]
fn ipv6_prefixes() {
    let web = id("prod", "web");
    let c = Connection {
        source_ip: "fd00:1::5".parse().unwrap(),
        ..conn(Some(&web))
    };
    let p = |n| {
        policy(
            "p",
            Action::Allow,
            vec![Match {
                source_ips: vec![n],
                ..Default::default()
            }],
        )
    };
    assert!(evaluate([&p(net("fd00:1::", 64))], &c).is_allowed());
    assert!(!evaluate([&p(net("fd00:2::", 64))], &c).is_allowed());
    assert!(!evaluate([&p(net("10.1.0.0", 16))], &c).is_allowed());
}

#[test]
fn deny_wins_over_allow_and_no_allow_means_allow() {
    let web = id("prod", "web");
    let c = conn(Some(&web));
    let allow_all = policy("allow-all", Action::Allow, vec![Match::default()]);
    let deny_web = policy(
        "deny-web",
        Action::Deny,
        vec![Match {
            principals: vec![suffix("/sa/web")],
            ..Default::default()
        }],
    );
    let deny_db = policy(
        "deny-db",
        Action::Deny,
        vec![Match {
            principals: vec![suffix("/sa/db")],
            ..Default::default()
        }],
    );
    assert_eq!(
        evaluate([&allow_all, &deny_web], &c),
        Decision::Denied {
            policy: "prod/deny-web".into()
        }
    );
    assert_eq!(
        evaluate([&deny_web, &allow_all], &c),
        Decision::Denied {
            policy: "prod/deny-web".into()
        }
    );
    // Only a DENY that does not match: no ALLOW policy, so allowed.
    assert_eq!(evaluate([&deny_db], &c), Decision::Allow);
    assert_eq!(evaluate([], &c), Decision::Allow);
    // An ALLOW exists and none matches.
    let allow_db = policy(
        "allow-db",
        Action::Allow,
        vec![Match {
            principals: vec![suffix("/sa/db")],
            ..Default::default()
        }],
    );
    assert_eq!(evaluate([&allow_db], &c), Decision::NotAllowed);
    assert_eq!(
        evaluate([&allow_db, &allow_all], &c),
        Decision::Allow,
        "some ALLOW matching is enough"
    );
}

#[test]
fn rules_or_clauses_and_matches_or() {
    let web = id("prod", "web");
    let c = conn(Some(&web));
    let port = |p| Match {
        destination_ports: vec![p],
        ..Default::default()
    };
    let with_rules = |rules: Vec<Rule>| Authorization {
        rules,
        ..policy("p", Action::Allow, vec![])
    };
    // Clauses AND: 8080 and 443 cannot both hold.
    let and = with_rules(vec![Rule {
        clauses: vec![
            Clause {
                matches: vec![port(8080)],
            },
            Clause {
                matches: vec![port(443)],
            },
        ],
    }]);
    assert!(!evaluate([&and], &c).is_allowed());
    // Matches OR inside a clause.
    let or = with_rules(vec![Rule {
        clauses: vec![Clause {
            matches: vec![port(443), port(8080)],
        }],
    }]);
    assert!(evaluate([&or], &c).is_allowed());
    // Rules OR.
    let rules_or = with_rules(vec![
        Rule {
            clauses: vec![Clause {
                matches: vec![port(443)],
            }],
        },
        Rule {
            clauses: vec![Clause {
                matches: vec![port(8080)],
            }],
        },
    ]);
    assert!(evaluate([&rules_or], &c).is_allowed());
    // Empty rules never match: an ALLOW with none allows nobody, a DENY with none denies nobody.
    let empty_allow = with_rules(vec![Rule { clauses: vec![] }]);
    assert_eq!(evaluate([&empty_allow], &c), Decision::NotAllowed);
    let empty_deny = Authorization {
        action: Action::Deny as i32,
        ..with_rules(vec![])
    };
    assert_eq!(evaluate([&empty_deny], &c), Decision::Allow);
}

#[test]
fn dry_run_policies_do_not_enforce() {
    let web = id("prod", "web");
    let deny_all = Authorization {
        dry_run: true,
        ..policy("d", Action::Deny, vec![Match::default()])
    };
    assert!(evaluate([&deny_all], &conn(Some(&web))).is_allowed());
}

#[test]
fn plaintext_has_no_identity_to_match() {
    // Identity fields never match without an identity; their not_ forms then hold.
    let by_ns = policy(
        "p",
        Action::Allow,
        vec![Match {
            namespaces: vec![presence()],
            ..Default::default()
        }],
    );
    assert_eq!(evaluate([&by_ns], &conn(None)), Decision::NotAllowed);
    let by_sa = policy(
        "p",
        Action::Allow,
        vec![Match {
            service_accounts: vec![ServiceAccountMatch {
                namespace: String::new(),
                service_account: "web".into(),
            }],
            ..Default::default()
        }],
    );
    assert!(!evaluate([&by_sa], &conn(None)).is_allowed());
    let not_principal = policy(
        "p",
        Action::Deny,
        vec![Match {
            not_principals: vec![presence()],
            ..Default::default()
        }],
    );
    assert!(
        !evaluate([&not_principal], &conn(None)).is_allowed(),
        "deny anything without a principal"
    );
    let by_ip = policy(
        "p",
        Action::Allow,
        vec![Match {
            source_ips: vec![net("10.1.0.0", 16)],
            ..Default::default()
        }],
    );
    assert!(evaluate([&by_ip], &conn(None)).is_allowed());
}

#[test]
fn unknown_action_fails_closed() {
    let web = id("prod", "web");
    let odd = Authorization {
        action: 7,
        ..policy("odd", Action::Allow, vec![Match::default()])
    };
    assert!(!evaluate([&odd], &conn(Some(&web))).is_allowed());
}

#[test]
fn scope_decides_where_a_policy_applies() {
    let none: &[String] = &[];
    let mut p = policy("p", Action::Deny, vec![]);
    assert!(applies(&p, "prod", none) && !applies(&p, "dev", none));
    p.scope = Scope::Global as i32;
    assert!(applies(&p, "dev", none));
    p.scope = Scope::WorkloadSelector as i32;
    assert!(!applies(&p, "prod", none), "not selected by the workload");
    assert!(applies(&p, "prod", &["prod/p".to_string()]));
    assert!(!applies(&p, "prod", &["prod/other".to_string()]));
}

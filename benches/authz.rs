//! Policy evaluation with 10,000 policies in the store (ztunnel benches the same count): one
//! decision as the HBONE server makes it per stream — the state's candidates for the
//! destination workload, then `authz::evaluate` over them.
//! - `spread`: 10,000 NAMESPACE policies over 1,000 namespaces plus 10 GLOBAL ones, so one
//!   decision sees 20 candidates (the common shape: policies live next to their workloads);
//! - `one_namespace`: all 10,000 in the destination's namespace and none matching, so one
//!   decision evaluates every one (the worst case).

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use hboned::authz::{
    self, Action, Clause, Connection, IpNet, Match, Policy, Rule, Scope, StringMatch,
};
use hboned::identity::Identity;
use hboned::state::State;

/// A policy shaped like a typical `AuthorizationPolicy`: a `from` clause on principals and
/// source ranges, a `to` clause on ports; it never matches the benchmark's client.
fn policy(i: usize, namespace: &str, scope: Scope) -> Policy {
    let from = Match {
        principals: vec![
            StringMatch::Exact(format!("cluster.local/ns/{namespace}/sa/client-{i}")),
            StringMatch::Prefix(format!("cluster.local/ns/other-{i}/")),
        ],
        source_ips: vec![format!("10.{}.0.0/16", i % 250).parse::<IpNet>().unwrap()],
        ..Default::default()
    };
    let to = Match {
        destination_ports: vec![8080, 9090],
        ..Default::default()
    };
    Policy {
        name: format!("p{i}"),
        namespace: namespace.into(),
        scope,
        action: if i.is_multiple_of(2) {
            Action::Allow
        } else {
            Action::Deny
        },
        rules: vec![Rule {
            clauses: vec![
                Clause {
                    matches: vec![from],
                },
                Clause { matches: vec![to] },
            ],
        }],
        dry_run: false,
    }
}

fn decide(state: &State, conn: &Connection<'_>) -> bool {
    authz::evaluate(state.policies_for("ns-42", &[]), conn)
        .decision
        .is_allowed()
}

fn benches(c: &mut Criterion) {
    let client = Identity::new("cluster.local", "web", "frontend").unwrap();
    let conn = Connection {
        source: Some(&client),
        source_ip: "192.168.7.9".parse::<IpAddr>().unwrap(),
        destination_ip: "10.42.0.7".parse().unwrap(),
        destination_port: 8080,
    };

    let mut spread = State::default();
    for i in 0..10_000 {
        spread.upsert_policy(policy(i, &format!("ns-{}", i % 1000), Scope::Namespace));
    }
    for i in 0..10 {
        spread.upsert_policy(policy(10_000 + i, "istio-system", Scope::Global));
    }
    assert_eq!(spread.policies_for("ns-42", &[]).count(), 20);
    let mut one_namespace = State::default();
    for i in 0..10_000 {
        one_namespace.upsert_policy(policy(i, "ns-42", Scope::Namespace));
    }
    assert_eq!(one_namespace.policies_for("ns-42", &[]).count(), 10_000);

    let mut group = c.benchmark_group("authz_10k_policies");
    group.bench_function("spread", |b| {
        b.iter(|| black_box(decide(&spread, black_box(&conn))))
    });
    group.bench_function("one_namespace", |b| {
        b.iter(|| black_box(decide(&one_namespace, black_box(&conn))))
    });
    group.finish();
}

criterion_group!(authz_bench, benches);
criterion_main!(authz_bench);

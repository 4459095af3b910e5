//! L4 authorization (DESIGN §5) as pure functions of the policies and one connection's facts:
//! no I/O, no state of its own. Any matching DENY denies; with no ALLOW policy, allow;
//! otherwise some ALLOW must match. Rules OR, clauses AND, matches OR; the fields of one match
//! AND; a `not_*` field must not match; a rule without clauses never matches. Dry-run policies
//! are evaluated by nobody here (they only log, elsewhere).
//!
//! Enforcement (401 on 15008, resets on 15006, re-checking live connections) builds on this.

use std::net::IpAddr;

use crate::identity::Identity;
use crate::proto::istio::security::string_match::MatchType;
use crate::proto::istio::security::{
    Action, Address as Net, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch,
    StringMatch,
};

/// The facts about one connection that policies look at.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The client's identity (from its certificate); `None` for plaintext (15006).
    pub source: Option<&'a Identity>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// The outcome, with the reason for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// A DENY policy matched.
    Denied {
        policy: String,
    },
    /// ALLOW policies exist and none matched.
    NotAllowed,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        *self == Decision::Allow
    }
}

/// Whether `policy` applies to a workload in `namespace` whose selected policies (its
/// `authorization_policies`, `namespace/name`) are `selected`: GLOBAL ones everywhere,
/// NAMESPACE ones in their namespace, WORKLOAD_SELECTOR ones where the workload names them.
pub fn applies(policy: &Authorization, namespace: &str, selected: &[String]) -> bool {
    match Scope::try_from(policy.scope) {
        Ok(Scope::Global) => true,
        Ok(Scope::Namespace) => policy.namespace == namespace,
        Ok(Scope::WorkloadSelector) => {
            let key = format!("{}/{}", policy.namespace, policy.name);
            selected.contains(&key)
        }
        Err(_) => false,
    }
}

/// Evaluates the policies that apply to the destination (see [`applies`]).
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &Connection<'_>,
) -> Decision {
    let (mut any_allow, mut allowed) = (false, false);
    for policy in policies.into_iter().filter(|p| !p.dry_run) {
        let matched = policy.rules.iter().any(|r| rule_matches(r, conn));
        match Action::try_from(policy.action) {
            Ok(Action::Deny) if matched => {
                return Decision::Denied {
                    policy: format!("{}/{}", policy.namespace, policy.name),
                };
            }
            Ok(Action::Deny) => {}
            Ok(Action::Allow) => {
                any_allow = true;
                allowed |= matched;
            }
            // An action this proxy does not know: fail closed, as a matching DENY would.
            Err(_) => {
                return Decision::Denied {
                    policy: format!("{}/{} (unknown action)", policy.namespace, policy.name),
                };
            }
        }
    }
    if !any_allow || allowed {
        Decision::Allow
    } else {
        Decision::NotAllowed
    }
}

fn rule_matches(rule: &Rule, conn: &Connection<'_>) -> bool {
    !rule.clauses.is_empty() && rule.clauses.iter().all(|c| clause_matches(c, conn))
}

fn clause_matches(clause: &Clause, conn: &Connection<'_>) -> bool {
    clause.matches.iter().any(|m| match_matches(m, conn))
}

/// A field list matches when it is empty (not constrained) or some entry matches.
fn any_or_empty<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(hit)
}

/// A `not_*` list passes when none of its entries matches.
fn none<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(hit)
}

fn match_matches(m: &Match, conn: &Connection<'_>) -> bool {
    let namespace = conn.source.map(Identity::namespace);
    // Istio principals are SPIFFE IDs without the scheme: `td/ns/<ns>/sa/<sa>`.
    let principal = conn.source.map(|id| {
        let full = id.to_string();
        full.trim_start_matches("spiffe://").to_owned()
    });
    let ns_hit = |s: &StringMatch| string_matches(s, namespace);
    let principal_hit = |s: &StringMatch| string_matches(s, principal.as_deref());
    let src_hit = |n: &Net| net_contains(n, conn.source_ip);
    let dst_hit = |n: &Net| net_contains(n, conn.destination_ip);
    let port_hit = |p: &u32| *p == u32::from(conn.destination_port);
    let sa_hit = |s: &ServiceAccountMatch| service_account_matches(s, conn.source);
    any_or_empty(&m.namespaces, ns_hit)
        && none(&m.not_namespaces, ns_hit)
        && any_or_empty(&m.principals, principal_hit)
        && none(&m.not_principals, principal_hit)
        && any_or_empty(&m.source_ips, src_hit)
        && none(&m.not_source_ips, src_hit)
        && any_or_empty(&m.destination_ips, dst_hit)
        && none(&m.not_destination_ips, dst_hit)
        && any_or_empty(&m.destination_ports, port_hit)
        && none(&m.not_destination_ports, port_hit)
        && any_or_empty(&m.service_accounts, sa_hit)
        && none(&m.not_service_accounts, sa_hit)
}

/// A string condition against a value the connection may not have (no identity).
fn string_matches(m: &StringMatch, value: Option<&str>) -> bool {
    let Some(value) = value else { return false };
    match &m.match_type {
        Some(MatchType::Exact(s)) => value == s,
        Some(MatchType::Prefix(s)) => value.starts_with(s.as_str()),
        Some(MatchType::Suffix(s)) => value.ends_with(s.as_str()),
        Some(MatchType::Presence(_)) => !value.is_empty(),
        None => false,
    }
}

fn service_account_matches(m: &ServiceAccountMatch, source: Option<&Identity>) -> bool {
    source.is_some_and(|id| {
        id.service_account() == m.service_account
            && (m.namespace.is_empty() || id.namespace() == m.namespace)
    })
}

/// Whether the prefix `net` (validated by xDS conversion) contains `ip`.
fn net_contains(net: &Net, ip: IpAddr) -> bool {
    let (addr, len) = (&net.address, net.length as usize);
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    if addr.len() != bytes.len() || len > bytes.len() * 8 {
        return false;
    }
    let (full, rest) = (len / 8, len % 8);
    if addr[..full] != bytes[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        addr[full] & mask == bytes[full] & mask
    }
}

#[cfg(test)]
mod tests;

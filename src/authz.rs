//! L4 authorization: Istio's `istio.security.Authorization` semantics as one pure function,
//! [`evaluate`], over the domain type [`Policy`]. No I/O, no state, no protobuf: policies are
//! converted once where they enter (xDS in `xds::convert`, the config file in [`config`]).
//!
//! The semantics, as ztunnel (`src/rbac.rs`) and istiod decide them:
//! - A policy matches a connection when any of its rules does (rules OR). A rule matches when
//!   all of its clauses do (clauses AND); a clause when any of its matches does (matches OR); a
//!   match when every field it sets holds (fields AND), a field when any entry hits (entries
//!   OR), and a `not_*` field when no entry hits.
//! - Empty forms: a policy with no rules matches nothing; a rule with no clauses matches
//!   everything (istiod's encoding of `rules: [{}]`); a clause with no matches matches
//!   everything; a match with no conditions matches nothing (it is skipped).
//! - Decision: any matching DENY denies. Otherwise, if any ALLOW policy applies to the
//!   workload and none matches, deny; otherwise allow. Dry-run policies are evaluated into a
//!   separate [`Verdict::dry_run`] decision (for logs and metrics), never enforced.
//! - Scopes ([`applies`]): GLOBAL applies to every workload, NAMESPACE to the workloads of the
//!   policy's namespace, WORKLOAD_SELECTOR to the workloads that list the policy.
//! - A client without an identity (plaintext on 15006) has the empty string as its namespace,
//!   so `presence` fails and `prefix: ""` matches there; principals and service accounts never
//!   match it (ztunnel strips `spiffe://` from the principal and fails when it is absent). A
//!   service-account match with an empty namespace matches only an empty namespace: it is no
//!   wildcard.

use std::cell::OnceCell;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::identity::Identity;

pub(crate) mod config;
pub(crate) use config::PolicyConfig;

/// The facts about one connection that policies look at.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The client's identity (from its certificate); `None` for plaintext (15006).
    pub source: Option<&'a Identity>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// Where a policy applies. (Serialized for `/config_dump` as ztunnel's admin page names it,
/// `Global`, `Namespace`, `WorkloadSelector`; likewise the types below: what
/// `istioctl ztunnel-config policies` reads.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Scope {
    /// Every workload.
    Global,
    /// The workloads of the policy's namespace.
    Namespace,
    /// The workloads that list the policy (`Workload.authorization_policies`).
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// One authorization policy (the domain form of `istio.security.Authorization`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Rules OR; no rules: the policy matches nothing.
    pub rules: Vec<Rule>,
    /// Evaluated and reported, never enforced.
    pub dry_run: bool,
}

/// Clauses AND; no clauses: the rule matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// Matches OR; no matches: the clause matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Fields AND, entries within a field OR; a `not_*` field holds when none of its entries hits.
/// A match that sets no field matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// SPIFFE IDs without the scheme: `<td>/ns/<ns>/sa/<sa>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

/// A condition on a string (a namespace or a principal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl serde::Serialize for StringMatch {
    /// `{"Exact": "x"}`, …, and `{"Presence": []}` (ztunnel's empty tuple variant).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        match self {
            StringMatch::Exact(v) => map.serialize_entry("Exact", v)?,
            StringMatch::Prefix(v) => map.serialize_entry("Prefix", v)?,
            StringMatch::Suffix(v) => map.serialize_entry("Suffix", v)?,
            StringMatch::Presence => map.serialize_entry("Presence", &[(); 0])?,
        }
        map.end()
    }
}

/// A service account in a namespace; both must be equal (an empty namespace is no wildcard).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// An IP prefix (`10.0.0.0/8`, `fd00::/64`); a bare address is a /32 or /128.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    len: u8,
}

/// Why an address entry cannot be a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("{0:?} is not an IP address or CIDR")]
    Address(String),
    #[error("prefix length {len} is too long for {addr}")]
    Length { addr: IpAddr, len: u32 },
}

impl IpNet {
    /// Every IPv4 address.
    pub(crate) const ANY_V4: IpNet = IpNet {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    /// Every IPv6 address.
    pub(crate) const ANY_V6: IpNet = IpNet {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    };

    /// The prefix of `len` bits at `addr` (bits past the prefix are ignored).
    pub(crate) fn new(addr: IpAddr, len: u32) -> Result<Self, NetError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        match u8::try_from(len) {
            Ok(l) if len <= max => Ok(IpNet { addr, len: l }),
            _ => Err(NetError::Length { addr, len }),
        }
    }

    /// Whether `ip` is inside the prefix (never across families).
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(net.to_bits()),
                u128::from(ip.to_bits()),
                32,
                self.len,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(net.to_bits(), ip.to_bits(), 128, self.len)
            }
            _ => false,
        }
    }
}

/// Whether the first `len` of `width` bits of `a` and `b` agree.
fn prefix_eq(a: u128, b: u128, width: u8, len: u8) -> bool {
    len == 0 || (a ^ b) >> (width - len) == 0
}

impl FromStr for IpNet {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::Address(s.to_owned());
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len.parse::<u32>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        IpNet::new(addr, len.unwrap_or(max))
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The outcome for one connection, with the reason for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// A DENY policy (`namespace/name`) matched.
    Denied {
        policy: String,
    },
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        *self == Decision::Allow
    }
}

/// The enforced decision, and the one dry-run policies would have made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// When dry-run policies apply: the decision with them enforced too.
    pub dry_run: Option<Decision>,
}

/// Whether `policy` applies to a workload in `namespace` that lists the policies `selected`
/// (`namespace/name`).
pub fn applies(policy: &Policy, namespace: &str, selected: &[String]) -> bool {
    match policy.scope {
        Scope::Global => true,
        Scope::Namespace => policy.namespace == namespace,
        Scope::WorkloadSelector => selected.iter().any(|key| policy.is_named(key)),
    }
}

/// Decides `conn` against `policies`: those that apply to the destination workload (see
/// [`applies`]; the state's index hands exactly those over).
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    conn: &Connection<'_>,
) -> Verdict {
    let facts = Facts::new(conn);
    let mut enforced = Tally::default();
    let mut with_dry_run: Option<Tally> = None;
    for policy in policies {
        let matched = policy.matches(&facts);
        if policy.dry_run {
            with_dry_run
                .get_or_insert_with(|| enforced.clone())
                .add(policy, matched);
        } else {
            enforced.add(policy, matched);
            if let Some(t) = &mut with_dry_run {
                t.add(policy, matched);
            }
        }
    }
    Verdict {
        decision: enforced.decision(),
        dry_run: with_dry_run.map(|t| t.decision()),
    }
}

/// DENY and ALLOW results so far.
#[derive(Debug, Clone, Default)]
struct Tally<'a> {
    denied_by: Option<&'a Policy>,
    any_allow: bool,
    allowed: bool,
}

impl<'a> Tally<'a> {
    fn add(&mut self, policy: &'a Policy, matched: bool) {
        match policy.action {
            Action::Deny if matched => {
                self.denied_by.get_or_insert(policy);
            }
            Action::Deny => {}
            Action::Allow => {
                self.any_allow = true;
                self.allowed |= matched;
            }
        }
    }

    fn decision(&self) -> Decision {
        match self.denied_by {
            Some(p) => Decision::Denied { policy: p.key() },
            None if self.any_allow && !self.allowed => Decision::NotAllowed,
            None => Decision::Allow,
        }
    }
}

/// The connection as the match fields see it; the principal is built at most once.
struct Facts<'a> {
    conn: &'a Connection<'a>,
    namespace: &'a str,
    principal: OnceCell<String>,
}

impl<'a> Facts<'a> {
    fn new(conn: &'a Connection<'a>) -> Self {
        Facts {
            conn,
            namespace: conn.source.map_or("", Identity::namespace),
            principal: OnceCell::new(),
        }
    }

    /// `<td>/ns/<ns>/sa/<sa>`, or `None` without an identity.
    fn principal(&self) -> Option<&str> {
        let id = self.conn.source?;
        Some(self.principal.get_or_init(|| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain(),
                id.namespace(),
                id.service_account()
            )
        }))
    }
}

impl Policy {
    /// `namespace/name`, as workloads and xDS name it.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `key` is this policy's `namespace/name`.
    pub fn is_named(&self, key: &str) -> bool {
        key.split_once('/')
            .is_some_and(|(ns, name)| ns == self.namespace && name == self.name)
    }

    fn matches(&self, facts: &Facts<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.clauses.iter().all(|clause| {
                clause.matches.is_empty() || clause.matches.iter().any(|m| m.matches(facts))
            })
        })
    }
}

impl Match {
    /// Whether the match sets no condition at all (and so matches nothing).
    pub(crate) fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
    }

    fn matches(&self, facts: &Facts<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let conn = facts.conn;
        let ns = |s: &StringMatch| s.matches(facts.namespace);
        let principal = |s: &StringMatch| facts.principal().is_some_and(|p| s.matches(p));
        let src = |n: &IpNet| n.contains(conn.source_ip);
        let dst = |n: &IpNet| n.contains(conn.destination_ip);
        let port = |p: &u16| *p == conn.destination_port;
        let sa = |s: &ServiceAccountMatch| s.matches(conn.source);
        field(&self.namespaces, &self.not_namespaces, ns)
            && field(&self.principals, &self.not_principals, principal)
            && field(&self.source_ips, &self.not_source_ips, src)
            && field(&self.destination_ips, &self.not_destination_ips, dst)
            && field(&self.destination_ports, &self.not_destination_ports, port)
            && field(&self.service_accounts, &self.not_service_accounts, sa)
    }
}

/// A field and its `not_` form: some entry of `any` hits (or `any` is empty), and no entry of
/// `none` does.
fn field<T>(any: &[T], none: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (any.is_empty() || any.iter().any(&hit)) && !none.iter().any(hit)
}

impl StringMatch {
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl ServiceAccountMatch {
    fn matches(&self, source: Option<&Identity>) -> bool {
        source.is_some_and(|id| {
            id.service_account() == self.service_account && id.namespace() == self.namespace
        })
    }
}

#[cfg(test)]
mod tests;

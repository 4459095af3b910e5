//! The policy entries of the config file (README, "Authorization policies") and their strict
//! conversion into [`Policy`]. The file is the operator's: an entry that cannot be read refuses
//! the whole file, where an unreadable xDS entry is dropped (`xds::convert`).

use serde::{Deserialize, Serialize};

use super::{
    Action, Clause, IpNet, Match, NetError, Policy, Rule, Scope, ServiceAccountMatch, StringMatch,
};

/// An authorization policy, shaped like `istio.security.Authorization`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy's name, unique within its namespace.
    pub name: String,
    /// The namespace it lives in (and, with scope `namespace`, the workloads it applies to).
    pub namespace: String,
    /// `namespace` (default: workloads in `namespace`) or `global`.
    #[serde(default)]
    pub scope: PolicyScope,
    /// `allow` or `deny`.
    pub action: PolicyAction,
    /// Evaluate and report (logs, `hboned_policy_dry_run_decisions_total`), never enforce.
    #[serde(default)]
    pub dry_run: bool,
    /// Rules OR; each rule's clauses AND; each clause's matches OR. `[]` matches nothing;
    /// `[[]]` (a rule with no clauses) matches everything, as istiod encodes `rules: [{}]`.
    pub rules: Vec<Vec<Vec<MatchConfig>>>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyScope {
    /// The workloads of the policy's namespace.
    #[default]
    Namespace,
    /// Every workload.
    Global,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyAction {
    /// With any ALLOW policy applying, a connection must match one of them.
    Allow,
    /// A connection matching any DENY policy is refused.
    Deny,
}

/// One match: every field given must hold (`not*` fields must not).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MatchConfig {
    /// The client's namespace (from its certificate).
    pub namespaces: Vec<StringMatchConfig>,
    /// The client's namespace must match none of these.
    pub not_namespaces: Vec<StringMatchConfig>,
    /// The client's principal, `<trust-domain>/ns/<ns>/sa/<sa>`.
    pub principals: Vec<StringMatchConfig>,
    /// The client's principal must match none of these.
    pub not_principals: Vec<StringMatchConfig>,
    /// The client's address: `10.0.0.0/8`, `fd00::/64` or a bare address.
    pub source_ips: Vec<String>,
    /// The client's address must be in none of these.
    pub not_source_ips: Vec<String>,
    /// The address the client dialed.
    pub destination_ips: Vec<String>,
    /// The address the client dialed must be in none of these.
    pub not_destination_ips: Vec<String>,
    /// The port the client dialed (1–65535).
    pub destination_ports: Vec<u32>,
    /// The port the client dialed must be none of these.
    pub not_destination_ports: Vec<u32>,
    /// The client's service account (namespace and name).
    pub service_accounts: Vec<ServiceAccountConfig>,
    /// The client's service account must be none of these.
    pub not_service_accounts: Vec<ServiceAccountConfig>,
}

/// Exactly one of `exact`, `prefix`, `suffix` or `presence: true`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StringMatchConfig {
    /// The whole value.
    pub exact: Option<String>,
    /// The value starts with this.
    pub prefix: Option<String>,
    /// The value ends with this.
    pub suffix: Option<String>,
    /// `true`: any non-empty value.
    pub presence: Option<bool>,
}

impl StringMatchConfig {
    fn to_match(&self) -> Result<StringMatch, PolicyError> {
        use StringMatch as S;
        match (&self.exact, &self.prefix, &self.suffix, self.presence) {
            (Some(v), None, None, None) => Ok(S::Exact(v.clone())),
            (None, Some(v), None, None) => Ok(S::Prefix(v.clone())),
            (None, None, Some(v), None) => Ok(S::Suffix(v.clone())),
            (None, None, None, Some(true)) => Ok(S::Presence),
            _ => Err(PolicyError::StringMatch),
        }
    }
}

/// A service account by namespace and name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountConfig {
    /// Its namespace; empty matches only a client without one (it is no wildcard).
    #[serde(default)]
    pub namespace: String,
    /// Its name.
    pub service_account: String,
}

/// Why a policy of the config file cannot be read. The file is the operator's: a bad entry
/// refuses the whole config rather than being dropped (as an unreadable xDS entry is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PolicyError {
    #[error("a string match takes exactly one of exact, prefix, suffix or presence: true")]
    StringMatch,
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("port {0} is out of range")]
    Port(u32),
}

impl PolicyConfig {
    /// The policy as the evaluator takes it. `rules: []` matches nothing, `rules: [[]]` (a
    /// rule with no clauses) and `rules: [[[]]]` (a clause with no matches) match everything,
    /// `rules: [[[{}]]]` (a match with no conditions) matches nothing.
    pub(crate) fn to_policy(&self) -> Result<Policy, PolicyError> {
        let rules = self
            .rules
            .iter()
            .map(|rule| {
                let clauses = rule
                    .iter()
                    .map(|clause| {
                        let matches: Result<_, _> =
                            clause.iter().map(MatchConfig::to_match).collect();
                        matches.map(|matches| Clause { matches })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Rule { clauses })
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Policy {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            scope: match self.scope {
                PolicyScope::Namespace => Scope::Namespace,
                PolicyScope::Global => Scope::Global,
            },
            action: match self.action {
                PolicyAction::Allow => Action::Allow,
                PolicyAction::Deny => Action::Deny,
            },
            rules,
            dry_run: self.dry_run,
        })
    }
}

impl MatchConfig {
    fn to_match(&self) -> Result<Match, PolicyError> {
        let strings = |list: &[StringMatchConfig]| -> Result<Vec<_>, PolicyError> {
            list.iter().map(StringMatchConfig::to_match).collect()
        };
        let nets = |list: &[String]| -> Result<Vec<IpNet>, PolicyError> {
            Ok(list.iter().map(|n| n.parse()).collect::<Result<_, _>>()?)
        };
        let ports = |list: &[u32]| -> Result<Vec<u16>, PolicyError> {
            list.iter()
                .map(|p| u16::try_from(*p).map_err(|_| PolicyError::Port(*p)))
                .collect()
        };
        let accounts = |list: &[ServiceAccountConfig]| -> Vec<ServiceAccountMatch> {
            list.iter()
                .map(|a| ServiceAccountMatch {
                    namespace: a.namespace.clone(),
                    service_account: a.service_account.clone(),
                })
                .collect()
        };
        Ok(Match {
            namespaces: strings(&self.namespaces)?,
            not_namespaces: strings(&self.not_namespaces)?,
            principals: strings(&self.principals)?,
            not_principals: strings(&self.not_principals)?,
            source_ips: nets(&self.source_ips)?,
            not_source_ips: nets(&self.not_source_ips)?,
            destination_ips: nets(&self.destination_ips)?,
            not_destination_ips: nets(&self.not_destination_ips)?,
            destination_ports: ports(&self.destination_ports)?,
            not_destination_ports: ports(&self.not_destination_ports)?,
            service_accounts: accounts(&self.service_accounts),
            not_service_accounts: accounts(&self.not_service_accounts),
        })
    }
}

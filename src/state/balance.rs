//! Choosing a service's endpoint, as Istio's `LoadBalancing` says (workload.proto; ztunnel's
//! `state.rs` does the same): the health policy decides which endpoints count, the routing
//! preferences rank them against the source workload (STRICT keeps only full matches,
//! FAILOVER the best-ranked group), and the choice within is random, weighted by capacity.
//! Pure: the caller passes the randomness.

use std::sync::Arc;

use super::Workload;

/// Where a workload runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// One routing preference: what a source and an endpoint should share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

/// What the preferences do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Mode {
    /// No preference applies: any endpoint.
    #[default]
    Any,
    /// Only endpoints matching every preference (possibly none).
    Strict,
    /// The endpoints matching the longest run of preferences, in order.
    Failover,
    /// No choice at all: the connection goes to its original destination.
    Passthrough,
}

/// A service's load-balancing policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LoadBalancing {
    pub preferences: Vec<Scope>,
    pub mode: Mode,
    /// ALLOW_ALL: unhealthy endpoints count too.
    pub allow_unhealthy: bool,
}

/// Whether `source` and `endpoint` share `scope` (a locality scope includes the wider ones).
fn shares(scope: Scope, source: &Workload, endpoint: &Workload) -> bool {
    let (s, e) = (&source.locality, &endpoint.locality);
    match scope {
        Scope::Region => s.region == e.region,
        Scope::Zone => s.region == e.region && s.zone == e.zone,
        Scope::Subzone => s.region == e.region && s.zone == e.zone && s.subzone == e.subzone,
        Scope::Node => source.node == endpoint.node,
        Scope::Cluster => source.cluster_id == endpoint.cluster_id,
        Scope::Network => source.network == endpoint.network,
    }
}

/// How many of `preferences`, in order, `endpoint` shares with `source` before the first it
/// does not (none without a known source).
fn rank(preferences: &[Scope], source: Option<&Workload>, endpoint: &Workload) -> usize {
    let Some(source) = source else { return 0 };
    preferences
        .iter()
        .take_while(|scope| shares(**scope, source, endpoint))
        .count()
}

/// The endpoint for one connection, among `endpoints` (healthy or not: the policy filters),
/// or `None` when the policy leaves none. `pick` is the caller's random number.
pub(crate) fn choose<T: Clone>(
    endpoints: &[(Arc<Workload>, T)],
    lb: &LoadBalancing,
    source: Option<&Workload>,
    pick: u64,
) -> Option<(Arc<Workload>, T)> {
    let eligible: Vec<&(Arc<Workload>, T)> = endpoints
        .iter()
        .filter(|(w, _)| w.healthy || lb.allow_unhealthy)
        .collect();
    let ranked: Vec<(usize, &(Arc<Workload>, T))> = eligible
        .into_iter()
        .map(|ep| (rank(&lb.preferences, source, &ep.0), ep))
        .collect();
    let floor = match lb.mode {
        Mode::Any | Mode::Passthrough => 0,
        Mode::Strict => lb.preferences.len(),
        Mode::Failover => ranked.iter().map(|(r, _)| *r).max()?,
    };
    let chosen: Vec<&(Arc<Workload>, T)> = ranked
        .into_iter()
        .filter(|(r, _)| *r >= floor)
        .map(|(_, ep)| ep)
        .collect();
    // Weighted by capacity (unset: 1); all of capacity 0 still share the load evenly.
    let weight = |w: &Workload| u64::from(w.capacity);
    let total: u64 = chosen.iter().map(|ep| weight(&ep.0)).sum();
    if total == 0 {
        let len = u64::try_from(chosen.len()).ok().filter(|n| *n > 0)?;
        let i = usize::try_from(pick % len).ok()?;
        return chosen.get(i).map(|ep| (*ep).clone());
    }
    let mut at = pick % total;
    for ep in chosen {
        let w = weight(&ep.0);
        if at < w {
            return Some(ep.clone());
        }
        at -= w;
    }
    None
}

#[cfg(test)]
mod tests;

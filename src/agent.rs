//! `hboned agent`: Kubernetes mode's node agent, the privileged half of the mode.

pub mod cni;
pub(crate) mod zds;

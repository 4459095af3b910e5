//! hboned: a per-node, sidecar-free L4 proxy that carries pod traffic over HBONE
//! (TCP → TLS 1.3 mTLS → HTTP/2 CONNECT), wire-compatible with Istio's ztunnel.
//!
//! A tour, from the wire up:
//! - [`hbone`]: the CONNECT request/response codec and its headers. Pure.
//! - [`identity`]: the SPIFFE [`identity::Identity`]; certificate sources behind the
//!   [`identity::CertSource`] seam (built-in [`identity::ca`], [`identity::files`],
//!   [`identity::istio_ca`], [`identity::spire`]); the per-identity certificate and its
//!   renewal ([`identity::manager`], on the pure [`identity::schedule`]).
//! - [`tls`]: rustls configs for docs/design.md §4 and the SPIFFE verifiers.
//! - [`proxy`]: the data path: outbound hold-and-route ([`proxy::outbound`]), the pooled HBONE
//!   client ([`proxy::pool`]), the HBONE server ([`proxy::inbound`]), plain TCP both ways
//!   ([`proxy::passthrough`]), the HTTP/2 stream adapter ([`proxy::tunnel`]), the relay
//!   ([`proxy::copy`]).
//! - [`state`]: workloads, services and policies, and the routing decision. Pure; shared
//!   through [`state::SharedState`], which tells live connections when policies change.
//! - [`authz`]: L4 policy evaluation. Pure.
//! - [`xds`]: the delta ADS client; [`xds::convert`] turns resources into state. Pure.
//! - [`inpod`]: enrolled pods (listeners in their netns) and the ZDS client; [`redirect`]: the
//!   pods' iptables rules.
//! - [`kube`]: Kubernetes mode, hboned as its own node agent: namespace and pod watches,
//!   enrollment of this node's pods ([`kube::enroll`]), pods as workloads ([`kube::pods`]).
//! - `procfs`: pods' processes found in `/proc` by the UID in their cgroup path.
//! - [`netns`]: the [`netns::SocketFactory`] seam every socket is made through; [`socket`]: the
//!   socket options and SEQPACKET (the only other place that touches the OS directly).
//! - [`metrics`], [`admin`], [`drain`]: Prometheus metrics and access logs, the proxy's own HTTP
//!   endpoints, graceful drain.
//! - [`config`]: the YAML configuration; [`app`]: wiring for the `hboned` binary;
//!   [`proto`]: generated protobufs.
//! - `testbed` (cargo feature `testbed`, off in the release image): the namespace topology of
//!   `hboned demo`, the netns tests and benches.
//!
//! ARCHITECTURE.md has the ports, threads and data path on one page.
//!
//! The public surface is what the binaries, the tests under `tests/` and the benches use; the
//! rest is `pub(crate)` (`unreachable_pub` warns of a `pub` that reaches no one). The tour above
//! names internal modules too: `cargo doc --document-private-items` renders them.

#![deny(unsafe_code)]
// The tour links internal modules on purpose.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admin;
#[cfg(feature = "kubernetes")]
pub mod agent;
pub mod app;
pub mod authz;
pub(crate) mod backoff;
pub mod cni;
pub mod config;
pub(crate) mod control_plane;
pub(crate) mod dns;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod inpod;
#[cfg(feature = "kubernetes")]
pub mod kube;
pub mod metrics;
pub mod netns;
pub(crate) mod ports;
pub(crate) mod procfs;
pub mod proto;
pub mod proxy;
pub mod redirect;
// The OS seam: its two `unsafe` blocks (registering a descriptor, adopting one received by
// SCM_RIGHTS) each carry their SAFETY argument.
#[allow(unsafe_code)]
pub mod socket;
pub mod state;
pub(crate) mod sync;
pub mod tls;
pub mod xds;

#[cfg(feature = "testbed")]
pub mod testbed;

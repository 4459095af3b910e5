//! hboned: a per-node, sidecar-free L4 proxy that carries pod traffic over HBONE
//! (TCP → TLS 1.3 mTLS → HTTP/2 CONNECT), wire-compatible with Istio's ztunnel.
//!
//! A tour, from the wire up:
//! - [`hbone`]: the CONNECT request/response codec and its headers. Pure.
//! - [`identity`]: the SPIFFE [`identity::Identity`], the built-in CA ([`identity::ca`]) and the
//!   per-identity certificate cache behind the [`identity::CertSource`] seam.
//! - [`tls`]: rustls configs for DESIGN §4 and the SPIFFE verifiers.
//! - [`proxy`]: the data path: the pooled HBONE client ([`proxy::pool`]), the HBONE server
//!   ([`proxy::inbound`]), the HTTP/2 stream adapter ([`proxy::tunnel`]) and the relay
//!   ([`proxy::copy`]).
//! - [`netns`]: the [`netns::SocketFactory`] seam every socket is made through; [`socket`]: the
//!   socket options (the only other place that touches them).
//! - [`app`]: wiring for the `hboned` binary.
//!
//! ARCHITECTURE.md has the ports, threads and data path on one page.

pub mod admin;
pub mod app;
pub mod authz;
pub mod config;
pub mod demo;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod metrics;
pub mod netns;
pub mod proto;
pub mod proxy;
pub mod redirect;
pub mod socket;
pub mod state;
pub mod tls;
pub mod xds;

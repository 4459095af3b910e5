//! The proxy's well-known ports, one name each (docs/design.md, "Ports"). The pod ports are
//! ztunnel's, which istio-cni's and the Cilium agent's redirect rules point at; the node ports
//! are where Kubernetes probes and Prometheus look.

/// Outbound capture inside each enrolled pod: the pod's iptables redirect its TCP here.
pub(crate) const OUTBOUND: u16 = 15001;
/// Inbound plaintext capture inside each enrolled pod (sources that are not enrolled).
pub(crate) const INBOUND_PLAINTEXT: u16 = 15006;
/// Inbound HBONE (TLS 1.3 mTLS + HTTP/2 CONNECT) inside each enrolled pod; also the port a
/// client proxy dials on the destination pod's IP.
pub(crate) const HBONE: u16 = 15008;
/// The proxy's admin page, on localhost of its own netns.
pub(crate) const ADMIN: u16 = 15000;
/// Prometheus metrics, in the proxy's own netns.
pub(crate) const METRICS: u16 = 15020;
/// Readiness (`GET /healthz/ready`), in the proxy's own netns.
pub(crate) const READINESS: u16 = 15021;

/// The DNS proxy inside each enrolled pod (localhost only), where DNS capture sends port 53.
pub(crate) const DNS: u16 = 15053;

/// The pod ports the proxy listens on: a connection aimed at one of them would loop.
pub(crate) const POD_LISTENERS: [u16; 3] = [OUTBOUND, INBOUND_PLAINTEXT, HBONE];

//! The HBONE CONNECT codec (docs/design.md §4): request and response heads as `http` values, with the
//! `forwarded`, `baggage` and `traceparent` headers. Pure: no I/O, no clock, no randomness
//! except [`TraceParent::random`]. Parsing of the optional headers is tolerant (a malformed
//! header is ignored, never an error); the authority is strict (it decides where bytes go).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Method, Request, Response, StatusCode};

pub(crate) const FORWARDED: &str = "forwarded";
pub(crate) const BAGGAGE: &str = "baggage";
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The client's network, on the inner CONNECT of double HBONE (ztunnel's
/// `X_FORWARDED_NETWORK_HEADER`).
pub(crate) const FORWARDED_NETWORK: &str = "x-forwarded-network";

/// What a CONNECT request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where the peer delivers the bytes: `<podIP>:<targetPort>`, or a service's
    /// `<hostname>:<port>` (double HBONE, both layers, as ztunnel sends them).
    pub authority: Authority,
    /// The original client's address (`forwarded: for=`).
    pub forwarded_for: Option<SocketAddr>,
    /// The destination service's hostname (`forwarded: ...;host=`), when known.
    pub forwarded_host: Option<String>,
    pub baggage: Baggage,
    pub traceparent: Option<TraceParent>,
    /// The client's network (`x-forwarded-network`), on double HBONE's inner request.
    pub origin_network: Option<String>,
}

/// A CONNECT's `:authority`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Authority {
    /// `<ip>:<port>` (`[v6]:<port>`).
    Addr(SocketAddr),
    /// `<service hostname>:<service port>`: the receiver finds the service and its port.
    Host(String, u16),
}

impl Authority {
    pub fn port(&self) -> u16 {
        match self {
            Authority::Addr(a) => a.port(),
            Authority::Host(_, port) => *port,
        }
    }

    /// The address, when it is one.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Authority::Addr(a) => Some(*a),
            Authority::Host(..) => None,
        }
    }

    /// Parses `ip:port`, `[v6]:port` or `hostname:port` (a DNS name: letters, digits, `-`,
    /// `_` and dots, at most 253 characters; a port other than 0).
    fn parse(s: &str) -> Option<Authority> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Some(Authority::Addr(addr));
        }
        let (host, port) = s.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        let is_name = !host.is_empty()
            && host.len() <= 253
            && host.chars().all(name_char)
            && host.split('.').all(|label| !label.is_empty() && label.len() <= 63)
            // A bare IPv4-looking name is not a hostname (and an unbracketed IPv6 never
            // reaches here: ':' is not a name character).
            && host.parse::<IpAddr>().is_err();
        is_name.then(|| Authority::Host(host.to_ascii_lowercase(), port))
    }
}

impl From<SocketAddr> for Authority {
    fn from(addr: SocketAddr) -> Self {
        Authority::Addr(addr)
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authority::Addr(a) => write!(f, "{a}"),
            Authority::Host(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// Why a CONNECT request is refused with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("missing :authority")]
    MissingAuthority,
    #[error("authority {0:?} is neither <ip>:<port> nor <hostname>:<port>")]
    Authority(String),
}

impl ConnectRequest {
    pub fn new(authority: impl Into<Authority>) -> Self {
        ConnectRequest {
            authority: authority.into(),
            forwarded_for: None,
            forwarded_host: None,
            baggage: Baggage::default(),
            traceparent: None,
            origin_network: None,
        }
    }

    /// The request head as sent: `CONNECT` with only `:authority` among the URI parts.
    pub fn to_http(&self) -> Request<()> {
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        // A SocketAddr's text form ("1.2.3.4:80", "[::1]:80") and a DNS name with a port
        // always parse as an authority URI.
        *req.uri_mut() = http::Uri::try_from(self.authority.to_string()).unwrap_or_default();
        let headers = req.headers_mut();
        if let Some(client) = self.forwarded_for {
            let mut value = format!("for=\"{client}\"");
            if let Some(host) = &self.forwarded_host {
                value.push_str(";host=");
                value.push_str(host);
            }
            if let Ok(v) = HeaderValue::try_from(value) {
                headers.insert(FORWARDED, v);
            }
        }
        if let Some(v) = self
            .baggage
            .to_header()
            .and_then(|b| HeaderValue::try_from(b).ok())
        {
            headers.insert(BAGGAGE, v);
        }
        if let Some(tp) = &self.traceparent
            && let Ok(v) = HeaderValue::try_from(tp.to_string())
        {
            headers.insert(TRACEPARENT, v);
        }
        if let Some(v) = self
            .origin_network
            .as_deref()
            .and_then(|n| HeaderValue::try_from(n).ok())
        {
            headers.insert(FORWARDED_NETWORK, v);
        }
        req
    }

    /// Parses a received request head; only the method and authority can fail.
    pub fn from_http<B>(req: &Request<B>) -> Result<Self, RequestError> {
        if req.method() != Method::CONNECT {
            return Err(RequestError::Method(req.method().to_string()));
        }
        let authority = req
            .uri()
            .authority()
            .ok_or(RequestError::MissingAuthority)?
            .as_str();
        let authority = Authority::parse(authority)
            .ok_or_else(|| RequestError::Authority(authority.to_owned()))?;
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let (forwarded_for, forwarded_host) =
            header(FORWARDED).map(parse_forwarded).unwrap_or_default();
        Ok(ConnectRequest {
            authority,
            forwarded_for,
            forwarded_host,
            baggage: header(BAGGAGE).map(Baggage::parse).unwrap_or_default(),
            traceparent: header(TRACEPARENT).and_then(TraceParent::parse),
            origin_network: header(FORWARDED_NETWORK).map(str::to_owned),
        })
    }
}

/// Reads `for="<ip:port>"` and `host=` from the first element of a `forwarded` header.
fn parse_forwarded(value: &str) -> (Option<SocketAddr>, Option<String>) {
    let first = value.split(',').next().unwrap_or_default();
    let mut addr = None;
    let mut host = None;
    for pair in first.split(';') {
        let Some((k, v)) = pair.trim().split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"');
        match k.trim().to_ascii_lowercase().as_str() {
            "for" => {
                addr = v
                    .parse::<SocketAddr>()
                    .ok()
                    .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0)));
            }
            "host" if !v.is_empty() => host = Some(v.to_owned()),
            _ => {}
        }
    }
    (addr, host)
}

/// The `baggage` header: `k=v` pairs in order, comma-joined, empty values left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage(Vec<(String, String)>);

impl Baggage {
    /// Adds a pair unless the value is empty.
    pub fn push(&mut self, key: &str, value: &str) -> &mut Self {
        if !value.is_empty() && !key.is_empty() {
            self.0.push((key.to_owned(), value.to_owned()));
        }
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn to_header(&self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Some(parts.join(","))
    }

    /// Tolerant: members without `=` or with empty parts are skipped, properties dropped.
    pub(crate) fn parse(value: &str) -> Self {
        let mut b = Baggage::default();
        for member in value.split(',') {
            let member = member.split(';').next().unwrap_or_default();
            if let Some((k, v)) = member.split_once('=') {
                b.push(k.trim(), v.trim());
            }
        }
        b
    }
}

/// A W3C `traceparent` (version 00): `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// A fresh random trace, not sampled.
    pub fn random() -> Self {
        TraceParent {
            trace_id: rand::random::<u128>().max(1),
            span_id: rand::random::<u64>().max(1),
            flags: 0,
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if version.len() != 2 || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// The response head for a status (200 only after the dial to the app succeeded).
pub(crate) fn response(status: StatusCode) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests;

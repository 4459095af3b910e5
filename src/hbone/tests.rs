//! Tests of `hbone`.

use super::*;

fn sample() -> ConnectRequest {
    let mut req = ConnectRequest::new("10.0.2.2:8080".parse::<SocketAddr>().unwrap());
    req.forwarded_for = Some("10.0.1.1:43210".parse().unwrap());
    req.forwarded_host = Some("web.prod.svc.cluster.local".into());
    req.baggage
        .push("k8s.cluster.name", "c1")
        .push("k8s.namespace.name", "prod")
        .push("k8s.deployment.name", "")
        .push("service.name", "web");
    req.traceparent = Some(TraceParent {
        trace_id: 0x0af7651916cd43dd8448eb211c80319c,
        span_id: 0xb7ad6b7169203331,
        flags: 0,
    });
    req
}

#[test]
fn request_head_is_exact() {
    let req = sample().to_http();
    assert_eq!(req.method(), Method::CONNECT);
    assert_eq!(req.uri().to_string(), "10.0.2.2:8080");
    assert!(req.uri().scheme().is_none());
    assert!(req.uri().path_and_query().is_none());
    let mut headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    headers.sort();
    assert_eq!(
        headers,
        vec![
            (
                "baggage".into(),
                "k8s.cluster.name=c1,k8s.namespace.name=prod,service.name=web".into()
            ),
            (
                "forwarded".into(),
                "for=\"10.0.1.1:43210\";host=web.prod.svc.cluster.local".into()
            ),
            (
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00".into()
            ),
        ]
    );
}

#[test]
fn minimal_request_has_no_optional_headers() {
    let req = ConnectRequest::new("10.0.2.2:80".parse::<SocketAddr>().unwrap()).to_http();
    assert!(req.headers().is_empty());
}

#[test]
fn request_round_trips() {
    let req = sample();
    assert_eq!(ConnectRequest::from_http(&req.to_http()).unwrap(), req);
}

/// Double HBONE's authority: a service's hostname and port (ztunnel's `SvcHostname`).
#[test]
fn a_hostname_authority_round_trips() {
    let req = ConnectRequest::new(Authority::Host("echo.demo.svc.cluster.local".into(), 80));
    let head = req.to_http();
    assert_eq!(head.uri().to_string(), "echo.demo.svc.cluster.local:80");
    assert_eq!(ConnectRequest::from_http(&head).unwrap(), req);
    let upper = Request::connect("Echo.Demo.svc.cluster.local:80")
        .body(())
        .unwrap();
    assert_eq!(
        ConnectRequest::from_http(&upper).unwrap().authority,
        Authority::Host("echo.demo.svc.cluster.local".into(), 80)
    );
}

#[test]
fn ipv6_authority_is_bracketed() {
    let mut req = ConnectRequest::new("[fd00::2]:8080".parse::<SocketAddr>().unwrap());
    req.forwarded_for = Some("[fd00::1]:5000".parse().unwrap());
    let head = req.to_http();
    assert_eq!(head.uri().to_string(), "[fd00::2]:8080");
    assert_eq!(head.headers()[FORWARDED], "for=\"[fd00::1]:5000\"");
    assert_eq!(ConnectRequest::from_http(&head).unwrap(), req);
}

#[test]
fn bad_method_and_authority_are_refused() {
    let get = Request::get("http://10.0.0.1:80/").body(()).unwrap();
    assert_eq!(
        ConnectRequest::from_http(&get),
        Err(RequestError::Method("GET".into()))
    );
    for bad in [
        "exa mple.com:80",
        "example.com:0",
        "example..com:80",
        ":80",
        "a:b:80",
    ] {
        let req = Request::connect("10.0.0.1:80").body(()).unwrap();
        let mut req = req;
        *req.uri_mut() = match http::Uri::try_from(bad) {
            Ok(u) => u,
            Err(_) => continue,
        };
        assert!(
            matches!(
                ConnectRequest::from_http(&req),
                Err(RequestError::Authority(_))
            ),
            "{bad}"
        );
    }
    let no_port = Request::connect("10.0.0.1").body(()).unwrap();
    assert!(matches!(
        ConnectRequest::from_http(&no_port),
        Err(RequestError::Authority(_))
    ));
}

#[test]
fn optional_headers_parse_tolerantly() {
    let req = Request::connect("10.0.0.1:80")
        .header(FORWARDED, "for=garbage;host=")
        .header(BAGGAGE, "novalue,=x,k=v;prop=1, k2 = v2 ")
        .header(TRACEPARENT, "00-zz-yy-00")
        .body(())
        .unwrap();
    let parsed = ConnectRequest::from_http(&req).unwrap();
    assert_eq!(parsed.forwarded_for, None);
    assert_eq!(parsed.forwarded_host, None);
    assert_eq!(parsed.baggage.to_header().as_deref(), Some("k=v,k2=v2"));
    assert_eq!(parsed.traceparent, None);
}

#[test]
fn forwarded_accepts_bare_ip_and_case() {
    let (addr, host) = parse_forwarded("For=10.1.1.1; Host=\"svc\", for=10.9.9.9");
    assert_eq!(addr, Some("10.1.1.1:0".parse().unwrap()));
    assert_eq!(host.as_deref(), Some("svc"));
}

#[test]
fn traceparent_random_is_well_formed() {
    let tp = TraceParent::random().to_string();
    assert_eq!(tp.len(), 55);
    assert!(tp.starts_with("00-") && tp.ends_with("-00"));
    assert!(TraceParent::parse(&tp).is_some());
    assert_eq!(
        TraceParent::parse(&format!("00-{}-{}-00", "0".repeat(32), "1".repeat(16))),
        None
    );
}

//! CONNECT request parsing and admission (`proxy::inbound::admit`): any method, authority and
//! `forwarded` / `baggage` / `traceparent` values a peer sends are refused cleanly or admitted
//! to one of the workload's own addresses and never to a proxy port.
#![no_main]

use std::net::IpAddr;

use hboned::hbone::ConnectRequest;
use hboned::proxy::inbound::admit;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let method = parts.next().unwrap_or_default();
    let authority = parts.next().unwrap_or_default();
    let mut builder = http::Request::builder().method(method).uri(authority);
    for (name, value) in ["forwarded", "baggage", "traceparent"].iter().zip(parts) {
        builder = builder.header(*name, value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let addresses: [IpAddr; 2] = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    if let Ok(connect) = admit(&request, &addresses) {
        assert_eq!(request.method(), http::Method::CONNECT);
        assert!(addresses.contains(&connect.authority.ip()));
        assert!(![15001, 15006, 15008].contains(&connect.authority.port()));
        // What we admitted, we can send again and read back the same.
        let again = ConnectRequest::from_http(&connect.to_http()).expect("round trip");
        assert_eq!(again.authority, connect.authority);
    }
});

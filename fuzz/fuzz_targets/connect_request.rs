//! CONNECT request parsing and admission (`proxy::inbound::admit`): any method, authority and
//! `forwarded` / `baggage` / `traceparent` values a peer sends are refused cleanly or admitted
//! to one of the workload's own addresses and never to a proxy port, or (double HBONE) to a
//! hostname made only of DNS name characters.
#![no_main]

use std::net::IpAddr;

use hboned::hbone::{Authority, ConnectRequest};
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
        match &connect.authority {
            Authority::Addr(a) => {
                assert!(addresses.contains(&a.ip()));
                assert!(![15001, 15006, 15008].contains(&a.port()));
            }
            Authority::Host(host, port) => {
                assert!(*port != 0 && !host.is_empty() && host.len() <= 253);
                assert!(
                    host.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                );
            }
        }
        // What we admitted, we can send again and read back the same.
        let again = ConnectRequest::from_http(&connect.to_http()).expect("round trip");
        assert_eq!(again.authority, connect.authority);
    }
});

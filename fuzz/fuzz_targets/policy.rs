//! Policy conversion and evaluation: any `istio.security.Authorization` converts (unreadable
//! entries dropped, never widening what it allows) and decides any connection without
//! panicking; a matching enforced DENY always denies.
#![no_main]

use std::net::IpAddr;

use hboned::authz::{self, Action, Connection};
use hboned::identity::Identity;
use hboned::proto::istio::security::Authorization;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (facts, body) = data.split_at(12);
    let Ok(resource) = Authorization::decode(body) else {
        return;
    };
    let Ok((policy, _dropped)) = hboned::xds::convert::policy(resource) else {
        return;
    };
    let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
    let client = Identity::new("cluster.local", "ns", "sa").unwrap();
    let conn = Connection {
        source: (facts[10] & 1 == 1).then_some(&client),
        source_ip: ip(&facts[0..4]),
        destination_ip: ip(&facts[4..8]),
        destination_port: u16::from_be_bytes([facts[8], facts[9]]),
    };
    let verdict = authz::evaluate([&policy], &conn);
    if policy.dry_run {
        assert!(
            verdict.decision.is_allowed(),
            "a dry-run policy alone never denies"
        );
    } else if policy.action == Action::Deny {
        // Alone, a DENY either matched (denied) or did not (allowed): never NotAllowed.
        assert_ne!(verdict.decision, authz::Decision::NotAllowed);
    }
});

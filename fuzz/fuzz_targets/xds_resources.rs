//! xDS resource conversion: any delta response (any type URL, any resource bytes) applies to
//! the state or is NACKed per resource, never panics, and always answers its own nonce.
#![no_main]

use hboned::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use hboned::state::State;
use hboned::xds::convert::{ADDRESS_TYPE, AUTHORIZATION_TYPE, Tracked, apply_delta};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(mut response) = DeltaDiscoveryResponse::decode(data) else {
        return;
    };
    let mut state = State::default();
    let mut tracked = Tracked::default();
    let applied = apply_delta(&mut state, &mut tracked, &response, "cluster.local");
    assert_eq!(applied.ack.response_nonce, response.nonce);
    assert_eq!(
        applied.ack.error_detail.is_some(),
        !applied.rejected.is_empty()
    );
    // The same resources as each type we subscribe to.
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        response.type_url = type_url.into();
        for r in &mut response.resources {
            if let Some(any) = &mut r.resource {
                any.type_url = type_url.into();
            }
        }
        let _ = apply_delta(&mut state, &mut tracked, &response, "cluster.local");
    }
});

//! Protobuf messages generated at build time from proto/ (see build.rs). No hand-written code.

/// ZDS, the node agent ↔ proxy enrollment protocol (DESIGN §6).
#[allow(clippy::all, missing_debug_implementations)]
pub mod zds {
    include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
}

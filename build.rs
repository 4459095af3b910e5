//! Compiles proto/ into Rust with protox (a pure-Rust protobuf compiler), prost and tonic, so a
//! fresh machine needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        [
            "zds.proto",
            "istio/workload/workload.proto",
            "istio/security/authorization.proto",
            "envoy/service/discovery/v3/discovery.proto",
            "istio/v1/auth/ca.proto",
            "cri/runtime.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

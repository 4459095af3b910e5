//! The workload snapshot the store benchmarks apply (`state`, `scale`): `n` pods in 50
//! namespaces on 100 nodes, every 10,000th backing one service, as a delta ADS response.

use std::net::Ipv4Addr;

use hboned::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use hboned::proto::istio::workload as pb;
use hboned::xds::convert::{ADDRESS_TYPE, workload_resource};

/// The address of workload `i`: 10.0.0.0 onwards.
pub(crate) fn ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + i)
}

pub(crate) fn snapshot(n: u32) -> DeltaDiscoveryResponse {
    let resources = (0..n)
        .map(|i| {
            let uid = format!("cluster1//v1/Pod/ns{}/pod-{i}", i % 50);
            let w = pb::Workload {
                uid: uid.clone(),
                name: format!("pod-{i}"),
                namespace: format!("ns{}", i % 50),
                service_account: format!("sa{}", i % 200),
                addresses: vec![ip(i).octets().to_vec()],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                node: format!("node-{}", i % 100),
                // Every 10,000th pod backs the one service (10 endpoints in 100,000).
                services: if i % 10_000 == 0 {
                    [(
                        "ns0/web.ns0.svc.cluster.local".to_string(),
                        pb::PortList {
                            ports: vec![pb::Port {
                                service_port: 80,
                                target_port: 8080,
                                app_protocol: 0,
                            }],
                        },
                    )]
                    .into()
                } else {
                    Default::default()
                },
                ..Default::default()
            };
            workload_resource(&uid, "1", w)
        })
        .collect();
    DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.into(),
        nonce: "n".into(),
        resources,
        ..Default::default()
    }
}

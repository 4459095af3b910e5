//! Workload-store benchmarks: a lookup by IP among 100,000 workloads (what every new outbound
//! connection pays), and applying a 10,000-workload delta xDS snapshot (decode, validate,
//! index), which is what a proxy does when it (re)connects to its control plane.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use hboned::proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use hboned::proto::istio::workload as pb;
use hboned::state::State;
use hboned::xds::convert::{ADDRESS_TYPE, Tracked, apply_delta, service_resource};

#[path = "support/workloads.rs"]
mod workloads;
use workloads::{ip, snapshot};

fn benches(c: &mut Criterion) {
    let mut state = State::default();
    apply_delta(
        &mut state,
        &mut Tracked::default(),
        &snapshot(100_000),
        "cluster.local",
    );
    let mut i = 0u32;
    c.bench_function("lookup_by_ip_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            black_box(state.workload_by_ip(IpAddr::V4(ip(i))).is_some())
        })
    });
    let src = [IpAddr::V4(ip(1))];
    c.bench_function("route_decision_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            black_box(state.route(&src, SocketAddr::new(IpAddr::V4(ip(i)), 8080), 0))
        })
    });

    // A connection to a service VIP: the endpoint choice among its 10 endpoints.
    let service = pb::Service {
        name: "web".into(),
        namespace: "ns0".into(),
        hostname: "web.ns0.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let svc = DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.into(),
        nonce: "s".into(),
        resources: vec![service_resource(
            "ns0/web.ns0.svc.cluster.local",
            "1",
            service,
        )],
        ..Default::default()
    };
    apply_delta(&mut state, &mut Tracked::default(), &svc, "cluster.local");
    let vip = SocketAddr::from(([10, 96, 0, 1], 80));
    let mut pick = 0u64;
    c.bench_function("route_vip_100k", |b| {
        b.iter(|| {
            pick = pick.wrapping_add(7919);
            black_box(state.route(&src, vip, pick))
        })
    });

    let snap = snapshot(10_000);
    let mut group = c.benchmark_group("apply_snapshot");
    group
        .throughput(Throughput::Elements(10_000))
        .sample_size(20);
    group.bench_function("10k_workloads", |b| {
        b.iter_batched(
            || (State::default(), Tracked::default()),
            |(mut state, mut tracked)| {
                let applied = apply_delta(&mut state, &mut tracked, &snap, "cluster.local");
                assert_eq!(applied.upserted, 10_000);
                state
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(state, benches);
criterion_main!(state);

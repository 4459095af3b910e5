//! The DNS proxy's queries per second, next to a direct query to the upstream in the same run
//! (`benches/README.md`): batches of 64 A queries pipelined over one UDP socket on loopback,
//! - `local`: a service name the proxy answers from its state;
//! - `forwarded`: an external name the proxy forwards to the upstream (a fresh marked socket
//!   per query, as in a pod);
//! - `direct`: the same external name asked of the upstream itself.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hboned::testbed::dns::{PlainResolver, loopback_dns};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

const BATCH: u16 = 64;

fn queries(name: &str) -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|id| {
            let mut m = Message::query();
            m.metadata.id = id;
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(name.parse::<Name>().unwrap(), RecordType::A));
            m.to_vec().unwrap()
        })
        .collect()
}

/// Sends the batch and waits for every answer (each with records).
async fn batch(socket: &tokio::net::UdpSocket, queries: &[Vec<u8>]) {
    for q in queries {
        socket.send(q).await.unwrap();
    }
    let mut buf = [0u8; 1500];
    for _ in 0..queries.len() {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("an answer was lost")
            .unwrap();
        assert!(n > 12 && buf[3] & 0x0f == 0, "NOERROR");
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (upstream, proxy, client) = rt.block_on(async {
        let upstream = PlainResolver::start(Ipv4Addr::new(203, 0, 113, 7))
            .await
            .unwrap();
        let vip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20));
        let proxy = loopback_dns(&[("echo.demo.svc.cluster.local", vip)], upstream.addr).unwrap();
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (upstream, proxy, client)
    });
    let targets: [(&str, SocketAddr, &str); 3] = [
        ("local", proxy.udp, "echo.demo.svc.cluster.local."),
        ("forwarded", proxy.udp, "www.example.org."),
        ("direct", upstream.addr, "www.example.org."),
    ];
    let mut group = c.benchmark_group("dns");
    group.throughput(Throughput::Elements(u64::from(BATCH)));
    for (label, to, name) in targets {
        let qs = queries(name);
        rt.block_on(client.connect(to)).unwrap();
        group.bench_function(label, |b| b.to_async(&rt).iter(|| batch(&client, &qs)));
    }
    group.finish();
    drop((proxy, upstream));
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Memory per tunneled connection: opens N idle HBONE streams (client, server and an echo app
//! all in this process), and reports the RSS growth per stream; then makes every stream move
//! 1 MiB at once and reports the peak growth per busy stream. First, on the fresh process, it
//! opens HBONE connections that carry one stream each (to peers told apart by the identities
//! they may present, as connections to distinct destinations are) and reports the growth per
//! HBONE connection: what a node pays per peer it talks to. Run:
//! `cargo bench --bench memory`. Not a criterion bench: it measures bytes, not time.

use std::sync::Arc;
use std::time::SystemTime;

use hboned::hbone::ConnectRequest;
use hboned::identity::ca::BuiltinCa;
use hboned::identity::{CertificateManager, Identity};
use hboned::netns::{DefaultSocketFactory, SocketFactory};
use hboned::proxy::{HboneClient, InboundServer, LocalWorkload, PoolKey, TunnelSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STREAMS: usize = 2000;
/// HBONE connections of one stream each.
const CONNECTIONS: usize = 1000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("rss pages");
    pages * 4096
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would run us too: only run on --bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let ca = Arc::new(BuiltinCa::generate(SystemTime::now()).expect("CA"));
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let id = |sa: &str| Identity::new("cluster.local", "mem", sa).expect("id");
    let listener = sockets
        .tcp_bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let hbone_addr = listener.local_addr().expect("addr");
    let workload = LocalWorkload {
        identity: id("server").into(),
        addresses: vec![echo_addr.ip()],
        preserve_source_ip: false,
        state: None,
        metrics: None,
        drain: None,
        pod: Default::default(),
    };
    let server = InboundServer::new(
        workload,
        Arc::new(CertificateManager::new(ca.clone())),
        sockets.clone(),
        TunnelSettings::default(),
    );
    tokio::spawn(server.serve(listener));
    let client = HboneClient::new(
        Arc::new(CertificateManager::new(ca)),
        sockets,
        TunnelSettings::default(),
    );
    let key = PoolKey::new(id("client"), vec![id("server")], hbone_addr, None);
    // Warm up: one connection and stream, so one-time allocations are not counted.
    drop(open(&client, &key, echo_addr).await);

    // One stream per HBONE connection: each pool key names another identity the peer may
    // present besides its own, so each dials a connection of its own (TLS and HTTP/2 on both
    // ends, a stream and its echo). Held open to the end.
    let before = rss_bytes();
    let mut single = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let other = id(&format!("other-{i}"));
        let key = PoolKey::new(id("client"), vec![id("server"), other], hbone_addr, None);
        single.push(open(&client, &key, echo_addr).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let grown = rss_bytes().saturating_sub(before);
    println!(
        "one stream per HBONE connection: {} connections: +{:.1} MiB RSS, {:.1} KiB per HBONE connection (both proxies + echo app)",
        // The warm-up's connection is not one of them.
        client.stats().connections - 1,
        grown as f64 / (1 << 20) as f64,
        grown as f64 / CONNECTIONS as f64 / 1024.0
    );

    let before = rss_bytes();
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        streams.push(open(&client, &key, echo_addr).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let idle = rss_bytes().saturating_sub(before);
    println!(
        "idle: {STREAMS} streams over {} connections: +{:.1} MiB RSS, {:.1} KiB per tunneled connection (both proxies + echo app)",
        client.stats().connections - CONNECTIONS,
        idle as f64 / (1 << 20) as f64,
        idle as f64 / STREAMS as f64 / 1024.0
    );

    // Busy: 200 streams each push and read back 1 MiB at the same time. The test's own buffers
    // are allocated and touched before the baseline so only the proxies' growth is counted.
    let busy_n = 200;
    let mut buffers: Vec<(Vec<u8>, Vec<u8>)> = (0..busy_n)
        .map(|_| (vec![1u8; 1 << 20], vec![2u8; 1 << 20]))
        .collect();
    let base = rss_bytes();
    let mut tasks = Vec::new();
    for mut s in streams.drain(..busy_n) {
        let (data, mut back) = buffers.pop().expect("buffers");
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut s);
            let (a, b) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
            a.expect("write");
            b.expect("read");
            (data, back)
        }));
    }
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..200 {
            peak = peak.max(rss_bytes());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        peak
    });
    for t in tasks {
        buffers.push(t.await.expect("busy stream"));
    }
    let peak = sampler.await.expect("sampler");
    let busy = peak.saturating_sub(base);
    println!(
        "busy: {busy_n} streams moving 1 MiB each way at once: peak +{:.1} MiB over idle, {:.0} KiB per busy tunneled connection",
        busy as f64 / (1 << 20) as f64,
        busy as f64 / busy_n as f64 / 1024.0
    );
    drop(single);
}

/// A stream to the echo app through `key`'s connection, one byte echoed.
async fn open(
    client: &HboneClient,
    key: &PoolKey,
    echo: std::net::SocketAddr,
) -> hboned::proxy::H2Stream {
    let mut s = client
        .connect(key, &ConnectRequest::new(echo))
        .await
        .expect("tunnel");
    ping(&mut s).await;
    s
}

async fn ping(s: &mut hboned::proxy::H2Stream) {
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("read");
}

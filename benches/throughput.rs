//! Tunnel benchmarks over loopback, each next to plain TCP in the same run:
//! - `bulk`: one stream moving 32 MiB one way (client → app), through HBONE vs raw TCP;
//! - `download`: 32 MiB the other way (an app behind the server → client): through the
//!   server's relay to a client that takes frames of 16 KiB at most (HTTP/2's default, which
//!   Envoy keeps), next to one that takes 1 MiB (ztunnel's and hboned's);
//! - `rr_1k`: 1 KiB request/response round trips on one warm stream vs one raw connection;
//! - `connect`: a new tunneled stream per iteration over a warm pool (one byte echoed, then
//!   closed) vs a new raw TCP connection.
//!
//! `benches/ratio.py` turns criterion's estimates into tunnel/raw ratios.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hboned::hbone::ConnectRequest;
use hboned::identity::ca::BuiltinCa;
use hboned::identity::{CertificateManager, Identity};
use hboned::netns::{DefaultSocketFactory, SocketFactory};
use hboned::proxy::{HboneClient, InboundServer, LocalWorkload, PoolKey, TunnelSettings};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const BULK: usize = 32 * 1024 * 1024;
const CHUNK: usize = 128 * 1024;

struct Rig {
    client: HboneClient,
    /// A client that takes frames of 16 KiB at most.
    small_frames: HboneClient,
    key: PoolKey,
    sink: SocketAddr,
    echo: SocketAddr,
    /// Writes [`BULK`] bytes to whoever connects, in writes of an odd size, and closes.
    source: SocketAddr,
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "bench", sa).expect("valid identity")
}

/// Reads to EOF, then answers with the byte count (8 bytes, big endian).
async fn sink(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = s.write_all(&total.to_be_bytes()).await;
        });
    }
}

async fn source(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let chunk = vec![0x5au8; 100_000];
            let mut left = BULK;
            while left > 0 {
                let n = left.min(chunk.len());
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
            let _ = s.shutdown().await;
        });
    }
}

/// Reads `s` to its end: all of [`BULK`].
async fn pull<S: AsyncRead + Unpin>(mut s: S) {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, BULK);
}

async fn echo(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn rig() -> Rig {
    let ca = Arc::new(BuiltinCa::generate(SystemTime::now()).expect("CA"));
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let sink_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let source_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (sink_addr, echo_addr, source_addr) = (
        sink_l.local_addr().expect("addr"),
        echo_l.local_addr().expect("addr"),
        source_l.local_addr().expect("addr"),
    );
    tokio::spawn(sink(sink_l));
    tokio::spawn(echo(echo_l));
    tokio::spawn(source(source_l));
    let hbone_l = sockets
        .tcp_bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let hbone_addr = hbone_l.local_addr().expect("addr");
    let workload = LocalWorkload {
        identity: id("server").into(),
        addresses: vec![sink_addr.ip()],
        preserve_source_ip: false,
        state: None,
        metrics: None,
        drain: None,
        pod: Default::default(),
    };
    let server_certs = Arc::new(CertificateManager::new(ca.clone()));
    let server = InboundServer::new(
        workload,
        server_certs,
        sockets.clone(),
        TunnelSettings::default(),
    );
    tokio::spawn(server.serve(hbone_l));
    let client_certs = Arc::new(CertificateManager::new(ca));
    let client = HboneClient::new(
        client_certs.clone(),
        sockets.clone(),
        TunnelSettings::default(),
    );
    let small = TunnelSettings {
        max_frame_size: 16 * 1024,
        ..TunnelSettings::default()
    };
    let small_frames = HboneClient::new(client_certs, sockets, small);
    let key = PoolKey::new(id("client"), vec![id("server")], hbone_addr, None);
    Rig {
        client,
        small_frames,
        key,
        sink: sink_addr,
        echo: echo_addr,
        source: source_addr,
    }
}

async fn push<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, data: &[u8]) {
    let mut left = BULK;
    while left > 0 {
        let n = left.min(data.len());
        s.write_all(&data[..n]).await.expect("write");
        left -= n;
    }
    s.shutdown().await.expect("shutdown");
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.expect("count");
    assert_eq!(u64::from_be_bytes(count), BULK as u64);
}

async fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rig = rt.block_on(rig());
    let data = vec![0x5au8; CHUNK];

    let mut bulk = c.benchmark_group("bulk");
    bulk.throughput(Throughput::Bytes(BULK as u64))
        .sample_size(20);
    bulk.bench_function("raw_tcp", |b| {
        b.to_async(&rt)
            .iter(|| async { push(raw(rig.sink).await, &data).await })
    });
    bulk.bench_function("hbone", |b| {
        b.to_async(&rt).iter(|| async {
            let s = rig
                .client
                .connect(&rig.key, &ConnectRequest::new(rig.sink))
                .await
                .expect("tunnel");
            push(s, &data).await
        })
    });
    bulk.finish();

    let mut download = c.benchmark_group("download");
    download
        .throughput(Throughput::Bytes(BULK as u64))
        .sample_size(20);
    download.bench_function("raw_tcp", |b| {
        b.to_async(&rt)
            .iter(|| async { pull(raw(rig.source).await).await })
    });
    for (name, client) in [
        ("hbone", &rig.client),
        ("hbone_to_16k_frames", &rig.small_frames),
    ] {
        download.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let s = client
                    .connect(&rig.key, &ConnectRequest::new(rig.source))
                    .await
                    .expect("tunnel");
                pull(s).await
            })
        });
    }
    download.finish();

    let mut rr = c.benchmark_group("rr_1k");
    rr.throughput(Throughput::Elements(1));
    let msg = vec![7u8; 1024];
    round_trips(&mut rr, &rt, "raw_tcp", rt.block_on(raw(rig.echo)), &msg);
    let tunnel = rt
        .block_on(rig.client.connect(&rig.key, &ConnectRequest::new(rig.echo)))
        .expect("tunnel");
    round_trips(&mut rr, &rt, "hbone", tunnel, &msg);
    rr.finish();

    let mut conn = c.benchmark_group("connect");
    conn.throughput(Throughput::Elements(1));
    conn.bench_function("raw_tcp", |b| {
        b.to_async(&rt)
            .iter(|| async { one_byte(raw(rig.echo).await).await })
    });
    conn.bench_function("hbone_warm_pool", |b| {
        b.to_async(&rt).iter(|| async {
            let s = rig
                .client
                .connect(&rig.key, &ConnectRequest::new(rig.echo))
                .await
                .expect("tunnel");
            one_byte(s).await
        })
    });
    conn.finish();
}

fn round_trips<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: &str,
    stream: S,
    msg: &[u8],
) {
    let stream = tokio::sync::Mutex::new(stream);
    group.bench_function(name, |b| {
        b.to_async(rt).iter(|| async {
            let mut s = stream.lock().await;
            s.write_all(msg).await.expect("write");
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.expect("read");
        })
    });
}

async fn one_byte<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("read");
}

criterion_group!(throughput, benches);
criterion_main!(throughput);

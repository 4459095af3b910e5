//! New mTLS connections: HBONE connections to distinct destination
//! identities, each a full TLS 1.3 handshake (X25519MLKEM768, as negotiated by default) plus
//! the HTTP/2 handshake and one CONNECT with a byte echoed, client and servers in this process
//! over loopback. Each iteration dials `SERVERS` servers, each presenting its own identity,
//! from a fresh client (so nothing is pooled). The client runs on this thread (a
//! current-thread runtime), the servers and the echo app on a runtime of their own, so each
//! end's CPU can be told apart. Measured three ways, side by side:
//! - `wall`: elapsed time (handshakes per second);
//! - `client_cpu`: this thread's CPU time, so criterion's "per second" is handshakes per
//!   CPU-second of the client end (node A's proxy, dialing);
//! - `server_cpu`: the rest of the process's user+system CPU time (`getrusage`): handshakes per
//!   CPU-second of the server end (node B's proxy, accepting; the echo app's byte included).
//!
//! Certificates are issued before the measurement (the manager caches them), so the numbers
//! are the handshake's, not the CA's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hboned::hbone::ConnectRequest;
use hboned::identity::ca::BuiltinCa;
use hboned::identity::{CertificateManager, Identity};
use hboned::netns::{DefaultSocketFactory, SocketFactory};
use hboned::proxy::{HboneClient, InboundServer, LocalWorkload, PoolKey, TunnelSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Distinct destination identities per iteration.
const SERVERS: usize = 32;

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "bench", sa).expect("valid identity")
}

/// This thread's CPU time so far.
fn thread_cpu_time() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("clock_gettime");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// The process's CPU time so far (user + system).
fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

struct Rig {
    client_certs: Arc<CertificateManager>,
    sockets: Arc<dyn SocketFactory>,
    /// (HBONE address, identity) of each server.
    servers: Vec<(SocketAddr, Identity)>,
    echo: SocketAddr,
}

async fn rig() -> Rig {
    let ca = Arc::new(BuiltinCa::generate(SystemTime::now()).expect("CA"));
    let sockets: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    let echo_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo = echo_l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo_l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut servers = Vec::new();
    for i in 0..SERVERS {
        let identity = id(&format!("server-{i}"));
        let listener = sockets
            .tcp_bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let workload = LocalWorkload {
            identity: identity.clone().into(),
            addresses: vec![echo.ip()],
            preserve_source_ip: false,
            state: None,
            metrics: None,
            drain: None,
            pod: Default::default(),
        };
        let certs = Arc::new(CertificateManager::new(ca.clone()));
        // Issued now, outside the measurement.
        certs.fetch(&identity).await.expect("server certificate");
        let server =
            InboundServer::new(workload, certs, sockets.clone(), TunnelSettings::default());
        tokio::spawn(server.serve(listener));
        servers.push((addr, identity));
    }
    let client_certs = Arc::new(CertificateManager::new(ca));
    client_certs
        .fetch(&id("client"))
        .await
        .expect("client certificate");
    Rig {
        client_certs,
        sockets,
        servers,
        echo,
    }
}

/// One round: a fresh client dials every server (a handshake each), one byte echoed per
/// tunnel; the tunnels and connections closed at the end.
async fn round(rig: &Rig) {
    let client = HboneClient::new(
        rig.client_certs.clone(),
        rig.sockets.clone(),
        TunnelSettings::default(),
    );
    let mut streams = Vec::with_capacity(SERVERS);
    for (addr, identity) in &rig.servers {
        let key = PoolKey::new(id("client"), vec![identity.clone()], *addr, None);
        let mut s = client
            .connect(&key, &ConnectRequest::new(rig.echo))
            .await
            .expect("tunnel");
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("echo");
        streams.push(s);
    }
    assert_eq!(client.stats().dials, SERVERS, "one handshake per server");
}

fn benches(c: &mut Criterion) {
    // The servers' runtime: one worker, as busy as the client's thread at most.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let rig = servers.block_on(rig());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("handshake");
    group
        .throughput(Throughput::Elements(SERVERS as u64))
        .sample_size(20);
    group.bench_function("wall", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                rt.block_on(round(&rig));
            }
            start.elapsed()
        })
    });
    group.bench_function("client_cpu", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu_time();
            for _ in 0..iters {
                rt.block_on(round(&rig));
            }
            thread_cpu_time() - start
        })
    });
    group.bench_function("server_cpu", |b| {
        b.iter_custom(|iters| {
            let (process, client) = (cpu_time(), thread_cpu_time());
            for _ in 0..iters {
                rt.block_on(round(&rig));
            }
            (cpu_time() - process).saturating_sub(thread_cpu_time() - client)
        })
    });
    group.finish();
}

criterion_group!(handshakes, benches);
criterion_main!(handshakes);

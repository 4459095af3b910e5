//! The bad-input catalogue: what an attacker or an unlucky peer sends, each case asserting a
//! clean refusal, the proxy still serving afterwards, and descriptors back to their baseline.
//! Everything runs on 127.0.0.1 in this process, so descriptor counts are this process's: the
//! cases that count them take [`SERIAL`] so no other case moves the count meanwhile.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use hboned::proxy::TunnelSettings;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Held by every case that counts descriptors.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Open descriptors of this process.
fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A TCP target whose connects hang: a listener that never accepts, its one-slot backlog
/// already full, so the kernel drops further SYNs.
struct Blackhole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _filler: Vec<std::net::TcpStream>,
}

fn blackhole() -> Blackhole {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue; connects past it hang (no SYN-ACK).
    let mut filler = Vec::new();
    for _ in 0..4 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => filler.push(s),
            Err(_) => break,
        }
    }
    Blackhole {
        addr,
        _listener: listener,
        _filler: filler,
    }
}

/// Rapid reset after accept: CONNECTs to a target whose dial hangs, each reset 100 ms after its
/// HEADERS, at most 100 open at once. The server must drop each cancelled stream's dial at
/// once (before: every dial ran to the connect timeout, one descriptor each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_streams_stop_their_work_at_once() {
    let _serial = SERIAL.lock().await;
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    let hole = blackhole();
    let hbone = client(ca, TunnelSettings::default());
    let k = key(&id("client"), &srv);
    // Warm the pooled connection, then take the baseline.
    let app = echo_app().await;
    let mut warm = within(10, hbone.connect(&k, &request(app.addr)))
        .await
        .unwrap();
    warm.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    within(10, warm.read_exact(&mut b)).await.unwrap();
    let baseline = descriptors();
    for _ in 0..3 {
        let resets = (0..100).map(|_| {
            let (hbone, k) = (&hbone, &k);
            async move {
                // Dropping the pending CONNECT at 100 ms sends RST_STREAM(CANCEL).
                let r = tokio::time::timeout(
                    Duration::from_millis(100),
                    hbone.connect(k, &request(hole.addr)),
                )
                .await;
                assert!(r.is_err(), "the blackholed dial cannot have answered");
            }
        });
        futures_util::future::join_all(resets).await;
    }
    eventually(3, || descriptors() <= baseline + 5).await;
    // Still serving.
    warm.write_all(b"y").await.unwrap();
    within(10, warm.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"y");
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One HTTP/2 frame: length, type, flags, stream id, payload (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A CONNECT header block in HPACK without Huffman or indexing: `:method` (static name 2) and
/// `:authority` (static name 1) as literals.
fn connect_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x02, 7];
    b.extend_from_slice(b"CONNECT");
    b.push(0x01);
    b.push(u8::try_from(authority.len()).unwrap());
    b.extend_from_slice(authority.as_bytes());
    b
}

/// Backpressure against a hostile client: one HBONE connection, 200 CONNECT streams each to an
/// app that writes as fast as it can, the client announcing the largest flow-control windows
/// and then never reading its socket. The windows no longer limit what the server queues, so
/// only its own bounds do: the h2 send buffer per stream and the relay buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_costs_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    // Writes until the connection ends, from one shared chunk (the apps' own memory stays out
    // of the count).
    static CHUNK: [u8; 64 * 1024] = [0x5a; 64 * 1024];
    let flood = app(|mut s| async move { while s.write_all(&CHUNK).await.is_ok() {} }).await;
    let cert = ca
        .issue(&id("client"), std::time::SystemTime::now())
        .unwrap();
    let config = hboned::tls::client_config(&cert, vec![id("server")]).unwrap();
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(srv.addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let before = rss_kib();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE = 2^31 - 1, then the connection window to the same.
    out.extend(frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    out.extend(frame(0x4, 0x1, 0, &[]));
    out.extend(frame(0x8, 0, 0, &(0x7fff_ffff_u32 - 65_535).to_be_bytes()));
    for i in 0..200u32 {
        let block = connect_block(&flood.addr.to_string());
        out.extend(frame(0x1, 0x4, 2 * i + 1, &block));
    }
    tls.write_all(&out).await.unwrap();
    tls.flush().await.unwrap();
    // Never read. Wait until the floods stop moving memory.
    let mut last = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib();
        if now.abs_diff(last) < 512 && flood.accepted() == 200 {
            break;
        }
        last = now;
    }
    assert_eq!(flood.accepted(), 200, "every CONNECT reached its app");
    let grown_kib = rss_kib().saturating_sub(before);
    eprintln!("200 unread streams on one connection: +{grown_kib} KiB");
    // Per stream: 400 KiB of h2 send buffer and at most 128 KiB of relay buffer, with room for
    // the rest of a stream's state and the allocator (1 MiB of send buffer measured +1,140).
    assert!(
        grown_kib < 200 * 700,
        "200 unread streams grew the server by {grown_kib} KiB"
    );
    drop(tls);
}

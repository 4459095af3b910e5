//! The bad-input catalogue: what an attacker or an unlucky peer sends, each case asserting a
//! clean refusal, the proxy still serving afterwards, and descriptors back to their baseline.
//! Everything runs on 127.0.0.1 in this process, so descriptor counts are this process's: every
//! case takes [`SERIAL`] so no other case moves the count meanwhile.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use hboned::proxy::TunnelSettings;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How many of this process's descriptors are open on one of `paths`.
fn open_paths(paths: &[std::path::PathBuf]) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| paths.contains(target))
        .count()
}

/// Held by every case that counts descriptors.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Open sockets and files of this process: what a case could leak. Event fds, epoll and pipes
/// are left out, so a runtime that another case's thread sets up meanwhile does not count.
fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| {
            let t = target.to_string_lossy();
            t.starts_with("socket:") || t.starts_with('/')
        })
        .count()
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

// ---------------------------------------------------------------------------------------------
// The catalogue proper: one test per surface, one row per bad input.

/// An HBONE server (1 s handshake timeout), an echo app behind it, and the process's
/// descriptors and memory before the first row.
struct Target {
    ca: std::sync::Arc<hboned::identity::ca::BuiltinCa>,
    srv: Server,
    app: App,
    fds: usize,
    rss_kib: u64,
}

impl Target {
    async fn new() -> Target {
        let ca = ca();
        let settings = TunnelSettings {
            connect_timeout: Duration::from_secs(1),
            ..TunnelSettings::default()
        };
        let srv = server_with_settings(ca.clone(), id("server"), settings);
        let app = echo_app().await;
        let t = Target {
            ca,
            srv,
            app,
            fds: 0,
            rss_kib: 0,
        };
        t.still_serving().await;
        Target {
            fds: descriptors(),
            rss_kib: rss_kib(),
            ..t
        }
    }

    /// A real tunnel from a fresh client still carries bytes.
    async fn still_serving(&self) {
        let hbone = client(self.ca.clone(), TunnelSettings::default());
        let mut s = within(
            10,
            hbone.connect(&key(&id("client"), &self.srv), &request(self.app.addr)),
        )
        .await
        .expect("the proxy still serves");
        s.write_all(b"still serving").await.unwrap();
        let mut back = [0u8; 13];
        within(10, s.read_exact(&mut back)).await.unwrap();
        assert_eq!(&back, b"still serving");
    }

    /// Serving, and descriptors and memory back near the baseline.
    async fn recovered(&self, row: &str) {
        self.still_serving().await;
        let fds = self.fds;
        eventually(10, || descriptors() <= fds + 8).await;
        let grown = rss_kib().saturating_sub(self.rss_kib);
        assert!(grown < 32 * 1024, "{row}: memory grew by {grown} KiB");
    }

    /// TLS to the server, presenting `cert` (none: no client certificate).
    async fn tls(
        &self,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(self.srv.addr).await?;
        let name = rustls_pki_types::ServerName::IpAddress(self.srv.addr.ip().into());
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    }

    /// A correct mTLS session as `client`, ready for raw HTTP/2 bytes.
    async fn mtls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let cert = self
            .ca
            .issue(&id("client"), std::time::SystemTime::now())
            .unwrap();
        let config = hboned::tls::client_config(&cert, vec![id("server")]).unwrap();
        self.tls(config).await.unwrap()
    }
}

/// Reads until the peer closes or fails; true when it did within `secs`.
async fn closes(s: &mut (impl tokio::io::AsyncRead + Unpin), secs: u64) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A verifier that accepts any server (the cases below test the server, not us).
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        hboned::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Presents one certificate.
#[derive(Debug)]
struct Presents(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn loose_client(
    versions: &[&'static rustls::SupportedProtocolVersion],
    cert: Option<&hboned::identity::WorkloadCert>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer));
    let mut config = match cert {
        Some(c) => {
            builder.with_client_cert_resolver(std::sync::Arc::new(Presents(c.certified_key())))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(config)
}

/// TLS: what is not a TLS 1.3 mutual-TLS session from our trust domain is refused, and a
/// connection that stalls is closed at the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_tls() {
    let _serial = SERIAL.lock().await;
    let t = Target::new().await;
    let raw_rows: [(&str, Vec<u8>); 4] = [
        (
            "plaintext HTTP",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("64 KiB of garbage", pattern(0, 64 * 1024)),
        (
            "half a ClientHello, then silence",
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00],
        ),
        ("nothing at all", Vec::new()),
    ];
    for (row, bytes) in raw_rows {
        let mut s = tokio::net::TcpStream::connect(t.srv.addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        assert!(closes(&mut s, 5).await, "{row}: must be closed");
        t.recovered(row).await;
    }
    let foreign = hboned::identity::ca::BuiltinCa::generate(std::time::SystemTime::now()).unwrap();
    let foreign_cert = foreign
        .issue(&id("client"), std::time::SystemTime::now())
        .unwrap();
    let ours =
        t.ca.issue(&id("client"), std::time::SystemTime::now())
            .unwrap();
    let other_domain =
        t.ca.issue(
            &hboned::identity::Identity::new("evil.example", "test", "client").unwrap(),
            std::time::SystemTime::now(),
        )
        .unwrap();
    let tls_rows = [
        (
            "TLS 1.2 only",
            loose_client(&[&rustls::version::TLS12], Some(&ours)),
        ),
        (
            "no client certificate",
            loose_client(&[&rustls::version::TLS13], None),
        ),
        (
            "a client certificate from another CA",
            loose_client(&[&rustls::version::TLS13], Some(&foreign_cert)),
        ),
        (
            "a client of another trust domain",
            loose_client(&[&rustls::version::TLS13], Some(&other_domain)),
        ),
    ];
    for (row, config) in tls_rows {
        // TLS 1.3 lets the client finish first; the refusal then arrives as an alert on read.
        let refused = match t.tls(config).await {
            Err(_) => true,
            Ok(mut s) => {
                let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                let mut buf = [0u8; 64];
                matches!(
                    tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                )
            }
        };
        assert!(refused, "{row}: must be refused");
        t.recovered(row).await;
    }
}

/// HTTP/2 inside a correct mTLS session: malformed frames end the connection with GOAWAY,
/// requests that are not an admissible CONNECT get 400 (or 503 when the app is not there),
/// an oversized header list is refused, and the connection keeps serving other streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_http2() {
    let _serial = SERIAL.lock().await;
    let t = Target::new().await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let with_preface = |frames: Vec<u8>| [preface.clone(), frame(0x4, 0, 0, &[]), frames].concat();
    let frame_rows: [(&str, Vec<u8>); 5] = [
        ("a bad preface", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        (
            "a frame past the maximum frame size",
            with_preface(vec![0xff, 0xff, 0xff, 0x0, 0, 0, 0, 0, 1]),
        ),
        (
            "a connection window overflow",
            with_preface(
                [
                    frame(0x8, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
                    frame(0x8, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
                ]
                .concat(),
            ),
        ),
        ("DATA on stream 0", with_preface(frame(0x0, 0, 0, b"data"))),
        (
            "HEADERS that never end (CONTINUATION flood)",
            with_preface(
                [
                    frame(0x1, 0, 1, &connect_block("127.0.0.1:80")),
                    (0..2000u32)
                        .flat_map(|_| frame(0x9, 0, 1, &[0x40, 1, b'x', 1, b'y']))
                        .collect(),
                ]
                .concat(),
            ),
        ),
    ];
    for (row, bytes) in frame_rows {
        let mut s = t.mtls().await;
        s.write_all(&bytes).await.unwrap();
        assert!(closes(&mut s, 5).await, "{row}: the connection must end");
        t.recovered(row).await;
    }

    // Requests on one good HTTP/2 connection.
    let (mut h2, conn) = h2::client::handshake(t.mtls().await).await.unwrap();
    tokio::spawn(conn);
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let connect = |authority: &str| {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap()
    };
    let big = "x".repeat(70 * 1024);
    let rows: Vec<(&str, http::Request<()>, &[u16])> = vec![
        (
            "GET instead of CONNECT",
            http::Request::builder()
                .uri("https://127.0.0.1/")
                .body(())
                .unwrap(),
            &[400],
        ),
        (
            "an authority that is not the workload",
            connect("10.9.9.9:80"),
            &[400],
        ),
        (
            "an IPv6 authority that is not the workload",
            connect("[fd00::9]:80"),
            &[400],
        ),
        ("a hostname authority", connect("example.com:80"), &[400]),
        (
            "the proxy's own HBONE port",
            connect("127.0.0.1:15008"),
            &[400],
        ),
        (
            "the proxy's outbound port",
            connect("127.0.0.1:15001"),
            &[400],
        ),
        (
            "a closed app port",
            connect(&closed_port.to_string()),
            &[503],
        ),
        ("port 0", connect("127.0.0.1:0"), &[503]),
        (
            "a 70 KiB header list",
            http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(t.app.addr.to_string())
                .header("baggage", big.as_str())
                .body(())
                .unwrap(),
            &[431],
        ),
    ];
    for (row, req, want) in rows {
        let status = async {
            let mut ready = h2.clone().ready().await.ok()?;
            let (resp, _stream) = ready.send_request(req, false).ok()?;
            resp.await.ok().map(|r| r.status().as_u16())
        };
        let status = within(10, status).await;
        // A refused header list may come back as a stream reset instead of a status.
        assert!(
            status.is_none_or(|s| want.contains(&s)) && (status.is_some() || *want == [431]),
            "{row}: got {status:?}, want {want:?}"
        );
        h2 = h2.clone();
    }
    // The same connection still takes a good CONNECT.
    let mut ready = h2.ready().await.unwrap();
    let (resp, _s) = ready
        .send_request(connect(&t.app.addr.to_string()), false)
        .unwrap();
    assert_eq!(within(10, resp).await.unwrap().status(), 200);
    t.recovered("after the request rows").await;
}

/// The proxy's own HTTP ports (readiness shown; metrics and admin share the same server):
/// bytes that are not HTTP, oversized heads and unknown paths get an error or a close, never a
/// crash, and the port keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_admin_ports() {
    let _serial = SERIAL.lock().await;
    let listener = hboned::admin::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (_ready_tx, ready) = tokio::sync::watch::channel(true);
    let server = tokio::spawn(hboned::admin::serve_readiness(listener, ready));
    let ask = |bytes: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let fds = descriptors();
    let long_line = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let many_headers = format!(
        "GET /healthz/ready HTTP/1.1\r\n{}\r\n",
        (0..2000)
            .map(|i| format!("x-{i}: y\r\n"))
            .collect::<String>()
    );
    let rows: [(&str, Vec<u8>, &[&str]); 6] = [
        ("not HTTP", pattern(0, 4096), &["HTTP/1.1 400", ""]),
        (
            "a 100 KiB request line",
            long_line.into_bytes(),
            &["HTTP/1.1 431", "HTTP/1.1 414", "HTTP/1.1 400", ""],
        ),
        (
            "2,000 headers",
            many_headers.into_bytes(),
            &["HTTP/1.1 431", "HTTP/1.1 400", ""],
        ),
        (
            "an unknown path",
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            &["HTTP/1.1 404"],
        ),
        (
            "an unknown method",
            b"BREW /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            &["HTTP/1.1 404"],
        ),
        (
            "a head that never ends",
            b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n".to_vec(),
            &["HTTP/1.1 408", ""],
        ),
    ];
    for (row, bytes, want) in rows {
        let got = ask(bytes).await;
        assert!(
            want.iter().any(|w| if w.is_empty() {
                got.is_empty()
            } else {
                got.starts_with(w)
            }),
            "{row}: got {:?}",
            &got[..got.len().min(80)]
        );
        let ok =
            ask(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec())
                .await;
        assert!(
            ok.starts_with("HTTP/1.1 200"),
            "{row}: still answering: {ok:?}"
        );
    }
    eventually(10, || descriptors() <= fds + 2).await;
    server.abort();
}

/// Answers as a node's pod manager would, enrolling nothing.
struct Refusing;

impl hboned::inpod::PodHandler for Refusing {
    fn add(
        &self,
        _: hboned::inpod::PodInfo,
        _: hboned::netns::Netns,
    ) -> Result<(), hboned::inpod::PodError> {
        Ok(())
    }
    fn remove(&self, _: &str) {}
    fn keep(&self, uid: &str) -> Result<(), hboned::inpod::PodError> {
        Err(hboned::inpod::PodError::NotEnrolled(uid.to_owned()))
    }
    fn begin_snapshot(&self) {}
    fn snapshot_sent(&self) {}
}

/// ZDS: each malformed request from the node agent gets an Ack carrying the error, every
/// descriptor it carried is closed, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_zds() {
    use hboned::proto::zds;
    use prost::Message;
    use std::os::fd::{AsFd, OwnedFd};
    use zds::workload_request::Payload;
    let _serial = SERIAL.lock().await;
    let (agent, proxy) = hboned::socket::SeqPacket::pair().unwrap();
    let (ready, _) = tokio::sync::watch::channel(false);
    let session =
        tokio::spawn(async move { hboned::inpod::zds_session(&proxy, &Refusing, &ready).await });
    let mut buf = vec![0u8; 128 * 1024];
    within(10, agent.recv(&mut buf)).await.unwrap();
    let req = |p: Payload| zds::WorkloadRequest { payload: Some(p) }.encode_to_vec();
    let add = |uid: &str, info: bool| {
        req(Payload::Add(zds::AddWorkload {
            uid: uid.into(),
            workload_info: info.then(|| zds::WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        }))
    };
    let rows: [(&str, Vec<u8>, usize, &str); 8] = [
        (
            "bytes that are no WorkloadRequest",
            vec![0xff; 32],
            0,
            "cannot decode",
        ),
        // (An empty request encodes to zero bytes, which SEQPACKET reads as the agent closing.)
        (
            "a payload of a newer agent (unknown field 9)",
            vec![0x48, 0x01],
            0,
            "without a payload",
        ),
        (
            "an Add without a netns",
            add("pod-1", true),
            0,
            "exactly one netns fd",
        ),
        (
            "an Add with two descriptors",
            add("pod-1", true),
            2,
            "exactly one netns fd",
        ),
        (
            "an Add without workload_info",
            add("pod-1", false),
            1,
            "no workload_info",
        ),
        ("an Add with an empty uid", add("", true), 1, "empty uid"),
        (
            "a Keep for an unknown pod",
            req(Payload::Keep(zds::KeepWorkload {
                uid: "ghost".into(),
            })),
            3,
            "not enrolled",
        ),
        (
            "a datagram past the size limit",
            vec![0x0a; 100 * 1024],
            1,
            "truncated",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (row, bytes, nfds, want)) in rows.into_iter().enumerate() {
        // Files of their own, so only this row's descriptors are looked for afterwards.
        let paths: Vec<_> = (0..nfds)
            .map(|j| {
                let p = dir.path().join(format!("{i}-{j}"));
                std::fs::write(&p, b"").unwrap();
                p
            })
            .collect();
        let files: Vec<OwnedFd> = paths
            .iter()
            .map(|p| std::fs::File::open(p).unwrap().into())
            .collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        agent.send(&bytes, &borrowed).await.unwrap();
        drop(files);
        let (n, _) = within(10, agent.recv(&mut buf)).await.unwrap();
        let ack = zds::WorkloadResponse::decode(&buf[..n]).unwrap();
        let Some(zds::workload_response::Payload::Ack(ack)) = ack.payload else {
            panic!("{row}: no Ack");
        };
        assert!(ack.error.contains(want), "{row}: Ack error {:?}", ack.error);
        // Every descriptor the request carried is closed on the proxy's side too.
        eventually(5, || open_paths(&paths) == 0).await;
    }
    // The session still takes a good request.
    agent
        .send(&req(Payload::SnapshotSent(zds::SnapshotSent {})), &[])
        .await
        .unwrap();
    let (n, _) = within(10, agent.recv(&mut buf)).await.unwrap();
    let ack = zds::WorkloadResponse::decode(&buf[..n]).unwrap();
    assert_eq!(
        ack.payload,
        Some(zds::workload_response::Payload::Ack(zds::Ack {
            error: String::new()
        }))
    );
    drop(agent);
    within(10, session).await.unwrap().unwrap();
}

/// xDS: each resource the proxy cannot read is NACKed by name with the reason, the good
/// resources of the same response apply, the last good version of a rejected one stays, and
/// the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_xds() {
    let _serial = SERIAL.lock().await;
    use hboned::proto::envoy::service::discovery::v3::Resource;
    use hboned::proto::istio::security::Authorization;
    use hboned::proto::istio::workload as pb;
    use hboned::xds::convert::{
        ADDRESS_TYPE, AUTHORIZATION_TYPE, authorization_resource, workload_resource,
    };
    let mut fake = support::fake_ads::FakeAds::start("127.0.0.1:0".parse().unwrap()).await;
    let state = std::sync::Arc::new(hboned::state::SharedState::default());
    let settings = hboned::xds::XdsSettings {
        address: format!("http://{}", fake.addr),
        root_ca: None,
        token_file: None,
        cluster_id: "c1".into(),
        node_id: "node-a".into(),
        node_metadata: Default::default(),
        trust_domain: "cluster.local".into(),
        network: String::new(),
        on_demand: false,
        on_demand_timeout: Duration::from_millis(1500),
    };
    let client = hboned::xds::XdsClient::new(settings, state.clone());
    let _task = tokio::spawn(client.clone().run());
    let mut xds = fake.accept().await;
    xds.next().await;
    xds.next().await;
    let workload = |uid: &str, addresses: Vec<Vec<u8>>, sa: &str| pb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "test".into(),
        service_account: sa.into(),
        addresses,
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    let good = workload_resource("good", "1", workload("good", vec![vec![10, 0, 0, 1]], "sa"));
    xds.send(ADDRESS_TYPE, "n0", vec![good], &[]);
    assert!(xds.next().await.error_detail.is_none());
    let raw = |name: &str, type_url: &str, value: Vec<u8>| Resource {
        name: name.into(),
        version: "2".into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        }),
        ..Default::default()
    };
    let rows: Vec<(&str, &str, Resource)> = vec![
        (
            "no body",
            ADDRESS_TYPE,
            Resource {
                name: "empty".into(),
                ..Default::default()
            },
        ),
        (
            "another type inside",
            ADDRESS_TYPE,
            raw("wrong", AUTHORIZATION_TYPE, Vec::new()),
        ),
        (
            "bytes that do not decode",
            ADDRESS_TYPE,
            raw("junk", ADDRESS_TYPE, vec![0xff; 16]),
        ),
        (
            "a workload without uid",
            ADDRESS_TYPE,
            workload_resource("nouid", "2", workload("", vec![vec![10, 0, 0, 2]], "sa")),
        ),
        (
            "a 3-byte address",
            ADDRESS_TYPE,
            workload_resource("short", "2", workload("short", vec![vec![10, 0, 0]], "sa")),
        ),
        (
            "a service account that is no SPIFFE path segment",
            ADDRESS_TYPE,
            workload_resource(
                "badsa",
                "2",
                workload("badsa", vec![vec![10, 0, 0, 3]], "a/b"),
            ),
        ),
        (
            "the last good one, broken",
            ADDRESS_TYPE,
            workload_resource("good", "2", workload("good", vec![vec![1, 2]], "sa")),
        ),
        (
            "a policy without a name",
            AUTHORIZATION_TYPE,
            authorization_resource("test/", "2", Authorization::default()),
        ),
    ];
    for (i, (row, type_url, resource)) in rows.into_iter().enumerate() {
        let name = resource.name.clone();
        let fine = workload_resource(
            &format!("fine-{i}"),
            "1",
            workload(&format!("fine-{i}"), vec![vec![10, 1, 0, i as u8]], "sa"),
        );
        let resources = if type_url == ADDRESS_TYPE {
            vec![resource, fine]
        } else {
            vec![resource]
        };
        let nonce = format!("r{i}");
        xds.send(type_url, &nonce, resources, &[]);
        let nack = xds.next().await;
        assert_eq!(nack.response_nonce, nonce, "{row}");
        let detail = nack
            .error_detail
            .unwrap_or_else(|| panic!("{row}: must be NACKed"));
        assert!(
            detail.message.contains(&name),
            "{row}: the NACK names {name:?}: {}",
            detail.message
        );
        if type_url == ADDRESS_TYPE {
            assert!(
                state.read().knows(format!("10.1.0.{i}").parse().unwrap()),
                "{row}: the good resource applied"
            );
        }
        assert!(
            state.read().knows("10.0.0.1".parse().unwrap()),
            "{row}: the last good version stays"
        );
    }
    assert!(client.rejected_total() >= 8);
}

/// Config files: every malformed file is refused at start with exit code 1 and the key named,
/// never a panic (exit code 101) or a proxy that starts on a half-read config.
#[test]
fn catalogue_config() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let rows: [(&str, &str, &str); 9] = [
        ("not YAML", "{{{: [", "not valid YAML"),
        ("a list instead of a map", "- a\n- b\n", "not valid YAML"),
        (
            "an unknown key",
            "trustDomian: cluster.local\n",
            "trustDomian",
        ),
        (
            "a string for a number",
            "connectTimeoutSecs: soon\n",
            "connectTimeoutSecs",
        ),
        (
            "a number past u64",
            "drainTimeoutSecs: 99999999999999999999999\n",
            "drainTimeoutSecs",
        ),
        (
            "a lifetime past the range",
            "ca: {certLifetimeSecs: 18446744073709551615}\n",
            "ca.certLifetimeSecs",
        ),
        (
            "a bad CIDR in a policy",
            "policies: [{name: p, namespace: n, action: deny, rules: [[[{sourceIps: [10.0.0.0/99]}]]]}]\n",
            "policies[0]",
        ),
        (
            "a duplicate pod uid",
            "pods: [{uid: u, name: a, namespace: n, serviceAccount: s, netns: /x}, {uid: u, name: b, namespace: n, serviceAccount: s, netns: /y}]\n",
            "duplicate uid",
        ),
        (
            "a workload address that is no IP",
            "workloads: [{uid: w, name: w, namespace: n, serviceAccount: s, workloadIps: [10.0.0]}]\n",
            "workloads",
        ),
    ];
    for (i, (row, yaml, want)) in rows.into_iter().enumerate() {
        let path = dir.path().join(format!("c{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hboned"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{row}: {stderr}");
        assert!(stderr.contains(want), "{row}: {stderr}");
        assert!(!stderr.contains("panicked"), "{row}: {stderr}");
    }
}

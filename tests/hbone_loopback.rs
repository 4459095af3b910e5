//! End to end over loopback: HBONE client → HBONE server → app, with the built-in CA.
//! No root, no namespaces: everything binds 127.0.0.1:0.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use hboned::authz::{Action, Clause, Match, Policy, Rule, Scope, StringMatch};
use hboned::proxy::{PoolKey, ProxyError, TunnelSettings};
use hboned::state::SharedState;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact() {
    const TOTAL: u64 = 64 * 1024 * 1024;
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    let app = echo_app().await;
    let hbone = client(ca, TunnelSettings::default());
    let stream = within(
        10,
        hbone.connect(&key(&id("client"), &srv), &request(app.addr)),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut sum = Fnv::default();
        let mut off = 0;
        while off < TOTAL {
            let chunk = pattern(off, 256 * 1024);
            sum.update(&chunk);
            wr.write_all(&chunk).await.unwrap();
            off += chunk.len() as u64;
        }
        wr.shutdown().await.unwrap();
        sum
    });
    let reader = tokio::spawn(async move {
        let mut sum = Fnv::default();
        let mut buf = vec![0u8; 128 * 1024];
        let mut n_total = 0u64;
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            sum.update(&buf[..n]);
            n_total += n as u64;
        }
        (sum, n_total)
    });
    let sent = within(120, writer).await.unwrap();
    let (echoed, n) = within(120, reader).await.unwrap();
    assert_eq!(n, TOTAL);
    assert_eq!(sent, echoed, "checksum of the echoed stream differs");
}

/// A bulk stream from the app leaves the server's relay in whole TLS records: a DATA frame's
/// 9-byte header never travels in a record of its own. It did after every read that filled
/// the relay's buffer (a power of two: the frame was a record's multiple plus its header), one
/// record in eight, each costing both ends an AEAD operation, an allocation and a wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_from_the_app_leaves_in_whole_tls_records() {
    let (full, header_only) = records_of_bulk_from_the_app(TunnelSettings::default()).await;
    assert!(full >= BULK / 16384 / 2, "{full} full records");
    assert!(
        header_only <= 4,
        "{header_only} records carried 9 bytes, next to {full} full ones"
    );
}

/// The same against a client that takes frames of at most 16 KiB (HTTP/2's default, which
/// Envoy, as a waypoint or an east-west gateway, keeps): h2 cuts the relay's writes into frames
/// of that payload, and a frame of 16,384 bytes and its header is a record and 9 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_to_a_peer_of_16_kib_frames_leaves_in_whole_tls_records() {
    let small = TunnelSettings {
        max_frame_size: 16 * 1024,
        ..TunnelSettings::default()
    };
    let (full, header_only) = records_of_bulk_from_the_app(small).await;
    assert!(full >= BULK / 16384 / 2, "{full} full records");
    assert!(
        header_only <= 4,
        "{header_only} records carried 9 bytes, next to {full} full ones"
    );
}

/// What the bulk tests send: 16 MiB.
const BULK: usize = 16 << 20;

/// Sends [`BULK`] bytes from an app behind the server to a client with `client_settings`,
/// tapping the server's side of the connection: its TLS application records, those of 16 KiB
/// and those carrying 9 bytes.
async fn records_of_bulk_from_the_app(client_settings: TunnelSettings) -> (usize, usize) {
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    // Sends BULK bytes as fast as it can, in writes of an odd size: the relay reading it
    // falls behind and its reads fill its buffer.
    let app = app(|mut s| async move {
        let chunk = vec![7u8; 100_000];
        let mut left = BULK;
        while left > 0 {
            let n = left.min(chunk.len());
            if s.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        let _ = s.shutdown().await;
    })
    .await;
    // Between client and server, keeping what the server sends.
    let tap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via = PoolKey::new(
        id("client"),
        vec![srv.identity.clone()],
        tap.local_addr().unwrap(),
        None,
    );
    let upstream = srv.addr;
    let tapped = tokio::spawn(async move {
        let (down, _) = tap.accept().await.unwrap();
        let up = tokio::net::TcpStream::connect(upstream).await.unwrap();
        let (mut down_rd, mut down_wr) = down.into_split();
        let (mut up_rd, mut up_wr) = up.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut down_rd, &mut up_wr).await });
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = up_rd.read(&mut buf).await.unwrap_or(0);
            if n == 0 || down_wr.write_all(&buf[..n]).await.is_err() {
                return seen;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    });
    let hbone = client(ca, client_settings);
    let mut stream = within(10, hbone.connect(&via, &request(app.addr)))
        .await
        .unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 128 * 1024];
    within(60, async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
    })
    .await;
    assert_eq!(got, BULK);
    drop((stream, hbone, srv));
    let seen = within(10, tapped).await.unwrap();
    // TLS 1.3 application records: 5-byte header, then the plaintext, its content type and a
    // 16-byte tag. A record carrying 9 bytes is 26 long: a frame header alone (or an empty
    // frame: the SETTINGS acknowledgement, the stream's end).
    let (mut full, mut header_only, mut at) = (0, 0, 0);
    while at + 5 <= seen.len() {
        let len = usize::from(u16::from_be_bytes([seen[at + 3], seen[at + 4]]));
        if seen[at] == 23 {
            full += usize::from(len == 16384 + 17);
            header_only += usize::from(len == 9 + 17);
        }
        at += 5 + len;
    }
    (full, header_only)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_share_two_pooled_connections() {
    const STREAMS: usize = 200;
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    let app = echo_app().await;
    let hbone = Arc::new(client(ca, TunnelSettings::default()));
    let key = key(&id("client"), &srv);
    let barrier = Arc::new(tokio::sync::Barrier::new(STREAMS + 1));
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (hbone, key, barrier) = (hbone.clone(), key.clone(), barrier.clone());
        let target = app.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = hbone.connect(&key, &request(target)).await.unwrap();
            let msg = pattern(i as u64, 16 * 1024);
            s.write_all(&msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
            // Hold every stream open at once.
            barrier.wait().await;
            barrier.wait().await;
        }));
    }
    within(60, barrier.wait()).await;
    let stats = hbone.stats();
    assert_eq!(stats.streams, STREAMS);
    assert_eq!(
        stats.connections, 2,
        "100 streams per connection at most: {stats:?}"
    );
    assert_eq!(
        stats.dials, 2,
        "one dial per key at a time, no storm: {stats:?}"
    );
    barrier.wait().await;
    for t in tasks {
        within(30, t).await.unwrap();
    }
    assert_eq!(app.accepted(), STREAMS);
    assert_eq!(hbone.stats().streams, 0);
}

#[tokio::test]
async fn client_half_close_still_gets_the_reply() {
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    // Reads to EOF, then answers with the length it saw.
    let app = app(|mut s| async move {
        let got = read_all(&mut s).await.unwrap();
        s.write_all(format!("got {}", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let hbone = client(ca, TunnelSettings::default());
    let mut s = within(
        10,
        hbone.connect(&key(&id("client"), &srv), &request(app.addr)),
    )
    .await
    .unwrap();
    s.write_all(&[1u8; 5000]).await.unwrap();
    s.shutdown().await.unwrap();
    let reply = within(10, read_all(&mut s)).await.unwrap();
    assert_eq!(reply, b"got 5000");
}

#[tokio::test]
async fn server_half_close_still_takes_client_bytes() {
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    // Greets, closes its write side, then keeps reading until the client's EOF.
    let app = app(move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(b"hello").await.unwrap();
            s.shutdown().await.unwrap();
            let got = read_all(&mut s).await.unwrap();
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(got);
            }
        }
    })
    .await;
    let hbone = client(ca, TunnelSettings::default());
    let mut s = within(
        10,
        hbone.connect(&key(&id("client"), &srv), &request(app.addr)),
    )
    .await
    .unwrap();
    let greeting = within(10, read_all(&mut s)).await.unwrap();
    assert_eq!(greeting, b"hello", "EOF arrives after the greeting");
    s.write_all(b"after your EOF").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(within(10, rx).await.unwrap(), b"after your EOF");
}

#[tokio::test]
async fn refused_target_answers_503_without_hanging() {
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let hbone = client(ca, TunnelSettings::default());
    let err = within(
        10,
        hbone.connect(&key(&id("client"), &srv), &request(closed)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ProxyError::Status { status, .. } if status == 503),
        "{err}"
    );
    assert_eq!(err.reason(), "connect_refused");
}

#[tokio::test]
async fn authority_that_is_not_the_workload_answers_400() {
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    let app = echo_app().await;
    let hbone = client(ca, TunnelSettings::default());
    let key = key(&id("client"), &srv);
    let elsewhere = std::net::SocketAddr::new("127.0.0.2".parse().unwrap(), app.addr.port());
    let own_port = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), 15008);
    for target in [elsewhere, own_port] {
        let err = within(10, hbone.connect(&key, &request(target)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProxyError::Status { status, .. } if status == 400),
            "{target}: {err}"
        );
    }
    assert_eq!(app.accepted(), 0);
}

#[tokio::test]
async fn wrong_server_identity_fails_and_delivers_nothing() {
    let ca = ca();
    let srv = server(ca.clone(), id("impostor")).await;
    let app = echo_app().await;
    let hbone = client(ca, TunnelSettings::default());
    // The client expects "server" but the peer presents "impostor".
    let key = hboned::proxy::PoolKey::new(id("client"), vec![id("server")], srv.addr, None);
    let err = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("impostor"), "{err}");
    assert_eq!(app.accepted(), 0, "not one byte may reach the app");
    assert_eq!(hbone.stats().connections, 0);
}

#[tokio::test]
async fn foreign_ca_is_refused_by_both_sides() {
    let srv = server(ca(), id("server")).await;
    let app = echo_app().await;
    let hbone = client(ca(), TunnelSettings::default());
    let err = within(
        10,
        hbone.connect(&key(&id("client"), &srv), &request(app.addr)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProxyError::Tls { .. }), "{err}");
    assert_eq!(app.accepted(), 0);
}

/// A revocation list (`crlPath`) in the tunnel settings: a revoked client is refused by the
/// server, a revoked server by the client, each from the reload that lists it; nothing reaches
/// the app either time.
#[tokio::test]
async fn revoked_certificates_are_refused_both_ways_from_the_reload_that_lists_them() {
    use hboned::identity::CertificateManager;
    use hboned::netns::DefaultSocketFactory;
    use hboned::proxy::HboneClient;
    use hboned::tls::revocation::Revocations;
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crl.pem");
    std::fs::write(&path, "").unwrap();
    let revocations = Arc::new(Revocations::load(&path).unwrap());
    let settings = TunnelSettings {
        peers: hboned::tls::PeerChecks {
            any_client_trust_domain: false,
            revocations: Some(revocations.clone()),
        },
        ..TunnelSettings::default()
    };
    let server_certs = Arc::new(CertificateManager::new(ca.clone()));
    let client_certs = Arc::new(CertificateManager::new(ca.clone()));
    let leaf = |cert: Arc<hboned::identity::WorkloadCert>| cert.chain()[0].clone();
    let server_leaf = leaf(server_certs.fetch(&id("server")).await.unwrap());
    let client_leaf = leaf(client_certs.fetch(&id("client")).await.unwrap());
    let srv = serve(
        server_certs,
        localhost_workload(id("server")),
        "127.0.0.1:0".parse().unwrap(),
        settings.clone(),
    );
    let app = echo_app().await;
    // A fresh client each time: a pooled connection would carry on past the reload.
    let dial = || {
        let hbone = HboneClient::new(
            client_certs.clone(),
            Arc::new(DefaultSocketFactory),
            settings.clone(),
        );
        let key = key(&id("client"), &srv);
        let target = request(app.addr);
        async move { within(10, hbone.connect(&key, &target)).await.map(|_| ()) }
    };
    dial().await.unwrap();
    assert_eq!(app.accepted(), 1);

    for (revoked, who) in [(&client_leaf, "client"), (&server_leaf, "server")] {
        let pem = ca
            .revocation_list(std::slice::from_ref(revoked), std::time::SystemTime::now())
            .unwrap();
        std::fs::write(&path, pem).unwrap();
        assert!(revocations.reload().unwrap());
        let err = dial().await.unwrap_err();
        assert!(
            matches!(err, ProxyError::Tls { .. } | ProxyError::Http2 { .. }),
            "revoked {who}: {err}"
        );
        assert_eq!(app.accepted(), 1, "revoked {who}: nothing reaches the app");
    }
}

/// ztunnel's rule (`anyClientTrustDomain`, on as a drop-in): a client of another trust domain
/// the roots verify is taken, and the server sees its identity; off, it is refused.
#[tokio::test]
async fn a_client_of_another_trust_domain_is_taken_only_when_asked() {
    let ca = ca();
    let old = hboned::identity::Identity::new("old.example", "test", "client").unwrap();
    let app = echo_app().await;
    for any in [false, true] {
        let settings = TunnelSettings {
            peers: hboned::tls::PeerChecks {
                any_client_trust_domain: any,
                revocations: None,
            },
            ..TunnelSettings::default()
        };
        let srv = server_with_settings(ca.clone(), id("server"), settings);
        let hbone = client(ca.clone(), TunnelSettings::default());
        let result = within(10, hbone.connect(&key(&old, &srv), &request(app.addr))).await;
        assert_eq!(result.is_ok(), any, "anyClientTrustDomain {any}");
    }
    assert_eq!(app.accepted(), 1);
}

#[tokio::test]
async fn idle_pooled_connections_are_released() {
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    let app = echo_app().await;
    let settings = TunnelSettings {
        pool_idle_timeout: Duration::from_millis(200),
        ..TunnelSettings::default()
    };
    let hbone = client(ca, settings);
    let key = key(&id("client"), &srv);
    let s = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    // A second stream while the first is open reuses the connection.
    let s2 = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    assert_eq!(hbone.stats().dials, 1);
    drop((s, s2));
    eventually(10, || hbone.stats().connections == 0).await;
    // A new stream after release dials again.
    let _s = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    assert_eq!(hbone.stats().dials, 2);
}

/// A pooled connection opens no new stream once a certificate of its handshake has expired
/// (an identity whose certificate ran out is not kept alive by an old session); the stream it
/// carries runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_certificate_expired_takes_no_new_stream() {
    let lifetime = Duration::from_secs(3);
    let ca = Arc::new(
        hboned::identity::ca::BuiltinCa::generate(std::time::SystemTime::now())
            .unwrap()
            .with_lifetime(lifetime),
    );
    let srv = server(ca.clone(), id("server")).await;
    let app = echo_app().await;
    let hbone = client(ca, TunnelSettings::default());
    let key = key(&id("client"), &srv);
    let mut first = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    let opened = std::time::Instant::now();
    let second = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    assert_eq!(hbone.stats().dials, 1, "shared while valid");
    drop(second);
    tokio::time::sleep(lifetime.saturating_sub(opened.elapsed()) + Duration::from_millis(300))
        .await;
    let _third = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    assert_eq!(
        hbone.stats().dials,
        2,
        "a new connection, with a renewed certificate"
    );
    first.write_all(b"still flowing").await.unwrap();
    let mut back = [0u8; 13];
    within(10, first.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"still flowing");
}

#[tokio::test]
async fn app_reset_reaches_the_client_as_an_error() {
    let ca = ca();
    let srv = server(ca.clone(), id("server")).await;
    // Accepts, then closes with RST.
    let app = app(|s| async move {
        hboned::socket::reset_on_close(&s).unwrap();
        drop(s);
    })
    .await;
    let hbone = client(ca, TunnelSettings::default());
    let mut s = within(
        10,
        hbone.connect(&key(&id("client"), &srv), &request(app.addr)),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 16];
    let res = within(10, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let err = res.expect_err("a reset must not look like a clean EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// A bare TLS + HTTP/2 peer that records the first CONNECT head it receives and answers 200.
#[tokio::test]
async fn client_sends_the_exact_connect_head() {
    use hboned::hbone::{Baggage, ConnectRequest, TraceParent};
    let ca = ca();
    let (listener, addr) = bare_peer_listener().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ca_for_peer = ca.clone();
    tokio::spawn(async move {
        let (mut conn, req, _send) = bare_peer_first_stream(&ca_for_peer, listener).await;
        let head = (
            req.method().clone(),
            req.uri().clone(),
            req.headers().clone(),
        );
        tx.send(head).unwrap();
        // Keep serving the connection until the client goes away.
        while let Some(Ok(_)) = conn.accept().await {}
    });
    let hbone = client(ca, TunnelSettings::default());
    let mut req = ConnectRequest::new("[fd00::7]:9090".parse::<std::net::SocketAddr>().unwrap());
    req.forwarded_for = Some("10.1.2.3:4444".parse().unwrap());
    let mut baggage = Baggage::default();
    baggage
        .push("k8s.namespace.name", "test")
        .push("service.name", "web");
    req.baggage = baggage;
    req.traceparent = Some(TraceParent::random());
    let key = hboned::proxy::PoolKey::new(id("client"), vec![id("server")], addr, None);
    let _stream = within(10, hbone.connect(&key, &req)).await.unwrap();
    let (method, uri, headers) = within(10, rx).await.unwrap();
    assert_eq!(method, http::Method::CONNECT);
    assert_eq!(uri.to_string(), "[fd00::7]:9090");
    assert!(
        uri.scheme().is_none() && uri.path_and_query().is_none(),
        "no :scheme/:path"
    );
    let names: Vec<&str> = {
        let mut n: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        n.sort();
        n
    };
    assert_eq!(names, ["baggage", "forwarded", "traceparent"]);
    assert_eq!(headers["forwarded"], "for=\"10.1.2.3:4444\"");
    assert_eq!(
        headers["baggage"],
        "k8s.namespace.name=test,service.name=web"
    );
    let tp = headers["traceparent"].to_str().unwrap();
    assert_eq!(TraceParent::parse(tp), req.traceparent);
}

/// A peer that completes the handshakes and then stops serving its connection never answers
/// PING: the client must give up on it within interval + timeout, not hang forever.
#[tokio::test]
async fn unanswered_ping_closes_the_connection() {
    let ca = ca();
    let (listener, addr) = bare_peer_listener().await;
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel();
    let ca_for_peer = ca.clone();
    tokio::spawn(async move {
        let (mut conn, _req, _send) = bare_peer_first_stream(&ca_for_peer, listener).await;
        // Drive the connection long enough to flush the 200, then stop polling it (but keep
        // the socket open): PINGs go unanswered from here on.
        let _ = tokio::time::timeout(Duration::from_millis(100), conn.accept()).await;
        let _ = stalled_tx.send(());
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop((conn, _send));
    });
    let settings = TunnelSettings {
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(300),
        ..TunnelSettings::default()
    };
    let hbone = client(ca, settings);
    let key = hboned::proxy::PoolKey::new(id("client"), vec![id("server")], addr, None);
    let mut stream = within(
        10,
        hbone.connect(&key, &request("127.0.0.1:9".parse().unwrap())),
    )
    .await
    .unwrap();
    within(10, stalled_rx).await.unwrap();
    assert_eq!(hbone.stats().connections, 1);
    // Within interval + timeout (plus slack) the connection is declared dead...
    eventually(5, || hbone.stats().connections == 0).await;
    // ...and its stream fails instead of hanging.
    let mut buf = [0u8; 8];
    let res = within(5, stream.read(&mut buf)).await;
    assert!(
        res.is_err() || res.as_ref().is_ok_and(|n| *n == 0),
        "{res:?}"
    );
}

type BarePeer =
    h2::server::Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, bytes::Bytes>;

/// [`bare_peer_accept`], then the first CONNECT, answered 200: the connection, the request and
/// the response stream (dropping it resets the stream).
async fn bare_peer_first_stream(
    ca: &hboned::identity::ca::BuiltinCa,
    listener: tokio::net::TcpListener,
) -> (
    BarePeer,
    http::Request<h2::RecvStream>,
    h2::SendStream<bytes::Bytes>,
) {
    let mut conn = bare_peer_accept(ca, listener).await;
    let (req, mut respond) = conn.accept().await.unwrap().unwrap();
    let mut resp = http::Response::new(());
    *resp.status_mut() = http::StatusCode::OK;
    let send = respond.send_response(resp, false).unwrap();
    (conn, req, send)
}

async fn bare_peer_listener() -> (tokio::net::TcpListener, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A bare HBONE peer for tests that need to misbehave: accepts one connection, completes TLS
/// (presenting "server" from `ca`) and the HTTP/2 handshake, and hands the connection over.
async fn bare_peer_accept(
    ca: &hboned::identity::ca::BuiltinCa,
    listener: tokio::net::TcpListener,
) -> BarePeer {
    let cert = ca
        .issue(&id("server"), std::time::SystemTime::now())
        .unwrap();
    let config = hboned::tls::server_config(&cert).unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(tcp)
        .await
        .unwrap();
    h2::server::handshake(tls).await.unwrap()
}

/// Policies on the HBONE server: a DENY naming the client gets 401, an ALLOW list without it
/// too, and a policy change applies to the next stream.
#[tokio::test]
async fn policies_are_enforced_on_inbound_hbone() {
    let ca = ca();
    let state = Arc::new(SharedState::default());
    let srv = server_with_policies(ca.clone(), id("server"), Some(state.clone())).await;
    let app = echo_app().await;
    let hbone = client(ca, TunnelSettings::default());
    let key = key(&id("client"), &srv);
    let status = |r: Result<hboned::proxy::H2Stream, ProxyError>| match r {
        Ok(_) => 200,
        Err(ProxyError::Status { status, .. }) => status.as_u16(),
        Err(e) => panic!("unexpected error {e}"),
    };
    // No policy: allowed.
    assert_eq!(
        status(within(10, hbone.connect(&key, &request(app.addr))).await),
        200
    );
    // DENY naming the client.
    let client_id = "cluster.local/ns/test/sa/client";
    state.write(|s| s.upsert_policy(principal_policy("deny", Action::Deny, client_id)));
    assert_eq!(
        status(within(10, hbone.connect(&key, &request(app.addr))).await),
        401
    );
    // An ALLOW list without the client (the DENY removed).
    state.write(|s| {
        s.remove_policy("test/deny");
        let other = "cluster.local/ns/test/sa/other";
        s.upsert_policy(principal_policy("allow-other", Action::Allow, other));
    });
    assert_eq!(
        status(within(10, hbone.connect(&key, &request(app.addr))).await),
        401
    );
    // ...and with it: bytes flow.
    state.write(|s| s.upsert_policy(principal_policy("allow-client", Action::Allow, client_id)));
    let mut s = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap();
    s.write_all(b"allowed").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(within(10, read_all(&mut s)).await.unwrap(), b"allowed");
    assert_eq!(app.accepted(), 2, "denied streams never reached the app");
}

/// A NAMESPACE policy in `test` with one match on the client's principal.
fn principal_policy(name: &str, action: Action, principal: &str) -> Policy {
    Policy {
        name: name.into(),
        namespace: "test".into(),
        scope: Scope::Namespace,
        action,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch::Exact(principal.into())],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

/// A policy change resets the live connections it now denies, at once (no timer), and the
/// destination's metrics count them closed with `denied` as the reason.
#[tokio::test]
async fn a_policy_change_resets_live_connections_it_denies() {
    let ca = ca();
    let state = Arc::new(SharedState::default());
    let metrics = hboned::metrics::Metrics::new(Vec::new());
    let srv = server_with(
        ca.clone(),
        id("server"),
        Some(state.clone()),
        Some(metrics.clone()),
    )
    .await;
    let app = echo_app().await;
    let hbone = client(ca, TunnelSettings::default());
    let mut live = within(
        10,
        hbone.connect(&key(&id("client"), &srv), &request(app.addr)),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 4];
    live.write_all(b"ping").await.unwrap();
    within(10, live.read_exact(&mut buf)).await.unwrap();

    // Counted while the connection runs, not only when it ends.
    let received = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    eventually(10, || received(&metrics.encode()) == Some(4)).await;
    // An unrelated change re-checks and keeps the connection.
    state.write(|s| s.upsert_policy(principal_policy("other", Action::Deny, "nobody")));
    live.write_all(b"pong").await.unwrap();
    within(10, live.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"pong");

    // DENY everything: a rule with no clauses.
    let deny_all = Policy {
        rules: vec![Rule::default()],
        ..principal_policy("deny-all", Action::Deny, "")
    };
    state.write(|s| s.upsert_policy(deny_all));
    let res = within(10, async {
        loop {
            match live.read(&mut buf).await {
                Ok(0) => return Ok(0),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    assert!(
        matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the denied live stream must be reset: {res:?}"
    );
    // Recorded by the server's stream task right after it sent the reset.
    let denied = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("response_flags=\"DENY\""))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    eventually(10, || {
        denied(&metrics.encode(), "istio_tcp_connections_closed_total{").is_some()
    })
    .await;
    let text = metrics.encode();
    assert_eq!(
        denied(&text, "istio_tcp_connections_closed_total{").as_deref(),
        Some("1"),
        "closed, with the denial as the reason:\n{text}"
    );
    // Bytes are counted as they move, on the connection's series as it was opened.
    let value = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(
        value(&text, "istio_tcp_sent_bytes_total{").as_deref(),
        Some("8"),
        "what moved until the reset counts:\n{text}"
    );
}

/// A WORKLOAD_SELECTOR policy applies only to the workloads that list it.
#[tokio::test]
async fn selector_policies_apply_to_the_workloads_that_list_them() {
    let ca = ca();
    let state = Arc::new(SharedState::default());
    state.write(|s| {
        s.upsert_policy(Policy {
            name: "deny-all".into(),
            namespace: "test".into(),
            scope: Scope::WorkloadSelector,
            action: Action::Deny,
            // A rule with no clauses: matches everything.
            rules: vec![Rule::default()],
            dry_run: false,
        })
    });
    let srv = server_with_policies(ca.clone(), id("server"), Some(state.clone())).await;
    let app = echo_app().await;
    let hbone = client(ca, TunnelSettings::default());
    let key = key(&id("client"), &srv);
    // Not listed by the destination workload: the policy does not apply.
    assert!(
        within(10, hbone.connect(&key, &request(app.addr)))
            .await
            .is_ok()
    );
    // The destination workload (127.0.0.1) lists it: denied.
    let server = hboned::state::Workload {
        uid: "server".into(),
        name: "server".into(),
        namespace: "test".into(),
        identity: id("server"),
        network: String::new(),
        addresses: vec!["127.0.0.1".parse().unwrap()],
        node: String::new(),
        protocol: hboned::state::Protocol::Hbone,
        services: Default::default(),
        healthy: true,
        authorization_policies: vec!["test/deny-all".into()],
        host_network: false,
        workload_name: "server".into(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        cluster_id: String::new(),
        locality: Default::default(),
        hostname: String::new(),
        capacity: 1,
        unsupported: None,
        proxy_protocol: None,
        waypoint: None,
        network_gateway: None,
    };
    state.write(|s| s.upsert_workload(server));
    let err = within(10, hbone.connect(&key, &request(app.addr)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProxyError::Status { status, .. } if status == 401),
        "{err}"
    );
}

/// The peer proxy drains (GOAWAY) while a long-lived stream keeps its connection open, and its
/// successor listens on the same address: every new stream succeeds (the pooled connection
/// takes no new stream after GOAWAY; one it did not process is retried on a new connection),
/// and the long-lived stream goes on.
#[tokio::test]
async fn new_streams_survive_a_draining_peer() {
    let ca = ca();
    let drain = hboned::drain::Drain::default();
    let any = "127.0.0.1:0".parse().unwrap();
    let old = server_on(ca.clone(), id("server"), any, Some(drain.clone()));
    let app = echo_app().await;
    let hbone = client(ca.clone(), TunnelSettings::default());
    let k = key(&id("client"), &old);
    let echo = |mut s: hboned::proxy::H2Stream, msg: &'static [u8]| async move {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within(10, s.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg);
        s
    };
    let long = within(10, hbone.connect(&k, &request(app.addr)))
        .await
        .unwrap();
    let long = echo(long, b"before the drain").await;

    // The old proxy stops accepting and drains; the new one takes its address.
    old.stop_accepting();
    eventually(10, || std::net::TcpListener::bind(old.addr).is_ok()).await;
    let _new = server_on(ca, id("server"), old.addr, None);
    drain.start();
    // Let the GOAWAY reach the client before it asks for streams.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..20 {
        let s = within(10, hbone.connect(&k, &request(app.addr)))
            .await
            .expect("a new stream during the peer's drain");
        echo(s, b"served by the successor").await;
    }
    let mut long = echo(long, b"still alive").await;
    long.shutdown().await.unwrap();
    assert_eq!(hbone.stats().dials, 2, "one connection to each proxy");
}

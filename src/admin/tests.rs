//! Tests of `admin`.

use super::*;

async fn get(addr: SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out[9..12].parse().unwrap()
}

#[tokio::test]
async fn ready_only_after_every_source() {
    let (zds_tx, zds) = watch::channel(false);
    let (xds_tx, xds) = watch::channel(false);
    let ready = all_ready(vec![zds, xds]);
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_readiness(listener, ready.clone()));
    assert_eq!(get(addr, "/healthz/ready").await, 503);
    zds_tx.send_replace(true);
    tokio::task::yield_now().await;
    assert_eq!(get(addr, "/healthz/ready").await, 503, "xDS not ready yet");
    xds_tx.send_replace(true);
    let mut r = ready.clone();
    tokio::time::timeout(std::time::Duration::from_secs(5), r.wait_for(|v| *v))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(get(addr, "/healthz/ready").await, 200);
    assert_eq!(get(addr, "/nope").await, 404);

    // A source that turns unready (the node agent went away) makes the node unready again; a
    // source whose sender is gone keeps its last value.
    zds_tx.send_replace(false);
    tokio::time::timeout(std::time::Duration::from_secs(5), r.wait_for(|v| !*v))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(get(addr, "/healthz/ready").await, 503);
    drop(xds_tx);
    zds_tx.send_replace(true);
    tokio::time::timeout(std::time::Duration::from_secs(5), r.wait_for(|v| *v))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn nothing_to_wait_for_is_ready() {
    let ready = all_ready(vec![]);
    assert!(*ready.borrow());
}

/// A silent or half-sent request is closed once its head is late; connections past the cap are
/// closed at once, and the port serves again when they go. Paused time: the timeouts pass
/// without waiting.
#[tokio::test(start_paused = true)]
async fn slow_and_surplus_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, |_req| respond(StatusCode::OK, "ok\n")));
    let closed_within = |mut s: tokio::net::TcpStream, limit: std::time::Duration| async move {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(limit, s.read(&mut buf)).await;
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    };
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let limit = HEADER_READ_TIMEOUT + std::time::Duration::from_secs(5);
    assert!(
        closed_within(silent, limit).await,
        "a silent connection must be closed"
    );
    assert!(
        closed_within(half, limit).await,
        "a half-sent request must be closed"
    );

    // Past the cap, each new connection closes the oldest: the newest are served.
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let _surplus = tokio::net::TcpStream::connect(addr).await.unwrap();
    let oldest = held.remove(0);
    assert!(
        closed_within(oldest, std::time::Duration::from_secs(1)).await,
        "the oldest connection makes room"
    );
    assert_eq!(
        get(addr, "/").await,
        200,
        "a request past the cap is answered"
    );
}

/// Whoever can reach a probe port holds 1,000 idle connections open on it: the kubelet's probe,
/// which sends its request as it connects, is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_starve_the_probe() {
    // Both ends of 1,000 connections in this process: as the proxy itself does at start, take
    // the hard descriptor limit (a fresh machine's soft one is often 1,024).
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= 2100,
        "needs 2,100 descriptors, the hard limit is {hard}"
    );
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, ready) = watch::channel(true);
    tokio::spawn(serve_readiness(listener, ready));
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    for _ in 0..5 {
        let answered = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            get(addr, "/healthz/ready"),
        )
        .await;
        assert_eq!(answered.ok(), Some(200), "the probe is answered");
    }
    drop(idle);
}

/// Two proxies in one network namespace (a hostNetwork rolling update): the readiness and
/// metrics listeners bind beside each other; the admin listener waits for the old one to go.
#[tokio::test]
async fn a_successor_binds_beside_the_draining_proxy() {
    let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = first.local_addr().unwrap();
    let second = bind(addr).expect("SO_REUSEPORT lets the successor bind the same address");
    drop(second);
    let exclusive = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = exclusive.local_addr().unwrap();
    let waiting = tokio::spawn(bind_exclusive(admin_addr));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the admin port is still held");
    drop(exclusive);
    let bound = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .expect("bound once the old proxy let go")
        .unwrap();
    assert_eq!(bound.local_addr().unwrap(), admin_addr);
    drop(first);
}

/// The default `[::]` answers a probe on IPv4 and on IPv6 (ztunnel binds dual stack, and an
/// IPv6 cluster's kubelet probes the pod's IPv6 address); a successor binds beside it, and
/// where the dual-stack bind is refused (an older proxy holding the port on IPv4 alone) the
/// IPv4 wildcard is taken instead.
#[tokio::test]
async fn the_wildcard_listens_on_both_families() {
    let any = bind("[::]:0".parse().unwrap()).unwrap();
    let port = any.local_addr().unwrap().port();
    let (ready_tx, ready) = tokio::sync::watch::channel(true);
    let serving = tokio::spawn(serve_readiness(any, ready));
    for ip in ["127.0.0.1", "::1"] {
        let addr = SocketAddr::new(ip.parse().unwrap(), port);
        assert_eq!(get(addr, "/healthz/ready").await, 200, "over {ip}");
    }
    let beside = bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))
        .expect("a successor binds beside it");
    drop(beside);
    serving.abort();
    drop(ready_tx);

    // A port held on IPv4 alone by a listener without SO_REUSEPORT: the dual-stack bind fails,
    // the fallback names the same port on IPv4, which fails too, and says so.
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let err = bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    // An older proxy's IPv4 listener with SO_REUSEPORT: the successor joins it on IPv4.
    let older = bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let port = older.local_addr().unwrap().port();
    let successor = bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))).unwrap();
    assert_eq!(successor.local_addr().unwrap().port(), port);
}

#[test]
fn log_control_merges_resets_and_keeps_the_old_filter_when_install_fails() {
    use std::sync::{Arc, Mutex};
    let installed = Arc::new(Mutex::new(Vec::new()));
    let seen = installed.clone();
    let log = super::LogControl::new("info,h2=warn", move |f: &str| {
        if f.contains("refuse") {
            return Err(super::LogLevelError::Filter(
                "=".parse::<tracing_subscriber::EnvFilter>().unwrap_err(),
            ));
        }
        seen.lock().unwrap().push(f.to_owned());
        Ok(())
    });
    assert_eq!(log.current(), "info,h2=warn");
    assert_eq!(
        log.change(false, "hboned=debug").unwrap(),
        "info,h2=warn,hboned=debug"
    );
    assert_eq!(
        log.change(false, "debug").unwrap(),
        "debug,h2=warn,hboned=debug"
    );
    assert_eq!(log.change(true, "").unwrap(), "info,h2=warn");
    assert_eq!(log.change(true, "error").unwrap(), "error,h2=warn");
    assert!(log.change(false, "refuse=debug").is_err());
    assert_eq!(
        log.current(),
        "error,h2=warn",
        "a refused filter changes nothing"
    );
    assert_eq!(installed.lock().unwrap().len(), 4);
}

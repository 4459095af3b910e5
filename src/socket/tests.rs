//! Tests of `socket`.

use super::*;

#[tokio::test]
async fn options_are_applied() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    set_stream_options(&s).unwrap();
    assert!(s.nodelay().unwrap());
    assert!(SockRef::from(&s).keepalive().unwrap());
    reset_on_close(&s).unwrap();
    assert_eq!(SockRef::from(&s).linger().unwrap(), Some(Duration::ZERO));
}

#[tokio::test]
async fn seqpacket_carries_messages_and_fds() {
    use std::os::fd::AsFd;
    let (a, b) = SeqPacket::pair().unwrap();
    let file = std::fs::File::open("/proc/self/ns/net").unwrap();
    a.send(b"first", &[file.as_fd()]).await.unwrap();
    a.send(b"second", &[]).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, fds) = b.recv(&mut buf).await.unwrap();
    assert_eq!((&buf[..n], fds.len()), (&b"first"[..], 1));
    let (n, fds) = b.recv(&mut buf).await.unwrap();
    assert_eq!((&buf[..n], fds.len()), (&b"second"[..], 0));
    // A datagram larger than the buffer is an error, not a silent cut.
    a.send(&[7u8; 100], &[]).await.unwrap();
    let mut small = [0u8; 10];
    assert!(b.recv(&mut small).await.is_err());
    a.send(b"with a big buffer", &[file.as_fd()]).await.unwrap();
    let mut big = vec![0u8; 64 * 1024];
    let (n, fds) = b.recv(&mut big).await.unwrap();
    assert_eq!((&big[..n], fds.len()), (&b"with a big buffer"[..], 1));
    drop(a);
    assert_eq!(b.recv(&mut buf).await.unwrap().0, 0, "EOF");
}

#[tokio::test]
async fn original_dst_falls_back_to_the_local_address() {
    // No REDIRECT rule on loopback: the TPROXY fallback applies.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let _c = TcpStream::connect(addr).await.unwrap();
    let (accepted, _) = l.accept().await.unwrap();
    assert_eq!(original_dst(&accepted).unwrap(), addr);
}

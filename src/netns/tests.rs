//! Tests of `netns`.

use super::*;

#[tokio::test]
async fn default_factory_binds_and_dials() {
    let f = DefaultSocketFactory;
    let l = f.tcp_bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    let (dialed, accepted) = tokio::join!(dial(&f, None, addr, Duration::from_secs(5)), l.accept());
    let dialed = dialed.unwrap();
    assert!(dialed.nodelay().unwrap());
    assert_eq!(accepted.unwrap().1, dialed.local_addr().unwrap());
}

#[tokio::test]
async fn dial_refused_is_an_error() {
    let f = DefaultSocketFactory;
    // Bind then drop, so the port is (almost certainly) closed.
    let addr = f
        .tcp_bind("127.0.0.1:0".parse().unwrap())
        .unwrap()
        .local_addr()
        .unwrap();
    let err = dial(&f, None, addr, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn pod_factory_in_our_own_netns_marks_reuses_ports_and_listens_transparently() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: SO_MARK needs CAP_NET_ADMIN");
        return;
    }
    let ns = Arc::new(Netns::open(Path::new("/proc/self/ns/net")).unwrap());
    let f = PodSocketFactory::new(ns);
    let l = f.tcp_bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    // SO_REUSEPORT: a second listener on the same port is allowed.
    let l2 = f.tcp_bind(addr).unwrap();
    assert_eq!(SockRef::from(&l2).mark().unwrap(), socket::PROXY_MARK);
    // IP_TRANSPARENT: connections a TPROXY rule set hands over are accepted too.
    assert!(SockRef::from(&l2).ip_transparent_v4().unwrap());
    let s = dial(&f, None, addr, Duration::from_secs(5)).await.unwrap();
    assert_eq!(SockRef::from(&s).mark().unwrap(), socket::PROXY_MARK);
    drop(l);
}

#[test]
fn opening_a_missing_netns_names_it() {
    let err = Netns::open(Path::new("/var/run/netns/does-not-exist")).unwrap_err();
    assert!(err.to_string().contains("does-not-exist"), "{err}");
}

//! ZDS message handling: a node agent sending any datagrams (any bytes, with zero to three
//! descriptors attached) gets one acknowledgement per datagram, and the session never panics.
//! The input is a list of datagrams, each a length byte, a descriptor-count byte, then bytes.
#![no_main]

use std::os::fd::{AsFd, OwnedFd};

use hboned::inpod::{PodHandler, PodInfo, zds_session};
use hboned::netns::Netns;
use hboned::socket::SeqPacket;
use libfuzzer_sys::fuzz_target;

/// Accepts everything, enrolls nothing.
struct Accepting;

impl PodHandler for Accepting {
    fn add(&self, _info: PodInfo, _netns: Netns) -> Result<(), hboned::inpod::PodError> {
        Ok(())
    }
    fn remove(&self, _uid: &str) {}
    fn keep(&self, _uid: &str) -> Result<(), hboned::inpod::PodError> {
        Ok(())
    }
    fn begin_snapshot(&self) {}
    fn snapshot_sent(&self) {}
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (agent, proxy) = SeqPacket::pair().unwrap();
        let (ready, _) = tokio::sync::watch::channel(false);
        let session = tokio::spawn(async move { zds_session(&proxy, &Accepting, &ready).await });
        let mut buf = vec![0u8; 64 * 1024];
        let (n, _) = agent.recv(&mut buf).await.unwrap();
        assert!(n > 0, "hello first");
        let mut rest = data;
        while rest.len() >= 2 {
            let (len, fds) = (usize::from(rest[0]), usize::from(rest[1] % 4));
            let body = &rest[2..(2 + len).min(rest.len())];
            rest = &rest[(2 + len).min(rest.len())..];
            if body.is_empty() {
                // An empty datagram ends the session (it reads as EOF on SEQPACKET).
                break;
            }
            let files: Vec<OwnedFd> = (0..fds)
                .map(|_| std::fs::File::open("/dev/null").unwrap().into())
                .collect();
            let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
            agent.send(body, &borrowed).await.unwrap();
            let (n, _) = agent.recv(&mut buf).await.unwrap();
            assert!(n > 0, "one acknowledgement per request");
        }
        drop(agent);
        let _ = session.await.unwrap();
    });
});

//! Packet capture for the topology: a tcpdump on one interface into a pcap file, stopped only
//! once everything before a sentinel SYN is written, and a small parser for the TCP segments
//! (IPv4 and IPv6) of that file.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::netns::Netns;

/// A tcpdump on one interface, written to a pcap file.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    file: PathBuf,
}

/// One captured TCP segment.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

impl Capture {
    pub async fn start(netns: &str, iface: &str, file: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", netns, "tcpdump", "-i", iface, "-U", "-s", "0", "-B", "65536",
                "-w",
            ])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        // tcpdump says "listening on" once the capture is armed.
        let mut stderr = child.stderr.take().context("tcpdump stderr")?;
        let armed = tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            let mut byte = [0u8; 1];
            while stderr.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                seen.push(byte[0]);
                if String::from_utf8_lossy(&seen).contains("listening on") {
                    return Ok(stderr);
                }
            }
            Err(String::from_utf8_lossy(&seen).into_owned())
        });
        match tokio::time::timeout(Duration::from_secs(10), armed).await {
            Ok(Ok(Ok(rest))) => {
                // Keep draining stderr so tcpdump never blocks on it.
                std::thread::spawn(move || std::io::copy(&mut { rest }, &mut std::io::sink()));
            }
            other => {
                let _ = child.kill();
                bail!("tcpdump did not start: {other:?}");
            }
        }
        Ok(Capture {
            child,
            file: file.to_owned(),
        })
    }

    /// Stops the capture and returns the TCP segments it saw. tcpdump may still be reading its
    /// ring buffer when the traffic ends, so first a SYN goes to `sentinel` (a closed port
    /// across the link, sent from `netns`) until it shows up in the file: tcpdump writes in
    /// order, so everything before it is in the file too.
    pub fn stop(mut self, netns: &Netns, sentinel: SocketAddr) -> anyhow::Result<Vec<Segment>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Refused at once (RST); only the SYN on the wire matters.
            let _ = netns.run(|| {
                std::net::TcpStream::connect_timeout(&sentinel, Duration::from_millis(200))
            });
            std::thread::sleep(Duration::from_millis(50));
            let seen = std::fs::read(&self.file)
                .ok()
                .and_then(|d| parse_pcap(&d).ok())
                .is_some_and(|segs| segs.iter().any(|s| s.dst == sentinel));
            if seen {
                break;
            }
            if Instant::now() > deadline {
                bail!("the capture never saw the sentinel SYN to {sentinel}");
            }
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        self.child.wait()?;
        parse_pcap(&std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TCP segment in an IPv4 packet, if it carries one.
fn tcp_in_ipv4(ip: &[u8]) -> Option<Segment> {
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])).min(ip.len());
    if *ip.get(9)? != 6 || total < ihl + 20 {
        return None;
    }
    let v4 = |o: usize| IpAddr::V4(Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]));
    tcp_segment(v4(12), v4(16), &ip[ihl..total])
}

/// The TCP segment in an IPv6 packet (no extension headers), if it carries one.
fn tcp_in_ipv6(ip: &[u8]) -> Option<Segment> {
    if ip.len() < 40 + 20 || ip[6] != 6 {
        return None;
    }
    let total = (40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))).min(ip.len());
    let v6 = |o: usize| {
        let b: [u8; 16] = ip[o..o + 16].try_into().unwrap_or_default();
        IpAddr::V6(Ipv6Addr::from(b))
    };
    tcp_segment(v6(8), v6(24), &ip[40..total])
}

fn tcp_segment(src: IpAddr, dst: IpAddr, tcp: &[u8]) -> Option<Segment> {
    let data_off = usize::from(*tcp.get(12)? >> 4) * 4;
    let port = |o: usize| u16::from_be_bytes([tcp[o], tcp[o + 1]]);
    Some(Segment {
        src: SocketAddr::new(src, port(0)),
        dst: SocketAddr::new(dst, port(2)),
        payload: tcp.get(data_off..).unwrap_or_default().to_vec(),
    })
}

/// Reads the TCP segments (IPv4 and IPv6) of an Ethernet pcap file.
pub fn parse_pcap(data: &[u8]) -> anyhow::Result<Vec<Segment>> {
    let u32_at = |b: &[u8], i: usize| -> anyhow::Result<u32> {
        let s = b.get(i..i + 4).context("truncated pcap")?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    if u32_at(data, 0)? != 0xa1b2c3d4 || u32_at(data, 20)? != 1 {
        bail!("not a little-endian Ethernet pcap");
    }
    let mut segments = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let caplen = u32_at(data, off + 8)? as usize;
        let frame = data
            .get(off + 16..off + 16 + caplen)
            .context("truncated pcap record")?;
        off += 16 + caplen;
        if let Some(segment) = frame.get(14..).and_then(|ip| match frame[12..14] {
            [0x08, 0x00] => tcp_in_ipv4(ip),
            [0x86, 0xdd] => tcp_in_ipv6(ip),
            _ => None,
        }) {
            segments.push(segment);
        }
    }
    Ok(segments)
}

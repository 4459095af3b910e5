//! The measurements behind the scale curves (`cargo bench --bench scale` draws them): on the
//! demo topology, bulk throughput against parallel streams (raw TCP, hboned, the plain relay),
//! and against idle connections held, both proxies' RSS and the CPU one new connection costs
//! them. Each proxy's CPU and RSS are read from `/proc`, as in the netns benchmark.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::relay::PlainRelay;
use super::{BULK, SINK, Topology, connect, measured, median, proxies, push};
use crate::testbed::{A1, A2, B1, B2};

/// Bulk throughput with `streams` parallel connections sharing [`BULK`] bytes (medians).
#[derive(Debug, Clone, Copy)]
pub struct StreamsPoint {
    pub streams: usize,
    pub raw_gbps: f64,
    pub hboned_gbps: f64,
    /// Gbit/s over the CPU seconds both proxies spent.
    pub hboned_per_core: f64,
    /// The plain relay's Gbit/s and Gbit/s per relay core; `None` without socat.
    pub relay: Option<(f64, f64)>,
}

/// Both proxies at `held` idle connections, 1 byte echoed through each.
#[derive(Debug, Clone, Copy)]
pub struct IdlePoint {
    pub held: usize,
    /// Each proxy's resident set (node A, node B), bytes.
    pub rss: [u64; 2],
    /// HBONE connections from node A to node B carrying them (established to port 15008).
    pub pooled: usize,
    /// Both proxies' CPU per new connection (connect, 1-byte echo, close) while these are held.
    pub cpu_per_connection: Duration,
}

/// `streams` connections from `from` to `to`, `BULK` bytes in all; seconds taken.
async fn spread(
    topo: &Topology,
    from: &str,
    to: SocketAddr,
    streams: usize,
) -> anyhow::Result<f64> {
    let each = BULK / streams as u64;
    let t = Instant::now();
    let runs = (0..streams).map(|_| push(topo, from, to, each));
    for r in futures_util::future::join_all(runs).await {
        r?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Throughput at each stream count: raw a2 → b2, hboned a1 → b1 and (with socat) the plain
/// relay a2 → node A → node B → b2, alternating, medians of `runs`.
pub async fn streams(
    topo: &Topology,
    counts: &[usize],
    runs: usize,
) -> anyhow::Result<Vec<StreamsPoint>> {
    let apps = super::start_apps(topo)?;
    let relay = PlainRelay::start(topo).await?;
    let bits = (BULK as f64) * 8.0;
    let mut points = Vec::new();
    for &n in counts {
        let (mut raw, mut tunnel, mut per_core) = (vec![], vec![], vec![]);
        let (mut relayed, mut relay_core) = (vec![], vec![]);
        for _ in 0..runs {
            let secs = spread(topo, A2.name, B2.addr(SINK), n)
                .await
                .with_context(|| format!("raw TCP, {n} streams"))?;
            raw.push(bits / secs / 1e9);
            let tunnelled = spread(topo, A1.name, B1.addr(SINK), n);
            let (gbps, cpu, _) = measured(topo, bits, tunnelled)
                .await
                .with_context(|| format!("hboned, {n} streams"))?;
            tunnel.push(gbps);
            per_core.push(bits / 1e9 / cpu.max(1e-9));
            if let Some(relay) = &relay {
                let before = relay.cpu().await?;
                let secs = spread(topo, A2.name, PlainRelay::entry(SINK), n)
                    .await
                    .with_context(|| format!("plain relay, {n} streams"))?;
                let cpu = relay.cpu().await?.saturating_sub(before);
                relayed.push(bits / secs / 1e9);
                relay_core.push(bits / 1e9 / cpu.as_secs_f64().max(1e-9));
            }
        }
        points.push(StreamsPoint {
            streams: n,
            raw_gbps: median(&mut raw),
            hboned_gbps: median(&mut tunnel),
            hboned_per_core: median(&mut per_core),
            relay: (!relayed.is_empty()).then(|| (median(&mut relayed), median(&mut relay_core))),
        });
    }
    apps.iter().for_each(|a| a.abort());
    Ok(points)
}

/// One idle connection from a1: connected, 1 byte echoed, kept.
async fn open_idle(topo: &Topology, to: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let mut s = connect(topo, A1.name, to).await?;
    s.write_all(&[1]).await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(s)
}

/// The proxies at each count of idle connections from a1 to `to`, an echo app on b1 (counts
/// ascending; fresh proxies expected): the
/// missing connections opened at once (at most `burst` connecting at a time), two seconds
/// settled, RSS sampled, then sequential new connections for two seconds while they are held.
/// Returns the points and, last, both proxies' RSS twelve seconds after every connection closed
/// (past the relay's 1 s shrink and jemalloc's 1 s decay), next to the RSS before the first.
pub async fn idle(
    topo: &Topology,
    to: SocketAddr,
    counts: &[usize],
    burst: usize,
) -> anyhow::Result<(Vec<IdlePoint>, [u64; 2], [u64; 2])> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = proxies(topo)?.map(|(_, r)| r.all);
    let mut held = Vec::new();
    let mut points = Vec::new();
    for &count in counts {
        while held.len() < count {
            let n = (count - held.len()).min(burst);
            let opened = (0..n).map(|_| open_idle(topo, to));
            for s in futures_util::future::join_all(opened).await {
                held.push(s?);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = proxies(topo)?.map(|(_, r)| r.all);
        let pooled = hbone_connections(topo)?;
        let before = proxies(topo)?;
        let t = Instant::now();
        let mut made = 0u32;
        while t.elapsed() < Duration::from_secs(2) {
            drop(open_idle(topo, to).await?);
            made += 1;
        }
        let after = proxies(topo)?;
        let cpu: Duration = (0..2)
            .map(|i| after[i].0.total.saturating_sub(before[i].0.total))
            .sum();
        points.push(IdlePoint {
            held: count,
            rss,
            pooled,
            cpu_per_connection: cpu / made.max(1),
        });
    }
    drop(held);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let end = proxies(topo)?.map(|(_, r)| r.all);
    Ok((points, start, end))
}

/// Established connections to port 15008 seen from node A and its client pod (wherever node
/// A's proxy made its pooled sockets).
fn hbone_connections(topo: &Topology) -> anyhow::Result<usize> {
    let mut n = 0;
    for ns in [topo.netns_name("na"), topo.netns_name(A1.name)] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "ss", "-Htn", "state", "established"])
            .arg("dport = :15008")
            .output()?;
        anyhow::ensure!(out.status.success(), "ss failed in {ns}");
        n += out
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
    }
    Ok(n)
}

//! The netns benchmark (`hboned demo --bench`, `scripts/netns-bench`): on the demo topology,
//! pod to pod through both proxies next to raw TCP over the same nodes and link, measured from
//! outside the proxies (their CPU and RSS read from /proc). Reports bulk one stream, reverse and
//! four streams (tunnel/raw and Gbit/s per proxy CPU core), 1-byte ping-pong p50/p99 added over
//! raw, connections per second, and RSS per idle connection, fresh and after a 16 MiB burst;
//! then the same path through a plain two-hop relay without TLS (`relay`), the floor.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{A1, A2, B1, B2, Topology};

/// The port of the sink app (counts what it reads, answers the count).
const SINK: u16 = 7100;
/// The port of the source app (writes the requested number of bytes).
const SOURCE: u16 = 7101;
/// The port of the 1-byte echo app.
const ECHO: u16 = 7102;
const BULK: u64 = 512 << 20;
const CHUNK: usize = 256 << 10;

mod relay;

/// The numeric fields of `/proc/PID/stat` after the command name (0 where one is not a number;
/// at least 20 of them): index 11 is utime, 12 stime, 13 cutime, 14 cstime.
fn stat_fields(pid: u32) -> anyhow::Result<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let mut fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    fields.resize(fields.len().max(20), 0);
    Ok(fields)
}

/// Clock ticks of /proc's CPU times as a duration.
fn ticks(t: u64) -> Duration {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(t * 1000 / hz)
}

/// One proxy's CPU time (user + system, and the system part) and resident set, from /proc.
fn proc_sample(pid: u32) -> anyhow::Result<(Cpu, u64)> {
    let fields = stat_fields(pid)?;
    let (user, system) = (fields[11], fields[12]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cpu = Cpu {
        total: ticks(user + system),
        system: ticks(system),
    };
    Ok((cpu, rss_kib * 1024))
}

/// CPU time of a process: all of it, and what it spent in the kernel.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    total: Duration,
    system: Duration,
}

/// Both proxies' samples (node A's, node B's).
fn proxies(topo: &Topology) -> anyhow::Result<[(Cpu, u64); 2]> {
    let pid = |i| {
        topo.pid(i)
            .ok_or_else(|| anyhow::anyhow!("proxy {i} is not running"))
    };
    Ok([proc_sample(pid(0)?)?, proc_sample(pid(1)?)?])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// The benchmark's apps on b1 and b2, serving while the handles are held.
pub(crate) fn start_apps(topo: &Topology) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut apps = on_pod(topo, B1.name)?;
    apps.extend(on_pod(topo, B2.name)?);
    Ok(apps)
}

/// The sink, source and echo apps on a pod.
fn on_pod(topo: &Topology, pod: &str) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let serve = |l: TcpListener, kind: u16| {
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; CHUNK];
                    match kind {
                        SINK => {
                            let mut n = 0u64;
                            while let Ok(k) = s.read(&mut buf).await {
                                if k == 0 {
                                    break;
                                }
                                n += k as u64;
                            }
                            let _ = s.write_all(&n.to_be_bytes()).await;
                        }
                        SOURCE => {
                            let mut want = [0u8; 8];
                            if s.read_exact(&mut want).await.is_err() {
                                return;
                            }
                            let mut left = u64::from_be_bytes(want);
                            while left > 0 {
                                let n = left.min(CHUNK as u64) as usize;
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                                left -= n as u64;
                            }
                            let _ = s.shutdown().await;
                        }
                        _ => {
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    }
                });
            }
        })
    };
    Ok(vec![
        serve(topo.listen(pod, SINK)?, SINK),
        serve(topo.listen(pod, SOURCE)?, SOURCE),
        serve(topo.listen(pod, ECHO)?, ECHO),
    ])
}

async fn connect(topo: &Topology, from: &str, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = topo.connect(from, to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// `bytes` client → server on one connection; seconds taken.
async fn push(topo: &Topology, from: &str, to: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut s = connect(topo, from, to).await?;
    let chunk = vec![0x42u8; CHUNK];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    anyhow::ensure!(u64::from_be_bytes(count) == bytes, "short transfer");
    Ok(t.elapsed().as_secs_f64())
}

/// `bytes` server → client on one connection; seconds taken.
async fn pull(topo: &Topology, from: &str, to: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut s = connect(topo, from, to).await?;
    let t = Instant::now();
    s.write_all(&bytes.to_be_bytes()).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    anyhow::ensure!(got == bytes, "short transfer");
    Ok(t.elapsed().as_secs_f64())
}

/// Gbit/s of one transfer shape, the proxies' CPU seconds it took, and the share of those spent
/// in the kernel.
async fn measured<F>(topo: &Topology, bits: f64, run: F) -> anyhow::Result<(f64, f64, f64)>
where
    F: std::future::Future<Output = anyhow::Result<f64>>,
{
    let before = proxies(topo)?;
    let secs = run.await?;
    let after = proxies(topo)?;
    let spent = |part: fn(&Cpu) -> Duration| -> f64 {
        (0..2)
            .map(|i| {
                part(&after[i].0)
                    .saturating_sub(part(&before[i].0))
                    .as_secs_f64()
            })
            .sum()
    };
    let (cpu, system) = (spent(|c| c.total), spent(|c| c.system));
    Ok((bits / secs / 1e9, cpu, system / cpu.max(1e-9)))
}

/// What one bulk shape measured: medians over its runs.
struct Bulk {
    raw: f64,
    tunnel: f64,
    /// Gbit/s per proxy CPU core.
    per_core: f64,
    /// Share of the proxies' CPU spent in the kernel.
    in_kernel: f64,
}

/// One bulk shape, raw and tunnelled alternately `runs` times.
async fn bulk(topo: &Topology, runs: usize, shape: &str) -> anyhow::Result<Bulk> {
    let bits = BULK as f64 * 8.0;
    let one = |from: &'static str, to: SocketAddr| async move {
        match shape {
            "reverse" => pull(topo, from, SocketAddr::new(to.ip(), SOURCE), BULK).await,
            "4 streams" => {
                let t = Instant::now();
                let each = BULK / 4;
                let runs = (0..4).map(|_| push(topo, from, to, each));
                for r in futures_util::future::join_all(runs).await {
                    r?;
                }
                Ok(t.elapsed().as_secs_f64())
            }
            _ => push(topo, from, to, BULK).await,
        }
    };
    let (mut raw, mut tunnel, mut per_core, mut in_kernel) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        raw.push(measured(topo, bits, one(A2.name, B2.addr(SINK))).await?.0);
        let (gbps, cpu, system) = measured(topo, bits, one(A1.name, B1.addr(SINK))).await?;
        tunnel.push(gbps);
        per_core.push(bits / 1e9 / cpu.max(1e-9));
        in_kernel.push(system);
    }
    Ok(Bulk {
        raw: median(&mut raw),
        tunnel: median(&mut tunnel),
        per_core: median(&mut per_core),
        in_kernel: median(&mut in_kernel),
    })
}

/// 1-byte ping-pong round trips on one warm connection.
async fn ping_pong(topo: &Topology, from: &str, to: SocketAddr) -> anyhow::Result<Vec<Duration>> {
    let mut s = connect(topo, from, to).await?;
    let mut rtts = Vec::with_capacity(5000);
    let mut b = [0u8; 1];
    for i in 0..5200 {
        let t = Instant::now();
        s.write_all(&[7]).await?;
        s.read_exact(&mut b).await?;
        if i >= 200 {
            rtts.push(t.elapsed());
        }
    }
    Ok(rtts)
}

/// Sequential connect + 1-byte echo + close, for `window`: connections per second.
async fn connection_rate(
    topo: &Topology,
    from: &str,
    to: SocketAddr,
    window: Duration,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut n = 0u32;
    while t.elapsed() < window {
        let mut s = connect(topo, from, to).await?;
        s.write_all(&[1]).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        drop(s);
        n += 1;
    }
    Ok(f64::from(n) / t.elapsed().as_secs_f64())
}

/// RSS added per connection on each proxy: `count` idle a1 → b1 connections (1 byte echoed),
/// then each after a 16 MiB burst through it; settled for two seconds (twelve after the burst)
/// before each sample.
async fn rss_per_connection(topo: &Topology, count: usize) -> anyhow::Result<([f64; 2], [f64; 2])> {
    let settle = || tokio::time::sleep(Duration::from_secs(2));
    settle().await;
    let base = proxies(topo)?;
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = connect(topo, A1.name, B1.addr(ECHO)).await?;
        s.write_all(&[1]).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        conns.push(s);
    }
    settle().await;
    let idle = proxies(topo)?;
    // A 16 MiB burst through each, echoed back, a few connections at a time.
    let burst = vec![0x5au8; 16 << 20];
    for group in conns.chunks_mut(4) {
        let runs = group.iter_mut().map(|s| {
            let burst = &burst;
            async move {
                let (mut r, mut w) = s.split();
                let send = w.write_all(burst);
                let recv = async {
                    let mut buf = vec![0u8; CHUNK];
                    let mut got = 0;
                    while got < burst.len() {
                        let n = r.read(&mut buf).await?;
                        anyhow::ensure!(n > 0, "closed during the burst");
                        got += n;
                    }
                    Ok(())
                };
                let (a, b) = tokio::join!(send, recv);
                a?;
                b
            }
        });
        for r in futures_util::future::join_all(runs).await {
            r?;
        }
    }
    // Past the relay's idle shrink (1 s) and jemalloc's dirty-page decay (10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after_burst = proxies(topo)?;
    drop(conns);
    let per = |s: [(Cpu, u64); 2]| {
        [0, 1].map(|i| (s[i].1 as f64 - base[i].1 as f64) / count as f64 / 1024.0)
    };
    Ok((per(idle), per(after_burst)))
}

/// `hboned demo --throughput`'s line: bulk one stream, raw and tunnelled (apps started).
pub(crate) async fn throughput(topo: &Topology, runs: usize) -> anyhow::Result<String> {
    let Bulk { raw, tunnel, .. } = bulk(topo, runs, "1 stream").await?;
    Ok(format!(
        "pod-to-pod throughput, {} MiB per run, median of {runs}: raw TCP a2→b2 {raw:.2} Gbit/s, HBONE a1→b1 {tunnel:.2} Gbit/s, tunnel/raw {:.2}",
        BULK >> 20,
        tunnel / raw
    ))
}

/// The whole report, `runs` alternating runs per bulk shape (apps started).
pub(crate) async fn report(topo: &Topology, runs: usize) -> anyhow::Result<String> {
    let mut out = String::new();
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("flags"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    writeln!(
        out,
        "netns benchmark: {} CPUs, avx512f {}, vaes {}; {} MiB per bulk run, medians of {runs}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        has("avx512f"),
        has("vaes"),
        BULK >> 20
    )?;
    // Memory first, on proxies that have not moved bulk traffic yet.
    let (idle, burst) = rss_per_connection(topo, 500).await?;
    writeln!(
        out,
        "RSS per idle tunnelled connection (500): node A {:.1} KiB, node B {:.1} KiB; after a 16 MiB burst through each: {:.1} / {:.1} KiB",
        idle[0], idle[1], burst[0], burst[1]
    )?;
    writeln!(
        out,
        "| shape | raw Gbit/s | HBONE Gbit/s | tunnel/raw | Gbit/s per proxy CPU core | proxy CPU in the kernel |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for shape in ["1 stream", "reverse", "4 streams"] {
        let b = bulk(topo, runs, shape).await?;
        writeln!(
            out,
            "| {shape} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% |",
            b.raw,
            b.tunnel,
            b.tunnel / b.raw,
            b.per_core,
            b.in_kernel * 100.0
        )?;
    }
    let mut raw = ping_pong(topo, A2.name, B2.addr(ECHO)).await?;
    let mut tunnel = ping_pong(topo, A1.name, B1.addr(ECHO)).await?;
    let (r50, r99) = (percentile(&mut raw, 0.5), percentile(&mut raw, 0.99));
    let (t50, t99) = (percentile(&mut tunnel, 0.5), percentile(&mut tunnel, 0.99));
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    writeln!(
        out,
        "1-byte ping-pong: raw p50 {:.0} µs p99 {:.0} µs; HBONE p50 {:.0} µs p99 {:.0} µs; added p50 +{:.0} µs, p99 +{:.0} µs",
        us(r50),
        us(r99),
        us(t50),
        us(t99),
        us(t50) - us(r50),
        us(t99) - us(r99)
    )?;
    let window = Duration::from_secs(3);
    let raw = connection_rate(topo, A2.name, B2.addr(ECHO), window).await?;
    let tunnel = connection_rate(topo, A1.name, B1.addr(ECHO), window).await?;
    writeln!(
        out,
        "connect + 1-byte echo + close, sequential: raw {raw:.0}/s, HBONE {tunnel:.0}/s ({:.2})",
        tunnel / raw
    )?;
    writeln!(out, "{}", relay::baseline(topo, runs).await?)?;
    Ok(out)
}

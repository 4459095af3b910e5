//! The netns benchmark (`hboned demo --bench`, `scripts/netns-bench`): on the demo topology,
//! pod to pod through both proxies next to raw TCP over the same nodes and link and next to a
//! plain two-hop relay without TLS (`relay`, the floor), measured from outside the proxies
//! (their CPU and RSS read from /proc). Reports, each against its baseline of the same run: RSS
//! per idle connection with 2,000 opened at once on fresh proxies, and how far RSS comes back
//! after they close; bulk one stream, reverse and four streams (tunnel/raw, Gbit/s per proxy
//! CPU core and its ratio to the relay's per relay core); 1-byte ping-pong p50/p99 against
//! raw's; connections per second. `curves` measures the scale curves (`benches/scale.rs`).

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

pub mod curves;
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

/// A `/proc/<pid>/status` line's figure in KiB (0 when absent).
fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One proxy's CPU time (user + system, and the system part) and resident set, from /proc.
fn proc_sample(pid: u32) -> anyhow::Result<(Cpu, Resident)> {
    let fields = stat_fields(pid)?;
    let (user, system) = (fields[11], fields[12]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let resident = Resident {
        all: status_kib(&status, "VmRSS:") * 1024,
        file: status_kib(&status, "RssFile:") * 1024,
    };
    let cpu = Cpu {
        total: ticks(user + system),
        system: ticks(system),
    };
    Ok((cpu, resident))
}

/// A process's resident set in bytes: all of it, and its file-backed part (`RssFile`: the
/// binary's code and data as they are paged in, shared libraries).
#[derive(Debug, Clone, Copy)]
struct Resident {
    all: u64,
    file: u64,
}

/// CPU time of a process: all of it, and what it spent in the kernel.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    total: Duration,
    system: Duration,
}

/// Both proxies' samples (node A's, node B's).
fn proxies(topo: &Topology) -> anyhow::Result<[(Cpu, Resident); 2]> {
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
    /// The plain relay's Gbit/s per relay CPU core, when it runs.
    relay_per_core: Option<f64>,
}

/// One run of a bulk shape from `from` into the sink app (reverse: out of the source app),
/// `at` giving where to connect for an app's port; seconds taken.
async fn shape_once(
    topo: &Topology,
    shape: &str,
    from: &str,
    at: &dyn Fn(u16) -> SocketAddr,
) -> anyhow::Result<f64> {
    let to = at(SINK);
    match shape {
        "reverse" => pull(topo, from, at(SOURCE), BULK).await,
        "4 streams" => {
            let t = Instant::now();
            let runs = (0..4).map(|_| push(topo, from, to, BULK / 4));
            for r in futures_util::future::join_all(runs).await {
                r?;
            }
            Ok(t.elapsed().as_secs_f64())
        }
        _ => push(topo, from, to, BULK).await,
    }
}

/// One bulk shape, raw, tunnelled and (with `relay`) through the plain relay, alternately
/// `runs` times.
async fn bulk(
    topo: &Topology,
    runs: usize,
    shape: &str,
    relay: Option<&relay::PlainRelay>,
) -> anyhow::Result<Bulk> {
    let bits = BULK as f64 * 8.0;
    let (mut raw, mut tunnel, mut per_core, mut in_kernel) = (vec![], vec![], vec![], vec![]);
    let mut relay_per_core = vec![];
    for _ in 0..runs {
        let secs = shape_once(topo, shape, A2.name, &|p| B2.addr(p)).await?;
        raw.push(bits / secs / 1e9);
        let tunnelled = shape_once(topo, shape, A1.name, &|p| B1.addr(p));
        let (gbps, cpu, system) = measured(topo, bits, tunnelled).await?;
        tunnel.push(gbps);
        per_core.push(bits / 1e9 / cpu.max(1e-9));
        in_kernel.push(system);
        if let Some(relay) = relay {
            let before = relay.cpu().await?;
            shape_once(topo, shape, A2.name, &relay::PlainRelay::entry).await?;
            let cpu = relay.cpu().await?.saturating_sub(before);
            relay_per_core.push(bits / 1e9 / cpu.as_secs_f64().max(1e-9));
        }
    }
    Ok(Bulk {
        raw: median(&mut raw),
        tunnel: median(&mut tunnel),
        per_core: median(&mut per_core),
        in_kernel: median(&mut in_kernel),
        relay_per_core: (!relay_per_core.is_empty()).then(|| median(&mut relay_per_core)),
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

/// Both proxies' RSS through two cycles of `count` idle a1 → b1 connections opened at once
/// (1 byte echoed through each), the first on fresh proxies; a 16 MiB echo burst through
/// `burst` of the second cycle's before they close; then `count` idle a1 → b2 connections
/// (b2 is not enrolled: node A relays them in plaintext). Samples are taken two seconds
/// settled, twelve after closing or a burst (past the relay's 1 s shrink and jemalloc's 1 s
/// decay).
struct Memory {
    count: usize,
    burst: usize,
    fresh: [u64; 2],
    idle: [u64; 2],
    /// Of `fresh` and `idle`, the file-backed pages: code paged in by the first connections.
    fresh_file: [u64; 2],
    idle_file: [u64; 2],
    /// After the first cycle closed: the warm start of the second.
    warm: [u64; 2],
    idle_warm: [u64; 2],
    after_burst: [u64; 2],
    /// After the second cycle closed.
    end: [u64; 2],
    /// With the plaintext connections held (`end` before them).
    plaintext: [u64; 2],
}

impl Memory {
    /// KiB per connection between two samples, each proxy.
    fn per(&self, from: [u64; 2], to: [u64; 2], n: usize) -> [f64; 2] {
        [0, 1].map(|i| (to[i] as f64 - from[i] as f64) / n as f64 / 1024.0)
    }
}

/// Both proxies' resident sets.
fn resident(topo: &Topology) -> anyhow::Result<[Resident; 2]> {
    Ok(proxies(topo)?.map(|(_, resident)| resident))
}

/// Both proxies' resident sets, all of each, in bytes.
async fn rss(topo: &Topology) -> anyhow::Result<[u64; 2]> {
    Ok(resident(topo)?.map(|r| r.all))
}

/// `count` idle connections from a1 to `to` opened at once, 1 byte echoed through each.
async fn open_at_once(
    topo: &Topology,
    count: usize,
    to: SocketAddr,
) -> anyhow::Result<Vec<TcpStream>> {
    let one = || async {
        let mut s = connect(topo, A1.name, to).await?;
        s.write_all(&[1]).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        anyhow::Ok(s)
    };
    futures_util::future::join_all((0..count).map(|_| one()))
        .await
        .into_iter()
        .collect()
}

/// A 16 MiB burst echoed through each connection, four at a time.
async fn burst_through(conns: &mut [TcpStream]) -> anyhow::Result<()> {
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
    Ok(())
}

async fn memory(topo: &Topology, count: usize, burst: usize) -> anyhow::Result<Memory> {
    let settle = |secs| tokio::time::sleep(Duration::from_secs(secs));
    settle(2).await;
    let fresh = resident(topo)?;
    let conns = open_at_once(topo, count, B1.addr(ECHO)).await?;
    settle(2).await;
    let idle = resident(topo)?;
    hold_for_heap_profile(topo).await;
    drop(conns);
    settle(12).await;
    let warm = rss(topo).await?;
    let mut conns = open_at_once(topo, count, B1.addr(ECHO)).await?;
    settle(2).await;
    let idle_warm = rss(topo).await?;
    burst_through(&mut conns[..burst]).await?;
    settle(12).await;
    let after_burst = rss(topo).await?;
    drop(conns);
    settle(12).await;
    let end = rss(topo).await?;
    let plain = open_at_once(topo, count, B2.addr(ECHO)).await?;
    settle(2).await;
    let plaintext = rss(topo).await?;
    drop(plain);
    Ok(Memory {
        count,
        burst,
        fresh: fresh.map(|r| r.all),
        idle: idle.map(|r| r.all),
        fresh_file: fresh.map(|r| r.file),
        idle_file: idle.map(|r| r.file),
        warm,
        idle_warm,
        after_burst,
        end,
        plaintext,
    })
}

/// With `HBONED_BENCH_HOLD=<seconds>` (benches/heap-profile), the first cycle's connections stay
/// open that long after the sample, announced on stderr with both proxies' pids, so that their
/// heaps can be dumped at that point.
async fn hold_for_heap_profile(topo: &Topology) {
    let Some(secs) = std::env::var("HBONED_BENCH_HOLD")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    eprintln!(
        "holding the idle connections for {secs} s: node A pid {}, node B pid {}",
        topo.pid(0).unwrap_or(0),
        topo.pid(1).unwrap_or(0)
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    eprintln!("released");
}

/// `hboned demo --throughput`'s line: bulk one stream, raw and tunnelled (apps started).
pub(crate) async fn throughput(topo: &Topology, runs: usize) -> anyhow::Result<String> {
    let Bulk { raw, tunnel, .. } = bulk(topo, runs, "1 stream", None).await?;
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
    // Memory first, on proxies that have not carried a connection yet (`run` restarts them).
    let m = memory(topo, 2_000, 200).await?;
    let kib = |b: u64| b as f64 / 1024.0;
    let idle = m.per(m.fresh, m.idle, m.count);
    let code = m.per(m.fresh_file, m.idle_file, m.count);
    let idle_warm = m.per(m.warm, m.idle_warm, m.count);
    let burst = m.per(m.idle_warm, m.after_burst, m.burst);
    writeln!(
        out,
        "RSS per idle connection, {} opened at once on fresh proxies: node A {:.1} KiB, node B {:.1} KiB (of which code paged in: {:.1} / {:.1}; fresh RSS {:.0} / {:.0} KiB); again after they closed: {:.1} / {:.1} KiB",
        m.count,
        idle[0],
        idle[1],
        code[0],
        code[1],
        kib(m.fresh[0]),
        kib(m.fresh[1]),
        idle_warm[0],
        idle_warm[1]
    )?;
    writeln!(
        out,
        "RSS after close, against the warm start (after the first {} closed): node A {:.0} → {:.0} KiB ({:+.1}%), node B {:.0} → {:.0} KiB ({:+.1}%); added per connection by a 16 MiB burst through {} of them: {:.1} / {:.1} KiB",
        m.count,
        kib(m.warm[0]),
        kib(m.end[0]),
        (m.end[0] as f64 / m.warm[0] as f64 - 1.0) * 100.0,
        kib(m.warm[1]),
        kib(m.end[1]),
        (m.end[1] as f64 / m.warm[1] as f64 - 1.0) * 100.0,
        m.burst,
        burst[0],
        burst[1]
    )?;
    writeln!(
        out,
        "RSS per idle plaintext connection (a1 → b2, not enrolled), {} opened at once after those: node A {:.1} KiB",
        m.count,
        m.per(m.end, m.plaintext, m.count)[0]
    )?;
    let relay = relay::PlainRelay::start(topo).await?;
    if relay.is_none() {
        writeln!(out, "plain relay: skipped (socat is not installed)")?;
    }
    writeln!(
        out,
        "| shape | raw Gbit/s | HBONE Gbit/s | tunnel/raw | Gbit/s per proxy CPU core | proxy CPU in the kernel | plain relay per relay core | hboned/relay per core |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|")?;
    for shape in ["1 stream", "reverse", "4 streams"] {
        let b = bulk(topo, runs, shape, relay.as_ref()).await?;
        let relay = b.relay_per_core.unwrap_or(f64::NAN);
        writeln!(
            out,
            "| {shape} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% | {relay:.2} | {:.2} |",
            b.raw,
            b.tunnel,
            b.tunnel / b.raw,
            b.per_core,
            b.in_kernel * 100.0,
            b.per_core / relay
        )?;
    }
    let mut raw = ping_pong(topo, A2.name, B2.addr(ECHO)).await?;
    let mut tunnel = ping_pong(topo, A1.name, B1.addr(ECHO)).await?;
    let us = |v: &mut [Duration], p: f64| percentile(v, p).as_secs_f64() * 1e6;
    let (r50, r99) = (us(&mut raw, 0.5), us(&mut raw, 0.99));
    let (t50, t99) = (us(&mut tunnel, 0.5), us(&mut tunnel, 0.99));
    writeln!(
        out,
        "1-byte ping-pong: raw p50 {r50:.0} µs p99 {r99:.0} µs; HBONE p50 {t50:.0} µs p99 {t99:.0} µs ({:.2}× and {:.2}× raw's)",
        t50 / r50,
        t99 / r99
    )?;
    if relay.is_some() {
        let mut via = ping_pong(topo, A2.name, relay::PlainRelay::entry(ECHO)).await?;
        let (v50, v99) = (us(&mut via, 0.5), us(&mut via, 0.99));
        writeln!(
            out,
            "  through the plain relay: p50 {v50:.0} µs p99 {v99:.0} µs ({:.2}× and {:.2}× raw's)",
            v50 / r50,
            v99 / r99
        )?;
    }
    let window = Duration::from_secs(3);
    let raw = connection_rate(topo, A2.name, B2.addr(ECHO), window).await?;
    let tunnel = connection_rate(topo, A1.name, B1.addr(ECHO), window).await?;
    writeln!(
        out,
        "connect + 1-byte echo + close, sequential: raw {raw:.0}/s, HBONE {tunnel:.0}/s ({:.2})",
        tunnel / raw
    )?;
    Ok(out)
}

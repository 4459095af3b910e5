//! Soak: 10,000 concurrent tunneled connections with churn, on the two-node namespace
//! topology (a1 → b1 through both proxies), for `HBONED_SOAK_SECS` seconds (600 for the
//! recorded run). Both proxies' RSS, open descriptors and CPU are sampled every 10 s; after the
//! load ends the bench waits for them to settle and reports how far RSS and descriptors are
//! from where they started (after a warm-up of 200 connections; the cold figures too). Needs
//! root. Not part of CI (`cargo bench` skips it without the variable):
//!
//!     HBONED_SOAK_SECS=600 cargo bench --bench soak
//!
//! Each connection sends 1 KiB, reads it back, stays open 10–50 s (about 330 new connections a
//! second in all), closes, and is replaced at once. The echo app runs as a child process inside b1 (this process holds the 10,000 client
//! sockets; both sides in one process would pass the descriptor limit).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hboned::testbed::{A1, APP_PORT, B1, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 10_000;

/// RSS (KiB), open descriptors and CPU seconds of a process.
fn sample(pid: u32) -> (u64, usize, f64) {
    let rss = status_kib(pid, "VmRSS:");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cpu = stat.rfind(')').map_or(0.0, |i| {
        let f: Vec<&str> = stat[i + 2..].split_whitespace().collect();
        (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / 100.0
    });
    (rss, fds, cpu)
}

/// A `/proc/PID/status` field in KiB (VmRSS, RssAnon, RssFile), 0 when unreadable.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[path = "support/echo.rs"]
mod echo;

/// One connection's life: connect, 1 KiB round trip, hold, close. The error, if it failed. A
/// failed connection waits out its hold too, so failures never speed the churn up.
async fn one(topo: &Topology, to: SocketAddr, hold: Duration) -> Result<(), String> {
    let started = Instant::now();
    let result = async {
        let mut s = topo
            .connect(A1.name, to)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let msg = [0x42u8; 1024];
        let mut back = [0u8; 1024];
        s.write_all(&msg).await.map_err(|e| format!("write: {e}"))?;
        tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut back))
            .await
            .map_err(|_| "echo timed out".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        tokio::time::sleep(hold).await;
        Ok(())
    }
    .await;
    tokio::time::sleep(hold.saturating_sub(started.elapsed())).await;
    result
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--soak-echo") {
        return echo::serve(args[i + 1].parse().unwrap());
    }
    let Some(secs) = std::env::var("HBONED_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        eprintln!("soak: skipped (set HBONED_SOAK_SECS, e.g. 600, and run as root)");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(soak(Duration::from_secs(secs)));
}

async fn soak(duration: Duration) {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_hboned"));
    let topo = std::sync::Arc::new(Topology::start(bin).await.unwrap());
    // One client pod, one server address and port: 10,000 live connections plus a minute of
    // TIME_WAIT from the churn would exhaust the default ephemeral range (28,232 ports) for that
    // one 4-tuple space, on a1 and on node B's transparent dials into b1 alike (EADDRNOTAVAIL).
    // The load generator's own limit, not the proxy's: widen it in the two pods.
    for pod in [A1.name, B1.name] {
        let ns = topo.netns(pod).unwrap();
        ns.run(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")?;
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")
        })
        .unwrap();
    }
    let mut echo = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.netns_name(B1.name)])
        .arg(std::env::current_exe().unwrap())
        .args(["--soak-echo", &APP_PORT.to_string()])
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = [topo.pid(0).unwrap(), topo.pid(1).unwrap()];
    // RSS split: anonymous memory (heap, stacks, allocator metadata) and file-backed pages
    // (the executable's code the load paged in, which the kernel can drop at will).
    let split = |pid: u32| (status_kib(pid, "RssAnon:"), status_kib(pid, "RssFile:"));
    let cold = pids.map(sample);
    let cold_split = pids.map(split);
    // The start is a proxy that has served: 200 connections through both (the data path's code
    // paged in, certificates issued, one pooled HBONE connection up), then past the relay's
    // idle shrink and jemalloc's decay. A proxy that never carried a byte is printed too.
    let mut warm_up = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let topo = topo.clone();
        warm_up.spawn(async move {
            for _ in 0..10 {
                one(&topo, B1.addr(APP_PORT), Duration::ZERO).await.unwrap();
            }
        });
    }
    while let Some(done) = warm_up.join_next().await {
        done.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    let start = pids.map(sample);
    let start_split = pids.map(split);
    println!(
        "soak: {CONNECTIONS} connections for {duration:?}; node A pid {}, node B pid {}",
        pids[0], pids[1]
    );
    println!(
        "{:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>9}",
        "t(s)", "live", "done", "failed", "", "A MiB", "B MiB", "A fds/cpu", "B fds/cpu"
    );
    let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let began = Instant::now();
    let mut workers = Vec::new();
    for i in 0..CONNECTIONS {
        let (topo, live, done, failed) = (topo.clone(), live.clone(), done.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            // Stagger the first wave over 10 s.
            tokio::time::sleep(Duration::from_millis(
                (i as u64 * 10_000) / CONNECTIONS as u64,
            ))
            .await;
            let mut n = i as u64;
            while began.elapsed() < duration {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let hold = Duration::from_millis(10_000 + (n >> 33) % 40_000);
                live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let result = one(&topo, B1.addr(APP_PORT), hold).await;
                live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                match result {
                    Ok(()) => {
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // The first few reasons are printed; all are counted.
                    Err(e) => {
                        if failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
                            eprintln!("soak: a connection failed: {e}");
                        }
                    }
                }
            }
        }));
    }
    let row = |t: f64| {
        let [a, b] = pids.map(sample);
        println!(
            "{t:>6.0} {:>8} {:>8} {:>8} {:>8} {:>7.1} {:>7.1} {:>4}/{:<5.0} {:>4}/{:<5.0}",
            live.load(std::sync::atomic::Ordering::Relaxed),
            done.load(std::sync::atomic::Ordering::Relaxed),
            failed.load(std::sync::atomic::Ordering::Relaxed),
            "",
            a.0 as f64 / 1024.0,
            b.0 as f64 / 1024.0,
            a.1,
            a.2,
            b.1,
            b.2,
        );
        [a, b]
    };
    let mut peak = [0u64; 2];
    while began.elapsed() < duration + Duration::from_secs(51)
        && workers.iter().any(|w| !w.is_finished())
    {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let s = row(began.elapsed().as_secs_f64());
        peak = [peak[0].max(s[0].0), peak[1].max(s[1].0)];
    }
    for w in workers {
        let _ = w.await;
    }
    // Let the proxies settle: the pooled HBONE connections close after their 5-minute idle
    // timeout, freed memory goes back to the system. Then compare with the start.
    let settle = Instant::now();
    let mut end = pids.map(sample);
    while settle.elapsed() < Duration::from_secs(360)
        && (end[0].1 > start[0].1 + 4 || end[1].1 > start[1].1 + 4)
    {
        tokio::time::sleep(Duration::from_secs(10)).await;
        end = row(began.elapsed().as_secs_f64());
    }
    // A minute more for the allocator to hand freed pages back.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        end = row(began.elapsed().as_secs_f64());
    }
    let end_split = pids.map(split);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let percent = |to: u64, from: u64| (to as f64 / from.max(1) as f64 - 1.0) * 100.0;
    for (i, node) in ["A", "B"].iter().enumerate() {
        let [(anon_c, file_c), (anon0, file0), (anon1, file1)] =
            [cold_split[i], start_split[i], end_split[i]];
        println!(
            "soak: node {node}: anonymous {:.1} (cold) / {:.1} → {:.1} MiB, file-backed {:.1} / {:.1} → {:.1} MiB",
            mib(anon_c),
            mib(anon0),
            mib(anon1),
            mib(file_c),
            mib(file0),
            mib(file1),
        );
        let (rss_c, fds_c, _) = cold[i];
        let (rss0, fds0, _) = start[i];
        let (rss1, fds1, cpu1) = end[i];
        println!(
            "soak: node {node}: RSS {:.1} (cold) / {:.1} → peak {:.1} → {:.1} MiB ({:+.0}% of start; target ≤ +10%; {:+.0}% of cold), descriptors {fds_c} / {fds0} → {fds1}, {cpu1:.0} s CPU",
            mib(rss_c),
            mib(rss0),
            mib(peak[i]),
            mib(rss1),
            percent(rss1, rss0),
            percent(rss1, rss_c),
        );
    }
    println!(
        "soak: {} connections served, {} failed",
        done.load(std::sync::atomic::Ordering::Relaxed),
        failed.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = echo.kill();
    let _ = echo.wait();
    drop(topo);
}

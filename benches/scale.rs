//! Scale curves, measured and drawn by this bench as SVG into `benches/curves/` (shown in
//! benches/README.md):
//! - `xds-apply.svg`: applying a delta ADS snapshot of 10,000, 100,000 and 500,000 workloads
//!   (decode, validate, index; median of 3) and the heap the store keeps per workload (live
//!   bytes counted by this binary's allocator);
//! - on the demo topology (root needed; skipped with a line saying so otherwise), with both
//!   proxies as processes of their own, their CPU and RSS read from `/proc`:
//!   `idle-rss.svg`, both proxies' RSS against 1,000 / 5,000 / 10,000 / 50,000 idle
//!   connections (50,000 where the descriptor limit allows), opened 1,000 at a time on fresh proxies; `new-connection-cpu.svg`, both
//!   proxies' CPU per new connection against the pool of HBONE connections holding those;
//!   `streams.svg`, bulk Gbit/s per proxy core against 1 / 4 / 16 / 64 parallel streams, next to
//!   the plain two-hop relay's per relay core (socat, when installed) and raw TCP's Gbit/s.
//!
//! Run: `cargo bench --bench scale` (about five minutes). Not a criterion bench: one pass,
//! rates and bytes.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hboned::state::State;
use hboned::testbed::{A1, B1, Topology, curves};
use hboned::xds::convert::{Tracked, apply_delta};
use plotters::prelude::*;

#[path = "support/counting.rs"]
mod counting;
use counting::LIVE;

#[path = "support/echo.rs"]
mod echo;

#[path = "support/workloads.rs"]
mod workloads;

/// One line of a chart: its legend and its points.
type Series<'a> = (&'a str, Vec<(f64, f64)>);

/// The idle curve's echo app, on b1 (a child process: see `echo`).
const ECHO_PORT: u16 = 7300;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(port) = args
        .iter()
        .position(|a| a == "--echo")
        .and_then(|i| args.get(i + 1))
    {
        echo::serve(port.parse()?);
        return Ok(());
    }
    // `cargo bench --bench scale -- idle streams`: only those (xds, idle, streams).
    let only: Vec<&str> = args[1..]
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let wanted = |name: &str| only.is_empty() || only.contains(&name);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/curves");
    std::fs::create_dir_all(&dir)?;
    if wanted("xds") {
        xds(&dir)?;
    }
    if !wanted("idle") && !wanted("streams") {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        println!("scale: the netns curves skipped (root needed: network namespaces, iptables)");
        return Ok(());
    }
    tokio::runtime::Runtime::new()?.block_on(netns(&dir, wanted("idle"), wanted("streams")))
}

/// Apply time and heap per workload at 10k / 100k / 500k workloads.
fn xds(dir: &Path) -> anyhow::Result<()> {
    let (mut secs, mut bytes) = (vec![], vec![]);
    println!("| workloads | apply (median of 3) | workloads/s | heap kept per workload |");
    println!("|---|---|---|---|");
    for n in [10_000u32, 100_000, 500_000] {
        let snapshot = workloads::snapshot(n);
        let mut runs = Vec::new();
        let mut kept = 0;
        for _ in 0..3 {
            let before = LIVE.load(Ordering::Relaxed);
            let (mut state, mut tracked) = (State::default(), Tracked::default());
            let t = Instant::now();
            let applied = apply_delta(&mut state, &mut tracked, &snapshot, "cluster.local");
            runs.push(t.elapsed());
            anyhow::ensure!(applied.upserted == n as usize, "not every workload applied");
            kept = LIVE.load(Ordering::Relaxed) - before;
        }
        runs.sort();
        let took = runs[1].as_secs_f64();
        let per = kept as f64 / f64::from(n);
        println!(
            "| {n} | {:.0} ms | {:.0} | {per:.0} B |",
            took * 1e3,
            f64::from(n) / took
        );
        secs.push((f64::from(n), took));
        bytes.push((f64::from(n), per));
    }
    chart(
        &dir.join("xds-apply.svg"),
        "Applying a delta ADS snapshot",
        "workloads in the snapshot",
        "seconds",
        &[("apply time (s)", secs)],
    )?;
    chart(
        &dir.join("xds-memory.svg"),
        "Heap the workload store keeps",
        "workloads in the snapshot",
        "bytes per workload",
        &[("heap per workload (B)", bytes)],
    )
}

async fn netns(dir: &Path, idle: bool, streams: bool) -> anyhow::Result<()> {
    // Every process may hold as many descriptors as its hard limit allows (the proxies inherit
    // this one); the echo app is a child of its own.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let bin = Path::new(env!("CARGO_BIN_EXE_hboned"));
    let topo = Topology::start(bin).await?;
    // One client address and one server address and port for all of them: widen the pods'
    // ephemeral ranges (the default 28,232 ports would run out on a1 and on node B's
    // transparent dials into b1), above the apps' ports (7100-7300).
    for pod in [A1.name, B1.name] {
        topo.netns(pod)?.run(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65535")?;
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")
        })?;
    }
    if idle {
        idle_curves(&topo, dir, hard).await?;
    }
    if streams {
        streams_curve(&topo, dir).await?;
    }
    drop(topo);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// `idle-rss.svg` and `new-connection-cpu.svg`, on fresh proxies.
async fn idle_curves(topo: &Topology, dir: &Path, hard: u64) -> anyhow::Result<()> {
    let mut echo = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.netns_name(B1.name)])
        .arg(std::env::current_exe()?)
        .args(["--echo", &ECHO_PORT.to_string()])
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // 50,000 when each proxy may hold that many descriptors (one per connection, and the pool's).
    let counts: Vec<usize> = [1_000, 5_000, 10_000, 50_000]
        .into_iter()
        .map(|n| n.min(hard as usize * 9 / 10))
        .collect();
    if counts[3] < 50_000 {
        println!(
            "scale: descriptors are capped at {hard} per process here, so the last idle point is {}, not 50,000",
            counts[3]
        );
    }
    let idle = curves::idle(topo, B1.addr(ECHO_PORT), &counts, 1_000).await;
    let _ = echo.kill();
    let _ = echo.wait();
    let (idle, start, end) = idle?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "fresh proxies: RSS node A {:.1} MiB, node B {:.1} MiB",
        mib(start[0]),
        mib(start[1])
    );
    println!(
        "| idle connections | pooled HBONE connections | RSS node A / node B | per connection A / B | CPU per new connection (both proxies) |"
    );
    println!("|---|---|---|---|---|");
    for p in &idle {
        let per = |i: usize| (p.rss[i] as f64 - start[i] as f64) / p.held as f64 / 1024.0;
        println!(
            "| {} | {} | {:.1} / {:.1} MiB | {:.2} / {:.2} KiB | {:.0} µs |",
            p.held,
            p.pooled,
            mib(p.rss[0]),
            mib(p.rss[1]),
            per(0),
            per(1),
            p.cpu_per_connection.as_secs_f64() * 1e6
        );
    }
    println!(
        "12 s after all closed: node A {:.1} MiB ({:+.0}% of fresh), node B {:.1} MiB ({:+.0}%)",
        mib(end[0]),
        (end[0] as f64 / start[0] as f64 - 1.0) * 100.0,
        mib(end[1]),
        (end[1] as f64 / start[1] as f64 - 1.0) * 100.0
    );
    let rss = |i: usize| {
        idle.iter()
            .map(|p| (p.held as f64, mib(p.rss[i])))
            .collect()
    };
    chart(
        &dir.join("idle-rss.svg"),
        "Proxy RSS with idle connections held",
        "idle connections (a1 → b1)",
        "RSS (MiB)",
        &[
            ("node A (client side)", rss(0)),
            ("node B (server side)", rss(1)),
        ],
    )?;
    let cpu = idle
        .iter()
        .map(|p| (p.pooled as f64, p.cpu_per_connection.as_secs_f64() * 1e6))
        .collect();
    chart(
        &dir.join("new-connection-cpu.svg"),
        "CPU per new connection, both proxies",
        "pooled HBONE connections (each up to 100 streams)",
        "µs of CPU",
        &[("connect + 1-byte echo + close", cpu)],
    )?;
    Ok(())
}

/// `streams.svg`.
async fn streams_curve(topo: &Topology, dir: &Path) -> anyhow::Result<()> {
    let streams = curves::streams(topo, &[1, 4, 16, 64], 3).await?;
    println!(
        "| streams | raw Gbit/s | HBONE Gbit/s | HBONE per proxy core | relay Gbit/s | relay per relay core | hboned/relay per core |"
    );
    println!("|---|---|---|---|---|---|---|");
    for p in &streams {
        let (relay, relay_core) = p.relay.unwrap_or((f64::NAN, f64::NAN));
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {relay:.2} | {relay_core:.2} | {:.2} |",
            p.streams,
            p.raw_gbps,
            p.hboned_gbps,
            p.hboned_per_core,
            p.hboned_per_core / relay_core
        );
    }
    let line = |f: fn(&curves::StreamsPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        streams
            .iter()
            .filter_map(|p| Some((p.streams as f64, f(p)?)))
            .collect()
    };
    let mut series: Vec<Series> = vec![
        (
            "hboned, Gbit/s per proxy core",
            line(|p| Some(p.hboned_per_core)),
        ),
        ("hboned, Gbit/s", line(|p| Some(p.hboned_gbps))),
        ("raw TCP, Gbit/s", line(|p| Some(p.raw_gbps))),
    ];
    if streams.iter().all(|p| p.relay.is_some()) {
        series.push((
            "plain relay, Gbit/s per relay core",
            line(|p| p.relay.map(|r| r.1)),
        ));
    }
    chart(
        &dir.join("streams.svg"),
        "Bulk a1 → b1 against parallel streams (512 MiB in all)",
        "parallel streams",
        "Gbit/s",
        &series,
    )?;
    Ok(())
}

/// A line chart with a logarithmic x axis, every point marked, into `path` as SVG.
fn chart(
    path: &PathBuf,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_min = points().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = points().map(|p| p.0).fold(0.0, f64::max);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max);
    anyhow::ensure!(x_min.is_finite() && x_min > 0.0, "no points for {title}");
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), 0.0..y_max * 1.2)?;
    let number = |v: &f64| {
        if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_owned()
        }
    };
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(6)
        .y_labels(8)
        .x_label_formatter(&number)
        .y_label_formatter(&number)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    for (i, (name, line)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    println!("drew {}", path.display());
    Ok(())
}

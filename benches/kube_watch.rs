//! Kubernetes mode's watch path: a fake API server in this process holds N pods (100,000 by
//! default, `HBONED_KUBE_PODS` to change) in 1,000 namespaces, half of them opted in; hboned's
//! discovery lists them all (pages of 500, as kube-rs asks), then follows a stream of pod
//! updates. Reports the time to list and apply, pod events per second on the watch, and the
//! memory hboned keeps per pod: live heap bytes (counted by this binary's allocator) after
//! the sync minus before it, with the fake's own objects already in place before.
//! Run: `cargo bench --bench kube_watch`. Not a criterion bench: one long pass, bytes and rates.
//! Event rates include the fake server's JSON encoding, in the same process: a lower bound.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use hboned::kube::{LabelMatch, Settings};
use hboned::state::{SharedState, State};

// The fake is test code: it unwraps freely.
#[allow(dead_code, clippy::unwrap_used)]
#[path = "../tests/support/kube_api.rs"]
mod kube_api;
use kube_api::{FakeApi, PodDef};

/// jemalloc (as the proxy runs), counting live bytes.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to jemalloc.
        unsafe { tikv_jemallocator::Jemalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to jemalloc.
        unsafe { tikv_jemallocator::Jemalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to jemalloc.
        unsafe { tikv_jemallocator::Jemalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn pod(i: usize) -> PodDef {
    PodDef {
        uid: format!("{:08x}-0000-4000-8000-{:012x}", i / 65_536, i),
        name: format!("app-{i}"),
        namespace: format!("ns{}", i % 1000),
        node: format!("node-{}", i % 500),
        service_account: format!("sa{}", i % 50),
        ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            0x0a00_0000 + i as u32,
        ))],
        enrolled: i.is_multiple_of(2),
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    hboned::tls::install_process_default();
    let n: usize = std::env::var("HBONED_KUBE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let api = FakeApi::new();
    for ns in 0..1000 {
        let labels: &[(&str, &str)] = if ns % 2 == 0 {
            &[("io.cilium/mtls-enabled", "true")]
        } else {
            &[]
        };
        api.apply_namespace(&format!("ns{ns}"), labels);
    }
    for i in 0..n {
        api.apply_pod(&pod(i));
    }
    let url = api.serve_loopback();
    let state = Arc::new(SharedState::new(State::default()));
    let client = hboned::kube::client(&hboned::config::KubernetesConfig {
        api_server: Some(url),
        ..Default::default()
    })
    .expect("client");
    let settings = Settings {
        node: "node-0".into(),
        labels: vec![LabelMatch::parse("io.cilium/mtls-enabled=true").expect("label")],
        trust_domain: "cluster.local".into(),
        cluster_id: "bench".into(),
        services: false,
        cluster_domain: "cluster.local".into(),
    };
    let before = LIVE.load(Ordering::Relaxed);
    let (tx, mut synced) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let running = hboned::kube::discover(client, settings, state.clone(), tx);
    synced.wait_for(|s| *s).await.expect("synced");
    let listed = started.elapsed();
    assert_eq!(
        state.read().workloads().count(),
        n,
        "every pod is a workload"
    );
    // Let the client's buffers go before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = LIVE.load(Ordering::Relaxed) - before;

    // Updates: each pod of the first M gets a new address; done when the last one shows.
    let m = (n / 5).max(1);
    let started = Instant::now();
    for i in 0..m {
        let mut p = pod(i);
        p.ips = vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            0x0b00_0000 + i as u32,
        ))];
        api.apply_pod(&p);
    }
    let last = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + (m - 1) as u32));
    while state.read().workload_by_ip(last).is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let updated = started.elapsed();
    running.stop();

    println!("Kubernetes watch path, {n} pods in 1,000 namespaces (half opted in)");
    println!("| measure | value |\n|---|---|");
    println!(
        "| initial list + apply (pages of 500) | {:.2} s ({:.0} pods/s) |",
        listed.as_secs_f64(),
        n as f64 / listed.as_secs_f64()
    );
    println!(
        "| watch updates applied | {m} in {:.2} s ({:.0} events/s) |",
        updated.as_secs_f64(),
        m as f64 / updated.as_secs_f64()
    );
    println!(
        "| memory kept per pod (workload, indexes, agent's map) | {:.0} B |",
        kept as f64 / n as f64
    );
}

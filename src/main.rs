//! The `hboned` command line: parses arguments and hands over to `hboned::app`.

#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hboned::app;

/// jemalloc for the long-running proxy: it hands freed memory back to the system (a background
/// thread purges pages unused for a few seconds), where glibc's malloc kept a burst of 10,000
/// connections' memory for good (benches/README.md, soak). It also takes the C library's
/// `malloc` (aws-lc's allocations in TLS handshakes among them), so there is one allocator and
/// no glibc arena beside it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A C string pointer that may sit in a `static` (it points at a literal).
#[repr(transparent)]
#[derive(Debug)]
struct ConfString(*const std::ffi::c_char);
// SAFETY: the pointer is to an immutable, 'static C string literal.
#[allow(unsafe_code)]
unsafe impl Sync for ConfString {}

/// jemalloc's options (its `const char *malloc_conf`), read at its start: purge with a
/// background thread, pages freed for a second given back to the kernel outright (no lazy
/// `MADV_FREE` stage, whose pages still count as resident). A burst of new connections
/// allocates its dials' state all at once; with 5 s decay that memory was still resident after
/// the burst had settled (benches/README.md: 2,000 connections opened at once on a fresh
/// proxy, node A's RSS per idle connection 9.3–12.8 KiB with 5 s, 6.4–6.8 KiB with 1 s, no
/// throughput cost measured). `MALLOC_CONF` in the environment overrides these.
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(no_mangle)]
static malloc_conf: ConfString =
    ConfString(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// jemalloc's per-thread caches, handed back by worker threads that go quiet.
///
/// A thread keeps the objects it frees in a cache of its own for its next allocations, and the
/// cache is trimmed only as that thread allocates again: a tokio worker asleep after a burst of
/// connections holds megabytes nobody uses (benches/README.md, "Soak"). Flushing on every park
/// costs a quarter of the throughput per core (the cache refills from the arenas at once), so a
/// worker flushes when it parks only after `FLUSH_AFTER` bytes went through its allocations and
/// frees since its last flush: a bounded amount stays cached per worker, and a busy worker pays
/// one flush per 256 KiB of churn (no cost measurable per core or in connections/s;
/// benches/README.md, "Soak").
mod thread_cache {
    use std::cell::Cell;
    use std::ffi::{CStr, c_void};

    /// Bytes allocated plus freed by a thread between two flushes of its cache.
    const FLUSH_AFTER: u64 = 256 << 10;

    /// One thread's allocation counters (jemalloc's `thread.allocatedp` and
    /// `thread.deallocatedp`: pointers into the thread's own state, valid while it lives).
    struct Counters {
        allocated: *const u64,
        deallocated: *const u64,
        churn_at_flush: Cell<u64>,
    }

    thread_local! {
        static COUNTERS: Option<Counters> = Counters::of_this_thread();
    }

    /// For tokio's `on_thread_park`: flush this thread's cache if it has churned enough.
    pub(crate) fn on_park() {
        COUNTERS.with(|counters| {
            if let Some(counters) = counters {
                counters.flush_if_churned();
            }
        });
    }

    impl Counters {
        fn of_this_thread() -> Option<Self> {
            Some(Self {
                allocated: read_pointer(c"thread.allocatedp")?,
                deallocated: read_pointer(c"thread.deallocatedp")?,
                churn_at_flush: Cell::new(0),
            })
        }

        /// Bytes this thread has allocated plus freed since it started.
        #[allow(unsafe_code)]
        fn churn(&self) -> u64 {
            // SAFETY: both pointers came from jemalloc for this thread (the thread-local that
            // holds them lives no longer than the thread) and point at aligned u64 counters
            // that only this thread writes.
            unsafe { (*self.allocated).wrapping_add(*self.deallocated) }
        }

        /// Flushes the cache if due; jemalloc's status when it did (non-zero when the cache is
        /// off, as with MALLOC_CONF=tcache:false, which is fine).
        #[allow(unsafe_code)]
        fn flush_if_churned(&self) -> Option<i32> {
            let churn = self.churn();
            if churn.wrapping_sub(self.churn_at_flush.get()) < FLUSH_AFTER {
                return None;
            }
            self.churn_at_flush.set(churn);
            // SAFETY: `thread.tcache.flush` takes and returns nothing.
            Some(unsafe {
                tikv_jemalloc_sys::mallctl(
                    c"thread.tcache.flush".as_ptr(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    0,
                )
            })
        }
    }

    /// Reads one of jemalloc's per-thread counter pointers.
    #[allow(unsafe_code)]
    fn read_pointer(name: &CStr) -> Option<*const u64> {
        let mut pointer: *mut u64 = std::ptr::null_mut();
        let mut len = size_of::<*mut u64>();
        // SAFETY: the output buffer is a pointer-sized, writable local and `len` says so.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&raw mut pointer).cast::<c_void>(),
                &raw mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        (status == 0 && !pointer.is_null()).then_some(pointer.cast_const())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_thread_flushes_its_cache_once_it_has_churned_enough() {
            std::thread::spawn(|| {
                let counters = Counters::of_this_thread().expect("jemalloc's thread counters");
                counters.churn_at_flush.set(counters.churn());
                assert_eq!(counters.flush_if_churned(), None, "nothing churned yet");
                let before = counters.churn();
                for _ in 0..10 {
                    drop(std::hint::black_box(vec![1u8; 16 * 1024]));
                }
                // 160 KiB allocated and freed: counted both ways, so past the threshold.
                assert!(counters.churn() - before >= FLUSH_AFTER);
                assert_eq!(counters.flush_if_churned(), Some(0), "flushed");
                assert_eq!(counters.flush_if_churned(), None, "not due again at once");
            })
            .join()
            .expect("the test thread");
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "hboned",
    version,
    about = "Per-node HBONE (mTLS) proxy for Kubernetes pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node proxy: enroll pods (from the config file, a node agent over ZDS, or, with
    /// `kubernetes:` in the config, itself from the API server) and serve them. Without
    /// --config it uses the embedded default (config/default.yaml).
    Run {
        /// YAML configuration (see README.md).
        #[arg(long, env = "HBONED_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Kubernetes mode's node agent (privileged; `kubernetes:` and `agent:` in the config):
    /// enrolls this node's pods of labelled namespaces — in their CNI ADD with `agent.cni` —
    /// and serves their netns (ZDS) and the workloads (xDS) to an unprivileged `hboned run`
    /// on Unix sockets. `hboned agent uninstall` takes the plugin, every rule and the node's
    /// chain off the node.
    #[cfg(feature = "kubernetes")]
    Agent {
        /// YAML configuration with `kubernetes:` and `agent:` (README, "Kubernetes mode").
        #[arg(long, env = "HBONED_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<AgentAction>,
    },
    /// What Istio's ztunnel chart runs (`proxy ztunnel`): the node proxy configured from
    /// ztunnel's environment variables with ztunnel's defaults (README, "Under Istio");
    /// `HBONED_*` variables apply on top.
    Proxy {
        #[command(subcommand)]
        kind: ProxyKind,
    },
    /// Build a two-node, five-pod topology in network namespaces (root needed), run one hboned
    /// per node, send traffic, show that the wire carried only TLS, and tear it all down.
    /// (Built with the `testbed` feature only: `bash scripts/demo`.)
    #[cfg(feature = "testbed")]
    Demo {
        /// Also measure pod-to-pod throughput through the proxies next to raw TCP.
        #[arg(long)]
        throughput: bool,
        /// Also run the netns benchmark on proxies started afresh: RSS per idle connection
        /// (2,000 opened at once), after they close and per idle plaintext connection; bulk (1
        /// stream, reverse, 4 streams) with Gbit/s per proxy core next to a plain two-hop
        /// relay's per relay core (socat, if installed), ping-pong latency against raw TCP's,
        /// connections/s.
        #[arg(long)]
        bench: bool,
    },
    /// Loopback mode, no namespaces or root: an HBONE server and an outbound listener on
    /// 127.0.0.1 with the built-in CA, checked end to end at start.
    Loopback {
        /// Outbound listener (apps connect here to be tunneled).
        #[arg(long, default_value = "127.0.0.1:15001")]
        outbound: SocketAddr,
        /// HBONE listener.
        #[arg(long, default_value = "127.0.0.1:15008")]
        inbound: SocketAddr,
        /// Directory with root-cert.pem and root-key.pem (default: certs-dev/ if present,
        /// else an ephemeral root).
        #[arg(long, env = "HBONED_CA_DIR")]
        ca_dir: Option<PathBuf>,
        /// Workload certificate lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        cert_lifetime_secs: u64,
        /// Exit after the start-up self-check.
        #[arg(long)]
        check_only: bool,
    },
    /// Install or remove the redirect rule set (docs/design.md §3) in a pod's network namespace.
    Redirect {
        #[command(subcommand)]
        action: RedirectAction,
    },
    /// Built-in CA maintenance.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[cfg(feature = "kubernetes")]
#[derive(Subcommand, Debug)]
enum AgentAction {
    /// Remove what the agent put on the node (run with the agent stopped).
    Uninstall,
}

#[derive(Subcommand, Debug)]
enum ProxyKind {
    /// The node proxy, in place of ztunnel.
    Ztunnel,
}

#[derive(Subcommand, Debug)]
enum RedirectAction {
    /// Install the rules (idempotent).
    Install {
        /// The pod's netns: /var/run/netns/NAME or /proc/PID/ns/net.
        #[arg(long)]
        netns: PathBuf,
    },
    /// Remove the rules (idempotent).
    Remove {
        #[arg(long)]
        netns: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Generate a new development root (root-cert.pem, root-key.pem) into a directory.
    Init {
        #[arg(long, default_value = "certs-dev")]
        dir: PathBuf,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(thread_cache::on_park)
        .build()
        .context("starting the tokio runtime")
}

/// Runs the node proxy until SIGTERM or Ctrl-C, then drains.
fn serve_node(
    config: hboned::config::Config,
    log: hboned::admin::LogControl,
) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let node = app::Node::build(config, log)?;
        println!(
            "hboned: serving {} pod(s); Ctrl-C stops",
            node.pods_served()
        );
        node.serve(app::shutdown_signal()).await;
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    hboned::tls::install_process_default();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let initial = EnvFilter::try_from_default_env()
        .map(|f| f.to_string())
        .unwrap_or_else(|_| "info".to_owned());
    let (filter, filter_handle) = reload::Layer::new(EnvFilter::new(&initial));
    let logs = tracing_subscriber::registry().with(filter);
    // HBONED_LOG_FORMAT=json: one JSON object per line (access logs included).
    if std::env::var("HBONED_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        logs.with(fmt::layer().with_writer(std::io::stderr)).init();
    }
    let log = hboned::admin::LogControl::new(initial, move |level: &str| {
        Ok(filter_handle.reload(EnvFilter::try_new(level)?)?)
    });
    match cli.command {
        Command::Run { config } => {
            let config = hboned::config::Config::load(config.as_deref())?;
            serve_node(config, log)
        }
        #[cfg(feature = "kubernetes")]
        Command::Agent { config, action } => {
            let config = hboned::config::Config::load(config.as_deref())?;
            match action {
                None => runtime()?.block_on(app::run_agent(config, app::shutdown_signal())),
                Some(AgentAction::Uninstall) => {
                    let done = app::uninstall(&config)?;
                    println!(
                        "hboned agent uninstalled: CNI plugin removed, rules removed from {} namespace(s), node chain removed",
                        done.cleaned
                    );
                    if done.failed.is_empty() {
                        Ok(())
                    } else {
                        anyhow::bail!("rules left in: {}", done.failed.join("; "))
                    }
                }
            }
        }
        Command::Proxy {
            kind: ProxyKind::Ztunnel,
        } => {
            let env = hboned::config::ztunnel::Environment::process();
            let config = hboned::config::Config::from_ztunnel_env(&env)?;
            serve_node(config, log)
        }
        #[cfg(feature = "testbed")]
        Command::Demo { throughput, bench } => {
            let bin = std::env::current_exe().context("locating the hboned binary")?;
            // Interrupted (Ctrl-C, SIGTERM), the run's future is dropped and its topology with
            // it, which stops the proxies and deletes the namespaces it made.
            runtime()?.block_on(async {
                tokio::select! {
                    done = hboned::testbed::run(&bin, throughput, bench) => done,
                    () = app::shutdown_signal() => {
                        anyhow::bail!("interrupted: the demo's proxies and namespaces were removed")
                    }
                }
            })
        }
        Command::Loopback {
            outbound,
            inbound,
            ca_dir,
            cert_lifetime_secs,
            check_only,
        } => runtime()?.block_on(app::run_loopback(
            app::LoopbackSettings {
                outbound,
                inbound,
                ca_dir,
                cert_lifetime: Duration::from_secs(cert_lifetime_secs),
                check_only,
            },
            |line| println!("hboned: {line}"),
            app::shutdown_signal(),
        )),
        Command::Redirect { action } => {
            let (netns, install) = match action {
                RedirectAction::Install { netns } => (netns, true),
                RedirectAction::Remove { netns } => (netns, false),
            };
            let ns = hboned::netns::Netns::open(&netns)?;
            if install {
                hboned::redirect::install(&ns)?;
                println!("installed the redirect rules in {}", netns.display());
            } else {
                hboned::redirect::remove(&ns)?;
                println!("removed the redirect rules from {}", netns.display());
            }
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Init { dir },
        } => {
            let ca = hboned::identity::ca::BuiltinCa::generate(std::time::SystemTime::now())?;
            ca.write_dir(&dir)?;
            println!("wrote a new development root to {}", dir.display());
            Ok(())
        }
    }
}

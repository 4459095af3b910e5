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
/// background thread.
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(no_mangle)]
static malloc_conf: ConfString =
    ConfString(c"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:5000".as_ptr());

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
        /// Also run the netns benchmark: bulk (1 stream, reverse, 4 streams) with Gbit/s per
        /// proxy core, ping-pong latency, connections/s, RSS per idle connection.
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
    tokio::runtime::Runtime::new().context("starting the tokio runtime")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    hboned::tls::install_process_default();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, filter_handle) = reload::Layer::new(filter);
    let logs = tracing_subscriber::registry().with(filter);
    // HBONED_LOG_FORMAT=json: one JSON object per line (access logs included).
    if std::env::var("HBONED_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        logs.with(fmt::layer().with_writer(std::io::stderr)).init();
    }
    let set_log_level = move |level: &str| -> Result<(), hboned::admin::LogLevelError> {
        Ok(filter_handle.reload(EnvFilter::try_new(level)?)?)
    };
    match cli.command {
        Command::Run { config } => {
            let config = hboned::config::Config::load(config.as_deref())?;
            runtime()?.block_on(app::run(
                config,
                Box::new(set_log_level),
                app::shutdown_signal(),
            ))
        }
        Command::Proxy {
            kind: ProxyKind::Ztunnel,
        } => {
            let env = hboned::config::ztunnel::Environment::process();
            let config = hboned::config::Config::from_ztunnel_env(&env)?;
            runtime()?.block_on(app::run(
                config,
                Box::new(set_log_level),
                app::shutdown_signal(),
            ))
        }
        #[cfg(feature = "testbed")]
        Command::Demo { throughput, bench } => {
            let bin = std::env::current_exe().context("locating the hboned binary")?;
            runtime()?.block_on(hboned::testbed::run(&bin, throughput, bench))
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

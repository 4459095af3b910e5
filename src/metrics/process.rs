//! The process series Prometheus' client libraries export and Istio's ztunnel dashboard reads
//! (`process_open_fds`; ztunnel's src/metrics/process.rs exports it and `process_max_fds`), read
//! from `/proc/self` at each scrape: open and maximum descriptors, resident and virtual memory,
//! CPU seconds and the start time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Reads the process series at each scrape.
#[derive(Debug, Default)]
pub(crate) struct ProcessCollector;

/// What `/proc/self/stat` says, in the units Prometheus uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stat {
    pub cpu_seconds: f64,
    pub virtual_bytes: f64,
    pub resident_bytes: f64,
    /// Seconds after boot the process started.
    pub started_after_boot: f64,
}

/// Parses `/proc/<pid>/stat` (fields after the parenthesized command name, which may hold
/// spaces): utime 14, stime 15, starttime 22, vsize 23, rss 24, per proc(5).
pub(crate) fn parse_stat(text: &str, ticks_per_second: f64, page_size: f64) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) / ticks_per_second,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_size,
        started_after_boot: field(22)? / ticks_per_second,
    })
}

fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // One descriptor of the listing is our own.
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            let open = entries.count().saturating_sub(1);
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                open as f64,
            )?;
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                soft as f64,
            )?;
        }
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as f64;
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(&t, ticks, page));
        if let Some(stat) = stat {
            let cpu = ConstCounter::new(stat.cpu_seconds);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stat.resident_bytes,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.virtual_bytes,
            )?;
            if let Some(boot) = boot_time() {
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    boot + stat.started_after_boot,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_past_a_command_name_with_spaces_and_parens() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss ...
        let text = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 4 0 1000 \
                    104857600 2560 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let stat = parse_stat(text, 100.0, 4096.0).unwrap();
        assert_eq!(
            stat,
            Stat {
                cpu_seconds: 4.0,
                virtual_bytes: 104_857_600.0,
                resident_bytes: 10_485_760.0,
                started_after_boot: 10.0,
            }
        );
        assert!(parse_stat("garbage", 100.0, 4096.0).is_none());
    }

    #[test]
    fn this_process_is_described() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in [
            "process_open_fds ",
            "process_max_fds ",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} in\n{text}");
        }
    }
}

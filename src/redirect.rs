//! Installs and removes the redirect rule set of docs/design.md §3 (iptables and ip6tables) inside one
//! pod's network namespace:
//! the iptables chains that send the pod's TCP to ports 15001/15006 (skipping packets that
//! carry the proxy mark), and the policy route that returns replies to transparent sockets.
//!
//! The rules are data ([`CHAINS`], [`JUMPS`]); applying them is idempotent: our chains are
//! replaced atomically with `iptables-restore --noflush`, jumps and the ip rule are added only
//! when missing. Commands run with the calling thread inside the pod's netns, never elsewhere.

use std::io;
use std::process::Command;

use crate::netns::Netns;

/// The policy routing table that delivers marked replies locally.
pub(crate) const ROUTE_TABLE: &str = "100";
/// Priority of the `fwmark 0x111/0xfff lookup 100` rule.
pub(crate) const RULE_PRIORITY: &str = "32764";

/// Our two chains and their rules, per table, in iptables-restore syntax.
pub(crate) const CHAINS: &str = "\
*mangle
:HBONE_PRERT - [0:0]
:HBONE_OUTPUT - [0:0]
-A HBONE_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A HBONE_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:HBONE_PRERT - [0:0]
:HBONE_OUTPUT - [0:0]
-A HBONE_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A HBONE_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A HBONE_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A HBONE_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A HBONE_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A HBONE_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
";

/// The source kubelet's probes arrive from once the node's [`set_probe_snat`] rewrote them
/// (istio-cni's HostProbeSNATAddress, and its IPv6 twin): the pod's chains let it through
/// uncaptured, so a probe reaches the app as it would without the mesh.
pub const PROBE_SNAT_V4: &str = "169.254.7.127";
pub const PROBE_SNAT_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

/// (table, built-in chain, our chain): the jumps into our chains.
pub(crate) const JUMPS: [(&str, &str, &str); 4] = [
    ("mangle", "PREROUTING", "HBONE_PRERT"),
    ("nat", "PREROUTING", "HBONE_PRERT"),
    ("mangle", "OUTPUT", "HBONE_OUTPUT"),
    ("nat", "OUTPUT", "HBONE_OUTPUT"),
];

/// Why the rules could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot run {command}: {source} (is iptables installed?)")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed in netns {netns}: {stderr}")]
    Failed {
        command: String,
        netns: String,
        stderr: String,
    },
}

/// One address family's tools and loopback address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }

    /// [`CHAINS`] for this family (IPv6 excludes `::1/128` where IPv4 excludes 127.0.0.1, and
    /// lets the IPv6 probe address through).
    pub(crate) fn chains(self) -> String {
        match self {
            Family::V4 => CHAINS.to_owned(),
            Family::V6 => CHAINS
                .replace("127.0.0.1/32", "::1/128")
                .replace("169.254.7.127/32", &format!("{PROBE_SNAT_V6}/128")),
        }
    }

    fn probe_snat(self) -> &'static str {
        match self {
            Family::V4 => PROBE_SNAT_V4,
            Family::V6 => PROBE_SNAT_V6,
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn of(ip: &std::net::IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// Installs the rule set, for IPv4 and IPv6, in `netns`; running it twice leaves one copy.
/// Both families or neither: when one fails, what was installed is taken out again (a pod
/// captured for one family and not the other would send the other's traffic in plaintext).
pub fn install(netns: &Netns) -> Result<(), RedirectError> {
    let _lock = NodeLock::take();
    for family in Family::ALL {
        // A pod without IPv6 (disabled in its namespace) has no IPv6 traffic to capture.
        if family == Family::V6 && ipv6_disabled(netns) {
            continue;
        }
        if let Err(e) = install_family(netns, family) {
            for undo in Family::ALL {
                if let Err(undo_error) = remove_family(netns, undo) {
                    tracing::warn!(netns = netns.name(), error = %undo_error, "cannot take a half-installed rule set out again");
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Whether IPv6 is off in `netns` (disabled for all interfaces, or not in the kernel).
fn ipv6_disabled(netns: &Netns) -> bool {
    netns
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6"))
        .map_or(true, |v| v.trim() == "1")
}

/// Removes everything [`install`] added; removing what is not there is not an error.
pub fn remove(netns: &Netns) -> Result<(), RedirectError> {
    let _lock = NodeLock::take();
    for family in Family::ALL {
        remove_family(netns, family)?;
    }
    Ok(())
}

/// Whether `netns` has our rules (the IPv4 jump into our nat OUTPUT chain): how stale rules
/// from an earlier run are found.
pub fn installed(netns: &Netns) -> Result<bool, RedirectError> {
    match run(
        netns,
        "iptables",
        &["-t", "nat", "-S", "HBONE_OUTPUT"],
        None,
    ) {
        Ok(_) => Ok(true),
        Err(RedirectError::Failed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The node's chain that rewrites the source of kubelet's probes, in nat POSTROUTING of the
/// node's own namespace (istio-cni's ISTIO_POSTRT: `-m owner --socket-exists` tells a
/// connection a process of the node opened, such as kubelet's, from forwarded traffic).
pub const PROBE_CHAIN: &str = "HBONE_POSTRT";

/// The probe chain's content for the enrolled pods' `ips`, one rule per address (in place of
/// istio-cni's ipset: no ipset module needed, and a node has at most a few hundred pods).
pub(crate) fn probe_chain(family: Family, ips: &[std::net::IpAddr]) -> String {
    let mut out = format!("*nat\n:{PROBE_CHAIN} - [0:0]\n");
    for ip in ips.iter().filter(|ip| Family::of(ip) == family) {
        out.push_str(&format!(
            "-A {PROBE_CHAIN} -d {ip}/{} -m owner --socket-exists -p tcp -j SNAT --to-source {}\n",
            family.host_prefix(),
            family.probe_snat()
        ));
    }
    out.push_str("COMMIT\n");
    out
}

/// Replaces the node's probe chain (in `node`, the proxy's own namespace) with one rule per
/// enrolled pod address, and jumps to it first from nat POSTROUTING. The whole chain is
/// written at once, so what an earlier run left is gone.
pub fn set_probe_snat(node: &Netns, ips: &[std::net::IpAddr]) -> Result<(), RedirectError> {
    let _lock = NodeLock::take();
    for family in Family::ALL {
        run(
            node,
            family.restore(),
            &["--noflush"],
            Some(&probe_chain(family, ips)),
        )?;
        let jump = ["-t", "nat", "-C", "POSTROUTING", "-j", PROBE_CHAIN];
        if run(node, family.iptables(), &jump, None).is_err() {
            let insert = ["-t", "nat", "-I", "POSTROUTING", "1", "-j", PROBE_CHAIN];
            run(node, family.iptables(), &insert, None)?;
        }
    }
    Ok(())
}

/// Takes the probe chain and its jump out of the node's namespace (an uninstall); what is not
/// there is not an error.
pub fn remove_probe_snat(node: &Netns) -> Result<(), RedirectError> {
    let _lock = NodeLock::take();
    for family in Family::ALL {
        let jump = ["-t", "nat", "-D", "POSTROUTING", "-j", PROBE_CHAIN];
        while run(node, family.iptables(), &jump, None).is_ok() {}
        for action in ["-F", "-X"] {
            let _ = run(
                node,
                family.iptables(),
                &["-t", "nat", action, PROBE_CHAIN],
                None,
            );
        }
    }
    Ok(())
}

/// An exclusive lock on `/run/hboned/redirect.lock` while rules change: two proxies on one
/// node (a rolling update) never interleave their changes to the same pod or chain. Without
/// the directory (not root, no /run) the change goes ahead unlocked.
struct NodeLock {
    /// Held until dropped; `None` when the lock could not be taken.
    _held: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl NodeLock {
    const PATH: &str = "/run/hboned/redirect.lock";

    fn take() -> NodeLock {
        let path = std::path::Path::new(Self::PATH);
        let file = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(path)
            });
        match file {
            Ok(f) => NodeLock {
                _held: nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| tracing::debug!(error = %e, "cannot lock {}", Self::PATH))
                    .ok(),
            },
            Err(e) => {
                tracing::debug!(error = %e, "cannot open {}", Self::PATH);
                NodeLock { _held: None }
            }
        }
    }
}

fn install_family(netns: &Netns, family: Family) -> Result<(), RedirectError> {
    let ipt = family.iptables();
    run(
        netns,
        family.restore(),
        &["--noflush"],
        Some(&family.chains()),
    )?;
    for (table, builtin, chain) in JUMPS {
        if run(netns, ipt, &["-t", table, "-C", builtin, "-j", chain], None).is_err() {
            run(netns, ipt, &["-t", table, "-A", builtin, "-j", chain], None)?;
        }
    }
    if !rule_present(netns, family)? {
        run(netns, "ip", &rule_args(family, "add"), None)?;
    }
    let route = [
        "route",
        "replace",
        "local",
        family.any(),
        "dev",
        "lo",
        "table",
        ROUTE_TABLE,
    ];
    run(
        netns,
        "ip",
        &[&[family.ip_flag()][..], &route[..]].concat(),
        None,
    )?;
    Ok(())
}

fn remove_family(netns: &Netns, family: Family) -> Result<(), RedirectError> {
    let ipt = family.iptables();
    for (table, builtin, chain) in JUMPS {
        while run(netns, ipt, &["-t", table, "-D", builtin, "-j", chain], None).is_ok() {}
    }
    for table in ["mangle", "nat"] {
        for chain in ["HBONE_PRERT", "HBONE_OUTPUT"] {
            if run(netns, ipt, &["-t", table, "-F", chain], None).is_ok() {
                run(netns, ipt, &["-t", table, "-X", chain], None)?;
            }
        }
    }
    while rule_present(netns, family)? {
        run(netns, "ip", &rule_args(family, "del"), None)?;
    }
    // Fails when the table is already empty; that is the state we want.
    let _ = run(
        netns,
        "ip",
        &[family.ip_flag(), "route", "flush", "table", ROUTE_TABLE],
        None,
    );
    Ok(())
}

fn rule_args(family: Family, verb: &str) -> [&str; 9] {
    [
        family.ip_flag(),
        "rule",
        verb,
        "fwmark",
        "0x111/0xfff",
        "pref",
        RULE_PRIORITY,
        "lookup",
        ROUTE_TABLE,
    ]
}

fn rule_present(netns: &Netns, family: Family) -> Result<bool, RedirectError> {
    let out = run(
        netns,
        "ip",
        &[family.ip_flag(), "rule", "show", "pref", RULE_PRIORITY],
        None,
    )?;
    Ok(out.contains("0x111/0xfff") && out.contains(&format!("lookup {ROUTE_TABLE}")))
}

/// Runs a command with the calling thread in `netns` (the child inherits the namespace).
fn run(
    netns: &Netns,
    cmd: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, RedirectError> {
    use std::io::Write;
    let command = format!("{cmd} {}", args.join(" "));
    let output = netns
        .run(|| {
            let mut child = Command::new(cmd)
                .args(args)
                .stdin(if stdin.is_some() {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                })
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(text.as_bytes())?;
            }
            child.wait_with_output()
        })
        .map_err(|source| RedirectError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(RedirectError::Failed {
            command,
            netns: netns.name().to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests;

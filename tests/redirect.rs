//! The rule installer in namespaces of the test's own (root): a pod without IPv6 gets the IPv4
//! rules alone, and an install that fails for one family leaves neither.

#![allow(clippy::unwrap_used)]

mod support;

use hboned::netns::Netns;
use support::agent::ScratchNetns;
use support::sh;
use support::topo::can_run;

fn nat(ns: &str, tool: &str) -> String {
    sh(&["ip", "netns", "exec", ns, tool, "-t", "nat", "-S"])
}

#[test]
fn a_pod_without_ipv6_gets_the_ipv4_rules_alone() {
    if !can_run() {
        return;
    }
    let ns = ScratchNetns::new(&format!("rd6off{}", std::process::id() % 100_000));
    for knob in ["all", "default", "lo"] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns.0,
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{knob}.disable_ipv6=1"),
        ]);
    }
    let netns = Netns::open(&ns.path()).unwrap();
    hboned::redirect::install(&netns).unwrap();
    assert!(hboned::redirect::installed(&netns).unwrap());
    assert!(nat(&ns.0, "iptables").contains("HBONE_OUTPUT"));
    assert!(!nat(&ns.0, "ip6tables").contains("HBONE"));
    hboned::redirect::remove(&netns).unwrap();
    assert!(!nat(&ns.0, "iptables").contains("HBONE"));
}

#[test]
fn an_install_that_fails_for_one_family_leaves_neither() {
    if !can_run() {
        return;
    }
    // IPv6 on, but not on loopback: the IPv6 local route of the rule set cannot be added, after
    // the IPv4 rules went in.
    let ns = ScratchNetns::new(&format!("rd6lo{}", std::process::id() % 100_000));
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        "sysctl",
        "-qw",
        "net.ipv6.conf.lo.disable_ipv6=1",
    ]);
    let netns = Netns::open(&ns.path()).unwrap();
    let err = hboned::redirect::install(&netns).unwrap_err().to_string();
    assert!(err.contains("-6 route"), "{err}");
    assert!(!hboned::redirect::installed(&netns).unwrap());
    for tool in ["iptables", "ip6tables"] {
        assert!(!nat(&ns.0, tool).contains("HBONE"), "{tool} rules left");
    }
    let rules = sh(&["ip", "-n", &ns.0, "rule", "show"]);
    assert!(!rules.contains("lookup 100"), "{rules}");
}

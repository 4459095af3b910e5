//! Tests of `redirect`.

use super::*;

/// The chains say exactly what docs/design.md §3 lists, rule for rule.
#[test]
fn rules_match_the_design() {
    let design_rules = [
        (
            "mangle",
            "HBONE_PRERT",
            "-m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        ),
        (
            "nat",
            "HBONE_PRERT",
            "! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
        ),
        (
            "mangle",
            "HBONE_OUTPUT",
            "-m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        ),
        (
            "nat",
            "HBONE_OUTPUT",
            "-p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        ),
        ("nat", "HBONE_OUTPUT", "! -d 127.0.0.1/32 -o lo -j ACCEPT"),
        (
            "nat",
            "HBONE_OUTPUT",
            "! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        ),
    ];
    let mut table = "";
    let mut found = Vec::new();
    for line in CHAINS.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap();
            found.push((table, chain, spec));
        }
    }
    let mut want = design_rules.to_vec();
    want.sort();
    found.sort();
    assert_eq!(found, want);
    assert_eq!(JUMPS.len(), 4);
}

#[test]
fn ipv6_rules_exclude_the_ipv6_loopback() {
    let v6 = Family::V6.chains();
    assert!(!v6.contains("127.0.0.1"));
    assert_eq!(v6.matches("! -d ::1/128").count(), 3);
    assert_eq!(Family::V4.chains(), CHAINS);
}

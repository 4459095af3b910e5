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
            "-s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        ),
        (
            "nat",
            "HBONE_OUTPUT",
            "-d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
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
    assert!(!v6.contains("169.254.7.127"));
    assert_eq!(v6.matches(PROBE_SNAT_V6).count(), 2);
}

/// The probe exemption comes before the redirects, in both directions: a probe's packets
/// and its replies are accepted before a REDIRECT could see them.
#[test]
fn probes_are_exempt_before_any_redirect() {
    for chain in ["-A HBONE_PRERT", "-A HBONE_OUTPUT"] {
        let rules: Vec<&str> = CHAINS
            .split("*nat")
            .nth(1)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(chain))
            .collect();
        let exempt = rules
            .iter()
            .position(|r| r.contains("169.254.7.127"))
            .unwrap();
        let redirect = rules.iter().position(|r| r.contains("REDIRECT")).unwrap();
        assert!(exempt < redirect, "{chain}: {rules:?}");
    }
}

#[test]
fn the_probe_chain_has_one_snat_rule_per_address_of_its_family() {
    let ips: Vec<std::net::IpAddr> = vec![
        "10.0.0.5".parse().unwrap(),
        "fd00::5".parse().unwrap(),
        "10.0.0.6".parse().unwrap(),
    ];
    let v4 = probe_chain(Family::V4, &ips);
    assert_eq!(
        v4,
        "*nat\n:HBONE_POSTRT - [0:0]\n\
         -A HBONE_POSTRT -d 10.0.0.5/32 -m owner --socket-exists -p tcp -j SNAT --to-source 169.254.7.127\n\
         -A HBONE_POSTRT -d 10.0.0.6/32 -m owner --socket-exists -p tcp -j SNAT --to-source 169.254.7.127\n\
         COMMIT\n"
    );
    let v6 = probe_chain(Family::V6, &ips);
    assert!(v6.contains(&format!(
        "-d fd00::5/128 -m owner --socket-exists -p tcp -j SNAT --to-source {PROBE_SNAT_V6}"
    )));
    assert_eq!(v6.matches("-A ").count(), 1);
    // No pods: the chain is emptied, not left as it was.
    assert_eq!(
        probe_chain(Family::V4, &[]),
        "*nat\n:HBONE_POSTRT - [0:0]\nCOMMIT\n"
    );
}

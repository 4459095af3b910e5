//! The plugin's place in a CNI configuration directory (files only, no runtime).

use super::*;

fn setup(files: &[(&str, &str)]) -> (tempfile::TempDir, Install) {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    for (name, text) in files {
        std::fs::write(conf_dir.join(name), text).unwrap();
    }
    let plugin = dir.path().join("built-plugin");
    std::fs::write(&plugin, b"#!/bin/sh\n").unwrap();
    let install = Install {
        conf_dir,
        bin_dir: dir.path().join("bin"),
        plugin,
        agent_socket: "/var/run/hboned/cni.sock".into(),
    };
    (dir, install)
}

const PTP: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"10.1.0.0/24"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

fn types(path: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_plugin_goes_last_into_the_primary_list_once_and_comes_out_again() {
    let (_dir, install) = setup(&[("10-k8s.conflist", PTP), ("99-other.conflist", PTP)]);
    let primary = install.conf_dir.join("10-k8s.conflist");
    assert!(install.install().unwrap());
    assert_eq!(types(&primary), ["ptp", "portmap", "hboned-cni"]);
    assert_eq!(
        types(&install.conf_dir.join("99-other.conflist")),
        ["ptp", "portmap"]
    );
    assert!(install.bin_dir.join("hboned-cni").is_file());
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
    assert_eq!(v["plugins"][2]["agentSocket"], "/var/run/hboned/cni.sock");
    // Again: nothing changes. Rewritten by the network's agent: put back.
    assert!(!install.install().unwrap());
    std::fs::write(&primary, PTP).unwrap();
    assert!(install.install().unwrap());
    assert_eq!(types(&primary), ["ptp", "portmap", "hboned-cni"]);

    install.uninstall().unwrap();
    let back: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
    assert_eq!(
        back,
        serde_json::from_str::<serde_json::Value>(PTP).unwrap()
    );
    assert!(!install.bin_dir.join("hboned-cni").exists());
    install.uninstall().unwrap();
}

#[test]
fn a_single_plugin_conf_becomes_a_list() {
    let (_dir, install) = setup(&[(
        "05-bridge.conf",
        r#"{"cniVersion":"0.4.0","name":"br","type":"bridge","bridge":"cni0"}"#,
    )]);
    install.install().unwrap();
    assert!(!install.conf_dir.join("05-bridge.conf").exists());
    let list = install.conf_dir.join("05-bridge.conflist");
    assert_eq!(types(&list), ["bridge", "hboned-cni"]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
    assert_eq!(
        (v["cniVersion"].as_str(), v["name"].as_str()),
        (Some("0.4.0"), Some("br"))
    );
    assert_eq!(v["plugins"][0]["bridge"], "cni0");
}

#[test]
fn no_configuration_or_a_broken_one_is_named() {
    let (_dir, install) = setup(&[]);
    assert!(matches!(install.install(), Err(InstallError::NoConfig(_))));
    install.uninstall().unwrap();
    let (_dir, install) = setup(&[("10-k8s.conflist", "{not json")]);
    let err = install.install().unwrap_err().to_string();
    assert!(err.contains("10-k8s.conflist"), "{err}");
    let (_dir, install) = setup(&[("10-k8s.conflist", r#"{"name":"x"}"#)]);
    assert!(matches!(
        install.install(),
        Err(InstallError::Invalid { .. })
    ));
}

//! `HBONED_*` environment overrides, one table row each, applied after the file and before
//! validation. The environment is read through the source passed in (tests pass a closure),
//! never from the process directly.

use std::path::PathBuf;

use super::Config;

/// An override: the variable and how it applies; `set` returns a problem when the value
/// cannot be read.
#[derive(Debug)]
pub(super) struct Override {
    /// The environment variable.
    pub(super) var: &'static str,
    set: fn(&mut Config, String) -> Result<(), String>,
}

/// Every override, in the order they apply.
pub(super) const OVERRIDES: &[Override] = &[
    Override {
        var: "HBONED_NODE",
        set: |c, v| {
            c.node = v;
            Ok(())
        },
    },
    Override {
        var: "HBONED_TRUST_DOMAIN",
        set: |c, v| {
            c.trust_domain = v;
            Ok(())
        },
    },
    Override {
        var: "HBONED_CRL_PATH",
        set: |c, v| {
            c.crl_path = (!v.is_empty()).then(|| PathBuf::from(v));
            Ok(())
        },
    },
    Override {
        var: "HBONED_DNS_ENABLED",
        set: |c, v| {
            c.dns.enabled = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(format!("HBONED_DNS_ENABLED={v:?} is not true or false")),
            };
            Ok(())
        },
    },
    Override {
        var: "HBONED_CLUSTER_ID",
        set: |c, v| {
            c.cluster_id = v;
            Ok(())
        },
    },
    Override {
        var: "HBONED_ZDS_SOCKET",
        set: |c, v| {
            c.zds_socket = (!v.is_empty()).then(|| PathBuf::from(v));
            Ok(())
        },
    },
    Override {
        var: "HBONED_XDS_ADDRESS",
        set: |c, v| {
            c.xds.address = v;
            Ok(())
        },
    },
    Override {
        var: "HBONED_CA_DIR",
        set: |c, v| {
            c.ca.root_dir = Some(PathBuf::from(v));
            Ok(())
        },
    },
    Override {
        var: "HBONED_READINESS_ADDRESS",
        set: |c, v| {
            c.readiness_address =
                Some(v.parse().map_err(|_| {
                    format!("HBONED_READINESS_ADDRESS={v:?} is not an address:port")
                })?);
            Ok(())
        },
    },
    Override {
        var: "HBONED_METRICS_ADDRESS",
        set: |c, v| {
            c.metrics_address = Some(
                v.parse()
                    .map_err(|_| format!("HBONED_METRICS_ADDRESS={v:?} is not an address:port"))?,
            );
            Ok(())
        },
    },
    Override {
        var: "HBONED_CERT_LIFETIME_SECS",
        set: |c, v| {
            c.ca.cert_lifetime_secs = Some(v.parse().map_err(|_| {
                format!("HBONED_CERT_LIFETIME_SECS={v:?} is not a number of seconds")
            })?);
            Ok(())
        },
    },
];

/// Applies every override `env` has a value for; returns the values that could not be read.
/// In a pod (POD_NAME and POD_NAMESPACE set, as Istio's and our manifests do), an unset
/// `xds.nodeId` becomes the id istiod accepts, with its metadata under the configured one.
pub(super) fn apply(config: &mut Config, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let problems = OVERRIDES
        .iter()
        .filter_map(|o| env(o.var).and_then(|v| (o.set)(config, v).err()))
        .collect();
    if config.xds.node_id.is_empty()
        && let Some((id, metadata)) = super::ztunnel::istiod_node(env)
    {
        config.xds.node_id = id;
        for (key, value) in metadata {
            config.xds.node_metadata.entry(key).or_insert(value);
        }
    }
    problems
}

//! The opt-in labels of Kubernetes mode (`kubernetes.namespaceLabels`), parsed and matched.
//! Pure; here rather than in `kube` so a config naming them validates in any build.

use std::collections::BTreeMap;

/// One opt-in label: `key=value`, or `key` alone (any value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMatch {
    key: String,
    value: Option<String>,
}

/// A `kubernetes.namespaceLabels` entry that is not a label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not `key=value` or `key` (a Kubernetes label key)")]
pub struct BadLabel(String);

impl LabelMatch {
    /// Parses `key=value` or `key`; the key must be non-empty and free of spaces and commas.
    pub fn parse(text: &str) -> Result<Self, BadLabel> {
        let (key, value) = match text.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (text, None),
        };
        let bad = |s: &str| s.chars().any(|c| c.is_whitespace() || c == ',' || c == '=');
        if key.is_empty() || bad(key) || value.is_some_and(bad) {
            return Err(BadLabel(text.to_owned()));
        }
        Ok(LabelMatch {
            key: key.to_owned(),
            value: value.map(str::to_owned),
        })
    }

    /// Whether `labels` carry this label.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match (labels.get(&self.key), &self.value) {
            (Some(have), Some(want)) => have == want,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

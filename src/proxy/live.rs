//! The live connections of an enrolled pod, as ztunnel's admin page lists them under
//! `workloadState[<uid>].connections` (`inbound` and `outbound`, each with `src`,
//! `originalDst`, `actualDst` and `protocol` `HBONE` or `TCP`), which `istioctl ztunnel-config
//! connections` prints. A connection is in the table from the moment the proxy takes it on
//! until its [`ConnectionRecord`](crate::metrics::ConnectionRecord) closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::Lock;

/// Which way a connection goes, seen from the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// How a connection travels between the proxies: `HBONE`, or `TCP` (plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Hbone,
    Tcp,
}

impl Carrier {
    fn name(self) -> &'static str {
        match self {
            Carrier::Hbone => "HBONE",
            Carrier::Tcp => "TCP",
        }
    }
}

/// One live connection: from `src`, asked for `original_dst`, carried to `actual_dst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConnection {
    pub direction: Direction,
    pub src: SocketAddr,
    pub original_dst: SocketAddr,
    pub actual_dst: SocketAddr,
    pub carrier: Carrier,
}

impl LiveConnection {
    /// A plaintext (`TCP`) connection; [`LiveConnection::carried`] says otherwise.
    pub fn new(
        direction: Direction,
        src: SocketAddr,
        original_dst: SocketAddr,
        actual_dst: SocketAddr,
    ) -> Self {
        LiveConnection {
            direction,
            src,
            original_dst,
            actual_dst,
            carrier: Carrier::Tcp,
        }
    }

    pub fn carried(mut self, carrier: Carrier) -> Self {
        self.carrier = carrier;
        self
    }
}

/// A pod's live connections. Cheap to share; entries leave with their [`Tracked`] guard.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    next: AtomicU64,
    live: Lock<HashMap<u64, LiveConnection>>,
}

impl ConnectionTable {
    /// Adds `conn` until the guard is dropped.
    pub(crate) fn track(self: &Arc<Self>, conn: LiveConnection) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(id, conn);
        Tracked {
            table: self.clone(),
            id,
        }
    }

    /// The live connections, oldest first.
    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let live = self.live.lock();
        let mut ids: Vec<&u64> = live.keys().collect();
        ids.sort_unstable();
        ids.into_iter().map(|id| live[id].clone()).collect()
    }

    /// ztunnel's `connections` object: `{"inbound": [...], "outbound": [...]}`.
    pub fn dump(&self) -> serde_json::Value {
        let entry = |c: &LiveConnection| {
            serde_json::json!({
                "src": c.src.to_string(),
                "originalDst": c.original_dst.to_string(),
                "actualDst": c.actual_dst.to_string(),
                "protocol": c.carrier.name(),
            })
        };
        let all = self.snapshot();
        let of = |d: Direction| -> Vec<serde_json::Value> {
            all.iter().filter(|c| c.direction == d).map(entry).collect()
        };
        serde_json::json!({"inbound": of(Direction::Inbound), "outbound": of(Direction::Outbound)})
    }
}

/// Keeps one connection in its table; removes it when dropped.
#[derive(Debug)]
pub(crate) struct Tracked {
    table: Arc<ConnectionTable>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.table.live.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_as_long_as_their_guard_in_ztunnels_shape() {
        let table = Arc::new(ConnectionTable::default());
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let out = table.track(LiveConnection {
            direction: Direction::Outbound,
            src: addr("10.0.0.1:4000"),
            original_dst: addr("10.96.0.10:80"),
            actual_dst: addr("10.0.1.5:15008"),
            carrier: Carrier::Hbone,
        });
        let inbound = table.track(LiveConnection {
            direction: Direction::Inbound,
            src: addr("10.0.2.7:5000"),
            original_dst: addr("10.0.0.1:8080"),
            actual_dst: addr("10.0.0.1:8080"),
            carrier: Carrier::Tcp,
        });
        assert_eq!(
            table.dump(),
            serde_json::json!({
                "inbound": [{"src": "10.0.2.7:5000", "originalDst": "10.0.0.1:8080", "actualDst": "10.0.0.1:8080", "protocol": "TCP"}],
                "outbound": [{"src": "10.0.0.1:4000", "originalDst": "10.96.0.10:80", "actualDst": "10.0.1.5:15008", "protocol": "HBONE"}],
            })
        );
        drop(out);
        assert_eq!(table.snapshot().len(), 1);
        drop(inbound);
        assert!(table.snapshot().is_empty());
    }
}

//! The live connections of an enrolled pod, as ztunnel's admin page lists them under
//! `workloadState[<uid>].connections` (`inbound` and `outbound`, each with `src`,
//! `originalDst`, `actualDst` and `protocol` `HBONE` or `TCP`), which `istioctl ztunnel-config
//! connections` prints. A connection is in the table from the moment the proxy takes it on
//! until its [`ConnectionRecord`](crate::metrics::ConnectionRecord) closes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use slab::Slab;

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
///
/// Every connection has an entry for its life, so the table is kept small: a slab of compact
/// entries (72 bytes: the addresses without IPv6 flow labels and scope ids, which pods'
/// addresses do not carry), filled up to its length before it grows, where a hash map of
/// [`LiveConnection`]s held 113 bytes a bucket at half to seven-eighths load (2,000
/// connections: 160 KiB against 512). Like a hash map, it keeps its largest size after a burst.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    live: Lock<Entries>,
}

/// The table's entries, and the sequence number the next one gets (taken under the same lock,
/// so the dump's order is the order of insertion).
#[derive(Debug, Default)]
struct Entries {
    next: u64,
    slab: Slab<Entry>,
}

/// An address as the table (and a connection's record) keeps it: 20 bytes where a `SocketAddr`
/// takes 32; an IPv6 flow label and scope id are not kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Addr {
    ip: IpAddr,
    port: u16,
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Self {
        Addr {
            ip: a.ip(),
            port: a.port(),
        }
    }
}

impl From<Addr> for SocketAddr {
    fn from(a: Addr) -> Self {
        SocketAddr::new(a.ip, a.port)
    }
}

/// One connection in the table: its [`LiveConnection`], and when it came (for the dump's order).
#[derive(Debug)]
struct Entry {
    seq: u64,
    direction: Direction,
    carrier: Carrier,
    src: Addr,
    original_dst: Addr,
    actual_dst: Addr,
}

impl Entry {
    fn connection(&self) -> LiveConnection {
        LiveConnection {
            direction: self.direction,
            src: self.src.into(),
            original_dst: self.original_dst.into(),
            actual_dst: self.actual_dst.into(),
            carrier: self.carrier,
        }
    }
}

impl ConnectionTable {
    /// Adds `conn` until the guard is dropped.
    pub(crate) fn track(self: &Arc<Self>, conn: LiveConnection) -> Tracked {
        let mut live = self.live.lock();
        let entry = Entry {
            seq: live.next,
            direction: conn.direction,
            carrier: conn.carrier,
            src: conn.src.into(),
            original_dst: conn.original_dst.into(),
            actual_dst: conn.actual_dst.into(),
        };
        live.next += 1;
        let key = live.slab.insert(entry);
        drop(live);
        Tracked {
            table: self.clone(),
            key,
        }
    }

    /// The live connections, oldest first.
    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let live = self.live.lock();
        let mut entries: Vec<&Entry> = live.slab.iter().map(|(_, e)| e).collect();
        entries.sort_unstable_by_key(|e| e.seq);
        entries.into_iter().map(Entry::connection).collect()
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
    key: usize,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // The key is this guard's alone: nothing else removes it.
        self.table.live.lock().slab.try_remove(self.key);
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

    #[test]
    fn the_dump_lists_oldest_first_when_slots_are_reused() {
        let table = Arc::new(ConnectionTable::default());
        let conn = |port: u16| {
            LiveConnection::new(
                Direction::Outbound,
                SocketAddr::from(([10, 0, 0, 1], port)),
                "[fd00::1]:80".parse().unwrap(),
                "[fd00::1]:80".parse().unwrap(),
            )
        };
        let first = table.track(conn(1));
        let second = table.track(conn(2));
        drop(first);
        // The third takes the first's slot and still lists after the second.
        let _third = table.track(conn(3));
        let ports: Vec<u16> = table.snapshot().iter().map(|c| c.src.port()).collect();
        assert_eq!(ports, [2, 3]);
        assert_eq!(table.snapshot()[1], conn(3), "addresses read back as given");
        drop(second);
        assert_eq!(table.snapshot().len(), 1);
    }

    #[test]
    fn an_entry_stays_compact() {
        // 2,048 slots for 2,000 connections: 160 KiB, where a map of `LiveConnection`s took 512.
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 72, "{size} bytes");
    }
}

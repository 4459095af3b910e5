//! [`SharedState`]: the one handle through which the proxy's tasks read and change the
//! [`State`]. It hides the lock (a poisoned lock is recovered: every change to the state is a
//! whole upsert or removal, so a panic elsewhere cannot leave it half-written) and tells
//! whoever watches when the policies changed, so live connections are re-checked on a change
//! rather than on a timer, and whoever serves the state on (the node agent's xDS server) when
//! anything changed.

use std::sync::{RwLock, RwLockReadGuard};

use tokio::sync::{Notify, futures::Notified, watch};

use super::State;

/// The state, shared between the xDS client, the listeners and the admin page.
#[derive(Debug)]
pub struct SharedState {
    state: RwLock<State>,
    /// Woken after each change that moved the state's policy generation. A `Notify`, not a
    /// `watch`: every live inbound connection waits on it, and a `Notify` wait is 64 bytes
    /// where a `watch` wait is 144.
    policies: Notify,
    /// Bumped after every change of any kind.
    changes: watch::Sender<u64>,
}

impl SharedState {
    pub fn new(state: State) -> Self {
        SharedState {
            state: RwLock::new(state),
            policies: Notify::new(),
            changes: watch::channel(0).0,
        }
    }

    /// A read view; hold it only for a lookup, never across an await.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change`; waiters on [`SharedState::policy_changed`] are woken when it moved
    /// the policy generation.
    pub fn write<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let (out, moved) = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            let before = state.policy_generation();
            let out = change(&mut state);
            let after = state.policy_generation();
            (out, after != before)
        };
        if moved {
            self.policies.notify_waiters();
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        out
    }

    /// Resolves after the next change of the policies, or of the policies a workload selects;
    /// many changes in a row may be seen as one. Only changes after it is enabled (or first
    /// polled) count: enable it, then read the state, then wait, and no change is missed.
    pub(crate) fn policy_changed(&self) -> Notified<'_> {
        self.policies.notified()
    }

    /// Resolves (via `changed()`) after any change; many changes in a row may be seen as one.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState::new(State::default())
    }
}

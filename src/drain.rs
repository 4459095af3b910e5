//! Graceful drain (docs/design.md §9): a "draining" signal, and a count of live connections that each
//! hold a [`Guard`]. On SIGTERM the node stops accepting (its pod listeners close, so a new
//! proxy started beside it with SO_REUSEPORT takes the new connections), HBONE servers send
//! GOAWAY, and the process waits for the guards to drop, up to a deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

#[derive(Debug)]
struct Inner {
    draining: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
}

/// Shared by everything that must know about a drain.
#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                draining: watch::channel(false).0,
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }
}

/// Held for the life of one connection.
#[derive(Debug)]
pub(crate) struct Guard(Arc<Inner>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub(crate) fn guard(&self) -> Guard {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        Guard(self.inner.clone())
    }

    /// Live connections.
    pub(crate) fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Starts draining.
    pub fn start(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Whether draining has started.
    pub(crate) fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Resolves once draining has started.
    pub(crate) async fn draining(&self) {
        let mut rx = self.inner.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Waits until no connection is live, or `deadline` passed; true when all finished.
    pub(crate) async fn wait(&self, deadline: Duration) -> bool {
        let idle = async {
            loop {
                let notified = self.inner.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, idle).await.is_ok()
    }
}

/// `drain.draining()`, or never when there is no drain.
pub(crate) async fn signaled(drain: Option<&Drain>) {
    match drain {
        Some(d) => d.draining().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_guards_up_to_the_deadline() {
        let drain = Drain::default();
        let g1 = drain.guard();
        let g2 = drain.guard();
        assert_eq!(drain.active(), 2);
        let signaled = tokio::spawn({
            let d = drain.clone();
            async move { d.draining().await }
        });
        drain.start();
        signaled.await.unwrap();
        drop(g1);
        let waiter = tokio::spawn({
            let d = drain.clone();
            async move { d.wait(Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "one connection is still live");
        drop(g2);
        assert!(waiter.await.unwrap(), "all finished before the deadline");
        let _late = drain.guard();
        assert!(
            !drain.wait(Duration::from_secs(1)).await,
            "deadline passed with a live connection"
        );
    }
}

//! [`Lock`]: a mutex whose `lock` never fails. A panic while a guard was held (a bug, already
//! logged by the panic hook) must not take every later caller down with it, so the poisoned
//! state is taken as it is: the data behind these locks stays consistent between statements.
//! `state::SharedState` does the same for the workload store's read-write lock.

use std::sync::{Mutex, MutexGuard};

/// A mutex that hides lock poisoning.
#[derive(Debug, Default)]
pub(crate) struct Lock<T>(Mutex<T>);

impl<T> Lock<T> {
    pub(crate) fn new(value: T) -> Self {
        Lock(Mutex::new(value))
    }

    /// The value, through an exclusive borrow (no locking needed).
    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// The guard, even after a panic in another holder.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_holding_does_not_poison_later_callers() {
        let lock = std::sync::Arc::new(Lock::new(1));
        let held = lock.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.lock();
            panic!("a holder panics");
        })
        .join();
        *lock.lock() += 1;
        assert_eq!(*lock.lock(), 2);
    }
}

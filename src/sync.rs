//! One policy for poisoned mutexes: recover the data.
//!
//! A mutex is poisoned when a thread panicked while holding it. Every mutex in rampart
//! guards state that no critical section leaves half-updated (each replaces a value or
//! makes one self-consistent change, with nothing that can panic in between), so what a
//! panicking holder left behind is as valid as before. Refusing it (or failing open) would
//! turn one panicked request into a lasting fault: a breaker that never opens again, a
//! pool that never pools.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, poisoned or not.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

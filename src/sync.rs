//! Taking std locks, with one policy for a poisoned lock, written here once.
//!
//! A lock is poisoned when a thread panicked while holding it. mailproxy
//! takes the data anyway (`PoisonError::into_inner`) instead of panicking
//! too: what these locks guard (caches, counters, per-account and
//! per-flight state) is replaced or updated in short steps that leave it
//! usable, so a panic in one session must not take down every later
//! session, the status page and the background refresh with it, as
//! `.lock().unwrap()` would. Every std `Mutex` and `RwLock` in the crate is
//! taken through these functions; tokio's locks cannot be poisoned.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, poisoned or not.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `l`, poisoned or not.
pub(crate) fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `l`, poisoned or not.
pub(crate) fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

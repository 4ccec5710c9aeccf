//! What bounds password guessing, however many connections try at once.
//!
//! Per account: at most one password KDF at a time, and the failure delay is
//! checked again once an attempt has its turn, so after a wrong password the
//! next KDF for that account starts only when the delay has passed — the
//! rate of guesses is one per delay, whatever the concurrency. While there
//! are recent failures, at most [`MAX_WAITING`] attempts wait for a turn;
//! the rest are answered at once with a temporary failure, without a KDF.
//! (Without recent failures nobody is turned away: twenty clients starting
//! together with the right password share one KDF.) Across accounts, the KDF
//! runs share [`KDF_SLOTS`] slots, the password-setting runs included.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex as SyncMutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Attempts allowed to wait for one account's KDF while it is under attack.
pub const MAX_WAITING: usize = 8;
/// KDF runs in flight across all accounts (each takes 19 MiB and a core for
/// ~30 ms with the parameters mailproxy writes, at most 38 MiB and ~0.25 s
/// with any a stored record may ask for, see `crypto::ACCEPTED_M_COST`):
/// two matches `crypto`'s pool of working memory.
pub const KDF_SLOTS: usize = 2;

/// Consecutive local-password failures make the next attempt wait.
#[derive(Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

fn delay(failures: u32, cap: Duration) -> Duration {
    // 0.25 s, 0.5 s, 1 s, ... up to the cap (15 s by default).
    let shift = failures.saturating_sub(1).min(6);
    Duration::from_millis(250u64 << shift).min(cap)
}

/// One account's gate.
#[derive(Default)]
pub(crate) struct Gate {
    backoff: SyncMutex<Backoff>,
    turn: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
}

/// An admitted attempt; counts as waiting until dropped.
pub(crate) struct Ticket<'a> {
    gate: &'a Gate,
    stats: &'a KdfStats,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.gate.waiting.fetch_sub(1, Ordering::SeqCst);
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    fn wait_left(&self) -> Option<Duration> {
        let b = self.backoff.lock().unwrap();
        b.not_before
            .map(|t| t.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Sleeps until the failure delay has passed (no lock held, no CPU).
    pub async fn wait_delay(&self) {
        while let Some(d) = self.wait_left() {
            tokio::time::sleep(d).await;
        }
    }

    /// Admission to the queue, or `None`: too many are waiting while the
    /// account is under attack.
    pub fn admit<'a>(&'a self, stats: &'a KdfStats) -> Option<Ticket<'a>> {
        let under_attack = self.backoff.lock().unwrap().failures > 0;
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        stats.waiting.fetch_add(1, Ordering::SeqCst);
        let ticket = Ticket { gate: self, stats };
        if under_attack && before >= MAX_WAITING {
            return None; // the ticket's drop undoes the count
        }
        Some(ticket)
    }

    /// This account's turn for a KDF: the lock, taken when no failure delay
    /// is pending (checked again after taking it).
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        loop {
            self.wait_delay().await;
            let g = self.turn.lock().await;
            if self.wait_left().is_none() {
                return g;
            }
        }
    }

    /// A wrong password: the next KDF waits. Returns the delay.
    pub fn failed(&self, cap: Duration) -> Duration {
        let mut b = self.backoff.lock().unwrap();
        b.failures = b.failures.saturating_add(1);
        let d = delay(b.failures, cap);
        b.not_before = Instant::now().checked_add(d);
        d
    }

    pub fn succeeded(&self) {
        *self.backoff.lock().unwrap() = Backoff::default();
    }
}

/// Process-wide KDF counters (the status page's `kdf` object).
#[derive(Default)]
pub(crate) struct KdfStats {
    runs: AtomicU64,
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
}

/// A snapshot of [`KdfStats`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfStatus {
    /// KDF runs since start (password checks and password settings).
    pub runs: u64,
    pub in_flight: usize,
    /// Attempts admitted and waiting for their account's turn.
    pub waiting: usize,
}

/// Counts one KDF run while alive.
pub(crate) struct Running<'a>(&'a KdfStats);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl KdfStats {
    pub fn start(&self) -> Running<'_> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Running(self)
    }

    pub fn snapshot(&self) -> KdfStatus {
        KdfStatus {
            runs: self.runs.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            waiting: self.waiting.load(Ordering::SeqCst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let cap = Duration::from_secs(15);
        let got: Vec<u64> = (1..=9).map(|f| delay(f, cap).as_millis() as u64).collect();
        assert_eq!(got, [250, 500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]);
        assert_eq!(delay(u32::MAX, cap), cap);
    }

    #[tokio::test]
    async fn admission_is_capped_only_under_attack() {
        let (g, s) = (Gate::default(), KdfStats::default());
        let many: Vec<_> = (0..20).map(|_| g.admit(&s)).collect();
        assert!(many.iter().all(Option::is_some), "no failures: everyone waits");
        drop(many);
        g.failed(Duration::from_millis(1));
        let admitted: Vec<_> = (0..20).filter_map(|_| g.admit(&s)).collect();
        assert_eq!(admitted.len(), MAX_WAITING);
        assert_eq!(s.snapshot().waiting, MAX_WAITING);
        drop(admitted);
        assert_eq!(s.snapshot().waiting, 0);
    }
}

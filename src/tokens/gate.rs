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
//!
//! Each attempt comes in a [`Lane`]. The owner's lane (a loopback client of
//! the uid that runs mailproxy, as the kernel tells) has a turn and a
//! failure schedule of its own: nobody else's guesses delay it, queue it or
//! turn it away, so during any flood from other addresses or local users
//! the owner's right password gets in at once (its own mistakes still slow
//! it down). That gives nothing away: a process of the owner's uid can read
//! the vault anyway. Among the other lanes, one lane may hold at most half
//! the waiting places, so a single network or local user cannot crowd out
//! every other one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex as SyncMutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sync::lock;

/// Attempts allowed to wait for one account's KDF while it is under attack.
pub const MAX_WAITING: usize = 8;
/// Of those, attempts one lane may hold.
pub const MAX_WAITING_PER_LANE: usize = MAX_WAITING / 2;

/// Where a login attempt comes from, for turns and failure schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// A loopback client of the user who runs mailproxy.
    Owner,
    /// A loopback client of another local user.
    LocalUser(u32),
    /// Any other client, by network (the /24 of IPv4, the /64 of IPv6).
    Network(IpAddr),
}
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

/// One schedule: a turn and a failure delay.
#[derive(Default)]
struct Queue {
    backoff: SyncMutex<Backoff>,
    turn: tokio::sync::Mutex<()>,
}

impl Queue {
    fn wait_left(&self) -> Option<Duration> {
        let b = lock(&self.backoff);
        b.not_before
            .map(|t| t.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    fn under_attack(&self) -> bool {
        lock(&self.backoff).failures > 0
    }
}

/// One account's gate: the owner's queue beside everyone else's.
#[derive(Default)]
pub(crate) struct Gate {
    others: Queue,
    owner: Queue,
    waiting: AtomicUsize,
    /// Attempts waiting per lane (others only); a lane leaves at zero, so
    /// this holds no more entries than attempts in flight.
    lanes: SyncMutex<HashMap<Lane, usize>>,
}

/// An admitted attempt; counts as waiting until dropped.
pub(crate) struct Ticket<'a> {
    gate: &'a Gate,
    stats: &'a KdfStats,
    lane: Lane,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        if self.lane == Lane::Owner {
            return;
        }
        self.gate.waiting.fetch_sub(1, Ordering::SeqCst);
        let mut lanes = lock(&self.gate.lanes);
        if let Some(n) = lanes.get_mut(&self.lane) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                lanes.remove(&self.lane);
            }
        }
    }
}

impl Gate {
    fn queue(&self, lane: Lane) -> &Queue {
        if lane == Lane::Owner {
            &self.owner
        } else {
            &self.others
        }
    }

    /// Sleeps until the lane's failure delay has passed (no lock held, no CPU).
    pub async fn wait_delay(&self, lane: Lane) {
        while let Some(d) = self.queue(lane).wait_left() {
            tokio::time::sleep(d).await;
        }
    }

    /// Admission to the queue, or `None`: too many are waiting (in all, or
    /// from this lane) while the account is under attack. The owner's lane
    /// is always admitted.
    pub fn admit<'a>(&'a self, stats: &'a KdfStats, lane: Lane) -> Option<Ticket<'a>> {
        stats.waiting.fetch_add(1, Ordering::SeqCst);
        let ticket = Ticket {
            gate: self,
            stats,
            lane,
        };
        if lane == Lane::Owner {
            return Some(ticket);
        }
        let under_attack = self.others.under_attack();
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        let in_lane = {
            let mut lanes = lock(&self.lanes);
            let n = lanes.entry(lane).or_insert(0);
            *n += 1;
            *n - 1
        };
        if under_attack && (before >= MAX_WAITING || in_lane >= MAX_WAITING_PER_LANE) {
            return None; // the ticket's drop undoes the counts
        }
        Some(ticket)
    }

    /// The lane's turn for a KDF: its queue's lock, taken when no failure
    /// delay is pending (checked again after taking it).
    pub async fn turn(&self, lane: Lane) -> tokio::sync::MutexGuard<'_, ()> {
        let q = self.queue(lane);
        loop {
            self.wait_delay(lane).await;
            let g = q.turn.lock().await;
            if q.wait_left().is_none() {
                return g;
            }
        }
    }

    /// A wrong password: the lane's next KDF waits. Returns the delay.
    pub fn failed(&self, lane: Lane, cap: Duration) -> Duration {
        let mut b = lock(&self.queue(lane).backoff);
        b.failures = b.failures.saturating_add(1);
        let d = delay(b.failures, cap);
        b.not_before = Instant::now().checked_add(d);
        d
    }

    /// The right password: that lane's schedule starts afresh (the owner's
    /// success does not forgive anyone else's guesses).
    pub fn succeeded(&self, lane: Lane) {
        *lock(&self.queue(lane).backoff) = Backoff::default();
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

    fn net(i: u8) -> Lane {
        Lane::Network(IpAddr::from([10, 0, i, 0]))
    }

    #[tokio::test]
    async fn admission_is_capped_only_under_attack() {
        let (g, s) = (Gate::default(), KdfStats::default());
        let many: Vec<_> = (0..20).map(|_| g.admit(&s, net(1))).collect();
        assert!(many.iter().all(Option::is_some), "no failures: everyone waits");
        drop(many);
        g.failed(net(1), Duration::from_millis(1));
        let admitted: Vec<_> = (0..20).filter_map(|i| g.admit(&s, net(i % 4))).collect();
        assert_eq!(admitted.len(), MAX_WAITING);
        assert_eq!(s.snapshot().waiting, MAX_WAITING);
        drop(admitted);
        assert_eq!(s.snapshot().waiting, 0);
        assert!(lock(&g.lanes).is_empty(), "no lane is kept once nobody waits");
    }

    #[tokio::test]
    async fn one_lane_holds_at_most_half_the_places_and_the_owner_is_never_refused() {
        let (g, s) = (Gate::default(), KdfStats::default());
        g.failed(net(1), Duration::from_secs(15));
        let flood: Vec<_> = (0..20).filter_map(|_| g.admit(&s, net(1))).collect();
        assert_eq!(flood.len(), MAX_WAITING_PER_LANE);
        let other: Vec<_> = (0..20).filter_map(|_| g.admit(&s, net(2))).collect();
        assert_eq!(
            other.len(),
            MAX_WAITING - MAX_WAITING_PER_LANE,
            "another network still gets in line"
        );
        assert!(g.admit(&s, net(3)).is_none(), "the account's cap holds");
        let owner: Vec<_> = (0..20).filter_map(|_| g.admit(&s, Lane::Owner)).collect();
        assert_eq!(owner.len(), 20);
    }

    #[tokio::test]
    async fn others_failures_neither_delay_nor_queue_the_owner() {
        let g = Gate::default();
        g.failed(net(1), Duration::from_secs(15));
        let _theirs = g.others.turn.lock().await;
        let t = Instant::now();
        drop(g.turn(Lane::Owner).await);
        assert!(t.elapsed() < Duration::from_millis(100), "{:?}", t.elapsed());
        // The owner's own mistake slows the owner down, and the owner's
        // success forgives nobody else.
        assert_eq!(
            g.failed(Lane::Owner, Duration::from_secs(15)),
            Duration::from_millis(250)
        );
        g.succeeded(Lane::Owner);
        assert!(g.others.under_attack());
        assert!(!g.owner.under_attack());
    }
}

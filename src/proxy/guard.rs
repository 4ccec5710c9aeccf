//! Bounds on password guessing that the token manager cannot see: per
//! client network, and per login name for passthrough logins (whose
//! verdict comes from the upstream, so each guess would otherwise cost it
//! a login and get mailproxy's own address locked out there).
//!
//! * Failures are counted per client network — the /24 of an IPv4 address,
//!   the /64 of an IPv6 one — so hopping across addresses of one network
//!   does not reset the count. After a few free failures each further one
//!   is answered later and later, up to `login_failure_delay_max`.
//! * Passthrough logins are serialised per login name: one attempt at the
//!   upstream at a time, the name's failure delay is waited out (and
//!   re-checked once the turn has come) before the upstream hears of it,
//!   and only a few attempts may wait; the rest are refused at once as a
//!   temporary failure, without any upstream traffic. The schedule is the
//!   one local passwords get (0.25 s, doubling, up to the cap).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failures from one network answered without delay.
const FREE: u32 = 3;
/// A network or name not heard of for this long starts afresh.
const FORGET: Duration = Duration::from_secs(15 * 60);
/// Entries kept before old ones are swept (bounded memory under a flood).
const MAX_TRACKED: usize = 10_000;
/// Passthrough attempts that may wait for one login name at a time.
pub(crate) const MAX_WAITING: usize = 8;

#[derive(Default)]
pub struct LoginGuard {
    nets: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    names: Mutex<HashMap<String, Arc<NameGate>>>,
}

/// The network a client address is counted under.
pub(crate) fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
            }
        },
    }
}

/// One login name's turn-taking and failure schedule.
#[derive(Default)]
struct NameGate {
    turn: Arc<tokio::sync::Mutex<()>>,
    waiting: AtomicUsize,
    failures: Mutex<(u32, Option<Instant>)>,
}

/// Held while one passthrough attempt for a name talks to the upstream.
pub(crate) struct Turn {
    gate: Arc<NameGate>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

/// One attempt waiting for a name's turn.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Too many attempts already wait for this name.
#[derive(Debug)]
pub(crate) struct Busy;

/// 0.25 s, 0.5 s, 1 s, … up to `cap`.
fn schedule(failures: u32, cap: Duration) -> Duration {
    let steps = failures.saturating_sub(1).min(10);
    Duration::from_millis(250u64.saturating_mul(1 << steps)).min(cap)
}

impl LoginGuard {
    /// Records a failed login from `ip`; returns how long to wait before
    /// answering it.
    pub fn failed(&self, ip: IpAddr, cap: Duration) -> Duration {
        let now = Instant::now();
        let mut m = self.nets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= MAX_TRACKED {
            m.retain(|_, (_, last)| now.duration_since(*last) < FORGET);
        }
        let e = m.entry(network(ip)).or_insert((0, now));
        if now.duration_since(e.1) >= FORGET {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now;
        match e.0.checked_sub(FREE) {
            None | Some(0) => Duration::ZERO,
            Some(n) => (Duration::from_millis(100) * (1u32 << (n - 1).min(10))).min(cap),
        }
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.nets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&network(ip));
    }

    /// Waits for this name's turn at the upstream and its failure delay.
    pub(crate) async fn passthrough_turn(&self, name: &str) -> Result<Turn, Busy> {
        let gate = {
            let mut m = self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if m.len() >= MAX_TRACKED {
                m.retain(|_, g| Arc::strong_count(g) > 1 || g.failures.lock().map(|f| f.0 > 0).unwrap_or(true));
            }
            m.entry(name.to_lowercase()).or_default().clone()
        };
        if gate.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            gate.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        // Counted as waiting until the turn comes, or until the attempt is
        // abandoned (its client left): a dropped wait must not leak a slot.
        let waiting = Waiting(&gate.waiting);
        let turn = gate.turn.clone().lock_owned().await;
        drop(waiting);
        // Re-checked with the turn in hand: a failure just before us counts.
        let not_before = gate
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1;
        if let Some(t) = not_before {
            tokio::time::sleep_until(t.into()).await;
        }
        Ok(Turn { gate, _turn: turn })
    }
}

impl Turn {
    /// The upstream refused the credentials: the next attempt for this name
    /// waits longer.
    pub(crate) fn failed(&self, cap: Duration) {
        let mut f = self
            .gate
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.0 = f.0.saturating_add(1);
        f.1 = Instant::now().checked_add(schedule(f.0, cap));
    }

    pub(crate) fn succeeded(&self) {
        *self
            .gate
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (0, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let n = |s: &str| network(s.parse().unwrap()).to_string();
        assert_eq!(n("127.0.0.1"), "127.0.0.0");
        assert_eq!(n("127.0.0.200"), "127.0.0.0");
        assert_ne!(n("127.0.1.1"), n("127.0.0.1"));
        assert_eq!(n("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(n("::ffff:10.1.2.3"), "10.1.2.0");
    }

    #[test]
    fn one_network_counts_together() {
        let g = LoginGuard::default();
        let cap = Duration::from_secs(15);
        for i in 0..FREE {
            let ip = IpAddr::from([127, 0, 0, 10 + i as u8]);
            assert_eq!(g.failed(ip, cap), Duration::ZERO);
        }
        assert!(g.failed(IpAddr::from([127, 0, 0, 99]), cap) > Duration::ZERO);
        assert_eq!(g.failed(IpAddr::from([127, 0, 9, 1]), cap), Duration::ZERO);
        g.succeeded(IpAddr::from([127, 0, 0, 1]));
        assert_eq!(g.failed(IpAddr::from([127, 0, 0, 1]), cap), Duration::ZERO);
    }

    #[test]
    fn schedule_is_capped() {
        assert_eq!(schedule(1, Duration::from_secs(15)), Duration::from_millis(250));
        assert_eq!(schedule(2, Duration::from_secs(15)), Duration::from_millis(500));
        assert_eq!(schedule(40, Duration::from_secs(15)), Duration::from_secs(15));
    }

    #[tokio::test]
    async fn passthrough_turns_are_bounded() {
        let g = Arc::new(LoginGuard::default());
        let first = g.passthrough_turn("bob@example.org").await.expect("free");
        let mut waiters = Vec::new();
        for _ in 0..MAX_WAITING {
            let g = g.clone();
            waiters.push(tokio::spawn(async move {
                g.passthrough_turn("BOB@example.org").await.is_ok()
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            g.passthrough_turn("bob@example.org").await.is_err(),
            "a ninth waiter is refused at once"
        );
        first.failed(Duration::from_millis(300));
        let started = Instant::now();
        drop(first);
        for w in waiters {
            assert!(w.await.unwrap());
        }
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "the failure delay is waited out"
        );
    }

    #[tokio::test]
    async fn abandoned_waits_free_their_place() {
        let g = Arc::new(LoginGuard::default());
        let held = g.passthrough_turn("carol@example.org").await.expect("free");
        for _ in 0..(MAX_WAITING * 3) {
            // A client that leaves while waiting: its wait is dropped.
            let wait = g.passthrough_turn("carol@example.org");
            assert!(tokio::time::timeout(Duration::from_millis(5), wait).await.is_err());
        }
        drop(held);
        assert!(g.passthrough_turn("carol@example.org").await.is_ok());
    }
}

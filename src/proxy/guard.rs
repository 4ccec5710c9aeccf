//! Bounds on password guessing that the token manager cannot see: per
//! client network, and per login name for passthrough logins (whose
//! verdict comes from the upstream, so each guess would otherwise cost it
//! a login and get mailproxy's own address locked out there).
//!
//! * Failures are counted per client network — the /24 of an IPv4 address,
//!   the /64 of an IPv6 one — so hopping across addresses of one network
//!   does not reset the count. After a few free failures each further one
//!   is answered later and later, up to `login_failure_delay_max`.
//! * Passthrough logins for a name without recent failures are not held
//!   back: however many clients log in at once with the right password, none
//!   is turned away. The first attempt with a password goes to the upstream
//!   alone; attempts with the same password wait for its verdict and then go
//!   together (a refused password is not tried again in parallel). An
//!   attempt with another password meanwhile takes the name's turn.
//! * Once the upstream has refused a password for a name — until a login
//!   succeeds, or for [`FORGET`] — its logins are serialised: one attempt
//!   at the upstream at a time, the name's failure delay is waited out (and
//!   re-checked once the turn has come) before the upstream hears of it,
//!   and only [`MAX_WAITING`] attempts may wait; the rest are refused at
//!   once as a temporary failure, without any upstream traffic. The
//!   schedule is the one local passwords get (0.25 s, doubling, up to the
//!   cap).
//! * Memory is bounded whatever clients send. A name is kept as a keyed
//!   64-bit hash (SipHash with a random per-process key), never as the
//!   client's string, and only while an attempt for it is under way or it
//!   has failures younger than [`FORGET`]. At most [`MAX_NAMES`] names with
//!   failures are kept: beyond that the ones with the fewest failures, then
//!   the oldest, are forgotten (their guesses still count against the
//!   client's network). Networks are bounded the same way, at [`MAX_NETS`].
//!   A password is held, as a keyed hash, only while its first attempt is
//!   at the upstream.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::sync::lock;

/// Failures from one network answered without delay.
const FREE: u32 = 3;
/// A network or name without a failure for this long starts afresh.
pub(crate) const FORGET: Duration = Duration::from_secs(15 * 60);
/// Client networks with recent failures kept at most.
pub(crate) const MAX_NETS: usize = 10_000;
/// Passthrough login names with recent failures kept at most (those with
/// an attempt under way come on top: connections bound them).
pub(crate) const MAX_NAMES: usize = 4096;
/// Passthrough attempts that may wait for one login name's turn.
pub(crate) const MAX_WAITING: usize = 8;

#[derive(Default)]
pub struct LoginGuard {
    /// The per-process key of the name and password hashes.
    keys: RandomState,
    nets: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    names: Mutex<HashMap<u64, Arc<NameGate>>>,
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

/// Whether a failure at `last` is still remembered at `now`.
fn recent(last: Instant, now: Instant) -> bool {
    now.saturating_duration_since(last) < FORGET
}

/// Shrinks a full table to 7/8 of `cap`: forgets the entries `rank` puts
/// lowest (those it gives `None` are kept), and says so in the log (`what`
/// names the table), since a full table means a flood.
fn shrink<K, V, R>(m: &mut HashMap<K, V>, cap: usize, what: &str, rank: impl Fn(&V) -> Option<R>)
where
    K: std::hash::Hash + Eq + Clone,
    R: Ord,
{
    let before = m.len();
    let target = cap - cap / 8;
    if m.len() > target {
        let mut ranked: Vec<(R, K)> = m.iter().filter_map(|(k, v)| Some((rank(v)?, k.clone()))).collect();
        let excess = (m.len() - target).min(ranked.len());
        if excess > 0 {
            ranked.select_nth_unstable_by(excess - 1, |a, b| a.0.cmp(&b.0));
            for (_, k) in &ranked[..excess] {
                m.remove(k);
            }
        }
    }
    let forgotten = before - m.len();
    if forgotten > 0 {
        tracing::warn!(forgotten, kept = m.len(), cap, "{what}; forgetting the fewest, oldest");
    }
}

/// One login name's turn-taking and failure schedule.
#[derive(Default)]
struct NameGate {
    turn: Arc<tokio::sync::Mutex<()>>,
    waiting: AtomicUsize,
    state: Mutex<NameState>,
}

#[derive(Default)]
struct NameState {
    /// Failures since the last success (the delay schedule).
    failures: u32,
    /// The latest of them: while recent, the name's logins take turns.
    last_failure: Option<Instant>,
    /// The next attempt goes upstream no earlier.
    not_before: Option<Instant>,
    /// The attempt trying a password first: the password's keyed hash, and
    /// the verdict the attempts with the same password wait for.
    probe: Option<(u64, watch::Receiver<Verdict>)>,
}

impl NameState {
    /// Guesses were seen lately: logins take turns.
    fn guarded(&self, now: Instant) -> bool {
        self.last_failure.is_some_and(|t| recent(t, now))
    }

    /// Kept in the table even when no attempt is under way.
    fn worth_keeping(&self, now: Instant) -> bool {
        self.guarded(now) || self.probe.is_some()
    }
}

/// What a probe found out about its password.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pending,
    /// Accepted, or no verdict on the password (the upstream failed): the
    /// attempts with the same password go, all at once.
    Go,
    /// The upstream refused the password: those attempts take turns.
    Refused,
}

/// Held while one passthrough attempt for a name talks to the upstream.
pub(crate) struct Turn<'a> {
    guard: &'a LoginGuard,
    key: u64,
    gate: Arc<NameGate>,
    kind: Kind,
}

enum Kind {
    /// The name's turn (the name had recent failures, or another password
    /// was being tried).
    Serial { _held: tokio::sync::OwnedMutexGuard<()> },
    /// The first attempt with its password; tells the others the verdict.
    Probe(watch::Sender<Verdict>),
    /// After a probe with the same password was not refused.
    Free,
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
        let net = network(ip);
        let mut m = lock(&self.nets);
        if m.len() >= MAX_NETS && !m.contains_key(&net) {
            m.retain(|_, (_, last)| recent(*last, now));
            shrink(
                &mut m,
                MAX_NETS,
                "failed logins from too many networks",
                |&(n, last)| Some((n, last)),
            );
        }
        let e = m.entry(net).or_insert((0, now));
        if !recent(e.1, now) {
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
        lock(&self.nets).remove(&network(ip));
    }

    /// The keyed hash a login name is known by (case-insensitive).
    fn name_key(&self, name: &str) -> u64 {
        let mut h = self.keys.build_hasher();
        h.write_u8(0);
        for c in name.chars().flat_map(char::to_lowercase) {
            h.write_u32(c.into());
        }
        h.finish()
    }

    fn password_key(&self, password: &str) -> u64 {
        let mut h = self.keys.build_hasher();
        h.write_u8(1);
        h.write(password.as_bytes());
        h.finish()
    }

    /// This name's gate, made if need be (the table kept within bounds).
    fn gate(&self, key: u64) -> Arc<NameGate> {
        let mut m = lock(&self.names);
        if let Some(g) = m.get(&key) {
            return g.clone();
        }
        if m.len() >= MAX_NAMES {
            let now = Instant::now();
            // Gates with an attempt under way stay (it holds a reference).
            m.retain(|_, g| Arc::strong_count(g) > 1 || lock(&g.state).worth_keeping(now));
            shrink(&mut m, MAX_NAMES, "failed passthrough logins for too many names", |g| {
                let s = lock(&g.state);
                (Arc::strong_count(g) == 1 && s.probe.is_none()).then_some((s.failures, s.last_failure))
            });
        }
        m.entry(key).or_default().clone()
    }

    /// Waits until an attempt to log `name` in upstream with `password`
    /// may go: at once while the name has no recent failures (after the
    /// verdict on the same password, if it is being tried), else at the
    /// name's turn and after its failure delay.
    pub(crate) async fn passthrough_turn(&self, name: &str, password: &str) -> Result<Turn<'_>, Busy> {
        let key = self.name_key(name);
        let password = self.password_key(password);
        let gate = self.gate(key);
        let turn = |gate, kind| Turn {
            guard: self,
            key,
            gate,
            kind,
        };
        loop {
            let mut verdict = {
                let mut s = lock(&gate.state);
                if s.guarded(Instant::now()) {
                    break;
                }
                match &s.probe {
                    None => {
                        let (tx, rx) = watch::channel(Verdict::Pending);
                        s.probe = Some((password, rx));
                        drop(s);
                        return Ok(turn(gate, Kind::Probe(tx)));
                    }
                    Some((p, rx)) if *p == password => rx.clone(),
                    Some(_) => break,
                }
            };
            // The same password is being tried: its verdict decides. A
            // probe abandoned before one (its client left) is replaced.
            let v = verdict.wait_for(|v| *v != Verdict::Pending).await.map(|v| *v);
            if matches!(v, Ok(Verdict::Go)) {
                return Ok(turn(gate, Kind::Free));
            }
        }
        if gate.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            gate.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        // Counted as waiting until the turn comes, or until the attempt is
        // abandoned (its client left): a dropped wait must not leak a slot.
        let waiting = Waiting(&gate.waiting);
        let held = gate.turn.clone().lock_owned().await;
        drop(waiting);
        // Re-checked with the turn in hand: a failure just before us counts.
        let not_before = lock(&gate.state).not_before;
        if let Some(t) = not_before {
            tokio::time::sleep_until(t.into()).await;
        }
        Ok(turn(gate, Kind::Serial { _held: held }))
    }

    #[cfg(test)]
    fn names_kept(&self) -> usize {
        lock(&self.names).len()
    }
}

impl Turn<'_> {
    fn tell(&self, v: Verdict) {
        if let Kind::Probe(tx) = &self.kind {
            tx.send_replace(v);
        }
    }

    /// The upstream refused the credentials: the name's logins take turns,
    /// and the next one waits longer.
    pub(crate) fn failed(&self, cap: Duration) {
        {
            let now = Instant::now();
            let mut s = lock(&self.gate.state);
            if !s.guarded(now) {
                s.failures = 0;
            }
            s.failures = s.failures.saturating_add(1);
            s.last_failure = Some(now);
            s.not_before = now.checked_add(schedule(s.failures, cap));
        }
        self.tell(Verdict::Refused);
    }

    pub(crate) fn succeeded(&self) {
        {
            let mut s = lock(&self.gate.state);
            s.failures = 0;
            s.last_failure = None;
            s.not_before = None;
        }
        self.tell(Verdict::Go);
    }

    /// The attempt ended without a verdict on the password (the upstream
    /// failed): the others with the same password try for themselves.
    pub(crate) fn inconclusive(&self) {
        self.tell(Verdict::Go);
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut m = lock(&self.guard.names);
        let mut s = lock(&self.gate.state);
        if matches!(self.kind, Kind::Probe(_)) {
            s.probe = None;
        }
        // Nothing to remember and nobody else holding it: forgotten now.
        let ours = m.get(&self.key).is_some_and(|g| Arc::ptr_eq(g, &self.gate));
        if ours && Arc::strong_count(&self.gate) == 2 && !s.worth_keeping(Instant::now()) {
            drop(s);
            m.remove(&self.key);
        }
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
    fn networks_are_bounded_and_keep_the_busiest() {
        let g = LoginGuard::default();
        let cap = Duration::from_secs(15);
        let busy = IpAddr::from([10, 9, 9, 9]);
        for _ in 0..FREE + 2 {
            g.failed(busy, cap);
        }
        for i in 0..(MAX_NETS as u32 * 2) {
            let [_, _, b, c] = i.to_be_bytes();
            g.failed(IpAddr::from([11, b, c, 1]), cap);
            g.failed(IpAddr::from([11, b, c, 1]), cap);
        }
        assert!(lock(&g.nets).len() <= MAX_NETS);
        assert!(
            g.failed(busy, cap) > Duration::ZERO,
            "the busiest network is still slowed"
        );
    }

    #[test]
    fn schedule_is_capped() {
        assert_eq!(schedule(1, Duration::from_secs(15)), Duration::from_millis(250));
        assert_eq!(schedule(2, Duration::from_secs(15)), Duration::from_millis(500));
        assert_eq!(schedule(40, Duration::from_secs(15)), Duration::from_secs(15));
    }

    #[test]
    fn names_are_keyed_without_case() {
        let g = LoginGuard::default();
        assert_eq!(g.name_key("Bob@Example.org"), g.name_key("bob@example.org"));
        assert_ne!(g.name_key("bob@example.org"), g.name_key("bob@example.com"));
        assert_ne!(g.name_key("x"), g.password_key("x"));
        assert_ne!(
            g.name_key("bob@example.org"),
            LoginGuard::default().name_key("bob@example.org"),
            "the key is random"
        );
    }

    /// Without failures, many attempts with the right password all go:
    /// the first alone, the rest together once it is accepted.
    #[tokio::test]
    async fn without_failures_nobody_is_turned_away() {
        let g = Arc::new(LoginGuard::default());
        let probe = g.passthrough_turn("dave@example.org", "right").await.expect("free");
        let mut others = Vec::new();
        for _ in 0..64 {
            let g = g.clone();
            others.push(tokio::spawn(async move {
                let t = g
                    .passthrough_turn("DAVE@example.org", "right")
                    .await
                    .map_err(|_| "busy")?;
                // All hold their turn at once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                t.succeeded();
                Ok::<_, &str>(())
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(others.iter().all(|o| !o.is_finished()), "they wait for the verdict");
        probe.succeeded();
        drop(probe);
        let started = Instant::now();
        for o in others {
            o.await.unwrap().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(2), "they went together");
        assert_eq!(g.names_kept(), 0, "nothing is remembered of a name without failures");
    }

    /// A refused password is not tried again in parallel: the attempts that
    /// waited for its verdict take turns, beyond a few are refused at once.
    #[tokio::test]
    async fn a_refused_probe_makes_the_others_take_turns() {
        let g = Arc::new(LoginGuard::default());
        let probe = g.passthrough_turn("erin@example.org", "guess").await.expect("free");
        let mut others = Vec::new();
        for _ in 0..(MAX_WAITING + 5) {
            let g = g.clone();
            others.push(tokio::spawn(async move {
                match g.passthrough_turn("erin@example.org", "guess").await {
                    Ok(t) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        t.failed(Duration::from_millis(1));
                        true
                    }
                    Err(Busy) => false,
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        probe.failed(Duration::from_millis(1));
        drop(probe);
        let mut went = 0;
        for o in others {
            went += usize::from(o.await.unwrap());
        }
        assert!(
            (1..=MAX_WAITING + 1).contains(&went),
            "{went} went to the upstream after a refusal"
        );
    }

    /// While one password is being tried, another takes the name's turn.
    #[tokio::test]
    async fn other_passwords_take_turns() {
        let g = Arc::new(LoginGuard::default());
        let _probe = g.passthrough_turn("fay@example.org", "one").await.expect("free");
        let first = g
            .passthrough_turn("fay@example.org", "two")
            .await
            .expect("the turn is free");
        let mut waiters = Vec::new();
        for i in 0..MAX_WAITING {
            let g = g.clone();
            waiters.push(tokio::spawn(async move {
                g.passthrough_turn("fay@example.org", &format!("w{i}")).await.is_ok()
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(g.passthrough_turn("fay@example.org", "three").await.is_err());
        drop(first);
        for w in waiters {
            assert!(w.await.unwrap());
        }
    }

    #[tokio::test]
    async fn after_a_failure_turns_are_bounded() {
        let g = Arc::new(LoginGuard::default());
        g.passthrough_turn("bob@example.org", "guess")
            .await
            .expect("free")
            .failed(Duration::from_millis(1));
        let first = g.passthrough_turn("bob@example.org", "right").await.expect("free");
        let mut waiters = Vec::new();
        for _ in 0..MAX_WAITING {
            let g = g.clone();
            waiters.push(tokio::spawn(async move {
                g.passthrough_turn("BOB@example.org", "right").await.is_ok()
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            g.passthrough_turn("bob@example.org", "right").await.is_err(),
            "a ninth waiter is refused at once, even with the same password"
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
    async fn a_success_ends_the_turns() {
        let g = LoginGuard::default();
        let t = g.passthrough_turn("gus@example.org", "guess").await.unwrap();
        t.failed(Duration::from_millis(1));
        drop(t);
        assert_eq!(g.names_kept(), 1);
        let t = g.passthrough_turn("gus@example.org", "right").await.unwrap();
        assert!(matches!(t.kind, Kind::Serial { .. }));
        t.succeeded();
        drop(t);
        assert_eq!(g.names_kept(), 0);
        let t = g.passthrough_turn("gus@example.org", "right").await.unwrap();
        assert!(matches!(t.kind, Kind::Probe(_)));
    }

    #[tokio::test]
    async fn abandoned_waits_free_their_place() {
        let g = Arc::new(LoginGuard::default());
        let held = g.passthrough_turn("carol@example.org", "a").await.expect("free");
        held.failed(Duration::from_millis(1));
        drop(held);
        let held = g.passthrough_turn("carol@example.org", "b").await.expect("free");
        for _ in 0..(MAX_WAITING * 3) {
            // A client that leaves while waiting: its wait is dropped.
            let wait = g.passthrough_turn("carol@example.org", "c");
            assert!(tokio::time::timeout(Duration::from_millis(5), wait).await.is_err());
        }
        drop(held);
        assert!(g.passthrough_turn("carol@example.org", "d").await.is_ok());
    }

    /// A probe whose client left before a verdict is replaced by one of
    /// the attempts that waited for it.
    #[tokio::test]
    async fn an_abandoned_probe_is_replaced() {
        let g = Arc::new(LoginGuard::default());
        let probe = g.passthrough_turn("hal@example.org", "pw").await.unwrap();
        let g2 = g.clone();
        let next = tokio::spawn(async move {
            let t = g2.passthrough_turn("hal@example.org", "pw").await.unwrap();
            matches!(t.kind, Kind::Probe(_))
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(probe);
        assert!(next.await.unwrap(), "the waiting attempt tries itself");
    }

    #[tokio::test]
    async fn names_are_bounded_and_keep_the_most_failed() {
        let g = LoginGuard::default();
        let cap = Duration::from_millis(1);
        for _ in 0..3 {
            g.passthrough_turn("target@example.org", "x").await.unwrap().failed(cap);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for i in 0..(MAX_NAMES * 2) {
            let name = format!("{i}-{}@example.org", "n".repeat(4000));
            g.passthrough_turn(&name, "x").await.unwrap().failed(cap);
            assert!(g.names_kept() <= MAX_NAMES);
        }
        let t = g.passthrough_turn("target@example.org", "x").await.unwrap();
        assert!(
            matches!(t.kind, Kind::Serial { .. }),
            "the most-failed name is still guarded"
        );
        assert_eq!(lock(&t.gate.state).failures, 3);
    }

    #[test]
    fn failures_are_forgotten_by_age() {
        let now = Instant::now();
        let s = NameState {
            failures: 40,
            last_failure: Some(now),
            ..Default::default()
        };
        assert!(s.guarded(now) && s.worth_keeping(now));
        let later = now + FORGET;
        assert!(!s.guarded(later) && !s.worth_keeping(later));
    }
}

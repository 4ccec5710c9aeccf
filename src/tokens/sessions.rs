//! The upstream sessions of each account, per protocol: counted for the
//! pages and `/metrics`, and held to the account's `max_upstream_sessions`.
//!
//! Why here, in one place: providers cap simultaneous sessions (Gmail about
//! 15 IMAP connections, Exchange Online about 20 per protocol) and past the
//! cap answer vaguely or drop an older session, so users blame the proxy.
//! mailproxy sees every session, so it keeps the count and, at the limit,
//! lets a new login wait a moment for a slot, then refuses it plainly.
//!
//! One tokio [`Semaphore`] per (account, protocol): fair, so waiters get
//! slots in the order they asked. A session holds its slot in a
//! [`SessionSlot`] guard from before its upstream login until its upstream
//! side ends, in any way (a logout, the server closing, a client that
//! vanishes): the provider counts the session as over then, even while a
//! client takes its time to close. The map holds only
//! accounts of the config (a domain entry's mailbox once it logged in) and
//! is pruned and re-sized at each reload; a lower limit that open sessions
//! exceed is reached as they end ("debt": their permits are not returned).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Account, Config};
use crate::endpoint::Protocol;
use crate::sync;

/// How long a login at the limit waits for a slot before it is refused:
/// mail clients open and close sessions all the time (a folder sync ends,
/// an idle connection is recycled), so a short wait often finds one, while
/// a client told nothing for longer would time out on its own and retry.
pub const SLOT_WAIT: Duration = Duration::from_secs(5);

/// The permits of an account without a limit: more sessions than a process
/// can have sockets, so never waited for.
const NO_LIMIT: usize = 1 << 30;

/// One account and protocol: its open sessions and their limit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProtocolSessions {
    /// `imap`, `smtp` or `pop3`.
    pub protocol: String,
    pub open: u64,
    /// `None`: no limit.
    pub limit: Option<u32>,
}

impl ProtocolSessions {
    /// `IMAP 3 of 15`, or `IMAP 3, no limit`: for the pages and the table.
    pub fn describe(&self) -> String {
        let p = self.protocol.to_uppercase();
        match self.limit {
            Some(l) => format!("{p} {} of {l}", self.open),
            None => format!("{p} {}, no limit", self.open),
        }
    }

    /// Each protocol's [`ProtocolSessions::describe`], `·` apart.
    pub fn describe_all(all: &[ProtocolSessions]) -> String {
        all.iter()
            .map(ProtocolSessions::describe)
            .collect::<Vec<_>>()
            .join(" · ")
    }
}

/// The limit was reached and no slot freed within the wait.
#[derive(Debug, thiserror::Error)]
#[error("{open} {protocol} sessions open, the limit is {limit}")]
pub struct Full {
    pub protocol: Protocol,
    pub open: usize,
    pub limit: u32,
}

struct Slot {
    /// The account's name as the config writes it.
    name: String,
    sem: Arc<Semaphore>,
    open: AtomicUsize,
    sizing: Mutex<Sizing>,
}

struct Sizing {
    limit: Option<u32>,
    /// Permits owed after a shrink below the sessions open: the next ones
    /// to end keep theirs.
    debt: usize,
}

fn permits(limit: Option<u32>) -> usize {
    limit.map_or(NO_LIMIT, |n| n as usize)
}

/// Whether `account`'s sessions over `protocol` are SMTP submissions that
/// leave through Graph.
fn through_graph(account: &Account, protocol: Protocol) -> bool {
    protocol == Protocol::Smtp && account.graph.is_some()
}

/// Whether `account` has sessions over `protocol` to count: a server for
/// it, or, for SMTP, sending through Graph.
fn serves(account: &Account, protocol: Protocol) -> bool {
    account.endpoint(protocol).is_some() || through_graph(account, protocol)
}

/// The limit of `account`'s sessions over `protocol`. Submission through
/// Graph has none: Graph throttles requests (a `429` the client hears as
/// `451`), not sessions, so its sessions are only counted.
fn limit_of(account: &Account, protocol: Protocol) -> Option<u32> {
    if through_graph(account, protocol) {
        return None;
    }
    account.max_upstream_sessions
}

impl Slot {
    fn new(account: &Account, protocol: Protocol) -> Slot {
        let limit = limit_of(account, protocol);
        Slot {
            name: account.name.clone(),
            sem: Arc::new(Semaphore::new(permits(limit))),
            open: AtomicUsize::new(0),
            sizing: Mutex::new(Sizing { limit, debt: 0 }),
        }
    }

    fn limit(&self) -> Option<u32> {
        sync::lock(&self.sizing).limit
    }

    /// Takes `limit` as the new one: grows the semaphore (paying any debt
    /// first) or shrinks it (what open sessions hold becomes debt).
    fn resize(&self, limit: Option<u32>) {
        let mut s = sync::lock(&self.sizing);
        let (old, new) = (permits(s.limit), permits(limit));
        if new > old {
            let pay = s.debt.min(new - old);
            s.debt -= pay;
            self.sem.add_permits(new - old - pay);
        } else if new < old {
            let forgotten = self.sem.forget_permits(old - new);
            s.debt += old - new - forgotten;
        }
        s.limit = limit;
    }
}

/// One session's slot; dropping it frees the slot for the next login.
#[must_use = "the session counts as open only while this is held"]
pub struct SessionSlot {
    slot: Arc<Slot>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.slot.open.fetch_sub(1, Ordering::Relaxed);
        let mut s = sync::lock(&self.slot.sizing);
        if s.debt > 0 {
            s.debt -= 1;
            if let Some(p) = self.permit.take() {
                p.forget();
            }
        }
        drop(s);
        drop(self.permit.take());
    }
}

/// Every account's slots, keyed by lower-cased account name and protocol.
#[derive(Default)]
pub struct SessionSlots {
    map: RwLock<HashMap<(String, Protocol), Arc<Slot>>>,
}

impl SessionSlots {
    /// A slot for a session of `account` over `protocol`, waiting up to
    /// `wait` for one to free when the account is at its limit.
    pub async fn take(&self, account: &Account, protocol: Protocol, wait: Duration) -> Result<SessionSlot, Full> {
        let slot = self.slot(account, protocol);
        let permit = match slot.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                tracing::info!(account = %account.name, %protocol, "at the session limit; waiting for a slot");
                match tokio::time::timeout(wait, slot.sem.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(Full {
                            protocol,
                            open: slot.open.load(Ordering::Relaxed),
                            // No wait fails without a limit; 0 keeps it total.
                            limit: slot.limit().unwrap_or(0),
                        });
                    }
                }
            }
        };
        slot.open.fetch_add(1, Ordering::Relaxed);
        Ok(SessionSlot {
            slot,
            permit: Some(permit),
        })
    }

    /// The account's entry, made on its first session with the limit the
    /// config gives it (later reloads re-size it).
    fn slot(&self, account: &Account, protocol: Protocol) -> Arc<Slot> {
        let key = (account.name.to_lowercase(), protocol);
        if let Some(s) = sync::read(&self.map).get(&key) {
            return s.clone();
        }
        sync::write(&self.map)
            .entry(key)
            .or_insert_with(|| Arc::new(Slot::new(account, protocol)))
            .clone()
    }

    /// A new config: accounts that are gone lose their entry (their open
    /// sessions still free what they hold), the others take their limit,
    /// and each account of the file has one per protocol it has a server for.
    pub fn reload(&self, config: &Config) {
        let mut map = sync::write(&self.map);
        map.retain(|(name, p), slot| match config.lookup(name) {
            Some(a) => {
                slot.resize(limit_of(&a, *p));
                true
            }
            None => false,
        });
        for (name, a) in &config.accounts {
            for p in [Protocol::Imap, Protocol::Smtp, Protocol::Pop3] {
                if serves(a, p) {
                    map.entry((name.clone(), p))
                        .or_insert_with(|| Arc::new(Slot::new(a, p)));
                }
            }
        }
    }

    /// Every entry: account name, protocol, sessions open, limit.
    pub fn all(&self) -> Vec<(String, Protocol, u64, Option<u32>)> {
        let map = sync::read(&self.map);
        let mut v: Vec<_> = map
            .iter()
            .map(|((_, p), s)| (s.name.clone(), *p, s.open.load(Ordering::Relaxed) as u64, s.limit()))
            .collect();
        v.sort_by(|a, b| (&a.0, a.1.name()).cmp(&(&b.0, b.1.name())));
        v
    }

    /// `account`'s sessions and limit for each protocol it has a server for.
    pub fn of(&self, account: &Account) -> Vec<ProtocolSessions> {
        let map = sync::read(&self.map);
        let name = account.name.to_lowercase();
        [Protocol::Imap, Protocol::Smtp, Protocol::Pop3]
            .into_iter()
            .filter(|p| serves(account, *p))
            .map(|p| {
                let slot = map.get(&(name.clone(), p));
                ProtocolSessions {
                    protocol: p.name().to_string(),
                    open: slot.map_or(0, |s| s.open.load(Ordering::Relaxed) as u64),
                    limit: slot.map_or(limit_of(account, p), |s| s.limit()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(limit: u32) -> Config {
        Config::parse(
            &format!(
                "[accounts.\"a@b\"]\nprovider = \"password\"\nimap = \"imaps://x\"\nmax_upstream_sessions = {limit}\n"
            ),
            Path::new("/c.toml"),
        )
        .unwrap()
    }

    fn open(slots: &SessionSlots, a: &Account) -> (u64, Option<u32>) {
        let s = &slots.of(a)[0];
        (s.open, s.limit)
    }

    const NOW: Duration = Duration::ZERO;

    #[tokio::test]
    async fn slots_count_up_and_down_and_refuse_at_the_limit() {
        let c = config(2);
        let a = c.account("a@b").unwrap();
        let slots = SessionSlots::default();
        let x = slots.take(a, Protocol::Imap, NOW).await.unwrap();
        let y = slots.take(a, Protocol::Imap, NOW).await.unwrap();
        assert_eq!(open(&slots, a), (2, Some(2)));
        let full = slots.take(a, Protocol::Imap, NOW).await.err().unwrap();
        assert_eq!((full.open, full.limit), (2, 2));
        // Protocols are counted apart.
        let _smtp = slots.take(a, Protocol::Smtp, NOW).await.unwrap();
        drop(x);
        assert_eq!(open(&slots, a), (1, Some(2)));
        let _z = slots.take(a, Protocol::Imap, NOW).await.unwrap();
        drop(y);
        assert_eq!(open(&slots, a), (1, Some(2)));
    }

    #[tokio::test]
    async fn a_waiting_login_gets_the_slot_a_session_frees() {
        let c = config(1);
        let a = c.account("a@b").unwrap().clone();
        let slots = Arc::new(SessionSlots::default());
        let held = slots.take(&a, Protocol::Imap, NOW).await.unwrap();
        let (s2, a2) = (slots.clone(), a.clone());
        let waiter = tokio::spawn(async move { s2.take(&a2, Protocol::Imap, SLOT_WAIT).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn a_reload_resizes_and_open_sessions_over_a_new_limit_are_owed() {
        let slots = SessionSlots::default();
        let c5 = config(5);
        let a = c5.account("a@b").unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(slots.take(a, Protocol::Imap, NOW).await.unwrap());
        }
        slots.reload(&config(2));
        assert_eq!(open(&slots, a), (4, Some(2)));
        assert!(slots.take(a, Protocol::Imap, NOW).await.is_err());
        held.truncate(2); // two ended: exactly at the limit now
        assert!(slots.take(a, Protocol::Imap, NOW).await.is_err());
        held.pop();
        let third = slots.take(a, Protocol::Imap, NOW).await.unwrap();
        assert!(slots.take(a, Protocol::Imap, NOW).await.is_err());
        drop(third);
        // Raised again: three more fit beside the one still open.
        slots.reload(&config(4));
        for _ in 0..3 {
            held.push(slots.take(a, Protocol::Imap, NOW).await.unwrap());
        }
        assert!(slots.take(a, Protocol::Imap, NOW).await.is_err());
        // 0 is no limit.
        slots.reload(&config(0));
        assert_eq!(open(&slots, a), (4, None));
        held.push(slots.take(a, Protocol::Imap, NOW).await.unwrap());
    }

    #[tokio::test]
    async fn accounts_gone_from_the_config_leave_the_map() {
        let slots = SessionSlots::default();
        let c = config(2);
        let _s = slots
            .take(c.account("a@b").unwrap(), Protocol::Imap, NOW)
            .await
            .unwrap();
        assert_eq!(sync::read(&slots.map).len(), 1);
        slots.reload(&Config::parse("", Path::new("/c.toml")).unwrap());
        assert!(sync::read(&slots.map).is_empty());
        slots.reload(&c);
        assert_eq!(
            sync::read(&slots.map).len(),
            1,
            "one entry per account and protocol it has"
        );
    }

    #[tokio::test]
    async fn graph_submission_is_counted_without_the_accounts_limit() {
        let c = Config::parse(
            "[smtp]\nlisten = \"127.0.0.1:1587\"\n[accounts.\"a@b\"]\nprovider = \"microsoft\"\nclient_id = \"id\"\nsmtp = \"graph\"\nmax_upstream_sessions = 1\n",
            Path::new("/c.toml"),
        )
        .unwrap();
        let a = c.account("a@b").unwrap();
        let slots = SessionSlots::default();
        slots.reload(&c);
        let smtp = |slots: &SessionSlots| {
            let all = slots.of(a);
            let s = all.iter().find(|s| s.protocol == "smtp").expect("an SMTP row");
            (s.open, s.limit)
        };
        assert_eq!(smtp(&slots), (0, None));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(slots.take(a, Protocol::Smtp, NOW).await.unwrap());
        }
        assert_eq!(smtp(&slots), (3, None));
        // The limit still holds for the account's IMAP sessions.
        let _imap = slots.take(a, Protocol::Imap, NOW).await.unwrap();
        assert!(slots.take(a, Protocol::Imap, NOW).await.is_err());
        drop(held);
        assert_eq!(smtp(&slots), (0, None));
    }
}

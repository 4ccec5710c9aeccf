//! The states an account's tokens can be in, and the time arithmetic that
//! plans refreshes. Every addition to a `SystemTime` here is checked: a
//! provider's lifetime is clamped in `oauth`, and anything that still would
//! overflow saturates instead of panicking.
#![deny(clippy::arithmetic_side_effects)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::authorize::Flight;
use crate::oauth::Tokens;
use crate::secret::Secret;

/// Refresh at login when less than this is left (or half the lifetime, for
/// providers that hand out short-lived tokens).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// The background refresher acts earlier, so logins find a fresh token.
pub const BACKGROUND_MARGIN: Duration = Duration::from_secs(10 * 60);
/// Refresh at least this often, so inactivity expiry (Google ~6 months,
/// Microsoft 90 days) never hits an account that is merely quiet.
pub const KEEPALIVE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Background refreshes of one account are at least this far apart,
/// whatever the provider says: a lifetime of zero cannot become a storm.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// One account's token state. Transitions compute the next state from the
/// current one and assign it once (`slot.state = next`), so no failure half
/// way (a vault write, a keyring call) can leave a placeholder behind or drop
/// a token that only lives in memory.
pub(crate) enum TokenState {
    /// No usable refresh token: a new authorisation is needed.
    NeedsLogin { why: String },
    /// An authorisation is in progress (never more than one per account).
    Authorizing(Flight),
    /// A sealed refresh token is on disk; its key comes from the local
    /// password, which no client has given since start.
    Locked,
    /// Tokens in memory, usable for refresh.
    Active(Active),
}

/// The tokens of an unlocked account and their refresh bookkeeping.
#[derive(Clone)]
pub(crate) struct Active {
    /// `None` for client credentials, which have no refresh token.
    pub refresh: Option<Secret>,
    pub access: Option<Access>,
    /// The refresh token in memory is the one saved (sealed in the vault or
    /// in the keyring). False after an on-demand grant that could not be
    /// sealed yet (no local password, or its key unknown) and after a failed
    /// save of a rotated token: the in-memory token is then the only copy,
    /// and every later unlock or refresh tries to save it again.
    pub sealed: bool,
    /// Background retry after a transient failure.
    pub retry_at: Option<SystemTime>,
    pub retries: u32,
    pub last_error: Option<String>,
}

impl Active {
    pub fn new(refresh: Option<Secret>, access: Option<Access>, sealed: bool) -> Active {
        Active {
            refresh,
            access,
            sealed,
            retry_at: None,
            retries: 0,
            last_error: None,
        }
    }

    /// After a transient refresh failure: retry later, backing off
    /// (10 s, 20 s, … up to 10 minutes).
    pub fn failed(&self, now: SystemTime, error: String) -> Active {
        let retries = self.retries.saturating_add(1);
        let backoff = Duration::from_secs(5u64 << retries.min(7)).min(Duration::from_secs(600));
        Active {
            retry_at: Some(later(now, backoff)),
            retries,
            last_error: Some(error),
            ..self.clone()
        }
    }
}

#[derive(Clone)]
pub(crate) struct Access {
    pub token: Secret,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

impl Access {
    pub fn new(t: &Tokens) -> Access {
        Access {
            token: t.access.clone(),
            issued_at: t.issued_at,
            expires_at: t.expires_at,
        }
    }

    fn lifetime(&self) -> Duration {
        self.expires_at.duration_since(self.issued_at).unwrap_or_default()
    }

    /// Still good for at least the login margin (wall clock).
    pub fn fresh(&self) -> bool {
        let margin = REFRESH_MARGIN.min(self.lifetime().checked_div(2).unwrap_or_default());
        self.expires_at > later(SystemTime::now(), margin)
    }

    /// When the background refresher should renew it: a third of the
    /// lifetime before expiry, at most ten minutes before.
    pub fn renew_at(&self) -> SystemTime {
        let early = BACKGROUND_MARGIN.min(self.lifetime().saturating_mul(2).checked_div(3).unwrap_or_default());
        self.expires_at.checked_sub(early).unwrap_or(self.issued_at)
    }
}

/// `t + d`, saturating instead of panicking.
pub fn later(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d).unwrap_or(t)
}

/// When the keepalive refresh is due for a token last refreshed at `unix`.
pub fn keepalive_due(last_refresh_unix: u64) -> SystemTime {
    later(later(UNIX_EPOCH, Duration::from_secs(last_refresh_unix)), KEEPALIVE)
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(life: Duration) -> Access {
        let now = SystemTime::now();
        Access {
            token: Secret::new("t"),
            issued_at: now,
            expires_at: later(now, life),
        }
    }

    #[test]
    fn planning_never_overflows() {
        let a = Access {
            token: Secret::new("t"),
            issued_at: UNIX_EPOCH,
            expires_at: UNIX_EPOCH,
        };
        assert_eq!(a.renew_at(), UNIX_EPOCH);
        assert!(!a.fresh());
        let _ = keepalive_due(u64::MAX);
        let a = access(Duration::from_secs(3600));
        assert!(a.fresh());
        let renew = a.renew_at().duration_since(a.issued_at).unwrap();
        assert_eq!(renew, Duration::from_secs(3000));
        let a = access(Duration::from_secs(60));
        assert_eq!(
            a.renew_at().duration_since(a.issued_at).unwrap(),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn retry_backoff_is_bounded() {
        let mut a = Active::new(None, None, true);
        let now = SystemTime::now();
        for _ in 0..100 {
            a = a.failed(now, "x".into());
        }
        let wait = a.retry_at.unwrap().duration_since(now).unwrap();
        assert_eq!(wait, Duration::from_secs(600));
    }
}

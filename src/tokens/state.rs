//! The states an account's tokens can be in, and the time arithmetic that
//! plans refreshes. Every addition to a `SystemTime` here is checked: a
//! provider's lifetime is clamped in `oauth`, and anything that still would
//! overflow saturates instead of panicking.
#![deny(clippy::arithmetic_side_effects)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::authorize::Flight;
use super::resource::Resource;
use crate::oauth::Tokens;
pub use crate::oauth::MIN_REFRESH_INTERVAL;
use crate::secret::Secret;

/// Refresh at login when less than this is left (or half the lifetime, for
/// providers that hand out short-lived tokens); see [`Access::renew_at`].
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// The background refresher acts earlier, so logins find a fresh token.
pub const BACKGROUND_MARGIN: Duration = Duration::from_secs(10 * 60);
/// Refresh at least this often, so inactivity expiry (Google ~6 months,
/// Microsoft 90 days) never hits an account that is merely quiet.
pub const KEEPALIVE: Duration = Duration::from_secs(30 * 24 * 3600);

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
    /// The Graph token, for accounts that send through Graph (another
    /// audience than `access`, from the same refresh token).
    pub graph: Option<Access>,
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
            graph: None,
            sealed,
            retry_at: None,
            retries: 0,
            last_error: None,
        }
    }

    /// The access token for `r`, fresh or not.
    pub fn access_of(&self, r: Resource) -> Option<&Access> {
        match r {
            Resource::Mail => self.access.as_ref(),
            Resource::Graph => self.graph.as_ref(),
        }
    }

    pub fn set_access(&mut self, r: Resource, a: Option<Access>) {
        match r {
            Resource::Mail => self.access = a,
            Resource::Graph => self.graph = a,
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

    /// Login's view (wall clock): a login uses the token without a refresh
    /// until [`Access::stale_at`]; see [`Access::renew_at`].
    pub fn fresh(&self) -> bool {
        SystemTime::now() < self.stale_at()
    }

    /// Until when a login uses this token as it is: while more than the
    /// login margin is left, and always until the background is due to
    /// renew it, but never past its expiry.
    fn stale_at(&self) -> SystemTime {
        let margin = REFRESH_MARGIN.min(self.lifetime().checked_div(2).unwrap_or_default());
        let by_margin = self.expires_at.checked_sub(margin).unwrap_or(self.issued_at);
        by_margin.max(self.renew_at()).min(self.expires_at)
    }

    /// When the background refresher renews this token. The one place that
    /// decides when a token is due; [`Access::fresh`] (logins) follows it.
    ///
    /// * The plan: two thirds of the lifetime before expiry, at most
    ///   [`BACKGROUND_MARGIN`] (ten minutes) before. A 30 s token is due 10 s
    ///   after issue, an hour's token after 50 minutes.
    /// * The floor: never sooner than [`MIN_REFRESH_INTERVAL`] (10 s) after
    ///   issue. The refresh that got this token started just before its
    ///   issue, so this is the same floor `maintain` keeps from its last
    ///   attempt (which still guards retries, keepalives and accounts without
    ///   a token): the two coincide, they never add up. With one floor, a
    ///   token of any lifetime longer than the floor is renewed before it
    ///   expires, every `max(floor, lifetime / 3, lifetime - 10 min)`.
    /// * Login's margin: a login refreshes when less than [`REFRESH_MARGIN`]
    ///   (five minutes) or half the lifetime is left, but never before this
    ///   time. For lifetimes of twice the floor or more the margin comes
    ///   later anyway; between the floor and twice the floor, a login trusts
    ///   the token until the background renews it (with `lifetime - floor`
    ///   left), so logins never pay for a refresh the background is about to
    ///   do. A login refreshes only when the background is late (a backoff,
    ///   a machine that slept).
    /// * Absurd lifetimes (zero, or no longer than the floor) never get here
    ///   as they are: `oauth::lifetime` plans them as [`crate::oauth::MIN_LIFETIME`],
    ///   renewed at the floor, so neither logins nor the background can storm.
    pub fn renew_at(&self) -> SystemTime {
        let early = BACKGROUND_MARGIN.min(self.lifetime().saturating_mul(2).checked_div(3).unwrap_or_default());
        let planned = self.expires_at.checked_sub(early).unwrap_or(self.issued_at);
        planned.max(later(self.issued_at, MIN_REFRESH_INTERVAL))
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
        assert_eq!(a.renew_at(), later(UNIX_EPOCH, MIN_REFRESH_INTERVAL));
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

    /// Seconds after issue: when the background renews, until when logins
    /// use the token as it is.
    fn plan(life: u64) -> (u64, u64) {
        let a = access(Duration::from_secs(life));
        let secs = |t: SystemTime| t.duration_since(a.issued_at).unwrap().as_secs();
        (secs(a.renew_at()), secs(a.stale_at()))
    }

    #[test]
    fn renewed_at_the_plan_with_one_floor() {
        // Two thirds of the lifetime before expiry, at most ten minutes.
        assert_eq!(plan(3600), (3000, 3300));
        assert_eq!(plan(90), (30, 45));
        assert_eq!(plan(30), (10, 15));
        assert_eq!(plan(20), (10, 10));
        // Between the floor and twice the floor: renewed at the floor,
        // before expiry; logins trust the token until then.
        assert_eq!(plan(15), (10, 10));
        assert_eq!(plan(11), (10, 10));
        // Every lifetime longer than the floor is renewed before it expires,
        // and never sooner than the floor after issue; logins never refresh
        // before the background is due.
        for life in 11..=7200 {
            let (renew, stale) = plan(life);
            assert!(
                renew >= MIN_REFRESH_INTERVAL.as_secs() && renew < life,
                "{life}: {renew}"
            );
            assert!(stale >= renew && stale <= life, "{life}: {stale}");
        }
        // Shorter ones (`oauth::lifetime` plans them as longer): logins
        // never use them past their expiry.
        assert_eq!(plan(5), (10, 5));
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

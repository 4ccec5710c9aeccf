//! The token lifecycle of every OAuth account, in one place.
//!
//! Each account is in one [`TokenState`]: it needs a login, it is locked (a
//! sealed refresh token waits on disk and the local password that opens it
//! has not been typed since start), or it is active (refresh token in memory,
//! maybe a cached access token). Invariants, kept here and nowhere else:
//!
//! * One refresh per account at a time: the account's async lock is held
//!   across the token request, so any number of logins racing an expiry cause
//!   exactly one request; the others wait and reuse its result.
//! * A rotated refresh token is saved (atomically, durably) before the new
//!   access token is used.
//! * The password KDF and all file I/O run on blocking threads, never under a
//!   lock: logins to different accounts (or the same one) never queue behind it.
//! * Access tokens live in memory only; expiry is judged by wall-clock time,
//!   so a machine that slept past the expiry refreshes instead of failing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Account, Config, OAuthSettings};
use crate::crypto::{self, VaultKey};
use crate::oauth::{self, OAuthError};
use crate::secret::Secret;
use crate::vault::{AccountRecord, Stamp, Vault, VaultError};

/// Refresh when less than this is left of the access token's life.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

pub enum TokenState {
    /// No usable refresh token: a person must run `mailproxy login`.
    NeedsLogin {
        why: String,
    },
    /// A sealed refresh token is on disk; the key comes from the local password.
    Locked,
    Active(Active),
}

pub struct Active {
    key: VaultKey,
    refresh: Secret,
    access: Option<Access>,
}

struct Access {
    token: Secret,
    expires_at: SystemTime,
}

struct Slot {
    state: TokenState,
    record: Option<AccountRecord>,
    /// What the record file looked like when we last read or wrote it.
    stamp: Option<Stamp>,
}

/// Consecutive local-password failures make the next attempt wait.
#[derive(Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    fn delay(failures: u32) -> Duration {
        // 0.25 s, 0.5 s, 1 s, ... capped at 15 s.
        Duration::from_millis(250u64.saturating_mul(1 << failures.saturating_sub(1).min(6)))
            .min(Duration::from_secs(15))
    }
}

pub struct AccountTokens {
    pub account: Arc<Account>,
    settings: OAuthSettings,
    slot: tokio::sync::Mutex<Slot>,
    /// Keyed digest of the last password that passed the KDF check: later
    /// logins with the same password skip the (deliberately slow) KDF.
    verified: SyncMutex<Option<[u8; 32]>>,
    backoff: SyncMutex<Backoff>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("wrong password")]
    WrongPassword,
    #[error("{0} has no local password yet; run `mailproxy login {0}`")]
    NoLocalPassword(String),
    #[error("{0} is not authorised yet; run `mailproxy login {0}`")]
    NotAuthorised(String),
    #[error("the account's vault cannot be used: {0}")]
    Vault(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{account} needs a new authorisation: {why}")]
    NeedsLogin { account: String, why: String },
    #[error("{0} is locked: log in with its local password first")]
    Locked(String),
    #[error("{0}")]
    OAuth(#[from] OAuthError),
    #[error("the rotated refresh token could not be saved: {0}")]
    Vault(String),
}

pub struct TokenManager {
    vault: Vault,
    http: reqwest::Client,
    accounts: HashMap<String, Arc<AccountTokens>>,
    /// Per-process random key for the verified-password digests.
    pepper: [u8; 32],
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

impl TokenManager {
    pub fn new(config: &Config, vault: Vault) -> TokenManager {
        let mut pepper = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut pepper);
        let accounts = config
            .accounts
            .iter()
            .filter_map(|(k, a)| {
                let settings = a.oauth()?.clone();
                Some((
                    k.clone(),
                    Arc::new(AccountTokens {
                        account: a.clone(),
                        settings,
                        slot: tokio::sync::Mutex::new(Slot {
                            state: TokenState::NeedsLogin {
                                why: "not loaded yet".into(),
                            },
                            record: None,
                            stamp: None,
                        }),
                        verified: SyncMutex::new(None),
                        backoff: SyncMutex::new(Backoff::default()),
                    }),
                ))
            })
            .collect();
        TokenManager {
            vault,
            http: oauth::http_client(),
            accounts,
            pepper,
        }
    }

    pub fn get(&self, login: &str) -> Option<&Arc<AccountTokens>> {
        self.accounts.get(&login.to_lowercase())
    }

    fn digest(&self, acct: &AccountTokens, password: &Secret) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.pepper);
        h.update(acct.account.name.as_bytes());
        h.update([0]);
        h.update(password.expose().as_bytes());
        h.finalize().into()
    }

    /// Re-reads the record when the file changed under us (a `mailproxy login`
    /// while serving). Must be called with the slot locked.
    async fn sync(&self, acct: &AccountTokens, slot: &mut Slot) -> Result<(), AuthError> {
        let vault = self.vault.clone();
        let name = acct.account.name.clone();
        let stamp = blocking(move || vault.stamp(&name)).await;
        if stamp.is_some() && stamp == slot.stamp {
            return Ok(());
        }
        let vault = self.vault.clone();
        let name = acct.account.name.clone();
        let record = blocking(move || vault.load(&name))
            .await
            .map_err(|e| AuthError::Vault(e.to_string()))?;
        slot.state = match &record {
            Some(r) if r.refresh_token.is_some() => TokenState::Locked,
            _ => TokenState::NeedsLogin {
                why: "it has not been authorised yet".into(),
            },
        };
        slot.record = record;
        slot.stamp = stamp;
        *acct.verified.lock().unwrap() = None;
        Ok(())
    }

    /// Checks the local password of an OAuth account and unlocks its tokens.
    /// A wrong password never gets further than this function.
    pub async fn authenticate(
        &self,
        acct: &AccountTokens,
        password: &Secret,
    ) -> Result<(), AuthError> {
        // Make repeated failures slow, without holding any lock while waiting.
        let wait = acct
            .backoff
            .lock()
            .unwrap()
            .not_before
            .map(|t| t.saturating_duration_since(Instant::now()));
        if let Some(w) = wait.filter(|w| !w.is_zero()) {
            tokio::time::sleep(w).await;
        }

        let digest = self.digest(acct, password);
        let verifier = {
            let mut slot = acct.slot.lock().await;
            self.sync(acct, &mut slot).await?;
            let cached = acct
                .verified
                .lock()
                .unwrap()
                .is_some_and(|d| bool::from(d.ct_eq(&digest)));
            if cached && matches!(slot.state, TokenState::Active(_)) {
                return Ok(());
            }
            match slot.record.as_ref().and_then(|r| r.password.clone()) {
                Some(v) => v,
                None if slot.record.is_none() => {
                    return Err(AuthError::NotAuthorised(acct.account.name.clone()))
                }
                None => return Err(AuthError::NoLocalPassword(acct.account.name.clone())),
            }
        };

        let pw = password.clone();
        let checked = blocking(move || crypto::check_password(pw.expose(), &verifier)).await;
        let key = match checked {
            Ok(Some(key)) => key,
            Ok(None) => {
                let delay = {
                    let mut b = acct.backoff.lock().unwrap();
                    b.failures += 1;
                    let d = Backoff::delay(b.failures);
                    b.not_before = Some(Instant::now() + d);
                    d
                };
                tokio::time::sleep(delay).await;
                return Err(AuthError::WrongPassword);
            }
            Err(e) => return Err(AuthError::Vault(e.to_string())),
        };

        let mut slot = acct.slot.lock().await;
        if let TokenState::Locked = slot.state {
            let sealed = slot.record.as_ref().and_then(|r| r.refresh_token.clone());
            let Some(sealed) = sealed else {
                return Err(AuthError::NotAuthorised(acct.account.name.clone()));
            };
            let refresh = crypto::open(&key, &acct.account.name, &sealed)
                .map_err(|e| AuthError::Vault(e.to_string()))?;
            slot.state = TokenState::Active(Active {
                key,
                refresh,
                access: None,
            });
        }
        *acct.verified.lock().unwrap() = Some(digest);
        *acct.backoff.lock().unwrap() = Backoff::default();
        Ok(())
    }

    /// An access token with at least [`REFRESH_MARGIN`] left, refreshing first
    /// when needed (one refresh per account at a time).
    pub async fn access_token(&self, acct: &AccountTokens) -> Result<Secret, TokenError> {
        let name = &acct.account.name;
        let mut guard = acct.slot.lock().await;
        let slot = &mut *guard;
        let active = match &mut slot.state {
            TokenState::NeedsLogin { why } => {
                return Err(TokenError::NeedsLogin {
                    account: name.clone(),
                    why: why.clone(),
                })
            }
            TokenState::Locked => return Err(TokenError::Locked(name.clone())),
            TokenState::Active(a) => a,
        };
        if let Some(a) = &active.access {
            if a.expires_at > SystemTime::now() + REFRESH_MARGIN {
                return Ok(a.token.clone());
            }
        }

        let t = match oauth::refresh(&self.http, name, &acct.settings, &active.refresh).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(account = %name, error = %e, "token refresh failed");
                if e.needs_login() {
                    slot.state = TokenState::NeedsLogin { why: e.to_string() };
                    *acct.verified.lock().unwrap() = None;
                }
                return Err(e.into());
            }
        };

        // Save a rotated refresh token before anything uses the new access token.
        let mut record = slot.record.clone().unwrap_or_default();
        record.last_refresh = Some(now_unix());
        if let Some(s) = &t.scopes {
            record.scopes = s.clone();
        }
        let rotated = t
            .refresh
            .as_ref()
            .filter(|r| r.expose() != active.refresh.expose());
        if let Some(new) = rotated {
            record.refresh_token = Some(crypto::seal(&active.key, name, new.expose()));
            // Keep the new token in memory even if saving fails: the old one is
            // already dead at the provider.
            active.refresh = new.clone();
        }
        let vault = self.vault.clone();
        let to_store = record.clone();
        let stored: Result<Option<Stamp>, VaultError> = blocking(move || {
            vault.store(&to_store)?;
            Ok(vault.stamp(&to_store.account))
        })
        .await;
        match stored {
            Ok(stamp) => {
                slot.stamp = stamp;
                slot.record = Some(record);
            }
            Err(e) if rotated.is_some() => {
                tracing::error!(account = %name, error = %e, "cannot save the rotated refresh token");
                return Err(TokenError::Vault(e.to_string()));
            }
            Err(e) => tracing::warn!(account = %name, error = %e, "cannot record the refresh time"),
        }
        tracing::info!(account = %name, expires_in = ?t.expires_at.duration_since(SystemTime::now()).unwrap_or_default(), "access token refreshed");
        active.access = Some(Access {
            token: t.access.clone(),
            expires_at: t.expires_at,
        });
        Ok(t.access)
    }

    /// The upstream rejected `token`: forget it so the next call refreshes.
    pub async fn reject(&self, acct: &AccountTokens, token: &Secret) {
        let mut slot = acct.slot.lock().await;
        if let TokenState::Active(a) = &mut slot.state {
            if a.access
                .as_ref()
                .is_some_and(|a| a.token.expose() == token.expose())
            {
                a.access = None;
            }
        }
    }
}

/// Writes a fresh record after an authorisation: new verifier for the local
/// password, refresh token sealed under the key it yields. Blocking (KDF, fsync).
pub fn store_authorisation(
    vault: &Vault,
    account: &str,
    password: &Secret,
    refresh: &Secret,
    scopes: Vec<String>,
) -> Result<(), VaultError> {
    let (verifier, key) = crypto::new_password(password.expose());
    let rec = AccountRecord {
        version: 1,
        account: account.to_string(),
        password: Some(verifier),
        refresh_token: Some(crypto::seal(&key, account, refresh.expose())),
        scopes,
        authorized_at: Some(now_unix()),
        last_refresh: Some(now_unix()),
    };
    vault.store(&rec)
}

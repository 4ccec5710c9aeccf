//! The token lifecycle of every OAuth account, in one place.
//!
//! Each account is in one [`TokenState`] at a time:
//!
//! ```text
//!  NeedsLogin ──on-demand──▶ Authorizing ──code/device approved──▶ Unsealed ──first local login──▶ Active
//!      ▲                                            └──(key or keyring known)────────────────────▶ Active
//!      │                                                                                            │
//!      └──────────────── invalid_grant and friends ◀──────── refresh ◀──────────────────────────────┘
//!  Locked (sealed token on disk, key from the local password) ──local login──▶ Active
//! ```
//!
//! Invariants, kept here and nowhere else:
//!
//! * One refresh or authorisation per account at a time: the account's async
//!   lock is held across the token request, so any number of logins racing an
//!   expiry cause exactly one request, and a second authorisation is never
//!   started while one is pending.
//! * A rotated refresh token is saved (atomically, durably) before the new
//!   access token is used.
//! * The password KDF, keyring calls and file I/O run on blocking threads and
//!   never under a lock: logins never queue behind them.
//! * Access tokens live in memory only; expiry is judged by wall-clock time,
//!   so a machine that slept past the expiry refreshes instead of failing.
//! * A change of the vault file by another process (`mailproxy login`,
//!   `revoke`, `check`) is noticed before the next use of the account.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::{Audit, Entry};
use crate::config::{Account, Config, Flow, OAuthSettings, TokenStore};
use crate::crypto::{self, VaultKey};
use crate::keystore;
use crate::oauth::{self, flows, login::Redirect, OAuthError, Tokens};
use crate::secret::Secret;
use crate::vault::{AccountRecord, Stamp, Vault, VaultError};

/// Refresh at login when less than this is left (or half the lifetime, for
/// providers that hand out very short-lived tokens).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// The background refresher acts earlier, so logins find a fresh token.
pub const BACKGROUND_MARGIN: Duration = Duration::from_secs(10 * 60);
/// Refresh at least this often, so inactivity expiry (Google ~6 months,
/// Microsoft 90 days) never hits an account that is merely quiet.
pub const KEEPALIVE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long an on-demand browser authorisation waits for the redirect.
const AUTHORIZATION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

pub enum TokenState {
    /// No usable refresh token: a new authorisation is needed.
    NeedsLogin { why: String },
    /// An authorisation is in progress (never more than one per account).
    Authorizing(Pending),
    /// A sealed refresh token is on disk; its key comes from the local
    /// password, which no client has given since start.
    Locked,
    /// Authorised on demand, but not yet sealed: the next successful local
    /// login seals it (and sets the local password if there is none).
    Unsealed {
        refresh: Option<Secret>,
        access: Option<Access>,
    },
    Active {
        refresh: Option<Secret>,
        access: Option<Access>,
    },
}

/// What a person must do to finish a pending authorisation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub url: String,
    pub user_code: Option<String>,
}

#[derive(Clone)]
pub struct Access {
    token: Secret,
    issued_at: SystemTime,
    expires_at: SystemTime,
}

impl Access {
    fn new(t: &Tokens) -> Access {
        Access {
            token: t.access.clone(),
            issued_at: SystemTime::now(),
            expires_at: t.expires_at,
        }
    }

    fn margin(&self, max: Duration) -> Duration {
        let lifetime = self.expires_at.duration_since(self.issued_at).unwrap_or_default();
        max.min(lifetime / 2)
    }

    /// Still good for at least the login margin (wall clock).
    fn fresh(&self) -> bool {
        self.expires_at > SystemTime::now() + self.margin(REFRESH_MARGIN)
    }

    /// When the background refresher should renew it.
    fn renew_at(&self) -> SystemTime {
        let lifetime = self.expires_at.duration_since(self.issued_at).unwrap_or_default();
        self.expires_at - BACKGROUND_MARGIN.min(lifetime * 2 / 3)
    }
}

struct Slot {
    state: TokenState,
    record: Option<AccountRecord>,
    /// What the record file looked like when we last read or wrote it.
    stamp: Option<Stamp>,
    loaded: bool,
    /// The vault key, once a client gave the local password.
    key: Option<VaultKey>,
    /// Background retry after a transient failure.
    retry_at: Option<SystemTime>,
    retries: u32,
    last_error: Option<String>,
}

/// Consecutive local-password failures make the next attempt wait.
#[derive(Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    fn delay(failures: u32, cap: Duration) -> Duration {
        // 0.25 s, 0.5 s, 1 s, ... up to the cap (15 s by default).
        Duration::from_millis(250u64.saturating_mul(1 << failures.saturating_sub(1).min(6))).min(cap)
    }
}

pub struct AccountTokens {
    pub account: Arc<Account>,
    settings: OAuthSettings,
    slot: tokio::sync::Mutex<Slot>,
    /// Keyed digest of the last password that passed the KDF check: later
    /// logins with the same password skip the (deliberately slow) KDF.
    verified: SyncMutex<Option<[u8; 32]>>,
    /// One password check (KDF) per account at a time: a crowd of clients
    /// logging in together with the same password costs one KDF, not one each.
    kdf: tokio::sync::Mutex<()>,
    backoff: SyncMutex<Backoff>,
    last_use: SyncMutex<Option<u64>>,
}

impl AccountTokens {
    fn new(account: Arc<Account>, settings: OAuthSettings) -> AccountTokens {
        AccountTokens {
            account,
            settings,
            slot: tokio::sync::Mutex::new(Slot {
                state: TokenState::NeedsLogin {
                    why: "it has not been authorised yet".into(),
                },
                record: None,
                stamp: None,
                loaded: false,
                key: None,
                retry_at: None,
                retries: 0,
                last_error: None,
            }),
            verified: SyncMutex::new(None),
            kdf: tokio::sync::Mutex::new(()),
            backoff: SyncMutex::new(Backoff::default()),
            last_use: SyncMutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.account.name
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("wrong password")]
    WrongPassword,
    #[error("{0} has no local password yet; run `mailproxy login {0}`")]
    NoLocalPassword(String),
    #[error("{0} is not authorised yet")]
    NotAuthorised(String),
    #[error("the account's vault cannot be used: {0}")]
    Vault(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{account} needs a new authorisation: {why}")]
    NeedsLogin { account: String, why: String },
    #[error("{account} is waiting for its authorisation: {}", describe_pending(.pending))]
    Pending { account: String, pending: Pending },
    #[error("{0} is locked: log in with its local password first")]
    Locked(String),
    #[error("{0}")]
    OAuth(#[from] OAuthError),
    #[error("the refresh token could not be saved: {0}")]
    Vault(String),
}

pub fn describe_pending(p: &Pending) -> String {
    match &p.user_code {
        Some(code) => format!("open {} and enter the code {code}, then log in again", p.url),
        None => format!("open {} in a browser and sign in, then log in again", p.url),
    }
}

/// One row of `mailproxy accounts` and the status page.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountStatus {
    pub account: String,
    pub provider: String,
    pub flow: String,
    /// ok, needs login, authorizing, locked, error
    pub state: String,
    pub detail: Option<String>,
    pub pending: Option<Pending>,
    pub access_expires: Option<u64>,
    pub last_refresh: Option<u64>,
    pub last_use: Option<u64>,
    pub scopes: Vec<String>,
}

pub struct TokenManager {
    vault: Vault,
    http: reqwest::Client,
    accounts: RwLock<HashMap<String, Arc<AccountTokens>>>,
    /// Per-process random key for the verified-password digests.
    pepper: [u8; 32],
    store: TokenStore,
    audit: Audit,
    hook: RwLock<Option<String>>,
    /// Where people can see pending authorisations (the status page).
    status_url: RwLock<Option<String>>,
    /// Wakes the background refresher when something changed.
    pub changed: tokio::sync::Notify,
    /// Bounds the KDF runs in flight across accounts (each takes 19 MiB and a
    /// core for ~30 ms): two at a time matches `crypto`'s pool of working
    /// memory, so memory stays flat; more would only queue on the CPU.
    kdf_slots: tokio::sync::Semaphore,
    delay_cap: RwLock<Duration>,
}

pub fn now_unix() -> u64 {
    unix(SystemTime::now())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task panicked")
}

impl TokenManager {
    /// `store` is the store actually in use (the keyring may have been found
    /// unavailable at start, see `server`).
    pub fn new(config: &Config, vault: Vault, store: TokenStore, audit: Audit) -> TokenManager {
        let mut pepper = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut pepper);
        let tm = TokenManager {
            vault,
            http: oauth::http_client(config.limits.provider_timeout),
            accounts: RwLock::new(HashMap::new()),
            pepper,
            store,
            audit,
            hook: RwLock::new(None),
            status_url: RwLock::new(None),
            changed: tokio::sync::Notify::new(),
            delay_cap: RwLock::new(config.limits.login_failure_delay_max),
            kdf_slots: tokio::sync::Semaphore::new(2),
        };
        tm.reload(config);
        tm
    }

    /// Takes a new config: accounts whose settings did not change keep their
    /// state (tokens, unlock); changed ones start afresh; removed ones go.
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let mut map = self.accounts.write().unwrap();
        let mut changed = Vec::new();
        let mut next = HashMap::new();
        for (k, a) in &config.accounts {
            let Some(settings) = a.oauth() else { continue };
            match map.get(k) {
                Some(old) if *old.account == **a => {
                    next.insert(k.clone(), old.clone());
                }
                _ => {
                    changed.push(a.name.clone());
                    next.insert(k.clone(), Arc::new(AccountTokens::new(a.clone(), settings.clone())));
                }
            }
        }
        for k in map.keys() {
            if !next.contains_key(k) {
                changed.push(k.clone());
            }
        }
        *map = next;
        *self.hook.write().unwrap() = config.on_reauth_needed.clone();
        *self.delay_cap.write().unwrap() = config.limits.login_failure_delay_max;
        self.changed.notify_one();
        changed
    }

    pub fn set_status_url(&self, url: Option<String>) {
        *self.status_url.write().unwrap() = url;
    }

    pub fn get(&self, login: &str) -> Option<Arc<AccountTokens>> {
        self.accounts.read().unwrap().get(&login.to_lowercase()).cloned()
    }

    pub fn all(&self) -> Vec<Arc<AccountTokens>> {
        let mut v: Vec<_> = self.accounts.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.account.name.cmp(&b.account.name));
        v
    }

    fn digest(&self, acct: &AccountTokens, password: &Secret) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.pepper);
        h.update(acct.account.name.as_bytes());
        h.update([0]);
        h.update(password.expose().as_bytes());
        h.finalize().into()
    }

    fn keyring(&self) -> bool {
        self.store == TokenStore::Keyring
    }

    /// Re-reads the record when the file changed under us. Slot locked.
    async fn sync(&self, acct: &AccountTokens, slot: &mut Slot) -> Result<(), AuthError> {
        let (vault, name) = (self.vault.clone(), acct.account.name.clone());
        let stamp = blocking(move || vault.stamp(&name)).await;
        if slot.loaded && stamp == slot.stamp {
            return Ok(());
        }
        let (vault, name) = (self.vault.clone(), acct.account.name.clone());
        let record = blocking(move || vault.load(&name))
            .await
            .map_err(|e| AuthError::Vault(e.to_string()))?;
        let was_loaded = slot.loaded;
        slot.loaded = true;
        slot.stamp = stamp;
        // Keep a cached access token when the refresh token did not change.
        let (old_refresh, old_access) = match &slot.state {
            TokenState::Active { refresh, access } => (refresh.clone(), access.clone()),
            _ => (None, None),
        };
        let keep = |refresh: &Option<Secret>| {
            if *refresh == old_refresh {
                old_access.clone()
            } else {
                None
            }
        };
        let password_changed =
            slot.record.as_ref().and_then(|r| r.password.as_ref()) != record.as_ref().and_then(|r| r.password.as_ref());
        if password_changed {
            slot.key = None;
            *acct.verified.lock().unwrap() = None;
        }
        slot.state = match &record {
            None => match slot.state {
                // An on-demand authorisation has nothing on disk yet.
                TokenState::Authorizing(_) | TokenState::Unsealed { .. } => {
                    std::mem::replace(&mut slot.state, TokenState::Locked)
                }
                _ => {
                    if was_loaded {
                        slot.key = None;
                        *acct.verified.lock().unwrap() = None;
                    }
                    TokenState::NeedsLogin {
                        why: "it has not been authorised yet".into(),
                    }
                }
            },
            Some(r) if r.token_store.as_deref() == Some("keyring") => {
                let name = acct.account.name.clone();
                let got = blocking(move || keystore::get(&name)).await;
                tracing::debug!(account = %acct.account.name, found = ?got.as_ref().map(|t| t.is_some()), "refresh token looked up in the OS keyring");
                match got {
                    Ok(Some(t)) => {
                        let refresh = Some(t);
                        TokenState::Active {
                            access: keep(&refresh),
                            refresh,
                        }
                    }
                    Ok(None) => TokenState::NeedsLogin {
                        why: "its refresh token is no longer in the OS keyring".into(),
                    },
                    Err(e) => TokenState::NeedsLogin {
                        why: format!("the OS keyring holding its refresh token is unavailable ({e})"),
                    },
                }
            }
            Some(r) => match (&r.refresh_token, &slot.key) {
                (Some(sealed), Some(key)) => match crypto::open(key, &acct.account.name, sealed) {
                    Ok(t) => {
                        let refresh = Some(t);
                        TokenState::Active {
                            access: keep(&refresh),
                            refresh,
                        }
                    }
                    Err(_) => {
                        slot.key = None;
                        *acct.verified.lock().unwrap() = None;
                        TokenState::Locked
                    }
                },
                (Some(_), None) => TokenState::Locked,
                (None, _) if acct.settings.flow == Flow::ClientCredentials => TokenState::Active {
                    refresh: None,
                    access: old_access,
                },
                (None, _) => TokenState::NeedsLogin {
                    why: "it has not been authorised yet".into(),
                },
            },
        };
        slot.record = record;
        Ok(())
    }

    /// Checks the local password of an OAuth account and unlocks its tokens.
    /// A wrong password never gets further than this function.
    pub async fn authenticate(&self, acct: &AccountTokens, password: &Secret) -> Result<(), AuthError> {
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
            if cached && matches!(slot.state, TokenState::Active { .. }) {
                *acct.last_use.lock().unwrap() = Some(now_unix());
                return Ok(());
            }
            match slot.record.as_ref().and_then(|r| r.password.clone()) {
                Some(v) => v,
                None => {
                    if matches!(slot.state, TokenState::Unsealed { .. }) {
                        // Authorised on demand and no local password yet: this
                        // first login sets it.
                        drop(slot);
                        return self.set_first_password(acct, password, digest).await;
                    }
                    return Err(
                        if slot.record.is_some() && !matches!(slot.state, TokenState::NeedsLogin { .. }) {
                            AuthError::NoLocalPassword(acct.account.name.clone())
                        } else {
                            AuthError::NotAuthorised(acct.account.name.clone())
                        },
                    );
                }
            }
        };

        let _one_at_a_time = acct.kdf.lock().await;
        // Another login may have verified this same password while we waited.
        if acct
            .verified
            .lock()
            .unwrap()
            .is_some_and(|d| bool::from(d.ct_eq(&digest)))
        {
            let slot = acct.slot.lock().await;
            if matches!(slot.state, TokenState::Active { .. }) {
                *acct.last_use.lock().unwrap() = Some(now_unix());
                return Ok(());
            }
        }
        let _slot = self
            .kdf_slots
            .acquire()
            .await
            .expect("the KDF semaphore is never closed");
        let pw = password.clone();
        let checked = blocking(move || crypto::check_password(pw.expose(), &verifier)).await;
        let key = match checked {
            Ok(Some(key)) => key,
            Ok(None) => {
                let delay = {
                    let mut b = acct.backoff.lock().unwrap();
                    b.failures += 1;
                    let d = Backoff::delay(b.failures, *self.delay_cap.read().unwrap());
                    b.not_before = Some(Instant::now() + d);
                    d
                };
                // Slow down this client without holding up anyone else's check.
                drop(_slot);
                drop(_one_at_a_time);
                tokio::time::sleep(delay).await;
                return Err(AuthError::WrongPassword);
            }
            Err(e) => return Err(AuthError::Vault(e.to_string())),
        };

        let mut slot = acct.slot.lock().await;
        slot.key = Some(key.clone());
        match std::mem::replace(&mut slot.state, TokenState::Locked) {
            TokenState::Locked => {
                let sealed = slot.record.as_ref().and_then(|r| r.refresh_token.clone());
                let refresh = match sealed {
                    Some(s) => {
                        crypto::open(&key, &acct.account.name, &s).map_err(|e| AuthError::Vault(e.to_string()))?
                    }
                    None => return Err(AuthError::NotAuthorised(acct.account.name.clone())),
                };
                slot.state = TokenState::Active {
                    refresh: Some(refresh),
                    access: None,
                };
            }
            TokenState::Unsealed { refresh, access } => {
                // Re-authorised on demand: seal the new token under this password's key.
                if let Some(r) = &refresh {
                    self.persist(acct, &mut slot, r, None)
                        .await
                        .map_err(|e| AuthError::Vault(e.to_string()))?;
                }
                slot.state = TokenState::Active { refresh, access };
            }
            other => slot.state = other,
        }
        let usable = matches!(slot.state, TokenState::Active { .. });
        drop(slot);
        *acct.verified.lock().unwrap() = Some(digest);
        *acct.backoff.lock().unwrap() = Backoff::default();
        *acct.last_use.lock().unwrap() = Some(now_unix());
        self.changed.notify_one();
        if usable {
            Ok(())
        } else {
            Err(AuthError::NotAuthorised(acct.account.name.clone()))
        }
    }

    async fn set_first_password(
        &self,
        acct: &AccountTokens,
        password: &Secret,
        digest: [u8; 32],
    ) -> Result<(), AuthError> {
        let pw = password.clone();
        let (verifier, key) = blocking(move || crypto::new_password(pw.expose())).await;
        let mut slot = acct.slot.lock().await;
        let TokenState::Unsealed { refresh, access } = std::mem::replace(&mut slot.state, TokenState::Locked) else {
            // Someone else got here first; let the client try again normally.
            return Err(AuthError::NotAuthorised(acct.account.name.clone()));
        };
        slot.key = Some(key);
        if let Some(r) = &refresh {
            self.persist(acct, &mut slot, r, Some(verifier))
                .await
                .map_err(|e| AuthError::Vault(e.to_string()))?;
        } else {
            let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&acct.account.name));
            rec.password = Some(verifier);
            self.write_record(acct, &mut slot, rec)
                .await
                .map_err(|e| AuthError::Vault(e.to_string()))?;
        }
        slot.state = TokenState::Active { refresh, access };
        drop(slot);
        self.audit.record(Entry::new(
            &acct.account.name,
            "password_set",
            "the first login after the authorisation set the local password",
        ));
        *acct.verified.lock().unwrap() = Some(digest);
        *acct.last_use.lock().unwrap() = Some(now_unix());
        Ok(())
    }

    /// Saves `refresh` (keyring or sealed) and the record. Slot locked.
    async fn persist(
        &self,
        acct: &AccountTokens,
        slot: &mut Slot,
        refresh: &Secret,
        verifier: Option<crypto::PasswordVerifier>,
    ) -> Result<(), VaultError> {
        let name = acct.account.name.clone();
        let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
        if let Some(v) = verifier {
            rec.password = Some(v);
        }
        let in_keyring = if self.keyring() {
            let (n, r) = (name.clone(), refresh.clone());
            match blocking(move || keystore::set(&n, &r)).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(account = %name, error = %e, "cannot store the refresh token in the OS keyring; sealing it in the vault file instead");
                    false
                }
            }
        } else {
            false
        };
        if in_keyring {
            rec.refresh_token = None;
            rec.token_store = Some("keyring".into());
        } else {
            let Some(key) = &slot.key else {
                return Err(VaultError::Corrupt {
                    path: self.vault.path_of(&name),
                    reason: "no key to seal the refresh token (log in first)".into(),
                });
            };
            rec.refresh_token = Some(crypto::seal(key, &name, refresh.expose()));
            rec.token_store = None;
        }
        self.write_record(acct, slot, rec).await
    }

    async fn write_record(&self, acct: &AccountTokens, slot: &mut Slot, rec: AccountRecord) -> Result<(), VaultError> {
        let vault = self.vault.clone();
        let r = rec.clone();
        let name = acct.account.name.clone();
        let stamp = blocking(move || {
            vault.store(&r)?;
            Ok::<_, VaultError>(vault.stamp(&name))
        })
        .await?;
        slot.stamp = stamp;
        slot.record = Some(rec);
        slot.loaded = true;
        Ok(())
    }

    /// An access token with enough life left, refreshing first when needed
    /// (one refresh per account at a time).
    pub async fn access_token(&self, acct: &AccountTokens) -> Result<Secret, TokenError> {
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        let name = acct.account.name.clone();
        match &slot.state {
            TokenState::NeedsLogin { why } => {
                return Err(TokenError::NeedsLogin {
                    account: name,
                    why: why.clone(),
                })
            }
            TokenState::Authorizing(p) => {
                return Err(TokenError::Pending {
                    account: name,
                    pending: p.clone(),
                })
            }
            TokenState::Locked => return Err(TokenError::Locked(name)),
            TokenState::Unsealed { access: Some(a), .. } | TokenState::Active { access: Some(a), .. } if a.fresh() => {
                return Ok(a.token.clone());
            }
            _ => {}
        }
        self.refresh_locked(acct, &mut slot).await
    }

    /// Refreshes now. Slot locked; state is Active or Unsealed.
    async fn refresh_locked(&self, acct: &AccountTokens, slot: &mut Slot) -> Result<Secret, TokenError> {
        let name = acct.account.name.clone();
        let refresh = match &slot.state {
            TokenState::Active { refresh, .. } | TokenState::Unsealed { refresh, .. } => refresh.clone(),
            _ => return Err(TokenError::Locked(name)),
        };
        let result = match &refresh {
            Some(r) => oauth::refresh(&self.http, &name, &acct.settings, r).await,
            None => flows::client_credentials(&self.http, &name, &acct.settings).await,
        };
        let t = match result {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(account = %name, error = %e, "token refresh failed");
                slot.last_error = Some(e.to_string());
                let code = match &e {
                    OAuthError::Provider(x) => x.code.clone(),
                    _ => "unavailable".into(),
                };
                self.audit
                    .record(Entry::new(&name, "refresh_failed", format!("{code}: {e}")));
                if e.needs_login() {
                    self.needs_login(acct, slot, e.to_string());
                }
                return Err(e.into());
            }
        };
        slot.last_error = None;
        slot.retry_at = None;
        slot.retries = 0;

        // Save a rotated refresh token before anything uses the new access token.
        let rotated = t.refresh.clone().filter(|r| Some(r) != refresh.as_ref());
        if let Some(new) = &rotated {
            if let TokenState::Active { refresh, .. } | TokenState::Unsealed { refresh, .. } = &mut slot.state {
                // Keep it in memory even if saving fails: the old one is dead.
                *refresh = Some(new.clone());
            }
        }
        let sealed_state = matches!(slot.state, TokenState::Active { .. });
        if sealed_state && slot.record.is_some() {
            let saved = match &rotated {
                Some(new) => self.persist(acct, slot, new, None).await,
                None => {
                    let mut rec = slot.record.clone().expect("checked above");
                    rec.last_refresh = Some(now_unix());
                    if let Some(s) = &t.scopes {
                        rec.scopes = s.clone();
                    }
                    self.write_record(acct, slot, rec).await
                }
            };
            if let Err(e) = saved {
                tracing::error!(account = %name, error = %e, "cannot save the account record after a refresh");
                if rotated.is_some() {
                    return Err(TokenError::Vault(e.to_string()));
                }
            }
        }
        let access = Access::new(&t);
        tracing::info!(account = %name, expires_in_s = t.expires_at.duration_since(SystemTime::now()).unwrap_or_default().as_secs(), rotated = rotated.is_some(), "access token refreshed");
        match &mut slot.state {
            TokenState::Active { access: a, .. } | TokenState::Unsealed { access: a, .. } => *a = Some(access),
            _ => {}
        }
        // The background refresher plans its next wake-up from this token.
        self.changed.notify_one();
        Ok(t.access)
    }

    fn needs_login(&self, acct: &AccountTokens, slot: &mut Slot, why: String) {
        slot.state = TokenState::NeedsLogin { why: why.clone() };
        *acct.verified.lock().unwrap() = None;
        self.audit
            .record(Entry::new(&acct.account.name, "needs_login", why.clone()));
        if let Some(cmd) = self.hook.read().unwrap().clone() {
            run_hook(&cmd, &acct.account.name, &why);
        }
    }

    /// The upstream rejected `token`: forget it so the next call refreshes.
    pub async fn reject(&self, acct: &AccountTokens, token: &Secret) {
        let mut slot = acct.slot.lock().await;
        if let TokenState::Active { access, .. } = &mut slot.state {
            if access.as_ref().is_some_and(|a| a.token == *token) {
                *access = None;
            }
        }
    }

    /// Starts an authorisation for an account without a usable token (never
    /// two at once). Returns what the person must do, or `None` when no
    /// person is needed (client credentials: the token is there already).
    pub async fn start_authorization(
        self: &Arc<Self>,
        acct: &Arc<AccountTokens>,
    ) -> Result<Option<Pending>, TokenError> {
        let name = acct.account.name.clone();
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        match &slot.state {
            TokenState::Authorizing(p) => return Ok(Some(p.clone())),
            TokenState::NeedsLogin { .. } => {}
            _ => return Ok(None),
        }
        if !acct.settings.on_demand {
            return Err(TokenError::NeedsLogin {
                account: name.clone(),
                why: format!("run `mailproxy login {name}`"),
            });
        }
        let s = &acct.settings;
        let pending = match s.flow {
            Flow::ClientCredentials => {
                let t = flows::client_credentials(&self.http, &name, s).await?;
                self.audit
                    .record(Entry::new(&name, "consent", "client credentials token obtained").scopes(&s.scopes));
                slot.state = TokenState::Unsealed {
                    refresh: None,
                    access: Some(Access::new(&t)),
                };
                return Ok(None);
            }
            Flow::Device => {
                let d = flows::device_start(&self.http, &name, s).await?;
                let pending = Pending {
                    url: d
                        .verification_uri_complete
                        .clone()
                        .unwrap_or_else(|| d.verification_uri.clone()),
                    user_code: Some(d.user_code.clone()),
                };
                let (me, a) = (self.clone(), acct.clone());
                tokio::spawn(async move {
                    let r = flows::device_poll(&me.http, a.name(), &a.settings, &d, |i| {
                        tracing::info!(interval_s = i.as_secs(), "the provider asked to poll more slowly")
                    })
                    .await;
                    me.finish_authorization(&a, r).await;
                });
                pending
            }
            Flow::AuthorizationCode => {
                let redirect = Redirect::bind(s)
                    .await
                    .map_err(|e| OAuthError::Config(format!("cannot listen for the redirect: {e}")))?;
                let req = oauth::authorization_request(&name, s, redirect.uri())?;
                let pending = Pending {
                    url: req.url.clone(),
                    user_code: None,
                };
                let (me, a) = (self.clone(), acct.clone());
                tokio::spawn(async move {
                    let r = match redirect.wait(a.name(), &req, AUTHORIZATION_TIMEOUT).await {
                        Ok(code) => oauth::exchange_code(&me.http, a.name(), &a.settings, req, code.expose()).await,
                        Err(e) => Err(e),
                    };
                    me.finish_authorization(&a, r).await;
                });
                pending
            }
        };
        tracing::warn!(account = %name, url = %pending.url, user_code = ?pending.user_code, "authorisation needed: {}", describe_pending(&pending));
        self.audit
            .record(Entry::new(&name, "authorization_started", format!("{} flow", s.flow.name())).scopes(&s.scopes));
        slot.state = TokenState::Authorizing(pending.clone());
        self.changed.notify_one();
        Ok(Some(pending))
    }

    async fn finish_authorization(&self, acct: &AccountTokens, r: Result<Tokens, OAuthError>) {
        let name = acct.account.name.clone();
        let mut slot = acct.slot.lock().await;
        if !matches!(slot.state, TokenState::Authorizing(_)) {
            return; // revoked or re-authorised meanwhile
        }
        match r {
            Ok(t) => {
                let scopes = t.scopes.clone().unwrap_or_else(|| acct.settings.scopes.clone());
                self.audit
                    .record(Entry::new(&name, "consent", "authorised").scopes(&scopes));
                let access = Some(Access::new(&t));
                let can_seal = self.keyring() || slot.key.is_some();
                match (
                    &t.refresh,
                    can_seal && slot.record.as_ref().is_some_and(|r| r.password.is_some()),
                ) {
                    (Some(refresh), true) => {
                        let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
                        rec.scopes = scopes;
                        rec.authorized_at = Some(now_unix());
                        slot.record = Some(rec);
                        match self.persist(acct, &mut slot, refresh, None).await {
                            Ok(()) => {
                                slot.state = TokenState::Active {
                                    refresh: t.refresh.clone(),
                                    access,
                                }
                            }
                            Err(e) => {
                                tracing::error!(account = %name, error = %e, "cannot save the new refresh token");
                                slot.state = TokenState::Unsealed {
                                    refresh: t.refresh.clone(),
                                    access,
                                };
                            }
                        }
                    }
                    _ => {
                        tracing::info!(account = %name, "authorised; the next login with the local password seals the refresh token");
                        let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
                        rec.scopes = scopes;
                        rec.authorized_at = Some(now_unix());
                        slot.record = Some(rec);
                        slot.state = TokenState::Unsealed {
                            refresh: t.refresh.clone(),
                            access,
                        };
                    }
                }
            }
            Err(e) => {
                tracing::warn!(account = %name, error = %e, "authorisation failed");
                self.audit.record(Entry::new(&name, "consent", format!("failed: {e}")));
                self.needs_login(acct, &mut slot, e.to_string());
            }
        }
        self.changed.notify_one();
    }

    /// Background upkeep of one account: refresh before expiry (and at least
    /// every 30 days), with backoff after transient failures. Returns when to
    /// look again.
    pub async fn maintain(&self, acct: &AccountTokens) -> SystemTime {
        let now = SystemTime::now();
        let later = now + Duration::from_secs(60);
        let mut slot = acct.slot.lock().await;
        if self.sync(acct, &mut slot).await.is_err() {
            return later;
        }
        let due = match &slot.state {
            TokenState::Active { access: Some(a), .. } => {
                let keepalive = slot
                    .record
                    .as_ref()
                    .and_then(|r| r.last_refresh)
                    .map(|t| UNIX_EPOCH + Duration::from_secs(t) + KEEPALIVE);
                keepalive.map_or(a.renew_at(), |k| k.min(a.renew_at()))
            }
            TokenState::Active { access: None, .. } => now,
            _ => return later,
        };
        let due = slot.retry_at.map_or(due, |r| r.max(due));
        if due > now {
            return due;
        }
        match self.refresh_locked(acct, &mut slot).await {
            Ok(_) => match &slot.state {
                TokenState::Active { access: Some(a), .. } => a.renew_at(),
                _ => later,
            },
            Err(TokenError::OAuth(e)) if e.is_transient() => {
                slot.retries += 1;
                let backoff = Duration::from_secs(5u64 << slot.retries.min(7)).min(Duration::from_secs(600));
                slot.retry_at = Some(now + backoff);
                tracing::info!(account = %acct.account.name, retry_in_s = backoff.as_secs(), "will retry the refresh");
                now + backoff
            }
            Err(_) => later,
        }
    }

    pub async fn status(&self, acct: &AccountTokens) -> AccountStatus {
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        let (state, detail, pending, expires) = match &slot.state {
            TokenState::NeedsLogin { why } => ("needs login", Some(why.clone()), None, None),
            TokenState::Authorizing(p) => ("authorizing", Some(describe_pending(p)), Some(p.clone()), None),
            TokenState::Locked => (
                "locked",
                Some("waiting for a client to log in with the local password".to_string()),
                None,
                None,
            ),
            TokenState::Unsealed { access, .. } => (
                "ok",
                Some("authorised; the next local login seals the token".into()),
                None,
                access.as_ref().map(|a| unix(a.expires_at)),
            ),
            TokenState::Active { access, .. } => {
                let exp = access.as_ref().map(|a| unix(a.expires_at));
                match &slot.last_error {
                    Some(e) if slot.retry_at.is_some() => ("error", Some(e.clone()), None, exp),
                    _ => ("ok", None, None, exp),
                }
            }
        };
        AccountStatus {
            account: acct.account.name.clone(),
            provider: acct.settings.provider.name().into(),
            flow: acct.settings.flow.name().into(),
            state: state.into(),
            detail,
            pending,
            access_expires: expires,
            last_refresh: slot.record.as_ref().and_then(|r| r.last_refresh),
            last_use: *acct.last_use.lock().unwrap(),
            scopes: slot.record.as_ref().map(|r| r.scopes.clone()).unwrap_or_default(),
        }
    }

    pub fn status_url(&self) -> Option<String> {
        self.status_url.read().unwrap().clone()
    }
}

fn new_record(account: &str) -> AccountRecord {
    AccountRecord {
        version: 1,
        account: account.to_string(),
        ..Default::default()
    }
}

/// `on_reauth_needed`: run through the shell with the account in the
/// environment; never waited for on the async workers.
fn run_hook(cmd: &str, account: &str, why: &str) {
    let spawned = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("MAILPROXY_ACCOUNT", account)
        .env("MAILPROXY_REASON", why)
        .stdin(std::process::Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            let account = account.to_string();
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(st) if st.success() => {}
                    Ok(st) => tracing::warn!(account = %account, status = %st, "on_reauth_needed hook failed"),
                    Err(e) => tracing::warn!(account = %account, error = %e, "on_reauth_needed hook failed"),
                }
            });
        }
        Err(e) => tracing::warn!(account = %account, error = %e, "cannot run the on_reauth_needed hook"),
    }
}

/// Writes a fresh record after an interactive authorisation (`mailproxy
/// login`): a new verifier for the local password, and the refresh token in
/// the keyring or sealed under the key the password yields. Blocking.
pub fn store_authorisation(
    vault: &Vault,
    store: TokenStore,
    account: &str,
    password: &Secret,
    refresh: Option<&Secret>,
    scopes: Vec<String>,
) -> Result<&'static str, VaultError> {
    let (verifier, key) = crypto::new_password(password.expose());
    let mut rec = AccountRecord {
        version: 1,
        account: account.to_string(),
        password: Some(verifier),
        scopes,
        authorized_at: Some(now_unix()),
        last_refresh: Some(now_unix()),
        ..Default::default()
    };
    let mut where_ = "the vault file (sealed with a key derived from the local password)";
    if let Some(refresh) = refresh {
        let in_keyring = store == TokenStore::Keyring
            && match keystore::set(account, refresh) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("mailproxy: the OS keyring is unavailable ({e}); sealing the refresh token in the vault file instead");
                    false
                }
            };
        if in_keyring {
            rec.token_store = Some("keyring".into());
            where_ = "the OS keyring";
        } else {
            rec.refresh_token = Some(crypto::seal(&key, account, refresh.expose()));
        }
    } else {
        where_ = "nowhere (client credentials need no refresh token)";
    }
    vault.store(&rec)?;
    Ok(where_)
}

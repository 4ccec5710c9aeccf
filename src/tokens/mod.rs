//! The token lifecycle of every OAuth account, in one place.
//!
//! Each account is in one [`TokenState`] at a time:
//!
//! ```text
//!  NeedsLogin ──on-demand──▶ Authorizing ──approved, identity checked──▶ Active (sealed or not)
//!      ▲                                                                    │
//!      └──────────────── invalid_grant and friends ◀──────── refresh ◀──────┘
//!  Locked (sealed token on disk, key from the local password) ──owner's password──▶ Active
//! ```
//!
//! Invariants, kept here and nowhere else:
//!
//! * A transition computes the next state and assigns it once; a failed
//!   vault or keyring write keeps every token that is only in memory (the
//!   state says `sealed: false`, and the save is retried).
//! * One refresh or authorisation per account at a time: the account's async
//!   lock is held across the token request, so any number of logins racing an
//!   expiry cause exactly one request.
//! * A rotated refresh token is saved (atomically, durably) before the new
//!   access token is handed out, unless saving fails (then it is kept in
//!   memory, reported, and saved later).
//! * Every write is a compare-and-write on the record's generation: a write
//!   based on an older record than the one on disk is dropped, so `revoke`
//!   and `login` always win over a refresh in flight.
//! * Only the owner sets a local password (`mailproxy login`, `mailproxy
//!   passwd`, or the completion page of an on-demand browser authorisation);
//!   nothing a mail client sends ever sets or changes one.
//! * Every grant is checked with [`identity::verify`] before anything of it
//!   is stored.
//! * The password KDF, keyring calls and file I/O run on blocking threads;
//!   guessing is bounded per account by [`gate`].

pub mod authorize;
pub mod gate;
pub mod live;
pub mod offline;
pub mod sessions;
mod shared;
pub(crate) mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, RwLock};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::{Audit, Entry};
use crate::config::{self, Account, Config, Flow, OAuthSettings, TokenStore};
use crate::crypto::{self, VaultKey};
use crate::identity;
use crate::keystore;
use crate::oauth::{self, flows, login::Redirect, OAuthError, Tokens};
use crate::secret::Secret;
use crate::store::{RecordStore, StoreError, Version};
use crate::tls::ClientConfigs;
use crate::vault::{AccountRecord, StoreKind, Vault, Written};
use authorize::{BrowserFlow, DeviceShown, Flight};
pub use gate::KdfStatus;
pub use gate::Lane;
use gate::{Gate, KdfStats};
pub use offline::store_authorisation;
pub use sessions::SessionOpen;
use state::{later, unix, Access, Active, TokenState};
pub use state::{BACKGROUND_MARGIN, KEEPALIVE, MIN_REFRESH_INTERVAL, REFRESH_MARGIN};

/// What a person must do to finish a pending authorisation. Never the
/// provider's URL or its `state`: `url` is mailproxy's own local start
/// address (browser flow) or the status page (device flow).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub url: String,
    /// Always `None` in what clients see: a device code is shown on the
    /// status page only (kept for the shape of the status documents).
    pub user_code: Option<String>,
}

struct Slot {
    state: TokenState,
    record: Option<AccountRecord>,
    /// What the record looked like when we last read or wrote it.
    stamp: Option<Version>,
    loaded: bool,
    /// The vault key, once the owner's password was given.
    key: Option<VaultKey>,
}

/// The account's access token if it is still fresh, `None` when an
/// active account needs a refresh, or why no token can be had at all.
fn fresh_token(state: &TokenState, name: &str) -> Result<Option<Secret>, TokenError> {
    match state {
        TokenState::Active(a) => Ok(a.access.as_ref().filter(|x| x.fresh()).map(|x| x.token.clone())),
        TokenState::NeedsLogin { why } => Err(TokenError::NeedsLogin {
            account: name.to_string(),
            why: why.clone(),
        }),
        TokenState::Authorizing(f) => Err(TokenError::Pending {
            account: name.to_string(),
            pending: f.pending.clone(),
        }),
        TokenState::Locked => Err(TokenError::Locked(name.to_string())),
    }
}

/// What `login` says is stored for an account whose grant has no refresh
/// token, by design.
pub const NO_REFRESH_TOKEN_KEPT: &str =
    "no refresh token is kept: client credentials and service accounts get each access token with the application's own credentials";

pub struct AccountTokens {
    pub account: Arc<Account>,
    settings: OAuthSettings,
    slot: tokio::sync::Mutex<Slot>,
    /// Keyed digest of the last password that passed the KDF check: later
    /// logins with the same password skip the (deliberately slow) KDF.
    verified: SyncMutex<Option<[u8; 32]>>,
    gate: Gate,
    last_use: SyncMutex<Option<u64>>,
    /// A background refresh task of this account is running.
    upkeep: AtomicBool,
    /// When the background refresher last tried (the per-account floor).
    last_attempt: SyncMutex<Option<SystemTime>>,
    /// The last status computed, for when the slot is busy (a slow refresh).
    last_status: SyncMutex<Option<AccountStatus>>,
    /// Client sessions logged in to this account right now (status page).
    sessions: Arc<AtomicUsize>,
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
            }),
            verified: SyncMutex::new(None),
            gate: Gate::default(),
            last_use: SyncMutex::new(None),
            upkeep: AtomicBool::new(false),
            last_attempt: SyncMutex::new(None),
            last_status: SyncMutex::new(None),
            sessions: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn name(&self) -> &str {
        &self.account.name
    }

    /// Counts one logged-in client session until the guard is dropped.
    pub fn session_opened(&self) -> SessionOpen {
        SessionOpen::new(self.sessions.clone())
    }

    fn forget_password(&self) {
        *self.verified.lock().unwrap() = None;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("wrong password")]
    WrongPassword,
    #[error("{0} has no local password yet: its owner sets it on the page shown at the end of the authorisation, or with `mailproxy login {0}` on this machine")]
    NoLocalPassword(String),
    #[error("{0} is not authorised yet")]
    NotAuthorised(String),
    #[error("the account's vault cannot be used: {0}")]
    Vault(String),
    /// The token store (the shared database) did not answer: temporary,
    /// and nothing a client can act on beyond trying again.
    #[error("the token store cannot be reached: {0}")]
    Store(String),
    /// Too many password checks are waiting for this account (it is being
    /// guessed at); try again later. A temporary failure, no KDF was run.
    #[error("{0} is busy with other login attempts; try again in a moment")]
    Busy(String),
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
    /// The token store (the shared database) did not answer.
    #[error("the token store cannot be reached: {0}")]
    Store(String),
    #[error("{0}")]
    Identity(#[from] identity::IdentityError),
}

impl TokenError {
    /// Worth trying again later without anyone acting: the provider or the
    /// store had trouble, or the account's grant could not be checked yet.
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::OAuth(o) => o.is_transient(),
            TokenError::Vault(_) | TokenError::Store(_) => true,
            TokenError::Identity(identity::IdentityError::Unavailable(_)) => true,
            _ => false,
        }
    }

    /// A person must act (authorise, finish a pending sign-in, fix the
    /// app registration) before this account works again.
    pub fn needs_person(&self) -> bool {
        !self.is_transient()
    }
}

pub fn describe_pending(p: &Pending) -> String {
    match &p.user_code {
        Some(code) => format!("open {} and enter the code {code}, then log in again", p.url),
        None => format!(
            "open {} in a browser on this machine and sign in, then log in again",
            p.url
        ),
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
    /// A device authorisation's URL and code: for the status page only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceShown>,
    pub access_expires: Option<u64>,
    pub last_refresh: Option<u64>,
    pub last_use: Option<u64>,
    pub scopes: Vec<String>,
    /// When `serve` refreshes the access token next (unix seconds).
    #[serde(default)]
    pub next_refresh: Option<u64>,
    /// The last refresh failure, decoded, while it is being retried.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Client sessions logged in to the account right now.
    #[serde(default)]
    pub sessions: u64,
    /// The status page can start an authorisation for it (on demand).
    #[serde(default)]
    pub can_start: bool,
}

/// How an authorisation ended, for the page the browser shows.
pub(crate) enum Finished {
    /// Stored; the account has no local password yet: show the completion page.
    NeedsPassword,
    Done(String),
    Failed(String),
}

pub struct TokenManager {
    records: Arc<dyn RecordStore>,
    /// Seals refresh tokens instead of the local password's key, when set.
    store_key: Option<VaultKey>,
    pub(crate) http: reqwest::Client,
    tls: Arc<ClientConfigs>,
    identity_timeout: RwLock<Duration>,
    accounts: RwLock<HashMap<String, Arc<AccountTokens>>>,
    /// Domain entries: their mailboxes join `accounts` when first used.
    domains: RwLock<std::collections::BTreeMap<String, Arc<Account>>>,
    /// Per-process random key for the verified-password digests.
    pepper: [u8; 32],
    store: TokenStore,
    audit: Audit,
    hook: RwLock<Option<String>>,
    /// Where people can see pending authorisations (the status page).
    status_url: RwLock<Option<String>>,
    /// Wakes the background refresher when something changed.
    pub changed: tokio::sync::Notify,
    /// Bounds the KDF runs in flight across accounts.
    kdf_slots: tokio::sync::Semaphore,
    kdf_stats: KdfStats,
    delay_cap: RwLock<Duration>,
}

pub fn now_unix() -> u64 {
    unix(SystemTime::now())
}

/// Runs blocking work off the async workers; a panic there becomes an error.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a background task failed: {e}"))
}

fn new_record(account: &str) -> AccountRecord {
    AccountRecord {
        version: 1,
        account: account.to_string(),
        ..Default::default()
    }
}

/// Why a save did not happen.
#[derive(Debug, thiserror::Error)]
enum SaveError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
    #[error(transparent)]
    Keyring(#[from] crate::keystore::KeystoreError),
    /// Another process wrote or erased the record meanwhile; it wins.
    #[error("the account was changed by another mailproxy command meanwhile")]
    Stale,
}

/// A refresh's answer on its way into the account's state.
struct Refreshed {
    tokens: Tokens,
    /// The provider's new refresh token, when it differs from the old one.
    rotated: Option<Secret>,
    next: Active,
    /// A rotated token that could not be saved.
    failure: Option<TokenError>,
}

impl Refreshed {
    fn new(before: &Active, tokens: Tokens) -> Refreshed {
        let rotated = tokens.refresh.clone().filter(|r| Some(r) != before.refresh.as_ref());
        let next = Active::new(
            rotated.clone().or(before.refresh.clone()),
            Some(Access::new(&tokens)),
            before.sealed,
        );
        Refreshed {
            tokens,
            rotated,
            next,
            failure: None,
        }
    }

    /// The new record could not be saved. After a rotation the stored token
    /// is dead: the new one is kept in memory, to be saved later, and the
    /// refresh reports the failure.
    fn save_failed(&mut self, account: &str, e: impl std::fmt::Display) {
        tracing::error!(account = %account, error = %e, "cannot save the account record after a refresh");
        if self.rotated.is_some() {
            self.next.sealed = false;
            self.failure = Some(TokenError::Vault(e.to_string()));
        }
    }
}

/// A refresh whose save lost: `revoke`, a new `login` or another command
/// changed the account meanwhile, and what is stored now (already in `slot`)
/// counts.
fn changed_meanwhile(slot: &Slot, account: String) -> TokenError {
    match &slot.state {
        TokenState::Active(_) => TokenError::Vault("the account changed meanwhile; log in again".into()),
        _ => TokenError::NeedsLogin {
            account,
            why: "it was changed by another mailproxy command meanwhile".into(),
        },
    }
}

impl TokenManager {
    /// `store` is the store actually in use (the keyring may have been found
    /// unavailable at start, see `server`).
    pub fn new(config: &Config, vault: Vault, store: TokenStore, audit: Audit) -> TokenManager {
        Self::with_tls(config, vault, store, audit, Arc::new(ClientConfigs::default()))
    }

    /// Like `new`, sharing the TLS configs the identity checks use.
    pub fn with_tls(
        config: &Config,
        vault: Vault,
        store: TokenStore,
        audit: Audit,
        tls: Arc<ClientConfigs>,
    ) -> TokenManager {
        Self::with_records(config, Arc::new(vault), store, None, audit, tls)
    }

    /// Over any record store (the file vault or the shared database), with
    /// the store key when one is configured.
    pub fn with_records(
        config: &Config,
        records: Arc<dyn RecordStore>,
        store: TokenStore,
        store_key: Option<VaultKey>,
        audit: Audit,
        tls: Arc<ClientConfigs>,
    ) -> TokenManager {
        let mut pepper = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut pepper);
        let tm = TokenManager {
            records,
            store_key,
            // The proxy address was checked at config load; were it refused
            // here anyway, say so and go direct rather than not start.
            http: oauth::http_client_for(config).unwrap_or_else(|e| {
                tracing::error!(error = %e, "provider calls go without the configured proxy");
                oauth::http_client(config.limits.provider_timeout)
            }),
            tls,
            identity_timeout: RwLock::new(config.limits.provider_timeout),
            accounts: RwLock::new(HashMap::new()),
            domains: RwLock::new(Default::default()),
            pepper,
            store,
            audit,
            hook: RwLock::new(None),
            status_url: RwLock::new(None),
            changed: tokio::sync::Notify::new(),
            delay_cap: RwLock::new(config.limits.login_failure_delay_max),
            kdf_slots: tokio::sync::Semaphore::new(gate::KDF_SLOTS),
            kdf_stats: KdfStats::default(),
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
        // Mailboxes of domain entries: kept while their entry is unchanged;
        // those with a record on disk are known from the start.
        for (k, old) in map.iter() {
            if !next.contains_key(k) && config.lookup(k).is_some_and(|a| *a == *old.account) {
                next.insert(k.clone(), old.clone());
            }
        }
        if !config.domains.is_empty() {
            for name in self.records.names_now() {
                let k = name.to_lowercase();
                if next.contains_key(&k) || config.account(&k).is_some() {
                    continue;
                }
                if let Some(a) = config::domain::mailbox(&config.domains, &k) {
                    if let Some(settings) = a.oauth().cloned() {
                        next.insert(k, Arc::new(AccountTokens::new(a, settings)));
                    }
                }
            }
        }
        for k in map.keys() {
            if !next.contains_key(k) {
                changed.push(k.clone());
            }
        }
        *map = next;
        *self.domains.write().unwrap() = config.domains.clone();
        *self.hook.write().unwrap() = config.on_reauth_needed.clone();
        *self.delay_cap.write().unwrap() = config.limits.login_failure_delay_max;
        *self.identity_timeout.write().unwrap() = config.limits.provider_timeout;
        self.changed.notify_one();
        changed
    }

    pub fn set_status_url(&self, url: Option<String>) {
        *self.status_url.write().unwrap() = url;
    }

    pub fn status_url(&self) -> Option<String> {
        self.status_url.read().unwrap().clone()
    }

    /// The tokens of `login`'s OAuth account. A mailbox of a domain entry
    /// joins on first use, but only once its owner set it up (it has a
    /// record on disk): no client can make entries appear.
    pub fn get(&self, login: &str) -> Option<Arc<AccountTokens>> {
        let key = login.to_lowercase();
        if let Some(t) = self.accounts.read().unwrap().get(&key) {
            return Some(t.clone());
        }
        let account = config::domain::mailbox(&self.domains.read().unwrap(), &key)?;
        let settings = account.oauth()?.clone();
        if !self.records.has_record_now(&account.name) {
            return None;
        }
        let mut map = self.accounts.write().unwrap();
        let t = map
            .entry(key)
            .or_insert_with(|| Arc::new(AccountTokens::new(account, settings)))
            .clone();
        drop(map);
        self.changed.notify_one();
        Some(t)
    }

    pub fn all(&self) -> Vec<Arc<AccountTokens>> {
        let mut v: Vec<_> = self.accounts.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.account.name.cmp(&b.account.name));
        v
    }

    /// KDF counters for the status page.
    pub fn kdf_status(&self) -> KdfStatus {
        self.kdf_stats.snapshot()
    }

    fn digest(&self, acct: &AccountTokens, password: &Secret) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.pepper);
        h.update(acct.account.name.as_bytes());
        h.update([0]);
        h.update(password.expose().as_bytes());
        h.finalize().into()
    }

    fn cached(&self, acct: &AccountTokens, digest: &[u8; 32]) -> bool {
        acct.verified
            .lock()
            .unwrap()
            .is_some_and(|d| bool::from(d.ct_eq(digest)))
    }

    /// The password's digest matches the one last verified and the tokens
    /// are open: nothing more to check. A token kept only in memory (its
    /// save failed before) is saved now.
    async fn unlocked_by(&self, acct: &AccountTokens, slot: &mut Slot, digest: &[u8; 32]) -> bool {
        if !(self.cached(acct, digest) && matches!(slot.state, TokenState::Active(_))) {
            return false;
        }
        let unsealed = match &slot.state {
            TokenState::Active(a) if !a.sealed => Some(a.clone()),
            _ => None,
        };
        if let Some(a) = unsealed {
            let next = self.seal_active(acct, slot, a).await;
            slot.state = TokenState::Active(next);
        }
        *acct.last_use.lock().unwrap() = Some(now_unix());
        true
    }

    fn keyring(&self) -> bool {
        self.store == TokenStore::Keyring
    }

    /// Runs a password KDF in one of the global slots, counted.
    async fn kdf<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        let _slot = self
            .kdf_slots
            .acquire()
            .await
            .map_err(|_| "the KDF slots are closed".to_string())?;
        let _running = self.kdf_stats.start();
        blocking(f).await
    }

    /// A verifier and sealing key for a new local password, computed in a
    /// KDF slot like every password check.
    async fn new_password(&self, password: &Secret) -> Result<(crypto::PasswordVerifier, VaultKey), TokenError> {
        let pw = password.clone();
        self.kdf(move || crypto::new_password(pw.expose()))
            .await
            .map_err(TokenError::Vault)
    }

    /// Re-reads the record when the file changed under us, and computes the
    /// state it implies. Slot locked.
    async fn sync(&self, acct: &AccountTokens, slot: &mut Slot) -> Result<(), AuthError> {
        let name = &acct.account.name;
        let vault = |e: StoreError| match e {
            StoreError::Database(_) => AuthError::Store(e.to_string()),
            _ => AuthError::Vault(e.to_string()),
        };
        let stamp = self.records.version(name).await.map_err(vault)?;
        if slot.loaded && stamp == slot.stamp {
            return Ok(());
        }
        let record = self.records.load(name).await.map_err(vault)?;
        self.adopt(acct, slot, record, stamp).await
    }

    /// Takes `record` as what is stored now and computes the state it
    /// implies. Slot locked.
    async fn adopt(
        &self,
        acct: &AccountTokens,
        slot: &mut Slot,
        record: Option<AccountRecord>,
        stamp: Option<Version>,
    ) -> Result<(), AuthError> {
        let had_record = slot.record.is_some();
        slot.loaded = true;
        slot.stamp = stamp;
        let password_changed =
            slot.record.as_ref().and_then(|r| r.password.as_ref()) != record.as_ref().and_then(|r| r.password.as_ref());
        if password_changed {
            slot.key = None;
            acct.forget_password();
        }
        // Keep a cached access token when the refresh token did not change.
        let old_access = |refresh: &Option<Secret>| match &slot.state {
            TokenState::Active(a) if a.refresh == *refresh => a.access.clone(),
            _ => None,
        };
        // An authorisation in progress or a grant waiting for its password
        // has nothing on disk yet: keep it unless the record changed.
        let in_progress = matches!(&slot.state, TokenState::Authorizing(_))
            || matches!(&slot.state, TokenState::Active(a) if !a.sealed);
        let next = match &record {
            None if had_record => {
                slot.key = None;
                acct.forget_password();
                self.cancel_flight(&slot.state);
                TokenState::NeedsLogin {
                    why: "it was revoked or erased".into(),
                }
            }
            None if in_progress => return Ok(()),
            None => TokenState::NeedsLogin {
                why: "it has not been authorised yet".into(),
            },
            Some(r) if r.token_store == Some(StoreKind::StoreKey) => {
                match (&r.refresh_token, &self.store_key) {
                    (Some(sealed), Some(k)) => match crypto::open(k, &acct.account.name, sealed) {
                        Ok(t) => {
                            let refresh = Some(t);
                            TokenState::Active(Active::new(refresh.clone(), old_access(&refresh), true))
                        }
                        Err(e) => TokenState::NeedsLogin {
                            why: format!("its refresh token cannot be opened with the store key ({e})"),
                        },
                    },
                    (Some(_), None) => TokenState::NeedsLogin {
                        why: "its refresh token is sealed under a store key this instance does not have (set store_key_file or MAILPROXY_STORE_KEY)".into(),
                    },
                    (None, _) => TokenState::NeedsLogin {
                        why: format!("it has no refresh token; run `mailproxy login {}`", acct.account.name),
                    },
                }
            }
            Some(r) if r.token_store == Some(StoreKind::Keyring) => {
                let name = acct.account.name.clone();
                let got = blocking(move || keystore::get(&name)).await.map_err(AuthError::Vault)?;
                tracing::debug!(account = %acct.account.name, found = ?got.as_ref().map(std::option::Option::is_some), "refresh token looked up in the OS keyring");
                match got {
                    Ok(Some(t)) => {
                        let refresh = Some(t);
                        TokenState::Active(Active::new(refresh.clone(), old_access(&refresh), true))
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
                        TokenState::Active(Active::new(refresh.clone(), old_access(&refresh), true))
                    }
                    Err(_) => {
                        slot.key = None;
                        acct.forget_password();
                        TokenState::Locked
                    }
                },
                (Some(_), None) => TokenState::Locked,
                // Client credentials, service accounts: usable once `mailproxy login` set the password.
                (None, _)
                    if (acct.settings.flow.app_only() || acct.account.token_from.is_some()) && r.password.is_some() =>
                {
                    TokenState::Active(Active::new(None, old_access(&None), true))
                }
                (None, _) if in_progress && !had_record => return Ok(()),
                (None, _) => TokenState::NeedsLogin {
                    why: format!(
                        "it has not been authorised yet; run `mailproxy login {}`",
                        acct.account.name
                    ),
                },
            },
        };
        let next = self.shared_access(acct, slot, record.as_ref(), next);
        slot.record = record;
        slot.state = next;
        Ok(())
    }

    fn cancel_flight(&self, state: &TokenState) {
        if let TokenState::Authorizing(f) = state {
            if let Some(b) = &f.browser {
                b.cancel.cancel();
            }
        }
    }

    /// Checks the local password of an OAuth account and unlocks its tokens.
    /// A wrong password never gets further than this function. `lane` says
    /// whose attempt it is (see [`gate`]): only the owner's lane may use the
    /// verified-password cache before taking a turn, since for anyone else
    /// an early answer would be a guess that skipped the queue.
    pub async fn authenticate(&self, acct: &AccountTokens, password: &Secret, lane: Lane) -> Result<(), AuthError> {
        let name = acct.account.name.clone();
        // After failures, every attempt waits first (no lock, no CPU).
        acct.gate.wait_delay(lane).await;
        let digest = self.digest(acct, password);
        let verifier = {
            let mut slot = acct.slot.lock().await;
            self.sync(acct, &mut slot).await?;
            if lane == Lane::Owner && self.unlocked_by(acct, &mut slot, &digest).await {
                return Ok(());
            }
            match slot.record.as_ref().and_then(|r| r.password.clone()) {
                Some(v) => v,
                // No client can set a password: only the owner can.
                None => {
                    return Err(match slot.state {
                        TokenState::Active(_) => AuthError::NoLocalPassword(name),
                        _ => AuthError::NotAuthorised(name),
                    })
                }
            }
        };
        // Parameters mailproxy would not write are refused before any KDF
        // slot or run: an edited record must not cost seconds or gigabytes.
        crypto::check_params(&name, &verifier).map_err(|e| AuthError::Vault(e.to_string()))?;

        let Some(_ticket) = acct.gate.admit(&self.kdf_stats, lane) else {
            tracing::info!(account = %name, "too many password checks waiting; refused without a check");
            return Err(AuthError::Busy(name));
        };
        let turn = acct.gate.turn(lane).await;
        // Another login may have verified this same password while we waited.
        {
            let mut slot = acct.slot.lock().await;
            if self.unlocked_by(acct, &mut slot, &digest).await {
                acct.gate.succeeded(lane);
                return Ok(());
            }
        }
        let pw = password.clone();
        let checked = self
            .kdf(move || crypto::check_password(pw.expose(), &verifier))
            .await
            .map_err(AuthError::Vault)?;
        let key = match checked {
            Ok(Some(key)) => key,
            Ok(None) => {
                let delay = acct.gate.failed(lane, *self.delay_cap.read().unwrap());
                drop(turn);
                // Slow down this client without holding up anyone else.
                tokio::time::sleep(delay).await;
                return Err(AuthError::WrongPassword);
            }
            Err(e) => return Err(AuthError::Vault(e.to_string())),
        };
        acct.gate.succeeded(lane);
        // Unlock before giving up the turn, so the next waiter with the same
        // password finds it verified instead of running the KDF again.
        let r = self.unlock(acct, key, digest).await;
        drop(turn);
        r
    }

    /// The owner's password was right: open (or seal) the tokens. Any number
    /// of concurrent unlocks converge on one Active state.
    async fn unlock(&self, acct: &AccountTokens, key: VaultKey, digest: [u8; 32]) -> Result<(), AuthError> {
        let name = acct.account.name.clone();
        let mut slot = acct.slot.lock().await;
        self.sync(acct, &mut slot).await?;
        slot.key = Some(key.clone());
        let unsealed = match &slot.state {
            TokenState::Active(a) if !a.sealed => Some(a.clone()),
            _ => None,
        };
        let next = match (&slot.state, unsealed) {
            (TokenState::Locked, _) => {
                let sealed = slot.record.as_ref().and_then(|r| r.refresh_token.clone());
                match sealed.map(|s| crypto::open(&key, &name, &s)) {
                    Some(Ok(refresh)) => {
                        let next = TokenState::Active(Active::new(Some(refresh), None, true));
                        Some(self.shared_access(acct, &slot, slot.record.as_ref(), next))
                    }
                    Some(Err(e)) => return Err(AuthError::Vault(e.to_string())),
                    None => return Err(AuthError::NotAuthorised(name)),
                }
            }
            (_, Some(a)) => Some(TokenState::Active(self.seal_active(acct, &mut slot, a).await)),
            _ => None,
        };
        if let Some(next) = next {
            slot.state = next;
        }
        let usable = matches!(slot.state, TokenState::Active(_));
        drop(slot);
        if !usable {
            return Err(AuthError::NotAuthorised(name));
        }
        *acct.verified.lock().unwrap() = Some(digest);
        *acct.last_use.lock().unwrap() = Some(now_unix());
        self.changed.notify_one();
        Ok(())
    }

    /// Tries to save an unsealed token (a grant or a rotated token whose
    /// save failed before); returns the state with `sealed` as it ended.
    async fn seal_active(&self, acct: &AccountTokens, slot: &mut Slot, a: Active) -> Active {
        let Some(refresh) = a.refresh.clone() else {
            return Active { sealed: true, ..a };
        };
        let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&acct.account.name));
        rec.last_refresh = Some(now_unix());
        match self.save(acct, slot, rec, Some(&refresh)).await {
            Ok(()) => Active { sealed: true, ..a },
            Err(e) => {
                tracing::error!(account = %acct.account.name, error = %e, "cannot save the refresh token; it is kept in memory and saved later");
                a
            }
        }
    }

    /// Saves `rec` (with `refresh` in the keyring or sealed under the slot's
    /// key), unless the record on disk is newer than the one `slot` holds.
    /// Slot locked. On `Stale` the slot is re-read from disk.
    async fn save(
        &self,
        acct: &AccountTokens,
        slot: &mut Slot,
        mut rec: AccountRecord,
        refresh: Option<&Secret>,
    ) -> Result<(), SaveError> {
        let name = acct.account.name.clone();
        let mut keyring_token = None;
        if let Some(refresh) = refresh {
            if self.keyring() {
                rec.refresh_token = None;
                rec.token_store = Some(StoreKind::Keyring);
                keyring_token = Some(refresh.clone());
            } else if let Some(key) = &self.store_key {
                rec.refresh_token = Some(crypto::seal(key, &name, refresh.expose()));
                rec.token_store = Some(StoreKind::StoreKey);
            } else {
                let Some(key) = &slot.key else {
                    return Err(SaveError::Other("no key to seal the refresh token yet".into()));
                };
                rec.refresh_token = Some(crypto::seal(key, &name, refresh.expose()));
                rec.token_store = None;
            }
        }
        let base = slot.record.as_ref().map(|r| r.generation);
        let before: crate::store::Before = Box::new(move || match &keyring_token {
            Some(t) => keystore::set(&rec_name(&name), t).map_err(|e| e.to_string()),
            None => Ok(()),
        });
        let written = self.records.store_if(&mut rec, base, before).await?;
        let stamp = self.records.version(&acct.account.name).await.ok().flatten();
        match written {
            Written::Stored => {
                slot.record = Some(rec);
                slot.stamp = stamp;
                slot.loaded = true;
                Ok(())
            }
            Written::Stale { on_disk } => {
                tracing::warn!(account = %acct.account.name, based_on = ?base, on_disk = ?on_disk, "dropped a write based on an older record: another mailproxy command changed the account meanwhile");
                slot.loaded = false;
                let _ = self.sync(acct, slot).await;
                Err(SaveError::Stale)
            }
        }
    }

    /// The account whose grant `acct` uses: itself, or its `token_from`.
    pub fn grant_of(&self, acct: &Arc<AccountTokens>) -> Result<Arc<AccountTokens>, TokenError> {
        match &acct.account.token_from {
            None => Ok(acct.clone()),
            Some(owner) => self.get(owner).ok_or_else(|| TokenError::NeedsLogin {
                account: owner.clone(),
                why: format!("{} uses its grant, but it is not in the config", acct.account.name),
            }),
        }
    }

    /// An access token with enough life left, refreshing first when needed
    /// (one refresh per account at a time). A `token_from` account gets its
    /// grant owner's token.
    pub async fn access_token(&self, acct: &AccountTokens) -> Result<Secret, TokenError> {
        if let Some(owner) = &acct.account.token_from {
            let Some(grant) = self.get(owner) else {
                return Err(TokenError::NeedsLogin {
                    account: owner.clone(),
                    why: format!("{} uses its grant, but it is not in the config", acct.account.name),
                });
            };
            return self.own_access_token(&grant).await;
        }
        self.own_access_token(acct).await
    }

    async fn own_access_token(&self, acct: &AccountTokens) -> Result<Secret, TokenError> {
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        if let Some(token) = fresh_token(&slot.state, &acct.account.name)? {
            return Ok(token);
        }
        self.refresh_locked(acct, &mut slot).await
    }

    /// Refreshes now. Slot locked; state is Active.
    async fn refresh_locked(&self, acct: &AccountTokens, slot: &mut Slot) -> Result<Secret, TokenError> {
        if self.records.shared() {
            return self.refresh_shared(acct, slot).await;
        }
        let name = acct.account.name.clone();
        let TokenState::Active(before) = &slot.state else {
            return Err(TokenError::Locked(name));
        };
        let before = before.clone();
        let t = match self.ask_provider(acct, slot, &before).await {
            Ok(t) => t,
            Err(e) => return Err(self.refresh_failed(acct, slot, &before, e)),
        };
        // Save a rotated refresh token before anything uses the new access token.
        let mut done = Refreshed::new(&before, t);
        if before.sealed && slot.record.is_some() {
            let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
            rec.last_refresh = Some(now_unix());
            if let Some(s) = &done.tokens.scopes {
                rec.scopes = s.clone();
            }
            match self.save(acct, slot, rec, done.rotated.as_ref()).await {
                Ok(()) => {}
                Err(SaveError::Stale) => return Err(changed_meanwhile(slot, name)),
                Err(e) => done.save_failed(&name, e),
            }
        }
        self.keep_refreshed(acct, slot, done)
    }

    /// New tokens from the provider, for either store: a refresh with the
    /// refresh token, or an application grant (client credentials, service
    /// account) for accounts without one. Errors carry the grant's age,
    /// which explains refresh tokens that die after a fixed time.
    async fn ask_provider(&self, acct: &AccountTokens, slot: &Slot, before: &Active) -> Result<Tokens, OAuthError> {
        let name = &acct.account.name;
        let result = match &before.refresh {
            Some(r) => oauth::refresh(&self.http, name, &acct.settings, r).await,
            None => flows::app_token(&self.http, name, &acct.account.username, &acct.settings).await,
        };
        let authorized_at = slot.record.as_ref().and_then(|r| r.authorized_at);
        result.map_err(|e| e.with_grant_age(name, authorized_at))
    }

    /// A refresh the provider refused or could not answer, for either
    /// store: logged, counted, audited, and the account marked as needing a
    /// login or as failed for now. Slot locked.
    fn refresh_failed(&self, acct: &AccountTokens, slot: &mut Slot, before: &Active, e: OAuthError) -> TokenError {
        let name = &acct.account.name;
        tracing::warn!(account = %name, error = %e, "token refresh failed");
        let code = match &e {
            OAuthError::Provider(x) => x.code.clone(),
            _ => "unavailable".into(),
        };
        crate::metrics::refresh(&acct.settings, if e.needs_login() { "needs_login" } else { "failed" });
        self.audit
            .record(Entry::new(name, "refresh_failed", format!("{code}: {e}")));
        if e.needs_login() {
            self.needs_login(acct, slot, e.to_string());
        } else {
            slot.state = TokenState::Active(before.failed(SystemTime::now(), e.to_string()));
        }
        e.into()
    }

    /// The last step of a refresh, saved or not: the new tokens become the
    /// account's state, and a failed save of a rotated token is the answer.
    fn keep_refreshed(&self, acct: &AccountTokens, slot: &mut Slot, done: Refreshed) -> Result<Secret, TokenError> {
        let name = &acct.account.name;
        crate::metrics::refresh(&acct.settings, "ok");
        let expires_in = done
            .tokens
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs();
        tracing::info!(account = %name, expires_in_s = expires_in, rotated = done.rotated.is_some(), "access token refreshed");
        slot.state = TokenState::Active(done.next);
        // The background refresher plans its next wake-up from this token.
        self.changed.notify_one();
        match done.failure {
            Some(e) => Err(e),
            None => Ok(done.tokens.access),
        }
    }

    fn needs_login(&self, acct: &AccountTokens, slot: &mut Slot, why: String) {
        self.cancel_flight(&slot.state);
        slot.state = TokenState::NeedsLogin { why: why.clone() };
        acct.forget_password();
        self.audit
            .record(Entry::new(&acct.account.name, "needs_login", why.clone()));
        if let Some(cmd) = self.hook.read().unwrap().clone() {
            run_hook(&cmd, &acct.account.name, &why);
        }
    }

    /// The upstream rejected `token`: forget it so the next call refreshes.
    pub async fn reject(&self, acct: &AccountTokens, token: &Secret) {
        let grant = match &acct.account.token_from {
            Some(owner) => match self.get(owner) {
                Some(g) => g,
                None => return,
            },
            None => return self.reject_own(acct, token).await,
        };
        self.reject_own(&grant, token).await;
    }

    async fn reject_own(&self, acct: &AccountTokens, token: &Secret) {
        let mut slot = acct.slot.lock().await;
        if let TokenState::Active(a) = &slot.state {
            if a.access.as_ref().is_some_and(|x| x.token == *token) {
                let next = Active {
                    access: None,
                    ..a.clone()
                };
                slot.state = TokenState::Active(next);
            }
        }
    }

    /// The local start address of an account's browser authorisation.
    fn start_address(&self, account: &str, flow: &BrowserFlow) -> String {
        match self.status_url() {
            Some(base) => format!("{}{}", base.trim_end_matches('/'), authorize::start_path(account)),
            None => flow.start_url(),
        }
    }

    /// A visit to the status page's start address: where to send the
    /// browser (the redirect listener's own start address, which binds the
    /// browser to the sign-in), if the account has a browser authorisation
    /// in progress.
    pub async fn start_redirect(&self, account: &str) -> Option<String> {
        let acct = self.get(account)?;
        let flow = {
            let slot = acct.slot.lock().await;
            match &slot.state {
                TokenState::Authorizing(f) => f.browser.clone()?,
                _ => return None,
            }
        };
        Some(flow.start_url())
    }

    /// Starts an authorisation for an account without a usable token (never
    /// two at once). Returns what the person must do, or `None` when there
    /// is nothing to start (the account is usable or locked).
    pub async fn start_authorization(
        self: &Arc<Self>,
        acct: &Arc<AccountTokens>,
    ) -> Result<Option<Pending>, TokenError> {
        let name = acct.account.name.clone();
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        match &slot.state {
            TokenState::Authorizing(f) => return Ok(Some(f.pending.clone())),
            TokenState::NeedsLogin { .. } => {}
            _ => return Ok(None),
        }
        let by_owner = |why: &str| TokenError::NeedsLogin {
            account: name.clone(),
            why: format!("{why}; its owner runs `mailproxy login {name}`"),
        };
        if let Some(owner) = &acct.account.token_from {
            return Err(by_owner(&format!("it uses the grant of {owner}")));
        }
        if !acct.settings.on_demand {
            return Err(by_owner("on-demand authorisation is off for it"));
        }
        let has_password = slot.record.as_ref().is_some_and(|r| r.password.is_some());
        let s = &acct.settings;
        let flight = match s.flow {
            Flow::ClientCredentials | Flow::ServiceAccount => {
                return Err(by_owner("an app-only account is set up by its owner"))
            }
            Flow::Device if !has_password => return Err(by_owner("it has no local password yet")),
            Flow::Device => {
                let d = flows::device_start(&self.http, &name, s).await?;
                let shown = DeviceShown {
                    verification_uri: d.verification_uri.clone(),
                    user_code: d.user_code.clone(),
                };
                let url = self.status_url().unwrap_or_else(|| d.verification_uri.clone());
                let flight = Flight::new(Pending { url, user_code: None }, Some(shown.clone()), None);
                tracing::warn!(account = %name, verification_uri = %shown.verification_uri, user_code = %shown.user_code, "authorisation needed: open the verification address and enter the code");
                let (me, a, id) = (self.clone(), acct.clone(), flight.id);
                tokio::spawn(async move {
                    let r = flows::device_poll(&me.http, a.name(), &a.settings, &d, |i| {
                        tracing::info!(interval_s = i.as_secs(), "the provider asked to poll more slowly");
                    })
                    .await;
                    me.finish_authorization(&a, id, r).await;
                });
                flight
            }
            Flow::AuthorizationCode => {
                let redirect = Redirect::bind(s)
                    .await
                    .map_err(|e| OAuthError::Config(format!("cannot listen for the redirect: {e}")))?;
                let Redirect::Loopback { listener, uri, path } = redirect else {
                    return Err(by_owner("its redirect_uri is not a loopback address"));
                };
                let flow = Arc::new(BrowserFlow::new(&name, s, &uri, &path, listener.port()));
                let url = self.start_address(&name, &flow);
                let flight = Flight::new(Pending { url, user_code: None }, None, Some(flow.clone()));
                tracing::warn!(account = %name, start = %flight.pending.url, "authorisation needed: {}", describe_pending(&flight.pending));
                tokio::spawn(authorize::serve(listener, flow, self.clone(), acct.clone(), flight.id));
                flight
            }
        };
        self.audit
            .record(Entry::new(&name, "authorization_started", format!("{} flow", s.flow.name())).scopes(&s.scopes));
        let pending = flight.pending.clone();
        slot.state = TokenState::Authorizing(flight);
        self.changed.notify_one();
        Ok(Some(pending))
    }

    /// An on-demand authorisation's result: checked, then stored (or kept
    /// in memory until the owner's password can seal it).
    pub(crate) async fn finish_authorization(
        &self,
        acct: &AccountTokens,
        flight_id: u64,
        r: Result<Tokens, OAuthError>,
    ) -> Finished {
        let name = acct.account.name.clone();
        let checked = match r {
            Ok(t) => {
                let timeout = *self.identity_timeout.read().unwrap();
                match identity::verify(&acct.account, &t, &self.tls, timeout).await {
                    Ok(()) if t.refresh.is_none() => Err("the provider returned no refresh token".to_string()),
                    Ok(()) => Ok(t),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        let mut slot = acct.slot.lock().await;
        if !matches!(&slot.state, TokenState::Authorizing(f) if f.id == flight_id) {
            return Finished::Failed("this authorisation was superseded".into());
            // revoked or re-authorised meanwhile
        }
        let t = match checked {
            Ok(t) => t,
            Err(why) => {
                tracing::warn!(account = %name, error = %why, "authorisation refused");
                self.audit
                    .record(Entry::new(&name, "consent", format!("refused: {why}")));
                self.needs_login(acct, &mut slot, why.clone());
                self.changed.notify_one();
                return Finished::Failed(why);
            }
        };
        let scopes = t.scopes.clone().unwrap_or_else(|| acct.settings.scopes.clone());
        self.audit
            .record(Entry::new(&name, "consent", "authorised").scopes(&scopes));
        let has_password = slot.record.as_ref().is_some_and(|r| r.password.is_some());
        let can_seal = has_password && (self.keyring() || slot.key.is_some());
        let active = Active::new(t.refresh.clone(), Some(Access::new(&t)), false);
        let (next, outcome) = if can_seal {
            let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
            rec.scopes = scopes;
            rec.authorized_at = Some(now_unix());
            rec.last_refresh = Some(now_unix());
            match self.save(acct, &mut slot, rec, t.refresh.as_ref()).await {
                Ok(()) => (
                    Active { sealed: true, ..active },
                    Finished::Done(format!("{name} is authorised.")),
                ),
                Err(SaveError::Stale) => return Finished::Failed("the account was changed meanwhile".into()),
                Err(e) => {
                    tracing::error!(account = %name, error = %e, "cannot save the new refresh token; it is kept in memory");
                    (active, Finished::Done(format!("{name} is authorised.")))
                }
            }
        } else if has_password {
            tracing::info!(account = %name, "authorised; the owner's next login seals the refresh token");
            (
                active,
                Finished::Done(format!(
                    "{name} is authorised; log in with its local password to finish."
                )),
            )
        } else {
            tracing::info!(account = %name, "authorised; waiting for the owner to set the local password");
            (active, Finished::NeedsPassword)
        };
        slot.state = TokenState::Active(next);
        self.changed.notify_one();
        outcome
    }

    /// The browser authorisation ran out of time.
    pub(crate) async fn authorization_timed_out(&self, acct: &AccountTokens, flight_id: u64) {
        let mut slot = acct.slot.lock().await;
        if matches!(&slot.state, TokenState::Authorizing(f) if f.id == flight_id) {
            self.needs_login(acct, &mut slot, "the authorisation was not completed in time".into());
        }
    }

    /// The completion page: the owner sets the first local password of an
    /// account just authorised on demand; the token is sealed under it.
    pub(crate) async fn set_password_after_grant(
        &self,
        acct: &AccountTokens,
        password: &Secret,
    ) -> Result<(), TokenError> {
        let name = acct.account.name.clone();
        let (verifier, key) = self.new_password(password).await?;
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        let active = match &slot.state {
            TokenState::Active(a) if slot.record.as_ref().is_none_or(|r| r.password.is_none()) => a.clone(),
            _ => {
                return Err(TokenError::Vault(
                    "the account changed meanwhile; nothing was set".into(),
                ))
            }
        };
        let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
        rec.password = Some(verifier);
        rec.scopes = acct.settings.scopes.clone();
        rec.authorized_at = Some(now_unix());
        rec.last_refresh = Some(now_unix());
        let previous_key = slot.key.replace(key);
        match self.save(acct, &mut slot, rec, active.refresh.as_ref()).await {
            Ok(()) => {}
            Err(e) => {
                slot.key = previous_key;
                return Err(TokenError::Vault(e.to_string()));
            }
        }
        slot.state = TokenState::Active(Active { sealed: true, ..active });
        drop(slot);
        *acct.verified.lock().unwrap() = Some(self.digest(acct, password));
        self.audit.record(Entry::new(
            &name,
            "password_set",
            "set by the owner on the completion page",
        ));
        self.changed.notify_one();
        Ok(())
    }

    /// Background upkeep of one account: refresh before expiry (and at least
    /// every 30 days), with backoff after transient failures. Returns when to
    /// look again. Never panics and never waits for a refresh: a due refresh
    /// runs in a task of its own, so a slow or failing (or panicking) account
    /// never holds up the others.
    pub async fn maintain(self: &Arc<Self>, acct: &Arc<AccountTokens>) -> SystemTime {
        let now = SystemTime::now();
        let soon = later(now, Duration::from_secs(1));
        if acct.upkeep.load(Ordering::SeqCst) {
            return soon;
        }
        let (me, a) = (self.clone(), acct.clone());
        let due = tokio::spawn(async move { me.upkeep_due(&a).await });
        let due = match tokio::time::timeout(Duration::from_secs(2), due).await {
            Ok(Ok(due)) => due,
            Ok(Err(e)) => {
                tracing::error!(account = %acct.account.name, error = %e, "background upkeep failed");
                return later(now, Duration::from_secs(60));
            }
            Err(_) => return soon, // the account is busy (a refresh at login)
        };
        let Some(due) = due else {
            return later(now, Duration::from_secs(60));
        };
        let floor = acct
            .last_attempt
            .lock()
            .unwrap()
            .map_or(now, |t| later(t, MIN_REFRESH_INTERVAL));
        let due = due.max(floor);
        if due > SystemTime::now() {
            return due;
        }
        if acct.upkeep.swap(true, Ordering::SeqCst) {
            return soon;
        }
        *acct.last_attempt.lock().unwrap() = Some(now);
        let (me, a) = (self.clone(), acct.clone());
        tokio::spawn(async move {
            let (me2, a2) = (me.clone(), a.clone());
            let work = tokio::spawn(async move {
                let mut slot = a2.slot.lock().await;
                // Still due now that the slot is ours? A login may have
                // refreshed meanwhile: one refresh per need, never two.
                let due = match &slot.state {
                    TokenState::Active(x) => x.access.as_ref().is_none_or(|t| t.renew_at() <= SystemTime::now()),
                    _ => false,
                };
                if due {
                    let r = me2.refresh_locked(&a2, &mut slot).await;
                    if let Err(e) = r {
                        tracing::info!(account = %a2.account.name, error = %e, "background refresh failed");
                    }
                }
            });
            if let Err(e) = work.await {
                tracing::error!(account = %a.account.name, error = %e, "background refresh failed unexpectedly");
            }
            a.upkeep.store(false, Ordering::SeqCst);
            me.changed.notify_one();
        });
        later(now, MIN_REFRESH_INTERVAL)
    }

    /// When the account's next background refresh is due; `None`: nothing to do.
    async fn upkeep_due(&self, acct: &AccountTokens) -> Option<SystemTime> {
        if acct.account.token_from.is_some() {
            return None; // its grant's account is kept up
        }
        let mut slot = acct.slot.lock().await;
        self.sync(acct, &mut slot).await.ok()?;
        planned_refresh(&slot)
    }

    pub async fn status(&self, acct: &AccountTokens) -> AccountStatus {
        let mut slot = match tokio::time::timeout(Duration::from_millis(200), acct.slot.lock()).await {
            Ok(s) => s,
            Err(_) => {
                // Busy with a slow refresh: the last known status will do.
                if let Some(s) = acct.last_status.lock().unwrap().clone() {
                    return s;
                }
                acct.slot.lock().await
            }
        };
        let _ = self.sync(acct, &mut slot).await;
        let has_password = slot.record.as_ref().is_some_and(|r| r.password.is_some());
        let mut device = None;
        let (state, detail, pending, expires) = match &slot.state {
            TokenState::NeedsLogin { why } => ("needs login", Some(why.clone()), None, None),
            TokenState::Authorizing(f) => {
                device = f.device.clone();
                (
                    "authorizing",
                    Some(describe_pending(&f.pending)),
                    Some(f.pending.clone()),
                    None,
                )
            }
            TokenState::Locked => (
                "locked",
                Some("waiting for the owner's local password".to_string()),
                None,
                None,
            ),
            TokenState::Active(a) => {
                let exp = a.access.as_ref().map(|x| unix(x.expires_at));
                match &a.last_error {
                    _ if !has_password => (
                        "needs login",
                        Some(format!(
                            "authorised; its owner sets the local password on the page shown at the end of the authorisation, or runs `mailproxy login {}`",
                            acct.account.name
                        )),
                        None,
                        exp,
                    ),
                    Some(e) if a.retry_at.is_some() => ("error", Some(e.clone()), None, exp),
                    _ if !a.sealed => ("ok", Some("the refresh token is not saved yet".into()), None, exp),
                    _ => ("ok", None, None, exp),
                }
            }
        };
        let st = AccountStatus {
            account: acct.account.name.clone(),
            provider: acct.settings.provider.name().into(),
            flow: acct.settings.flow.name().into(),
            state: state.into(),
            detail,
            pending,
            device,
            access_expires: expires,
            last_refresh: slot.record.as_ref().and_then(|r| r.last_refresh),
            last_use: *acct.last_use.lock().unwrap(),
            scopes: slot.record.as_ref().map(|r| r.scopes.clone()).unwrap_or_default(),
            next_refresh: planned_refresh(&slot).filter(|_| has_password).map(unix),
            last_error: match &slot.state {
                TokenState::Active(a) => a.last_error.clone(),
                _ => None,
            },
            sessions: acct.sessions.load(Ordering::Relaxed) as u64,
            can_start: matches!(slot.state, TokenState::NeedsLogin { .. })
                && acct.settings.on_demand
                && match acct.settings.flow {
                    Flow::AuthorizationCode => true,
                    Flow::Device => has_password,
                    Flow::ClientCredentials | Flow::ServiceAccount => false,
                },
        };
        *acct.last_status.lock().unwrap() = Some(st.clone());
        st
    }
}

/// When an active account's access token is refreshed next in the
/// background: before it expires, at least every 30 days, never before a
/// backoff ends. `None` when the account is not active.
fn planned_refresh(slot: &Slot) -> Option<SystemTime> {
    let TokenState::Active(a) = &slot.state else {
        return None;
    };
    let due = match &a.access {
        Some(x) => {
            let keepalive = slot
                .record
                .as_ref()
                .and_then(|r| r.last_refresh)
                .map(state::keepalive_due);
            keepalive.map_or(x.renew_at(), |k| k.min(x.renew_at()))
        }
        None => SystemTime::now(),
    };
    Some(a.retry_at.map_or(due, |r| r.max(due)))
}

/// The keyring entry's name (the account name, as the keystore expects it).
fn rec_name(account: &str) -> String {
    account.to_string()
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

#[cfg(test)]
mod tests;

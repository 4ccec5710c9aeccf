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
//!
//! One file per activity: this one holds the types, the lookup of accounts
//! and the re-reading of their records; `unlock` checks local passwords;
//! `save` writes records; `refresh` asks the provider for a new access
//! token; `handout` gives one to the owner's own clients; `on_demand`
//! and [`authorize`] run an authorisation a client's login started;
//! `upkeep` is the background pass; [`live`] and
//! [`offline`] serve the commands with and without a running `serve`;
//! `shared` is the PostgreSQL store's share of an account's access token.

pub mod authorize;
mod check;
pub mod gate;
pub mod grant;
mod handout;
pub mod identity;
pub mod live;
pub mod offline;
mod on_demand;
mod refresh;
pub mod resource;
mod save;
pub mod sessions;
mod shared;
pub(crate) mod state;
mod unlock;
mod upkeep;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, RwLock};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::{Audit, Entry};
use crate::config::{self, Account, Config, Flow, OAuthSettings, TokenStore};
use crate::crypto::{self, VaultKey};
use crate::keystore;
use crate::oauth::{self, flows, login::Redirect, OAuthError, Tokens};
use crate::secret::Secret;
use crate::store::{RecordStore, StoreError, Version};
use crate::sync;
use crate::tls::ClientConfigs;
use crate::vault::{AccountRecord, StoreKind, Vault, Written};
use authorize::{BrowserFlow, DeviceShown, Flight};
pub use check::CheckOutcome;
pub use gate::KdfStatus;
pub use gate::Lane;
use gate::{Gate, KdfStats};
pub use handout::Handed;
pub use offline::store_authorization;
use refresh::{fresh_token, Refreshed};
pub use resource::Resource;
use save::{blocking, new_record, BackgroundError, SaveError};
pub use sessions::{ProtocolSessions, SessionSlot, SessionSlots};
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
        }
    }

    pub fn name(&self) -> &str {
        &self.account.name
    }

    fn forget_password(&self) {
        *sync::lock(&self.verified) = None;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("wrong password")]
    WrongPassword,
    #[error("{0} has no local password yet: its owner sets it on the page shown at the end of the authorisation, or with `mailproxy login {0}` on this machine")]
    NoLocalPassword(String),
    #[error("{0} is not authorised yet")]
    NotAuthorized(String),
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
    /// When the Graph token expires (accounts that send through Graph).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_expires: Option<u64>,
    /// When `serve` refreshes the access token next (unix seconds).
    #[serde(default)]
    pub next_refresh: Option<u64>,
    /// The last refresh failure, decoded, while it is being retried.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Client sessions logged in to the account right now.
    #[serde(default)]
    pub sessions: u64,
    /// The same by protocol, each with the account's limit.
    #[serde(default)]
    pub upstream_sessions: Vec<ProtocolSessions>,
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
    /// Every account's upstream sessions and their limits (passthrough too).
    pub sessions: SessionSlots,
}

pub fn now_unix() -> u64 {
    unix(SystemTime::now())
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
            sessions: SessionSlots::default(),
        };
        tm.reload(config);
        tm
    }

    /// Takes a new config: accounts whose settings did not change keep their
    /// state (tokens, unlock); changed ones start afresh; removed ones go.
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let mut map = sync::write(&self.accounts);
        let mut changed = Vec::new();
        let mut next = HashMap::new();
        for (k, a) in &config.accounts {
            let Some(settings) = a.oauth() else { continue };
            match map.get(k) {
                // A new session limit is for the slots alone (below).
                Some(old) if old.account.same_apart_from_limits(a) => {
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
        *sync::write(&self.domains) = config.domains.clone();
        *sync::write(&self.hook) = config.on_reauth_needed.clone();
        *sync::write(&self.delay_cap) = config.limits.login_failure_delay_max;
        *sync::write(&self.identity_timeout) = config.limits.provider_timeout;
        self.sessions.reload(config);
        self.changed.notify_one();
        changed
    }

    pub fn set_status_url(&self, url: Option<String>) {
        *sync::write(&self.status_url) = url;
    }

    pub fn status_url(&self) -> Option<String> {
        sync::read(&self.status_url).clone()
    }

    /// The tokens of `login`'s OAuth account. A mailbox of a domain entry
    /// joins on first use, but only once its owner set it up (it has a
    /// record on disk): no client can make entries appear.
    pub fn get(&self, login: &str) -> Option<Arc<AccountTokens>> {
        let key = login.to_lowercase();
        if let Some(t) = sync::read(&self.accounts).get(&key) {
            return Some(t.clone());
        }
        let account = config::domain::mailbox(&sync::read(&self.domains), &key)?;
        let settings = account.oauth()?.clone();
        if !self.records.has_record_now(&account.name) {
            return None;
        }
        let mut map = sync::write(&self.accounts);
        let t = map
            .entry(key)
            .or_insert_with(|| Arc::new(AccountTokens::new(account, settings)))
            .clone();
        drop(map);
        self.changed.notify_one();
        Some(t)
    }

    pub fn all(&self) -> Vec<Arc<AccountTokens>> {
        let mut v: Vec<_> = sync::read(&self.accounts).values().cloned().collect();
        v.sort_by(|a, b| a.account.name.cmp(&b.account.name));
        v
    }

    /// KDF counters for the status page.
    pub fn kdf_status(&self) -> KdfStatus {
        self.kdf_stats.snapshot()
    }

    fn keyring(&self) -> bool {
        self.store == TokenStore::Keyring
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
        let previous = match &slot.state {
            TokenState::Active(a) => Some(a.clone()),
            _ => None,
        };
        let old_access = |refresh: &Option<Secret>| kept_access(previous.as_ref(), refresh);
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
                self.opened_with_store_key(acct, r, previous.as_ref())
            }
            Some(r) if r.token_store == Some(StoreKind::Keyring) => {
                self.opened_from_keyring(acct, previous.as_ref()).await?
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
        let mut next = self.shared_access(acct, slot, record.as_ref(), next);
        if let (TokenState::Active(n), Some(p)) = (&mut next, previous.as_ref()) {
            if n.refresh == p.refresh && n.graph.is_none() {
                n.graph = p.graph.clone();
            }
        }
        slot.record = record;
        slot.state = next;
        Ok(())
    }

    /// The state a record sealed under the store key implies.
    fn opened_with_store_key(&self, acct: &AccountTokens, r: &AccountRecord, previous: Option<&Active>) -> TokenState {
        match (&r.refresh_token, &self.store_key) {
            (Some(sealed), Some(k)) => match crypto::open(k, &acct.account.name, sealed) {
                Ok(t) => {
                    let refresh = Some(t);
                    TokenState::Active(Active::new(refresh.clone(), kept_access(previous, &refresh), true))
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

    /// The state an account whose refresh token is in the OS keyring is in.
    async fn opened_from_keyring(
        &self,
        acct: &AccountTokens,
        previous: Option<&Active>,
    ) -> Result<TokenState, AuthError> {
        let name = acct.account.name.clone();
        let got = blocking(move || keystore::get(&name))
            .await
            .map_err(|e| AuthError::Vault(e.to_string()))?;
        tracing::debug!(account = %acct.account.name, found = ?got.as_ref().map(std::option::Option::is_some), "refresh token looked up in the OS keyring");
        Ok(match got {
            Ok(Some(t)) => {
                let refresh = Some(t);
                TokenState::Active(Active::new(refresh.clone(), kept_access(previous, &refresh), true))
            }
            Ok(None) => TokenState::NeedsLogin {
                why: "its refresh token is no longer in the OS keyring".into(),
            },
            Err(e) => TokenState::NeedsLogin {
                why: format!("the OS keyring holding its refresh token is unavailable ({e})"),
            },
        })
    }

    fn cancel_flight(&self, state: &TokenState) {
        if let TokenState::Authorizing(f) = state {
            if let Some(b) = &f.browser {
                b.cancel.cancel();
            }
        }
    }
}

/// The keyring entry's name (the account name, as the keystore expects it).
/// The cached access token of `previous`, when its refresh token is still
/// `refresh`.
fn kept_access(previous: Option<&Active>, refresh: &Option<Secret>) -> Option<Access> {
    previous
        .filter(|a| a.refresh == *refresh)
        .and_then(|a| a.access.clone())
}

fn rec_name(account: &str) -> String {
    account.to_string()
}

#[cfg(test)]
mod tests;

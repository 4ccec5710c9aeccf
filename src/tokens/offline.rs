//! The token lifecycle as the one-shot commands (`login`, `check`,
//! `passwd`, `revoke`) see it: no running proxy, the vault record and the
//! keyring only. The same rules as in `serve` hold: writes are
//! compare-and-write on the record's generation, so a command never writes
//! back a record older than what is on disk.

use crate::audit::Entry;
use crate::config::{OAuthSettings, TokenStore};
use crate::crypto::{self, VaultKey};
use crate::keystore;
use crate::oauth::{flows, OAuthError, Tokens};
use crate::secret::Secret;
use crate::store::{RecordStore, StoreError};
use crate::vault::{AccountRecord, StoreKind, Vault, VaultError, Written};

use super::now_unix;
use super::Resource;

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{0}")]
    Vault(#[from] VaultError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Crypto(#[from] crypto::CryptoError),
    #[error(transparent)]
    Keyring(#[from] crate::keystore::KeystoreError),
    #[error("wrong local password")]
    WrongPassword,
    #[error("{0} has no local password yet; run `mailproxy login {0}`")]
    NoPassword(String),
    #[error("{0} is not authorised; run `mailproxy login {0}`")]
    NotAuthorized(String),
    #[error("{0} was changed by another mailproxy command meanwhile; nothing was written")]
    Stale(String),
    #[error("{0}")]
    Input(String),
}

/// Writes a fresh record after an interactive authorisation (`mailproxy
/// login`): a new verifier for the local password, and the refresh token in
/// the keyring or sealed under the key the password yields. Blocking.
pub fn store_authorization(
    vault: &Vault,
    store: TokenStore,
    account: &str,
    password: &Secret,
    refresh: Option<&Secret>,
    scopes: Vec<String>,
) -> Result<&'static str, VaultError> {
    let (rec, where_) = authorization_record(store, None, account, password, refresh, scopes);
    vault.store(&rec)?;
    Ok(where_)
}

/// The record `mailproxy login` stores, and where its refresh token went:
/// the keyring, sealed under the store key, or sealed under the key the
/// local password yields. Blocking (a KDF run, maybe a keyring call).
pub fn authorization_record(
    store: TokenStore,
    store_key: Option<&VaultKey>,
    account: &str,
    password: &Secret,
    refresh: Option<&Secret>,
    scopes: Vec<String>,
) -> (AccountRecord, &'static str) {
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
    let mut where_ = "the refresh token is kept in the vault file (sealed with a key derived from the local password)";
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
            rec.token_store = Some(StoreKind::Keyring);
            where_ = "the refresh token is kept in the OS keyring";
        } else if let Some(k) = store_key {
            rec.refresh_token = Some(crypto::seal(k, account, refresh.expose()));
            rec.token_store = Some(StoreKind::StoreKey);
            where_ = if store == TokenStore::Postgres {
                "the refresh token is kept in PostgreSQL (sealed with the store key)"
            } else {
                "the refresh token is kept in the vault file (sealed with the store key)"
            };
        } else if store == TokenStore::Postgres {
            rec.refresh_token = Some(crypto::seal(&key, account, refresh.expose()));
            where_ = "the refresh token is kept in PostgreSQL (sealed with a key derived from the local password)";
        } else {
            rec.refresh_token = Some(crypto::seal(&key, account, refresh.expose()));
        }
    } else {
        where_ = super::NO_REFRESH_TOKEN_KEPT;
    }
    (rec, where_)
}

/// The refresh token of an account, from the keyring or the vault (asking
/// `password` for the local password only when it is needed). `None` when
/// there is none.
pub fn stored_refresh(
    account: &str,
    rec: &AccountRecord,
    store_key: Option<&VaultKey>,
    password: impl FnOnce() -> Result<Secret, OfflineError>,
) -> Result<Option<(Secret, Option<VaultKey>)>, OfflineError> {
    if rec.token_store == Some(StoreKind::StoreKey) {
        let (Some(sealed), Some(k)) = (&rec.refresh_token, store_key) else {
            return Err(OfflineError::Input(format!(
                "the refresh token of {account} is sealed under a store key: set store_key_file or MAILPROXY_STORE_KEY"
            )));
        };
        return Ok(Some((crypto::open(k, account, sealed)?, Some(k.clone()))));
    }
    if rec.token_store == Some(StoreKind::Keyring) {
        return Ok(keystore::get(account)
            .map_err(OfflineError::Keyring)?
            .map(|t| (t, None)));
    }
    let (Some(sealed), Some(verifier)) = (&rec.refresh_token, &rec.password) else {
        return Ok(None);
    };
    crypto::check_params(account, verifier)?;
    let pw = password()?;
    let key = crypto::check_password(pw.expose(), verifier)?.ok_or(OfflineError::WrongPassword)?;
    Ok(Some((crypto::open(&key, account, sealed)?, Some(key))))
}

/// What `mailproxy check` found for one account.
pub enum Checked {
    NeedsLogin(String),
    Refreshed(Tokens),
    Failed(OAuthError),
}

/// `mailproxy check` (and `mailproxy token`): refreshes now, redeeming the
/// grant for resource `res`, and saves a rotated token (unless the record
/// changed meanwhile); only the mail token's scopes are recorded.
#[allow(clippy::too_many_arguments)]
pub async fn check(
    records: &dyn RecordStore,
    store_key: Option<&VaultKey>,
    http: &reqwest::Client,
    account: &str,
    mailbox: &str,
    settings: &OAuthSettings,
    res: Resource,
    password: impl FnOnce() -> Result<Secret, OfflineError>,
) -> Result<Checked, OfflineError> {
    let res = res.effective(settings);
    // With a shared store, no instance refreshes this account meanwhile.
    let lock = records.refresh_lock(account).await?;
    let rec = match &lock {
        Some(l) => l.record().cloned(),
        None => records.load(account).await?,
    };
    if settings.flow.app_only() {
        if rec.as_ref().is_none_or(|r| r.password.is_none()) {
            return Ok(Checked::NeedsLogin(format!("run `mailproxy login {account}`")));
        }
        return Ok(
            match flows::app_token(http, account, mailbox, &res.app_settings(settings)).await {
                Ok(t) => Checked::Refreshed(t),
                Err(e) => Checked::Failed(e),
            },
        );
    }
    let Some(r) = rec else {
        return Ok(Checked::NeedsLogin(format!("run `mailproxy login {account}`")));
    };
    let Some((refresh, key)) = stored_refresh(account, &r, store_key, password)? else {
        return Ok(Checked::NeedsLogin(format!(
            "no refresh token stored; run `mailproxy login {account}`"
        )));
    };
    let t = match flows::refresh_for(http, account, settings, &refresh, res.refresh_scope(settings)).await {
        Ok(t) => t,
        Err(e) => return Ok(Checked::Failed(e.with_grant_age(account, r.authorized_at))),
    };
    // Save a rotated token and the refresh time (a running serve notices).
    let mut next = r.clone();
    next.last_refresh = Some(now_unix());
    if let Some(s) = t.scopes.as_ref().filter(|_| res == Resource::Mail) {
        next.scopes = s.clone();
    }
    let rotated = t.refresh.as_ref().filter(|n| **n != refresh).cloned();
    if let (Some(new), Some(k)) = (&rotated, &key) {
        next.refresh_token = Some(crypto::seal(k, account, new.expose()));
    }
    // The shared access token was made by the old one; instances refresh anew.
    next.access = None;
    let written = match lock {
        Some(l) => l.commit(&mut next).await?,
        None => {
            let keyring = match (&rotated, &key) {
                (Some(new), None) => Some(new.clone()),
                _ => None,
            };
            let name = account.to_string();
            let before: crate::store::Before = Box::new(move || match &keyring {
                Some(new) => keystore::set(&name, new).map_err(|e| StoreError::Other(e.to_string())),
                None => Ok(()),
            });
            records.store_if(&mut next, Some(r.generation), before).await?
        }
    };
    if let Written::Stale { .. } = written {
        return Err(OfflineError::Stale(account.to_string()));
    }
    Ok(Checked::Refreshed(t))
}

/// `mailproxy passwd`: a new local password. For the file store the refresh
/// token is re-sealed under the new key, which needs the old password; for
/// the keyring store only the verifier changes. Blocking (two KDF runs).
pub async fn change_password(
    records: &dyn RecordStore,
    account: &str,
    old: impl FnOnce() -> Result<Secret, OfflineError> + Send + 'static,
    new: &Secret,
) -> Result<(), OfflineError> {
    let rec = records
        .load(account)
        .await?
        .ok_or_else(|| OfflineError::NotAuthorized(account.to_string()))?;
    let (a, n, r) = (account.to_string(), new.clone(), rec.clone());
    let mut next = tokio::task::spawn_blocking(move || reseal(&a, &r, old, &n))
        .await
        .map_err(|e| OfflineError::Input(format!("a background task failed: {e}")))??;
    match records
        .store_if(&mut next, Some(rec.generation), Box::new(|| Ok(())))
        .await?
    {
        Written::Stored => Ok(()),
        Written::Stale { .. } => Err(OfflineError::Stale(account.to_string())),
    }
}

/// The record with a new verifier, and the refresh token re-sealed under
/// the new password's key when it was sealed under the old one's. Blocking.
fn reseal(
    account: &str,
    rec: &AccountRecord,
    old: impl FnOnce() -> Result<Secret, OfflineError>,
    new: &Secret,
) -> Result<AccountRecord, OfflineError> {
    let Some(verifier) = &rec.password else {
        return Err(OfflineError::NoPassword(account.to_string()));
    };
    let mut next = rec.clone();
    let sealed = rec.refresh_token.as_ref().filter(|_| rec.token_store.is_none());
    let (new_verifier, new_key) = if let Some(sealed) = sealed {
        crypto::check_params(account, verifier)?;
        let old = old()?;
        let key = crypto::check_password(old.expose(), verifier)?.ok_or(OfflineError::WrongPassword)?;
        let refresh = crypto::open(&key, account, sealed)?;
        let (v, k) = crypto::new_password(new.expose());
        next.refresh_token = Some(crypto::seal(&k, account, refresh.expose()));
        (v, k)
    } else {
        crypto::new_password(new.expose())
    };
    drop(new_key);
    next.password = Some(new_verifier);
    // Sealed under the old key: instances must not use it any more.
    next.access = None;
    Ok(next)
}

/// Whether `passwd` needs the old password for this record.
pub fn needs_old_password(rec: &AccountRecord) -> bool {
    rec.token_store.is_none() && rec.refresh_token.is_some()
}

/// What `revoke` says after erasing the local traces of `name` (`erased`
/// names each place), and the audit entry that records it.
pub fn erasure_report(name: &str, erased: &[String]) -> (Vec<String>, Entry) {
    if erased.is_empty() {
        let said = vec![format!("nothing was stored locally for {name}")];
        return (said, Entry::new(name, "erased", "nothing stored"));
    }
    let mut said = vec!["erased:".to_string()];
    said.extend(erased.iter().map(|e| format!("  {e}")));
    (said, Entry::new(name, "erased", erased.join("; ")))
}

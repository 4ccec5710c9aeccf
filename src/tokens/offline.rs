//! The token lifecycle as the one-shot commands (`login`, `check`,
//! `passwd`, `revoke`) see it: no running proxy, the vault record and the
//! keyring only. The same rules as in `serve` hold: writes are
//! compare-and-write on the record's generation, so a command never writes
//! back a record older than what is on disk.

use crate::config::{OAuthSettings, TokenStore};
use crate::crypto::{self, VaultKey};
use crate::keystore;
use crate::oauth::{self, flows, OAuthError, Tokens};
use crate::secret::Secret;
use crate::vault::{AccountRecord, StoreKind, Vault, VaultError, Written};

use super::now_unix;

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{0}")]
    Vault(#[from] VaultError),
    #[error("{0}")]
    Crypto(#[from] crypto::CryptoError),
    #[error("the OS keyring: {0}")]
    Keyring(String),
    #[error("wrong local password")]
    WrongPassword,
    #[error("{0} has no local password yet; run `mailproxy login {0}`")]
    NoPassword(String),
    #[error("{0} is not authorised; run `mailproxy login {0}`")]
    NotAuthorised(String),
    #[error("{0} was changed by another mailproxy command meanwhile; nothing was written")]
    Stale(String),
    #[error("{0}")]
    Input(String),
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
            rec.token_store = Some(StoreKind::Keyring);
            where_ = "the OS keyring";
        } else {
            rec.refresh_token = Some(crypto::seal(&key, account, refresh.expose()));
        }
    } else {
        where_ = "nowhere (client credentials need no refresh token, nor do service accounts)";
    }
    vault.store(&rec)?;
    Ok(where_)
}

/// The refresh token of an account, from the keyring or the vault (asking
/// `password` for the local password only when it is needed). `None` when
/// there is none.
pub fn stored_refresh(
    account: &str,
    rec: &AccountRecord,
    password: impl FnOnce() -> Result<Secret, OfflineError>,
) -> Result<Option<(Secret, Option<VaultKey>)>, OfflineError> {
    if rec.token_store == Some(StoreKind::Keyring) {
        return Ok(keystore::get(account)
            .map_err(OfflineError::Keyring)?
            .map(|t| (t, None)));
    }
    let (Some(sealed), Some(verifier)) = (&rec.refresh_token, &rec.password) else {
        return Ok(None);
    };
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

/// `mailproxy check`: refreshes now and saves a rotated token (unless the
/// record changed meanwhile).
pub async fn check(
    vault: &Vault,
    http: &reqwest::Client,
    account: &str,
    mailbox: &str,
    settings: &OAuthSettings,
    password: impl FnOnce() -> Result<Secret, OfflineError>,
) -> Result<Checked, OfflineError> {
    let rec = vault.load(account)?;
    if settings.flow.app_only() {
        if rec.as_ref().is_none_or(|r| r.password.is_none()) {
            return Ok(Checked::NeedsLogin(format!("run `mailproxy login {account}`")));
        }
        return Ok(match flows::app_token(http, account, mailbox, settings).await {
            Ok(t) => Checked::Refreshed(t),
            Err(e) => Checked::Failed(e),
        });
    }
    let Some(r) = rec else {
        return Ok(Checked::NeedsLogin(format!("run `mailproxy login {account}`")));
    };
    let Some((refresh, key)) = stored_refresh(account, &r, password)? else {
        return Ok(Checked::NeedsLogin(format!(
            "no refresh token stored; run `mailproxy login {account}`"
        )));
    };
    let t = match oauth::refresh(http, account, settings, &refresh).await {
        Ok(t) => t,
        Err(e) => return Ok(Checked::Failed(e.with_grant_age(account, r.authorized_at))),
    };
    // Save a rotated token and the refresh time (a running serve notices).
    let mut next = r.clone();
    next.last_refresh = Some(now_unix());
    if let Some(s) = &t.scopes {
        next.scopes = s.clone();
    }
    let rotated = t.refresh.as_ref().filter(|n| **n != refresh).cloned();
    if let (Some(new), Some(k)) = (&rotated, &key) {
        next.refresh_token = Some(crypto::seal(k, account, new.expose()));
    }
    let written = vault.store_if::<OfflineError>(&mut next, Some(r.generation), || match (&rotated, &key) {
        (Some(new), None) => keystore::set(account, new).map_err(OfflineError::Keyring),
        _ => Ok(()),
    })?;
    if let Written::Stale { .. } = written {
        return Err(OfflineError::Stale(account.to_string()));
    }
    Ok(Checked::Refreshed(t))
}

/// `mailproxy passwd`: a new local password. For the file store the refresh
/// token is re-sealed under the new key, which needs the old password; for
/// the keyring store only the verifier changes. Blocking (two KDF runs).
pub fn change_password(
    vault: &Vault,
    account: &str,
    old: impl FnOnce() -> Result<Secret, OfflineError>,
    new: &Secret,
) -> Result<(), OfflineError> {
    let rec = vault
        .load(account)?
        .ok_or_else(|| OfflineError::NotAuthorised(account.to_string()))?;
    let Some(verifier) = &rec.password else {
        return Err(OfflineError::NoPassword(account.to_string()));
    };
    let mut next = rec.clone();
    let sealed = rec
        .refresh_token
        .as_ref()
        .filter(|_| rec.token_store != Some(StoreKind::Keyring));
    let (new_verifier, new_key) = if let Some(sealed) = sealed {
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
    match vault.store_if::<OfflineError>(&mut next, Some(rec.generation), || Ok(()))? {
        Written::Stored => Ok(()),
        Written::Stale { .. } => Err(OfflineError::Stale(account.to_string())),
    }
}

/// Whether `passwd` needs the old password for this record.
pub fn needs_old_password(rec: &AccountRecord) -> bool {
    rec.token_store != Some(StoreKind::Keyring) && rec.refresh_token.is_some()
}

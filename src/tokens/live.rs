//! What the one-shot commands ask a running `serve` over the control socket
//! (`check`, `login`, `passwd`, `revoke`): the same transitions as in
//! `offline`, but on the live state, so the running proxy is the one
//! process that writes the vault and `check` needs no password.

use std::time::SystemTime;

use crate::audit::Entry;
use crate::keystore;
use crate::oauth::{flows, OAuthError, Tokens};
use crate::secret::Secret;
use crate::sync;

use super::offline::{self, OfflineError};
use super::state::{Access, Active, TokenState};
use super::{describe_pending, now_unix, AccountTokens, CheckOutcome, Lane, TokenError, TokenManager};

/// Why a `revoke` could not use the stored refresh token.
pub enum RevokeInput {
    /// Revoke with what the live state holds.
    Live,
    /// The owner's password did not open the sealed token: erase only.
    EraseOnly(String),
}

impl TokenManager {
    /// Records an audit entry (for the control socket's commands).
    pub(crate) fn audit(&self, e: Entry) {
        self.audit.record(e);
    }

    /// Whether the account's refresh token is sealed and its key unknown
    /// (a `revoke` then needs the owner's password).
    pub async fn is_locked(&self, acct: &AccountTokens) -> bool {
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        matches!(slot.state, TokenState::Locked)
    }

    /// `mailproxy check` while `serve` runs: refresh now, without any
    /// password (a locked account is reported, not opened).
    pub async fn check_now(&self, acct: &AccountTokens) -> CheckOutcome {
        let name = acct.account.name.clone();
        let login_hint = |why: &str| {
            if why.contains("mailproxy login") {
                why.to_string()
            } else {
                format!("{why}; run `mailproxy login {name}`")
            }
        };
        let mut slot = acct.slot.lock().await;
        if let Err(e) = self.sync(acct, &mut slot).await {
            return CheckOutcome::Temporary { why: e.to_string() };
        }
        let has_password = slot.record.as_ref().is_some_and(|r| r.password.is_some());
        match &slot.state {
            TokenState::NeedsLogin { why } => return CheckOutcome::NeedsLogin { why: login_hint(why) },
            TokenState::Authorizing(f) => {
                return CheckOutcome::NeedsLogin {
                    why: format!("waiting for its authorisation: {}", describe_pending(&f.pending)),
                }
            }
            TokenState::Locked => {
                return CheckOutcome::NeedsAction {
                    why: "locked: its refresh token is sealed under the local password, which no client has given since serve started; \
                          the next client login opens it (token_store = \"keyring\" avoids this)"
                        .into(),
                }
            }
            TokenState::Active(_) if !has_password => {
                return CheckOutcome::NeedsLogin {
                    why: login_hint("authorised, but it has no local password yet"),
                }
            }
            TokenState::Active(_) => {}
        }
        match self.refresh_locked(acct, &mut slot).await {
            Ok(_) => {
                let left = match &slot.state {
                    TokenState::Active(a) => a.access.as_ref().map(|x| x.expires_at),
                    _ => None,
                }
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
                .unwrap_or_default()
                .as_secs();
                CheckOutcome::Ok { valid_for: left }
            }
            Err(e) => classify(e),
        }
    }

    /// `mailproxy login` through `serve`: the grant (already checked with
    /// `identity::verify`) becomes the account's live state and is saved
    /// with a new verifier for `password`. Returns where the refresh token went.
    pub async fn install_grant(
        &self,
        acct: &AccountTokens,
        password: &Secret,
        t: Tokens,
    ) -> Result<String, TokenError> {
        let name = acct.account.name.clone();
        let (verifier, key) = self.new_password(password).await?;
        let scopes = t.scopes.clone().unwrap_or_else(|| acct.settings.scopes.clone());
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        let rec = crate::vault::AccountRecord {
            version: 1,
            account: name.clone(),
            password: Some(verifier),
            scopes: scopes.clone(),
            authorized_at: Some(now_unix()),
            last_refresh: Some(now_unix()),
            ..Default::default()
        };
        let previous_key = slot.key.replace(key);
        if let Err(e) = self.save(acct, &mut slot, rec, t.refresh.as_ref()).await {
            slot.key = previous_key;
            return Err(TokenError::Vault(e.to_string()));
        }
        self.cancel_flight(&slot.state);
        let place = if self.records.shared() {
            "PostgreSQL"
        } else {
            "the vault file"
        };
        let sealing = if self.store_key.is_some() {
            "the store key"
        } else {
            "a key derived from the local password"
        };
        let where_ = match (&t.refresh, self.keyring()) {
            (None, _) => super::NO_REFRESH_TOKEN_KEPT.to_string(),
            (Some(_), true) => "the refresh token is kept in the OS keyring".to_string(),
            (Some(_), false) => format!("the refresh token is kept in {place} (sealed with {sealing})"),
        };
        slot.state = TokenState::Active(Active::new(t.refresh.clone(), Some(Access::new(&t)), true));
        drop(slot);
        *sync::lock(&acct.verified) = Some(self.digest(acct, password));
        self.audit
            .record(Entry::new(&name, "consent", "authorised").scopes(&scopes));
        self.changed.notify_one();
        Ok(where_)
    }

    /// Whether `passwd` must ask for the old password.
    pub async fn passwd_needs_old(&self, acct: &AccountTokens) -> Result<bool, OfflineError> {
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        let name = acct.account.name.clone();
        let rec = slot
            .record
            .as_ref()
            .ok_or_else(|| OfflineError::NotAuthorized(name.clone()))?;
        if rec.password.is_none() {
            return Err(OfflineError::NoPassword(name));
        }
        Ok(offline::needs_old_password(rec))
    }

    /// `mailproxy passwd` through `serve`: the record is rewritten
    /// (compare-and-write), then the account is opened again with the new
    /// password so it stays usable without a client login.
    pub async fn change_password_live(
        &self,
        acct: &AccountTokens,
        old: Option<Secret>,
        new: &Secret,
    ) -> Result<(), OfflineError> {
        let name = acct.account.name.clone();
        let r = offline::change_password(
            self.records.as_ref(),
            &name,
            move || old.ok_or(OfflineError::WrongPassword),
            new,
        )
        .await;
        match &r {
            Ok(()) => {
                self.audit(Entry::new(&name, "password_changed", "changed with mailproxy passwd"));
                acct.forget_password();
                let _ = self.authenticate(acct, new, Lane::Owner).await;
            }
            Err(e) => self.audit(Entry::new(&name, "password_changed", format!("failed: {e}"))),
        }
        self.changed.notify_one();
        r
    }

    /// `mailproxy revoke` through `serve`: revokes the live refresh token at
    /// the provider (where it has an endpoint), erases the record and the
    /// keyring entry, and leaves the account needing a login. Returns the
    /// lines to print.
    pub async fn revoke_live(&self, acct: &AccountTokens, input: RevokeInput) -> Result<Vec<String>, TokenError> {
        let name = acct.account.name.clone();
        let s = &acct.settings;
        let mut out = Vec::new();
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        let refresh = match (&slot.state, input) {
            (TokenState::Active(a), RevokeInput::Live) => a.refresh.clone(),
            (_, RevokeInput::EraseOnly(why)) => {
                out.push(format!(
                    "cannot read the refresh token ({why}); erasing the local copy without revoking it at the provider"
                ));
                None
            }
            _ => None,
        };
        match &refresh {
            Some(t) => match flows::revoke(&self.http, &name, s, t).await {
                Ok(flows::Revocation::Revoked) => {
                    out.push(format!(
                        "revoked the refresh token at {}",
                        s.revoke_url.as_deref().unwrap_or("the provider")
                    ));
                    self.audit(Entry::new(&name, "revoked", "revoked at the provider").scopes(&s.scopes));
                }
                Ok(flows::Revocation::Unsupported(how)) => {
                    out.push(format!("not revoked at the provider: {how}"));
                    self.audit(Entry::new(&name, "revoked", "provider has no revocation endpoint"));
                }
                Err(e) => {
                    out.push(format!("revocation at the provider failed: {e}"));
                    self.audit(Entry::new(&name, "revoked", format!("failed: {e}")));
                }
            },
            None if s.flow == crate::config::Flow::ClientCredentials => {
                out.push("nothing to revoke at the provider: client credentials have no refresh token".into());
            }
            None => out.push("no refresh token was stored; nothing to revoke at the provider".into()),
        }
        let erased_places = self
            .records
            .erase(&name)
            .await
            .map_err(|e| TokenError::Vault(e.to_string()))?;
        let mut erased: Vec<String> = erased_places
            .iter()
            .map(|p| format!("{p} (local password verifier, sealed refresh token, scopes, timestamps)"))
            .collect();
        let n = name.clone();
        match tokio::task::spawn_blocking(move || keystore::delete(&n)).await {
            Ok(Ok(true)) => erased.push("the refresh token in the OS keyring".into()),
            Ok(Err(e)) if self.keyring() => {
                out.push(format!("the refresh token in the OS keyring was not erased ({e})"));
            }
            _ => {}
        }
        self.cancel_flight(&slot.state);
        slot.record = None;
        slot.stamp = None;
        slot.loaded = true;
        slot.key = None;
        slot.state = TokenState::NeedsLogin {
            why: "it was revoked or erased".into(),
        };
        drop(slot);
        acct.forget_password();
        let (said, entry) = offline::erasure_report(&name, &erased);
        out.extend(said);
        self.audit(entry);
        self.changed.notify_one();
        Ok(out)
    }
}

/// A failed refresh as `check` reports it (and `token`, by its exit status).
pub fn classify(e: TokenError) -> CheckOutcome {
    let why = e.to_string();
    match e {
        TokenError::NeedsLogin { .. } | TokenError::Pending { .. } => CheckOutcome::NeedsLogin { why },
        TokenError::Locked(_) | TokenError::Identity(_) => CheckOutcome::NeedsAction { why },
        TokenError::OAuth(ref o) if o.needs_login() || matches!(o, OAuthError::Provider(_)) => {
            CheckOutcome::NeedsAction { why }
        }
        TokenError::OAuth(_) | TokenError::Vault(_) | TokenError::Store(_) => CheckOutcome::Temporary { why },
    }
}

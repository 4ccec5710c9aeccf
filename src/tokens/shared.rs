//! The token lifecycle over a store that several instances share
//! (`token_store = "postgres"`).
//!
//! A refresh runs under the store's per-account lock: the record is read
//! again under it, and when another instance refreshed meanwhile its tokens
//! are used instead of refreshing again. Otherwise the provider is asked,
//! and the next record — the rotated refresh token and the new access token,
//! both sealed — is committed before the access token is handed out. A crash
//! before the commit leaves the old record; another instance then refreshes
//! with the old token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::refresh::Outcome;
use super::state::{unix, Access, TokenState};
use super::{fresh_token, now_unix, AccountTokens, Refreshed, Slot, TokenError, TokenManager};
use crate::crypto::{self, VaultKey};
use crate::store::Version;
use crate::vault::{AccountRecord, SealedAccess, StoreKind, Written};

/// What a sealed access token is bound to: never interchangeable with the
/// account's sealed refresh token.
fn access_binding(account: &str) -> String {
    format!("{account}\0access token")
}

impl TokenManager {
    /// The key the account's tokens are sealed under in `record`.
    fn sealing_key<'a>(&'a self, slot: &'a Slot, record: Option<&AccountRecord>) -> Option<&'a VaultKey> {
        match record.and_then(|r| r.token_store) {
            Some(StoreKind::StoreKey) => self.store_key.as_ref(),
            Some(StoreKind::Keyring) => None,
            None => slot.key.as_ref(),
        }
    }

    /// An access token another instance stored, when it outlives the one
    /// `next` holds. Only the shared store has them.
    pub(super) fn shared_access(
        &self,
        acct: &AccountTokens,
        slot: &Slot,
        record: Option<&AccountRecord>,
        next: TokenState,
    ) -> TokenState {
        let TokenState::Active(mut a) = next else {
            return next;
        };
        let (Some(sa), Some(key)) = (record.and_then(|r| r.access.as_ref()), self.sealing_key(slot, record)) else {
            return TokenState::Active(a);
        };
        let at = |s: u64| UNIX_EPOCH.checked_add(Duration::from_secs(s)).unwrap_or(UNIX_EPOCH);
        let newer = a.access.as_ref().is_none_or(|x| unix(x.expires_at) < sa.expires_at);
        if newer && sa.expires_at > now_unix() {
            if let Ok(token) = crypto::open(key, &access_binding(&acct.account.name), &sa.token) {
                a.access = Some(Access {
                    token,
                    issued_at: at(sa.issued_at),
                    expires_at: at(sa.expires_at),
                });
            }
        }
        TokenState::Active(a)
    }

    /// `refresh_locked` for the shared store. Slot locked; state is Active.
    pub(super) async fn refresh_shared(&self, acct: &AccountTokens, slot: &mut Slot) -> Result<Outcome, TokenError> {
        let name = acct.account.name.clone();
        let lock = match self.records.refresh_lock(&name).await {
            Ok(Some(l)) => Some(l),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(account = %name, error = %e, "cannot take the account's refresh lock");
                if let TokenState::Active(a) = &slot.state {
                    slot.state = TokenState::Active(a.failed(SystemTime::now(), e.to_string()));
                }
                crate::metrics::refresh(&acct.settings, "store_unavailable");
                return Err(TokenError::Store(e.to_string()));
            }
        };
        // Another instance may have refreshed, or a command changed the
        // account, since we last read it: what is stored now counts.
        let fresh = lock.as_ref().and_then(|l| l.record().cloned());
        let base = slot.record.as_ref().map(|r| r.generation);
        if lock.is_some() && fresh.as_ref().map(|r| r.generation) != base {
            let stamp = fresh.as_ref().map(|r| Version::Row(r.generation));
            self.adopt(acct, slot, fresh, stamp)
                .await
                .map_err(|e| TokenError::Vault(e.to_string()))?;
            slot.loaded = true;
            if let Some(token) = fresh_token(&slot.state, &name)? {
                tracing::info!(account = %name, "another instance refreshed meanwhile; using its token");
                crate::metrics::refresh(&acct.settings, "shared");
                return Ok(Outcome::Fresh(token));
            }
        }
        let TokenState::Active(before) = &slot.state else {
            return Err(TokenError::Locked(name));
        };
        let before = before.clone();
        let t = match self.ask_provider(acct, slot, &before).await {
            Ok(t) => t,
            Err(error) => {
                // The lock goes with nothing written: the stored token stays.
                drop(lock);
                return Ok(Outcome::Refused { before, error });
            }
        };
        let mut done = Refreshed::new(&before, t);
        let key = self.sealing_key(slot, slot.record.as_ref()).cloned();
        match (lock, key, slot.record.clone()) {
            (Some(lock), Some(key), Some(mut rec)) if before.sealed => {
                let t = &done.tokens;
                rec.last_refresh = Some(now_unix());
                if let Some(s) = &t.scopes {
                    rec.scopes = s.clone();
                }
                if let Some(r) = &done.rotated {
                    rec.refresh_token = Some(crypto::seal(&key, &name, r.expose()));
                }
                rec.access = Some(SealedAccess {
                    token: crypto::seal(&key, &access_binding(&name), t.access.expose()),
                    issued_at: unix(t.issued_at),
                    expires_at: unix(t.expires_at),
                });
                match lock.commit(&mut rec).await {
                    Ok(Written::Stored) => {
                        slot.stamp = Some(Version::Row(rec.generation));
                        slot.record = Some(rec);
                        slot.loaded = true;
                    }
                    Ok(Written::Stale { on_disk }) => {
                        tracing::warn!(account = %name, based_on = ?base, stored = ?on_disk, "dropped a refresh: the account was changed meanwhile");
                        slot.loaded = false;
                        let _ = self.sync(acct, slot).await;
                        return Ok(Outcome::ChangedMeanwhile);
                    }
                    Err(e) => done.save_failed(&name, e),
                }
            }
            _ if done.rotated.is_some() => {
                // Nothing to seal it with yet: kept in memory, saved later.
                done.next.sealed = false;
            }
            _ => {}
        }
        Ok(Outcome::Renewed(done))
    }
}

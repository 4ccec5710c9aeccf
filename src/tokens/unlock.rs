//! Unlocking: the local password, its KDF and the gate that bounds guessing.

use super::*;

impl TokenManager {
    pub(super) fn digest(&self, acct: &AccountTokens, password: &Secret) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.pepper);
        h.update(acct.account.name.as_bytes());
        h.update([0]);
        h.update(password.expose().as_bytes());
        h.finalize().into()
    }

    pub(super) fn cached(&self, acct: &AccountTokens, digest: &[u8; 32]) -> bool {
        sync::lock(&acct.verified).is_some_and(|d| bool::from(d.ct_eq(digest)))
    }

    /// The password's digest matches the one last verified and the tokens
    /// are open: nothing more to check. A token kept only in memory (its
    /// save failed before) is saved now.
    pub(super) async fn unlocked_by(&self, acct: &AccountTokens, slot: &mut Slot, digest: &[u8; 32]) -> bool {
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
        *sync::lock(&acct.last_use) = Some(now_unix());
        true
    }

    /// Runs a password KDF in one of the global slots, counted.
    pub(super) async fn kdf<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BackgroundError> {
        let _slot = self.kdf_slots.acquire().await.map_err(|_| BackgroundError::KdfClosed)?;
        let _running = self.kdf_stats.start();
        blocking(f).await
    }

    /// A verifier and sealing key for a new local password, computed in a
    /// KDF slot like every password check.
    pub(super) async fn new_password(
        &self,
        password: &Secret,
    ) -> Result<(crypto::PasswordVerifier, VaultKey), TokenError> {
        let pw = password.clone();
        self.kdf(move || crypto::new_password(pw.expose()))
            .await
            .map_err(|e| TokenError::Vault(e.to_string()))
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
                        _ => AuthError::NotAuthorized(name),
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
            .map_err(|e| AuthError::Vault(e.to_string()))?;
        let key = match checked {
            Ok(Some(key)) => key,
            Ok(None) => {
                let delay = acct.gate.failed(lane, *sync::read(&self.delay_cap));
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
    pub(super) async fn unlock(&self, acct: &AccountTokens, key: VaultKey, digest: [u8; 32]) -> Result<(), AuthError> {
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
                    None => return Err(AuthError::NotAuthorized(name)),
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
            return Err(AuthError::NotAuthorized(name));
        }
        *sync::lock(&acct.verified) = Some(digest);
        *sync::lock(&acct.last_use) = Some(now_unix());
        self.changed.notify_one();
        Ok(())
    }
}

//! Saving: every write of an account's record (compare-and-write on its generation), and sealing tokens under the account's key.

use super::*;

/// Why blocking work run off the async workers gave no answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum BackgroundError {
    #[error("a background task failed: {0}")]
    Failed(#[from] tokio::task::JoinError),
    #[error("the KDF slots are closed")]
    KdfClosed,
}

/// Runs blocking work off the async workers; a panic there becomes an error.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, BackgroundError> {
    Ok(tokio::task::spawn_blocking(f).await?)
}

pub(super) fn new_record(account: &str) -> AccountRecord {
    AccountRecord {
        version: 1,
        account: account.to_string(),
        ..Default::default()
    }
}

/// Why a save did not happen.
#[derive(Debug, thiserror::Error)]
pub(super) enum SaveError {
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

impl TokenManager {
    /// Tries to save an unsealed token (a grant or a rotated token whose
    /// save failed before); returns the state with `sealed` as it ended.
    pub(super) async fn seal_active(&self, acct: &AccountTokens, slot: &mut Slot, a: Active) -> Active {
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
    pub(super) async fn save(
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
            Some(t) => Ok(keystore::set(&rec_name(&name), t)?),
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
}

//! Where account records live, behind one seam: the file vault (one
//! machine) or PostgreSQL (several instances sharing the accounts).
//!
//! Both keep the same rules: every write is a compare-and-write on the
//! record's generation, and a crash leaves the old or the new record. The
//! shared store adds a per-account refresh lock held across the provider
//! request, so instances never refresh one token twice at once.

pub mod postgres;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Config, TokenStore};
use crate::crypto::VaultKey;
use crate::keystore::KeystoreError;
use crate::vault::{AccountRecord, Stamp, Vault, VaultError, Written};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("the token database: {0}")]
    Database(String),
    /// The keyring write run under the store's lock ([`Before`]) failed.
    #[error("{0}")]
    Keyring(#[from] KeystoreError),
    #[error("{0}")]
    Other(String),
}

/// What a record looked like when it was last read or written: a change
/// means it must be read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    File(Stamp),
    Row(u64),
}

/// Runs under the store's lock once the compare passed (a keyring write that
/// must not resurrect an erased account).
pub type Before = Box<dyn FnOnce() -> Result<(), StoreError> + Send>;

#[async_trait]
pub trait RecordStore: Send + Sync {
    /// For messages: "the vault file", "PostgreSQL".
    fn describe(&self) -> &'static str;
    /// Several instances share these records: refresh under [`Self::refresh_lock`].
    fn shared(&self) -> bool;
    async fn load(&self, account: &str) -> Result<Option<AccountRecord>, StoreError>;
    async fn version(&self, account: &str) -> Result<Option<Version>, StoreError>;
    /// Replaces the record whatever is stored (the owner's `login`); returns
    /// the new generation, past the stored one.
    async fn store(&self, rec: &AccountRecord) -> Result<u64, StoreError>;
    /// Writes `rec` only if the stored record is still generation `base`;
    /// `hook` runs under the lock once that compare passed.
    async fn store_if(&self, rec: &mut AccountRecord, base: Option<u64>, hook: Before) -> Result<Written, StoreError>;
    /// Removes the record; returns descriptions of what was erased.
    async fn erase(&self, account: &str) -> Result<Vec<String>, StoreError>;
    /// The cross-instance single flight: `None` when one process is all
    /// there is (the in-process account lock suffices).
    async fn refresh_lock(&self, account: &str) -> Result<Option<Box<dyn RefreshLock>>, StoreError>;
    /// Reachable (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Wakes when another instance changed a record (LISTEN/NOTIFY).
    /// Accounts with a record, as far as the store can tell at once (no
    /// waiting): the file vault lists its directory; a shared store has no
    /// such cheap answer and says none, so domain-entry mailboxes are taken
    /// up only from the file vault.
    fn names_now(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether `account` has a record, answered at once (see [`Self::names_now`]).
    fn has_record_now(&self, account: &str) -> bool {
        let _ = account;
        false
    }

    fn changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

/// Held while one instance refreshes an account: everyone else waits. The
/// record was read under the lock; `commit` writes the next one and releases
/// it; dropping it without a commit releases it and writes nothing.
#[async_trait]
pub trait RefreshLock: Send {
    fn record(&self) -> Option<&AccountRecord>;
    async fn commit(self: Box<Self>, rec: &mut AccountRecord) -> Result<Written, StoreError>;
}

/// Runs blocking vault work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Other(format!("a background task failed: {e}")))?
}

#[async_trait]
impl RecordStore for Vault {
    fn describe(&self) -> &'static str {
        "the vault file"
    }

    fn names_now(&self) -> Vec<String> {
        self.account_names()
    }

    fn has_record_now(&self, account: &str) -> bool {
        self.stamp(account).is_some()
    }

    fn shared(&self) -> bool {
        false
    }

    async fn load(&self, account: &str) -> Result<Option<AccountRecord>, StoreError> {
        let (v, a) = (self.clone(), account.to_string());
        blocking(move || Ok(Vault::load(&v, &a)?)).await
    }

    async fn version(&self, account: &str) -> Result<Option<Version>, StoreError> {
        let (v, a) = (self.clone(), account.to_string());
        blocking(move || Ok(v.stamp(&a).map(Version::File))).await
    }

    async fn store(&self, rec: &AccountRecord) -> Result<u64, StoreError> {
        let (v, r) = (self.clone(), rec.clone());
        blocking(move || Ok(Vault::store(&v, &r)?)).await
    }

    async fn store_if(&self, rec: &mut AccountRecord, base: Option<u64>, hook: Before) -> Result<Written, StoreError> {
        let (v, mut r) = (self.clone(), rec.clone());
        let (written, r) = blocking(move || {
            let w = Vault::store_if::<StoreError>(&v, &mut r, base, hook)?;
            Ok((w, r))
        })
        .await?;
        *rec = r;
        Ok(written)
    }

    async fn erase(&self, account: &str) -> Result<Vec<String>, StoreError> {
        let (v, a) = (self.clone(), account.to_string());
        blocking(move || {
            Ok(Vault::erase(&v, &a)?
                .into_iter()
                .map(|p| p.display().to_string())
                .collect())
        })
        .await
    }

    async fn refresh_lock(&self, _account: &str) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        Ok(None)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The store the config names: the file vault under `state_dir` (file and
/// keyring stores), or the database.
pub async fn open(config: &Config) -> Result<Arc<dyn RecordStore>, StoreError> {
    if config.token_store == TokenStore::Postgres {
        let url = match &config.fleet.database_url {
            Some(u) => u.clone(),
            None => match std::env::var("MAILPROXY_DATABASE_URL") {
                Ok(u) if !u.is_empty() => crate::secret::Secret::new(u),
                _ => {
                    return Err(StoreError::Database(format!(
                        "token_store = \"postgres\" needs [server] database_url in {} or MAILPROXY_DATABASE_URL",
                        config.path.display()
                    )))
                }
            },
        };
        let pg = postgres::PgStore::connect(&url).await?;
        return Ok(Arc::new(pg));
    }
    Ok(Arc::new(Vault::open(&config.state_dir)?))
}

/// Why the store key cannot be used; `from` names the file, or
/// `MAILPROXY_STORE_KEY`.
#[derive(Debug, thiserror::Error)]
pub enum StoreKeyError {
    #[error("{from}: {source}")]
    Unsafe { from: String, source: VaultError },
    #[error("{from}: {source}")]
    Unreadable { from: String, source: std::io::Error },
    #[error("{from}: the store key is neither base64 nor 64 hex digits")]
    NotEncoded { from: String },
    #[error("{from}: the store key must be 32 bytes (it has {len}); make one with: head -c 32 /dev/urandom | base64")]
    Length { from: String, len: usize },
}

const STORE_KEY_ENV: &str = "MAILPROXY_STORE_KEY";

/// The store key (`store_key_file`, else `MAILPROXY_STORE_KEY`): 32 random
/// bytes, as base64 or 64 hex digits, e.g. from `openssl rand -base64 32`.
/// `None` when neither is set: refresh tokens are sealed under a key derived
/// from each local password.
pub fn store_key(config: &Config) -> Result<Option<VaultKey>, StoreKeyError> {
    if let Some(p) = &config.fleet.store_key_file {
        let from = || p.display().to_string();
        crate::vault::check_private(p, 0o600).map_err(|source| StoreKeyError::Unsafe { from: from(), source })?;
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(p).map_err(|source| StoreKeyError::Unreadable { from: from(), source })?,
        );
        return decode_key(&text, &from()).map(Some);
    }
    match std::env::var(STORE_KEY_ENV) {
        Ok(v) if !v.is_empty() => {
            let v = zeroize::Zeroizing::new(v);
            decode_key(&v, STORE_KEY_ENV).map(Some)
        }
        _ => Ok(None),
    }
}

/// The key in `text` (read from `from`).
fn decode_key(text: &str, from: &str) -> Result<VaultKey, StoreKeyError> {
    use base64::Engine;
    let t = text.trim();
    let bytes = zeroize::Zeroizing::new(if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect::<Vec<u8>>()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(t)
            .map_err(|_| StoreKeyError::NotEncoded { from: from.to_string() })?
    });
    VaultKey::from_bytes(&bytes).ok_or_else(|| StoreKeyError::Length {
        from: from.to_string(),
        len: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_keys_are_32_bytes_in_base64_or_hex() {
        assert!(decode_key(&"ab".repeat(32), STORE_KEY_ENV).is_ok());
        assert!(decode_key("  AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n", STORE_KEY_ENV).is_ok());
        let e = decode_key("AAAA", STORE_KEY_ENV).map(|_| ()).unwrap_err().to_string();
        assert!(
            e.starts_with("MAILPROXY_STORE_KEY: the store key must be 32 bytes (it has 3)"),
            "{e}"
        );
        assert!(decode_key("not a key!", STORE_KEY_ENV).is_err());
    }
}

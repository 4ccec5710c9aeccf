//! Refresh tokens in the OS keyring (`token_store = "keyring"`). Every call
//! blocks (syscalls, D-Bus): callers run them on a blocking thread.
//!
//! On Linux this is the kernel keyutils store, used directly: entries live in
//! the *user* keyring, which every process of the user shares (a `serve`
//! started by systemd or cron shares no session keyring with the `mailproxy
//! login` typed in a terminal), and are linked into the user's persistent
//! keyring where the kernel allows, so they outlive the last process. The
//! `keyring` crate's keyutils credential writes to the session keyring and
//! links to the persistent one in a way whose entries other processes cannot
//! search, so it is not used here. Elsewhere the `keyring` crate's platform
//! store is used (macOS Keychain, Windows Credential Manager).

use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("kernel keyutils: {0}")]
    Kernel(String),
    #[error("the OS keyring: {0}")]
    Platform(String),
    #[error("the token stored in the keyring is not UTF-8")]
    NotUtf8,
    #[error("the keyring did not return what was stored")]
    Mismatch,
}

#[cfg(target_os = "linux")]
mod imp {
    use linux_keyutils::{Key, KeyError, KeyRing, KeyRingIdentifier};

    use super::KeystoreError;
    use crate::secret::Secret;

    fn describe(e: KeyError) -> KeystoreError {
        KeystoreError::Kernel(format!("{e:?}"))
    }

    fn user_ring() -> Result<KeyRing, KeystoreError> {
        KeyRing::from_special_id(KeyRingIdentifier::User, true).map_err(describe)
    }

    fn description(account: &str) -> String {
        format!("mailproxy:{}", account.to_lowercase())
    }

    fn find(ring: &KeyRing, account: &str) -> Result<Option<Key>, KeystoreError> {
        match ring.search(&description(account)) {
            Ok(k) => Ok(Some(k)),
            // A revoked or expired entry is as good as none.
            Err(KeyError::KeyDoesNotExist | KeyError::KeyRevoked | KeyError::KeyExpired) => Ok(None),
            Err(e) => Err(describe(e)),
        }
    }

    pub fn get(account: &str) -> Result<Option<Secret>, KeystoreError> {
        let ring = user_ring()?;
        let Some(key) = find(&ring, account)? else {
            return Ok(None);
        };
        let bytes = zeroize::Zeroizing::new(key.read_to_vec().map_err(describe)?);
        let s = std::str::from_utf8(&bytes).map_err(|_| KeystoreError::NotUtf8)?;
        Ok(Some(Secret::new(s)))
    }

    pub fn set(account: &str, token: &Secret) -> Result<(), KeystoreError> {
        let ring = user_ring()?;
        // add_key replaces the payload of an existing key with the same description.
        let key = ring
            .add_key(&description(account), token.expose().as_bytes())
            .map_err(describe)?;
        if let Ok(persistent) = KeyRing::get_persistent(KeyRingIdentifier::User) {
            let _ = persistent.link_key(key);
        }
        Ok(())
    }

    pub fn delete(account: &str) -> Result<bool, KeystoreError> {
        let ring = user_ring()?;
        let Some(key) = find(&ring, account)? else {
            return Ok(false);
        };
        key.invalidate().map_err(describe)?;
        Ok(true)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::KeystoreError;
    use crate::secret::Secret;

    const SERVICE: &str = "mailproxy";

    fn platform(e: keyring::Error) -> KeystoreError {
        KeystoreError::Platform(e.to_string())
    }

    fn entry(account: &str) -> Result<keyring::Entry, KeystoreError> {
        keyring::Entry::new(SERVICE, &account.to_lowercase()).map_err(platform)
    }

    pub fn get(account: &str) -> Result<Option<Secret>, KeystoreError> {
        match entry(account)?.get_password() {
            Ok(s) => Ok(Some(Secret::new(s))),
            Err(keyring::Error::NoEntry) => Ok(None),
            Err(e) => Err(platform(e)),
        }
    }

    pub fn set(account: &str, token: &Secret) -> Result<(), KeystoreError> {
        entry(account)?.set_password(token.expose()).map_err(platform)
    }

    pub fn delete(account: &str) -> Result<bool, KeystoreError> {
        match entry(account)?.delete_credential() {
            Ok(()) => Ok(true),
            Err(keyring::Error::NoEntry) => Ok(false),
            Err(e) => Err(platform(e)),
        }
    }
}

/// Whether the keyring works at all: writes, reads back and deletes a probe.
pub fn probe() -> Result<(), KeystoreError> {
    const PROBE: &str = "mailproxy-probe";
    set(PROBE, &Secret::new("probe"))?;
    let back = get(PROBE)?;
    let _ = delete(PROBE);
    match back {
        Some(s) if s.expose() == "probe" => Ok(()),
        _ => Err(KeystoreError::Mismatch),
    }
}

pub fn get(account: &str) -> Result<Option<Secret>, KeystoreError> {
    imp::get(account)
}

pub fn set(account: &str, token: &Secret) -> Result<(), KeystoreError> {
    imp::set(account, token)
}

/// Returns whether there was an entry to delete.
pub fn delete(account: &str) -> Result<bool, KeystoreError> {
    imp::delete(account)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the real kernel keyutils of the machine running the tests.
    #[test]
    fn set_get_delete_round_trip() {
        let name = format!("unit-{}@example.org", std::process::id());
        assert_eq!(get(&name).unwrap(), None);
        set(&name, &Secret::new("rt-1")).unwrap();
        set(&name, &Secret::new("rt-2")).unwrap();
        assert_eq!(get(&name.to_uppercase()).unwrap().unwrap().expose(), "rt-2");
        assert!(delete(&name).unwrap());
        assert_eq!(get(&name).unwrap(), None);
        assert!(!delete(&name).unwrap());
        probe().unwrap();
    }
}

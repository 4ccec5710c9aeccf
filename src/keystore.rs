//! Refresh tokens in the OS keyring (`token_store = "keyring"`), through the
//! `keyring` crate: kernel keyutils on Linux here, the platform keychain
//! elsewhere. Every call blocks (D-Bus, syscalls): callers run them on a
//! blocking thread.

use crate::secret::Secret;

const SERVICE: &str = "mailproxy";

fn entry(account: &str) -> Result<keyring::Entry, String> {
    keyring::Entry::new(SERVICE, &account.to_lowercase()).map_err(|e| e.to_string())
}

/// Whether the keyring works at all: writes, reads back and deletes a probe.
pub fn probe() -> Result<(), String> {
    let e = keyring::Entry::new(SERVICE, "mailproxy-probe").map_err(|e| e.to_string())?;
    e.set_password("probe").map_err(|e| e.to_string())?;
    let back = e.get_password().map_err(|e| e.to_string())?;
    let _ = e.delete_credential();
    if back == "probe" {
        Ok(())
    } else {
        Err("the keyring returned something else than was stored".into())
    }
}

pub fn get(account: &str) -> Result<Option<Secret>, String> {
    match entry(account)?.get_password() {
        Ok(s) => Ok(Some(Secret::new(s))),
        Err(keyring::Error::NoEntry) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

pub fn set(account: &str, token: &Secret) -> Result<(), String> {
    entry(account)?.set_password(token.expose()).map_err(|e| e.to_string())
}

/// Returns whether there was an entry to delete.
pub fn delete(account: &str) -> Result<bool, String> {
    match entry(account)?.delete_credential() {
        Ok(()) => Ok(true),
        Err(keyring::Error::NoEntry) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

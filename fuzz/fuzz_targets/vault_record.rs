//! Vault record JSON (`vault::AccountRecord`) and the crypto that reads it.
//!
//! A record file is attacker-influenced (a damaged or tampered file). Parse
//! it as `Vault::load` does, then feed its parts to `crypto::open` and to
//! the password check's parameter window. Invariants: no panic; a parsed
//! record round-trips through its own serialisation; `Vault::path_of` keeps
//! any account name inside the vault directory; a record whose Argon2id
//! parameters lie outside the accepted window is refused by both
//! `check_params` and `check_password` (so without a KDF run).
#![no_main]

use std::path::{Component, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mailproxy::crypto::{self, VaultKey};
use mailproxy::vault::{AccountRecord, Vault};

fn vault() -> &'static Vault {
    static V: OnceLock<Vault> = OnceLock::new();
    V.get_or_init(|| {
        let dir: PathBuf = std::env::temp_dir().join(format!("mailproxy-fuzz-vault-{}", std::process::id()));
        Vault::open(&dir).expect("temporary vault directory")
    })
}

fuzz_target!(|data: &[u8]| {
    // Account names: any text must map to a single file inside the vault.
    let name = String::from_utf8_lossy(data);
    let v = vault();
    let p = v.path_of(&name);
    assert_eq!(p.parent(), Some(v.dir()), "{name:?} -> {p:?}");
    assert!(p.components().all(|c| !matches!(c, Component::ParentDir)));
    let file = p.file_name().and_then(|f| f.to_str()).expect("file name");
    assert!(file.ends_with(".json"), "{file:?}");
    // Only the empty name (never a valid account) yields a dot file.
    assert!(!file.starts_with('.') || name.is_empty(), "{name:?} -> hidden file {file:?}");
    assert_eq!(v.path_of(&name.to_uppercase()) == p, name.to_uppercase().to_lowercase() == name.to_lowercase());

    let Ok(rec) = serde_json::from_slice::<AccountRecord>(data) else {
        return;
    };
    let json = serde_json::to_vec_pretty(&rec).expect("records always serialize");
    let back: AccountRecord = serde_json::from_slice(&json).expect("own serialisation parses");
    assert_eq!(back, rec);

    let key = VaultKey::from_bytes(&[7u8; 32]).unwrap();
    if let Some(sealed) = &rec.refresh_token {
        let _ = crypto::open(&key, &rec.account, sealed);
    }
    if let Some(pv) = &rec.password {
        let _ = format!("{pv:?}");
        // Inside the window a check costs a real KDF run (too slow for a
        // fuzzer); outside it both checks must refuse before running one.
        let inside = crypto::ACCEPTED_M_COST.contains(&pv.m_cost)
            && crypto::ACCEPTED_T_COST.contains(&pv.t_cost)
            && crypto::ACCEPTED_P_COST.contains(&pv.p_cost);
        if !inside {
            assert!(crypto::check_params(&rec.account, pv).is_err(), "{pv:?}");
            assert!(crypto::check_password("hunter2", pv).is_err(), "{pv:?}");
        }
    }
});

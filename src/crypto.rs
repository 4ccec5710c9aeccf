//! Keys and sealing for the token vault.
//!
//! One Argon2id run over the local password yields a 32-byte master secret;
//! HKDF splits it into a *verifier* (stored, to check the password) and the
//! *vault key* (never stored, it encrypts the refresh token). Knowing the
//! verifier tells nothing about the key, so the key is never beside the data.
//! The refresh token is sealed with XChaCha20-Poly1305; the account name is
//! bound in as associated data so a sealed token cannot be moved to another
//! account's record.

use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// OWASP's recommended Argon2id setting: 19 MiB, 2 passes, 1 lane (~30 ms).
pub const DEFAULT_M_COST: u32 = 19 * 1024;
pub const DEFAULT_T_COST: u32 = 2;
pub const DEFAULT_P_COST: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the vault record is damaged: {0}")]
    Damaged(&'static str),
    #[error("the sealed token cannot be opened with this key (wrong password or tampered file)")]
    Open,
}

/// What the vault stores to check a local password.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PasswordVerifier {
    pub kdf: String,
    pub m_cost: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    pub salt: String,
    pub verifier: String,
}

impl fmt::Debug for PasswordVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordVerifier")
            .field("kdf", &self.kdf)
            .finish_non_exhaustive()
    }
}

/// The key that opens an account's sealed refresh token.
#[derive(Clone)]
pub struct VaultKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultKey(<redacted>)")
    }
}

impl VaultKey {
    pub fn random() -> VaultKey {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut k[..]);
        VaultKey(k)
    }

    pub fn from_bytes(b: &[u8]) -> Option<VaultKey> {
        let mut k = Zeroizing::new([0u8; 32]);
        if b.len() != 32 {
            return None;
        }
        k.copy_from_slice(b);
        Some(VaultKey(k))
    }

    pub fn to_base64(&self) -> Secret {
        Secret::new(B64.encode(&self.0[..]))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: String,
    pub ciphertext: String,
}

/// Argon2's working memory (19 MiB by default), kept for reuse. Allocating
/// it afresh for every check leaves it stranded in the allocator's
/// per-thread arenas, so a stream of wrong passwords would grow the process
/// by 19 MiB per blocking thread; a small pool keeps memory flat. The KDF
/// runs are bounded (see `tokens`), so the pool rarely needs more buffers.
static BLOCKS: std::sync::Mutex<Vec<Vec<argon2::Block>>> = std::sync::Mutex::new(Vec::new());
const POOLED_BUFFERS: usize = 2;

fn master(password: &str, salt: &[u8], m: u32, t: u32, p: u32) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let params = Params::new(m, t, p, Some(32)).map_err(|_| CryptoError::Damaged("bad Argon2 parameters"))?;
    let mut blocks = BLOCKS.lock().unwrap().pop().unwrap_or_default();
    blocks.resize(params.block_count(), argon2::Block::default());
    let mut out = Zeroizing::new([0u8; 32]);
    let r = Argon2::new(Algorithm::Argon2id, Version::V0x13, params).hash_password_into_with_memory(
        password.as_bytes(),
        salt,
        &mut out[..],
        &mut blocks[..],
    );
    // The blocks hold password-derived state: wipe before anyone reuses them.
    for b in blocks.iter_mut() {
        zeroize::Zeroize::zeroize(b);
    }
    let mut pool = BLOCKS.lock().unwrap();
    if pool.len() < POOLED_BUFFERS {
        pool.push(blocks);
    }
    drop(pool);
    r.map_err(|_| CryptoError::Damaged("bad Argon2 salt"))?;
    Ok(out)
}

fn split(master: &[u8; 32]) -> (Zeroizing<[u8; 32]>, VaultKey) {
    let hk = Hkdf::<Sha256>::new(None, master);
    let mut verifier = Zeroizing::new([0u8; 32]);
    let mut key = Zeroizing::new([0u8; 32]);
    hk.expand(b"mailproxy v1 password verifier", &mut verifier[..])
        .expect("32 bytes is a valid HKDF length");
    hk.expand(b"mailproxy v1 vault key", &mut key[..])
        .expect("32 bytes is a valid HKDF length");
    (verifier, VaultKey(key))
}

/// A new verifier (fresh salt) for `password`, and the vault key it unlocks.
/// CPU- and memory-heavy: call from a blocking thread.
pub fn new_password(password: &str) -> (PasswordVerifier, VaultKey) {
    new_password_with(password, DEFAULT_M_COST, DEFAULT_T_COST, DEFAULT_P_COST)
}

pub fn new_password_with(password: &str, m: u32, t: u32, p: u32) -> (PasswordVerifier, VaultKey) {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let mk = master(password, &salt, m, t, p).expect("default Argon2 parameters are valid");
    let (verifier, key) = split(&mk);
    let v = PasswordVerifier {
        kdf: "argon2id".into(),
        m_cost: m,
        t_cost: t,
        p_cost: p,
        salt: B64.encode(salt),
        verifier: B64.encode(&verifier[..]),
    };
    (v, key)
}

/// Checks `password` in constant time; on success returns the vault key.
/// CPU- and memory-heavy: call from a blocking thread.
pub fn check_password(password: &str, v: &PasswordVerifier) -> Result<Option<VaultKey>, CryptoError> {
    if v.kdf != "argon2id" {
        return Err(CryptoError::Damaged("unknown password KDF"));
    }
    // Refuse parameters that would let a tampered file make us allocate
    // gigabytes or spin for minutes.
    if v.m_cost > 1 << 21 || v.t_cost > 64 || v.p_cost > 16 {
        return Err(CryptoError::Damaged("Argon2 parameters out of range"));
    }
    let salt = B64.decode(&v.salt).map_err(|_| CryptoError::Damaged("bad salt"))?;
    let want = B64
        .decode(&v.verifier)
        .map_err(|_| CryptoError::Damaged("bad verifier"))?;
    let mk = master(password, &salt, v.m_cost, v.t_cost, v.p_cost)?;
    let (got, key) = split(&mk);
    if bool::from(got[..].ct_eq(&want[..])) {
        Ok(Some(key))
    } else {
        Ok(None)
    }
}

fn aad(account: &str) -> Vec<u8> {
    format!("mailproxy v1 refresh token\0{account}").into_bytes()
}

pub fn seal(key: &VaultKey, account: &str, plaintext: &str) -> Sealed {
    let cipher = XChaCha20Poly1305::new((&key.0[..]).into());
    let mut nonce = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext.as_bytes(),
                aad: &aad(account),
            },
        )
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory data");
    Sealed {
        nonce: B64.encode(nonce),
        ciphertext: B64.encode(ct),
    }
}

pub fn open(key: &VaultKey, account: &str, sealed: &Sealed) -> Result<Secret, CryptoError> {
    let nonce = B64
        .decode(&sealed.nonce)
        .map_err(|_| CryptoError::Damaged("bad nonce"))?;
    if nonce.len() != 24 {
        return Err(CryptoError::Damaged("bad nonce length"));
    }
    let ct = B64
        .decode(&sealed.ciphertext)
        .map_err(|_| CryptoError::Damaged("bad ciphertext"))?;
    let cipher = XChaCha20Poly1305::new((&key.0[..]).into());
    let pt = Zeroizing::new(
        cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: &aad(account),
                },
            )
            .map_err(|_| CryptoError::Open)?,
    );
    let s = std::str::from_utf8(&pt).map_err(|_| CryptoError::Damaged("token is not UTF-8"))?;
    Ok(Secret::new(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Cheap parameters keep the unit tests fast; the real ones are above.
    fn quick(pw: &str) -> (PasswordVerifier, VaultKey) {
        new_password_with(pw, 64, 1, 1)
    }

    #[test]
    fn password_round_trip_and_constant_result() {
        let (v, key) = quick("correct horse");
        let k2 = check_password("correct horse", &v).unwrap().expect("right password");
        assert_eq!(k2.0[..], key.0[..]);
        assert!(check_password("wrong horse", &v).unwrap().is_none());
        assert!(!v.verifier.is_empty() && B64.decode(&v.verifier).unwrap() != key.0[..].to_vec());
    }

    #[test]
    fn sealed_token_bound_to_key_and_account() {
        let (_, key) = quick("pw");
        let s = seal(&key, "a@x", "refresh-123");
        assert!(!s.ciphertext.contains("refresh"));
        assert_eq!(open(&key, "a@x", &s).unwrap().expose(), "refresh-123");
        assert!(matches!(open(&key, "b@x", &s), Err(CryptoError::Open)));
        let (_, other) = quick("pw");
        assert!(matches!(open(&other, "a@x", &s), Err(CryptoError::Open)));
        let mut t = s.clone();
        t.ciphertext = B64.encode(b"garbage-garbage-garbage");
        assert!(open(&key, "a@x", &t).is_err());
    }

    #[test]
    fn hostile_parameters_refused() {
        let (mut v, _) = quick("pw");
        v.m_cost = u32::MAX;
        assert!(check_password("pw", &v).is_err());
    }
}

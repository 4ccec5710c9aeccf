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
use std::ops::RangeInclusive;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::secret::Secret;
use crate::sync;

/// OWASP's recommended Argon2id setting: 19 MiB, 2 passes, 1 lane (~30 ms).
pub const DEFAULT_M_COST: u32 = 19 * 1024;
pub const DEFAULT_T_COST: u32 = 2;
pub const DEFAULT_P_COST: u32 = 1;

/// The Argon2id costs of a password verifier: memory in KiB, passes, lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

/// What mailproxy writes for every new local password. Every version so far
/// has written exactly these, so every record on disk or in a database
/// carries them unless someone edited it.
pub const WRITTEN: KdfParams = KdfParams {
    m_cost: DEFAULT_M_COST,
    t_cost: DEFAULT_T_COST,
    p_cost: DEFAULT_P_COST,
};

/// What a stored verifier may ask for: from what older versions wrote
/// ([`WRITTEN`], the oldest setting still on disk) up to twice today's
/// memory and a few passes and lanes more. At the top that is 38 MiB and
/// about eight times the work of [`WRITTEN`] (~0.25 s), so a record edited
/// by whoever can write the store (a database row needs no store key to be
/// changed) can neither take gigabytes nor hold a KDF slot for minutes.
/// Anything outside is refused before a KDF runs.
pub const ACCEPTED_M_COST: RangeInclusive<u32> = WRITTEN.m_cost..=2 * WRITTEN.m_cost;
pub const ACCEPTED_T_COST: RangeInclusive<u32> = WRITTEN.t_cost..=4;
pub const ACCEPTED_P_COST: RangeInclusive<u32> = WRITTEN.p_cost..=4;

impl KdfParams {
    /// The first parameter outside the accepted window, if any.
    fn refused(&self) -> Option<(&'static str, u32, RangeInclusive<u32>)> {
        [
            ("m_cost", self.m_cost, ACCEPTED_M_COST),
            ("t_cost", self.t_cost, ACCEPTED_T_COST),
            ("p_cost", self.p_cost, ACCEPTED_P_COST),
        ]
        .into_iter()
        .find(|(_, v, range)| !range.contains(v))
    }
}

/// A verifier whose Argon2id parameters mailproxy does not accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamsRefused {
    /// `None` when the caller did not say which account it checks.
    pub account: Option<String>,
    pub param: &'static str,
    pub value: u32,
    pub accepted: RangeInclusive<u32>,
}

impl fmt::Display for ParamsRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.param == "m_cost" { " KiB" } else { "" };
        match &self.account {
            Some(a) => write!(f, "the password record of {a}")?,
            None => f.write_str("the password record")?,
        }
        write!(
            f,
            " asks for Argon2id {} = {}{unit}, outside the accepted {}..={}{unit}; ",
            self.param,
            self.value,
            self.accepted.start(),
            self.accepted.end()
        )?;
        match &self.account {
            Some(a) => write!(f, "set its local password again with `mailproxy login {a}`"),
            None => f.write_str("set the local password again with `mailproxy login`"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the vault record is damaged: {0}")]
    Damaged(&'static str),
    #[error("the sealed token cannot be opened with this key (wrong password or tampered file)")]
    Open,
    #[error("{0}")]
    Params(Box<ParamsRefused>),
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

impl PasswordVerifier {
    pub fn params(&self) -> KdfParams {
        KdfParams {
            m_cost: self.m_cost,
            t_cost: self.t_cost,
            p_cost: self.p_cost,
        }
    }
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
/// Only buffers no larger than [`WRITTEN`] needs are kept: a larger one
/// (a record within the accepted window but above today's setting) is
/// freed after its run, so the pool never holds more than 2 × 19 MiB.
static BLOCKS: std::sync::Mutex<Vec<Vec<argon2::Block>>> = std::sync::Mutex::new(Vec::new());
const POOLED_BUFFERS: usize = 2;
/// The most blocks a pooled buffer may hold: what [`WRITTEN`] needs (one
/// block per KiB).
const POOLED_BLOCKS: usize = WRITTEN.m_cost as usize;

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<argon2::Block>>> {
    sync::lock(&BLOCKS)
}

/// The Argon2id run itself, with whatever parameters it is given: callers
/// check stored parameters first ([`check_password`]).
fn master(password: &str, salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let params = Params::new(p.m_cost, p.t_cost, p.p_cost, Some(32))
        .map_err(|_| CryptoError::Damaged("bad Argon2 parameters"))?;
    let need = params.block_count();
    let poolable = need <= POOLED_BLOCKS;
    let mut blocks = if poolable { pool().pop() } else { None }.unwrap_or_default();
    blocks.resize(need, argon2::Block::default());
    let mut out = Zeroizing::new([0u8; 32]);
    let r = Argon2::new(Algorithm::Argon2id, Version::V0x13, params).hash_password_into_with_memory(
        password.as_bytes(),
        salt,
        &mut out[..],
        &mut blocks[..],
    );
    // The blocks hold password-derived state: wipe before anyone reuses
    // (or the allocator hands out) them.
    for b in blocks.iter_mut() {
        zeroize::Zeroize::zeroize(b);
    }
    if poolable && blocks.capacity() <= POOLED_BLOCKS {
        let mut pool = pool();
        if pool.len() < POOLED_BUFFERS {
            pool.push(blocks);
        }
    }
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
    new_password_with(password, WRITTEN)
}

fn new_password_with(password: &str, p: KdfParams) -> (PasswordVerifier, VaultKey) {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let mk = master(password, &salt, p).expect("mailproxy's own Argon2 parameters are valid");
    let (verifier, key) = split(&mk);
    let v = PasswordVerifier {
        kdf: "argon2id".into(),
        m_cost: p.m_cost,
        t_cost: p.t_cost,
        p_cost: p.p_cost,
        salt: B64.encode(salt),
        verifier: B64.encode(&verifier[..]),
    };
    (v, key)
}

/// Whether `account`'s stored verifier can be checked: a KDF mailproxy
/// knows, with parameters inside the accepted window ([`ACCEPTED_M_COST`],
/// [`ACCEPTED_T_COST`], [`ACCEPTED_P_COST`]). Cheap: call it before waiting
/// for a KDF slot, so a refused record costs no KDF run and no slot.
pub fn check_params(account: &str, v: &PasswordVerifier) -> Result<(), CryptoError> {
    match params_of(v) {
        Ok(_) => Ok(()),
        Err(CryptoError::Params(mut p)) => {
            p.account = Some(account.to_string());
            Err(CryptoError::Params(p))
        }
        Err(e) => Err(e),
    }
}

fn params_of(v: &PasswordVerifier) -> Result<KdfParams, CryptoError> {
    if v.kdf != "argon2id" {
        return Err(CryptoError::Damaged("unknown password KDF"));
    }
    let p = v.params();
    match p.refused() {
        Some((param, value, accepted)) => Err(CryptoError::Params(Box::new(ParamsRefused {
            account: None,
            param,
            value,
            accepted,
        }))),
        None => Ok(p),
    }
}

/// Checks `password` in constant time; on success returns the vault key.
/// Parameters outside the accepted window are refused without a KDF run
/// (see [`check_params`], which names the account).
/// CPU- and memory-heavy: call from a blocking thread.
pub fn check_password(password: &str, v: &PasswordVerifier) -> Result<Option<VaultKey>, CryptoError> {
    let params = params_of(v)?;
    let salt = B64.decode(&v.salt).map_err(|_| CryptoError::Damaged("bad salt"))?;
    let want = B64
        .decode(&v.verifier)
        .map_err(|_| CryptoError::Damaged("bad verifier"))?;
    let mk = master(password, &salt, params)?;
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

    // Cheap parameters keep the sealing tests fast; they never reach
    // `check_password`, which refuses them.
    fn quick(pw: &str) -> (PasswordVerifier, VaultKey) {
        new_password_with(
            pw,
            KdfParams {
                m_cost: 64,
                t_cost: 1,
                p_cost: 1,
            },
        )
    }

    fn kp(m_cost: u32, t_cost: u32, p_cost: u32) -> KdfParams {
        KdfParams { m_cost, t_cost, p_cost }
    }

    /// A verifier with these parameters (only they matter for a refusal).
    fn with(p: KdfParams) -> PasswordVerifier {
        PasswordVerifier {
            kdf: "argon2id".into(),
            m_cost: p.m_cost,
            t_cost: p.t_cost,
            p_cost: p.p_cost,
            salt: B64.encode([1u8; 16]),
            verifier: B64.encode([0u8; 32]),
        }
    }

    fn refusal(v: &PasswordVerifier) -> ParamsRefused {
        let started = std::time::Instant::now();
        let e = check_password("pw", v).map(|_| ()).unwrap_err();
        // A run with 2 GiB takes seconds; a refusal allocates nothing.
        assert!(
            started.elapsed() < std::time::Duration::from_millis(200),
            "refused without a KDF run"
        );
        match e {
            CryptoError::Params(p) => *p,
            e => panic!("{e}"),
        }
    }

    #[test]
    fn password_round_trip_and_constant_result() {
        let (v, key) = new_password("correct horse");
        assert_eq!(v.params(), WRITTEN);
        let k2 = check_password("correct horse", &v).unwrap().expect("right password");
        assert_eq!(k2.0[..], key.0[..]);
        assert!(check_password("wrong horse", &v).unwrap().is_none());
        assert!(!v.verifier.is_empty() && B64.decode(&v.verifier).unwrap() != key.0[..].to_vec());
    }

    #[test]
    fn a_verifier_written_by_earlier_versions_still_checks() {
        // As every version so far wrote it (19 MiB, 2 passes, 1 lane), with
        // a fixed salt: a change of the accepted window or of the KDF that
        // locked out existing records would fail here.
        let old: PasswordVerifier = serde_json::from_str(
            r#"{"kdf":"argon2id","m_cost":19456,"t_cost":2,"p_cost":1,
                "salt":"bWFpbHByb3h5LXYxLWthdA==",
                "verifier":"rAJ9S9iAM8ixg8YsQViOuSrfMOBmW6LujkhbSmEdswc="}"#,
        )
        .unwrap();
        check_params("a@x", &old).unwrap();
        assert!(check_password("correct horse", &old).unwrap().is_some());
        assert!(check_password("wrong horse", &old).unwrap().is_none());
    }

    #[test]
    fn the_accepted_window_holds_todays_parameters_and_its_own_edges() {
        for p in [WRITTEN, kp(38912, 2, 1)] {
            assert!(p.refused().is_none(), "{p:?}");
        }
        assert_eq!(ACCEPTED_M_COST, 19456..=38912);
        // The top corner of the window still runs (and is not pooled).
        let top = kp(*ACCEPTED_M_COST.end(), *ACCEPTED_T_COST.end(), *ACCEPTED_P_COST.end());
        let (v, key) = new_password_with("top", top);
        check_params("a@x", &v).unwrap();
        let k2 = check_password("top", &v).unwrap().expect("right password");
        assert_eq!(k2.0[..], key.0[..]);
        let bottom = kp(
            *ACCEPTED_M_COST.start(),
            *ACCEPTED_T_COST.start(),
            *ACCEPTED_P_COST.start(),
        );
        assert_eq!(bottom, WRITTEN, "the window starts at what mailproxy wrote");
    }

    #[test]
    fn parameters_outside_the_window_are_refused_without_a_kdf_run() {
        let cases = [
            (kp(2_097_152, 2, 1), "m_cost", 2_097_152),
            (kp(38913, 2, 1), "m_cost", 38913),
            (kp(19455, 2, 1), "m_cost", 19455),
            (kp(64, 2, 1), "m_cost", 64),
            (kp(19456, 64, 1), "t_cost", 64),
            (kp(19456, 5, 1), "t_cost", 5),
            (kp(19456, 1, 1), "t_cost", 1),
            (kp(19456, 2, 16), "p_cost", 16),
            (kp(19456, 2, 5), "p_cost", 5),
            (kp(u32::MAX, u32::MAX, u32::MAX), "m_cost", u32::MAX),
        ];
        for (params, param, value) in cases {
            let v = with(params);
            let r = refusal(&v);
            assert_eq!(
                (r.param, r.value, r.account.clone()),
                (param, value, None),
                "{params:?}"
            );
            let named = check_params("alice@example.org", &v).unwrap_err().to_string();
            assert!(named.contains("alice@example.org"), "{named}");
            assert!(named.contains(&format!("{param} = {value}")), "{named}");
            let range = match param {
                "m_cost" => "19456..=38912 KiB",
                "t_cost" => "2..=4",
                _ => "1..=4",
            };
            assert!(named.contains(range), "{named}");
        }
        let mut v = with(WRITTEN);
        v.kdf = "scrypt".into();
        assert!(matches!(check_password("pw", &v), Err(CryptoError::Damaged(_))));
        assert!(check_params("a@x", &v).is_err());
    }

    #[test]
    fn the_pool_keeps_no_buffer_larger_than_todays_parameters_need() {
        let big = kp(*ACCEPTED_M_COST.end(), 2, 1);
        for p in [WRITTEN, big, WRITTEN, big] {
            master("pw", b"0123456789abcdef", p).unwrap();
            let pool = pool();
            assert!(pool.len() <= POOLED_BUFFERS);
            assert!(
                pool.iter().all(|b| b.capacity() <= POOLED_BLOCKS),
                "{:?}",
                pool.iter().map(Vec::capacity).collect::<Vec<_>>()
            );
        }
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
}

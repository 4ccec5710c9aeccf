//! The account vault on disk: one JSON record per account under
//! `state_dir/accounts/`, each 0600 inside a 0700 directory.
//!
//! Records are written atomically (temp file, fsync, rename, fsync of the
//! directory): a crash at any moment leaves the old or the new record, never a
//! torn one. A record holds no secret in the clear: the refresh token is
//! sealed (see `crypto`), the local password only as a verifier.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crypto::{PasswordVerifier, Sealed};

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is accessible to other users (mode {mode:o}); run: chmod {want:o} {path}")]
    Permissions { path: PathBuf, mode: u32, want: u32 },
    #[error("{path} belongs to another user (uid {uid}); mailproxy keeps secrets only in files it owns")]
    Owner { path: PathBuf, uid: u32 },
    #[error("{path} is not a valid account record: {reason}; remove it and run `mailproxy login` again")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VaultError + '_ {
    move |source| VaultError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Everything mailproxy keeps about one OAuth account between runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountRecord {
    pub version: u32,
    pub account: String,
    /// Checks the local password; its Argon2id run also yields the vault key.
    /// Loaded as stored (the record stays usable for everything else), its
    /// parameters are checked against `crypto`'s accepted window before any
    /// KDF runs: a file, keyring or database record edited to ask for more
    /// is refused at the password check, naming the account.
    pub password: Option<PasswordVerifier>,
    /// The refresh token, sealed under the vault key.
    pub refresh_token: Option<Sealed>,
    /// Scopes the provider granted (not secret; shown by `mailproxy accounts`).
    #[serde(default)]
    pub scopes: Vec<String>,
    pub authorized_at: Option<u64>,
    pub last_refresh: Option<u64>,
    /// `"keyring"` when the refresh token is in the OS keyring instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_store: Option<StoreKind>,
    /// Grows by one with every write. A write based on an older record than
    /// the one on disk is dropped (see [`Vault::store_if`]), so a `revoke` or
    /// a new `login` always wins over a refresh that was in flight. Records
    /// written before this field existed read as generation 0.
    #[serde(default)]
    pub generation: u64,
    /// The current access token, sealed like the refresh token: only in the
    /// shared store, so an instance uses what another just refreshed
    /// instead of refreshing again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<SealedAccess>,
}

/// An access token shared between instances, and its lifetime (unix seconds).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SealedAccess {
    pub token: Sealed,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// Where a record's refresh token lives, when not sealed in the record.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Keyring,
    /// Sealed in the record under the store key (`store_key_file`), not
    /// under the local password's key.
    #[serde(rename = "store_key")]
    StoreKey,
}

/// What [`Vault::store_if`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Stored,
    /// The record on disk is not the one the write was based on (another
    /// process wrote or erased it meanwhile); nothing was written.
    Stale {
        on_disk: Option<u64>,
    },
}

/// Identity of a record file's current content, to notice a `mailproxy
/// login` made while `serve` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

#[derive(Clone, Debug)]
pub struct Vault {
    dir: PathBuf,
}

impl Vault {
    /// Opens (creating if needed) the vault under `state_dir`, refusing
    /// directories that other users can read or that we do not own.
    pub fn open(state_dir: &Path) -> Result<Vault, VaultError> {
        let dir = state_dir.join("accounts");
        for d in [state_dir, dir.as_path()] {
            match fs::metadata(d) {
                Ok(_) => check_private(d, 0o700)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(d)
                        .map_err(io(d))?;
                    fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(io(d))?;
                }
                Err(e) => {
                    return Err(VaultError::Io {
                        path: d.to_owned(),
                        source: e,
                    })
                }
            }
        }
        remove_stale_temp_files(&dir);
        Ok(Vault { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The record's file name: the account name with anything outside a safe
    /// set percent-encoded, so no name can escape the directory.
    pub fn path_of(&self, account: &str) -> PathBuf {
        let mut name = String::new();
        for b in account.to_lowercase().bytes() {
            if b.is_ascii_alphanumeric() || b"@_-+".contains(&b) || (b == b'.' && !name.is_empty()) {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        self.dir.join(format!("{name}.json"))
    }

    pub fn load(&self, account: &str) -> Result<Option<AccountRecord>, VaultError> {
        let path = self.path_of(account);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(VaultError::Io { path, source: e }),
        };
        check_private(&path, 0o600)?;
        let rec: AccountRecord = serde_json::from_slice(&text).map_err(|e| VaultError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if !rec.account.eq_ignore_ascii_case(account) {
            return Err(VaultError::Corrupt {
                path,
                reason: format!("it belongs to account `{}`", rec.account),
            });
        }
        Ok(Some(rec))
    }

    /// The account names of every record on disk (unreadable ones are
    /// left out: `load` reports them when the account is used).
    pub fn account_names(&self) -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct Name {
            account: String,
        }
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|t| serde_json::from_slice::<Name>(&t).ok())
            .map(|n| n.account)
            .collect();
        names.sort();
        names
    }

    pub fn stamp(&self, account: &str) -> Option<Stamp> {
        let m = fs::metadata(self.path_of(account)).ok()?;
        Some(Stamp {
            ino: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            len: m.len(),
        })
    }

    /// Replaces the record atomically and durably, whatever is on disk (an
    /// interactive `login`: the owner's word is final). The generation is
    /// set past the one on disk, so writes based on the old record lose.
    pub fn store(&self, rec: &AccountRecord) -> Result<u64, VaultError> {
        let _lock = self.lock()?;
        let on_disk = self.load(&rec.account).ok().flatten().map(|r| r.generation);
        let mut rec = rec.clone();
        rec.generation = on_disk.unwrap_or(0).max(rec.generation).saturating_add(1);
        self.write(&rec)?;
        Ok(rec.generation)
    }

    /// Writes `rec` only if the record on disk is still the one it was
    /// based on: generation `base` (`None`: no record). `before` runs under
    /// the same lock once the check passed (a keyring write that must not
    /// resurrect an erased account). On success `rec.generation` is `base + 1`.
    pub fn store_if<E: From<VaultError>>(
        &self,
        rec: &mut AccountRecord,
        base: Option<u64>,
        before: impl FnOnce() -> Result<(), E>,
    ) -> Result<Written, E> {
        let _lock = self.lock()?;
        let on_disk = self.load(&rec.account)?.map(|r| r.generation);
        if on_disk != base {
            return Ok(Written::Stale { on_disk });
        }
        before()?;
        rec.generation = base.unwrap_or(0).saturating_add(1);
        self.write(rec)?;
        Ok(Written::Stored)
    }

    fn write(&self, rec: &AccountRecord) -> Result<(), VaultError> {
        let path = self.path_of(&rec.account);
        let json = serde_json::to_vec_pretty(rec).expect("records always serialize");
        write_atomic(&path, &json)
    }

    /// Serialises compare-and-write across processes (`serve`, `login`,
    /// `revoke`, `passwd`): an advisory lock on `accounts/.lock`.
    fn lock(&self) -> Result<VaultLock, VaultError> {
        let path = self.dir.join(".lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        // Released when `f` is closed.
        f.lock().map_err(io(&path))?;
        Ok(VaultLock(f))
    }

    /// Removes the account's record; returns what was erased.
    pub fn erase(&self, account: &str) -> Result<Vec<PathBuf>, VaultError> {
        let _lock = self.lock()?;
        let path = self.path_of(account);
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.dir)?;
                Ok(vec![path])
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(VaultError::Io { path, source: e }),
        }
    }
}

/// Held while a compare-and-write runs; dropping it closes the file and
/// releases the lock.
struct VaultLock(#[allow(dead_code)] File);

/// A write killed before its rename leaves `.NAME.tmpPID` behind (sealed
/// data, but litter): remove those whose writer is gone.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('.')
            .filter(|_| name != ".lock")
            .and_then(|n| n.rsplit_once(".tmp"))
            .map(|(_, pid)| pid.to_string())
        else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// temp file (0600, same directory) → write → fsync → rename → fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), VaultError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io(path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> Result<(), VaultError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Refuses files and directories that other users could read or write, or
/// that belong to someone else.
pub fn check_private(path: &Path, want: u32) -> Result<(), VaultError> {
    let m = fs::metadata(path).map_err(io(path))?;
    let me = crate::sys::euid();
    if m.uid() != me {
        return Err(VaultError::Owner {
            path: path.to_owned(),
            uid: m.uid(),
        });
    }
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(VaultError::Permissions {
            path: path.to_owned(),
            mode,
            want,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> AccountRecord {
        AccountRecord {
            version: 1,
            account: name.into(),
            scopes: vec!["mail".into()],
            ..Default::default()
        }
    }

    #[test]
    fn store_load_erase_with_private_modes() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let v = Vault::open(&state).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(v.load("a@x").unwrap(), None);
        v.store(&rec("a@x")).unwrap();
        let p = v.path_of("a@x");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let mut want = rec("a@x");
        want.generation = 1;
        assert_eq!(v.load("A@x").unwrap(), Some(want));
        let s1 = v.stamp("a@x").unwrap();
        let mut r = rec("a@x");
        r.last_refresh = Some(5);
        v.store(&r).unwrap();
        assert_ne!(v.stamp("a@x").unwrap(), s1);
        assert_eq!(v.erase("a@x").unwrap(), vec![p.clone()]);
        assert!(!p.exists());
        let left: Vec<_> = fs::read_dir(v.dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".lock")
            .collect();
        assert!(left.is_empty(), "no temp files left behind: {left:?}");
    }

    #[test]
    fn a_write_based_on_an_older_record_is_dropped() {
        let t = tempfile::tempdir().unwrap();
        let v = Vault::open(&t.path().join("s")).unwrap();
        assert_eq!(v.store(&rec("a@x")).unwrap(), 1);
        let mut mine = v.load("a@x").unwrap().unwrap();
        // Another process logs in again meanwhile.
        assert_eq!(v.store(&rec("a@x")).unwrap(), 2);
        mine.last_refresh = Some(9);
        let r = v.store_if::<VaultError>(&mut mine, Some(1), || Ok(())).unwrap();
        assert_eq!(r, Written::Stale { on_disk: Some(2) });
        assert_eq!(v.load("a@x").unwrap().unwrap().last_refresh, None);
        // Based on the current one, it goes through.
        let r = v.store_if::<VaultError>(&mut mine, Some(2), || Ok(())).unwrap();
        assert_eq!((r, mine.generation), (Written::Stored, 3));
        // Erased: a write based on the old record must not resurrect it.
        v.erase("a@x").unwrap();
        let mut ran = false;
        let r = v
            .store_if::<VaultError>(&mut mine, Some(3), || {
                ran = true;
                Ok(())
            })
            .unwrap();
        assert_eq!(r, Written::Stale { on_disk: None });
        assert!(!ran && v.load("a@x").unwrap().is_none());
    }

    #[test]
    fn old_records_without_a_generation_still_load() {
        let t = tempfile::tempdir().unwrap();
        let v = Vault::open(&t.path().join("s")).unwrap();
        write_atomic(
            &v.path_of("a@x"),
            br#"{"version":1,"account":"a@x","password":null,"refresh_token":null,"scopes":[],"authorized_at":null,"last_refresh":null,"token_store":"keyring"}"#,
        )
        .unwrap();
        let r = v.load("a@x").unwrap().unwrap();
        assert_eq!((r.generation, r.token_store), (0, Some(StoreKind::Keyring)));
    }

    #[test]
    fn a_record_with_edited_kdf_parameters_loads_but_its_password_is_not_checked() {
        let t = tempfile::tempdir().unwrap();
        let v = Vault::open(&t.path().join("s")).unwrap();
        write_atomic(
            &v.path_of("a@x"),
            br#"{"version":1,"account":"a@x","password":{"kdf":"argon2id","m_cost":2097152,"t_cost":2,"p_cost":1,"salt":"AAAAAAAAAAAAAAAAAAAAAA==","verifier":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="},"refresh_token":null,"scopes":[],"authorized_at":null,"last_refresh":null,"token_store":"store_key"}"#,
        )
        .unwrap();
        // Everything else in the record stays usable (`accounts`, `revoke`,
        // a token sealed under the store key)...
        let r = v.load("a@x").unwrap().unwrap();
        assert_eq!(r.token_store, Some(StoreKind::StoreKey));
        // ...but its password is refused before any KDF runs.
        let e = crate::crypto::check_params("a@x", r.password.as_ref().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the password record of a@x") && e.contains("m_cost = 2097152 KiB"),
            "{e}"
        );
    }

    #[test]
    fn stale_temp_files_of_dead_writers_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("s");
        let v = Vault::open(&state).unwrap();
        let dead = v.dir().join(".a@x.json.tmp999999999");
        let mine = v.dir().join(format!(".b@x.json.tmp{}", std::process::id()));
        fs::write(&dead, b"x").unwrap();
        fs::write(&mine, b"x").unwrap();
        Vault::open(&state).unwrap();
        assert!(!dead.exists());
        assert!(mine.exists(), "a live writer's file is left alone");
    }

    #[test]
    fn hostile_names_stay_inside() {
        let t = tempfile::tempdir().unwrap();
        let v = Vault::open(&t.path().join("s")).unwrap();
        for n in ["../../etc/passwd", "..", "a/b", ".hidden"] {
            let p = v.path_of(n);
            assert_eq!(p.parent().unwrap(), v.dir(), "{n}");
            assert!(!p.file_name().unwrap().to_string_lossy().starts_with('.'), "{n}");
        }
    }

    #[test]
    fn refuses_readable_files_and_dirs() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("s");
        let v = Vault::open(&state).unwrap();
        v.store(&rec("a@x")).unwrap();
        fs::set_permissions(v.path_of("a@x"), fs::Permissions::from_mode(0o644)).unwrap();
        let e = v.load("a@x").unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        let e = Vault::open(&state).unwrap_err().to_string();
        assert!(e.contains("chmod 700"), "{e}");
    }

    #[test]
    fn corrupt_record_is_named() {
        let t = tempfile::tempdir().unwrap();
        let v = Vault::open(&t.path().join("s")).unwrap();
        write_atomic(&v.path_of("a@x"), b"{not json").unwrap();
        let e = v.load("a@x").unwrap_err().to_string();
        assert!(e.contains("not a valid account record"), "{e}");
    }
}

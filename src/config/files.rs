//! The config file and the key files it names, judged on disk at load.
//!
//! The config decides where passwords go, so only its owner (or root) may
//! write it; when it holds a secret, only its owner may read it. Private
//! keys for client assertions must be private too. Every refusal names the
//! file and the command that fixes it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Config, ConfigError, ConfigProblem, ServiceAccountKey};

/// Who owns a file and its permission bits, as read from the open file.
#[derive(Clone, Copy, Debug)]
pub(super) struct FileFacts {
    pub uid: u32,
    pub mode: u32,
}

impl FileFacts {
    fn of(file: &File) -> std::io::Result<FileFacts> {
        let m = file.metadata()?;
        Ok(FileFacts {
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        })
    }
}

fn euid() -> u32 {
    crate::sys::euid()
}

fn refuse(path: &Path, key: Option<String>, message: String) -> ConfigError {
    ConfigError {
        path: path.to_owned(),
        line: None,
        key,
        message,
    }
}

/// Reads the config, judging owner and write permission on the opened file
/// itself (so they describe the text that is read, not a file swapped in
/// meanwhile).
pub(super) fn read_config(path: &Path) -> Result<(String, FileFacts), ConfigError> {
    let cannot = |e: std::io::Error| refuse(path, None, format!("cannot read the config file: {e}"));
    let mut file = File::open(path).map_err(cannot)?;
    let facts = FileFacts::of(&file).map_err(cannot)?;
    judge_config_file(path, facts, euid()).map_err(|m| refuse(path, None, m.to_string()))?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(cannot)?;
    Ok((text, facts))
}

/// A config other users can change, or one owned by another user (who could
/// change it), could send passwords anywhere.
fn judge_config_file(path: &Path, f: FileFacts, me: u32) -> Result<(), ConfigProblem> {
    let path = path.to_owned();
    if f.uid != me && f.uid != 0 {
        return Err(ConfigProblem::ConfigOwner { path, uid: f.uid, me });
    }
    if f.mode & 0o022 != 0 {
        return Err(ConfigProblem::ConfigWritable {
            path,
            mode: f.mode & 0o777,
        });
    }
    Ok(())
}

/// Judged from the parsed config, whatever the TOML spelling (quoted keys,
/// dotted keys, inline tables).
pub(super) fn check_secrets_private(path: &Path, f: FileFacts, config: &Config) -> Result<(), ConfigError> {
    judge_secrets(path, f, &config.secret_keys()).map_err(|m| refuse(path, None, m.to_string()))
}

fn judge_secrets(path: &Path, f: FileFacts, secret_keys: &[String]) -> Result<(), ConfigProblem> {
    if secret_keys.is_empty() || f.mode & 0o044 == 0 {
        return Ok(());
    }
    Err(ConfigProblem::SecretsReadable {
        path: path.to_owned(),
        keys: secret_keys.to_vec(),
        mode: f.mode & 0o777,
    })
}

/// Every `client_key` (the private key that signs client assertions) and
/// `service_account_key` must exist, belong to this user and be unreadable
/// by others; a service account key must also be one Google issues.
pub(super) fn check_key_files(config: &Config) -> Result<(), ConfigError> {
    let me = euid();
    for a in config.entries() {
        let Some(o) = a.oauth() else { continue };
        for (field, path) in [
            ("client_key", o.client_key.as_deref()),
            ("service_account_key", o.service_account_key.as_deref()),
        ] {
            let Some(key_path) = path else { continue };
            let key = Some(format!("accounts.\"{}\".{field}", a.name));
            let facts = File::open(key_path).and_then(|f| FileFacts::of(&f)).map_err(|e| {
                refuse(
                    &config.path,
                    key.clone(),
                    format!("cannot read {}: {e}", key_path.display()),
                )
            })?;
            judge_key_file(key_path, facts, me).map_err(|m| refuse(&config.path, key.clone(), m.to_string()))?;
            if field == "service_account_key" {
                ServiceAccountKey::load(key_path).map_err(|m| refuse(&config.path, key, m.to_string()))?;
            }
        }
    }
    Ok(())
}

/// `database_url`'s `sslrootcert` must hold at least one certificate: a
/// mistyped path fails here, not at the first connection.
pub(super) fn check_database_ca(config: &Config) -> Result<(), ConfigError> {
    let Some(ca) = config.fleet.database_tls.as_ref().and_then(|t| t.root_cert.as_deref()) else {
        return Ok(());
    };
    crate::tls::read_certs(ca).map(|_| ()).map_err(|e| ConfigError {
        path: config.path.clone(),
        line: config.fleet.database_line,
        key: Some("server.database_url".into()),
        message: format!("sslrootcert: {e}"),
    })
}

fn judge_key_file(path: &Path, f: FileFacts, me: u32) -> Result<(), ConfigProblem> {
    let path = path.to_owned();
    if f.uid != me {
        return Err(ConfigProblem::KeyOwner { path, uid: f.uid, me });
    }
    if f.mode & 0o066 != 0 {
        return Err(ConfigProblem::KeyExposed {
            path,
            mode: f.mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn facts(uid: u32, mode: u32) -> FileFacts {
        FileFacts { uid, mode }
    }

    const P: &str = "/home/u/.config/mailproxy/config.toml";

    #[test]
    fn config_owner_must_be_the_user_or_root() {
        let p = Path::new(P);
        judge_config_file(p, facts(1000, 0o600), 1000).unwrap();
        judge_config_file(p, facts(0, 0o644), 1000).unwrap();
        judge_config_file(p, facts(0, 0o600), 0).unwrap();
        let e = judge_config_file(p, facts(1001, 0o600), 1000).unwrap_err().to_string();
        assert!(e.contains("uid 1001") && e.contains(&format!("chown 1000 {P}")), "{e}");
        // Running as root does not make another user's file acceptable.
        let e = judge_config_file(p, facts(1000, 0o600), 0).unwrap_err().to_string();
        assert!(e.contains(&format!("chown 0 {P}")), "{e}");
    }

    #[test]
    fn config_others_can_write_is_always_refused() {
        let p = Path::new(P);
        for mode in [0o620, 0o602, 0o666, 0o622] {
            let e = judge_config_file(p, facts(1000, mode), 1000).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {P}")), "{mode:o}: {e}");
        }
        judge_config_file(p, facts(1000, 0o644), 1000).unwrap();
    }

    #[test]
    fn secrets_need_a_private_file() {
        let p = Path::new(P);
        let keys = vec!["accounts.\"a@b\".client_secret".to_string()];
        for mode in [0o640, 0o604, 0o644] {
            let e = judge_secrets(p, facts(1000, mode), &keys).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {P}")) && e.contains(&keys[0]), "{e}");
        }
        judge_secrets(p, facts(1000, 0o600), &keys).unwrap();
        judge_secrets(p, facts(1000, 0o400), &keys).unwrap();
        judge_secrets(p, facts(1000, 0o644), &[]).unwrap();
    }

    #[test]
    fn key_file_must_be_private_and_owned() {
        let p = Path::new("/home/u/app.key");
        judge_key_file(p, facts(1000, 0o600), 1000).unwrap();
        judge_key_file(p, facts(1000, 0o400), 1000).unwrap();
        for mode in [0o640, 0o604, 0o644, 0o620] {
            let e = judge_key_file(p, facts(1000, mode), 1000).unwrap_err().to_string();
            assert!(e.contains("chmod 600 /home/u/app.key"), "{mode:o}: {e}");
        }
        // Not even root's: the key must belong to the user that uses it.
        let e = judge_key_file(p, facts(0, 0o600), 1000).unwrap_err().to_string();
        assert!(e.contains("chown 1000 /home/u/app.key"), "{e}");
    }

    /// The whole path through `Config::load`, with real files (the tests run
    /// as the files' owner, so the owner check passes here).
    #[test]
    fn load_checks_client_key_files() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("app.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::write(t.path().join("app.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let cfg = t.path().join("c.toml");
        std::fs::write(
            &cfg,
            "[accounts.\"app@contoso.com\"]\nprovider = \"microsoft\"\ntenant = \"contoso.com\"\n\
             flow = \"client_credentials\"\nclient_id = \"id\"\nclient_certificate = \"app.crt\"\nclient_key = \"app.key\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::load(&cfg).unwrap_err();
        let s = e.to_string();
        assert_eq!(e.key.as_deref(), Some("accounts.\"app@contoso.com\".client_key"));
        assert!(s.contains(&format!("chmod 600 {}", key.display())), "{s}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        Config::load(&cfg).unwrap();
        std::fs::remove_file(&key).unwrap();
        let s = Config::load(&cfg).unwrap_err().to_string();
        assert!(
            s.contains("cannot read") && s.contains(&key.display().to_string()),
            "{s}"
        );
    }
}

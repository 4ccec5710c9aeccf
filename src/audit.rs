//! The audit trail: one JSON line per consent, refresh failure, revocation
//! and erasure, with a timestamp, the account, scopes and outcome. Never a
//! secret: callers pass only names, scopes and provider error codes.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Serialize, Debug, Clone)]
pub struct Entry {
    pub ts: u64,
    pub account: String,
    pub event: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    pub outcome: String,
}

impl Entry {
    pub fn new(account: &str, event: &'static str, outcome: impl Into<String>) -> Entry {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Entry {
            ts,
            account: account.to_string(),
            event,
            scopes: vec![],
            outcome: outcome.into(),
        }
    }

    pub fn scopes(mut self, s: &[String]) -> Entry {
        self.scopes = s.to_vec();
        self
    }
}

/// Appends entries from a dedicated thread, so async workers never block on
/// the file.
#[derive(Clone)]
pub struct Audit {
    tx: Option<mpsc::Sender<Entry>>,
    path: PathBuf,
}

impl Audit {
    pub fn start(path: &Path) -> Audit {
        let (tx, rx) = mpsc::channel::<Entry>();
        let p = path.to_owned();
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                for e in rx {
                    if let Err(err) = append(&p, &e) {
                        tracing::error!(path = %p.display(), error = %err, "cannot write the audit log");
                    }
                }
            })
            .expect("spawn audit thread");
        Audit {
            tx: Some(tx),
            path: path.to_owned(),
        }
    }

    /// Writes synchronously (for the short-lived CLI commands).
    pub fn direct(path: &Path) -> Audit {
        Audit {
            tx: None,
            path: path.to_owned(),
        }
    }

    pub fn record(&self, e: Entry) {
        tracing::info!(account = %e.account, event = e.event, outcome = %e.outcome, "audit");
        match &self.tx {
            Some(tx) => {
                let _ = tx.send(e);
            }
            None => {
                if let Err(err) = append(&self.path, &e) {
                    eprintln!("mailproxy: cannot write the audit log {}: {err}", self.path.display());
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn append(path: &Path, e: &Entry) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
    line.push(b'\n');
    f.write_all(&line)?;
    f.sync_data()
}

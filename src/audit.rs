//! The audit trail: one JSON line per consent, refresh failure, revocation
//! and erasure, with a timestamp, the account, scopes and outcome. Never a
//! secret: callers pass only names, scopes and provider error codes.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
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

/// Entries that may wait for the writer: each is fsynced, so a burst
/// (refresh failures for every account while the disk stalls) can outrun
/// it; beyond this bound entries are dropped and counted rather than
/// queued without end, and the writer notes how many once it catches up.
pub const MAX_QUEUED: usize = 4096;

/// Appends entries from a dedicated thread, so async workers never block on
/// the file.
#[derive(Clone)]
pub struct Audit {
    tx: Option<mpsc::SyncSender<Entry>>,
    /// Entries dropped because the queue was full, not yet noted in the file.
    dropped: Arc<AtomicU64>,
    path: PathBuf,
}

impl Audit {
    pub fn start(path: &Path) -> Audit {
        let (audit, rx) = Audit::queued(path, MAX_QUEUED);
        let (p, dropped) = (path.to_owned(), audit.dropped.clone());
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || write_all(&p, rx, &dropped))
            .expect("spawn audit thread");
        audit
    }

    /// A queue of `cap` entries and its receiving end, for a writer to drain.
    fn queued(path: &Path, cap: usize) -> (Audit, mpsc::Receiver<Entry>) {
        let (tx, rx) = mpsc::sync_channel::<Entry>(cap);
        let audit = Audit {
            tx: Some(tx),
            dropped: Arc::default(),
            path: path.to_owned(),
        };
        (audit, rx)
    }

    /// Writes synchronously (for the short-lived CLI commands).
    pub fn direct(path: &Path) -> Audit {
        Audit {
            tx: None,
            dropped: Arc::default(),
            path: path.to_owned(),
        }
    }

    pub fn record(&self, e: Entry) {
        tracing::info!(account = %e.account, event = e.event, outcome = %e.outcome, "audit");
        match &self.tx {
            Some(tx) => {
                if let Err(mpsc::TrySendError::Full(e)) = tx.try_send(e) {
                    if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::error!(account = %e.account, event = e.event, "the audit log's writer is behind; entries are dropped until it catches up");
                    }
                }
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

/// The writer: every entry in turn, and after each, how many were dropped
/// meanwhile (as an entry of its own).
fn write_all(path: &Path, entries: impl IntoIterator<Item = Entry>, dropped: &AtomicU64) {
    let write = |e: &Entry| {
        if let Err(err) = append(path, e) {
            tracing::error!(path = %path.display(), error = %err, "cannot write the audit log");
        }
    };
    for e in entries {
        write(&e);
        let n = dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            write(&Entry::new(
                "-",
                "audit_dropped",
                format!("{n} entries dropped: the writer was behind"),
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Up to the bound every entry is queued and written; past it the
    /// extra ones are dropped, and the file says how many.
    #[test]
    fn the_queue_is_bounded_and_says_what_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (audit, rx) = Audit::queued(&path, 8);
        for i in 0..8 {
            audit.record(Entry::new(&format!("a{i}"), "consent", "authorised"));
        }
        assert_eq!(
            audit.dropped.load(Ordering::Relaxed),
            0,
            "within the bound nothing is dropped"
        );
        for i in 8..13 {
            audit.record(Entry::new(&format!("a{i}"), "consent", "authorised"));
        }
        assert_eq!(audit.dropped.load(Ordering::Relaxed), 5);
        write_all(&path, rx.try_iter(), &audit.dropped);
        let got = lines(&path);
        let accounts: Vec<&str> = got.iter().map(|v| v["account"].as_str().unwrap()).collect();
        assert_eq!(accounts, ["a0", "-", "a1", "a2", "a3", "a4", "a5", "a6", "a7"]);
        assert_eq!(got[1]["event"], "audit_dropped");
        assert_eq!(got[1]["outcome"], "5 entries dropped: the writer was behind");
        // Caught up: the next entry is queued and written, nothing dropped.
        audit.record(Entry::new("after", "revoked", "revoked at the provider"));
        write_all(&path, rx.try_iter(), &audit.dropped);
        let got = lines(&path);
        assert_eq!(got.len(), 10);
        assert_eq!(got[9]["account"], "after");
    }
}

//! The control socket: while `serve` runs it listens on
//! `state_dir/control.sock` (0600, owner only), and `accounts`, `check`,
//! `login`, `passwd`, `revoke` and `token` ask it instead of reading the
//! vault, so `check` needs no password, only one process ever writes the
//! vault, and `token` shares the proxy's cached token and its refreshes.
//!
//! The protocol is JSON lines: the command sends one [`Request`], `serve`
//! answers with [`Reply`] lines until `done` or `error`; an `ask` reply
//! wants one [`Answer`] line (a local password) back.

pub mod client;
pub mod grant;
pub(crate) mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tokens::{AccountStatus, Resource};
pub use crate::tokens::{CheckOutcome, Handed};

/// The socket's file name inside `state_dir`.
pub const SOCKET: &str = "control.sock";

/// Longest request or answer line `serve` reads.
pub const MAX_LINE: u64 = 64 * 1024;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} belongs to user {owner}, not to you: refusing to talk to it (remove it if no mailproxy serve of yours runs)", .path.display())]
    NotOwner { path: PathBuf, owner: u32 },
    #[error("another mailproxy serve is already running with the state directory {}; stop it first", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("the running mailproxy serve answered something unexpected: {0}")]
    Protocol(String),
}

/// What a command asks the running `serve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Accounts,
    Check {
        account: Option<String>,
    },
    Login {
        account: String,
        device: bool,
        timeout: u64,
    },
    Passwd {
        account: String,
    },
    Revoke {
        account: String,
    },
    /// Re-read the config, as SIGHUP does (`mailproxy add` uses it).
    Reload,
    /// An access token with at least `min_life_secs` left, for the owner's
    /// own OAuth clients (`mailproxy token`); answered to the owner's uid only.
    Token {
        account: String,
        min_life_secs: u64,
        /// Which of the account's tokens (mail when absent: older clients).
        #[serde(default)]
        resource: Resource,
    },
}

/// One line `serve` sends back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Text for the person: on stdout when `stdout`, else on stderr.
    Say {
        text: String,
        stdout: bool,
    },
    /// An address for the person to open in a browser.
    Open {
        url: String,
    },
    /// Send the account's local password (`new`: one being set, typed twice
    /// on a terminal).
    Ask {
        new: bool,
    },
    Accounts {
        rows: Vec<AccountStatus>,
    },
    Checked {
        rows: Vec<CheckRow>,
    },
    /// The answer to [`Request::Token`]. Never logged.
    Token {
        token: Handed,
    },
    /// The command is over; its exit status.
    Done {
        code: u8,
    },
    Error {
        message: String,
    },
}

/// The answer to [`Reply::Ask`]. Never logged.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    pub password: String,
}

impl Drop for Answer {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.password);
    }
}

/// One account's line of `mailproxy check`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckRow {
    pub account: String,
    pub outcome: CheckOutcome,
}

impl CheckRow {
    /// The line `mailproxy check` prints, the same with or without `serve`.
    pub fn line(&self) -> String {
        let name = &self.account;
        match &self.outcome {
            CheckOutcome::Ok { valid_for } => {
                format!("{name}: ok: new access token valid for {}", human_secs(*valid_for))
            }
            CheckOutcome::NeedsLogin { why } => format!("{name}: needs login: {why}"),
            CheckOutcome::NeedsAction { why } => format!("{name}: needs action: {why}"),
            CheckOutcome::Temporary { why } => format!("{name}: temporarily failing: {why}"),
        }
    }
}

/// A duration for people: `42s`, `17m`, `5h`, `3d`.
pub fn human_secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_as_one_json_line() {
        let r = Request::Check { account: None };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"command":"check","account":null}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let d = Reply::Done { code: 2 };
        assert_eq!(serde_json::to_string(&d).unwrap(), r#"{"reply":"done","code":2}"#);
        assert!(serde_json::from_str::<Request>(r#"{"command":"rm -rf"}"#).is_err());
    }

    #[test]
    fn check_lines_and_codes() {
        let row = |o| CheckRow {
            account: "a@b".into(),
            outcome: o,
        };
        let ok = row(CheckOutcome::Ok { valid_for: 3599 });
        assert_eq!(ok.line(), "a@b: ok: new access token valid for 59m");
        assert_eq!(ok.outcome.code(), 0);
        let t = row(CheckOutcome::Temporary { why: "x".into() });
        assert_eq!(
            (t.line().as_str(), t.outcome.code()),
            ("a@b: temporarily failing: x", 2)
        );
        let n = row(CheckOutcome::NeedsAction { why: "y".into() });
        assert_eq!((n.line().as_str(), n.outcome.code()), ("a@b: needs action: y", 1));
    }
}

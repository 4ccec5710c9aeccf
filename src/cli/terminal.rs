//! What the commands read from and hand to the person at the terminal:
//! the local password, a browser to open.

use std::io::{BufRead, IsTerminal};

use anyhow::{bail, Context, Result};

use crate::secret::Secret;
use crate::tokens::offline::OfflineError;

/// The local password: typed on a terminal (twice when it is being set),
/// else the first line of stdin.
pub(super) fn read_password(account: &str, new: bool) -> Result<Secret> {
    let pw = if std::io::stdin().is_terminal() {
        let prompt = if new {
            format!("Local password for {account} (what your mail client will send to mailproxy): ")
        } else {
            format!("Local password of {account}: ")
        };
        let a = Secret::new(rpassword::prompt_password(prompt)?);
        if new {
            let b = Secret::new(rpassword::prompt_password("Repeat it: ")?);
            if a != b {
                bail!("the two passwords differ");
            }
        }
        a
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the local password from stdin")?;
        let pw = Secret::new(line.trim_end_matches(['\r', '\n']).to_string());
        zeroize::Zeroize::zeroize(&mut line);
        pw
    };
    if pw.is_empty() {
        bail!("the local password must not be empty");
    }
    Ok(pw)
}

/// Asks for the local password, as `tokens::offline` needs it.
pub(super) fn ask_password(account: &str) -> impl FnOnce() -> Result<Secret, OfflineError> + '_ {
    move || read_password(account, false).map_err(|e| OfflineError::Input(format!("{e:#}")))
}

pub(super) fn open_browser(url: &str) {
    let _ = try_open_browser(url);
}

/// Hands `url` to the desktop's opener (`xdg-open`, `open` on macOS)
/// without waiting for the browser; an error when there is no opener.
pub(super) fn try_open_browser(url: &str) -> std::io::Result<()> {
    let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
    std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{opener}: {e}")))
}

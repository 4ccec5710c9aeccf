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

/// Opens `url` for the login flows, which print it too: a browser that
/// does not start is no error there.
pub(super) fn open_browser(url: &str) {
    let _ = try_open_browser(url);
}

/// Hands `url` to the person's browser: each command in `$BROWSER` (a
/// `:`-separated list, `%s` standing for the URL, as xdg-utils read it),
/// then the desktop's opener (`xdg-open`; `open` on macOS). An error names
/// every command tried and what to set.
pub(super) fn try_open_browser(url: &str) -> Result<()> {
    let mut tried = Vec::new();
    for cmd in openers(std::env::var("BROWSER").ok().as_deref(), url) {
        match start(&cmd) {
            Ok(()) => return Ok(()),
            Err(e) => tried.push(format!("{}: {e}", cmd[0])),
        }
    }
    bail!(
        "no browser could be started ({}): set BROWSER to your browser's command (e.g. BROWSER=firefox) or install xdg-open (Debian: apt install xdg-utils)",
        tried.join("; ")
    )
}

/// The commands to try for `url`, `$BROWSER`'s first.
fn openers(browser: Option<&str>, url: &str) -> Vec<Vec<String>> {
    let mut all: Vec<Vec<String>> = browser
        .unwrap_or_default()
        .split(':')
        .filter_map(|entry| {
            let mut words: Vec<String> = entry.split_whitespace().map(|w| w.replace("%s", url)).collect();
            if !entry.contains("%s") && !words.is_empty() {
                words.push(url.to_string());
            }
            (!words.is_empty()).then_some(words)
        })
        .collect();
    let desktop = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
    all.push(vec![desktop.to_string(), url.to_string()]);
    all
}

/// Starts `cmd` without waiting for the browser: one that fails within a
/// second (no display, no handler) counts as not started.
fn start(cmd: &[String]) -> std::io::Result<()> {
    let mut child = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    for _ in 0..20 {
        match child.try_wait()? {
            Some(s) if s.success() => return Ok(()),
            Some(s) => return Err(std::io::Error::other(format!("it ended with {s}"))),
            None => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browser_entries_come_first_with_the_url_in_place_of_percent_s() {
        let url = "http://127.0.0.1:8025/";
        let all = openers(Some("firefox --new-window:w3m -o x=%s::"), url);
        assert_eq!(all[0], ["firefox", "--new-window", url]);
        assert_eq!(all[1], ["w3m", "-o", &format!("x={url}")]);
        assert_eq!(all.len(), 3, "then the desktop's opener: {all:?}");
        assert_eq!(openers(None, url).len(), 1);
    }
}

//! Feedback while `mailproxy login` waits for a person: a spinner with the
//! time spent and the time allowed, the device code printed large, and
//! Ctrl-C that cancels cleanly. Only on a terminal: when stderr is a pipe
//! or a file, the output stays the plain lines scripts read.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Exit status of a command cancelled with Ctrl-C (128 + SIGINT).
pub const CANCELED_EXIT: u8 = 130;

fn terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// While held, Ctrl-C (SIGINT) ends the command cleanly: `on_cancel` runs
/// (the audit entry), a sentence says nothing was stored, and the process
/// exits with [`CANCELED_EXIT`]. Dropped before anything is stored, so a
/// Ctrl-C can never interrupt a write (it is ignored from then on).
pub struct CancelOnCtrlC(tokio::task::JoinHandle<()>);

impl CancelOnCtrlC {
    pub fn arm(account: &str, on_cancel: impl FnOnce() + Send + 'static) -> std::io::Result<CancelOnCtrlC> {
        let account = account.to_string();
        // Registered now, not when the task first runs: no SIGINT falls in between.
        #[cfg(unix)]
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let task = tokio::spawn(async move {
            #[cfg(unix)]
            let got = sigint.recv().await.is_some();
            #[cfg(not(unix))]
            let got = tokio::signal::ctrl_c().await.is_ok();
            if got {
                on_cancel();
                eprintln!("\nmailproxy: login cancelled; nothing was stored for {account}");
                std::process::exit(CANCELED_EXIT.into());
            }
        });
        Ok(CancelOnCtrlC(task))
    }
}

impl Drop for CancelOnCtrlC {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A spinner on stderr saying what we wait for, with elapsed/allowed time.
/// Does nothing when stderr is not a terminal.
pub struct Waiting {
    bar: Option<ProgressBar>,
}

impl Waiting {
    pub fn start(what: &str, timeout: Duration) -> Waiting {
        if !terminal() {
            return Waiting { bar: None };
        }
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed} of {prefix}; Ctrl-C cancels)")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = ProgressBar::new_spinner()
            .with_style(style)
            .with_prefix(human(timeout))
            .with_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Waiting { bar: Some(bar) }
    }

    /// Prints a line without garbling the spinner.
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// `15m`, `90s`, `1h 30m`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h {m}m"),
    }
}

/// What the device flow prints: on a terminal the code large and framed
/// under the address; otherwise the one sentence scripts parse.
pub fn device_instructions(account: &str, uri: &str, code: &str, complete: Option<&str>) -> String {
    if !terminal() {
        let mut s = format!("To authorise {account}, open {uri} on any device and enter the code {code}\n");
        if let Some(c) = complete {
            s.push_str(&format!("\n(or open {c})\n"));
        }
        return s;
    }
    big_code(account, uri, code, complete)
}

fn big_code(account: &str, uri: &str, code: &str, complete: Option<&str>) -> String {
    // Spaced out so it reads well from across a desk: "A B C D - E F G H".
    let spaced: String = code
        .chars()
        .map(|c| format!("{c} "))
        .collect::<String>()
        .trim_end()
        .to_string();
    let width = spaced.chars().count() + 4;
    let line = "─".repeat(width);
    let mut s = format!(
        "\nTo authorise {account}, open this address on any device:\n\n    \x1b[1m{uri}\x1b[0m\n\nand enter the code:\n\n    ┌{line}┐\n    │  \x1b[1m{spaced}\x1b[0m  │\n    └{line}┘\n"
    );
    if let Some(c) = complete {
        s.push_str(&format!("\n(or open {c}, which fills in the code)\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_like_people_write_them() {
        assert_eq!(human(Duration::from_secs(45)), "45s");
        assert_eq!(human(Duration::from_secs(900)), "15m");
        assert_eq!(human(Duration::from_secs(90)), "1m 30s");
        assert_eq!(human(Duration::from_secs(5400)), "1h 30m");
    }

    #[test]
    fn the_big_code_is_framed_and_complete() {
        let s = big_code("a@b", "https://example.org/device", "WDJB-MJHT", None);
        assert!(s.contains("https://example.org/device"), "{s}");
        assert!(s.contains("W D J B - M J H T"), "{s}");
        let top = s.lines().find(|l| l.contains('┌')).unwrap();
        let mid = s.lines().find(|l| l.contains('│')).unwrap();
        let visible = |l: &str| l.replace("\x1b[1m", "").replace("\x1b[0m", "").chars().count();
        assert_eq!(visible(top), visible(mid), "{s}");
    }
}

//! `mailproxy login` while it waits for a person: Ctrl-C cancels cleanly
//! (nothing stored, a sentence says so, exit status 130, the redirect
//! listener closed), and on a terminal a spinner says what it waits for and
//! the time left (run under a pseudo-terminal with `script`).

// The test interrupts a child with SIGINT through libc.
#![allow(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::mailproxy::{ProxyDir, BIN};
use crate::support::provider::{self, FakeProvider};

const ALICE: &str = "alice@example.org";

/// A config with one account at the fake provider (no mail server is
/// contacted: every test here ends before the grant is checked).
fn config(p: &FakeProvider) -> ProxyDir {
    let dir = ProxyDir::new();
    dir.write_config(&format!(
        "{}[accounts.\"{ALICE}\"]\nprovider = \"custom\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\ndevice_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nscopes = [\"https://mail.example.org/\", \"offline_access\"]\nimap = \"imap://127.0.0.1:9\"\n",
        dir.header(),
        p.auth_url(),
        p.token_url(),
        p.device_url(),
        provider::CLIENT_ID,
        provider::CLIENT_SECRET,
    ));
    dir
}

fn nothing_stored(dir: &ProxyDir) {
    let accounts = dir.state_dir().join("accounts");
    let records: Vec<_> = std::fs::read_dir(&accounts)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    assert!(records.is_empty(), "records were stored: {records:?}");
}

/// The redirect listener's port: the start address is served by it.
fn redirect_port(start: &str) -> u16 {
    url::Url::parse(start).unwrap().port().unwrap()
}

#[test]
fn ctrl_c_while_waiting_for_the_browser_stores_nothing() {
    let p = FakeProvider::start();
    let dir = config(&p);
    let mut child = Command::new(BIN)
        .args([
            "--config",
            dir.config_path().to_str().unwrap(),
            "login",
            ALICE,
            "--no-browser",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"a local pw\n").unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let url = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "login ended early: {seen}");
        seen.push_str(&line);
        // The local start address, on the redirect listener itself.
        let t = line.trim();
        if t.starts_with("http://") && t.contains("/authorize/") {
            break t.to_string();
        }
    };
    let port = redirect_port(&url);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the redirect listener is up"
    );
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(
        rest.contains(&format!("login cancelled; nothing was stored for {ALICE}")),
        "{rest}"
    );
    nothing_stored(&dir);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the redirect listener is closed"
    );
    assert_eq!(p.total_token_requests(), 0);
    let audit = std::fs::read_to_string(dir.state_dir().join("audit.log")).unwrap_or_default();
    assert!(audit.contains("cancelled with Ctrl-C"), "{audit}");
}

/// `mailproxy login ARGS` under a pseudo-terminal (`script`): what the
/// terminal shows, and keys typed into it.
struct Terminal {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    seen: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Terminal {
    fn login(dir: &ProxyDir, args: &str) -> Terminal {
        let cmd = format!("{BIN} --config {} login {ALICE} {args}", dir.config_path().display());
        let mut child = Command::new("script")
            .args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script (util-linux)");
        let stdin = child.stdin.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let s2 = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s2.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Terminal {
            child,
            stdin,
            seen,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        self.seen.lock().unwrap().clone()
    }

    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no `{needle}` on the terminal:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.stdin.write_all(keys).unwrap();
    }

    /// Types the new local password twice, as asked.
    fn give_password(&mut self) {
        self.wait_for("Local password for");
        self.type_keys(b"a local pw\r");
        self.wait_for("Repeat it");
        self.type_keys(b"a local pw\r");
    }

    /// Types Ctrl-C; returns the exit code and everything shown.
    fn ctrl_c(mut self) -> (Option<i32>, String) {
        self.type_keys(b"\x03");
        let status = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status.code(), self.text())
    }
}

/// On a terminal the password is typed twice, a spinner says what is
/// awaited with the time allowed, and a typed Ctrl-C (the terminal sends
/// SIGINT) cancels.
#[test]
fn on_a_terminal_a_spinner_shows_the_wait_and_ctrl_c_cancels() {
    let p = FakeProvider::start();
    let dir = config(&p);
    let mut t = Terminal::login(&dir, "--no-browser --timeout 90");
    t.give_password();
    t.wait_for("waiting for the sign-in in the browser");
    t.wait_for("of 1m 30s; Ctrl-C cancels");
    let (code, text) = t.ctrl_c();
    assert_eq!(code, Some(130), "{text}");
    assert!(
        text.contains(&format!("login cancelled; nothing was stored for {ALICE}")),
        "{text}"
    );
    assert!(!text.contains("a local pw"), "the password was echoed: {text}");
    nothing_stored(&dir);
}

/// The device flow on a terminal: the address, and the code large and
/// framed, then the spinner while the provider is polled.
#[test]
fn on_a_terminal_the_device_code_is_shown_large_with_its_address() {
    let p = FakeProvider::start();
    let dir = config(&p);
    let mut t = Terminal::login(&dir, "--device --timeout 60");
    t.give_password();
    t.wait_for("and enter the code:");
    t.wait_for("waiting for the code to be entered");
    let codes = p.pending_user_codes();
    assert_eq!(codes.len(), 1, "{codes:?}");
    let spaced: Vec<String> = codes[0].chars().map(|c| c.to_string()).collect();
    let text = t.text();
    assert!(text.contains(&spaced.join(" ")), "the code, spaced out:\n{text}");
    assert!(text.contains(&p.verification_url()), "the address:\n{text}");
    assert!(text.contains('┌') && text.contains('┘'), "a frame:\n{text}");
    let (code, text) = t.ctrl_c();
    assert_eq!(code, Some(130), "{text}");
    nothing_stored(&dir);
}

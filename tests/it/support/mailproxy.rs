//! Runs the real `mailproxy` binary: writes a config, starts `serve`, runs
//! `login` with the fake provider playing the browser.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dovecot::Dovecot;
use super::provider::{self, FakeProvider};

pub const BIN: &str = env!("CARGO_BIN_EXE_mailproxy");

/// A private directory for one proxy: config, state dir.
pub struct ProxyDir {
    pub dir: tempfile::TempDir,
}

impl ProxyDir {
    pub fn new() -> ProxyDir {
        ProxyDir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Writes the config 0600 (it holds a client secret; mailproxy refuses
    /// such a file when others can read it).
    pub fn write_config(&self, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.config_path();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// The `[server]` and `[imap]` sections every test config starts with.
    pub fn header(&self) -> String {
        format!(
            "[server]\nstate_dir = \"{}\"\n\n[imap]\nlisten = \"127.0.0.1:0\"\n\n",
            self.state_dir().display()
        )
    }

    /// Runs `mailproxy login ACCOUNT`, answering the browser step through the
    /// fake provider. Returns (exit status, stderr).
    pub fn login(&self, account: &str, password: &str) -> (ExitStatus, String) {
        self.login_with(account, password, &[], |url| {
            let (status, body) = provider::approve_in_browser_blocking(url).expect("browser step");
            assert_eq!(status, 200, "redirect listener answered {status}: {body}");
        })
    }

    pub fn login_with(
        &self,
        account: &str,
        password: &str,
        extra_args: &[&str],
        browser: impl FnOnce(&str),
    ) -> (ExitStatus, String) {
        let mut child = Command::new(BIN)
            .args([
                "--config",
                self.config_path().to_str().unwrap(),
                "login",
                account,
                "--no-browser",
                "--timeout",
                "30",
            ])
            .args(extra_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mailproxy login");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let mut url = None;
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap_or(0) > 0 {
            seen.push_str(&line);
            let t = line.trim();
            // The browser flow prints the URL alone on a line; the device
            // flow prints a sentence with the URL and the code.
            if t.contains("http://") || t.contains("https://") {
                url = Some(t.to_string());
                line.clear();
                break;
            }
            line.clear();
        }
        if let Some(u) = &url {
            browser(u);
        }
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        seen.push_str(&rest);
        let status = child.wait().unwrap();
        (status, seen)
    }
}

/// Runs `mailproxy --config DIR/config.toml ARGS...` with `stdin`; returns
/// (exit code, stdout, stderr).
pub fn run(dir: &ProxyDir, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(["--config", dir.config_path().to_str().unwrap()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailproxy");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `mailproxy serve`.
pub struct Proxy {
    child: Child,
    pub imap: Option<SocketAddr>,
    pub smtp: Option<SocketAddr>,
    pub pop3: Option<SocketAddr>,
    logs: Arc<Mutex<String>>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    pub fn start(dir: &ProxyDir) -> Proxy {
        Self::start_env(dir, &[])
    }

    /// Starts `serve` and waits until every configured listener is bound.
    pub fn start_env(dir: &ProxyDir, env: &[(&str, &str)]) -> Proxy {
        Self::start_wrapped(dir, env, &[])
    }

    /// Like [`Proxy::start_env`], run through `wrapper` (a program and its
    /// first arguments, e.g. a shell that lowers a limit, then execs the
    /// binary with the rest).
    pub fn start_wrapped(dir: &ProxyDir, env: &[(&str, &str)], wrapper: &[&str]) -> Proxy {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["--config", dir.config_path().to_str().unwrap(), "serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Every end-to-end test runs the proxy at the most verbose level, so
        // the no-secrets-in-logs checks (World's drop) cover every path.
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "trace");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = super::process::spawn_tied_to_process(cmd, libc::SIGKILL).expect("spawn mailproxy serve");
        let logs = Arc::new(Mutex::new(String::new()));
        let l2 = logs.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut l = l2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let s2 = stdout_lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                s2.lock().unwrap().push(line);
            }
        });
        let config = std::fs::read_to_string(dir.config_path()).unwrap();
        let want: Vec<&str> = ["imap", "smtp", "pop3"]
            .into_iter()
            .filter(|p| config.lines().any(|l| l.trim() == format!("[{p}]")))
            .collect();
        let mut p = Proxy {
            child,
            imap: None,
            smtp: None,
            pop3: None,
            logs,
            stdout_lines,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for line in p.stdout_lines.lock().unwrap().iter() {
                let mut parts = line.split_whitespace();
                if let (Some("listening"), Some(proto), Some(addr)) = (parts.next(), parts.next(), parts.next()) {
                    let addr: SocketAddr = addr.parse().unwrap();
                    match proto {
                        "imap" => p.imap = Some(addr),
                        "smtp" => p.smtp = Some(addr),
                        "pop3" => p.pop3 = Some(addr),
                        _ => {}
                    }
                }
            }
            let bound = want.iter().all(|w| match *w {
                "imap" => p.imap.is_some(),
                "smtp" => p.smtp.is_some(),
                _ => p.pop3.is_some(),
            });
            if bound {
                return p;
            }
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("mailproxy serve exited early ({st}):\n{}", p.logs());
            }
            assert!(
                Instant::now() < deadline,
                "mailproxy serve did not start listening:\n{}",
                p.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn imap_port(&self) -> u16 {
        self.imap.expect("imap listener").port()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout_lines.lock().unwrap().clone()
    }

    /// The metrics listener's address (`listening metrics ADDR` on stdout,
    /// read by a thread, so it may come a little after the other lines).
    pub fn metrics_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .stdout()
                .iter()
                .find_map(|l| l.strip_prefix("listening metrics ").map(str::to_string));
            if let Some(a) = found {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "no metrics listener line: {:?}",
                self.stdout()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until the log contains `needle`; the log is read
    /// from the child's stderr by a thread, so it lags a little.
    pub fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok();
        None
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Resident memory of the proxy process in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A custom-provider OAuth account of the fake provider, with `rest` (its
/// server URLs, `ca_file`, …) after the provider settings.
pub fn custom_account(name: &str, p: &FakeProvider, rest: &str) -> String {
    format!(
        "[accounts.\"{name}\"]\nprovider = \"custom\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\nrevoke_url = \"{}\"\ndevice_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nscopes = [\"https://mail.example.org/\", \"offline_access\"]\n{rest}\n",
        p.auth_url(),
        p.token_url(),
        p.revoke_url(),
        p.device_url(),
        provider::CLIENT_ID,
        provider::CLIENT_SECRET,
    )
}

/// A custom-provider OAuth account that points at the fake provider and the
/// private Dovecot (imaps unless `imap_url` says otherwise).
pub fn oauth_account(name: &str, p: &FakeProvider, d: &Dovecot, imap_url: &str) -> String {
    let ca = d.ca_pem_path();
    custom_account(
        name,
        p,
        &format!("imap = \"{imap_url}\"\nca_file = \"{}\"\n", ca.display()),
    )
}

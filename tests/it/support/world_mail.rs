//! The end-to-end setup for SMTP submission and POP3: private Dovecot, fake
//! provider, SMTP sink, and a proxy config with `[smtp]` and `[pop3]`
//! listeners plus one account of each kind.

use std::path::PathBuf;
use std::sync::Arc;

use super::mailproxy::{Proxy, ProxyDir};
use super::provider::FakeProvider;
use super::{client, pki, require_dovecot, Env, LineConn};

pub use super::world::{ALICE, ALICE_PW, BOB, BOB_PW, CAROL, FRANK, FRANK_PW};

pub const CAROL_PW: &str = "carol local pw";
/// OAuth scope string the fake provider issues (Dovecot does not check it).
pub const SCOPE: &str = "https://mail.example.org/";

/// Local TLS of the proxy's listeners (`tls = "..."` in `[smtp]`/`[pop3]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalTls {
    None,
    StartTls,
    Implicit,
}

impl LocalTls {
    fn key(self) -> &'static str {
        match self {
            LocalTls::None => "none",
            LocalTls::StartTls => "starttls",
            LocalTls::Implicit => "implicit",
        }
    }
}

/// An OAuth (custom provider) account pointing at the fake provider, with
/// the given server URLs (`None`: not set).
pub fn oauth_mail_account(
    name: &str,
    p: &FakeProvider,
    ca: &std::path::Path,
    smtp: Option<&str>,
    pop3: Option<&str>,
    extra: &str,
) -> String {
    let mut s = format!("ca_file = \"{}\"\n", ca.display());
    if let Some(u) = smtp {
        s += &format!("smtp = \"{u}\"\n");
    }
    if let Some(u) = pop3 {
        s += &format!("pop3 = \"{u}\"\n");
    }
    s += extra;
    super::mailproxy::custom_account(name, p, &s)
}

/// Dovecot + provider + sink + a proxy config with SMTP and POP3 listeners and:
/// alice (OAuth; smtps / pop3s), carol (OAuth; smtp+starttls / pop3+starttls),
/// bob (password passthrough, plaintext loopback), and fallbacks (implicit TLS)
/// for unknown logins (frank is a Dovecot password user not in the config).
pub struct MailWorld {
    pub env: Env,
    pub dir: ProxyDir,
    pub proxy: Option<Proxy>,
}

impl MailWorld {
    pub fn new() -> MailWorld {
        Self::with(LocalTls::None, LocalTls::None, |_, _| String::new())
    }

    /// With local TLS on the SMTP and POP3 listeners and more config appended.
    pub fn with(smtp_tls: LocalTls, pop3_tls: LocalTls, extra: impl FnOnce(&Env, &ProxyDir) -> String) -> MailWorld {
        require_dovecot();
        let env = Env::start(&[(BOB, BOB_PW), (FRANK, FRANK_PW)]);
        let dir = ProxyDir::new();
        let d = &env.dovecot;
        let ca = d.ca_pem_path();
        let mut cfg = format!(
            "[server]\nstate_dir = \"{}\"\nca_file = \"{}\"\n\n",
            dir.state_dir().display(),
            ca.display()
        );
        cfg += &format!(
            "[smtp]\nlisten = \"127.0.0.1:0\"\ntls = \"{}\"\nfallback = \"smtps://localhost:{}\"\n\n",
            smtp_tls.key(),
            d.submissions_port
        );
        cfg += &format!(
            "[pop3]\nlisten = \"127.0.0.1:0\"\ntls = \"{}\"\nfallback = \"pop3s://localhost:{}\"\n\n",
            pop3_tls.key(),
            d.pop3s_port
        );
        cfg += &oauth_mail_account(
            ALICE,
            &env.provider,
            &ca,
            Some(&format!("smtps://localhost:{}", d.submissions_port)),
            Some(&format!("pop3s://localhost:{}", d.pop3s_port)),
            "",
        );
        cfg += &oauth_mail_account(
            CAROL,
            &env.provider,
            &ca,
            Some(&format!("smtp+starttls://localhost:{}", d.submission_port)),
            Some(&format!("pop3+starttls://localhost:{}", d.pop3_port)),
            "",
        );
        cfg += &format!(
            "[accounts.\"{BOB}\"]\nprovider = \"password\"\nsmtp = \"smtp://127.0.0.1:{}\"\npop3 = \"pop3://127.0.0.1:{}\"\n\n",
            d.submission_port, d.pop3_port
        );
        cfg += &extra(&env, &dir);
        dir.write_config(&cfg);
        MailWorld { env, dir, proxy: None }
    }

    /// Runs `mailproxy login` for an OAuth account (the provider plays the browser).
    pub fn authorise(&self, account: &str, pw: &str) {
        let (st, err) = self.dir.login(account, pw);
        assert!(st.success(), "mailproxy login {account} failed: {err}");
    }

    pub fn start(&mut self) -> &Proxy {
        self.proxy = Some(Proxy::start(&self.dir));
        self.proxy()
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy started")
    }

    pub fn smtp_port(&self) -> u16 {
        self.proxy().smtp.expect("smtp listener").port()
    }

    pub fn pop3_port(&self) -> u16 {
        self.proxy().pop3.expect("pop3 listener").port()
    }

    pub fn logs(&self) -> String {
        self.proxy
            .as_ref()
            .map(super::mailproxy::Proxy::logs)
            .unwrap_or_default()
    }

    /// Lines Dovecot logged for a login service (`submission-login`, `pop3-login`):
    /// each upstream connection leaves some.
    pub fn upstream_log_lines(&self, service: &str) -> usize {
        let needle = format!("{service}:");
        self.env.dovecot.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Waits (up to 10 s) until Dovecot's log contains `needle` (its log process lags).
    pub fn wait_dovecot_log(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.env.dovecot.log().contains(needle) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// The self-signed local certificate `serve` created (no cert/key configured).
    pub fn local_cert_path(&self) -> PathBuf {
        self.dir.state_dir().join("certs").join("localhost.crt")
    }

    /// A client config whose only trust anchor is the generated local certificate,
    /// after checking that `serve` announced it on stdout.
    pub fn local_tls_config(&self) -> Arc<rustls::ClientConfig> {
        let path = self.local_cert_path();
        let announced = self
            .proxy()
            .stdout()
            .iter()
            .any(|l| l.starts_with(&format!("certificate {} sha256 ", path.display())));
        assert!(
            announced,
            "no `certificate` line on stdout: {:?}",
            self.proxy().stdout()
        );
        pki::client_config_trusting(&std::fs::read_to_string(&path).expect("local certificate"))
    }

    /// A fresh access token for `user`, as the provider would issue it.
    pub fn token(&self, user: &str) -> String {
        self.env.provider.issue_access_token(user, SCOPE)
    }
}

/// `data` dot-stuffed and terminated for SMTP DATA (`data` must end in CRLF).
pub fn smtp_data(data: &[u8]) -> Vec<u8> {
    assert!(data.ends_with(b"\r\n"), "message must end with CRLF");
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A message of roughly `size` bytes with 76-character lines, some starting with a dot.
pub fn big_message(from: &str, to: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: big\r\nMessage-ID: <big-{size}@test.example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    let mut i = 0u64;
    while m.len() < size {
        let line = if i.is_multiple_of(97) {
            format!(".{i:075}\r\n")
        } else {
            format!("{i:076}\r\n")
        };
        m.extend_from_slice(line.as_bytes());
        i += 1;
    }
    m
}

/// Reads an SMTP reply and asserts its code; returns the lines.
pub async fn expect_smtp(c: &mut LineConn, code: &str) -> Vec<String> {
    let r = c.read_smtp_reply().await.unwrap();
    assert!(
        r.last().is_some_and(|l| l.starts_with(&format!("{code} "))),
        "expected {code}, got {r:?}"
    );
    r
}

/// Sends one SMTP command and asserts the reply code.
pub async fn smtp_cmd(c: &mut LineConn, line: &str, code: &str) -> Vec<String> {
    c.send(line).await.unwrap();
    expect_smtp(c, code).await
}

/// Plain connection to the proxy's SMTP listener, greeting checked.
pub async fn smtp_connect(port: u16) -> LineConn {
    let mut c = LineConn::plain(port).await.unwrap();
    let g = expect_smtp(&mut c, "220").await;
    assert_eq!(g, vec!["220 mailproxy ESMTP mailproxy ready"]);
    c
}

/// EHLO + AUTH PLAIN (initial response) on `c`; asserts `235`.
pub async fn smtp_login(c: &mut LineConn, user: &str, pw: &str) {
    smtp_cmd(c, "EHLO client.example.org", "250").await;
    smtp_cmd(c, &format!("AUTH PLAIN {}", client::plain_b64(user, pw)), "235").await;
}

/// MAIL/RCPT/DATA of `msg` (CRLF lines) on a logged-in connection; returns the final reply.
pub async fn smtp_send(c: &mut LineConn, from: &str, to: &[&str], msg: &[u8]) -> Vec<String> {
    smtp_cmd(c, &format!("MAIL FROM:<{from}>"), "250").await;
    for t in to {
        smtp_cmd(c, &format!("RCPT TO:<{t}>"), "250").await;
    }
    smtp_cmd(c, "DATA", "354").await;
    c.write_raw(&smtp_data(msg)).await.unwrap();
    expect_smtp(c, "250").await
}

/// Reads one POP3 status line (`+OK`/`-ERR`), raw with CRLF.
pub async fn pop3_line(c: &mut LineConn) -> Vec<u8> {
    let l = c.read_line_raw().await.unwrap();
    assert!(!l.is_empty(), "connection closed");
    l
}

/// Reads a POP3 multi-line response (status line, then lines up to `.CRLF`), raw.
pub async fn pop3_multi(c: &mut LineConn) -> Vec<u8> {
    let mut out = pop3_line(c).await;
    if !out.starts_with(b"+OK") {
        return out;
    }
    loop {
        let l = pop3_line(c).await;
        out.extend_from_slice(&l);
        if l == b".\r\n" {
            return out;
        }
    }
}

/// Sends a POP3 command and reads its response raw (multi-line if `multi`).
pub async fn pop3_cmd(c: &mut LineConn, line: &str, multi: bool) -> Vec<u8> {
    c.send(line).await.unwrap();
    if multi {
        pop3_multi(c).await
    } else {
        pop3_line(c).await
    }
}

/// Lossy text of raw bytes, for assertion messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Drop for MailWorld {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Some(p) = &self.proxy {
            super::world::assert_no_secrets(&p.logs(), &self.env, &[ALICE_PW, CAROL_PW, BOB_PW, FRANK_PW]);
        }
    }
}

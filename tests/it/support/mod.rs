//! The integration tests' shared harness (`tests/it/main.rs` declares it; the
//! benchmark includes it by path).
//!
//! - [`provider`]: fake OAuth 2.0 server (auth code + PKCE, refresh, device flow,
//!   introspection, revocation) with failure knobs and counters.
//! - [`dovecot`]: private Dovecot 2.3 (IMAP/POP3/submission, plain + TLS) whose
//!   oauth2 passdb introspects tokens at the fake provider.
//! - [`pki`]: test CA and leaf certificates (valid, expired, self-signed).
//! - [`smtp_sink`]: SMTP server that stores what Dovecot's submission relays.
//! - [`chromium`]: private headless Chromium driven over the DevTools protocol.
//! - [`client`]: raw line-protocol client (TCP/TLS/STARTTLS, IMAP literals, SASL strings).
//! - [`process`]: spawn child processes that die with the test process.
//! - [`http`]: minimal HTTP/1.1 server parsing and a blocking test client.
//! - [`postgres`]: private PostgreSQL for the shared token store.
//! - [`haproxy`]: private HAProxy in TCP mode in front of proxies or Dovecot.
//! - [`light`]: a light fake IMAP upstream for load (soak tests, the bench).
//! - [`starttls_injection`]: an upstream that injects replies behind its STARTTLS
//!   answer, and the test each protocol runs against it.
// The harness signals child processes through libc; mailproxy itself has
// no unsafe code (the crate denies it).
#![allow(unsafe_code)]

pub mod chromium;
pub mod client;
pub mod dovecot;
pub mod graph;
pub mod haproxy;
pub mod hostile_util;
pub mod http;
pub mod http_proxy;
pub mod light;
pub mod mailproxy;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod provider;
pub mod recording_imap;
pub mod smtp_sink;
pub mod starttls_injection;
pub mod stranger;
pub mod world;
pub mod world_mail;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use client::LineConn;
pub use dovecot::{require_dovecot, Dovecot, DovecotOptions, ServerCert};
pub use provider::FakeProvider;
pub use smtp_sink::{ReceivedMessage, SmtpSink};

/// Held by the test that installs the Debian package into the machine's own
/// directories (`/usr/bin`, `/usr/lib/systemd/user`) and by the tests whose
/// tools read them (`systemd-analyze verify --user`), so that none of them
/// sees the package half installed or a unit that is not its own.
pub fn system_dirs() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything a typical end-to-end test needs: provider, SMTP sink and a Dovecot
/// wired to both. Fields drop in reverse order (Dovecot first).
pub struct Env {
    pub provider: FakeProvider,
    pub sink: SmtpSink,
    pub dovecot: Dovecot,
}

impl Env {
    /// Starts provider + sink + Dovecot with the given password users; OAuth users
    /// need no registration (any user the provider issued a token for can log in).
    pub fn start(password_users: &[(&str, &str)]) -> Env {
        Self::start_with(password_users, |_| {})
    }

    /// Like [`Env::start`], letting the caller adjust the Dovecot options.
    pub fn start_with(password_users: &[(&str, &str)], tweak: impl FnOnce(&mut DovecotOptions)) -> Env {
        let provider = FakeProvider::start();
        let sink = SmtpSink::start();
        let mut opts = DovecotOptions {
            introspection_url: provider.introspection_url(),
            password_users: password_users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            oauth_users: vec![provider::DEFAULT_USER.to_string()],
            smtp_relay_port: Some(sink.port()),
            ..Default::default()
        };
        tweak(&mut opts);
        let dovecot = Dovecot::start(opts);
        Env {
            provider,
            sink,
            dovecot,
        }
    }
}

/// A small RFC 5322 message with CRLF line ends, unique per `id`.
pub fn sample_message(from: &str, to: &str, subject: &str, id: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{id}@test.example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello {id}.\r\n.leading dot line\r\nBye.\r\n"
    )
    .into_bytes()
}

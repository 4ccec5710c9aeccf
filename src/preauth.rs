//! What the three pre-login state machines (`imap::preauth`,
//! `smtp::preauth`, `pop3::preauth`) share: the contract the session driver
//! (`proxy::session`) runs them through, and the bookkeeping each of them
//! needs.
//!
//! The contract, in the spirit of a sans-I/O state machine: the driver
//! [`PreAuth::feed`]s client bytes, [`PreAuth::poll`]s until `None` (more
//! input needed) or an [`Event`], and after *every* call writes
//! [`PreAuth::take_output`] to the client *before* acting on the event.
//! The machines never touch a socket; all protocol wording lives in them,
//! including what a failed or successful login looks like on the wire.

use std::fmt;

use zeroize::Zeroizing;

use crate::linebuf::SecretBuf;

/// After this many consecutive failed commands the connection is closed.
pub const MAX_CONSECUTIVE_BAD: u32 = 20;

/// Slack above one maximal command that `feed` accepts: the driver may feed
/// at most this much beyond one partial command per call (it reads in
/// chunks of at most 64 KiB).
pub const FEED_SLACK: usize = 64 * 1024;

/// Something the driver must act on.
pub enum Event {
    /// The client wants to log in. The driver checks the credentials and
    /// logs in upstream, then calls [`PreAuth::login_failed`] or
    /// [`PreAuth::login_succeeded`].
    Login {
        username: Zeroizing<String>,
        password: Zeroizing<String>,
    },
    /// The output holds the protocol's "begin TLS" answer and everything
    /// buffered after the command has been discarded: flush, do the TLS
    /// handshake, then call [`PreAuth::starttls_done`].
    StartTls,
    /// Only after a successful login that did not hand off at once (SMTP):
    /// the client sent a command for the upstream. Relay from now on,
    /// starting with [`PreAuth::into_pending_input`].
    Handoff,
    /// The client said goodbye (LOGOUT, QUIT); the output holds the answer.
    Quit,
    /// A fatal protocol error; the output says why. Flush and close.
    Close,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Login { .. } => f
                .debug_struct("Login")
                .field("username", &"<redacted>")
                .field("password", &"<redacted>")
                .finish(),
            Event::StartTls => f.write_str("StartTls"),
            Event::Handoff => f.write_str("Handoff"),
            Event::Quit => f.write_str("Quit"),
            Event::Close => f.write_str("Close"),
        }
    }
}

/// Why a login did not go through, in the three classes every protocol can
/// say (IMAP response codes, SMTP reply codes, POP3 RFC 3206 codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Wrong credentials, or the upstream refused them.
    Credentials,
    /// A person must act: authorise the account, fix the config.
    Action,
    /// Temporary: the provider or the server is unreachable or busy.
    Unavailable,
}

/// The pre-login state machine of one protocol. See the module docs.
pub trait PreAuth {
    /// What a successful upstream login hands the machine to answer with
    /// (IMAP: the server's untagged lines and tagged OK; SMTP: its EHLO
    /// keywords; POP3: nothing).
    type Success;

    /// Append client bytes (never buffers more than its bound).
    fn feed(&mut self, bytes: &[u8]);
    /// Process buffered input until an event occurs or more input is needed.
    fn poll(&mut self) -> Option<Event>;
    /// Bytes to write to the client.
    fn take_output(&mut self) -> Vec<u8>;
    /// Whether the driver should read more client input now.
    fn wants_input(&self) -> bool;
    /// The local TLS handshake completed.
    fn starttls_done(&mut self);
    /// At the hand-off: the client bytes received after the last command
    /// the machine handled, exactly as received.
    fn into_pending_input(self) -> Vec<u8>;
    /// The outstanding login failed: answer it, then resume (poll next).
    fn login_failed(&mut self, failure: Failure, text: &str);
    /// The outstanding login succeeded upstream: answer it. Returns `true`
    /// when the session hands off now; `false` when the machine keeps
    /// talking until [`Event::Handoff`] (SMTP).
    fn login_succeeded(&mut self, success: Self::Success) -> bool;
    /// The name the client gave for itself (SMTP `EHLO`), for the upstream.
    fn client_name(&self) -> Option<&str> {
        None
    }
}

/// The bookkeeping every machine needs: a bounded input buffer that wipes
/// what it held (it may hold passwords), the output, and the counters that
/// end a session that only sends garbage.
pub(crate) struct Core {
    pub(crate) buf: SecretBuf,
    out: Vec<u8>,
    max_buffer: usize,
    overflow: bool,
    bad: u32,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the buffer's content: it may hold a password.
        f.debug_struct("Core")
            .field("buffered", &self.buf.0.len())
            .field("output", &self.out.len())
            .field("overflow", &self.overflow)
            .field("bad", &self.bad)
            .finish()
    }
}

impl Core {
    /// `max_command` is the longest command the protocol accepts.
    pub(crate) fn new(max_command: usize) -> Core {
        Core {
            buf: SecretBuf(Vec::new()),
            out: Vec::new(),
            max_buffer: max_command.saturating_add(FEED_SLACK),
            overflow: false,
            bad: 0,
        }
    }

    /// Hard upper bound on buffered input.
    pub(crate) fn max_buffer(&self) -> usize {
        self.max_buffer
    }

    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf.0
    }

    /// Appends client bytes while the machine is `reading`; input beyond
    /// the bound is dropped and marks the session for closing.
    pub(crate) fn feed(&mut self, bytes: &[u8], reading: bool) {
        if !reading || self.overflow {
            return;
        }
        let room = self.max_buffer.saturating_sub(self.buf.0.len());
        if bytes.len() > room {
            self.overflow = true;
            self.buf.extend(&bytes[..room], self.max_buffer);
        } else {
            self.buf.extend(bytes, self.max_buffer);
        }
    }

    /// Whether to read more, given whether the machine is reading commands.
    pub(crate) fn wants_input(&self, reading: bool) -> bool {
        reading && !self.overflow && self.buf.0.len() < self.max_buffer
    }

    /// Why the session must end before anything else is processed, if it
    /// must: too much input, or `too_many` after too many failed commands.
    pub(crate) fn must_close(&self, too_many: &'static str) -> Option<&'static str> {
        if self.overflow {
            Some("Too much input")
        } else if self.bad >= MAX_CONSECUTIVE_BAD {
            Some(too_many)
        } else {
            None
        }
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.consume(n);
    }

    /// Drops everything buffered (STARTTLS, the end of the session).
    pub(crate) fn discard(&mut self) {
        self.buf.clear();
    }

    /// Bytes that are already protocol lines (an upstream's answer).
    pub(crate) fn push_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub(crate) fn push_line(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// A failed command: counts towards closing the session.
    pub(crate) fn failed(&mut self) {
        self.bad = self.bad.saturating_add(1);
    }

    /// A successful command (or a fresh start after STARTTLS).
    pub(crate) fn succeeded(&mut self) {
        self.bad = 0;
    }

    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub(crate) fn into_pending(mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_counted() {
        let mut c = Core::new(10);
        assert_eq!(c.max_buffer(), 10 + FEED_SLACK);
        c.feed(b"abc", false);
        assert!(c.buffered().is_empty(), "input while not reading is dropped");
        c.feed(&vec![b'x'; 10 + FEED_SLACK + 5], true);
        assert_eq!(c.buffered().len(), c.max_buffer());
        assert!(!c.wants_input(true));
        assert_eq!(c.must_close("many"), Some("Too much input"));

        let mut c = Core::new(10);
        for _ in 0..MAX_CONSECUTIVE_BAD {
            assert_eq!(c.must_close("many"), None);
            c.failed();
        }
        assert_eq!(c.must_close("many"), Some("many"));
        c.succeeded();
        assert_eq!(c.must_close("many"), None);
    }

    #[test]
    fn debug_never_shows_input() {
        let mut c = Core::new(100);
        c.feed(b"a LOGIN alice hunter2\r\n", true);
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2") && d.contains("buffered: 23"), "{d}");
        let e = Event::Login {
            username: Zeroizing::new("alice".into()),
            password: Zeroizing::new("hunter2".into()),
        };
        assert!(!format!("{e:?}").contains("hunter2"));
    }
}

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
// The SASL line limits, for every machine (IMAP frames its own lines).
pub use crate::linebuf::{sasl_command_line, sasl_response_line, MAX_SASL_RESPONSE};

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
///
/// A machine implements the protocol-specific part and exposes its
/// [`Core`]; buffering, output and the hand-off of pending input are
/// provided here, once.
pub trait PreAuth: Sized {
    /// What a successful upstream login hands the machine to answer with
    /// (IMAP: the server's untagged lines and tagged OK; SMTP: its EHLO
    /// keywords; POP3: nothing).
    type Success;

    /// The shared bookkeeping (write [`core_access!`] in the impl).
    fn core(&self) -> &Core;
    fn core_mut(&mut self) -> &mut Core;
    fn into_core(self) -> Core;
    /// Where the machine stands, as the shared code needs to know it.
    fn phase(&self) -> Phase;
    /// What the machine says when it closes after too many failed commands
    /// (SMTP's own word is "errors").
    const TOO_MANY: &'static str = "Too many invalid commands";
    /// The protocol's last words when it ends the session for `reason`.
    fn farewell(&self, reason: &str) -> String;
    /// Stops reading for good (the state becomes done, framing resets).
    fn close(&mut self);
    /// Handles what the buffer holds next: at most one command.
    fn step(&mut self) -> Step;
    /// The local TLS handshake completed: the machine resets what it knew
    /// from before it (the core has already dropped the buffered input).
    fn tls_started(&mut self);
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

    /// Reading commands (not waiting for a login, a TLS handshake, or done).
    fn reading(&self) -> bool {
        self.phase() == Phase::Reading
    }

    /// Keeping input: not while waiting for the TLS handshake, whose
    /// plaintext must never be acted on, nor after the session ended.
    fn keeps_input(&self) -> bool {
        !matches!(self.phase(), Phase::AwaitTls | Phase::Done)
    }

    /// Ends the session with `reason` (queued as the protocol's last words).
    fn fatal(&mut self, reason: &str) -> Event {
        let line = self.farewell(reason);
        self.core_mut().push_line(&line);
        self.close();
        self.core_mut().discard();
        Event::Close
    }

    /// Process buffered input until an event occurs or more input is needed.
    fn poll(&mut self) -> Option<Event> {
        loop {
            if !self.reading() {
                return None;
            }
            if let Some(why) = self.core().must_close(Self::TOO_MANY) {
                return Some(self.fatal(why));
            }
            match self.step() {
                Step::More => return None,
                Step::Event(e) => return Some(e),
                Step::Next => {}
            }
        }
    }

    /// The local TLS handshake completed: nothing from before it is kept,
    /// STARTTLS is no longer offered and logins are allowed.
    fn starttls_done(&mut self) {
        self.core_mut().tls_started();
        self.tls_started();
    }

    /// Append client bytes (never buffers more than its bound).
    fn feed(&mut self, bytes: &[u8]) {
        let keep = self.keeps_input();
        self.core_mut().feed(bytes, keep);
    }

    /// Bytes to write to the client.
    fn take_output(&mut self) -> Vec<u8> {
        self.core_mut().take_output()
    }

    /// Whether the driver should read more client input now.
    fn wants_input(&self) -> bool {
        self.core().wants_input(self.reading())
    }

    /// At the hand-off: the client bytes received after the last command
    /// the machine handled, exactly as received.
    fn into_pending_input(self) -> Vec<u8> {
        self.into_core().into_pending()
    }

    /// Hard upper bound on buffered input.
    fn max_buffer(&self) -> usize {
        self.core().max_buffer()
    }

    /// Number of client bytes currently buffered.
    fn buffered_len(&self) -> usize {
        self.core().buffered().len()
    }
}

/// Where a machine stands, coarsely: what decides whether input is read,
/// kept or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading commands (or a SASL response line).
    Reading,
    /// An event is outstanding (a login); input is kept for later.
    Waiting,
    /// A STARTTLS handshake is outstanding; input is dropped.
    AwaitTls,
    /// The session ended; input is dropped.
    Done,
}

/// The three [`PreAuth`] accessors of a machine whose field `core` holds
/// its [`Core`].
macro_rules! core_access {
    () => {
        fn core(&self) -> &$crate::preauth::Core {
            &self.core
        }
        fn core_mut(&mut self) -> &mut $crate::preauth::Core {
            &mut self.core
        }
        fn into_core(self) -> $crate::preauth::Core {
            self.core
        }
    };
}
pub(crate) use core_access;

/// What one [`PreAuth::step`] came to.
pub enum Step {
    /// The buffer holds no complete command: read more.
    More,
    /// Something for the driver.
    Event(Event),
    /// A command was handled: look at the next one.
    Next,
}

/// The bookkeeping every machine needs: a bounded input buffer that wipes
/// what it held (it may hold passwords), the output, and the counters that
/// end a session that only sends garbage.
pub struct Core {
    pub(crate) buf: SecretBuf,
    out: Vec<u8>,
    max_buffer: usize,
    overflow: bool,
    bad: u32,
    /// STARTTLS is offered on this connection (local TLS configured, the
    /// connection plain).
    starttls: bool,
    tls_active: bool,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the buffer's content: it may hold a password.
        f.debug_struct("Core")
            .field("buffered", &self.buf.0.len())
            .field("output", &self.out.len())
            .field("overflow", &self.overflow)
            .field("bad", &self.bad)
            .field("starttls", &self.starttls)
            .field("tls_active", &self.tls_active)
            .finish()
    }
}

impl Core {
    /// `max_command` is the longest command the protocol accepts;
    /// `starttls` whether STARTTLS is offered on this connection.
    pub(crate) fn new(max_command: usize, starttls: bool) -> Core {
        Core {
            buf: SecretBuf(Vec::new()),
            out: Vec::new(),
            max_buffer: max_command.saturating_add(FEED_SLACK),
            overflow: false,
            bad: 0,
            starttls,
            tls_active: false,
        }
    }

    /// STARTTLS may still be done on this connection.
    pub(crate) fn starttls_available(&self) -> bool {
        self.starttls && !self.tls_active
    }

    /// Whether TLS was started on this connection with STARTTLS.
    pub(crate) fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Credentials may be sent: never in plaintext where STARTTLS is
    /// offered and not yet done.
    pub(crate) fn login_allowed(&self) -> bool {
        !self.starttls_available()
    }

    /// The next complete line, by `framer`: `None` while incomplete,
    /// `Err` when it is longer than allowed.
    pub(crate) fn next_line(
        &mut self,
        framer: &mut crate::linebuf::LineFramer,
    ) -> Option<Result<Zeroizing<Vec<u8>>, crate::linebuf::TooLong>> {
        match framer.scan(&self.buf.0) {
            crate::linebuf::Line::Incomplete => None,
            crate::linebuf::Line::TooLong => Some(Err(crate::linebuf::TooLong)),
            crate::linebuf::Line::Complete(len) => Some(Ok(self.take(len))),
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

    /// Drops the first `len` buffered bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.consume(n);
    }

    /// Takes the first `len` buffered bytes (one complete command).
    pub(crate) fn take(&mut self, len: usize) -> Zeroizing<Vec<u8>> {
        let line = Zeroizing::new(self.buf.0[..len].to_vec());
        self.buf.consume(len);
        line
    }

    /// Drops everything buffered (STARTTLS, the end of the session).
    pub(crate) fn discard(&mut self) {
        self.buf.clear();
    }

    /// After the local TLS handshake: nothing from before it is kept, and
    /// the failure count starts afresh.
    fn tls_started(&mut self) {
        self.tls_active = true;
        self.buf.clear();
        self.bad = 0;
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

/// Drives for the machines' tests: the same harness for all three.
#[cfg(test)]
pub(crate) mod testkit {
    use super::{Event, PreAuth};

    /// Bytes as text, for comparing output.
    pub(crate) fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// Feeds `input`, polls until `None`, returns the output.
    pub(crate) fn exchange<M: PreAuth>(p: &mut M, input: &[u8]) -> String {
        p.feed(input);
        let ev = p.poll();
        assert!(ev.is_none(), "unexpected event {ev:?}");
        text(&p.take_output())
    }

    /// Each input of `steps` in turn must answer its output (via [`exchange`]).
    pub(crate) fn exchanges<M: PreAuth>(p: &mut M, steps: &[(&[u8], &str)]) {
        for (input, output) in steps {
            assert_eq!(exchange(p, input), *output, "{}", text(input));
        }
    }

    /// The user name and password of the login `ev` must be.
    pub(crate) fn expect_login(ev: Option<Event>) -> (String, String) {
        match ev {
            Some(Event::Login { username, password }) => (username.to_string(), password.to_string()),
            other => panic!("expected Login, got {other:?}"),
        }
    }

    /// A small deterministic generator (xorshift).
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Up to 400 bytes of tokens, well-formed commands (some with a
        /// byte flipped) and noise.
        pub(crate) fn input(&mut self, tokens: &[&[u8]], commands: &[&[u8]]) -> Vec<u8> {
            let mut input = Vec::new();
            let len = self.below(400);
            while input.len() < len {
                match self.below(10) {
                    0 => input.push(self.next() as u8),
                    1..=3 => input.extend_from_slice(tokens[self.below(tokens.len())]),
                    _ => {
                        let mut c = commands[self.below(commands.len())].to_vec();
                        if self.below(4) == 0 {
                            let i = self.below(c.len());
                            c[i] = self.next() as u8;
                        }
                        input.extend_from_slice(&c);
                    }
                }
            }
            input
        }

        /// `input` cut at random places.
        pub(crate) fn chunks<'a>(&mut self, input: &'a [u8]) -> Vec<&'a [u8]> {
            let mut chunks = Vec::new();
            let mut rest = input;
            while !rest.is_empty() {
                let n = 1 + self.below(rest.len().min(50));
                chunks.push(&rest[..n]);
                rest = &rest[n..];
            }
            chunks
        }
    }

    /// What a drive saw: the output, the events (`login USER PASS` as the
    /// `login` answerer names them, `starttls`, `quit`, `close`,
    /// `handoff`), and after a hand-off the bytes handed over plus every
    /// chunk not yet fed.
    pub(crate) type Transcript = (String, Vec<String>, Vec<u8>);

    /// Feeds `chunks` to `p`, answering events: logins through `login`
    /// (which answers the machine and returns the event's name), STARTTLS
    /// completes at once.
    pub(crate) fn drive<M: PreAuth>(
        mut p: M,
        chunks: &[&[u8]],
        mut login: impl FnMut(&mut M, &str, &str) -> String,
    ) -> Transcript {
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        let mut out = text(p.take_output());
        let mut events = Vec::new();
        let mut chunks = chunks.iter();
        while let Some(c) = chunks.next() {
            p.feed(c);
            assert!(p.buffered_len() <= p.max_buffer());
            loop {
                let ev = p.poll();
                out.push_str(&text(p.take_output()));
                match ev {
                    None => break,
                    Some(Event::Login { username, password }) => {
                        events.push(login(&mut p, &username, &password));
                        out.push_str(&text(p.take_output()));
                    }
                    Some(Event::StartTls) => {
                        events.push("starttls".into());
                        p.starttls_done();
                    }
                    Some(Event::Quit) => {
                        events.push("quit".into());
                        return (out, events, Vec::new());
                    }
                    Some(Event::Close) => {
                        events.push("close".into());
                        return (out, events, Vec::new());
                    }
                    Some(Event::Handoff) => {
                        events.push("handoff".into());
                        let mut rest = p.into_pending_input();
                        for c in chunks {
                            rest.extend_from_slice(c);
                        }
                        return (out, events, rest);
                    }
                }
            }
        }
        (out, events, Vec::new())
    }

    /// A 10 MiB line. Fed at once, nothing beyond the bound is kept and the
    /// session closes with `overflow`. Fed in socket-sized chunks, it is
    /// refused by count as soon as it exceeds the line limit (the output is
    /// `too_long`), having buffered at most about 12 KiB; `after`, sent
    /// next, is ignored.
    pub(crate) fn huge_line<M: PreAuth>(new: impl Fn() -> M, overflow: &str, too_long: &str, after: &[u8]) {
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        let big = vec![b'A'; 10 * 1024 * 1024];
        let mut p = new();
        p.take_output();
        p.feed(&big);
        assert!(p.buffered_len() <= p.max_buffer());
        assert!(p.core().buf.0.capacity() <= p.max_buffer());
        assert!(matches!(p.poll(), Some(Event::Close)));
        assert_eq!(text(p.take_output()), overflow);
        let mut p = new();
        p.take_output();
        let mut fed = 0;
        let mut closed = false;
        for chunk in big.chunks(4096) {
            p.feed(chunk);
            fed += chunk.len();
            assert!(p.buffered_len() <= 8 * 1024 + 4096);
            if let Some(ev) = p.poll() {
                assert!(matches!(ev, Event::Close));
                closed = true;
                break;
            }
        }
        assert!(closed);
        assert!(fed <= 12 * 1024);
        assert_eq!(text(p.take_output()), too_long);
        p.feed(after);
        assert!(p.poll().is_none());
        assert_eq!(p.buffered_len(), 0);
    }

    /// `garbage` again and again is answered `bad` exactly
    /// [`super::MAX_CONSECUTIVE_BAD`] times, then the session closes with
    /// output ending in `closing`; `garbage` followed by `good` never does.
    pub(crate) fn garbage_closes<M: PreAuth>(
        new: impl Fn() -> M,
        garbage: &[u8],
        bad: &str,
        closing: &str,
        good: &[u8],
    ) {
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        let mut p = new();
        p.take_output();
        let mut out = String::new();
        let mut closed = false;
        for _ in 0..super::MAX_CONSECUTIVE_BAD + 5 {
            p.feed(garbage);
            let ev = p.poll();
            out.push_str(&text(p.take_output()));
            match ev {
                None => {}
                Some(Event::Close) => {
                    closed = true;
                    break;
                }
                Some(e) => panic!("{e:?}"),
            }
        }
        assert!(closed);
        assert_eq!(out.matches(bad).count(), super::MAX_CONSECUTIVE_BAD as usize);
        assert!(out.ends_with(closing), "{out}");
        // A good command resets the counter.
        let mut p = new();
        for _ in 0..(super::MAX_CONSECUTIVE_BAD * 3) {
            p.feed(garbage);
            p.feed(good);
            assert!(p.poll().is_none());
            p.take_output();
        }
    }

    /// Random input in random chunks, 3000 times, to machines made by
    /// `new(config, starttls)` in turn with the `small` config and STARTTLS,
    /// `small` without, and the default config: no panic, bounded buffers,
    /// whole CRLF lines out, and without STARTTLS (whose discard depends on
    /// timing) a transcript that does not depend on the chunking. Every
    /// event in `expect` must be reached. `also` gets each input (for the
    /// parsers).
    pub(crate) fn random_chunking<M: PreAuth, C: Clone + Default>(
        tokens: &[&[u8]],
        commands: &[&[u8]],
        small: C,
        new: impl Fn(C, bool) -> M,
        mut login: impl FnMut(&mut M, &str, &str) -> String,
        expect: &[&str],
        also: impl Fn(&[u8]),
    ) {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut stats = std::collections::HashMap::new();
        for round in 0..3000 {
            let input = rng.input(tokens, commands);
            let chunks = rng.chunks(&input);
            let (limited, starttls) = [(true, true), (true, false), (false, false)][round % 3];
            let config = || if limited { small.clone() } else { C::default() };
            let t = drive(new(config(), starttls), &chunks, &mut login);
            assert!(t.0.ends_with("\r\n"));
            for e in &t.1 {
                *stats.entry(e.split(' ').next().unwrap_or("").to_owned()).or_insert(0) += 1;
            }
            if t.1.last().map(String::as_str) == Some("handoff") {
                assert!(input.ends_with(&t.2));
            }
            if !starttls {
                assert_eq!(t, drive(new(config(), starttls), &[&input], &mut login), "{input:?}");
            }
            also(&input);
        }
        for k in expect {
            assert!(stats.get(*k).copied().unwrap_or(0) > 5, "{k}: {stats:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_counted() {
        let mut c = Core::new(10, false);
        assert_eq!(c.max_buffer(), 10 + FEED_SLACK);
        c.feed(b"abc", false);
        assert!(c.buffered().is_empty(), "input while not reading is dropped");
        c.feed(&vec![b'x'; 10 + FEED_SLACK + 5], true);
        assert_eq!(c.buffered().len(), c.max_buffer());
        assert!(!c.wants_input(true));
        assert_eq!(c.must_close("many"), Some("Too much input"));

        let mut c = Core::new(10, false);
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
        let mut c = Core::new(100, false);
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

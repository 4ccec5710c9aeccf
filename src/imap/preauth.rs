//! Sans-I/O state machine for the local IMAP session before login.
//!
//! Driven through the shared contract in [`crate::preauth`]; this file holds
//! only what is IMAP: the commands, the responses and their wording. The
//! tag of an outstanding login is kept here, so the answer to it (the
//! upstream's OK retagged, or a NO) carries the client's tag.
//!
//! Security properties:
//! * bounded memory: the input buffer never exceeds [`ImapPreAuth::max_buffer`];
//!   over-long lines / `{n+}` literals close the connection, over-large
//!   synchronising literals get a tagged `BAD` (the client never sent them);
//! * after `STARTTLS` everything buffered (pipelined plaintext) is discarded;
//! * while a login is outstanding nothing else is processed, and the bytes
//!   after the login command are handed over verbatim by `into_pending_input`;
//! * buffers holding client input are zeroized when consumed or dropped.

use super::command::{self, CommandBody};
use super::framing::{Frame, Framer, Limits};
use super::response;
use crate::preauth::{Core, Failure, Phase, PreAuth, Step};
pub use crate::preauth::{Event, FEED_SLACK, MAX_CONSECUTIVE_BAD};
use crate::sasl::{self, SaslError};
use crate::text::{one_line, strip_eol};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreAuthConfig {
    /// Local TLS is configured and not yet active on this connection (plain
    /// port with STARTTLS). When true, LOGIN/AUTHENTICATE are refused until
    /// STARTTLS has completed.
    pub starttls: bool,
    pub max_line: usize,
    pub max_literal: usize,
}

impl Default for PreAuthConfig {
    fn default() -> Self {
        PreAuthConfig {
            starttls: false,
            max_line: 8 * 1024,
            max_literal: 8 * 1024,
        }
    }
}

/// What a successful upstream login answers the client with.
pub struct LoggedIn {
    /// Untagged lines the server sent before its tagged OK, forwarded as
    /// they are.
    pub untagged: Vec<u8>,
    /// The server's tagged OK line, to be retagged with the client's tag.
    pub tagged: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading commands.
    Commands,
    /// `AUTHENTICATE PLAIN` sent `+ `; the next line is the SASL response.
    AuthPlain { tag: String },
    /// An `Event::Login` is outstanding under the client's tag.
    LoginPending { tag: String },
    /// An `Event::StartTls` is outstanding; input is discarded.
    AwaitTls,
    /// Logout/Close happened; input is discarded.
    Done,
}

/// The pre-authentication IMAP state machine. See the module documentation.
#[derive(Debug)]
pub struct ImapPreAuth {
    framer: Framer,
    core: Core,
    state: State,
}

impl ImapPreAuth {
    /// Create the state machine; the greeting is queued in the output.
    pub fn new(cfg: PreAuthConfig) -> Self {
        let limits = Limits::new(cfg.max_line, cfg.max_literal);
        let mut p = ImapPreAuth {
            framer: Framer::new(limits),
            core: Core::new(limits.max_command, cfg.starttls),
            state: State::Commands,
        };
        let caps = p.capabilities();
        p.push_line(&format!("* OK [CAPABILITY {caps}] mailproxy ready"));
        p
    }

    /// The capability list currently advertised.
    pub fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID");
        if self.core.starttls_available() {
            caps.push_str(" STARTTLS");
        }
        caps
    }

    /// The tag of the outstanding login, if one is outstanding.
    pub fn login_tag(&self) -> Option<&str> {
        match &self.state {
            State::LoginPending { tag } => Some(tag),
            _ => None,
        }
    }

    /// Emit `tag NO [code] text` for a refused login (the code and text are
    /// made safe for the wire) and resume processing buffered input (call
    /// `poll` next).
    pub fn refuse_login(&mut self, tag: &str, resp_code: &str, text: &str) {
        let code: String = resp_code
            .chars()
            .filter(|c| (c.is_ascii_graphic() && *c != ']' && *c != '[') || *c == ' ')
            .collect();
        let code = code.trim();
        let text = one_line(text);
        let text = if text.trim().is_empty() {
            "Authentication failed"
        } else {
            text.trim()
        };
        let tag = one_line(tag).replace(' ', "");
        if code.is_empty() {
            self.push_line(&format!("{tag} NO {text}"));
        } else {
            self.push_line(&format!("{tag} NO [{code}] {text}"));
        }
        self.core.failed();
        if matches!(self.state, State::LoginPending { .. }) {
            self.state = State::Commands;
        }
    }

    // ------------------------------------------------------------ internals

    fn push_line(&mut self, line: &str) {
        self.core.push_line(line);
    }

    /// Reply `BAD` (tagged if possible) and count it.
    fn bad(&mut self, tag: Option<&str>, msg: &str) {
        self.push_line(&format!("{} BAD {msg}", tag.unwrap_or("*")));
        self.core.failed();
    }

    fn no(&mut self, tag: &str, msg: &str) {
        self.push_line(&format!("{tag} NO {msg}"));
        self.core.failed();
    }

    fn ok(&mut self, tag: &str, msg: &str) {
        self.push_line(&format!("{tag} OK {msg}"));
        self.core.succeeded();
    }

    fn handle(&mut self, line: &[u8]) -> Option<Event> {
        if let State::AuthPlain { tag } = std::mem::replace(&mut self.state, State::Commands) {
            let resp = strip_eol(line);
            if resp == b"*" {
                self.bad(Some(&tag), "AUTHENTICATE cancelled");
                return None;
            }
            return self.plain_response(tag, resp);
        }

        let cmd = match command::parse_command(line) {
            Ok(c) => c,
            Err(e) => {
                self.bad(e.tag.as_deref(), &e.message);
                return None;
            }
        };
        let tag = cmd.tag;
        match cmd.body {
            CommandBody::Capability => {
                let caps = self.capabilities();
                self.push_line(&format!("* CAPABILITY {caps}"));
                self.ok(&tag, "CAPABILITY completed");
            }
            CommandBody::Noop => self.ok(&tag, "NOOP completed"),
            CommandBody::Id(_) => {
                self.push_line("* ID (\"name\" \"mailproxy\")");
                self.ok(&tag, "ID completed");
            }
            CommandBody::Logout => {
                self.push_line("* BYE mailproxy logging out");
                self.ok(&tag, "LOGOUT completed");
                self.state = State::Done;
                self.core.discard();
                return Some(Event::Quit);
            }
            CommandBody::StartTls => {
                if self.core.starttls_available() {
                    self.ok(&tag, "Begin TLS negotiation now");
                    // Never act on plaintext pipelined before the handshake.
                    self.core.discard();
                    self.framer.reset();
                    self.state = State::AwaitTls;
                    return Some(Event::StartTls);
                }
                if self.core.tls_active() {
                    self.bad(Some(&tag), "TLS is already active");
                } else {
                    self.bad(Some(&tag), "STARTTLS not available: TLS is not configured");
                }
            }
            CommandBody::Login { username, password } => {
                if !self.core.login_allowed() {
                    self.no(
                        &tag,
                        "[PRIVACYREQUIRED] Use STARTTLS first: login over plaintext is not allowed",
                    );
                    return None;
                }
                self.state = State::LoginPending { tag };
                return Some(Event::Login { username, password });
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if mechanism != "PLAIN" {
                    self.no(&tag, "[CANNOT] Unsupported authentication mechanism (use PLAIN)");
                    return None;
                }
                if !self.core.login_allowed() {
                    self.no(
                        &tag,
                        "[PRIVACYREQUIRED] Use STARTTLS first: login over plaintext is not allowed",
                    );
                    return None;
                }
                match initial_response {
                    Some(ir) => return self.plain_response(tag, ir.as_bytes()),
                    None => {
                        self.push_line("+ ");
                        self.state = State::AuthPlain { tag };
                    }
                }
            }
            CommandBody::Other { name } => {
                if requires_auth(&name) {
                    self.bad(Some(&tag), &format!("{name} not valid before login"));
                } else {
                    self.bad(Some(&tag), "Unknown command");
                }
            }
        }
        None
    }

    fn plain_response(&mut self, tag: String, b64: &[u8]) -> Option<Event> {
        match sasl::decode_plain(b64) {
            Ok((username, password)) => {
                self.state = State::LoginPending { tag };
                Some(Event::Login { username, password })
            }
            Err(SaslError::AuthzidMismatch) => {
                self.no(
                    &tag,
                    "[AUTHORIZATIONFAILED] Authorization identity must be empty or equal to the user name",
                );
                None
            }
            Err(e) => {
                self.bad(Some(&tag), &format!("Invalid AUTHENTICATE PLAIN response: {e}"));
                None
            }
        }
    }
}

/// IMAP commands that exist but are only valid after authentication.
fn requires_auth(name: &str) -> bool {
    matches!(
        name,
        "SELECT"
            | "EXAMINE"
            | "CREATE"
            | "DELETE"
            | "RENAME"
            | "SUBSCRIBE"
            | "UNSUBSCRIBE"
            | "LIST"
            | "LSUB"
            | "STATUS"
            | "APPEND"
            | "CHECK"
            | "CLOSE"
            | "UNSELECT"
            | "EXPUNGE"
            | "SEARCH"
            | "FETCH"
            | "STORE"
            | "COPY"
            | "MOVE"
            | "UID"
            | "IDLE"
            | "ENABLE"
            | "NAMESPACE"
            | "GETQUOTA"
            | "GETQUOTAROOT"
            | "SETQUOTA"
            | "GETACL"
            | "SETACL"
            | "MYRIGHTS"
            | "LISTRIGHTS"
            | "GETMETADATA"
            | "SETMETADATA"
            | "COMPRESS"
            | "NOTIFY"
            | "ESEARCH"
            | "SORT"
            | "THREAD"
    )
}

impl PreAuth for ImapPreAuth {
    type Success = LoggedIn;

    crate::preauth::core_access!();

    fn phase(&self) -> Phase {
        match self.state {
            State::Commands | State::AuthPlain { .. } => Phase::Reading,
            State::LoginPending { .. } => Phase::Waiting,
            State::AwaitTls => Phase::AwaitTls,
            State::Done => Phase::Done,
        }
    }

    fn farewell(&self, reason: &str) -> String {
        format!("* BYE {reason}")
    }

    fn close(&mut self) {
        self.state = State::Done;
        self.framer.reset();
    }

    fn step(&mut self) -> Step {
        self.framer
            .expect_sasl_response(matches!(self.state, State::AuthPlain { .. }));
        match self.framer.scan(self.core.buffered()) {
            Frame::Incomplete => Step::More,
            Frame::NeedContinuation { .. } => {
                self.push_line("+ Ready for literal data");
                Step::Next
            }
            Frame::RejectLiteral { len, .. } => {
                let tag = match std::mem::replace(&mut self.state, State::Commands) {
                    State::AuthPlain { tag } => Some(tag),
                    _ => command::parse_tag(&self.core.buffered()[..len]),
                };
                self.core.consume(len);
                self.bad(tag.as_deref(), "Literal too large");
                Step::Next
            }
            Frame::Fatal(e) => Step::Event(self.fatal(&e.to_string())),
            Frame::Complete { len } => {
                let line = self.core.take(len);
                self.handle(&line).map_or(Step::Next, Step::Event)
            }
        }
    }

    /// STARTTLS is no longer advertised and LOGIN is allowed.
    fn tls_started(&mut self) {
        self.framer.reset();
        if self.state == State::AwaitTls {
            self.state = State::Commands;
        }
    }

    fn login_failed(&mut self, failure: Failure, text: &str) {
        let code = match failure {
            Failure::Credentials => "AUTHENTICATIONFAILED",
            Failure::Action => "ALERT",
            Failure::Unavailable => "UNAVAILABLE",
        };
        let tag = self.login_tag().unwrap_or("*").to_string();
        self.refuse_login(&tag, code, text);
    }

    /// Forwards the server's untagged lines, then its OK under the client's
    /// tag (with the server's own response code, e.g. `[CAPABILITY …]`).
    fn login_succeeded(&mut self, ok: LoggedIn) -> bool {
        let tag = self.login_tag().unwrap_or("*").to_string();
        let mut out = ok.untagged;
        match response::retag_line(&ok.tagged, &tag) {
            Ok(line) => out.extend_from_slice(&line),
            // The upstream client hands over only a tagged OK it parsed.
            Err(_) => out.extend_from_slice(format!("{tag} OK Logged in\r\n").as_bytes()),
        }
        self.core.push_raw(&out);
        true
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::preauth::testkit::{self, exchange, exchanges, text as s};

    const CAPS: &str = "IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID";

    fn cfg(starttls: bool) -> PreAuthConfig {
        PreAuthConfig {
            starttls,
            ..PreAuthConfig::default()
        }
    }

    /// A new machine with the greeting already drained.
    fn machine(starttls: bool) -> ImapPreAuth {
        let mut p = ImapPreAuth::new(cfg(starttls));
        p.take_output();
        p
    }

    fn expect_login(p: &ImapPreAuth, ev: Option<Event>) -> (String, String, String) {
        match ev {
            Some(Event::Login { username, password }) => (
                p.login_tag().expect("a login is outstanding").to_string(),
                username.to_string(),
                password.to_string(),
            ),
            other => panic!("expected Login, got {other:?}"),
        }
    }

    #[test]
    fn greeting() {
        let mut p = ImapPreAuth::new(cfg(false));
        assert_eq!(
            s(&p.take_output()),
            format!("* OK [CAPABILITY {CAPS}] mailproxy ready\r\n")
        );
        assert_eq!(p.take_output(), b"");
        let mut p = ImapPreAuth::new(cfg(true));
        assert_eq!(
            s(&p.take_output()),
            format!("* OK [CAPABILITY {CAPS} STARTTLS] mailproxy ready\r\n")
        );
    }

    #[test]
    fn capability_noop_id() {
        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (
                    b"a1 CAPABILITY\r\n",
                    &format!("* CAPABILITY {CAPS}\r\na1 OK CAPABILITY completed\r\n"),
                ),
                (b"a2 noop\r\n", "a2 OK NOOP completed\r\n"),
                (
                    b"a3 ID (\"name\" \"Thunderbird\" \"version\" \"115\")\r\n",
                    "* ID (\"name\" \"mailproxy\")\r\na3 OK ID completed\r\n",
                ),
                (
                    b"a4 ID NIL\r\n",
                    "* ID (\"name\" \"mailproxy\")\r\na4 OK ID completed\r\n",
                ),
            ],
        );
        let mut p = machine(true);
        assert_eq!(
            exchange(&mut p, b"a1 CAPABILITY\r\n"),
            format!("* CAPABILITY {CAPS} STARTTLS\r\na1 OK CAPABILITY completed\r\n")
        );
    }

    #[test]
    fn login_quoted_with_escapes() {
        let mut p = machine(false);
        p.feed(b"a001 LOGIN \"fred\\\\x\" \"fat \\\"man\\\"\"\r\n");
        let (tag, u, pw) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!(
            (tag.as_str(), u.as_str(), pw.as_str()),
            ("a001", "fred\\x", "fat \"man\"")
        );
        assert_eq!(p.take_output(), b"");
        assert_eq!(p.into_pending_input(), b"");
    }

    #[test]
    fn login_sync_literals_rfc3501_trace() {
        // RFC 3501 6.2.3 / 4.3 style: continuation only after each literal
        // announcement, exactly once, never for the parts without literals.
        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (b"A001 LOGIN {11}", ""),
                (b"\r\n", "+ Ready for literal data\r\n"),
                (b"FRED ", ""),
                (b"FOOBAR {7}\r", ""),
                (b"\n", "+ Ready for literal data\r\n"),
                (b"fat ma", ""),
            ],
        );
        p.feed(b"n\r\n");
        let (tag, u, pw) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!(
            (tag.as_str(), u.as_str(), pw.as_str()),
            ("A001", "FRED FOOBAR", "fat man")
        );
        assert_eq!(p.take_output(), b"");
    }

    #[test]
    fn login_sync_literal_all_at_once_still_one_continuation_each() {
        let mut p = machine(false);
        p.feed(b"A1 LOGIN {5}\r\nalice {6}\r\nsecret\r\n");
        let (_, u, pw) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!((u.as_str(), pw.as_str()), ("alice", "secret"));
        assert_eq!(
            s(&p.take_output()),
            "+ Ready for literal data\r\n+ Ready for literal data\r\n"
        );
    }

    #[test]
    fn login_literal_plus_no_continuation() {
        let mut p = machine(false);
        assert_eq!(exchange(&mut p, b"A1 LOGIN {5+}\r\nali"), "");
        p.feed(b"ce {6+}\r\nse\r\n t\r\n");
        let (_, u, pw) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!((u.as_str(), pw.as_str()), ("alice", "se\r\n t"));
        assert_eq!(p.take_output(), b"");
    }

    #[test]
    fn authenticate_plain_sasl_ir() {
        let mut p = machine(false);
        // base64("\0alice\0secret")
        p.feed(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        let (tag, u, pw) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!((tag.as_str(), u.as_str(), pw.as_str()), ("a", "alice", "secret"));
        assert_eq!(p.take_output(), b"");
    }

    #[test]
    fn authenticate_plain_continuation() {
        let mut p = machine(false);
        assert_eq!(exchange(&mut p, b"a AUTHENTICATE PLAIN\r\n"), "+ \r\n");
        p.feed(b"YWxpY2UAYWxpY2UAc2VjcmV0\r\nb NOOP\r\n"); // "alice\0alice\0secret"
        let (tag, u, pw) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!((tag.as_str(), u.as_str(), pw.as_str()), ("a", "alice", "secret"));
        assert_eq!(p.take_output(), b"");
        assert!(p.poll().is_none()); // login outstanding: nothing processed
        assert_eq!(p.into_pending_input(), b"b NOOP\r\n");
    }

    #[test]
    fn authenticate_cancel_and_errors() {
        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (b"a AUTHENTICATE PLAIN\r\n", "+ \r\n"),
                (b"*\r\n", "a BAD AUTHENTICATE cancelled\r\n"),
                (b"b NOOP\r\n", "b OK NOOP completed\r\n"),
                (
                    b"c AUTHENTICATE PLAIN\r\n%%%\r\n",
                    "+ \r\nc BAD Invalid AUTHENTICATE PLAIN response: invalid base64 in SASL response\r\n",
                ),
            ],
        );
        // base64("alice\0secret"): only one NUL
        exchanges(&mut p, &[(b"d AUTHENTICATE PLAIN YWxpY2UAc2VjcmV0\r\n", "d BAD Invalid AUTHENTICATE PLAIN response: malformed SASL PLAIN message: expected authzid NUL authcid NUL password\r\n"),(b"e AUTHENTICATE PLAIN =\r\n", "e BAD Invalid AUTHENTICATE PLAIN response: empty SASL response\r\n"),]);
        // base64("admin\0alice\0secret")
        exchanges(
            &mut p,
            &[
                (
                    b"f AUTHENTICATE PLAIN YWRtaW4AYWxpY2UAc2VjcmV0\r\n",
                    "f NO [AUTHORIZATIONFAILED] Authorization identity must be empty or equal to the user name\r\n",
                ),
                (
                    b"g AUTHENTICATE XOAUTH2 dGVzdA==\r\n",
                    "g NO [CANNOT] Unsupported authentication mechanism (use PLAIN)\r\n",
                ),
                (
                    b"h AUTHENTICATE CRAM-MD5\r\n",
                    "h NO [CANNOT] Unsupported authentication mechanism (use PLAIN)\r\n",
                ),
            ],
        );
    }

    #[test]
    fn starttls_discards_pipelined_plaintext() {
        let mut p = machine(true);
        p.feed(b"a STARTTLS\r\nb LOGIN evil injected\r\nc SEL");
        match p.poll() {
            Some(Event::StartTls) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(s(&p.take_output()), "a OK Begin TLS negotiation now\r\n");
        assert_eq!(p.buffered_len(), 0);
        assert!(!p.wants_input());
        // Plaintext arriving before the handshake completes is dropped too.
        p.feed(b"d LOGIN evil2 x\r\n");
        assert!(p.poll().is_none());
        p.starttls_done();
        assert!(p.poll().is_none());
        assert_eq!(p.take_output(), b"");
        exchanges(
            &mut p,
            &[
                (
                    b"e CAPABILITY\r\n",
                    &format!("* CAPABILITY {CAPS}\r\ne OK CAPABILITY completed\r\n"),
                ),
                (b"f STARTTLS\r\n", "f BAD TLS is already active\r\n"),
            ],
        );
        p.feed(b"g LOGIN alice secret\r\n");
        let (tag, u, _) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!((tag.as_str(), u.as_str()), ("g", "alice"));
    }

    #[test]
    fn login_refused_before_starttls_when_available() {
        let mut p = machine(true);
        exchanges(
            &mut p,
            &[
                (
                    b"a LOGIN alice secret\r\n",
                    "a NO [PRIVACYREQUIRED] Use STARTTLS first: login over plaintext is not allowed\r\n",
                ),
                (
                    b"b AUTHENTICATE PLAIN\r\n",
                    "b NO [PRIVACYREQUIRED] Use STARTTLS first: login over plaintext is not allowed\r\n",
                ),
            ],
        );
    }

    #[test]
    fn starttls_not_configured() {
        let mut p = machine(false);
        assert_eq!(
            exchange(&mut p, b"a STARTTLS\r\n"),
            "a BAD STARTTLS not available: TLS is not configured\r\n"
        );
    }

    #[test]
    fn pipelined_after_login_is_handed_over_exactly() {
        let mut p = machine(false);
        let after = b"a2 SELECT INBOX\r\na3 APPEND INBOX {5}\r\nhel\r\na4 FETCH 1:* (FL";
        let mut input = b"a0 CAPABILITY\r\na1 LOGIN alice secret\r\n".to_vec();
        input.extend_from_slice(after);
        p.feed(&input);
        let (tag, _, _) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!(tag, "a1");
        // The CAPABILITY reply was produced before the event; nothing after.
        assert_eq!(
            s(&p.take_output()),
            format!("* CAPABILITY {CAPS}\r\na0 OK CAPABILITY completed\r\n")
        );
        assert!(!p.wants_input());
        assert!(p.poll().is_none());
        assert_eq!(p.take_output(), b""); // in particular no "+" for {5}
        assert_eq!(p.into_pending_input(), after.to_vec());
    }

    #[test]
    fn login_failed_resumes_processing() {
        let mut p = machine(false);
        p.feed(b"a LOGIN alice wrong\r\nb NOOP\r\nc LOGIN alice right\r\n");
        {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert!(p.poll().is_none());
        p.refuse_login("a", "AUTHENTICATIONFAILED", "Invalid credentials");
        assert_eq!(
            s(&p.take_output()),
            "a NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"
        );
        let (tag, _, pw) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!((tag.as_str(), pw.as_str()), ("c", "right"));
        assert_eq!(s(&p.take_output()), "b OK NOOP completed\r\n");
        // No code, and an injected CRLF in the text is neutralised.
        p.refuse_login("c", "", "bad\r\n* OK injected");
        assert_eq!(s(&p.take_output()), "c NO bad  * OK injected\r\n");
        assert!(p.poll().is_none());
    }

    #[test]
    fn commands_before_login_rejected_with_tags() {
        let mut p = machine(false);
        exchanges(&mut p, &[(b"a SELECT INBOX\r\nb uid fetch 1 (FLAGS)\r\nc FOO\r\n", "a BAD SELECT not valid before login\r\nb BAD UID not valid before login\r\nc BAD Unknown command\r\n"),(b"d NOOP extra\r\n\r\n+ NOOP\r\n", "d BAD Unexpected arguments to NOOP\r\n* BAD Missing or invalid command tag\r\n* BAD Missing or invalid command tag\r\n"),]);
    }

    #[test]
    fn logout() {
        let mut p = machine(false);
        p.feed(b"a LOGOUT\r\nb NOOP\r\n");
        assert!(matches!(p.poll(), Some(Event::Quit)));
        assert_eq!(
            s(&p.take_output()),
            "* BYE mailproxy logging out\r\na OK LOGOUT completed\r\n"
        );
        assert!(p.poll().is_none());
        assert_eq!(p.buffered_len(), 0);
    }

    #[test]
    fn nul_and_invalid_utf8_get_bad() {
        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (b"a\0 NOOP\r\n", "a BAD Missing command after tag\r\n"),
                (b"\0\0\0\r\n", "* BAD Missing or invalid command tag\r\n"),
                (
                    b"b LOGIN \"\xff\xfe\" x\r\n",
                    "b BAD LOGIN user name and password must be valid UTF-8\r\n",
                ),
                (
                    b"c LOGIN {2+}\r\n\xc3\x28 x\r\n",
                    "c BAD LOGIN user name and password must be valid UTF-8\r\n",
                ),
                (
                    b"d LOGIN alice \"x\0\"\r\n",
                    "d BAD Invalid arguments to LOGIN (expected: LOGIN user password)\r\n",
                ),
                (b"\xff\xfe NOOP\r\n", "* BAD Missing or invalid command tag\r\n"),
                (b"e NOOP\r\n", "e OK NOOP completed\r\n"),
            ],
        );
    }

    /// RFC 2971's largest `ID` (30 pairs, 1,024-octet values) is answered,
    /// on one line or with literals, and a login follows.
    #[test]
    fn maximal_id_is_answered() {
        let value = "v".repeat(1024);
        let pairs: Vec<String> = (0..30).map(|i| format!("\"field-{i:02}\" \"{value}\"")).collect();
        let line = format!("i ID ({})\r\n", pairs.join(" "));
        assert!(line.len() > 30 * 1024);
        let mut p = machine(false);
        assert_eq!(
            exchange(&mut p, line.as_bytes()),
            "* ID (\"name\" \"mailproxy\")\r\ni OK ID completed\r\n"
        );
        // Every octet escaped: the longest line RFC 2971 allows.
        let esc = format!("\"{}\" \"{}\"", "\\\\".repeat(30), "\\\"".repeat(1024));
        let line = format!("j ID ({})\r\n", vec![esc; 30].join(" "));
        assert_eq!(line.len(), "j ID \r\n".len() + crate::imap::framing::MAX_ID_PARAMS);
        assert!(exchange(&mut p, line.as_bytes()).ends_with("j OK ID completed\r\n"));
        let mut lit = Vec::from(&b"k ID ("[..]);
        for i in 0..30 {
            lit.extend_from_slice(format!("\"f{i}\" {{1024}}\r\n").as_bytes());
            lit.extend_from_slice(value.as_bytes());
            lit.push(if i == 29 { b')' } else { b' ' });
        }
        lit.extend_from_slice(b"\r\n");
        let out = exchange(&mut p, &lit);
        assert_eq!(out.matches("+ Ready for literal data\r\n").count(), 30);
        assert!(out.ends_with("k OK ID completed\r\n"), "{out}");
        p.feed(b"l LOGIN alice secret\r\n");
        let ev = p.poll();
        assert_eq!(expect_login(&p, ev).1, "alice");
        // Other commands keep max_line.
        let mut p = machine(false);
        p.feed(format!("m LOGIN {}\r\n", "a".repeat(8192)).as_bytes());
        assert!(matches!(p.poll(), Some(Event::Close)));
        assert_eq!(s(&p.take_output()), "* BYE Line too long\r\n");
        assert!(p.max_buffer() <= 8192 + crate::imap::framing::MAX_ID_PARAMS + FEED_SLACK);
    }

    /// SASL-IR and continuation lines carry 12,288-octet responses.
    #[test]
    fn authenticate_carries_long_sasl_responses() {
        let pw = "p".repeat(9216 - 7);
        let ir = sasl::encode_plain("", "alice", &pw);
        assert_eq!(ir.len(), crate::preauth::MAX_SASL_RESPONSE);
        let mut p = machine(false);
        p.feed(format!("a AUTHENTICATE PLAIN {}\r\n", ir.as_str()).as_bytes());
        let ev = p.poll();
        assert_eq!(expect_login(&p, ev).2, pw);
        p.login_failed(Failure::Credentials, "no");
        p.take_output();
        assert_eq!(exchange(&mut p, b"b AUTHENTICATE PLAIN\r\n"), "+ \r\n");
        p.feed(format!("{}\r\n", ir.as_str()).as_bytes());
        let ev = p.poll();
        assert_eq!(expect_login(&p, ev).0, "b");
        p.login_failed(Failure::Credentials, "no");
        p.take_output();
        assert_eq!(exchange(&mut p, b"c AUTHENTICATE PLAIN\r\n"), "+ \r\n");
        p.feed(format!("{}\r\n", "Q".repeat(12_289)).as_bytes());
        assert!(matches!(p.poll(), Some(Event::Close)));
        assert_eq!(s(&p.take_output()), "* BYE Line too long\r\n");
    }

    #[test]
    fn huge_sync_literals_rejected_recoverably() {
        let mut p = machine(false);
        for n in ["4294967295", "18446744073709551615", "99999999999999999999999", "8193"] {
            let line = format!("a LOGIN {{{n}}}\r\n");
            assert_eq!(exchange(&mut p, line.as_bytes()), "a BAD Literal too large\r\n");
            assert_eq!(p.buffered_len(), 0);
        }
        // Inside AUTHENTICATE continuation the auth tag is used.
        exchanges(
            &mut p,
            &[
                (
                    b"b AUTHENTICATE PLAIN\r\n{99999}\r\n",
                    "+ \r\nb BAD Literal too large\r\n",
                ),
                (b"c NOOP\r\n", "c OK NOOP completed\r\n"),
            ],
        );
        // The maximum itself is fine.
        p.feed(format!("d LOGIN alice {{{}}}\r\n", 8192).as_bytes());
        p.feed(&[b'p'; 8192]);
        p.feed(b"\r\n");
        let (_, _, pw) = {
            let ev = p.poll();
            expect_login(&p, ev)
        };
        assert_eq!(pw.len(), 8192);
    }

    #[test]
    fn huge_non_sync_literal_is_fatal() {
        for n in ["4294967295", "18446744073709551615", "8193"] {
            let mut p = machine(false);
            p.feed(format!("a LOGIN {{{n}+}}\r\n").as_bytes());
            assert!(matches!(p.poll(), Some(Event::Close)));
            assert_eq!(s(&p.take_output()), "* BYE Literal too large\r\n");
            assert_eq!(p.buffered_len(), 0);
        }
    }

    #[test]
    fn ten_megabyte_line_rejected_without_buffering() {
        testkit::huge_line(
            || machine(false),
            "* BYE Too much input\r\n",
            "* BYE Line too long\r\n",
            b"a NOOP\r\n",
        );
    }

    #[test]
    fn too_many_bad_commands_close() {
        testkit::garbage_closes(
            || machine(false),
            b"x GARBAGE\r\n",
            "x BAD Unknown command\r\n",
            "x BAD Unknown command\r\n* BYE Too many invalid commands\r\n",
            b"y NOOP\r\n",
        );
    }

    #[test]
    fn event_debug_redacts() {
        let mut p = machine(false);
        p.feed(b"a LOGIN alice hunter2\r\n");
        let ev = p.poll().unwrap();
        let d = format!("{ev:?} {p:?}");
        assert!(!d.contains("hunter2") && !d.contains("alice"), "{d}");
    }

    // ---------------------------------------------------------- chunking / fuzz

    /// Minimal driver: feeds `chunks`, polls, answers events (logins fail,
    /// STARTTLS completes), returns the transcript of output and events.
    fn drive(cfg: PreAuthConfig, chunks: &[&[u8]]) -> (String, Vec<String>) {
        let (out, events, _) = testkit::drive(ImapPreAuth::new(cfg), chunks, refuse);
        (out, events)
    }

    fn refuse(p: &mut ImapPreAuth, user: &str, pass: &str) -> String {
        let tag = p.login_tag().expect("a login is outstanding").to_string();
        p.refuse_login(&tag, "AUTHENTICATIONFAILED", "nope");
        format!("login {tag} {user} {pass}")
    }

    const SCRIPT: &[u8] = b"a1 CAPABILITY\r\n\
        a2 LOGIN {5}\r\nalice {6}\r\nsecret\r\n\
        a3 LOGIN \"bob\" {3+}\r\npwd\r\n\
        a4 AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n\
        a5 AUTHENTICATE PLAIN\r\n*\r\n\
        a6 SELECT INBOX\r\n\
        a7 LOGIN {99999}\r\n\
        a8 ID (\"name\" {3}\r\nfoo)\r\n\
        \0bad\r\n\
        a9 NOOP\n\
        a10 LOGOUT\r\n";

    #[test]
    fn byte_at_a_time_equals_all_at_once() {
        let whole = drive(PreAuthConfig::default(), &[SCRIPT]);
        let bytes: Vec<&[u8]> = SCRIPT.chunks(1).collect();
        let single = drive(PreAuthConfig::default(), &bytes);
        assert_eq!(whole, single);
        assert_eq!(
            whole.1,
            vec![
                "login a2 alice secret",
                "login a3 bob pwd",
                "login a4 alice secret",
                "quit"
            ]
        );
        assert!(whole.0.ends_with("a10 OK LOGOUT completed\r\n"));
        assert_eq!(whole.0.matches("+ Ready for literal data\r\n").count(), 3);
        for chunk in [2, 3, 7, 13, 64] {
            let bytes: Vec<&[u8]> = SCRIPT.chunks(chunk).collect();
            assert_eq!(drive(PreAuthConfig::default(), &bytes), whole, "chunk {chunk}");
        }
    }

    const TOKENS: &[&[u8]] = &[
        b"a",
        b" ",
        b"\r\n",
        b"\n",
        b"\r",
        b"LOGIN",
        b"AUTHENTICATE",
        b"PLAIN",
        b"STARTTLS",
        b"CAPABILITY",
        b"NOOP",
        b"ID",
        b"NIL",
        b"(",
        b")",
        b"\"",
        b"\\",
        b"{5}",
        b"{3+}",
        b"{0}\r\n",
        b"{99999999999999999999}",
        b"{70}\r\n",
        b"{70+}\r\n",
        b"*",
        b"+",
        b"=",
        b"AGFsaWNlAHNlY3JldA==",
        b"\0",
        b"\xff",
        b"LOGOUT",
        b"SELECT",
        b"{18446744073709551615+}",
    ];

    const COMMANDS: &[&[u8]] = &[
        b"t1 LOGIN alice secret\r\n",
        b"t2 LOGIN {5}\r\nalice {6}\r\nsecret\r\n",
        b"t3 LOGIN \"a\\\\b\" {3+}\r\npwd\r\n",
        b"t4 AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n",
        b"t5 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"t6 AUTHENTICATE PLAIN\r\n*\r\n",
        b"t7 CAPABILITY\r\n",
        b"t8 NOOP\r\n",
        b"t9 STARTTLS\r\n",
        b"t10 ID (\"name\" {2}\r\nxy)\r\n",
        b"t11 SELECT INBOX\r\n",
        b"t12 LOGOUT\r\n",
        b"t13 LOGIN {40}\r\n",
    ];

    #[test]
    fn random_input_random_chunking_never_panics_and_stays_bounded() {
        testkit::random_chunking(
            TOKENS,
            COMMANDS,
            PreAuthConfig {
                starttls: true,
                max_line: 64,
                max_literal: 32,
            },
            |base, starttls| ImapPreAuth::new(PreAuthConfig { starttls, ..base }),
            refuse,
            &["login", "starttls", "quit", "close"],
            |input| {
                // The grammar and response parsers never panic either.
                let _ = command::parse_command(input);
                let _ = super::super::response::parse_response(input);
                let _ = super::super::response::find_line(input, 64);
            },
        );
    }
}

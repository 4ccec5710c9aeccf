//! Sans-I/O state machine for the local POP3 session before login
//! (AUTHORIZATION state, RFC 1939 §4).
//!
//! Driven through the shared contract in [`crate::preauth`]; this file holds
//! only what is POP3: the commands, the replies and their wording.
//!
//! Security properties:
//! * bounded memory: the input buffer never exceeds [`Pop3PreAuth::max_buffer`];
//!   an over-long line closes the connection (`-ERR Line too long`);
//! * after `STLS` everything buffered (pipelined plaintext) is discarded;
//! * while a login is outstanding nothing else is processed, and the bytes
//!   after the login command are handed over verbatim by `into_pending_input`;
//! * buffers holding client input are zeroized when consumed or dropped.

use std::fmt;

use zeroize::Zeroizing;

use super::command::{self, Command};
use crate::linebuf::{LineFramer, TooLong};
use crate::preauth::{Core, Failure, Phase, PreAuth, Step};
pub use crate::preauth::{Event, FEED_SLACK, MAX_CONSECUTIVE_BAD};
use crate::sasl::{self, SaslError};
use crate::text::{one_line, strip_eol};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreAuthConfig {
    /// Local TLS is configured and not yet active on this connection (plain
    /// port with STLS). When true, USER/PASS/AUTH are refused until STLS has
    /// completed.
    pub starttls: bool,
    /// Longest accepted command line, excluding CRLF; an `AUTH` line may
    /// carry a SASL response beyond it, and a line answering a challenge may
    /// be [`crate::preauth::MAX_SASL_RESPONSE`] long.
    pub max_line: usize,
}

impl Default for PreAuthConfig {
    fn default() -> Self {
        PreAuthConfig {
            starttls: false,
            max_line: 8 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading commands.
    Commands,
    /// `AUTH PLAIN` sent `+ `; the next line is the SASL response.
    AuthPlain,
    /// An `Event::Login` is outstanding.
    LoginPending,
    /// An `Event::StartTls` is outstanding; input is discarded.
    AwaitTls,
    /// Quit/Close happened; input is discarded.
    Done,
}

/// The pre-authentication POP3 state machine. See the module documentation.
pub struct Pop3PreAuth {
    cfg: PreAuthConfig,
    framer: LineFramer,
    core: Core,
    state: State,
    /// From `USER`, waiting for `PASS`.
    user: Option<Zeroizing<String>>,
}

impl fmt::Debug for Pop3PreAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pop3PreAuth")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .field("user_given", &self.user.is_some())
            .field("core", &self.core)
            .finish()
    }
}

/// Refusal of plaintext credentials before STLS (wording as Dovecot's).
const NEED_TLS: &str = "-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; use STLS first";

impl Pop3PreAuth {
    /// Create the state machine; the greeting is queued in the output.
    pub fn new(cfg: PreAuthConfig) -> Self {
        let framer = LineFramer::new(cfg.max_line);
        let mut p = Pop3PreAuth {
            cfg,
            framer,
            core: Core::new(framer.max_len().saturating_add(2), cfg.starttls),
            state: State::Commands,
            user: None,
        };
        p.core.push_line("+OK mailproxy ready");
        p
    }

    /// The capability lines currently advertised by `CAPA`.
    pub fn capabilities(&self) -> Vec<&'static str> {
        let mut caps = vec![
            "USER",
            "SASL PLAIN",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "TOP",
            "UIDL",
            "PIPELINING",
        ];
        if self.core.starttls_available() {
            caps.push("STLS");
        }
        caps.push("IMPLEMENTATION mailproxy");
        caps
    }

    /// The outstanding login failed: emit `-ERR [code] text` with an RFC
    /// 3206 response code (`AUTH`: the credentials; `SYS/TEMP`: try again
    /// later; `SYS/PERM`: a person must act; `""` for none) and resume
    /// processing buffered input (call `poll` next).
    pub fn refuse_login(&mut self, code: &str, text: &str) {
        let code: String = code
            .chars()
            .filter(|c| c.is_ascii_graphic() && *c != ']' && *c != '[')
            .collect();
        let text = one_line(text);
        let text = if text.trim().is_empty() {
            "Authentication failed"
        } else {
            text.trim()
        };
        if code.is_empty() {
            self.err(&format!("-ERR {text}"));
        } else {
            self.err(&format!("-ERR [{code}] {text}"));
        }
        if self.state == State::LoginPending {
            self.state = State::Commands;
        }
    }

    // ------------------------------------------------------------ internals

    fn push_line(&mut self, line: &str) {
        self.core.push_line(line);
    }

    fn ok(&mut self, line: &str) {
        self.core.push_line(line);
        self.core.succeeded();
    }

    fn err(&mut self, line: &str) {
        self.core.push_line(line);
        self.core.failed();
    }

    fn handle(&mut self, line: &[u8]) -> Option<Event> {
        if self.state == State::AuthPlain {
            self.state = State::Commands;
            let resp = strip_eol(line);
            if resp == b"*" {
                self.err("-ERR Authentication cancelled");
                return None;
            }
            return self.plain_response(resp);
        }

        // RFC 1939: PASS is only valid immediately after a successful USER;
        // any other line ends the USER/PASS sequence.
        let user = self.user.take();
        let cmd = match command::parse_command(line) {
            Ok(c) => c,
            Err(e) => {
                self.err(&e.reply);
                return None;
            }
        };
        match cmd {
            Command::Capa => {
                self.ok("+OK Capability list follows");
                for c in self.capabilities() {
                    self.push_line(c);
                }
                self.push_line(".");
            }
            Command::Quit => {
                self.ok("+OK Bye");
                self.state = State::Done;
                self.core.discard();
                return Some(Event::Quit);
            }
            Command::Stls => {
                if self.core.starttls_available() {
                    self.ok("+OK Begin TLS negotiation");
                    // Never act on plaintext pipelined before the handshake.
                    self.core.discard();
                    self.framer.reset();
                    self.user = None;
                    self.state = State::AwaitTls;
                    return Some(Event::StartTls);
                }
                if self.core.tls_active() {
                    self.err("-ERR TLS already active");
                } else {
                    self.err("-ERR STLS not available");
                }
            }
            Command::User { name } => {
                if !self.core.login_allowed() {
                    self.err(NEED_TLS);
                    return None;
                }
                self.user = Some(name);
                self.ok("+OK Send PASS");
            }
            Command::Pass { password } => {
                let Some(username) = user else {
                    self.err("-ERR Send USER first");
                    return None;
                };
                self.state = State::LoginPending;
                return Some(Event::Login { username, password });
            }
            Command::Auth {
                mechanism,
                initial_response,
            } => {
                let Some(mechanism) = mechanism else {
                    self.ok("+OK Supported mechanisms follow");
                    self.push_line("PLAIN");
                    self.push_line(".");
                    return None;
                };
                if mechanism != "PLAIN" {
                    self.err("-ERR Unsupported authentication mechanism (use PLAIN)");
                    return None;
                }
                if !self.core.login_allowed() {
                    self.err(NEED_TLS);
                    return None;
                }
                match initial_response {
                    Some(ir) => return self.plain_response(ir.as_bytes()),
                    None => {
                        self.push_line("+ ");
                        self.state = State::AuthPlain;
                    }
                }
            }
            Command::Apop => self.err("-ERR APOP not supported; use USER/PASS or AUTH PLAIN"),
            Command::Transaction { .. } => self.err("-ERR Not authenticated"),
            Command::Other { .. } => self.err(command::UNKNOWN),
        }
        None
    }

    fn plain_response(&mut self, b64: &[u8]) -> Option<Event> {
        match sasl::decode_plain(b64) {
            Ok((username, password)) => {
                self.state = State::LoginPending;
                Some(Event::Login { username, password })
            }
            Err(SaslError::AuthzidMismatch) => {
                self.err("-ERR [AUTH] Authorization identity must be empty or equal to the user name");
                None
            }
            Err(e) => {
                self.err(&format!("-ERR Invalid AUTH PLAIN response: {e}"));
                None
            }
        }
    }
}

impl PreAuth for Pop3PreAuth {
    type Success = ();

    crate::preauth::core_access!();

    fn farewell(&self, reason: &str) -> String {
        format!("-ERR {reason}, closing connection")
    }

    fn phase(&self) -> Phase {
        match self.state {
            State::Done => Phase::Done,
            State::AwaitTls => Phase::AwaitTls,
            State::LoginPending => Phase::Waiting,
            State::Commands | State::AuthPlain => Phase::Reading,
        }
    }

    fn close(&mut self) {
        self.framer.reset();
        self.state = State::Done;
    }

    fn step(&mut self) -> Step {
        self.framer.sasl_response = self.state == State::AuthPlain;
        match self.core.next_line(&mut self.framer) {
            None => Step::More,
            Some(Err(TooLong)) => Step::Event(self.fatal("Line too long")),
            Some(Ok(line)) => self.handle(&line).map_or(Step::Next, Step::Event),
        }
    }

    /// STLS is no longer advertised; a `USER` from before is forgotten.
    fn tls_started(&mut self) {
        self.framer.reset();
        self.user = None;
        if self.state == State::AwaitTls {
            self.state = State::Commands;
        }
    }

    fn login_failed(&mut self, failure: Failure, text: &str) {
        let code = match failure {
            Failure::Credentials => "AUTH",
            Failure::Unavailable => "SYS/TEMP",
            Failure::Action => "SYS/PERM",
        };
        self.refuse_login(code, text);
    }

    fn login_succeeded(&mut self, (): ()) -> bool {
        self.core.push_line("+OK Logged in");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preauth::testkit::{self, exchange, exchanges, expect_login, text as s};

    const CAPA: &str = "+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\n\
        AUTH-RESP-CODE\r\nTOP\r\nUIDL\r\nPIPELINING\r\nIMPLEMENTATION mailproxy\r\n.\r\n";

    fn cfg(starttls: bool) -> PreAuthConfig {
        PreAuthConfig {
            starttls,
            ..PreAuthConfig::default()
        }
    }

    fn machine(starttls: bool) -> Pop3PreAuth {
        let mut p = Pop3PreAuth::new(cfg(starttls));
        p.take_output();
        p
    }

    #[test]
    fn greeting_and_capa() {
        let mut p = Pop3PreAuth::new(cfg(false));
        assert_eq!(s(&p.take_output()), "+OK mailproxy ready\r\n");
        assert_eq!(exchange(&mut p, b"CAPA\r\n"), CAPA);
        let mut p = machine(true);
        exchanges(
            &mut p,
            &[
                (b"capa\r\n", &CAPA.replace("PIPELINING\r\n", "PIPELINING\r\nSTLS\r\n")),
                (b"AUTH\r\n", "+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"),
            ],
        );
    }

    #[test]
    fn user_pass_rfc1939_trace() {
        let mut p = machine(false);
        assert_eq!(exchange(&mut p, b"USER mrose\r\n"), "+OK Send PASS\r\n");
        p.feed(b"PASS tanstaaf with spaces \r\n");
        let (u, pw) = expect_login(p.poll());
        assert_eq!((u.as_str(), pw.as_str()), ("mrose", "tanstaaf with spaces "));
        assert_eq!(p.take_output(), b"");
        assert!(!p.wants_input());
        p.refuse_login("AUTH", "Invalid credentials");
        assert_eq!(s(&p.take_output()), "-ERR [AUTH] Invalid credentials\r\n");
        // A failed PASS needs a new USER.
        assert_eq!(exchange(&mut p, b"PASS again\r\n"), "-ERR Send USER first\r\n");
        // Any command between USER and PASS ends the sequence.
        exchanges(
            &mut p,
            &[
                (
                    b"USER a\r\nCAPA\r\nPASS x\r\n",
                    &format!("+OK Send PASS\r\n{CAPA}-ERR Send USER first\r\n"),
                ),
                (
                    b"USER\r\nPASS\r\nPASS \r\n",
                    "-ERR Syntax: USER name\r\n-ERR Syntax: PASS password\r\n-ERR Syntax: PASS password\r\n",
                ),
                (b"USER a\r\nPASS\r\n", "+OK Send PASS\r\n-ERR Syntax: PASS password\r\n"),
            ],
        );
        // Other codes and injected line breaks.
        p.feed(b"USER a\r\nPASS b\r\n");
        expect_login(p.poll());
        p.refuse_login("SYS/TEMP", "try\r\n+OK later");
        assert_eq!(
            s(&p.take_output()),
            "+OK Send PASS\r\n-ERR [SYS/TEMP] try  +OK later\r\n"
        );
        p.feed(b"USER a\r\nPASS b\r\n");
        expect_login(p.poll());
        p.refuse_login("", "");
        assert_eq!(s(&p.take_output()), "+OK Send PASS\r\n-ERR Authentication failed\r\n");
    }

    /// RFC 5034 §4 bounds a response only by its mechanism: 12,288 octets
    /// (RFC 4954's figure) are answered inline or after `+`; other lines
    /// keep `max_line`.
    #[test]
    fn auth_lines_carry_long_sasl_responses() {
        let pw = "p".repeat(9216 - 7);
        let ir = sasl::encode_plain("", "alice", &pw);
        assert_eq!(ir.len(), crate::preauth::MAX_SASL_RESPONSE);
        let mut p = machine(false);
        p.feed(format!("AUTH PLAIN {}\r\n", ir.as_str()).as_bytes());
        assert_eq!(expect_login(p.poll()).1, pw);
        p.refuse_login("AUTH", "no");
        assert_eq!(exchange(&mut p, b"AUTH PLAIN\r\n"), "-ERR [AUTH] no\r\n+ \r\n");
        p.feed(format!("{}\r\n", ir.as_str()).as_bytes());
        assert_eq!(expect_login(p.poll()).1, pw);
        p.refuse_login("AUTH", "no");
        p.take_output();
        let limit = 8192 + 12_288;
        let line = format!("AUTH PLAIN {}", "A".repeat(limit - 11));
        assert!(exchange(&mut p, format!("{line}\r\n").as_bytes()).starts_with("-ERR Invalid AUTH PLAIN response"));
        let over = |pre: &[u8], line: &str| {
            let mut p = machine(false);
            exchange(&mut p, pre);
            p.feed(format!("{line}\r\n").as_bytes());
            assert!(matches!(p.poll(), Some(Event::Close)), "{}", line.len());
            assert_eq!(s(&p.take_output()), "-ERR Line too long, closing connection\r\n");
        };
        over(b"", &format!("{line}A"));
        over(b"", &format!("USER {}", "a".repeat(8192 - 4)));
        over(b"AUTH PLAIN\r\n", &"Q".repeat(12_289));
        assert!(p.max_buffer() <= limit + 2 + FEED_SLACK);
    }

    #[test]
    fn auth_plain_forms() {
        let mut p = machine(false);
        p.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        let (u, pw) = expect_login(p.poll());
        assert_eq!((u.as_str(), pw.as_str()), ("alice", "secret"));
        assert_eq!(p.take_output(), b"");
        p.refuse_login("AUTH", "nope");
        p.take_output();
        // RFC 5034 continuation.
        assert_eq!(exchange(&mut p, b"AUTH PLAIN\r\n"), "+ \r\n");
        p.feed(b"YWxpY2UAYWxpY2UAc2VjcmV0\r\nSTAT\r\n");
        let (u, pw) = expect_login(p.poll());
        assert_eq!((u.as_str(), pw.as_str()), ("alice", "secret"));
        assert!(p.poll().is_none());
        assert_eq!(p.take_output(), b"");
        assert_eq!(p.into_pending_input(), b"STAT\r\n");

        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (b"AUTH PLAIN\r\n*\r\n", "+ \r\n-ERR Authentication cancelled\r\n"),
                (
                    b"AUTH PLAIN =\r\n",
                    "-ERR Invalid AUTH PLAIN response: empty SASL response\r\n",
                ),
                (
                    b"AUTH PLAIN\r\n%%%\r\n",
                    "+ \r\n-ERR Invalid AUTH PLAIN response: invalid base64 in SASL response\r\n",
                ),
                (
                    b"AUTH PLAIN YWRtaW4AYWxpY2UAc2VjcmV0\r\n",
                    "-ERR [AUTH] Authorization identity must be empty or equal to the user name\r\n",
                ),
                (
                    b"AUTH XOAUTH2 dGVzdA==\r\nAUTH CRAM-MD5\r\n",
                    &"-ERR Unsupported authentication mechanism (use PLAIN)\r\n".repeat(2),
                ),
                (
                    b"AUTH PLAIN a b\r\n",
                    "-ERR Syntax: AUTH [mechanism [initial-response]]\r\n",
                ),
            ],
        );
    }

    #[test]
    fn commands_before_login() {
        let mut p = machine(false);
        for c in [
            "STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 10", "UIDL", "LAST",
        ] {
            assert_eq!(
                exchange(&mut p, format!("{c}\r\n").as_bytes()),
                "-ERR Not authenticated\r\n",
                "{c}"
            );
        }
        assert_eq!(
            exchange(&mut p, b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\nXYZZY\r\n\r\n"),
            "-ERR APOP not supported; use USER/PASS or AUTH PLAIN\r\n\
             -ERR Unknown command\r\n-ERR Unknown command\r\n"
        );
        p.feed(b"QUIT\r\nCAPA\r\n");
        assert!(matches!(p.poll(), Some(Event::Quit)));
        assert_eq!(s(&p.take_output()), "+OK Bye\r\n");
        assert!(p.poll().is_none());
        assert_eq!(p.buffered_len(), 0);
        assert!(!p.wants_input());
    }

    #[test]
    fn stls_discards_pipelined_plaintext() {
        let mut p = machine(true);
        assert_eq!(
            exchange(&mut p, b"USER alice\r\nAUTH PLAIN\r\n"),
            format!("{NEED_TLS}\r\n{NEED_TLS}\r\n")
        );
        p.feed(b"STLS\r\nUSER evil\r\nPASS injected\r\nST");
        assert!(matches!(p.poll(), Some(Event::StartTls)));
        assert_eq!(s(&p.take_output()), "+OK Begin TLS negotiation\r\n");
        assert_eq!(p.buffered_len(), 0);
        assert!(!p.wants_input());
        p.feed(b"PASS injected2\r\n");
        assert!(p.poll().is_none());
        p.starttls_done();
        assert!(p.poll().is_none());
        assert_eq!(p.take_output(), b"");
        exchanges(
            &mut p,
            &[
                (b"PASS x\r\n", "-ERR Send USER first\r\n"),
                (b"CAPA\r\n", CAPA),
                (b"STLS\r\n", "-ERR TLS already active\r\n"),
            ],
        );
        p.feed(b"USER alice\r\nPASS secret\r\n");
        assert_eq!(expect_login(p.poll()).0, "alice");
        let mut p = machine(false);
        assert_eq!(exchange(&mut p, b"STLS\r\n"), "-ERR STLS not available\r\n");
        // USER before STLS does not survive it.
        let mut p = Pop3PreAuth::new(PreAuthConfig {
            starttls: true,
            ..cfg(true)
        });
        p.take_output();
        p.feed(b"STLS\r\n");
        assert!(matches!(p.poll(), Some(Event::StartTls)));
        p.starttls_done();
        p.take_output();
        assert_eq!(exchange(&mut p, b"USER a\r\n"), "+OK Send PASS\r\n");
    }

    #[test]
    fn pipelined_after_login_is_handed_over_exactly() {
        let mut p = machine(false);
        let after: &[u8] = b"STAT\r\nLIST\r\nRETR 1\r\nUIDL 1\xff\0partial";
        let mut input = b"CAPA\r\nUSER alice\r\nPASS secret\r\n".to_vec();
        input.extend_from_slice(after);
        p.feed(&input);
        expect_login(p.poll());
        assert_eq!(s(&p.take_output()), format!("{CAPA}+OK Send PASS\r\n"));
        assert!(p.poll().is_none());
        assert_eq!(p.into_pending_input(), after.to_vec());
    }

    #[test]
    fn nul_and_invalid_utf8() {
        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (
                    b"\0\0\r\nUS\0ER a\r\n\xff\xfe\r\n",
                    &"-ERR Unknown command\r\n".repeat(3),
                ),
                (
                    b"USER \xc3\x28\r\nUSER a\r\nPASS a\0b\r\n",
                    "-ERR user name must be valid UTF-8\r\n+OK Send PASS\r\n\
             -ERR Invalid characters in password\r\n",
                ),
                (
                    b"AUTH PLAIN AGFs/2ljZQBwdw==\r\n",
                    "-ERR Invalid AUTH PLAIN response: SASL response is not valid UTF-8\r\n",
                ),
                (b"CAPA\r\n", CAPA),
            ],
        );
    }

    #[test]
    fn ten_megabyte_line_rejected_without_buffering() {
        testkit::huge_line(
            || machine(false),
            "-ERR Too much input, closing connection\r\n",
            "-ERR Line too long, closing connection\r\n",
            b"CAPA\r\n",
        );
        // The maximum itself is fine (a long password).
        let mut p = machine(false);
        let mut line = b"PASS ".to_vec();
        line.resize(8 * 1024, b'p');
        line.extend_from_slice(b"\r\n");
        p.feed(b"USER a\r\n");
        p.feed(&line);
        let (_, pw) = expect_login(p.poll());
        assert_eq!(pw.len(), 8 * 1024 - 5);
    }

    #[test]
    fn too_many_bad_commands_close() {
        testkit::garbage_closes(
            || machine(false),
            b"GARBAGE\r\n",
            "-ERR Unknown command\r\n",
            "-ERR Too many invalid commands, closing connection\r\n",
            b"CAPA\r\n",
        );
        // Failed logins count too.
        let mut p = machine(false);
        let mut closed = false;
        for _ in 0..MAX_CONSECUTIVE_BAD + 1 {
            p.feed(b"USER a\r\nPASS b\r\n");
            match p.poll() {
                Some(Event::Login { .. }) => p.refuse_login("AUTH", "no"),
                Some(Event::Close) => {
                    closed = true;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(!closed, "USER +OK resets the count between attempts");
    }

    #[test]
    fn event_debug_redacts() {
        let mut p = machine(false);
        p.feed(b"USER alice\r\n");
        assert!(p.poll().is_none());
        let d = format!("{p:?}");
        assert!(!d.contains("alice"), "{d}");
        p.feed(b"PASS hunter2\r\n");
        let ev = p.poll().unwrap();
        let d = format!("{ev:?} {p:?}");
        assert!(!d.contains("hunter2") && !d.contains("alice"), "{d}");
    }

    // ---------------------------------------------------------- chunking / fuzz

    fn drive(cfg: PreAuthConfig, chunks: &[&[u8]]) -> (String, Vec<String>) {
        let (out, events, _) = testkit::drive(Pop3PreAuth::new(cfg), chunks, refuse);
        (out, events)
    }

    fn refuse(p: &mut Pop3PreAuth, user: &str, pass: &str) -> String {
        p.refuse_login("AUTH", "nope");
        format!("login {user} {pass}")
    }

    const SCRIPT: &[u8] = b"CAPA\r\n\
        USER alice\r\nPASS secret\r\n\
        USER bob\nPASS two words\n\
        AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n\
        AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n\
        AUTH PLAIN\r\n*\r\n\
        AUTH\r\n\
        STAT\r\n\
        \0bad\r\n\
        QUIT\r\n";

    #[test]
    fn byte_at_a_time_equals_all_at_once() {
        let whole = drive(PreAuthConfig::default(), &[SCRIPT]);
        assert_eq!(
            whole.1,
            vec![
                "login alice secret",
                "login bob two words",
                "login alice secret",
                "login alice secret",
                "quit"
            ]
        );
        assert!(whole.0.ends_with("-ERR Unknown command\r\n+OK Bye\r\n"));
        for chunk in [1, 2, 3, 7, 13, 64] {
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
        b"USER",
        b"PASS",
        b"AUTH",
        b"PLAIN",
        b"STLS",
        b"CAPA",
        b"QUIT",
        b"STAT",
        b"*",
        b"=",
        b"+",
        b".",
        b"AGFsaWNlAHNlY3JldA==",
        b"\0",
        b"\xff",
    ];

    const COMMANDS: &[&[u8]] = &[
        b"USER alice\r\n",
        b"PASS secret\r\n",
        b"USER bob\r\nPASS x y\r\n",
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n",
        b"AUTH PLAIN\r\n*\r\n",
        b"AUTH\r\n",
        b"CAPA\r\n",
        b"STLS\r\n",
        b"STAT\r\n",
        b"QUIT\r\n",
        b"APOP a b\r\n",
    ];

    #[test]
    fn random_input_random_chunking_never_panics_and_stays_bounded() {
        testkit::random_chunking(
            TOKENS,
            COMMANDS,
            PreAuthConfig {
                starttls: true,
                max_line: 64,
            },
            |base, starttls| Pop3PreAuth::new(PreAuthConfig { starttls, ..base }),
            refuse,
            &["login", "starttls", "quit", "close"],
            |input| {
                let _ = command::parse_command(input);
                let _ = super::super::response::parse_response(input);
                let _ = super::super::response::find_line(input, 64);
                let _ = super::super::response::find_multiline(input, 64);
            },
        );
    }
}

//! Sans-I/O state machine for the local SMTP session until the hand-off.
//!
//! Driven through the shared contract in [`crate::preauth`]; this file holds
//! only what is SMTP: the commands, the replies and their wording.
//!
//! Unlike IMAP, the SMTP session does not end at login: after
//! [`Event::Login`] succeeds upstream the driver calls
//! [`SmtpPreAuth::authenticated`] (through `login_succeeded`) with the
//! upstream's EHLO keywords, which answers `235`; the machine keeps
//! answering `EHLO`/`HELO`/`NOOP`/`RSET`/`AUTH`/`QUIT` locally and returns
//! [`Event::Handoff`] at the first other command (`MAIL`, `RCPT`, `BDAT`,
//! unknown…). `into_pending_input` then yields that command and everything
//! after it, byte for byte.
//!
//! Security properties:
//! * bounded memory: the input buffer never exceeds [`SmtpPreAuth::max_buffer`];
//!   an over-long line gets `500 5.5.6` and the connection is closed (`421`);
//! * after `STARTTLS` everything buffered (pipelined plaintext) is discarded
//!   and the session is reset (the client must `EHLO` again);
//! * while a login is outstanding nothing else is processed;
//! * buffers holding client input are zeroized when consumed or dropped.

use std::fmt;

use zeroize::Zeroizing;

use super::command::{self, Command, Verb};
use crate::linebuf::{LineFramer, TooLong};
use crate::preauth::{Core, Failure, Phase, PreAuth, Step};
pub use crate::preauth::{Event, FEED_SLACK, MAX_CONSECUTIVE_BAD};
use crate::sasl::{self, SaslError};
use crate::secret::Secret;
use crate::text::{one_line, strip_eol};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAuthConfig {
    /// Local TLS is configured and not yet active on this connection (plain
    /// port with STARTTLS). When true, AUTH is refused (`530`) until
    /// STARTTLS has completed.
    pub starttls: bool,
    /// Our host name, for the greeting and EHLO/HELO replies.
    pub hostname: String,
    /// Longest accepted command line, excluding CRLF; an `AUTH` line may
    /// carry a SASL response beyond it, and a line answering a challenge may
    /// be [`crate::preauth::MAX_SASL_RESPONSE`] long.
    pub max_line: usize,
    /// Advertised as `SIZE n` before login (`SIZE` alone when `None`).
    pub max_size: Option<u64>,
    /// Some accounts submit through Graph: `SMTPUTF8` and `CHUNKING`, which
    /// their submission server honours, are offered before login too.
    pub submission: bool,
}

impl Default for PreAuthConfig {
    fn default() -> Self {
        PreAuthConfig {
            starttls: false,
            hostname: "localhost".into(),
            max_line: 8 * 1024,
            max_size: None,
            submission: false,
        }
    }
}

enum State {
    /// Reading commands.
    Commands,
    /// `AUTH PLAIN` sent `334 `; the next line is the SASL response.
    AuthPlain,
    /// `AUTH LOGIN` sent `334 VXNlcm5hbWU6`; the next line is the user name.
    AuthLoginUser,
    /// `AUTH LOGIN` sent `334 UGFzc3dvcmQ6`; the next line is the password.
    AuthLoginPass { username: Zeroizing<String> },
    /// An `Event::Login` is outstanding.
    LoginPending,
    /// An `Event::StartTls` is outstanding; input is discarded.
    AwaitTls,
    /// `Event::Handoff` happened; the buffer belongs to the driver.
    Handoff,
    /// Quit/Close happened; input is discarded.
    Done,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Commands => "Commands",
            State::AuthPlain => "AuthPlain",
            State::AuthLoginUser => "AuthLoginUser",
            State::AuthLoginPass { .. } => "AuthLoginPass",
            State::LoginPending => "LoginPending",
            State::AwaitTls => "AwaitTls",
            State::Handoff => "Handoff",
            State::Done => "Done",
        })
    }
}

/// The pre-hand-off SMTP state machine. See the module documentation.
#[derive(Debug)]
pub struct SmtpPreAuth {
    cfg: PreAuthConfig,
    hostname: String,
    framer: LineFramer,
    core: Core,
    state: State,
    helo: Option<String>,
    esmtp: bool,
    /// `Some` (filtered upstream EHLO keywords) once authenticated.
    upstream_ehlo: Option<Vec<String>>,
}

/// Upstream EHLO keywords that stay true through the proxy: everything but
/// `AUTH`/`AUTH=…` (the client is already authenticated), `STARTTLS` (TLS
/// to the client is the proxy's business) and `X…` extensions (`XCLIENT`,
/// `XFORWARD`, … are about the proxy's own connection). Control characters
/// are replaced, empty lines dropped.
pub fn relayable_ehlo_keywords(upstream: &[String]) -> Vec<String> {
    upstream
        .iter()
        .filter_map(|k| {
            let k = one_line(k).trim().to_owned();
            let name = k.split([' ', '=']).next().unwrap_or_default().to_ascii_uppercase();
            let drop = name.is_empty() || name == "AUTH" || name == "STARTTLS" || name.starts_with('X');
            (!drop).then_some(k)
        })
        .collect()
}

impl SmtpPreAuth {
    /// Create the state machine; the `220` greeting is queued in the output.
    pub fn new(cfg: PreAuthConfig) -> Self {
        let hostname: String = cfg
            .hostname
            .chars()
            .filter(|c| !c.is_control() && !c.is_whitespace())
            .collect();
        let hostname = if hostname.is_empty() {
            "localhost".to_owned()
        } else {
            hostname
        };
        let framer = LineFramer::new(cfg.max_line);
        let mut p = SmtpPreAuth {
            framer,
            core: Core::new(framer.max_len().saturating_add(2), cfg.starttls),
            cfg,
            hostname,
            state: State::Commands,
            helo: None,
            esmtp: false,
            upstream_ehlo: None,
        };
        let greeting = format!("220 {} ESMTP mailproxy ready", p.hostname);
        p.push_line(&greeting);
        p
    }

    /// The EHLO keywords currently advertised (after the greeting line).
    pub fn ehlo_keywords(&self) -> Vec<String> {
        if let Some(up) = &self.upstream_ehlo {
            return up.clone();
        }
        let mut k = vec!["PIPELINING".to_owned(), "8BITMIME".to_owned()];
        k.push(match self.cfg.max_size {
            Some(n) => format!("SIZE {n}"),
            None => "SIZE".to_owned(),
        });
        k.push("ENHANCEDSTATUSCODES".to_owned());
        if self.cfg.submission {
            k.extend(["SMTPUTF8".to_owned(), "CHUNKING".to_owned()]);
        }
        k.push("AUTH PLAIN LOGIN".to_owned());
        k.push("AUTH=PLAIN LOGIN".to_owned());
        if self.core.starttls_available() {
            k.push("STARTTLS".to_owned());
        }
        k
    }

    /// The domain from the client's last `EHLO`/`HELO` (reset by STARTTLS).
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// Whether the last greeting was `EHLO` (not `HELO`).
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }

    /// Whether [`Self::authenticated`] has been called.
    pub fn is_authenticated(&self) -> bool {
        self.upstream_ehlo.is_some()
    }

    /// The outstanding login failed: emit `reply` (one reply line without
    /// CRLF, e.g. `535 5.7.8 Authentication credentials invalid` or
    /// `454 4.7.0 Temporary authentication failure`) and resume processing
    /// buffered input (call `poll` next). Control characters are replaced;
    /// a line that does not start with a 4xx/5xx code is sent as
    /// `535 5.7.8 {reply}`.
    pub fn refuse_login(&mut self, reply: &str) {
        let line = one_line(reply);
        let line = line.trim();
        let b = line.as_bytes();
        let coded = b.len() >= 3
            && matches!(b[0], b'4' | b'5')
            && b[1].is_ascii_digit()
            && b[2].is_ascii_digit()
            && (b.len() == 3 || b[3] == b' ');
        let line = if coded {
            line.to_owned()
        } else if line.is_empty() {
            "535 5.7.8 Authentication failed".to_owned()
        } else {
            format!("535 5.7.8 {line}")
        };
        self.reply(&line);
        if matches!(self.state, State::LoginPending) {
            self.state = State::Commands;
        }
    }

    /// The outstanding login succeeded: answers `235`. `upstream_ehlo` are
    /// the upstream's EHLO keywords (see [`super::reply::ehlo_keywords`]); a
    /// later client `EHLO` is answered with [`relayable_ehlo_keywords`] of
    /// them. Call `poll` next.
    pub fn authenticated(&mut self, upstream_ehlo: &[String]) {
        self.core.push_line("235 2.7.0 Authentication successful");
        self.upstream_ehlo = Some(relayable_ehlo_keywords(upstream_ehlo));
        self.core.succeeded();
        if matches!(self.state, State::LoginPending) {
            self.state = State::Commands;
        }
    }

    // ------------------------------------------------------------ internals

    fn push_line(&mut self, line: &str) {
        self.core.push_line(line);
    }

    /// Send one reply line; 2xx resets the error count, 4xx/5xx count.
    fn reply(&mut self, line: &str) {
        self.push_line(line);
        match line.as_bytes().first() {
            Some(b'2') => self.core.succeeded(),
            Some(b'4' | b'5') => self.core.failed(),
            _ => {}
        }
    }

    fn multiline(&mut self, code: u16, lines: &[String]) {
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            self.push_line(&format!("{code}{sep}{l}"));
        }
        if code / 100 == 2 {
            self.core.succeeded();
        }
    }

    fn handle(&mut self, line: &[u8]) -> Option<Event> {
        match std::mem::replace(&mut self.state, State::Commands) {
            State::AuthPlain => self.sasl_line(line, Self::plain_response),
            State::AuthLoginUser => self.sasl_line(line, Self::login_username),
            State::AuthLoginPass { username } => self.sasl_line(line, |p, resp| p.login_password(username, resp)),
            _ => self.command(line),
        }
    }

    /// A line answering a `334` challenge: `*` cancels the exchange,
    /// anything else goes to `then` without its line ending.
    fn sasl_line(&mut self, line: &[u8], then: impl FnOnce(&mut Self, &[u8]) -> Option<Event>) -> Option<Event> {
        let resp = strip_eol(line);
        if resp == b"*" {
            self.reply("501 5.7.0 Authentication cancelled");
            return None;
        }
        then(self, resp)
    }

    /// A command line, outside any SASL exchange.
    fn command(&mut self, line: &[u8]) -> Option<Event> {
        let cmd = match command::parse_command(line) {
            Ok(c) => c,
            Err(e) => {
                self.reply(&e.reply);
                return None;
            }
        };
        match cmd {
            Command::Ehlo { domain } => self.ehlo(domain),
            Command::Helo { domain } => self.helo_command(domain),
            Command::Noop | Command::Rset => self.reply("250 2.0.0 OK"),
            Command::Help => self.reply("214 2.0.0 mailproxy: EHLO, AUTH PLAIN/LOGIN, then mail as usual (RFC 5321)"),
            Command::Quit => return self.quit(),
            Command::StartTls => return self.starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => return self.auth(&mechanism, initial_response),
            Command::Transaction { .. } => self.reply("530 5.7.0 Authentication required"),
            Command::Other { .. } => self.reply(command::UNRECOGNIZED),
        }
        None
    }

    fn ehlo(&mut self, domain: String) {
        let mut lines = vec![format!("{} greets {}", self.hostname, one_line(&domain))];
        lines.extend(self.ehlo_keywords());
        self.multiline(250, &lines);
        self.helo = Some(domain);
        self.esmtp = true;
    }

    fn helo_command(&mut self, domain: String) {
        let line = format!("250 {}", self.hostname);
        self.reply(&line);
        self.helo = Some(domain);
        self.esmtp = false;
    }

    fn quit(&mut self) -> Option<Event> {
        self.reply("221 2.0.0 Bye");
        self.state = State::Done;
        self.core.discard();
        Some(Event::Quit)
    }

    fn starttls(&mut self) -> Option<Event> {
        if self.core.starttls_available() {
            self.reply("220 2.0.0 Ready to start TLS");
            // Never act on plaintext pipelined before the handshake.
            self.core.discard();
            self.framer.reset();
            self.state = State::AwaitTls;
            return Some(Event::StartTls);
        }
        if self.core.tls_active() {
            self.reply("503 5.5.1 TLS already active");
        } else {
            self.reply("502 5.5.1 STARTTLS not available");
        }
        None
    }

    fn auth(&mut self, mechanism: &str, initial_response: Option<Secret>) -> Option<Event> {
        if self.is_authenticated() {
            self.reply("503 5.5.1 Already authenticated");
        } else if self.helo.is_none() {
            self.reply("503 5.5.1 Send EHLO first");
        } else if !self.core.login_allowed() {
            self.reply("530 5.7.0 Must issue a STARTTLS command first");
        } else {
            match (mechanism, initial_response) {
                ("PLAIN", Some(ir)) => return self.plain_response(ir.expose().as_bytes()),
                ("PLAIN", None) => {
                    self.push_line("334 ");
                    self.state = State::AuthPlain;
                }
                ("LOGIN", Some(ir)) => return self.login_username(ir.expose().as_bytes()),
                ("LOGIN", None) => {
                    self.push_line(&format!("334 {}", sasl::LOGIN_PROMPT_USERNAME));
                    self.state = State::AuthLoginUser;
                }
                _ => self.reply("504 5.5.4 Unrecognized authentication type"),
            }
        }
        None
    }

    fn sasl_error(&mut self, e: SaslError) {
        match e {
            SaslError::AuthzidMismatch => {
                self.reply("535 5.7.8 Authorization identity must be empty or equal to the user name");
            }
            e => self.reply(&format!("501 5.5.2 Invalid AUTH response: {e}")),
        }
    }

    fn plain_response(&mut self, b64: &[u8]) -> Option<Event> {
        match sasl::decode_plain(b64) {
            Ok((username, password)) => {
                self.state = State::LoginPending;
                Some(Event::Login { username, password })
            }
            Err(e) => {
                self.sasl_error(e);
                None
            }
        }
    }

    fn login_username(&mut self, b64: &[u8]) -> Option<Event> {
        match sasl::decode_login_step(b64) {
            Ok(username) => {
                self.push_line(&format!("334 {}", sasl::LOGIN_PROMPT_PASSWORD));
                self.state = State::AuthLoginPass { username };
            }
            Err(e) => self.sasl_error(e),
        }
        None
    }

    fn login_password(&mut self, username: Zeroizing<String>, b64: &[u8]) -> Option<Event> {
        match sasl::decode_login_step(b64) {
            Ok(password) => {
                self.state = State::LoginPending;
                Some(Event::Login { username, password })
            }
            Err(e) => {
                self.sasl_error(e);
                None
            }
        }
    }
}

impl PreAuth for SmtpPreAuth {
    /// The upstream's EHLO keywords.
    type Success = Vec<String>;

    crate::preauth::core_access!();

    fn phase(&self) -> Phase {
        match self.state {
            State::Commands | State::AuthPlain | State::AuthLoginUser | State::AuthLoginPass { .. } => Phase::Reading,
            State::LoginPending | State::Handoff => Phase::Waiting,
            State::AwaitTls => Phase::AwaitTls,
            State::Done => Phase::Done,
        }
    }

    const TOO_MANY: &'static str = "Too many errors";

    fn farewell(&self, reason: &str) -> String {
        format!("421 4.7.0 {} {reason}, closing connection", self.hostname)
    }

    fn close(&mut self) {
        self.state = State::Done;
        self.framer.reset();
    }

    fn step(&mut self) -> Step {
        if self.is_authenticated() && matches!(self.state, State::Commands) {
            // Hand off as soon as the verb shows the command is not ours,
            // without waiting for (or limiting) the whole line.
            match command::leading_verb(self.core.buffered()) {
                Verb::Incomplete => return Step::More,
                Verb::Complete(v) if command::local_after_auth(&v) => {}
                Verb::Complete(_) | Verb::Invalid => {
                    self.framer.reset();
                    self.state = State::Handoff;
                    return Step::Event(Event::Handoff);
                }
            }
        }
        self.framer.sasl_response = matches!(
            self.state,
            State::AuthPlain | State::AuthLoginUser | State::AuthLoginPass { .. }
        );
        match self.core.next_line(&mut self.framer) {
            None => Step::More,
            Some(Err(TooLong)) => {
                self.reply("500 5.5.6 Line too long");
                Step::Event(self.fatal("Line too long"))
            }
            Some(Ok(line)) => self.handle(&line).map_or(Step::Next, Step::Event),
        }
    }

    /// The session is reset: the client must EHLO again.
    fn tls_started(&mut self) {
        self.framer.reset();
        self.helo = None;
        self.esmtp = false;
        if matches!(self.state, State::AwaitTls) {
            self.state = State::Commands;
        }
    }

    fn login_failed(&mut self, failure: Failure, text: &str) {
        let code = match failure {
            Failure::Credentials | Failure::Action => "535 5.7.8",
            Failure::Unavailable => "454 4.7.0",
            Failure::SessionLimit => {
                // 421: the client closes and tries again later, as it would
                // for a server at its connection limit.
                self.push_line(&format!("421 4.7.0 {}", one_line(text).trim()));
                self.state = State::Done;
                self.core.discard();
                return;
            }
        };
        self.refuse_login(&format!("{code} {}", one_line(text)));
    }

    fn login_succeeded(&mut self, upstream_ehlo: Vec<String>) -> bool {
        self.authenticated(&upstream_ehlo);
        false
    }

    fn client_name(&self) -> Option<&str> {
        self.helo()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preauth::testkit::{self, exchange, exchanges, expect_login, text as s};

    const EHLO: &str = "250-mx.test greets client.test\r\n\
        250-PIPELINING\r\n\
        250-8BITMIME\r\n\
        250-SIZE\r\n\
        250-ENHANCEDSTATUSCODES\r\n\
        250-AUTH PLAIN LOGIN\r\n\
        250 AUTH=PLAIN LOGIN\r\n";

    fn cfg(starttls: bool) -> PreAuthConfig {
        PreAuthConfig {
            starttls,
            hostname: "mx.test".into(),
            ..PreAuthConfig::default()
        }
    }

    /// A new machine with the greeting already drained.
    fn machine(starttls: bool) -> SmtpPreAuth {
        let mut p = SmtpPreAuth::new(cfg(starttls));
        p.take_output();
        p
    }

    /// Greeted with EHLO, output drained.
    fn greeted() -> SmtpPreAuth {
        let mut p = machine(false);
        exchange(&mut p, b"EHLO client.test\r\n");
        p
    }

    const GMAIL_EHLO: &[&str] = &[
        "SIZE 35882577",
        "8BITMIME",
        "AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH",
        "ENHANCEDSTATUSCODES",
        "PIPELINING",
        "CHUNKING",
        "SMTPUTF8",
    ];

    fn up(k: &[&str]) -> Vec<String> {
        k.iter().map(std::string::ToString::to_string).collect()
    }

    #[test]
    fn greeting_and_ehlo() {
        let mut p = SmtpPreAuth::new(cfg(false));
        assert_eq!(s(&p.take_output()), "220 mx.test ESMTP mailproxy ready\r\n");
        assert_eq!(exchange(&mut p, b"EHLO client.test\r\n"), EHLO);
        assert_eq!(p.helo(), Some("client.test"));
        assert!(p.is_esmtp());
        assert_eq!(exchange(&mut p, b"HELO other.test\r\n"), "250 mx.test\r\n");
        assert_eq!(p.helo(), Some("other.test"));
        assert!(!p.is_esmtp());

        let mut p = SmtpPreAuth::new(PreAuthConfig {
            max_size: Some(35_882_577),
            ..cfg(true)
        });
        p.take_output();
        assert_eq!(
            exchange(&mut p, b"ehlo [127.0.0.1]\r\n"),
            "250-mx.test greets [127.0.0.1]\r\n\
             250-PIPELINING\r\n\
             250-8BITMIME\r\n\
             250-SIZE 35882577\r\n\
             250-ENHANCEDSTATUSCODES\r\n\
             250-AUTH PLAIN LOGIN\r\n\
             250-AUTH=PLAIN LOGIN\r\n\
             250 STARTTLS\r\n"
        );
        // A hostile host name cannot break the reply framing.
        let mut p = SmtpPreAuth::new(PreAuthConfig {
            hostname: "a b\r\n250 x".into(),
            ..cfg(false)
        });
        assert_eq!(s(&p.take_output()), "220 ab250x ESMTP mailproxy ready\r\n");
    }

    #[test]
    fn simple_commands() {
        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (
                    b"NOOP\r\nRSET\r\nHELP\r\n",
                    "250 2.0.0 OK\r\n250 2.0.0 OK\r\n\
             214 2.0.0 mailproxy: EHLO, AUTH PLAIN/LOGIN, then mail as usual (RFC 5321)\r\n",
                ),
                (
                    b"FOO bar\r\n\r\n",
                    "500 5.5.2 Command unrecognized\r\n500 5.5.2 Command unrecognized\r\n",
                ),
                (
                    b"EHLO\r\nRSET x\r\n",
                    "501 5.5.4 Syntax: EHLO hostname\r\n501 5.5.4 Syntax: RSET (no parameters allowed)\r\n",
                ),
            ],
        );
        for verb in [
            "MAIL FROM:<a@b>",
            "RCPT TO:<c@d>",
            "DATA",
            "BDAT 5 LAST",
            "VRFY x",
            "EXPN x",
            "ETRN x",
        ] {
            assert_eq!(
                exchange(&mut p, format!("{verb}\r\n").as_bytes()),
                "530 5.7.0 Authentication required\r\n",
                "{verb}"
            );
        }
        p.feed(b"QUIT\r\nNOOP\r\n");
        assert!(matches!(p.poll(), Some(Event::Quit)));
        assert_eq!(s(&p.take_output()), "221 2.0.0 Bye\r\n");
        assert!(p.poll().is_none());
        assert_eq!(p.buffered_len(), 0);
        assert!(!p.wants_input());
    }

    /// RFC 4954 §4: a 12,288-octet response, inline or after `334`, is
    /// answered; one octet beyond the limit is `500 5.5.6` and the end.
    #[test]
    fn auth_lines_carry_rfc_4954_responses() {
        // "\0alice\0" and 9,209 octets of password: 12,288 octets of base64.
        let pw = "p".repeat(9216 - 7);
        let ir = sasl::encode_plain("", "alice", &pw);
        assert_eq!(ir.len(), crate::preauth::MAX_SASL_RESPONSE);
        let mut p = greeted();
        p.feed(format!("AUTH PLAIN {}\r\n", ir.as_str()).as_bytes());
        assert_eq!(expect_login(p.poll()), ("alice".to_owned(), pw.clone()));
        p.refuse_login("535 5.7.8 no");
        assert_eq!(exchange(&mut p, b"AUTH PLAIN\r\n"), "535 5.7.8 no\r\n334 \r\n");
        p.feed(format!("{}\r\n", ir.as_str()).as_bytes());
        assert_eq!(expect_login(p.poll()).1, pw);
        p.refuse_login("535 5.7.8 no");
        p.take_output();
        // AUTH LOGIN's steps too.
        let user = sasl::encode_login_step(&"u".repeat(9216));
        assert_eq!(user.len(), 12_288);
        assert_eq!(
            exchange(&mut p, format!("AUTH LOGIN\r\n{}\r\n", user.as_str()).as_bytes()),
            format!(
                "334 {}\r\n334 {}\r\n",
                sasl::LOGIN_PROMPT_USERNAME,
                sasl::LOGIN_PROMPT_PASSWORD
            )
        );
        p.feed(format!("{}\r\n", ir.as_str()).as_bytes());
        assert!(matches!(p.poll(), Some(Event::Login { .. })));
        p.refuse_login("535 5.7.8 no");
        p.take_output();
        // The AUTH line may be max_line + 12,288 long: then it is parsed.
        let limit = 8192 + 12_288;
        let line = format!("AUTH PLAIN {}", "A".repeat(limit - 11));
        assert!(exchange(&mut p, format!("{line}\r\n").as_bytes()).starts_with("501 5.5.2 "));
        // Other lines keep max_line.
        let over = |line: &str| {
            let mut p = greeted();
            p.feed(format!("{line}\r\n").as_bytes());
            assert!(matches!(p.poll(), Some(Event::Close)), "{}", line.len());
            assert!(s(&p.take_output()).starts_with("500 5.5.6 Line too long\r\n421 "));
        };
        over(&format!("{line}A"));
        over(&format!("EHLO {}", "a".repeat(8192 - 4)));
        over(&"Q".repeat(8193));
        // A continuation line of 12,289 octets is too long.
        let mut p = greeted();
        assert_eq!(exchange(&mut p, b"AUTH PLAIN\r\n"), "334 \r\n");
        p.feed(format!("{}\r\n", "Q".repeat(12_289)).as_bytes());
        assert!(matches!(p.poll(), Some(Event::Close)));
        assert!(s(&p.take_output()).starts_with("500 5.5.6 Line too long\r\n"));
        assert!(p.max_buffer() <= limit + 2 + FEED_SLACK);
    }

    #[test]
    fn auth_plain_initial_response() {
        let mut p = greeted();
        p.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        let (u, pw) = expect_login(p.poll());
        assert_eq!((u.as_str(), pw.as_str()), ("alice", "secret"));
        assert_eq!(p.take_output(), b"");
        assert!(!p.wants_input());
        assert!(p.poll().is_none());
    }

    #[test]
    fn auth_plain_continuation_rfc4954_trace() {
        let mut p = greeted();
        assert_eq!(exchange(&mut p, b"AUTH PLAIN\r\n"), "334 \r\n");
        p.feed(b"YWxpY2UAYWxpY2UAc2VjcmV0\r\n"); // "alice\0alice\0secret"
        let (u, pw) = expect_login(p.poll());
        assert_eq!((u.as_str(), pw.as_str()), ("alice", "secret"));
        p.refuse_login("535 5.7.8 Authentication credentials invalid");
        assert_eq!(s(&p.take_output()), "535 5.7.8 Authentication credentials invalid\r\n");
        assert!(p.wants_input());
    }

    #[test]
    fn auth_login_all_forms() {
        // RFC-less but universal: 334 Username: / 334 Password:
        let mut p = greeted();
        exchanges(
            &mut p,
            &[
                (b"AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n"),
                (b"YWxpY2U=\r\n", "334 UGFzc3dvcmQ6\r\n"),
            ],
        );
        p.feed(b"c2VjcmV0\r\n");
        let (u, pw) = expect_login(p.poll());
        assert_eq!((u.as_str(), pw.as_str()), ("alice", "secret"));
        assert_eq!(p.take_output(), b"");
        p.refuse_login("535 5.7.8 nope");
        assert_eq!(s(&p.take_output()), "535 5.7.8 nope\r\n");
        // User name as initial response.
        assert_eq!(exchange(&mut p, b"AUTH LOGIN YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
        p.feed(b"c2VjcmV0\n");
        let (u, pw) = expect_login(p.poll());
        assert_eq!((u.as_str(), pw.as_str()), ("alice", "secret"));
        p.refuse_login("535 5.7.8 nope");
        p.take_output();
        // Cancel at either step.
        exchanges(
            &mut p,
            &[
                (
                    b"AUTH LOGIN\r\n*\r\n",
                    "334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication cancelled\r\n",
                ),
                (
                    b"AUTH LOGIN YWxpY2U=\r\n*\r\n",
                    "334 UGFzc3dvcmQ6\r\n501 5.7.0 Authentication cancelled\r\n",
                ),
                (b"AUTH PLAIN\r\n*\r\n", "334 \r\n501 5.7.0 Authentication cancelled\r\n"),
            ],
        );
        // Bad base64 at each step.
        exchanges(
            &mut p,
            &[
                (
                    b"AUTH LOGIN %%%\r\n",
                    "501 5.5.2 Invalid AUTH response: invalid base64 in SASL response\r\n",
                ),
                (
                    b"AUTH LOGIN\r\n!!\r\n",
                    "334 VXNlcm5hbWU6\r\n501 5.5.2 Invalid AUTH response: invalid base64 in SASL response\r\n",
                ),
                (
                    b"AUTH LOGIN YWxpY2U=\r\n\r\n",
                    "334 UGFzc3dvcmQ6\r\n501 5.5.2 Invalid AUTH response: empty SASL response\r\n",
                ),
                (
                    b"AUTH LOGIN =\r\n",
                    "501 5.5.2 Invalid AUTH response: empty SASL response\r\n",
                ),
                (b"NOOP\r\n", "250 2.0.0 OK\r\n"),
            ],
        );
    }

    #[test]
    fn auth_errors() {
        let mut p = machine(false);
        exchanges(&mut p, &[(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "503 5.5.1 Send EHLO first\r\n"),(b"HELO c\r\n", "250 mx.test\r\n"),(b"AUTH CRAM-MD5\r\nAUTH XOAUTH2 dGVzdA==\r\n", "504 5.5.4 Unrecognized authentication type\r\n504 5.5.4 Unrecognized authentication type\r\n"),(b"AUTH PLAIN %%%\r\n", "501 5.5.2 Invalid AUTH response: invalid base64 in SASL response\r\n"),(b"AUTH PLAIN =\r\n", "501 5.5.2 Invalid AUTH response: empty SASL response\r\n"),(b"AUTH PLAIN YWxpY2UAc2VjcmV0\r\n", "501 5.5.2 Invalid AUTH response: malformed SASL PLAIN message: expected authzid NUL authcid NUL password\r\n"),]);
        // base64("admin\0alice\0secret")
        exchanges(
            &mut p,
            &[
                (
                    b"AUTH PLAIN YWRtaW4AYWxpY2UAc2VjcmV0\r\n",
                    "535 5.7.8 Authorization identity must be empty or equal to the user name\r\n",
                ),
                (b"AUTH\r\n", "501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
            ],
        );
    }

    #[test]
    fn at_the_session_limit_the_answer_is_421_and_the_session_ends() {
        let mut p = greeted();
        p.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nNOOP\r\n");
        expect_login(p.poll());
        p.login_failed(
            Failure::SessionLimit,
            "a@b already has 15 SMTP sessions open at Gmail, its limit",
        );
        assert_eq!(
            s(&p.take_output()),
            "421 4.7.0 a@b already has 15 SMTP sessions open at Gmail, its limit\r\n"
        );
        assert!(p.poll().is_none());
        assert!(!p.wants_input());
        assert_eq!(p.take_output(), b"");
    }

    #[test]
    fn login_failed_sanitizes() {
        let mut p = greeted();
        p.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nNOOP\r\n");
        expect_login(p.poll());
        p.refuse_login("535 5.7.8 bad\r\n250 injected");
        assert_eq!(s(&p.take_output()), "535 5.7.8 bad  250 injected\r\n");
        assert!(p.poll().is_none());
        assert_eq!(s(&p.take_output()), "250 2.0.0 OK\r\n");
        for (given, sent) in [
            ("454 4.7.0 Try again later", "454 4.7.0 Try again later"),
            ("535-5.7.8 multi", "535 5.7.8 535-5.7.8 multi"),
            ("250 2.0.0 fake success", "535 5.7.8 250 2.0.0 fake success"),
            ("", "535 5.7.8 Authentication failed"),
            ("no code", "535 5.7.8 no code"),
        ] {
            p.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
            expect_login(p.poll());
            p.refuse_login(given);
            assert_eq!(s(&p.take_output()), format!("{sent}\r\n"));
        }
    }

    #[test]
    fn auth_requires_starttls_when_available() {
        let mut p = machine(true);
        exchange(&mut p, b"EHLO c\r\n");
        assert_eq!(
            exchange(&mut p, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nAUTH LOGIN\r\n"),
            "530 5.7.0 Must issue a STARTTLS command first\r\n\
             530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
    }

    #[test]
    fn starttls_discards_pipelined_plaintext_and_resets() {
        let mut p = machine(true);
        exchange(&mut p, b"EHLO c\r\n");
        p.feed(b"STARTTLS\r\nAUTH PLAIN AGV2aWwAaW5qZWN0ZWQ=\r\nMAIL FR");
        assert!(matches!(p.poll(), Some(Event::StartTls)));
        assert_eq!(s(&p.take_output()), "220 2.0.0 Ready to start TLS\r\n");
        assert_eq!(p.buffered_len(), 0);
        assert!(!p.wants_input());
        p.feed(b"AUTH PLAIN AGV2aWwAaW5qZWN0ZWQ=\r\n");
        assert!(p.poll().is_none());
        p.starttls_done();
        assert!(p.poll().is_none());
        assert_eq!(p.take_output(), b"");
        assert_eq!(p.helo(), None);
        // The session was reset: EHLO again, now without STARTTLS.
        exchanges(
            &mut p,
            &[
                (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", "503 5.5.1 Send EHLO first\r\n"),
                (b"EHLO c\r\n", &EHLO.replace("client.test", "c")),
                (b"STARTTLS\r\n", "503 5.5.1 TLS already active\r\n"),
            ],
        );
        p.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        assert_eq!(expect_login(p.poll()).0, "alice");
        // Not configured at all.
        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (b"STARTTLS\r\n", "502 5.5.1 STARTTLS not available\r\n"),
                (
                    b"STARTTLS x\r\n",
                    "501 5.5.4 Syntax: STARTTLS (no parameters allowed)\r\n",
                ),
            ],
        );
    }

    #[test]
    fn pipelined_ehlo_auth_mail_handed_off_exactly() {
        let mut p = machine(false);
        let after: &[u8] = b"MAIL FROM:<alice@example.com> SIZE=5\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n";
        let mut input = b"EHLO client.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n".to_vec();
        input.extend_from_slice(after);
        p.feed(&input);
        let (u, _) = expect_login(p.poll());
        assert_eq!(u, "alice");
        assert_eq!(s(&p.take_output()), EHLO);
        assert!(p.poll().is_none());
        assert_eq!(p.take_output(), b"");
        p.authenticated(&up(GMAIL_EHLO));
        assert!(matches!(p.poll(), Some(Event::Handoff)));
        assert_eq!(p.take_output(), b"235 2.7.0 Authentication successful\r\n");
        assert!(!p.wants_input());
        assert!(p.poll().is_none());
        assert_eq!(p.into_pending_input(), after.to_vec());
    }

    #[test]
    fn after_auth_local_commands_then_handoff() {
        let mut p = greeted();
        p.feed(b"AUTH LOGIN YWxpY2U=\r\nc2VjcmV0\r\n");
        expect_login(p.poll());
        p.take_output();
        p.authenticated(&up(&[
            "PIPELINING",
            "SIZE 35882577",
            "8BITMIME",
            "CHUNKING",
            "SMTPUTF8",
            "AUTH PLAIN XOAUTH2",
            "AUTH=PLAIN XOAUTH2",
            "STARTTLS",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "XCLIENT NAME ADDR",
            "xforward NAME",
            "BINARYMIME",
            "REQUIRETLS",
            "MT-PRIORITY MIXER",
            "dsn\r\n250 injected",
            "",
        ]));
        assert_eq!(s(&p.take_output()), "235 2.7.0 Authentication successful\r\n");
        assert!(p.is_authenticated());
        exchanges(
            &mut p,
            &[
                (
                    b"EHLO again.test\r\n",
                    "250-mx.test greets again.test\r\n\
             250-PIPELINING\r\n\
             250-SIZE 35882577\r\n\
             250-8BITMIME\r\n\
             250-CHUNKING\r\n\
             250-SMTPUTF8\r\n\
             250-ENHANCEDSTATUSCODES\r\n\
             250-DSN\r\n\
             250-BINARYMIME\r\n\
             250-REQUIRETLS\r\n\
             250-MT-PRIORITY MIXER\r\n\
             250 dsn  250 injected\r\n",
                ),
                (
                    b"HELO x\r\nNOOP\r\nRSET\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
                    "250 mx.test\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n503 5.5.1 Already authenticated\r\n",
                ),
            ],
        );
        // A partial local verb waits; a partial foreign one hands off at once.
        exchanges(&mut p, &[(b"NO", ""), (b"OP\r\n", "250 2.0.0 OK\r\n")]);
        p.feed(b"BDAT 1000 LAST\r\n\x00\xff");
        assert!(matches!(p.poll(), Some(Event::Handoff)));
        assert_eq!(p.into_pending_input(), b"BDAT 1000 LAST\r\n\x00\xff");
        // Unknown commands and garbage go upstream too; QUIT is local.
        for input in [&b"VRFY x\r\n"[..], b"HELP\r\n", b"\r\n", b"X\0", b"FOOBARFOOBARFOOBARX"] {
            let mut p = greeted();
            p.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
            expect_login(p.poll());
            p.authenticated(&[]);
            p.feed(input);
            assert!(matches!(p.poll(), Some(Event::Handoff)), "{input:?}");
            assert_eq!(p.into_pending_input(), input);
        }
        let mut p = greeted();
        p.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        expect_login(p.poll());
        p.authenticated(&[]);
        assert_eq!(
            exchange(&mut p, b"EHLO x\r\n"),
            "235 2.7.0 Authentication successful\r\n250 mx.test greets x\r\n"
        );
        p.feed(b"QUIT\r\n");
        assert!(matches!(p.poll(), Some(Event::Quit)));
        assert_eq!(s(&p.take_output()), "221 2.0.0 Bye\r\n");
    }

    #[test]
    fn nul_and_invalid_utf8() {
        let mut p = machine(false);
        exchanges(
            &mut p,
            &[
                (
                    b"\0\0\0\r\nEH\0LO x\r\n\xff\xfe\r\n",
                    &"500 5.5.2 Command unrecognized\r\n".repeat(3),
                ),
                (
                    b"EHLO \xc3\x28\r\nHELO a\0b\r\n",
                    "501 5.5.2 Host name must be valid UTF-8\r\n501 5.5.2 Invalid characters in host name\r\n",
                ),
            ],
        );
        exchange(&mut p, b"EHLO c\r\n");
        // base64("\0al\xffice\0pw")
        exchanges(
            &mut p,
            &[
                (
                    b"AUTH PLAIN AGFs/2ljZQBwdw==\r\n",
                    "501 5.5.2 Invalid AUTH response: SASL response is not valid UTF-8\r\n",
                ),
                (b"NOOP\r\n", "250 2.0.0 OK\r\n"),
            ],
        );
    }

    #[test]
    fn ten_megabyte_line_rejected_without_buffering() {
        testkit::huge_line(
            || machine(false),
            "421 4.7.0 mx.test Too much input, closing connection\r\n",
            "500 5.5.6 Line too long\r\n421 4.7.0 mx.test Line too long, closing connection\r\n",
            b"NOOP\r\n",
        );
        // A complete over-long line is fatal too; the maximum itself is fine.
        let mut p = machine(false);
        let mut line = b"NOOP ".to_vec();
        line.resize(8 * 1024, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(exchange(&mut p, &line), "250 2.0.0 OK\r\n");
        line.insert(0, b'x');
        p.feed(&line);
        assert!(matches!(p.poll(), Some(Event::Close)));
    }

    #[test]
    fn too_many_bad_commands_close() {
        testkit::garbage_closes(
            || machine(false),
            b"GARBAGE\r\n",
            "500 5.5.2 Command unrecognized\r\n",
            "421 4.7.0 mx.test Too many errors, closing connection\r\n",
            b"NOOP\r\n",
        );
        // AUTH + cancel loops do not reset it.
        let mut p = greeted();
        p.feed(&b"AUTH PLAIN\r\n*\r\n".repeat(MAX_CONSECUTIVE_BAD as usize));
        assert!(matches!(p.poll(), Some(Event::Close)));
    }

    #[test]
    fn event_debug_redacts() {
        let mut p = greeted();
        p.feed(b"AUTH LOGIN YWxpY2U=\r\n");
        assert!(p.poll().is_none());
        let d = format!("{p:?}");
        assert!(!d.contains("alice"), "{d}");
        p.feed(b"aHVudGVyMg==\r\n");
        let ev = p.poll().unwrap();
        let d = format!("{ev:?} {p:?}");
        assert!(!d.contains("hunter2") && !d.contains("alice"), "{d}");
    }

    // ---------------------------------------------------------- chunking / fuzz

    /// Minimal driver: feeds `chunks`, polls, answers events (logins fail
    /// except for user "good", which authenticates; STARTTLS completes);
    /// returns the transcript of output, events and the handed-off bytes.
    fn drive(cfg: PreAuthConfig, chunks: &[&[u8]]) -> testkit::Transcript {
        testkit::drive(SmtpPreAuth::new(cfg), chunks, answer)
    }

    /// The user `good` logs in; everyone else is refused.
    fn answer(p: &mut SmtpPreAuth, user: &str, pass: &str) -> String {
        if user == "good" {
            p.authenticated(&up(GMAIL_EHLO));
        } else {
            p.refuse_login("535 5.7.8 nope");
        }
        format!("login {user} {pass}")
    }

    const SCRIPT: &[u8] = b"HELO a\r\n\
        AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n\
        EHLO client.test\r\n\
        MAIL FROM:<x@y>\r\n\
        AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n\
        AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n\
        AUTH LOGIN\r\n*\r\n\
        \0bad\r\n\
        NOOP\n\
        AUTH PLAIN AGdvb2QAcHc=\r\n\
        EHLO again\r\n\
        RSET\r\n\
        MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@c>\r\nDATA\r\n";

    #[test]
    fn byte_at_a_time_equals_all_at_once() {
        let whole = drive(cfg(false), &[SCRIPT]);
        assert_eq!(
            whole.1,
            vec![
                "login alice secret",
                "login alice secret",
                "login alice secret",
                "login good pw",
                "handoff"
            ]
        );
        assert_eq!(
            whole.2,
            b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@c>\r\nDATA\r\n".to_vec()
        );
        assert!(whole
            .0
            .contains("235 2.7.0 Authentication successful\r\n250-mx.test greets again\r\n"));
        assert!(whole.0.ends_with("250-CHUNKING\r\n250 SMTPUTF8\r\n250 2.0.0 OK\r\n"));
        for chunk in [1, 2, 3, 7, 13, 64] {
            let bytes: Vec<&[u8]> = SCRIPT.chunks(chunk).collect();
            assert_eq!(drive(cfg(false), &bytes), whole, "chunk {chunk}");
        }
    }

    const TOKENS: &[&[u8]] = &[
        b"a",
        b" ",
        b"\r\n",
        b"\n",
        b"\r",
        b"EHLO",
        b"HELO",
        b"AUTH",
        b"PLAIN",
        b"LOGIN",
        b"STARTTLS",
        b"MAIL",
        b"QUIT",
        b"*",
        b"=",
        b"AGFsaWNlAHNlY3JldA==",
        b"AGdvb2QAcHc=",
        b"\0",
        b"\xff",
        b"-",
    ];

    const COMMANDS: &[&[u8]] = &[
        b"EHLO c\r\n",
        b"HELO c\r\n",
        b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        b"AUTH PLAIN AGdvb2QAcHc=\r\n",
        b"AUTH PLAIN\r\nAGdvb2QAcHc=\r\n",
        b"AUTH LOGIN\r\nZ29vZA==\r\ncHc=\r\n",
        b"AUTH LOGIN YWxpY2U=\r\n*\r\n",
        b"AUTH CRAM-MD5\r\n",
        b"STARTTLS\r\n",
        b"NOOP\r\n",
        b"RSET\r\n",
        b"MAIL FROM:<a@b>\r\n",
        b"QUIT\r\n",
        b"VRFY x\r\n",
    ];

    #[test]
    fn random_input_random_chunking_never_panics_and_stays_bounded() {
        testkit::random_chunking(
            TOKENS,
            COMMANDS,
            PreAuthConfig {
                starttls: true,
                hostname: "mx.test".into(),
                max_line: 64,
                max_size: Some(1000),
                submission: false,
            },
            |base, starttls| SmtpPreAuth::new(PreAuthConfig { starttls, ..base }),
            answer,
            &["login", "starttls", "quit", "close", "handoff"],
            |input| {
                let _ = command::parse_command(input);
                let _ = super::super::reply::find_reply(input, 64);
            },
        );
    }
}

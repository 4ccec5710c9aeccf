//! Grammar for the SMTP commands the proxy answers itself before the
//! hand-off (RFC 5321 §4.1, RFC 4954 `AUTH`, RFC 3207 `STARTTLS`), written
//! with nom 8.
//!
//! Input is one complete command line (with its CRLF or bare LF) as cut by
//! the pre-auth state machine. Everything else (`MAIL`, `RCPT`, …) is only
//! classified by its verb: the proxy never parses transaction commands.

use crate::secret::Secret;

use crate::linebuf::parse_error as err;
pub use crate::linebuf::ParseError;
use crate::linebuf::{self, sasl_args, verb_and_args};

/// Longest verb [`leading_verb`] waits for (`STARTTLS` is the longest
/// local one).
pub const MAX_VERB: usize = 16;

/// One parsed client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo {
        domain: String,
    },
    Helo {
        domain: String,
    },
    Auth {
        /// Upper-cased mechanism name.
        mechanism: String,
        /// Initial response, still base64 (`=` yields `Some("")`).
        /// Secret, so a stray `{:?}` cannot print it.
        initial_response: Option<Secret>,
    },
    StartTls,
    Rset,
    Noop,
    Quit,
    Help,
    /// A command that exists but needs an authenticated session (`MAIL`,
    /// `RCPT`, `DATA`, `BDAT`, `VRFY`, `EXPN`, `ETRN`…); arguments unparsed.
    Transaction {
        verb: String,
    },
    /// Anything else; `verb` is upper-cased.
    Other {
        verb: String,
    },
}

/// Reply for a line that is not a command at all.
pub const UNRECOGNIZED: &str = "500 5.5.2 Command unrecognized";

/// Commands that exist in SMTP but are refused with `530` before `AUTH`.
pub fn requires_auth(verb: &str) -> bool {
    matches!(
        verb,
        "MAIL" | "RCPT" | "DATA" | "BDAT" | "BURL" | "VRFY" | "EXPN" | "ETRN" | "ATRN" | "TURN"
    )
}

/// Commands answered locally after authentication; every other command
/// starts the hand-off.
pub fn local_after_auth(verb: &str) -> bool {
    matches!(verb, "EHLO" | "HELO" | "NOOP" | "RSET" | "AUTH" | "QUIT" | "STARTTLS")
}

/// The verb at the start of a possibly incomplete command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// Letters followed by SP, CR or LF; upper-cased.
    Complete(String),
    /// Only letters so far (at most [`MAX_VERB`]); read more.
    Incomplete,
    /// Not a verb (empty line, other bytes, too long).
    Invalid,
}

/// Classify the verb at the start of `buf` without needing the whole line.
pub fn leading_verb(buf: &[u8]) -> Verb {
    let n = buf.iter().take_while(|c| c.is_ascii_alphabetic()).count();
    if n > MAX_VERB {
        return Verb::Invalid;
    }
    match buf.get(n) {
        None => Verb::Incomplete,
        Some(b' ' | b'\r' | b'\n') if n > 0 => Verb::Complete(String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase()),
        Some(_) => Verb::Invalid,
    }
}

// ------------------------------------------------------------------ grammar

/// `EHLO`/`HELO` argument: the rest of the line, trimmed; printable, UTF-8.
fn domain(args: &[u8], verb: &str) -> Result<String, ParseError> {
    let syntax = || err(&format!("501 5.5.4 Syntax: {verb} hostname"));
    let rest = args.strip_prefix(b" ").ok_or_else(syntax)?;
    let d = rest.trim_ascii();
    if d.is_empty() {
        return Err(syntax());
    }
    if d.iter().any(|&c| c < 0x20 || c == 0x7f) {
        return Err(err("501 5.5.2 Invalid characters in host name"));
    }
    match std::str::from_utf8(d) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(err("501 5.5.2 Host name must be valid UTF-8")),
    }
}

/// Parse one complete command line.
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let (verb, args) = verb_and_args(line, UNRECOGNIZED)?;
    let no_args = |cmd| {
        linebuf::no_args(args, cmd, || {
            format!("501 5.5.4 Syntax: {verb} (no parameters allowed)")
        })
    };
    let cmd = match verb.as_str() {
        "EHLO" => Command::Ehlo {
            domain: domain(args, "EHLO")?,
        },
        "HELO" => Command::Helo {
            domain: domain(args, "HELO")?,
        },
        "AUTH" => {
            let Some((mechanism, initial_response)) = sasl_args(args) else {
                return Err(err("501 5.5.4 Syntax: AUTH mechanism [initial-response]"));
            };
            Command::Auth {
                mechanism,
                initial_response: initial_response.map(Secret::from),
            }
        }
        "STARTTLS" => no_args(Command::StartTls)?,
        "RSET" => no_args(Command::Rset)?,
        "QUIT" => no_args(Command::Quit)?,
        // noop = "NOOP" [ SP String ]; help = "HELP" [ SP String ]
        "NOOP" => Command::Noop,
        "HELP" => Command::Help,
        v if requires_auth(v) => Command::Transaction { verb },
        _ => Command::Other { verb },
    };
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linebuf::CommandParser;

    const SMTP: CommandParser<Command> = CommandParser(parse_command);

    #[test]
    fn simple_commands_case_insensitive() {
        assert_eq!(
            SMTP.ok(b"ehlo client.example.org\r\n"),
            Command::Ehlo {
                domain: "client.example.org".into()
            }
        );
        assert_eq!(
            SMTP.ok(b"HELO [192.0.2.1]  \n"),
            Command::Helo {
                domain: "[192.0.2.1]".into()
            }
        );
        assert_eq!(SMTP.ok(b"StartTLS\r\n"), Command::StartTls);
        assert_eq!(SMTP.ok(b"rset\r\n"), Command::Rset);
        assert_eq!(SMTP.ok(b"NOOP\r\n"), Command::Noop);
        assert_eq!(SMTP.ok(b"NOOP anything at all\r\n"), Command::Noop);
        assert_eq!(SMTP.ok(b"QUIT \r\n"), Command::Quit);
        assert_eq!(SMTP.ok(b"HELP AUTH\r\n"), Command::Help);
        assert_eq!(
            SMTP.ok(b"mail FROM:<a@b>\r\n"),
            Command::Transaction { verb: "MAIL".into() }
        );
        assert_eq!(SMTP.ok(b"DATA\r\n"), Command::Transaction { verb: "DATA".into() });
        assert_eq!(
            SMTP.ok(b"XCLIENT ADDR=1.2.3.4\r\n"),
            Command::Other { verb: "XCLIENT".into() }
        );
    }

    #[test]
    fn syntax_errors() {
        const EHLO: &str = "501 5.5.4 Syntax: EHLO hostname";
        const AUTH: &str = "501 5.5.4 Syntax: AUTH mechanism [initial-response]";
        let table: [(&[u8], &str); 15] = [
            (b"EHLO\r\n", EHLO),
            (b"EHLO   \r\n", EHLO),
            (b"HELO\r\n", "501 5.5.4 Syntax: HELO hostname"),
            (b"EHLO a\x01b\r\n", "501 5.5.2 Invalid characters in host name"),
            (b"EHLO \xff\r\n", "501 5.5.2 Host name must be valid UTF-8"),
            (
                b"STARTTLS now\r\n",
                "501 5.5.4 Syntax: STARTTLS (no parameters allowed)",
            ),
            (b"AUTH\r\n", AUTH),
            (b"AUTH PLAIN a b\r\n", AUTH),
            (b"\r\n", UNRECOGNIZED),
            (b" EHLO x\r\n", UNRECOGNIZED),
            (b"EHLO\0 x\r\n", UNRECOGNIZED),
            (b"\0\0\r\n", UNRECOGNIZED),
            (b"\xff\xfe\r\n", UNRECOGNIZED),
            (b"NOOP\r\r\n", UNRECOGNIZED),
            (b"123\r\n", UNRECOGNIZED),
        ];
        for (line, reply) in table {
            assert_eq!(SMTP.bad(line), reply, "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn auth_forms() {
        assert_eq!(
            SMTP.ok(b"auth plain\r\n"),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: None
            }
        );
        assert_eq!(
            SMTP.ok(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some(Secret::new("AGFsaWNlAHNlY3JldA=="))
            }
        );
        assert_eq!(
            SMTP.ok(b"AUTH PLAIN =\r\n"),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some(Secret::new(""))
            }
        );
        assert_eq!(
            SMTP.ok(b"AUTH login YWxpY2U=\n"),
            Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: Some(Secret::new("YWxpY2U="))
            }
        );
        assert_eq!(
            SMTP.ok(b"AUTH CRAM-MD5\r\n"),
            Command::Auth {
                mechanism: "CRAM-MD5".into(),
                initial_response: None
            }
        );
    }

    #[test]
    fn verbs_from_partial_lines() {
        assert_eq!(leading_verb(b""), Verb::Incomplete);
        assert_eq!(leading_verb(b"MAI"), Verb::Incomplete);
        assert_eq!(leading_verb(b"mail FROM"), Verb::Complete("MAIL".into()));
        assert_eq!(leading_verb(b"DATA\r"), Verb::Complete("DATA".into()));
        assert_eq!(leading_verb(b"\r\n"), Verb::Invalid);
        assert_eq!(leading_verb(b"MA1L"), Verb::Invalid);
        assert_eq!(leading_verb(&[b'A'; 17]), Verb::Invalid);
        assert_eq!(leading_verb(&[b'A'; 16]), Verb::Incomplete);
    }

    #[test]
    fn debug_redacts() {
        let d = format!("{:?}", SMTP.ok(b"AUTH PLAIN AGFsaWNlAGh1bnRlcjI=\r\n"));
        assert!(!d.contains("AGFsaWNlAGh1bnRlcjI="), "{d}");
    }
}

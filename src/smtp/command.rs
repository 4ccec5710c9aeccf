//! Grammar for the SMTP commands the proxy answers itself before the
//! hand-off (RFC 5321 §4.1, RFC 4954 `AUTH`, RFC 3207 `STARTTLS`), written
//! with nom 8.
//!
//! Input is one complete command line (with its CRLF or bare LF) as cut by
//! the pre-auth state machine. Everything else (`MAIL`, `RCPT`, …) is only
//! classified by its verb: the proxy never parses transaction commands.

use std::fmt;

use zeroize::Zeroizing;

use crate::linebuf::parse_error as err;
pub use crate::linebuf::ParseError;
use crate::linebuf::{self, sasl_args, verb_and_args};

/// Longest verb [`leading_verb`] waits for (`STARTTLS` is the longest
/// local one).
pub const MAX_VERB: usize = 16;

/// One parsed client command.
#[derive(Clone, PartialEq, Eq)]
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
        initial_response: Option<Zeroizing<String>>,
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

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ehlo { domain } => f.debug_struct("Ehlo").field("domain", domain).finish(),
            Command::Helo { domain } => f.debug_struct("Helo").field("domain", domain).finish(),
            Command::Auth {
                mechanism,
                initial_response,
            } => f
                .debug_struct("Auth")
                .field("mechanism", mechanism)
                .field("initial_response", &initial_response.as_ref().map(|_| "<redacted>"))
                .finish(),
            Command::StartTls => f.write_str("StartTls"),
            Command::Rset => f.write_str("Rset"),
            Command::Noop => f.write_str("Noop"),
            Command::Quit => f.write_str("Quit"),
            Command::Help => f.write_str("Help"),
            Command::Transaction { verb } => f.debug_struct("Transaction").field("verb", verb).finish(),
            Command::Other { verb } => f.debug_struct("Other").field("verb", verb).finish(),
        }
    }
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
                initial_response,
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

    fn ok(i: &[u8]) -> Command {
        parse_command(i).unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(i)))
    }

    fn bad(i: &[u8]) -> String {
        parse_command(i).unwrap_err().reply
    }

    #[test]
    fn simple_commands_case_insensitive() {
        assert_eq!(
            ok(b"ehlo client.example.org\r\n"),
            Command::Ehlo {
                domain: "client.example.org".into()
            }
        );
        assert_eq!(
            ok(b"HELO [192.0.2.1]  \n"),
            Command::Helo {
                domain: "[192.0.2.1]".into()
            }
        );
        assert_eq!(ok(b"StartTLS\r\n"), Command::StartTls);
        assert_eq!(ok(b"rset\r\n"), Command::Rset);
        assert_eq!(ok(b"NOOP\r\n"), Command::Noop);
        assert_eq!(ok(b"NOOP anything at all\r\n"), Command::Noop);
        assert_eq!(ok(b"QUIT \r\n"), Command::Quit);
        assert_eq!(ok(b"HELP AUTH\r\n"), Command::Help);
        assert_eq!(ok(b"mail FROM:<a@b>\r\n"), Command::Transaction { verb: "MAIL".into() });
        assert_eq!(ok(b"DATA\r\n"), Command::Transaction { verb: "DATA".into() });
        assert_eq!(
            ok(b"XCLIENT ADDR=1.2.3.4\r\n"),
            Command::Other { verb: "XCLIENT".into() }
        );
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(bad(b"EHLO\r\n"), "501 5.5.4 Syntax: EHLO hostname");
        assert_eq!(bad(b"EHLO   \r\n"), "501 5.5.4 Syntax: EHLO hostname");
        assert_eq!(bad(b"HELO\r\n"), "501 5.5.4 Syntax: HELO hostname");
        assert_eq!(bad(b"EHLO a\x01b\r\n"), "501 5.5.2 Invalid characters in host name");
        assert_eq!(bad(b"EHLO \xff\r\n"), "501 5.5.2 Host name must be valid UTF-8");
        assert_eq!(
            bad(b"STARTTLS now\r\n"),
            "501 5.5.4 Syntax: STARTTLS (no parameters allowed)"
        );
        assert_eq!(bad(b"AUTH\r\n"), "501 5.5.4 Syntax: AUTH mechanism [initial-response]");
        assert_eq!(
            bad(b"AUTH PLAIN a b\r\n"),
            "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
        );
        for l in [
            &b"\r\n"[..],
            b" EHLO x\r\n",
            b"EHLO\0 x\r\n",
            b"\0\0\r\n",
            b"\xff\xfe\r\n",
            b"NOOP\r\r\n",
            b"123\r\n",
        ] {
            assert_eq!(bad(l), UNRECOGNIZED, "{:?}", String::from_utf8_lossy(l));
        }
    }

    #[test]
    fn auth_forms() {
        assert_eq!(
            ok(b"auth plain\r\n"),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: None
            }
        );
        assert_eq!(
            ok(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some(Zeroizing::new("AGFsaWNlAHNlY3JldA==".into()))
            }
        );
        assert_eq!(
            ok(b"AUTH PLAIN =\r\n"),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some(Zeroizing::new(String::new()))
            }
        );
        assert_eq!(
            ok(b"AUTH login YWxpY2U=\n"),
            Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: Some(Zeroizing::new("YWxpY2U=".into()))
            }
        );
        assert_eq!(
            ok(b"AUTH CRAM-MD5\r\n"),
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
        let d = format!("{:?}", ok(b"AUTH PLAIN AGFsaWNlAGh1bnRlcjI=\r\n"));
        assert!(!d.contains("AGFsaWNlAGh1bnRlcjI="), "{d}");
    }
}

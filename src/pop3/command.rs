//! Grammar for the POP3 AUTHORIZATION-state commands (RFC 1939 §7, RFC
//! 2449 `CAPA`, RFC 5034 `AUTH`, RFC 2595 `STLS`), written with nom 8.
//!
//! Input is one complete command line (with its CRLF or bare LF) as cut by
//! the pre-auth state machine.

use std::fmt;

use zeroize::Zeroizing;

use crate::linebuf::parse_error as err;
pub use crate::linebuf::ParseError;
use crate::linebuf::{self, end, sasl_args, verb_and_args};

/// One parsed client command.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    Capa,
    /// `USER name` (surrounding whitespace trimmed).
    User {
        name: Zeroizing<String>,
    },
    /// `PASS password`: everything after the first space, spaces included.
    Pass {
        password: Zeroizing<String>,
    },
    Auth {
        /// Upper-cased mechanism name; `None` for a bare `AUTH` (list).
        mechanism: Option<String>,
        /// Initial response, still base64 (`=` yields `Some("")`).
        initial_response: Option<Zeroizing<String>>,
    },
    Quit,
    Stls,
    Apop,
    /// A TRANSACTION-state command (`STAT`, `LIST`, `RETR`, `DELE`, `NOOP`,
    /// `RSET`, `TOP`, `UIDL`, `LAST`); arguments unparsed.
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
            Command::Capa => f.write_str("Capa"),
            Command::User { .. } => f.debug_struct("User").field("name", &"<redacted>").finish(),
            Command::Pass { .. } => f.debug_struct("Pass").field("password", &"<redacted>").finish(),
            Command::Auth {
                mechanism,
                initial_response,
            } => f
                .debug_struct("Auth")
                .field("mechanism", mechanism)
                .field("initial_response", &initial_response.as_ref().map(|_| "<redacted>"))
                .finish(),
            Command::Quit => f.write_str("Quit"),
            Command::Stls => f.write_str("Stls"),
            Command::Apop => f.write_str("Apop"),
            Command::Transaction { verb } => f.debug_struct("Transaction").field("verb", verb).finish(),
            Command::Other { verb } => f.debug_struct("Other").field("verb", verb).finish(),
        }
    }
}

/// Reply for a line that is not a command at all.
pub const UNKNOWN: &str = "-ERR Unknown command";

/// TRANSACTION-state commands (refused before login).
pub fn is_transaction(verb: &str) -> bool {
    matches!(
        verb,
        "STAT" | "LIST" | "RETR" | "DELE" | "NOOP" | "RSET" | "TOP" | "UIDL" | "LAST"
    )
}

/// A credential argument: UTF-8 without NUL/CR/LF.
fn credential(raw: &[u8], what: &str) -> Result<Zeroizing<String>, ParseError> {
    if raw.iter().any(|&c| matches!(c, 0 | b'\r' | b'\n')) {
        return Err(err(&format!("-ERR Invalid characters in {what}")));
    }
    match std::str::from_utf8(raw) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(_) => Err(err(&format!("-ERR {what} must be valid UTF-8"))),
    }
}

/// Parse one complete command line.
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let (verb, args) = verb_and_args(line, UNKNOWN)?;
    let no_args = |cmd| linebuf::no_args(args, cmd, || format!("-ERR Syntax: {verb} takes no arguments"));
    let cmd = match verb.as_str() {
        "CAPA" => no_args(Command::Capa)?,
        "QUIT" => no_args(Command::Quit)?,
        "STLS" => no_args(Command::Stls)?,
        "USER" => {
            let name = args.get(1..).unwrap_or_default().trim_ascii();
            if name.is_empty() {
                return Err(err("-ERR Syntax: USER name"));
            }
            Command::User {
                name: credential(name, "user name")?,
            }
        }
        "PASS" => {
            let pw = args.get(1..).unwrap_or_default();
            if pw.is_empty() {
                return Err(err("-ERR Syntax: PASS password"));
            }
            Command::Pass {
                password: credential(pw, "password")?,
            }
        }
        "AUTH" => {
            if end(args).is_ok() {
                Command::Auth {
                    mechanism: None,
                    initial_response: None,
                }
            } else {
                let Some((mech, ir)) = sasl_args(args) else {
                    return Err(err("-ERR Syntax: AUTH [mechanism [initial-response]]"));
                };
                Command::Auth {
                    mechanism: Some(mech),
                    initial_response: ir,
                }
            }
        }
        "APOP" => Command::Apop,
        v if is_transaction(v) => Command::Transaction { verb },
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
    fn commands() {
        assert_eq!(ok(b"capa\r\n"), Command::Capa);
        assert_eq!(ok(b"QUIT\n"), Command::Quit);
        assert_eq!(ok(b"stls \r\n"), Command::Stls);
        assert_eq!(
            ok(b"USER  alice@example.com \r\n"),
            Command::User {
                name: Zeroizing::new("alice@example.com".into())
            }
        );
        assert_eq!(
            ok(b"PASS  my secret pass \r\n"),
            Command::Pass {
                password: Zeroizing::new(" my secret pass ".into())
            }
        );
        assert_eq!(
            ok("PASS pässwörd\r\n".as_bytes()),
            Command::Pass {
                password: Zeroizing::new("pässwörd".into())
            }
        );
        assert_eq!(
            ok(b"AUTH\r\n"),
            Command::Auth {
                mechanism: None,
                initial_response: None
            }
        );
        assert_eq!(
            ok(b"auth plain\r\n"),
            Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial_response: None
            }
        );
        assert_eq!(
            ok(b"AUTH PLAIN =\r\n"),
            Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial_response: Some(Zeroizing::new(String::new()))
            }
        );
        assert_eq!(
            ok(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
            Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial_response: Some(Zeroizing::new("AGFsaWNlAHNlY3JldA==".into()))
            }
        );
        assert_eq!(ok(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"), Command::Apop);
        assert_eq!(ok(b"retr 1\r\n"), Command::Transaction { verb: "RETR".into() });
        assert_eq!(ok(b"XTND XMIT\r\n"), Command::Other { verb: "XTND".into() });
    }

    #[test]
    fn errors() {
        assert_eq!(bad(b"USER\r\n"), "-ERR Syntax: USER name");
        assert_eq!(bad(b"USER   \r\n"), "-ERR Syntax: USER name");
        assert_eq!(bad(b"PASS\r\n"), "-ERR Syntax: PASS password");
        assert_eq!(bad(b"PASS \r\n"), "-ERR Syntax: PASS password");
        assert_eq!(bad(b"PASS a\0b\r\n"), "-ERR Invalid characters in password");
        assert_eq!(bad(b"PASS a\rb\r\n"), "-ERR Invalid characters in password");
        assert_eq!(bad(b"PASS \xff\r\n"), "-ERR password must be valid UTF-8");
        assert_eq!(bad(b"USER \xff\r\n"), "-ERR user name must be valid UTF-8");
        assert_eq!(bad(b"CAPA x\r\n"), "-ERR Syntax: CAPA takes no arguments");
        assert_eq!(
            bad(b"AUTH PLAIN a b\r\n"),
            "-ERR Syntax: AUTH [mechanism [initial-response]]"
        );
        for l in [&b"\r\n"[..], b" USER x\r\n", b"US\0ER x\r\n", b"\xff\r\n", b"1\r\n"] {
            assert_eq!(bad(l), UNKNOWN);
        }
    }

    #[test]
    fn debug_redacts() {
        let d = format!("{:?} {:?}", ok(b"USER alice\r\n"), ok(b"PASS hunter2\r\n"));
        assert!(!d.contains("alice") && !d.contains("hunter2"), "{d}");
    }
}

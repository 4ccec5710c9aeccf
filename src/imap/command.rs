//! Grammar for the pre-authentication subset of IMAP client commands
//! (RFC 3501 / RFC 9051), written with nom 8.
//!
//! Input is one complete command as delimited by [`super::framing::Framer`]:
//! the whole byte sequence including literals and the final CRLF (or bare LF).

use std::fmt;

use nom::branch::alt;
use nom::bytes::complete::{tag, tag_no_case, take, take_while1};
use nom::combinator::{eof, map, map_opt, opt, value};
use nom::error::{Error as NomError, ErrorKind};
use nom::multi::separated_list0;
use nom::sequence::{delimited, preceded};
use nom::{IResult, Parser};
use zeroize::Zeroizing;

/// One parsed client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub tag: String,
    pub body: CommandBody,
}

/// `ID` parameters: `None` for `ID NIL`, else (field, value) pairs.
pub type IdParams = Option<Vec<(String, Option<String>)>>;

/// Arguments of the commands the proxy handles before login.
#[derive(Clone, PartialEq, Eq)]
pub enum CommandBody {
    Capability,
    Noop,
    Logout,
    StartTls,
    Id(IdParams),
    Login {
        username: Zeroizing<String>,
        password: Zeroizing<String>,
    },
    Authenticate {
        /// Upper-cased mechanism name.
        mechanism: String,
        /// SASL-IR initial response, still base64 (`=` yields `Some("")`).
        initial_response: Option<Zeroizing<String>>,
    },
    /// Any other command; `name` is upper-cased. Arguments are not parsed.
    Other {
        name: String,
    },
}

impl fmt::Debug for CommandBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandBody::Capability => f.write_str("Capability"),
            CommandBody::Noop => f.write_str("Noop"),
            CommandBody::Logout => f.write_str("Logout"),
            CommandBody::StartTls => f.write_str("StartTls"),
            CommandBody::Id(p) => f.debug_tuple("Id").field(p).finish(),
            CommandBody::Login { .. } => f
                .debug_struct("Login")
                .field("username", &"<redacted>")
                .field("password", &"<redacted>")
                .finish(),
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => f
                .debug_struct("Authenticate")
                .field("mechanism", mechanism)
                .field("initial_response", &initial_response.as_ref().map(|_| "<redacted>"))
                .finish(),
            CommandBody::Other { name } => f.debug_struct("Other").field("name", name).finish(),
        }
    }
}

/// A command that could not be parsed. `tag` is set when a tag could be
/// read, so the reply can be `tag BAD message`, else `* BAD message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    pub tag: Option<String>,
    pub message: String,
}

// ------------------------------------------------------------------ char classes

/// ATOM-CHAR: any CHAR except atom-specials (`(){ %*"\]`, CTL).
pub fn is_atom_char(c: u8) -> bool {
    (0x21..0x7f).contains(&c) && !matches!(c, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// ASTRING-CHAR: ATOM-CHAR / resp-specials (`]`).
pub fn is_astring_char(c: u8) -> bool {
    is_atom_char(c) || c == b']'
}

/// tag: 1*<any ASTRING-CHAR except "+">
pub fn is_tag_char(c: u8) -> bool {
    is_astring_char(c) && c != b'+'
}

// ------------------------------------------------------------------ primitives

type Res<'a, O> = IResult<&'a [u8], O>;

fn fail<O>(i: &[u8]) -> Res<'_, O> {
    Err(nom::Err::Error(NomError::new(i, ErrorKind::Verify)))
}

fn sp(i: &[u8]) -> Res<'_, &[u8]> {
    tag(&b" "[..]).parse(i)
}

/// CRLF, or a bare LF (lenient), at the very end of the command.
fn crlf_eof(i: &[u8]) -> Res<'_, ()> {
    value((), (alt((tag(&b"\r\n"[..]), tag(&b"\n"[..]))), eof)).parse(i)
}

fn crlf(i: &[u8]) -> Res<'_, &[u8]> {
    alt((tag(&b"\r\n"[..]), tag(&b"\n"[..]))).parse(i)
}

fn number(i: &[u8]) -> Res<'_, usize> {
    map_opt(take_while1(|c: u8| c.is_ascii_digit()), |d: &[u8]| {
        std::str::from_utf8(d).ok()?.parse::<usize>().ok()
    })
    .parse(i)
}

/// quoted = DQUOTE *QUOTED-CHAR DQUOTE, with `\\` and `\"` escapes. 8-bit
/// bytes are accepted (RFC 6855 leniency; UTF-8 validity is checked by the
/// caller). NUL, CR and LF are not allowed.
fn quoted(i: &[u8]) -> Res<'_, Zeroizing<Vec<u8>>> {
    let (mut i, _) = tag(&b"\""[..]).parse(i)?;
    let mut out = Zeroizing::new(Vec::new());
    loop {
        match i.split_first() {
            Some((b'"', rest)) => return Ok((rest, out)),
            Some((b'\\', rest)) => match rest.split_first() {
                Some((&c @ (b'"' | b'\\'), rest)) => {
                    out.push(c);
                    i = rest;
                }
                _ => return fail(i),
            },
            Some((0 | b'\r' | b'\n', _)) | None => return fail(i),
            Some((&c, rest)) => {
                out.push(c);
                i = rest;
            }
        }
    }
}

/// literal = "{" number ["+"] "}" CRLF *CHAR8 (no NUL).
fn literal(i: &[u8]) -> Res<'_, Zeroizing<Vec<u8>>> {
    let (i, n) = delimited(tag(&b"{"[..]), number, (opt(tag(&b"+"[..])), tag(&b"}"[..]))).parse(i)?;
    let (i, _) = crlf(i)?;
    let (rest, data) = take(n).parse(i)?;
    if data.contains(&0) {
        return fail(i);
    }
    Ok((rest, Zeroizing::new(data.to_vec())))
}

/// string = quoted / literal
fn string(i: &[u8]) -> Res<'_, Zeroizing<Vec<u8>>> {
    alt((quoted, literal)).parse(i)
}

/// astring = 1*ASTRING-CHAR / string. 8-bit bytes are tolerated in the atom
/// form (lenient towards legacy clients sending UTF-8 user names unquoted).
fn astring(i: &[u8]) -> Res<'_, Zeroizing<Vec<u8>>> {
    alt((
        map(take_while1(|c: u8| is_astring_char(c) || c >= 0x80), |a: &[u8]| {
            Zeroizing::new(a.to_vec())
        }),
        string,
    ))
    .parse(i)
}

/// nstring = string / NIL
fn nstring(i: &[u8]) -> Res<'_, Option<Zeroizing<Vec<u8>>>> {
    alt((value(None, tag_no_case(&b"NIL"[..])), map(string, Some))).parse(i)
}

fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// id-params-list = "(" [string SP nstring *(SP string SP nstring)] ")" / nil
fn id_params(i: &[u8]) -> Res<'_, IdParams> {
    alt((
        value(None, tag_no_case(&b"NIL"[..])),
        map(
            delimited(
                tag(&b"("[..]),
                separated_list0(sp, (string, sp, nstring)),
                tag(&b")"[..]),
            ),
            |pairs| {
                Some(
                    pairs
                        .into_iter()
                        .map(|(k, _, v)| (lossy(&k), v.map(|v| lossy(&v))))
                        .collect(),
                )
            },
        ),
    ))
    .parse(i)
}

/// SASL-IR initial response: base64 or "=" (empty).
fn initial_response(i: &[u8]) -> Res<'_, Zeroizing<String>> {
    alt((
        value(
            Zeroizing::new(String::new()),
            (tag(&b"="[..]), nom::combinator::peek(crlf)),
        ),
        map(
            take_while1(|c: u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=')),
            |b: &[u8]| Zeroizing::new(String::from_utf8_lossy(b).into_owned()),
        ),
    ))
    .parse(i)
}

fn secret_string(v: Zeroizing<Vec<u8>>) -> Option<Zeroizing<String>> {
    let s = std::str::from_utf8(&v).ok()?;
    Some(Zeroizing::new(s.to_owned()))
}

// ------------------------------------------------------------------ entry points

/// Read the tag at the start of `input` if it is followed by a space. Used to
/// tag a `BAD` reply for commands that could not be fully parsed/framed.
pub fn parse_tag(input: &[u8]) -> Option<String> {
    let (rest, t) = take_while1::<_, _, NomError<&[u8]>>(is_tag_char).parse(input).ok()?;
    if rest.first() == Some(&b' ') {
        // Tag chars are ASCII.
        Some(String::from_utf8_lossy(t).into_owned())
    } else {
        None
    }
}

/// Parse one complete framed command.
pub fn parse_command(input: &[u8]) -> Result<Command, ParseError> {
    let err = |tag: Option<&str>, m: &str| ParseError {
        tag: tag.map(str::to_owned),
        message: m.to_owned(),
    };

    let Ok((rest, t)) = take_while1::<_, _, NomError<&[u8]>>(is_tag_char).parse(input) else {
        return Err(err(None, "Missing or invalid command tag"));
    };
    let tag_s = String::from_utf8_lossy(t).into_owned();
    let t = Some(tag_s.as_str());
    let Ok((rest, _)) = sp(rest) else {
        return Err(err(t, "Missing command after tag"));
    };
    let Ok((rest, name)) = take_while1::<_, _, NomError<&[u8]>>(is_atom_char).parse(rest) else {
        return Err(err(t, "Missing or invalid command name"));
    };
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();

    let no_args = |body: CommandBody| -> Result<CommandBody, ParseError> {
        match crlf_eof(rest) {
            Ok(_) => Ok(body),
            Err(_) => Err(err(t, &format!("Unexpected arguments to {name}"))),
        }
    };

    let body = match name.as_str() {
        "CAPABILITY" => no_args(CommandBody::Capability)?,
        "NOOP" => no_args(CommandBody::Noop)?,
        "LOGOUT" => no_args(CommandBody::Logout)?,
        "STARTTLS" => no_args(CommandBody::StartTls)?,
        "ID" => match (preceded(sp, id_params), crlf_eof).parse(rest) {
            Ok((_, (p, ()))) => CommandBody::Id(p),
            Err(_) => return Err(err(t, "Invalid arguments to ID")),
        },
        "LOGIN" => {
            let parsed = (preceded(sp, astring), preceded(sp, astring), crlf_eof).parse(rest);
            let Ok((_, (user, pass, ()))) = parsed else {
                return Err(err(t, "Invalid arguments to LOGIN (expected: LOGIN user password)"));
            };
            match (secret_string(user), secret_string(pass)) {
                (Some(username), Some(password)) => CommandBody::Login { username, password },
                _ => return Err(err(t, "LOGIN user name and password must be valid UTF-8")),
            }
        }
        "AUTHENTICATE" => {
            let parsed = (
                preceded(sp, take_while1(is_atom_char)),
                opt(preceded(sp, initial_response)),
                crlf_eof,
            )
                .parse(rest);
            let Ok((_, (mech, ir, ()))) = parsed else {
                return Err(err(t, "Invalid arguments to AUTHENTICATE"));
            };
            CommandBody::Authenticate {
                mechanism: String::from_utf8_lossy(mech).to_ascii_uppercase(),
                initial_response: ir,
            }
        }
        _ => CommandBody::Other { name },
    };
    Ok(Command { tag: tag_s, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(i: &[u8]) -> Command {
        parse_command(i).unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(i)))
    }

    fn login(i: &[u8]) -> (String, String) {
        match ok(i).body {
            CommandBody::Login { username, password } => (username.as_str().to_owned(), password.as_str().to_owned()),
            b => panic!("{b:?}"),
        }
    }

    #[test]
    fn simple_commands_case_insensitive() {
        assert_eq!(
            ok(b"a1 capability\r\n"),
            Command {
                tag: "a1".into(),
                body: CommandBody::Capability
            }
        );
        assert_eq!(ok(b"x NoOp\n").body, CommandBody::Noop);
        assert_eq!(ok(b"x LOGOUT\r\n").body, CommandBody::Logout);
        assert_eq!(ok(b"x StartTLS\r\n").body, CommandBody::StartTls);
        assert_eq!(ok(b"]]] NOOP\r\n").tag, "]]]");
    }

    #[test]
    fn login_forms() {
        assert_eq!(login(b"a LOGIN alice secret\r\n"), ("alice".into(), "secret".into()));
        assert_eq!(
            login(b"a LOGIN \"al ice\" \"pa\\\"ss\\\\word\"\r\n"),
            ("al ice".into(), "pa\"ss\\word".into())
        );
        assert_eq!(
            login(b"a LOGIN {5}\r\nalice {6+}\r\nse\"c t\r\n"),
            ("alice".into(), "se\"c t".into())
        );
        assert_eq!(login(b"a LOGIN \"\" \"\"\r\n"), ("".into(), "".into()));
        assert_eq!(
            login("a LOGIN \"jörg\" \"pässwörd\"\r\n".as_bytes()),
            ("jörg".into(), "pässwörd".into())
        );
        assert_eq!(
            login(b"a login user@example.com p]w\n"),
            ("user@example.com".into(), "p]w".into())
        );
    }

    #[test]
    fn login_errors_keep_tag() {
        for bad in [
            &b"a LOGIN alice\r\n"[..],
            b"a LOGIN alice secret extra\r\n",
            b"a LOGIN \"alice secret\r\n",
            b"a LOGIN \"a\\lice\" x\r\n",
            b"a LOGIN alice \"x\0y\"\r\n",
            b"a LOGIN alice {3}\r\nx\0y\r\n",
            b"a LOGIN alice {9}\r\nxy\r\n",
            b"a LOGIN alice  secret\r\n",
            b"a LOGIN (alice) secret\r\n",
        ] {
            let e = parse_command(bad).unwrap_err();
            assert_eq!(e.tag.as_deref(), Some("a"), "{:?}", String::from_utf8_lossy(bad));
        }
        let e = parse_command(b"a LOGIN \"\xff\" x\r\n").unwrap_err();
        assert!(e.message.contains("UTF-8"));
    }

    #[test]
    fn tag_errors() {
        assert_eq!(parse_command(b"\r\n").unwrap_err().tag, None);
        assert_eq!(parse_command(b" NOOP\r\n").unwrap_err().tag, None);
        assert_eq!(parse_command(b"+ NOOP\r\n").unwrap_err().tag, None);
        assert_eq!(parse_command(b"*\r\n").unwrap_err().tag, None);
        assert_eq!(parse_command(b"a\r\n").unwrap_err().tag.as_deref(), Some("a"));
        assert_eq!(parse_command(b"a \r\n").unwrap_err().tag.as_deref(), Some("a"));
        assert_eq!(parse_command(b"a\0 NOOP\r\n").unwrap_err().tag.as_deref(), Some("a"));
        assert_eq!(parse_command(b"a NOOP x\r\n").unwrap_err().tag.as_deref(), Some("a"));
        assert_eq!(parse_tag(b"abc NOOP"), Some("abc".into()));
        assert_eq!(parse_tag(b"abc"), None);
        assert_eq!(parse_tag(b"a+b NOOP"), None);
    }

    #[test]
    fn authenticate() {
        assert_eq!(
            ok(b"a authenticate plain\r\n").body,
            CommandBody::Authenticate {
                mechanism: "PLAIN".into(),
                initial_response: None
            }
        );
        assert_eq!(
            ok(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n").body,
            CommandBody::Authenticate {
                mechanism: "PLAIN".into(),
                initial_response: Some(Zeroizing::new("AGFsaWNlAHNlY3JldA==".into()))
            }
        );
        assert_eq!(
            ok(b"a AUTHENTICATE PLAIN =\r\n").body,
            CommandBody::Authenticate {
                mechanism: "PLAIN".into(),
                initial_response: Some(Zeroizing::new(String::new()))
            }
        );
        assert!(parse_command(b"a AUTHENTICATE\r\n").is_err());
        assert!(parse_command(b"a AUTHENTICATE PLAIN !!\r\n").is_err());
        assert!(parse_command(b"a AUTHENTICATE PLAIN AAAA BBBB\r\n").is_err());
    }

    #[test]
    fn id_command() {
        assert_eq!(ok(b"a ID NIL\r\n").body, CommandBody::Id(None));
        assert_eq!(ok(b"a ID ()\r\n").body, CommandBody::Id(Some(vec![])));
        assert_eq!(
            ok(b"a ID (\"name\" \"Thunderbird\" \"version\" NIL)\r\n").body,
            CommandBody::Id(Some(vec![
                ("name".into(), Some("Thunderbird".into())),
                ("version".into(), None)
            ]))
        );
        assert_eq!(
            ok(b"a ID ({4}\r\nname {2}\r\nxy)\r\n").body,
            CommandBody::Id(Some(vec![("name".into(), Some("xy".into()))]))
        );
        assert!(parse_command(b"a ID\r\n").is_err());
        assert!(parse_command(b"a ID (\"name\")\r\n").is_err());
    }

    #[test]
    fn other_commands() {
        assert_eq!(
            ok(b"a select INBOX\r\n").body,
            CommandBody::Other { name: "SELECT".into() }
        );
        assert_eq!(
            ok(b"a UID FETCH 1:* (FLAGS)\r\n").body,
            CommandBody::Other { name: "UID".into() }
        );
        assert_eq!(ok(b"a X\xff\r\n").body, CommandBody::Other { name: "X".into() });
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = ok(b"a LOGIN alice hunter2\r\n");
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2") && !d.contains("alice"), "{d}");
        assert!(d.contains("<redacted>"));
        let c = ok(b"a AUTHENTICATE PLAIN AGFsaWNlAGh1bnRlcjI=\r\n");
        let d = format!("{c:?}");
        assert!(!d.contains("AGFsaWNlAGh1bnRlcjI="), "{d}");
    }
}

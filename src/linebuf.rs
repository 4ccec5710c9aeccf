//! Input buffering shared by the pre-login state machines: how long a line
//! may be when it carries a SASL response, a buffer that wipes what it held
//! (it may hold passwords), and for the line-based protocols (SMTP, POP3) an
//! incremental line finder and the error their command grammars give.

use nom::bytes::complete::{tag, take_while, take_while1};
use nom::combinator::{eof, opt};
use nom::error::Error as NomError;
use nom::sequence::preceded;
use nom::{IResult, Parser};
use zeroize::{Zeroize, Zeroizing};

use crate::text::strip_eol;

/// The longest SASL response (base64) accepted on a line, in every
/// protocol: RFC 4954 §4 has SMTP servers handle 12,288 octets, "a
/// sufficient line length limit for deployed authentication mechanisms";
/// RFC 5034 §4 (POP3) and RFC 9051 §6.2.2 (IMAP) bound a response only by
/// its mechanism. A continuation line may be this long whatever `max_line`
/// says, and a command line carrying an initial response (`AUTH`,
/// `AUTHENTICATE`) may be this much longer than `max_line`.
pub const MAX_SASL_RESPONSE: usize = 12_288;

/// The longest line that answers a SASL challenge, given `max_line`.
pub fn sasl_response_line(max_line: usize) -> usize {
    max_line.max(MAX_SASL_RESPONSE)
}

/// The longest command line with a SASL initial response, given `max_line`:
/// the command, its tag and mechanism count against `max_line`, the
/// response does not.
pub fn sasl_command_line(max_line: usize) -> usize {
    max_line.saturating_add(MAX_SASL_RESPONSE)
}

/// Input buffer whose contents are zeroized when consumed, reallocated or
/// dropped (it may hold passwords).
pub(crate) struct SecretBuf(pub(crate) Vec<u8>);

impl SecretBuf {
    /// Append, growing geometrically but never beyond `max(needed, limit)`.
    pub(crate) fn extend(&mut self, bytes: &[u8], limit: usize) {
        let needed = self.0.len() + bytes.len();
        if needed > self.0.capacity() {
            let target = (self.0.capacity() * 2).max(512).min(limit).max(needed);
            let mut grown = Vec::with_capacity(target);
            grown.extend_from_slice(&self.0);
            self.0.zeroize();
            self.0 = grown;
        }
        self.0.extend_from_slice(bytes);
    }

    pub(crate) fn consume(&mut self, n: usize) {
        let len = self.0.len();
        let n = n.min(len);
        self.0.copy_within(n..len, 0);
        self.0[len - n..].zeroize();
        self.0.truncate(len - n);
    }

    pub(crate) fn clear(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Incremental line finder: remembers how far it searched, so feeding one
/// byte at a time costs O(total).
///
/// A line may be `max_line` long, except where a SASL response needs more
/// ([`MAX_SASL_RESPONSE`]): an `AUTH` command line (the initial response
/// does not count against `max_line`) and, when
/// [`LineFramer::sasl_response`] is set, a line answering a challenge.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LineFramer {
    pub(crate) scanned: usize,
    pub(crate) max_line: usize,
    /// The next line answers a SASL challenge (`334 `, `+ `).
    pub(crate) sasl_response: bool,
}

/// A line longer than the limit.
#[derive(Debug)]
pub(crate) struct TooLong;

pub(crate) enum Line {
    Incomplete,
    /// `buf[..len]` is one line including its LF.
    Complete(usize),
    TooLong,
}

impl LineFramer {
    pub(crate) fn new(max_line: usize) -> LineFramer {
        LineFramer {
            scanned: 0,
            max_line,
            sasl_response: false,
        }
    }

    /// The longest line this framer ever accepts, without its CRLF.
    pub(crate) fn max_len(&self) -> usize {
        sasl_command_line(self.max_line)
    }

    /// How long the line at the start of `buf` may be. Asked only once
    /// `buf` holds more than `max_line` bytes, so the answer does not
    /// depend on how much of the line has arrived.
    fn limit(&self, buf: &[u8]) -> usize {
        if self.sasl_response {
            sasl_response_line(self.max_line)
        } else if buf.len() >= 5 && buf[..5].eq_ignore_ascii_case(b"AUTH ") {
            sasl_command_line(self.max_line)
        } else {
            self.max_line
        }
    }

    pub(crate) fn scan(&mut self, buf: &[u8]) -> Line {
        let from = self.scanned.min(buf.len());
        match buf[from..].iter().position(|&b| b == b'\n') {
            Some(off) => {
                let len = from + off + 1;
                self.scanned = 0;
                let line = strip_eol(&buf[..len]).len();
                if line > self.max_line && line > self.limit(buf) {
                    Line::TooLong
                } else {
                    Line::Complete(len)
                }
            }
            None => {
                self.scanned = buf.len();
                // Allow one extra byte for a CR that may precede LF.
                if buf.len() > self.max_line.saturating_add(1) && buf.len() > self.limit(buf).saturating_add(1) {
                    Line::TooLong
                } else {
                    Line::Incomplete
                }
            }
        }
    }

    pub(crate) fn reset(&mut self) {
        self.scanned = 0;
    }
}

/// A line-protocol command that could not be parsed: `reply` is the
/// complete reply line to send (without CRLF), e.g. `501 5.5.4 Syntax: EHLO
/// hostname` or `-ERR Syntax: USER name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reply}")]
pub struct ParseError {
    pub reply: String,
}

pub(crate) fn parse_error(reply: &str) -> ParseError {
    ParseError {
        reply: reply.to_owned(),
    }
}

/// Test helper shared by the line protocols' command parsers: `ok` panics
/// with the input on a refusal, `bad` returns the reply a refusal sends.
#[cfg(test)]
pub(crate) struct CommandParser<T>(pub fn(&[u8]) -> Result<T, ParseError>);

#[cfg(test)]
impl<T: std::fmt::Debug> CommandParser<T> {
    pub(crate) fn ok(&self, i: &[u8]) -> T {
        (self.0)(i).unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(i)))
    }

    pub(crate) fn bad(&self, i: &[u8]) -> String {
        (self.0)(i).unwrap_err().reply
    }
}

// ------------------------------------------- grammar shared by SMTP and POP3

pub(crate) type Res<'a, O> = IResult<&'a [u8], O>;

pub(crate) fn sp(i: &[u8]) -> Res<'_, &[u8]> {
    tag(&b" "[..]).parse(i)
}

/// Trailing spaces then the end of the (EOL-stripped) line.
pub(crate) fn end(i: &[u8]) -> Res<'_, ()> {
    let (i, _) = (take_while(|c| c == b' '), eof).parse(i)?;
    Ok((i, ()))
}

/// sasl-mech = 1*20 (UPPER-ALPHA / DIGIT / "-" / "_") (case-insensitive here)
pub(crate) fn mechanism(i: &[u8]) -> Res<'_, &[u8]> {
    take_while1(|c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_').parse(i)
}

/// A SASL initial response: base64 or `=` (empty). Any printable token is
/// taken; invalid base64 is reported by the decoder.
pub(crate) fn initial_response(i: &[u8]) -> Res<'_, Zeroizing<String>> {
    let (i, tok) = take_while1(|c: u8| (0x21..0x7f).contains(&c)).parse(i)?;
    let s = if tok == b"=" {
        String::new()
    } else {
        String::from_utf8_lossy(tok).into_owned()
    };
    Ok((i, Zeroizing::new(s)))
}

/// A command line split into its verb (letters only, upper-cased) and the
/// rest, which is empty or starts with a space; `unknown` is the reply for a
/// line that is not a command at all.
pub(crate) fn verb_and_args<'a>(line: &'a [u8], unknown: &str) -> Result<(String, &'a [u8]), ParseError> {
    let line = strip_eol(line);
    let Ok((args, verb)) = take_while1::<_, _, NomError<&[u8]>>(|c: u8| c.is_ascii_alphabetic()).parse(line) else {
        return Err(parse_error(unknown));
    };
    if !(args.is_empty() || args.starts_with(b" ")) {
        return Err(parse_error(unknown));
    }
    Ok((String::from_utf8_lossy(verb).to_ascii_uppercase(), args))
}

/// `cmd` when nothing but spaces follows the verb, else the reply `syntax`
/// makes.
pub(crate) fn no_args<T>(args: &[u8], cmd: T, syntax: impl FnOnce() -> String) -> Result<T, ParseError> {
    match end(args) {
        Ok(_) => Ok(cmd),
        Err(_) => Err(parse_error(&syntax())),
    }
}

/// `SP mechanism [SP initial-response]` up to the end of the line: the
/// mechanism upper-cased, and the initial response if any.
pub(crate) fn sasl_args(args: &[u8]) -> Option<(String, Option<Zeroizing<String>>)> {
    let (_, (mech, ir, ())) = (preceded(sp, mechanism), opt(preceded(sp, initial_response)), end)
        .parse(args)
        .ok()?;
    Some((String::from_utf8_lossy(mech).to_ascii_uppercase(), ir))
}

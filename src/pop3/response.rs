//! Parsers for upstream POP3 responses, for the proxy's POP3 *client* side
//! before the hand-off (greeting, CAPA, STLS, AUTH exchange).
//!
//! Use [`find_line`] to cut a complete line out of the receive buffer, then
//! [`parse_response`] on it; after a `+OK` to `CAPA`, [`find_multiline`]
//! cuts the capability list up to its terminating `.` line.

use nom::branch::alt;
use nom::bytes::complete::{tag, tag_no_case, take_while, take_while1};
use nom::combinator::{eof, map, opt, value};
use nom::sequence::{delimited, preceded, terminated};
use nom::{IResult, Parser};

use crate::sasl::{self, OAuthChallenge};
use crate::text::strip_eol;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed server response: {0}")]
    Malformed(&'static str),
    #[error("server response too long")]
    TooLong,
}

/// `+OK [CODE] text` or `-ERR [CODE] text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusLine {
    /// `+OK` (true) or `-ERR` (false).
    pub ok: bool,
    /// RFC 2449 response code, upper-cased (`AUTH`, `SYS/TEMP`, `IN-USE`…).
    pub code: Option<String>,
    pub text: String,
}

/// One upstream response line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Status(StatusLine),
    /// `+ base64-challenge` (empty for a bare `+` / `+ `), RFC 5034.
    Continuation(String),
}

impl Response {
    /// For a continuation during `AUTH XOAUTH2`/`OAUTHBEARER`: the decoded
    /// base64 JSON failure challenge, if that is what it is. Answer with
    /// [`sasl::XOAUTH2_ERROR_ACK`] / [`sasl::OAUTHBEARER_ERROR_ACK`]; the
    /// server then sends `-ERR`.
    pub fn oauth_error_challenge(&self) -> Option<OAuthChallenge> {
        match self {
            Response::Continuation(c) => sasl::decode_error_challenge(c.trim().as_bytes()),
            Response::Status(_) => None,
        }
    }
}

impl StatusLine {
    /// The line as a client-safe reply text (control characters replaced):
    /// `[CODE] text` or `text`.
    pub fn describe(&self) -> String {
        let s = match &self.code {
            Some(c) if self.text.is_empty() => format!("[{c}]"),
            Some(c) => format!("[{c}] {}", self.text),
            None => self.text.clone(),
        };
        s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ------------------------------------------------------------------ framing

/// Length (including the line terminator) of the first complete line in
/// `buf`. `Ok(None)`: incomplete (read more). Errors if no line terminator
/// appears within `max_line` bytes.
pub fn find_line(buf: &[u8], max_line: usize) -> Result<Option<usize>, ResponseError> {
    let window = &buf[..buf.len().min(max_line.saturating_add(2))];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() > max_line.saturating_add(1) {
            return Err(ResponseError::TooLong);
        }
        return Ok(None);
    };
    if strip_eol(&buf[..=lf]).len() > max_line {
        return Err(ResponseError::TooLong);
    }
    Ok(Some(lf + 1))
}

/// The body of a multi-line response (e.g. the `CAPA` list), `buf` starting
/// right after the `+OK` line: `Ok(Some((len, lines)))` once the `.` line
/// has arrived, `len` including it. Lines are dot-unstuffed, terminators
/// stripped. `max` bounds the whole body.
pub fn find_multiline(buf: &[u8], max: usize) -> Result<Option<(usize, Vec<String>)>, ResponseError> {
    let mut pos = 0;
    let mut lines = Vec::new();
    loop {
        let window = &buf[pos..buf.len().min(max.saturating_add(1))];
        let Some(off) = window.iter().position(|&b| b == b'\n') else {
            if buf.len() > max {
                return Err(ResponseError::TooLong);
            }
            return Ok(None);
        };
        let end = pos + off + 1;
        if end > max {
            return Err(ResponseError::TooLong);
        }
        let line = strip_eol(&buf[pos..end]);
        pos = end;
        if line == b"." {
            return Ok(Some((pos, lines)));
        }
        let line = line.strip_prefix(b".").unwrap_or(line);
        lines.push(lossy(line));
    }
}

// ------------------------------------------------------------------ grammar

type Res<'a, O> = IResult<&'a [u8], O>;

fn text(i: &[u8]) -> Res<'_, String> {
    map(take_while(|_| true), lossy).parse(i)
}

/// "[" resp-level *("/" resp-level) "]"
fn resp_code(i: &[u8]) -> Res<'_, String> {
    map(
        delimited(
            tag(&b"["[..]),
            take_while1(|c: u8| c.is_ascii_graphic() && c != b']'),
            tag(&b"]"[..]),
        ),
        |c: &[u8]| lossy(c).to_ascii_uppercase(),
    )
    .parse(i)
}

/// After the status indicator: nothing, or SP [code [SP]] text.
fn status_tail(i: &[u8]) -> Res<'_, (Option<String>, String)> {
    alt((
        value((None, String::new()), eof),
        preceded(tag(&b" "[..]), (opt(terminated(resp_code, opt(tag(&b" "[..])))), text)),
    ))
    .parse(i)
}

fn status(i: &[u8]) -> Res<'_, Response> {
    let (i, ok) = alt((
        value(true, tag_no_case(&b"+OK"[..])),
        value(false, tag_no_case(&b"-ERR"[..])),
    ))
    .parse(i)?;
    let (i, (code, text)) = status_tail(i)?;
    Ok((i, Response::Status(StatusLine { ok, code, text })))
}

fn continuation(i: &[u8]) -> Res<'_, Response> {
    map(
        preceded(
            tag(&b"+"[..]),
            alt((
                value(String::new(), eof),
                map(preceded(tag(&b" "[..]), text), |t| t.trim().to_owned()),
            )),
        ),
        Response::Continuation,
    )
    .parse(i)
}

/// Parse one complete response line (as delimited by [`find_line`]).
pub fn parse_response(line: &[u8]) -> Result<Response, ResponseError> {
    let line = strip_eol(line);
    alt((status, continuation))
        .parse(line)
        .map(|(_, r)| r)
        .map_err(|_| ResponseError::Malformed("expected +OK, -ERR or a + continuation"))
}

// ------------------------------------------------------------------ CAPA

/// Whether capability `name` (first word of a CAPA line, case-insensitive)
/// is listed.
pub fn has_capability(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| {
        c.split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(name))
    })
}

/// Mechanisms from the `SASL` capability line, upper-cased.
pub fn sasl_mechanisms(caps: &[String]) -> Vec<String> {
    caps.iter()
        .filter_map(|c| {
            let mut w = c.split_whitespace();
            w.next()
                .filter(|k| k.eq_ignore_ascii_case("SASL"))
                .map(|_| w.map(str::to_ascii_uppercase).collect::<Vec<_>>())
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn st(ok: bool, code: Option<&str>, text: &str) -> Response {
        Response::Status(StatusLine {
            ok,
            code: code.map(str::to_owned),
            text: text.to_owned(),
        })
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_response(b"+OK Gpop ready for requests from 192.0.2.1 x\r\n").unwrap(),
            st(true, None, "Gpop ready for requests from 192.0.2.1 x")
        );
        assert_eq!(parse_response(b"+OK\r\n").unwrap(), st(true, None, ""));
        assert_eq!(parse_response(b"+ok hi\n").unwrap(), st(true, None, "hi"));
        assert_eq!(
            parse_response(b"-ERR [AUTH] Username and password not accepted.\r\n").unwrap(),
            st(false, Some("AUTH"), "Username and password not accepted.")
        );
        assert_eq!(
            parse_response(b"-ERR [sys/temp] try later\r\n").unwrap(),
            st(false, Some("SYS/TEMP"), "try later")
        );
        assert_eq!(
            parse_response(b"-ERR [IN-USE]\r\n").unwrap(),
            st(false, Some("IN-USE"), "")
        );
        assert_eq!(parse_response(b"-ERR\r\n").unwrap(), st(false, None, ""));
        assert_eq!(parse_response(b"-ERR [x\r\n").unwrap(), st(false, None, "[x"));
        for bad in [&b"+OKAY\r\n"[..], b"-ERROR x\r\n", b"OK\r\n", b"\r\n", b"", b"* OK\r\n"] {
            assert!(parse_response(bad).is_err(), "{bad:?}");
        }
        let Response::Status(s) = parse_response(b"-ERR [AUTH] bad\x01\r\n").unwrap() else {
            panic!()
        };
        assert_eq!(s.describe(), "[AUTH] bad ");
    }

    #[test]
    fn continuations_and_oauth_challenge() {
        assert_eq!(
            parse_response(b"+ \r\n").unwrap(),
            Response::Continuation(String::new())
        );
        assert_eq!(parse_response(b"+\r\n").unwrap(), Response::Continuation(String::new()));
        let json = br#"{"status":"401","schemes":"bearer"}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        let r = parse_response(format!("+ {b64}\r\n").as_bytes()).unwrap();
        assert_eq!(r, Response::Continuation(b64.clone()));
        assert_eq!(r.oauth_error_challenge().unwrap().status, "401");
        assert_eq!(
            parse_response(b"+ VXNlcm5hbWU6\r\n").unwrap().oauth_error_challenge(),
            None
        );
        assert_eq!(parse_response(b"+OK x\r\n").unwrap().oauth_error_challenge(), None);
    }

    #[test]
    fn lines_and_capa() {
        assert_eq!(find_line(b"+OK", 100), Ok(None));
        assert_eq!(find_line(b"+OK hi\r\n+OK", 100), Ok(Some(8)));
        assert_eq!(find_line(&[b'x'; 200], 100), Err(ResponseError::TooLong));
        assert_eq!(find_line(&[b'x'; 101], 100), Ok(None));

        let body = b"USER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\nTOP\r\nUIDL\r\n\
            X-GOOGLE-RICO\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n..stuffed\r\n.\r\n+OK next";
        let (n, caps) = find_multiline(body, 4096).unwrap().unwrap();
        assert_eq!(&body[n..], b"+OK next");
        assert_eq!(caps.len(), 9);
        assert_eq!(caps[8], ".stuffed");
        assert!(has_capability(&caps, "uidl"));
        assert!(has_capability(&caps, "EXPIRE"));
        assert!(!has_capability(&caps, "STLS"));
        assert_eq!(sasl_mechanisms(&caps), vec!["PLAIN", "XOAUTH2", "OAUTHBEARER"]);
        for i in 0..n {
            assert_eq!(find_multiline(&body[..i], 4096), Ok(None), "{i}");
        }
        assert_eq!(find_multiline(b".\n", 10), Ok(Some((2, vec![]))));
        assert_eq!(
            find_multiline(&b"CAP\r\n".repeat(100), 100),
            Err(ResponseError::TooLong)
        );
        assert_eq!(find_multiline(&[b'x'; 101], 100), Err(ResponseError::TooLong));
    }
}

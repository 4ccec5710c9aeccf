//! Parsers for upstream IMAP server responses, for the proxy's IMAP *client*
//! side before the hand-off (greeting, CAPABILITY, AUTHENTICATE exchange).
//!
//! Use [`find_line`] to cut a complete line out of the receive buffer (and to
//! learn whether it ends with a `{n}` literal that must be skipped together
//! with the rest of the response), then [`parse_response`] on that line.

use nom::branch::alt;
use nom::bytes::complete::{tag, tag_no_case, take_while, take_while1};
use nom::combinator::{eof, map, opt, rest, value};
use nom::sequence::{delimited, preceded, terminated};
use nom::{IResult, Parser};

use super::command::{is_atom_char, is_tag_char};
use super::framing::literal_header;
use crate::text::strip_eol;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed server response: {0}")]
    Malformed(&'static str),
    #[error("server response line too long")]
    LineTooLong,
    #[error("server literal size too large")]
    LiteralTooLarge,
    #[error("invalid tag")]
    InvalidTag,
}

/// Status condition of a status response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    PreAuth,
    Bye,
}

/// A response code: `[NAME args]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    /// Upper-cased code name (`CAPABILITY`, `ALERT`, `AUTHENTICATIONFAILED`, …).
    pub name: String,
    /// Raw text after the name, if any.
    pub args: Option<String>,
}

/// `tag OK|NO|BAD [code] text` or `* OK|NO|BAD|PREAUTH|BYE [code] text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusResponse {
    /// `None` for untagged (`*`).
    pub tag: Option<String>,
    pub status: Status,
    pub code: Option<Code>,
    pub text: String,
}

/// One server response line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Status(StatusResponse),
    /// `* CAPABILITY ...`, upper-cased atoms.
    Capability(Vec<String>),
    /// `+ text-or-base64` (text is empty for a bare `+`).
    Continuation(String),
    /// Any other untagged response (raw text after `* `, line end stripped).
    OtherUntagged(String),
}

impl StatusResponse {
    /// Capabilities from a `[CAPABILITY ...]` response code.
    pub fn capabilities(&self) -> Option<Vec<String>> {
        let code = self.code.as_ref()?;
        if code.name != "CAPABILITY" {
            return None;
        }
        Some(split_caps(code.args.as_deref().unwrap_or("")))
    }
}

impl Response {
    /// Capabilities from `* CAPABILITY ...` or a `[CAPABILITY ...]` code.
    pub fn capabilities(&self) -> Option<Vec<String>> {
        match self {
            Response::Capability(c) => Some(c.clone()),
            Response::Status(s) => s.capabilities(),
            _ => None,
        }
    }
}

/// Case-insensitive membership test (`caps` are upper-cased already).
pub fn has_capability(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| c.eq_ignore_ascii_case(name))
}

fn split_caps(s: &str) -> Vec<String> {
    s.split(' ')
        .filter(|a| !a.is_empty())
        .map(str::to_ascii_uppercase)
        .collect()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ------------------------------------------------------------------ line framing

/// A complete line at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineInfo {
    /// Length including the line terminator.
    pub len: usize,
    /// The line ends with a `{n}` (or `{n+}`) literal announcement: the next
    /// `n` bytes are literal data, followed by the rest of the response
    /// (another line, possibly with more literals).
    pub literal: Option<u64>,
}

/// One complete server response at the start of `buf`: a line, plus any
/// literals it announces and the line parts that follow them, `max` bytes
/// at most in all. Returns its length and bytes; `Ok(None)`: incomplete.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<(usize, Vec<u8>)>, ResponseError> {
    let mut at = 0;
    loop {
        // Each line part may use only what is left of the whole bound, so
        // the verdict does not depend on how the bytes arrived.
        let Some(info) = find_line(&buf[at..], max.saturating_sub(at))? else {
            return Ok(None);
        };
        let end = at + info.len;
        match info.literal {
            None => return Ok(Some((end, buf[..end].to_vec()))),
            Some(n) => {
                at = usize::try_from(n)
                    .ok()
                    .and_then(|n| end.checked_add(n))
                    .filter(|at| *at <= max)
                    .ok_or(ResponseError::LiteralTooLarge)?;
                if at > buf.len() {
                    return Ok(None);
                }
            }
        }
    }
}

/// Find the first complete line in `buf`. `Ok(None)`: incomplete (read more).
/// Errors if no line terminator appears within `max_line` bytes, or a
/// literal size does not fit in a `u64`.
pub fn find_line(buf: &[u8], max_line: usize) -> Result<Option<LineInfo>, ResponseError> {
    let window = &buf[..buf.len().min(max_line.saturating_add(2))];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() > max_line.saturating_add(1) {
            return Err(ResponseError::LineTooLong);
        }
        return Ok(None);
    };
    let line = strip_eol(&buf[..=lf]);
    if line.len() > max_line {
        return Err(ResponseError::LineTooLong);
    }
    let literal = match literal_header(line) {
        None => None,
        Some(h) => Some(h.size.ok_or(ResponseError::LiteralTooLarge)?),
    };
    Ok(Some(LineInfo { len: lf + 1, literal }))
}

// ------------------------------------------------------------------ grammar

type Res<'a, O> = IResult<&'a [u8], O>;

fn sp(i: &[u8]) -> Res<'_, &[u8]> {
    tag(&b" "[..]).parse(i)
}

fn line_end(i: &[u8]) -> Res<'_, ()> {
    value((), (alt((tag(&b"\r\n"[..]), tag(&b"\n"[..]))), eof)).parse(i)
}

fn text(i: &[u8]) -> Res<'_, String> {
    map(take_while(|c: u8| c != b'\r' && c != b'\n'), lossy).parse(i)
}

fn status_kw(i: &[u8]) -> Res<'_, Status> {
    alt((
        value(Status::Ok, tag_no_case(&b"OK"[..])),
        value(Status::No, tag_no_case(&b"NO"[..])),
        value(Status::Bad, tag_no_case(&b"BAD"[..])),
        value(Status::PreAuth, tag_no_case(&b"PREAUTH"[..])),
        value(Status::Bye, tag_no_case(&b"BYE"[..])),
    ))
    .parse(i)
}

/// "[" atom [SP 1*<any TEXT-CHAR except "]">] "]"
fn resp_code(i: &[u8]) -> Res<'_, Code> {
    map(
        delimited(
            tag(&b"["[..]),
            (
                take_while1(is_atom_char),
                opt(preceded(sp, take_while(|c: u8| c != b']' && c != b'\r' && c != b'\n'))),
            ),
            tag(&b"]"[..]),
        ),
        |(name, args): (&[u8], Option<&[u8]>)| Code {
            name: lossy(name).to_ascii_uppercase(),
            args: args.map(lossy),
        },
    )
    .parse(i)
}

/// After the status keyword: CRLF (lenient: no text) or SP [code [SP]] text CRLF.
fn status_tail(i: &[u8]) -> Res<'_, (Option<Code>, String)> {
    alt((
        value((None, String::new()), line_end),
        terminated(preceded(sp, (opt(terminated(resp_code, opt(sp))), text)), line_end),
    ))
    .parse(i)
}

fn status_resp(tag_: Option<String>) -> impl FnMut(&[u8]) -> Res<'_, StatusResponse> {
    move |i| {
        let (i, (status, (code, text))) = (status_kw, status_tail).parse(i)?;
        Ok((
            i,
            StatusResponse {
                tag: tag_.clone(),
                status,
                code,
                text,
            },
        ))
    }
}

fn capability_data(i: &[u8]) -> Res<'_, Vec<String>> {
    map(
        terminated(
            preceded(
                tag_no_case(&b"CAPABILITY"[..]),
                alt((
                    preceded(sp, take_while(|c: u8| c != b'\r' && c != b'\n')),
                    value(&b""[..], nom::combinator::peek(line_end)),
                )),
            ),
            line_end,
        ),
        |c: &[u8]| split_caps(&lossy(c)),
    )
    .parse(i)
}

fn untagged(i: &[u8]) -> Res<'_, Response> {
    preceded(
        tag(&b"* "[..]),
        alt((
            map(status_resp(None), Response::Status),
            map(capability_data, Response::Capability),
            map(rest, |r: &[u8]| Response::OtherUntagged(lossy(strip_eol(r)))),
        )),
    )
    .parse(i)
}

fn continuation(i: &[u8]) -> Res<'_, Response> {
    map(
        preceded(
            tag(&b"+"[..]),
            alt((value(String::new(), line_end), terminated(preceded(sp, text), line_end))),
        ),
        Response::Continuation,
    )
    .parse(i)
}

/// Parse one complete response line (as delimited by [`find_line`]).
pub fn parse_response(line: &[u8]) -> Result<Response, ResponseError> {
    if line.starts_with(b"+") {
        return continuation(line)
            .map(|(_, r)| r)
            .map_err(|_| ResponseError::Malformed("bad continuation request"));
    }
    if line.starts_with(b"* ") {
        return untagged(line)
            .map(|(_, r)| r)
            .map_err(|_| ResponseError::Malformed("bad untagged response"));
    }
    let (rest, t) = terminated(take_while1(is_tag_char), sp)
        .parse(line)
        .map_err(|_: nom::Err<nom::error::Error<&[u8]>>| ResponseError::Malformed("missing tag"))?;
    let (_, s) = status_resp(Some(lossy(t)))
        .parse(rest)
        .map_err(|_| ResponseError::Malformed("bad tagged status response"))?;
    if matches!(s.status, Status::PreAuth | Status::Bye) {
        return Err(ResponseError::Malformed("PREAUTH/BYE cannot be tagged"));
    }
    Ok(Response::Status(s))
}

/// Parse the server greeting: untagged `OK`, `PREAUTH` or `BYE`.
pub fn parse_greeting(line: &[u8]) -> Result<StatusResponse, ResponseError> {
    match parse_response(line)? {
        Response::Status(s) if s.tag.is_none() && matches!(s.status, Status::Ok | Status::PreAuth | Status::Bye) => {
            Ok(s)
        }
        _ => Err(ResponseError::Malformed("not a greeting")),
    }
}

/// Hand-off helper: replace the tag of the upstream tagged response `line`
/// (e.g. `A1 OK [CAPABILITY ...] Logged in\r\n`) with `client_tag`, keeping
/// everything after the tag byte-for-byte.
pub fn retag_line(line: &[u8], client_tag: &str) -> Result<Vec<u8>, ResponseError> {
    if client_tag.is_empty() || !client_tag.bytes().all(is_tag_char) {
        return Err(ResponseError::InvalidTag);
    }
    let (rest, _) = take_while1::<_, _, nom::error::Error<&[u8]>>(is_tag_char)
        .parse(line)
        .map_err(|_| ResponseError::Malformed("missing tag"))?;
    if !rest.starts_with(b" ") {
        return Err(ResponseError::Malformed("missing tag"));
    }
    let mut out = Vec::with_capacity(client_tag.len() + rest.len());
    out.extend_from_slice(client_tag.as_bytes());
    out.extend_from_slice(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(v: &[&str]) -> Vec<String> {
        v.iter().map(std::string::ToString::to_string).collect()
    }

    #[test]
    fn gmail_greeting() {
        let g = parse_greeting(b"* OK Gimap ready for requests from 1.2.3.4 abcdef\r\n").unwrap();
        assert_eq!(g.status, Status::Ok);
        assert_eq!(g.code, None);
        assert_eq!(g.text, "Gimap ready for requests from 1.2.3.4 abcdef");
        assert_eq!(g.capabilities(), None);
    }

    #[test]
    fn greeting_with_capabilities() {
        let g = parse_greeting(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN auth=xoauth2] Dovecot ready.\r\n",
        )
        .unwrap();
        let c = g.capabilities().unwrap();
        assert!(has_capability(&c, "AUTH=XOAUTH2"));
        assert!(has_capability(&c, "sasl-ir"));
        assert_eq!(c[0], "IMAP4REV1");
        assert_eq!(g.text, "Dovecot ready.");
        assert_eq!(parse_greeting(b"* PREAUTH hi\r\n").unwrap().status, Status::PreAuth);
        assert_eq!(parse_greeting(b"* BYE go away\r\n").unwrap().status, Status::Bye);
        assert!(parse_greeting(b"* NO x\r\n").is_err());
        assert!(parse_greeting(b"a OK x\r\n").is_err());
        assert!(parse_greeting(b"* CAPABILITY X\r\n").is_err());
    }

    #[test]
    fn capability_line() {
        let r = parse_response(b"* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR AUTH=XOAUTH2 AUTH=PLAIN AUTH=PLAIN-CLIENTTOKEN AUTH=OAUTHBEARER\r\n").unwrap();
        let c = r.capabilities().unwrap();
        assert!(has_capability(&c, "AUTH=OAUTHBEARER"));
        assert!(has_capability(&c, "X-GM-EXT-1"));
        assert_eq!(
            parse_response(b"* capability a b\n").unwrap(),
            Response::Capability(caps(&["A", "B"]))
        );
        assert_eq!(
            parse_response(b"* CAPABILITY\r\n").unwrap(),
            Response::Capability(vec![])
        );
    }

    #[test]
    fn tagged_status() {
        let r =
            parse_response(b"A1 OK [CAPABILITY IMAP4rev1 IDLE] user@example.com authenticated (Success)\r\n").unwrap();
        let Response::Status(s) = &r else { panic!() };
        assert_eq!(s.tag.as_deref(), Some("A1"));
        assert_eq!(s.status, Status::Ok);
        assert_eq!(r.capabilities().unwrap(), caps(&["IMAP4REV1", "IDLE"]));
        assert_eq!(s.text, "user@example.com authenticated (Success)");

        let r = parse_response(b"A2 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n").unwrap();
        assert_eq!(
            r,
            Response::Status(StatusResponse {
                tag: Some("A2".into()),
                status: Status::No,
                code: Some(Code {
                    name: "AUTHENTICATIONFAILED".into(),
                    args: None
                }),
                text: "Invalid credentials (Failure)".into()
            })
        );
        let r = parse_response(b"a3 bad\r\n").unwrap();
        let Response::Status(s) = r else { panic!() };
        assert_eq!((s.status, s.text.as_str()), (Status::Bad, ""));
        assert!(parse_response(b"a PREAUTH x\r\n").is_err());
        assert!(parse_response(b"a OKAY\r\n").is_err());
        assert!(parse_response(b"a\r\n").is_err());
        assert!(parse_response(b"").is_err());
    }

    #[test]
    fn continuation_and_other() {
        assert_eq!(
            parse_response(b"+ eyJzdGF0dXMiOiI0MDAifQ==\r\n").unwrap(),
            Response::Continuation("eyJzdGF0dXMiOiI0MDAifQ==".into())
        );
        assert_eq!(parse_response(b"+\r\n").unwrap(), Response::Continuation(String::new()));
        assert_eq!(
            parse_response(b"+ \r\n").unwrap(),
            Response::Continuation(String::new())
        );
        assert_eq!(
            parse_response(b"* 3 EXISTS\r\n").unwrap(),
            Response::OtherUntagged("3 EXISTS".into())
        );
        assert_eq!(
            parse_response(b"* OK [ALERT] Please note\r\n").unwrap(),
            Response::Status(StatusResponse {
                tag: None,
                status: Status::Ok,
                code: Some(Code {
                    name: "ALERT".into(),
                    args: None
                }),
                text: "Please note".into()
            })
        );
        assert_eq!(
            parse_response(b"* ID (\"name\" \"x\")\r\n").unwrap(),
            Response::OtherUntagged("ID (\"name\" \"x\")".into())
        );
    }

    #[test]
    fn find_line_and_literals() {
        assert_eq!(find_line(b"* OK", 100), Ok(None));
        assert_eq!(
            find_line(b"* OK hi\r\nA1 OK", 100),
            Ok(Some(LineInfo { len: 9, literal: None }))
        );
        assert_eq!(
            find_line(b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n", 100),
            Ok(Some(LineInfo {
                len: 23,
                literal: Some(5)
            }))
        );
        assert_eq!(
            find_line(b"* X {99999999999999999999}\r\n", 100),
            Err(ResponseError::LiteralTooLarge)
        );
        assert_eq!(find_line(&[b'x'; 200], 100), Err(ResponseError::LineTooLong));
        assert_eq!(find_line(&[b'x'; 101], 100), Ok(None));
    }

    #[test]
    fn retag() {
        let up = b"A0001 OK [CAPABILITY IMAP4rev1 IDLE]  Logged in\xff\r\n";
        assert_eq!(
            retag_line(up, "c7").unwrap(),
            b"c7 OK [CAPABILITY IMAP4rev1 IDLE]  Logged in\xff\r\n".to_vec()
        );
        assert_eq!(
            retag_line(b"* OK x\r\n", "a"),
            Err(ResponseError::Malformed("missing tag"))
        );
        assert_eq!(retag_line(b"A1 OK x\r\n", "a b"), Err(ResponseError::InvalidTag));
        assert_eq!(retag_line(b"A1 OK x\r\n", ""), Err(ResponseError::InvalidTag));
    }
}

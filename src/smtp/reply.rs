//! Parsers for upstream SMTP replies (RFC 5321 §4.2), for the proxy's SMTP
//! *client* side before the hand-off (greeting, EHLO, STARTTLS, AUTH).
//!
//! [`find_reply`] cuts one complete reply (single- or multi-line) out of the
//! receive buffer and parses it.

use nom::branch::alt;
use nom::bytes::complete::{tag, take_while, take_while_m_n};
use nom::combinator::{eof, opt};
use nom::error::{Error as NomError, ErrorKind};
use nom::{IResult, Parser};

use crate::sasl::{self, OAuthChallenge};
use crate::text::strip_eol;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed server reply: {0}")]
    Malformed(&'static str),
    #[error("server reply too long")]
    TooLong,
}

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code, e.g. 250.
    pub code: u16,
    /// Text of each line after `code` and its separator (`-` or SP), line
    /// terminator stripped (empty for a bare `250`). Never empty.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2xx
    pub fn is_positive(&self) -> bool {
        self.code / 100 == 2
    }

    /// 3xx (e.g. `334` AUTH continuation, `354` start mail input)
    pub fn is_intermediate(&self) -> bool {
        self.code / 100 == 3
    }

    /// 4xx
    pub fn is_transient(&self) -> bool {
        self.code / 100 == 4
    }

    /// 5xx
    pub fn is_permanent(&self) -> bool {
        self.code / 100 == 5
    }

    /// The RFC 3463 enhanced status code at the start of the first line
    /// (`5.7.8`), if any.
    pub fn enhanced_code(&self) -> Option<&str> {
        enhanced_prefix(self.lines.first()?).map(|(code, _)| code)
    }

    /// The text of all lines joined by a space, enhanced status codes
    /// removed.
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|l| enhanced_prefix(l).map_or(l.as_str(), |(_, rest)| rest).trim())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The reply as one line without CRLF, safe to send to a client:
    /// `code [enhanced] text`, control characters replaced.
    pub fn one_line(&self) -> String {
        let mut s = self.code.to_string();
        if let Some(e) = self.enhanced_code() {
            s.push(' ');
            s.push_str(e);
        }
        let text = self.text();
        if !text.is_empty() {
            s.push(' ');
            s.push_str(&text);
        }
        s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
    }

    /// For a `334` reply during `AUTH XOAUTH2`/`OAUTHBEARER`: the decoded
    /// base64 JSON failure challenge, if that is what it is. The client must
    /// then send [`sasl::XOAUTH2_ERROR_ACK`] (an empty line) or
    /// [`sasl::OAUTHBEARER_ERROR_ACK`], and the server answers `535`.
    pub fn oauth_error_challenge(&self) -> Option<OAuthChallenge> {
        if self.code != 334 {
            return None;
        }
        sasl::decode_error_challenge(self.lines.concat().trim().as_bytes())
    }
}

/// `x.y.z` at the start of `line` (followed by SP or the end), and the rest.
fn enhanced_prefix(line: &str) -> Option<(&str, &str)> {
    let b = line.as_bytes();
    let class = *b.first()?;
    if !matches!(class, b'2' | b'4' | b'5') || b.get(1) != Some(&b'.') {
        return None;
    }
    let mut i = 2;
    for part in 0..2 {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() && i - start < 3 {
            i += 1;
        }
        if i == start {
            return None;
        }
        if part == 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    match b.get(i) {
        None => Some((line, "")),
        Some(b' ') => Some((&line[..i], &line[i + 1..])),
        _ => None,
    }
}

type Res<'a, O> = IResult<&'a [u8], O>;

/// One reply line (EOL stripped): `code ( "-" / SP / end ) text`.
/// Returns `(code, is_last, text)`.
fn reply_line(i: &[u8]) -> Res<'_, (u16, bool, String)> {
    let (i, code) = take_while_m_n(3, 3, |c: u8| c.is_ascii_digit()).parse(i)?;
    let (i, sep) = opt(alt((tag(&b"-"[..]), tag(&b" "[..])))).parse(i)?;
    let (i, text) = take_while(|_| true).parse(i)?;
    let (i, _) = eof(i)?;
    if sep.is_none() && !text.is_empty() {
        return Err(nom::Err::Error(NomError::new(i, ErrorKind::Verify)));
    }
    let code = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    Ok((
        i,
        (code, sep != Some(&b"-"[..]), String::from_utf8_lossy(text).into_owned()),
    ))
}

/// Find and parse the first complete reply in `buf`. `Ok(None)`: incomplete
/// (read more). `max` bounds the whole reply (all its lines, with CRLFs):
/// exceeding it is an error, as is a malformed line, a code outside
/// 200..=599 or continuation lines with differing codes.
pub fn find_reply(buf: &[u8], max: usize) -> Result<Option<(usize, Reply)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let window = &buf[pos..buf.len().min(max.saturating_add(1))];
        let Some(off) = window.iter().position(|&b| b == b'\n') else {
            if buf.len() > max {
                return Err(ReplyError::TooLong);
            }
            return Ok(None);
        };
        let end = pos + off + 1;
        if end > max {
            return Err(ReplyError::TooLong);
        }
        let line = strip_eol(&buf[pos..end]);
        let Ok((_, (c, last, text))) = reply_line(line) else {
            return Err(ReplyError::Malformed("expected a three-digit reply code"));
        };
        if !(200..=599).contains(&c) {
            return Err(ReplyError::Malformed("reply code out of range"));
        }
        if *code.get_or_insert(c) != c {
            return Err(ReplyError::Malformed("multi-line reply with differing codes"));
        }
        lines.push(text);
        pos = end;
        if last {
            return Ok(Some((pos, Reply { code: c, lines })));
        }
    }
}

/// The EHLO keywords (with their parameters) of a `250` EHLO reply: every
/// line but the first (the greeting), trimmed, empty lines skipped. Case is
/// kept; compare with [`has_keyword`].
pub fn ehlo_keywords(reply: &Reply) -> Vec<String> {
    reply
        .lines
        .iter()
        .skip(1)
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Parameters of keyword `name` (case-insensitive) in `keywords`: `Some`
/// (possibly empty) if advertised. `AUTH=PLAIN LOGIN` counts as `AUTH`.
pub fn keyword_params(keywords: &[String], name: &str) -> Option<Vec<String>> {
    let mut found: Option<Vec<String>> = None;
    for k in keywords {
        let (kw, params) = match k.split_once([' ', '=']) {
            Some((kw, p)) => (kw, p),
            None => (k.as_str(), ""),
        };
        if kw.eq_ignore_ascii_case(name) {
            found
                .get_or_insert_with(Vec::new)
                .extend(params.split_whitespace().map(str::to_owned));
        }
    }
    found
}

/// Whether keyword `name` is advertised.
pub fn has_keyword(keywords: &[String], name: &str) -> bool {
    keyword_params(keywords, name).is_some()
}

/// Whether the server offers SASL mechanism `mech` (`AUTH ... MECH ...`).
pub fn has_auth_mechanism(keywords: &[String], mech: &str) -> bool {
    keyword_params(keywords, "AUTH").is_some_and(|m| m.iter().any(|m| m.eq_ignore_ascii_case(mech)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn reply(buf: &[u8]) -> (usize, Reply) {
        find_reply(buf, 4096).unwrap().unwrap()
    }

    const GMAIL_EHLO: &[u8] = b"250-smtp.gmail.com at your service, [192.0.2.1]\r\n\
        250-SIZE 35882577\r\n\
        250-8BITMIME\r\n\
        250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\r\n\
        250-ENHANCEDSTATUSCODES\r\n\
        250-PIPELINING\r\n\
        250-CHUNKING\r\n\
        250 SMTPUTF8\r\n";

    #[test]
    fn single_line() {
        let (n, r) = reply(b"220 smtp.gmail.com ESMTP x - gsmtp\r\n250");
        assert_eq!(n, b"220 smtp.gmail.com ESMTP x - gsmtp\r\n".len());
        assert_eq!(r.code, 220);
        assert_eq!(r.lines, vec!["smtp.gmail.com ESMTP x - gsmtp"]);
        assert!(r.is_positive());
        let (_, r) = reply(b"250\r\n");
        assert_eq!(r.lines, vec![""]);
        let (_, r) = reply(b"334 \n");
        assert_eq!((r.code, r.lines.clone()), (334, vec![String::new()]));
        assert!(r.is_intermediate());
    }

    #[test]
    fn multi_line_ehlo() {
        let mut buf = GMAIL_EHLO.to_vec();
        buf.extend_from_slice(b"220 next");
        let (n, r) = reply(&buf);
        assert_eq!(n, GMAIL_EHLO.len());
        assert_eq!(r.code, 250);
        let k = ehlo_keywords(&r);
        assert_eq!(k[0], "SIZE 35882577");
        assert_eq!(k.len(), 7);
        assert!(has_auth_mechanism(&k, "xoauth2"));
        assert!(has_auth_mechanism(&k, "OAUTHBEARER"));
        assert!(!has_auth_mechanism(&k, "CRAM-MD5"));
        assert!(has_keyword(&k, "pipelining"));
        assert!(!has_keyword(&k, "STARTTLS"));
        assert_eq!(keyword_params(&k, "SIZE"), Some(vec!["35882577".into()]));
        assert_eq!(keyword_params(&k, "CHUNKING"), Some(vec![]));
        let old = vec!["AUTH=LOGIN XOAUTH2".to_owned()];
        assert!(has_auth_mechanism(&old, "XOAUTH2"));
        // Incomplete at every split point.
        for i in 0..GMAIL_EHLO.len() {
            assert_eq!(find_reply(&GMAIL_EHLO[..i], 4096), Ok(None), "{i}");
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            find_reply(b"250-a\r\n251 b\r\n", 100),
            Err(ReplyError::Malformed("multi-line reply with differing codes"))
        );
        assert!(find_reply(b"25 x\r\n", 100).is_err());
        assert!(find_reply(b"2500 x\r\n", 100).is_err());
        assert!(find_reply(b"abc x\r\n", 100).is_err());
        assert!(find_reply(b"\r\n", 100).is_err());
        assert!(find_reply(b"099 x\r\n", 100).is_err());
        assert!(find_reply(b"600 x\r\n", 100).is_err());
        assert_eq!(find_reply(&[b'2'; 101], 100), Err(ReplyError::TooLong));
        assert_eq!(find_reply(&[b'2'; 100], 100), Ok(None));
        let many = b"250-x\r\n".repeat(100);
        assert_eq!(find_reply(&many, 100), Err(ReplyError::TooLong));
        assert_eq!(find_reply(&many[..98], 100), Ok(None));
    }

    #[test]
    fn gmail_535_one_line() {
        let (_, r) = reply(
            b"535-5.7.8 Username and Password not accepted. For more information, go to\r\n\
              535 5.7.8  https://support.google.com/mail/?p=BadCredentials x - gsmtp\r\n",
        );
        assert!(r.is_permanent());
        assert_eq!(r.enhanced_code(), Some("5.7.8"));
        assert_eq!(
            r.one_line(),
            "535 5.7.8 Username and Password not accepted. For more information, go to \
             https://support.google.com/mail/?p=BadCredentials x - gsmtp"
        );
        let (_, r) = reply(b"454 Try later\xff\x01\r\n");
        assert_eq!(r.enhanced_code(), None);
        assert!(r.is_transient());
        assert_eq!(r.one_line(), "454 Try later\u{fffd} ");
    }

    #[test]
    fn oauth_error_challenge() {
        let json = br#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        let (_, r) = reply(format!("334 {b64}\r\n").as_bytes());
        let c = r.oauth_error_challenge().unwrap();
        assert_eq!(c.status, "400");
        let (_, r) = reply(b"334 VXNlcm5hbWU6\r\n");
        assert_eq!(r.oauth_error_challenge(), None);
        let (_, r) = reply(format!("535 {b64}\r\n").as_bytes());
        assert_eq!(r.oauth_error_challenge(), None);
    }
}

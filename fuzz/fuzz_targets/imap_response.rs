//! Upstream-response helpers in `imap::response`: `find_line`,
//! `parse_response`, `parse_greeting`, `retag_line`.
//!
//! Input: `[max_line byte] [tag byte] stream...`. The stream is cut into
//! lines with `find_line` the way the proxy's client side does it (skipping
//! `{n}` literal data), and each line is parsed.
//!
//! Invariants:
//! * no panic;
//! * `find_line` returns `0 < len <= buf.len()`, the line ends in LF and is
//!   within `max_line` (+ terminator);
//! * `parse_greeting(l)` is `Ok` only for an untagged OK/PREAUTH/BYE that
//!   `parse_response` also accepts;
//! * tagged status responses have a non-empty tag of tag chars, never
//!   PREAUTH/BYE; capability atoms are upper-case and non-empty;
//! * `retag_line(l, t)` only replaces the tag: the result is `t` followed by
//!   the original bytes after the tag, and parses to the same response with
//!   the new tag.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::imap::command::is_tag_char;
use mailproxy::imap::response::{find_line, parse_greeting, parse_response, retag_line, Response, Status};

const TAGS: &[&str] = &["a1", "A0001", "]]", "x.y", "", "a b", "+", "*", "t\r\n"];

fn check_caps(c: &[String]) {
    for a in c {
        assert!(!a.is_empty(), "empty capability");
        assert!(!a.bytes().any(|b| b.is_ascii_lowercase() || b == b' '), "capability {a:?}");
    }
}

fn check_line(line: &[u8], client_tag: &str) {
    let r = parse_response(line);
    if let Ok(r) = &r {
        match r {
            Response::Status(s) => {
                if let Some(t) = &s.tag {
                    assert!(!t.is_empty() && t.bytes().all(is_tag_char), "tag {t:?}");
                    assert!(!matches!(s.status, Status::PreAuth | Status::Bye));
                }
                if let Some(c) = &s.code {
                    assert!(!c.name.is_empty());
                }
                assert!(!s.text.contains('\n'));
            }
            Response::Capability(c) => check_caps(c),
            Response::Continuation(t) => assert!(!t.contains('\n')),
            Response::OtherUntagged(_) => {}
        }
        if let Some(c) = r.capabilities() {
            check_caps(&c);
        }
    }
    if let Ok(g) = parse_greeting(line) {
        assert!(g.tag.is_none());
        assert!(matches!(g.status, Status::Ok | Status::PreAuth | Status::Bye));
        assert_eq!(r.as_ref().ok(), Some(&Response::Status(g)));
    }
    match retag_line(line, client_tag) {
        Ok(out) => {
            assert!(!client_tag.is_empty() && client_tag.bytes().all(is_tag_char));
            assert!(out.starts_with(client_tag.as_bytes()));
            let old_tag_len = line.iter().position(|b| !is_tag_char(*b)).unwrap_or(line.len());
            assert!(old_tag_len > 0);
            assert_eq!(&out[client_tag.len()..], &line[old_tag_len..], "retag changed bytes after the tag");
            // Same meaning, new tag.
            match (parse_response(line), parse_response(&out)) {
                (Ok(Response::Status(mut a)), Ok(Response::Status(b))) => {
                    a.tag = Some(client_tag.to_owned());
                    assert_eq!(a, b);
                }
                (Ok(_), Ok(_)) => panic!("retag changed the response kind"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("retag changed parseability: {a:?} vs {b:?}"),
            }
        }
        Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (hdr, stream) = data.split_at(2);
    let max_line = if hdr[0] & 0x80 != 0 { 8192 } else { usize::from(hdr[0]) + 1 };
    let client_tag = TAGS[usize::from(hdr[1]) % TAGS.len()];

    // The whole input as one line, whatever it is.
    check_line(stream, client_tag);

    // Cut the stream into lines like the proxy does.
    let mut buf = stream;
    while !buf.is_empty() {
        match find_line(buf, max_line) {
            Err(_) | Ok(None) => break,
            Ok(Some(info)) => {
                assert!(info.len > 0 && info.len <= buf.len());
                assert_eq!(buf[info.len - 1], b'\n');
                assert!(info.len <= max_line.saturating_add(2), "line {} > max {}", info.len, max_line);
                let line = &buf[..info.len];
                check_line(line, client_tag);
                buf = &buf[info.len..];
                if let Some(n) = info.literal {
                    let n = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    buf = &buf[n..];
                }
            }
        }
    }
});

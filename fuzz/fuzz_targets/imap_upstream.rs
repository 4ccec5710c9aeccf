//! What an IMAP server sends before login, read the way the proxy reads it:
//! whole responses framed by `imap::response::frame` (a line plus any
//! literals it announces and the line parts after them), the greeting
//! through `parse_greeting`, every later response through `parse_response`,
//! the OAuth failure challenge of a continuation through
//! `sasl::decode_error_challenge`, and tagged status lines through
//! `retag_line` for the hand-off.
//!
//! Input: `[max byte] [seed byte] stream...`. The stream arrives in random
//! chunks (the seed picks them); `max` stands in for the proxy's response
//! bound (`upstream::conn::MAX_RESPONSE`, 64 KiB) so that the limits are
//! reachable.
//!
//! Invariants:
//! * no panic;
//! * framing does not depend on how the bytes arrived, frames are in bounds,
//!   and waiting for more never holds more than the bound allows (see
//!   `common::read_frames`);
//! * status and continuation text holds no CR or LF; capabilities are
//!   non-empty upper-case atoms and `has_capability` finds each of them;
//! * a decoded challenge explains itself in one line (`check_challenge`);
//! * retagging a tagged status line keeps its meaning under the new tag.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{check_challenge, read_frames, Upstream};
use libfuzzer_sys::fuzz_target;
use mailproxy::imap::response::{
    frame, has_capability, parse_greeting, parse_response, retag_line, Response, Status,
};
use mailproxy::sasl::decode_error_challenge;

fn check_caps(caps: &[String]) {
    for c in caps {
        assert!(!c.is_empty(), "empty capability");
        assert!(
            !c.bytes().any(|b| b == b' ' || b.is_ascii_lowercase()),
            "capability {c:?}"
        );
        assert!(has_capability(caps, c) && has_capability(caps, &c.to_ascii_lowercase()));
    }
}

fn check_response(frame: &[u8], r: &Response) {
    match r {
        Response::Status(s) => {
            assert!(!s.text.contains(['\r', '\n']), "status text {:?}", s.text);
            if let Some(c) = &s.code {
                assert!(!c.name.is_empty() && !c.name.contains(['\r', '\n', ' ', ']']));
            }
            if s.tag.is_some() {
                assert!(!matches!(s.status, Status::PreAuth | Status::Bye));
                // The hand-off gives the client the upstream's answer under
                // the client's tag.
                let out = retag_line(frame, "a1").expect("a tagged status line can be retagged");
                match parse_response(&out) {
                    Ok(Response::Status(mut t)) => {
                        assert_eq!(t.tag.as_deref(), Some("a1"));
                        t.tag = s.tag.clone();
                        assert_eq!(&t, s, "retagging changed the response");
                    }
                    other => panic!("retagged line parses as {other:?}"),
                }
            }
        }
        Response::Continuation(text) => {
            assert!(!text.contains(['\r', '\n']), "continuation text {text:?}");
            // As the proxy does after a failed XOAUTH2/OAUTHBEARER.
            if let Some(c) = decode_error_challenge(text.trim().as_bytes()) {
                check_challenge(&c);
            }
        }
        Response::Capability(c) => check_caps(c),
        Response::OtherUntagged(_) => {}
    }
    if let Some(c) = r.capabilities() {
        check_caps(&c);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(Upstream { stream, max, chunks, .. }) = Upstream::parse(data, 16) else {
        return;
    };

    // The whole response, its line ends included, stays within `max`.
    let bound = max + 2;
    let mut first = true;
    read_frames(
        stream,
        &chunks,
        bound,
        |b| frame(b, max),
        |bytes, f| {
            assert_eq!(bytes, &f[..]);
            assert!(f.ends_with(b"\n"));
            let parsed = parse_response(&f);
            if let Ok(r) = &parsed {
                check_response(&f, r);
            }
            if std::mem::take(&mut first) {
                return match parse_greeting(&f) {
                    Ok(g) => {
                        assert!(g.tag.is_none());
                        assert_eq!(parsed.ok(), Some(Response::Status(g.clone())));
                        // The proxy goes on only after an OK greeting.
                        g.status == Status::Ok
                    }
                    Err(_) => false,
                };
            }
            !matches!(parsed, Ok(Response::Status(ref s)) if s.status == Status::Bye)
        },
    );
});

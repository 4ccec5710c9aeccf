//! What a POP3 server sends before login, read the way the proxy reads it:
//! lines framed by `pop3::response::find_line` over chunked input and
//! parsed by `parse_response` (the greeting, `+OK`/`-ERR`, the `+`
//! continuation carrying an XOAUTH2 failure challenge), and a multi-line
//! `CAPA` body framed by `find_multiline` with its `SASL` mechanisms.
//!
//! Input: `[max byte] [seed byte] stream...`. `max` stands in for the
//! proxy's response bound (`upstream::conn::MAX_RESPONSE`, 64 KiB).
//!
//! Invariants:
//! * no panic;
//! * framing (lines and multi-line bodies) does not depend on how the bytes
//!   arrived, frames are in bounds, and waiting for more holds at most
//!   `max + 1` bytes (a line) or `max` bytes (a body);
//! * `describe` (what the client is told) has no control character, a
//!   response code is upper-case without spaces or `]`;
//! * a continuation's failure challenge is explained in one line;
//! * CAPA lines hold no line break; `sasl_mechanisms` are upper-case words
//!   and `has_capability("SASL")` holds when there are any.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{check_challenge, read_frames, Rng, Upstream};
use libfuzzer_sys::fuzz_target;
use mailproxy::pop3::response::{find_line, find_multiline, has_capability, parse_response, sasl_mechanisms, Response};

fn check_response(r: &Response) {
    match r {
        Response::Status(s) => {
            assert!(
                !s.describe().chars().any(char::is_control),
                "describe {:?}",
                s.describe()
            );
            assert!(!s.text.contains('\n'));
            if let Some(c) = &s.code {
                assert!(!c.is_empty() && !c.contains([' ', ']']), "code {c:?}");
                assert!(!c.bytes().any(|b| b.is_ascii_lowercase()), "code {c:?}");
            }
        }
        Response::Continuation(c) => {
            assert!(!c.contains('\n') && c.trim() == c, "continuation {c:?}");
        }
    }
    if let Some(c) = r.oauth_error_challenge() {
        assert!(matches!(r, Response::Continuation(_)));
        check_challenge(&c);
    }
}

fn check_capa(lines: &[String]) {
    for l in lines {
        assert!(!l.contains('\n'), "CAPA line {l:?}");
    }
    let mechs = sasl_mechanisms(lines);
    for m in &mechs {
        assert!(!m.is_empty() && !m.chars().any(char::is_whitespace));
        assert!(!m.bytes().any(|b| b.is_ascii_lowercase()), "mechanism {m:?}");
    }
    if !mechs.is_empty() {
        assert!(has_capability(lines, "SASL") && has_capability(lines, "sasl"));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(Upstream { seed, stream, max, max_chunk, chunks }) = Upstream::parse(data, 8) else {
        return;
    };

    // Line by line, as the proxy reads the greeting and each answer. After
    // an `+OK` line the rest of the stream is also read as a CAPA body.
    let mut capa_from = Vec::new();
    let mut offset = 0;
    read_frames(
        stream,
        &chunks,
        max + 1,
        |b| match find_line(b, max) {
            Ok(Some(len)) => Ok(Some((len, ()))),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        },
        |line, ()| {
            assert!(line.ends_with(b"\n") && line.len() <= max + 2);
            offset += line.len();
            match parse_response(line) {
                Ok(r) => {
                    check_response(&r);
                    if matches!(&r, Response::Status(s) if s.ok) && capa_from.len() < 4 {
                        capa_from.push(offset);
                    }
                }
                Err(_) => return false,
            }
            true
        },
    );

    for from in capa_from {
        let rest = &stream[from..];
        let mut rng = Rng::new(&[seed, from as u8]);
        let chunks = common::chunks(rest, &mut rng, max_chunk);
        read_frames(
            rest,
            &chunks,
            max,
            |b| find_multiline(b, max),
            |body, lines| {
                assert!(body.len() <= max && body.ends_with(b"\n"));
                check_capa(&lines);
                false
            },
        );
    }
});

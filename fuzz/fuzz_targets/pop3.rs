//! POP3 (`mailproxy::pop3`): command grammar, upstream response parsers and
//! the pre-auth state machine under a randomised driver.
//!
//! Input: `[cfg byte] [max_line byte] [seed byte] stream...`.
//!
//! Invariants: no panic; `find_line` / `find_multiline` lengths are in
//! bounds; the state machine keeps `buffered_len() <= max_buffer()`, writes
//! only whole CRLF lines, never emits `Login` before STARTTLS (STLS)
//! completed when configured, discards pipelined input on STLS, hands off
//! (`into_pending_input`) a suffix of what was fed, and is inert after
//! `Quit`/`Close`.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{check_crlf_lines, Rng};
use libfuzzer_sys::fuzz_target;
use mailproxy::pop3::command::parse_command;
use mailproxy::pop3::preauth::{Event, Pop3PreAuth, PreAuthConfig};
use mailproxy::preauth::PreAuth;
use mailproxy::pop3::response::{find_line, find_multiline, parse_response, sasl_mechanisms, Response};

const CODES: &[&str] = &["", "AUTH", "SYS/TEMP", "IN-USE", "a]b[c\r\n"];
const TEXTS: &[&str] = &["", "Invalid credentials", "bad\r\n+OK injected", "\u{85}x", "\0\x1b"];

fn out(p: &mut Pop3PreAuth) {
    if let Err(e) = check_crlf_lines(&p.take_output()) {
        panic!("{e}");
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (hdr, stream) = data.split_at(3);

    for line in stream.split_inclusive(|&b| b == b'\n') {
        let _ = parse_command(line);
        if let Ok(r) = parse_response(line) {
            let _ = r.oauth_error_challenge();
            if let Response::Status(st) = &r {
                // Client-safe text: no control characters (no CR/LF injection).
                assert!(!st.describe().chars().any(char::is_control));
            }
        }
    }
    let max = if hdr[1] & 0x80 != 0 { 8192 } else { usize::from(hdr[1]) + 4 };
    let mut buf = stream;
    while let Ok(Some(len)) = find_line(buf, max) {
        assert!(len > 0 && len <= buf.len() && len <= max + 2);
        assert_eq!(buf[len - 1], b'\n');
        let _ = parse_response(&buf[..len]);
        buf = &buf[len..];
    }
    if let Ok(Some((len, lines))) = find_multiline(stream, max) {
        assert!(len > 0 && len <= stream.len());
        let _ = sasl_mechanisms(&lines);
    }

    let cfg = PreAuthConfig {
        starttls: hdr[0] & 1 != 0,
        max_line: if hdr[0] & 0x80 != 0 { 8192 } else { 16 + usize::from(hdr[1]) },
    };
    let mut rng = Rng::new(hdr);
    let max_chunk = [1, 3, 16, 100, 8192][rng.below(5)];
    let mut p = Pop3PreAuth::new(cfg);
    out(&mut p);
    let mut tls_done = !cfg.starttls;
    let mut fed = Vec::new();
    let chunks = common::chunks(stream, &mut rng, max_chunk);
    let mut i = 0;
    'outer: while i < chunks.len() {
        if !p.wants_input() {
            break;
        }
        p.feed(chunks[i]);
        fed.extend_from_slice(chunks[i]);
        i += 1;
        assert!(p.buffered_len() <= p.max_buffer());
        out(&mut p);
        loop {
            let ev = p.poll();
            assert!(p.buffered_len() <= p.max_buffer());
            out(&mut p);
            match ev {
                None => break,
                Some(Event::Login { .. }) => {
                    assert!(tls_done, "Login before STLS completed");
                    assert!(p.poll().is_none());
                    assert!(p.take_output().is_empty(), "output while a login is outstanding");
                    if rng.chance(3) {
                        let pending = p.into_pending_input();
                        assert!(fed.ends_with(&pending), "pending input is not a suffix of the fed bytes");
                        return;
                    }
                    p.refuse_login(CODES[rng.below(CODES.len())], TEXTS[rng.below(TEXTS.len())]);
                    let o = p.take_output();
                    if let Err(e) = check_crlf_lines(&o) {
                        panic!("login_failed: {e}");
                    }
                    assert_eq!(o.iter().filter(|&&b| b == b'\n').count(), 1);
                }
                Some(Event::StartTls) => {
                    assert!(!tls_done, "STLS accepted twice / without TLS configured");
                    assert_eq!(p.buffered_len(), 0, "pipelined plaintext kept after STLS");
                    if rng.chance(2) && i < chunks.len() {
                        p.feed(chunks[i]);
                        i += 1;
                        assert_eq!(p.buffered_len(), 0, "bytes fed during the TLS handshake were kept");
                        assert!(p.poll().is_none());
                    }
                    p.starttls_done();
                    tls_done = true;
                    fed.clear();
                    out(&mut p);
                }
                Some(Event::Quit) | Some(Event::Close) => {
                    if i < chunks.len() {
                        p.feed(chunks[i]);
                    }
                    assert!(p.poll().is_none());
                    assert!(p.take_output().is_empty());
                    break 'outer;
                }
                Some(Event::Handoff) => panic!("POP3 hands off at the login, never later"),
            }
        }
    }
});

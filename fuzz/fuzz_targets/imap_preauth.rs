//! The `imap::preauth::PreAuth` state machine under a randomised driver.
//!
//! Input: `[config byte] [max_line byte] [max_literal byte] [seed byte] stream...`.
//! The stream is fed in random-sized chunks while `wants_input()`; the seed
//! drives the decisions a real driver makes: on `Login` either
//! `login_failed` (with hostile response codes / texts) or a successful
//! hand-off via `into_pending_input`; on `StartTls` the handshake completes
//! (`starttls_done`) now or only after more client bytes arrived (which must
//! be discarded).
//!
//! Invariants checked after every call:
//! * no panic; `buffered_len() <= max_buffer()`;
//! * every `take_output()` is whole CRLF lines (no bare CR/LF, no control
//!   characters), the first one being the `* OK [CAPABILITY ...]` greeting;
//! * while a `Login`/`StartTls` event is outstanding nothing is processed and
//!   nothing is written;
//! * with STARTTLS configured, no `Login` event before `starttls_done`;
//! * after `StartTls` nothing stays buffered;
//! * after a `Login` event, `into_pending_input()` is a suffix of the bytes
//!   fed (exactly what followed the login command, verbatim);
//! * after `Logout`/`Close` the machine is inert.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{check_crlf_lines, Rng};
use libfuzzer_sys::fuzz_target;
use mailproxy::imap::preauth::{Event, ImapPreAuth, PreAuthConfig, FEED_SLACK};
use mailproxy::preauth::PreAuth;

const CODES: &[&str] = &["", "AUTHENTICATIONFAILED", "UNAVAILABLE", "a]b[c", "X\r\n* OK", " \t", "ALERT\0"];
const TEXTS: &[&str] = &["", "Invalid credentials", "bad\r\n* OK injected", "\u{85}\u{2028}x", "   ", "\0\x1b[31m"];

fn out(p: &mut ImapPreAuth, first: &mut bool) {
    let o = p.take_output();
    if let Err(e) = check_crlf_lines(&o) {
        panic!("{e}");
    }
    if *first {
        assert!(o.starts_with(b"* OK [CAPABILITY IMAP4rev1 "), "greeting: {:?}", String::from_utf8_lossy(&o));
        *first = false;
    }
}

fn bounded(p: &ImapPreAuth) {
    assert!(p.buffered_len() <= p.max_buffer(), "{} > {}", p.buffered_len(), p.max_buffer());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (hdr, stream) = data.split_at(4);
    let cfg = if hdr[0] & 0x80 != 0 {
        PreAuthConfig { starttls: hdr[0] & 1 != 0, ..PreAuthConfig::default() }
    } else {
        PreAuthConfig {
            starttls: hdr[0] & 1 != 0,
            max_line: 8 + usize::from(hdr[1]),
            max_literal: usize::from(hdr[2]),
        }
    };
    let mut rng = Rng::new(hdr);
    let max_chunk = [1, 3, 16, 100, 8192][rng.below(5)].min(FEED_SLACK);

    let mut p = ImapPreAuth::new(cfg);
    let mut first = true;
    out(&mut p, &mut first);
    let mut tls_done = !cfg.starttls;
    // Everything accepted by `feed` since the last point where the machine
    // legitimately discarded its buffer (STARTTLS).
    let mut fed: Vec<u8> = Vec::new();

    let chunks = common::chunks(stream, &mut rng, max_chunk);
    let mut i = 0;
    'outer: while i < chunks.len() {
        if !p.wants_input() {
            // A conforming driver would not read now; the machine is either
            // waiting for us (handled below) or finished.
            break;
        }
        p.feed(chunks[i]);
        fed.extend_from_slice(chunks[i]);
        i += 1;
        bounded(&p);
        out(&mut p, &mut first);
        loop {
            let ev = p.poll();
            bounded(&p);
            out(&mut p, &mut first);
            match ev {
                None => break,
                Some(Event::Login { .. }) => {
                    assert!(tls_done, "Login event before STARTTLS completed");
                    let tag = p.login_tag().expect("a login is outstanding").to_string();
                    assert!(!tag.is_empty());
                    // Outstanding: nothing happens.
                    assert!(!p.wants_input());
                    assert!(p.poll().is_none());
                    assert!(p.take_output().is_empty(), "output while a login is outstanding");
                    if rng.chance(3) {
                        // Success: hand off.
                        let pending = p.into_pending_input();
                        assert!(fed.ends_with(&pending), "pending input is not a suffix of the fed bytes");
                        return;
                    }
                    let code = CODES[rng.below(CODES.len())];
                    let text = TEXTS[rng.below(TEXTS.len())];
                    // Usually the event's tag; sometimes a hostile one.
                    let t = if rng.chance(4) { "a\r\nb c" } else { tag.as_str() };
                    p.refuse_login(t, code, text);
                    bounded(&p);
                    let o = p.take_output();
                    if let Err(e) = check_crlf_lines(&o) {
                        panic!("login_failed output: {e}");
                    }
                    assert_eq!(o.iter().filter(|&&b| b == b'\n').count(), 1, "login_failed must write one line");
                }
                Some(Event::StartTls) => {
                    assert!(!tls_done, "STARTTLS accepted twice / without TLS configured");
                    assert_eq!(p.buffered_len(), 0, "pipelined plaintext kept after STARTTLS");
                    assert!(!p.wants_input());
                    // A racing client may already have sent more bytes: they
                    // must be dropped, not processed.
                    if rng.chance(2) && i < chunks.len() {
                        p.feed(chunks[i]);
                        i += 1;
                        assert_eq!(p.buffered_len(), 0, "bytes fed during the TLS handshake were kept");
                        assert!(p.poll().is_none());
                        assert!(p.take_output().is_empty());
                    }
                    p.starttls_done();
                    tls_done = true;
                    fed.clear();
                    assert_eq!(p.buffered_len(), 0);
                    out(&mut p, &mut first);
                }
                Some(Event::Quit) | Some(Event::Close) => {
                    assert_eq!(p.buffered_len(), 0, "input kept after the session ended");
                    assert!(!p.wants_input());
                    // Inert afterwards.
                    if i < chunks.len() {
                        p.feed(chunks[i]);
                    }
                    assert!(p.poll().is_none());
                    assert!(p.take_output().is_empty());
                    assert_eq!(p.buffered_len(), 0);
                    break 'outer;
                }
                Some(Event::Handoff) => panic!("IMAP hands off at the login, never later"),
            }
        }
    }
});

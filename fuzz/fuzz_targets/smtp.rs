//! SMTP (`mailproxy::smtp`): command grammar, upstream reply parser and the
//! pre-auth state machine under a randomised driver.
//!
//! Input: `[cfg byte] [max_line byte] [seed byte] stream...`.
//!
//! Invariants: no panic; `find_reply` lengths are in bounds and replies have
//! a 2xx-5xx code and at least one line; the state machine keeps
//! `buffered_len() <= max_buffer()`, writes only whole CRLF lines, never
//! emits `Login` before STARTTLS completed (when configured), discards
//! pipelined input on STARTTLS, hands off (`into_pending_input`) a suffix of
//! what was fed, and is inert after `Quit`/`Close`.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{check_crlf_lines, Rng};
use libfuzzer_sys::fuzz_target;
use mailproxy::smtp::command::{leading_verb, parse_command};
use mailproxy::smtp::preauth::{Event, PreAuthConfig, SmtpPreAuth};
use mailproxy::preauth::PreAuth;
use mailproxy::smtp::reply::{ehlo_keywords, find_reply};

const REPLIES: &[&str] = &["", "535 5.7.8 Username and Password not accepted", "454 4.7.0 Try again\r\n250 OK", "x\0y", "5", "599"];
const EHLO: &[&str] = &["SIZE 35882577", "8BITMIME", "AUTH LOGIN PLAIN XOAUTH2", "STARTTLS", "PIPELINING", "CHUNKING", "SMTPUTF8", "X\r\nINJ"];

fn out(p: &mut SmtpPreAuth) {
    if let Err(e) = check_crlf_lines(&p.take_output()) {
        panic!("{e}");
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (hdr, stream) = data.split_at(3);

    // Grammar and reply parsing on the raw stream.
    let _ = leading_verb(stream);
    for line in stream.split_inclusive(|&b| b == b'\n') {
        let _ = parse_command(line);
    }
    let max = if hdr[1] & 0x80 != 0 { 8192 } else { usize::from(hdr[1]) + 4 };
    let mut buf = stream;
    while let Ok(Some((len, r))) = find_reply(buf, max) {
        assert!(len > 0 && len <= buf.len() && len <= max);
        assert!((200..=599).contains(&r.code));
        assert!(!r.lines.is_empty());
        let _ = (r.text(), r.one_line(), r.enhanced_code(), r.oauth_error_challenge(), ehlo_keywords(&r));
        buf = &buf[len..];
    }

    // The state machine.
    let cfg = PreAuthConfig {
        starttls: hdr[0] & 1 != 0,
        hostname: "mailproxy.local".into(),
        max_line: if hdr[0] & 0x80 != 0 { 8192 } else { 16 + usize::from(hdr[1]) },
        max_size: if hdr[0] & 2 != 0 { Some(35_882_577) } else { None },
        submission: hdr[0] & 4 != 0,
    };
    let mut rng = Rng::new(hdr);
    let max_chunk = [1, 3, 16, 100, 8192][rng.below(5)];
    let mut p = SmtpPreAuth::new(cfg.clone());
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
                    assert!(tls_done, "Login before STARTTLS completed");
                    assert!(p.poll().is_none());
                    assert!(p.take_output().is_empty(), "output while a login is outstanding");
                    if rng.chance(2) {
                        p.refuse_login(REPLIES[rng.below(REPLIES.len())]);
                        let o = p.take_output();
                        if let Err(e) = check_crlf_lines(&o) {
                            panic!("login_failed: {e}");
                        }
                        assert_eq!(o.iter().filter(|&&b| b == b'\n').count(), 1);
                    } else {
                        let kw: Vec<String> = EHLO.iter().filter(|_| rng.chance(2)).map(|s| s.to_string()).collect();
                        p.authenticated(&kw);
                        out(&mut p);
                    }
                }
                Some(Event::Handoff) => {
                    let pending = p.into_pending_input();
                    assert!(fed.ends_with(&pending), "pending input is not a suffix of the fed bytes");
                    return;
                }
                Some(Event::StartTls) => {
                    assert!(!tls_done, "STARTTLS accepted twice / without TLS configured");
                    assert_eq!(p.buffered_len(), 0, "pipelined plaintext kept after STARTTLS");
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
            }
        }
    }
});

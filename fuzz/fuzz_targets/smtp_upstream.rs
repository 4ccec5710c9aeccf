//! What an SMTP server sends before login, read the way the proxy reads it:
//! replies framed by `smtp::reply::find_reply` over chunked input, then
//! what the proxy asks of each (`one_line` for the client and the log, the
//! EHLO keywords and AUTH mechanisms, the enhanced status code, the
//! XOAUTH2/OAUTHBEARER failure challenge of a `334`, the AUTH LOGIN prompt).
//!
//! Input: `[max byte] [seed byte] stream...`. `max` stands in for the
//! proxy's response bound (`upstream::conn::MAX_RESPONSE`, 64 KiB).
//!
//! Invariants:
//! * no panic;
//! * framing does not depend on how the bytes arrived, replies are within
//!   `max`, and waiting for more holds at most `max` bytes;
//! * a reply has a 2xx-5xx code and at least one line, none with a LF;
//! * `one_line` starts with the code and has no control character (it is
//!   put into replies to the client);
//! * an enhanced code is `class.subject.detail` and starts the first line;
//! * EHLO keywords are trimmed and non-empty; `has_keyword` finds each one;
//!   every advertised AUTH mechanism is found by `has_auth_mechanism`, and
//!   only when AUTH is advertised;
//! * only a `334` carries a failure challenge, explained in one line.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{check_challenge, read_frames, Upstream};
use libfuzzer_sys::fuzz_target;
use mailproxy::sasl::decode_login_prompt;
use mailproxy::smtp::reply::{ehlo_keywords, find_reply, has_auth_mechanism, has_keyword, keyword_params, Reply};

const MECHS: &[&str] = &["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "xoauth2", ""];

fn check_enhanced(r: &Reply) {
    let Some(e) = r.enhanced_code() else {
        return;
    };
    let parts: Vec<&str> = e.split('.').collect();
    assert_eq!(parts.len(), 3, "enhanced code {e:?}");
    assert!(matches!(parts[0], "2" | "4" | "5"), "enhanced code {e:?}");
    for p in &parts[1..] {
        assert!(
            (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()),
            "enhanced code {e:?}"
        );
    }
    assert!(r.lines[0].starts_with(e));
    assert!(r.one_line().contains(e));
}

fn check_keywords(r: &Reply) {
    let kws = ehlo_keywords(r);
    for k in &kws {
        assert!(!k.is_empty() && k.trim() == k, "keyword {k:?}");
        assert!(!k.contains('\n'));
        let name = k.split([' ', '=']).next().unwrap_or("");
        if !name.is_empty() {
            assert!(
                has_keyword(&kws, name) && has_keyword(&kws, &name.to_ascii_lowercase()),
                "{name:?} in {kws:?}"
            );
        }
    }
    match keyword_params(&kws, "AUTH") {
        Some(mechs) => {
            for m in &mechs {
                assert!(!m.is_empty() && !m.chars().any(char::is_whitespace), "mechanism {m:?}");
                assert!(has_auth_mechanism(&kws, m) && has_auth_mechanism(&kws, &m.to_ascii_lowercase()));
            }
        }
        None => {
            for m in MECHS {
                assert!(!has_auth_mechanism(&kws, m), "{m} without AUTH in {kws:?}");
            }
        }
    }
}

fn check_reply(bytes: &[u8], r: &Reply) {
    assert!((200..=599).contains(&r.code));
    assert!(!r.lines.is_empty());
    assert!(bytes.starts_with(r.code.to_string().as_bytes()));
    for l in &r.lines {
        assert!(!l.contains('\n'), "line {l:?}");
    }
    let one = r.one_line();
    assert!(one.starts_with(&r.code.to_string()));
    assert!(!one.chars().any(char::is_control), "one_line {one:?}");
    assert!(!r.text().contains('\n'));
    check_enhanced(r);
    check_keywords(r);
    match r.oauth_error_challenge() {
        Some(c) => {
            assert_eq!(r.code, 334);
            check_challenge(&c);
        }
        None => {}
    }
    if r.is_intermediate() {
        let _ = decode_login_prompt(r.lines.concat().trim().as_bytes());
    }
    let kinds = [r.is_positive(), r.is_intermediate(), r.is_transient(), r.is_permanent()];
    assert_eq!(kinds.iter().filter(|k| **k).count(), 1);
}

fuzz_target!(|data: &[u8]| {
    let Some(Upstream { stream, max, chunks, .. }) = Upstream::parse(data, 8) else {
        return;
    };
    read_frames(
        stream,
        &chunks,
        max,
        |b| find_reply(b, max),
        |bytes, r| {
            assert!(bytes.len() <= max);
            assert!(bytes.ends_with(b"\n"));
            check_reply(bytes, &r);
            true
        },
    );
});

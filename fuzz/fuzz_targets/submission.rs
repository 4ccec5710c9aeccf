//! The submission server of Graph accounts (`mailproxy::smtp::submission`)
//! under a randomised driver, and the recipient fields rewritten to the
//! envelope (`mailproxy::smtp::recipients`).
//!
//! Input: `[cfg byte] [seed byte] stream...`.
//!
//! Invariants: no panic; the machine writes only whole CRLF lines; a
//! `Send` carries the one allowed sender, 1 to `MAX_RECIPIENTS` recipients and the size
//! of the bytes it gave out as `Body` since the transaction began; the
//! body handed out never passes the configured `SIZE`; nothing comes after
//! `Quit`/`Close`. Rewriting a message's recipient fields keeps its body
//! byte for byte.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{check_crlf_lines, Rng};
use libfuzzer_sys::fuzz_target;
use mailproxy::smtp::recipients;
use mailproxy::smtp::submission::{Event, Submission, SubmissionConfig, MAX_RECIPIENTS};

const REPLIES: &[&str] = &["250 2.0.0 sent", "451 4.7.0 try again in 30 s", "550 5.1.1 no such user"];

fn out(s: &mut Submission) {
    if let Err(e) = check_crlf_lines(&s.take_output()) {
        panic!("{e}");
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (hdr, stream) = data.split_at(2);
    let max_size = if hdr[0] & 1 != 0 { 64 } else { 35 * 1024 * 1024 };
    let cfg = SubmissionConfig {
        hostname: "mailproxy.local".into(),
        max_size,
        max_line: if hdr[0] & 2 != 0 { 64 } else { 8192 },
        senders: vec!["me@example.org".into()],
    };
    let mut rng = Rng::new(hdr);
    let max_chunk = [1, 3, 16, 100, 8192][rng.below(5)];
    let chunks = common::chunks(stream, &mut rng, max_chunk);
    let split = rng.below(chunks.len() + 1);
    let pending: Vec<u8> = chunks[..split].concat();
    let mut s = Submission::new(cfg, &pending);
    let mut body = Vec::new();
    let mut ended = false;
    let mut i = split;
    loop {
        out(&mut s);
        match s.poll() {
            Some(ev) => {
                assert!(!ended, "an event after Quit/Close: {ev:?}");
                match ev {
                    Event::Body(b) => {
                        body.extend_from_slice(&b);
                        assert!(body.len() as u64 <= max_size, "more body than SIZE allows");
                    }
                    Event::Send(env) => {
                        assert!(env.from.eq_ignore_ascii_case("me@example.org"), "{env:?}");
                        assert!(!env.rcpt.is_empty() && env.rcpt.len() <= MAX_RECIPIENTS, "{env:?}");
                        assert_eq!(env.size, body.len() as u64, "the envelope's size is the body's");
                        let rewritten = recipients::rewrite(&body, &env.rcpt);
                        let _ = recipients::header_recipients(&rewritten);
                        s.finished(REPLIES[rng.below(REPLIES.len())]);
                        body.clear();
                    }
                    Event::Discard => body.clear(),
                    Event::Quit | Event::Close => ended = true,
                }
            }
            None => {
                if ended || !s.wants_input() || i >= chunks.len() {
                    break;
                }
                s.feed(chunks[i]);
                i += 1;
            }
        }
    }

    // The rewriter on any message: the body after the header stays as it was.
    let env: Vec<String> = ["a@example.com", "B@Example.com", "bcc@example.net"]
        .iter()
        .take(rng.below(4))
        .map(|s| s.to_string())
        .collect();
    let rewritten = recipients::rewrite(stream, &env);
    if let Some(at) = find(stream, b"\r\n\r\n").map(|i| i + 4) {
        assert!(rewritten.ends_with(&stream[at..]), "the body changed");
    }
});

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

//! `imap::framing::Framer` driven incrementally.
//!
//! Input: `[limits byte] [split seed byte] stream...`. The stream is fed in
//! random-sized chunks (the framer's contract: the buffer starts at the
//! current command and only grows until `Complete`/`RejectLiteral`, then the
//! caller drops the reported prefix).
//!
//! Invariants:
//! * never panics;
//! * the event sequence does not depend on how the input was chunked
//!   (compared with feeding everything at once). Only the *reason* of a
//!   `Fatal` may differ: before the LF arrives the framer can only count, so
//!   a long last line of a long command is `CommandTooLong` when chunked but
//!   `LineTooLong` when whole. Both close the connection; not compared.
//! * `Complete { len }` / `RejectLiteral { len }`: `0 < len <= buffered`, the
//!   frame ends with LF and respects `max_command` (+ line terminator);
//! * a completed frame re-scanned by a fresh framer is the same single frame;
//! * `Fatal` is sticky.
#![no_main]

#[path = "common.rs"]
mod common;

use common::Rng;
use libfuzzer_sys::fuzz_target;
use mailproxy::imap::framing::{literal_header, Frame, Framer, Limits};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Complete(Vec<u8>),
    Cont(usize),
    Reject(Vec<u8>, Option<u64>),
    Fatal(String),
}

fn run(limits: Limits, chunks: &[&[u8]]) -> Vec<Ev> {
    let mut f = Framer::new(limits);
    let mut buf: Vec<u8> = Vec::new();
    let mut evs = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match f.scan(&buf) {
                Frame::Incomplete => break,
                Frame::NeedContinuation { size } => {
                    assert!(size <= limits.max_literal);
                    evs.push(Ev::Cont(size));
                }
                Frame::Complete { len } => {
                    assert!(len > 0 && len <= buf.len(), "len {len} buffered {}", buf.len());
                    assert_eq!(buf[len - 1], b'\n');
                    assert!(len <= limits.max_command.saturating_add(2), "frame {len} > max_command {}", limits.max_command);
                    let frame: Vec<u8> = buf.drain(..len).collect();
                    evs.push(Ev::Complete(frame));
                }
                Frame::RejectLiteral { len, size } => {
                    assert!(len > 0 && len <= buf.len());
                    assert_eq!(buf[len - 1], b'\n');
                    let frame: Vec<u8> = buf.drain(..len).collect();
                    let line = mailproxy::text::strip_eol(&frame);
                    let hdr = literal_header(line).expect("RejectLiteral without a literal header");
                    assert!(!hdr.non_sync, "non-sync literal must be fatal, not rejected");
                    assert_eq!(hdr.size, size);
                    evs.push(Ev::Reject(frame, size));
                }
                Frame::Fatal(e) => {
                    // Sticky.
                    assert_eq!(f.scan(&buf), Frame::Fatal(e));
                    evs.push(Ev::Fatal(e.to_string()));
                    return evs;
                }
            }
        }
    }
    evs
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (hdr, stream) = data.split_at(2);
    let limits = match hdr[0] & 0x80 {
        0 => Limits::new(usize::from(hdr[0] & 0x7f) + 1, usize::from(hdr[0] & 0x0f) * 4),
        _ => Limits::default(),
    };
    let mut rng = Rng::new(hdr);
    let max_chunk = [1, 2, 3, 7, 16, 64, 4096][rng.below(7)];
    let split = common::chunks(stream, &mut rng, max_chunk);
    let chunked = run(limits, &split);
    let whole = run(limits, &[stream]);
    let norm = |v: Vec<Ev>| -> Vec<Ev> {
        v.into_iter().map(|e| if let Ev::Fatal(_) = e { Ev::Fatal("fatal".into()) } else { e }).collect()
    };
    let whole_n = norm(whole.clone());
    assert_eq!(norm(chunked), whole_n, "chunking changed the framing (max chunk {max_chunk})");

    // A completed frame stands alone: a fresh framer finds exactly it.
    for ev in &whole {
        if let Ev::Complete(frame) = ev {
            let again = run(limits, &[frame]);
            let completes: Vec<_> = again.iter().filter(|e| !matches!(e, Ev::Cont(_))).collect();
            assert_eq!(completes, vec![&Ev::Complete(frame.clone())]);
        }
    }
});

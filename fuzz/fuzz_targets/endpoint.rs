//! `Endpoint::parse` on arbitrary text, for each protocol.
//!
//! Invariants: no panic; a parsed endpoint has a non-empty host without
//! `/`, `@`, `?`, a non-zero port; and its `Display` form parses back to the
//! same endpoint (config errors and logs print endpoints with `Display`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::endpoint::{is_loopback_host, Endpoint, Protocol};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let protocol = [Protocol::Imap, Protocol::Smtp, Protocol::Pop3][usize::from(sel % 3)];
    let text = String::from_utf8_lossy(rest);
    let _ = is_loopback_host(&text);
    if let Ok(e) = Endpoint::parse(&text, protocol) {
        assert_eq!(e.protocol, protocol);
        assert!(!e.host.is_empty());
        assert!(!e.host.contains(['/', '@', '?']), "{e:?}");
        assert_ne!(e.port, 0);
        let shown = e.to_string();
        match Endpoint::parse(&shown, protocol) {
            Ok(again) => assert_eq!(again, e, "Display form {shown:?} parses differently"),
            Err(m) => panic!("Display form {shown:?} of {text:?} does not parse: {m}"),
        }
        let _ = e.is_loopback();
    }
});

//! The PROXY protocol v2 header a balancer sends first, as the server reads
//! it: the 16-byte prefix through `header_len`, then the whole header
//! through `parse`.
//!
//! Invariants: no panic; `header_len` never promises more than
//! `MAX_HEADER`; `parse` of a buffer shorter than what `header_len` asks
//! for is an error, never a header; a proxied TCP4/TCP6 header's source
//! address has the family its header says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::proxy_header::{header_len, parse, Header, MAX_HEADER, PREFIX_LEN, SIGNATURE};

fuzz_target!(|data: &[u8]| {
    // Half the inputs get the signature, so the fuzzer reaches the fields.
    let mut buf = Vec::with_capacity(data.len() + SIGNATURE.len());
    if data.first().is_some_and(|b| b & 1 == 0) {
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&data[1..]);
    } else {
        buf.extend_from_slice(data);
    }
    let _ = parse(&buf);
    let Some(prefix) = buf.get(..PREFIX_LEN).and_then(|p| <&[u8; PREFIX_LEN]>::try_from(p).ok()) else {
        return;
    };
    let Ok(len) = header_len(prefix) else {
        assert!(parse(&buf).is_err());
        return;
    };
    assert!((PREFIX_LEN..=MAX_HEADER).contains(&len));
    if buf.len() < len {
        assert!(parse(&buf).is_err(), "a header from fewer bytes than it announces");
        return;
    }
    if let Ok(Header::Proxied { source, destination }) = parse(&buf[..len]) {
        let v6 = buf[13] >> 4 == 2;
        assert_eq!(source.is_ipv6(), v6);
        assert_eq!(destination.is_ipv6(), v6);
    }
});

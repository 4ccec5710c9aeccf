//! SASL helpers in `mailproxy::sasl`.
//!
//! Input: `[selector byte] payload...`. Every decoder runs on the payload
//! (as base64 text); the encoders run on the payload split into fields.
//!
//! Invariants:
//! * no panic;
//! * `decode_plain` success yields a non-empty user and password without NUL,
//!   and re-encoding them (`encode_plain`) decodes to the same pair;
//!   its errors never contain the decoded secret;
//! * `decode_login_step` success re-encodes/decodes to the same value;
//! * `decode_error_challenge(..).explain()` / `Display` never panic and the
//!   result is one line;
//! * encoders produce standard base64 that decodes to the documented layout,
//!   and `decode_plain(encode_plain("", u, p)) == (u, p)` for valid u, p.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use mailproxy::sasl::{
    decode_base64_secret, decode_error_challenge, decode_login_prompt, decode_login_step, decode_plain, encode_login_step,
    encode_plain, oauthbearer, xoauth2, SaslError,
};

/// RFC 5801 saslname decoding: `=2C` -> `,`, `=3D` -> `=`, any other `=` or
/// a raw `,` is invalid.
fn unescape_saslname(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'=' => {
                match b.get(i + 1..i + 3)? {
                    b"2C" => out.push(b','),
                    b"3D" => out.push(b'='),
                    _ => return None,
                }
                i += 3;
            }
            b',' => return None,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, payload)) = data.split_first() else {
        return;
    };

    // ---- decoders on the payload as received from the wire
    match decode_plain(payload) {
        Ok((u, p)) => {
            assert!(!u.is_empty() && !p.is_empty());
            assert!(!u.contains('\0') && !p.contains('\0'));
            let again = decode_plain(encode_plain("", &u, &p).as_bytes()).expect("re-encoded PLAIN must decode");
            assert_eq!((again.0.as_str(), again.1.as_str()), (u.as_str(), p.as_str()));
            let again = decode_plain(encode_plain(&u, &u, &p).as_bytes()).expect("authzid == authcid must decode");
            assert_eq!((again.0.as_str(), again.1.as_str()), (u.as_str(), p.as_str()));
        }
        Err(e) => {
            let msg = format!("{e} {e:?}");
            if let Ok(raw) = decode_base64_secret(payload) {
                // No secret part (>= 6 bytes, to avoid chance matches with
                // the fixed message text) may appear in the error.
                for part in raw.split(|&b| b == 0) {
                    if part.len() >= 6 {
                        if let Ok(s) = std::str::from_utf8(part) {
                            assert!(!msg.contains(s), "SASL error leaks input: {msg}");
                        }
                    }
                }
            }
            if e == SaslError::Empty {
                assert!(payload.iter().all(u8::is_ascii_whitespace));
            }
        }
    }
    if let Ok(s) = decode_login_step(payload) {
        assert!(!s.is_empty());
        let again = decode_login_step(encode_login_step(&s).as_bytes()).expect("re-encoded step must decode");
        assert_eq!(again.as_str(), s.as_str());
    }
    if let Some(c) = decode_error_challenge(payload) {
        let e = c.explain();
        assert!(!e.is_empty());
        assert_eq!(e, c.to_string());
        // The status is quoted with {:?}; only a raw scope could add a line break.
        assert!(!e.contains('\n') || c.scope.as_deref().unwrap_or("").contains('\n'));
    }
    let _ = decode_login_prompt(payload);

    // ---- encoders on fields taken from the payload
    let text = String::from_utf8_lossy(payload);
    let mut fields = text.splitn(4, '\u{1}');
    let u = fields.next().unwrap_or("");
    let p = fields.next().unwrap_or("");
    let host = fields.next().unwrap_or("");
    let port = u16::from(sel) * 257;

    let enc = encode_plain("", u, p);
    let raw = STANDARD.decode(enc.as_bytes()).expect("encode_plain is standard base64");
    assert_eq!(raw, [b"\0", u.as_bytes(), b"\0", p.as_bytes()].concat());
    match decode_plain(enc.as_bytes()) {
        Ok((du, dp)) => assert_eq!((du.as_str(), dp.as_str()), (u, p)),
        Err(_) => assert!(u.is_empty() || p.is_empty() || u.contains('\0') || p.contains('\0')),
    }

    let x = xoauth2(u, p);
    let raw = STANDARD.decode(x.as_bytes()).expect("xoauth2 is standard base64");
    assert_eq!(raw, [b"user=", u.as_bytes(), b"\x01auth=Bearer ", p.as_bytes(), b"\x01\x01"].concat());

    let o = oauthbearer(u, p, host, port);
    let raw = STANDARD.decode(o.as_bytes()).expect("oauthbearer is standard base64");
    assert!(raw.starts_with(b"n,a="));
    assert!(raw.ends_with(b"\x01\x01"));
    // The GS2 header's saslname must not contain a raw ',' or '=' other
    // than the escapes.
    let gs2_end = 4 + raw[4..].iter().position(|&b| b == b',').expect("gs2 header ends with ','");
    let name = &raw[4..gs2_end];
    assert_eq!(unescape_saslname(name).as_deref(), Some(u.as_bytes()), "saslname escaping is not reversible");

    let s = encode_login_step(u);
    assert_eq!(STANDARD.decode(s.as_bytes()).unwrap(), u.as_bytes());
});

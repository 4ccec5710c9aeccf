//! `sasl::decode_error_challenge`, the decoder of the base64 JSON an IMAP,
//! SMTP or POP3 server sends when an XOAUTH2/OAUTHBEARER login fails, fed
//! with JSON the fuzzer writes directly (random base64 rarely decodes to
//! JSON, so the `sasl` target seldom gets this far).
//!
//! Input: `[selector byte] json...`. The JSON is base64-encoded as the
//! selector says: padded or not, surrounded by whitespace or a CRLF, in the
//! URL-safe alphabet.
//!
//! Invariants:
//! * no panic;
//! * the result agrees with a plain `serde_json` reading: `Some` exactly for
//!   an object whose `status` is a string or a number, with `status`,
//!   `schemes` and `scope` taken the same way;
//! * padding and surrounding whitespace do not change the result; an
//!   encoding with `-` or `_` (not the standard alphabet) is refused;
//! * the explanation is one non-empty line unless the scope brings a
//!   control character (`common::check_challenge`).
#![no_main]

#[path = "common.rs"]
mod common;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use mailproxy::sasl::{decode_error_challenge, OAuthChallenge};
use serde_json::Value;

fn expected(json: &[u8]) -> Option<OAuthChallenge> {
    let v: Value = serde_json::from_slice(json).ok()?;
    let obj = v.as_object()?;
    let text = |k: &str| match obj.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    Some(OAuthChallenge {
        status: text("status")?,
        schemes: text("schemes"),
        scope: text("scope"),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, json)) = data.split_first() else {
        return;
    };
    let padded = STANDARD.encode(json);
    let got = decode_error_challenge(padded.as_bytes());
    assert_eq!(
        got,
        expected(json),
        "disagrees with serde_json on {:?}",
        String::from_utf8_lossy(json)
    );
    if let Some(c) = &got {
        common::check_challenge(c);
    }

    let variant = match sel % 4 {
        0 => STANDARD_NO_PAD.encode(json),
        1 => format!(" {padded}\r\n"),
        2 => format!("\t{}  ", STANDARD_NO_PAD.encode(json)),
        _ => format!("{padded}\n"),
    };
    assert_eq!(
        decode_error_challenge(variant.as_bytes()),
        got,
        "encoding variant {}",
        sel % 4
    );

    let url = URL_SAFE_NO_PAD.encode(json);
    if url.contains(['-', '_']) {
        assert_eq!(decode_error_challenge(url.as_bytes()), None, "URL-safe base64 accepted");
    }
});

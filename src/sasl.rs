//! SASL message helpers (pure, no I/O).
//!
//! * `PLAIN` (RFC 4616): decoding what a local client sends us, encoding for a
//!   passthrough upstream.
//! * `XOAUTH2` (Google/Microsoft) and `OAUTHBEARER` (RFC 7628) initial responses
//!   for the upstream side, and decoding of their JSON failure challenge.
//! * SMTP `AUTH LOGIN` steps (base64 username / password).
//!
//! Secrets are returned as [`Zeroizing`] values and never appear in `Debug`,
//! `Display` or error messages.

// A protocol toolkit: not every helper is used by every build of the binary.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::Deserialize;
use zeroize::Zeroizing;

/// Lenient decoder: accepts base64 with or without `=` padding (some clients
/// omit it), but nothing else non-standard.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Why a SASL message could not be decoded. Never contains secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("empty SASL response")]
    Empty,
    #[error("invalid base64 in SASL response")]
    InvalidBase64,
    #[error("malformed SASL PLAIN message: {0}")]
    Malformed(&'static str),
    #[error("SASL response is not valid UTF-8")]
    NotUtf8,
    #[error("authorization identity must be empty or equal to the authentication identity")]
    AuthzidMismatch,
}

/// Strip surrounding ASCII whitespace (a trailing CR/LF left by a caller, say).
fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |p| p + 1);
    &b[start..end.max(start)]
}

/// Decode base64 into a zeroizing buffer.
pub fn decode_base64_secret(b64: &[u8]) -> Result<Zeroizing<Vec<u8>>, SaslError> {
    let b64 = trim_ascii(b64);
    let mut out = Zeroizing::new(Vec::with_capacity(b64.len() / 4 * 3 + 3));
    LENIENT
        .decode_vec(b64, &mut out)
        .map_err(|_| SaslError::InvalidBase64)?;
    Ok(out)
}

fn secret_utf8(bytes: &[u8]) -> Result<Zeroizing<String>, SaslError> {
    let s = std::str::from_utf8(bytes).map_err(|_| SaslError::NotUtf8)?;
    Ok(Zeroizing::new(s.to_owned()))
}

/// Decode a base64 SASL `PLAIN` response (`authzid NUL authcid NUL passwd`).
///
/// Returns `(authcid, password)`. The authzid must be empty or equal to the
/// authcid (we do not support proxy authorization), otherwise
/// [`SaslError::AuthzidMismatch`] (answer `NO`). All other errors mean a
/// malformed message (answer `BAD`).
pub fn decode_plain(b64: &[u8]) -> Result<(Zeroizing<String>, Zeroizing<String>), SaslError> {
    if trim_ascii(b64).is_empty() {
        return Err(SaslError::Empty);
    }
    let raw = decode_base64_secret(b64)?;
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed("expected authzid NUL authcid NUL password"));
    };
    if parts.next().is_some() {
        return Err(SaslError::Malformed("too many NUL separators"));
    }
    if authcid.is_empty() {
        return Err(SaslError::Malformed("empty username"));
    }
    if passwd.is_empty() {
        return Err(SaslError::Malformed("empty password"));
    }
    let authcid = secret_utf8(authcid)?;
    let password = secret_utf8(passwd)?;
    if !authzid.is_empty() && authzid != authcid.as_bytes() {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok((authcid, password))
}

/// Encode a SASL `PLAIN` response (base64 of `authzid NUL authcid NUL passwd`).
pub fn encode_plain(authzid: &str, authcid: &str, password: &str) -> Zeroizing<String> {
    let mut raw = Zeroizing::new(Vec::with_capacity(authzid.len() + authcid.len() + password.len() + 2));
    raw.extend_from_slice(authzid.as_bytes());
    raw.push(0);
    raw.extend_from_slice(authcid.as_bytes());
    raw.push(0);
    raw.extend_from_slice(password.as_bytes());
    Zeroizing::new(STANDARD.encode(&*raw))
}

/// `XOAUTH2` initial response: base64 of `user=U\x01auth=Bearer T\x01\x01`.
pub fn xoauth2(user: &str, token: &str) -> Zeroizing<String> {
    let mut raw = Zeroizing::new(Vec::with_capacity(user.len() + token.len() + 24));
    raw.extend_from_slice(b"user=");
    raw.extend_from_slice(user.as_bytes());
    raw.extend_from_slice(b"\x01auth=Bearer ");
    raw.extend_from_slice(token.as_bytes());
    raw.extend_from_slice(b"\x01\x01");
    Zeroizing::new(STANDARD.encode(&*raw))
}

/// Escape a GS2 saslname (RFC 5801): `,` → `=2C`, `=` → `=3D`.
fn gs2_saslname(user: &str) -> String {
    let mut s = String::with_capacity(user.len());
    for c in user.chars() {
        match c {
            ',' => s.push_str("=2C"),
            '=' => s.push_str("=3D"),
            c => s.push(c),
        }
    }
    s
}

/// `OAUTHBEARER` (RFC 7628) initial response:
/// base64 of `n,a=U,\x01host=H\x01port=P\x01auth=Bearer T\x01\x01`.
pub fn oauthbearer(user: &str, token: &str, host: &str, port: u16) -> Zeroizing<String> {
    let mut raw = Zeroizing::new(Vec::with_capacity(user.len() + token.len() + host.len() + 48));
    raw.extend_from_slice(b"n,a=");
    raw.extend_from_slice(gs2_saslname(user).as_bytes());
    raw.extend_from_slice(b",\x01host=");
    raw.extend_from_slice(host.as_bytes());
    raw.extend_from_slice(b"\x01port=");
    raw.extend_from_slice(port.to_string().as_bytes());
    raw.extend_from_slice(b"\x01auth=Bearer ");
    raw.extend_from_slice(token.as_bytes());
    raw.extend_from_slice(b"\x01\x01");
    Zeroizing::new(STANDARD.encode(&*raw))
}

/// What the client must send after receiving an `OAUTHBEARER` error
/// challenge (RFC 7628 §3.2.3: a single `%x01`, base64 `AQ==`); the server
/// then completes with a tagged `NO`.
pub const OAUTHBEARER_ERROR_ACK: &str = "AQ==";

/// What the client must send after receiving an `XOAUTH2` error challenge:
/// an empty response (i.e. just CRLF); the server then completes with `NO`.
pub const XOAUTH2_ERROR_ACK: &str = "";

/// The JSON error challenge sent by the server (`+ base64(JSON)`) when an
/// `XOAUTH2`/`OAUTHBEARER` authentication fails.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OAuthChallenge {
    /// HTTP-like code (`"400"`, `"401"` from Gmail) or an RFC 6750 error
    /// (`"invalid_token"`, `"insufficient_scope"`, …).
    pub status: String,
    #[serde(default)]
    pub schemes: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

/// Decode a `+ base64(JSON)` failure challenge. `None` if it is not base64
/// JSON with a `status` field (the status may be a JSON string or number).
pub fn decode_error_challenge(b64: &[u8]) -> Option<OAuthChallenge> {
    let raw = LENIENT.decode(trim_ascii(b64)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let obj = v.as_object()?;
    let as_text = |key: &str| -> Option<String> {
        match obj.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    Some(OAuthChallenge {
        status: as_text("status")?,
        schemes: as_text("schemes"),
        scope: as_text("scope"),
    })
}

/// Where a challenge's sentence names the account: the protocol clients
/// decode challenges without knowing the account, and the login policy,
/// which does, fills it in with [`for_account`].
pub const ACCOUNT: &str = "ACCOUNT";

/// `text` with the [`ACCOUNT`] placeholder replaced by the account's name.
pub fn for_account(text: &str, account: &str) -> String {
    text.replace("`mailproxy login ACCOUNT`", &format!("`mailproxy login {account}`"))
}

impl OAuthChallenge {
    /// A sentence a person can act on, on one line: the server's own words
    /// in it (scope, status) can break neither a log line nor a reply.
    pub fn explain(&self) -> String {
        let relogin = "run `mailproxy login ACCOUNT` if this persists";
        let scope = self
            .scope
            .as_deref()
            .map(|s| crate::text::one_line(s).chars().take(200).collect::<String>())
            .filter(|s| !s.trim().is_empty())
            .map(|s| format!(" (required scope: {s})"))
            .unwrap_or_default();
        let status = crate::text::one_line(self.status.trim());
        match status.as_str() {
            "401" | "invalid_token" => format!("the server rejected the access token (expired or revoked); {relogin}"),
            "400" => format!(
                "the server rejected the OAuth login (status 400: usually an expired or revoked \
                 token, a token issued for a different account than the username, or IMAP/SMTP \
                 access disabled for the account){scope}; check the account settings and {relogin}"
            ),
            "403" | "insufficient_scope" => format!(
                "the token lacks the scope the server requires{scope}; run `mailproxy login ACCOUNT` \
                 to grant it"
            ),
            "invalid_request" => format!(
                "the server says the OAuth request was malformed (invalid_request); check the \
                 configured username{scope}"
            ),
            other => format!(
                "the server rejected the OAuth login (status {:?}){scope}; {relogin}",
                other.chars().take(40).collect::<String>()
            ),
        }
    }
}

impl std::fmt::Display for OAuthChallenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.explain())
    }
}

// ---------------------------------------------------------------- SMTP AUTH LOGIN

/// What an SMTP server's `334 base64` prompt asks for during `AUTH LOGIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginPrompt {
    Username,
    Password,
}

/// Decode a `334` `AUTH LOGIN` prompt (`VXNlcm5hbWU6` = "Username:",
/// `UGFzc3dvcmQ6` = "Password:"). Case-insensitive, lenient about the colon.
pub fn decode_login_prompt(b64: &[u8]) -> Option<LoginPrompt> {
    let raw = LENIENT.decode(trim_ascii(b64)).ok()?;
    let s = std::str::from_utf8(&raw).ok()?.trim().trim_end_matches(':');
    if s.eq_ignore_ascii_case("username") || s.eq_ignore_ascii_case("user name") {
        Some(LoginPrompt::Username)
    } else if s.eq_ignore_ascii_case("password") {
        Some(LoginPrompt::Password)
    } else {
        None
    }
}

/// The server's `AUTH LOGIN` username prompt (base64 of `Username:`).
pub const LOGIN_PROMPT_USERNAME: &str = "VXNlcm5hbWU6";
/// The server's `AUTH LOGIN` password prompt (base64 of `Password:`).
pub const LOGIN_PROMPT_PASSWORD: &str = "UGFzc3dvcmQ6";

/// Base64-encode one `AUTH LOGIN` step (username or password).
pub fn encode_login_step(value: &str) -> Zeroizing<String> {
    Zeroizing::new(STANDARD.encode(value.as_bytes()))
}

/// Decode one `AUTH LOGIN` step the client sent (username or password).
pub fn decode_login_step(b64: &[u8]) -> Result<Zeroizing<String>, SaslError> {
    let raw = decode_base64_secret(b64)?;
    if raw.is_empty() {
        return Err(SaslError::Empty);
    }
    secret_utf8(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn plain_roundtrip() {
        let enc = encode_plain("", "alice", "s3cret");
        assert_eq!(&*enc, &b64(b"\0alice\0s3cret"));
        let (u, p) = decode_plain(enc.as_bytes()).unwrap();
        assert_eq!(&*u, "alice");
        assert_eq!(&*p, "s3cret");
    }

    #[test]
    fn plain_authzid_rules() {
        let (u, p) = decode_plain(b64(b"bob\0bob\0pw").as_bytes()).unwrap();
        assert_eq!((&*u as &str, &*p as &str), ("bob", "pw"));
        assert_eq!(
            decode_plain(b64(b"admin\0bob\0pw").as_bytes()),
            Err(SaslError::AuthzidMismatch)
        );
    }

    #[test]
    fn plain_errors() {
        assert_eq!(decode_plain(b""), Err(SaslError::Empty));
        assert_eq!(decode_plain(b"!!!"), Err(SaslError::InvalidBase64));
        assert!(matches!(
            decode_plain(b64(b"alice\0pw").as_bytes()),
            Err(SaslError::Malformed(_))
        ));
        assert!(matches!(
            decode_plain(b64(b"\0alice\0pw\0x").as_bytes()),
            Err(SaslError::Malformed(_))
        ));
        assert!(matches!(
            decode_plain(b64(b"\0\0pw").as_bytes()),
            Err(SaslError::Malformed(_))
        ));
        assert!(matches!(
            decode_plain(b64(b"\0alice\0").as_bytes()),
            Err(SaslError::Malformed(_))
        ));
        assert_eq!(
            decode_plain(b64(b"\0al\xffice\0pw").as_bytes()),
            Err(SaslError::NotUtf8)
        );
        // Error messages never contain the secret.
        let e = decode_plain(b64(b"x\0alice\0hunter2").as_bytes()).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("hunter2"));
    }

    #[test]
    fn plain_lenient_padding_and_whitespace() {
        // "\0a\0bc" = 5 bytes -> "AGEAYmM=" ; also without padding, and with CRLF.
        assert!(decode_plain(b"AGEAYmM=").is_ok());
        assert!(decode_plain(b"AGEAYmM").is_ok());
        assert!(decode_plain(b"AGEAYmM=\r\n").is_ok());
    }

    #[test]
    fn xoauth2_encoding() {
        let s = xoauth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg");
        // Example from Google's XOAUTH2 documentation.
        assert_eq!(
            &*s,
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn oauthbearer_encoding() {
        let s = oauthbearer(
            "user@example.com",
            "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
            "server.example.com",
            143,
        );
        let raw = STANDARD.decode(s.as_bytes()).unwrap();
        assert_eq!(
            raw,
            b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        let s = oauthbearer("a,b=c", "t", "h", 993);
        let raw = STANDARD.decode(s.as_bytes()).unwrap();
        assert!(raw.starts_with(b"n,a=a=2Cb=3Dc,\x01host=h\x01port=993\x01"));
    }

    #[test]
    fn error_challenge_gmail_and_rfc7628() {
        let g = b64(br#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#);
        let c = decode_error_challenge(g.as_bytes()).unwrap();
        assert_eq!(c.status, "400");
        assert_eq!(c.schemes.as_deref(), Some("Bearer"));
        assert_eq!(c.scope.as_deref(), Some("https://mail.google.com/"));
        assert!(c.explain().contains("status 400"));
        assert!(c.explain().contains("mailproxy login ACCOUNT"));

        let r = b64(br#"{"status":"invalid_token","scope":"example_scope","openid-configuration":"https://example.com/.well-known/openid-configuration"}"#);
        let c = decode_error_challenge(r.as_bytes()).unwrap();
        assert_eq!(c.status, "invalid_token");
        assert_eq!(c.schemes, None);
        assert!(c.explain().contains("expired or revoked"));

        let n = b64(br#"{"status":401}"#);
        let c = decode_error_challenge(n.as_bytes()).unwrap();
        assert_eq!(c.status, "401");
        assert!(c.explain().contains("expired or revoked"));

        let s = b64(br#"{"status":"insufficient_scope","scope":"mail"}"#);
        let c = decode_error_challenge(s.as_bytes()).unwrap();
        assert!(c.explain().contains("lacks the scope"));
        assert!(c.explain().contains("mail"));

        assert_eq!(decode_error_challenge(b"not base64!"), None);
        assert_eq!(decode_error_challenge(b64(b"[1,2]").as_bytes()), None);
        assert_eq!(decode_error_challenge(b64(b"{}").as_bytes()), None);
        assert_eq!(decode_error_challenge(b""), None);
    }

    #[test]
    fn smtp_login_steps() {
        assert_eq!(
            decode_login_prompt(LOGIN_PROMPT_USERNAME.as_bytes()),
            Some(LoginPrompt::Username)
        );
        assert_eq!(
            decode_login_prompt(LOGIN_PROMPT_PASSWORD.as_bytes()),
            Some(LoginPrompt::Password)
        );
        assert_eq!(decode_login_prompt(b"Zm9v"), None);
        let e = encode_login_step("alice");
        assert_eq!(&*e, "YWxpY2U=");
        assert_eq!(&*decode_login_step(e.as_bytes()).unwrap(), "alice");
        assert_eq!(decode_login_step(b"").unwrap_err(), SaslError::Empty);
    }
}

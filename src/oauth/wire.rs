//! What goes to a provider's endpoints and comes back, for every flow: one
//! bounded form POST, the token answer (parsed leniently: `expires_in` as a
//! string happens in the wild), the OAuth error answer, and the RS256
//! signature of a JWT assertion.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use serde::Deserialize;

use super::{explain, OAuthError, Tokens, MAX_BODY};
use crate::secret::Secret;

/// A number that may arrive as a JSON number or a string.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Num {
    N(u64),
    S(String),
}

impl Num {
    pub(super) fn get(&self) -> Option<u64> {
        match self {
            Num::N(n) => Some(*n),
            Num::S(s) => s.trim().parse().ok(),
        }
    }
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
    expires_in: Option<Num>,
    refresh_token: Option<String>,
    scope: Option<String>,
    id_token: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct ErrorBody {
    pub(super) error: String,
    error_description: Option<String>,
}

/// One form POST to a provider endpoint: status and bounded body, or a
/// transient error for network trouble and 5xx.
async fn post(http: &reqwest::Client, url: &str, form: &[(&str, &str)]) -> Result<(u16, Vec<u8>), OAuthError> {
    let unavailable = |reason: String| OAuthError::Unavailable {
        url: url.to_string(),
        reason,
    };
    let mut resp = http
        .post(url)
        .header("Accept", "application/json")
        .form(form)
        .send()
        .await
        .map_err(|e| unavailable(super::describe_reqwest(&e)))?;
    let status = resp.status().as_u16();
    if status >= 500 {
        return Err(unavailable(format!("HTTP status {status}")));
    }
    let mut body = Vec::new();
    while let Some(c) = resp
        .chunk()
        .await
        .map_err(|e| unavailable(super::describe_reqwest(&e)))?
    {
        if body.len() + c.len() > MAX_BODY {
            return Err(unavailable(format!("answer larger than {MAX_BODY} bytes")));
        }
        body.extend_from_slice(&c);
    }
    Ok((status, body))
}

pub(super) fn malformed(url: &str, what: &str) -> OAuthError {
    OAuthError::Malformed {
        url: url.to_string(),
        reason: what.to_string(),
    }
}

pub(super) fn parse_tokens(account: &str, url: &str, status: u16, body: &[u8]) -> Result<Tokens, OAuthError> {
    if status == 200 {
        let t: TokenBody = serde_json::from_slice(body).map_err(|_| {
            malformed(
                url,
                "the token answer is not the expected JSON (access_token, expires_in)",
            )
        })?;
        let mut tokens = Tokens::issued(
            Secret::new(t.access_token),
            t.expires_in.as_ref().and_then(Num::get),
            t.refresh_token.map(Secret::new),
            t.scope.map(|s| s.split_whitespace().map(str::to_string).collect()),
        );
        tokens.email = t.id_token.as_deref().and_then(super::id_token_email);
        return Ok(tokens);
    }
    Err(provider_error(account, url, status, body))
}

pub(super) fn provider_error(account: &str, url: &str, status: u16, body: &[u8]) -> OAuthError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => OAuthError::Provider(explain(account, &e.error, e.error_description.as_deref())),
        Err(_) => malformed(url, &format!("HTTP {status} without an OAuth error")),
    }
}

pub(super) async fn post_owned(
    http: &reqwest::Client,
    url: &str,
    form: &[(&str, String)],
) -> Result<(u16, Vec<u8>), OAuthError> {
    let borrowed: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post(http, url, &borrowed).await
}

/// `signing_input.signature`, RS256 (RSASSA-PKCS1-v1_5 with SHA-256).
pub(super) fn sign_rs256(pair: &ring::signature::RsaKeyPair, signing_input: String) -> Result<Secret, OAuthError> {
    let mut sig = vec![0u8; pair.public().modulus_len()];
    pair.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| OAuthError::Config("signing the JWT assertion failed".into()))?;
    Ok(Secret::new(format!("{signing_input}.{}", B64URL.encode(sig))))
}

/// The header and claims of a JWT from [`sign_rs256`], after checking that
/// its signature verifies with the public half of `pkcs8` and that a
/// tampered input does not.
#[cfg(test)]
pub(super) fn verify_rs256(jwt: &str, pkcs8: &[u8]) -> (serde_json::Value, serde_json::Value) {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let pair = ring::signature::RsaKeyPair::from_pkcs8(pkcs8).unwrap();
    let public =
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, pair.public().as_ref());
    let sig = B64URL.decode(parts[2]).unwrap();
    public
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("valid signature");
    assert!(public.verify(b"tampered", &sig).is_err());
    let json = |part: &str| -> serde_json::Value { serde_json::from_slice(&B64URL.decode(part).unwrap()).unwrap() };
    (json(parts[0]), json(parts[1]))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn lenient_token_answers() {
        let t = parse_tokens(
            "a",
            "u",
            200,
            br#"{"access_token":"x","expires_in":"120","token_type":"Bearer"}"#,
        )
        .unwrap();
        let left = t.expires_at.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(100) && left <= Duration::from_secs(120));
        // Hostile lifetimes are clamped, never overflow.
        for (given, want) in [
            ("0", 30),
            ("10", 30),
            ("11", 11),
            ("18446744073709551615", 86400),
            ("-5", 3600),
        ] {
            let body = format!(r#"{{"access_token":"x","expires_in":"{given}"}}"#);
            let t = parse_tokens("a", "u", 200, body.as_bytes()).unwrap();
            let life = t.expires_at.duration_since(t.issued_at).unwrap().as_secs();
            assert_eq!(life, want, "{given}");
        }
        let t = parse_tokens(
            "a",
            "u",
            200,
            br#"{"access_token":"x","expires_in":18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(t.expires_at.duration_since(t.issued_at).unwrap().as_secs(), 86400);
        let e = parse_tokens("a", "u", 200, b"<html>").unwrap_err();
        assert!(matches!(e, OAuthError::Malformed { .. }), "{e}");
        let e = parse_tokens(
            "a",
            "u",
            400,
            br#"{"error":"invalid_grant","error_description":"AADSTS70008: expired"}"#,
        )
        .unwrap_err();
        assert!(e.needs_login() && e.to_string().contains("inactivity"), "{e}");
        let e = parse_tokens("a", "u", 400, b"garbage").unwrap_err();
        assert!(e.to_string().contains("HTTP 400"), "{e}");
    }
}

//! The flows oauth2's typed client does not cover the way mailproxy needs:
//! RFC 8628 device authorisation (with visible `slow_down` handling), client
//! credentials with a certificate-signed JWT assertion, and RFC 7009
//! revocation. What they send and read at the provider's endpoints is in
//! `wire`.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use serde::Deserialize;

use super::wire::{malformed, parse_tokens, post_owned, provider_error, sign_rs256, ErrorBody, Num};
use super::{explain, OAuthError, Tokens};
use crate::config::OAuthSettings;
use crate::secret::Secret;

pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn client_auth<'a>(s: &'a OAuthSettings, form: &mut Vec<(&'a str, String)>) {
    form.push(("client_id", s.client_id.clone()));
    if let Some(secret) = &s.client_secret {
        form.push(("client_secret", secret.expose().to_string()));
    }
}

/// Uses a refresh token (lenient about the answer's shape, strict about its
/// meaning). The answer may carry a rotated refresh token, which the caller
/// must save before using the new access token.
pub async fn refresh(
    http: &reqwest::Client,
    account: &str,
    s: &OAuthSettings,
    token: &Secret,
) -> Result<Tokens, OAuthError> {
    refresh_for(http, account, s, token, None).await
}

/// [`refresh`] for another resource than the grant's first one: `scope`
/// names it (a Microsoft refresh token redeems for every resource the user
/// consented to, one access token per resource).
pub async fn refresh_for(
    http: &reqwest::Client,
    account: &str,
    s: &OAuthSettings,
    token: &Secret,
    scope: Option<&[String]>,
) -> Result<Tokens, OAuthError> {
    let mut form = vec![
        ("grant_type", "refresh_token".to_string()),
        ("refresh_token", token.expose().to_string()),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope.join(" ")));
    }
    client_auth(s, &mut form);
    let (status, body) = post_owned(http, &s.token_url, &form).await?;
    parse_tokens(account, &s.token_url, status, &body)
}

/// What the user must do to approve a device authorisation.
#[derive(Clone, Debug)]
pub struct DeviceCode {
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    device_code: Secret,
    pub interval: Duration,
    pub expires_at: Instant,
}

#[derive(Deserialize)]
struct DeviceBody {
    device_code: String,
    user_code: String,
    // Google says verification_url, RFC 8628 says verification_uri.
    #[serde(alias = "verification_url")]
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Option<Num>,
    interval: Option<Num>,
}

pub async fn device_start(http: &reqwest::Client, account: &str, s: &OAuthSettings) -> Result<DeviceCode, OAuthError> {
    let url = s
        .device_url
        .as_deref()
        .ok_or_else(|| OAuthError::Config(format!("{account} has no device_url")))?;
    let mut form = vec![("scope", s.consent_scopes().join(" "))];
    client_auth(s, &mut form);
    let (status, body) = post_owned(http, url, &form).await?;
    if status != 200 {
        return Err(provider_error(account, url, status, &body));
    }
    let d: DeviceBody = serde_json::from_slice(&body)
        .map_err(|_| malformed(url, "the device authorisation answer lacks device_code/user_code"))?;
    Ok(DeviceCode {
        verification_uri: d.verification_uri,
        verification_uri_complete: d.verification_uri_complete,
        user_code: d.user_code,
        device_code: Secret::new(d.device_code),
        interval: Duration::from_secs(d.interval.as_ref().and_then(Num::get).unwrap_or(5).clamp(1, 60)),
        expires_at: {
            let left = Duration::from_secs(d.expires_in.as_ref().and_then(Num::get).unwrap_or(900).min(3600));
            Instant::now().checked_add(left).unwrap_or_else(Instant::now)
        },
    })
}

/// Polls the token endpoint until the user approves, denies or the code
/// expires. `slow_down` adds 5 seconds to the interval (RFC 8628 §3.5).
pub async fn device_poll(
    http: &reqwest::Client,
    account: &str,
    s: &OAuthSettings,
    d: &DeviceCode,
    mut on_slow_down: impl FnMut(Duration),
) -> Result<Tokens, OAuthError> {
    let mut interval = d.interval;
    loop {
        if Instant::now() >= d.expires_at {
            return Err(OAuthError::Provider(explain(account, "expired_token", None)));
        }
        tokio::time::sleep(interval).await;
        let mut form = vec![
            ("grant_type", DEVICE_GRANT.to_string()),
            ("device_code", d.device_code.expose().to_string()),
        ];
        client_auth(s, &mut form);
        let (status, body) = match post_owned(http, &s.token_url, &form).await {
            Ok(r) => r,
            // A network hiccup while polling is not the user's fault: keep polling.
            Err(OAuthError::Unavailable { .. }) => continue,
            Err(e) => return Err(e),
        };
        if status == 200 {
            return parse_tokens(account, &s.token_url, status, &body);
        }
        match serde_json::from_slice::<ErrorBody>(&body).map(|e| e.error) {
            Ok(e) if e == "authorization_pending" => {}
            Ok(e) if e == "slow_down" => {
                interval = interval
                    .saturating_add(Duration::from_secs(5))
                    .min(Duration::from_secs(120));
                on_slow_down(interval);
            }
            _ => return Err(provider_error(account, &s.token_url, status, &body)),
        }
    }
}

/// App-only access: a client secret or a certificate-signed JWT assertion.
pub async fn client_credentials(
    http: &reqwest::Client,
    account: &str,
    s: &OAuthSettings,
) -> Result<Tokens, OAuthError> {
    let mut form = vec![
        ("grant_type", "client_credentials".to_string()),
        ("scope", s.scopes.join(" ")),
    ];
    match (&s.client_certificate, &s.client_key) {
        (Some(cert), Some(key)) => {
            form.push(("client_id", s.client_id.clone()));
            form.push(("client_assertion_type", JWT_BEARER.to_string()));
            let jwt = client_assertion(&s.client_id, &s.token_url, cert, key)?;
            form.push(("client_assertion", jwt.expose().to_string()));
        }
        _ => client_auth(s, &mut form),
    }
    let (status, body) = post_owned(http, &s.token_url, &form).await?;
    parse_tokens(account, &s.token_url, status, &body)
}

/// RFC 7523 client assertion, RS256, with the certificate's SHA-256 (and,
/// for Microsoft, SHA-1) thumbprint in the header.
pub fn client_assertion(client_id: &str, audience: &str, cert: &Path, key: &Path) -> Result<Secret, OAuthError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
    let cfg = |what: &str, p: &Path, e: String| OAuthError::Config(format!("{what} {}: {e}", p.display()));
    let cert_der = CertificateDer::from_pem_file(cert).map_err(|e| cfg("client_certificate", cert, e.to_string()))?;
    let key_der = PrivatePkcs8KeyDer::from_pem_file(key).map_err(|e| cfg("client_key", key, e.to_string()))?;
    let pair = ring::signature::RsaKeyPair::from_pkcs8(key_der.secret_pkcs8_der())
        .map_err(|e| cfg("client_key", key, format!("not an RSA PKCS#8 key ({e})")))?;
    let sha256 = ring::digest::digest(&ring::digest::SHA256, cert_der.as_ref());
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der.as_ref());
    let header = serde_json::json!({
        "alg": "RS256", "typ": "JWT",
        "x5t": B64URL.encode(sha1.as_ref()),
        "x5t#S256": B64URL.encode(sha256.as_ref()),
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut jti = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut jti);
    let claims = serde_json::json!({
        "aud": audience, "iss": client_id, "sub": client_id,
        "jti": B64URL.encode(jti), "nbf": now, "iat": now, "exp": now + 600,
    });
    let signing_input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    sign_rs256(&pair, signing_input)
}

/// A token for an app-only account (no refresh token): client credentials,
/// or a service account acting for `mailbox`.
pub async fn app_token(
    http: &reqwest::Client,
    account: &str,
    mailbox: &str,
    s: &OAuthSettings,
) -> Result<Tokens, OAuthError> {
    match s.flow {
        crate::config::Flow::ServiceAccount => super::service_account::token(http, account, mailbox, s).await,
        _ => client_credentials(http, account, s).await,
    }
}

/// Outcome of asking the provider to revoke a refresh token.
#[derive(Debug, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// The provider has no revocation endpoint (Microsoft).
    Unsupported(String),
}

pub async fn revoke(
    http: &reqwest::Client,
    account: &str,
    s: &OAuthSettings,
    refresh: &Secret,
) -> Result<Revocation, OAuthError> {
    let Some(url) = &s.revoke_url else {
        let how = match s.provider {
            crate::config::ProviderKind::Microsoft => {
                "Microsoft has no token revocation endpoint: remove the app's access at https://myaccount.microsoft.com (Apps and devices) or https://account.live.com/consent/Manage, or ask an administrator to revoke the user's sessions"
            }
            _ => "this provider has no revoke_url configured: remove the app's access in the provider's account settings",
        };
        return Ok(Revocation::Unsupported(how.to_string()));
    };
    let mut form = vec![
        ("token", refresh.expose().to_string()),
        ("token_type_hint", "refresh_token".to_string()),
    ];
    client_auth(s, &mut form);
    let (status, body) = post_owned(http, url, &form).await?;
    // RFC 7009: 200 also for tokens that were already invalid.
    if status == 200 {
        Ok(Revocation::Revoked)
    } else {
        Err(provider_error(account, url, status, &body))
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::verify_rs256;
    use super::*;

    #[test]
    fn client_assertion_is_a_valid_rs256_jwt() {
        // ring cannot generate RSA keys; openssl (Debian base) can.
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let st = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=app", "-days", "1", "-keyout",
            ])
            .arg(&k)
            .arg("-out")
            .arg(&c)
            .output()
            .expect("openssl");
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let jwt = client_assertion("cid", "https://t/token", &c, &k).unwrap();
        // The signature verifies with the certificate's public key.
        use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
        let key = PrivatePkcs8KeyDer::from_pem_file(&k).unwrap();
        let (header, claims) = verify_rs256(jwt.expose(), key.secret_pkcs8_der());
        assert_eq!(header["alg"], "RS256");
        assert_eq!(
            (claims["aud"].as_str(), claims["iss"].as_str(), claims["sub"].as_str()),
            (Some("https://t/token"), Some("cid"), Some("cid"))
        );
    }
}

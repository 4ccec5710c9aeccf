//! Google Workspace service accounts with domain-wide delegation: the RFC
//! 7523 JWT bearer grant (RS256) that trades an assertion naming the mailbox
//! (`sub`) for an access token. The assertion is signed with the key file
//! Google issues ([`ServiceAccountKey`], read and checked in `config`).
//! There is no refresh token: a new assertion is signed for every token,
//! just as client credentials are used again.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;

use super::wire::{parse_tokens, post_owned, sign_rs256};
use super::{OAuthError, Tokens};
use crate::config::{OAuthSettings, ServiceAccountKey};
use crate::secret::Secret;

/// RFC 7523 §2.1 grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google accepts assertions valid for at most an hour.
const ASSERTION_LIFETIME: u64 = 3600;

/// The signed assertion: `iss` the service account, `sub` the mailbox it
/// acts for, `aud` the token endpoint, `scope` the mail scopes.
pub fn assertion(
    key: &ServiceAccountKey,
    mailbox: &str,
    scopes: &[String],
    audience: &str,
) -> Result<Secret, OAuthError> {
    let pair = ring::signature::RsaKeyPair::from_pkcs8(key.pkcs8_der())
        .map_err(|e| OAuthError::Config(format!("the service account key is not an RSA key ({e})")))?;
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &key.private_key_id {
        header["kid"] = serde_json::json!(kid);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = serde_json::json!({
        "iss": key.client_email, "sub": mailbox, "scope": scopes.join(" "),
        "aud": audience, "iat": now, "exp": now + ASSERTION_LIFETIME,
    });
    let signing_input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    sign_rs256(&pair, signing_input)
}

/// An access token for `mailbox` through the JWT bearer grant.
pub async fn token(
    http: &reqwest::Client,
    account: &str,
    mailbox: &str,
    s: &OAuthSettings,
) -> Result<Tokens, OAuthError> {
    let path = s
        .service_account_key
        .as_deref()
        .ok_or_else(|| OAuthError::Config(format!("{account} has no service_account_key")))?;
    let p = path.to_owned();
    let key = tokio::task::spawn_blocking(move || ServiceAccountKey::load(&p))
        .await
        .map_err(|e| OAuthError::Config(format!("reading the service account key failed: {e}")))?
        .map_err(|e| OAuthError::Config(e.to_string()))?;
    let jwt = assertion(&key, mailbox, &s.scopes, &s.token_url)?;
    let form = vec![
        ("grant_type", JWT_BEARER_GRANT.to_string()),
        ("assertion", jwt.expose().to_string()),
    ];
    let (status, body) = post_owned(http, &s.token_url, &form).await?;
    parse_tokens(account, &s.token_url, status, &body).map_err(|e| explain_delegation(e, &key.client_email, mailbox))
}

/// Google's answers to a delegation that is not set up, in the words of
/// the admin console: they need an administrator, not a new sign-in.
fn explain_delegation(e: OAuthError, service_account: &str, mailbox: &str) -> OAuthError {
    let OAuthError::Provider(mut x) = e else { return e };
    let fix = match x.code.as_str() {
        "unauthorized_client" | "access_denied" => format!(
            "the service account {service_account} may not act for {mailbox}: in the Google Admin console \
             (Security > Access and data control > API controls > Manage domain-wide delegation) add its client ID \
             with the scope https://mail.google.com/"
        ),
        "invalid_grant" => format!(
            "the provider refused the service account's assertion for {mailbox}: the mailbox must be a user of \
             the Workspace domain, the key must not be deleted or disabled, and the machine's clock must be right"
        ),
        "invalid_scope" => format!(
            "the scopes are not among those delegated to {service_account}: delegate https://mail.google.com/ in the Google Admin console"
        ),
        _ => return OAuthError::Provider(x),
    };
    x.sentence = fix;
    x.needs_login = false;
    OAuthError::Provider(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openssl_key() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k.pem");
        let st = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&k)
            .output()
            .expect("openssl");
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let pem = std::fs::read_to_string(&k).unwrap();
        (dir, pem)
    }

    #[test]
    fn assertion_names_the_mailbox_and_verifies() {
        let (_d, pem) = openssl_key();
        let json = serde_json::json!({
            "type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com",
            "private_key_id": "kid1", "private_key": pem, "token_uri": "https://oauth2.googleapis.com/token",
        });
        let key = ServiceAccountKey::parse(json.to_string().as_bytes(), std::path::Path::new("sa.json")).unwrap();
        let jwt = assertion(
            &key,
            "dave@example.com",
            &["https://mail.google.com/".into()],
            "https://oauth2.googleapis.com/token",
        )
        .unwrap();
        let (header, c) = super::super::wire::verify_rs256(jwt.expose(), key.pkcs8_der());
        assert_eq!(
            (header["alg"].as_str(), header["kid"].as_str()),
            (Some("RS256"), Some("kid1"))
        );
        assert_eq!(c["iss"], "sa@p.iam.gserviceaccount.com");
        assert_eq!(c["sub"], "dave@example.com");
        assert_eq!(c["scope"], "https://mail.google.com/");
        assert_eq!(c["aud"], "https://oauth2.googleapis.com/token");
        assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 3600);
    }

    #[test]
    fn delegation_errors_point_at_the_admin_console() {
        let e = OAuthError::Provider(super::super::explain(
            "dave@example.com",
            "unauthorized_client",
            Some("Client is unauthorized to retrieve access tokens using this method"),
        ));
        let e = explain_delegation(e, "sa@p.iam.gserviceaccount.com", "dave@example.com");
        let s = e.to_string();
        assert!(
            s.contains("domain-wide delegation") && s.contains("https://mail.google.com/"),
            "{s}"
        );
        assert!(!e.needs_login());
    }
}

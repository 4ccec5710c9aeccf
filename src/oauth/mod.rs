//! Talking to the OAuth 2.0 provider: the authorisation-code grant with PKCE,
//! refresh, and decoding of its errors. What to do with the tokens (when to
//! refresh, where to keep them) lives in `tokens`.
//!
//! Every provider-given lifetime passes through [`lifetime`] and every
//! expiry through [`expiry`]: a hostile or broken `expires_in` (0, or
//! 18446744073709551615) can neither overflow time arithmetic nor make the
//! refresher hammer the token endpoint.

pub mod errors;
pub mod flows;
pub mod login;
pub mod service_account;
mod wire;

use std::time::{Duration, SystemTime};

use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, RequestTokenError, Scope, TokenResponse, TokenUrl,
};

use crate::config::OAuthSettings;
use crate::secret::Secret;
pub use errors::{explain, Explanation};
pub use flows::refresh;

/// Largest token-endpoint answer we read; real ones are a few KiB.
pub(crate) const MAX_BODY: usize = 256 * 1024;
/// Background refreshes of one account are at least this far apart,
/// whatever the provider says: a lifetime of zero cannot become a storm.
/// The lifetimes below are planned around it; `tokens` schedules with it.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// When the provider omits `expires_in`, assume the common one hour.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Lifetimes no longer than the background refresh floor
/// ([`MIN_REFRESH_INTERVAL`]) are absurd, and planned as this: no token can
/// be renewed in time at that floor, and a zero would mean refreshing
/// without pause at every login. Three floors, so the background renews
/// such a token at the floor (see `Access::renew_at`). Longer lifetimes are
/// planned as they are.
pub const MIN_LIFETIME: Duration = Duration::from_secs(3 * MIN_REFRESH_INTERVAL.as_secs());
/// Longer lifetimes are treated as this (refreshing daily costs nothing).
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The lifetime to plan with for a provider's `expires_in` (seconds).
#[deny(clippy::arithmetic_side_effects)]
pub fn lifetime(expires_in: Option<u64>) -> Duration {
    match expires_in.map(Duration::from_secs) {
        None => DEFAULT_LIFETIME,
        Some(d) if d <= MIN_REFRESH_INTERVAL => MIN_LIFETIME,
        Some(d) => d.min(MAX_LIFETIME),
    }
}

/// `from + d`, saturating far in the future instead of panicking.
#[deny(clippy::arithmetic_side_effects)]
pub fn expiry(from: SystemTime, d: Duration) -> SystemTime {
    from.checked_add(d)
        .or_else(|| from.checked_add(MAX_LIFETIME))
        .unwrap_or(from)
}

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// The provider answered with an OAuth error.
    #[error("{}", .0.sentence)]
    Provider(Explanation),
    /// Network trouble or a 5xx: worth retrying later.
    #[error("the provider at {url} could not be reached: {reason}")]
    Unavailable { url: String, reason: String },
    /// The provider answered something that is not OAuth.
    #[error("the provider's answer from {url} could not be read: {reason}")]
    Malformed { url: String, reason: String },
    #[error("{0}")]
    Config(String),
}

impl OAuthError {
    pub fn needs_login(&self) -> bool {
        matches!(self, OAuthError::Provider(e) if e.needs_login)
    }

    /// The same error, saying so when a Google grant died because its app
    /// is in *Testing* status (about seven days after `authorized_at`).
    pub fn with_grant_age(self, account: &str, authorized_at: Option<u64>) -> OAuthError {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match self {
            OAuthError::Provider(mut x) if x.google_expired => {
                if let Some(hint) = errors::testing_status_hint(account, authorized_at, now) {
                    x.code = format!("{} (app in Testing status)", x.code);
                    x.sentence = hint;
                }
                OAuthError::Provider(x)
            }
            other => other,
        }
    }

    /// Worth retrying later: network trouble, 5xx, or an answer that is not
    /// OAuth at all (captive portals, proxies, a provider having a bad day).
    pub fn is_transient(&self) -> bool {
        matches!(self, OAuthError::Unavailable { .. } | OAuthError::Malformed { .. })
    }
}

/// Tokens from one successful token request.
#[derive(Debug)]
pub struct Tokens {
    pub access: Secret,
    /// When the answer arrived; `expires_at` is at most [`MAX_LIFETIME`] later.
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    /// A new refresh token, when the provider sent one (rotation).
    pub refresh: Option<Secret>,
    pub scopes: Option<Vec<String>>,
    /// The `email` claim of an `id_token`, when the provider sent one.
    pub email: Option<String>,
}

impl Tokens {
    /// Tokens issued now with the provider's `expires_in` (clamped).
    #[deny(clippy::arithmetic_side_effects)]
    pub fn issued(
        access: Secret,
        expires_in: Option<u64>,
        refresh: Option<Secret>,
        scopes: Option<Vec<String>>,
    ) -> Tokens {
        let now = SystemTime::now();
        Tokens {
            access,
            issued_at: now,
            expires_at: expiry(now, lifetime(expires_in)),
            refresh,
            scopes,
            email: None,
        }
    }
}

/// The `email` claim of an OpenID Connect `id_token`. Not verified: it only
/// makes an identity mismatch easier to explain; the check that counts is
/// the login at the account's own server (`identity`).
pub fn id_token_email(id_token: &str) -> Option<String> {
    use base64::Engine;
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("email")?.as_str().map(str::to_string)
}

/// The HTTP client for provider calls with the config's proxy: `[server]
/// http_proxy` when set (`NO_PROXY` still exempts hosts), else whatever
/// `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` say.
pub fn http_client_for(config: &crate::config::Config) -> Result<reqwest::Client, OAuthError> {
    http_client_timed(config, config.limits.provider_timeout)
}

/// [`http_client_for`] with another total time per request (Graph's
/// uploads of a few megabytes).
pub fn http_client_timed(config: &crate::config::Config, timeout: Duration) -> Result<reqwest::Client, OAuthError> {
    let mut b = client_builder(timeout);
    if let Some(p) = &config.http_proxy {
        let proxy = reqwest::Proxy::all(p.expose())
            .map_err(|_| OAuthError::Config("[server] http_proxy is not a proxy address".into()))?
            .no_proxy(reqwest::NoProxy::from_env());
        b = b.proxy(proxy);
    }
    b.build()
        .map_err(|e| OAuthError::Config(format!("cannot set up the HTTP client: {}", describe_reqwest(&e))))
}

fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .user_agent(concat!("mailproxy/", env!("CARGO_PKG_VERSION")))
}

/// The HTTP client for provider calls: no redirects (a token endpoint that
/// redirects is misconfigured or hostile), bounded connect and total time.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    client_builder(timeout)
        .build()
        .expect("the HTTP client configuration is static and valid")
}

#[derive(Debug, thiserror::Error)]
enum HttpFail {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP status {0}")]
    Status(u16),
}

/// oauth2's HTTP hook: reqwest underneath, but a 5xx becomes a transport
/// error (so it is retried, not parsed as an OAuth error) and bodies are bounded.
async fn send(http: &reqwest::Client, req: oauth2::HttpRequest) -> Result<oauth2::HttpResponse, HttpFail> {
    let (parts, body) = req.into_parts();
    let mut resp = http
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await
        .map_err(|e| HttpFail::Transport(describe_reqwest(&e)))?;
    let status = resp.status();
    if status.is_server_error() {
        return Err(HttpFail::Status(status.as_u16()));
    }
    let mut builder = oauth2::http::Response::builder().status(status);
    for (k, v) in resp.headers() {
        builder = builder.header(k, v);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| HttpFail::Transport(describe_reqwest(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(HttpFail::Transport(format!("answer larger than {MAX_BODY} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    builder.body(body).map_err(|e| HttpFail::Transport(e.to_string()))
}

pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    // reqwest's Display can include the URL, never a body; walk the sources
    // for the useful part (connection refused, timed out, certificate ...).
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else {
        e.to_string()
    };
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s = format!("{s}: {inner}");
        src = inner.source();
    }
    s
}

/// oauth2's HTTP client: a boxed `Send` future, so sessions that refresh
/// tokens can run on any worker thread.
struct Http<'a>(&'a reqwest::Client);

impl<'c> oauth2::AsyncHttpClient<'c> for Http<'_> {
    type Error = HttpFail;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<oauth2::HttpResponse, HttpFail>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(send(self.0, request))
    }
}

type TokenErr = RequestTokenError<HttpFail, oauth2::StandardErrorResponse<oauth2::basic::BasicErrorResponseType>>;

fn convert(account: &str, url: &str, e: TokenErr) -> OAuthError {
    match e {
        RequestTokenError::ServerResponse(r) => OAuthError::Provider(explain(
            account,
            r.error().as_ref(),
            r.error_description().map(String::as_str),
        )),
        RequestTokenError::Request(f) => OAuthError::Unavailable {
            url: url.into(),
            reason: f.to_string(),
        },
        RequestTokenError::Parse(e, body) => OAuthError::Malformed {
            url: url.into(),
            // The path names the field; the value is left out: it could be a token.
            reason: if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
                "the token endpoint answered something that is not JSON (a captive portal or proxy?)".to_string()
            } else {
                format!("field `{}` is missing or has the wrong type", e.path())
            },
        },
        RequestTokenError::Other(m) => OAuthError::Malformed {
            url: url.into(),
            reason: m,
        },
    }
}

/// The one extra field of a token answer mailproxy reads: an OpenID
/// Connect `id_token`, which names who signed in (see `identity`).
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
struct IdTokenField {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

impl oauth2::ExtraTokenFields for IdTokenField {}

type TokenAnswer = oauth2::StandardTokenResponse<IdTokenField, oauth2::basic::BasicTokenType>;

/// oauth2's basic client, but keeping the `id_token`.
type OAuthClient = oauth2::Client<
    oauth2::basic::BasicErrorResponse,
    TokenAnswer,
    oauth2::basic::BasicTokenIntrospectionResponse,
    oauth2::StandardRevocableToken,
    oauth2::basic::BasicRevocationErrorResponse,
>;

fn tokens(r: &TokenAnswer) -> Tokens {
    let mut t = Tokens::issued(
        Secret::new(r.access_token().secret().clone()),
        r.expires_in().map(|d| d.as_secs()),
        r.refresh_token().map(|t| Secret::new(t.secret().clone())),
        r.scopes().map(|s| s.iter().map(|s| s.to_string()).collect()),
    );
    t.email = r.extra_fields().id_token.as_deref().and_then(id_token_email);
    t
}

macro_rules! client {
    ($s:expr) => {{
        let s: &OAuthSettings = $s;
        let mut c = OAuthClient::new(ClientId::new(s.client_id.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(
                TokenUrl::new(s.token_url.clone()).map_err(|e| OAuthError::Config(format!("token_url: {e}")))?,
            );
        if let Some(secret) = &s.client_secret {
            c = c.set_client_secret(ClientSecret::new(secret.expose().to_string()));
        }
        c
    }};
}

/// One authorisation in progress: the URL to open and what must match when
/// the browser comes back.
pub struct AuthRequest {
    pub url: String,
    pub redirect_uri: String,
    state: CsrfToken,
    verifier: PkceCodeVerifier,
}

impl AuthRequest {
    /// Constant-time comparison of the returned `state` (CSRF protection).
    pub fn state_matches(&self, state: &str) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.state.secret().as_bytes().ct_eq(state.as_bytes()))
    }
}

/// Builds the authorisation URL with PKCE (S256) and a random `state`.
pub fn authorization_request(account: &str, s: &OAuthSettings, redirect_uri: &str) -> Result<AuthRequest, OAuthError> {
    let client = client!(s)
        .set_auth_uri(AuthUrl::new(s.auth_url.clone()).map_err(|e| OAuthError::Config(format!("auth_url: {e}")))?)
        .set_redirect_uri(
            RedirectUrl::new(redirect_uri.to_string()).map_err(|e| OAuthError::Config(format!("redirect_uri: {e}")))?,
        );
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(s.consent_scopes().into_iter().map(Scope::new))
        .set_pkce_challenge(challenge)
        .add_extra_param("login_hint", account);
    for (k, v) in &s.auth_params {
        req = req.add_extra_param(k.as_str(), v.as_str());
    }
    let (url, state) = req.url();
    Ok(AuthRequest {
        url: url.to_string(),
        redirect_uri: redirect_uri.to_string(),
        state,
        verifier,
    })
}

/// Redeems the authorisation code, proving possession of the PKCE verifier.
pub async fn exchange_code(
    http: &reqwest::Client,
    account: &str,
    s: &OAuthSettings,
    req: AuthRequest,
    code: &str,
) -> Result<Tokens, OAuthError> {
    let client = client!(s).set_redirect_uri(
        RedirectUrl::new(req.redirect_uri.clone()).map_err(|e| OAuthError::Config(format!("redirect_uri: {e}")))?,
    );
    let r = client
        .exchange_code(AuthorizationCode::new(code.to_string()))
        .set_pkce_verifier(req.verifier)
        .request_async(&Http(http))
        .await
        .map_err(|e| convert(account, &s.token_url, e))?;
    Ok(tokens(&r))
}

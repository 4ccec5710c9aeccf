//! Fake OAuth 2.0 authorization server (RFC 6749 + PKCE RFC 7636 + device flow
//! RFC 8628 + revocation RFC 7009 + introspection RFC 7662).
//!
//! It serves real HTTP/1.1 on `127.0.0.1:<random>` from its own thread with its
//! own tokio runtime, so it works from plain `#[test]`s, from any tokio flavour,
//! and keeps answering other processes (mailproxy, Dovecot) even while the test
//! thread blocks. All knobs take `&self` and are safe to call concurrently.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::http::{self, Request, Response};

/// Confidential client registered by default (`client_secret_post` or Basic).
pub const CLIENT_ID: &str = "mailproxy-test-client";
/// Secret of [`CLIENT_ID`].
pub const CLIENT_SECRET: &str = "mailproxy-test-secret";
/// Public client (no secret; PKCE only) registered by default.
pub const PUBLIC_CLIENT_ID: &str = "mailproxy-test-public";
/// User approved by `/authorize` when no `login_hint` is given (changeable).
pub const DEFAULT_USER: &str = "alice@example.org";
/// Scope string used by the helpers when a test does not care.
pub const DEFAULT_SCOPE: &str = "https://mail.example.org/ offline_access";
/// Grant type name of the device flow.
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 7523 §2.1 JWT bearer grant (Google service accounts).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google's `error_description` for a refresh token that died (revoked, or
/// seven days after consent while the app is in *Testing* status).
pub const GOOGLE_EXPIRED: &str = "Token has been expired or revoked.";

/// A registered OAuth client.
#[derive(Clone, Debug)]
pub struct ClientReg {
    pub client_id: String,
    /// `None` = public client: no secret required (and none checked).
    pub secret: Option<String>,
    /// Exact redirect URIs allowed in addition to loopback ones.
    pub redirect_uris: Vec<String>,
    /// Allow any `http://127.0.0.1:*`, `http://localhost:*`, `http://[::1]:*` redirect (RFC 8252 §7.3).
    pub allow_loopback: bool,
    /// RSA public key (PKCS#1 DER) accepted for RFC 7523 JWT client
    /// assertions (`client_assertion_type = ...:jwt-bearer`), RS256.
    pub assertion_key: Option<Vec<u8>>,
}

impl ClientReg {
    /// Confidential client allowing loopback redirects.
    pub fn confidential(id: &str, secret: &str) -> ClientReg {
        ClientReg {
            client_id: id.into(),
            secret: Some(secret.into()),
            redirect_uris: Vec::new(),
            allow_loopback: true,
            assertion_key: None,
        }
    }

    /// Confidential client that authenticates with a signed JWT (RS256) only.
    pub fn with_assertion_key(id: &str, rsa_public_pkcs1_der: Vec<u8>) -> ClientReg {
        ClientReg {
            client_id: id.into(),
            secret: None,
            redirect_uris: Vec::new(),
            allow_loopback: true,
            assertion_key: Some(rsa_public_pkcs1_der),
        }
    }

    /// Public client allowing loopback redirects.
    pub fn public(id: &str) -> ClientReg {
        ClientReg {
            client_id: id.into(),
            secret: None,
            redirect_uris: Vec::new(),
            allow_loopback: true,
            assertion_key: None,
        }
    }

    fn redirect_allowed(&self, uri: &str) -> bool {
        if self.redirect_uris.iter().any(|u| u == uri) {
            return true;
        }
        if !self.allow_loopback {
            return false;
        }
        match url::Url::parse(uri) {
            Ok(u) => {
                u.scheme() == "http"
                    && matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"))
                    && u.fragment().is_none()
            }
            Err(_) => false,
        }
    }
}

/// Outcome an end-user gave a pending device authorization.
#[derive(Clone, Debug, PartialEq)]
enum DeviceStatus {
    Pending,
    Approved(String),
    Denied,
}

#[derive(Clone, Debug)]
struct DeviceGrant {
    user_code: String,
    client_id: String,
    scope: String,
    status: DeviceStatus,
    expires: Instant,
    redeemed: bool,
}

#[derive(Clone, Debug)]
struct CodeGrant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    user: String,
    scope: String,
    used: bool,
    expires: Instant,
}

#[derive(Clone, Debug)]
struct AccessTok {
    user: String,
    scope: String,
    client_id: String,
    issued: Instant,
    expires: Instant,
    exp_unix: u64,
    revoked: bool,
    /// Refresh token this access token was issued with (revoking it kills this one too).
    refresh: Option<String>,
}

#[derive(Clone, Debug)]
struct RefreshTok {
    user: String,
    scope: String,
    client_id: String,
    valid: bool,
}

/// An error response injected with [`FakeProvider::fail_next_token_requests`].
#[derive(Clone, Debug)]
struct Injected {
    status: u16,
    body: String,
}

struct State {
    default_user: String,
    access_ttl: Duration,
    rotate_refresh: bool,
    token_delay: Duration,
    /// A delayed token request whose client hung up meanwhile is dropped
    /// unprocessed (the client died before the provider acted).
    drop_abandoned: bool,
    abandoned: u64,
    /// `set_default_user` was called: that user signs in whatever the login_hint.
    forced_user: bool,
    /// `expires_in` to advertise instead of the real lifetime (hostile values).
    advertised_expires_in: Option<u64>,
    clients: HashMap<String, ClientReg>,
    codes: HashMap<String, CodeGrant>,
    access: HashMap<String, AccessTok>,
    refresh: HashMap<String, RefreshTok>,
    devices: HashMap<String, DeviceGrant>,
    inject: VecDeque<Injected>,
    slow_down_polls: u32,
    /// Service accounts (`iss` of JWT bearer assertions) and their RSA
    /// public keys (PKCS#1 DER).
    service_accounts: HashMap<String, Vec<u8>>,
    /// `error_description` for dead refresh tokens instead of Microsoft's AADSTS70008.
    dead_refresh_description: Option<String>,
    // Observability.
    token_requests: HashMap<String, u64>,
    refreshes: u64,
    code_exchanges: u64,
    authorize_hits: u64,
    introspections: u64,
    revocations: Vec<(String, Option<String>)>,
    /// `sub` of every JWT bearer grant that got a token, in order.
    jwt_subjects: Vec<String>,
    token_forms: Vec<HashMap<String, String>>,
    last_authorize: Option<HashMap<String, String>>,
}

/// Handle to a running fake provider; stops it on drop.
pub struct FakeProvider {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeProvider {
    /// Starts the provider on `127.0.0.1:0` with [`CLIENT_ID`] and [`PUBLIC_CLIENT_ID`] registered.
    pub fn start() -> FakeProvider {
        let mut clients = HashMap::new();
        for c in [
            ClientReg::confidential(CLIENT_ID, CLIENT_SECRET),
            ClientReg::public(PUBLIC_CLIENT_ID),
        ] {
            clients.insert(c.client_id.clone(), c);
        }
        let state = Arc::new(Mutex::new(State {
            default_user: DEFAULT_USER.into(),
            access_ttl: Duration::from_secs(3600),
            rotate_refresh: false,
            token_delay: Duration::ZERO,
            drop_abandoned: false,
            abandoned: 0,
            forced_user: false,
            advertised_expires_in: None,
            clients,
            codes: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            devices: HashMap::new(),
            inject: VecDeque::new(),
            slow_down_polls: 0,
            service_accounts: HashMap::new(),
            dead_refresh_description: None,
            jwt_subjects: Vec::new(),
            token_requests: HashMap::new(),
            refreshes: 0,
            code_exchanges: 0,
            authorize_hits: 0,
            introspections: 0,
            revocations: Vec::new(),
            token_forms: Vec::new(),
            last_authorize: None,
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind provider");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("fake-oauth-provider".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("provider runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let base = format!("http://{addr}");
                    tokio::select! {
                        _ = rx => {}
                        _ = async {
                            loop {
                                let Ok((sock, _)) = listener.accept().await else { continue };
                                let st = st.clone();
                                let base = base.clone();
                                tokio::spawn(async move { serve_conn(sock, st, base).await });
                            }
                        } => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .expect("spawn provider thread");
        FakeProvider {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // ---- addresses ----

    /// Every secret this provider ever handed out or was sent: access and
    /// refresh tokens, authorization and device codes, PKCE verifiers and
    /// client secrets (for tests asserting none of them leaks into logs).
    pub fn all_secrets(&self) -> Vec<String> {
        let st = self.st();
        let mut v: Vec<String> = st
            .access
            .keys()
            .chain(st.refresh.keys())
            .chain(st.codes.keys())
            .chain(st.devices.keys())
            .cloned()
            .collect();
        for form in &st.token_forms {
            for k in [
                "code",
                "code_verifier",
                "client_secret",
                "refresh_token",
                "device_code",
                "client_assertion",
                "assertion",
            ] {
                if let Some(val) = form.get(k) {
                    v.push(val.clone());
                }
            }
        }
        v.retain(|s| s.len() >= 8);
        v.sort();
        v.dedup();
        v
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` + `path` (path should start with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Authorization endpoint (`/authorize`).
    pub fn auth_url(&self) -> String {
        self.url("/authorize")
    }

    /// Token endpoint (`/token`).
    pub fn token_url(&self) -> String {
        self.url("/token")
    }

    /// Device authorization endpoint (`/device`).
    pub fn device_url(&self) -> String {
        self.url("/device")
    }

    /// Revocation endpoint (`/revoke`).
    pub fn revoke_url(&self) -> String {
        self.url("/revoke")
    }

    /// Introspection endpoint (`/introspect`), for Dovecot's oauth2 passdb.
    pub fn introspection_url(&self) -> String {
        self.url("/introspect")
    }

    /// Verification URI handed out by `/device` (just shows a page).
    pub fn verification_url(&self) -> String {
        self.url("/device/verify")
    }

    // ---- knobs ----

    /// Lifetime of newly issued access tokens (default 3600 s). `expires_in` is rounded up to whole seconds.
    pub fn set_access_token_lifetime(&self, d: Duration) {
        self.st().access_ttl = d;
    }

    /// When on, every refresh returns a new refresh token and invalidates the old one.
    /// When off (default) the refresh response carries no `refresh_token` (Google style).
    pub fn set_rotate_refresh_tokens(&self, on: bool) {
        self.st().rotate_refresh = on;
    }

    /// User `/authorize` approves when the request has no `login_hint`.
    /// Once set, `/authorize` signs this user in even when the request has a
    /// `login_hint` (a person signing in with another account).
    pub fn set_default_user(&self, user: &str) {
        let mut st = self.st();
        st.default_user = user.into();
        st.forced_user = true;
    }

    /// Registers (or replaces) a client.
    pub fn register_client(&self, c: ClientReg) {
        self.st().clients.insert(c.client_id.clone(), c);
    }

    /// All refresh tokens issued so far become invalid (`invalid_grant` on use).
    pub fn invalidate_all_refresh_tokens(&self) {
        for r in self.st().refresh.values_mut() {
            r.valid = false;
        }
    }

    /// All access tokens issued so far become expired (introspection says inactive).
    pub fn expire_all_access_tokens(&self) {
        let now = Instant::now();
        for a in self.st().access.values_mut() {
            a.expires = now;
        }
    }

    /// The next `n` requests to `/token` (any grant) are answered with `status` and
    /// `body` verbatim (JSON content type) without further processing.
    pub fn fail_next_token_requests(&self, n: usize, status: u16, body: &str) {
        let mut st = self.st();
        for _ in 0..n {
            st.inject.push_back(Injected {
                status,
                body: body.to_string(),
            });
        }
    }

    /// Delay every `/token` response by `d` (default zero).
    /// Advertise this `expires_in` in token answers (e.g. 0 or u64::MAX),
    /// whatever the real lifetime is.
    pub fn set_advertised_expires_in(&self, secs: Option<u64>) {
        self.st().advertised_expires_in = secs;
    }

    /// With a token delay: a client that hangs up before the delay is over
    /// gets its request dropped, not processed (see [`Self::abandoned`]).
    pub fn set_drop_abandoned_token_requests(&self, on: bool) {
        self.st().drop_abandoned = on;
    }

    /// Token requests dropped because their client hung up during the delay.
    pub fn abandoned(&self) -> u64 {
        self.st().abandoned
    }

    pub fn set_token_delay(&self, d: Duration) {
        self.st().token_delay = d;
    }

    /// Registers a service account: JWT bearer assertions with `iss` =
    /// `email` must be signed (RS256) by this RSA public key (PKCS#1 DER).
    pub fn register_service_account(&self, email: &str, rsa_public_pkcs1_der: Vec<u8>) {
        self.st().service_accounts.insert(email.into(), rsa_public_pkcs1_der);
    }

    /// Every refresh token issued so far dies the way Google's do seven days
    /// after consent for an app in *Testing* status: `invalid_grant`,
    /// "Token has been expired or revoked."
    pub fn expire_refresh_tokens_like_google(&self) {
        let mut st = self.st();
        st.dead_refresh_description = Some(GOOGLE_EXPIRED.into());
        for r in st.refresh.values_mut() {
            r.valid = false;
        }
    }

    /// The mailboxes (`sub`) JWT bearer grants were issued for, in order.
    pub fn jwt_bearer_subjects(&self) -> Vec<String> {
        self.st().jwt_subjects.clone()
    }

    /// The access tokens issued for `user` so far.
    pub fn access_tokens_of(&self, user: &str) -> Vec<String> {
        self.st()
            .access
            .iter()
            .filter(|(_, a)| a.user == user)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// When each access token of `user` was issued and when it expires (or
    /// expired), oldest first.
    pub fn access_token_times(&self, user: &str) -> Vec<(Instant, Instant)> {
        let mut v: Vec<_> = self
            .st()
            .access
            .values()
            .filter(|a| a.user == user)
            .map(|a| (a.issued, a.expires))
            .collect();
        v.sort();
        v
    }

    /// The next `n` device-code polls get `slow_down`.
    pub fn slow_down_next_polls(&self, n: u32) {
        self.st().slow_down_polls = n;
    }

    // ---- device flow test API ----

    /// User codes of device authorizations still pending.
    pub fn pending_user_codes(&self) -> Vec<String> {
        self.st()
            .devices
            .values()
            .filter(|d| d.status == DeviceStatus::Pending)
            .map(|d| d.user_code.clone())
            .collect()
    }

    /// The end-user approves `user_code` as `user`. False if the code is unknown.
    pub fn approve_device(&self, user_code: &str, user: &str) -> bool {
        self.set_device_status(user_code, DeviceStatus::Approved(user.into()))
    }

    /// The end-user denies `user_code` (poll then gets `access_denied`).
    pub fn deny_device(&self, user_code: &str) -> bool {
        self.set_device_status(user_code, DeviceStatus::Denied)
    }

    fn set_device_status(&self, user_code: &str, s: DeviceStatus) -> bool {
        let norm = |c: &str| c.replace('-', "").to_ascii_uppercase();
        let mut st = self.st();
        match st.devices.values_mut().find(|d| norm(&d.user_code) == norm(user_code)) {
            Some(d) => {
                d.status = s;
                true
            }
            None => false,
        }
    }

    // ---- direct minting ----

    /// Mints an access + refresh token for `user` (client [`CLIENT_ID`]) without any HTTP.
    pub fn issue_tokens(&self, user: &str, scopes: &str) -> (String, String) {
        let mut st = self.st();
        let refresh = new_refresh(&mut st, user, scopes, CLIENT_ID);
        let access = new_access(&mut st, user, scopes, CLIENT_ID, Some(refresh.clone()));
        (access, refresh)
    }

    /// Mints only an access token for `user`.
    pub fn issue_access_token(&self, user: &str, scopes: &str) -> String {
        let mut st = self.st();
        new_access(&mut st, user, scopes, CLIENT_ID, None)
    }

    // ---- observability ----

    /// Requests received at `/token` with this `grant_type` (any outcome, injected failures included).
    pub fn token_requests(&self, grant: &str) -> u64 {
        self.st().token_requests.get(grant).copied().unwrap_or(0)
    }

    /// All `/token` requests received.
    pub fn total_token_requests(&self) -> u64 {
        self.st().token_requests.values().sum()
    }

    /// Successful `refresh_token` grants.
    pub fn refreshes(&self) -> u64 {
        self.st().refreshes
    }

    /// Successful `authorization_code` exchanges.
    pub fn code_exchanges(&self) -> u64 {
        self.st().code_exchanges
    }

    /// `GET /authorize` requests received.
    pub fn authorize_hits(&self) -> u64 {
        self.st().authorize_hits
    }

    /// `POST /introspect` requests received (each Dovecot OAuth login makes one).
    pub fn introspections(&self) -> u64 {
        self.st().introspections
    }

    /// `(token, token_type_hint)` of every `/revoke` request, in order.
    pub fn revocations(&self) -> Vec<(String, Option<String>)> {
        self.st().revocations.clone()
    }

    /// Decoded form of the last `/token` request (client secrets included).
    pub fn last_token_request(&self) -> Option<HashMap<String, String>> {
        self.st().token_forms.last().cloned()
    }

    /// Decoded query of the last `/authorize` request.
    pub fn last_authorize_request(&self) -> Option<HashMap<String, String>> {
        self.st().last_authorize.clone()
    }

    /// Whether `tok` is a refresh token that would currently be accepted.
    pub fn is_refresh_token_valid(&self, tok: &str) -> bool {
        self.st().refresh.get(tok).is_some_and(|r| r.valid)
    }

    /// A view of the access tokens for another fake server (the fake
    /// Graph checks each bearer token's audience with it).
    pub fn token_view(&self) -> TokenView {
        TokenView(self.state.clone())
    }

    /// User an access token was issued for (even if no longer live).
    pub fn access_token_user(&self, tok: &str) -> Option<String> {
        self.st().access.get(tok).map(|a| a.user.clone())
    }
}

/// Looks up the provider's access tokens from another fake server.
#[derive(Clone)]
pub struct TokenView(Arc<Mutex<State>>);

impl TokenView {
    /// `(user, scope)` of a live access token: issued here, neither expired nor revoked.
    pub fn live(&self, tok: &str) -> Option<(String, String)> {
        let st = lock(&self.0);
        let a = st.access.get(tok)?;
        (!a.revoked && a.expires > Instant::now()).then(|| (a.user.clone(), a.scope.clone()))
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Plays the user's browser: opens `url` (the local start address, or a
/// provider address), follows every redirect with cookies kept, and returns
/// the last response's `(status, body)`: normally the loopback listener's
/// answer to the provider's redirect.
pub async fn approve_in_browser(url: &str) -> Result<(u16, String), String> {
    let u = url.to_string();
    tokio::task::spawn_blocking(move || approve_in_browser_blocking(&u))
        .await
        .map_err(|e| e.to_string())?
}

/// Blocking variant of [`approve_in_browser`].
pub fn approve_in_browser_blocking(url: &str) -> Result<(u16, String), String> {
    let (r, _) = http::Browser::new().open(url)?;
    Ok((r.status, r.text()))
}

/// Base64url (no padding) SHA-256 of `verifier`: the S256 PKCE challenge.
pub fn pkce_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn random_token(prefix: &str, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn new_refresh(st: &mut State, user: &str, scope: &str, client_id: &str) -> String {
    let t = random_token("rt-", 32);
    st.refresh.insert(
        t.clone(),
        RefreshTok {
            user: user.into(),
            scope: scope.into(),
            client_id: client_id.into(),
            valid: true,
        },
    );
    t
}

fn new_access(st: &mut State, user: &str, scope: &str, client_id: &str, refresh: Option<String>) -> String {
    let t = random_token("at-", 32);
    let ttl = st.access_ttl;
    st.access.insert(
        t.clone(),
        AccessTok {
            user: user.into(),
            scope: scope.into(),
            client_id: client_id.into(),
            issued: Instant::now(),
            expires: Instant::now() + ttl,
            exp_unix: unix_now() + ttl_secs(ttl),
            revoked: false,
            refresh,
        },
    );
    t
}

fn ttl_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn oauth_error(status: u16, error: &str, desc: &str) -> Response {
    let mut r = Response::json(status, &json!({ "error": error, "error_description": desc }));
    if status == 401 {
        r.headers
            .push(("WWW-Authenticate".into(), "Basic realm=\"fake-oauth\"".into()));
    }
    r
}

async fn serve_conn(mut sock: tokio::net::TcpStream, st: Arc<Mutex<State>>, base: String) {
    let (rd, mut wr) = sock.split();
    let Some(req) = http::read_request(rd).await else {
        return;
    };
    let (delay, drop_abandoned) = {
        let s = lock(&st);
        (s.token_delay, s.drop_abandoned)
    };
    if req.method == "POST" && req.path == "/token" && drop_abandoned && !delay.is_zero() {
        let end = tokio::time::Instant::now() + delay;
        let mut b = [0u8; 1];
        tokio::select! {
            _ = tokio::time::sleep_until(end) => {}
            r = wr.as_ref().peek(&mut b) => {
                if matches!(r, Ok(0) | Err(_)) {
                    lock(&st).abandoned += 1;
                    return;
                }
                tokio::time::sleep_until(end).await;
            }
        }
        let resp = token(&req, &mut lock(&st));
        let _ = wr.write_all(&resp.to_bytes()).await;
        let _ = wr.shutdown().await;
        return;
    }
    let resp = route(&req, &st, &base).await;
    let _ = wr.write_all(&resp.to_bytes()).await;
    let _ = wr.shutdown().await;
}

fn lock(st: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
    st.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn route(req: &Request, st: &Arc<Mutex<State>>, base: &str) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/authorize") => authorize(req, &mut lock(st)),
        ("POST", "/token") => {
            let delay = lock(st).token_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            token(req, &mut lock(st))
        }
        ("POST", "/device") => device(req, &mut lock(st), base),
        ("GET", "/device/verify") => Response::html(200, "Enter the code shown on your device."),
        ("POST" | "GET", "/introspect") => introspect(req, &mut lock(st)),
        ("POST", "/revoke") => revoke(req, &mut lock(st)),
        (_, "/authorize" | "/token" | "/device" | "/revoke") => Response::html(405, "method not allowed"),
        _ => Response::html(404, "not found"),
    }
}

fn authorize(req: &Request, st: &mut State) -> Response {
    st.authorize_hits += 1;
    let q = &req.query;
    st.last_authorize = Some(q.clone());
    let get = |k: &str| q.get(k).map(std::string::String::as_str).unwrap_or("");
    let Some(client) = st.clients.get(get("client_id")).cloned() else {
        return Response::html(400, "invalid_client: unknown client_id");
    };
    let redirect_uri = get("redirect_uri");
    // Never redirect to an unregistered URI (RFC 6749 §4.1.2.1): show an error page instead.
    if !client.redirect_allowed(redirect_uri) {
        return Response::html(400, "invalid_request: redirect_uri not registered");
    }
    if get("response_type") != "code" {
        return Response::html(400, "unsupported_response_type");
    }
    if get("code_challenge").is_empty() {
        return Response::html(400, "invalid_request: PKCE code_challenge required");
    }
    if get("code_challenge_method") != "S256" {
        return Response::html(400, "invalid_request: code_challenge_method must be S256");
    }
    let state = q.get("state").cloned();
    let mut loc = url::Url::parse(redirect_uri).expect("checked above");
    let user = match q.get("login_hint") {
        Some(h) if !h.is_empty() && !st.forced_user => h.clone(),
        _ => st.default_user.clone(),
    };
    let code = random_token("code-", 24);
    st.codes.insert(
        code.clone(),
        CodeGrant {
            client_id: client.client_id.clone(),
            redirect_uri: redirect_uri.into(),
            challenge: get("code_challenge").into(),
            user,
            scope: get("scope").into(),
            used: false,
            expires: Instant::now() + Duration::from_secs(600),
        },
    );
    {
        let mut qp = loc.query_pairs_mut();
        qp.append_pair("code", &code);
        if let Some(s) = &state {
            qp.append_pair("state", s);
        }
    }
    Response::redirect(loc.as_str())
}

/// Authenticates the client of a token/revoke request: Basic header or body params.
/// Returns the client or a ready-made `invalid_client` error.
fn authenticate_client(req: &Request, form: &HashMap<String, String>, st: &State) -> Result<ClientReg, Response> {
    if form.get("client_assertion_type").map(String::as_str)
        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return verify_assertion(form, st);
    }
    let (id, secret) = match req.basic_auth() {
        Some((id, secret)) => (id, Some(secret)),
        None => (
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned(),
        ),
    };
    let Some(client) = st.clients.get(&id) else {
        return Err(oauth_error(401, "invalid_client", "Unknown client"));
    };
    if let Some(expected) = &client.secret {
        if secret.as_deref() != Some(expected.as_str()) {
            return Err(oauth_error(
                401,
                "invalid_client",
                "Client authentication failed (bad or missing client_secret)",
            ));
        }
    }
    Ok(client.clone())
}

/// A compact JWT taken apart, its signature not checked yet.
struct Jwt<'a> {
    header: serde_json::Value,
    claims: serde_json::Value,
    /// What the signature covers: `header.claims`, as sent.
    signed: &'a str,
    sig: Vec<u8>,
}

impl<'a> Jwt<'a> {
    /// `Err` says what is malformed.
    fn parse(jwt: &'a str) -> Result<Jwt<'a>, &'static str> {
        let parts: Vec<&str> = jwt.split('.').collect();
        if parts.len() != 3 {
            return Err("not a JWT");
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (Ok(header), Ok(claims), Ok(sig)) = (b64.decode(parts[0]), b64.decode(parts[1]), b64.decode(parts[2]))
        else {
            return Err("bad base64url");
        };
        Ok(Jwt {
            header: serde_json::from_slice(&header).unwrap_or_default(),
            claims: serde_json::from_slice(&claims).unwrap_or_default(),
            signed: &jwt[..parts[0].len() + 1 + parts[1].len()],
            sig,
        })
    }

    /// RS256 by the key pair whose public key is `key`.
    fn verifies(&self, key: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key)
            .verify(self.signed.as_bytes(), &self.sig)
            .is_ok()
    }
}

/// RFC 7523 §3: RS256 signature by the client's registered key, `iss` and
/// `sub` equal to the client id, `aud` the token endpoint, not expired.
fn verify_assertion(form: &HashMap<String, String>, st: &State) -> Result<ClientReg, Response> {
    let bad = |why: &str| {
        Err(oauth_error(
            401,
            "invalid_client",
            &format!("client assertion rejected: {why}"),
        ))
    };
    let Some(jwt) = form.get("client_assertion") else {
        return bad("missing");
    };
    let jwt = match Jwt::parse(jwt) {
        Ok(j) => j,
        Err(why) => return bad(why),
    };
    let Jwt { header, claims, .. } = &jwt;
    if header["alg"] != "RS256" || header["x5t#S256"].as_str().is_none() {
        return bad("alg must be RS256 with an x5t#S256 thumbprint");
    }
    let id = claims["iss"].as_str().unwrap_or_default();
    if claims["sub"].as_str() != Some(id) || form.get("client_id").is_some_and(|c| c != id) {
        return bad("iss, sub and client_id differ");
    }
    if !claims["aud"].as_str().unwrap_or_default().ends_with("/token") {
        return bad("aud is not the token endpoint");
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    if claims["exp"].as_u64().unwrap_or(0) < now {
        return bad("expired");
    }
    let Some(client) = st.clients.get(id) else {
        return bad("unknown client");
    };
    let Some(key) = &client.assertion_key else {
        return bad("no key registered for this client");
    };
    if !jwt.verifies(key) {
        return bad("signature does not verify");
    }
    Ok(client.clone())
}

/// RFC 7523 §2.1 and §3, as Google does it for service accounts: an RS256
/// assertion by a registered service account (`iss`), for the mailbox in
/// `sub`, with `scope`, `aud` the token endpoint, `iat`/`exp` at most an
/// hour apart and not expired. The access token is `sub`'s; no refresh token.
fn jwt_bearer(form: &HashMap<String, String>, st: &mut State) -> Response {
    let bad = |why: &str| oauth_error(400, "invalid_grant", &format!("Invalid JWT: {why}"));
    let Some(jwt) = form.get("assertion") else {
        return oauth_error(400, "invalid_request", "assertion missing.");
    };
    let jwt = match Jwt::parse(jwt) {
        Ok(j) => j,
        Err(why) => return bad(why),
    };
    let Jwt { header, claims, .. } = &jwt;
    if header["alg"] != "RS256" {
        return bad("alg must be RS256");
    }
    let iss = claims["iss"].as_str().unwrap_or_default();
    let Some(key) = st.service_accounts.get(iss) else {
        return oauth_error(401, "invalid_client", "The OAuth client was not found.");
    };
    if !jwt.verifies(key) {
        return bad("Invalid JWT Signature.");
    }
    if !claims["aud"].as_str().unwrap_or_default().ends_with("/token") {
        return bad("aud is not the token endpoint");
    }
    let (iat, exp) = (claims["iat"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(0));
    let now = unix_now();
    if exp < now || exp < iat || exp - iat > 3600 || iat > now + 60 {
        return bad("Token must be a short-lived token (60 minutes) and in a reasonable timeframe.");
    }
    let Some(sub) = claims["sub"].as_str().filter(|s| s.contains('@')) else {
        return oauth_error(
            401,
            "unauthorized_client",
            "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
        );
    };
    let Some(scope) = claims["scope"].as_str().filter(|s| !s.is_empty()).map(str::to_string) else {
        return oauth_error(400, "invalid_scope", "Empty or missing scope not allowed.");
    };
    let (sub, iss) = (sub.to_string(), iss.to_string());
    st.jwt_subjects.push(sub.clone());
    let access = new_access(st, &sub, &scope, &iss, None);
    token_success(st, &access, None, &scope)
}

fn token_success(st: &State, access: &str, refresh: Option<&str>, scope: &str) -> Response {
    let mut v = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": st.advertised_expires_in.unwrap_or(ttl_secs(st.access_ttl)),
        "scope": scope,
    });
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r);
    }
    Response::json(200, &v)
}

/// Like an OpenID Connect provider, a grant made by a person also names who
/// signed in: an (unsigned, test-only) `id_token` with the `email` claim.
fn with_id_token(mut r: Response, user: &str) -> Response {
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let jwt = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"email": user, "sub": user}))
    );
    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&r.body) {
        v["id_token"] = json!(jwt);
        r = Response::json(200, &v);
    }
    r
}

fn token(req: &Request, st: &mut State) -> Response {
    let form = req.form();
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    *st.token_requests.entry(grant.clone()).or_default() += 1;
    st.token_forms.push(form.clone());
    if let Some(inj) = st.inject.pop_front() {
        return Response::raw(inj.status, "application/json", inj.body);
    }
    // A service account authenticates by its signed assertion alone.
    if grant == JWT_BEARER_GRANT {
        return jwt_bearer(&form, st);
    }
    let client = match authenticate_client(req, &form, st) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let f = |k: &str| form.get(k).map(std::string::String::as_str).unwrap_or("");
    match grant.as_str() {
        "authorization_code" => {
            let code = f("code");
            let Some(g) = st.codes.get_mut(code) else {
                return oauth_error(
                    400,
                    "invalid_grant",
                    "AADSTS70000: The provided authorization code is invalid.",
                );
            };
            if g.used {
                return oauth_error(
                    400,
                    "invalid_grant",
                    "AADSTS54005: OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
                );
            }
            // A code is single-use even when the exchange fails below (RFC 6749 §4.1.2).
            g.used = true;
            let g = g.clone();
            if g.expires < Instant::now() {
                return oauth_error(400, "invalid_grant", "Authorization code expired.");
            }
            if g.client_id != client.client_id {
                return oauth_error(400, "invalid_grant", "Code was issued to another client.");
            }
            if f("redirect_uri") != g.redirect_uri {
                return oauth_error(
                    400,
                    "invalid_grant",
                    "redirect_uri does not match the authorization request.",
                );
            }
            let verifier = f("code_verifier");
            if verifier.is_empty() {
                return oauth_error(400, "invalid_grant", "PKCE code_verifier missing.");
            }
            if pkce_challenge(verifier) != g.challenge {
                return oauth_error(
                    400,
                    "invalid_grant",
                    "PKCE verification failed: code_verifier does not match code_challenge.",
                );
            }
            let refresh = new_refresh(st, &g.user, &g.scope, &client.client_id);
            let access = new_access(st, &g.user, &g.scope, &client.client_id, Some(refresh.clone()));
            st.code_exchanges += 1;
            with_id_token(token_success(st, &access, Some(&refresh), &g.scope), &g.user)
        }
        "refresh_token" => {
            let rt = f("refresh_token").to_string();
            let Some(r) = st.refresh.get(&rt).cloned() else {
                return oauth_error(400, "invalid_grant", "Unknown refresh token.");
            };
            if !r.valid {
                let why = st.dead_refresh_description.clone().unwrap_or_else(|| {
                    "AADSTS70008: The provided authorization code or refresh token has expired due to inactivity."
                        .into()
                });
                return oauth_error(400, "invalid_grant", &why);
            }
            if r.client_id != client.client_id {
                return oauth_error(400, "invalid_grant", "Refresh token was issued to another client.");
            }
            let scope = match form.get("scope") {
                Some(s) if !s.is_empty() => s.clone(),
                _ => r.scope.clone(),
            };
            let new_rt = if st.rotate_refresh {
                st.refresh.get_mut(&rt).unwrap().valid = false;
                Some(new_refresh(st, &r.user, &r.scope, &client.client_id))
            } else {
                None
            };
            let parent = new_rt.clone().unwrap_or(rt);
            let access = new_access(st, &r.user, &scope, &client.client_id, Some(parent));
            st.refreshes += 1;
            token_success(st, &access, new_rt.as_deref(), &scope)
        }
        DEVICE_GRANT => {
            let dc = f("device_code").to_string();
            let Some(d) = st.devices.get(&dc).cloned() else {
                return oauth_error(400, "invalid_grant", "Unknown device_code.");
            };
            if d.client_id != client.client_id {
                return oauth_error(400, "invalid_grant", "device_code was issued to another client.");
            }
            if d.expires < Instant::now() {
                return oauth_error(400, "expired_token", "The device_code has expired.");
            }
            if st.slow_down_polls > 0 {
                st.slow_down_polls -= 1;
                return oauth_error(400, "slow_down", "Polling too fast; add 5 seconds to the interval.");
            }
            if d.redeemed {
                return oauth_error(400, "invalid_grant", "device_code was already redeemed.");
            }
            match d.status {
                DeviceStatus::Pending => oauth_error(
                    400,
                    "authorization_pending",
                    "The user has not yet completed authorization.",
                ),
                DeviceStatus::Denied => {
                    oauth_error(400, "access_denied", "The end-user denied the authorization request.")
                }
                DeviceStatus::Approved(user) => {
                    st.devices.get_mut(&dc).unwrap().redeemed = true;
                    let refresh = new_refresh(st, &user, &d.scope, &client.client_id);
                    let access = new_access(st, &user, &d.scope, &client.client_id, Some(refresh.clone()));
                    with_id_token(token_success(st, &access, Some(&refresh), &d.scope), &user)
                }
            }
        }
        "client_credentials" => {
            let scope = f("scope").to_string();
            let user = st.default_user.clone();
            let access = new_access(st, &user, &scope, &client.client_id, None);
            token_success(st, &access, None, &scope)
        }
        "" => oauth_error(400, "invalid_request", "grant_type missing."),
        other => oauth_error(
            400,
            "unsupported_grant_type",
            &format!("grant_type {other} is not supported."),
        ),
    }
}

/// `interval` of `/device` answers (RFC 8628's default is 5 s).
const DEVICE_INTERVAL_SECS: u64 = 1;
/// Lifetime of device codes; past it polls get `expired_token`.
const DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(600);

fn device(req: &Request, st: &mut State, base: &str) -> Response {
    let form = req.form();
    let client_id = req
        .basic_auth()
        .map(|(id, _)| id)
        .or_else(|| form.get("client_id").cloned())
        .unwrap_or_default();
    if !st.clients.contains_key(&client_id) {
        return oauth_error(401, "invalid_client", "Unknown client");
    }
    let device_code = random_token("dc-", 24);
    // RFC 8628 §6.1: short code from a consonant-only alphabet, shown as XXXX-XXXX.
    const ALPHA: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let mut rng = rand::thread_rng();
    let mut code = String::new();
    for i in 0..8 {
        if i == 4 {
            code.push('-');
        }
        code.push(ALPHA[(rng.next_u32() as usize) % ALPHA.len()] as char);
    }
    let lifetime = DEVICE_CODE_LIFETIME;
    st.devices.insert(
        device_code.clone(),
        DeviceGrant {
            user_code: code.clone(),
            client_id,
            scope: form.get("scope").cloned().unwrap_or_default(),
            status: DeviceStatus::Pending,
            expires: Instant::now() + lifetime,
            redeemed: false,
        },
    );
    let verify = format!("{base}/device/verify");
    Response::json(
        200,
        &json!({
            "device_code": device_code,
            "user_code": code,
            "verification_uri": verify,
            "verification_uri_complete": format!("{verify}?user_code={code}"),
            "expires_in": ttl_secs(lifetime),
            "interval": DEVICE_INTERVAL_SECS,
        }),
    )
}

fn introspect(req: &Request, st: &mut State) -> Response {
    st.introspections += 1;
    let mut form = req.form();
    // Tolerate GET-style callers too: token in the query or as a Bearer header.
    if !form.contains_key("token") {
        if let Some(t) = req.query.get("token") {
            form.insert("token".into(), t.clone());
        } else if let Some(a) = req.header("authorization") {
            if let Some(t) = a.strip_prefix("Bearer ") {
                form.insert("token".into(), t.trim().into());
            }
        }
    }
    let tok = form.get("token").cloned().unwrap_or_default();
    match st.access.get(&tok) {
        Some(a) if !a.revoked && a.expires > Instant::now() => Response::json(
            200,
            &json!({
                "active": true,
                "email": a.user,
                "username": a.user,
                "sub": a.user,
                "scope": a.scope,
                "client_id": a.client_id,
                "token_type": "Bearer",
                "exp": a.exp_unix,
            }),
        ),
        _ => Response::json(200, &json!({ "active": false })),
    }
}

fn revoke(req: &Request, st: &mut State) -> Response {
    let form = req.form();
    let tok = form.get("token").cloned().unwrap_or_default();
    st.revocations.push((tok.clone(), form.get("token_type_hint").cloned()));
    if tok.is_empty() {
        return oauth_error(400, "invalid_request", "token missing");
    }
    if let Some(r) = st.refresh.get_mut(&tok) {
        r.valid = false;
        for a in st.access.values_mut() {
            if a.refresh.as_deref() == Some(tok.as_str()) {
                a.revoked = true;
            }
        }
    } else if let Some(a) = st.access.get_mut(&tok) {
        a.revoked = true;
    }
    // RFC 7009 §2.2: unknown tokens are not an error.
    Response::raw(200, "application/json", "{}")
}

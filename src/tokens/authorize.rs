//! An on-demand authorisation in progress, and the loopback listener of a
//! browser one.
//!
//! Nobody but the person at the browser ever sees the provider's URL or its
//! `state`: clients, the log and the status page get a *local start
//! address* (`/authorize/ACCOUNT`) that answers each visit with a 302 to the
//! provider carrying a fresh PKCE verifier and `state` (older ones stop
//! working). The redirect listener accepts exactly one valid callback; when
//! the account has no local password yet, its answer is the completion page
//! where the owner sets one (or takes a generated one), reachable only
//! through that callback's one-time token, and only from the browser that
//! visited the start address (its cookie, see [`crate::oauth::login`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use super::{AccountTokens, Finished, Pending, TokenManager};
use crate::config::OAuthSettings;
use crate::http::{read_request, refuse, respond, respond_raw, visitor, HttpRequest, Visitor};
pub use crate::oauth::login::{account_of_start_path, start_path};
use crate::oauth::login::{callback, origin, BrowserBinding, Callback, RedirectListener, OTHER_BROWSER};
use crate::oauth::{self, AuthRequest, OAuthError};
use crate::secret::Secret;
use crate::sync;

/// How long an on-demand authorisation (and its completion page) lasts.
pub const AUTHORIZATION_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Connections the redirect listener (and the status page) serve at once.
pub const MAX_HTTP_CONNECTIONS: usize = 32;
/// Time allowed to send one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

static FLIGHT_IDS: AtomicU64 = AtomicU64::new(1);

/// One authorisation in progress. Cloning shares it.
#[derive(Clone)]
pub(crate) struct Flight {
    pub id: u64,
    /// What clients are told.
    pub pending: Pending,
    /// Device flow: what the status page shows (never the clients).
    pub device: Option<DeviceShown>,
    pub browser: Option<Arc<BrowserFlow>>,
}

impl Flight {
    pub fn new(pending: Pending, device: Option<DeviceShown>, browser: Option<Arc<BrowserFlow>>) -> Flight {
        Flight {
            id: FLIGHT_IDS.fetch_add(1, Ordering::Relaxed),
            pending,
            device,
            browser,
        }
    }
}

/// The device flow's instructions (not secrets bound to a `state`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DeviceShown {
    pub verification_uri: String,
    pub user_code: String,
}

/// A browser authorisation's live parts.
pub(crate) struct BrowserFlow {
    account: String,
    settings: OAuthSettings,
    redirect_uri: String,
    redirect_path: String,
    /// The request of the latest visit to the start address; a callback must
    /// carry its `state`. Taken by the one valid callback.
    current: SyncMutex<Option<AuthRequest>>,
    /// The browser of the latest visit: only it may call back and complete.
    browser: BrowserBinding,
    called_back: AtomicBool,
    completion: SyncMutex<Option<Completion>>,
    pub(crate) cancel: CancellationToken,
}

struct Completion {
    token: Secret,
    generated: Secret,
}

fn random(bytes: usize) -> String {
    use base64::Engine;
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A strong password a person can type: 4 groups of 5 letters and digits.
fn generated_password() -> Secret {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut b = [0u8; 20];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let chars: Vec<char> = b
        .iter()
        .map(|x| ALPHABET[usize::from(*x) % ALPHABET.len()] as char)
        .collect();
    let groups: Vec<String> = chars.chunks(5).map(|c| c.iter().collect()).collect();
    Secret::new(groups.join("-"))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl BrowserFlow {
    pub fn new(
        account: &str,
        settings: &OAuthSettings,
        redirect_uri: &str,
        redirect_path: &str,
        port: u16,
    ) -> BrowserFlow {
        BrowserFlow {
            browser: BrowserBinding::new(port),
            account: account.to_string(),
            settings: settings.clone(),
            redirect_uri: redirect_uri.to_string(),
            redirect_path: redirect_path.to_string(),
            current: SyncMutex::new(None),
            called_back: AtomicBool::new(false),
            completion: SyncMutex::new(None),
            cancel: CancellationToken::new(),
        }
    }

    /// The start address on the redirect listener itself, at the redirect's
    /// own host, so the cookie it sets comes back with the callback.
    pub fn start_url(&self) -> String {
        format!("{}{}", origin(&self.redirect_uri), start_path(&self.account))
    }

    /// A visit to the start address: a fresh request (PKCE and `state`) and
    /// browser cookie, replacing the previous ones. The provider's address
    /// and the `Set-Cookie` value; `None` once the callback came.
    fn visit(&self) -> Result<Option<(String, String)>, OAuthError> {
        if self.called_back.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let req = oauth::authorization_request(&self.account, &self.settings, &self.redirect_uri)?;
        let url = req.url.clone();
        let mut cur = sync::lock(&self.current);
        *cur = Some(req);
        let cookie = self.browser.issue();
        Ok(Some((url, cookie)))
    }

    /// The request a callback's query belongs to, taken (exactly one valid
    /// callback per authorisation), or why it is ignored.
    fn take_for(&self, req: &HttpRequest) -> Result<(AuthRequest, Callback), &'static str> {
        let query = req.query();
        let mut cur = sync::lock(&self.current);
        let Some(auth) = cur.as_ref() else {
            return Err("this sign-in is not expected (open the start address again)");
        };
        if !self.browser.matches(req) {
            return Err(OTHER_BROWSER);
        }
        let req = auth;
        match callback(&self.account, req, query) {
            Callback::Ignore(why) => Err(why),
            outcome => {
                self.called_back.store(true, Ordering::SeqCst);
                Ok((cur.take().expect("checked above"), outcome))
            }
        }
    }
}

/// Serves the redirect listener of one browser authorisation until it is
/// finished (password set or not needed), cancelled, or timed out.
pub(crate) async fn serve(
    listener: RedirectListener,
    flow: Arc<BrowserFlow>,
    tokens: Arc<TokenManager>,
    acct: Arc<AccountTokens>,
    flight_id: u64,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    let done = CancellationToken::new();
    let deadline = tokio::time::sleep(AUTHORIZATION_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            _ = flow.cancel.cancelled() => break,
            _ = done.cancelled() => break,
            _ = &mut deadline => {
                tokens.authorization_timed_out(&acct, flight_id).await;
                break;
            }
        };
        // Another local user's connection is refused before it takes a slot.
        if let Visitor::Stranger(uid) = visitor(&sock) {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, refuse(&mut sock, uid, "the sign-in redirect")).await;
            });
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(sock); // over the cap: closed at once
            continue;
        };
        let (flow, tokens, acct, done) = (flow.clone(), tokens.clone(), acct.clone(), done.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(local) = sock.local_addr() else { return };
            let Ok(Some(req)) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut sock)).await else {
                return;
            };
            let finished = handle(&mut sock, local, &req, &flow, &tokens, &acct, flight_id).await;
            if finished {
                done.cancel();
            }
        });
    }
}

/// One request to the redirect listener. True when the flow is over.
async fn handle(
    sock: &mut tokio::net::TcpStream,
    local: SocketAddr,
    req: &HttpRequest,
    flow: &BrowserFlow,
    tokens: &Arc<TokenManager>,
    acct: &Arc<AccountTokens>,
    flight_id: u64,
) -> bool {
    if !req.host_is(local) {
        let _ = respond(sock, "421 Misdirected Request", "Not this listener's address.").await;
        return false;
    }
    if req.method == "POST" {
        if req.cross_origin(local) {
            let _ = respond(sock, "403 Forbidden", "Cross-origin request refused.").await;
            return false;
        }
        if req.path() == "/complete" {
            return complete(sock, req, flow, tokens, acct).await;
        }
        let _ = respond(sock, "404 Not Found", "Not found.").await;
        return false;
    }
    if req.method != "GET" {
        let _ = respond(sock, "405 Method Not Allowed", "Method not allowed.").await;
        return false;
    }
    if account_of_start_path(req.path()).is_some_and(|a| a.eq_ignore_ascii_case(&flow.account)) {
        match flow.visit() {
            Ok(Some((url, cookie))) => {
                let _ = respond_raw(
                    sock,
                    "302 Found",
                    "text/plain",
                    &[("Location", &url), ("Set-Cookie", &cookie)],
                    b"",
                )
                .await;
            }
            Ok(None) => {
                let _ = respond(sock, "410 Gone", "This authorisation has already been used.").await;
            }
            Err(e) => {
                let _ = respond(sock, "500 Internal Server Error", &e.to_string()).await;
            }
        }
        return false;
    }
    if req.path() != flow.redirect_path {
        let _ = respond(sock, "404 Not Found", "Not the mailproxy redirect.").await;
        return false;
    }
    let (auth, outcome) = match flow.take_for(req) {
        Ok(x) => x,
        Err(why) => {
            let _ = respond(sock, "400 Bad Request", &format!("mailproxy: {why}")).await;
            return false;
        }
    };
    let result = match outcome {
        Callback::Code(code) => {
            oauth::exchange_code(&tokens.http, &flow.account, &flow.settings, auth, code.expose()).await
        }
        Callback::Failed(e) => Err(e),
        Callback::Ignore(_) => unreachable!("filtered by take_for"),
    };
    match tokens.finish_authorization(acct, flight_id, result).await {
        Finished::NeedsPassword => {
            let (token, generated) = (Secret::new(random(32)), generated_password());
            let page = completion_page(&flow.account, &token, &generated);
            *sync::lock(&flow.completion) = Some(Completion { token, generated });
            let _ = respond_raw(sock, "200 OK", "text/html; charset=utf-8", &[], page.as_bytes()).await;
            false
        }
        Finished::Done(text) => {
            let _ = respond(sock, "200 OK", &format!("mailproxy: {text} You can close this window.")).await;
            true
        }
        Finished::Failed(why) => {
            let _ = respond(
                sock,
                "400 Bad Request",
                &format!("mailproxy: authorisation failed: {why}"),
            )
            .await;
            true
        }
    }
}

fn completion_page(account: &str, token: &Secret, generated: &Secret) -> String {
    format!(
        "<!doctype html><meta charset=utf-8><title>mailproxy: finish {a}</title>\
         <h1>{a} is authorised</h1>\
         <p>Choose the local password your mail client will use with mailproxy.</p>\
         <form method=post action=/complete><input type=hidden name=token value=\"{t}\">\
         <p>A generated password, shown only now: <code id=generated>{g}</code></p>\
         <p><button name=choice value=generated>Use this password</button></p></form>\
         <form method=post action=/complete><input type=hidden name=token value=\"{t}\">\
         <input type=hidden name=choice value=own>\
         <p>Or your own: <input type=password name=password autocomplete=new-password> \
         repeat: <input type=password name=repeat autocomplete=new-password> \
         <button>Set password</button></p></form>\n",
        a = esc(account),
        t = esc(token.expose()),
        g = esc(generated.expose()),
    )
}

/// `POST /complete`: sets the local password once, with the page's token.
async fn complete(
    sock: &mut tokio::net::TcpStream,
    req: &HttpRequest,
    flow: &BrowserFlow,
    tokens: &Arc<TokenManager>,
    acct: &Arc<AccountTokens>,
) -> bool {
    let form = req.form();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    enum Choice {
        Password(Secret),
        Mismatch,
        Invalid,
    }
    let chosen = {
        let mut c = sync::lock(&flow.completion);
        let token_ok = flow.browser.matches(req)
            && match (c.as_ref(), field("token")) {
                (Some(comp), Some(t)) => bool::from(comp.token.expose().as_bytes().ct_eq(t.expose().as_bytes())),
                _ => false,
            };
        let choice = field("choice").map(|s| s.expose().to_string());
        if !token_ok {
            Choice::Invalid
        } else if choice.as_deref() == Some("generated") {
            c.take()
                .map_or(Choice::Invalid, |comp| Choice::Password(comp.generated))
        } else {
            match (field("password"), field("repeat")) {
                (Some(p), Some(r)) if !p.is_empty() && p == r => {
                    c.take();
                    Choice::Password(p)
                }
                _ => Choice::Mismatch,
            }
        }
    };
    let password = match chosen {
        Choice::Password(p) => Some(p),
        Choice::Mismatch => {
            let _ = respond(
                sock,
                "400 Bad Request",
                "The two passwords are empty or differ; go back and try again.",
            )
            .await;
            return false;
        }
        Choice::Invalid => None,
    };
    let Some(password) = password else {
        let _ = respond(sock, "403 Forbidden", "This page is not valid (any more).").await;
        return false;
    };
    match tokens.set_password_after_grant(acct, &password).await {
        Ok(()) => {
            let _ = respond(
                sock,
                "200 OK",
                &format!(
                    "mailproxy: the local password of {} is set. Configure your mail client with user name {} and that password. You can close this window.",
                    flow.account, flow.account
                ),
            )
            .await;
            true
        }
        Err(e) => {
            let _ = respond(sock, "500 Internal Server Error", &format!("mailproxy: {e}")).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_paths_round_trip() {
        for a in ["alice@gmail.com", "we ird/../x@y", "a+b@c"] {
            let p = start_path(a);
            assert!(!p[1..].contains("/.."), "{p}");
            assert_eq!(
                account_of_start_path(&p).as_deref(),
                Some(a.to_lowercase().as_str()),
                "{p}"
            );
        }
        assert_eq!(account_of_start_path("/status.json"), None);
    }

    #[test]
    fn generated_passwords_are_long_and_different() {
        let (a, b) = (generated_password(), generated_password());
        assert_eq!(a.expose().len(), 23);
        assert_ne!(a, b);
    }
}

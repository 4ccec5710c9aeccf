//! The browser side of `mailproxy login`: a one-shot loopback HTTP listener
//! that receives the provider's redirect with `code` and `state`, and the
//! pieces every loopback page shares.
//!
//! The redirect model: the redirect reaches only mailproxy. A `localhost`
//! redirect is heard on every address `localhost` names (127.0.0.1 and
//! ::1, one port), so no other local user can take the address a browser
//! tries first; the sign-in does not start while any of them is taken. On
//! Linux a loopback request from another local user is refused from its
//! uid. And a callback counts only from the browser that visited the local
//! start address, which set a cookie the callback must carry back: a code
//! and `state` relayed from elsewhere get nothing.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};

use super::{explain, AuthRequest, OAuthError};
use crate::config::{OAuthSettings, ProviderKind};
use crate::endpoint::is_loopback_host;
use crate::http::{read_request, refuse_stranger, respond, respond_raw, HttpRequest};
use crate::secret::Secret;
use crate::sync::lock;

pub enum Redirect {
    /// We listen on loopback; the browser comes back to us.
    Loopback {
        listener: RedirectListener,
        uri: String,
        path: String,
    },
    /// A pinned non-loopback redirect URI: the user pastes the URL the browser
    /// ended on.
    Paste { uri: String },
}

/// A redirect's loopback listener: one socket per address its host names,
/// all on one port.
pub struct RedirectListener {
    v4: Option<TcpListener>,
    v6: Option<TcpListener>,
    port: u16,
}

/// Whether a bind failed because this machine has no such address (no IPv6
/// loopback): then nobody else can listen there either.
fn address_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::Unsupported
    ) || e.raw_os_error() == Some(97) // EAFNOSUPPORT
}

impl RedirectListener {
    /// Listens on `host`'s loopback addresses at `port` (0: a free port
    /// that is free on every address). Refuses when another program holds
    /// any of them, since the browser may go there.
    pub async fn bind(host: &str, port: u16) -> std::io::Result<RedirectListener> {
        let host = host.trim_matches(['[', ']']);
        if host.eq_ignore_ascii_case("localhost") {
            return Self::bind_both(port).await;
        }
        let ip: std::net::IpAddr = host
            .parse()
            .map_err(|_| std::io::Error::other(format!("`{host}` is not a loopback address")))?;
        let l = TcpListener::bind((ip, port)).await?;
        let port = l.local_addr()?.port();
        Ok(match ip {
            std::net::IpAddr::V4(_) => RedirectListener {
                v4: Some(l),
                v6: None,
                port,
            },
            std::net::IpAddr::V6(_) => RedirectListener {
                v4: None,
                v6: Some(l),
                port,
            },
        })
    }

    async fn bind_both(port: u16) -> std::io::Result<RedirectListener> {
        let taken = |addr: &str, port: u16, e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "another program listens on {addr}:{port}, where a browser may send the sign-in for `localhost`; \
                     stop it or choose another port in redirect_uri ({e})"
                ),
            )
        };
        // A free port must be free on both addresses; a few tries find one.
        for _ in 0..32 {
            let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .await
                .map_err(|e| taken("127.0.0.1", port, e))?;
            let got = v4.local_addr()?.port();
            match TcpListener::bind((Ipv6Addr::LOCALHOST, got)).await {
                Ok(v6) => {
                    return Ok(RedirectListener {
                        v4: Some(v4),
                        v6: Some(v6),
                        port: got,
                    })
                }
                Err(e) if address_absent(&e) => {
                    return Ok(RedirectListener {
                        v4: Some(v4),
                        v6: None,
                        port: got,
                    })
                }
                Err(e) if port == 0 && e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(taken("[::1]", got, e)),
            }
        }
        Err(std::io::Error::other(
            "found no port free on both 127.0.0.1 and ::1 for the redirect",
        ))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next connection on any of the addresses.
    pub async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        match (&self.v4, &self.v6) {
            (Some(a), Some(b)) => tokio::select! {
                r = a.accept() => r,
                r = b.accept() => r,
            },
            (Some(l), None) | (None, Some(l)) => l.accept().await,
            (None, None) => std::future::pending().await,
        }
    }
}

impl Redirect {
    pub async fn bind(s: &OAuthSettings) -> std::io::Result<Redirect> {
        if let Some(u) = &s.redirect_uri {
            let url = url::Url::parse(u).map_err(|e| std::io::Error::other(format!("redirect_uri `{u}`: {e}")))?;
            let host = url.host_str().unwrap_or("").trim_matches(['[', ']']).to_string();
            if url.scheme() == "http" && is_loopback_host(&host) {
                let port = url.port_or_known_default().unwrap_or(80);
                let listener = RedirectListener::bind(&host, port).await.map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot listen on {host}:{port} for the redirect_uri {u}: {e}"),
                    )
                })?;
                return Ok(Redirect::Loopback {
                    listener,
                    uri: u.clone(),
                    path: url.path().to_string(),
                });
            }
            return Ok(Redirect::Paste { uri: u.clone() });
        }
        // Microsoft app registrations list `http://localhost`; any port matches it.
        let host = if s.provider == ProviderKind::Microsoft {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let listener = RedirectListener::bind(host, 0).await?;
        let port = listener.port();
        Ok(Redirect::Loopback {
            listener,
            uri: format!("http://{host}:{port}/"),
            path: "/".into(),
        })
    }

    /// Where the person starts the sign-in: the loopback listener's own
    /// start address (which binds the browser to the sign-in), or the
    /// provider's address when the redirect is pasted.
    pub fn start_url(&self, account: &str, req: &AuthRequest) -> String {
        match self {
            Redirect::Loopback { uri, .. } => format!("{}{}", origin(uri), start_path(account)),
            Redirect::Paste { .. } => req.url.clone(),
        }
    }

    pub fn uri(&self) -> &str {
        match self {
            Redirect::Loopback { uri, .. } | Redirect::Paste { uri } => uri,
        }
    }

    /// Waits for the browser (or reads the pasted URL) and returns the code.
    pub async fn wait(self, account: &str, req: &AuthRequest, timeout: Duration) -> Result<Secret, OAuthError> {
        match self {
            Redirect::Paste { .. } => {
                eprintln!("After approving, paste the full address your browser ended on, then press Enter:");
                let line = tokio::task::spawn_blocking(|| {
                    let mut s = String::new();
                    std::io::stdin().read_line(&mut s).map(|_| s)
                })
                .await
                .map_err(|e| OAuthError::Config(e.to_string()))?
                .map_err(|e| OAuthError::Config(format!("reading the pasted address: {e}")))?;
                let query = line
                    .trim()
                    .split_once('?')
                    .map(|(_, q)| q.to_string())
                    .unwrap_or_default();
                match callback(account, req, &query) {
                    Callback::Code(c) => Ok(c),
                    Callback::Failed(e) => Err(e),
                    Callback::Ignore(why) => Err(OAuthError::Config(format!(
                        "the pasted address is not the redirect: {why}"
                    ))),
                }
            }
            Redirect::Loopback { listener, path, .. } => tokio::time::timeout(timeout, async {
                let browser = BrowserBinding::new(listener.port());
                loop {
                    let Ok((mut sock, _)) = listener.accept().await else {
                        continue;
                    };
                    if refuse_stranger(&mut sock, "the sign-in redirect").await {
                        continue;
                    }
                    let Ok(Some(request)) =
                        tokio::time::timeout(Duration::from_secs(10), read_request(&mut sock)).await
                    else {
                        continue;
                    };
                    let local = sock.local_addr().ok();
                    if !local.is_some_and(|l| request.host_is(l)) {
                        let _ = respond(&mut sock, "421 Misdirected Request", "Not this listener's address.").await;
                        continue;
                    }
                    let (p, query) = (request.path(), request.query());
                    if request.method == "GET" && p == start_path(account) {
                        let cookie = browser.issue();
                        let _ = respond_raw(
                            &mut sock,
                            "302 Found",
                            "text/plain",
                            &[("Location", &req.url), ("Set-Cookie", &cookie)],
                            b"",
                        )
                        .await;
                        continue;
                    }
                    if p != path {
                        let _ = respond(&mut sock, "404 Not Found", "Not the mailproxy redirect.").await;
                        continue;
                    }
                    if !browser.matches(&request) {
                        let _ = respond(&mut sock, "400 Bad Request", &format!("mailproxy: {OTHER_BROWSER}")).await;
                        continue;
                    }
                    match callback(account, req, query) {
                        Callback::Code(c) => {
                            let _ = respond(
                                &mut sock,
                                "200 OK",
                                "mailproxy: authorisation received. You can close this window.",
                            )
                            .await;
                            return Ok(c);
                        }
                        Callback::Failed(e) => {
                            let _ = respond(
                                &mut sock,
                                "400 Bad Request",
                                &format!("mailproxy: authorisation failed: {e}"),
                            )
                            .await;
                            return Err(e);
                        }
                        Callback::Ignore(why) => {
                            let _ = respond(&mut sock, "400 Bad Request", &format!("mailproxy: {why}")).await;
                        }
                    }
                }
            })
            .await
            .map_err(|_| {
                OAuthError::Config(format!(
                    "no answer from the browser within {} s; run the login again",
                    timeout.as_secs()
                ))
            })?,
        }
    }
}

/// What a callback without this browser's cookie is told.
pub(crate) const OTHER_BROWSER: &str =
    "this sign-in was not started in this browser; open the start address again, in the browser that signs in";

/// `/authorize/ACCOUNT` with the account name percent-encoded: the local
/// start address's path.
pub fn start_path(account: &str) -> String {
    let mut p = String::from("/authorize/");
    for b in account.to_lowercase().bytes() {
        if b.is_ascii_alphanumeric() || b"@._-+".contains(&b) {
            p.push(char::from(b));
        } else {
            p.push_str(&format!("%{b:02X}"));
        }
    }
    p
}

/// The account a `/authorize/...` path names, if it is one.
pub fn account_of_start_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/authorize/")?;
    let decoded: String = url::form_urlencoded::parse(format!("a={}", rest.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())?;
    (!decoded.is_empty()).then_some(decoded)
}

/// `http://host:port` of a URL (its scheme, host and port, no path).
pub fn origin(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(u) => u.origin().ascii_serialization(),
        Err(_) => uri.trim_end_matches('/').to_string(),
    }
}

fn random_token() -> String {
    use base64::Engine;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Binds a sign-in to the browser that visited the start address: each
/// visit sets a fresh secret cookie (older ones stop counting), and the
/// callback and the completion page count only with it. Cookies are per
/// host, not per port, so the name carries the listener's port.
pub struct BrowserBinding {
    name: String,
    current: Mutex<Option<Secret>>,
}

impl BrowserBinding {
    pub fn new(port: u16) -> BrowserBinding {
        BrowserBinding {
            name: format!("mailproxy_signin_{port}"),
            current: Mutex::new(None),
        }
    }

    /// A new secret for this visit; returns the `Set-Cookie` value.
    /// `SameSite=Lax`: the provider's redirect back is a top-level
    /// navigation, which carries it; other sites' subrequests do not.
    pub fn issue(&self) -> String {
        let value = random_token();
        let header = format!("{}={value}; Path=/; HttpOnly; SameSite=Lax", self.name);
        *lock(&self.current) = Some(Secret::new(value));
        header
    }

    /// The request carries the latest visit's cookie.
    pub fn matches(&self, req: &HttpRequest) -> bool {
        let cur = lock(&self.current);
        let Some(want) = cur.as_ref() else { return false };
        req.cookies(&self.name)
            .any(|v| bool::from(want.expose().as_bytes().ct_eq(v.as_bytes())))
    }
}

pub(crate) enum Callback {
    Code(Secret),
    Failed(OAuthError),
    /// A stray or forged request (wrong `state`): ignored, we keep waiting.
    Ignore(&'static str),
}

pub(crate) fn callback(account: &str, req: &AuthRequest, query: &str) -> Callback {
    let mut code = None;
    let mut state = None;
    let mut error = None;
    let mut description = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "code" => code = Some(Secret::new(v.into_owned())),
            "state" => state = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            "error_description" => description = Some(v.into_owned()),
            _ => {}
        }
    }
    if !state.as_deref().is_some_and(|s| req.state_matches(s)) {
        return Callback::Ignore("the state parameter does not match this login; ignored");
    }
    if let Some(e) = error {
        return Callback::Failed(OAuthError::Provider(explain(account, &e, description.as_deref())));
    }
    match code {
        Some(c) if !c.is_empty() => Callback::Code(c),
        _ => Callback::Ignore("the redirect carries no code"),
    }
}

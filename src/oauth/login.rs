//! The browser side of `mailproxy login`: a one-shot loopback HTTP listener
//! that receives the provider's redirect with `code` and `state`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{explain, AuthRequest, OAuthError};
use crate::config::{OAuthSettings, ProviderKind};
use crate::endpoint::is_loopback_host;
use crate::secret::Secret;

pub enum Redirect {
    /// We listen on loopback; the browser comes back to us.
    Loopback {
        listener: TcpListener,
        uri: String,
        path: String,
    },
    /// A pinned non-loopback redirect URI: the user pastes the URL the browser
    /// ended on.
    Paste { uri: String },
}

impl Redirect {
    pub async fn bind(s: &OAuthSettings) -> std::io::Result<Redirect> {
        if let Some(u) = &s.redirect_uri {
            let url = url::Url::parse(u).map_err(|e| std::io::Error::other(format!("redirect_uri `{u}`: {e}")))?;
            let host = url.host_str().unwrap_or("").trim_matches(['[', ']']).to_string();
            if url.scheme() == "http" && is_loopback_host(&host) {
                let port = url.port_or_known_default().unwrap_or(80);
                let bind_host = if host.eq_ignore_ascii_case("localhost") {
                    "127.0.0.1".to_string()
                } else {
                    host
                };
                let listener = TcpListener::bind((bind_host.as_str(), port)).await.map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot listen on {bind_host}:{port} for the redirect_uri {u}: {e}"),
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
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        // Microsoft app registrations list `http://localhost`; any port matches it.
        let host = if s.provider == ProviderKind::Microsoft {
            "localhost"
        } else {
            "127.0.0.1"
        };
        Ok(Redirect::Loopback {
            listener,
            uri: format!("http://{host}:{port}/"),
            path: "/".into(),
        })
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
                loop {
                    let Ok((mut sock, _)) = listener.accept().await else {
                        continue;
                    };
                    let Ok(Some(request)) =
                        tokio::time::timeout(Duration::from_secs(10), read_request(&mut sock)).await
                    else {
                        continue;
                    };
                    let local = listener.local_addr().ok();
                    if !local.is_some_and(|l| request.host_is(l)) {
                        let _ = respond(&mut sock, "421 Misdirected Request", "Not this listener's address.").await;
                        continue;
                    }
                    let (p, query) = (request.path(), request.query());
                    if p != path {
                        let _ = respond(&mut sock, "404 Not Found", "Not the mailproxy redirect.").await;
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

/// One HTTP/1.1 request as the loopback listeners need it (no keep-alive,
/// bounded head and body).
pub struct HttpRequest {
    pub method: String,
    pub target: String,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn query(&self) -> &str {
        self.target.split_once('?').map(|(_, q)| q).unwrap_or("")
    }

    /// The `Host` header names this listener's own loopback address (a
    /// browser tricked by DNS rebinding sends the attacker's name instead).
    pub fn host_is(&self, local: std::net::SocketAddr) -> bool {
        let Some(host) = self.header("host") else { return false };
        let port = local.port();
        let ok = [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ];
        let ip = match local.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            v4 => format!("{v4}:{port}"),
        };
        ok.iter()
            .chain(std::iter::once(&ip))
            .any(|h| h.eq_ignore_ascii_case(host.trim()))
    }

    /// A POST another site's page made the browser send: an `Origin` that is
    /// not this listener, or `Sec-Fetch-Site` other than same-origin.
    pub fn cross_origin(&self, local: std::net::SocketAddr) -> bool {
        if let Some(site) = self.header("sec-fetch-site") {
            if !matches!(site.trim(), "same-origin" | "none") {
                return true;
            }
        }
        match self.header("origin") {
            None => false,
            Some(o) => {
                let host = o.trim().strip_prefix("http://").unwrap_or("");
                let fake = HttpRequest {
                    method: String::new(),
                    target: String::new(),
                    headers: vec![("host".into(), host.to_string())],
                    body: vec![],
                };
                !fake.host_is(local)
            }
        }
    }

    /// The form fields of a urlencoded POST body.
    pub fn form(&self) -> Vec<(String, Secret)> {
        url::form_urlencoded::parse(&self.body)
            .map(|(k, v)| (k.into_owned(), Secret::new(v.into_owned())))
            .collect()
    }
}

/// Reads one request: head up to 16 KiB, body up to 16 KiB (Content-Length).
pub async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<HttpRequest> {
    const MAX: usize = 16 * 1024;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len().saturating_add(n) > MAX {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut req = HttpRequest {
        method,
        target,
        headers,
        body: buf[end.saturating_add(4)..].to_vec(),
    };
    let len: usize = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if len > MAX {
        return None;
    }
    while req.body.len() < len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        req.body.extend_from_slice(&chunk[..n]);
    }
    req.body.truncate(len);
    Some(req)
}

/// Writes a whole response and closes. `extra` are more header lines.
/// `Referrer-Policy: same-origin`: nothing of our addresses reaches other
/// sites, and a browser still sends our own `Origin` on the pages' POSTs
/// (under `no-referrer` it sends `Origin: null`, which the cross-origin check
/// must refuse).
pub async fn respond_raw(
    sock: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nX-Frame-Options: DENY\r\nReferrer-Policy: same-origin\r\nX-Content-Type-Options: nosniff\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await?;
    sock.shutdown().await
}

pub(crate) async fn respond(sock: &mut tokio::net::TcpStream, status: &str, text: &str) -> std::io::Result<()> {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>mailproxy</title><p>{}</p>\n",
        text.replace('&', "&amp;").replace('<', "&lt;")
    );
    respond_raw(sock, status, "text/html; charset=utf-8", &[], body.as_bytes()).await
}

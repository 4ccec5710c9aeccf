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
                    let Ok(Some(target)) = tokio::time::timeout(Duration::from_secs(10), read_target(&mut sock)).await
                    else {
                        continue;
                    };
                    let (p, query) = target.split_once('?').unwrap_or((&target, ""));
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

enum Callback {
    Code(Secret),
    Failed(OAuthError),
    /// A stray or forged request (wrong `state`): ignored, we keep waiting.
    Ignore(&'static str),
}

fn callback(account: &str, req: &AuthRequest, query: &str) -> Callback {
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

pub(crate) async fn read_target(sock: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > 16 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Some(target.to_string()),
        _ => None,
    }
}

pub(crate) async fn respond(sock: &mut tokio::net::TcpStream, status: &str, text: &str) -> std::io::Result<()> {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>mailproxy</title><p>{}</p>\n",
        text.replace('&', "&amp;").replace('<', "&lt;")
    );
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

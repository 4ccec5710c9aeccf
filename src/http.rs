//! One small HTTP/1.1 reader and writer for mailproxy's loopback pages
//! (the sign-in redirect, the status page, metrics): one request per
//! connection, bounded head and body, and the check of which local user
//! opened a connection.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::secret::Secret;

/// Who is on the other end of a loopback page's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visitor {
    /// The user who runs mailproxy.
    Owner,
    /// Another local user (its uid), or a peer the kernel no longer knows.
    Stranger(Option<u32>),
    /// Not a loopback peer, or this system cannot tell.
    Unknown,
}

/// Asks the kernel which local user opened `sock`'s other end.
pub fn visitor(sock: &TcpStream) -> Visitor {
    let (Ok(local), Ok(peer)) = (sock.local_addr(), sock.peer_addr()) else {
        return Visitor::Unknown;
    };
    if !crate::sys::is_loopback(peer.ip()) {
        return Visitor::Unknown;
    }
    match crate::sys::tcp_peer_uid(local, peer) {
        Ok(Some(uid)) if uid == crate::sys::euid() => Visitor::Owner,
        Ok(uid) => Visitor::Stranger(uid),
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(error = %e, "cannot ask the kernel which user opened a loopback connection; the local pages rely on their cookies alone");
            });
            Visitor::Unknown
        }
    }
}

/// Refuses (403, then closes) a connection another local user opened to one
/// of the owner's pages. True when refused.
pub async fn refuse_stranger(sock: &mut TcpStream, page: &str) -> bool {
    let Visitor::Stranger(uid) = visitor(sock) else {
        return false;
    };
    refuse(sock, uid, page).await;
    true
}

/// The 403 a stranger (`uid`, as the kernel named it) gets from one of the
/// owner's pages, logged.
pub async fn refuse(sock: &mut TcpStream, uid: Option<u32>, page: &str) {
    tracing::warn!(peer_uid = ?uid, page, "refused a request from another local user");
    let _ = respond(
        sock,
        "403 Forbidden",
        "This page belongs to the user who runs mailproxy; other local users are refused.",
    )
    .await;
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

    /// The values of the cookie `name` (every `Cookie` header, every pair).
    pub fn cookies<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(move |pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then_some(v)
            })
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
pub async fn read_request(sock: &mut TcpStream) -> Option<HttpRequest> {
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
    sock: &mut TcpStream,
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

pub async fn respond(sock: &mut TcpStream, status: &str, text: &str) -> std::io::Result<()> {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>mailproxy</title><p>{}</p>\n",
        text.replace('&', "&amp;").replace('<', "&lt;")
    );
    respond_raw(sock, status, "text/html; charset=utf-8", &[], body.as_bytes()).await
}

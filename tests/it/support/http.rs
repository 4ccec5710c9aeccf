//! Minimal HTTP/1.1 plumbing shared by the fake provider (server side) and tests
//! (a tiny blocking client that never follows redirects).
//!
//! Deliberately hand-written: every response uses `Connection: close`, so the
//! only framing we need is `Content-Length` (requests) and read-to-EOF (responses).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// A parsed HTTP request as seen by the fake servers.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path without the query string, e.g. `/token`.
    pub path: String,
    /// Decoded query parameters (last one wins on duplicates).
    pub query: HashMap<String, String>,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    /// Raw body bytes.
    pub body: Vec<u8>,
}

impl Request {
    /// Decoded `application/x-www-form-urlencoded` body (empty map for other bodies).
    pub fn form(&self) -> HashMap<String, String> {
        let ct = self.header("content-type").unwrap_or("");
        if ct.is_empty() || ct.starts_with("application/x-www-form-urlencoded") {
            parse_form(&self.body)
        } else {
            HashMap::new()
        }
    }

    /// Header value by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(std::string::String::as_str)
    }

    /// Credentials from an `Authorization: Basic` header. Per RFC 6749 §2.3.1 both
    /// parts are form-urlencoded before being base64'd, so decode them again.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        let v = self.header("authorization")?;
        let (scheme, rest) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (u, p) = raw.split_once(':')?;
        Some((percent_decode(u), percent_decode(p)))
    }
}

/// Decodes `a=b&c=d` with `+` as space and `%XX` escapes.
pub fn parse_form(bytes: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(bytes).into_owned().collect()
}

/// Form-decodes a single component.
pub fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Encodes pairs as an `application/x-www-form-urlencoded` string.
pub fn encode_form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

/// Reads one request from an async stream. `None` on EOF / malformed input.
pub async fn read_request<R: tokio::io::AsyncRead + Unpin>(stream: R) -> Option<Request> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.ok()?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_form(q.as_bytes())),
        None => (target.clone(), HashMap::new()),
    };
    Some(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// A response to be written by the fake servers.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// JSON response with the given status.
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        Response {
            status,
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                // RFC 6749 §5.1: token responses must not be cached.
                ("Cache-Control".into(), "no-store".into()),
                ("Pragma".into(), "no-cache".into()),
            ],
            body: v.to_string().into_bytes(),
        }
    }

    /// Raw body (e.g. a pre-serialised JSON error injected by a test).
    pub fn raw(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    /// Small HTML page.
    pub fn html(status: u16, text: &str) -> Response {
        Response::raw(
            status,
            "text/html; charset=utf-8",
            format!("<html><body><p>{text}</p></body></html>"),
        )
    }

    /// `302 Found` to `location`.
    pub fn redirect(location: &str) -> Response {
        Response {
            status: 302,
            headers: vec![("Location".into(), location.into())],
            body: Vec::new(),
        }
    }

    /// Serialises the response (always `Connection: close`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        ));
        let mut b = out.into_bytes();
        b.extend_from_slice(&self.body);
        b
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A response as seen by the blocking test client.
#[derive(Clone, Debug)]
pub struct ClientResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// Body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Body parsed as JSON (panics if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }
}

/// Blocking HTTP/1.1 request over plain TCP (http:// URLs only; no redirects followed).
/// `headers` are sent verbatim; `Content-Length` is added when `body` is non-empty.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<ClientResponse, String> {
    let u = url::Url::parse(url).map_err(|e| format!("bad url {url}: {e}"))?;
    if u.scheme() != "http" {
        return Err(format!("only http:// supported: {url}"));
    }
    let host = u.host_str().ok_or("no host")?.to_string();
    let port = u.port_or_known_default().unwrap_or(80);
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    // Browsers take `localhost` as ::1 first, then 127.0.0.1, whatever
    // /etc/hosts says; other names resolve as usual.
    let addrs: Vec<std::net::SocketAddr> = if bare_host.eq_ignore_ascii_case("localhost") {
        vec![
            (std::net::Ipv6Addr::LOCALHOST, port).into(),
            (std::net::Ipv4Addr::LOCALHOST, port).into(),
        ]
    } else {
        (bare_host, port)
            .to_socket_addrs()
            .map_err(|e| format!("resolve {host}: {e}"))?
            .collect()
    };
    // The listener may be IPv4 only: try every address.
    let mut last_err = String::from("no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = format!("connect {a}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_err)?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut path = u.path().to_string();
    if let Some(q) = u.query() {
        path.push('?');
        path.push_str(q);
    }
    let host_hdr = match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host_hdr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    // Servers we talk to close after the response; a reset after a full response is fine.
    let _ = stream.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<ClientResponse, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("incomplete response: {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = raw[end + 4..].to_vec();
    if let Some(len) = headers.get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(len);
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(ClientResponse { status, headers, body })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = b.windows(2).position(|w| w == b"\r\n") {
        let size_str = String::from_utf8_lossy(&b[..pos]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < pos + 2 + size {
            break;
        }
        out.extend_from_slice(&b[pos + 2..pos + 2 + size]);
        b = &b[(pos + 4 + size).min(b.len())..];
    }
    out
}

/// Blocking GET.
pub fn get(url: &str) -> Result<ClientResponse, String> {
    request("GET", url, &[], b"")
}

/// Blocking form POST.
pub fn post_form(url: &str, pairs: &[(&str, &str)]) -> Result<ClientResponse, String> {
    request(
        "POST",
        url,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        encode_form(pairs).as_bytes(),
    )
}

/// Blocking form POST with HTTP Basic client authentication (RFC 6749 §2.3.1 encoding).
pub fn post_form_basic(url: &str, user: &str, pass: &str, pairs: &[(&str, &str)]) -> Result<ClientResponse, String> {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let cred = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(user), enc(pass)));
    let auth = format!("Basic {cred}");
    request(
        "POST",
        url,
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Authorization", &auth),
        ],
        encode_form(pairs).as_bytes(),
    )
}

/// A small browser for the sign-in pages: follows redirects (as a top-level
/// navigation) and keeps cookies per host, as browsers do (not per port).
#[derive(Default, Clone)]
pub struct Browser {
    jar: HashMap<String, HashMap<String, String>>,
}

impl Browser {
    pub fn new() -> Browser {
        Browser::default()
    }

    /// The `Cookie` header this browser sends to `url`.
    pub fn cookies_for(&self, url: &str) -> Option<String> {
        let host = url::Url::parse(url).ok()?.host_str()?.to_string();
        let c = self.jar.get(&host)?;
        (!c.is_empty()).then(|| c.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; "))
    }

    fn keep(&mut self, url: &str, r: &ClientResponse) {
        let Some(set) = r.headers.get("set-cookie") else { return };
        let Some(host) = url::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_string)) else {
            return;
        };
        if let Some((k, v)) = set.split(';').next().and_then(|p| p.split_once('=')) {
            self.jar
                .entry(host)
                .or_default()
                .insert(k.trim().into(), v.trim().into());
        }
    }

    /// One request with this browser's cookies, no redirect followed.
    pub fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<ClientResponse, String> {
        let cookie = self.cookies_for(url);
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if let Some(c) = &cookie {
            h.push(("Cookie", c));
        }
        let r = request(method, url, &h, body)?;
        self.keep(url, &r);
        Ok(r)
    }

    /// GET `url`, following redirects; the final response and its address.
    pub fn open(&mut self, url: &str) -> Result<(ClientResponse, String), String> {
        let mut at = url.to_string();
        for _ in 0..8 {
            let r = self.send("GET", &at, &[], b"")?;
            if !matches!(r.status, 301 | 302 | 303 | 307) {
                return Ok((r, at));
            }
            let loc = r.headers.get("location").ok_or("redirect without Location")?;
            at = url::Url::parse(&at)
                .and_then(|u| u.join(loc))
                .map_err(|e| e.to_string())?
                .to_string();
        }
        Err(format!("too many redirects from {url}"))
    }

    /// A same-origin form POST (the page's own button), following a redirect.
    pub fn submit(&mut self, url: &str, pairs: &[(&str, &str)]) -> Result<ClientResponse, String> {
        let origin = url::Url::parse(url)
            .map_err(|e| e.to_string())?
            .origin()
            .ascii_serialization();
        let r = self.send(
            "POST",
            url,
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", &origin),
            ],
            encode_form(pairs).as_bytes(),
        )?;
        if matches!(r.status, 302 | 303) {
            let loc = r.headers.get("location").ok_or("redirect without Location")?;
            let to = url::Url::parse(url)
                .and_then(|u| u.join(loc))
                .map_err(|e| e.to_string())?;
            return Ok(self.open(to.as_str())?.0);
        }
        Ok(r)
    }
}

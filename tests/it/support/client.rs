//! Raw protocol client for tests: a line-oriented connection over plain TCP or
//! TLS (tokio-rustls), with STARTTLS upgrade and IMAP/SASL helpers. Bytes are
//! sent exactly as given so tests control the wire format.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Default timeout for every read in [`LineConn`].
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Plain or TLS TCP stream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS handshake on an established TCP stream.
pub async fn tls_handshake(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// A buffered line-oriented connection.
pub struct LineConn {
    inner: BufReader<Stream>,
}

/// One complete IMAP response: everything up to and including the tagged line.
#[derive(Debug, Default, Clone)]
pub struct ImapResponse {
    /// Untagged / continuation lines (without CRLF); a line that announced a literal
    /// ends with `{N}` and its bytes are in `literals` in order.
    pub lines: Vec<String>,
    /// Literal payloads, in order of appearance.
    pub literals: Vec<Vec<u8>>,
    /// The tagged status line (without CRLF), e.g. `a1 OK Logged in`.
    pub tagged: String,
}

impl ImapResponse {
    /// Whether the tagged status is OK.
    pub fn is_ok(&self) -> bool {
        self.tagged.split_whitespace().nth(1) == Some("OK")
    }
}

impl LineConn {
    /// Plain TCP to `127.0.0.1:port`.
    pub async fn plain(port: u16) -> std::io::Result<LineConn> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        Ok(LineConn {
            inner: BufReader::new(Stream::Plain(tcp)),
        })
    }

    /// A plain connection already made (e.g. from a chosen source address).
    pub fn from_tcp(tcp: TcpStream) -> LineConn {
        let _ = tcp.set_nodelay(true);
        LineConn {
            inner: BufReader::new(Stream::Plain(tcp)),
        }
    }

    /// Plain TCP to `addr` (e.g. `[::1]:port`).
    pub async fn plain_addr(addr: std::net::SocketAddr) -> std::io::Result<LineConn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(LineConn {
            inner: BufReader::new(Stream::Plain(tcp)),
        })
    }

    /// Implicit TLS to `127.0.0.1:port`, verifying the certificate for `server_name`.
    pub async fn tls(port: u16, config: Arc<rustls::ClientConfig>, server_name: &str) -> std::io::Result<LineConn> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let tls = tls_handshake(tcp, config, server_name).await?;
        Ok(LineConn {
            inner: BufReader::with_capacity(64 * 1024, Stream::Tls(Box::new(tls))),
        })
    }

    /// Upgrades a plain connection after a successful STARTTLS/STLS exchange.
    /// Panics if the server already sent bytes past its STARTTLS reply (injection).
    pub async fn starttls(self, config: Arc<rustls::ClientConfig>, server_name: &str) -> std::io::Result<LineConn> {
        assert!(
            self.inner.buffer().is_empty(),
            "server sent data after the STARTTLS response"
        );
        let Stream::Plain(tcp) = self.inner.into_inner() else {
            return Err(std::io::Error::other("already TLS"));
        };
        let tls = tls_handshake(tcp, config, server_name).await?;
        Ok(LineConn {
            inner: BufReader::with_capacity(64 * 1024, Stream::Tls(Box::new(tls))),
        })
    }

    /// Writes raw bytes and flushes.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let s = self.inner.get_mut();
        s.write_all(bytes).await?;
        s.flush().await
    }

    /// Writes `line` + CRLF.
    pub async fn send(&mut self, line: &str) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(line.len() + 2);
        b.extend_from_slice(line.as_bytes());
        b.extend_from_slice(b"\r\n");
        self.write_raw(&b).await
    }

    /// Reads one line including its line ending (empty vec on EOF).
    pub async fn read_line_raw(&mut self) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, self.inner.read_until(b'\n', &mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timeout"))??;
        Ok(buf)
    }

    /// Reads one line without CRLF. Errors on EOF.
    pub async fn read_line(&mut self) -> std::io::Result<String> {
        let raw = self.read_line_raw().await?;
        if raw.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_string())
    }

    /// Reads exactly `n` bytes.
    pub async fn read_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(IO_TIMEOUT, self.inner.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timeout"))??;
        Ok(buf)
    }

    /// Reads lines until one starts with `prefix` (returned); earlier lines are discarded.
    pub async fn read_until_prefix(&mut self, prefix: &str) -> std::io::Result<String> {
        loop {
            let l = self.read_line().await?;
            if l.starts_with(prefix) {
                return Ok(l);
            }
        }
    }

    /// Reads an SMTP reply (multi-line `250-...` continued until `250 ...`); returns all lines.
    pub async fn read_smtp_reply(&mut self) -> std::io::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let l = self.read_line().await?;
            let done = l.len() < 4 || l.as_bytes()[3] != b'-';
            lines.push(l);
            if done {
                return Ok(lines);
            }
        }
    }

    /// Reads an IMAP response up to the line tagged `tag`, collecting literals.
    /// Stops early (returning with empty `tagged`) at a `+` continuation request.
    pub async fn read_imap_response(&mut self, tag: &str) -> std::io::Result<ImapResponse> {
        let mut resp = ImapResponse::default();
        let tag_sp = format!("{tag} ");
        loop {
            let l = self.read_line().await?;
            if l.starts_with(&tag_sp) {
                resp.tagged = l;
                return Ok(resp);
            }
            if l.starts_with('+') {
                resp.lines.push(l);
                return Ok(resp);
            }
            let lit = literal_len(&l);
            resp.lines.push(l);
            // A literal may be followed by more of the same response line, which can
            // itself end in another literal: keep going until a line without one.
            let mut pending = lit;
            while let Some(n) = pending {
                resp.literals.push(self.read_exact(n).await?);
                let rest = self.read_line().await?;
                pending = literal_len(&rest);
                resp.lines.push(rest);
            }
        }
    }

    /// Sends `{tag} {command}` and reads the response.
    pub async fn imap(&mut self, tag: &str, command: &str) -> std::io::Result<ImapResponse> {
        self.send(&format!("{tag} {command}")).await?;
        self.read_imap_response(tag).await
    }
}

/// `N` if `line` ends with an IMAP literal announcement `{N}` or `{N+}`.
pub fn literal_len(line: &str) -> Option<usize> {
    let l = line.strip_suffix('}')?;
    let open = l.rfind('{')?;
    l[open + 1..].trim_end_matches('+').parse().ok()
}

/// SASL XOAUTH2 initial response (before base64): `user=U^Aauth=Bearer T^A^A`.
pub fn xoauth2_raw(user: &str, token: &str) -> String {
    format!("user={user}\x01auth=Bearer {token}\x01\x01")
}

/// Base64 of [`xoauth2_raw`].
pub fn xoauth2_b64(user: &str, token: &str) -> String {
    b64(xoauth2_raw(user, token).as_bytes())
}

/// SASL OAUTHBEARER (RFC 7628) initial response, base64.
pub fn oauthbearer_b64(user: &str, token: &str, host: &str, port: u16) -> String {
    b64(format!("n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01").as_bytes())
}

/// SASL PLAIN initial response, base64.
pub fn plain_b64(user: &str, pass: &str) -> String {
    b64(format!("\0{user}\0{pass}").as_bytes())
}

/// Standard base64.
pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Standard base64 decode (panics on bad input).
pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .unwrap_or_else(|e| panic!("bad base64 {s:?}: {e}"))
}

/// What a real TLS client (rustls) sends first: its ClientHello record.
pub fn tls_client_hello(config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert_eq!(&hello[..2], &[0x16, 0x03], "a TLS handshake record");
    hello
}

/// Everything the server sends on `tcp` until it closes, or `limit` passes:
/// (bytes, whether it closed).
pub async fn read_to_close(tcp: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

/// The value of one sample in a `/metrics` body, e.g.
/// `mailproxy_misconnects_total{listener="imap",kind="tls_on_plaintext"}`.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// A `/metrics` body must be valid for Prometheus: `promtool check
/// metrics` accepts it (promtool must be installed; scripts/test does).
pub fn promtool_check(body: &str) {
    use std::io::Write;
    let promtool = std::path::Path::new("/usr/bin/promtool");
    assert!(
        promtool.exists(),
        "promtool is missing: run scripts/test (it installs prometheus)"
    );
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

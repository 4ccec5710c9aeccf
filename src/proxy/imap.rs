//! The IMAP session: the pre-auth state machine on the client side, an IMAP
//! client towards the upstream, and the hand-off between them.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{authorize, Ctx, FailureKind, LoginFailure, Upstream, UpstreamAuth};
use crate::config::{Listener, Mechanism};
use crate::endpoint::Security;
use crate::imap::preauth::{Event, PreAuth, PreAuthConfig};
use crate::imap::response::{self, has_capability, Response, Status, StatusResponse};
use crate::net::{self, Stream};
use crate::sasl;
use crate::secret::Secret;

/// Largest upstream response we accept before the hand-off.
const MAX_UPSTREAM_LINE: usize = 64 * 1024;

/// Runs one client connection until it ends. `client` is already past any
/// implicit TLS handshake; `tls` accepts STARTTLS when configured.
pub async fn session(
    ctx: &Ctx,
    listener: &Listener,
    mut client: Stream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let config = ctx.config();
    let limits = &config.limits;
    let mut pre = PreAuth::new(PreAuthConfig {
        starttls: tls.is_some() && !client.is_tls(),
        max_line: limits.max_line,
        max_literal: limits.max_line,
    });
    let deadline = Instant::now() + limits.preauth_timeout * 4;
    let mut buf = vec![0u8; 4096];
    loop {
        match pre.poll() {
            Some(Event::Login {
                tag,
                username,
                password,
            }) => {
                flush(&mut client, &mut pre).await?;
                let login = username.to_string();
                tracing::Span::current().record("login", login.as_str());
                match login_upstream(ctx, listener, &login, Secret::from(password)).await {
                    Ok((upstream, mut to_client, tagged)) => {
                        let ok = response::retag_line(&tagged.line, &tag).map_err(std::io::Error::other)?;
                        let mut greeting = std::mem::take(&mut to_client.0);
                        greeting.extend_from_slice(&ok);
                        client.write_all(&greeting).await?;
                        tracing::info!(upstream = %upstream.endpoint, "logged in; relaying");
                        let pending = pre.into_pending_input();
                        let (up, down) =
                            super::relay(client, upstream.stream, pending, upstream.leftover, &ctx.shutdown).await?;
                        tracing::info!(bytes_up = up, bytes_down = down, "session ended");
                        return Ok(());
                    }
                    Err(f) => {
                        tracing::info!(reason = %f.text, "login refused");
                        pre.login_failed(&tag, f.imap_code(), &one_line(&f.text));
                    }
                }
            }
            Some(Event::StartTls { .. }) => {
                flush(&mut client, &mut pre).await?;
                let (Some(acceptor), Stream::Plain(tcp)) = (tls, client) else {
                    return Ok(()); // the state machine only offers STARTTLS on plain + TLS configured
                };
                client = match tokio::time::timeout(limits.preauth_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => Stream::ServerTls(Box::new(s)),
                    Ok(Err(e)) => {
                        tracing::info!(error = %e, "client TLS handshake failed");
                        return Ok(());
                    }
                    Err(_) => return Ok(()),
                };
                pre.starttls_done();
            }
            Some(Event::Logout) | Some(Event::Close) => {
                flush(&mut client, &mut pre).await?;
                let _ = client.shutdown().await;
                return Ok(());
            }
            None => {
                flush(&mut client, &mut pre).await?;
                if !pre.wants_input() {
                    // Cannot happen with a well-behaved state machine; never spin.
                    return Ok(());
                }
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .min(limits.preauth_timeout);
                let n = tokio::select! {
                    r = tokio::time::timeout(left, client.read(&mut buf)) => match r {
                        Ok(r) => r?,
                        Err(_) => {
                            let _ = client.write_all(b"* BYE Autologout; idle for too long before login\r\n").await;
                            return Ok(());
                        }
                    },
                    _ = ctx.shutdown.cancelled() => {
                        let _ = client.write_all(b"* BYE mailproxy is shutting down\r\n").await;
                        return Ok(());
                    }
                };
                if n == 0 {
                    return Ok(());
                }
                pre.feed(&buf[..n]);
            }
        }
    }
}

async fn flush(client: &mut Stream, pre: &mut PreAuth) -> std::io::Result<()> {
    let out = pre.take_output();
    if !out.is_empty() {
        client.write_all(&out).await?;
    }
    client.flush().await
}

/// Response text must stay on one line and never carry CR/LF from upstream
/// or provider text into the client's protocol stream.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Untagged lines the upstream sent during login, forwarded before the OK.
struct Untagged(Vec<u8>);

/// The upstream's tagged completion of our AUTHENTICATE/LOGIN.
struct Tagged {
    line: Vec<u8>,
}

struct UpstreamConn {
    endpoint: crate::endpoint::Endpoint,
    stream: Stream,
    /// Bytes read past the last response we consumed.
    leftover: Vec<u8>,
}

async fn login_upstream(
    ctx: &Ctx,
    listener: &Listener,
    login: &str,
    password: Secret,
) -> Result<(UpstreamConn, Untagged, Tagged), LoginFailure> {
    let up = authorize(ctx, listener, login, password).await?;
    let mut client = ImapClient::connect(ctx, &up).await.map_err(|e| {
        tracing::warn!(upstream = %up.endpoint, error = %e, "upstream connection failed");
        LoginFailure::new(FailureKind::Unavailable, e)
    })?;
    match &up.auth {
        UpstreamAuth::Password(pw) => {
            match client
                .login(&up.user, pw)
                .await
                .map_err(|e| LoginFailure::new(FailureKind::Unavailable, e))?
            {
                AuthOutcome::Ok(u, t) => Ok((client.into_conn(up.endpoint.clone()), u, t)),
                AuthOutcome::Rejected(text) => Err(LoginFailure::new(FailureKind::Credentials, text)),
            }
        }
        UpstreamAuth::Token {
            token,
            mechanism,
            account,
        } => {
            let mut token = token.clone();
            // A server may reject a token we believed fresh (revoked, clock
            // skew): drop it, get a new one, and try once more.
            for attempt in 0..2 {
                let outcome = client
                    .authenticate(&up, &token, *mechanism)
                    .await
                    .map_err(|e| LoginFailure::new(FailureKind::Unavailable, e))?;
                match outcome {
                    AuthOutcome::Ok(u, t) => return Ok((client.into_conn(up.endpoint.clone()), u, t)),
                    AuthOutcome::Rejected(text) if attempt == 0 => {
                        tracing::info!(reason = %text, "upstream rejected the access token; refreshing and retrying once");
                        ctx.tokens.reject(account, &token).await;
                        token = ctx
                            .tokens
                            .access_token(account)
                            .await
                            .map_err(|e| super::token_failure(ctx, &account.account.name, e))?;
                    }
                    AuthOutcome::Rejected(text) => {
                        tracing::warn!(reason = %text, "upstream rejected the OAuth login");
                        return Err(LoginFailure::new(FailureKind::Credentials, text));
                    }
                }
            }
            unreachable!("the loop returns on its second attempt")
        }
    }
}

enum AuthOutcome {
    Ok(Untagged, Tagged),
    Rejected(String),
}

/// A minimal IMAP client: just enough to reach the authenticated state.
struct ImapClient {
    stream: Stream,
    buf: Vec<u8>,
    caps: Vec<String>,
    next_tag: u32,
    endpoint: String,
}

impl ImapClient {
    async fn connect(ctx: &Ctx, up: &Upstream) -> Result<ImapClient, String> {
        let ep = &up.endpoint;
        let timeout = ctx.config().limits.connect_timeout;
        let tcp = net::connect_tcp(ep, timeout).await.map_err(|e| e.to_string())?;
        let tls_config = || ctx.tls.get(up.ca_file.as_deref()).map_err(|e| e.to_string());
        let stream = match ep.security {
            Security::Tls => net::tls_client(tcp, ep, tls_config()?, timeout)
                .await
                .map_err(|e| e.to_string())?,
            _ => Stream::Plain(tcp),
        };
        let mut c = ImapClient {
            stream,
            buf: Vec::new(),
            caps: Vec::new(),
            next_tag: 0,
            endpoint: ep.to_string(),
        };
        let greeting = tokio::time::timeout(timeout, c.read_response())
            .await
            .map_err(|_| format!("{ep} sent no greeting within {} s", timeout.as_secs()))??;
        let g = response::parse_greeting(&greeting).map_err(|e| format!("{ep} greeted with garbage: {e}"))?;
        match g.status {
            Status::Ok => c.caps = g.capabilities().unwrap_or_default(),
            Status::Bye => return Err(format!("{ep} refused the connection: {}", g.text)),
            _ => return Err(format!("{ep} sent an unexpected greeting ({:?})", g.status)),
        }
        if ep.security == Security::StartTls {
            let (_, tagged) = c.command("STARTTLS").await?;
            if tagged.status != Status::Ok {
                return Err(format!("{ep} refused STARTTLS: {}", tagged.text));
            }
            if !c.buf.is_empty() {
                // Anything sent before the handshake is unauthenticated
                // plaintext (STARTTLS response injection): never act on it.
                tracing::warn!(upstream = %ep, bytes = c.buf.len(), "discarding plaintext the server sent before TLS");
                c.buf.clear();
            }
            let Stream::Plain(tcp) = c.stream else {
                unreachable!("STARTTLS starts on plaintext")
            };
            c.stream = net::tls_client(tcp, ep, tls_config()?, timeout)
                .await
                .map_err(|e| e.to_string())?;
            c.caps.clear(); // capabilities from before TLS are not to be trusted
        }
        if c.caps.is_empty() || !has_capability(&c.caps, "IMAP4rev1") && !has_capability(&c.caps, "IMAP4rev2") {
            let (untagged, tagged) = c.command("CAPABILITY").await?;
            if tagged.status != Status::Ok {
                return Err(format!("{ep} refused CAPABILITY: {}", tagged.text));
            }
            for line in untagged {
                if let Ok(Response::Capability(caps)) = response::parse_response(&line) {
                    c.caps = caps;
                }
            }
        }
        Ok(c)
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("mp{}", self.next_tag)
    }

    /// Reads one complete response (a line, plus any literals it announces).
    async fn read_response(&mut self) -> Result<Vec<u8>, String> {
        let mut need_from = 0usize; // bytes of self.buf already known to be part of this response
        loop {
            if need_from <= self.buf.len() {
                match response::find_line(&self.buf[need_from..], MAX_UPSTREAM_LINE) {
                    Ok(Some(info)) => {
                        let end = need_from + info.len;
                        match info.literal {
                            None => return Ok(self.buf.drain(..end).collect()),
                            Some(n) if (end as u64).saturating_add(n) <= MAX_UPSTREAM_LINE as u64 => {
                                need_from = end + n as usize;
                                if need_from <= self.buf.len() {
                                    continue;
                                }
                            }
                            Some(_) => {
                                return Err(format!("{} sent an oversized response before login", self.endpoint))
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Err(format!("{}: {e}", self.endpoint)),
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("{}: {e}", self.endpoint))?;
            if n == 0 {
                return Err(format!("{} closed the connection", self.endpoint));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("{}: {e}", self.endpoint))?;
        self.stream.flush().await.map_err(|e| format!("{}: {e}", self.endpoint))
    }

    /// Sends a simple command and reads to its tagged completion.
    async fn command(&mut self, cmd: &str) -> Result<(Vec<Vec<u8>>, StatusResponse), String> {
        let tag = self.tag();
        self.send(format!("{tag} {cmd}\r\n").as_bytes()).await?;
        let mut untagged = Vec::new();
        loop {
            let line = self.read_response().await?;
            match response::parse_response(&line) {
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag.as_str()) => return Ok((untagged, s)),
                Ok(Response::Status(s)) if s.status == Status::Bye => {
                    return Err(format!("{} closed the session: {}", self.endpoint, s.text))
                }
                _ => untagged.push(line),
            }
        }
    }

    /// Reads the rest of an AUTHENTICATE/LOGIN exchange after its last
    /// client line. `on_challenge` answers a continuation (an OAuth error
    /// challenge is answered with an empty response).
    async fn finish_auth(&mut self, tag: &str, mechanism: Option<Mechanism>) -> Result<AuthOutcome, String> {
        let mut untagged = Vec::new();
        let mut challenge = None;
        loop {
            let line = self.read_response().await?;
            match response::parse_response(&line) {
                Ok(Response::Continuation(text)) => {
                    // The SASL exchange failed: the server explains in base64
                    // JSON and waits for an empty (XOAUTH2) or dummy
                    // (OAUTHBEARER) response before its tagged NO.
                    challenge = sasl::decode_error_challenge(text.trim().as_bytes());
                    let ack = match mechanism {
                        Some(Mechanism::Oauthbearer) => sasl::OAUTHBEARER_ERROR_ACK,
                        _ => sasl::XOAUTH2_ERROR_ACK,
                    };
                    self.send(format!("{ack}\r\n").as_bytes()).await?;
                }
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag) => {
                    if s.status == Status::Ok {
                        return Ok(AuthOutcome::Ok(Untagged(untagged.concat()), Tagged { line }));
                    }
                    let why = match &challenge {
                        Some(c) => c.explain(),
                        None => format!("the server said: {}", s.text),
                    };
                    return Ok(AuthOutcome::Rejected(format!(
                        "{} refused the login: {why}",
                        self.endpoint
                    )));
                }
                Ok(Response::Status(s)) if s.status == Status::Bye => {
                    return Err(format!("{} closed the session: {}", self.endpoint, s.text))
                }
                _ => untagged.push(line),
            }
        }
    }

    async fn authenticate(
        &mut self,
        up: &Upstream,
        token: &Secret,
        mechanism: Mechanism,
    ) -> Result<AuthOutcome, String> {
        let (name, ir) = match mechanism {
            Mechanism::Xoauth2 => ("XOAUTH2", sasl::xoauth2(&up.user, token.expose())),
            Mechanism::Oauthbearer => (
                "OAUTHBEARER",
                sasl::oauthbearer(&up.user, token.expose(), &up.endpoint.host, up.endpoint.port),
            ),
        };
        let tag = self.tag();
        if has_capability(&self.caps, "SASL-IR") {
            let mut line = Secret::new(format!("{tag} AUTHENTICATE {name} {}\r\n", ir.as_str()));
            self.send(line.expose().as_bytes()).await?;
            line = Secret::default();
            drop(line);
        } else {
            self.send(format!("{tag} AUTHENTICATE {name}\r\n").as_bytes()).await?;
            let cont = self.read_response().await?;
            match response::parse_response(&cont) {
                Ok(Response::Continuation(_)) => {
                    let line = Secret::new(format!("{}\r\n", ir.as_str()));
                    self.send(line.expose().as_bytes()).await?;
                }
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag.as_str()) => {
                    return Ok(AuthOutcome::Rejected(format!(
                        "{} does not accept AUTHENTICATE {name}: {}",
                        self.endpoint, s.text
                    )));
                }
                _ => {
                    return Err(format!(
                        "{} answered AUTHENTICATE with something unexpected",
                        self.endpoint
                    ))
                }
            }
        }
        self.finish_auth(&tag, Some(mechanism)).await
    }

    /// Passthrough: LOGIN with the client's own credentials.
    async fn login(&mut self, user: &str, password: &Secret) -> Result<AuthOutcome, String> {
        let tag = self.tag();
        let literal_plus = has_capability(&self.caps, "LITERAL+");
        // Quoted strings where possible, literals otherwise (8-bit, CR/LF, long).
        let mut pieces: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        let mut head = format!("{tag} LOGIN");
        for arg in [user, password.expose()] {
            if arg.len() < 1000 && arg.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                head.push(' ');
                head.push('"');
                for c in arg.chars() {
                    if c == '"' || c == '\\' {
                        head.push('\\');
                    }
                    head.push(c);
                }
                head.push('"');
            } else {
                head.push_str(&format!(" {{{}{}}}", arg.len(), if literal_plus { "+" } else { "" }));
                pieces.push((std::mem::take(&mut head), Some(arg.as_bytes().to_vec())));
            }
        }
        pieces.push((head, None));
        let mut first = true;
        for (text, literal) in pieces {
            let mut out = Secret::new(if first { text } else { text.clone() });
            first = false;
            match literal {
                Some(lit) => {
                    let mut bytes = out.expose().as_bytes().to_vec();
                    bytes.extend_from_slice(b"\r\n");
                    self.send(&bytes).await?;
                    if !literal_plus {
                        let cont = self.read_response().await?;
                        if !matches!(response::parse_response(&cont), Ok(Response::Continuation(_))) {
                            return Ok(AuthOutcome::Rejected(format!(
                                "{} refused the login literal",
                                self.endpoint
                            )));
                        }
                    }
                    self.send(&lit).await?;
                }
                None => {
                    out = Secret::new(format!("{}\r\n", out.expose()));
                    self.send(out.expose().as_bytes()).await?;
                }
            }
        }
        self.finish_auth(&tag, None).await
    }

    fn into_conn(self, endpoint: crate::endpoint::Endpoint) -> UpstreamConn {
        UpstreamConn {
            endpoint,
            stream: self.stream,
            leftover: self.buf,
        }
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>(_: T) {}
    let _ = Duration::ZERO;
    let _ = is_send::<Stream>;
}

//! The IMAP session: the pre-auth state machine on the client side, an IMAP
//! client towards the upstream, and the hand-off between them.

use std::time::Instant;

use tokio::io::AsyncWriteExt;

use super::client::{Client, MAX_RESPONSE};
use super::{authorize, one_line, Ctx, FailureKind, LoginFailure, Upstream, UpstreamAuth};
use crate::config::{Listener, Mechanism};
use crate::endpoint::Security;
use crate::imap::preauth::{Event, PreAuth, PreAuthConfig};
use crate::imap::response::{self, has_capability, Response, ResponseError, Status, StatusResponse};
use crate::net::Stream;
use crate::sasl;
use crate::secret::Secret;

/// Runs one client connection until it ends. `client` is already past any
/// implicit TLS handshake; `tls` accepts STARTTLS when configured.
pub async fn session(
    ctx: &Ctx,
    listener: &Listener,
    mut client: Stream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    peer: std::net::IpAddr,
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
                super::send_output(&mut client, pre.take_output()).await?;
                let login = username.to_string();
                tracing::Span::current().record("login", login.as_str());
                match login_upstream(ctx, listener, peer, &login, Secret::from(password)).await {
                    Ok((upstream, untagged, tagged)) => {
                        let ok = response::retag_line(&tagged, &tag).map_err(std::io::Error::other)?;
                        let mut greeting = untagged;
                        greeting.extend_from_slice(&ok);
                        client.write_all(&greeting).await?;
                        tracing::info!(upstream = %upstream.endpoint, "logged in; relaying");
                        let pending = pre.into_pending_input();
                        let (up, down) =
                            super::relay(client, upstream.stream, pending, upstream.buf, &ctx.shutdown).await?;
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
                super::send_output(&mut client, pre.take_output()).await?;
                let Some(tls_client) = super::start_tls(ctx, client, tls).await else {
                    return Ok(());
                };
                client = tls_client;
                pre.starttls_done();
            }
            Some(Event::Logout) | Some(Event::Close) => {
                super::send_output(&mut client, pre.take_output()).await?;
                let _ = client.shutdown().await;
                return Ok(());
            }
            None => {
                super::send_output(&mut client, pre.take_output()).await?;
                if !pre.wants_input() {
                    // Cannot happen with a well-behaved state machine; never spin.
                    return Ok(());
                }
                let Some(n) = super::read_preauth(
                    ctx,
                    &mut client,
                    &mut buf,
                    deadline,
                    b"* BYE Autologout; idle for too long before login\r\n",
                    b"* BYE mailproxy is shutting down\r\n",
                )
                .await?
                else {
                    return Ok(());
                };
                pre.feed(&buf[..n]);
            }
        }
    }
}

/// One complete server response at the start of `buf`: a line, plus any
/// literals it announces and the line parts that follow them.
fn frame(buf: &[u8]) -> Result<Option<(usize, Vec<u8>)>, ResponseError> {
    let mut at = 0;
    loop {
        let Some(info) = response::find_line(&buf[at..], MAX_RESPONSE)? else {
            return Ok(None);
        };
        let end = at + info.len;
        match info.literal {
            None => return Ok(Some((end, buf[..end].to_vec()))),
            Some(n) => {
                at = usize::try_from(n)
                    .ok()
                    .and_then(|n| end.checked_add(n))
                    .filter(|at| *at <= MAX_RESPONSE)
                    .ok_or(ResponseError::LiteralTooLarge)?;
                if at > buf.len() {
                    return Ok(None);
                }
            }
        }
    }
}

enum AuthOutcome {
    /// Untagged responses to forward before the OK, and the tagged OK line.
    Ok(Vec<u8>, Vec<u8>),
    Rejected(String),
}

async fn login_upstream(
    ctx: &Ctx,
    listener: &Listener,
    peer: std::net::IpAddr,
    login: &str,
    password: Secret,
) -> Result<(Client, Vec<u8>, Vec<u8>), LoginFailure> {
    let up = authorize(ctx, listener, peer, login, password).await?;
    let unavailable = |e: String| {
        tracing::warn!(upstream = %up.endpoint, error = %e, "upstream IMAP failed");
        LoginFailure::new(FailureKind::Unavailable, e)
    };
    let mut client = ImapClient::connect(ctx, &up).await.map_err(unavailable)?;
    match &up.auth {
        UpstreamAuth::Password(pw) => match client.login(&up.user, pw).await.map_err(unavailable)? {
            AuthOutcome::Ok(u, t) => Ok((client.c, u, t)),
            AuthOutcome::Rejected(text) => Err(LoginFailure::new(FailureKind::Credentials, text)),
        },
        UpstreamAuth::Token {
            token,
            mechanism,
            account,
        } => {
            let mut token = token.clone();
            // A server may reject a token we believed fresh (revoked, clock
            // skew): drop it, get a new one, and try once more.
            for attempt in 0..2 {
                match client
                    .authenticate(&up, &token, *mechanism)
                    .await
                    .map_err(unavailable)?
                {
                    AuthOutcome::Ok(u, t) => return Ok((client.c, u, t)),
                    AuthOutcome::Rejected(text) if attempt == 0 => {
                        tracing::info!(reason = %text, "upstream rejected the access token; refreshing and retrying once");
                        ctx.tokens.reject(account, &token).await;
                        token = ctx
                            .tokens
                            .access_token(account)
                            .await
                            .map_err(|e| super::token_failure(ctx, account.name(), e))?;
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

/// A minimal IMAP client: just enough to reach the authenticated state.
struct ImapClient<'a> {
    ctx: &'a Ctx,
    c: Client,
    caps: Vec<String>,
    next_tag: u32,
}

impl<'a> ImapClient<'a> {
    async fn connect(ctx: &'a Ctx, up: &Upstream) -> Result<ImapClient<'a>, String> {
        let ep = &up.endpoint;
        let c = Client::connect(ctx, up).await?;
        let mut me = ImapClient {
            ctx,
            c,
            caps: Vec::new(),
            next_tag: 0,
        };
        let greeting = me.read().await?;
        let g = response::parse_greeting(&greeting).map_err(|e| format!("{ep} greeted with garbage: {e}"))?;
        match g.status {
            Status::Ok => me.caps = g.capabilities().unwrap_or_default(),
            Status::Bye => return Err(format!("{ep} refused the connection: {}", g.text)),
            _ => return Err(format!("{ep} sent an unexpected greeting ({:?})", g.status)),
        }
        if ep.security == Security::StartTls {
            let (_, tagged) = me.command("STARTTLS").await?;
            if tagged.status != Status::Ok {
                return Err(format!("{ep} refused STARTTLS: {}", tagged.text));
            }
            me.c = me.c.upgrade(ctx).await?;
            me.caps.clear(); // capabilities from before TLS are not to be trusted
        }
        if !has_capability(&me.caps, "IMAP4rev1") && !has_capability(&me.caps, "IMAP4rev2") {
            let (untagged, tagged) = me.command("CAPABILITY").await?;
            if tagged.status != Status::Ok {
                return Err(format!("{ep} refused CAPABILITY: {}", tagged.text));
            }
            for line in untagged {
                if let Ok(Response::Capability(caps)) = response::parse_response(&line) {
                    me.caps = caps;
                }
            }
        }
        Ok(me)
    }

    async fn read(&mut self) -> Result<Vec<u8>, String> {
        self.c.read(self.ctx, frame).await
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("mp{}", self.next_tag)
    }

    /// Sends a simple command and reads to its tagged completion.
    async fn command(&mut self, cmd: &str) -> Result<(Vec<Vec<u8>>, StatusResponse), String> {
        let tag = self.tag();
        self.c.send(format!("{tag} {cmd}\r\n").as_bytes()).await?;
        let mut untagged = Vec::new();
        loop {
            let line = self.read().await?;
            match response::parse_response(&line) {
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag.as_str()) => return Ok((untagged, s)),
                Ok(Response::Status(s)) if s.status == Status::Bye => {
                    return Err(format!("{} closed the session: {}", self.c.endpoint, s.text))
                }
                _ => untagged.push(line),
            }
        }
    }

    /// Reads the rest of an AUTHENTICATE/LOGIN exchange after its last
    /// client line. A continuation here is the OAuth failure challenge: it is
    /// answered with an empty (XOAUTH2) or dummy (OAUTHBEARER) response, and
    /// the server then sends its tagged NO.
    async fn finish_auth(&mut self, tag: &str, mechanism: Option<Mechanism>) -> Result<AuthOutcome, String> {
        let mut untagged = Vec::new();
        let mut challenge = None;
        loop {
            let line = self.read().await?;
            match response::parse_response(&line) {
                Ok(Response::Continuation(text)) => {
                    challenge = sasl::decode_error_challenge(text.trim().as_bytes());
                    let ack = match mechanism {
                        Some(Mechanism::Oauthbearer) => sasl::OAUTHBEARER_ERROR_ACK,
                        _ => sasl::XOAUTH2_ERROR_ACK,
                    };
                    self.c.send(format!("{ack}\r\n").as_bytes()).await?;
                }
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag) => {
                    if s.status == Status::Ok {
                        return Ok(AuthOutcome::Ok(untagged.concat(), line));
                    }
                    let why = match &challenge {
                        Some(c) => c.explain(),
                        None => format!("the server said: {}", s.text),
                    };
                    return Ok(AuthOutcome::Rejected(format!(
                        "{} refused the login: {why}",
                        self.c.endpoint
                    )));
                }
                Ok(Response::Status(s)) if s.status == Status::Bye => {
                    return Err(format!("{} closed the session: {}", self.c.endpoint, s.text))
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
            let line = Secret::new(format!("{tag} AUTHENTICATE {name} {}\r\n", ir.as_str()));
            self.c.send(line.expose().as_bytes()).await?;
        } else {
            self.c.send(format!("{tag} AUTHENTICATE {name}\r\n").as_bytes()).await?;
            let cont = self.read().await?;
            match response::parse_response(&cont) {
                Ok(Response::Continuation(_)) => {
                    let line = Secret::new(format!("{}\r\n", ir.as_str()));
                    self.c.send(line.expose().as_bytes()).await?;
                }
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag.as_str()) => {
                    return Ok(AuthOutcome::Rejected(format!(
                        "{} does not accept AUTHENTICATE {name}: {}",
                        self.c.endpoint, s.text
                    )));
                }
                _ => {
                    return Err(format!(
                        "{} answered AUTHENTICATE with something unexpected",
                        self.c.endpoint
                    ))
                }
            }
        }
        self.finish_auth(&tag, Some(mechanism)).await
    }

    /// Passthrough: LOGIN with the client's own credentials, as quoted
    /// strings where possible and literals otherwise (8-bit, CR/LF, long).
    async fn login(&mut self, user: &str, password: &Secret) -> Result<AuthOutcome, String> {
        let tag = self.tag();
        let literal_plus = has_capability(&self.caps, "LITERAL+");
        let mut line = Secret::new(format!("{tag} LOGIN"));
        for arg in [user, password.expose()] {
            if arg.len() < 1000 && arg.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                let quoted: String = arg
                    .chars()
                    .flat_map(|c| if c == '"' || c == '\\' { vec!['\\', c] } else { vec![c] })
                    .collect();
                line = Secret::new(format!("{} \"{quoted}\"", line.expose()));
            } else {
                let plus = if literal_plus { "+" } else { "" };
                self.c
                    .send(format!("{} {{{}{plus}}}\r\n", line.expose(), arg.len()).as_bytes())
                    .await?;
                if !literal_plus {
                    let cont = self.read().await?;
                    if !matches!(response::parse_response(&cont), Ok(Response::Continuation(_))) {
                        return Ok(AuthOutcome::Rejected(format!(
                            "{} refused the login literal",
                            self.c.endpoint
                        )));
                    }
                }
                self.c.send(arg.as_bytes()).await?;
                line = Secret::default();
            }
        }
        self.c.send(format!("{}\r\n", line.expose()).as_bytes()).await?;
        self.finish_auth(&tag, None).await
    }
}

//! The POP3 session: the pre-auth state machine on the client side, a POP3
//! client towards the upstream, and the hand-off after login.

use std::time::Instant;

use tokio::io::AsyncWriteExt;

use super::client::{Client, MAX_RESPONSE};
use super::{authorize, one_line, Ctx, FailureKind, LoginFailure, UpstreamAuth};
use crate::config::{Listener, Mechanism};
use crate::endpoint::Security;
use crate::net::Stream;
use crate::pop3::preauth::{Event, PreAuth, PreAuthConfig};
use crate::pop3::response::{self, Response, StatusLine};
use crate::sasl;
use crate::secret::Secret;

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
    });
    let deadline = Instant::now() + limits.preauth_timeout * 4;
    let mut buf = vec![0u8; 4096];
    loop {
        match pre.poll() {
            Some(Event::Login { username, password }) => {
                super::send_output(&mut client, pre.take_output()).await?;
                let login = username.to_string();
                tracing::Span::current().record("login", login.as_str());
                match login_upstream(ctx, listener, peer, &login, Secret::from(password)).await {
                    Ok(up) => {
                        tracing::info!(upstream = %up.endpoint, "logged in; relaying");
                        client.write_all(b"+OK Logged in\r\n").await?;
                        let pending = pre.into_pending_input();
                        let (a, b) = super::relay(client, up.stream, pending, up.buf, &ctx.shutdown).await?;
                        tracing::info!(bytes_up = a, bytes_down = b, "session ended");
                        return Ok(());
                    }
                    Err(f) => {
                        tracing::info!(reason = %f.text, "login refused");
                        let text = one_line(&f.text);
                        match f.kind {
                            FailureKind::Credentials => pre.login_failed(&text),
                            FailureKind::Unavailable => pre.login_failed_code("SYS/TEMP", &text),
                            FailureKind::Action => pre.login_failed_code("SYS/PERM", &text),
                        }
                    }
                }
            }
            Some(Event::StartTls) => {
                super::send_output(&mut client, pre.take_output()).await?;
                let Some(tls_client) = super::start_tls(ctx, client, tls).await else {
                    return Ok(());
                };
                client = tls_client;
                pre.starttls_done();
            }
            Some(Event::Quit) | Some(Event::Close) => {
                super::send_output(&mut client, pre.take_output()).await?;
                let _ = client.shutdown().await;
                return Ok(());
            }
            None => {
                super::send_output(&mut client, pre.take_output()).await?;
                if !pre.wants_input() {
                    return Ok(());
                }
                let Some(n) = super::read_preauth(
                    ctx,
                    &mut client,
                    &mut buf,
                    deadline,
                    b"-ERR [SYS/TEMP] idle for too long before login\r\n",
                    b"-ERR [SYS/TEMP] mailproxy is shutting down\r\n",
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

async fn read_response(ctx: &Ctx, c: &mut Client) -> Result<Response, String> {
    c.read(ctx, |b| match response::find_line(b, MAX_RESPONSE) {
        Ok(Some(len)) => response::parse_response(&b[..len]).map(|r| Some((len, r))),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    })
    .await
}

fn status(r: Response, what: &str, ep: &crate::endpoint::Endpoint) -> Result<StatusLine, String> {
    match r {
        Response::Status(s) => Ok(s),
        Response::Continuation(_) => Err(format!("{ep} answered {what} with an unexpected continuation")),
    }
}

async fn login_upstream(
    ctx: &Ctx,
    listener: &Listener,
    peer: std::net::IpAddr,
    login: &str,
    password: Secret,
) -> Result<Client, LoginFailure> {
    let up = authorize(ctx, listener, peer, login, password).await?;
    let ep = up.endpoint.clone();
    let unavailable = |e: String| {
        tracing::warn!(upstream = %ep, error = %e, "upstream POP3 failed");
        LoginFailure::new(FailureKind::Unavailable, e)
    };
    let mut c = Client::connect(ctx, &up).await.map_err(unavailable)?;
    let g = status(
        read_response(ctx, &mut c).await.map_err(unavailable)?,
        "the greeting",
        &ep,
    )
    .map_err(unavailable)?;
    if !g.ok {
        return Err(unavailable(format!("{ep} refused the connection: {}", g.describe())));
    }
    if ep.security == Security::StartTls {
        c.send(b"STLS\r\n").await.map_err(unavailable)?;
        let r = status(read_response(ctx, &mut c).await.map_err(unavailable)?, "STLS", &ep).map_err(unavailable)?;
        if !r.ok {
            return Err(unavailable(format!("{ep} refused STLS: {}", r.describe())));
        }
        c = c.upgrade(ctx).await.map_err(unavailable)?;
    }
    match &up.auth {
        UpstreamAuth::Password(pw) => {
            let line = Secret::new(format!("USER {}\r\n", up.user));
            c.send(line.expose().as_bytes()).await.map_err(unavailable)?;
            let r = status(read_response(ctx, &mut c).await.map_err(unavailable)?, "USER", &ep).map_err(unavailable)?;
            if r.ok {
                let line = Secret::new(format!("PASS {}\r\n", pw.expose()));
                c.send(line.expose().as_bytes()).await.map_err(unavailable)?;
                let r =
                    status(read_response(ctx, &mut c).await.map_err(unavailable)?, "PASS", &ep).map_err(unavailable)?;
                if r.ok {
                    return Ok(c);
                }
                return Err(refused(&ep, &r));
            }
            Err(refused(&ep, &r))
        }
        UpstreamAuth::Token {
            token,
            mechanism,
            account,
        } => {
            let mut token = token.clone();
            for attempt in 0..2 {
                let (name, ir) = match mechanism {
                    Mechanism::Xoauth2 => ("XOAUTH2", sasl::xoauth2(&up.user, token.expose())),
                    Mechanism::Oauthbearer => (
                        "OAUTHBEARER",
                        sasl::oauthbearer(&up.user, token.expose(), &ep.host, ep.port),
                    ),
                };
                // Two steps: Microsoft wants the token after the `+`.
                c.send(format!("AUTH {name}\r\n").as_bytes())
                    .await
                    .map_err(unavailable)?;
                match read_response(ctx, &mut c).await.map_err(unavailable)? {
                    Response::Continuation(_) => {}
                    Response::Status(s) => {
                        return Err(LoginFailure::new(
                            FailureKind::Action,
                            format!("{ep} does not accept AUTH {name}: {}", s.describe()),
                        ))
                    }
                }
                let line = Secret::new(format!("{}\r\n", ir.as_str()));
                c.send(line.expose().as_bytes()).await.map_err(unavailable)?;
                let mut r = read_response(ctx, &mut c).await.map_err(unavailable)?;
                let challenge = r.oauth_error_challenge();
                if let Response::Continuation(_) = r {
                    let ack = match mechanism {
                        Mechanism::Oauthbearer => sasl::OAUTHBEARER_ERROR_ACK,
                        Mechanism::Xoauth2 => sasl::XOAUTH2_ERROR_ACK,
                    };
                    c.send(format!("{ack}\r\n").as_bytes()).await.map_err(unavailable)?;
                    r = read_response(ctx, &mut c).await.map_err(unavailable)?;
                }
                let s = status(r, "AUTH", &ep).map_err(unavailable)?;
                if s.ok {
                    return Ok(c);
                }
                let why = challenge
                    .as_ref()
                    .map(|c| c.explain())
                    .unwrap_or_else(|| format!("the server said: {}", s.describe()));
                if attempt == 0 && challenge.is_some() {
                    tracing::info!(reason = %why, "upstream rejected the access token; refreshing and retrying once");
                    ctx.tokens.reject(account, &token).await;
                    token = ctx
                        .tokens
                        .access_token(account)
                        .await
                        .map_err(|e| super::token_failure(ctx, account.name(), e))?;
                    continue;
                }
                return Err(LoginFailure::new(
                    FailureKind::Credentials,
                    format!("{ep} refused the login: {why}"),
                ));
            }
            unreachable!("the loop returns on its second attempt")
        }
    }
}

fn refused(ep: &crate::endpoint::Endpoint, r: &StatusLine) -> LoginFailure {
    let kind = match r.code.as_deref() {
        Some(c) if c.starts_with("SYS/TEMP") || c == "IN-USE" => FailureKind::Unavailable,
        _ => FailureKind::Credentials,
    };
    LoginFailure::new(kind, format!("{ep} refused the login: {}", r.describe()))
}

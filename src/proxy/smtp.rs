//! The SMTP submission session: the pre-auth state machine on the client
//! side, an SMTP client towards the upstream, and the hand-off at the
//! client's first transaction command.

use std::time::Instant;

use tokio::io::AsyncWriteExt;

use super::client::{Client, MAX_RESPONSE};
use super::{authorize, one_line, Ctx, FailureKind, LoginFailure, UpstreamAuth};
use crate::config::{Listener, Mechanism};
use crate::endpoint::Security;
use crate::net::Stream;
use crate::sasl;
use crate::secret::Secret;
use crate::smtp::preauth::{Event, PreAuth, PreAuthConfig};
use crate::smtp::reply::{self, Reply};

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
        hostname: "mailproxy".into(),
        max_line: limits.max_line,
        max_size: None,
    });
    let deadline = Instant::now() + limits.preauth_timeout * 4;
    let mut upstream: Option<Client> = None;
    let mut buf = vec![0u8; 4096];
    loop {
        match pre.poll() {
            Some(Event::Login { username, password }) => {
                super::send_output(&mut client, pre.take_output()).await?;
                let login = username.to_string();
                tracing::Span::current().record("login", login.as_str());
                match login_upstream(ctx, listener, peer, &login, Secret::from(password), pre.helo()).await {
                    Ok((up, kws)) => {
                        tracing::info!(upstream = %up.endpoint, "logged in");
                        client.write_all(b"235 2.7.0 Authentication successful\r\n").await?;
                        pre.authenticated(&kws);
                        upstream = Some(up);
                    }
                    Err(f) => {
                        tracing::info!(reason = %f.text, "login refused");
                        let code = match f.kind {
                            FailureKind::Credentials | FailureKind::Action => "535 5.7.8",
                            FailureKind::Unavailable => "454 4.7.0",
                        };
                        pre.login_failed(&format!("{code} {}", one_line(&f.text)));
                    }
                }
            }
            Some(Event::Handoff) => {
                super::send_output(&mut client, pre.take_output()).await?;
                let Some(up) = upstream.take() else { return Ok(()) };
                let pending = pre.into_pending_input();
                tracing::info!("relaying");
                let (a, b) = super::relay(client, up.stream, pending, up.buf, &ctx.shutdown).await?;
                tracing::info!(bytes_up = a, bytes_down = b, "session ended");
                return Ok(());
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
                if let Some(mut up) = upstream.take() {
                    let _ = up.send(b"QUIT\r\n").await;
                }
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
                    b"421 4.4.2 mailproxy: idle for too long\r\n",
                    b"421 4.3.0 mailproxy is shutting down\r\n",
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

async fn read_reply(ctx: &Ctx, c: &mut Client) -> Result<Reply, String> {
    c.read(ctx, |b| reply::find_reply(b, MAX_RESPONSE)).await
}

async fn command(ctx: &Ctx, c: &mut Client, line: &str) -> Result<Reply, String> {
    c.send(format!("{line}\r\n").as_bytes()).await?;
    read_reply(ctx, c).await
}

/// Connects, says EHLO (again after STARTTLS), authenticates. Returns the
/// client and the server's EHLO keywords for the post-login EHLO answer.
async fn login_upstream(
    ctx: &Ctx,
    listener: &Listener,
    peer: std::net::IpAddr,
    login: &str,
    password: Secret,
    helo: Option<&str>,
) -> Result<(Client, Vec<String>), LoginFailure> {
    let up = authorize(ctx, listener, peer, login, password).await?;
    let unavailable = |e: String| {
        tracing::warn!(upstream = %up.endpoint, error = %e, "upstream SMTP failed");
        LoginFailure::new(FailureKind::Unavailable, e)
    };
    let name = helo
        .filter(|h| h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or("localhost")
        .to_string();
    let mut c = Client::connect(ctx, &up).await.map_err(unavailable)?;
    let greeting = read_reply(ctx, &mut c).await.map_err(unavailable)?;
    if greeting.code != 220 {
        return Err(unavailable(format!(
            "{} refused the connection: {}",
            up.endpoint,
            greeting.one_line()
        )));
    }
    let mut ehlo = command(ctx, &mut c, &format!("EHLO {name}"))
        .await
        .map_err(unavailable)?;
    if ehlo.code != 250 {
        return Err(unavailable(format!(
            "{} refused EHLO: {}",
            up.endpoint,
            ehlo.one_line()
        )));
    }
    if up.endpoint.security == Security::StartTls {
        let r = command(ctx, &mut c, "STARTTLS").await.map_err(unavailable)?;
        if r.code != 220 {
            return Err(unavailable(format!(
                "{} refused STARTTLS: {}",
                up.endpoint,
                r.one_line()
            )));
        }
        c = c.upgrade(ctx).await.map_err(unavailable)?;
        // Capabilities from before TLS are not to be trusted: ask again.
        ehlo = command(ctx, &mut c, &format!("EHLO {name}"))
            .await
            .map_err(unavailable)?;
        if ehlo.code != 250 {
            return Err(unavailable(format!(
                "{} refused EHLO after STARTTLS: {}",
                up.endpoint,
                ehlo.one_line()
            )));
        }
    }
    let kws = reply::ehlo_keywords(&ehlo);
    match &up.auth {
        UpstreamAuth::Password(pw) => {
            let r = if reply::has_auth_mechanism(&kws, "PLAIN") || !reply::has_auth_mechanism(&kws, "LOGIN") {
                let ir = sasl::encode_plain("", &up.user, pw.expose());
                let line = Secret::new(format!("AUTH PLAIN {}\r\n", ir.as_str()));
                c.send(line.expose().as_bytes()).await.map_err(unavailable)?;
                read_reply(ctx, &mut c).await.map_err(unavailable)?
            } else {
                let mut r = command(ctx, &mut c, "AUTH LOGIN").await.map_err(unavailable)?;
                for step in [up.user.as_str(), pw.expose()] {
                    if r.code != 334 {
                        break;
                    }
                    let line = Secret::new(format!("{}\r\n", sasl::encode_login_step(step).as_str()));
                    c.send(line.expose().as_bytes()).await.map_err(unavailable)?;
                    r = read_reply(ctx, &mut c).await.map_err(unavailable)?;
                }
                r
            };
            match r.code {
                235 => Ok((c, kws)),
                c if (400..500).contains(&c) => Err(unavailable(format!("{} answered: {}", up.endpoint, r.one_line()))),
                _ => Err(LoginFailure::new(
                    FailureKind::Credentials,
                    format!("{} refused the login: {}", up.endpoint, r.one_line()),
                )),
            }
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
                        sasl::oauthbearer(&up.user, token.expose(), &up.endpoint.host, up.endpoint.port),
                    ),
                };
                let line = Secret::new(format!("AUTH {name} {}\r\n", ir.as_str()));
                c.send(line.expose().as_bytes()).await.map_err(unavailable)?;
                let mut r = read_reply(ctx, &mut c).await.map_err(unavailable)?;
                let mut challenge = None;
                if r.code == 334 {
                    // The failure challenge: acknowledge it, then the server says 5xx.
                    challenge = r.oauth_error_challenge();
                    let ack = match mechanism {
                        Mechanism::Oauthbearer => sasl::OAUTHBEARER_ERROR_ACK,
                        Mechanism::Xoauth2 => sasl::XOAUTH2_ERROR_ACK,
                    };
                    c.send(format!("{ack}\r\n").as_bytes()).await.map_err(unavailable)?;
                    r = read_reply(ctx, &mut c).await.map_err(unavailable)?;
                }
                if r.code == 235 {
                    return Ok((c, kws));
                }
                if (400..500).contains(&r.code) {
                    return Err(unavailable(format!("{} answered: {}", up.endpoint, r.one_line())));
                }
                let why = explain_failure(&r, challenge.as_ref());
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
                tracing::warn!(reason = %why, "upstream rejected the OAuth login");
                return Err(LoginFailure::new(
                    FailureKind::Credentials,
                    format!("{} refused the login: {why}", up.endpoint),
                ));
            }
            unreachable!("the loop returns on its second attempt")
        }
    }
}

/// A sentence for a failed SMTP AUTH, decoding Microsoft's usual cases.
fn explain_failure(r: &Reply, challenge: Option<&sasl::OAuthChallenge>) -> String {
    let text = r.one_line();
    let lower = text.to_ascii_lowercase();
    if r.enhanced_code() == Some("5.7.139") || lower.contains("smtpclientauthentication is disabled") {
        return "SMTP AUTH is disabled for this tenant or mailbox (5.7.139); an Exchange administrator must enable it \
                (Set-CASMailbox -SmtpClientAuthenticationDisabled $false, or in the Microsoft 365 admin center under \
                Mail > Authenticated SMTP)"
            .to_string();
    }
    if lower.contains("5.7.57") || lower.contains("client was not authenticated to send anonymous mail") {
        return "the server did not accept the login for sending (5.7.57); check that the token has the SMTP.Send scope".into();
    }
    if lower.contains("5.7.3") && lower.contains("authentication unsuccessful") {
        return "the server rejected the token (5.7.3 Authentication unsuccessful): the token may lack the SMTP.Send \
                scope or the user name differs from the signed-in account"
            .into();
    }
    match challenge {
        Some(c) => c.explain(),
        None => format!("the server said: {text}"),
    }
}

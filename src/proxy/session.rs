//! How a session runs, for every protocol: the one driver that feeds a
//! client connection through its protocol's pre-login machine, enforces the
//! pre-login time limits, does STARTTLS, routes the login, logs in upstream
//! and hands off to the relay.
//!
//! A protocol supplies only what truly differs ([`SessionProtocol`]): its
//! machine (greeting, commands, what it answers on success and on each
//! failure class), its upstream client, and the few lines the driver says
//! itself.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use super::caller::Caller;
use super::{relay, route, Ctx};
use crate::config::{Config, Limits, Listener};
use crate::net::Stream;
use crate::preauth::{Event, Failure, PreAuth};
use crate::secret::Secret;
use crate::text::{escaped, is_safe_credential};
use crate::tokens::SessionSlot;
use crate::upstream::conn::Conn;
use crate::upstream::login::{self, LoginFailure, UpstreamLogin};

/// What one protocol brings to the driver.
pub(crate) trait SessionProtocol {
    type Machine: PreAuth;
    type Upstream: UpstreamLogin<Success = <Self::Machine as PreAuth>::Success>;

    /// Said when the client stayed silent too long before login.
    const IDLE_BYE: &'static [u8];
    /// Said to a client still logging in when the proxy shuts down.
    const SHUTDOWN_BYE: &'static [u8];
    /// Said upstream when the client leaves after the upstream login but
    /// before the hand-off (SMTP: QUIT after AUTH).
    const UPSTREAM_QUIT: &'static [u8];

    /// A new machine; `starttls` when STARTTLS is offered on this connection.
    fn machine(config: &Config, starttls: bool) -> Self::Machine;
    /// One line refusing a connection before its session starts.
    fn refusal(why: &str) -> String;
    /// What the machine is told after a login that needs no upstream
    /// connection (an SMTP account that sends through Microsoft Graph);
    /// `None` for protocols without such logins.
    fn graph_success(_limits: &Limits) -> Option<<Self::Machine as PreAuth>::Success> {
        None
    }
}

/// Where a logged-in session goes: relayed to its server, or served here
/// and sent through Microsoft Graph.
pub(crate) enum Upstream {
    Relay(Conn),
    Graph(std::sync::Arc<crate::tokens::AccountTokens>),
}

impl Upstream {
    fn name(&self) -> String {
        match self {
            Upstream::Relay(c) => c.endpoint.to_string(),
            Upstream::Graph(_) => "Microsoft Graph".into(),
        }
    }
}

/// Runs one client connection until it ends. `client` is already past any
/// implicit TLS handshake; `tls` accepts STARTTLS when configured.
pub(crate) async fn run<P: SessionProtocol>(
    ctx: &Ctx,
    listener: &Listener,
    mut client: Stream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    caller: Caller,
) -> std::io::Result<()> {
    let config = ctx.config();
    let mut pre = P::machine(&config, tls.is_some() && !client.is_tls());
    let deadline = Instant::now() + config.limits.preauth_timeout.saturating_mul(4);
    let mut upstream: Option<Upstream> = None;
    // This session's upstream slot, held until its upstream side ends,
    // however it ends.
    let mut slot = None;
    let mut buf = vec![0u8; 4096];
    let mut first_input = !client.is_tls();
    loop {
        let event = pre.poll();
        send_output(&mut client, pre.take_output()).await?;
        match event {
            Some(Event::Login { username, password }) => {
                let login = username.to_string();
                let name = pre.client_name().map(str::to_owned);
                // Each attempt logs under its own span: a connection may try
                // several names, and each line must name the one it is about.
                // Boxed: the login's future is large and must not size
                // the session's own, which lives on through the relay.
                let attempt = Box::pin(
                    log_in::<P>(Attempt {
                        ctx,
                        listener,
                        caller: &caller,
                        login: &login,
                        password: Secret::from(password),
                        client_name: name.as_deref(),
                    })
                    .instrument(tracing::info_span!("login", login = %escaped(&login))),
                );
                let Some(outcome) = while_client_stays(&mut client, &mut pre, &mut buf, attempt).await else {
                    tracing::info!(login = %escaped(&login), "the client left during its login; abandoned");
                    return Ok(());
                };
                match outcome {
                    Ok(logged_in) => {
                        tracing::Span::current().record("login", escaped(&login).as_str());
                        tracing::info!(upstream = %logged_in.conn.name(), "logged in");
                        slot = logged_in.slot;
                        let now = pre.login_succeeded(logged_in.success);
                        upstream = Some(logged_in.conn);
                        if now {
                            drop(buf);
                            return hand_off(ctx, listener, client, pre, upstream, slot).await;
                        }
                    }
                    Err(f) => {
                        tracing::info!(login = %escaped(&login), reason = %f.text, "login refused");
                        pre.login_failed(f.kind, &f.text);
                    }
                }
            }
            Some(Event::Handoff) => {
                drop(buf);
                return hand_off(ctx, listener, client, pre, upstream, slot).await;
            }
            Some(Event::StartTls) => {
                let Some(tls_client) = Box::pin(start_tls(ctx, client, tls)).await else {
                    return Ok(());
                };
                client = tls_client;
                pre.starttls_done();
            }
            Some(Event::Quit | Event::Close) => {
                if let Some(Upstream::Relay(mut up)) = upstream.take() {
                    let _ = up.send(P::UPSTREAM_QUIT).await;
                }
                let _ = client.shutdown().await;
                return Ok(());
            }
            None => {
                if !pre.wants_input() {
                    // Cannot happen with a well-behaved machine; never spin.
                    return Ok(());
                }
                let Some(n) = read_preauth::<P>(ctx, &mut client, &mut buf, deadline).await? else {
                    return Ok(());
                };
                // A TLS client on a listener that starts in plaintext: it
                // took the greeting for a broken record, nothing more helps.
                if std::mem::take(&mut first_input) && crate::misconnect::is_tls_hello(&buf[..n]) {
                    let how = crate::misconnect::Misconnect::TlsOnPlaintext;
                    crate::misconnect::report(listener, client.local_addr(), how);
                    return Ok(());
                }
                pre.feed(&buf[..n]);
            }
        }
    }
}

/// Runs `attempt` while watching the client: bytes it pipelines meanwhile
/// go to the machine (which keeps them for after the login, within its
/// bound), and if it leaves, the attempt is dropped — a guesser that gives
/// up must not leave queued attempts behind to reach the upstream later.
async fn while_client_stays<M: PreAuth, T>(
    client: &mut Stream,
    pre: &mut M,
    buf: &mut [u8],
    attempt: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(attempt);
    loop {
        tokio::select! {
            r = &mut attempt => return Some(r),
            n = client.read(buf), if pre.buffered_len() < pre.max_buffer() => match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => pre.feed(&buf[..n]),
            },
        }
    }
}

/// One client login: where and from whom it came, and with what.
struct Attempt<'a> {
    ctx: &'a Ctx,
    listener: &'a Listener,
    caller: &'a Caller,
    login: &'a str,
    password: Secret,
    client_name: Option<&'a str>,
}

/// A login that went through: the upstream connection, what the machine
/// answers with, and the session's upstream slot.
struct LoggedIn<S> {
    conn: Upstream,
    success: S,
    slot: Option<SessionSlot>,
}

type LoginResult<P> = Result<LoggedIn<<<P as SessionProtocol>::Machine as PreAuth>::Success>, LoginFailure>;

/// A client login, all the way: input hygiene, routing, the guard against
/// guessing, the session slot, the upstream login.
async fn log_in<P: SessionProtocol>(a: Attempt<'_>) -> LoginResult<P> {
    let (ctx, listener, caller) = (a.ctx, a.listener, a.caller);
    let cap = ctx.config().limits.login_failure_delay_max;
    let r = if !is_safe_credential(a.login) || !is_safe_credential(a.password.expose()) {
        Err(LoginFailure::new(
            Failure::Credentials,
            "user names and passwords cannot contain CR, LF or NUL",
        ))
    } else {
        routed::<P>(a, cap).await
    };
    crate::metrics::login(listener.protocol, r.as_ref().err().map(|f| f.kind));
    match &r {
        Ok(_) => ctx.guard.succeeded(caller.ip),
        Err(f) if f.kind == Failure::Credentials => {
            let delay = ctx.guard.failed(caller.ip, cap);
            if !delay.is_zero() {
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    "repeated failed logins from this network; slowing down"
                );
                tokio::time::sleep(delay).await;
            }
        }
        Err(_) => {}
    }
    r
}

async fn routed<P: SessionProtocol>(a: Attempt<'_>, cap: std::time::Duration) -> LoginResult<P> {
    let Attempt {
        ctx,
        listener,
        caller,
        login,
        password,
        client_name,
    } = a;
    let config = ctx.config();
    if let Some(success) = P::graph_success(&config.limits) {
        if config.lookup(login).is_some_and(|a| a.graph.is_some()) {
            let account = route::resolve_graph(ctx, login, password, caller).await?;
            // Counted with the account's sessions; never waited for, as
            // Graph limits requests, not sessions.
            let slot = super::slots::take(ctx, login, listener.protocol).await?;
            let conn = Upstream::Graph(account);
            return Ok(LoggedIn { conn, success, slot });
        }
    }
    let target = route::resolve(ctx, listener, login, password, caller).await?;
    // Before the guessing guard's turn: waiting for a slot holds no turn.
    let slot = super::slots::take(ctx, login, listener.protocol).await?;
    let turn = match target.passthrough_password() {
        None => None,
        Some(pw) => Some(ctx.guard.passthrough_turn(login, pw.expose()).await.map_err(|_| {
            LoginFailure::new(
                Failure::Unavailable,
                "too many logins for this user at once; try again in a moment",
            )
        })?),
    };
    let r = login::log_in::<P::Upstream, _>(&ctx.dialer(), target, client_name).await;
    if let Some(t) = &turn {
        match &r {
            Ok(_) => t.succeeded(),
            Err(f) if f.kind == Failure::Credentials => t.failed(cap),
            Err(_) => t.inconclusive(),
        }
    }
    r.map(|(c, success)| LoggedIn {
        conn: Upstream::Relay(c.into_conn()),
        success,
        slot,
    })
}

/// The login is done: what the machine still holds for the client (its
/// answer to the login) and what the upstream sent past it go to the
/// client, what the client pipelined goes upstream, then bytes flow. The
/// session's slot goes with the upstream connection and is freed when it
/// closes (with a Graph session, when it ends).
async fn hand_off<M: PreAuth>(
    ctx: &Ctx,
    listener: &Listener,
    client: Stream,
    mut pre: M,
    upstream: Option<Upstream>,
    slot: Option<SessionSlot>,
) -> std::io::Result<()> {
    let up = match upstream {
        Some(Upstream::Relay(up)) => up,
        Some(Upstream::Graph(account)) => {
            crate::metrics::connection(listener.protocol, "graph");
            let to_client = pre.take_output();
            // Boxed: the submission server's future must not size every
            // relayed session's.
            let serving = super::graph::serve(ctx, client, account, to_client, pre.into_pending_input());
            return Box::pin(serving).await;
        }
        None => return Ok(()), // a machine hands off only after a successful login
    };
    tracing::info!(upstream = %up.endpoint, "relaying");
    // Only the stream lives on: the login's buffers go now, not at the end.
    let (upstream, past_login) = up.into_parts();
    let mut to_client = pre.take_output();
    to_client.extend_from_slice(&past_login);
    drop(past_login);
    let to_upstream = pre.into_pending_input();
    crate::metrics::connection(listener.protocol, "relayed");
    let meter = crate::metrics::relayed_bytes(listener.protocol);
    let (sent, received) = relay::relay(client, upstream, to_upstream, to_client, &meter, &ctx.shutdown, slot).await?;
    tracing::info!(bytes_up = sent, bytes_down = received, "session ended");
    Ok(())
}

/// Writes what a pre-login machine has to say, and flushes (a TLS stream
/// holds records until then).
async fn send_output(client: &mut Stream, out: Vec<u8>) -> std::io::Result<()> {
    if !out.is_empty() {
        client.write_all(&out).await?;
        client.flush().await?;
    }
    Ok(())
}

/// Before login: the next bytes from the client, within the pre-login time
/// limits (idle `preauth_timeout`, the whole phase `deadline`). `None` ends
/// the session: end of input, a timeout (the client is told), or shutdown.
async fn read_preauth<P: SessionProtocol>(
    ctx: &Ctx,
    client: &mut Stream,
    buf: &mut [u8],
    deadline: Instant,
) -> std::io::Result<Option<usize>> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .min(ctx.config().limits.preauth_timeout);
    tokio::select! {
        r = tokio::time::timeout(left, client.read(buf)) => match r {
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(n)) => Ok(Some(n)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let _ = client.write_all(P::IDLE_BYE).await;
                let _ = client.flush().await;
                Ok(None)
            }
        },
        _ = ctx.shutdown.cancelled() => {
            let _ = client.write_all(P::SHUTDOWN_BYE).await;
            let _ = client.flush().await;
            Ok(None)
        }
    }
}

/// STARTTLS/STLS accepted: the TLS handshake on the same connection, within
/// the pre-login timeout. `None` when it fails (the session ends).
async fn start_tls(ctx: &Ctx, client: Stream, tls: Option<&tokio_rustls::TlsAcceptor>) -> Option<Stream> {
    let (Some(acceptor), Stream::Plain(tcp)) = (tls, client) else {
        return None; // the machines offer STARTTLS only on plain connections with TLS configured
    };
    match tokio::time::timeout(ctx.config().limits.preauth_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(Stream::ServerTls(Box::new(s))),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "client TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, E, F>(_: impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A session's future lives as long as the session, idle or not: what
    /// only a login or the Graph submission server needs is boxed, so it
    /// does not size every relayed session's (thousands of idle sessions
    /// each pay this).
    #[test]
    fn a_session_future_stays_small() {
        let sizes = [
            ("IMAP", future_size(run::<super::super::imap::Imap>)),
            ("POP3", future_size(run::<super::super::pop3::Pop3>)),
            ("SMTP", future_size(run::<super::super::smtp::Smtp>)),
        ];
        // About 3 KiB unoptimised today; the Graph server unboxed made it 8.
        for (name, size) in sizes {
            assert!(size <= 4096, "the {name} session's future is {size} bytes");
        }
    }
}

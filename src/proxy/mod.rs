//! What every protocol's session shares: routing a login to its upstream,
//! unlocking the account's tokens, and the byte relay after the hand-off.

pub mod client;
pub mod imap;
pub mod pop3;
pub mod smtp;

use std::net::IpAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::config::{Account, Config, Listener, Mechanism};
use crate::endpoint::{Endpoint, Protocol};
use crate::net::Stream;
use crate::secret::Secret;
use crate::tls::ClientConfigs;
use crate::tokens::{describe_pending, AccountTokens, AuthError, TokenError, TokenManager};

/// Shared by all sessions of a running `serve`.
pub struct Ctx {
    /// Replaced whole on SIGHUP; sessions keep the snapshot they started with.
    pub config: std::sync::RwLock<Arc<Config>>,
    pub tokens: Arc<TokenManager>,
    pub tls: ClientConfigs,
    pub shutdown: CancellationToken,
    pub ip_failures: IpBackoff,
}

/// Failed logins per client address: after a few, each further failure is
/// answered later and later (capped by `login_failure_delay_max`), so a
/// guesser on one address slows down without affecting anyone else.
#[derive(Default)]
pub struct IpBackoff {
    map: std::sync::Mutex<std::collections::HashMap<IpAddr, (u32, std::time::Instant)>>,
}

impl IpBackoff {
    const FREE: u32 = 3;
    const FORGET: std::time::Duration = std::time::Duration::from_secs(15 * 60);
    const MAX_TRACKED: usize = 10_000;

    /// Records a failure; returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr, cap: std::time::Duration) -> std::time::Duration {
        let now = std::time::Instant::now();
        let mut m = self.map.lock().unwrap();
        if m.len() >= Self::MAX_TRACKED {
            m.retain(|_, (_, last)| now.duration_since(*last) < Self::FORGET);
        }
        let e = m.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) >= Self::FORGET {
            e.0 = 0;
        }
        e.0 += 1;
        e.1 = now;
        match e.0.checked_sub(Self::FREE) {
            None | Some(0) => std::time::Duration::ZERO,
            Some(n) => (std::time::Duration::from_millis(100) * (1u32 << (n - 1).min(10))).min(cap),
        }
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.map.lock().unwrap().remove(&ip);
    }
}

impl Ctx {
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }
}

/// Response text must stay on one line and never carry CR/LF from upstream
/// or provider text into the client's protocol stream.
pub fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Writes what a pre-login state machine has to say, and flushes (a TLS
/// stream holds records until then).
pub async fn send_output(client: &mut Stream, out: Vec<u8>) -> std::io::Result<()> {
    if !out.is_empty() {
        client.write_all(&out).await?;
    }
    client.flush().await
}

/// Before login: the next bytes from the client, within the pre-login time
/// limits (idle `preauth_timeout`, the whole phase `deadline`). `None` ends
/// the session: end of input, a timeout (the client gets `idle_bye`), or
/// shutdown (`shutdown_bye`).
pub async fn read_preauth(
    ctx: &Ctx,
    client: &mut Stream,
    buf: &mut [u8],
    deadline: std::time::Instant,
    idle_bye: &[u8],
    shutdown_bye: &[u8],
) -> std::io::Result<Option<usize>> {
    use tokio::io::AsyncReadExt;
    let left = deadline
        .saturating_duration_since(std::time::Instant::now())
        .min(ctx.config().limits.preauth_timeout);
    tokio::select! {
        r = tokio::time::timeout(left, client.read(buf)) => match r {
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(n)) => Ok(Some(n)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let _ = client.write_all(idle_bye).await;
                Ok(None)
            }
        },
        _ = ctx.shutdown.cancelled() => {
            let _ = client.write_all(shutdown_bye).await;
            Ok(None)
        }
    }
}

/// STARTTLS/STLS accepted: the TLS handshake on the same connection, within
/// the pre-login timeout. `None` when it fails (the session ends).
pub async fn start_tls(ctx: &Ctx, client: Stream, tls: Option<&tokio_rustls::TlsAcceptor>) -> Option<Stream> {
    let (Some(acceptor), Stream::Plain(tcp)) = (tls, client) else {
        return None; // the state machines offer STARTTLS only on plain connections with TLS configured
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

/// Relay buffer sizes, per direction: small while a session is interactive
/// (thousands of idle sessions stay cheap), growing for bulk transfers (FETCH
/// of a large mailbox, a big DATA), where fewer, larger reads and writes keep
/// up with a direct connection, and shrinking again afterwards.
pub const RELAY_MIN: usize = 8 * 1024;
pub const RELAY_MAX: usize = 256 * 1024;
/// Once one side has closed, how long the other may still finish.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// How to log in upstream for one client login.
pub struct Upstream {
    pub endpoint: Endpoint,
    pub ca_file: Option<std::path::PathBuf>,
    pub insecure: bool,
    pub user: String,
    pub auth: UpstreamAuth,
}

pub enum UpstreamAuth {
    /// OAuth account: a fresh access token; `account` lets the session ask
    /// for a new one if the server rejects it.
    Token {
        token: Secret,
        mechanism: Mechanism,
        account: Arc<AccountTokens>,
    },
    /// Passthrough: the client's own password.
    Password(Secret),
}

/// Why a login cannot proceed, in words for the client.
#[derive(Debug)]
pub struct LoginFailure {
    pub kind: FailureKind,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Wrong credentials (IMAP AUTHENTICATIONFAILED, SMTP 535, POP3 -ERR [AUTH]).
    Credentials,
    /// A person must act (re-authorise, fix config): IMAP ALERT.
    Action,
    /// Temporary: provider or server unreachable (IMAP UNAVAILABLE, SMTP 454).
    Unavailable,
}

impl LoginFailure {
    pub fn new(kind: FailureKind, text: impl Into<String>) -> Self {
        LoginFailure {
            kind,
            text: text.into(),
        }
    }

    /// The IMAP response code for this failure.
    pub fn imap_code(&self) -> &'static str {
        match self.kind {
            FailureKind::Credentials => "AUTHENTICATIONFAILED",
            FailureKind::Action => "ALERT",
            FailureKind::Unavailable => "UNAVAILABLE",
        }
    }
}

/// Resolves a client login to the upstream and credentials to use. For OAuth
/// accounts this checks the local password (a wrong one ends here, before
/// any upstream traffic) and obtains a fresh access token.
pub async fn authorize(
    ctx: &Ctx,
    listener: &Listener,
    peer: IpAddr,
    login: &str,
    password: Secret,
) -> Result<Upstream, LoginFailure> {
    let r = authorize_inner(ctx, listener, login, password).await;
    match &r {
        Err(f) if f.kind == FailureKind::Credentials => {
            let delay = ctx
                .ip_failures
                .failed(peer, ctx.config().limits.login_failure_delay_max);
            if !delay.is_zero() {
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    "repeated failed logins from this address; slowing down"
                );
                tokio::time::sleep(delay).await;
            }
        }
        Ok(_) => ctx.ip_failures.succeeded(peer),
        Err(_) => {}
    }
    r
}

async fn authorize_inner(
    ctx: &Ctx,
    listener: &Listener,
    login: &str,
    password: Secret,
) -> Result<Upstream, LoginFailure> {
    let protocol = listener.protocol;
    let config = ctx.config();
    let Some(account) = config.account(login) else {
        return match &listener.fallback {
            Some(fb) => Ok(Upstream {
                endpoint: fb.clone(),
                ca_file: config.ca_file.clone(),
                insecure: false,
                user: login.to_string(),
                auth: UpstreamAuth::Password(password),
            }),
            None => {
                tracing::info!(login = %login, "login for an unknown account refused");
                Err(LoginFailure::new(FailureKind::Credentials, "Authentication failed"))
            }
        };
    };
    let endpoint = endpoint_for(account, protocol)?;
    let Some(tokens) = ctx.tokens.get(login) else {
        // A passthrough account.
        return Ok(Upstream {
            endpoint,
            ca_file: account.ca_file.clone(),
            insecure: account.insecure_skip_verify,
            user: account.username.clone(),
            auth: UpstreamAuth::Password(password),
        });
    };
    match ctx.tokens.authenticate(&tokens, &password).await {
        Ok(()) => {}
        Err(AuthError::NotAuthorised(_)) => return Err(on_demand(ctx, &tokens, &password).await),
        Err(AuthError::WrongPassword) => {
            tracing::info!(account = %account.name, "wrong local password");
            return Err(LoginFailure::new(FailureKind::Credentials, "Authentication failed"));
        }
        Err(e @ AuthError::NoLocalPassword(_)) => {
            tracing::warn!(account = %account.name, error = %e, "login to an account that is not ready");
            return Err(LoginFailure::new(FailureKind::Action, e.to_string()));
        }
        Err(e @ AuthError::Busy(_)) => return Err(LoginFailure::new(FailureKind::Unavailable, e.to_string())),
        Err(e @ AuthError::Vault(_)) => {
            tracing::error!(account = %account.name, error = %e, "vault error");
            return Err(LoginFailure::new(FailureKind::Action, e.to_string()));
        }
    }
    let token = match ctx.tokens.access_token(&tokens).await {
        Ok(t) => t,
        Err(TokenError::NeedsLogin { .. }) => return Err(on_demand(ctx, &tokens, &password).await),
        Err(e) => return Err(token_failure(ctx, &account.name, e)),
    };
    Ok(Upstream {
        endpoint,
        ca_file: account.ca_file.clone(),
        insecure: account.insecure_skip_verify,
        user: account.username.clone(),
        auth: UpstreamAuth::Token {
            token,
            mechanism: account.mechanism,
            account: tokens.clone(),
        },
    })
}

fn endpoint_for(account: &Account, protocol: Protocol) -> Result<Endpoint, LoginFailure> {
    account.endpoint(protocol).cloned().ok_or_else(|| {
        LoginFailure::new(
            FailureKind::Action,
            format!(
                "{} has no {protocol} server configured; set {protocol} = \"...\" for it",
                account.name
            ),
        )
    })
}

/// The account has no usable token: start (or join) its authorisation and
/// tell the client what a person has to do.
async fn on_demand(ctx: &Ctx, tokens: &Arc<AccountTokens>, password: &Secret) -> LoginFailure {
    let name = tokens.name().to_string();
    match ctx.tokens.start_authorization(tokens).await {
        Ok(Some(_)) | Err(TokenError::Pending { .. }) => {
            let status = ctx.tokens.status(tokens).await;
            let how = match (ctx.tokens.status_url(), &status.pending) {
                (Some(url), Some(p)) => match &p.user_code {
                    Some(code) => format!("open {url} (or {}) and enter the code {code}, then log in again", p.url),
                    None => format!("open {url} in a browser on this machine and sign in, then log in again"),
                },
                (None, Some(p)) => describe_pending(p),
                _ => format!("run `mailproxy login {name}`"),
            };
            LoginFailure::new(FailureKind::Action, format!("{name} is not authorised yet: {how}"))
        }
        Ok(None) => {
            // Authorised without a person (client credentials): this login sets up the account.
            match ctx.tokens.authenticate(tokens, password).await {
                Ok(()) => LoginFailure::new(
                    FailureKind::Unavailable,
                    format!("{name} is now authorised; log in again"),
                ),
                Err(e) => LoginFailure::new(FailureKind::Action, e.to_string()),
            }
        }
        Err(e) => token_failure(ctx, &name, e),
    }
}

pub fn token_failure(_ctx: &Ctx, account: &str, e: TokenError) -> LoginFailure {
    let kind = match &e {
        TokenError::OAuth(o) if o.is_transient() => FailureKind::Unavailable,
        TokenError::Vault(_) => FailureKind::Unavailable,
        _ => FailureKind::Action,
    };
    tracing::warn!(account = %account, error = %e, "no access token");
    LoginFailure::new(kind, e.to_string())
}

/// After the hand-off: first what each side already sent the other (so
/// nothing is lost or reordered), then bytes both ways, untouched, until
/// both sides close (or one closes and the other lingers past a grace
/// period), or the proxy shuts down.
pub async fn relay(
    mut client: Stream,
    mut upstream: Stream,
    to_upstream: Vec<u8>,
    to_client: Vec<u8>,
    shutdown: &CancellationToken,
) -> std::io::Result<(u64, u64)> {
    if !to_client.is_empty() {
        client.write_all(&to_client).await?;
    }
    if !to_upstream.is_empty() {
        upstream.write_all(&to_upstream).await?;
    }
    client.flush().await?;
    upstream.flush().await?;
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = pump(&mut cr, &mut uw);
    let down = pump(&mut ur, &mut cw);
    tokio::pin!(up, down);
    let grace = |r: Result<std::io::Result<u64>, _>| match r {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    tokio::select! {
        r = &mut up => {
            let u = r?;
            Ok((u, grace(tokio::time::timeout(CLOSE_GRACE, &mut down).await)))
        }
        r = &mut down => {
            let d = r?;
            Ok((grace(tokio::time::timeout(CLOSE_GRACE, &mut up).await), d))
        }
        _ = shutdown.cancelled() => Ok((0, 0)),
    }
}

/// Copies one direction until EOF, then passes the EOF on.
async fn pump<R, W>(r: &mut R, w: &mut W) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; RELAY_MIN];
    let mut total = 0u64;
    let mut small_reads = 0u32;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        // A no-op on TCP; pushes out the records a TLS stream still holds.
        w.flush().await?;
        total += n as u64;
        if n == buf.len() && buf.len() < RELAY_MAX {
            buf = vec![0u8; (buf.len() * 4).min(RELAY_MAX)];
            small_reads = 0;
        } else if buf.len() > RELAY_MIN && n < RELAY_MIN {
            small_reads += 1;
            if small_reads >= 16 {
                buf = vec![0u8; RELAY_MIN];
                small_reads = 0;
            }
        }
    }
}

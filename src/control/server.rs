//! `serve`'s side of the control socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::grant::{self, Notice};
use super::{socket_path, Answer, CheckRow, ControlError, Reply, Request, MAX_LINE};
use crate::audit::Entry;
use crate::config::{Account, Config, OAuthSettings};
use crate::oauth::OAuthError;
use crate::proxy::Ctx;
use crate::secret::Secret;
use crate::tokens::grant::GrantRefused;
use crate::tokens::live::{classify, RevokeInput};
use crate::tokens::offline::OfflineError;
use crate::tokens::{AccountTokens, AuthError, Lane, Resource, TokenError};

/// How many commands may talk to `serve` at once.
const MAX_CLIENTS: usize = 8;
/// How long `serve` waits for a request line or a password.
const READ_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a command waits for a free slot: scripts run several `mailproxy
/// token` at once, and each is answered in a moment.
const SLOT_WAIT: Duration = Duration::from_secs(30);
/// Connections from other uids read at once, and how long each is read:
/// enough to audit what was asked, never a slot of the owner's.
const STRANGERS: usize = 2;
const STRANGER_READ: Duration = Duration::from_secs(2);

/// Binds `state_dir/control.sock` (0600). A socket left behind by a serve
/// that died is replaced; one that answers belongs to a running serve.
pub(crate) fn bind(state_dir: &Path) -> Result<(UnixListener, PathBuf), ControlError> {
    let path = socket_path(state_dir);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    if std::fs::symlink_metadata(&path).is_ok() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(ControlError::AlreadyRunning(state_dir.to_owned()));
        }
        std::fs::remove_file(&path).map_err(io)?;
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok((listener, path))
}

/// Why a command was not done; its text goes back to the command.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("serve is shutting down")]
    ShuttingDown,
    #[error("the config was not reloaded: {0}")]
    NotReloaded(ReloadError),
    #[error("{} has no account `{name}`", .config.display())]
    NoAccount { config: PathBuf, name: String },
    #[error("{0} uses provider = \"password\": the client's own password goes upstream, there is no token")]
    NoToken(String),
    #[error("{0} is not an OAuth account of the running serve (reload it with SIGHUP after editing the config)")]
    NotLive(String),
    /// The account's settings rule out the device flow (the sentence says why).
    #[error("{0}")]
    NoDeviceFlow(String),
    #[error(
        "{0}'s redirect_uri is not a loopback address, so the address must be pasted on the terminal of the process that started the sign-in; stop serve and run `mailproxy login {0}` again"
    )]
    NeedsPaste(String),
    #[error("the command did not send the password")]
    NoPassword,
    #[error("the command sent something other than a password")]
    NotAPassword,
    #[error("the local password must not be empty")]
    EmptyPassword,
    #[error("this serve hands tokens to its owner only, and uid {0} is not its owner")]
    NotOwner(u32),
    #[error("{0}")]
    OAuth(#[from] OAuthError),
    #[error("{0}")]
    GrantRefused(#[from] GrantRefused),
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("{0}")]
    Offline(#[from] OfflineError),
}

/// A reload asked through the socket: `serve`'s main loop runs it (the
/// same as SIGHUP) and answers here.
pub(crate) struct Reloaded(tokio::sync::oneshot::Sender<Result<(), ReloadError>>);

/// Why a reload failed, as `serve` explains it.
pub(crate) type ReloadError = Box<dyn std::error::Error + Send + Sync>;

impl Reloaded {
    pub(crate) fn send(self, r: Result<(), ReloadError>) -> Result<(), Result<(), ReloadError>> {
        self.0.send(r)
    }
}

/// Answers commands until shutdown, then removes the socket.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    ctx: Arc<Ctx>,
    reload: mpsc::Sender<Reloaded>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let strangers = Arc::new(tokio::sync::Semaphore::new(STRANGERS));
    let me = crate::sys::euid();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // The directory is 0700 and the socket 0600; the peer's uid is
        // checked anyway, so a mode mistake cannot hand out the vault.
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let Some(uid) = uid.filter(|u| *u == me || *u == 0) else {
            tracing::warn!(peer_uid = ?uid, "control socket: refused a connection from another user");
            if let Ok(permit) = strangers.clone().try_acquire_owned() {
                tokio::spawn(refuse(ctx.clone(), stream, uid, permit));
            }
            continue;
        };
        let (ctx, reload, slots) = (ctx.clone(), reload.clone(), slots.clone());
        tokio::spawn(async move {
            let Ok(Ok(permit)) = tokio::time::timeout(SLOT_WAIT, slots.acquire_owned()).await else {
                let mut s = stream;
                let message = "serve is busy with other commands; try again in a moment".into();
                let _ = write_reply(&mut s, &Reply::Error { message }).await;
                return;
            };
            handle(ctx, reload, stream, uid).await;
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Another uid reached the socket (a mode mistake, a socket opened up on
/// purpose): it gets a refusal and nothing else, and the audit trail names
/// its uid and, for a token, the account it asked for.
async fn refuse(ctx: Arc<Ctx>, stream: UnixStream, uid: Option<u32>, permit: tokio::sync::OwnedSemaphorePermit) {
    let who = uid.map_or_else(|| "a process of unknown uid".to_string(), |u| format!("uid {u}"));
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let asked = tokio::time::timeout(STRANGER_READ, read_line(&mut r))
        .await
        .ok()
        .flatten()
        .and_then(|l| serde_json::from_slice::<Request>(&l).ok());
    let entry = match asked {
        Some(Request::Token { account, .. }) => Entry::new(
            &account,
            "token_refused",
            format!("token refused to {who}: not the owner"),
        ),
        _ => Entry::new(
            "-",
            "control_refused",
            format!("a control connection from {who} refused: not the owner"),
        ),
    };
    ctx.tokens.audit(entry);
    let message = "refused: this serve answers its owner only".into();
    let _ = write_reply(&mut w, &Reply::Error { message }).await;
    drop(permit);
}

/// Writes one reply line; the buffer is wiped after (a token reply).
async fn write_reply<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let written = w.write_all(&line).await;
    zeroize::Zeroize::zeroize(&mut line);
    written
}

/// One line of at most [`MAX_LINE`] bytes; `None` at EOF, timeout or excess.
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut limited = (&mut *r).take(MAX_LINE + 1);
    match tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut buf)).await {
        Ok(Ok(n)) if n > 0 && buf.len() as u64 <= MAX_LINE => Some(buf),
        _ => None,
    }
}

/// The connection's two halves: replies go through a channel (so flows can
/// speak while they run), answers are read here.
struct Conn {
    tx: mpsc::UnboundedSender<Reply>,
    rx: BufReader<tokio::net::unix::OwnedReadHalf>,
}

impl Conn {
    fn say(&self, text: impl Into<String>, stdout: bool) {
        let _ = self.tx.send(Reply::Say {
            text: text.into(),
            stdout,
        });
    }

    /// Asks the command for the account's local password.
    async fn ask(&mut self, new: bool) -> Result<Secret, CommandError> {
        let _ = self.tx.send(Reply::Ask { new });
        let mut line = read_line(&mut self.rx).await.ok_or(CommandError::NoPassword)?;
        let parsed = serde_json::from_slice::<Answer>(&line);
        zeroize::Zeroize::zeroize(&mut line);
        let a = parsed.map_err(|_| CommandError::NotAPassword)?;
        let pw = Secret::new(a.password.clone());
        if pw.is_empty() {
            return Err(CommandError::EmptyPassword);
        }
        Ok(pw)
    }
}

/// One command of `uid` (the owner, or root).
async fn handle(ctx: Arc<Ctx>, reload: mpsc::Sender<Reloaded>, stream: UnixStream, uid: u32) {
    let (r, mut w) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            if write_reply(&mut w, &reply).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut conn = Conn {
        tx,
        rx: BufReader::new(r),
    };
    let end = match read_line(&mut conn.rx).await {
        None => Reply::Error {
            message: "no request".into(),
        },
        Some(line) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Reply::Error {
                message: format!(
                    "not a request this serve understands ({e}); is the command from another mailproxy version?"
                ),
            },
            Ok(req) => {
                tracing::debug!(command = ?req, "control socket request");
                match run(&ctx, &reload, &mut conn, req, uid).await {
                    Ok(code) => Reply::Done { code },
                    Err(e) => Reply::Error { message: e.to_string() },
                }
            }
        },
    };
    let _ = conn.tx.send(end);
    drop(conn);
    let _ = writer.await;
}

/// The OAuth account `name` of the running config.
fn oauth_account(config: &Config, name: &str) -> Result<(Arc<Account>, OAuthSettings), CommandError> {
    let account = config.lookup(name).ok_or_else(|| CommandError::NoAccount {
        config: config.path.clone(),
        name: name.to_string(),
    })?;
    let Some(s) = account.oauth() else {
        return Err(CommandError::NoToken(name.to_string()));
    };
    Ok((account.clone(), s.clone()))
}

fn live(ctx: &Ctx, name: &str) -> Result<Arc<AccountTokens>, CommandError> {
    ctx.tokens
        .get(name)
        .ok_or_else(|| CommandError::NotLive(name.to_string()))
}

async fn run(
    ctx: &Arc<Ctx>,
    reload: &mpsc::Sender<Reloaded>,
    conn: &mut Conn,
    req: Request,
    uid: u32,
) -> Result<u8, CommandError> {
    let config = ctx.config();
    let tokens = &ctx.tokens;
    match req {
        Request::Reload => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            reload
                .send(Reloaded(tx))
                .await
                .map_err(|_| CommandError::ShuttingDown)?;
            match rx.await {
                Ok(Ok(())) => Ok(0),
                Ok(Err(e)) => Err(CommandError::NotReloaded(e)),
                Err(_) => Err(CommandError::ShuttingDown),
            }
        }
        Request::Accounts => {
            let mut rows = Vec::new();
            for a in tokens.all() {
                rows.push(tokens.status(&a).await);
            }
            let _ = conn.tx.send(Reply::Accounts { rows });
            Ok(0)
        }
        Request::Check { account } => {
            let accts = match account {
                Some(n) => {
                    oauth_account(&config, &n)?;
                    vec![live(ctx, &n)?]
                }
                None => tokens.all(),
            };
            let mut rows = Vec::new();
            for a in accts {
                let outcome = tokens.check_now(&a).await;
                rows.push(CheckRow {
                    account: a.name().to_string(),
                    outcome,
                });
            }
            let worst = rows.iter().map(|r| r.outcome.code()).max().unwrap_or(0);
            let _ = conn.tx.send(Reply::Checked { rows });
            Ok(worst)
        }
        Request::Login {
            account,
            device,
            timeout,
        } => login(ctx, conn, &account, device, timeout).await,
        Request::Passwd { account } => passwd(ctx, conn, &account).await,
        Request::Revoke { account } => revoke(ctx, conn, &account).await,
        Request::Token {
            account,
            min_life_secs,
            resource,
        } => token(ctx, conn, &account, (resource, min_life_secs), uid).await,
    }
}

/// `mailproxy token` through serve: the owner's uid only (root too is
/// refused), each hand-out and refusal audited, the token itself never.
/// A locked account is opened with the owner's local password first.
async fn token(
    ctx: &Arc<Ctx>,
    conn: &mut Conn,
    account: &str,
    want: (Resource, u64),
    uid: u32,
) -> Result<u8, CommandError> {
    let (resource, min_life) = want;
    let tokens = &ctx.tokens;
    if uid != crate::sys::euid() {
        let why = format!("token refused to uid {uid}: not the owner");
        tokens.audit(Entry::new(account, "token_refused", why));
        return Err(CommandError::NotOwner(uid));
    }
    let config = ctx.config();
    let (account, _) = oauth_account(&config, account)?;
    let acct = live(ctx, &account.name)?;
    let grant = tokens.grant_of(&acct)?;
    if tokens.is_locked(&grant).await {
        let pw = conn.ask(false).await?;
        if let Err(e) = tokens.authenticate(&grant, &pw, Lane::Owner).await {
            conn.say(format!("{}: {e}", grant.name()), false);
            return Ok(if matches!(e, AuthError::Store(_) | AuthError::Busy(_)) {
                2
            } else {
                1
            });
        }
    }
    match tokens.hand_out(&acct, resource, Duration::from_secs(min_life)).await {
        Ok(token) => {
            let entry = Entry::new(
                &account.name,
                "token_handed_out",
                format!("token handed out to uid {uid}"),
            );
            tokens.audit(entry.scopes(&token.scopes));
            let _ = conn.tx.send(Reply::Token { token });
            Ok(0)
        }
        Err(e) => {
            let row = CheckRow {
                account: account.name.clone(),
                outcome: classify(e),
            };
            conn.say(row.line(), false);
            Ok(row.outcome.code())
        }
    }
}

/// `mailproxy login` through serve: the grant, checked, installed live.
async fn login(ctx: &Arc<Ctx>, conn: &mut Conn, account: &str, device: bool, timeout: u64) -> Result<u8, CommandError> {
    let config = ctx.config();
    let tokens = &ctx.tokens;
    let (account, settings) = oauth_account(&config, account)?;
    let acct = live(ctx, &account.name)?;
    if device {
        if let Some(why) = settings.device_flow_refusal(&account.name) {
            return Err(CommandError::NoDeviceFlow(why));
        }
    }
    if grant::needs_paste(&settings) {
        return Err(CommandError::NeedsPaste(account.name.clone()));
    }
    let password = conn.ask(true).await?;
    let tx = conn.tx.clone();
    let name = account.name.clone();
    let who = name.clone();
    let tell = move |n: Notice| {
        let reply = match n {
            Notice::Open(url) => Some(Reply::Open { url }),
            other => other.text(&who).map(|text| Reply::Say { text, stdout: false }),
        };
        if let Some(r) = reply {
            let _ = tx.send(r);
        }
    };
    let r = grant::obtain(
        &tokens.http,
        &account,
        &settings,
        device,
        Duration::from_secs(timeout),
        &tell,
    )
    .await;
    let t = match r {
        Ok(t) => t,
        Err(e) => {
            tokens.audit(Entry::new(&name, "consent", format!("failed: {e}")));
            return Err(e.into());
        }
    };
    let scopes = tokens
        .accept_grant(&account, &settings, &t, config.limits.provider_timeout)
        .await?;
    let where_ = tokens.install_grant(&acct, &password, t).await?;
    conn.say(
        format!(
            "Authorised {name} (scopes: {}); {where_}.\n\
             Configure your mail client with user name {name} and the local password you chose.",
            scopes.join(" ")
        ),
        false,
    );
    Ok(0)
}

/// `mailproxy passwd` through serve.
async fn passwd(ctx: &Arc<Ctx>, conn: &mut Conn, account: &str) -> Result<u8, CommandError> {
    let config = ctx.config();
    let tokens = &ctx.tokens;
    let (account, _) = oauth_account(&config, account)?;
    let acct = live(ctx, &account.name)?;
    let old = if tokens.passwd_needs_old(&acct).await? {
        Some(conn.ask(false).await?)
    } else {
        None
    };
    let new = conn.ask(true).await?;
    tokens.change_password_live(&acct, old, &new).await?;
    conn.say(
        format!(
            "The local password of {} is changed; clients must use the new one.",
            account.name
        ),
        false,
    );
    Ok(0)
}

/// `mailproxy revoke` through serve.
async fn revoke(ctx: &Arc<Ctx>, conn: &mut Conn, account: &str) -> Result<u8, CommandError> {
    let config = ctx.config();
    let tokens = &ctx.tokens;
    let (account, _) = oauth_account(&config, account)?;
    let acct = live(ctx, &account.name)?;
    let mut input = RevokeInput::Live;
    if tokens.is_locked(&acct).await {
        let pw = conn.ask(false).await?;
        // The control socket answers only its own uid: the owner.
        if let Err(e) = tokens.authenticate(&acct, &pw, crate::tokens::Lane::Owner).await {
            input = RevokeInput::EraseOnly(e.to_string());
        }
    }
    let lines = tokens.revoke_live(&acct, input).await?;
    for l in lines {
        conn.say(l, true);
    }
    Ok(0)
}

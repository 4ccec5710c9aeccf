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
use crate::tokens::live::RevokeInput;
use crate::tokens::offline::OfflineError;
use crate::tokens::{AccountTokens, TokenError};

/// How many commands may talk to `serve` at once.
const MAX_CLIENTS: usize = 8;
/// How long `serve` waits for a request line or a password.
const READ_TIMEOUT: Duration = Duration::from_secs(600);

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
        if uid != Some(me) && uid != Some(0) {
            tracing::warn!(peer_uid = ?uid, "control socket: refused a connection from another user");
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let mut s = stream;
            let _ = write_reply(
                &mut s,
                &Reply::Error {
                    message: "serve is busy with other commands; try again in a moment".into(),
                },
            )
            .await;
            continue;
        };
        let (ctx, reload) = (ctx.clone(), reload.clone());
        tokio::spawn(async move {
            handle(ctx, reload, stream).await;
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn write_reply<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
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

async fn handle(ctx: Arc<Ctx>, reload: mpsc::Sender<Reloaded>, stream: UnixStream) {
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
                match run(&ctx, &reload, &mut conn, req).await {
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

//! `mailproxy serve`: the listeners, connection limits and shutdown.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::audit::Audit;
use crate::config::{Config, Listener, LocalTls, TokenStore};
use crate::endpoint::Protocol;
use crate::keystore;
use crate::net::{self, Stream};
use crate::proxy::{self, Ctx};
use crate::tls::{self, ClientConfigs};
use crate::tokens::TokenManager;
use crate::vault::Vault;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} for {protocol}: {source}")]
    Bind {
        protocol: Protocol,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

/// Per-address connection counts, for the per-client cap.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot<'a>(&'a PerIp, IpAddr);

impl PerIp {
    fn enter(&self, ip: IpAddr, max: usize) -> Option<IpSlot<'_>> {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot(self, ip))
    }
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

struct ListenerCtx {
    config: Listener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    sessions: Semaphore,
    per_ip: PerIp,
}

/// Runs until SIGINT/SIGTERM. Prints `listening PROTOCOL ADDR` on stdout once
/// each listener is bound (port 0 in the config picks a free port).
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // Handlers first: a signal that arrives once we said "listening" must
    // find them in place.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| ServeError::Setup(e.to_string()))?;
    let vault = Vault::open(&config.state_dir).map_err(|e| ServeError::Setup(e.to_string()))?;
    let store = effective_store(&config).await;
    let audit = Audit::start(&config.audit_log);
    let tokens = Arc::new(TokenManager::new(&config, vault, store, audit));
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    let ctx = Arc::new(Ctx {
        config: std::sync::RwLock::new(config.clone()),
        tokens: tokens.clone(),
        tls: ClientConfigs::default(),
        shutdown: shutdown.clone(),
        ip_failures: Default::default(),
    });

    // Fail at start, not at the first login, on unreadable CA files.
    check_ca_files(&ctx, &config)?;

    let tracker = TaskTracker::new();
    let mut listeners = Vec::new();
    for l in config.listeners() {
        let acceptor = match l.tls {
            LocalTls::None => None,
            _ => {
                let (cert, key) = match (&l.cert, &l.key) {
                    (Some(c), Some(k)) => (c.clone(), k.clone()),
                    _ => {
                        let dir = config.state_dir.join("certs");
                        std::fs::create_dir_all(&dir)
                            .map_err(|e| ServeError::Setup(format!("{}: {e}", dir.display())))?;
                        let (c, k, fp) = tls::self_signed(&dir).map_err(|e| ServeError::Setup(e.to_string()))?;
                        println!("certificate {} sha256 {fp}", c.display());
                        tracing::info!(cert = %c.display(), sha256 = %fp, "using the self-signed local certificate");
                        (c, k)
                    }
                };
                let sc = tls::server_config(&cert, &key).map_err(|e| ServeError::Setup(e.to_string()))?;
                Some(tokio_rustls::TlsAcceptor::from(sc))
            }
        };
        let sock = TcpListener::bind(l.listen).await.map_err(|source| ServeError::Bind {
            protocol: l.protocol,
            addr: l.listen,
            source,
        })?;
        let addr = sock.local_addr().map_err(|e| ServeError::Setup(e.to_string()))?;
        println!("listening {} {addr}", l.protocol);
        if !addr.ip().is_loopback() && l.tls == LocalTls::None {
            tracing::warn!(%addr, "listening without TLS on a non-loopback address (allow_insecure_remote): passwords cross the network in the clear");
        }
        tracing::info!(protocol = %l.protocol, %addr, tls = ?l.tls, "listening");
        let lctx = Arc::new(ListenerCtx {
            config: l.clone(),
            acceptor,
            sessions: Semaphore::new(config.limits.max_connections),
            per_ip: PerIp::default(),
        });
        listeners.push((sock, lctx));
    }
    if listeners.is_empty() {
        return Err(ServeError::Setup(format!(
            "{} configures no listener: add [imap] listen = \"127.0.0.1:1143\"",
            config.path.display()
        )));
    }
    if let Some(addr) = config.status_listen {
        let sock = TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Setup(format!("cannot listen on {addr} for the status page: {e}")))?;
        let addr = sock.local_addr().map_err(|e| ServeError::Setup(e.to_string()))?;
        println!("listening status {addr}");
        tokens.set_status_url(Some(format!("http://{addr}/")));
        tracker.spawn(crate::status::serve(sock, tokens.clone(), shutdown.clone()));
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    tracker.spawn(refresher(tokens.clone(), config.state_dir.clone(), shutdown.clone()));

    let ids = Arc::new(AtomicU64::new(1));
    for (sock, lctx) in listeners {
        let (ctx, tracker2, ids, shutdown) = (ctx.clone(), tracker.clone(), ids.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = sock.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = shutdown.cancelled() => break,
                };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let (ctx, lctx) = (ctx.clone(), lctx.clone());
                let span = tracing::info_span!("conn", id, proto = %lctx.config.protocol, peer = %peer, login = tracing::field::Empty);
                tracker2.spawn(async move { connection(&ctx, &lctx, tcp, peer.ip()).await }.instrument(span));
            }
        });
    }

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&ctx),
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sessions did not end within 10 s; exiting anyway");
    }
    Ok(())
}

fn check_ca_files(ctx: &Ctx, config: &Config) -> Result<(), ServeError> {
    ctx.tls
        .get(config.ca_file.as_deref())
        .map_err(|e| ServeError::Setup(format!("[server] ca_file: {e}")))?;
    for a in config.accounts.values() {
        ctx.tls
            .get(a.ca_file.as_deref())
            .map_err(|e| ServeError::Setup(format!("account {}: {e}", a.name)))?;
    }
    Ok(())
}

/// SIGHUP: re-read the config. A broken config is reported and the running
/// one stays in force; sessions in progress keep their snapshot.
fn reload(ctx: &Ctx) {
    let old = ctx.config();
    let new = match Config::load(&old.path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; the running configuration stays in force");
            return;
        }
    };
    if let Err(e) = check_ca_files(ctx, &new) {
        tracing::error!(error = %e, "config reload failed; the running configuration stays in force");
        return;
    }
    let listeners = |c: &Config| c.listeners().map(|l| (l.protocol, l.listen, l.tls)).collect::<Vec<_>>();
    if listeners(&old) != listeners(&new) || old.state_dir != new.state_dir {
        tracing::warn!("listener and state_dir changes take effect at the next restart");
    }
    let changed = ctx.tokens.reload(&new);
    *ctx.config.write().unwrap() = Arc::new(new);
    tracing::info!(changed_accounts = ?changed, "configuration reloaded");
}

/// The keyring is probed once at start; when it does not work, `serve` says
/// so and which store it uses instead.
async fn effective_store(config: &Config) -> TokenStore {
    if config.token_store != TokenStore::Keyring {
        return TokenStore::File;
    }
    let probe = tokio::task::spawn_blocking(keystore::probe)
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match probe {
        Ok(()) => {
            tracing::info!("refresh tokens are kept in the OS keyring");
            TokenStore::Keyring
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                vault = %config.state_dir.join("accounts").display(),
                "the OS keyring is unavailable: using the file vault instead (refresh tokens sealed with a key derived from each local password; accounts stay locked after a restart until a client logs in)"
            );
            TokenStore::File
        }
    }
}

/// Background refresh of every unlocked account, driven by wall-clock
/// expiry; also keeps `state_dir/status.json` current for `mailproxy accounts`.
async fn refresher(tokens: Arc<TokenManager>, state_dir: std::path::PathBuf, shutdown: CancellationToken) {
    let status_path = state_dir.join("status.json");
    let mut last_written = String::new();
    loop {
        let mut next = SystemTime::now() + Duration::from_secs(5);
        let mut rows = Vec::new();
        for acct in tokens.all() {
            next = next.min(tokens.maintain(&acct).await);
            rows.push(tokens.status(&acct).await);
        }
        let doc = serde_json::json!({ "pid": std::process::id(), "accounts": rows }).to_string();
        if doc != last_written {
            let (p, d) = (status_path.clone(), doc.clone());
            match tokio::task::spawn_blocking(move || crate::vault::write_atomic(&p, d.as_bytes())).await {
                Ok(Ok(())) => last_written = doc,
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot write status.json"),
                Err(_) => {}
            }
        }
        // Sleep in short steps judged by the wall clock: a machine that slept
        // through an expiry refreshes as soon as it wakes.
        let wait = next
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = tokens.changed.notified() => {}
            _ = shutdown.cancelled() => {
                let _ = std::fs::remove_file(&status_path);
                return;
            }
        }
    }
}

async fn connection(ctx: &Ctx, l: &ListenerCtx, tcp: TcpStream, ip: IpAddr) {
    net::tune(&tcp);
    let Ok(_permit) = l.sessions.try_acquire() else {
        tracing::warn!(
            max = ctx.config().limits.max_connections,
            "connection limit reached; refusing"
        );
        refuse(tcp, l.config.protocol, "too many connections").await;
        return;
    };
    let Some(_slot) = l.per_ip.enter(ip, ctx.config().limits.max_connections_per_ip) else {
        tracing::warn!(
            max = ctx.config().limits.max_connections_per_ip,
            "per-address connection limit reached; refusing"
        );
        refuse(tcp, l.config.protocol, "too many connections from your address").await;
        return;
    };
    tracing::debug!("accepted");
    let client = match (&l.acceptor, l.config.tls) {
        (Some(acc), LocalTls::Implicit) => {
            match tokio::time::timeout(ctx.config().limits.preauth_timeout, acc.accept(tcp)).await {
                Ok(Ok(s)) => Stream::ServerTls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "client TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        _ => Stream::Plain(tcp),
    };
    let starttls = if l.config.tls == LocalTls::Starttls {
        l.acceptor.as_ref()
    } else {
        None
    };
    let r = match l.config.protocol {
        Protocol::Imap => proxy::imap::session(ctx, &l.config, client, starttls, ip).await,
        Protocol::Smtp => proxy::smtp::session(ctx, &l.config, client, starttls, ip).await,
        Protocol::Pop3 => proxy::pop3::session(ctx, &l.config, client, starttls, ip).await,
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

async fn refuse(mut tcp: TcpStream, protocol: Protocol, why: &str) {
    use tokio::io::AsyncWriteExt;
    let msg = match protocol {
        Protocol::Imap => format!("* BYE [UNAVAILABLE] {why}\r\n"),
        Protocol::Smtp => format!("421 4.7.0 {why}\r\n"),
        Protocol::Pop3 => format!("-ERR [SYS/TEMP] {why}\r\n"),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(msg.as_bytes())).await;
}

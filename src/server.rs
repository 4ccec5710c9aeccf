//! `mailproxy serve`: the listeners, connection limits and shutdown.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::audit::Audit;
use crate::config::{Config, Listener, LocalTls, LocalUsers, TokenStore};
use crate::endpoint::Protocol;
use crate::keystore;
use crate::net::{self, Stream};
use crate::proxy::caller::{Caller, LocalUser};
use crate::proxy::imap::Imap;
use crate::proxy::pop3::Pop3;
use crate::proxy::session::{self, SessionProtocol};
use crate::proxy::smtp::Smtp;
use crate::proxy::Ctx;
use crate::proxy_header::{self, Header};
use crate::tls::{self, ClientConfigs, TlsError};
use crate::tokens::TokenManager;
use crate::vault::{Vault, VaultError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} for {protocol}: {source}")]
    Bind {
        protocol: Protocol,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for the status page: {source}")]
    StatusBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    StoreKey(#[from] crate::store::StoreKeyError),
    #[error("cannot listen on {addr} for metrics: {source}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{which}: {source}")]
    Tls { which: String, source: TlsError },
    #[error("{}: {source}", .dir.display())]
    CertDir { dir: PathBuf, source: std::io::Error },
    #[error("{} configures no listener: add [imap] listen = \"127.0.0.1:1143\"", .0.display())]
    NoListener(PathBuf),
    #[error("the control socket: {0}")]
    Control(#[from] crate::control::ControlError),
}

/// Per-address connection counts, for the per-client cap.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot<'a>(&'a PerIp, IpAddr);

impl PerIp {
    fn enter(&self, ip: IpAddr, max: usize) -> Option<IpSlot<'_>> {
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let mut m = self.0 .0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// One listener's live state. Its address and TLS mode are fixed at start;
/// its settings (fallback, certificate, limits) follow the running config.
struct ListenerCtx {
    protocol: Protocol,
    tls_mode: LocalTls,
    acceptor: RwLock<Option<tokio_rustls::TlsAcceptor>>,
    sessions: AtomicUsize,
    per_ip: PerIp,
}

/// A session counted against the listener's `max_connections`.
struct SessionSlot<'a>(&'a AtomicUsize);

impl ListenerCtx {
    fn enter(&self, max: usize) -> Option<SessionSlot<'_>> {
        let n = self.sessions.fetch_add(1, Ordering::AcqRel);
        if n >= max {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SessionSlot(&self.sessions))
    }

    /// This listener's settings in the running config.
    fn settings(&self, ctx: &Ctx) -> Option<Listener> {
        ctx.config().listeners().find(|l| l.protocol == self.protocol).cloned()
    }
}

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The local TLS acceptor a listener's settings ask for.
fn acceptor(config: &Config, l: &Listener) -> Result<Option<tokio_rustls::TlsAcceptor>, ServeError> {
    if l.tls == LocalTls::None {
        return Ok(None);
    }
    let (cert, key) = match (&l.cert, &l.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = config.state_dir.join("certs");
            std::fs::create_dir_all(&dir).map_err(|source| ServeError::CertDir {
                dir: dir.clone(),
                source,
            })?;
            let (c, k, fp) = tls::self_signed(&dir).map_err(|source| ServeError::Tls {
                which: "the self-signed local certificate".into(),
                source,
            })?;
            tracing::info!(cert = %c.display(), sha256 = %fp, "using the self-signed local certificate");
            (c, k)
        }
    };
    let sc = tls::server_config(&cert, &key).map_err(|source| ServeError::Tls {
        which: format!("[{}] cert/key", l.protocol),
        source,
    })?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(sc)))
}

/// Runs until SIGINT/SIGTERM. Prints `listening PROTOCOL ADDR` on stdout once
/// each listener is bound (port 0 in the config picks a free port).
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // Handlers first: a signal that arrives once we said "listening" must
    // find them in place.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ServeError::Signals)?;
    match crate::sys::raise_open_files() {
        Ok(Some(n)) => tracing::info!(open_files = n, "open-file limit"),
        Ok(None) => tracing::info!("no open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    Vault::open(&config.state_dir)?;
    let control = crate::control::server::bind(&config.state_dir)?;
    let store = effective_store(&config).await;
    let records = crate::store::open(&config).await?;
    let store_key = crate::store::store_key(&config)?;
    if store_key.is_some() {
        tracing::info!("refresh tokens are sealed under the store key");
    }
    let audit = Audit::start(&config.audit_log);
    // One set of TLS client configs for sessions and for the identity
    // check of new grants.
    let tls = Arc::new(ClientConfigs::default());
    let tokens = Arc::new(TokenManager::with_records(
        &config,
        records.clone(),
        store,
        store_key,
        audit,
        tls.clone(),
    ));
    if let Some(changes) = records.changes() {
        // Another instance changed an account: look again now.
        let t = tokens.clone();
        tokio::spawn(async move {
            loop {
                changes.notified().await;
                t.changed.notify_one();
            }
        });
    }
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    let ctx = Arc::new(Ctx {
        config: std::sync::RwLock::new(config.clone()),
        tokens: tokens.clone(),
        tls,
        shutdown: shutdown.clone(),
        guard: Default::default(),
    });

    // Fail at start, not at the first login, on unreadable CA files.
    check_ca_files(&ctx, &config)?;

    let tracker = TaskTracker::new();
    let mut listeners = Vec::new();
    for l in config.listeners() {
        if l.tls != LocalTls::None && (l.cert.is_none() || l.key.is_none()) {
            let dir = config.state_dir.join("certs");
            std::fs::create_dir_all(&dir).map_err(|source| ServeError::CertDir {
                dir: dir.clone(),
                source,
            })?;
            let (c, _, fp) = tls::self_signed(&dir).map_err(|source| ServeError::Tls {
                which: "the self-signed local certificate".into(),
                source,
            })?;
            println!("certificate {} sha256 {fp}", c.display());
        }
        let acceptor = acceptor(&config, l)?;
        let sock = TcpListener::bind(l.listen).await.map_err(|source| ServeError::Bind {
            protocol: l.protocol,
            addr: l.listen,
            source,
        })?;
        let addr = sock.local_addr().map_err(|source| ServeError::Bind {
            protocol: l.protocol,
            addr: l.listen,
            source,
        })?;
        println!("listening {} {addr}", l.protocol);
        if !addr.ip().is_loopback() && l.tls == LocalTls::None {
            tracing::warn!(%addr, "listening without TLS on a non-loopback address (allow_insecure_remote): passwords cross the network in the clear");
        }
        tracing::info!(protocol = %l.protocol, %addr, tls = ?l.tls, "listening");
        let lctx = Arc::new(ListenerCtx {
            protocol: l.protocol,
            tls_mode: l.tls,
            acceptor: RwLock::new(acceptor),
            sessions: AtomicUsize::new(0),
            per_ip: PerIp::default(),
        });
        listeners.push((sock, lctx));
    }
    if listeners.is_empty() {
        return Err(ServeError::NoListener(config.path.clone()));
    }
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = config.fleet.metrics_listen {
        let sock = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::MetricsBind { addr, source })?;
        let addr = sock
            .local_addr()
            .map_err(|source| ServeError::MetricsBind { addr, source })?;
        println!("listening metrics {addr}");
        let protocols = listeners.iter().map(|(_, l)| l.protocol).collect();
        tracker.spawn(crate::web::metrics::serve(
            sock,
            tokens.clone(),
            records.clone(),
            ready.clone(),
            protocols,
            shutdown.clone(),
        ));
    }
    if let Some(addr) = config.status_listen {
        let sock = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::StatusBind { addr, source })?;
        let addr = sock
            .local_addr()
            .map_err(|source| ServeError::StatusBind { addr, source })?;
        println!("listening status {addr}");
        tokens.set_status_url(Some(format!("http://{addr}/")));
        tracker.spawn(crate::status::serve(sock, tokens.clone(), shutdown.clone()));
    }
    let (control_sock, control_path) = control;
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(4);
    tracker.spawn(crate::control::server::serve(
        control_sock,
        control_path,
        ctx.clone(),
        reload_tx,
        shutdown.clone(),
    ));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    crate::notify::notify("READY=1\nSTATUS=listening");

    tracker.spawn(tokens.clone().upkeep(config.state_dir.clone(), shutdown.clone()));
    ready.store(true, Ordering::SeqCst);

    let ids = Arc::new(AtomicU64::new(1));
    let tracker_listeners: Vec<Arc<ListenerCtx>> = listeners.iter().map(|(_, l)| l.clone()).collect();
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
                let span = tracing::info_span!("conn", id, proto = %lctx.protocol, peer = %peer, client = tracing::field::Empty, login = tracing::field::Empty);
                let session = async move {
                    match lctx.protocol {
                        Protocol::Imap => connection::<Imap>(&ctx, &lctx, tcp, peer.ip()).await,
                        Protocol::Smtp => connection::<Smtp>(&ctx, &lctx, tcp, peer.ip()).await,
                        Protocol::Pop3 => connection::<Pop3>(&ctx, &lctx, tcp, peer.ip()).await,
                    }
                };
                tracker2.spawn(session.instrument(span));
            }
        });
    }

    let live: Vec<_> = tracker_listeners;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::notify::notify("RELOADING=1");
                let r = reload(&ctx, &live);
                crate::notify::notify(&reloaded_status(&r));
            }
            Some(done) = reload_rx.recv() => {
                crate::notify::notify("RELOADING=1");
                let r = reload(&ctx, &live);
                crate::notify::notify(&reloaded_status(&r));
                let _ = crate::control::server::Reloaded::send(done, r);
            }
        }
    }
    tracing::info!("shutting down");
    crate::notify::notify("STOPPING=1");
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

/// What the service manager hears after a reload: ready again either way
/// (a broken config leaves the running one in force).
fn reloaded_status(r: &Result<(), String>) -> String {
    match r {
        Ok(()) => "READY=1\nSTATUS=listening; configuration reloaded".into(),
        Err(e) => format!(
            "READY=1\nSTATUS=listening; reload failed, the running configuration stays in force: {}",
            crate::text::one_line(e)
        ),
    }
}

fn check_ca_files(ctx: &Ctx, config: &Config) -> Result<(), ServeError> {
    ctx.tls
        .get(config.ca_file.as_deref())
        .map_err(|source| ServeError::Tls {
            which: "[server] ca_file".into(),
            source,
        })?;
    for a in config.entries() {
        ctx.tls.get(a.ca_file.as_deref()).map_err(|source| ServeError::Tls {
            which: format!("account {}", a.name),
            source,
        })?;
    }
    Ok(())
}

/// SIGHUP: re-read the config. A broken config is reported and the running
/// one stays in force; sessions in progress keep their snapshot. What can
/// change live does (fallback, certificates, limits, accounts); what cannot
/// (listen addresses, TLS modes, `state_dir`) is named in a warning.
fn reload(ctx: &Ctx, listeners: &[Arc<ListenerCtx>]) -> Result<(), String> {
    let old = ctx.config();
    let new = match Config::load(&old.path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; the running configuration stays in force");
            return Err(e.to_string());
        }
    };
    if let Err(e) = check_ca_files(ctx, &new) {
        tracing::error!(error = %e, "config reload failed; the running configuration stays in force");
        return Err(e.to_string());
    }
    let mut acceptors = Vec::new();
    for l in listeners {
        let Some(settings) = new.listeners().find(|s| s.protocol == l.protocol) else {
            continue;
        };
        if settings.tls != l.tls_mode {
            continue; // reported below; the listener keeps its mode
        }
        match acceptor(&new, settings) {
            Ok(a) => acceptors.push((l.clone(), a)),
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; the running configuration stays in force");
                return Err(e.to_string());
            }
        }
    }
    let fixed = crate::config::restart_needed(&old, &new);
    if !fixed.is_empty() {
        tracing::warn!(settings = %fixed.join(", "), "these changes take effect at the next restart");
    }
    for (l, a) in acceptors {
        *l.acceptor.write().unwrap_or_else(std::sync::PoisonError::into_inner) = a;
    }
    let changed = ctx.tokens.reload(&new);
    *ctx.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
    tracing::info!(changed_accounts = ?changed, "configuration reloaded");
    Ok(())
}

/// The keyring is probed once at start; when it does not work, `serve` says
/// so and which store it uses instead.
async fn effective_store(config: &Config) -> TokenStore {
    if config.token_store == TokenStore::Postgres {
        tracing::info!("account records are kept in PostgreSQL, shared with other instances");
        return TokenStore::Postgres;
    }
    if config.token_store != TokenStore::Keyring {
        return TokenStore::File;
    }
    let probe = tokio::task::spawn_blocking(keystore::probe).await;
    match probe
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
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

async fn connection<P: SessionProtocol>(ctx: &Ctx, l: &ListenerCtx, mut tcp: TcpStream, ip: IpAddr) {
    net::tune(&tcp);
    let limits = ctx.config().limits.clone();
    // Behind a balancer: the client is who its PROXY header names, and only
    // the trusted balancers may say so.
    let proxy = l.settings(ctx).and_then(|s| s.proxy);
    let direct = tcp.local_addr().ok().zip(tcp.peer_addr().ok());
    let (ip, direct) = match proxy {
        None => (ip, direct),
        Some(pp) if !pp.trusts(ip) => {
            crate::metrics::connection(l.protocol, "refused");
            tracing::warn!("refusing a connection from an address that is not a trusted balancer (proxy_trusted)");
            return;
        }
        Some(_) => match read_proxy_header(&mut tcp, limits.preauth_timeout).await {
            Ok(Header::Proxied { source, .. }) => {
                tracing::Span::current().record("client", tracing::field::display(source));
                (source.ip(), None)
            }
            Ok(Header::Local) => (ip, direct),
            Err(why) => {
                crate::metrics::connection(l.protocol, "refused");
                tracing::warn!(reason = %why, "refusing a connection without a valid PROXY header");
                return;
            }
        },
    };
    let caller = Caller::new(ip, direct);
    // `[server] local_users`: other local users' programs are turned away
    // before any work (the kernel is asked only when the setting limits).
    let allowed = &ctx.config().local_users;
    if *allowed != LocalUsers::Anyone {
        if let LocalUser::Other(uid) = caller.local_user() {
            if !allowed.admits(uid, crate::sys::euid()) {
                crate::metrics::connection(l.protocol, "refused");
                tracing::warn!(
                    peer_uid = uid,
                    "refusing a connection from a local user that local_users does not name"
                );
                refuse::<P>(
                    tcp,
                    "this mailproxy serves other local users' programs only when its owner allows them (local_users)",
                )
                .await;
                return;
            }
        }
    }
    let Some(_slot) = l.enter(limits.max_connections) else {
        crate::metrics::connection(l.protocol, "refused");
        tracing::warn!(max = limits.max_connections, "connection limit reached; refusing");
        refuse::<P>(tcp, "too many connections").await;
        return;
    };
    let Some(_ip_slot) = l.per_ip.enter(ip, limits.max_connections_per_ip) else {
        crate::metrics::connection(l.protocol, "refused");
        tracing::warn!(
            max = limits.max_connections_per_ip,
            "per-address connection limit reached; refusing"
        );
        refuse::<P>(tcp, "too many connections from your address").await;
        return;
    };
    let Some(settings) = l.settings(ctx) else {
        refuse::<P>(tcp, "this listener is being reconfigured").await;
        return;
    };
    tracing::debug!("accepted");
    crate::metrics::connection(l.protocol, "accepted");
    let _open = crate::metrics::session_open(l.protocol);
    let acceptor = l
        .acceptor
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let client = match (&acceptor, l.tls_mode) {
        (Some(acc), LocalTls::Implicit) => {
            if crate::misconnect::plaintext_first(&tcp).await {
                crate::misconnect::report(
                    &settings,
                    tcp.local_addr().ok(),
                    crate::misconnect::Misconnect::PlaintextOnTls,
                );
                crate::misconnect::farewell(tcp, P::refusal(crate::misconnect::PLAINTEXT_ON_TLS).as_bytes()).await;
                return;
            }
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
    let starttls = if l.tls_mode == LocalTls::Starttls {
        acceptor.as_ref()
    } else {
        None
    };
    if let Err(e) = session::run::<P>(ctx, &settings, client, starttls, caller).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The PROXY v2 header at the start of a balancer's connection, read
/// exactly (never a byte of the client's own stream) within `timeout`.
async fn read_proxy_header(tcp: &mut TcpStream, timeout: Duration) -> Result<Header, String> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut prefix = [0u8; proxy_header::PREFIX_LEN];
        let mut got = 0;
        while got < prefix.len() {
            let n = tcp.read(&mut prefix[got..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the connection closed before its PROXY header".to_string());
            }
            got += n;
            // Refuse at the first byte that cannot start a header, rather
            // than wait for bytes a client without one will never send.
            let sig = got.min(proxy_header::SIGNATURE.len());
            if prefix[..sig] != proxy_header::SIGNATURE[..sig] {
                return Err(proxy_header::ProxyHeaderError::NoSignature.to_string());
            }
        }
        let len = proxy_header::header_len(&prefix).map_err(|e| e.to_string())?;
        let mut header = prefix.to_vec();
        header.resize(len, 0);
        tcp.read_exact(&mut header[proxy_header::PREFIX_LEN..])
            .await
            .map_err(|e| e.to_string())?;
        proxy_header::parse(&header).map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err(format!("no PROXY header within {} s", timeout.as_secs())))
}

async fn refuse<P: SessionProtocol>(mut tcp: TcpStream, why: &str) {
    use tokio::io::AsyncWriteExt;
    let msg = P::refusal(why);
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(msg.as_bytes())).await;
}

//! `mailproxy serve` as a library call: [`Server::bind`] opens the store
//! and binds every listener (printing `listening PROTOCOL ADDR` for each),
//! [`Server::run`] serves until told to stop. The process's signals are the
//! caller's: `mailproxy serve` (`cli/serve.rs`) turns SIGTERM and SIGINT into
//! the stop and SIGHUP into a reload; tests can start a server in-process.

mod accept;
mod connection;
mod listener;
mod reload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;
use crate::config::Config;
use crate::control::server::Reloaded;
use crate::endpoint::Protocol;
use crate::proxy::Ctx;
use crate::tls::{ClientConfigs, TlsError};
use crate::tokens::TokenManager;
use crate::vault::{Vault, VaultError};
use listener::ListenerCtx;
use reload::{check_ca_files, effective_store, reload, reloaded_status};

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
    /// A reload's new config (the running one stays in force).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// A bound server, ready to run.
pub struct Server {
    ctx: Arc<Ctx>,
    tracker: TaskTracker,
    listeners: Vec<(TcpListener, Arc<ListenerCtx>)>,
    control_reloads: mpsc::Receiver<Reloaded>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    state_dir: PathBuf,
}

/// What the caller asks of a running server.
pub enum Signal {
    /// Re-read the config (SIGHUP).
    Reload,
    /// Finish the sessions (within 10 s) and return (SIGTERM, SIGINT).
    Stop,
}

impl Server {
    /// Opens the store and binds every listener, the metrics, the status
    /// page and the control socket; prints `listening PROTOCOL ADDR` once
    /// each listener is bound (port 0 in the config picks a free port).
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
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
            listeners.push(listener::bind(&config, l).await?);
        }
        if listeners.is_empty() {
            return Err(ServeError::NoListener(config.path.clone()));
        }
        let ready = Arc::new(AtomicBool::new(false));
        let protocols = listeners.iter().map(|(_, l)| l.protocol).collect();
        start_pages(&config, &tokens, &records, &ready, protocols, &tracker, &shutdown).await?;
        let (control_sock, control_path) = control;
        let (reload_tx, reload_rx) = mpsc::channel(4);
        tracker.spawn(crate::control::server::serve(
            control_sock,
            control_path,
            ctx.clone(),
            reload_tx,
            shutdown.clone(),
        ));
        let _ = std::io::Write::flush(&mut std::io::stdout());
        Ok(Server {
            ctx,
            tracker,
            listeners,
            control_reloads: reload_rx,
            ready,
            shutdown,
            state_dir: config.state_dir.clone(),
        })
    }

    /// Where each listener is bound (the port a `:0` in the config got).
    pub fn local_addrs(&self) -> Vec<(Protocol, std::net::SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(sock, l)| Some((l.protocol, sock.local_addr().ok()?)))
            .collect()
    }

    /// Serves until `signals` says stop (or closes), then gives the
    /// sessions 10 s to end.
    pub async fn run(self, mut signals: mpsc::Receiver<Signal>) -> Result<(), ServeError> {
        let Server {
            ctx,
            tracker,
            listeners,
            mut control_reloads,
            ready,
            shutdown,
            state_dir,
        } = self;
        crate::notify::notify("READY=1\nSTATUS=listening");
        tracker.spawn(ctx.tokens.clone().upkeep(state_dir, shutdown.clone()));
        ready.store(true, Ordering::SeqCst);
        let live: Vec<Arc<ListenerCtx>> = listeners.iter().map(|(_, l)| l.clone()).collect();
        accept::accept_all(&ctx, &tracker, listeners, &shutdown);
        loop {
            tokio::select! {
                s = signals.recv() => match s {
                    Some(Signal::Reload) => {
                        crate::notify::notify("RELOADING=1");
                        let r = reload(&ctx, &live);
                        crate::notify::notify(&reloaded_status(&r));
                    }
                    Some(Signal::Stop) | None => break,
                },
                Some(done) = control_reloads.recv() => {
                    crate::notify::notify("RELOADING=1");
                    let r = reload(&ctx, &live);
                    crate::notify::notify(&reloaded_status(&r));
                    let _ = Reloaded::send(done, r.map_err(Into::into));
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
}

/// Binds the metrics listener and the status page when configured, and
/// starts serving them.
async fn start_pages(
    config: &Config,
    tokens: &Arc<TokenManager>,
    records: &Arc<dyn crate::store::RecordStore>,
    ready: &Arc<AtomicBool>,
    protocols: Vec<Protocol>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    if let Some(addr) = config.fleet.metrics_listen {
        let sock = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::MetricsBind { addr, source })?;
        let addr = sock
            .local_addr()
            .map_err(|source| ServeError::MetricsBind { addr, source })?;
        println!("listening metrics {addr}");
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
        tracker.spawn(crate::web::status::serve(sock, tokens.clone(), shutdown.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// The server as a library call: bound in-process, greeting a client,
    /// and stopped by its caller.
    #[tokio::test]
    async fn a_server_binds_greets_and_stops_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\nstate_dir = \"{}\"\n\n[imap]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("state").display()
        );
        let config = Config::parse(&text, &dir.path().join("config.toml")).unwrap();
        let server = Server::bind(config).await.unwrap();
        let addrs = server.local_addrs();
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].0, Protocol::Imap);
        let (tx, rx) = mpsc::channel(1);
        let running = tokio::spawn(server.run(rx));
        let mut client = tokio::net::TcpStream::connect(addrs[0].1).await.unwrap();
        let (rd, mut wr) = client.split();
        let mut lines = BufReader::new(rd).lines();
        let greeting = lines.next_line().await.unwrap().unwrap();
        assert!(greeting.starts_with("* OK"), "{greeting}");
        wr.write_all(b"a LOGOUT\r\n").await.unwrap();
        assert!(lines.next_line().await.unwrap().unwrap().starts_with("* BYE"));
        tx.send(Signal::Stop).await.unwrap();
        running.await.unwrap().unwrap();
    }
}

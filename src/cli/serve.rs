//! `mailproxy serve`: run the proxy until SIGINT or SIGTERM; SIGHUP
//! reloads the config.

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::server::{ServeError, Server, Signal};

use super::lookup::refuse_placeholders;

pub async fn run(config: Config) -> Result<u8> {
    refuse_placeholders(&config, None)?;
    serve(config).await.map(|_| 0).map_err(Into::into)
}

/// Installs the process's signal handlers, binds, and runs.
async fn serve(config: Config) -> Result<(), ServeError> {
    // Handlers first: a signal that arrives once we said "listening" must
    // find them in place.
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ServeError::Signals)?;
    let server = Server::bind(config).await?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = hup.recv() => Signal::Reload,
            };
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    server.run(rx).await
}

//! Reloading the config on SIGHUP or `mailproxy reload`, and the checks it
//! shares with the start: CA files, the effective token store.

use std::sync::Arc;

use super::listener::{acceptor, ListenerCtx};
use super::ServeError;
use crate::config::{Config, TokenStore};
use crate::keystore;
use crate::proxy::Ctx;
use crate::sync;

/// What the service manager hears after a reload: ready again either way
/// (a broken config leaves the running one in force).
pub(super) fn reloaded_status(r: &Result<(), ServeError>) -> String {
    match r {
        Ok(()) => "READY=1\nSTATUS=listening; configuration reloaded".into(),
        Err(e) => format!(
            "READY=1\nSTATUS=listening; reload failed, the running configuration stays in force: {}",
            crate::text::one_line(&e.to_string())
        ),
    }
}

pub(super) fn check_ca_files(ctx: &Ctx, config: &Config) -> Result<(), ServeError> {
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
pub(super) fn reload(ctx: &Ctx, listeners: &[Arc<ListenerCtx>]) -> Result<(), ServeError> {
    let old = ctx.config();
    let new = match Config::load(&old.path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; the running configuration stays in force");
            return Err(e.into());
        }
    };
    if let Err(e) = check_ca_files(ctx, &new) {
        tracing::error!(error = %e, "config reload failed; the running configuration stays in force");
        return Err(e);
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
                return Err(e);
            }
        }
    }
    let fixed = crate::config::restart_needed(&old, &new);
    if !fixed.is_empty() {
        tracing::warn!(settings = %fixed.join(", "), "these changes take effect at the next restart");
    }
    for (l, a) in acceptors {
        *sync::write(&l.acceptor) = a;
    }
    let changed = ctx.tokens.reload(&new);
    *sync::write(&ctx.config) = Arc::new(new);
    tracing::info!(changed_accounts = ?changed, "configuration reloaded");
    Ok(())
}

/// The keyring is probed once at start; when it does not work, `serve` says
/// so and which store it uses instead.
pub(super) async fn effective_store(config: &Config) -> TokenStore {
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

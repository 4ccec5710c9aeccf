//! Client sessions, from the first byte to the relay.
//!
//! One login, followed from `server.rs`: [`session`] runs the protocol's
//! pre-login machine and, on a login, asks [`route`] where it goes (local
//! password, access token, passthrough), [`guard`] how hard it may be
//! tried, and [`upstream_auth`] to log in there through the protocol's
//! upstream client ([`imap`], [`smtp`], [`pop3`]) over an [`upstream`]
//! connection; then [`relay`] copies bytes both ways.

pub(crate) mod caller;
pub(crate) mod guard;
pub(crate) mod imap;
pub(crate) mod pop3;
pub(crate) mod relay;
pub(crate) mod route;
pub(crate) mod session;
pub(crate) mod smtp;
pub(crate) mod upstream;
pub(crate) mod upstream_auth;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::tls::ClientConfigs;
use crate::tokens::TokenManager;

/// Shared by all sessions of a running `serve`.
pub struct Ctx {
    /// Replaced whole on SIGHUP; sessions keep the snapshot they started with.
    pub config: std::sync::RwLock<Arc<Config>>,
    pub tokens: Arc<TokenManager>,
    pub tls: Arc<ClientConfigs>,
    pub shutdown: CancellationToken,
    pub guard: guard::LoginGuard,
}

impl Ctx {
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

//! Client sessions, from the first byte to the relay: the client-facing
//! side of each protocol.
//!
//! One login, followed from `server.rs`: [`session`] runs the protocol's
//! pre-login machine ([`imap`], [`smtp`], [`pop3`] say which, and which
//! upstream client goes with it) for a [`caller`] and, on a login, asks
//! [`route`] where it goes (local password, access token, passthrough) and
//! [`guard`] how hard it may be tried, and [`slots`] takes one of the
//! account's upstream sessions; then the upstream login
//! (`crate::upstream`) takes the route's target, with a way back to the
//! token manager for a fresh token, and [`relay`] copies bytes both ways.

pub(crate) mod caller;
pub(crate) mod graph;
pub(crate) mod guard;
pub(crate) mod imap;
pub(crate) mod pool;
pub(crate) mod pop3;
pub(crate) mod relay;
pub(crate) mod route;
pub(crate) mod session;
pub(crate) mod slots;
pub(crate) mod smtp;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::sync;
use crate::tls::ClientConfigs;
use crate::tokens::TokenManager;
use crate::upstream::conn::Dialer;

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
        sync::read(&self.config).clone()
    }

    /// The dialer for this proxy's sessions.
    pub(crate) fn dialer(&self) -> Dialer<'_> {
        let limits = self.config().limits.clone();
        Dialer {
            tls: &self.tls,
            step_timeout: limits.connect_timeout,
            // Greeting, STARTTLS, capabilities, a login and one retry.
            total_timeout: limits.connect_timeout.saturating_mul(4),
        }
    }
}

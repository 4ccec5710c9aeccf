//! Accepting a grant: the one check every new grant passes before anything
//! of it is stored, whoever obtained it (`mailproxy login`, a running
//! `serve` for the control socket, or an on-demand authorisation). It must
//! be the account's own (a real login at the account's server) and, unless
//! the flow is app-only, carry a refresh token. A refusal is audited here.

use std::time::Duration;

use super::identity::{self, IdentityError};
use crate::audit::{Audit, Entry};
use crate::config::{Account, OAuthSettings};
use crate::oauth::Tokens;
use crate::tls::ClientConfigs;

/// The sentence a grant without a refresh token is refused with.
pub const NO_REFRESH_TOKEN: &str = "the provider returned no refresh token, so access would end within the hour; \
     check that the app registration allows offline access (Microsoft: the offline_access scope; Google: a Desktop app client)";

/// Why a new grant was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum GrantRefused {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{}", NO_REFRESH_TOKEN)]
    NoRefreshToken,
}

/// Checks a new grant for `account`; on refusal, audits it as a refused
/// consent. Returns the scopes granted.
pub async fn accept(
    account: &Account,
    settings: &OAuthSettings,
    t: &Tokens,
    tls: &ClientConfigs,
    timeout: Duration,
    audit: &Audit,
) -> Result<Vec<String>, GrantRefused> {
    let checked = match identity::verify(account, t, tls, timeout).await {
        Ok(()) if t.refresh.is_none() && !settings.flow.app_only() => Err(GrantRefused::NoRefreshToken),
        Ok(()) => Ok(t.scopes.clone().unwrap_or_else(|| settings.scopes.clone())),
        Err(e) => Err(GrantRefused::Identity(e)),
    };
    if let Err(e) = &checked {
        audit.record(Entry::new(&account.name, "consent", format!("refused: {e}")));
    }
    checked
}

impl super::TokenManager {
    /// [`accept`] with this manager's trust anchors and audit trail.
    pub async fn accept_grant(
        &self,
        account: &Account,
        settings: &OAuthSettings,
        t: &Tokens,
        timeout: Duration,
    ) -> Result<Vec<String>, GrantRefused> {
        accept(account, settings, t, &self.tls, timeout, &self.audit).await
    }
}

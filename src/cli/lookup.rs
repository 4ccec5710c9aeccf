//! The accounts a command is about, as the config names them.

use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::config::{Account, Config, Flow, OAuthSettings};
use crate::{setup, store};

/// The account `name` selects (its own entry or a domain entry's mailbox).
pub(super) fn oauth_account(config: &Config, name: &str) -> Result<(Arc<Account>, OAuthSettings)> {
    let account = config
        .lookup(name)
        .with_context(|| format!("{} has no account `{name}`", config.path.display()))?;
    let Some(settings) = account.oauth().cloned() else {
        bail!("{name} uses provider = \"password\": the client's own password goes upstream, there is no token");
    };
    Ok((account, settings))
}

/// The OAuth accounts `accounts` and `check` go through: explicit ones, and
/// the mailboxes of domain entries that have a record.
pub(super) fn known_accounts(config: &Config, records: &dyn store::RecordStore) -> Vec<Arc<Account>> {
    let mut v: Vec<Arc<Account>> = config.accounts.values().cloned().collect();
    if !config.domains.is_empty() {
        for name in records.names_now() {
            if config.account(&name).is_none() {
                v.extend(config.lookup(&name).filter(|a| a.domain_entry.is_some()));
            }
        }
    }
    v
}

/// The example config's placeholder client ids lead only to a provider's
/// error page: refuse them with a sentence (every account for `serve`, the
/// one being logged in otherwise).
pub(super) fn refuse_placeholders(config: &Config, only: Option<&str>) -> Result<()> {
    for a in config.accounts.values() {
        if only.is_some_and(|n| !a.name.eq_ignore_ascii_case(n)) {
            continue;
        }
        // Service accounts have no client id: their key file names the app.
        let placeholder = |s: &&OAuthSettings| s.flow != Flow::ServiceAccount && setup::is_placeholder(&s.client_id);
        if let Some(s) = a.oauth().filter(placeholder) {
            bail!(
                "{}: accounts.\"{}\".client_id is the placeholder `{}`: register an app with the provider and put its client id there (`mailproxy add {}` prints the steps), or remove the account",
                config.path.display(),
                a.name,
                s.client_id,
                a.name
            );
        }
    }
    Ok(())
}

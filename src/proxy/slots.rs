//! A login's upstream session slot (`crate::tokens::sessions` keeps them):
//! taken after the login is routed and before the upstream login, so at
//! the account's limit mailproxy's plain sentence comes first, not the
//! provider's vague refusal or a dropped older session.

use super::Ctx;
use crate::config::{Account, ProviderKind};
use crate::endpoint::Protocol;
use crate::preauth::Failure;
use crate::tokens::sessions::{Full, SLOT_WAIT};
use crate::tokens::SessionSlot;
use crate::upstream::login::LoginFailure;

/// The slot for a session of `login` over `protocol`; `None` for a login
/// no account of the config names (a listener's fallback) and for a
/// passthrough domain entry's mailboxes, whose names clients choose (the
/// slots stay bounded by the config).
pub(crate) async fn take(ctx: &Ctx, login: &str, protocol: Protocol) -> Result<Option<SessionSlot>, LoginFailure> {
    let Some(account) = ctx.config().lookup(login) else {
        return Ok(None);
    };
    if account.domain_entry.is_some() && account.oauth().is_none() {
        return Ok(None);
    }
    match ctx.tokens.sessions.take(&account, protocol, SLOT_WAIT).await {
        Ok(slot) => Ok(Some(slot)),
        Err(full) => {
            tracing::info!(account = %account.name, %protocol, open = full.open, limit = full.limit, "refused: the account is at its upstream session limit");
            Err(LoginFailure::new(Failure::SessionLimit, refusal(&account, &full)))
        }
    }
}

/// The sentence a client gets at the limit, e.g. `alice@gmail.com already
/// has 15 IMAP sessions open at Gmail, its limit: close one in another client`.
fn refusal(account: &Account, full: &Full) -> String {
    let proto = full.protocol.name().to_uppercase();
    let at = match account.oauth().map(|o| o.provider) {
        Some(ProviderKind::Google) => "Gmail".to_string(),
        Some(ProviderKind::Microsoft) => "Exchange Online".to_string(),
        _ => account
            .endpoint(full.protocol)
            .map_or_else(|| "its server".to_string(), |e| e.host.clone()),
    };
    let (name, limit) = (&account.name, full.limit);
    if full.open > limit as usize {
        format!(
            "{name} already has {} {proto} sessions open at {at}, more than its limit of {limit}: close one in another client",
            full.open
        )
    } else {
        format!("{name} already has {limit} {proto} sessions open at {at}, its limit: close one in another client")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn account(table: &str) -> Account {
        let c = crate::config::Config::parse(
            &format!("[accounts.\"alice@gmail.com\"]\n{table}"),
            Path::new("/c.toml"),
        )
        .unwrap();
        (**c.account("alice@gmail.com").unwrap()).clone()
    }

    #[test]
    fn the_refusal_names_account_count_protocol_and_provider() {
        let full = |protocol, open, limit| Full { protocol, open, limit };
        let g = account("provider = \"google\"\nclient_id = \"id\"\n");
        assert_eq!(
            refusal(&g, &full(Protocol::Imap, 15, 15)),
            "alice@gmail.com already has 15 IMAP sessions open at Gmail, its limit: close one in another client"
        );
        let m = account("provider = \"microsoft\"\nclient_id = \"id\"\n");
        assert_eq!(
            refusal(&m, &full(Protocol::Smtp, 20, 20)),
            "alice@gmail.com already has 20 SMTP sessions open at Exchange Online, its limit: close one in another client"
        );
        let p = account("provider = \"password\"\npop3 = \"pop3s://pop.example.org\"\nmax_upstream_sessions = 2\n");
        assert_eq!(
            refusal(&p, &full(Protocol::Pop3, 5, 2)),
            "alice@gmail.com already has 5 POP3 sessions open at pop.example.org, more than its limit of 2: close one in another client"
        );
    }
}

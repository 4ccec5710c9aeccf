//! `mailproxy revoke` done by the command itself: revoke the refresh token
//! at the provider and erase every local trace.

use super::Local;
use anyhow::Result;

use crate::audit::{Audit, Entry};
use crate::cli::lookup::oauth_account;
use crate::cli::terminal::ask_password;
use crate::config::{Account, Config, OAuthSettings, TokenStore};
use crate::keystore;
use crate::oauth::flows;
use crate::secret::Secret;
use crate::tokens::offline;

/// `revoke` done by the command itself.
pub(super) async fn run(config: &Config, name: &str) -> Result<()> {
    let (account, settings) = oauth_account(config, name)?;
    let name = account.name.clone();
    let Local {
        records,
        store_key,
        audit,
        http,
    } = Local::open(config).await?;
    let rec = records.load(&name).await?;
    let refresh = match &rec {
        Some(r) => {
            match offline::stored_refresh(&name, r, store_key.as_ref(), ask_password(&name)) {
                Ok(t) => t.map(|(t, _)| t),
                Err(e) => {
                    eprintln!("cannot read the refresh token ({e:#}); erasing the local copy without revoking it at the provider");
                    None
                }
            }
        }
        None => None,
    };
    at_provider(&http, &account, &settings, refresh.as_ref(), &audit).await;
    let mut erased = Vec::new();
    for p in records.erase(&name).await? {
        erased.push(format!(
            "{p} (local password verifier, sealed refresh token, scopes, timestamps)"
        ));
    }
    match keystore::delete(&name) {
        Ok(true) => erased.push("the refresh token in the OS keyring".into()),
        Ok(false) => {}
        Err(e) if config.token_store == TokenStore::Keyring => {
            eprintln!("the refresh token in the OS keyring was not erased ({e})");
        }
        Err(_) => {}
    }
    // The running proxy drops its in-memory tokens when it sees the record gone.
    let (said, entry) = offline::erasure_report(&name, &erased);
    for line in said {
        println!("{line}");
    }
    audit.record(entry);
    Ok(())
}

/// Revokes `refresh` at the provider, or says why there is nothing to revoke.
async fn at_provider(
    http: &reqwest::Client,
    account: &Account,
    settings: &OAuthSettings,
    refresh: Option<&Secret>,
    audit: &Audit,
) {
    let name = &account.name;
    match refresh {
        Some(t) => match flows::revoke(http, name, settings, t).await {
            Ok(flows::Revocation::Revoked) => {
                println!(
                    "revoked the refresh token at {}",
                    settings.revoke_url.as_deref().unwrap_or("the provider")
                );
                audit.record(Entry::new(name, "revoked", "revoked at the provider").scopes(&settings.scopes));
            }
            Ok(flows::Revocation::Unsupported(how)) => {
                println!("not revoked at the provider: {how}");
                audit.record(Entry::new(name, "revoked", "provider has no revocation endpoint"));
            }
            Err(e) => {
                println!("revocation at the provider failed: {e}");
                audit.record(Entry::new(name, "revoked", format!("failed: {e}")));
            }
        },
        None if account.token_from.is_some() => println!(
            "nothing to revoke at the provider: {name} uses the grant of {}; revoke that account to end the grant",
            account.token_from.as_deref().unwrap_or_default()
        ),
        None if settings.flow.app_only() => {
            println!("nothing to revoke at the provider: an app-only account has no refresh token");
        }
        None => println!("no refresh token was stored; nothing to revoke at the provider"),
    }
}

//! `mailproxy check` done by the command itself: refresh each account's
//! token now and print its line.

use super::Local;
use std::time::SystemTime;

use anyhow::Result;

use crate::audit::{Audit, Entry};
use crate::cli::lookup::{known_accounts, oauth_account};
use crate::config::Config;
use crate::control;
use crate::oauth::OAuthError;
use crate::tokens::offline::Checked;
use crate::tokens::Resource;

/// `check` done by the command itself.
pub(super) async fn run(config: &Config, only: Option<&str>) -> Result<u8> {
    let local = Local::open(config).await?;
    let (records, audit) = (&*local.records, &local.audit);
    let names: Vec<String> = match only {
        Some(n) => vec![oauth_account(config, n)?.0.name.clone()],
        None => known_accounts(config, records)
            .iter()
            .filter(|a| a.oauth().is_some())
            .map(|a| a.name.clone())
            .collect(),
    };
    let mut worst = 0u8;
    for name in names {
        let (account, settings) = oauth_account(config, &name)?;
        if let Some(owner) = &account.token_from {
            match records.load(&name).await? {
                Some(_) => println!("{name}: ok: uses the grant of {owner} (checked with it)"),
                None => {
                    println!("{name}: needs login: run `mailproxy login {name}`");
                    worst = worst.max(1);
                }
            }
            continue;
        }
        let checked = local.check(&name, &account.username, &settings, Resource::Mail).await?;
        worst = worst.max(report(&name, checked, audit));
    }
    Ok(worst)
}

/// Prints one account's line; the exit status it stands for.
fn report(name: &str, checked: Checked, audit: &Audit) -> u8 {
    match checked {
        Checked::NeedsLogin(why) => {
            println!("{name}: needs login: {why}");
            1
        }
        Checked::Refreshed(t) => {
            let left = t
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs();
            println!("{name}: ok: new access token valid for {}", control::human_secs(left));
            0
        }
        Checked::Failed(e) => {
            let code = failure_code(&e);
            audit.record(Entry::new(name, "refresh_failed", e.to_string()));
            println!(
                "{name}: {}: {e}",
                if code == 1 {
                    "needs action"
                } else {
                    "temporarily failing"
                }
            );
            code
        }
    }
}

/// A refresh failure's exit status: 1 a person must act (a dead grant, a
/// refusal by the provider), 2 temporary.
pub(super) fn failure_code(e: &OAuthError) -> u8 {
    if e.needs_login() || matches!(e, OAuthError::Provider(_)) {
        1
    } else {
        2
    }
}

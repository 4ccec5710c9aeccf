//! `mailproxy passwd` done by the command itself: change the local
//! password in the record.

use anyhow::{bail, Context, Result};

use crate::audit::{Audit, Entry};
use crate::cli::lookup::oauth_account;
use crate::cli::terminal::read_password;
use crate::config::Config;
use crate::store;
use crate::tokens::offline::{self, OfflineError};

/// `passwd` done by the command itself.
pub(super) async fn run(config: &Config, name: &str) -> Result<()> {
    let (account, _) = oauth_account(config, name)?;
    let name = account.name.clone();
    let records = store::open(config).await?;
    let audit = Audit::direct(&config.audit_log);
    let rec = records
        .load(&name)
        .await?
        .with_context(|| format!("{name} is not authorised; run `mailproxy login {name}`"))?;
    if rec.password.is_none() {
        bail!("{name} has no local password yet; run `mailproxy login {name}`");
    }
    // The old password first (on a terminal, or the first line of stdin),
    // then the new one (the next line).
    let old = if offline::needs_old_password(&rec) {
        Some(read_password(&name, false)?)
    } else {
        None
    };
    let new = read_password(&name, true)?;
    let r = offline::change_password(&*records, &name, move || old.ok_or(OfflineError::WrongPassword), &new).await;
    match r {
        Ok(()) => {
            audit.record(Entry::new(&name, "password_changed", "changed with mailproxy passwd"));
            eprintln!("The local password of {name} is changed; clients must use the new one.");
            Ok(())
        }
        Err(e) => {
            audit.record(Entry::new(&name, "password_changed", format!("failed: {e}")));
            Err(e.into())
        }
    }
}

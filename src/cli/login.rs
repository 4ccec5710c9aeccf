//! `mailproxy login`: authorise an account at its provider and set its
//! local password, through a running `serve` or by the command itself.

use anyhow::Result;

use crate::config::Config;
use crate::control::grant as obtain;

use super::lookup::refuse_placeholders;
use super::pick::{offline, pick};
use super::runner::LoginOptions;

pub async fn run(config: &Config, account: &str, how: LoginOptions) -> Result<u8> {
    refuse_placeholders(config, Some(account))?;
    authorize(config, account, how).await
}

/// `login` without the placeholder check (`add` wrote the config itself).
/// A redirect pasted back on the terminal only the command itself can read.
pub(super) async fn authorize(config: &Config, account: &str, how: LoginOptions) -> Result<u8> {
    let paste = config
        .account(account)
        .and_then(|a| a.oauth())
        .is_some_and(obtain::needs_paste);
    let runner = if paste {
        offline(config)
    } else {
        pick(config, Some(account)).await?
    };
    runner.login(account, how).await
}

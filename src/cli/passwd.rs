//! `mailproxy passwd`: change an account's local password.

use anyhow::Result;

use crate::config::Config;

use super::pick::pick;

pub async fn run(config: &Config, account: &str) -> Result<u8> {
    pick(config, Some(account)).await?.passwd(account).await
}

//! `mailproxy revoke`: revoke the account's refresh token at the provider
//! and erase every local trace.

use anyhow::Result;

use crate::config::Config;

use super::pick::pick;

pub async fn run(config: &Config, account: &str) -> Result<u8> {
    pick(config, Some(account)).await?.revoke(account).await
}

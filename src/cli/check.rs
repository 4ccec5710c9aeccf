//! `mailproxy check`: refresh now and report, one line per account; the
//! exit status is the worst outcome (0 ok, 1 a person must act, 2 a
//! temporary failure).

use anyhow::Result;

use crate::config::Config;

use super::pick::pick;

pub async fn run(config: &Config, account: Option<&str>) -> Result<u8> {
    pick(config, account).await?.check(account).await
}

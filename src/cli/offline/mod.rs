//! A command's work done by the command itself: it reads and writes the
//! record store directly, one file per command.

use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;

use crate::config::Config;
use crate::tokens::{AccountStatus, Resource};

use super::runner::{Handout, LoginOptions, Runner};

mod check;
mod login;
mod passwd;
mod revoke;
mod status;
mod token;

/// The command itself: it reads and writes the record store directly.
pub struct Offline<'a> {
    config: &'a Config,
}

impl<'a> Offline<'a> {
    pub(super) fn new(config: &'a Config) -> Offline<'a> {
        Offline { config }
    }
}

#[async_trait(?Send)]
impl Runner for Offline<'_> {
    async fn login(self: Box<Self>, account: &str, how: LoginOptions) -> Result<u8> {
        login::run(self.config, account, how).await.map(|()| 0)
    }

    async fn status(self: Box<Self>) -> Result<Vec<AccountStatus>> {
        Ok(status::status_file(self.config))
    }

    async fn check(self: Box<Self>, only: Option<&str>) -> Result<u8> {
        check::run(self.config, only).await
    }

    async fn revoke(self: Box<Self>, account: &str) -> Result<u8> {
        revoke::run(self.config, account).await.map(|()| 0)
    }

    async fn passwd(self: Box<Self>, account: &str) -> Result<u8> {
        passwd::run(self.config, account).await.map(|()| 0)
    }

    async fn reload(self: Box<Self>) -> Result<bool> {
        Ok(false)
    }

    async fn token(self: Box<Self>, account: &str, resource: Resource, _min_life: Duration) -> Result<Handout> {
        token::run(self.config, account, resource).await
    }
}

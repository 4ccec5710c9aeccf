//! A command's work done by the command itself: it reads and writes the
//! record store directly, one file per command.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;

use crate::audit::Audit;
use crate::cli::terminal::ask_password;
use crate::config::{Config, OAuthSettings};
use crate::crypto::VaultKey;
use crate::store::{self, RecordStore};
use crate::tokens::offline::{self as tokens_offline, Checked};
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

/// What the commands that refresh or revoke by themselves work with: the
/// record store and its key, the audit trail, the provider's HTTP client.
struct Local {
    records: Arc<dyn RecordStore>,
    store_key: Option<VaultKey>,
    audit: Audit,
    http: reqwest::Client,
}

impl Local {
    async fn open(config: &Config) -> Result<Local> {
        Ok(Local {
            records: store::open(config).await?,
            store_key: store::store_key(config)?,
            audit: Audit::direct(&config.audit_log),
            http: crate::oauth::http_client_for(config)?,
        })
    }

    /// A token of `resource` for account `name` with at least the usual
    /// life left, refreshed here if needed (the local password is asked
    /// for when the vault needs it).
    async fn check(&self, name: &str, mailbox: &str, settings: &OAuthSettings, resource: Resource) -> Result<Checked> {
        let key = self.store_key.as_ref();
        let password = ask_password(name);
        let checked = tokens_offline::check(
            &*self.records,
            key,
            &self.http,
            name,
            mailbox,
            settings,
            resource,
            password,
        );
        Ok(checked.await?)
    }
}

//! A command's work done by the running `serve`: the request goes through
//! its control socket, and what serve says comes back to the terminal.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use async_trait::async_trait;

use crate::control::client::Client;
use crate::control::{Reply, Request};
use crate::tokens::{AccountStatus, Resource};

use super::runner::{Handout, LoginOptions, Runner};
use super::terminal::{open_browser, read_password};

/// The running `serve`, through its control socket.
pub struct Live {
    client: Client,
}

impl Live {
    /// The `serve` that runs with this state directory, if one does.
    pub(super) async fn connect(state_dir: &Path) -> Result<Option<Live>> {
        Ok(Client::connect(state_dir).await?.map(|client| Live { client }))
    }

    /// Sends `req` and shows what serve says until it is done; its exit
    /// status. Passwords it asks for (`account`'s) are read like the
    /// offline commands read them; data replies go to `data`.
    async fn run(mut self, req: Request, account: &str, no_browser: bool, mut data: impl FnMut(Reply)) -> Result<u8> {
        let c = &mut self.client;
        c.send(&req).await?;
        loop {
            match c.next().await? {
                Reply::Say { text, stdout: true } => println!("{text}"),
                Reply::Say { text, stdout: false } => eprintln!("{text}"),
                Reply::Open { url } => {
                    if !no_browser {
                        open_browser(&url);
                    }
                }
                Reply::Ask { new } => {
                    let pw = read_password(account, new)?;
                    c.answer(&pw).await?;
                }
                Reply::Done { code } => return Ok(code),
                Reply::Error { message } => bail!(message),
                other => data(other),
            }
        }
    }
}

#[async_trait(?Send)]
impl Runner for Live {
    async fn login(self: Box<Self>, account: &str, how: LoginOptions) -> Result<u8> {
        let req = Request::Login {
            account: account.into(),
            device: how.device,
            timeout: how.timeout,
        };
        self.run(req, account, how.no_browser, |_| {}).await
    }

    async fn status(self: Box<Self>) -> Result<Vec<AccountStatus>> {
        let mut rows = None;
        self.run(Request::Accounts, "", true, |r| {
            if let Reply::Accounts { rows: r } = r {
                rows = Some(r);
            }
        })
        .await?;
        Ok(rows.unwrap_or_default())
    }

    async fn check(self: Box<Self>, only: Option<&str>) -> Result<u8> {
        let req = Request::Check {
            account: only.map(Into::into),
        };
        self.run(req, only.unwrap_or(""), true, |r| {
            if let Reply::Checked { rows } = r {
                for row in rows {
                    println!("{}", row.line());
                }
            }
        })
        .await
    }

    async fn revoke(self: Box<Self>, account: &str) -> Result<u8> {
        let req = Request::Revoke {
            account: account.into(),
        };
        self.run(req, account, true, |_| {}).await
    }

    async fn passwd(self: Box<Self>, account: &str) -> Result<u8> {
        let req = Request::Passwd {
            account: account.into(),
        };
        self.run(req, account, true, |_| {}).await
    }

    async fn reload(self: Box<Self>) -> Result<bool> {
        self.run(Request::Reload, "", true, |_| {}).await?;
        Ok(true)
    }

    async fn token(self: Box<Self>, account: &str, resource: Resource, min_life: Duration) -> Result<Handout> {
        let req = Request::Token {
            account: account.into(),
            min_life_secs: min_life.as_secs(),
            resource,
        };
        let mut handed = None;
        let code = self
            .run(req, account, true, |r| {
                if let Reply::Token { token } = r {
                    handed = Some(token);
                }
            })
            .await?;
        Ok(match handed {
            Some(t) if code == 0 => Handout::Token(t),
            _ => Handout::Failed(code.max(1)),
        })
    }
}

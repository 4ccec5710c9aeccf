//! Where a command's work is done: by the running `serve`, asked through
//! its control socket ([`Live`]), or by the command itself ([`Offline`]).
//! Each command is written once over [`Runner`]; [`pick`] chooses.

use anyhow::{bail, Result};
use async_trait::async_trait;

use crate::config::Config;
use crate::control::client::Client;
use crate::control::{Reply, Request};
use crate::tokens::AccountStatus;

use super::terminal::{open_browser, read_password};
use super::{accounts, check, login, passwd, revoke};

/// How `login` asks for the grant.
#[derive(Debug, Clone, Copy)]
pub struct LoginOptions {
    /// The device flow: a code to enter on any device with a browser.
    pub device: bool,
    /// Print the sign-in address only; open no browser.
    pub no_browser: bool,
    /// How long to wait for the person, in seconds.
    pub timeout: u64,
}

/// The work behind the commands that a running `serve` does when there is
/// one. A runner does one command (the control socket takes one request
/// per connection): each method consumes it.
#[async_trait(?Send)]
pub trait Runner {
    /// Authorises `account` at its provider and sets its local password;
    /// the exit status.
    async fn login(self: Box<Self>, account: &str, how: LoginOptions) -> Result<u8>;
    /// What the running `serve` knows of each account (none when it does
    /// not run).
    async fn status(self: Box<Self>) -> Result<Vec<AccountStatus>>;
    /// Refreshes now and prints one line per account (`only`: just that
    /// one); 0 all ok, 1 a person must act, 2 a temporary failure.
    async fn check(self: Box<Self>, only: Option<&str>) -> Result<u8>;
    /// Revokes the refresh token at the provider and erases every local
    /// trace; the exit status.
    async fn revoke(self: Box<Self>, account: &str) -> Result<u8>;
    /// Changes the local password; the exit status.
    async fn passwd(self: Box<Self>, account: &str) -> Result<u8>;
    /// Has a running `serve` re-read the config; whether one did.
    async fn reload(self: Box<Self>) -> Result<bool>;
}

/// The running `serve` when one runs with this config's state directory
/// and does the work for `account` (`None`: for every account); else the
/// command itself.
pub async fn pick<'a>(config: &'a Config, account: Option<&str>) -> Result<Box<dyn Runner + 'a>> {
    if account.is_none_or(|a| serve_handles(config, a)) {
        if let Some(client) = Client::connect(&config.state_dir).await? {
            return Ok(Box::new(Live { client }));
        }
    }
    Ok(offline(config))
}

/// The command itself, whether a `serve` runs or not.
pub fn offline(config: &Config) -> Box<dyn Runner + '_> {
    Box::new(Offline { config })
}

/// Whether a running `serve` does this command's work itself. A mailbox of
/// a domain entry (taken up by serve only once it has a record) and an
/// account that borrows another's grant (`token_from`: only its local
/// password is set) are done by the command itself; a running serve picks
/// the new record up at the account's next use.
fn serve_handles(config: &Config, account: &str) -> bool {
    config.account(account).is_some_and(|a| a.token_from.is_none())
}

/// The running `serve`, through its control socket.
pub struct Live {
    client: Client,
}

impl Live {
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
}

/// The command itself: it reads and writes the record store directly.
pub struct Offline<'a> {
    config: &'a Config,
}

#[async_trait(?Send)]
impl Runner for Offline<'_> {
    async fn login(self: Box<Self>, account: &str, how: LoginOptions) -> Result<u8> {
        login::offline(self.config, account, how).await.map(|()| 0)
    }

    async fn status(self: Box<Self>) -> Result<Vec<AccountStatus>> {
        Ok(accounts::status_file(self.config))
    }

    async fn check(self: Box<Self>, only: Option<&str>) -> Result<u8> {
        check::offline(self.config, only).await
    }

    async fn revoke(self: Box<Self>, account: &str) -> Result<u8> {
        revoke::offline(self.config, account).await.map(|()| 0)
    }

    async fn passwd(self: Box<Self>, account: &str) -> Result<u8> {
        passwd::offline(self.config, account).await.map(|()| 0)
    }

    async fn reload(self: Box<Self>) -> Result<bool> {
        Ok(false)
    }
}

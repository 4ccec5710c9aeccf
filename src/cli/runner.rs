//! What a command asks for, whoever does the work: the running `serve`,
//! asked through its control socket (`live`), or the command itself
//! (`offline`). Each command is written once over [`Runner`]; `pick`
//! chooses.

use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;

use crate::tokens::{AccountStatus, Handed, Resource};

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

/// What `token` got: the token, or the exit status of why not (its
/// sentence already on stderr: 1 a person must act, 2 temporary).
pub enum Handout {
    Token(Handed),
    Failed(u8),
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
    /// An access token of `account` with at least `min_life` left,
    /// refreshed first when needed.
    async fn token(self: Box<Self>, account: &str, resource: Resource, min_life: Duration) -> Result<Handout>;
}

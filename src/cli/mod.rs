//! The `mailproxy` commands, one module each; the binary parses the
//! command line ([`args`]) and calls the command's `run`, whose result is
//! the exit status.
//!
//! `login`, `accounts`, `check`, `passwd`, `revoke` and `token` are each written
//! once over [`Runner`] ([`runner`]): a running `serve` does the work when
//! it can, asked through its control socket (`live`), otherwise the command
//! does it itself (`offline`); `pick` chooses. The imports run one way:
//! the commands over `pick`, over `live` and `offline`, over [`runner`].

pub mod accounts;
pub mod add;
pub mod args;
pub mod check;
pub mod completions;
mod live;
pub mod login;
mod lookup;
pub mod manpage;
mod offline;
pub mod passwd;
mod pick;
pub mod revoke;
pub mod runner;
pub mod serve;
pub mod service;
mod terminal;
pub mod token;
mod wait;

use std::path::Path;

use anyhow::{bail, Result};

use crate::config::Config;

pub use runner::{LoginOptions, Runner};

/// The config the commands other than `add`, `completions` and `manpage`
/// read; a sentence on how to make one when there is none.
pub fn load_config(path: &Path) -> Result<Config> {
    if !path.exists() {
        bail!(
            "there is no config at {}: run `mailproxy add YOUR@ADDRESS` to create one (or name another with --config)",
            path.display()
        );
    }
    Ok(Config::load(path)?)
}

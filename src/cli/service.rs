//! `mailproxy service`: run `serve` as a systemd user service (Linux) or a
//! launchd agent (macOS).

use std::path::Path;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::control;
use crate::service;
use crate::vault::Vault;

use super::args::ServiceAction;
use super::load_config;
use super::lookup::refuse_placeholders;

/// The packaged unit and `uninstall` need no config; the rest read it at `path`.
pub async fn run(path: &Path, action: ServiceAction) -> Result<u8> {
    match action {
        ServiceAction::Install { packaged: true, .. } => {
            print!("{}", service::packaged_unit());
            Ok(0)
        }
        ServiceAction::Uninstall => {
            for l in service::uninstall()? {
                println!("{l}");
            }
            Ok(0)
        }
        ServiceAction::Install { print, .. } => install(&load_config(path)?, print),
        ServiceAction::Status => status(&load_config(path)?).await,
    }
}

/// Writes the unit and starts it, or (`print`) only prints it.
fn install(config: &Config, print: bool) -> Result<u8> {
    let exe = std::env::current_exe().context("where is this mailproxy binary?")?;
    if print {
        print!("{}", service::systemd_unit(&exe, config)?);
        return Ok(0);
    }
    refuse_placeholders(config, None)?;
    // The sandbox lets serve write only its state directory: it must exist.
    Vault::open(&config.state_dir)?;
    for l in service::install(&exe, config)? {
        println!("{l}");
    }
    if let Some(addr) = config.status_listen {
        println!("status page: http://{addr}/ (`mailproxy open` opens it)");
    }
    Ok(0)
}

/// Is the unit installed, is the service running? 0 running, 3 not.
async fn status(config: &Config) -> Result<u8> {
    let (_, lines) = service::status();
    for l in lines {
        println!("{l}");
    }
    let serving = control::client::Client::connect(&config.state_dir).await?.is_some();
    println!(
        "serve: {}",
        if serving {
            "running (its control socket answers)"
        } else {
            "not running"
        }
    );
    Ok(if serving { 0 } else { 3 })
}

//! The `mailproxy` command line: parses it, sets up logging and runs the
//! command (`mailproxy::cli`), whose result is the exit status.

use std::io::IsTerminal;

use anyhow::Result;
use clap::Parser;

use mailproxy::cli::args::{Cli, Command};
use mailproxy::cli::{self, LoginOptions};
use mailproxy::config::Config;
use mailproxy::tls;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging(matches!(cli.command, Command::Serve));
    tls::install_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(dispatch(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("mailproxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs on stderr: `info` and up for `serve`, warnings for the other
/// commands, unless `RUST_LOG` says otherwise.
fn logging(serve: bool) {
    let default_level = if serve { "info" } else { "warn" };
    // Under systemd the journal stamps each line itself: no second timestamp.
    let journal = mailproxy::notify::journal();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    if journal {
        logs.without_time().init();
    } else {
        logs.init();
    }
}

async fn dispatch(cli: Cli) -> Result<u8> {
    let path = cli.config.unwrap_or_else(Config::default_path);
    let config = || cli::load_config(&path);
    match cli.command {
        Command::Add(a) => cli::add::run(&path, *a).await,
        Command::Completions { shell } => Ok(cli::completions::run(shell)),
        Command::Manpage => cli::manpage::run(),
        Command::Service { action } => cli::service::run(&path, action).await,
        Command::Serve => cli::serve::run(config()?).await,
        Command::Login {
            account,
            device,
            no_browser,
            timeout,
        } => {
            let how = LoginOptions {
                device,
                no_browser,
                timeout,
            };
            cli::login::run(&config()?, &account, how).await
        }
        Command::Accounts => cli::accounts::run(&config()?).await,
        Command::Check { account } => cli::check::run(&config()?, account.as_deref()).await,
        Command::Revoke { account } => cli::revoke::run(&config()?, &account).await,
        Command::Passwd { account } => cli::passwd::run(&config()?, &account).await,
        Command::Token {
            account,
            resource,
            json,
        } => cli::token::run(&config()?, &account, resource, json).await,
    }
}

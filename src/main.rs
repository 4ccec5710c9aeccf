//! The `mailproxy` command line.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use mailproxy::config::Config;
use mailproxy::oauth::{self, login::Redirect};
use mailproxy::secret::Secret;
use mailproxy::{server, tls, tokens, vault::Vault};

#[derive(Parser)]
#[command(
    version,
    about = "Local authenticating proxy: legacy IMAP/SMTP/POP3 clients in, OAuth 2.0 upstream"
)]
struct Cli {
    /// Config file [default: $XDG_CONFIG_HOME/mailproxy/config.toml]
    #[arg(long, short, global = true, env = "MAILPROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGINT or SIGTERM.
    Serve,
    /// Authorise an account at its provider and set its local password.
    Login {
        /// The account, as named in the config (the login name clients use).
        account: String,
        /// Print the URL only; do not try to open a browser.
        #[arg(long)]
        no_browser: bool,
        /// How long to wait for the browser to come back, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    tls::install_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailproxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let path = cli.config.unwrap_or_else(Config::default_path);
    let config = Config::load(&path)?;
    match cli.command {
        Command::Serve => Ok(server::serve(config).await?),
        Command::Login {
            account,
            no_browser,
            timeout,
        } => login(config, &account, no_browser, timeout).await,
    }
}

async fn login(config: Config, name: &str, no_browser: bool, timeout: u64) -> Result<()> {
    let account = config
        .account(name)
        .with_context(|| format!("{} has no account `{name}`", config.path.display()))?
        .clone();
    let Some(settings) = account.oauth() else {
        bail!("{name} uses provider = \"password\": the client's own password goes upstream, there is nothing to authorise");
    };
    let vault = Vault::open(&config.state_dir)?;
    let password = read_password(&account.name)?;

    let redirect = Redirect::bind(settings)
        .await
        .context("cannot receive the provider's redirect")?;
    let req = oauth::authorization_request(&account.name, settings, redirect.uri())?;
    eprintln!(
        "To authorise {}, open this address in a browser and sign in:\n\n  {}\n",
        account.name, req.url
    );
    if !no_browser {
        open_browser(&req.url);
    }
    let code = redirect
        .wait(&account.name, &req, Duration::from_secs(timeout))
        .await?;
    let http = oauth::http_client();
    let tokens = oauth::exchange_code(&http, &account.name, settings, req, code.expose()).await?;
    let Some(refresh) = tokens.refresh else {
        bail!(
            "the provider returned no refresh token, so access would end within the hour; \
             check that the app registration allows offline access (Microsoft: the offline_access scope; Google: a Desktop app client)"
        );
    };
    let scopes = tokens.scopes.unwrap_or_else(|| settings.scopes.clone());
    let (v, n, s) = (vault.clone(), account.name.clone(), scopes.clone());
    tokio::task::spawn_blocking(move || {
        tokens::store_authorisation(&v, &n, &password, &refresh, s)
    })
    .await??;
    eprintln!(
        "Authorised {} (scopes: {}).\nConfigure your mail client with user name {} and the local password you chose.",
        account.name,
        scopes.join(" "),
        account.name
    );
    Ok(())
}

/// The local password: typed twice on a terminal, else the first line of stdin.
fn read_password(account: &str) -> Result<Secret> {
    let pw = if std::io::stdin().is_terminal() {
        let a = Secret::new(rpassword::prompt_password(format!(
            "Local password for {account} (what your mail client will send to mailproxy): "
        ))?);
        let b = Secret::new(rpassword::prompt_password("Repeat it: ")?);
        if a != b {
            bail!("the two passwords differ");
        }
        a
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the local password from stdin")?;
        let pw = Secret::new(line.trim_end_matches(['\r', '\n']).to_string());
        zeroize::Zeroize::zeroize(&mut line);
        pw
    };
    if pw.is_empty() {
        bail!("the local password must not be empty");
    }
    Ok(pw)
}

fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let _ = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

//! The `mailproxy` command line.

mod cli_wait;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use mailproxy::audit::{Audit, Entry};
use mailproxy::config::{Account, Config, Flow, OAuthSettings, TokenStore};
use mailproxy::control::{self, Reply, Request};
use mailproxy::oauth::{self, flows, OAuthError};
use mailproxy::secret::Secret;
use mailproxy::tokens::offline::{self, Checked, OfflineError};
use mailproxy::tokens::{now_unix, AccountStatus};
use mailproxy::vault::{AccountRecord, StoreKind, Vault};
use mailproxy::{identity, keystore, server, setup, store, tls};

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
    /// Run the proxy until SIGINT or SIGTERM (SIGHUP reloads the config).
    Serve,
    /// Authorise an account at its provider and set its local password.
    Login {
        /// The account, as named in the config (the login name clients use).
        account: String,
        /// Use the device flow: print a code to enter on any device with a browser.
        #[arg(long)]
        device: bool,
        /// Print the URL only; do not try to open a browser.
        #[arg(long)]
        no_browser: bool,
        /// How long to wait for the browser or device approval, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Show every account: provider, flow, state, token expiry, last refresh and use, scopes.
    Accounts,
    /// Refresh now and report; exit status 0 = all ok, 1 = a person must act, 2 = temporary failure.
    Check {
        /// Only this account.
        account: Option<String>,
    },
    /// Revoke the account's refresh token at the provider and erase every local trace.
    Revoke { account: String },
    /// Change the account's local password (asks for the old one when the
    /// refresh token is sealed in the vault file).
    Passwd { account: String },
    /// Add an account: writes (or extends) the config, then runs `login`.
    Add(Box<AddArgs>),
    /// Run `serve` as a systemd user service (Linux) or a launchd agent (macOS).
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    Completions { shell: CompletionShell },
    /// Print the man page (roff) on stdout; `scripts/man` writes it to a file.
    #[command(hide = true)]
    Manpage,
}

/// The shells `completions` writes for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Write the unit for this config and start it (or print how).
    Install {
        /// Only print the unit; write nothing.
        #[arg(long)]
        print: bool,
        /// With --print: the unit the Debian package ships (default config and state paths).
        #[arg(long, requires = "print", hide = true)]
        packaged: bool,
    },
    /// Stop the service and remove its unit.
    Uninstall,
    /// Is the unit installed, is the service running? Exit status 0 = running, 3 = not.
    Status,
}

/// `mailproxy add`: what is not given is detected or asked for.
#[derive(clap::Args)]
struct AddArgs {
    /// The mail address (the login name clients will use).
    address: String,
    /// The provider [default: detected from the domain and its MX records].
    #[arg(long, value_enum)]
    provider: Option<setup::Provider>,
    /// The app registration's client id.
    #[arg(long)]
    client_id: Option<String>,
    /// The app registration's client secret (Google desktop clients have one).
    #[arg(long)]
    client_secret: Option<String>,
    /// Microsoft tenant: common, organizations, consumers, a tenant id or domain.
    #[arg(long)]
    tenant: Option<String>,
    /// IMAP server URL, e.g. imaps://mail.example.org:993 (presets fill it for google and microsoft).
    #[arg(long)]
    imap: Option<String>,
    /// SMTP server URL, e.g. smtps://mail.example.org:465.
    #[arg(long)]
    smtp: Option<String>,
    /// POP3 server URL, e.g. pop3s://mail.example.org:995.
    #[arg(long)]
    pop3: Option<String>,
    /// Authorisation endpoint (custom providers).
    #[arg(long)]
    auth_url: Option<String>,
    /// Token endpoint (custom providers).
    #[arg(long)]
    token_url: Option<String>,
    /// Device-authorisation endpoint (custom providers, optional).
    #[arg(long)]
    device_url: Option<String>,
    /// Revocation endpoint (custom providers, optional).
    #[arg(long)]
    revoke_url: Option<String>,
    /// Scopes, comma-separated (custom providers).
    #[arg(long, value_delimiter = ',')]
    scopes: Vec<String>,
    /// Extra PEM trust anchor for this account's servers.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Only write the config; run `mailproxy login ADDRESS` later.
    #[arg(long)]
    no_login: bool,
    /// Print the sign-in address only; do not try to open a browser.
    #[arg(long)]
    no_browser: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve) {
        "info"
    } else {
        "warn"
    };
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
    tls::install_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("mailproxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<u8> {
    let path = cli.config.unwrap_or_else(Config::default_path);
    match cli.command {
        Command::Add(a) => return add(&path, *a).await,
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "mailproxy", &mut std::io::stdout());
            return Ok(0);
        }
        Command::Manpage => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            return Ok(0);
        }
        Command::Service {
            action: ServiceAction::Install { packaged: true, .. },
        } => {
            print!("{}", mailproxy::service::packaged_unit());
            return Ok(0);
        }
        Command::Service {
            action: ServiceAction::Uninstall,
        } => {
            for l in mailproxy::service::uninstall()? {
                println!("{l}");
            }
            return Ok(0);
        }
        _ => {}
    }
    if !path.exists() {
        bail!(
            "there is no config at {}: run `mailproxy add YOUR@ADDRESS` to create one (or name another with --config)",
            path.display()
        );
    }
    let config = Config::load(&path)?;
    match cli.command {
        Command::Add(_) | Command::Completions { .. } | Command::Manpage => unreachable!("handled above"),
        Command::Service { action } => service(&config, action).await,
        Command::Serve => {
            refuse_placeholders(&config, None)?;
            server::serve(config).await.map(|_| 0).map_err(Into::into)
        }
        Command::Login {
            account,
            device,
            no_browser,
            timeout,
        } => {
            refuse_placeholders(&config, Some(&account))?;
            let paste = config
                .account(&account)
                .and_then(|a| a.oauth())
                .is_some_and(control::grant::needs_paste);
            let req = Request::Login {
                account: account.clone(),
                device,
                timeout,
            };
            if !paste && serve_handles(&config, &account) {
                if let Some(code) = via_serve(&config, req, &account, no_browser, |_| {}).await? {
                    return Ok(code);
                }
            }
            login(config, &account, device, no_browser, timeout).await.map(|_| 0)
        }
        Command::Accounts => {
            let mut rows = None;
            let served = via_serve(&config, Request::Accounts, "", true, |r| {
                if let Reply::Accounts { rows: r } = r {
                    rows = Some(r);
                }
            })
            .await?;
            let live = match served {
                Some(_) => rows.unwrap_or_default(),
                None => live_status(&config),
            };
            accounts(&config, live).await.map(|_| 0)
        }
        Command::Check { account } => {
            let req = Request::Check {
                account: account.clone(),
            };
            let served = if account.as_deref().is_none_or(|a| serve_handles(&config, a)) {
                via_serve(&config, req, account.as_deref().unwrap_or(""), true, |r| {
                    if let Reply::Checked { rows } = r {
                        for row in rows {
                            println!("{}", row.line());
                        }
                    }
                })
                .await?
            } else {
                None
            };
            match served {
                Some(code) => Ok(code),
                None => check(&config, account.as_deref()).await,
            }
        }
        Command::Revoke { account } => {
            let req = Request::Revoke {
                account: account.clone(),
            };
            match handled_by_serve(&config, req, &account).await? {
                Some(code) => Ok(code),
                None => revoke(&config, &account).await.map(|_| 0),
            }
        }
        Command::Passwd { account } => {
            let req = Request::Passwd {
                account: account.clone(),
            };
            match handled_by_serve(&config, req, &account).await? {
                Some(code) => Ok(code),
                None => passwd(&config, &account).await.map(|_| 0),
            }
        }
    }
}

/// Whether a running `serve` does this command's work itself. A mailbox of
/// a domain entry (taken up by serve only once it has a record) and an
/// account that borrows another's grant (`token_from`: only its local
/// password is set) are done by the command itself; a running serve picks
/// the new record up at the account's next use.
fn serve_handles(config: &Config, account: &str) -> bool {
    config.account(account).is_some_and(|a| a.token_from.is_none())
}

/// `req` run through a running `serve` when it handles `account`, with no
/// data replies to show; `None` when the command must do the work itself.
async fn handled_by_serve(config: &Config, req: Request, account: &str) -> Result<Option<u8>> {
    if !serve_handles(config, account) {
        return Ok(None);
    }
    via_serve(config, req, account, true, |_| {}).await
}

async fn service(config: &Config, action: ServiceAction) -> Result<u8> {
    use mailproxy::service;
    let exe = std::env::current_exe().context("where is this mailproxy binary?")?;
    match action {
        ServiceAction::Install { print: true, .. } => {
            print!("{}", service::systemd_unit(&exe, config)?);
            Ok(0)
        }
        ServiceAction::Install { print: false, .. } => {
            refuse_placeholders(config, None)?;
            // The sandbox lets serve write only its state directory: it must exist.
            Vault::open(&config.state_dir)?;
            for l in service::install(&exe, config)? {
                println!("{l}");
            }
            Ok(0)
        }
        ServiceAction::Uninstall => unreachable!("handled before the config is read"),
        ServiceAction::Status => {
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
    }
}

/// The example config's placeholder client ids lead only to a provider's
/// error page: refuse them with a sentence (every account for `serve`, the
/// one being logged in otherwise).
fn refuse_placeholders(config: &Config, only: Option<&str>) -> Result<()> {
    for a in config.accounts.values() {
        if only.is_some_and(|n| !a.name.eq_ignore_ascii_case(n)) {
            continue;
        }
        // Service accounts have no client id: their key file names the app.
        let placeholder = |s: &&OAuthSettings| s.flow != Flow::ServiceAccount && setup::is_placeholder(&s.client_id);
        if let Some(s) = a.oauth().filter(placeholder) {
            bail!(
                "{}: accounts.\"{}\".client_id is the placeholder `{}`: register an app with the provider and put its client id there (`mailproxy add {}` prints the steps), or remove the account",
                config.path.display(),
                a.name,
                s.client_id,
                a.name
            );
        }
    }
    Ok(())
}

/// `mailproxy add`: write the config, then log in (through a running
/// serve after it reloaded the config, else directly).
async fn add(path: &std::path::Path, a: AddArgs) -> Result<u8> {
    let opts = setup::AddOptions {
        address: a.address,
        provider: a.provider,
        client_id: a.client_id,
        client_secret: a.client_secret,
        tenant: a.tenant,
        imap: a.imap,
        smtp: a.smtp,
        pop3: a.pop3,
        auth_url: a.auth_url,
        token_url: a.token_url,
        device_url: a.device_url,
        revoke_url: a.revoke_url,
        scopes: a.scopes,
        ca_file: a.ca_file,
    };
    let mut ask = |question: &str| -> Result<Option<String>, setup::SetupError> {
        eprint!("{question}: ");
        let mut line = String::new();
        let n = std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| setup::SetupError::Input(format!("reading the answer: {e}")))?;
        if !std::io::stdin().is_terminal() {
            eprintln!();
        }
        Ok((n > 0).then(|| line.trim().to_string()))
    };
    let added = setup::add(path, opts, &mut ask, &mut std::io::stderr())?;
    let name = added.account;
    let next_steps = format!(
        "Next: `mailproxy service install` runs the proxy in the background (or run `mailproxy serve`).\n\
         Mail clients connect to IMAP 127.0.0.1:1143 and SMTP 127.0.0.1:1587 with the user name {name} and the local password."
    );
    if added.provider == setup::Provider::Password {
        eprintln!("{name} passes the client's own password through: nothing to authorise.\n{next_steps}");
        return Ok(0);
    }
    if a.no_login {
        eprintln!("Authorise it with `mailproxy login {name}`.\n{next_steps}");
        return Ok(0);
    }
    let config = Config::load(path)?;
    // A running serve must know the account before it can log it in.
    if via_serve(&config, Request::Reload, &name, true, |_| {})
        .await?
        .is_some()
    {
        eprintln!("The running mailproxy serve reloaded its config.");
    }
    let req = Request::Login {
        account: name.clone(),
        device: false,
        timeout: 300,
    };
    let paste = config
        .account(&name)
        .and_then(|a| a.oauth())
        .is_some_and(control::grant::needs_paste);
    let served = if paste {
        None
    } else {
        via_serve(&config, req, &name, a.no_browser, |_| {}).await?
    };
    match served {
        Some(0) => {}
        Some(code) => return Ok(code),
        None => login(config, &name, false, a.no_browser, 300).await?,
    }
    eprintln!("{next_steps}");
    Ok(0)
}

/// Runs `req` through the running `serve` (its control socket); `None`
/// when no serve runs with this config's state directory. Passwords it
/// asks for are read like the offline commands read them.
async fn via_serve(
    config: &Config,
    req: Request,
    account: &str,
    no_browser: bool,
    mut data: impl FnMut(Reply),
) -> Result<Option<u8>> {
    let Some(mut c) = control::client::Client::connect(&config.state_dir).await? else {
        return Ok(None);
    };
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
            Reply::Done { code } => return Ok(Some(code)),
            Reply::Error { message } => bail!(message),
            other => data(other),
        }
    }
}

/// The account `name` selects (its own entry or a domain entry's mailbox).
fn oauth_account(config: &Config, name: &str) -> Result<(Arc<Account>, OAuthSettings)> {
    let account = config
        .lookup(name)
        .with_context(|| format!("{} has no account `{name}`", config.path.display()))?;
    let Some(settings) = account.oauth().cloned() else {
        bail!("{name} uses provider = \"password\": the client's own password goes upstream, there is no token");
    };
    Ok((account, settings))
}

/// The OAuth accounts `accounts` and `check` go through: explicit ones, and
/// the mailboxes of domain entries that have a record.
fn known_accounts(config: &Config, records: &dyn store::RecordStore) -> Vec<Arc<Account>> {
    let mut v: Vec<Arc<Account>> = config.accounts.values().cloned().collect();
    if !config.domains.is_empty() {
        for name in records.names_now() {
            if config.account(&name).is_none() {
                v.extend(config.lookup(&name).filter(|a| a.domain_entry.is_some()));
            }
        }
    }
    v
}

async fn login(config: Config, name: &str, device: bool, no_browser: bool, timeout: u64) -> Result<()> {
    let (account, settings) = oauth_account(&config, name)?;
    let (account, settings) = (&*account, &settings);
    if device {
        if let Some(why) = settings.device_flow_refusal(&account.name) {
            bail!(why);
        }
    }
    Vault::open(&config.state_dir)?;
    let records = store::open(&config).await?;
    let store_key = store::store_key(&config)?;
    let audit = Audit::direct(&config.audit_log);
    if let Some(owner) = &account.token_from {
        return login_shared(&config, account, owner, &*records, store_key.as_ref(), &audit).await;
    }
    let password = read_password(&account.name, true)?;
    let http = oauth::http_client_for(&config)?;
    let timeout = Duration::from_secs(timeout);
    // Until the grant is checked, Ctrl-C cancels and nothing is stored.
    let (a, n) = (audit.clone(), account.name.clone());
    let cancel = cli_wait::CancelOnCtrlC::arm(&account.name, move || {
        a.record(Entry::new(&n, "consent", "cancelled with Ctrl-C"));
    })?;

    let spinner = std::sync::Mutex::new(None::<cli_wait::Waiting>);
    let who = account.name.clone();
    let tell = |n: control::grant::Notice| {
        let mut spin = spinner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match n {
            control::grant::Notice::Open(url) => {
                if !no_browser {
                    open_browser(&url);
                }
            }
            control::grant::Notice::Waiting(what) => *spin = Some(cli_wait::Waiting::start(what, timeout)),
            control::grant::Notice::Device { uri, code, complete } => {
                eprintln!(
                    "{}",
                    cli_wait::device_instructions(&who, &uri, &code, complete.as_deref())
                );
            }
            other => {
                let text = other.text(&who).unwrap_or_default();
                match spin.as_ref() {
                    Some(w) => w.say(&text),
                    None => eprintln!("{text}"),
                }
            }
        }
    };
    let result = control::grant::obtain(&http, account, settings, device, timeout, &tell).await;
    drop(spinner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
    let tokens = match result {
        Ok(t) => t,
        Err(e) => {
            audit.record(Entry::new(&account.name, "consent", format!("failed: {e}")));
            return Err(e.into());
        }
    };
    // Is the grant really this account's? Nothing is stored otherwise.
    let tls = tls::ClientConfigs::default();
    if let Err(e) = identity::verify(account, &tokens, &tls, config.limits.provider_timeout).await {
        audit.record(Entry::new(&account.name, "consent", format!("refused: {e}")));
        bail!("{e}");
    }
    drop(cancel);
    if tokens.refresh.is_none() && !settings.flow.app_only() {
        bail!(control::grant::NO_REFRESH_TOKEN);
    }
    let scopes = tokens.scopes.clone().unwrap_or_else(|| settings.scopes.clone());
    let (n, s, store) = (account.name.clone(), scopes.clone(), config.token_store);
    let (rec, where_) = tokio::task::spawn_blocking(move || {
        offline::authorisation_record(store, store_key.as_ref(), &n, &password, tokens.refresh.as_ref(), s)
    })
    .await?;
    records.store(&rec).await?;
    audit.record(Entry::new(&account.name, "consent", "authorised").scopes(&scopes));
    eprintln!(
        "Authorised {} (scopes: {}); {where_}.\n\
         Configure your mail client with user name {} and the local password you chose.",
        account.name,
        scopes.join(" "),
        account.name
    );
    Ok(())
}

/// `mailproxy login` of a shared mailbox (`token_from`): only its own local
/// password is set; the grant, checked when its owner was authorised, is
/// the other account's.
async fn login_shared(
    config: &Config,
    account: &Account,
    owner: &str,
    records: &dyn store::RecordStore,
    store_key: Option<&mailproxy::crypto::VaultKey>,
    audit: &Audit,
) -> Result<()> {
    let owner_name = config
        .lookup(owner)
        .map(|a| a.name.clone())
        .unwrap_or_else(|| owner.into());
    if records.load(&owner_name).await?.is_none() {
        bail!(
            "{} uses the grant of {owner_name}, which is not authorised yet; run `mailproxy login {owner_name}` first",
            account.name
        );
    }
    let password = read_password(&account.name, true)?;
    let (n, store, key) = (account.name.clone(), config.token_store, store_key.cloned());
    let (rec, _) = tokio::task::spawn_blocking(move || {
        offline::authorisation_record(store, key.as_ref(), &n, &password, None, Vec::new())
    })
    .await?;
    records.store(&rec).await?;
    audit.record(Entry::new(
        &account.name,
        "password_set",
        format!("set with mailproxy login; uses the grant of {owner_name}"),
    ));
    eprintln!(
        "{} uses the grant of {owner_name} and logs in upstream as {}.\n\
         Configure your mail client with user name {} and the local password you chose.",
        account.name, account.username, account.name
    );
    Ok(())
}

/// The local password: typed on a terminal (twice when it is being set),
/// else the first line of stdin.
fn read_password(account: &str, new: bool) -> Result<Secret> {
    let pw = if std::io::stdin().is_terminal() {
        let prompt = if new {
            format!("Local password for {account} (what your mail client will send to mailproxy): ")
        } else {
            format!("Local password of {account}: ")
        };
        let a = Secret::new(rpassword::prompt_password(prompt)?);
        if new {
            let b = Secret::new(rpassword::prompt_password("Repeat it: ")?);
            if a != b {
                bail!("the two passwords differ");
            }
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
    let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
    let _ = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// What a running `serve` last wrote, if it is still running.
fn live_status(config: &Config) -> Vec<AccountStatus> {
    let Ok(text) = std::fs::read_to_string(config.state_dir.join("status.json")) else {
        return vec![];
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return vec![];
    };
    let pid = v["pid"].as_u64().unwrap_or(0);
    if pid == 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return vec![];
    }
    serde_json::from_value(v["accounts"].clone()).unwrap_or_default()
}

fn when(t: Option<u64>) -> String {
    let Some(t) = t else { return "-".into() };
    let now = now_unix();
    if t > now {
        format!("in {}", control::human_secs(t - now))
    } else {
        format!("{} ago", control::human_secs(now - t))
    }
}

async fn accounts(config: &Config, live: Vec<AccountStatus>) -> Result<()> {
    let records = store::open(config).await?;
    let serving = !live.is_empty();
    let mut rows = vec![[
        "ACCOUNT",
        "PROVIDER",
        "FLOW",
        "STATE",
        "TOKEN EXPIRES",
        "LAST REFRESH",
        "LAST USE",
        "SCOPES",
    ]
    .map(String::from)];
    for d in config.domains.values() {
        let (provider, flow) = match d.oauth() {
            Some(s) => (s.provider.name(), s.flow.name()),
            None => ("password", "-"),
        };
        rows.push([
            d.name.clone(),
            provider.into(),
            flow.into(),
            format!(
                "domain entry: every address @{} without an entry of its own",
                d.name.trim_start_matches('@')
            ),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    for a in known_accounts(config, &*records).iter() {
        let Some(s) = a.oauth() else {
            rows.push([&a.name, "password", "-", "passthrough", "-", "-", "-", "-"].map(String::from));
            continue;
        };
        let rec: Option<AccountRecord> = records.load(&a.name).await?;
        let st = live.iter().find(|r| r.account.eq_ignore_ascii_case(&a.name));
        let state = match (st, &rec) {
            (Some(st), _) => match &st.detail {
                Some(d) if st.state != "ok" => format!("{}: {d}", st.state),
                _ => st.state.clone(),
            },
            (None, None) => format!("needs login: run `mailproxy login {}`", a.name),
            (None, Some(r)) if r.token_store == Some(StoreKind::Keyring) => "ok (token in the OS keyring)".into(),
            (None, Some(r)) if r.token_store == Some(StoreKind::StoreKey) => "ok (sealed with the store key)".into(),
            (None, Some(r)) if r.refresh_token.is_some() => if serving {
                "locked"
            } else {
                "locked (serve not running)"
            }
            .into(),
            (None, Some(_)) if a.token_from.is_some() => {
                format!("ok (uses the grant of {})", a.token_from.as_deref().unwrap_or_default())
            }
            (None, Some(_)) if s.flow.app_only() => "ok".into(),
            (None, Some(_)) => format!("needs login: run `mailproxy login {}`", a.name),
        };
        let scopes = rec
            .as_ref()
            .map(|r| r.scopes.join(" "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into());
        rows.push([
            a.name.clone(),
            s.provider.name().into(),
            s.flow.name().into(),
            state,
            when(st.and_then(|s| s.access_expires)),
            when(
                st.and_then(|s| s.last_refresh)
                    .or(rec.as_ref().and_then(|r| r.last_refresh)),
            ),
            when(st.and_then(|s| s.last_use)),
            scopes,
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

/// Asks for the local password, as `tokens::offline` needs it.
fn ask_password(account: &str) -> impl FnOnce() -> Result<Secret, OfflineError> + '_ {
    move || read_password(account, false).map_err(|e| OfflineError::Input(format!("{e:#}")))
}

async fn check(config: &Config, only: Option<&str>) -> Result<u8> {
    let records = store::open(config).await?;
    let store_key = store::store_key(config)?;
    let audit = Audit::direct(&config.audit_log);
    let http = oauth::http_client_for(config)?;
    let names: Vec<String> = match only {
        Some(n) => vec![oauth_account(config, n)?.0.name.clone()],
        None => known_accounts(config, &*records)
            .iter()
            .filter(|a| a.oauth().is_some())
            .map(|a| a.name.clone())
            .collect(),
    };
    let mut worst = 0u8;
    for name in names {
        let (account, settings) = oauth_account(config, &name)?;
        if let Some(owner) = &account.token_from {
            match records.load(&name).await? {
                Some(_) => println!("{name}: ok: uses the grant of {owner} (checked with it)"),
                None => {
                    println!("{name}: needs login: run `mailproxy login {name}`");
                    worst = worst.max(1);
                }
            }
            continue;
        }
        match offline::check(
            &*records,
            store_key.as_ref(),
            &http,
            &name,
            &account.username,
            &settings,
            ask_password(&name),
        )
        .await?
        {
            Checked::NeedsLogin(why) => {
                println!("{name}: needs login: {why}");
                worst = worst.max(1);
            }
            Checked::Refreshed(t) => {
                let left = t
                    .expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .as_secs();
                println!("{name}: ok: new access token valid for {}", control::human_secs(left));
            }
            Checked::Failed(e) => {
                let code = if e.needs_login() || matches!(e, OAuthError::Provider(_)) {
                    1
                } else {
                    2
                };
                worst = worst.max(code);
                audit.record(Entry::new(&name, "refresh_failed", e.to_string()));
                println!(
                    "{name}: {}: {e}",
                    if code == 1 {
                        "needs action"
                    } else {
                        "temporarily failing"
                    }
                );
            }
        }
    }
    Ok(worst)
}

async fn passwd(config: &Config, name: &str) -> Result<()> {
    let (account, _) = oauth_account(config, name)?;
    let name = account.name.clone();
    let records = store::open(config).await?;
    let audit = Audit::direct(&config.audit_log);
    let rec = records
        .load(&name)
        .await?
        .with_context(|| format!("{name} is not authorised; run `mailproxy login {name}`"))?;
    if rec.password.is_none() {
        bail!("{name} has no local password yet; run `mailproxy login {name}`");
    }
    // The old password first (on a terminal, or the first line of stdin),
    // then the new one (the next line).
    let old = if offline::needs_old_password(&rec) {
        Some(read_password(&name, false)?)
    } else {
        None
    };
    let new = read_password(&name, true)?;
    let r = offline::change_password(&*records, &name, move || old.ok_or(OfflineError::WrongPassword), &new).await;
    match r {
        Ok(()) => {
            audit.record(Entry::new(&name, "password_changed", "changed with mailproxy passwd"));
            eprintln!("The local password of {name} is changed; clients must use the new one.");
            Ok(())
        }
        Err(e) => {
            audit.record(Entry::new(&name, "password_changed", format!("failed: {e}")));
            Err(e.into())
        }
    }
}

async fn revoke(config: &Config, name: &str) -> Result<()> {
    let (account, settings) = oauth_account(config, name)?;
    let settings = &settings;
    let name = account.name.clone();
    let records = store::open(config).await?;
    let store_key = store::store_key(config)?;
    let audit = Audit::direct(&config.audit_log);
    let http = oauth::http_client_for(config)?;
    let rec = records.load(&name).await?;
    let refresh = match &rec {
        Some(r) => {
            match offline::stored_refresh(&name, r, store_key.as_ref(), ask_password(&name)) {
                Ok(t) => t.map(|(t, _)| t),
                Err(e) => {
                    eprintln!("cannot read the refresh token ({e:#}); erasing the local copy without revoking it at the provider");
                    None
                }
            }
        }
        None => None,
    };
    match &refresh {
        Some(t) => match flows::revoke(&http, &name, settings, t).await {
            Ok(flows::Revocation::Revoked) => {
                println!(
                    "revoked the refresh token at {}",
                    settings.revoke_url.as_deref().unwrap_or("the provider")
                );
                audit.record(Entry::new(&name, "revoked", "revoked at the provider").scopes(&settings.scopes));
            }
            Ok(flows::Revocation::Unsupported(how)) => {
                println!("not revoked at the provider: {how}");
                audit.record(Entry::new(&name, "revoked", "provider has no revocation endpoint"));
            }
            Err(e) => {
                println!("revocation at the provider failed: {e}");
                audit.record(Entry::new(&name, "revoked", format!("failed: {e}")));
            }
        },
        None if account.token_from.is_some() => println!(
            "nothing to revoke at the provider: {name} uses the grant of {}; revoke that account to end the grant",
            account.token_from.as_deref().unwrap_or_default()
        ),
        None if settings.flow.app_only() => {
            println!("nothing to revoke at the provider: an app-only account has no refresh token");
        }
        None => println!("no refresh token was stored; nothing to revoke at the provider"),
    }
    let mut erased = Vec::new();
    for p in records.erase(&name).await? {
        erased.push(format!(
            "{p} (local password verifier, sealed refresh token, scopes, timestamps)"
        ));
    }
    match keystore::delete(&name) {
        Ok(true) => erased.push("the refresh token in the OS keyring".into()),
        Ok(false) => {}
        Err(e) if config.token_store == TokenStore::Keyring => eprintln!("cannot reach the OS keyring: {e}"),
        Err(_) => {}
    }
    // The running proxy drops its in-memory tokens when it sees the record gone.
    if erased.is_empty() {
        println!("nothing was stored locally for {name}");
    } else {
        println!("erased:");
        for e in &erased {
            println!("  {e}");
        }
    }
    audit.record(Entry::new(
        &name,
        "erased",
        if erased.is_empty() {
            "nothing stored".into()
        } else {
            erased.join("; ")
        },
    ));
    Ok(())
}

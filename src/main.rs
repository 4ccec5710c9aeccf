//! The `mailproxy` command line.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use mailproxy::audit::{Audit, Entry};
use mailproxy::config::{Account, Config, Flow, OAuthSettings, TokenStore};
use mailproxy::oauth::{self, flows, login::Redirect, OAuthError, Tokens};
use mailproxy::secret::Secret;
use mailproxy::tokens::offline::{self, Checked, OfflineError};
use mailproxy::tokens::{self, now_unix, AccountStatus};
use mailproxy::vault::{AccountRecord, StoreKind, Vault};
use mailproxy::{identity, keystore, server, tls};

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
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("mailproxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<u8> {
    let path = cli.config.unwrap_or_else(Config::default_path);
    let config = Config::load(&path)?;
    match cli.command {
        Command::Serve => server::serve(config).await.map(|_| 0).map_err(Into::into),
        Command::Login {
            account,
            device,
            no_browser,
            timeout,
        } => login(config, &account, device, no_browser, timeout).await.map(|_| 0),
        Command::Accounts => accounts(&config).map(|_| 0),
        Command::Check { account } => check(&config, account.as_deref()).await,
        Command::Revoke { account } => revoke(&config, &account).await.map(|_| 0),
        Command::Passwd { account } => passwd(&config, &account).await.map(|_| 0),
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
fn known_accounts(config: &Config, vault: &Vault) -> Vec<Arc<Account>> {
    let mut v: Vec<Arc<Account>> = config.accounts.values().cloned().collect();
    if !config.domains.is_empty() {
        for name in vault.account_names() {
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
    let vault = Vault::open(&config.state_dir)?;
    let audit = Audit::direct(&config.audit_log);
    if let Some(owner) = &account.token_from {
        return login_shared(&config, account, owner, &vault, &audit).await;
    }
    let password = read_password(&account.name, true)?;
    let http = oauth::http_client_for(&config)?;
    let timeout = Duration::from_secs(timeout);

    let result: Result<Tokens, OAuthError> = match (settings.flow, device) {
        (Flow::ClientCredentials | Flow::ServiceAccount, _) => {
            flows::app_token(&http, &account.name, &account.username, settings).await
        }
        (Flow::Device, _) | (_, true) => {
            let d = flows::device_start(&http, &account.name, settings).await?;
            eprintln!(
                "To authorise {}, open {} on any device and enter the code {}\n",
                account.name, d.verification_uri, d.user_code
            );
            if let Some(c) = &d.verification_uri_complete {
                eprintln!("(or open {c})\n");
            }
            tokio::time::timeout(
                timeout,
                flows::device_poll(&http, &account.name, settings, &d, |i| {
                    eprintln!("the provider asked to poll more slowly; now every {} s", i.as_secs())
                }),
            )
            .await
            .unwrap_or_else(|_| {
                Err(OAuthError::Config(format!(
                    "not approved within {} s",
                    timeout.as_secs()
                )))
            })
        }
        (Flow::AuthorizationCode, false) => {
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
            match redirect.wait(&account.name, &req, timeout).await {
                Ok(code) => oauth::exchange_code(&http, &account.name, settings, req, code.expose()).await,
                Err(e) => Err(e),
            }
        }
    };
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
    if tokens.refresh.is_none() && !settings.flow.app_only() {
        bail!(
            "the provider returned no refresh token, so access would end within the hour; \
             check that the app registration allows offline access (Microsoft: the offline_access scope; Google: a Desktop app client)"
        );
    }
    let scopes = tokens.scopes.clone().unwrap_or_else(|| settings.scopes.clone());
    let (v, n, s, store) = (vault.clone(), account.name.clone(), scopes.clone(), config.token_store);
    let where_ = tokio::task::spawn_blocking(move || {
        tokens::store_authorisation(&v, store, &n, &password, tokens.refresh.as_ref(), s)
    })
    .await??;
    audit.record(Entry::new(&account.name, "consent", "authorised").scopes(&scopes));
    eprintln!(
        "Authorised {} (scopes: {}); the refresh token is kept in {where_}.\n\
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
async fn login_shared(config: &Config, account: &Account, owner: &str, vault: &Vault, audit: &Audit) -> Result<()> {
    let owner_name = config
        .lookup(owner)
        .map(|a| a.name.clone())
        .unwrap_or_else(|| owner.into());
    if vault.load(&owner_name)?.is_none() {
        bail!(
            "{} uses the grant of {owner_name}, which is not authorised yet; run `mailproxy login {owner_name}` first",
            account.name
        );
    }
    let password = read_password(&account.name, true)?;
    let (v, n, store) = (vault.clone(), account.name.clone(), config.token_store);
    tokio::task::spawn_blocking(move || tokens::store_authorisation(&v, store, &n, &password, None, Vec::new()))
        .await??;
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
        format!("in {}", human(t - now))
    } else {
        format!("{} ago", human(now - t))
    }
}

fn human(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn accounts(config: &Config) -> Result<()> {
    let vault = Vault::open(&config.state_dir)?;
    let live = live_status(config);
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
    for a in known_accounts(config, &vault).iter() {
        let Some(s) = a.oauth() else {
            rows.push([&a.name, "password", "-", "passthrough", "-", "-", "-", "-"].map(String::from));
            continue;
        };
        let rec: Option<AccountRecord> = vault.load(&a.name)?;
        let st = live.iter().find(|r| r.account.eq_ignore_ascii_case(&a.name));
        let state = match (st, &rec) {
            (Some(st), _) => match &st.detail {
                Some(d) if st.state != "ok" => format!("{}: {d}", st.state),
                _ => st.state.clone(),
            },
            (None, None) => format!("needs login: run `mailproxy login {}`", a.name),
            (None, Some(r)) if r.token_store == Some(StoreKind::Keyring) => "ok (token in the OS keyring)".into(),
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
    let vault = Vault::open(&config.state_dir)?;
    let audit = Audit::direct(&config.audit_log);
    let http = oauth::http_client_for(config)?;
    let names: Vec<String> = match only {
        Some(n) => vec![oauth_account(config, n)?.0.name.clone()],
        None => known_accounts(config, &vault)
            .iter()
            .filter(|a| a.oauth().is_some())
            .map(|a| a.name.clone())
            .collect(),
    };
    let mut worst = 0u8;
    for name in names {
        let (account, settings) = oauth_account(config, &name)?;
        if let Some(owner) = &account.token_from {
            match vault.load(&name)? {
                Some(_) => println!("{name}: ok: uses the grant of {owner} (checked with it)"),
                None => {
                    println!("{name}: needs login: run `mailproxy login {name}`");
                    worst = worst.max(1);
                }
            }
            continue;
        }
        match offline::check(&vault, &http, &name, &account.username, &settings, ask_password(&name)).await? {
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
                println!("{name}: ok: new access token valid for {}", human(left));
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
    let vault = Vault::open(&config.state_dir)?;
    let audit = Audit::direct(&config.audit_log);
    let rec = vault
        .load(&name)?
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
    let (v, n) = (vault.clone(), name.clone());
    let r = tokio::task::spawn_blocking(move || {
        offline::change_password(&v, &n, || old.ok_or(OfflineError::WrongPassword), &new)
    })
    .await?;
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
    let vault = Vault::open(&config.state_dir)?;
    let audit = Audit::direct(&config.audit_log);
    let http = oauth::http_client_for(config)?;
    let rec = vault.load(&name)?;
    let refresh = match &rec {
        Some(r) => {
            match offline::stored_refresh(&name, r, ask_password(&name)) {
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
    for p in vault.erase(&name)? {
        erased.push(format!(
            "{} (local password verifier, sealed refresh token, scopes, timestamps)",
            p.display()
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

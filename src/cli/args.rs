//! The command line as clap reads it: every command, flag and help text.
//! `mailproxy --help`, the completions and the man page are generated from
//! these definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::setup;

#[derive(Parser)]
#[command(
    version,
    about = "Local authenticating proxy: legacy IMAP/SMTP/POP3 clients in, OAuth 2.0 upstream"
)]
pub struct Cli {
    /// Config file [default: $XDG_CONFIG_HOME/mailproxy/config.toml]
    #[arg(long, short, global = true, env = "MAILPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Print a valid access token (at least 5 minutes left) for your own OAuth clients;
    /// exit status as for check.
    ///
    /// For msmtp `passwordeval`, mbsync `PassCmd`, curl `--oauth2-bearer`: refreshed first
    /// when needed, through the running serve when there is one (owner only).
    Token {
        /// The account, as named in the config.
        account: String,
        /// What the token is for: mail (IMAP, SMTP, POP3) or graph (Microsoft Graph).
        #[arg(long, value_enum, default_value_t = Resource::Mail)]
        resource: Resource,
        /// Print JSON: the token, its expiry (RFC 3339 and unix seconds), scopes and account.
        #[arg(long)]
        json: bool,
    },
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

/// What a `token` is for.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Resource {
    /// IMAP, SMTP and POP3 at the account's servers.
    Mail,
    /// Microsoft Graph.
    Graph,
}

/// The shells `completions` writes for.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
pub enum ServiceAction {
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
pub struct AddArgs {
    /// The mail address (the login name clients will use).
    pub address: String,
    /// The provider [default: detected from the domain and its MX records].
    #[arg(long, value_enum)]
    pub provider: Option<setup::Provider>,
    /// The app registration's client id.
    #[arg(long)]
    pub client_id: Option<String>,
    /// The app registration's client secret (Google desktop clients have one).
    #[arg(long)]
    pub client_secret: Option<String>,
    /// Microsoft tenant: common, organizations, consumers, a tenant id or domain.
    #[arg(long)]
    pub tenant: Option<String>,
    /// IMAP server URL, e.g. imaps://mail.example.org:993 (presets fill it for google and microsoft).
    #[arg(long)]
    pub imap: Option<String>,
    /// SMTP server URL, e.g. smtps://mail.example.org:465.
    #[arg(long)]
    pub smtp: Option<String>,
    /// POP3 server URL, e.g. pop3s://mail.example.org:995.
    #[arg(long)]
    pub pop3: Option<String>,
    /// Authorisation endpoint (custom providers).
    #[arg(long)]
    pub auth_url: Option<String>,
    /// Token endpoint (custom providers).
    #[arg(long)]
    pub token_url: Option<String>,
    /// Device-authorisation endpoint (custom providers, optional).
    #[arg(long)]
    pub device_url: Option<String>,
    /// Revocation endpoint (custom providers, optional).
    #[arg(long)]
    pub revoke_url: Option<String>,
    /// Scopes, comma-separated (custom providers).
    #[arg(long, value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// Extra PEM trust anchor for this account's servers.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Only write the config; run `mailproxy login ADDRESS` later.
    #[arg(long)]
    pub no_login: bool,
    /// Print the sign-in address only; do not try to open a browser.
    #[arg(long)]
    pub no_browser: bool,
}

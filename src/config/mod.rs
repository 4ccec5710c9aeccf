//! The configuration file: TOML, strict (`deny_unknown_fields`), and every
//! error names the file, the line and the key so a person can fix it at once.
//!
//! `raw` is what the file says, `parse` turns it into a checked [`Config`]
//! one section at a time (no I/O; the settings for several instances in
//! `fleet`), with `source` naming the file, line and key of each error; `database` reads
//! `database_url` and its TLS settings;
//! `files` judges the file and the key files it names on disk (a service
//! account's key through `service_account_key`), and `reload` says what a
//! SIGHUP cannot change.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::endpoint::{Endpoint, Protocol};
use crate::secret::Secret;

pub mod cloud;
pub mod database;
pub mod domain;
mod files;
mod fleet;
pub mod graph;
mod parse;
mod presets;
mod raw;
mod reload;
mod service_account_key;
mod source;

pub use fleet::{Fleet, ProxyProtocol, TrustedNet};
pub use reload::restart_needed;
pub use service_account_key::ServiceAccountKey;

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What is wrong with a value, a file or a key file the config names; a
/// [`ConfigError`] says where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    #[error("`{name}` is not a domain entry: write the domain after one @, e.g. [accounts.\"@example.com\"]")]
    NotDomainEntry { name: String },
    #[error("`{name}` is not a user on this machine (/etc/passwd); write a user name, a uid, \"owner\" or \"anyone\"")]
    UnknownUser { name: String },
    #[error("`{url}` is not a URL: {source}")]
    NotUrl { url: String, source: url::ParseError },
    #[error("`{url}` must be an https:// URL (got {scheme}://)")]
    NotHttps { url: String, scheme: String },
    #[error(
        "the config file belongs to uid {uid}, not to the user running mailproxy (uid {me}) or root, \
         and that user could send passwords anywhere; run: chown {me} {p} && chmod 600 {p}",
        p = .path.display()
    )]
    ConfigOwner { path: PathBuf, uid: u32, me: u32 },
    #[error(
        "other users can change the config file (mode {mode:o}), and so where passwords go; run: chmod 600 {p}",
        p = .path.display()
    )]
    ConfigWritable { path: PathBuf, mode: u32 },
    #[error(
        "the config file holds a secret ({keys}) and other users can read it (mode {mode:o}); run: chmod 600 {p}",
        keys = .keys.join(", "),
        p = .path.display()
    )]
    SecretsReadable {
        path: PathBuf,
        keys: Vec<String>,
        mode: u32,
    },
    #[error(
        "the private key {p} belongs to uid {uid}, not to the user running mailproxy (uid {me}); run: chown {me} {p} && chmod 600 {p}",
        p = .path.display()
    )]
    KeyOwner { path: PathBuf, uid: u32, me: u32 },
    #[error(
        "other users can read or change the private key {p} (mode {mode:o}); run: chmod 600 {p}",
        p = .path.display()
    )]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("cannot read the service account key {}: {source}", .path.display())]
    ServiceKeyUnreadable { path: PathBuf, source: std::io::Error },
    #[error("the service account key {} is not the JSON key Google issues ({source})", .path.display())]
    ServiceKeyNotJson { path: PathBuf, source: serde_json::Error },
    #[error(
        "the service account key {} is a `{kind}` key, not a service account key (Google Cloud console > IAM > Service accounts > Keys > Add key > JSON)",
        .path.display()
    )]
    ServiceKeyKind { path: PathBuf, kind: String },
    #[error("the service account key {} has no client_email", .path.display())]
    ServiceKeyNoEmail { path: PathBuf },
    #[error("the service account key {} has no private_key", .path.display())]
    ServiceKeyNoPrivateKey { path: PathBuf },
    #[error("the service account key {} has a private_key that is not a PKCS#8 PEM key", .path.display())]
    ServiceKeyNotPkcs8 { path: PathBuf },
    #[error("the service account key {} has a private_key that is not an RSA key ({reason})", .path.display())]
    ServiceKeyNotRsa {
        path: PathBuf,
        reason: ring::error::KeyRejected,
    },
}

/// Where refresh tokens are kept. Serialised in lower case (`"file"`,
/// `"keyring"`), the same spelling as in the config, so account records can
/// store it as this type too.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TokenStore {
    /// Sealed in the account's vault file under a key derived from the local
    /// password: works everywhere, but an account is locked after a restart
    /// until a client logs in.
    #[default]
    File,
    /// In the OS keyring (Secret Service, kernel keyutils, macOS Keychain,
    /// Windows Credential Manager): accounts are usable right after start.
    Keyring,
    /// Records in PostgreSQL, shared by several instances (`database_url`).
    Postgres,
}

impl TokenStore {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            TokenStore::File => "file",
            TokenStore::Keyring => "keyring",
            TokenStore::Postgres => "postgres",
        }
    }
}

impl fmt::Display for TokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an OAuth account is authorised.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// Browser sign-in with PKCE and a loopback redirect.
    #[default]
    AuthorizationCode,
    /// RFC 8628: a code typed in on another device (headless machines).
    /// Not for Google: its device flow does not grant the Gmail scope.
    Device,
    /// App-only access (Microsoft 365): no user, no refresh token.
    ClientCredentials,
    /// Google Workspace domain-wide delegation: a JWT bearer grant (RFC
    /// 7523) signed with the service account's key, `sub` the mailbox; no
    /// refresh token.
    ServiceAccount,
}

impl Flow {
    pub fn name(self) -> &'static str {
        match self {
            Flow::AuthorizationCode => "browser",
            Flow::Device => "device",
            Flow::ClientCredentials => "client_credentials",
            Flow::ServiceAccount => "service_account",
        }
    }

    /// No user signs in and there is no refresh token: a token is asked for
    /// whenever one is needed, once the owner set the local password.
    pub fn app_only(self) -> bool {
        matches!(self, Flow::ClientCredentials | Flow::ServiceAccount)
    }
}

/// Local TLS on a listener.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LocalTls {
    /// Plaintext: the default on loopback, where legacy devices cannot do modern TLS.
    #[default]
    None,
    Implicit,
    Starttls,
}

/// The SASL mechanism used towards the upstream for OAuth accounts.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    #[default]
    Xoauth2,
    Oauthbearer,
}

#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub token_store: TokenStore,
    /// Local HTTP status page (and on-demand authorisation links).
    pub status_listen: Option<SocketAddr>,
    /// Shell command run when an account needs a new authorisation.
    pub on_reauth_needed: Option<String>,
    pub audit_log: PathBuf,
    /// Extra trust anchors for every upstream (fallback included).
    pub ca_file: Option<PathBuf>,
    /// Proxy for every call to an OAuth provider (`http://host:port`, with
    /// optional `user:password@`); without it `HTTPS_PROXY`, `HTTP_PROXY`
    /// and `NO_PROXY` from the environment count.
    pub http_proxy: Option<Secret>,
    pub imap: Option<Listener>,
    pub smtp: Option<Listener>,
    pub pop3: Option<Listener>,
    pub limits: Limits,
    /// Keyed by the lower-cased login name.
    pub accounts: BTreeMap<String, Arc<Account>>,
    /// Several instances: the shared store, the store key, metrics.
    pub fleet: Fleet,
    /// Domain entries (`[accounts."@example.com"]`), keyed by the
    /// lower-cased domain: the template of every mailbox in the domain
    /// without an entry of its own (see [`Config::lookup`]).
    pub domains: BTreeMap<String, Arc<Account>>,
    /// Which local users' programs may connect over loopback.
    pub local_users: LocalUsers,
}

/// `[server] local_users`: the local users (by uid) whose programs may use
/// the listeners over loopback, where the kernel can tell who connected.
/// Clients from other machines are not local users and are not affected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LocalUsers {
    /// Every local user (the default).
    #[default]
    Anyone,
    /// The user who runs mailproxy, and these users (`names` are turned
    /// into `uids` when the config is loaded).
    Owner { uids: Vec<u32>, names: Vec<String> },
}

impl LocalUsers {
    /// Whether a loopback client of `uid` may connect (`owner`: the uid
    /// that runs mailproxy).
    pub fn admits(&self, uid: u32, owner: u32) -> bool {
        match self {
            LocalUsers::Anyone => true,
            LocalUsers::Owner { uids, .. } => uid == owner || uids.contains(&uid),
        }
    }

    /// Looks the user names up in `passwd` (the text of /etc/passwd).
    fn resolve(&mut self, passwd: &str) -> Result<(), ConfigProblem> {
        let LocalUsers::Owner { uids, names } = self else {
            return Ok(());
        };
        for name in names.drain(..) {
            let uid = passwd.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next()? == name).then_some(())?;
                f.nth(1)?.parse::<u32>().ok()
            });
            match uid {
                Some(u) => uids.push(u),
                None => return Err(ConfigProblem::UnknownUser { name }),
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub protocol: Protocol,
    pub listen: SocketAddr,
    pub fallback: Option<Endpoint>,
    pub tls: LocalTls,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PROXY protocol v2 from these balancers (`proxy_protocol = true`).
    pub proxy: Option<ProxyProtocol>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub preauth_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_line: usize,
    /// Cap of the delay before answering a failed login (it doubles with
    /// each failure, per account and per client address).
    pub login_failure_delay_max: Duration,
    /// Total time allowed for one request to the OAuth provider.
    pub provider_timeout: Duration,
    /// Largest message accepted for sending through Microsoft Graph
    /// (advertised as SIZE); Exchange Online's own limit is 35 MB.
    pub max_send_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            preauth_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(20),
            max_connections: 4096,
            // One address rarely needs more than a few dozen sessions (a
            // client with many folders, a NAT'd office); one address must
            // not be able to take every slot of a listener.
            max_connections_per_ip: 256,
            max_line: 8192,
            login_failure_delay_max: Duration::from_secs(15),
            provider_timeout: Duration::from_secs(30),
            max_send_size: 35 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    /// The login name clients use, as written in the config.
    pub name: String,
    /// The name sent upstream (defaults to `name`).
    pub username: String,
    pub auth: AccountAuth,
    pub imap: Option<Endpoint>,
    pub smtp: Option<Endpoint>,
    pub pop3: Option<Endpoint>,
    pub ca_file: Option<PathBuf>,
    /// Accept any upstream certificate (logged as a warning on every
    /// connection). Only for a test server you control.
    pub insecure_skip_verify: bool,
    pub mechanism: Mechanism,
    /// The domain entry (`@example.com`) this mailbox was made from.
    pub domain_entry: Option<String>,
    /// The account whose grant this one uses (lower-cased name): a shared
    /// or delegated mailbox logs in upstream as `username` with that
    /// account's token, behind a local password of its own.
    pub token_from: Option<String>,
    /// Upstream sessions at once, per protocol (`None`: unlimited). The
    /// provider's own limit by default, so mailproxy refuses plainly before
    /// the provider refuses vaguely or drops an older session.
    pub max_upstream_sessions: Option<u32>,
    /// `smtp = "graph"`: messages leave through Microsoft Graph instead of
    /// an SMTP server (then `smtp` is `None`).
    pub graph: Option<graph::GraphApi>,
}

impl Account {
    /// The same account but for its session limit: a limit change applies
    /// to new logins without starting the account's tokens afresh.
    pub fn same_apart_from_limits(&self, other: &Account) -> bool {
        let mut o = other.clone();
        o.max_upstream_sessions = self.max_upstream_sessions;
        *self == o
    }

    pub fn endpoint(&self, p: Protocol) -> Option<&Endpoint> {
        match p {
            Protocol::Imap => self.imap.as_ref(),
            Protocol::Smtp => self.smtp.as_ref(),
            Protocol::Pop3 => self.pop3.as_ref(),
        }
    }

    pub fn oauth(&self) -> Option<&OAuthSettings> {
        match &self.auth {
            AccountAuth::OAuth(o) => Some(o),
            AccountAuth::Password => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AccountAuth {
    /// Passthrough: the client's own credentials go upstream unchanged.
    Password,
    OAuth(Box<OAuthSettings>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Google,
    Microsoft,
    Custom,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Google => "google",
            ProviderKind::Microsoft => "microsoft",
            ProviderKind::Custom => "custom",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OAuthSettings {
    pub provider: ProviderKind,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub auth_url: String,
    pub token_url: String,
    pub device_url: Option<String>,
    pub revoke_url: Option<String>,
    pub redirect_uri: Option<String>,
    pub scopes: Vec<String>,
    pub flow: Flow,
    /// Certificate (PEM) and RSA key (PKCS#8 PEM) for a signed JWT client
    /// assertion instead of a client secret (client credentials flow).
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Google's JSON key of a service account (`flow = "service_account"`).
    pub service_account_key: Option<PathBuf>,
    /// Start an authorisation when a client logs in to an account without a
    /// usable token.
    pub on_demand: bool,
    /// Extra parameters on the authorisation URL (Google needs
    /// `access_type=offline` and `prompt=consent` to hand out a refresh token).
    pub auth_params: Vec<(String, String)>,
    /// Scopes of the account's Graph tokens (another resource than its
    /// mail servers'); `None` uses the account's own token for Graph.
    pub graph_scopes: Option<Vec<String>>,
}

impl OAuthSettings {
    /// What the consent screen asks for: the mail scopes and, for an
    /// account that sends through Graph, its Graph scopes (one consent, one
    /// refresh token that redeems for both resources).
    pub fn consent_scopes(&self) -> Vec<String> {
        let mut all = self.scopes.clone();
        for s in self.graph_scopes.iter().flatten() {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        all
    }

    /// Why `account` cannot be authorised with the device flow, or `None`
    /// if it can. The config refuses `flow = "device"` with this sentence;
    /// `mailproxy login --device` should refuse with the same one.
    pub fn device_flow_refusal(&self, account: &str) -> Option<String> {
        (self.provider == ProviderKind::Google).then(|| {
            format!(
                "Google's device flow does not accept the Gmail scope ({GOOGLE_MAIL_SCOPE}), so it cannot authorise mail access. \
                 Use the browser flow (the default) instead; on a headless machine, set redirect_uri = \"http://127.0.0.1:8765/\" \
                 for this account, connect with `ssh -L 8765:127.0.0.1:8765 HOST`, run `mailproxy login {account} --no-browser` \
                 in that session and open the URL it prints in your local browser"
            )
        })
    }
}

// ---------------------------------------------------------------------------
// Provider presets: the real endpoints and the smallest scopes that work.

pub const GOOGLE_AUTH_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const GOOGLE_REVOKE_URL: &str = "https://oauth2.googleapis.com/revoke";
/// Gmail has one scope for IMAP, POP3 and SMTP alike.
pub const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";

pub const MS_IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
pub const MS_POP_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All";
pub const MS_SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
pub const MS_APP_SCOPE: &str = "https://outlook.office365.com/.default";

// ---------------------------------------------------------------------------

impl Config {
    /// `$XDG_CONFIG_HOME/mailproxy/config.toml`, else `~/.config/mailproxy/config.toml`.
    pub fn default_path() -> PathBuf {
        xdg_dir("XDG_CONFIG_HOME", ".config")
            .join("mailproxy")
            .join("config.toml")
    }

    /// Reads, parses and checks the config file, and the key and CA files it
    /// names.
    /// The file must belong to this user (or root) and no other user may
    /// change it (it decides where passwords go); when it holds a secret, no
    /// other user may read it either.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (text, file) = files::read_config(path)?;
        let mut config = Config::parse(&text, path)?;
        files::check_secrets_private(path, file, &config)?;
        files::check_key_files(&config)?;
        files::check_database_ca(&config)?;
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        config.local_users.resolve(&passwd).map_err(|problem| ConfigError {
            path: path.to_owned(),
            line: None,
            key: Some("server.local_users".into()),
            message: problem.to_string(),
        })?;
        Ok(config)
    }

    /// Parses config text without touching the file system (`path` is for
    /// errors and relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse::parse(text, path)
    }

    /// The explicit entry of `login` only; logins use [`Config::lookup`].
    pub fn account(&self, login: &str) -> Option<&Arc<Account>> {
        self.accounts.get(&login.to_lowercase())
    }

    /// The account a login name selects: its own entry, else a mailbox of
    /// a domain entry when it is a valid address in that domain.
    pub fn lookup(&self, login: &str) -> Option<Arc<Account>> {
        match self.account(login) {
            Some(a) => Some(a.clone()),
            None => domain::mailbox(&self.domains, login),
        }
    }

    /// Every entry of the file: explicit accounts and domain entries.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.accounts.values().chain(self.domains.values())
    }

    pub fn listeners(&self) -> impl Iterator<Item = &Listener> {
        [self.imap.as_ref(), self.smtp.as_ref(), self.pop3.as_ref()]
            .into_iter()
            .flatten()
    }

    /// The keys holding a secret, e.g. `accounts."a@b".client_secret`: such
    /// a config must not be readable by other users.
    pub fn secret_keys(&self) -> Vec<String> {
        // Exhaustive patterns on purpose: a new field does not compile until
        // it is sorted into secret or not.
        let Config {
            path: _,
            state_dir: _,
            token_store: _,
            status_listen: _,
            on_reauth_needed: _,
            audit_log: _,
            ca_file: _,
            http_proxy,
            imap: _,
            smtp: _,
            pop3: _,
            limits: _,
            accounts,
            fleet,
            domains,
            local_users: _,
        } = self;
        let mut keys = fleet.secret_keys();
        // A proxy URL may carry the proxy's password.
        if http_proxy
            .as_ref()
            .and_then(|p| url::Url::parse(p.expose()).ok())
            .is_some_and(|u| u.password().is_some())
        {
            keys.push("server.http_proxy".to_string());
        }
        for a in accounts.values().chain(domains.values()) {
            let Account {
                name,
                username: _,
                auth,
                imap: _,
                smtp: _,
                pop3: _,
                ca_file: _,
                insecure_skip_verify: _,
                mechanism: _,
                domain_entry: _,
                token_from: _,
                max_upstream_sessions: _,
                graph: _,
            } = &**a;
            let AccountAuth::OAuth(o) = auth else { continue };
            let OAuthSettings {
                provider: _,
                client_id: _,
                client_secret,
                auth_url: _,
                token_url: _,
                device_url: _,
                revoke_url: _,
                redirect_uri: _,
                scopes: _,
                flow: _,
                // A path: the key itself is checked where it lives.
                client_certificate: _,
                client_key: _,
                service_account_key: _,
                on_demand: _,
                auth_params: _,
                graph_scopes: _,
            } = &**o;
            if client_secret.is_some() {
                keys.push(format!("accounts.\"{name}\".client_secret"));
            }
        }
        keys
    }
}

/// Relative paths in the config are relative to the config file.
fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// `$VAR`, else `~/FALLBACK` (the XDG base directories).
pub fn xdg_dir(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(fallback),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/mailproxy/config.toml"))
    }

    const EXAMPLE: &str = r#"
[server]
state_dir = "/var/lib/mailproxy"
[imap]
listen = "127.0.0.1:1143"
[accounts."alice@gmail.com"]
provider = "google"
client_id = "id"
client_secret = "secret"
[accounts."bob@contoso.com"]
provider = "microsoft"
tenant = "organizations"
client_id = "id"
[accounts."carol@example.org"]
provider = "custom"
auth_url = "https://id.example.org/authorize"
token_url = "https://id.example.org/token"
client_id = "x"
scopes = ["mail"]
imap = "imaps://mail.example.org:993"
ca_file = "/etc/ssl/extra-ca.pem"
[accounts."dave@legacy.example"]
provider = "password"
imap = "imaps://legacy.example:993"
"#;

    #[test]
    fn example_shape_works() {
        let c = parse(EXAMPLE).unwrap();
        let alice = c.account("Alice@Gmail.com").unwrap();
        assert_eq!(alice.imap.as_ref().unwrap().to_string(), "imaps://imap.gmail.com:993");
        let o = alice.oauth().unwrap();
        assert_eq!(o.scopes, vec![GOOGLE_MAIL_SCOPE]);
        assert!(o.auth_params.contains(&("access_type".into(), "offline".into())));
        let bob = c.account("bob@contoso.com").unwrap().oauth().unwrap().clone();
        assert_eq!(bob.scopes, vec![MS_IMAP_SCOPE, "offline_access"]);
        assert!(bob
            .token_url
            .starts_with("https://login.microsoftonline.com/organizations/"));
        assert_eq!(bob.revoke_url, None);
        assert!(matches!(
            c.account("dave@legacy.example").unwrap().auth,
            AccountAuth::Password
        ));
        assert_eq!(c.imap.unwrap().listen.port(), 1143);
    }

    #[test]
    fn refuses_config_files_others_can_change_or_read_secrets_from() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("c.toml");
        std::fs::write(&p, EXAMPLE).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains(&format!("chmod 600 {}", p.display())) && e.contains("client_secret"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        Config::load(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o620)).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("change") && e.contains(&format!("chmod 600 {}", p.display())),
            "{e}"
        );
        // Without secrets, a world-readable config is fine.
        std::fs::write(&p, "[imap]\nlisten = \"127.0.0.1:1143\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config::load(&p).unwrap();
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse("[imap]\nlisten = \"127.0.0.1:1143\"\nlistne = 1\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/mailproxy/config.toml:3"), "{s}");
        assert!(s.contains("listne"), "{s}");
    }

    #[test]
    fn remote_plaintext_refused_unless_allowed() {
        let t = "[accounts.\"x@y\"]\nprovider = \"password\"\nimap = \"imap://mail.example.org:143\"\n";
        let e = parse(t).unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().contains("accounts.\"x@y\".imap"), "{e}");
        assert!(e.message.contains("allow_plaintext"));
        parse(&format!("{t}allow_plaintext = true\n")).unwrap();
        parse("[accounts.\"x@y\"]\nprovider = \"password\"\nimap = \"imap://127.0.0.1:143\"\n").unwrap();
    }

    #[test]
    fn missing_client_id_is_named() {
        let e = parse("[accounts.\"a@gmail.com\"]\nprovider = \"google\"\n").unwrap_err();
        assert!(e.to_string().contains("client_id"), "{e}");
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn remote_listener_without_tls_refused() {
        let e = parse("[imap]\nlisten = \"0.0.0.0:1143\"\n").unwrap_err();
        assert!(e.message.contains("allow_insecure_remote"), "{e}");
        parse("[imap]\nlisten = \"0.0.0.0:1143\"\nallow_insecure_remote = true\n").unwrap();
    }

    #[test]
    fn bad_provider_value_named() {
        let e = parse("[accounts.\"a@b\"]\nprovider = \"yahoo\"\nimap = \"imaps://x\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(
            e.message.contains("yahoo") || e.message.contains("unknown variant"),
            "{e}"
        );
    }

    #[test]
    fn http_token_url_only_on_loopback() {
        let base = "[accounts.\"a@b\"]\nprovider = \"custom\"\nclient_id = \"c\"\nscopes = [\"m\"]\nimap = \"imaps://x\"\nauth_url = \"http://127.0.0.1:9/a\"\n";
        parse(&format!("{base}token_url = \"http://127.0.0.1:9/t\"\n")).unwrap();
        let e = parse(&format!("{base}token_url = \"http://id.example.org/t\"\n")).unwrap_err();
        assert!(e.to_string().contains("token_url"), "{e}");
    }

    /// Every TOML spelling of a client secret counts, not only a line that
    /// starts with `client_secret`.
    #[test]
    fn secrets_found_in_any_spelling() {
        use std::os::unix::fs::PermissionsExt;
        let head = "[imap]\nlisten = \"127.0.0.1:1143\"\n";
        let acct = "provider = \"google\"\nclient_id = \"id\"\n";
        let spellings = [
            // Quoted keys.
            format!("{head}[accounts.\"a@b\"]\n{acct}\"client_secret\" = \"x\"\n"),
            format!("{head}[accounts.\"a@b\"]\n{acct}'client_secret' = \"x\"\n"),
            format!("{head}[accounts.\"a@b\"]\n{acct}\"client\\u005fsecret\" = \"x\"\n"),
            // Inline tables.
            format!("accounts = {{ \"a@b\" = {{ provider = \"google\", client_id = \"id\", client_secret = \"x\" }} }}\n{head}"),
            format!("{head}[accounts]\n\"a@b\" = {{ provider = \"google\", client_id = \"id\", \"client_secret\" = \"x\" }}\n"),
            // Dotted keys, at the top level and in a table.
            format!("accounts.\"a@b\".provider = \"google\"\naccounts.\"a@b\".client_id = \"id\"\naccounts.\"a@b\".client_secret = \"x\"\n{head}"),
            format!("{head}[accounts]\n\"a@b\".provider = \"google\"\n\"a@b\".client_id = \"id\"\n\"a@b\" . client_secret = \"x\"\n"),
            // Multi-line value.
            format!("{head}[accounts.\"a@b\"]\n{acct}client_secret = '''\nx'''\n"),
        ];
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("c.toml");
        for text in &spellings {
            let c = parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(c.secret_keys(), ["accounts.\"a@b\".client_secret"], "{text}");
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{text}\n{e}");
            assert!(!e.contains("\"x\""), "the error shows no secret: {e}");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            Config::load(&p).unwrap();
        }
        // The word alone is no secret.
        let c = parse(&format!("{head}[server]\non_reauth_needed = \"echo client_secret\"\n")).unwrap();
        assert!(c.secret_keys().is_empty());
    }

    #[test]
    fn google_device_flow_refused_with_the_alternative() {
        let e = parse("[accounts.\"a@gmail.com\"]\nprovider = \"google\"\nclient_id = \"id\"\nflow = \"device\"\n")
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"a@gmail.com\".flow"));
        assert_eq!(e.line, Some(1));
        for part in [
            "Google's device flow does not accept the Gmail scope (https://mail.google.com/)",
            "ssh -L 8765:127.0.0.1:8765 HOST",
            "redirect_uri = \"http://127.0.0.1:8765/\"",
            "mailproxy login a@gmail.com --no-browser",
        ] {
            assert!(e.message.contains(part), "{part}: {e}");
        }
        // An explicit device_url does not make it work either.
        parse(
            "[accounts.\"a@gmail.com\"]\nprovider = \"google\"\nclient_id = \"id\"\nflow = \"device\"\n\
             device_url = \"https://oauth2.googleapis.com/device/code\"\n",
        )
        .unwrap_err();
        // The same sentence for `mailproxy login --device` on a browser-flow account.
        let c = parse(EXAMPLE).unwrap();
        let google = c.account("alice@gmail.com").unwrap().oauth().unwrap();
        let why = google.device_flow_refusal("alice@gmail.com").unwrap();
        assert!(why.contains("mailproxy login alice@gmail.com --no-browser"), "{why}");
        assert_eq!(google.device_url, None);
        let ms = c.account("bob@contoso.com").unwrap().oauth().unwrap();
        assert_eq!(ms.device_flow_refusal("bob@contoso.com"), None);
        // Microsoft and custom providers keep the device flow.
        parse("[accounts.\"b@contoso.com\"]\nprovider = \"microsoft\"\nclient_id = \"id\"\nflow = \"device\"\n")
            .unwrap();
        parse(
            "[accounts.\"c@example.org\"]\nprovider = \"custom\"\nclient_id = \"id\"\nflow = \"device\"\n\
             auth_url = \"https://id.example.org/a\"\ntoken_url = \"https://id.example.org/t\"\n\
             device_url = \"https://id.example.org/d\"\nscopes = [\"mail\"]\nimap = \"imaps://mail.example.org\"\n",
        )
        .unwrap();
    }

    #[test]
    fn service_account_flow_needs_its_key_and_no_client_id() {
        let base = "[accounts.\"a@example.com\"]\nprovider = \"google\"\nflow = \"service_account\"\n";
        let c = parse(&format!("{base}service_account_key = \"sa.json\"\n")).unwrap();
        let o = c.account("a@example.com").unwrap().oauth().unwrap().clone();
        assert_eq!(
            o.service_account_key.as_deref(),
            Some(Path::new("/etc/mailproxy/sa.json"))
        );
        assert_eq!(o.scopes, vec![GOOGLE_MAIL_SCOPE]);
        assert!(o.flow.app_only());
        let e = parse(base).unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("accounts.\"a@example.com\".service_account_key"),
            "{e}"
        );
        let e = parse("[accounts.\"a@b\"]\nprovider = \"google\"\nclient_id = \"x\"\nservice_account_key = \"k\"\n")
            .unwrap_err();
        assert!(e.message.contains("only applies to flow = \"service_account\""), "{e}");
        let e = parse(
            "[accounts.\"a@b\"]\nprovider = \"microsoft\"\nflow = \"service_account\"\nservice_account_key = \"k\"\n",
        )
        .unwrap_err();
        assert!(e.message.contains("client_credentials"), "{e}");
    }

    #[test]
    fn token_from_shares_the_owners_grant() {
        let c = parse(&format!(
            "{EXAMPLE}[accounts.\"shared@contoso.com\"]\ntoken_from = \"Bob@contoso.com\"\n"
        ))
        .unwrap();
        let shared = c.account("shared@contoso.com").unwrap();
        let bob = c.account("bob@contoso.com").unwrap();
        assert_eq!(shared.token_from.as_deref(), Some("bob@contoso.com"));
        assert_eq!(shared.username, "shared@contoso.com");
        assert_eq!(shared.auth, bob.auth);
        assert_eq!(shared.imap, bob.imap);
        for (extra, key, says) in [
            ("token_from = \"nobody@x\"\n", "token_from", "not an account"),
            (
                "token_from = \"dave@legacy.example\"\n",
                "token_from",
                "no grant of its own",
            ),
            (
                "token_from = \"bob@contoso.com\"\nclient_id = \"x\"\n",
                "client_id",
                "grant and app registration",
            ),
            (
                "token_from = \"bob@contoso.com\"\nprovider = \"microsoft\"\n",
                "provider",
                "leave provider out",
            ),
        ] {
            let e = parse(&format!("{EXAMPLE}[accounts.\"s@contoso.com\"]\n{extra}")).unwrap_err();
            assert_eq!(
                e.key.as_deref(),
                Some(&*format!("accounts.\"s@contoso.com\".{key}")),
                "{e}"
            );
            assert!(e.message.contains(says), "{e}");
        }
        let e = parse("[accounts.\"a@b\"]\nimap = \"imaps://x\"\n").unwrap_err();
        assert!(e.message.contains("missing provider"), "{e}");
        let e = parse(&format!(
            "{EXAMPLE}[accounts.\"@contoso.com\"]\nprovider = \"microsoft\"\nclient_id = \"id\"\n\
             [accounts.\"s@contoso.com\"]\ntoken_from = \"@contoso.com\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("no grant of its own"), "{e}");
    }

    #[test]
    fn http_proxy_is_checked_and_its_password_is_a_secret() {
        let c = parse("[server]\nhttp_proxy = \"http://proxy.example:3128\"\n").unwrap();
        assert_eq!(c.http_proxy.as_ref().unwrap().expose(), "http://proxy.example:3128");
        assert!(c.secret_keys().is_empty());
        let c = parse("[server]\nhttp_proxy = \"http://u:pw@proxy.example:3128\"\n").unwrap();
        assert_eq!(c.secret_keys(), ["server.http_proxy"]);
        for bad in ["proxy.example:3128", "ftp://proxy.example", "http://"] {
            let e = parse(&format!("[server]\nhttp_proxy = \"{bad}\"\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("server.http_proxy"), "{bad}: {e}");
            assert_eq!(e.line, Some(2), "{e}");
        }
        let e = parse("[server]\nhttp_proxy = \"ftp://u:hunter2@p\"\n").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn limits_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.limits.max_connections_per_ip, 256);
        assert_eq!(c.limits.max_connections, 4096);
        let c = parse("[limits]\nmax_connections_per_ip = 5000\n").unwrap();
        assert_eq!(c.limits.max_connections_per_ip, 5000);
    }

    #[test]
    fn token_store_is_a_lowercase_serde_enum() {
        assert_eq!(serde_json::to_string(&TokenStore::Keyring).unwrap(), "\"keyring\"");
        assert_eq!(serde_json::to_string(&TokenStore::File).unwrap(), "\"file\"");
        let back: Option<TokenStore> = serde_json::from_str("\"keyring\"").unwrap();
        assert_eq!(back, Some(TokenStore::Keyring));
        assert!(serde_json::from_str::<TokenStore>("\"Keyring\"").is_err());
        assert_eq!(
            parse("[server]\ntoken_store = \"keyring\"\n").unwrap().token_store,
            TokenStore::Keyring
        );
        assert_eq!(TokenStore::Keyring.to_string(), "keyring");
    }

    #[test]
    fn account_level_errors_name_the_account() {
        let e = parse(
            "[accounts.\"a@b\"]\nprovider = \"password\"\nimap = \"imaps://x\"\n\
             [accounts.\"A@B\"]\nprovider = \"password\"\nimap = \"imaps://x\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"a@b\""), "{e}");
        assert!(e.message.contains("upper/lower case"), "{e}");
    }
}

//! The configuration file: TOML, strict (`deny_unknown_fields`), and every
//! error names the file, the line and the key so a person can fix it at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::endpoint::{is_loopback_host, Endpoint, Protocol, Security};
use crate::secret::Secret;

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

// ---------------------------------------------------------------------------
// What the file says (raw), then what mailproxy uses (resolved).

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    imap: Option<RawListener>,
    smtp: Option<RawListener>,
    pop3: Option<RawListener>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    accounts: BTreeMap<String, Spanned<RawAccount>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    state_dir: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    token_store: TokenStore,
    status_listen: Option<Spanned<String>>,
    on_reauth_needed: Option<String>,
    audit_log: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    listen: Spanned<String>,
    fallback: Option<Spanned<String>>,
    #[serde(default)]
    tls: LocalTls,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    allow_insecure_remote: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    preauth_timeout: Option<u64>,
    connect_timeout: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_line: Option<usize>,
    login_failure_delay_max: Option<f64>,
    provider_timeout: Option<u64>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ProviderName {
    Google,
    Microsoft,
    Custom,
    Password,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    provider: ProviderName,
    tenant: Option<String>,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    auth_url: Option<String>,
    token_url: Option<String>,
    device_url: Option<String>,
    revoke_url: Option<String>,
    redirect_uri: Option<String>,
    scopes: Option<Vec<String>>,
    username: Option<String>,
    imap: Option<Spanned<String>>,
    smtp: Option<Spanned<String>>,
    pop3: Option<Spanned<String>>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext: bool,
    #[serde(default)]
    insecure_skip_verify: bool,
    #[serde(default)]
    mechanism: Mechanism,
    #[serde(default)]
    flow: Flow,
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default = "yes")]
    on_demand: bool,
}

fn yes() -> bool {
    true
}

/// Where refresh tokens are kept.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
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
}

/// How an OAuth account is authorised.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// Browser sign-in with PKCE and a loopback redirect.
    #[default]
    AuthorizationCode,
    /// RFC 8628: a code typed in on another device (headless machines).
    Device,
    /// App-only access (Microsoft 365): no user, no refresh token.
    ClientCredentials,
}

impl Flow {
    pub fn name(self) -> &'static str {
        match self {
            Flow::AuthorizationCode => "browser",
            Flow::Device => "device",
            Flow::ClientCredentials => "client_credentials",
        }
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
    pub imap: Option<Listener>,
    pub smtp: Option<Listener>,
    pub pop3: Option<Listener>,
    pub limits: Limits,
    /// Keyed by the lower-cased login name.
    pub accounts: BTreeMap<String, Arc<Account>>,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub protocol: Protocol,
    pub listen: SocketAddr,
    pub fallback: Option<Endpoint>,
    pub tls: LocalTls,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            preauth_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(20),
            max_connections: 4096,
            max_connections_per_ip: 4096,
            max_line: 8192,
            login_failure_delay_max: Duration::from_secs(15),
            provider_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, PartialEq)]
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
}

impl Account {
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

#[derive(Debug, PartialEq)]
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
    /// Start an authorisation when a client logs in to an account without a
    /// usable token.
    pub on_demand: bool,
    /// Extra parameters on the authorisation URL (Google needs
    /// `access_type=offline` and `prompt=consent` to hand out a refresh token).
    pub auth_params: Vec<(String, String)>,
}

// ---------------------------------------------------------------------------
// Provider presets: the real endpoints and the smallest scopes that work.

pub const GOOGLE_AUTH_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const GOOGLE_DEVICE_URL: &str = "https://oauth2.googleapis.com/device/code";
pub const GOOGLE_REVOKE_URL: &str = "https://oauth2.googleapis.com/revoke";
/// Gmail has one scope for IMAP, POP3 and SMTP alike.
pub const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";

pub const MS_IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
pub const MS_POP_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All";
pub const MS_SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
pub const MS_APP_SCOPE: &str = "https://outlook.office365.com/.default";

fn default_server(provider: ProviderName, p: Protocol) -> Option<&'static str> {
    match (provider, p) {
        (ProviderName::Google, Protocol::Imap) => Some("imaps://imap.gmail.com:993"),
        (ProviderName::Google, Protocol::Smtp) => Some("smtps://smtp.gmail.com:465"),
        (ProviderName::Google, Protocol::Pop3) => Some("pop3s://pop.gmail.com:995"),
        (ProviderName::Microsoft, Protocol::Imap) => Some("imaps://outlook.office365.com:993"),
        (ProviderName::Microsoft, Protocol::Smtp) => Some("smtp+starttls://smtp.office365.com:587"),
        (ProviderName::Microsoft, Protocol::Pop3) => Some("pop3s://outlook.office365.com:995"),
        _ => None,
    }
}

// ---------------------------------------------------------------------------

impl Config {
    /// `$XDG_CONFIG_HOME/mailproxy/config.toml`, else `~/.config/mailproxy/config.toml`.
    pub fn default_path() -> PathBuf {
        xdg_dir("XDG_CONFIG_HOME", ".config")
            .join("mailproxy")
            .join("config.toml")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        check_mode(path, &text)?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, key: Option<String>, message: String| ConfigError {
            path: path.to_owned(),
            line: span.map(|s| line_of(text, s.start)),
            key,
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message names the key ("unknown field `x`, expected ...");
            // the span gives the line.
            err(e.span(), None, e.message().trim().to_string())
        })?;

        let state_dir = raw
            .server
            .state_dir
            .map(|p| resolve(path, &p))
            .unwrap_or_else(|| xdg_dir("XDG_STATE_HOME", ".local/state").join("mailproxy"));

        let server_ca = raw.server.ca_file.as_ref().map(|p| resolve(path, p));
        let status_listen = match &raw.server.status_listen {
            None => None,
            Some(s) => Some(s.get_ref().parse::<SocketAddr>().map_err(|_| {
                err(
                    Some(s.span()),
                    Some("server.status_listen".into()),
                    format!("`{}` is not an address like 127.0.0.1:8025", s.get_ref()),
                )
            })?),
        };
        if let Some(a) = status_listen {
            if !a.ip().is_loopback() {
                return Err(err(
                    raw.server.status_listen.as_ref().map(|s| s.span()),
                    Some("server.status_listen".into()),
                    "the status page shows authorisation links: it listens on loopback only".into(),
                ));
            }
        }
        let audit_log = raw
            .server
            .audit_log
            .as_ref()
            .map(|p| resolve(path, p))
            .unwrap_or_else(|| state_dir.join("audit.log"));
        let mut listeners = Vec::new();
        for (protocol, l) in [
            (Protocol::Imap, raw.imap),
            (Protocol::Smtp, raw.smtp),
            (Protocol::Pop3, raw.pop3),
        ] {
            let Some(l) = l else {
                listeners.push(None);
                continue;
            };
            let section = protocol.name();
            let listen: SocketAddr = l.listen.get_ref().parse().map_err(|_| {
                err(
                    Some(l.listen.span()),
                    Some(format!("{section}.listen")),
                    format!("`{}` is not an address like 127.0.0.1:1143", l.listen.get_ref()),
                )
            })?;
            let fallback = match &l.fallback {
                None => None,
                Some(f) => Some(
                    Endpoint::parse(f.get_ref(), protocol)
                        .map_err(|m| err(Some(f.span()), Some(format!("{section}.fallback")), m))?,
                ),
            };
            if let Some(f) = &fallback {
                if f.security == Security::Plain && !f.is_loopback() {
                    return Err(err(
                        l.fallback.as_ref().map(|f| f.span()),
                        Some(format!("{section}.fallback")),
                        format!("`{f}` would send passwords unencrypted to a remote host; use {section}s:// or {section}+starttls://"),
                    ));
                }
            }
            if l.tls == LocalTls::None && !listen.ip().is_loopback() && !l.allow_insecure_remote {
                return Err(err(
                    Some(l.listen.span()),
                    Some(format!("{section}.listen")),
                    format!(
                        "{listen} is reachable from other machines but the listener has no TLS, so passwords would cross the network in the clear; \
                         set tls = \"implicit\" or \"starttls\", or allow_insecure_remote = true if you really mean it"
                    ),
                ));
            }
            if l.cert.is_some() != l.key.is_some() {
                return Err(err(
                    Some(l.listen.span()),
                    Some(format!("{section}.cert")),
                    "cert and key must be given together".into(),
                ));
            }
            listeners.push(Some(Listener {
                protocol,
                listen,
                fallback,
                tls: l.tls,
                cert: l.cert.map(|p| resolve(path, &p)),
                key: l.key.map(|p| resolve(path, &p)),
            }));
        }
        let mut listeners = listeners.into_iter();
        let (imap, smtp, pop3) = (
            listeners.next().flatten(),
            listeners.next().flatten(),
            listeners.next().flatten(),
        );

        let d = Limits::default();
        let rl = raw.limits;
        let limits = Limits {
            preauth_timeout: rl.preauth_timeout.map(Duration::from_secs).unwrap_or(d.preauth_timeout),
            connect_timeout: rl.connect_timeout.map(Duration::from_secs).unwrap_or(d.connect_timeout),
            max_connections: rl.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: rl.max_connections_per_ip.unwrap_or(d.max_connections_per_ip),
            max_line: rl.max_line.unwrap_or(d.max_line).clamp(1024, 1 << 20),
            login_failure_delay_max: rl
                .login_failure_delay_max
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(3600.0)))
                .unwrap_or(d.login_failure_delay_max),
            provider_timeout: rl
                .provider_timeout
                .map(|s| Duration::from_secs(s.max(1)))
                .unwrap_or(d.provider_timeout),
        };

        let mut accounts = BTreeMap::new();
        for (name, acct) in raw.accounts {
            let span = acct.span();
            let a = acct.into_inner();
            let key = |k: &str| Some(format!("accounts.\"{name}\".{k}"));
            let e = |k: &str, m: String| err(Some(span.clone()), key(k), m);
            if name.trim().is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(e(
                    "",
                    "an account name must be a login name without spaces or control characters".into(),
                ));
            }

            let mut endpoints = Vec::new();
            for (p, raw_url) in [
                (Protocol::Imap, &a.imap),
                (Protocol::Smtp, &a.smtp),
                (Protocol::Pop3, &a.pop3),
            ] {
                let url = match raw_url {
                    Some(u) => {
                        Some(Endpoint::parse(u.get_ref(), p).map_err(|m| err(Some(u.span()), key(p.name()), m))?)
                    }
                    None => {
                        default_server(a.provider, p).map(|u| Endpoint::parse(u, p).expect("preset URLs are valid"))
                    }
                };
                if let Some(ep) = &url {
                    if ep.security == Security::Plain && !is_loopback_host(&ep.host) && !a.allow_plaintext {
                        return Err(err(
                            raw_url.as_ref().map(|u| u.span()),
                            key(p.name()),
                            format!(
                                "`{ep}` is plaintext to a remote host: credentials would cross the network unencrypted; \
                                 use {0}s:// or {0}+starttls://, or set allow_plaintext = true for this account",
                                p.name()
                            ),
                        ));
                    }
                }
                endpoints.push(url);
            }
            if endpoints.iter().all(Option::is_none) {
                return Err(e(
                    "imap",
                    "the account names no server: set imap = \"imaps://host:993\" (or smtp, pop3)".into(),
                ));
            }

            let oauth_only = [
                ("tenant", a.tenant.is_some()),
                ("client_id", a.client_id.is_some()),
                ("client_secret", a.client_secret.is_some()),
                ("auth_url", a.auth_url.is_some()),
                ("token_url", a.token_url.is_some()),
                ("device_url", a.device_url.is_some()),
                ("revoke_url", a.revoke_url.is_some()),
                ("redirect_uri", a.redirect_uri.is_some()),
                ("scopes", a.scopes.is_some()),
                ("client_certificate", a.client_certificate.is_some()),
                ("client_key", a.client_key.is_some()),
                ("flow", a.flow != Flow::AuthorizationCode),
            ];
            let auth = match a.provider {
                ProviderName::Password => {
                    if let Some((k, _)) = oauth_only.iter().find(|(_, set)| *set) {
                        return Err(e(k, "provider = \"password\" passes the client's own password through; OAuth settings do not apply".into()));
                    }
                    AccountAuth::Password
                }
                p => {
                    let client_id = a.client_id.clone().filter(|c| !c.is_empty()).ok_or_else(|| {
                        e(
                            "client_id",
                            "an OAuth account needs the client_id of its app registration".into(),
                        )
                    })?;
                    if a.tenant.is_some() && p != ProviderName::Microsoft {
                        return Err(e("tenant", "tenant only applies to provider = \"microsoft\"".into()));
                    }
                    let mut auth_params = Vec::new();
                    let (auth_url, token_url, device_url, revoke_url, scopes, kind) = match p {
                        ProviderName::Google => {
                            auth_params.push(("access_type".into(), "offline".into()));
                            auth_params.push(("prompt".into(), "consent".into()));
                            (
                                GOOGLE_AUTH_URL.to_string(),
                                GOOGLE_TOKEN_URL.to_string(),
                                Some(GOOGLE_DEVICE_URL.to_string()),
                                Some(GOOGLE_REVOKE_URL.to_string()),
                                vec![GOOGLE_MAIL_SCOPE.to_string()],
                                ProviderKind::Google,
                            )
                        }
                        ProviderName::Microsoft => {
                            let tenant = a.tenant.clone().unwrap_or_else(|| "common".into());
                            if tenant.is_empty()
                                || !tenant.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
                            {
                                return Err(e("tenant", format!("`{tenant}` is not a tenant: use common, organizations, consumers, a tenant ID or a domain")));
                            }
                            let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
                            // Only the scopes of the protocols this account can be used for.
                            let mut scopes = Vec::new();
                            if endpoints[0].is_some() && imap.is_some() {
                                scopes.push(MS_IMAP_SCOPE.to_string());
                            }
                            if endpoints[1].is_some() && smtp.is_some() {
                                scopes.push(MS_SMTP_SCOPE.to_string());
                            }
                            if endpoints[2].is_some() && pop3.is_some() {
                                scopes.push(MS_POP_SCOPE.to_string());
                            }
                            if scopes.is_empty() {
                                scopes.push(MS_IMAP_SCOPE.to_string());
                            }
                            if a.flow == Flow::ClientCredentials {
                                // App-only access takes the resource's .default scope.
                                scopes = vec![MS_APP_SCOPE.to_string()];
                            } else {
                                scopes.push("offline_access".into());
                            }
                            (
                                format!("{base}/authorize"),
                                format!("{base}/token"),
                                Some(format!("{base}/devicecode")),
                                None,
                                scopes,
                                ProviderKind::Microsoft,
                            )
                        }
                        _ => {
                            let auth_url = a
                                .auth_url
                                .clone()
                                .ok_or_else(|| e("auth_url", "a custom provider needs auth_url".into()))?;
                            let token_url = a
                                .token_url
                                .clone()
                                .ok_or_else(|| e("token_url", "a custom provider needs token_url".into()))?;
                            let scopes = a.scopes.clone().ok_or_else(|| {
                                e(
                                    "scopes",
                                    "a custom provider needs scopes, e.g. scopes = [\"mail\"]".into(),
                                )
                            })?;
                            (
                                auth_url,
                                token_url,
                                a.device_url.clone(),
                                a.revoke_url.clone(),
                                scopes,
                                ProviderKind::Custom,
                            )
                        }
                    };
                    let o = OAuthSettings {
                        provider: kind,
                        client_id,
                        client_secret: a.client_secret.clone(),
                        auth_url: a.auth_url.clone().unwrap_or(auth_url),
                        token_url: a.token_url.clone().unwrap_or(token_url),
                        device_url: a.device_url.clone().or(device_url),
                        revoke_url: a.revoke_url.clone().or(revoke_url),
                        redirect_uri: a.redirect_uri.clone(),
                        scopes: a.scopes.clone().unwrap_or(scopes),
                        flow: a.flow,
                        client_certificate: a.client_certificate.as_ref().map(|p| resolve(path, p)),
                        client_key: a.client_key.as_ref().map(|p| resolve(path, p)),
                        on_demand: a.on_demand,
                        auth_params,
                    };
                    match o.flow {
                        Flow::Device if o.device_url.is_none() => {
                            return Err(e("device_url", "flow = \"device\" needs device_url".into()));
                        }
                        Flow::ClientCredentials => {
                            if o.client_certificate.is_some() != o.client_key.is_some() {
                                return Err(e("client_key", "client_certificate and client_key go together".into()));
                            }
                            if o.client_secret.is_none() && o.client_certificate.is_none() {
                                return Err(e(
                                    "client_secret",
                                    "flow = \"client_credentials\" needs client_secret, or client_certificate and client_key".into(),
                                ));
                            }
                        }
                        _ => {}
                    }
                    for (k, u) in [
                        ("auth_url", Some(&o.auth_url)),
                        ("token_url", Some(&o.token_url)),
                        ("device_url", o.device_url.as_ref()),
                        ("revoke_url", o.revoke_url.as_ref()),
                        ("redirect_uri", o.redirect_uri.as_ref()),
                    ] {
                        if let Some(u) = u {
                            check_http_url(u).map_err(|m| e(k, m))?;
                        }
                    }
                    AccountAuth::OAuth(Box::new(o))
                }
            };
            let mut endpoints = endpoints.into_iter();
            let account = Account {
                username: a.username.clone().unwrap_or_else(|| name.clone()),
                name: name.clone(),
                auth,
                imap: endpoints.next().flatten(),
                smtp: endpoints.next().flatten(),
                pop3: endpoints.next().flatten(),
                ca_file: a.ca_file.map(|p| resolve(path, &p)).or_else(|| server_ca.clone()),
                mechanism: a.mechanism,
                insecure_skip_verify: a.insecure_skip_verify,
            };
            if accounts.insert(name.to_lowercase(), Arc::new(account)).is_some() {
                return Err(e(
                    "",
                    "two accounts differ only in upper/lower case; login names are matched without case".into(),
                ));
            }
        }

        Ok(Config {
            path: path.to_owned(),
            state_dir,
            token_store: raw.server.token_store,
            status_listen,
            on_reauth_needed: raw.server.on_reauth_needed.clone(),
            audit_log,
            ca_file: server_ca,
            imap,
            smtp,
            pop3,
            limits,
            accounts,
        })
    }

    pub fn account(&self, login: &str) -> Option<&Arc<Account>> {
        self.accounts.get(&login.to_lowercase())
    }

    pub fn listeners(&self) -> impl Iterator<Item = &Listener> {
        [self.imap.as_ref(), self.smtp.as_ref(), self.pop3.as_ref()]
            .into_iter()
            .flatten()
    }
}

/// Other users must not be able to change the config (it names the servers
/// passwords go to), nor read it when it holds a client secret.
fn check_mode(path: &Path, text: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    let refuse = |message: String| {
        Err(ConfigError {
            path: path.to_owned(),
            line: None,
            key: None,
            message,
        })
    };
    if mode & 0o022 != 0 {
        return refuse(format!(
            "other users can change this file (mode {mode:o}); run: chmod go-w {}",
            path.display()
        ));
    }
    let has_secret = text.lines().any(|l| l.trim_start().starts_with("client_secret"));
    if has_secret && mode & 0o044 != 0 {
        return refuse(format!(
            "it holds a client_secret and other users can read it (mode {mode:o}); run: chmod 600 {}",
            path.display()
        ));
    }
    Ok(())
}

/// Endpoints must be https, except on loopback (a local identity provider or a test).
fn check_http_url(u: &str) -> Result<(), String> {
    let url = url::Url::parse(u).map_err(|e| format!("`{u}` is not a URL: {e}"))?;
    let local = url.host_str().map(is_loopback_host).unwrap_or(false);
    match url.scheme() {
        "https" => Ok(()),
        "http" if local => Ok(()),
        s => Err(format!("`{u}` must be an https:// URL (got {s}://)")),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Relative paths in the config are relative to the config file.
fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn xdg_dir(var: &str, fallback: &str) -> PathBuf {
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
        assert!(e.contains("chmod 600") && e.contains("client_secret"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        Config::load(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("chmod go-w"));
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
}

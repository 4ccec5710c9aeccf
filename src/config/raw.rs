//! What the file says, before any checking: serde shapes of each section.
//! `deny_unknown_fields` everywhere, so a typo is an error with a line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{Flow, LocalTls, Mechanism, TokenStore};
use crate::secret::Secret;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub imap: Option<RawListener>,
    pub smtp: Option<RawListener>,
    pub pop3: Option<RawListener>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub accounts: BTreeMap<String, Spanned<RawAccount>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub state_dir: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub token_store: TokenStore,
    pub status_listen: Option<Spanned<String>>,
    pub on_reauth_needed: Option<String>,
    pub audit_log: Option<PathBuf>,
    /// `token_store = "postgres"`: where the database is (may hold a password).
    pub database_url: Option<Spanned<Secret>>,
    pub store_key_file: Option<PathBuf>,
    pub metrics_listen: Option<Spanned<String>>,
    pub http_proxy: Option<Spanned<String>>,
    /// `"anyone"`, `"owner"`, or a list of user names and uids.
    pub local_users: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub listen: Spanned<String>,
    pub fallback: Option<Spanned<String>>,
    #[serde(default)]
    pub tls: LocalTls,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub allow_insecure_remote: bool,
    #[serde(default)]
    pub proxy_protocol: bool,
    pub proxy_trusted: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub preauth_timeout: Option<u64>,
    pub connect_timeout: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub max_line: Option<usize>,
    pub login_failure_delay_max: Option<f64>,
    pub provider_timeout: Option<u64>,
    pub max_send_size: Option<u64>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum ProviderName {
    Google,
    Microsoft,
    Custom,
    Password,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    /// Required, except with `token_from` (the grant's account decides).
    pub provider: Option<ProviderName>,
    /// Use the grant of this other account (shared and delegated mailboxes).
    pub token_from: Option<String>,
    pub tenant: Option<String>,
    pub cloud: Option<super::cloud::Cloud>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    pub device_url: Option<String>,
    pub revoke_url: Option<String>,
    pub redirect_uri: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// Scopes of Graph tokens (`provider = "custom"` with `smtp = "graph+…"`).
    pub graph_scopes: Option<Vec<String>>,
    pub username: Option<String>,
    pub imap: Option<Spanned<String>>,
    pub smtp: Option<Spanned<String>>,
    pub pop3: Option<Spanned<String>>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_plaintext: bool,
    #[serde(default)]
    pub insecure_skip_verify: bool,
    #[serde(default)]
    pub mechanism: Mechanism,
    #[serde(default)]
    pub flow: Flow,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub service_account_key: Option<PathBuf>,
    #[serde(default = "yes")]
    pub on_demand: bool,
    /// Sessions at once per protocol; 0 = unlimited, absent = the preset's.
    pub max_upstream_sessions: Option<Spanned<i64>>,
}

fn yes() -> bool {
    true
}

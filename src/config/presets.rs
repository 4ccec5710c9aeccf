//! An OAuth account's settings: the provider presets (Google, Microsoft
//! with its national clouds, custom), the account's overrides, what each
//! flow needs, and the servers a preset implies.

use super::raw::{ProviderName, RawAccount};
use super::source::{AccountContext, At};
use super::*;
use crate::endpoint::{is_loopback_host, Protocol};

/// Endpoints and scopes a provider preset supplies; the account may
/// override each of them.
struct Preset {
    kind: ProviderKind,
    auth_url: String,
    token_url: String,
    device_url: Option<String>,
    revoke_url: Option<String>,
    scopes: Vec<String>,
    auth_params: Vec<(String, String)>,
}

/// An OAuth account's settings: the preset, the account's overrides, then
/// what each flow needs.
pub(super) fn oauth(
    at: &At,
    a: &RawAccount,
    provider: ProviderName,
    has_server: [bool; 3],
    ctx: &AccountContext,
) -> Result<OAuthSettings, ConfigError> {
    // A service account is named by its key file; it needs no client_id.
    let client_id = match a.client_id.clone().filter(|c| !c.is_empty()) {
        Some(id) => id,
        None if a.flow == Flow::ServiceAccount => String::new(),
        None => {
            return Err(at.err(
                "client_id",
                "an OAuth account needs the client_id of its app registration",
            ))
        }
    };
    if a.tenant.is_some() && provider != ProviderName::Microsoft {
        return Err(at.err("tenant", "tenant only applies to provider = \"microsoft\""));
    }
    if a.cloud.is_some() && provider != ProviderName::Microsoft {
        return Err(at.err("cloud", "cloud only applies to provider = \"microsoft\""));
    }
    let preset = match provider {
        ProviderName::Google => google_preset(),
        ProviderName::Microsoft => microsoft_preset(at, a, has_server, ctx)?,
        _ => custom_preset(at, a)?,
    };
    let o = OAuthSettings {
        provider: preset.kind,
        client_id,
        client_secret: a.client_secret.clone(),
        auth_url: a.auth_url.clone().unwrap_or(preset.auth_url),
        token_url: a.token_url.clone().unwrap_or(preset.token_url),
        device_url: a.device_url.clone().or(preset.device_url),
        revoke_url: a.revoke_url.clone().or(preset.revoke_url),
        redirect_uri: a.redirect_uri.clone(),
        scopes: a.scopes.clone().unwrap_or(preset.scopes),
        flow: a.flow,
        client_certificate: a.client_certificate.as_ref().map(|p| at.src.resolve(p)),
        client_key: a.client_key.as_ref().map(|p| at.src.resolve(p)),
        service_account_key: a.service_account_key.as_ref().map(|p| at.src.resolve(p)),
        on_demand: a.on_demand,
        auth_params: preset.auth_params,
        graph_scopes: graph_scopes(at, a, provider)?,
    };
    check_flow(at, &o)?;
    for (k, u) in [
        ("auth_url", Some(&o.auth_url)),
        ("token_url", Some(&o.token_url)),
        ("device_url", o.device_url.as_ref()),
        ("revoke_url", o.revoke_url.as_ref()),
        ("redirect_uri", o.redirect_uri.as_ref()),
    ] {
        if let Some(u) = u {
            check_http_url(u).map_err(|m| at.err(k, m.to_string()))?;
        }
    }
    Ok(o)
}

/// The scopes of Graph tokens: Microsoft's for the account's cloud when it
/// sends through Graph; a custom provider's own `graph_scopes`, if any.
fn graph_scopes(at: &At, a: &RawAccount, provider: ProviderName) -> Result<Option<Vec<String>>, ConfigError> {
    let graph = a.smtp.as_ref().is_some_and(|s| super::graph::is_graph(s.get_ref()));
    match provider {
        ProviderName::Custom => Ok(a.graph_scopes.clone()),
        _ if a.graph_scopes.is_some() => Err(at.err(
            "graph_scopes",
            "graph_scopes only applies to provider = \"custom\"; Microsoft accounts get Mail.Send of their cloud",
        )),
        ProviderName::Microsoft if graph => Ok(Some(super::graph::microsoft_scopes(
            a.cloud.unwrap_or_default(),
            a.flow == Flow::ClientCredentials,
        ))),
        _ => Ok(None),
    }
}

/// Google: one scope for all of Gmail, and `access_type=offline` plus
/// `prompt=consent`, without which no refresh token is handed out. No
/// device endpoint: Google's device flow does not accept the Gmail scope.
fn google_preset() -> Preset {
    Preset {
        kind: ProviderKind::Google,
        auth_url: GOOGLE_AUTH_URL.into(),
        token_url: GOOGLE_TOKEN_URL.into(),
        device_url: None,
        revoke_url: Some(GOOGLE_REVOKE_URL.into()),
        scopes: vec![GOOGLE_MAIL_SCOPE.into()],
        auth_params: vec![
            ("access_type".into(), "offline".into()),
            ("prompt".into(), "consent".into()),
        ],
    }
}

/// Microsoft: endpoints under the tenant, and only the scopes of protocols
/// that the account has a server for and mailproxy listens on (consent
/// screens ask for less, and tenants may allow only some).
fn microsoft_preset(
    at: &At,
    a: &RawAccount,
    has_server: [bool; 3],
    ctx: &AccountContext,
) -> Result<Preset, ConfigError> {
    let tenant = a.tenant.clone().unwrap_or_else(|| "common".into());
    if tenant.is_empty() || !tenant.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)) {
        return Err(at.err(
            "tenant",
            format!("`{tenant}` is not a tenant: use common, organizations, consumers, a tenant ID or a domain"),
        ));
    }
    let cloud = a.cloud.unwrap_or_default().endpoints();
    let base = format!("{}/{tenant}/oauth2/v2.0", cloud.login);
    let [imap_scope, ..] = cloud.scopes.clone();
    let mut scopes: Vec<String> = cloud
        .scopes
        .into_iter()
        .zip(has_server.into_iter().zip(ctx.listening))
        .filter(|(_, (server, listening))| *server && *listening)
        .map(|(s, _)| s)
        .collect();
    if scopes.is_empty() {
        scopes.push(imap_scope);
    }
    if a.flow == Flow::ClientCredentials {
        // App-only access takes the resource's .default scope.
        scopes = vec![cloud.app_scope];
    } else {
        scopes.push("offline_access".into());
    }
    Ok(Preset {
        kind: ProviderKind::Microsoft,
        auth_url: format!("{base}/authorize"),
        token_url: format!("{base}/token"),
        device_url: Some(format!("{base}/devicecode")),
        revoke_url: None,
        scopes,
        auth_params: Vec::new(),
    })
}

/// A custom provider has no preset: the endpoints and scopes are required.
fn custom_preset(at: &At, a: &RawAccount) -> Result<Preset, ConfigError> {
    let auth_url = a
        .auth_url
        .clone()
        .ok_or_else(|| at.err("auth_url", "a custom provider needs auth_url"))?;
    let token_url = a
        .token_url
        .clone()
        .ok_or_else(|| at.err("token_url", "a custom provider needs token_url"))?;
    let scopes = a
        .scopes
        .clone()
        .ok_or_else(|| at.err("scopes", "a custom provider needs scopes, e.g. scopes = [\"mail\"]"))?;
    Ok(Preset {
        kind: ProviderKind::Custom,
        auth_url,
        token_url,
        device_url: a.device_url.clone(),
        revoke_url: a.revoke_url.clone(),
        scopes,
        auth_params: Vec::new(),
    })
}

/// What each flow needs, refused at load rather than at the first login.
fn check_flow(at: &At, o: &OAuthSettings) -> Result<(), ConfigError> {
    match o.flow {
        Flow::Device => {
            if let Some(why) = o.device_flow_refusal(at.name) {
                return Err(at.err("flow", why));
            }
            if o.device_url.is_none() {
                return Err(at.err("device_url", "flow = \"device\" needs device_url"));
            }
        }
        Flow::ClientCredentials => {
            if o.client_certificate.is_some() != o.client_key.is_some() {
                return Err(at.err("client_key", "client_certificate and client_key go together"));
            }
            if o.client_secret.is_none() && o.client_certificate.is_none() {
                return Err(at.err(
                    "client_secret",
                    "flow = \"client_credentials\" needs client_secret, or client_certificate and client_key",
                ));
            }
        }
        Flow::ServiceAccount => {
            if o.provider == ProviderKind::Microsoft {
                return Err(at.err(
                    "flow",
                    "service accounts are Google Workspace's; for Microsoft 365 app-only access use flow = \"client_credentials\"",
                ));
            }
            if o.service_account_key.is_none() {
                return Err(at.err(
                    "service_account_key",
                    "flow = \"service_account\" needs service_account_key = \"FILE\": the JSON key Google issues for the service account",
                ));
            }
        }
        Flow::AuthorizationCode => {}
    }
    if o.flow != Flow::ServiceAccount && o.service_account_key.is_some() {
        return Err(at.err(
            "service_account_key",
            "service_account_key only applies to flow = \"service_account\"",
        ));
    }
    Ok(())
}

/// Endpoints must be https, except on loopback (a local identity provider or a test).
fn check_http_url(u: &str) -> Result<(), ConfigProblem> {
    let url = url::Url::parse(u).map_err(|source| ConfigProblem::NotUrl {
        url: u.to_string(),
        source,
    })?;
    let local = url.host_str().map(is_loopback_host).unwrap_or(false);
    match url.scheme() {
        "https" => Ok(()),
        "http" if local => Ok(()),
        s => Err(ConfigProblem::NotHttps {
            url: u.to_string(),
            scheme: s.to_string(),
        }),
    }
}

/// Gmail allows about 15 simultaneous IMAP connections per account.
pub const GOOGLE_MAX_SESSIONS: u32 = 15;
/// Exchange Online allows about 20 connections per mailbox and protocol.
pub const MICROSOFT_MAX_SESSIONS: u32 = 20;

/// The provider's documented limit of sessions at once per protocol, the
/// default of `max_upstream_sessions`; `None` (a custom provider, a
/// passthrough account): no limit is known.
pub(super) fn default_session_limit(auth: &AccountAuth) -> Option<u32> {
    match auth {
        AccountAuth::OAuth(o) => match o.provider {
            ProviderKind::Google => Some(GOOGLE_MAX_SESSIONS),
            ProviderKind::Microsoft => Some(MICROSOFT_MAX_SESSIONS),
            ProviderKind::Custom => None,
        },
        AccountAuth::Password => None,
    }
}

/// `max_upstream_sessions`: 0 is unlimited, absent is the provider's limit.
pub(super) fn session_limit(at: &At, a: &RawAccount, auth: &AccountAuth) -> Result<Option<u32>, ConfigError> {
    let Some(n) = &a.max_upstream_sessions else {
        return Ok(default_session_limit(auth));
    };
    match u32::try_from(*n.get_ref()) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(at.err_at(
            Some(n.span()),
            "max_upstream_sessions",
            "max_upstream_sessions is a number of sessions per protocol: 0 (no limit) or more",
        )),
    }
}

pub(super) fn default_server(provider: ProviderName, cloud: cloud::Cloud, p: Protocol) -> Option<&'static str> {
    let ms = cloud.endpoints();
    match (provider, p) {
        (ProviderName::Google, Protocol::Imap) => Some("imaps://imap.gmail.com:993"),
        (ProviderName::Google, Protocol::Smtp) => Some("smtps://smtp.gmail.com:465"),
        (ProviderName::Google, Protocol::Pop3) => Some("pop3s://pop.gmail.com:995"),
        (ProviderName::Microsoft, Protocol::Imap) => Some(ms.imap),
        (ProviderName::Microsoft, Protocol::Smtp) => Some(ms.smtp),
        (ProviderName::Microsoft, Protocol::Pop3) => Some(ms.pop3),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit_of(table: &str) -> Result<Option<u32>, ConfigError> {
        let text = format!("[imap]\nlisten = \"127.0.0.1:1143\"\n\n[accounts.\"a@example.org\"]\n{table}");
        let c = Config::parse(&text, Path::new("/c.toml"))?;
        Ok(c.account("a@example.org").unwrap().max_upstream_sessions)
    }

    const GOOGLE: &str = "provider = \"google\"\nclient_id = \"id\"\n";
    const MICROSOFT: &str = "provider = \"microsoft\"\nclient_id = \"id\"\n";
    const CUSTOM: &str = "provider = \"custom\"\nclient_id = \"id\"\nauth_url = \"https://l.example/a\"\ntoken_url = \"https://l.example/t\"\nscopes = [\"mail\"]\nimap = \"imaps://imap.example.org\"\n";
    const PASSWORD: &str = "provider = \"password\"\nimap = \"imaps://imap.example.org\"\n";

    #[test]
    fn session_limits_default_to_the_providers() {
        assert_eq!(limit_of(GOOGLE).unwrap(), Some(15));
        assert_eq!(limit_of(MICROSOFT).unwrap(), Some(20));
        assert_eq!(limit_of(CUSTOM).unwrap(), None);
        assert_eq!(limit_of(PASSWORD).unwrap(), None);
        // A preset pointed elsewhere (a test server, a gateway) keeps its limit.
        let moved = format!("{GOOGLE}imap = \"imap://127.0.0.1:1993\"\ntoken_url = \"http://127.0.0.1:9/t\"\n");
        assert_eq!(limit_of(&moved).unwrap(), Some(15));
    }

    #[test]
    fn session_limits_are_set_per_account_and_zero_is_none() {
        assert_eq!(
            limit_of(&format!("{CUSTOM}max_upstream_sessions = 15\n")).unwrap(),
            Some(15)
        );
        assert_eq!(
            limit_of(&format!("{PASSWORD}max_upstream_sessions = 3\n")).unwrap(),
            Some(3)
        );
        assert_eq!(
            limit_of(&format!("{GOOGLE}max_upstream_sessions = 5\n")).unwrap(),
            Some(5)
        );
        assert_eq!(limit_of(&format!("{GOOGLE}max_upstream_sessions = 0\n")).unwrap(), None);
        assert_eq!(limit_of(&format!("{CUSTOM}max_upstream_sessions = 0\n")).unwrap(), None);
    }

    #[test]
    fn a_bad_session_limit_names_file_line_and_key() {
        for bad in ["-1", "4294967296"] {
            let e = limit_of(&format!("{CUSTOM}max_upstream_sessions = {bad}\n")).unwrap_err();
            assert_eq!(
                e.key.as_deref(),
                Some("accounts.\"a@example.org\".max_upstream_sessions"),
                "{e}"
            );
            assert_eq!(e.line, Some(11), "{e}");
            assert!(e.to_string().starts_with("/c.toml:11: "), "{e}");
        }
        let e = limit_of(&format!("{CUSTOM}max_upstream_sessions = \"many\"\n")).unwrap_err();
        assert_eq!(e.line, Some(11), "{e}");
    }

    #[test]
    fn a_shared_mailbox_takes_its_owners_provider_limit() {
        let text = format!(
            "[accounts.\"a@example.org\"]\n{MICROSOFT}\n[accounts.\"shared@example.org\"]\ntoken_from = \"a@example.org\"\n"
        );
        let c = Config::parse(&text, Path::new("/c.toml")).unwrap();
        assert_eq!(c.account("shared@example.org").unwrap().max_upstream_sessions, Some(20));
    }

    #[test]
    fn a_limit_change_is_not_an_account_change() {
        let a = |extra: &str| {
            let text = format!("[accounts.\"a@example.org\"]\n{CUSTOM}{extra}");
            let c = Config::parse(&text, Path::new("/c.toml")).unwrap();
            (**c.account("a@example.org").unwrap()).clone()
        };
        let (before, after) = (a("max_upstream_sessions = 15\n"), a("max_upstream_sessions = 2\n"));
        assert_ne!(before, after);
        assert!(before.same_apart_from_limits(&after));
        assert!(!before.same_apart_from_limits(&a("username = \"b@example.org\"\nmax_upstream_sessions = 2\n")));
    }
}

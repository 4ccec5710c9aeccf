//! From the raw file to a checked [`Config`], one function per section.
//! Pure (no file system access), so it can be fuzzed and unit-tested; the
//! checks that need the file system live in `files`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::presets::{default_server, oauth, session_limit};
use super::raw::{ProviderName, RawAccount, RawConfig, RawLimits, RawListener, RawServer};
use super::source::Source;
use super::source::{AccountContext, At};
use super::*;
use crate::endpoint::{is_loopback_host, Endpoint, Protocol, Security};

/// `[server]` after checking; becomes part of [`Config`].
struct Server {
    state_dir: PathBuf,
    ca_file: Option<PathBuf>,
    token_store: TokenStore,
    status_listen: Option<SocketAddr>,
    on_reauth_needed: Option<String>,
    audit_log: PathBuf,
    http_proxy: Option<Secret>,
    local_users: LocalUsers,
}

pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let src = Source::new(text, path);
    // toml's message names the key ("unknown field `x`, expected ..."); the
    // span gives the line. Only the message is used: toml's full Display
    // quotes the source line, which may hold a secret.
    let raw: RawConfig = toml::from_str(text).map_err(|e| src.err(e.span(), None, e.message().trim().to_string()))?;

    let fleet = super::fleet::server(&src, &raw.server)?;
    let server = server(&src, raw.server)?;
    let imap = raw.imap.map(|l| listener(&src, Protocol::Imap, l)).transpose()?;
    let smtp = raw.smtp.map(|l| listener(&src, Protocol::Smtp, l)).transpose()?;
    let pop3 = raw.pop3.map(|l| listener(&src, Protocol::Pop3, l)).transpose()?;
    let limits = limits(raw.limits);
    let ctx = AccountContext {
        server_ca: server.ca_file.as_deref(),
        listening: [imap.is_some(), smtp.is_some(), pop3.is_some()],
    };
    let (domains, accounts): (BTreeMap<_, _>, BTreeMap<_, _>) = accounts(&src, raw.accounts, &ctx)?
        .into_iter()
        .partition(|(k, _)| domain::is_domain_entry(k));
    let domains = domains
        .into_iter()
        .map(|(k, a)| (k.trim_start_matches('@').to_string(), a))
        .collect();

    Ok(Config {
        path: path.to_owned(),
        state_dir: server.state_dir,
        token_store: server.token_store,
        status_listen: server.status_listen,
        on_reauth_needed: server.on_reauth_needed,
        audit_log: server.audit_log,
        ca_file: server.ca_file,
        http_proxy: server.http_proxy,
        imap,
        smtp,
        pop3,
        limits,
        accounts,
        fleet,
        domains,
        local_users: server.local_users,
    })
}

/// `[server]`: paths get their defaults, and the status page must stay on
/// loopback because it shows authorisation links.
fn server(src: &Source, raw: RawServer) -> Result<Server, ConfigError> {
    let state_dir = raw
        .state_dir
        .map(|p| src.resolve(&p))
        .unwrap_or_else(|| xdg_dir("XDG_STATE_HOME", ".local/state").join("mailproxy"));
    let status_listen = match &raw.status_listen {
        None => None,
        Some(s) => {
            let key = || Some("server.status_listen".to_string());
            let addr = s.get_ref().parse::<SocketAddr>().map_err(|_| {
                src.err(
                    Some(s.span()),
                    key(),
                    format!("`{}` is not an address like 127.0.0.1:8025", s.get_ref()),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(src.err(
                    Some(s.span()),
                    key(),
                    "the status page shows authorisation links: it listens on loopback only",
                ));
            }
            Some(addr)
        }
    };
    let audit_log = raw
        .audit_log
        .map(|p| src.resolve(&p))
        .unwrap_or_else(|| state_dir.join("audit.log"));
    let http_proxy = match &raw.http_proxy {
        None => None,
        Some(p) => {
            // The value may hold the proxy's password: errors do not quote it.
            let bad = |why: &str| {
                src.err(
                    Some(p.span()),
                    Some("server.http_proxy".into()),
                    format!("{why}; write it as \"http://host:port\" (or https://, optionally with user:password@)"),
                )
            };
            let url = url::Url::parse(p.get_ref()).map_err(|_| bad("not a URL"))?;
            if !matches!(url.scheme(), "http" | "https")
                || url.host_str().is_none_or(str::is_empty)
                || reqwest::Proxy::all(p.get_ref().as_str()).is_err()
            {
                return Err(bad("not an http:// or https:// proxy address"));
            }
            Some(Secret::new(p.get_ref().clone()))
        }
    };
    let local_users = match &raw.local_users {
        None => LocalUsers::Anyone,
        Some(v) => local_users(src, v)?,
    };
    Ok(Server {
        local_users,
        http_proxy,
        ca_file: raw.ca_file.map(|p| src.resolve(&p)),
        token_store: raw.token_store,
        on_reauth_needed: raw.on_reauth_needed,
        state_dir,
        status_listen,
        audit_log,
    })
}

/// `local_users = "anyone" | "owner" | ["owner", "scanner", 1001]`. User
/// names are looked up when the config is loaded (this stays pure).
fn local_users(src: &Source, v: &toml::Spanned<toml::Value>) -> Result<LocalUsers, ConfigError> {
    let bad = |why: String| src.err(Some(v.span()), Some("server.local_users".into()), why);
    match v.get_ref() {
        toml::Value::String(s) if s == "anyone" => Ok(LocalUsers::Anyone),
        toml::Value::String(s) if s == "owner" => Ok(LocalUsers::Owner {
            uids: vec![],
            names: vec![],
        }),
        toml::Value::String(s) => Err(bad(format!(
            "`{s}` is neither \"anyone\" nor \"owner\"; a list names more users: [\"owner\", \"scanner\"]"
        ))),
        toml::Value::Array(items) => {
            let (mut uids, mut names) = (vec![], vec![]);
            for x in items {
                match x {
                    toml::Value::String(s) if s == "owner" => {}
                    toml::Value::String(s) => names.push(s.clone()),
                    toml::Value::Integer(n) => {
                        uids.push(u32::try_from(*n).map_err(|_| bad(format!("{n} is not a uid")))?);
                    }
                    other => return Err(bad(format!("`{other}` is not a user name or uid"))),
                }
            }
            Ok(LocalUsers::Owner { uids, names })
        }
        other => Err(bad(format!(
            "`{other}` is not \"anyone\", \"owner\" or a list of users"
        ))),
    }
}

/// `[imap]`, `[smtp]` or `[pop3]`: passwords must not cross the network in
/// the clear, neither from clients to a remote listener nor to a fallback.
fn listener(src: &Source, protocol: Protocol, l: RawListener) -> Result<Listener, ConfigError> {
    let section = protocol.name();
    let key = |k: &str| Some(format!("{section}.{k}"));
    let listen: SocketAddr = l.listen.get_ref().parse().map_err(|_| {
        src.err(
            Some(l.listen.span()),
            key("listen"),
            format!("`{}` is not an address like 127.0.0.1:1143", l.listen.get_ref()),
        )
    })?;
    let fallback = match &l.fallback {
        None => None,
        Some(f) => {
            let ep = Endpoint::parse(f.get_ref(), protocol)
                .map_err(|m| src.err(Some(f.span()), key("fallback"), m.to_string()))?;
            if ep.security == Security::Plain && !ep.is_loopback() {
                return Err(src.err(
                    Some(f.span()),
                    key("fallback"),
                    format!("`{ep}` would send passwords unencrypted to a remote host; use {section}s:// or {section}+starttls://"),
                ));
            }
            Some(ep)
        }
    };
    if l.tls == LocalTls::None && !listen.ip().is_loopback() && !l.allow_insecure_remote {
        return Err(src.err(
            Some(l.listen.span()),
            key("listen"),
            format!(
                "{listen} is reachable from other machines but the listener has no TLS, so passwords would cross the network in the clear; \
                 set tls = \"implicit\" or \"starttls\", or allow_insecure_remote = true if you really mean it"
            ),
        ));
    }
    if l.cert.is_some() != l.key.is_some() {
        return Err(src.err(
            Some(l.listen.span()),
            key("cert"),
            "cert and key must be given together",
        ));
    }
    Ok(Listener {
        protocol,
        listen,
        fallback,
        tls: l.tls,
        proxy: super::fleet::proxy_protocol(src, protocol, &l)?,
        cert: l.cert.map(|p| src.resolve(&p)),
        key: l.key.map(|p| src.resolve(&p)),
    })
}

/// `[limits]`: defaults for what is missing; values outside what makes sense
/// are clamped rather than refused, so a limit can never disable itself.
fn limits(rl: RawLimits) -> Limits {
    let d = Limits::default();
    Limits {
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
        max_send_size: rl.max_send_size.unwrap_or(d.max_send_size).max(1024),
    }
}

/// `[accounts]`: every account, keyed by its lower-cased login name because
/// clients' login names are matched without regard to case.
fn accounts(
    src: &Source,
    raw: BTreeMap<String, Spanned<RawAccount>>,
    ctx: &AccountContext,
) -> Result<BTreeMap<String, Arc<Account>>, ConfigError> {
    let mut accounts = BTreeMap::new();
    // Accounts with a grant of their own first: `token_from` names one of them.
    let (shared, own): (Vec<_>, Vec<_>) = raw.into_iter().partition(|(_, a)| a.get_ref().token_from.is_some());
    for (name, a) in own.into_iter().chain(shared) {
        let at = At {
            src,
            name: &name,
            span: a.span(),
        };
        let a = a.into_inner();
        if domain::is_domain_entry(&name) {
            domain::check_entry_name(&name).map_err(|m| at.err("", m.to_string()))?;
            if a.username.is_some() {
                return Err(at.err(
                    "username",
                    "a domain entry serves many mailboxes: each one's user name is its own address",
                ));
            }
        }
        let account = match a.token_from.clone() {
            Some(from) => shared_account(&at, a, &from, &accounts, ctx)?,
            None => account(&at, a, ctx)?,
        };
        if accounts.insert(name.to_lowercase(), Arc::new(account)).is_some() {
            return Err(at.err(
                "",
                "two accounts differ only in upper/lower case; login names are matched without case",
            ));
        }
    }
    Ok(accounts)
}

fn check_name(at: &At) -> Result<(), ConfigError> {
    let name = at.name;
    if name.trim().is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(at.err(
            "",
            "an account name must be a login name without spaces or control characters",
        ));
    }
    Ok(())
}

fn need_a_server(at: &At, servers: [&Option<Endpoint>; 3]) -> Result<(), ConfigError> {
    if servers.iter().all(|s| s.is_none()) {
        return Err(at.err(
            "imap",
            "the account names no server: set imap = \"imaps://host:993\" (or smtp, pop3)",
        ));
    }
    Ok(())
}

/// `token_from = "OWNER"`: a shared or delegated mailbox. It has a local
/// password of its own, logs in upstream as its `username`, and uses the
/// grant (and so the app registration and provider) of `OWNER`; servers
/// default to the owner's.
fn shared_account(
    at: &At,
    a: RawAccount,
    from: &str,
    accounts: &BTreeMap<String, Arc<Account>>,
    ctx: &AccountContext,
) -> Result<Account, ConfigError> {
    check_name(at)?;
    let key = "token_from";
    if domain::is_domain_entry(at.name) {
        return Err(at.err(key, "a domain entry cannot use another account's grant"));
    }
    if a.provider.is_some() {
        return Err(at.err(
            "provider",
            format!("token_from uses the provider and app registration of {from}; leave provider out"),
        ));
    }
    password_only(
        at,
        &a,
        &format!("token_from uses the grant and app registration of {from}"),
    )?;
    let owner = accounts.get(&from.to_lowercase()).ok_or_else(|| {
        at.err(
            key,
            format!(
                "`{from}` is not an account of this file: token_from names the account whose grant this mailbox uses"
            ),
        )
    })?;
    if owner.oauth().is_none() || owner.token_from.is_some() || domain::is_domain_entry(&owner.name) {
        return Err(at.err(
            key,
            format!("{from} has no grant of its own to share: token_from names an OAuth account without token_from"),
        ));
    }
    let [imap, smtp, pop3] = servers(at, &a, None)?;
    let own_graph = graph_api(at, &a, &owner.auth)?;
    let owner_has_graph = owner
        .oauth()
        .is_some_and(|o| o.graph_scopes.is_some() || o.provider != super::ProviderKind::Microsoft);
    if own_graph.is_some() && !owner_has_graph {
        return Err(at.err(
            "smtp",
            format!(
                "it sends through Graph with the grant of {from}, whose consent has no Graph scope: \
                 write smtp = \"graph\" for {from} too, then `mailproxy login {from}` asks for Mail.Send"
            ),
        ));
    }
    let (imap, smtp, pop3, graph) = if imap.is_none() && smtp.is_none() && pop3.is_none() && own_graph.is_none() {
        (
            owner.imap.clone(),
            owner.smtp.clone(),
            owner.pop3.clone(),
            owner.graph.clone(),
        )
    } else {
        (imap, smtp, pop3, own_graph)
    };
    let ca_fallback = owner.ca_file.clone().or_else(|| ctx.server_ca.map(Path::to_owned));
    let mut account = built(at, &a, owner.auth.clone(), [imap, smtp, pop3], ca_fallback)?;
    account.token_from = Some(owner.name.to_lowercase());
    account.graph = graph;
    Ok(account)
}

/// `[accounts."NAME"]`: servers, then how it authenticates.
fn account(at: &At, a: RawAccount, ctx: &AccountContext) -> Result<Account, ConfigError> {
    check_name(at)?;
    let Some(provider) = a.provider else {
        return Err(at.err(
            "provider",
            "missing provider: set provider = \"google\", \"microsoft\", \"custom\" or \"password\" (or token_from = \"ACCOUNT\")",
        ));
    };
    let [imap, smtp, pop3] = servers(at, &a, Some(provider))?;
    let sends_by_graph = a.smtp.as_ref().is_some_and(|s| super::graph::is_graph(s.get_ref()));
    let smtp = smtp.filter(|_| !sends_by_graph);
    if !sends_by_graph {
        need_a_server(at, [&imap, &smtp, &pop3])?;
    }
    let has_server = [imap.is_some(), smtp.is_some(), pop3.is_some()];
    let auth = match provider {
        ProviderName::Password => {
            password_only(
                at,
                &a,
                "provider = \"password\" passes the client's own password through",
            )?;
            AccountAuth::Password
        }
        _ => AccountAuth::OAuth(Box::new(oauth(at, &a, provider, has_server, ctx)?)),
    };
    let graph = graph_api(at, &a, &auth)?;
    let ca_fallback = ctx.server_ca.map(Path::to_owned);
    let mut account = built(at, &a, auth, [imap, smtp, pop3], ca_fallback)?;
    account.graph = graph;
    Ok(account)
}

/// The account as `[accounts."NAME"]` describes it, once its servers and how
/// it authenticates are settled; its own `ca_file` wins over `ca_fallback`.
fn built(
    at: &At,
    a: &RawAccount,
    auth: AccountAuth,
    [imap, smtp, pop3]: [Option<Endpoint>; 3],
    ca_fallback: Option<PathBuf>,
) -> Result<Account, ConfigError> {
    Ok(Account {
        max_upstream_sessions: session_limit(at, a, &auth)?,
        username: a.username.clone().unwrap_or_else(|| at.name.to_owned()),
        name: at.name.to_owned(),
        auth,
        imap,
        smtp,
        pop3,
        ca_file: a.ca_file.as_ref().map(|p| at.src.resolve(p)).or(ca_fallback),
        mechanism: a.mechanism,
        insecure_skip_verify: a.insecure_skip_verify,
        domain_entry: None,
        token_from: None,
        graph: None,
    })
}

/// `smtp = "graph"`: only for OAuth accounts of Microsoft or a custom
/// provider (Graph is Microsoft's API).
fn graph_api(at: &At, a: &RawAccount, auth: &AccountAuth) -> Result<Option<super::graph::GraphApi>, ConfigError> {
    let Some(raw) = a.smtp.as_ref().filter(|s| super::graph::is_graph(s.get_ref())) else {
        return Ok(None);
    };
    match auth {
        AccountAuth::OAuth(o) if o.provider != ProviderKind::Google => {
            Ok(Some(super::graph::parse(at, raw, a.cloud.unwrap_or_default())?))
        }
        AccountAuth::OAuth(_) => Err(at.err_at(
            Some(raw.span()),
            "smtp",
            "smtp = \"graph\" is for Microsoft 365 accounts (Microsoft Graph); Gmail sends over SMTP",
        )),
        AccountAuth::Password => Err(at.err_at(
            Some(raw.span()),
            "smtp",
            "smtp = \"graph\" needs an OAuth account (provider = \"microsoft\"): Graph takes no passwords",
        )),
    }
}

/// The account's IMAP, SMTP and POP3 servers (presets fill what is not
/// given); plaintext to a remote host needs `allow_plaintext`.
fn servers(at: &At, a: &RawAccount, provider: Option<ProviderName>) -> Result<[Option<Endpoint>; 3], ConfigError> {
    let mut out = [None, None, None];
    for (slot, (p, raw_url)) in out.iter_mut().zip([
        (Protocol::Imap, &a.imap),
        (Protocol::Smtp, &a.smtp),
        (Protocol::Pop3, &a.pop3),
    ]) {
        let url = match raw_url {
            Some(u) if p == Protocol::Smtp && super::graph::is_graph(u.get_ref()) => None,
            Some(u) => {
                Some(Endpoint::parse(u.get_ref(), p).map_err(|m| at.err_at(Some(u.span()), p.name(), m.to_string()))?)
            }
            None => provider
                .and_then(|pr| default_server(pr, a.cloud.unwrap_or_default(), p))
                .map(|u| Endpoint::parse(u, p).expect("preset URLs are valid")),
        };
        if let Some(ep) = &url {
            if ep.security == Security::Plain && !is_loopback_host(&ep.host) && !a.allow_plaintext {
                return Err(at.err_at(
                    raw_url.as_ref().map(toml::Spanned::span),
                    p.name(),
                    format!(
                        "`{ep}` is plaintext to a remote host: credentials would cross the network unencrypted; \
                         use {0}s:// or {0}+starttls://, or set allow_plaintext = true for this account",
                        p.name()
                    ),
                ));
            }
        }
        *slot = url;
    }
    Ok(out)
}

/// A passthrough account (and one with `token_from`) takes no OAuth
/// setting: one would be silently ignored. `why` says why not.
fn password_only(at: &At, a: &RawAccount, why: &str) -> Result<(), ConfigError> {
    let oauth_only = [
        ("tenant", a.tenant.is_some()),
        ("cloud", a.cloud.is_some()),
        ("client_id", a.client_id.is_some()),
        ("client_secret", a.client_secret.is_some()),
        ("auth_url", a.auth_url.is_some()),
        ("token_url", a.token_url.is_some()),
        ("device_url", a.device_url.is_some()),
        ("revoke_url", a.revoke_url.is_some()),
        ("redirect_uri", a.redirect_uri.is_some()),
        ("scopes", a.scopes.is_some()),
        ("graph_scopes", a.graph_scopes.is_some()),
        ("client_certificate", a.client_certificate.is_some()),
        ("client_key", a.client_key.is_some()),
        ("service_account_key", a.service_account_key.is_some()),
        ("flow", a.flow != Flow::AuthorizationCode),
    ];
    match oauth_only.iter().find(|(_, set)| *set) {
        Some((k, _)) => Err(at.err(k, format!("{why}; OAuth settings do not apply"))),
        None => Ok(()),
    }
}

//! `mailproxy add ADDRESS`: the guided first setup. It works out the
//! provider (from the domain, else its MX records, else by asking), prints
//! the app-registration steps for it ([`steps`]), checks the client id's
//! shape and writes (or extends) the config, 0600 and commented, with the
//! status page on ([`status`]). `main` then runs `login`.

pub mod mx;
pub mod status;
pub mod steps;

pub use status::{status_address, DEFAULT_STATUS};
pub use steps::registration_steps;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("`{0}` is not a mail address (it needs a name, an @ and a domain)")]
    Address(String),
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Input(String),
}

/// Which kind of account `add` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    Google,
    Microsoft,
    Custom,
    Password,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Google => "google",
            Provider::Microsoft => "microsoft",
            Provider::Custom => "custom",
            Provider::Password => "password",
        }
    }
}

/// What the domain tells about the provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    pub provider: Provider,
    /// For Microsoft: `consumers` (outlook.com and friends) or `organizations`.
    pub tenant: Option<&'static str>,
    pub why: String,
}

/// Providers known by their domain alone.
pub fn by_domain(domain: &str) -> Option<Detected> {
    let d = domain.to_ascii_lowercase();
    let first = d.split('.').next().unwrap_or("");
    if d == "gmail.com" || d == "googlemail.com" {
        return Some(Detected {
            provider: Provider::Google,
            tenant: None,
            why: format!("{d} is Gmail"),
        });
    }
    let consumer = d == "outlook.com" || d == "msn.com" || first == "hotmail" || first == "live" || first == "outlook";
    consumer.then(|| Detected {
        provider: Provider::Microsoft,
        tenant: Some("consumers"),
        why: format!("{d} is Outlook.com (a personal Microsoft account)"),
    })
}

/// Providers known by the hosts a domain's mail goes to.
pub fn by_mx(domain: &str, hosts: &[String]) -> Option<Detected> {
    let ends = |h: &str, suffix: &str| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        h == suffix || h.ends_with(&format!(".{suffix}"))
    };
    for h in hosts {
        if ends(h, "aspmx.l.google.com") || ends(h, "googlemail.com") || ends(h, "smtp.google.com") {
            return Some(Detected {
                provider: Provider::Google,
                tenant: None,
                why: format!("{domain}'s mail goes to {h} (Google Workspace)"),
            });
        }
        if ends(h, "mail.protection.outlook.com") || ends(h, "mx.microsoft") {
            return Some(Detected {
                provider: Provider::Microsoft,
                tenant: Some("organizations"),
                why: format!("{domain}'s mail goes to {h} (Microsoft 365)"),
            });
        }
        if ends(h, "olc.protection.outlook.com") {
            return Some(Detected {
                provider: Provider::Microsoft,
                tenant: Some("consumers"),
                why: format!("{domain}'s mail goes to {h} (Outlook.com)"),
            });
        }
    }
    None
}

/// The provider of `domain`: the domain itself, else its MX records.
pub fn detect(domain: &str) -> Option<Detected> {
    by_domain(domain).or_else(|| by_mx(domain, &mx::lookup(domain, Duration::from_secs(2))?))
}

/// Whether a client id is the example config's placeholder (or obviously
/// one): it would only lead to the provider's error page.
pub fn is_placeholder(client_id: &str) -> bool {
    let c = client_id.trim().to_ascii_uppercase();
    c.is_empty()
        || c.starts_with("YOUR-")
        || c.starts_with("YOUR_")
        || c.contains("CLIENT-ID")
        || c.contains("CLIENT_ID")
        || c == "00000000-0000-0000-0000-000000000000"
}

/// Why `client_id` cannot be the provider's, or `None` if it looks right.
pub fn client_id_problem(provider: Provider, client_id: &str) -> Option<String> {
    let c = client_id.trim();
    if is_placeholder(c) {
        return Some(format!(
            "`{c}` is a placeholder, not a client id: register the app as described above and paste its client id"
        ));
    }
    match provider {
        Provider::Google => {
            let ok = c
                .strip_suffix(".apps.googleusercontent.com")
                .is_some_and(|p| !p.is_empty() && p.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-'));
            (!ok).then(|| {
                format!("`{c}` is not a Google client id: those end in .apps.googleusercontent.com (Credentials → OAuth 2.0 Client IDs)")
            })
        }
        Provider::Microsoft => (!is_guid(c)).then(|| {
            format!("`{c}` is not a Microsoft client id: that is the Application (client) ID on the app's Overview page, a GUID like 1b2c3d4e-0000-4a5b-8c9d-0123456789ab")
        }),
        Provider::Custom | Provider::Password => c
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control())
            .then(|| format!("`{c}` contains spaces; paste the client id alone")),
    }
}

fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12]) && parts.iter().all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Said for work and school Microsoft accounts: the way out when the
/// tenant has SMTP AUTH turned off.
const GRAPH_CHOICE: &str = "Microsoft 365 tenants often turn SMTP AUTH off (logins then end in 5.7.139). If yours does,
  add smtp = \"graph\" to this account: clients still send to mailproxy over SMTP, and the
  messages leave through Microsoft Graph. Then add Microsoft Graph → Delegated → Mail.Send under
  API permissions and run `mailproxy login` for the account again to consent to it.";

/// A work or school Microsoft account (not a personal Outlook.com one).
fn is_work_microsoft(o: &AddOptions, provider: Provider) -> bool {
    provider == Provider::Microsoft && o.tenant.as_deref() != Some("consumers")
}

/// Everything `add` needs to know; what is missing is asked for.
#[derive(Clone, Debug, Default)]
pub struct AddOptions {
    pub address: String,
    pub provider: Option<Provider>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub tenant: Option<String>,
    pub imap: Option<String>,
    pub smtp: Option<String>,
    pub pop3: Option<String>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    pub device_url: Option<String>,
    pub revoke_url: Option<String>,
    pub scopes: Vec<String>,
    pub ca_file: Option<PathBuf>,
}

/// What `add` wrote.
pub struct Added {
    pub account: String,
    pub provider: Provider,
    pub created: bool,
    /// The status page's address, when the config has one.
    pub status: Option<SocketAddr>,
}

/// Asks a person one question; `None` when there is no answer (end of input).
pub type Ask<'a> = &'a mut dyn FnMut(&str) -> Result<Option<String>, SetupError>;

fn need(ask: Ask<'_>, question: &str, flag: &str) -> Result<String, SetupError> {
    match ask(question)? {
        Some(a) if !a.trim().is_empty() => Ok(a.trim().to_string()),
        _ => Err(SetupError::Input(format!("no answer to \"{question}\"; pass {flag}"))),
    }
}

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The text of a new config file: listeners and the status page on
/// loopback, state in the default place.
pub fn new_config_text(status: SocketAddr) -> String {
    format!(
        "# mailproxy configuration, written by `mailproxy add`. Every key is documented\n\
     # in the README (Configuration). `mailproxy add ADDRESS` adds more accounts;\n\
     # it keeps this file private (0600): it may hold a client secret.\n\
     \n\
     [server]\n\
     # The encrypted vault and account state live in $XDG_STATE_HOME/mailproxy.\n\
     # token_store = \"keyring\"   # keep refresh tokens in the OS keyring instead\n\
     # The status page: every account's state and its Sign in button\n\
     # (`mailproxy open` opens it). Loopback only: it shows sign-in links.\n\
     status_listen = {}\n\
     \n\
     [imap]\n\
     # Mail clients connect here with the account's address and its local password.\n\
     listen = \"127.0.0.1:1143\"\n\
     \n\
     [smtp]\n\
     listen = \"127.0.0.1:1587\"\n\
     \n\
     # [pop3]\n\
     # listen = \"127.0.0.1:1110\"\n",
        q(&status.to_string())
    )
}

/// The account's section.
fn account_text(o: &AddOptions, provider: Provider, why: &str) -> String {
    let mut t = format!("\n# {} — {why}.\n", o.address);
    t += &format!("[accounts.{}]\nprovider = {}\n", q(&o.address), q(provider.name()));
    if let Some(tenant) = &o.tenant {
        t += &format!("tenant = {}\n", q(tenant));
    }
    if let Some(id) = &o.client_id {
        t += &format!("client_id = {}\n", q(id));
    }
    if let Some(s) = &o.client_secret {
        t += "# Google's desktop clients have a secret that is not really secret, but\n# this file stays private all the same.\n";
        t += &format!("client_secret = {}\n", q(s));
    }
    for (k, v) in [
        ("auth_url", &o.auth_url),
        ("token_url", &o.token_url),
        ("device_url", &o.device_url),
        ("revoke_url", &o.revoke_url),
        ("imap", &o.imap),
        ("smtp", &o.smtp),
        ("pop3", &o.pop3),
    ] {
        if let Some(v) = v {
            t += &format!("{k} = {}\n", q(v));
        }
    }
    if !o.scopes.is_empty() {
        let s: Vec<String> = o.scopes.iter().map(|s| q(s)).collect();
        t += &format!("scopes = [{}]\n", s.join(", "));
    }
    if let Some(ca) = &o.ca_file {
        t += &format!("ca_file = {}\n", q(&ca.display().to_string()));
    }
    if is_work_microsoft(o, provider) && o.smtp.is_none() {
        t += "# SMTP AUTH off in the tenant? Send through Microsoft Graph (Mail.Send):\n# smtp = \"graph\"\n";
    }
    t
}

/// Works out what is missing (asking `ask`), prints the registration
/// steps on `out`, checks everything with the real config parser and
/// writes the config (0600). Nothing is written when anything is wrong.
pub fn add(path: &Path, mut o: AddOptions, ask: Ask<'_>, out: &mut dyn Write) -> Result<Added, SetupError> {
    let (address, domain) = checked_address(&o.address)?;
    o.address = address.clone();
    let existing = existing_config(path, &address)?;
    let (provider, why) = choose_provider(&mut o, &domain, ask, out)?;
    say(out, "");
    say(out, registration_steps(provider));
    say(out, "");
    match provider {
        Provider::Password => ask_password_servers(&mut o, &domain, ask)?,
        _ => ask_oauth_client(&mut o, provider, &domain, ask)?,
    }
    if is_work_microsoft(&o, provider) {
        say(out, GRAPH_CHOICE);
        say(out, "");
    }

    let created = existing.is_none();
    let mut text = match existing {
        Some(t) => t,
        None => new_config_text(new_status_address(out)),
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text += &account_text(&o, provider, &why);
    let config = Config::parse(&text, path).map_err(|e| SetupError::Config(e.to_string()))?;
    write_private(path, &text)?;
    say(
        out,
        &format!(
            "{} {} with the account {address}.",
            if created { "Wrote" } else { "Extended" },
            path.display()
        ),
    );
    if config.status_listen.is_none() {
        say(out, &format!(
            "Its status page is off: add status_listen = \"{DEFAULT_STATUS}\" under [server] in {} and restart mailproxy to see every account's state in a browser (`mailproxy open`).",
            path.display()
        ));
    }
    Ok(Added {
        account: address,
        provider,
        created,
        status: config.status_listen,
    })
}

/// A new config's status page address, said on `out` when it is not the
/// usual one.
fn new_status_address(out: &mut dyn Write) -> SocketAddr {
    let (addr, why) = status_address(DEFAULT_STATUS);
    if let Some(why) = why {
        say(out, &format!("{why}."));
    }
    addr
}

/// One line on `out`; a failed write is not worth stopping for.
fn say(out: &mut dyn Write, s: &str) {
    let _ = writeln!(out, "{s}");
}

/// The address, trimmed, and its domain; an error unless it looks like
/// `name@domain.tld`.
fn checked_address(address: &str) -> Result<(String, String), SetupError> {
    let address = address.trim().to_string();
    let Some((user, domain)) = address.rsplit_once('@') else {
        return Err(SetupError::Address(address));
    };
    if user.is_empty() || !domain.contains('.') || domain.starts_with('.') || address.chars().any(char::is_whitespace) {
        return Err(SetupError::Address(address));
    }
    let domain = domain.to_string();
    Ok((address, domain))
}

/// The config's text when it exists (`None` when it does not); an error
/// when it cannot be read, does not load or already has `address`.
fn existing_config(path: &Path, address: &str) -> Result<Option<String>, SetupError> {
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(SetupError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if existing.is_some() {
        let c = Config::load(path).map_err(|e| SetupError::Config(e.to_string()))?;
        if c.account(address).is_some() {
            return Err(SetupError::Config(format!(
                "{} already has the account {address}; run `mailproxy login {address}` to authorise it, or edit the file",
                path.display()
            )));
        }
    }
    Ok(existing)
}

/// The provider and why: `--provider`, else what the domain tells (which
/// may also set the tenant), else the answer to a question.
fn choose_provider(
    o: &mut AddOptions,
    domain: &str,
    ask: Ask<'_>,
    out: &mut dyn Write,
) -> Result<(Provider, String), SetupError> {
    if let Some(p) = o.provider {
        return Ok((p, "provider chosen with --provider".to_string()));
    }
    match detect(domain) {
        Some(d) => {
            say(out, &format!("{}: {}.", o.address, d.why));
            if o.tenant.is_none() {
                o.tenant = d.tenant.map(str::to_string);
            }
            Ok((d.provider, d.why))
        }
        None => {
            let a = need(
                ask,
                &format!(
                    "Which provider hosts {}? google, microsoft, password (a server that still takes passwords) or custom",
                    o.address
                ),
                "--provider",
            )?;
            Ok((provider_named(&a)?, "provider chosen by hand".to_string()))
        }
    }
}

/// The provider a person named.
fn provider_named(answer: &str) -> Result<Provider, SetupError> {
    match answer.to_ascii_lowercase().as_str() {
        "google" | "gmail" => Ok(Provider::Google),
        "microsoft" | "outlook" | "office365" | "m365" => Ok(Provider::Microsoft),
        "password" => Ok(Provider::Password),
        "custom" => Ok(Provider::Custom),
        other => Err(SetupError::Input(format!(
            "`{other}` is not one of google, microsoft, password, custom"
        ))),
    }
}

/// Asks for the IMAP server of `o.address`.
fn ask_imap(o: &AddOptions, domain: &str, ask: Ask<'_>) -> Result<String, SetupError> {
    need(
        ask,
        &format!("IMAP server of {} (e.g. imaps://mail.{domain}:993)", o.address),
        "--imap",
    )
}

/// A password account: its servers (asked for when none was given); no
/// OAuth client.
fn ask_password_servers(o: &mut AddOptions, domain: &str, ask: Ask<'_>) -> Result<(), SetupError> {
    if o.imap.is_none() && o.smtp.is_none() && o.pop3.is_none() {
        o.imap = Some(ask_imap(o, domain, ask)?);
        let smtp = ask(&format!(
            "SMTP server of {} (e.g. smtps://mail.{domain}:465; empty for none)",
            o.address
        ))?;
        o.smtp = smtp.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    }
    o.client_id = None;
    o.client_secret = None;
    Ok(())
}

/// An OAuth account: a custom provider's endpoints and server, the client
/// id (checked), Google's client secret and Microsoft's default tenant.
fn ask_oauth_client(o: &mut AddOptions, provider: Provider, domain: &str, ask: Ask<'_>) -> Result<(), SetupError> {
    if provider == Provider::Custom {
        if o.auth_url.is_none() {
            o.auth_url = Some(need(ask, "Authorisation endpoint (auth_url)", "--auth-url")?);
        }
        if o.token_url.is_none() {
            o.token_url = Some(need(ask, "Token endpoint (token_url)", "--token-url")?);
        }
        if o.imap.is_none() && o.smtp.is_none() && o.pop3.is_none() {
            o.imap = Some(ask_imap(o, domain, ask)?);
        }
    }
    let id = match o.client_id.take() {
        Some(id) => id,
        None => need(ask, "Client id", "--client-id")?,
    };
    if let Some(why) = client_id_problem(provider, &id) {
        return Err(SetupError::Input(why));
    }
    o.client_id = Some(id.trim().to_string());
    if provider == Provider::Google && o.client_secret.is_none() {
        o.client_secret = Some(need(ask, "Client secret", "--client-secret")?);
    }
    if provider == Provider::Microsoft && o.tenant.is_none() {
        o.tenant = Some("common".into());
    }
    Ok(())
}

/// Writes the config 0600 (its directory 0700 when created), atomically.
fn write_private(path: &Path, text: &str) -> Result<(), SetupError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| SetupError::Io { path: p, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
    }
    let tmp = path.with_extension(format!("toml.tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_by_domain() {
        for d in ["gmail.com", "GoogleMail.com"] {
            assert_eq!(by_domain(d).unwrap().provider, Provider::Google);
        }
        for d in [
            "outlook.com",
            "hotmail.com",
            "hotmail.co.uk",
            "live.com",
            "live.fr",
            "msn.com",
            "outlook.de",
        ] {
            let m = by_domain(d).unwrap();
            assert_eq!((m.provider, m.tenant), (Provider::Microsoft, Some("consumers")), "{d}");
        }
        assert!(by_domain("example.org").is_none());
        assert!(by_domain("livemail.example").is_none());
    }

    #[test]
    fn providers_by_mx() {
        let hosts = |h: &[&str]| h.iter().map(std::string::ToString::to_string).collect::<Vec<_>>();
        let g = by_mx(
            "corp.example",
            &hosts(&["aspmx.l.google.com.", "alt1.aspmx.l.google.com"]),
        )
        .unwrap();
        assert_eq!(g.provider, Provider::Google);
        assert!(g.why.contains("Google Workspace"));
        assert_eq!(
            by_mx("x.example", &hosts(&["smtp.google.com"])).unwrap().provider,
            Provider::Google
        );
        let m = by_mx("contoso.com", &hosts(&["contoso-com.mail.protection.outlook.com"])).unwrap();
        assert_eq!((m.provider, m.tenant), (Provider::Microsoft, Some("organizations")));
        assert_eq!(
            by_mx("x.example", &hosts(&["x-example.o-v1.mx.microsoft"]))
                .unwrap()
                .provider,
            Provider::Microsoft
        );
        assert!(by_mx("x.example", &hosts(&["mx.example.net", "evilgoogle.com"])).is_none());
        assert!(by_mx("x.example", &hosts(&["aspmx.l.google.com.evil.example"])).is_none());
        assert!(by_mx("x.example", &[]).is_none());
    }

    #[test]
    fn client_id_shapes_and_placeholders() {
        let g = "123456789012-abcdefghijklmnop.apps.googleusercontent.com";
        assert!(client_id_problem(Provider::Google, g).is_none());
        assert!(
            client_id_problem(Provider::Google, "YOUR-CLIENT-ID.apps.googleusercontent.com")
                .unwrap()
                .contains("placeholder")
        );
        assert!(
            client_id_problem(Provider::Google, "1b2c3d4e-0000-4a5b-8c9d-0123456789ab")
                .unwrap()
                .contains("apps.googleusercontent.com")
        );
        let m = "1b2c3d4e-0000-4a5b-8c9d-0123456789ab";
        assert!(client_id_problem(Provider::Microsoft, m).is_none());
        assert!(
            client_id_problem(Provider::Microsoft, "00000000-0000-0000-0000-000000000000")
                .unwrap()
                .contains("placeholder")
        );
        assert!(client_id_problem(Provider::Microsoft, g).unwrap().contains("GUID"));
        assert!(client_id_problem(Provider::Custom, "my-client").is_none());
        assert!(client_id_problem(Provider::Custom, "").is_some());
    }

    /// A config of one's own without the status page keeps it off, and
    /// `add` says which key turns it on.
    #[test]
    fn add_to_a_config_without_the_status_page_says_how_to_turn_it_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[imap]\nlisten = \"127.0.0.1:1143\"\n").unwrap();
        let o = AddOptions {
            address: "dave@legacy.example".into(),
            provider: Some(Provider::Password),
            imap: Some("imaps://legacy.example:993".into()),
            ..Default::default()
        };
        let mut out = Vec::new();
        let added = add(&path, o, &mut |_: &str| Ok(None), &mut out).unwrap();
        assert_eq!(added.status, None);
        let out = String::from_utf8(out).unwrap();
        let want = format!(
            "Its status page is off: add status_listen = \"127.0.0.1:8025\" under [server] in {}",
            path.display()
        );
        assert!(out.contains(&want), "{out}");
        assert!(!std::fs::read_to_string(&path).unwrap().contains("status_listen"));
    }

    #[test]
    fn add_writes_a_private_config_that_parses_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let mut answers = vec!["1b2c3d4e-0000-4a5b-8c9d-0123456789ab".to_string()].into_iter();
        let mut ask = |_: &str| Ok(answers.next());
        let mut out = Vec::new();
        let o = AddOptions {
            address: "bob@outlook.com".into(),
            ..Default::default()
        };
        let added = add(&path, o, &mut ask, &mut out).unwrap();
        assert!(added.created);
        assert_eq!(added.provider, Provider::Microsoft);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("tenant = \"consumers\""), "{text}");
        assert!(text.contains("\nstatus_listen = \"127.0.0.1:"), "{text}");
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("Allow public client flows"), "{out}");
        assert!(!out.contains("smtp = \"graph\""), "not for a personal account: {out}");
        let c = Config::load(&path).unwrap();
        assert!(c.account("bob@outlook.com").unwrap().oauth().is_some());
        assert_eq!(added.status, c.status_listen);
        assert!(c.status_listen.is_some_and(|a| a.ip().is_loopback()));

        // A second account extends the file; the same one again is refused.
        let mut none = |_: &str| Ok(None);
        let o = AddOptions {
            address: "dave@legacy.example".into(),
            provider: Some(Provider::Password),
            imap: Some("imaps://legacy.example:993".into()),
            ..Default::default()
        };
        let mut said = Vec::new();
        assert!(!add(&path, o, &mut none, &mut said).unwrap().created);
        assert_eq!(Config::load(&path).unwrap().accounts.len(), 2);
        assert!(!String::from_utf8(said).unwrap().contains("status page is off"));
        let o = AddOptions {
            address: "BOB@outlook.com".into(),
            ..Default::default()
        };
        let e = add(&path, o, &mut none, &mut Vec::new()).err().unwrap();
        assert!(e.to_string().contains("already has the account"), "{e}");
        // A work account hears about Graph, and the config shows the line.
        let mut id = |_: &str| Ok(Some("1b2c3d4e-0000-4a5b-8c9d-0123456789ab".to_string()));
        let o = AddOptions {
            address: "erin@contoso.example".into(),
            provider: Some(Provider::Microsoft),
            ..Default::default()
        };
        let mut out = Vec::new();
        add(&path, o, &mut id, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("5.7.139") && out.contains("Mail.Send"), "{out}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# smtp = \"graph\"\n"), "{text}");
        // Placeholders and missing answers: a sentence, nothing written.
        let before = std::fs::read_to_string(&path).unwrap();
        let o = AddOptions {
            address: "carol@gmail.com".into(),
            client_id: Some("YOUR-CLIENT-ID.apps.googleusercontent.com".into()),
            ..Default::default()
        };
        let e = add(&path, o, &mut none, &mut Vec::new()).err().unwrap();
        assert!(e.to_string().contains("placeholder"), "{e}");
        let o = AddOptions {
            address: "carol@gmail.com".into(),
            client_id: Some("1-a.apps.googleusercontent.com".into()),
            ..Default::default()
        };
        let e = add(&path, o, &mut none, &mut Vec::new()).err().unwrap();
        assert!(e.to_string().contains("--client-secret"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        let o = AddOptions {
            address: "not an address".into(),
            ..Default::default()
        };
        assert!(matches!(
            add(&path, o, &mut none, &mut Vec::new()),
            Err(SetupError::Address(_))
        ));
    }
}

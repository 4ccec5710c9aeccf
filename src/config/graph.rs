//! `smtp = "graph"`: an account whose tenant turned SMTP AUTH off sends
//! through Microsoft Graph (`sendMail`) instead of an SMTP server. The
//! value is `"graph"` (the Graph host of the account's `cloud`), a URL
//! `graph+https://HOST/v1.0`, or `graph+http://127.0.0.1:PORT/v1.0` on
//! loopback only (a local test double).

use toml::Spanned;

use super::cloud::Cloud;
use super::source::At;
use super::ConfigError;
use crate::endpoint::is_loopback_host;

/// Where an account's messages go when it sends through Microsoft Graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphApi {
    /// The API root without a trailing slash, e.g. `https://graph.microsoft.com/v1.0`.
    pub base: String,
}

impl std::fmt::Display for GraphApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

/// Whether an `smtp = …` value means Graph rather than an SMTP server.
pub(super) fn is_graph(value: &str) -> bool {
    value.eq_ignore_ascii_case("graph") || value.to_ascii_lowercase().starts_with("graph+")
}

/// A cloud's Graph resource (the audience of its tokens).
pub fn resource(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Global => "https://graph.microsoft.com",
        Cloud::Usgov => "https://graph.microsoft.us",
        Cloud::UsgovDod => "https://dod-graph.microsoft.us",
        Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
    }
}

/// The scopes a Microsoft account asks Graph tokens for: `Mail.Send`
/// delegated, or the resource's `.default` for app-only access.
pub(super) fn microsoft_scopes(cloud: Cloud, app_only: bool) -> Vec<String> {
    let r = resource(cloud);
    if app_only {
        vec![format!("{r}/.default")]
    } else {
        vec![format!("{r}/Mail.Send"), "offline_access".into()]
    }
}

/// Reads `smtp = "graph" | "graph+https://…"` for an account in `cloud`.
pub(super) fn parse(at: &At, raw: &Spanned<String>, cloud: Cloud) -> Result<GraphApi, ConfigError> {
    let value = raw.get_ref().trim();
    let bad = |why: String| at.err_at(Some(raw.span()), "smtp", why);
    if value.eq_ignore_ascii_case("graph") {
        return Ok(GraphApi {
            base: format!("{}/v1.0", resource(cloud)),
        });
    }
    let rest = &value["graph+".len()..];
    let url = url::Url::parse(rest).map_err(|e| {
        bad(format!(
            "`{value}` is not a Graph URL ({e}); write smtp = \"graph\" or \"graph+https://HOST/v1.0\""
        ))
    })?;
    let loopback = url.host_str().is_some_and(is_loopback_host);
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(bad(format!(
                "`{value}` would send access tokens and messages unencrypted to a remote host; use graph+https://"
            )))
        }
        s => return Err(bad(format!("`{s}` is not a Graph scheme: use graph+https://HOST/v1.0"))),
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad(format!(
            "`{value}` must be graph+https://HOST/PATH, without user, query or fragment"
        )));
    }
    Ok(GraphApi {
        base: url.as_str().trim_end_matches('/').to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use std::path::Path;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/c.toml"))
    }

    const MS: &str =
        "[smtp]\nlisten = \"127.0.0.1:1587\"\n[accounts.\"a@b\"]\nprovider = \"microsoft\"\nclient_id = \"id\"\n";

    #[test]
    fn graph_follows_the_cloud_and_asks_for_mail_send() {
        for (cloud, base) in [
            ("global", "https://graph.microsoft.com/v1.0"),
            ("usgov", "https://graph.microsoft.us/v1.0"),
            ("usgov-dod", "https://dod-graph.microsoft.us/v1.0"),
            ("china", "https://microsoftgraph.chinacloudapi.cn/v1.0"),
        ] {
            let c = parse(&format!("{MS}cloud = \"{cloud}\"\nsmtp = \"graph\"\n")).unwrap();
            let a = c.account("a@b").unwrap();
            assert_eq!(a.graph.as_ref().unwrap().base, base, "{cloud}");
            assert_eq!(a.smtp, None);
            let o = a.oauth().unwrap();
            let resource = base.trim_end_matches("/v1.0");
            assert_eq!(
                o.graph_scopes.as_deref().unwrap(),
                [format!("{resource}/Mail.Send"), "offline_access".into()]
            );
            // The SMTP scope is not asked for: Graph sends.
            assert!(!o.scopes.iter().any(|s| s.ends_with("SMTP.Send")), "{:?}", o.scopes);
            assert!(o.consent_scopes().contains(&format!("{resource}/Mail.Send")));
        }
        let c = parse(&format!(
            "{MS}smtp = \"graph\"\nflow = \"client_credentials\"\nclient_secret = \"s\"\n"
        ))
        .unwrap();
        let o = c.account("a@b").unwrap().oauth().unwrap().clone();
        assert_eq!(o.graph_scopes.unwrap(), ["https://graph.microsoft.com/.default"]);
    }

    #[test]
    fn graph_urls_are_https_or_loopback() {
        let c = parse(&format!("{MS}smtp = \"graph+https://graph.example/v1.0/\"\n")).unwrap();
        assert_eq!(
            c.account("a@b").unwrap().graph.as_ref().unwrap().base,
            "https://graph.example/v1.0"
        );
        let c = parse(&format!("{MS}smtp = \"graph+http://127.0.0.1:8080/v1.0\"\n")).unwrap();
        assert_eq!(
            c.account("a@b").unwrap().graph.as_ref().unwrap().base,
            "http://127.0.0.1:8080/v1.0"
        );
        let e = parse(&format!("{MS}smtp = \"graph+http://graph.example/v1.0\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"a@b\".smtp"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("unencrypted"), "{e}");
        let e = parse(&format!("{MS}smtp = \"graph+ftp://x/v1.0\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"a@b\".smtp"), "{e}");
    }

    #[test]
    fn graph_needs_oauth_and_works_for_shared_mailboxes() {
        let e = parse("[accounts.\"a@b\"]\nprovider = \"password\"\nsmtp = \"graph\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"a@b\".smtp"), "{e}");
        let e = parse("[accounts.\"a@gmail.com\"]\nprovider = \"google\"\nclient_id = \"x\"\nsmtp = \"graph\"\n")
            .unwrap_err();
        assert!(e.message.contains("Microsoft"), "{e}");
        let c = parse(&format!(
            "{MS}smtp = \"graph\"\n[accounts.\"shared@b\"]\ntoken_from = \"a@b\"\n"
        ))
        .unwrap();
        let s = c.account("shared@b").unwrap();
        assert_eq!(s.graph, c.account("a@b").unwrap().graph);
        // A shared mailbox of its own on Graph needs its grant to cover Graph.
        let e = parse(&format!(
            "{MS}[accounts.\"shared@b\"]\ntoken_from = \"a@b\"\nsmtp = \"graph\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"shared@b\".smtp"), "{e}");
        assert!(e.message.contains("write smtp = \"graph\" for a@b too"), "{e}");
        // Custom providers: graph_scopes is optional.
        let custom = "[accounts.\"c@d\"]\nprovider = \"custom\"\nclient_id = \"x\"\nauth_url = \"https://id/a\"\ntoken_url = \"https://id/t\"\nscopes = [\"mail\"]\nsmtp = \"graph+https://g.example/v1.0\"\n";
        let c = parse(custom).unwrap();
        assert_eq!(c.account("c@d").unwrap().oauth().unwrap().graph_scopes, None);
        let c = parse(&format!("{custom}graph_scopes = [\"g\"]\n")).unwrap();
        assert_eq!(
            c.account("c@d")
                .unwrap()
                .oauth()
                .unwrap()
                .graph_scopes
                .as_deref()
                .unwrap(),
            ["g"]
        );
        let e = parse(&format!("{MS}graph_scopes = [\"g\"]\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"a@b\".graph_scopes"), "{e}");
    }

    #[test]
    fn max_send_size_defaults_to_35_mb() {
        assert_eq!(parse("").unwrap().limits.max_send_size, 35 * 1024 * 1024);
        assert_eq!(
            parse("[limits]\nmax_send_size = 1000000\n")
                .unwrap()
                .limits
                .max_send_size,
            1_000_000
        );
    }
}

//! Microsoft's national clouds: each has its own sign-in host, Exchange
//! Online hosts and scope resource (`cloud = "usgov"`, …). The global cloud
//! keeps the presets mailproxy always had.

use serde::Deserialize;

use super::{MS_APP_SCOPE, MS_IMAP_SCOPE, MS_POP_SCOPE, MS_SMTP_SCOPE};

#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    /// login.microsoftonline.com, outlook.office365.com.
    #[default]
    Global,
    /// US Government (GCC High): login.microsoftonline.us, outlook.office365.us.
    Usgov,
    /// US Government DoD: login.microsoftonline.us, outlook-dod.office365.us.
    UsgovDod,
    /// China, operated by 21Vianet: login.chinacloudapi.cn, partner.outlook.cn.
    China,
}

/// Where a cloud's accounts sign in, read mail, and which scopes they ask for.
pub(super) struct CloudEndpoints {
    pub login: &'static str,
    pub imap: &'static str,
    pub smtp: &'static str,
    pub pop3: &'static str,
    /// IMAP, SMTP, POP scopes (delegated) and the app-only `.default` scope.
    pub scopes: [String; 3],
    pub app_scope: String,
}

impl Cloud {
    pub(super) fn endpoints(self) -> CloudEndpoints {
        let delegated = |resource: &str| {
            [
                format!("{resource}/IMAP.AccessAsUser.All"),
                format!("{resource}/SMTP.Send"),
                format!("{resource}/POP.AccessAsUser.All"),
            ]
        };
        match self {
            Cloud::Global => CloudEndpoints {
                login: "https://login.microsoftonline.com",
                imap: "imaps://outlook.office365.com:993",
                smtp: "smtp+starttls://smtp.office365.com:587",
                pop3: "pop3s://outlook.office365.com:995",
                scopes: [MS_IMAP_SCOPE.into(), MS_SMTP_SCOPE.into(), MS_POP_SCOPE.into()],
                app_scope: MS_APP_SCOPE.into(),
            },
            Cloud::Usgov => CloudEndpoints {
                login: "https://login.microsoftonline.us",
                imap: "imaps://outlook.office365.us:993",
                smtp: "smtp+starttls://smtp.office365.us:587",
                pop3: "pop3s://outlook.office365.us:995",
                scopes: delegated("https://outlook.office365.us"),
                app_scope: "https://outlook.office365.us/.default".into(),
            },
            Cloud::UsgovDod => CloudEndpoints {
                login: "https://login.microsoftonline.us",
                imap: "imaps://outlook-dod.office365.us:993",
                smtp: "smtp+starttls://smtp.office365.us:587",
                pop3: "pop3s://outlook-dod.office365.us:995",
                scopes: delegated("https://outlook-dod.office365.us"),
                app_scope: "https://outlook-dod.office365.us/.default".into(),
            },
            Cloud::China => CloudEndpoints {
                login: "https://login.chinacloudapi.cn",
                imap: "imaps://partner.outlook.cn:993",
                smtp: "smtp+starttls://smtp.partner.outlook.cn:587",
                pop3: "pop3s://partner.outlook.cn:995",
                scopes: delegated("https://partner.outlook.cn"),
                app_scope: "https://partner.outlook.cn/.default".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use std::path::Path;

    fn parse(s: &str) -> Result<Config, super::super::ConfigError> {
        Config::parse(s, Path::new("/c.toml"))
    }

    #[test]
    fn each_cloud_has_its_login_servers_and_scopes() {
        for (cloud, login, imap, scope) in [
            (
                "global",
                "https://login.microsoftonline.com/",
                "outlook.office365.com",
                "https://outlook.office.com/IMAP.AccessAsUser.All",
            ),
            (
                "usgov",
                "https://login.microsoftonline.us/",
                "outlook.office365.us",
                "https://outlook.office365.us/IMAP.AccessAsUser.All",
            ),
            (
                "usgov-dod",
                "https://login.microsoftonline.us/",
                "outlook-dod.office365.us",
                "https://outlook-dod.office365.us/IMAP.AccessAsUser.All",
            ),
            (
                "china",
                "https://login.chinacloudapi.cn/",
                "partner.outlook.cn",
                "https://partner.outlook.cn/IMAP.AccessAsUser.All",
            ),
        ] {
            let c = parse(&format!(
                "[imap]\nlisten = \"127.0.0.1:1143\"\n[accounts.\"a@b\"]\nprovider = \"microsoft\"\nclient_id = \"id\"\ntenant = \"t.example\"\ncloud = \"{cloud}\"\n"
            ))
            .unwrap();
            let a = c.account("a@b").unwrap();
            let o = a.oauth().unwrap();
            assert!(
                o.token_url.starts_with(&format!("{login}t.example/oauth2/v2.0/")),
                "{cloud}: {}",
                o.token_url
            );
            assert!(o.auth_url.starts_with(login) && o.device_url.as_deref().unwrap().starts_with(login));
            assert_eq!(a.imap.as_ref().unwrap().host, imap, "{cloud}");
            assert_eq!(o.scopes, vec![scope.to_string(), "offline_access".into()], "{cloud}");
            let c = parse(&format!(
                "[accounts.\"a@b\"]\nprovider = \"microsoft\"\nclient_id = \"id\"\nclient_secret = \"s\"\nflow = \"client_credentials\"\ncloud = \"{cloud}\"\n"
            ))
            .unwrap();
            let o = c.account("a@b").unwrap().oauth().unwrap().clone();
            assert!(
                o.scopes[0].ends_with("/.default") && o.scopes.len() == 1,
                "{cloud}: {:?}",
                o.scopes
            );
        }
        let e =
            parse("[accounts.\"a@b\"]\nprovider = \"google\"\nclient_id = \"id\"\ncloud = \"usgov\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"a@b\".cloud"), "{e}");
        let e =
            parse("[accounts.\"a@b\"]\nprovider = \"microsoft\"\nclient_id = \"id\"\ncloud = \"mars\"\n").unwrap_err();
        assert!(
            e.message.contains("mars") || e.message.contains("unknown variant"),
            "{e}"
        );
    }
}

//! Which resource an access token is for. One consent and one refresh
//! token serve several resources at Microsoft (Exchange Online for IMAP,
//! POP and SMTP; Graph for `sendMail`), but each access token has one
//! audience: an account keeps one access token per resource, each refreshed
//! single-flight under the account's lock like the mail token.

use std::borrow::Cow;

use crate::config::OAuthSettings;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// The mail servers (IMAP, POP3, SMTP): the grant's own scopes.
    #[default]
    Mail,
    /// Microsoft Graph (`graph_scopes`), for accounts that send through it.
    Graph,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Mail => "mail",
            Resource::Graph => "graph",
        }
    }

    /// The resource whose token actually serves `self` for an account:
    /// Graph without scopes of its own (a custom provider without
    /// `graph_scopes`) uses the mail token.
    pub fn effective(self, s: &OAuthSettings) -> Resource {
        match self {
            Resource::Graph if s.graph_scopes.is_none() => Resource::Mail,
            r => r,
        }
    }

    /// The scope a refresh names, `None` for the grant's own.
    pub(super) fn refresh_scope(self, s: &OAuthSettings) -> Option<&[String]> {
        match self {
            Resource::Mail => None,
            Resource::Graph => s.graph_scopes.as_deref(),
        }
    }

    /// The settings an application grant (no refresh token) asks with.
    pub(super) fn app_settings(self, s: &OAuthSettings) -> Cow<'_, OAuthSettings> {
        match (self, &s.graph_scopes) {
            (Resource::Graph, Some(g)) => Cow::Owned(OAuthSettings {
                scopes: g.clone(),
                ..s.clone()
            }),
            _ => Cow::Borrowed(s),
        }
    }
}

//! Running one interactive authorisation (browser, device or client
//! credentials) for `mailproxy login`, whether the command runs it itself or
//! the running `serve` does on its behalf: what the person must see goes
//! through `tell`, so the same code serves a terminal and the control socket.

use std::time::Duration;

use crate::config::{Account, Flow, OAuthSettings};
use crate::oauth::{self, flows, login::Redirect, OAuthError, Tokens};

/// Something the person must see.
pub enum Notice {
    /// A sentence for stderr.
    Say(String),
    /// An address to open in a browser (it was also said).
    Open(String),
    /// The device flow's code to enter at `uri` (or all in one at `complete`).
    Device {
        uri: String,
        code: String,
        complete: Option<String>,
    },
    /// From now on the flow waits for a person (`what` it waits for); the
    /// wait ends when `obtain` returns.
    Waiting(&'static str),
}

impl Notice {
    /// The notice as plain text, for where no terminal shows it.
    pub fn text(&self, account: &str) -> Option<String> {
        match self {
            Notice::Say(t) => Some(t.clone()),
            Notice::Device { uri, code, complete } => Some(match complete {
                Some(c) => format!(
                    "To authorise {account}, open {uri} on any device and enter the code {code}\n(or open {c})\n"
                ),
                None => format!("To authorise {account}, open {uri} on any device and enter the code {code}\n"),
            }),
            Notice::Open(_) | Notice::Waiting(_) => None,
        }
    }
}

/// Whether the account's redirect needs the address pasted back on the
/// terminal (a pinned non-loopback `redirect_uri`), which only the command
/// itself can read.
pub fn needs_paste(settings: &OAuthSettings) -> bool {
    settings
        .redirect_uri
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
        .is_some_and(|u| {
            let host = u.host_str().unwrap_or("").trim_matches(['[', ']']).to_string();
            !(u.scheme() == "http" && crate::endpoint::is_loopback_host(&host))
        })
}

/// Obtains a grant for `account`; nothing is checked or stored here.
pub async fn obtain(
    http: &reqwest::Client,
    account: &Account,
    settings: &OAuthSettings,
    device: bool,
    timeout: Duration,
    tell: &(dyn Fn(Notice) + Send + Sync),
) -> Result<Tokens, OAuthError> {
    if device {
        if let Some(why) = settings.device_flow_refusal(&account.name) {
            return Err(OAuthError::Config(why));
        }
    }
    match (settings.flow, device) {
        (Flow::ClientCredentials | Flow::ServiceAccount, _) => {
            flows::app_token(http, &account.name, &account.username, settings).await
        }
        (Flow::Device, _) | (_, true) => {
            let d = flows::device_start(http, &account.name, settings).await?;
            tell(Notice::Device {
                uri: d.verification_uri.clone(),
                code: d.user_code.clone(),
                complete: d.verification_uri_complete.clone(),
            });
            tell(Notice::Waiting("waiting for the code to be entered"));
            tokio::time::timeout(
                timeout,
                flows::device_poll(http, &account.name, settings, &d, |i| {
                    tell(Notice::Say(format!(
                        "the provider asked to poll more slowly; now every {} s",
                        i.as_secs()
                    )));
                }),
            )
            .await
            .unwrap_or_else(|_| {
                Err(OAuthError::Config(format!(
                    "not approved within {} s",
                    timeout.as_secs()
                )))
            })
        }
        (Flow::AuthorizationCode, false) => {
            let redirect = Redirect::bind(settings)
                .await
                .map_err(|e| OAuthError::Config(format!("cannot receive the provider's redirect: {e}")))?;
            let req = oauth::authorization_request(&account.name, settings, redirect.uri())?;
            // The browser gets the local start address, never the provider's
            // address with its `state` on a command line others can read.
            let start = redirect.start_url(&account.name, &req);
            tell(Notice::Say(format!(
                "To authorise {}, open this address in a browser and sign in:\n\n  {}\n",
                account.name, start
            )));
            tell(Notice::Open(start));
            if matches!(redirect, Redirect::Loopback { .. }) {
                tell(Notice::Waiting("waiting for the sign-in in the browser"));
            }
            let code = redirect.wait(&account.name, &req, timeout).await?;
            oauth::exchange_code(http, &account.name, settings, req, code.expose()).await
        }
    }
}

pub use crate::tokens::grant::NO_REFRESH_TOKEN;

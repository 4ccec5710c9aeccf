//! Is a new grant really the account's? Before any token is stored (browser,
//! device, on-demand, client credentials), it must authenticate as the
//! account's upstream user name at the account's own server: a grant for
//! somebody else (the owner signed in with the wrong account, or someone
//! else finished the sign-in) is refused and nothing is stored.
//!
//! The check is a real XOAUTH2/OAUTHBEARER login, so it holds for every
//! provider and for shared mailboxes whose user name is not the signed-in
//! one. The `email` of an `id_token`, when the provider sent one, only makes
//! the refusal say who signed in; and when the server cannot be reached it
//! is the fallback: a grant whose email is the account's user name is
//! accepted, anything else waits until the server can be asked.

use std::time::Duration;

use crate::config::Account;
use crate::endpoint::Protocol;
use crate::oauth::Tokens;
use crate::tls::ClientConfigs;
use crate::upstream::conn::{Dialer, Server, UpstreamError};
use crate::upstream::imap::ImapUpstream;
use crate::upstream::login::{Exchange, OAuthResponse, UpstreamLogin};
use crate::upstream::pop3::Pop3Upstream;
use crate::upstream::smtp::SmtpUpstream;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The token works, but not for this account.
    #[error("{0}")]
    Mismatch(String),
    /// The account's server could not be asked; nothing is stored.
    #[error("the new authorisation could not be checked: {0}")]
    Unavailable(String),
}

/// Checks that `tokens` authenticate as `account`'s upstream user name, at
/// the first of its IMAP, SMTP and POP3 servers.
pub async fn verify(
    account: &Account,
    tokens: &Tokens,
    tls: &ClientConfigs,
    timeout: Duration,
) -> Result<(), IdentityError> {
    let Some((protocol, endpoint)) = [Protocol::Imap, Protocol::Smtp, Protocol::Pop3]
        .into_iter()
        .find_map(|p| account.endpoint(p).map(|e| (p, e.clone())))
    else {
        if account.graph.is_some() {
            return by_graph_grant(account, tokens);
        }
        return Err(IdentityError::Unavailable(format!(
            "{} has no server configured to check it at",
            account.name
        )));
    };
    let server = Server {
        endpoint,
        ca_file: account.ca_file.clone(),
        insecure: account.insecure_skip_verify,
    };
    let d = Dialer {
        tls,
        step_timeout: timeout,
        total_timeout: timeout.saturating_mul(3),
    };
    let r = match protocol {
        Protocol::Imap => attempt::<ImapUpstream>(&d, &server, account, tokens).await,
        Protocol::Smtp => attempt::<SmtpUpstream>(&d, &server, account, tokens).await,
        Protocol::Pop3 => attempt::<Pop3Upstream>(&d, &server, account, tokens).await,
    };
    let user = &account.username;
    let signed_in = tokens.email.as_deref();
    match r {
        Ok(Exchange::Accepted(())) => {
            tracing::info!(account = %account.name, upstream = %server.endpoint, "the new grant logs in as the account");
            Ok(())
        }
        Ok(Exchange::Rejected(why) | Exchange::Unsupported(why)) => Err(IdentityError::Mismatch(match signed_in {
            Some(email) if !email.eq_ignore_ascii_case(user) => format!(
                "you signed in as {email}, but this account is {user}: nothing was stored; \
                 sign in again as {user} (in a private browser window if the provider remembers the other account)"
            ),
            _ => format!(
                "the new authorisation does not log in as {user} at {}: {}; nothing was stored. \
                 Sign in as {user}, or check that the account's username is right",
                server.endpoint,
                crate::sasl::for_account(&why, &account.name)
            ),
        })),
        Err(e) => match signed_in {
            Some(email) if email.eq_ignore_ascii_case(user) => {
                tracing::warn!(account = %account.name, error = %e, "cannot reach the server to check the new grant; the provider vouches for the identity");
                Ok(())
            }
            Some(email) => Err(IdentityError::Mismatch(format!(
                "you signed in as {email}, but this account is {user}: nothing was stored"
            ))),
            None => Err(IdentityError::Unavailable(format!(
                "{e}; nothing was stored, try again when the server can be reached"
            ))),
        },
    }
}

/// An account that only sends through Microsoft Graph has no mail server
/// to log in at: the provider's word (the `id_token`'s email) decides, and
/// an application grant names no user at all (its mailbox is the config's).
fn by_graph_grant(account: &Account, tokens: &Tokens) -> Result<(), IdentityError> {
    let user = &account.username;
    match tokens.email.as_deref() {
        Some(email) if email.eq_ignore_ascii_case(user) => Ok(()),
        Some(email) => Err(IdentityError::Mismatch(format!(
            "you signed in as {email}, but this account is {user}: nothing was stored; sign in again as {user}"
        ))),
        None if account.oauth().is_some_and(|o| o.flow.app_only()) => Ok(()),
        None => Err(IdentityError::Unavailable(format!(
            "{} sends through Microsoft Graph and the provider did not say who signed in; \
             add the `openid email` scopes or an imap server to check it at",
            account.name
        ))),
    }
}

/// One login with the new token; the connection is dropped afterwards.
async fn attempt<C: UpstreamLogin>(
    d: &Dialer<'_>,
    server: &Server,
    account: &Account,
    tokens: &Tokens,
) -> Result<Exchange<()>, UpstreamError> {
    let mut c = C::connect(d, server, None).await?;
    let sasl = OAuthResponse::new(c.endpoint(), &account.username, &tokens.access, account.mechanism);
    Ok(match c.oauth(&sasl).await? {
        Exchange::Accepted(_) => Exchange::Accepted(()),
        Exchange::Rejected(why) => Exchange::Rejected(why),
        Exchange::Unsupported(why) => Exchange::Unsupported(why),
    })
}

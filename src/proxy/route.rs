//! Login routing: which upstream a client login goes to and with what
//! credentials. For an OAuth account this checks the local password (a
//! wrong one ends here, before any upstream traffic) and obtains a fresh
//! access token; for passthrough the client's own credentials go on.

use std::sync::Arc;

use super::caller::Caller;
use super::Ctx;
use crate::config::{Account, Listener};
use crate::endpoint::Protocol;
use crate::preauth::Failure;
use crate::secret::Secret;
use crate::text::escaped;
use crate::tokens::{describe_pending, AccountTokens, AuthError, Resource, TokenError, TokenManager};
use crate::upstream::conn::Server;
use crate::upstream::login::{self, Credential, LoginFailure, RenewToken};

/// Where one client login goes, and as whom.
pub(crate) type Target = login::Target<Renewal>;

/// An OAuth account's way to a new access token when the server rejected
/// the one it was given.
pub(crate) struct Renewal {
    tokens: Arc<TokenManager>,
    account: Arc<AccountTokens>,
}

impl RenewToken for Renewal {
    fn account(&self) -> &str {
        self.account.name()
    }

    async fn renew(&self, rejected: &Secret) -> Result<Secret, LoginFailure> {
        self.tokens.reject(&self.account, rejected).await;
        self.tokens
            .access_token(&self.account)
            .await
            .map_err(|e| token_failure(self.account.name(), e))
    }
}

/// Resolves a client login to the server and credentials to use.
pub(crate) async fn resolve(
    ctx: &Ctx,
    listener: &Listener,
    login: &str,
    password: Secret,
    caller: &Caller,
) -> Result<Target, LoginFailure> {
    let protocol = listener.protocol;
    let config = ctx.config();
    let Some(account) = config.lookup(login) else {
        return match &listener.fallback {
            Some(fb) => Ok(Target {
                server: Server {
                    endpoint: fb.clone(),
                    ca_file: config.ca_file.clone(),
                    insecure: false,
                },
                user: login.to_string(),
                credential: Credential::Password(password),
            }),
            None => {
                tracing::info!(login = %escaped(login), "login for an unknown account refused");
                Err(LoginFailure::new(Failure::Credentials, "Authentication failed"))
            }
        };
    };
    let server = Server {
        endpoint: endpoint_for(&account, protocol)?,
        ca_file: account.ca_file.clone(),
        insecure: account.insecure_skip_verify,
    };
    let user = account.username.clone();
    let Some(tokens) = ctx.tokens.get(login) else {
        if account.oauth().is_some() {
            // A mailbox of a domain entry that its owner has not set up.
            tracing::info!(account = %account.name, "login to a mailbox that is not set up");
            return Err(not_set_up(&account.name));
        }
        // A passthrough account.
        return Ok(Target {
            server,
            user,
            credential: Credential::Password(password),
        });
    };
    unlock(ctx, &account, &tokens, &password, caller).await?;
    let token = token_of(ctx, &tokens, Resource::Mail).await?;
    Ok(Target {
        server,
        user,
        credential: Credential::Token {
            token,
            mechanism: account.mechanism,
            renew: Renewal {
                tokens: ctx.tokens.clone(),
                account: tokens.clone(),
            },
        },
    })
}

/// A login to an account that sends through Microsoft Graph: its local
/// password checked as for any OAuth login, a Graph token at hand (so a
/// person is told at once when one must act), and no upstream connection.
pub(crate) async fn resolve_graph(
    ctx: &Ctx,
    login: &str,
    password: Secret,
    caller: &Caller,
) -> Result<Arc<AccountTokens>, LoginFailure> {
    let Some(account) = ctx.config().lookup(login) else {
        return Err(LoginFailure::new(Failure::Credentials, "Authentication failed"));
    };
    let Some(tokens) = ctx.tokens.get(login) else {
        tracing::info!(account = %account.name, "login to a mailbox that is not set up");
        return Err(not_set_up(&account.name));
    };
    unlock(ctx, &account, &tokens, &password, caller).await?;
    token_of(ctx, &tokens, Resource::Graph).await?;
    Ok(tokens)
}

fn not_set_up(name: &str) -> LoginFailure {
    LoginFailure::new(
        Failure::Action,
        format!("{name} has no local password yet: its owner runs `mailproxy login {name}` on this machine"),
    )
}

/// The local password opens the account, or the login ends here.
async fn unlock(
    ctx: &Ctx,
    account: &Account,
    tokens: &Arc<AccountTokens>,
    password: &Secret,
    caller: &Caller,
) -> Result<(), LoginFailure> {
    match ctx.tokens.authenticate(tokens, password, caller.lane()).await {
        Ok(()) => Ok(()),
        Err(AuthError::NotAuthorized(_)) => Err(on_demand(ctx, tokens).await),
        Err(AuthError::WrongPassword) => {
            tracing::info!(account = %account.name, "wrong local password");
            Err(LoginFailure::new(Failure::Credentials, "Authentication failed"))
        }
        Err(e @ AuthError::NoLocalPassword(_)) => {
            tracing::warn!(account = %account.name, error = %e, "login to an account that is not ready");
            Err(LoginFailure::new(Failure::Action, e.to_string()))
        }
        Err(e @ AuthError::Busy(_)) => Err(LoginFailure::new(Failure::Unavailable, e.to_string())),
        Err(e @ AuthError::Store(_)) => Err(store_unreachable(&account.name, &e)),
        Err(e @ AuthError::Vault(_)) => {
            tracing::error!(account = %account.name, error = %e, "vault error");
            Err(LoginFailure::new(Failure::Action, e.to_string()))
        }
    }
}

/// A fresh access token of resource `r`; without a grant, the
/// authorisation starts and the client is told what a person must do.
async fn token_of(ctx: &Ctx, tokens: &Arc<AccountTokens>, r: Resource) -> Result<Secret, LoginFailure> {
    let name = tokens.name();
    match ctx.tokens.access_token_for(tokens, r).await {
        Ok(t) => Ok(t),
        // A shared mailbox's grant is its owner's: that one is authorised.
        Err(e @ TokenError::NeedsLogin { .. }) => Err(match ctx.tokens.grant_of(tokens) {
            Ok(grant) => on_demand(ctx, &grant).await,
            Err(_) => token_failure(name, e),
        }),
        Err(e) => Err(token_failure(name, e)),
    }
}

fn endpoint_for(account: &Account, protocol: Protocol) -> Result<crate::endpoint::Endpoint, LoginFailure> {
    account.endpoint(protocol).cloned().ok_or_else(|| {
        LoginFailure::new(
            Failure::Action,
            format!(
                "{} has no {protocol} server configured; set {protocol} = \"...\" for it",
                account.name
            ),
        )
    })
}

/// The account has no usable token: start (or join) its authorisation and
/// tell the client what a person has to do. The client is only ever shown
/// the local start address (or the status page), never the provider's URL
/// with its `state`: whoever holds that could finish the sign-in.
async fn on_demand(ctx: &Ctx, tokens: &Arc<AccountTokens>) -> LoginFailure {
    let name = tokens.name().to_string();
    match ctx.tokens.start_authorization(tokens).await {
        Ok(Some(p)) | Err(TokenError::Pending { pending: p, .. }) => LoginFailure::new(
            Failure::Action,
            format!("{name} is not authorised yet: {}", describe_pending(&p)),
        ),
        Ok(None) => LoginFailure::new(Failure::Unavailable, format!("{name} is busy; log in again")),
        Err(e) => token_failure(&name, e),
    }
}

/// The token store did not answer: the client is told to try again in
/// plain words, the log says what went wrong.
fn store_unreachable(account: &str, e: &dyn std::fmt::Display) -> LoginFailure {
    tracing::error!(account = %account, error = %e, "login refused for now");
    LoginFailure::new(
        Failure::Unavailable,
        "mailproxy cannot reach its token store right now; try again in a moment",
    )
}

/// No access token could be had: a person must act, or it is temporary.
pub(crate) fn token_failure(account: &str, e: TokenError) -> LoginFailure {
    if let TokenError::Store(_) = e {
        return store_unreachable(account, &e);
    }
    let kind = if e.is_transient() {
        Failure::Unavailable
    } else {
        Failure::Action
    };
    tracing::warn!(account = %account, error = %e, "no access token");
    LoginFailure::new(kind, e.to_string())
}

//! How mailproxy logs in upstream, for every protocol: one policy, one
//! place. Each protocol supplies only its exchanges (an [`UpstreamLogin`]);
//! what to do with their outcomes is decided here.
//!
//! The retry rule: when the server *rejects* an OAuth token (a failure
//! challenge, or a plain NO / 535 / -ERR to the SASL exchange), the token is
//! dropped, a fresh one is fetched (one refresh per account, however many
//! sessions ask) and the login is tried once more on the same connection. A
//! token the proxy believed fresh can be dead (revoked, clock skew, the
//! provider rotated signing keys), and one retry costs one refresh. It is
//! never retried when the server does not offer the mechanism at all
//! (`Unsupported`: a person must change the config) or when the connection
//! failed (`Unavailable`: retrying would only wait twice as long). A
//! password (passthrough) is never retried: the server's verdict stands.
//!
//! Where the fresh token comes from is not this module's business: the
//! login's [`Credential`] carries a [`RenewToken`], which the caller
//! implements over its token store.

use super::conn::{Conn, Dialer, Server, UpstreamError};
use crate::config::Mechanism;
use crate::endpoint::Endpoint;
use crate::preauth::Failure;
use crate::sasl;
use crate::secret::Secret;

/// What one login exchange with the server came to.
pub(crate) enum Exchange<S> {
    /// Logged in; `S` is what the client is answered with.
    Accepted(S),
    /// The server refused these credentials (the reason, in words).
    Rejected(String),
    /// The server does not offer this way of logging in.
    Unsupported(String),
}

/// One protocol's client side, just far enough to log in.
pub(crate) trait UpstreamLogin: Sized {
    type Success;

    /// Connects, reads the greeting, does STARTTLS when the URL says so and
    /// learns the capabilities. `client_name` is what the client called
    /// itself (SMTP EHLO), when it did.
    async fn connect(d: &Dialer<'_>, server: &Server, client_name: Option<&str>) -> Result<Self, UpstreamError>;

    /// Where it is connected (OAUTHBEARER names the host and port).
    fn endpoint(&self) -> &Endpoint;

    /// SASL XOAUTH2 / OAUTHBEARER with the response built for this server.
    async fn oauth(&mut self, sasl: &OAuthResponse) -> Result<Exchange<Self::Success>, UpstreamError>;

    /// Passthrough: the client's own user name and password.
    async fn password(&mut self, user: &str, password: &Secret) -> Result<Exchange<Self::Success>, UpstreamError>;

    /// The connection, for the relay (with what was read past the login).
    fn into_conn(self) -> Conn;
}

/// Where one login goes, and as whom.
pub(crate) struct Target<R> {
    pub server: Server,
    /// The name sent upstream.
    pub user: String,
    pub credential: Credential<R>,
}

pub(crate) enum Credential<R> {
    /// OAuth: an access token, and `renew` to ask for a new one if the
    /// server rejects it.
    Token {
        token: Secret,
        mechanism: Mechanism,
        renew: R,
    },
    /// Passthrough: the client's own password.
    Password(Secret),
}

impl<R> Target<R> {
    /// The client's own password, when it is passed through (its failures
    /// are the upstream's verdict, counted by the login guard).
    pub(crate) fn passthrough_password(&self) -> Option<&Secret> {
        match &self.credential {
            Credential::Password(p) => Some(p),
            Credential::Token { .. } => None,
        }
    }
}

/// A fresh access token for the account a rejected token was for.
pub(crate) trait RenewToken {
    /// The account's name, for the words of a final refusal.
    fn account(&self) -> &str;

    /// Drops `rejected` and returns a fresh token (one refresh per account,
    /// however many sessions ask), or why no token can be had.
    async fn renew(&self, rejected: &Secret) -> Result<Secret, LoginFailure>;
}

/// Why a login did not go through, in words for the client and the log.
#[derive(Debug)]
pub struct LoginFailure {
    pub kind: Failure,
    pub text: String,
}

impl LoginFailure {
    pub fn new(kind: Failure, text: impl Into<String>) -> Self {
        LoginFailure {
            kind,
            text: text.into(),
        }
    }
}

/// The typed outcome of a login attempt upstream, and the one table that
/// turns it into what the client is told.
pub(crate) enum Outcome {
    Rejected { reason: String },
    Unsupported { reason: String },
    Unavailable { reason: String },
}

impl From<Outcome> for LoginFailure {
    fn from(o: Outcome) -> LoginFailure {
        match o {
            Outcome::Rejected { reason } => LoginFailure::new(Failure::Credentials, reason),
            Outcome::Unsupported { reason } => LoginFailure::new(Failure::Action, reason),
            Outcome::Unavailable { reason } => LoginFailure::new(Failure::Unavailable, reason),
        }
    }
}

impl From<UpstreamError> for LoginFailure {
    fn from(e: UpstreamError) -> LoginFailure {
        Outcome::Unavailable { reason: e.to_string() }.into()
    }
}

/// Logs in at `target` as the policy above says. Returns the logged-in
/// client and what the client is to be answered with.
pub(crate) async fn log_in<C: UpstreamLogin, R: RenewToken>(
    d: &Dialer<'_>,
    target: Target<R>,
    client_name: Option<&str>,
) -> Result<(C, C::Success), LoginFailure> {
    let r = attempt::<C, R>(d, &target, client_name).await;
    if let Err(f) = &r {
        tracing::warn!(upstream = %target.server.endpoint, class = ?f.kind, reason = %f.text, "upstream login failed");
    }
    r
}

async fn attempt<C: UpstreamLogin, R: RenewToken>(
    d: &Dialer<'_>,
    target: &Target<R>,
    client_name: Option<&str>,
) -> Result<(C, C::Success), LoginFailure> {
    let mut client = C::connect(d, &target.server, client_name).await?;
    let success = match &target.credential {
        Credential::Password(pw) => match client.password(&target.user, pw).await? {
            Exchange::Accepted(s) => s,
            Exchange::Rejected(reason) => return Err(Outcome::Rejected { reason }.into()),
            Exchange::Unsupported(reason) => return Err(Outcome::Unsupported { reason }.into()),
        },
        Credential::Token {
            token,
            mechanism,
            renew,
        } => with_fresh_token(&mut client, &target.user, renew, token.clone(), *mechanism).await?,
    };
    Ok((client, success))
}

/// OAuth with the retry rule of this module.
async fn with_fresh_token<C: UpstreamLogin, R: RenewToken>(
    client: &mut C,
    user: &str,
    renew: &R,
    mut token: Secret,
    mechanism: Mechanism,
) -> Result<C::Success, LoginFailure> {
    let mut retried = false;
    loop {
        let sasl = OAuthResponse::new(client.endpoint(), user, &token, mechanism);
        match client.oauth(&sasl).await? {
            Exchange::Accepted(s) => return Ok(s),
            Exchange::Unsupported(reason) => return Err(Outcome::Unsupported { reason }.into()),
            Exchange::Rejected(reason) if retried => {
                let reason = sasl::for_account(&reason, renew.account());
                let reason = crate::oauth::errors::upstream_rejection(user, reason);
                return Err(Outcome::Rejected { reason }.into());
            }
            Exchange::Rejected(reason) => {
                tracing::info!(%reason, "upstream rejected the access token; refreshing and retrying once");
                retried = true;
                token = renew.renew(&token).await?;
            }
        }
    }
}

/// The SASL initial response for an OAuth login (XOAUTH2 or OAUTHBEARER),
/// built once by the retry rule so each protocol only sends it.
pub(crate) struct OAuthResponse {
    mechanism: Mechanism,
    response: zeroize::Zeroizing<String>,
}

impl OAuthResponse {
    pub(crate) fn new(ep: &Endpoint, user: &str, token: &Secret, mechanism: Mechanism) -> Self {
        let response = match mechanism {
            Mechanism::Xoauth2 => sasl::xoauth2(user, token.expose()),
            Mechanism::Oauthbearer => sasl::oauthbearer(user, token.expose(), &ep.host, ep.port),
        };
        OAuthResponse { mechanism, response }
    }

    /// The mechanism's SASL name.
    pub(crate) fn name(&self) -> &'static str {
        match self.mechanism {
            Mechanism::Xoauth2 => "XOAUTH2",
            Mechanism::Oauthbearer => "OAUTHBEARER",
        }
    }

    /// The base64 initial response (it carries the token).
    pub(crate) fn response(&self) -> &str {
        &self.response
    }

    /// The answer to the server's failure challenge.
    pub(crate) fn error_ack(&self) -> &'static str {
        error_ack(self.mechanism)
    }

    pub(crate) fn mechanism(&self) -> Mechanism {
        self.mechanism
    }
}

/// The answer to a server's OAuth failure challenge, as each mechanism
/// requires before the server sends its final verdict.
pub(crate) fn error_ack(mechanism: Mechanism) -> &'static str {
    match mechanism {
        Mechanism::Oauthbearer => sasl::OAUTHBEARER_ERROR_ACK,
        Mechanism::Xoauth2 => sasl::XOAUTH2_ERROR_ACK,
    }
}

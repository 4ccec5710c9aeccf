//! A minimal SMTP submission client towards the upstream: greeting, EHLO,
//! STARTTLS and AUTH, keeping the server's EHLO keywords for the client's
//! own EHLO after the login.

use super::conn::{Conn, Dialer, Server, UpstreamError, MAX_RESPONSE};
use super::login::{Exchange, OAuthResponse, UpstreamLogin};
use crate::endpoint::{Endpoint, Security};
use crate::sasl;
use crate::secret::Secret;
use crate::smtp::reply::{self, Reply};

pub(crate) struct SmtpUpstream {
    c: Conn,
    /// The server's EHLO keywords (after STARTTLS when used), for the
    /// client's post-login EHLO.
    keywords: Vec<String>,
}

impl UpstreamLogin for SmtpUpstream {
    type Success = Vec<String>;

    /// Greeting, EHLO (again after STARTTLS), keeping the keywords.
    async fn connect(d: &Dialer<'_>, server: &Server, client_name: Option<&str>) -> Result<Self, UpstreamError> {
        let name = client_name
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
            .unwrap_or("localhost")
            .to_string();
        let mut me = SmtpUpstream {
            c: Conn::connect(d, server).await?,
            keywords: Vec::new(),
        };
        let greeting = me.read().await?;
        if greeting.code != 220 {
            return Err(me
                .c
                .protocol_error(format!("refused the connection: {}", greeting.one_line())));
        }
        let mut ehlo = me.command(&format!("EHLO {name}")).await?;
        if ehlo.code != 250 {
            return Err(me.c.protocol_error(format!("refused EHLO: {}", ehlo.one_line())));
        }
        if server.endpoint.security == Security::StartTls {
            let r = me.command("STARTTLS").await?;
            if r.code != 220 {
                return Err(me.c.protocol_error(format!("refused STARTTLS: {}", r.one_line())));
            }
            me.c = me.c.upgrade().await?;
            // Capabilities from before TLS are not to be trusted: ask again.
            ehlo = me.command(&format!("EHLO {name}")).await?;
            if ehlo.code != 250 {
                return Err(me
                    .c
                    .protocol_error(format!("refused EHLO after STARTTLS: {}", ehlo.one_line())));
            }
        }
        me.keywords = reply::ehlo_keywords(&ehlo);
        Ok(me)
    }

    fn endpoint(&self) -> &Endpoint {
        &self.c.endpoint
    }

    async fn oauth(&mut self, sasl: &OAuthResponse) -> Result<Exchange<Vec<String>>, UpstreamError> {
        let (name, ir) = (sasl.name(), sasl.response());
        let line = Secret::new(format!("AUTH {name} {ir}\r\n"));
        self.c.send(line.expose().as_bytes()).await?;
        let mut r = self.read().await?;
        let mut challenge = None;
        if r.code == 334 {
            // The failure challenge: acknowledge it, then the server says 5xx.
            challenge = r.oauth_error_challenge();
            self.c.send(format!("{}\r\n", sasl.error_ack()).as_bytes()).await?;
            r = self.read().await?;
        }
        self.verdict(&r, challenge.as_ref())
    }

    /// AUTH PLAIN where offered (or nothing is said), else AUTH LOGIN.
    async fn password(&mut self, user: &str, password: &Secret) -> Result<Exchange<Vec<String>>, UpstreamError> {
        let kws = &self.keywords;
        let r = if reply::has_auth_mechanism(kws, "PLAIN") || !reply::has_auth_mechanism(kws, "LOGIN") {
            let ir = sasl::encode_plain("", user, password.expose());
            let line = Secret::new(format!("AUTH PLAIN {}\r\n", ir.as_str()));
            self.c.send(line.expose().as_bytes()).await?;
            self.read().await?
        } else {
            let mut r = self.command("AUTH LOGIN").await?;
            for step in [user, password.expose()] {
                if r.code != 334 {
                    break;
                }
                let line = Secret::new(format!("{}\r\n", sasl::encode_login_step(step).as_str()));
                self.c.send(line.expose().as_bytes()).await?;
                r = self.read().await?;
            }
            r
        };
        self.verdict(&r, None)
    }

    fn into_conn(self) -> Conn {
        self.c
    }
}

impl SmtpUpstream {
    async fn read(&mut self) -> Result<Reply, UpstreamError> {
        self.c.read(|b| reply::find_reply(b, MAX_RESPONSE)).await
    }

    async fn command(&mut self, line: &str) -> Result<Reply, UpstreamError> {
        self.c.send(format!("{line}\r\n").as_bytes()).await?;
        self.read().await
    }

    /// The server's final answer to an AUTH: 235 in, 4xx try later (as the
    /// server itself says), 502/504 no such mechanism, other 5xx refused.
    fn verdict(
        &self,
        r: &Reply,
        challenge: Option<&sasl::OAuthChallenge>,
    ) -> Result<Exchange<Vec<String>>, UpstreamError> {
        let ep = &self.c.endpoint;
        match r.code {
            235 => Ok(Exchange::Accepted(self.keywords.clone())),
            400..=499 => Err(self.c.protocol_error(format!("answered: {}", r.one_line()))),
            502 | 504 => Ok(Exchange::Unsupported(format!(
                "{ep} does not offer this login: {}",
                r.one_line()
            ))),
            _ => Ok(Exchange::Rejected(format!(
                "{ep} refused the login: {}",
                explain_failure(r, challenge)
            ))),
        }
    }
}

/// A sentence for a failed SMTP AUTH, decoding Microsoft's usual cases.
fn explain_failure(r: &Reply, challenge: Option<&sasl::OAuthChallenge>) -> String {
    let text = r.one_line();
    let lower = text.to_ascii_lowercase();
    if r.enhanced_code() == Some("5.7.139") || lower.contains("smtpclientauthentication is disabled") {
        return "SMTP AUTH is disabled for this tenant or mailbox (5.7.139); an Exchange administrator must enable it \
                (Set-CASMailbox -SmtpClientAuthenticationDisabled $false, or in the Microsoft 365 admin center under \
                Mail > Authenticated SMTP), or set smtp = \"graph\" for this account so mailproxy sends through \
                Microsoft Graph instead (permission Mail.Send; see the README's Graph section)"
            .to_string();
    }
    if lower.contains("5.7.57") || lower.contains("client was not authenticated to send anonymous mail") {
        return "the server did not accept the login for sending (5.7.57); check that the token has the SMTP.Send scope".into();
    }
    if lower.contains("5.7.3") && lower.contains("authentication unsuccessful") {
        return "the server rejected the token (5.7.3 Authentication unsuccessful): the token may lack the SMTP.Send \
                scope or the user name differs from the signed-in account"
            .into();
    }
    match challenge {
        Some(c) => c.explain(),
        None => format!("the server said: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_auth_disabled_names_graph_as_the_way_out() {
        let r = Reply {
            code: 535,
            lines: vec![
                "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.".into(),
            ],
        };
        let why = explain_failure(&r, None);
        assert!(
            why.contains("5.7.139") && why.contains("smtp = \"graph\"") && why.contains("Mail.Send"),
            "{why}"
        );
    }
}

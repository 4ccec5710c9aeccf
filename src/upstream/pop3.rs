//! A minimal POP3 client towards the upstream, just enough to log in.

use super::conn::{Conn, Dialer, Server, UpstreamError, MAX_RESPONSE};
use super::login::{Exchange, OAuthResponse, UpstreamLogin};
use crate::endpoint::{Endpoint, Security};
use crate::pop3::response::{self, Response, StatusLine};
use crate::sasl::OAuthChallenge;
use crate::secret::Secret;

pub(crate) struct Pop3Upstream {
    c: Conn,
}

impl UpstreamLogin for Pop3Upstream {
    type Success = ();

    async fn connect(d: &Dialer<'_>, server: &Server, _: Option<&str>) -> Result<Self, UpstreamError> {
        let mut me = Pop3Upstream {
            c: Conn::connect(d, server).await?,
        };
        let g = me.status("the greeting").await?;
        if !g.ok {
            return Err(me.c.protocol_error(format!("refused the connection: {}", g.describe())));
        }
        if server.endpoint.security == Security::StartTls {
            me.c.send(b"STLS\r\n").await?;
            let r = me.status("STLS").await?;
            if !r.ok {
                return Err(me.c.protocol_error(format!("refused STLS: {}", r.describe())));
            }
            me.c = me.c.upgrade().await?;
        }
        Ok(me)
    }

    fn endpoint(&self) -> &Endpoint {
        &self.c.endpoint
    }

    /// `AUTH XOAUTH2` in two steps: Microsoft wants the token after the `+`.
    async fn oauth(&mut self, sasl: &OAuthResponse) -> Result<Exchange<()>, UpstreamError> {
        let (name, ir) = (sasl.name(), sasl.response());
        self.c.send(format!("AUTH {name}\r\n").as_bytes()).await?;
        if let Response::Status(s) = self.read().await? {
            return Ok(Exchange::Unsupported(format!(
                "{} does not accept AUTH {name}: {}",
                self.c.endpoint,
                s.describe()
            )));
        }
        let line = Secret::new(format!("{ir}\r\n"));
        self.c.send(line.expose().as_bytes()).await?;
        let mut r = self.read().await?;
        let challenge = r.oauth_error_challenge();
        if let Response::Continuation(_) = r {
            self.c.send(format!("{}\r\n", sasl.error_ack()).as_bytes()).await?;
            r = self.read().await?;
        }
        let s = self.expect_status(r, "AUTH")?;
        if s.ok {
            return Ok(Exchange::Accepted(()));
        }
        let why = challenge
            .as_ref()
            .map(OAuthChallenge::explain)
            .unwrap_or_else(|| format!("the server said: {}", s.describe()));
        self.refused(&s, why)
    }

    /// `USER` and `PASS` with the client's own credentials.
    async fn password(&mut self, user: &str, password: &Secret) -> Result<Exchange<()>, UpstreamError> {
        let line = Secret::new(format!("USER {user}\r\n"));
        self.c.send(line.expose().as_bytes()).await?;
        let r = self.status("USER").await?;
        if !r.ok {
            return self.refused(&r, r.describe());
        }
        let line = Secret::new(format!("PASS {}\r\n", password.expose()));
        self.c.send(line.expose().as_bytes()).await?;
        let r = self.status("PASS").await?;
        if r.ok {
            return Ok(Exchange::Accepted(()));
        }
        self.refused(&r, r.describe())
    }

    fn into_conn(self) -> Conn {
        self.c
    }
}

impl Pop3Upstream {
    async fn read(&mut self) -> Result<Response, UpstreamError> {
        self.c
            .read(|b| match response::find_line(b, MAX_RESPONSE) {
                Ok(Some(len)) => response::parse_response(&b[..len]).map(|r| Some((len, r))),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            })
            .await
    }

    fn expect_status(&self, r: Response, what: &str) -> Result<StatusLine, UpstreamError> {
        match r {
            Response::Status(s) => Ok(s),
            Response::Continuation(_) => Err(self
                .c
                .protocol_error(format!("answered {what} with an unexpected continuation"))),
        }
    }

    async fn status(&mut self, what: &str) -> Result<StatusLine, UpstreamError> {
        let r = self.read().await?;
        self.expect_status(r, what)
    }

    /// A `-ERR` to a login: RFC 3206 `SYS/TEMP` and `IN-USE` mean try
    /// later (as the server itself says); anything else is a refusal.
    fn refused(&self, r: &StatusLine, why: String) -> Result<Exchange<()>, UpstreamError> {
        match r.code.as_deref() {
            Some(c) if c.starts_with("SYS/TEMP") || c == "IN-USE" => {
                Err(self.c.protocol_error(format!("answered: {}", r.describe())))
            }
            _ => Ok(Exchange::Rejected(format!(
                "{} refused the login: {why}",
                self.c.endpoint
            ))),
        }
    }
}

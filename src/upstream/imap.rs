//! A minimal IMAP client towards the upstream, just enough to reach the
//! authenticated state.

use super::conn::{Conn, Dialer, Server, UpstreamError, MAX_RESPONSE};
use super::login::{error_ack, Exchange, OAuthResponse, UpstreamLogin};
use crate::config::Mechanism;
use crate::endpoint::{Endpoint, Security};
use crate::imap::preauth::LoggedIn;
use crate::imap::response::{self, has_capability, Response, Status, StatusResponse};
use crate::sasl;
use crate::secret::Secret;

pub(crate) struct ImapUpstream {
    c: Conn,
    caps: Vec<String>,
    next_tag: u32,
}

impl UpstreamLogin for ImapUpstream {
    type Success = LoggedIn;

    async fn connect(d: &Dialer<'_>, server: &Server, _: Option<&str>) -> Result<Self, UpstreamError> {
        let c = Conn::connect(d, server).await?;
        let mut me = ImapUpstream {
            c,
            caps: Vec::new(),
            next_tag: 0,
        };
        let greeting = me.read().await?;
        let g = response::parse_greeting(&greeting)
            .map_err(|e| me.c.protocol_error(format!("greeted with garbage: {e}")))?;
        match g.status {
            Status::Ok => me.caps = g.capabilities().unwrap_or_default(),
            Status::Bye => return Err(me.c.protocol_error(format!("refused the connection: {}", g.text))),
            _ => {
                return Err(me
                    .c
                    .protocol_error(format!("sent an unexpected greeting ({:?})", g.status)))
            }
        }
        if server.endpoint.security == Security::StartTls {
            let (_, tagged) = me.command("STARTTLS").await?;
            if tagged.status != Status::Ok {
                return Err(me.c.protocol_error(format!("refused STARTTLS: {}", tagged.text)));
            }
            me.c = me.c.upgrade().await?;
            me.caps.clear(); // capabilities from before TLS are not to be trusted
        }
        if !has_capability(&me.caps, "IMAP4rev1") && !has_capability(&me.caps, "IMAP4rev2") {
            let (untagged, tagged) = me.command("CAPABILITY").await?;
            if tagged.status != Status::Ok {
                return Err(me.c.protocol_error(format!("refused CAPABILITY: {}", tagged.text)));
            }
            for line in untagged {
                if let Ok(Response::Capability(caps)) = response::parse_response(&line) {
                    me.caps = caps;
                }
            }
        }
        Ok(me)
    }

    fn endpoint(&self) -> &Endpoint {
        &self.c.endpoint
    }

    async fn oauth(&mut self, sasl: &OAuthResponse) -> Result<Exchange<LoggedIn>, UpstreamError> {
        let (name, ir) = (sasl.name(), sasl.response());
        let tag = self.tag();
        if has_capability(&self.caps, "SASL-IR") {
            let line = Secret::new(format!("{tag} AUTHENTICATE {name} {ir}\r\n"));
            self.c.send(line.expose().as_bytes()).await?;
        } else {
            self.c.send(format!("{tag} AUTHENTICATE {name}\r\n").as_bytes()).await?;
            let cont = self.read().await?;
            match response::parse_response(&cont) {
                Ok(Response::Continuation(_)) => {
                    let line = Secret::new(format!("{ir}\r\n"));
                    self.c.send(line.expose().as_bytes()).await?;
                }
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag.as_str()) => {
                    return Ok(Exchange::Unsupported(format!(
                        "{} does not accept AUTHENTICATE {name}: {}",
                        self.c.endpoint, s.text
                    )));
                }
                _ => return Err(self.c.protocol_error("answered AUTHENTICATE with something unexpected")),
            }
        }
        self.finish_auth(&tag, Some(sasl.mechanism())).await
    }

    /// LOGIN with the client's own credentials, as quoted strings where
    /// possible and literals otherwise (8-bit, long).
    async fn password(&mut self, user: &str, password: &Secret) -> Result<Exchange<LoggedIn>, UpstreamError> {
        let tag = self.tag();
        let literal_plus = has_capability(&self.caps, "LITERAL+");
        let mut line = Secret::new(format!("{tag} LOGIN"));
        for arg in [user, password.expose()] {
            if arg.len() < 1000 && arg.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                let quoted: String = arg
                    .chars()
                    .flat_map(|c| if c == '"' || c == '\\' { vec!['\\', c] } else { vec![c] })
                    .collect();
                line = Secret::new(format!("{} \"{quoted}\"", line.expose()));
            } else {
                let plus = if literal_plus { "+" } else { "" };
                self.c
                    .send(format!("{} {{{}{plus}}}\r\n", line.expose(), arg.len()).as_bytes())
                    .await?;
                if !literal_plus {
                    let cont = self.read().await?;
                    if !matches!(response::parse_response(&cont), Ok(Response::Continuation(_))) {
                        return Ok(Exchange::Rejected(format!(
                            "{} refused the login literal",
                            self.c.endpoint
                        )));
                    }
                }
                self.c.send(arg.as_bytes()).await?;
                line = Secret::default();
            }
        }
        self.c.send(format!("{}\r\n", line.expose()).as_bytes()).await?;
        self.finish_auth(&tag, None).await
    }

    fn into_conn(self) -> Conn {
        self.c
    }
}

impl ImapUpstream {
    async fn read(&mut self) -> Result<Vec<u8>, UpstreamError> {
        self.c.read(|b| response::frame(b, MAX_RESPONSE)).await
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("mp{}", self.next_tag)
    }

    /// Sends a simple command and reads to its tagged completion.
    async fn command(&mut self, cmd: &str) -> Result<(Vec<Vec<u8>>, StatusResponse), UpstreamError> {
        let tag = self.tag();
        self.c.send(format!("{tag} {cmd}\r\n").as_bytes()).await?;
        let mut untagged = Vec::new();
        loop {
            let line = self.read().await?;
            match response::parse_response(&line) {
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag.as_str()) => return Ok((untagged, s)),
                Ok(Response::Status(s)) if s.status == Status::Bye => {
                    return Err(self.c.protocol_error(format!("closed the session: {}", s.text)))
                }
                _ => untagged.push(line),
            }
        }
    }

    /// Reads the rest of an AUTHENTICATE/LOGIN exchange after its last
    /// client line. A continuation here is the OAuth failure challenge: it is
    /// answered with an empty (XOAUTH2) or dummy (OAUTHBEARER) response, and
    /// the server then sends its tagged NO.
    async fn finish_auth(
        &mut self,
        tag: &str,
        mechanism: Option<Mechanism>,
    ) -> Result<Exchange<LoggedIn>, UpstreamError> {
        let mut untagged = Vec::new();
        let mut challenge = None;
        loop {
            let line = self.read().await?;
            match response::parse_response(&line) {
                Ok(Response::Continuation(text)) => {
                    challenge = sasl::decode_error_challenge(text.trim().as_bytes());
                    let ack = error_ack(mechanism.unwrap_or(Mechanism::Xoauth2));
                    self.c.send(format!("{ack}\r\n").as_bytes()).await?;
                }
                Ok(Response::Status(s)) if s.tag.as_deref() == Some(tag) => {
                    if s.status == Status::Ok {
                        return Ok(Exchange::Accepted(LoggedIn {
                            untagged: untagged.concat(),
                            tagged: line,
                        }));
                    }
                    let why = match &challenge {
                        Some(c) => c.explain(),
                        None => format!("the server said: {}", s.text),
                    };
                    return Ok(Exchange::Rejected(format!(
                        "{} refused the login: {why}",
                        self.c.endpoint
                    )));
                }
                Ok(Response::Status(s)) if s.status == Status::Bye => {
                    return Err(self.c.protocol_error(format!("closed the session: {}", s.text)))
                }
                _ => untagged.push(line),
            }
        }
    }
}

//! The upstream connection before the hand-off, shared by the three
//! protocols: connect (implicit TLS or plaintext), read framed responses into
//! a buffer that keeps whatever arrives past them, upgrade with STARTTLS.
//!
//! Everything an upstream can make the proxy hold before the hand-off is
//! bounded here, once for all protocols: each response's size, the total
//! bytes of the whole pre-login exchange, the time for each answer and for
//! the whole exchange. Past a bound the session ends with an error naming
//! the upstream; no other session is affected.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::endpoint::{Endpoint, Security};
use crate::net::{self, ConnectError, Stream};
use crate::tls::{ClientConfigs, TlsError};

/// Largest single pre-login response we accept from a server.
pub(crate) const MAX_RESPONSE: usize = 64 * 1024;
/// Largest pre-login exchange in all (greeting, capabilities, untagged
/// chatter, the login's answer): real servers send a few KiB.
pub(crate) const MAX_EXCHANGE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{endpoint}: {source}")]
    Tls { endpoint: Endpoint, source: TlsError },
    #[error("{endpoint}: no answer within {} s", .after.as_secs())]
    Timeout { endpoint: Endpoint, after: Duration },
    #[error("{endpoint}: the login did not complete within {} s; giving up on this server", .after.as_secs())]
    TooSlow { endpoint: Endpoint, after: Duration },
    #[error("{endpoint}: {source}")]
    Io { endpoint: Endpoint, source: std::io::Error },
    #[error("{endpoint}: the server closed the connection")]
    Closed { endpoint: Endpoint },
    #[error("{endpoint}: a response longer than {MAX_RESPONSE} bytes before login")]
    ResponseTooLong { endpoint: Endpoint },
    #[error("{endpoint}: the server sent more than {MAX_EXCHANGE} bytes before login; giving up on this server")]
    TooMuch { endpoint: Endpoint },
    /// The server said something that does not fit the protocol here.
    #[error("{endpoint} {what}")]
    Protocol { endpoint: Endpoint, what: String },
}

/// What dialling an upstream needs from the running proxy.
#[derive(Clone, Copy)]
pub(crate) struct Dialer<'a> {
    pub tls: &'a ClientConfigs,
    /// For the TCP connect, the TLS handshake and each answer.
    pub step_timeout: Duration,
    /// For the whole pre-login exchange.
    pub total_timeout: Duration,
}

/// Where and how to reach the server (the credentials travel separately).
#[derive(Clone, Debug)]
pub(crate) struct Server {
    pub endpoint: Endpoint,
    pub ca_file: Option<PathBuf>,
    pub insecure: bool,
}

pub(crate) struct Conn {
    pub stream: Stream,
    /// Bytes read past the last response consumed; forwarded to the client
    /// at the hand-off so nothing is lost.
    pub buf: Vec<u8>,
    pub endpoint: Endpoint,
    tls: TlsChoice,
    step_timeout: Duration,
    deadline: Instant,
    total_timeout: Duration,
    /// Bytes received so far, for [`MAX_EXCHANGE`].
    received: usize,
}

/// The TLS client config, chosen once at connect (needed again for STARTTLS).
#[derive(Clone)]
enum TlsChoice {
    Verified(std::sync::Arc<rustls::ClientConfig>),
    Insecure(std::sync::Arc<rustls::ClientConfig>),
}

impl Conn {
    /// The stream and the bytes read past the login, for the hand-off; the
    /// rest (TLS choice, endpoint) is freed now rather than held for the
    /// whole session.
    pub(crate) fn into_parts(self) -> (Stream, Vec<u8>) {
        (self.stream, self.buf)
    }

    pub(crate) async fn connect(d: &Dialer<'_>, server: &Server) -> Result<Conn, UpstreamError> {
        let ep = &server.endpoint;
        let tls = if server.insecure {
            TlsChoice::Insecure(d.tls.insecure())
        } else {
            let cfg = d
                .tls
                .get(server.ca_file.as_deref())
                .map_err(|source| UpstreamError::Tls {
                    endpoint: ep.clone(),
                    source,
                })?;
            TlsChoice::Verified(cfg)
        };
        let deadline = Instant::now() + d.total_timeout;
        let tcp = net::connect_tcp(ep, d.step_timeout.min(d.total_timeout)).await?;
        let mut c = Conn {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            endpoint: ep.clone(),
            tls,
            step_timeout: d.step_timeout,
            deadline,
            total_timeout: d.total_timeout,
            received: 0,
        };
        if ep.security == Security::Tls {
            c = c.handshake().await?;
        }
        Ok(c)
    }

    fn err(&self, what: impl Into<String>) -> UpstreamError {
        UpstreamError::Protocol {
            endpoint: self.endpoint.clone(),
            what: what.into(),
        }
    }

    /// A protocol error naming this server: `what` follows its URL.
    pub(crate) fn protocol_error(&self, what: impl Into<String>) -> UpstreamError {
        self.err(what)
    }

    /// Time left for the next step: the step timeout, capped by what is left
    /// of the whole exchange.
    fn step(&self) -> Result<Duration, UpstreamError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UpstreamError::TooSlow {
                endpoint: self.endpoint.clone(),
                after: self.total_timeout,
            });
        }
        Ok(left.min(self.step_timeout))
    }

    fn timed_out(&self, waited: Duration) -> UpstreamError {
        if waited < self.step_timeout {
            UpstreamError::TooSlow {
                endpoint: self.endpoint.clone(),
                after: self.total_timeout,
            }
        } else {
            UpstreamError::Timeout {
                endpoint: self.endpoint.clone(),
                after: waited,
            }
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        let wait = self.step()?;
        let r = tokio::time::timeout(wait, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(UpstreamError::Io {
                endpoint: self.endpoint.clone(),
                source,
            }),
            Err(_) => Err(self.timed_out(wait)),
        }
    }

    /// Reads until `frame` finds a complete response at the start of the
    /// buffer (returning its length and value), then consumes it.
    pub(crate) async fn read<T, E: std::fmt::Display>(
        &mut self,
        mut frame: impl FnMut(&[u8]) -> Result<Option<(usize, T)>, E>,
    ) -> Result<T, UpstreamError> {
        loop {
            if let Some((len, v)) = frame(&self.buf)
                .map_err(|e| self.err(format!("sent a response that cannot be used before login ({e})")))?
            {
                self.buf.drain(..len);
                return Ok(v);
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err(UpstreamError::ResponseTooLong {
                    endpoint: self.endpoint.clone(),
                });
            }
            let wait = self.step()?;
            let mut chunk = [0u8; 4096];
            let n = match tokio::time::timeout(wait, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) => {
                    return Err(UpstreamError::Closed {
                        endpoint: self.endpoint.clone(),
                    })
                }
                Ok(Ok(n)) => n,
                Ok(Err(source)) => {
                    return Err(UpstreamError::Io {
                        endpoint: self.endpoint.clone(),
                        source,
                    })
                }
                Err(_) => return Err(self.timed_out(wait)),
            };
            self.received = self.received.saturating_add(n);
            if self.received > MAX_EXCHANGE {
                return Err(UpstreamError::TooMuch {
                    endpoint: self.endpoint.clone(),
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// After the server accepted STARTTLS/STLS: anything it sent before the
    /// handshake is unauthenticated plaintext (response injection) and is
    /// dropped, never acted on.
    pub(crate) async fn upgrade(mut self) -> Result<Conn, UpstreamError> {
        if !self.buf.is_empty() {
            tracing::warn!(upstream = %self.endpoint, bytes = self.buf.len(), "discarding plaintext the server sent before TLS");
            self.buf.clear();
        }
        self.handshake().await
    }

    async fn handshake(mut self) -> Result<Conn, UpstreamError> {
        let cfg = match &self.tls {
            TlsChoice::Verified(c) => c.clone(),
            TlsChoice::Insecure(c) => {
                tracing::warn!(upstream = %self.endpoint, "insecure_skip_verify: the server's certificate is NOT checked");
                c.clone()
            }
        };
        let wait = self.step()?;
        let tcp = match self.stream {
            Stream::Plain(tcp) => tcp,
            other => {
                self.stream = other;
                return Err(self.err("offered STARTTLS on a connection that is already TLS"));
            }
        };
        self.stream = net::tls_client(tcp, &self.endpoint, cfg, wait).await?;
        Ok(self)
    }
}

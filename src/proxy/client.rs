//! The upstream connection before the hand-off, shared by the three
//! protocols: connect (implicit TLS or plaintext), read framed responses into
//! a buffer that keeps whatever arrives past them, upgrade with STARTTLS.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Ctx;
use crate::endpoint::{Endpoint, Security};
use crate::net::{self, Stream};

/// Largest pre-login response we accept from a server.
pub const MAX_RESPONSE: usize = 64 * 1024;

pub struct Client {
    pub stream: Stream,
    /// Bytes read past the last response consumed; forwarded to the client
    /// at the hand-off so nothing is lost.
    pub buf: Vec<u8>,
    pub endpoint: Endpoint,
    ca_file: Option<std::path::PathBuf>,
}

impl Client {
    pub async fn connect(ctx: &Ctx, ep: &Endpoint, ca_file: Option<&std::path::Path>) -> Result<Client, String> {
        let timeout = ctx.config().limits.connect_timeout;
        let tcp = net::connect_tcp(ep, timeout).await.map_err(|e| e.to_string())?;
        let stream = match ep.security {
            Security::Tls => {
                let cfg = ctx.tls.get(ca_file).map_err(|e| e.to_string())?;
                net::tls_client(tcp, ep, cfg, timeout)
                    .await
                    .map_err(|e| e.to_string())?
            }
            _ => Stream::Plain(tcp),
        };
        Ok(Client {
            stream,
            buf: Vec::new(),
            endpoint: ep.clone(),
            ca_file: ca_file.map(Into::into),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> String {
        format!("{}: {e}", self.endpoint)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("{}: {e}", self.endpoint))?;
        self.stream.flush().await.map_err(|e| format!("{}: {e}", self.endpoint))
    }

    /// Reads until `frame` finds a complete response at the start of the
    /// buffer (returning its length and value), then consumes it.
    pub async fn read<T, E: std::fmt::Display>(
        &mut self,
        ctx: &Ctx,
        mut frame: impl FnMut(&[u8]) -> Result<Option<(usize, T)>, E>,
    ) -> Result<T, String> {
        let timeout = ctx.config().limits.connect_timeout;
        loop {
            if let Some((len, v)) = frame(&self.buf).map_err(|e| self.err(e))? {
                self.buf.drain(..len);
                return Ok(v);
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err(self.err("response too long before login"));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(timeout, self.stream.read(&mut chunk))
                .await
                .map_err(|_| self.err(format!("no answer within {} s", timeout.as_secs())))?
                .map_err(|e| self.err(e))?;
            if n == 0 {
                return Err(self.err("the server closed the connection"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// After the server accepted STARTTLS/STLS: anything it sent before the
    /// handshake is unauthenticated plaintext (response injection) and is
    /// dropped, never acted on.
    pub async fn upgrade(mut self, ctx: &Ctx) -> Result<Client, String> {
        if !self.buf.is_empty() {
            tracing::warn!(upstream = %self.endpoint, bytes = self.buf.len(), "discarding plaintext the server sent before TLS");
            self.buf.clear();
        }
        let timeout = ctx.config().limits.connect_timeout;
        let cfg = ctx.tls.get(self.ca_file.as_deref()).map_err(|e| e.to_string())?;
        let Stream::Plain(tcp) = self.stream else {
            return Err(format!(
                "{}: STARTTLS on a connection that is already TLS",
                self.endpoint
            ));
        };
        self.stream = net::tls_client(tcp, &self.endpoint, cfg, timeout)
            .await
            .map_err(|e| e.to_string())?;
        Ok(self)
    }
}

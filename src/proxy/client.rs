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
    insecure: bool,
}

impl Client {
    pub async fn connect(ctx: &Ctx, up: &super::Upstream) -> Result<Client, String> {
        let ep = &up.endpoint;
        let timeout = ctx.config().limits.connect_timeout;
        let tcp = net::connect_tcp(ep, timeout).await.map_err(|e| e.to_string())?;
        let mut c = Client {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            endpoint: ep.clone(),
            ca_file: up.ca_file.clone(),
            insecure: up.insecure,
        };
        if ep.security == Security::Tls {
            let cfg = c.tls_config(ctx)?;
            let Stream::Plain(tcp) = c.stream else {
                unreachable!("just connected")
            };
            c.stream = net::tls_client(tcp, ep, cfg, timeout)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(c)
    }

    fn tls_config(&self, ctx: &Ctx) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
        if self.insecure {
            tracing::warn!(upstream = %self.endpoint, "insecure_skip_verify: the server's certificate is NOT checked");
            return Ok(ctx.tls.insecure());
        }
        ctx.tls.get(self.ca_file.as_deref()).map_err(|e| e.to_string())
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
        let cfg = self.tls_config(ctx)?;
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

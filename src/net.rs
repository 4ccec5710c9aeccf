//! Sockets at the edge: connecting upstream with bounded time, and one
//! stream type for plaintext and TLS on either side.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::endpoint::Endpoint;

pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session is large and most sessions sit idle in relay.
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Plain(s) => s.local_addr(),
            Stream::ClientTls(s) => s.get_ref().0.local_addr(),
            Stream::ServerTls(s) => s.get_ref().0.local_addr(),
        }
        .ok()
    }

    /// Ready when a read would not wait: bytes, EOF or an error at the
    /// socket, or (TLS) plaintext rustls already decrypted and holds, which
    /// would never wake the socket again. Lets an idle relay wait for input
    /// without holding a buffer to read into.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, held) = match self {
            Stream::Plain(s) => (s, false),
            Stream::ClientTls(s) => (s.get_ref().0, !s.get_ref().1.wants_read()),
            Stream::ServerTls(s) => (s.get_ref().0, !s.get_ref().1.wants_read()),
        };
        if held {
            return Poll::Ready(Ok(()));
        }
        tcp.poll_read_ready(cx)
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            Stream::ClientTls($s) => $e,
            Stream::ServerTls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("TLS with {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
}

/// Long-lived sessions (IDLE for hours) need the kernel to notice dead peers.
pub fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(120))
        .with_interval(Duration::from_secs(30));
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}

pub async fn connect_tcp(ep: &Endpoint, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let err = |reason: String| ConnectError::Connect {
        endpoint: ep.to_string(),
        reason,
    };
    let s = tokio::time::timeout(timeout, TcpStream::connect((ep.host.as_str(), ep.port)))
        .await
        .map_err(|_| err(format!("no answer within {} s", timeout.as_secs())))?
        .map_err(|e| err(e.to_string()))?;
    tune(&s);
    Ok(s)
}

pub async fn tls_client(
    tcp: TcpStream,
    ep: &Endpoint,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Stream, ConnectError> {
    let err = |reason: String| ConnectError::Tls {
        endpoint: ep.to_string(),
        reason,
    };
    let name =
        rustls::pki_types::ServerName::try_from(ep.host.clone()).map_err(|e| err(format!("bad server name: {e}")))?;
    let s = tokio::time::timeout(timeout, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| err(format!("handshake not done within {} s", timeout.as_secs())))?
        .map_err(|e| err(describe_tls(&e)))?;
    Ok(Stream::ClientTls(Box::new(s)))
}

fn describe_tls(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("the server's certificate is not trusted ({c:?}); add its CA with ca_file if it is yours")
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

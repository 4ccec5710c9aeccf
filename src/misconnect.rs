//! Clients that connect the wrong way: a TLS client on a plaintext or
//! STARTTLS listener, or a plaintext client on an implicit-TLS one. Neither
//! end can read the other (the client reports `WRONG_VERSION_NUMBER`, or
//! waits for a greeting that never comes), so without this nothing would
//! say why. Told from the client's first bytes, it gets one warning that
//! names the listener and the fix (the connection's span names the
//! client), is counted in `mailproxy_misconnects_total`, and the
//! connection is closed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Listener, LocalTls};

/// How a client connected the wrong way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misconnect {
    /// A TLS handshake on a listener that starts in plaintext.
    TlsOnPlaintext,
    /// Protocol text, or silence (a client waiting for a greeting), on an
    /// implicit-TLS listener.
    PlaintextOnTls,
}

impl Misconnect {
    /// The metric label.
    pub fn kind(self) -> &'static str {
        match self {
            Misconnect::TlsOnPlaintext => "tls_on_plaintext",
            Misconnect::PlaintextOnTls => "plaintext_on_tls",
        }
    }
}

/// A client on an implicit-TLS listener that has said nothing this long
/// after connecting is waiting for a plaintext greeting: a TLS client sends
/// its ClientHello at once, and this leaves room for two lost segments.
pub const SILENCE: Duration = Duration::from_secs(5);

/// Whether a plaintext connection's first bytes are a TLS ClientHello: a
/// handshake record (22) of SSL 3 or TLS 1.x (major version 3). No command
/// of IMAP, SMTP or POP3 starts with a control character.
pub fn is_tls_hello(first: &[u8]) -> bool {
    match first {
        [] => false,
        [0x16] => true,
        [0x16, 3, ..] => true,
        _ => false,
    }
}

/// Whether the first bytes on an implicit-TLS connection are protocol text
/// (a command, a line end) rather than the start of a TLS record (whose
/// content type is a control character, or 0x80 and up for SSL 2).
pub fn is_plaintext(first: &[u8]) -> bool {
    first
        .first()
        .is_some_and(|&b| (0x20..0x7f).contains(&b) || b == b'\r' || b == b'\n')
}

/// On an implicit-TLS listener, before the handshake: whether the client
/// speaks plaintext, judged from its first bytes (left in place for the TLS
/// handshake) or its silence for [`SILENCE`]. `false` when it starts like
/// TLS, or leaves.
pub async fn plaintext_first(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout(SILENCE, tcp.peek(&mut first)).await {
        Ok(Ok(n)) => is_plaintext(&first[..n]),
        Ok(Err(_)) => false,
        Err(_) => true,
    }
}

/// Logs the warning and counts it. `local` is the address the client
/// reached (the listener's, with its real port).
pub fn report(listener: &Listener, local: Option<SocketAddr>, how: Misconnect) {
    let p = listener.protocol;
    let at = local.unwrap_or(listener.listen);
    let name = format!("[{p}] {at}");
    let kind = how.kind();
    crate::metrics::misconnect(p, kind);
    match (how, listener.tls) {
        (Misconnect::TlsOnPlaintext, LocalTls::Starttls) => tracing::warn!(
            listener = %name,
            kind,
            "a client sent a TLS handshake to a STARTTLS listener: this client starts TLS at once (implicit TLS, \"SSL/TLS\"); set it to STARTTLS for {at}, or set tls = \"implicit\" in [{p}] (then every client of {at} must start TLS at once)"
        ),
        (Misconnect::TlsOnPlaintext, _) => tracing::warn!(
            listener = %name,
            kind,
            "a client sent a TLS handshake to a plaintext listener: this client starts TLS at once (implicit TLS, \"SSL/TLS\"); set it to no encryption for {at}, or set tls = \"implicit\" in [{p}] (then every client of {at} must start TLS at once)"
        ),
        (Misconnect::PlaintextOnTls, _) => tracing::warn!(
            listener = %name,
            kind,
            "a client spoke plaintext to an implicit-TLS listener: this client speaks plaintext or STARTTLS, but {at} expects TLS from the first byte; set it to SSL/TLS (implicit TLS) for {at}, or set tls = \"starttls\" in [{p}] so that the listener starts in plaintext"
        ),
    }
}

/// What a plaintext client on an implicit-TLS listener is told (in its
/// protocol's refusal line), so that its error shows the reason too.
pub const PLAINTEXT_ON_TLS: &str =
    "this port speaks TLS from the first byte (implicit TLS, \"SSL/TLS\"): set the client to use it";

/// Says `line` to a client that is going away and closes, reading what it
/// sends meanwhile: a close with unread input would be a reset, which can
/// lose the line before the client reads it. Bounded in time and bytes.
pub async fn farewell(mut tcp: TcpStream, line: &[u8]) {
    let bye = async {
        tcp.write_all(line).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut read = 0;
        while read < 64 * 1024 {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes() {
        // The start of a real ClientHello (TLS 1.0 record version, as clients send).
        assert!(is_tls_hello(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]));
        assert!(is_tls_hello(&[0x16]));
        // A first command line of each protocol, and an empty one.
        let commands: [&[u8]; 4] = [b"a1 LOGIN x y\r\n", b"EHLO x\r\n", b"USER a\r\n", b"\r\n"];
        for text in commands.into_iter().chain([&b""[..], b"\x16\x04"]) {
            assert!(!is_tls_hello(text), "{text:?}");
        }
        for text in commands.into_iter().chain([&b"\n"[..], b" "]) {
            assert!(is_plaintext(text), "{text:?}");
        }
        for tls in [
            &[0x16, 0x03, 0x01][..],
            &[0x80, 0x2e, 0x01],
            &[0x15, 0x03],
            &[],
            &[0x7f],
        ] {
            assert!(!is_plaintext(tls), "{tls:?}");
        }
    }
}

//! After the hand-off: bytes both ways, untouched, at the speed of a direct
//! connection.

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::net::Stream;

/// Relay buffer sizes, per direction: small while a session is interactive
/// (thousands of idle sessions stay cheap), growing for bulk transfers (FETCH
/// of a large mailbox, a big DATA), where fewer, larger reads and writes keep
/// up with a direct connection, and shrinking again afterwards.
pub const RELAY_MIN: usize = 8 * 1024;
pub const RELAY_MAX: usize = 256 * 1024;
/// Once one side has closed, how long the other may still finish.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// First what each side already sent the other (so nothing is lost or
/// reordered), then bytes both ways until both sides close (or one closes
/// and the other lingers past a grace period), or the proxy shuts down.
/// Returns the bytes relayed up and down.
pub async fn relay(
    mut client: Stream,
    mut upstream: Stream,
    to_upstream: Vec<u8>,
    to_client: Vec<u8>,
    shutdown: &CancellationToken,
) -> std::io::Result<(u64, u64)> {
    if !to_client.is_empty() {
        client.write_all(&to_client).await?;
    }
    if !to_upstream.is_empty() {
        upstream.write_all(&to_upstream).await?;
    }
    client.flush().await?;
    upstream.flush().await?;
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = pump(&mut cr, &mut uw);
    let down = pump(&mut ur, &mut cw);
    tokio::pin!(up, down);
    let grace = |r: Result<std::io::Result<u64>, _>| match r {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    tokio::select! {
        r = &mut up => {
            let u = r?;
            Ok((u, grace(tokio::time::timeout(CLOSE_GRACE, &mut down).await)))
        }
        r = &mut down => {
            let d = r?;
            Ok((grace(tokio::time::timeout(CLOSE_GRACE, &mut up).await), d))
        }
        _ = shutdown.cancelled() => Ok((0, 0)),
    }
}

/// Copies one direction until EOF, then passes the EOF on.
async fn pump<R, W>(r: &mut R, w: &mut W) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; RELAY_MIN];
    let mut total = 0u64;
    let mut small_reads = 0u32;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        // A no-op on TCP; pushes out the records a TLS stream still holds.
        w.flush().await?;
        total = total.saturating_add(n as u64);
        if n == buf.len() && buf.len() < RELAY_MAX {
            buf = vec![0u8; (buf.len() * 4).min(RELAY_MAX)];
            small_reads = 0;
        } else if buf.len() > RELAY_MIN && n < RELAY_MIN {
            small_reads += 1;
            if small_reads >= 16 {
                buf = vec![0u8; RELAY_MIN];
                small_reads = 0;
            }
        }
    }
}

//! After the hand-off: bytes both ways, untouched, at the speed of a direct
//! connection.

use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
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
///
/// `held` is what the upstream session holds (its session slot): let go as
/// soon as the upstream has closed its side, since the provider counts the
/// session as over then, even while the client takes its time to close.
pub async fn relay<H>(
    mut client: Stream,
    mut upstream: Stream,
    to_upstream: Vec<u8>,
    to_client: Vec<u8>,
    shutdown: &CancellationToken,
    held: H,
) -> std::io::Result<(u64, u64)> {
    if !to_client.is_empty() {
        client.write_all(&to_client).await?;
    }
    if !to_upstream.is_empty() {
        upstream.write_all(&to_upstream).await?;
    }
    client.flush().await?;
    upstream.flush().await?;
    // Plain TCP on both sides splits without the lock a generic split takes
    // on every poll.
    if let (Stream::Plain(c), Stream::Plain(u)) = (&mut client, &mut upstream) {
        let (mut cr, mut cw) = c.split();
        let (mut ur, mut uw) = u.split();
        return both_ways(pump(&mut cr, &mut uw), pump(&mut ur, &mut cw), shutdown, held).await;
    }
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    both_ways(pump(&mut cr, &mut uw), pump(&mut ur, &mut cw), shutdown, held).await
}

/// Runs both directions until both end, or one ends and the other lingers
/// past the grace period, or the proxy shuts down. Returns (up, down).
/// `held` is dropped when the down direction (the upstream's) ends.
async fn both_ways<H>(
    up: impl std::future::Future<Output = io::Result<u64>>,
    down: impl std::future::Future<Output = io::Result<u64>>,
    shutdown: &CancellationToken,
    held: H,
) -> io::Result<(u64, u64)> {
    tokio::pin!(up, down);
    let grace = |r: Result<io::Result<u64>, _>| match r {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    tokio::select! {
        r = &mut up => {
            let u = r?;
            Ok((u, grace(tokio::time::timeout(CLOSE_GRACE, &mut down).await)))
        }
        r = &mut down => {
            drop(held);
            let d = r?;
            Ok((grace(tokio::time::timeout(CLOSE_GRACE, &mut up).await), d))
        }
        _ = shutdown.cancelled() => Ok((0, 0)),
    }
}

/// Copies one direction until EOF, then passes the EOF on. Reading and
/// writing overlap: while the receiving peer is slow to take bytes, the
/// sending peer's bytes keep filling the free part of a ring buffer, so
/// neither side waits for the other's round trip through mailproxy (a
/// read-then-write loop would stall the sender for every write).
async fn pump<R, W>(r: &mut R, w: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut ring = Ring::new(RELAY_MIN);
    let mut total = 0u64;
    let mut eof = false;
    let mut unflushed = false;
    let mut small_reads = 0u32;
    std::future::poll_fn(|cx| loop {
        let mut progress = false;
        if !eof && !ring.is_full() {
            let space = ring.space_mut();
            let room = space.len();
            let mut rb = ReadBuf::new(space);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        eof = true;
                    } else {
                        ring.filled(n);
                        total = total.saturating_add(n as u64);
                        progress = true;
                        if n == room && ring.is_full() && ring.cap() < RELAY_MAX {
                            // Bulk, and the writer is behind: a larger ring.
                            ring.resize((ring.cap() * 4).min(RELAY_MAX));
                            small_reads = 0;
                        } else if ring.cap() > RELAY_MIN && n < RELAY_MIN {
                            small_reads += 1;
                            if small_reads >= 16 && ring.len() <= RELAY_MIN {
                                ring.resize(RELAY_MIN);
                                small_reads = 0;
                            }
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if !ring.is_empty() {
            match Pin::new(&mut *w).poll_write(cx, ring.data()) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    ring.consumed(n);
                    unflushed = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        // A no-op on TCP; pushes out the records a TLS stream still holds
        // once there is nothing more to add to them.
        if ring.is_empty() && unflushed {
            match Pin::new(&mut *w).poll_flush(cx) {
                Poll::Ready(Ok(())) => unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if eof && ring.is_empty() && !unflushed {
            // The peer may be gone already; nothing is left to deliver.
            let _ = std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx));
            return Poll::Ready(Ok(total));
        }
        // Every side that could move was polled and registered its waker.
        if !progress {
            return Poll::Pending;
        }
    })
    .await
}

/// The bytes read from one peer and not yet written to the other, in a
/// fixed buffer used circularly: reads go into the free part, writes take
/// from the oldest, and nothing is moved around in between.
struct Ring {
    buf: Vec<u8>,
    head: usize,
    len: usize,
}

impl Ring {
    fn new(cap: usize) -> Ring {
        Ring {
            buf: vec![0; cap],
            head: 0,
            len: 0,
        }
    }

    fn cap(&self) -> usize {
        self.buf.len()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn is_full(&self) -> bool {
        self.len == self.cap()
    }

    /// The oldest bytes, as one contiguous run (the rest follows after it).
    fn data(&self) -> &[u8] {
        let end = (self.head + self.len).min(self.cap());
        &self.buf[self.head..end]
    }

    fn consumed(&mut self, n: usize) {
        debug_assert!(n <= self.data().len());
        self.len -= n;
        self.head = if self.len == 0 { 0 } else { (self.head + n) % self.cap() };
    }

    /// The free run after the newest byte.
    fn space_mut(&mut self) -> &mut [u8] {
        let cap = self.cap();
        let tail = self.head + self.len;
        if tail < cap {
            &mut self.buf[tail..]
        } else {
            &mut self.buf[tail - cap..self.head]
        }
    }

    fn filled(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.cap());
        self.len += n;
    }

    /// A new capacity (at least what is held), the held bytes kept in order.
    fn resize(&mut self, cap: usize) {
        let cap = cap.max(self.len);
        let mut next = Vec::with_capacity(cap);
        let first = self.data().len();
        next.extend_from_slice(self.data());
        next.extend_from_slice(&self.buf[..self.len - first]);
        next.resize(cap, 0);
        self.buf = next;
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_ring_keeps_bytes_in_order_across_the_wrap_and_a_resize() {
        let mut r = Ring::new(8);
        let mut out = Vec::new();
        let mut next = 0u8;
        for step in 0..200usize {
            // Fill some, take some, in uneven amounts so the ring wraps.
            let space = r.space_mut();
            let n = space.len().min(step % 5 + 1);
            for b in &mut space[..n] {
                *b = next;
                next = next.wrapping_add(1);
            }
            r.filled(n);
            if step == 50 {
                r.resize(32);
            }
            if step == 120 {
                r.resize(8);
            }
            let take = r.data().len().min(step % 3 + 1);
            out.extend_from_slice(&r.data()[..take]);
            r.consumed(take);
        }
        while !r.is_empty() {
            let d = r.data().to_vec();
            out.extend_from_slice(&d);
            r.consumed(d.len());
        }
        let want: Vec<u8> = (0..out.len()).map(|i| i as u8).collect();
        assert_eq!(out, want);
    }

    /// Through the pump with a slow, small-windowed reader on the far side:
    /// every byte arrives in order and the EOF is passed on.
    #[tokio::test]
    async fn a_slow_receiver_gets_every_byte_and_the_eof() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut sender, mut from) = tokio::io::duplex(64 * 1024);
        let (mut to, mut receiver) = tokio::io::duplex(4 * 1024);
        let d = data.clone();
        let writing = tokio::spawn(async move {
            sender.write_all(&d).await.unwrap();
            sender.shutdown().await.unwrap();
        });
        let pumping = tokio::spawn(async move { pump(&mut from, &mut to).await.unwrap() });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 1500];
        loop {
            let n = receiver.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if got.len() % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        writing.await.unwrap();
        assert_eq!(pumping.await.unwrap(), data.len() as u64);
        assert!(got == data, "got {} bytes, want {}", got.len(), data.len());
    }

    /// The upstream closes while the client lingers: what the session holds
    /// is let go at once, not when the client finally closes.
    #[tokio::test]
    async fn what_the_session_holds_goes_when_the_upstream_closes() {
        let (_client, client_side) = tokio::io::duplex(1024);
        let (mut upstream, upstream_side) = tokio::io::duplex(1024);
        let held = std::sync::Arc::new(());
        let weak = std::sync::Arc::downgrade(&held);
        let relaying = tokio::spawn(async move {
            let (mut cr, mut cw) = tokio::io::split(client_side);
            let (mut ur, mut uw) = tokio::io::split(upstream_side);
            let shutdown = CancellationToken::new();
            both_ways(pump(&mut cr, &mut uw), pump(&mut ur, &mut cw), &shutdown, held).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(weak.upgrade().is_some(), "held while both sides are open");
        upstream.shutdown().await.unwrap();
        let t0 = std::time::Instant::now();
        while weak.upgrade().is_some() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "still held");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(!relaying.is_finished(), "the client may still finish");
        relaying.abort();
    }
}

//! After the hand-off: bytes both ways, untouched, at the speed of a direct
//! connection, and nearly free while the session is idle.
//!
//! An idle session holds its two sockets and a few words of state, no
//! buffer: each direction waits for its source to become readable
//! ([`Stream::poll_read_ready`]), borrows a buffer from the thread's
//! [`pool`] when bytes arrive, keeps it while reads keep returning data,
//! and gives it back once everything read was written and the next read
//! would block. The bytes relayed are counted locally and added to
//! `mailproxy_relayed_bytes_total` at most [`FLUSH_EVERY`] after they
//! moved (and when the session ends), not per chunk.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::pool;
use crate::metrics::RelayedBytes;
use crate::net::Stream;

/// Relay buffer sizes, per direction and only while bytes flow: small for
/// interactive traffic, growing for bulk transfers (FETCH of a large
/// mailbox, a big DATA), where fewer, larger reads and writes keep up with
/// a direct connection, and shrinking again afterwards.
pub const RELAY_MIN: usize = 8 * 1024;
pub const RELAY_MAX: usize = 256 * 1024;
/// Once one side has closed, how long the other may still finish.
const CLOSE_GRACE: Duration = Duration::from_secs(60);
/// How long relayed bytes may wait before they show in the metrics.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// First what each side already sent the other (so nothing is lost or
/// reordered), then bytes both ways until both sides close (or one closes
/// and the other lingers past a grace period), or the proxy shuts down.
/// Returns the bytes relayed up and down; all of them are in `meter` by then.
///
/// `held` is what the upstream session holds (its session slot): let go as
/// soon as the upstream has closed its side, since the provider counts the
/// session as over then, even while the client takes its time to close.
pub async fn relay<H>(
    mut client: Stream,
    mut upstream: Stream,
    to_upstream: Vec<u8>,
    to_client: Vec<u8>,
    meter: &RelayedBytes,
    shutdown: &CancellationToken,
    held: H,
) -> io::Result<(u64, u64)> {
    send_first(&mut client, to_client).await?;
    send_first(&mut upstream, to_upstream).await?;
    let mut state = Relay::new(meter);
    let mut held = Some(held);
    let r = {
        let both = std::future::poll_fn(|cx| {
            let r = state.poll(cx, &mut client, &mut upstream);
            if state.down.done {
                drop(held.take());
            }
            r
        });
        tokio::select! {
            r = both => r,
            _ = shutdown.cancelled() => Ok(()),
        }
    };
    state.flush();
    r.map(|()| (state.up.total, state.down.total))
}

/// Writes and flushes what was held back for a peer, then frees it: the
/// session must not keep the pre-login bytes for its whole life.
async fn send_first(to: &mut Stream, bytes: Vec<u8>) -> io::Result<()> {
    if !bytes.is_empty() {
        to.write_all(&bytes).await?;
    }
    drop(bytes);
    to.flush().await
}

/// Both directions of one session, driven by one task without a lock, and
/// the timers that only exist while they are needed.
struct Relay<'m> {
    up: Pipe,
    down: Pipe,
    meter: &'m RelayedBytes,
    /// Bytes counted by `meter` so far (up, down).
    flushed: (u64, u64),
    /// Armed while some relayed bytes are not in the metrics yet.
    flush_at: Option<Pin<Box<Sleep>>>,
    /// Armed once one direction has ended.
    grace: Option<Pin<Box<Sleep>>>,
}

impl<'m> Relay<'m> {
    fn new(meter: &'m RelayedBytes) -> Self {
        Relay {
            up: Pipe::default(),
            down: Pipe::default(),
            meter,
            flushed: (0, 0),
            flush_at: None,
            grace: None,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>, client: &mut Stream, upstream: &mut Stream) -> Poll<io::Result<()>> {
        // An error ends the session (an upstream's reset ends its client's
        // at once), unless the other direction had already ended and this
        // one was only finishing.
        let ended_before = (self.up.done, self.down.done);
        let up = self.up.poll_done(cx, client, upstream);
        let down = self.down.poll_done(cx, upstream, client);
        for (r, other_ended) in [(up, ended_before.1), (down, ended_before.0)] {
            if let Err(e) = r {
                if !other_ended {
                    return Poll::Ready(Err(e));
                }
            }
        }
        self.poll_flush(cx);
        if self.up.done && self.down.done {
            return Poll::Ready(Ok(()));
        }
        if self.up.done || self.down.done {
            let grace = self
                .grace
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_GRACE)));
            if grace.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
        }
        Poll::Pending
    }

    /// Arms the flush timer when bytes are waiting to be counted; counts
    /// them when it fires.
    fn poll_flush(&mut self, cx: &mut Context<'_>) {
        if (self.up.total, self.down.total) == self.flushed {
            return;
        }
        let at = self
            .flush_at
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(FLUSH_EVERY)));
        if at.as_mut().poll(cx).is_ready() {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let (up, down) = (self.up.total, self.down.total);
        self.meter.add(up - self.flushed.0, down - self.flushed.1);
        self.flushed = (up, down);
        self.flush_at = None;
    }
}

/// One direction. Reading and writing overlap: while the receiving peer is
/// slow to take bytes, the sending peer's bytes keep filling the free part
/// of a ring buffer, so neither side waits for the other's round trip
/// through mailproxy (a read-then-write loop would stall the sender for
/// every write).
struct Pipe {
    /// Only while bytes flow; back in the pool once drained.
    ring: Option<Ring>,
    /// The size to borrow next time (a bulk transfer keeps its larger ring).
    cap: usize,
    eof: bool,
    unflushed: bool,
    done: bool,
    small_reads: u32,
    total: u64,
}

impl Default for Pipe {
    fn default() -> Self {
        Pipe {
            ring: None,
            cap: RELAY_MIN,
            eof: false,
            unflushed: false,
            done: false,
            small_reads: 0,
            total: 0,
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(ring) = self.ring.take() {
            pool::give(ring.buf);
        }
    }
}

impl Pipe {
    /// Polls until this direction ends (then it is `done`) or waits.
    fn poll_done<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> io::Result<()>
    where
        R: Readable,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Ok(());
        }
        let r = self.poll(cx, r, w);
        if matches!(r, Poll::Ready(_)) {
            self.done = true;
        }
        match r {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Copies until EOF, then passes the EOF on.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: Readable,
        W: AsyncWrite + Unpin,
    {
        loop {
            let mut progress = false;
            // Idle: wait for input without a buffer.
            if !self.eof && self.ring.is_none() {
                match r.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => self.ring = Some(Ring::with_buf(pool::take(self.cap))),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            let mut would_block = false;
            if !self.eof && self.ring.as_ref().is_some_and(|ring| !ring.is_full()) {
                match self.read(cx, r) {
                    Poll::Ready(Ok(moved)) => progress |= moved,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => would_block = true,
                }
            }
            if let Some(ring) = self.ring.as_mut() {
                if !ring.is_empty() {
                    match Pin::new(&mut *w).poll_write(cx, ring.data()) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Poll::Ready(Ok(n)) => {
                            ring.consumed(n);
                            self.unflushed = true;
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                }
                // Drained and nothing more to read now: back to idle.
                if ring.is_empty() && (would_block || self.eof) {
                    self.release();
                }
            }
            // A no-op on TCP; pushes out the records a TLS stream still
            // holds once there is nothing more to add to them.
            if self.ring.is_none() && self.unflushed {
                match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if self.eof && self.ring.is_none() && !self.unflushed {
                // The peer may be gone already; nothing is left to deliver.
                let _ = std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx));
                return Poll::Ready(Ok(()));
            }
            // Every side that could move was polled and registered its waker.
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// One read into the ring (which must be there and have room); whether
    /// bytes came. Grows the ring for bulk and shrinks it back after.
    fn read<R: Readable>(&mut self, cx: &mut Context<'_>, r: &mut R) -> Poll<io::Result<bool>> {
        let Some(ring) = self.ring.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        let space = ring.space_mut();
        let room = space.len();
        let mut rb = ReadBuf::new(space);
        std::task::ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            self.eof = true;
            return Poll::Ready(Ok(false));
        }
        ring.filled(n);
        self.total = self.total.saturating_add(n as u64);
        if n == room && ring.is_full() && ring.cap() < RELAY_MAX {
            // Bulk, and the writer is behind: a larger ring.
            ring.resize((ring.cap() * 4).min(RELAY_MAX));
            self.small_reads = 0;
        } else if ring.cap() > RELAY_MIN && n < RELAY_MIN {
            self.small_reads += 1;
            if self.small_reads >= 16 && ring.len() <= RELAY_MIN {
                ring.resize(RELAY_MIN);
                self.small_reads = 0;
            }
        }
        self.cap = ring.cap();
        Poll::Ready(Ok(true))
    }

    fn release(&mut self) {
        if let Some(ring) = self.ring.take() {
            pool::give(ring.buf);
        }
    }
}

/// A source the relay can wait on without a buffer.
trait Readable: AsyncRead + Unpin {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Readable for Stream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Stream::poll_read_ready(self, cx)
    }
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
    /// An empty ring over `buf` (its contents are overwritten before use).
    fn with_buf(buf: Vec<u8>) -> Ring {
        Ring { buf, head: 0, len: 0 }
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
        let mut next = pool::take(cap.max(self.len));
        let first = self.data().len();
        next[..first].copy_from_slice(self.data());
        next[first..self.len].copy_from_slice(&self.buf[..self.len - first]);
        pool::give(std::mem::replace(&mut self.buf, next));
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_ring_keeps_bytes_in_order_across_the_wrap_and_a_resize() {
        let mut r = Ring::with_buf(vec![0; 8]);
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

    /// A test source that always claims to be readable, so the pipe takes
    /// and gives back its buffer around every read that would block.
    struct AlwaysReady<T>(T);

    impl<T: AsyncRead + Unpin> AsyncRead for AlwaysReady<T> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl<T: AsyncRead + Unpin> Readable for AlwaysReady<T> {
        fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn pump<R: Readable, W: AsyncWrite + Unpin>(r: &mut R, w: &mut W) -> io::Result<u64> {
        let mut pipe = Pipe::default();
        std::future::poll_fn(|cx| pipe.poll(cx, r, w)).await?;
        Ok(pipe.total)
    }

    /// Once what was read is written and the next read would block, the
    /// pipe holds no buffer.
    #[tokio::test]
    async fn an_idle_pipe_holds_no_buffer() {
        let (mut sender, from) = tokio::io::duplex(64 * 1024);
        let (mut to, mut receiver) = tokio::io::duplex(64 * 1024);
        let mut from = AlwaysReady(from);
        let mut pipe = Pipe::default();
        sender.write_all(b"a NOOP\r\n").await.unwrap();
        let polled = std::future::poll_fn(|cx| Poll::Ready(pipe.poll(cx, &mut from, &mut to))).await;
        assert!(polled.is_pending());
        assert!(pipe.ring.is_none(), "the buffer went back to the pool");
        assert_eq!(pipe.total, 8);
        let mut got = [0u8; 8];
        receiver.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"a NOOP\r\n");
    }

    /// An EOF read in the same poll as the last bytes were written still
    /// ends the direction (and passes the EOF on).
    #[tokio::test]
    async fn the_eof_after_a_few_bytes_ends_the_pipe() {
        let (mut sender, from) = tokio::io::duplex(64 * 1024);
        let (mut to, mut receiver) = tokio::io::duplex(64 * 1024);
        sender.write_all(b"z LOGOUT\r\n").await.unwrap();
        sender.shutdown().await.unwrap();
        let mut from = AlwaysReady(from);
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), pump(&mut from, &mut to))
            .await
            .expect("the pipe ends")
            .unwrap();
        assert_eq!(n, 10);
        let mut got = Vec::new();
        receiver.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"z LOGOUT\r\n");
    }

    /// Through the pump with a slow, small-windowed reader on the far side:
    /// every byte arrives in order and the EOF is passed on.
    #[tokio::test]
    async fn a_slow_receiver_gets_every_byte_and_the_eof() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut sender, from) = tokio::io::duplex(64 * 1024);
        let (mut to, mut receiver) = tokio::io::duplex(4 * 1024);
        let mut from = AlwaysReady(from);
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
    /// A connected loopback pair: (the end the relay holds, the far end).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (near, _) = l.accept().await.unwrap();
        (near, far)
    }

    /// The upstream closes while the client lingers: what the session holds
    /// is let go at once, not when the client finally closes.
    #[tokio::test]
    async fn what_the_session_holds_goes_when_the_upstream_closes() {
        let (client_side, _client) = tcp_pair().await;
        let (upstream_side, mut upstream) = tcp_pair().await;
        let held = std::sync::Arc::new(());
        let weak = std::sync::Arc::downgrade(&held);
        let relaying = tokio::spawn(async move {
            let meter = crate::metrics::relayed_bytes(crate::endpoint::Protocol::Imap);
            let shutdown = CancellationToken::new();
            let (c, u) = (Stream::Plain(client_side), Stream::Plain(upstream_side));
            relay(c, u, Vec::new(), Vec::new(), &meter, &shutdown, held).await
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

    /// The upstream resets the connection while the client waits for an
    /// answer: the session ends at once, not after the close grace period.
    #[tokio::test]
    async fn an_upstream_reset_ends_the_session_at_once() {
        let (client_side, _client) = tcp_pair().await;
        let (upstream_side, upstream) = tcp_pair().await;
        let relaying = tokio::spawn(async move {
            let meter = crate::metrics::relayed_bytes(crate::endpoint::Protocol::Imap);
            let shutdown = CancellationToken::new();
            let (c, u) = (Stream::Plain(client_side), Stream::Plain(upstream_side));
            relay(c, u, Vec::new(), Vec::new(), &meter, &shutdown, ()).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // SO_LINGER 0: the close sends a reset, not a FIN.
        socket2::SockRef::from(&upstream)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(upstream);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), relaying).await;
        let r = ended.expect("the session ended within 5 s").unwrap();
        assert!(r.is_err(), "the reset is the session's error: {r:?}");
    }
}

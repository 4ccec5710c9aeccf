//! Plain TCP on both sides, on Linux: bulk transfers move through a pipe
//! with splice(2), so the bytes of a large FETCH or DATA never enter
//! mailproxy's memory and are not copied by it. Interactive traffic goes
//! through a small buffer as on the other paths; a pipe (two descriptors)
//! is taken only while a direction moves full buffers, and given back when
//! the traffic turns small again, so thousands of idle sessions hold none.
//!
//! Readiness comes from tokio (`readable`/`writable` + `try_io`), so this
//! runs on the async workers like any other socket I/O and never blocks.

use std::io;
use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::net::Shutdown;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{RELAY_MAX, RELAY_MIN};

/// What a pipe is asked to hold (the kernel may grant less, down to a page
/// when the user's pipe allowance is spent: splice still works).
const PIPE_SIZE: usize = 256 * 1024;
/// Consecutive small transfers after which the pipe is given back.
const SMALL_TO_IDLE: u32 = 16;

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// None when no descriptor can be had: the buffer path carries on.
    fn new() -> Option<Pipe> {
        let (r, w) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).ok()?;
        let cap = rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&w))
            .unwrap_or(64 * 1024);
        Some(Pipe { r, w, cap })
    }
}

/// How one transfer through the pipe ended.
enum Moved {
    Bytes(usize),
    /// splice(2) refused these sockets before any byte moved: copy instead.
    Unsupported,
}

/// Copies one direction until EOF, then half-closes `to`. Returns the bytes moved.
pub async fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    pump_counted(from, to).await.map(|c| c.total)
}

#[derive(Debug, Default)]
struct Counts {
    total: u64,
    /// Of those, the bytes that went through the pipe.
    spliced: u64,
}

async fn pump_counted(from: &TcpStream, to: &TcpStream) -> io::Result<Counts> {
    let mut buf = vec![0u8; RELAY_MIN];
    let mut pipe: Option<Pipe> = None;
    let mut splice_ok = true;
    let mut c = Counts::default();
    let mut small = 0u32;
    loop {
        let n = match &pipe {
            Some(p) => match through_pipe(from, to, p).await? {
                Moved::Bytes(n) => n,
                Moved::Unsupported => {
                    pipe = None;
                    splice_ok = false;
                    continue;
                }
            },
            None => {
                let n = read(from, &mut buf).await?;
                write_all(to, &buf[..n]).await?;
                n
            }
        };
        if n == 0 {
            // The peer may be gone already; nothing is left to deliver.
            let _ = rustix::net::shutdown(to, Shutdown::Write);
            return Ok(c);
        }
        c.total = c.total.saturating_add(n as u64);
        if pipe.is_some() {
            c.spliced = c.spliced.saturating_add(n as u64);
        }
        if pipe.is_none() && n == buf.len() {
            // Bulk: a pipe if one can be had, else a larger buffer.
            pipe = splice_ok.then(Pipe::new).flatten();
            if pipe.is_none() && buf.len() < RELAY_MAX {
                buf = vec![0u8; (buf.len() * 4).min(RELAY_MAX)];
            }
            small = 0;
        } else if pipe.is_some() && n < RELAY_MIN {
            small += 1;
            if small >= SMALL_TO_IDLE {
                pipe = None;
                small = 0;
            }
        } else {
            small = 0;
        }
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)
    )
}

/// One pipe-full: socket -> pipe as much as is there (up to the pipe's
/// size), then pipe -> socket until the pipe is empty again, so nothing
/// is ever left in it when the direction ends or changes mode.
async fn through_pipe(from: &TcpStream, to: &TcpStream, p: &Pipe) -> io::Result<Moved> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let n = loop {
        from.readable().await?;
        // The pipe is empty here, so WouldBlock can only mean the socket has nothing.
        match from.try_io(Interest::READABLE, || {
            rustix::pipe::splice(from, None, &p.w, None, p.cap, flags).map_err(io::Error::from)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if is_unsupported(&e) => return Ok(Moved::Unsupported),
            Err(e) => return Err(e),
        }
    };
    let mut left = n;
    while left > 0 {
        to.writable().await?;
        // The pipe holds `left` bytes, so WouldBlock means the socket is full.
        match to.try_io(Interest::WRITABLE, || {
            rustix::pipe::splice(&p.r, None, to, None, left, flags).map_err(io::Error::from)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => left -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Moved::Bytes(n))
}

async fn read(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(to: &TcpStream, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        to.writable().await?;
        match to.try_write(b) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected loopback pair.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// writer -> [from | pump | to] -> reader; returns what the reader got
    /// and the pump's counts.
    async fn through(chunks: Vec<Vec<u8>>) -> (Vec<u8>, Counts) {
        let (mut writer, from) = pair().await;
        let (to, mut reader) = pair().await;
        let pumping = tokio::spawn(async move { pump_counted(&from, &to).await.unwrap() });
        let writing = tokio::spawn(async move {
            for c in chunks {
                writer.write_all(&c).await.unwrap();
                // Let each small chunk go through on its own.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            writer.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        // Reads to EOF: the pump must pass the writer's half-close on.
        reader.read_to_end(&mut got).await.unwrap();
        writing.await.unwrap();
        (got, pumping.await.unwrap())
    }

    #[tokio::test]
    async fn bulk_goes_through_the_pipe_byte_for_byte() {
        let data = pattern(8 << 20);
        let (got, c) = through(vec![b"a1 OK\r\n".to_vec(), data.clone()]).await;
        assert_eq!(got.len(), data.len() + 7);
        assert!(got[7..] == data[..], "bytes changed in transit");
        assert_eq!(c.total, got.len() as u64);
        assert!(
            c.spliced > c.total / 2,
            "a bulk transfer should move through the pipe: {c:?}"
        );
    }

    #[tokio::test]
    async fn interactive_lines_stay_in_the_buffer_and_arrive_in_order() {
        let lines: Vec<Vec<u8>> = (0..50).map(|i| format!("* {i} EXISTS\r\n").into_bytes()).collect();
        let want: Vec<u8> = lines.concat();
        let (got, c) = through(lines).await;
        assert_eq!(got, want);
        assert_eq!(c.spliced, 0, "small traffic takes no pipe: {c:?}");
    }

    #[tokio::test]
    async fn bulk_then_small_then_bulk_again_keeps_every_byte() {
        let mut chunks = vec![pattern(1 << 20)];
        chunks.extend((0..40).map(|i| format!("x{i}\r\n").into_bytes()));
        chunks.push(pattern(3 << 20));
        let want = chunks.concat();
        let (got, c) = through(chunks).await;
        assert!(got == want, "got {} bytes, want {}", got.len(), want.len());
        assert!(c.spliced > 0, "{c:?}");
    }
}

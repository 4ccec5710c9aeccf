//! A tiny SMTP server that accepts and stores every message (Dovecot's
//! submission service relays to it).
//!
//! Runs on its own thread + runtime like the fake provider, so it works from
//! any test flavour and answers while the test thread blocks.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One message as received: envelope + exact DATA/BDAT bytes (dot-stuffing undone).
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    /// Reverse-path without angle brackets.
    pub mail_from: String,
    /// Forward-paths without angle brackets.
    pub rcpt_to: Vec<String>,
    /// Message bytes, CRLF line ends as sent, without the terminating `.` line.
    pub data: Vec<u8>,
}

impl ReceivedMessage {
    /// `data` with leading trace headers (`Received:`/`Return-Path:`, incl. folded
    /// continuation lines) removed, which a relay may prepend.
    pub fn data_without_trace(&self) -> Vec<u8> {
        let mut rest: &[u8] = &self.data;
        loop {
            let lower = rest.iter().take(12).map(u8::to_ascii_lowercase).collect::<Vec<_>>();
            if !(lower.starts_with(b"received:") || lower.starts_with(b"return-path:")) {
                return rest.to_vec();
            }
            // Skip this header line and any continuation lines (starting with SP/HT).
            loop {
                match rest.iter().position(|&b| b == b'\n') {
                    Some(p) => rest = &rest[p + 1..],
                    None => return Vec::new(),
                }
                if !matches!(rest.first(), Some(b' ' | b'\t')) {
                    break;
                }
            }
        }
    }
}

#[derive(Default)]
struct Shared {
    messages: Mutex<Vec<ReceivedMessage>>,
    cond: Condvar,
}

/// Handle to the running sink; stops it on drop.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SmtpSink {
    /// Starts the sink on `127.0.0.1:0`.
    pub fn start() -> SmtpSink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind smtp sink");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("smtp-sink".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("sink runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        _ = rx => {}
                        _ = async {
                            loop {
                                let Ok((sock, _)) = listener.accept().await else { continue };
                                let sh = sh.clone();
                                tokio::spawn(async move {
                                    let _ = serve(sock, sh).await;
                                });
                            }
                        } => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .expect("spawn sink thread");
        SmtpSink {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Port to relay to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Snapshot of all messages received so far.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.shared.messages.lock().unwrap().clone()
    }

    /// Blocks until at least `n` messages arrived (returns them all) or panics after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        let mut msgs = self.shared.messages.lock().unwrap();
        while msgs.len() < n {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "SMTP sink: expected {n} messages within {timeout:?}, got {}",
                    msgs.len()
                );
            }
            msgs = self.shared.cond.wait_timeout(msgs, deadline - now).unwrap().0;
        }
        msgs.clone()
    }

    /// Async variant of [`SmtpSink::wait_for`] (does not block a runtime worker).
    pub async fn wait_for_async(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n {
                return msgs;
            }
            if Instant::now() >= deadline {
                panic!(
                    "SMTP sink: expected {n} messages within {timeout:?}, got {}",
                    msgs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn strip_path(arg: &str) -> String {
    // "FROM:<a@b> SIZE=12" -> "a@b"
    let after = arg.split_once(':').map(|x| x.1).unwrap_or("").trim_start();
    let path = after.split_whitespace().next().unwrap_or("");
    path.trim_start_matches('<').trim_end_matches('>').to_string()
}

async fn serve(sock: tokio::net::TcpStream, sh: Arc<Shared>) -> std::io::Result<()> {
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    wr.write_all(b"220 sink.localhost ESMTP test sink\r\n").await?;
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let mut bdat: Vec<u8> = Vec::new();
    loop {
        let mut line = Vec::new();
        if rd.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.to_string()),
            None => (text.to_ascii_uppercase(), String::new()),
        };
        let reply: String = match verb.as_str() {
            "EHLO" => {
                "250-sink.localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n".into()
            }
            "HELO" => "250 sink.localhost\r\n".into(),
            "MAIL" => {
                from = Some(strip_path(&arg));
                rcpts.clear();
                bdat.clear();
                "250 2.1.0 OK\r\n".into()
            }
            "RCPT" => {
                if from.is_none() {
                    "503 5.5.1 MAIL first\r\n".into()
                } else {
                    rcpts.push(strip_path(&arg));
                    "250 2.1.5 OK\r\n".into()
                }
            }
            "DATA" => {
                if from.is_none() || rcpts.is_empty() {
                    "503 5.5.1 need MAIL and RCPT\r\n".into()
                } else {
                    wr.write_all(b"354 go ahead\r\n").await?;
                    let mut data = Vec::new();
                    loop {
                        let mut l = Vec::new();
                        if rd.read_until(b'\n', &mut l).await? == 0 {
                            return Ok(());
                        }
                        if l == b".\r\n" || l == b".\n" {
                            break;
                        }
                        // Undo dot-stuffing (RFC 5321 §4.5.2).
                        if l.first() == Some(&b'.') {
                            l.remove(0);
                        }
                        data.extend_from_slice(&l);
                    }
                    store(&sh, from.take().unwrap(), std::mem::take(&mut rcpts), data);
                    "250 2.0.0 OK queued\r\n".into()
                }
            }
            "BDAT" => {
                let mut parts = arg.split_whitespace();
                let size: usize = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let last = parts.next().is_some_and(|s| s.eq_ignore_ascii_case("LAST"));
                let mut chunk = vec![0u8; size];
                rd.read_exact(&mut chunk).await?;
                bdat.extend_from_slice(&chunk);
                if from.is_none() || rcpts.is_empty() {
                    bdat.clear();
                    "503 5.5.1 need MAIL and RCPT\r\n".into()
                } else if last {
                    store(
                        &sh,
                        from.take().unwrap(),
                        std::mem::take(&mut rcpts),
                        std::mem::take(&mut bdat),
                    );
                    "250 2.0.0 OK queued\r\n".into()
                } else {
                    format!("250 2.0.0 {size} octets received\r\n")
                }
            }
            "RSET" => {
                from = None;
                rcpts.clear();
                bdat.clear();
                "250 2.0.0 OK\r\n".into()
            }
            "NOOP" => "250 2.0.0 OK\r\n".into(),
            "QUIT" => {
                wr.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => "502 5.5.2 command not implemented\r\n".into(),
        };
        wr.write_all(reply.as_bytes()).await?;
    }
}

fn store(sh: &Shared, from: String, rcpts: Vec<String>, data: Vec<u8>) {
    sh.messages.lock().unwrap().push(ReceivedMessage {
        mail_from: from,
        rcpt_to: rcpts,
        data,
    });
    sh.cond.notify_all();
}

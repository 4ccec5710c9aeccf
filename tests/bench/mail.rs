//! Sections 5 and 6 of `scripts/bench`: SMTP submission and POP3 RETR, proxy
//! against direct sessions to the same private Dovecot.
//!
//! 5. SMTP send: one authenticated session sends M messages of K KiB (text
//!    with CRLF lines, some starting with `.`, dot-stuffed by the client).
//!    Per message MAIL + RCPT + DATA go in one write (RFC 2920 PIPELINING),
//!    the client waits for 250/250/354, sends the data and waits for the
//!    final 250 before the next message (`--smtp-mode sequential`: one
//!    command at a time). Proxy: client plain -> proxy, proxy -> Dovecot
//!    submissions (implicit TLS), XOAUTH2. Direct: client -> Dovecot
//!    submissions (implicit TLS), AUTH XOAUTH2. Dovecot relays every
//!    message to a counting SMTP sink (below) before it answers 250.
//! 6. POP3 RETR 1..n of the >= 40 MiB INBOX: proxy (pop3s upstream) vs
//!    direct pop3s, pipelined (all RETRs in one write) and sequential (one
//!    RETR at a time, each read to its terminating `.CRLF`).

use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::client::{self as sc, Stream};
use super::words::{word, xorshift};
use super::{median, ms, proc_cpu_secs, verdict, World, ALICE, LOCAL_PW, START};

// ---------------------------------------------------------------------------
// A raw buffered connection (client side and sink side)

const MIN_READ: usize = 16 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

pub struct RawConn {
    s: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RawConn {
    fn new(s: Stream, bufsize: usize) -> RawConn {
        RawConn {
            s,
            buf: vec![0u8; bufsize.max(4 * MIN_READ)],
            start: 0,
            end: 0,
        }
    }

    /// TCP (+ TLS) to 127.0.0.1:port.
    async fn connect(port: u16, tls: Option<Arc<rustls::ClientConfig>>, bufsize: usize) -> io::Result<RawConn> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let s = match tls {
            Some(cfg) => Stream::Tls(Box::new(sc::tls_handshake(tcp, cfg, "localhost").await?)),
            None => Stream::Plain(tcp),
        };
        Ok(RawConn::new(s, bufsize))
    }

    async fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b).await?;
        self.s.flush().await
    }

    async fn send(&mut self, line: &str) -> io::Result<()> {
        let mut b = Vec::with_capacity(line.len() + 2);
        b.extend_from_slice(line.as_bytes());
        b.extend_from_slice(b"\r\n");
        self.write(&b).await
    }

    /// Reads more (compacting, or growing for a line longer than the buffer).
    async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < MIN_READ {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < MIN_READ {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = tokio::time::timeout(IO_TIMEOUT, self.s.read(&mut self.buf[self.end..]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read timeout"))??;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        self.end += n;
        Ok(())
    }

    /// One line without CRLF.
    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find_byte(&self.buf[self.start..self.end], b'\n') {
                let l = super::trim_crlf(&self.buf[self.start..self.start + i + 1]).to_vec();
                self.start += i + 1;
                return Ok(l);
            }
            self.fill().await?;
        }
    }

    /// Skips a dot-terminated body (POP3 multi-line response, SMTP DATA) up
    /// to and including the `.CRLF` line, without copying it. The reader must
    /// be at the start of a line. Returns the bytes before the terminator, as
    /// sent (dot-stuffing not undone) and the number of lines starting with `.`
    /// (stuffed lines: each carries one extra byte).
    async fn skip_dot_body(&mut self) -> io::Result<(u64, u64)> {
        let (mut bytes, mut dotted) = (0u64, 0u64);
        let mut at_line_start = true;
        loop {
            let (s, e) = (self.start, self.end);
            let hay = &self.buf[s..e];
            let mut off = 0;
            let mut need_more = false;
            while let Some(k) = find_byte(&hay[off..], b'.') {
                let p = off + k;
                let line_start = if p == 0 { at_line_start } else { hay[p - 1] == b'\n' };
                if !line_start {
                    off = p + 1;
                    continue;
                }
                if p + 3 > hay.len() {
                    // Maybe the terminator, split across reads: keep it.
                    bytes += p as u64;
                    self.start = s + p;
                    at_line_start = true;
                    need_more = true;
                    break;
                }
                if &hay[p + 1..p + 3] == b"\r\n" {
                    bytes += p as u64;
                    self.start = s + p + 3;
                    return Ok((bytes, dotted));
                }
                dotted += 1;
                off = p + 1;
            }
            if !need_more {
                bytes += hay.len() as u64;
                if let Some(&last) = hay.last() {
                    at_line_start = last == b'\n';
                }
                self.start = e;
            } else if self.end - self.start >= 3 {
                // `p + 3 > len` with 3 bytes left cannot happen; defensive.
                return Err(io::Error::other("dot-body scanner stuck"));
            }
            self.fill().await?;
        }
    }

    /// An SMTP reply: (code, last line).
    async fn smtp_reply(&mut self) -> io::Result<(u16, String)> {
        loop {
            let l = self.line().await?;
            let more = l.len() > 3 && l[3] == b'-';
            if !more {
                let code = std::str::from_utf8(l.get(..3).unwrap_or(b""))
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                return Ok((code, String::from_utf8_lossy(&l).into_owned()));
            }
        }
    }

    async fn expect_smtp(&mut self, code: u16, what: &str) -> io::Result<()> {
        let (c, l) = self.smtp_reply().await?;
        if c != code {
            return Err(io::Error::other(format!("SMTP {what}: expected {code}, got `{l}`")));
        }
        Ok(())
    }

    async fn pop3_ok(&mut self, what: &str) -> io::Result<Vec<u8>> {
        let l = self.line().await?;
        if !l.starts_with(b"+OK") {
            return Err(io::Error::other(format!(
                "POP3 {what}: `{}`",
                String::from_utf8_lossy(&l)
            )));
        }
        Ok(l)
    }
}

/// First position of `b` in `h`, eight bytes at a time.
fn find_byte(h: &[u8], b: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pat = LO * u64::from(b);
    let mut i = 0;
    while i + 8 <= h.len() {
        let w = u64::from_le_bytes(h[i..i + 8].try_into().unwrap()) ^ pat;
        let z = w.wrapping_sub(LO) & !w & HI;
        if z != 0 {
            return Some(i + (z.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    h[i..].iter().position(|&x| x == b).map(|p| i + p)
}

// ---------------------------------------------------------------------------
// Counting SMTP sink: Dovecot's submission relays here. Counts messages and
// bytes, keeps nothing (the support SmtpSink stores every message and clones
// them all on each look, which 100 x 100 KiB x many runs would make costly).

pub struct CountSink {
    port: u16,
    messages: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    tid: Arc<AtomicI32>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CountSink {
    /// On its own thread and single-threaded runtime, like the support sink.
    pub fn start() -> CountSink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind sink");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (messages, bytes, tid) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicI32::new(0)),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (m2, b2, t2) = (messages.clone(), bytes.clone(), tid.clone());
        let thread = std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || {
                t2.store(unsafe { libc::gettid() }, Ordering::Relaxed);
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
                                let _ = sock.set_nodelay(true);
                                let (m, b) = (m2.clone(), b2.clone());
                                tokio::spawn(async move {
                                    let _ = sink_session(sock, m, b).await;
                                });
                            }
                        } => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .expect("spawn sink thread");
        CountSink {
            port,
            messages,
            bytes,
            tid,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// (messages, bytes as received, stuffing included) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.messages.load(Ordering::SeqCst), self.bytes.load(Ordering::SeqCst))
    }

    /// CPU seconds of the sink thread.
    pub fn cpu_secs(&self) -> f64 {
        let tid = self.tid.load(Ordering::Relaxed);
        let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
            return 0.0;
        };
        super::stat_cpu_secs(&s)
    }

    /// Waits until `n` messages arrived in total (Dovecot answers 250 only
    /// after the relay did, so this is normally immediate).
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> io::Result<Duration> {
        let t0 = Instant::now();
        while self.counts().0 < n {
            if t0.elapsed() > timeout {
                return Err(io::Error::other(format!(
                    "sink: {} messages after {timeout:?}, expected {n}",
                    self.counts().0
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(t0.elapsed())
    }
}

impl Drop for CountSink {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn sink_session(sock: TcpStream, messages: Arc<AtomicU64>, bytes: Arc<AtomicU64>) -> io::Result<()> {
    let mut c = RawConn::new(Stream::Plain(sock), 1 << 20);
    c.write(b"220 sink.localhost ESMTP bench sink\r\n").await?;
    let mut in_tx = false;
    let mut bdat = 0u64;
    loop {
        let l = c.line().await?;
        let verb = l.split(|&b| b == b' ').next().unwrap_or(b"").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-sink.localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n",
            b"HELO" => b"250 sink.localhost\r\n",
            b"MAIL" => {
                in_tx = true;
                bdat = 0;
                b"250 2.1.0 OK\r\n"
            }
            b"RCPT" => b"250 2.1.5 OK\r\n",
            b"DATA" => {
                c.write(b"354 go ahead\r\n").await?;
                let (n, _) = c.skip_dot_body().await?;
                if in_tx {
                    bytes.fetch_add(n, Ordering::SeqCst);
                    messages.fetch_add(1, Ordering::SeqCst);
                }
                in_tx = false;
                b"250 2.0.0 OK queued\r\n"
            }
            b"BDAT" => {
                let text = String::from_utf8_lossy(&l).into_owned();
                let mut parts = text.split_whitespace().skip(1);
                let size: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let last = parts.next().is_some_and(|s| s.eq_ignore_ascii_case("LAST"));
                let mut left = size;
                while left > 0 {
                    if c.start == c.end {
                        c.fill().await?;
                    }
                    let take = ((c.end - c.start) as u64).min(left);
                    c.start += take as usize;
                    left -= take;
                }
                bdat += size;
                if last && in_tx {
                    bytes.fetch_add(bdat, Ordering::SeqCst);
                    messages.fetch_add(1, Ordering::SeqCst);
                    in_tx = false;
                }
                b"250 2.0.0 OK\r\n"
            }
            b"RSET" => {
                in_tx = false;
                b"250 2.0.0 OK\r\n"
            }
            b"NOOP" => b"250 2.0.0 OK\r\n",
            b"QUIT" => {
                c.write(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.2 not implemented\r\n",
        };
        c.write(reply).await?;
    }
}

// ---------------------------------------------------------------------------
// Dovecot CPU: the master's own + reaped children's time, plus every live child's.

pub fn dovecot_master_pid(w: &World) -> Option<u32> {
    let conf = w.env.dovecot.dir().join("dovecot.conf");
    let conf = conf.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("dovecot")) && args.contains(&conf) {
            return Some(pid);
        }
    }
    None
}

/// utime + stime + cutime + cstime of the master and all its live children.
pub fn dovecot_cpu_secs(master: Option<u32>) -> f64 {
    let Some(master) = master else {
        return 0.0;
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let hz = if hz > 0.0 { hz } else { 100.0 };
    let fields = |pid: u32| -> Option<(u32, f64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let t: f64 = (11..15).filter_map(|i| f.get(i)?.parse::<f64>().ok()).sum();
        Some((ppid, t / hz))
    };
    let mut total = fields(master).map(|x| x.1).unwrap_or(0.0);
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = fields(pid) {
                if ppid == master {
                    total += t;
                }
            }
        }
    }
    total
}

/// CPU seconds over one timed run: (client, proxy, Dovecot, sink).
#[derive(Default, Clone, Copy)]
struct Cpu {
    client: f64,
    proxy: f64,
    dovecot: f64,
    sink: f64,
}

struct CpuProbe {
    me: f64,
    proxy: f64,
    dovecot: f64,
    sink: f64,
}

fn cpu_probe(w: &World, master: Option<u32>) -> CpuProbe {
    CpuProbe {
        me: proc_cpu_secs(std::process::id()),
        proxy: proc_cpu_secs(w.proxy().pid()),
        dovecot: dovecot_cpu_secs(master),
        sink: w.sink.as_ref().map(CountSink::cpu_secs).unwrap_or(0.0),
    }
}

fn cpu_since(w: &World, master: Option<u32>, p0: &CpuProbe, via_proxy: bool) -> Cpu {
    let p1 = cpu_probe(w, master);
    let sink = p1.sink - p0.sink;
    Cpu {
        // This process also runs the sink thread.
        client: (p1.me - p0.me - sink).max(0.0),
        proxy: if via_proxy { p1.proxy - p0.proxy } else { 0.0 },
        dovecot: p1.dovecot - p0.dovecot,
        sink,
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, o: Cpu) {
        self.client += o.client;
        self.proxy += o.proxy;
        self.dovecot += o.dovecot;
        self.sink += o.sink;
    }
}

fn cpu_line(label: &str, c: Cpu, secs: f64) -> String {
    let pct = |x: f64| 100.0 * x / secs.max(1e-9);
    format!(
        "{label}: client {:.0}%, proxy {:.0}%, Dovecot {:.0}%, sink {:.0}% of a core",
        pct(c.client),
        pct(c.proxy),
        pct(c.dovecot),
        pct(c.sink)
    )
}

/// Result of one paired (direct, proxy) comparison over several runs.
pub struct PairResult {
    pub label: String,
    /// Seconds per run.
    pub direct_s: Vec<f64>,
    pub proxy_s: Vec<f64>,
    /// Connect to logged in, ms (not timed in the judged figure).
    pub direct_login_ms: Vec<f64>,
    pub proxy_login_ms: Vec<f64>,
    cpu_direct: Cpu,
    cpu_proxy: Cpu,
    pub target: f64,
    /// Bytes the client moved per run (for MB/s).
    pub bytes: u64,
    pub note: String,
}

impl PairResult {
    fn new(label: String, target: f64, bytes: u64) -> PairResult {
        PairResult {
            label,
            direct_s: vec![],
            proxy_s: vec![],
            direct_login_ms: vec![],
            proxy_login_ms: vec![],
            cpu_direct: Cpu::default(),
            cpu_proxy: Cpu::default(),
            target,
            bytes,
            note: String::new(),
        }
    }

    /// direct time / proxy time of the medians (= proxy/direct throughput).
    fn ratio(&self) -> f64 {
        median(&self.direct_s) / median(&self.proxy_s)
    }

    fn paired(&self) -> f64 {
        let r: Vec<f64> = self.direct_s.iter().zip(&self.proxy_s).map(|(d, p)| d / p).collect();
        median(&r)
    }
}

/// Sections 5 and 6 for the report.
#[derive(Default)]
pub struct MailResults {
    pub smtp: Vec<PairResult>,
    pub pop3: Vec<PairResult>,
}

/// One timed session: what the run function returns.
struct RunOut {
    /// Timed part (transfers only), seconds.
    secs: f64,
    login_ms: f64,
    cpu: Cpu,
}

// ---------------------------------------------------------------------------
// 5. SMTP send

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Pipelined,
    Sequential,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pipelined => "pipelined",
            Mode::Sequential => "sequential",
        }
    }

    /// `pipelined`, `sequential` or `both`.
    pub fn parse_list(s: &str) -> Option<Vec<Mode>> {
        match s {
            "pipelined" => Some(vec![Mode::Pipelined]),
            "sequential" => Some(vec![Mode::Sequential]),
            "both" => Some(vec![Mode::Pipelined, Mode::Sequential]),
            _ => None,
        }
    }
}

const RCPT: &str = "bob@example.net";

/// `n` realistic text messages of `size` bytes each (CRLF lines <= 78
/// characters, sentences with punctuation, every ~25th line starting with
/// `.`), dot-stuffed and terminated for DATA. Returns (wire bytes, raw sizes).
fn smtp_messages(n: usize, size: usize) -> (Vec<Vec<u8>>, Vec<usize>, u64) {
    let mut next = xorshift(0x2545_F491_4F6C_DD1D);
    let (mut wire, mut sizes, mut dotted) = (Vec::with_capacity(n), Vec::with_capacity(n), 0u64);
    for i in 0..n {
        let mut m = format!(
            "From: Alice <{ALICE}>\r\nTo: Bob <{RCPT}>\r\nSubject: Bench message {i}: notes from the review\r\n\
             Message-ID: <bench-smtp-{i}@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        )
        .into_bytes();
        let mut line = String::new();
        let mut sentence = 0;
        loop {
            let r = next();
            if line.is_empty() && r.is_multiple_of(25) {
                // Lines a client must dot-stuff: ellipses, `.signature`, a lone dot.
                line.push_str([". . . continued", ".signature follows", ".", "...and more"][(r / 25 % 4) as usize]);
            } else {
                let w = word(r);
                if line.len() + w.len() + 2 > 76 {
                    m.extend_from_slice(line.as_bytes());
                    m.extend_from_slice(b"\r\n");
                    line.clear();
                    if r.is_multiple_of(9) {
                        m.extend_from_slice(b"\r\n");
                    }
                    if m.len() + 80 >= size {
                        break;
                    }
                    continue;
                }
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(w);
                sentence += 1;
                if sentence > 6 && r.is_multiple_of(7) {
                    line.push(if r.is_multiple_of(3) { ',' } else { '.' });
                    sentence = 0;
                }
            }
        }
        if !line.is_empty() {
            m.extend_from_slice(line.as_bytes());
            m.extend_from_slice(b"\r\n");
        }
        while m.len() + 2 < size {
            let k = (size - m.len() - 2).min(70);
            m.extend(std::iter::repeat_n(b'x', k));
            m.extend_from_slice(b"\r\n");
        }
        let mut out = Vec::with_capacity(m.len() + 1024);
        let mut at_ls = true;
        for &b in &m {
            if at_ls && b == b'.' {
                out.push(b'.');
                dotted += 1;
            }
            out.push(b);
            at_ls = b == b'\n';
        }
        out.extend_from_slice(b".\r\n");
        sizes.push(m.len());
        wire.push(out);
    }
    (wire, sizes, dotted)
}

/// One SMTP session sending every message; times MAIL of the first to the
/// 250 of the last.
async fn smtp_session(w: &World, via_proxy: bool, msgs: &[Vec<u8>], sizes: &[usize], mode: Mode) -> io::Result<RunOut> {
    let d = &w.env.dovecot;
    let master = w.dovecot_pid;
    let t0 = Instant::now();
    let mut c = if via_proxy {
        RawConn::connect(w.proxy().smtp.expect("smtp listener").port(), None, 1 << 16).await?
    } else {
        RawConn::connect(d.submissions_port, Some(d.tls_client_config()), 1 << 16).await?
    };
    c.expect_smtp(220, "greeting").await?;
    c.send("EHLO client.example.org").await?;
    c.expect_smtp(250, "EHLO").await?;
    if via_proxy {
        c.send(&format!("AUTH PLAIN {}", sc::plain_b64(ALICE, LOCAL_PW)))
            .await?;
    } else {
        c.send(&format!("AUTH XOAUTH2 {}", sc::xoauth2_b64(ALICE, &w.tokens[0])))
            .await?;
    }
    c.expect_smtp(235, "AUTH").await?;
    let login_ms = ms(t0.elapsed());
    let (n0, _) = w.sink.as_ref().expect("sink").counts();
    let p0 = cpu_probe(w, master);
    let t1 = Instant::now();
    for (m, size) in msgs.iter().zip(sizes) {
        let mail = format!("MAIL FROM:<{ALICE}> SIZE={size}");
        let rcpt = format!("RCPT TO:<{RCPT}>");
        match mode {
            Mode::Pipelined => {
                c.write(format!("{mail}\r\n{rcpt}\r\nDATA\r\n").as_bytes()).await?;
                c.expect_smtp(250, "MAIL").await?;
                c.expect_smtp(250, "RCPT").await?;
                c.expect_smtp(354, "DATA").await?;
            }
            Mode::Sequential => {
                c.send(&mail).await?;
                c.expect_smtp(250, "MAIL").await?;
                c.send(&rcpt).await?;
                c.expect_smtp(250, "RCPT").await?;
                c.send("DATA").await?;
                c.expect_smtp(354, "DATA").await?;
            }
        }
        c.write(m).await?;
        c.expect_smtp(250, "end of data").await?;
    }
    let secs = t1.elapsed().as_secs_f64();
    let cpu = cpu_since(w, master, &p0, via_proxy);
    c.send("QUIT").await?;
    let _ = c.smtp_reply().await;
    // Every message must have reached the sink (normally already there).
    let sink = w.sink.as_ref().unwrap();
    sink.wait_for(n0 + msgs.len() as u64, Duration::from_secs(20)).await?;
    Ok(RunOut { secs, login_ms, cpu })
}

pub async fn bench_smtp(w: &World, runs: usize, n: usize, kb: usize, modes: &[Mode]) -> io::Result<Vec<PairResult>> {
    let (msgs, sizes, dotted) = smtp_messages(n, kb * 1024);
    let raw: u64 = sizes.iter().map(|&s| s as u64).sum();
    let wire: u64 = msgs.iter().map(|m| m.len() as u64).sum();
    progress!(
        "smtp: {n} messages, {:.1} MB raw ({:.1} MB dot-stuffed on the wire, {dotted} stuffed lines); modes {:?}",
        raw as f64 / 1e6,
        wire as f64 / 1e6,
        modes.iter().map(|m| m.name()).collect::<Vec<_>>()
    );
    let (s0, b0) = w.sink.as_ref().expect("sink").counts();
    let mut out = Vec::new();
    for &mode in modes {
        let mut r = PairResult::new(mode.name().to_string(), 0.90, raw);
        // Warm-up: Dovecot's submission/auth processes, the proxy's token.
        smtp_session(w, false, &msgs, &sizes, mode).await?;
        smtp_session(w, true, &msgs, &sizes, mode).await?;
        for run in 0..runs {
            let proxy_first = run % 2 == 1;
            let (a, b) = if proxy_first {
                let p = smtp_session(w, true, &msgs, &sizes, mode).await?;
                (smtp_session(w, false, &msgs, &sizes, mode).await?, p)
            } else {
                let d = smtp_session(w, false, &msgs, &sizes, mode).await?;
                (d, smtp_session(w, true, &msgs, &sizes, mode).await?)
            };
            progress!(
                "smtp {} run {}/{runs}: direct {:.0} ms ({:.0} MB/s), proxy {:.0} ms ({:.0} MB/s), direct/proxy {:.3}",
                mode.name(),
                run + 1,
                a.secs * 1e3,
                raw as f64 / 1e6 / a.secs,
                b.secs * 1e3,
                raw as f64 / 1e6 / b.secs,
                a.secs / b.secs
            );
            r.direct_s.push(a.secs);
            r.proxy_s.push(b.secs);
            r.direct_login_ms.push(a.login_ms);
            r.proxy_login_ms.push(b.login_ms);
            r.cpu_direct += a.cpu;
            r.cpu_proxy += b.cpu;
        }
        out.push(r);
    }
    let (s1, b1) = w.sink.as_ref().unwrap().counts();
    let sessions = (modes.len() * (2 * runs + 2)) as u64;
    let per_msg_extra = (b1 - b0) as f64 / (s1 - s0).max(1) as f64 - wire as f64 / n as f64;
    if let Some(r) = out.first_mut() {
        r.note = format!(
            "sink received {} messages in {sessions} sessions (expected {}), all counted per run; \
             {:.0} bytes/message more than sent (Dovecot's Received: header)",
            s1 - s0,
            sessions * n as u64,
            per_msg_extra
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// 6. POP3 RETR

/// One POP3 session: login, STAT, then RETR 1..n timed.
async fn pop3_session(w: &World, via_proxy: bool, n: u64, bytes: u64, mode: Mode) -> io::Result<RunOut> {
    let d = &w.env.dovecot;
    let master = w.dovecot_pid;
    let t0 = Instant::now();
    let mut c = if via_proxy {
        RawConn::connect(w.proxy().pop3.expect("pop3 listener").port(), None, 1 << 20).await?
    } else {
        RawConn::connect(d.pop3s_port, Some(d.tls_client_config()), 1 << 20).await?
    };
    c.pop3_ok("greeting").await?;
    if via_proxy {
        c.send(&format!("USER {ALICE}")).await?;
        c.pop3_ok("USER").await?;
        c.send(&format!("PASS {LOCAL_PW}")).await?;
        c.pop3_ok("PASS").await?;
    } else {
        c.send("AUTH XOAUTH2").await?;
        let l = c.line().await?;
        if !l.starts_with(b"+") {
            return Err(io::Error::other(format!(
                "AUTH XOAUTH2: `{}`",
                String::from_utf8_lossy(&l)
            )));
        }
        c.send(&sc::xoauth2_b64(ALICE, &w.tokens[0])).await?;
        c.pop3_ok("AUTH XOAUTH2").await?;
    }
    let login_ms = ms(t0.elapsed());
    c.send("STAT").await?;
    let stat = c.pop3_ok("STAT").await?;
    let count: u64 = String::from_utf8_lossy(&stat)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if count != n {
        return Err(io::Error::other(format!("STAT says {count} messages, expected {n}")));
    }
    let p0 = cpu_probe(w, master);
    let t1 = Instant::now();
    let (mut got, mut dotted) = (0u64, 0u64);
    match mode {
        Mode::Pipelined => {
            let mut cmds = String::with_capacity(n as usize * 12);
            for i in 1..=n {
                cmds.push_str(&format!("RETR {i}\r\n"));
            }
            c.write(cmds.as_bytes()).await?;
            for i in 1..=n {
                c.pop3_ok(&format!("RETR {i}")).await?;
                let (b, dl) = c.skip_dot_body().await?;
                got += b;
                dotted += dl;
            }
        }
        Mode::Sequential => {
            for i in 1..=n {
                c.send(&format!("RETR {i}")).await?;
                c.pop3_ok(&format!("RETR {i}")).await?;
                let (b, dl) = c.skip_dot_body().await?;
                got += b;
                dotted += dl;
            }
        }
    }
    let secs = t1.elapsed().as_secs_f64();
    let cpu = cpu_since(w, master, &p0, via_proxy);
    // Stuffed lines carry one extra byte each.
    if got - dotted != bytes {
        return Err(io::Error::other(format!(
            "RETR 1..{n} returned {got} bytes ({dotted} stuffed lines), expected {bytes}"
        )));
    }
    c.send("QUIT").await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), c.line()).await;
    Ok(RunOut { secs, login_ms, cpu })
}

pub async fn bench_pop3(w: &World, runs: usize, n: u64, bytes: u64, modes: &[Mode]) -> io::Result<Vec<PairResult>> {
    progress!(
        "pop3: RETR 1..{n} ({:.1} MB) per session, modes {:?}",
        bytes as f64 / 1e6,
        modes.iter().map(|m| m.name()).collect::<Vec<_>>()
    );
    let mut out = Vec::new();
    for &mode in modes {
        let mut r = PairResult::new(mode.name().to_string(), 0.95, bytes);
        pop3_session(w, false, n, bytes, mode).await?;
        pop3_session(w, true, n, bytes, mode).await?;
        for run in 0..runs {
            let proxy_first = run % 2 == 1;
            let (a, b) = if proxy_first {
                let p = pop3_session(w, true, n, bytes, mode).await?;
                (pop3_session(w, false, n, bytes, mode).await?, p)
            } else {
                let d = pop3_session(w, false, n, bytes, mode).await?;
                (d, pop3_session(w, true, n, bytes, mode).await?)
            };
            progress!(
                "pop3 {} run {}/{runs}: direct {:.0} MB/s ({:.0} ms), proxy {:.0} MB/s ({:.0} ms), proxy/direct {:.3}",
                mode.name(),
                run + 1,
                bytes as f64 / 1e6 / a.secs,
                a.secs * 1e3,
                bytes as f64 / 1e6 / b.secs,
                b.secs * 1e3,
                a.secs / b.secs
            );
            r.direct_s.push(a.secs);
            r.proxy_s.push(b.secs);
            r.direct_login_ms.push(a.login_ms);
            r.proxy_login_ms.push(b.login_ms);
            r.cpu_direct += a.cpu;
            r.cpu_proxy += b.cpu;
        }
        out.push(r);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Report

/// Prints one section's table; returns the number of missed targets.
pub fn print_pairs(results: &[PairResult], what: &str) -> usize {
    let mut misses = 0;
    println!(
        "   {:<11} {:>10} {:>10} {:>11} {:>11} {:>13} {:>13} {:>8}",
        "mode", "direct", "proxy", "direct MB/s", "proxy MB/s", "direct/proxy", "paired ratio", "target"
    );
    for r in results {
        let (d, p) = (median(&r.direct_s), median(&r.proxy_s));
        let mb = r.bytes as f64 / 1e6;
        let pass = r.ratio() >= r.target;
        misses += usize::from(!pass);
        println!(
            "   {:<11} {:>7.0} ms {:>7.0} ms {:>11.1} {:>11.1} {:>13.3} {:>13.3} {:>8}  {}",
            r.label,
            d * 1e3,
            p * 1e3,
            mb / d,
            mb / p,
            r.ratio(),
            r.paired(),
            format!(">= {:.2}", r.target),
            verdict(pass)
        );
    }
    println!("   (direct/proxy: direct time / proxy time of the medians = proxy throughput as a fraction of direct,");
    println!("    judged against the target; paired ratio: median of per-run ratios of back-to-back pairs)");
    for r in results {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.0}", x * 1e3))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "   runs {} (ms): direct [{}]  proxy [{}]",
            r.label,
            fmt(&r.direct_s),
            fmt(&r.proxy_s)
        );
    }
    for r in results {
        println!(
            "   login {} ({what}, not in the timed part): direct median {:.2} ms, proxy median {:.2} ms",
            r.label,
            median(&r.direct_login_ms),
            median(&r.proxy_login_ms)
        );
    }
    for r in results {
        let (sd, sp): (f64, f64) = (r.direct_s.iter().sum(), r.proxy_s.iter().sum());
        println!(
            "   cpu {}: {}; {}",
            r.label,
            cpu_line("direct", r.cpu_direct, sd),
            cpu_line("via proxy", r.cpu_proxy, sp)
        );
    }
    for r in results.iter().filter(|r| !r.note.is_empty()) {
        println!("   {}", r.note);
    }
    misses
}

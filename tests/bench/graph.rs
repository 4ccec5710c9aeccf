//! The Graph section of `scripts/bench`: mailproxy's submission through
//! Microsoft Graph (`smtp = "graph+http://…"`) against its ordinary SMTP
//! relay, side by side in one run, each to a sink.
//!
//! - Graph: client plain -> proxy (AUTH PLAIN, local password); the proxy
//!   spools each message to disk, then posts it to a counting Graph below
//!   (`sendMail` with base64 MIME under 4 MB; over that a draft, upload
//!   sessions in chunks and `send`) and answers 250 once Graph took it.
//! - SMTP relay: the SMTP section's path: client plain -> proxy -> Dovecot
//!   submissions (implicit TLS, XOAUTH2), which relays every message to the
//!   counting SMTP sink before its 250.
//!
//! Measured: M small messages over S sessions at once (messages/s), N large
//! messages at once, one per session (MB/s), and the proxy's resident memory
//! while the large ones are in flight: (peak - settled RSS before) / N, on a
//! fresh proxy warmed by one message. Interleaved runs after a warm-up,
//! medians, Graph/SMTP ratios.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::support::client as sc;
use super::support::graph::{audience, GRAPH_SCOPE};
use super::support::mailproxy::{oauth_account, Proxy, ProxyDir};
use super::support::provider::{self, TokenView};
use super::words::{word, xorshift};
use super::{
    median, proc_cpu_secs, proc_status_kib, settled_rss, stat_cpu_secs, verdict, World, ALICE, LOCAL_PW, START,
};

/// The account that sends through Graph (its own user at the provider).
const GRAPH_USER: &str = "graph@example.org";
const RCPT: &str = "bob@example.net";
const IO_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Debug)]
pub struct GraphOpts {
    runs: usize,
    small: usize,
    small_kb: usize,
    small_sessions: usize,
    large: usize,
    large_mb: usize,
}

impl Default for GraphOpts {
    fn default() -> Self {
        GraphOpts {
            runs: 5,
            small: 1000,
            small_kb: 4,
            small_sessions: 4,
            large: 20,
            large_mb: 10,
        }
    }
}

pub const USAGE: &str = "  --graph-runs N      timed runs per path in the graph section, after one warm-up (default 5)
  --graph-small N     small messages per run in the graph section (default 1000)
  --graph-small-kb N  size of each small message in KiB (default 4)
  --graph-sessions N  sessions the small messages are spread over, at once (default 4)
  --graph-large N     large messages per run, one per session, at once (default 20)
  --graph-large-mb N  size of each large message in MB (default 10)
";

impl GraphOpts {
    /// One `--graph-*` option and its value.
    pub fn set(&mut self, flag: &str, v: Option<String>) {
        let v = v.unwrap_or_else(|| super::die(&format!("{flag} needs a value")));
        let n: usize = v
            .parse()
            .unwrap_or_else(|_| super::die(&format!("{flag}: `{v}` is not a number")));
        let n = n.max(1);
        match flag {
            "--graph-runs" => self.runs = n,
            "--graph-small" => self.small = n,
            "--graph-small-kb" => self.small_kb = n,
            "--graph-sessions" => self.small_sessions = n,
            "--graph-large" => self.large = n,
            "--graph-large-mb" => self.large_mb = n,
            _ => super::die(&format!("unknown option `{flag}`\n\n{}", super::USAGE)),
        }
    }
}

// ---------------------------------------------------------------------------
// A counting Microsoft Graph: the routes mailproxy uses, over HTTP/1.1 with
// keep-alive, checking each bearer token at the provider. It keeps nothing
// but counts (the harness's fake Graph keeps every message, which 20 x 10 MB
// per run would make costly), on its own thread and single-threaded runtime
// like the counting SMTP sink.

struct Upload {
    draft: String,
    size: u64,
    got: u64,
}

struct SinkState {
    tokens: TokenView,
    port: u16,
    /// Draft id -> decoded bytes so far (MIME plus uploaded attachments).
    drafts: Mutex<HashMap<String, u64>>,
    uploads: Mutex<HashMap<String, Upload>>,
    next_id: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    requests: AtomicU64,
    largest: AtomicU64,
    refused: AtomicU64,
}

pub struct GraphSink {
    state: Arc<SinkState>,
    tid: Arc<AtomicI32>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GraphSink {
    fn start(tokens: TokenView) -> GraphSink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind graph sink");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(SinkState {
            tokens,
            port,
            drafts: Mutex::default(),
            uploads: Mutex::default(),
            next_id: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            largest: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let tid = Arc::new(AtomicI32::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (st, t2) = (state.clone(), tid.clone());
        let thread = std::thread::Builder::new()
            .name("bench-graph".into())
            .spawn(move || {
                t2.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("graph sink runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        _ = rx => {}
                        () = async {
                            loop {
                                let Ok((sock, _)) = listener.accept().await else { continue };
                                let _ = sock.set_nodelay(true);
                                let st = st.clone();
                                tokio::spawn(async move {
                                    let _ = graph_conn(sock, st).await;
                                });
                            }
                        } => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .expect("spawn graph sink thread");
        GraphSink {
            state,
            tid,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// What the account's `smtp` says.
    fn smtp_setting(&self) -> String {
        format!("graph+http://127.0.0.1:{}/v1.0", self.state.port)
    }

    /// (messages sent, decoded bytes of them).
    fn counts(&self) -> (u64, u64) {
        (
            self.state.messages.load(Ordering::SeqCst),
            self.state.bytes.load(Ordering::SeqCst),
        )
    }

    fn cpu_secs(&self) -> f64 {
        let tid = self.tid.load(Ordering::Relaxed);
        std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .map(|s| stat_cpu_secs(&s))
            .unwrap_or(0.0)
    }
}

impl Drop for GraphSink {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP response with keep-alive.
fn response(status: u16, body: &str) -> Vec<u8> {
    let ctype = if body.is_empty() {
        "text/plain"
    } else {
        "application/json"
    };
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn graph_error(status: u16, code: &str) -> Vec<u8> {
    response(status, &json!({"error": {"code": code, "message": code}}).to_string())
}

/// The decoded length of a base64 text without line breaks.
fn b64_decoded_len(b: &[u8]) -> u64 {
    let b = b.trim_ascii();
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count() as u64;
    (b.len() as u64 / 4 * 3).saturating_sub(pad)
}

async fn graph_conn(sock: TcpStream, st: Arc<SinkState>) -> io::Result<()> {
    let mut r = BufReader::with_capacity(256 * 1024, sock);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next().map(str::to_string), parts.next().map(str::to_string)) else {
            return Ok(());
        };
        let (mut len, mut bearer, mut range) = (0u64, String::new(), String::new());
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((k, v)) = h.split_once(':') else { continue };
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.parse().unwrap_or(0),
                "authorization" => bearer = v.strip_prefix("Bearer ").unwrap_or("").to_string(),
                "content-range" => range = v.to_string(),
                _ => {}
            }
        }
        st.requests.fetch_add(1, Ordering::Relaxed);
        st.largest.fetch_max(len, Ordering::Relaxed);
        let path = target.split('?').next().unwrap_or("").to_string();
        let resp = if method == "PUT" && path.starts_with("/upload/") {
            // Chunks are counted, not kept.
            let got = tokio::io::copy(&mut (&mut r).take(len), &mut tokio::io::sink()).await?;
            if got != len {
                return Ok(());
            }
            upload(&st, &path["/upload/".len()..], &range, len)
        } else {
            let mut body = vec![0u8; usize::try_from(len).unwrap_or(0)];
            r.read_exact(&mut body).await?;
            route(&st, &method, &path, &bearer, &body)
        };
        r.get_mut().write_all(&resp).await?;
    }
}

fn route(st: &SinkState, method: &str, path: &str, bearer: &str, body: &[u8]) -> Vec<u8> {
    let Some(rest) = path.strip_prefix("/v1.0/users/") else {
        return graph_error(404, "ResourceNotFound");
    };
    match st.tokens.live(bearer) {
        Some((_, scope)) if audience(&scope) == Some(GRAPH_SCOPE) => {}
        _ => return graph_error(401, "InvalidAuthenticationToken"),
    }
    if body.len() > super::support::graph::MAX_REQUEST {
        st.refused.fetch_add(1, Ordering::Relaxed);
        return graph_error(413, "ErrorRequestEntityTooLarge");
    }
    let parts: Vec<&str> = rest.split('/').skip(1).collect();
    match (method, parts.as_slice()) {
        ("POST", ["sendMail"]) => {
            st.bytes.fetch_add(b64_decoded_len(body), Ordering::SeqCst);
            st.messages.fetch_add(1, Ordering::SeqCst);
            response(202, "")
        }
        ("POST", ["messages"]) => {
            let id = format!("AAMk{}=", st.next_id.fetch_add(1, Ordering::Relaxed));
            st.drafts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id.clone(), b64_decoded_len(body));
            response(201, &json!({"id": id}).to_string())
        }
        ("POST", ["messages", id, "attachments", "createUploadSession"]) => {
            let id = super::support::http::percent_decode(id);
            let item: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let Some(size) = item["AttachmentItem"]["size"].as_u64() else {
                return graph_error(400, "ErrorInvalidRequest");
            };
            if !st
                .drafts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&id)
            {
                return graph_error(404, "ErrorItemNotFound");
            }
            let sid = format!("s{}", st.next_id.fetch_add(1, Ordering::Relaxed));
            st.uploads.lock().unwrap_or_else(PoisonError::into_inner).insert(
                sid.clone(),
                Upload {
                    draft: id,
                    size,
                    got: 0,
                },
            );
            let url = format!("http://127.0.0.1:{}/upload/{sid}", st.port);
            response(201, &json!({"uploadUrl": url}).to_string())
        }
        ("POST", ["messages", id, "send"]) => {
            let id = super::support::http::percent_decode(id);
            let pending = st
                .uploads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .any(|u| u.draft == id);
            if pending {
                return graph_error(400, "ErrorInvalidRequest");
            }
            let Some(bytes) = st.drafts.lock().unwrap_or_else(PoisonError::into_inner).remove(&id) else {
                return graph_error(404, "ErrorItemNotFound");
            };
            st.bytes.fetch_add(bytes, Ordering::SeqCst);
            st.messages.fetch_add(1, Ordering::SeqCst);
            response(202, "")
        }
        ("DELETE", ["messages", id]) => {
            st.drafts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&super::support::http::percent_decode(id));
            response(204, "")
        }
        _ => graph_error(405, "ErrorInvalidRequest"),
    }
}

/// A chunk of an upload session (`Content-Range: bytes a-b/size`, in order).
fn upload(st: &SinkState, sid: &str, range: &str, len: u64) -> Vec<u8> {
    let parsed = range.strip_prefix("bytes ").and_then(|r| {
        let (span, total) = r.split_once('/')?;
        let (a, b) = span.split_once('-')?;
        Some((
            a.parse::<u64>().ok()?,
            b.parse::<u64>().ok()?,
            total.parse::<u64>().ok()?,
        ))
    });
    let mut uploads = st.uploads.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(up) = uploads.get_mut(sid) else {
        return graph_error(404, "ErrorItemNotFound");
    };
    let Some((a, b, total)) = parsed else {
        return graph_error(400, "InvalidRange");
    };
    if a != up.got || total != up.size || b + 1 - a != len {
        return graph_error(416, "InvalidRange");
    }
    up.got += len;
    if up.got < up.size {
        return response(200, &json!({"nextExpectedRanges": [format!("{}-", b + 1)]}).to_string());
    }
    let up = uploads.remove(sid).unwrap();
    drop(uploads);
    if let Some(d) = st
        .drafts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_mut(&up.draft)
    {
        *d += up.size;
    }
    response(201, "")
}

// ---------------------------------------------------------------------------
// Messages

struct Msg {
    /// Dot-stuffed and terminated for DATA.
    wire: Vec<u8>,
    /// As the sender means it.
    size: usize,
}

fn stuffed(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + 1024);
    let mut at_ls = true;
    for &b in m {
        if at_ls && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_ls = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// `n` text messages of about `size` bytes from `from`.
fn small_messages(from: &str, n: usize, size: usize) -> Vec<Msg> {
    let mut next = xorshift(0x5851_F42D_4C95_7F2D);
    (0..n)
        .map(|i| {
            let mut m = format!(
                "From: <{from}>\r\nTo: Bob <{RCPT}>\r\nSubject: Bench message {i}: the weekly figures\r\n\
                 Message-ID: <bench-graph-{i}@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\n\
                 Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            )
            .into_bytes();
            let mut line = String::new();
            while m.len() + line.len() + 2 < size {
                let w = word(next());
                if line.len() + w.len() + 1 > 72 {
                    m.extend_from_slice(line.as_bytes());
                    m.extend_from_slice(b"\r\n");
                    line.clear();
                    continue;
                }
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(w);
            }
            m.extend_from_slice(line.as_bytes());
            m.extend_from_slice(b"\r\n");
            Msg {
                wire: stuffed(&m),
                size: m.len(),
            }
        })
        .collect()
}

/// A multipart message of about `size` bytes: a short text part and one
/// base64 attachment (76-character lines) that makes up the rest.
fn large_message(from: &str, size: usize) -> Msg {
    let head = format!(
        "From: <{from}>\r\nTo: Bob <{RCPT}>\r\nSubject: The scans, attached\r\nMessage-ID: <bench-graph-large@example.org>\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b-bench\"\r\n\r\n\
         --b-bench\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe scans are attached.\r\n--b-bench\r\n\
         Content-Type: application/pdf; name=\"scans.pdf\"\r\nContent-Disposition: attachment; filename=\"scans.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n"
    );
    let tail = "--b-bench--\r\n";
    let lines = size.saturating_sub(head.len() + tail.len()) / 78;
    let mut next = xorshift(0x2545_F491_4F6C_DD1D);
    let data: Vec<u8> = (0..lines * 57).map(|_| next() as u8).collect();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &data);
    let mut m = Vec::with_capacity(size + 1024);
    m.extend_from_slice(head.as_bytes());
    for chunk in b64.as_bytes().chunks(76) {
        m.extend_from_slice(chunk);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(tail.as_bytes());
    Msg {
        wire: stuffed(&m),
        size: m.len(),
    }
}

// ---------------------------------------------------------------------------
// A raw SMTP client

struct Smtp {
    s: BufReader<TcpStream>,
    line: String,
}

impl Smtp {
    /// Connects, EHLO, AUTH PLAIN with the local password.
    async fn login(port: u16, user: &str) -> io::Result<Smtp> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let mut c = Smtp {
            s: BufReader::with_capacity(64 * 1024, tcp),
            line: String::new(),
        };
        c.expect(220, "greeting").await?;
        c.write(b"EHLO client.example.org\r\n").await?;
        c.expect(250, "EHLO").await?;
        c.write(format!("AUTH PLAIN {}\r\n", sc::plain_b64(user, LOCAL_PW)).as_bytes())
            .await?;
        c.expect(235, "AUTH").await?;
        Ok(c)
    }

    async fn write(&mut self, b: &[u8]) -> io::Result<()> {
        let s = self.s.get_mut();
        tokio::time::timeout(IO_TIMEOUT, s.write_all(b))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timeout"))?
    }

    /// The last line of a reply and its code.
    async fn reply(&mut self) -> io::Result<(u16, String)> {
        loop {
            self.line.clear();
            let n = tokio::time::timeout(IO_TIMEOUT, self.s.read_line(&mut self.line))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read timeout"))??;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
            }
            let l = self.line.trim_end();
            if l.as_bytes().get(3) != Some(&b'-') {
                let code = l.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok((code, l.to_string()));
            }
        }
    }

    async fn expect(&mut self, code: u16, what: &str) -> io::Result<()> {
        let (c, l) = self.reply().await?;
        if c != code {
            return Err(io::Error::other(format!("SMTP {what}: expected {code}, got `{l}`")));
        }
        Ok(())
    }

    /// MAIL + RCPT + DATA in one write, then the data; waits for the final 250.
    async fn send(&mut self, from: &str, m: &Msg) -> io::Result<()> {
        self.write(format!("MAIL FROM:<{from}> SIZE={}\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n", m.size).as_bytes())
            .await?;
        self.expect(250, "MAIL").await?;
        self.expect(250, "RCPT").await?;
        self.expect(354, "DATA").await?;
        self.write(&m.wire).await?;
        self.expect(250, "end of data").await
    }

    async fn quit(mut self) {
        let _ = self.write(b"QUIT\r\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.reply()).await;
    }
}

// ---------------------------------------------------------------------------
// The section's proxy: one Graph account, one account relaying to Dovecot

/// Which of the two paths a run takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Graph,
    Smtp,
}

impl Path {
    fn user(self) -> &'static str {
        match self {
            Path::Graph => GRAPH_USER,
            Path::Smtp => ALICE,
        }
    }
}

struct Bench<'a> {
    w: &'a World,
    dir: ProxyDir,
    proxy: Proxy,
    graph: GraphSink,
}

/// CPU seconds over one run.
#[derive(Default, Clone, Copy)]
struct Cpu {
    client: f64,
    proxy: f64,
    graph: f64,
    dovecot: f64,
    smtp_sink: f64,
    secs: f64,
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, o: Cpu) {
        self.client += o.client;
        self.proxy += o.proxy;
        self.graph += o.graph;
        self.dovecot += o.dovecot;
        self.smtp_sink += o.smtp_sink;
        self.secs += o.secs;
    }
}

impl Cpu {
    fn line(&self, path: Path) -> String {
        let pct = |x: f64| 100.0 * x / self.secs.max(1e-9);
        match path {
            Path::Graph => format!(
                "client {:.0}%, proxy {:.0}%, Graph sink {:.0}%",
                pct(self.client),
                pct(self.proxy),
                pct(self.graph)
            ),
            Path::Smtp => format!(
                "client {:.0}%, proxy {:.0}%, Dovecot {:.0}%, SMTP sink {:.0}%",
                pct(self.client),
                pct(self.proxy),
                pct(self.dovecot),
                pct(self.smtp_sink)
            ),
        }
    }
}

impl Bench<'_> {
    fn start(w: &World) -> Bench<'_> {
        let graph = GraphSink::start(w.env.provider.token_view());
        let dir = ProxyDir::new();
        let d = &w.env.dovecot;
        let mut cfg = dir.header().replace(
            "[server]\n",
            &format!("[server]\nca_file = \"{}\"\n", d.ca_pem_path().display()),
        );
        cfg += "[limits]\nmax_connections = 5000\nmax_connections_per_ip = 5000\n\n";
        cfg += "[smtp]\nlisten = \"127.0.0.1:0\"\ntls = \"none\"\n\n";
        cfg += &oauth_account(
            ALICE,
            &w.env.provider,
            d,
            &format!("imaps://localhost:{}", d.imaps_port),
        );
        cfg += &format!("smtp = \"smtps://localhost:{}\"\n\n", d.submissions_port);
        let p = &w.env.provider;
        cfg += &format!(
            "[accounts.\"{GRAPH_USER}\"]\nprovider = \"custom\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\n\
             client_secret = \"{}\"\nscopes = [\"https://mail.example.org/\", \"offline_access\"]\n\
             graph_scopes = [\"{GRAPH_SCOPE}\", \"offline_access\"]\nsmtp = \"{}\"\n\n",
            p.auth_url(),
            p.token_url(),
            provider::CLIENT_ID,
            provider::CLIENT_SECRET,
            graph.smtp_setting(),
        );
        dir.write_config(&cfg);
        for a in [ALICE, GRAPH_USER] {
            let (st, err) = dir.login(a, LOCAL_PW);
            if !st.success() {
                super::die(&format!("graph: mailproxy login {a} failed: {err}"));
            }
        }
        let proxy = Proxy::start_env(&dir, &[("RUST_LOG", w.proxy_log.as_str())]);
        Bench { w, dir, proxy, graph }
    }

    /// A fresh proxy (same state directory: accounts and refresh tokens kept),
    /// so that memory freed by earlier runs does not hide growth.
    fn restart(&mut self) {
        self.proxy.stop();
        self.proxy = Proxy::start_env(&self.dir, &[("RUST_LOG", self.w.proxy_log.as_str())]);
    }

    fn port(&self) -> u16 {
        self.proxy.smtp.expect("smtp listener").port()
    }

    fn smtp_counts(&self) -> (u64, u64) {
        self.w
            .sink
            .as_ref()
            .map(super::mail::CountSink::counts)
            .unwrap_or((0, 0))
    }

    fn probe(&self) -> Cpu {
        let graph = self.graph.cpu_secs();
        let smtp_sink = self
            .w
            .sink
            .as_ref()
            .map(super::mail::CountSink::cpu_secs)
            .unwrap_or(0.0);
        Cpu {
            // This process also runs both sinks' threads.
            client: proc_cpu_secs(std::process::id()) - graph - smtp_sink,
            proxy: proc_cpu_secs(self.proxy.pid()),
            graph,
            dovecot: super::mail::dovecot_cpu_secs(self.w.dovecot_pid),
            smtp_sink,
            secs: 0.0,
        }
    }

    fn cpu_since(&self, p0: &Cpu, secs: f64) -> Cpu {
        let p1 = self.probe();
        Cpu {
            client: (p1.client - p0.client).max(0.0),
            proxy: p1.proxy - p0.proxy,
            graph: p1.graph - p0.graph,
            dovecot: p1.dovecot - p0.dovecot,
            smtp_sink: p1.smtp_sink - p0.smtp_sink,
            secs,
        }
    }

    /// `msgs` spread over `sessions` sessions at once, all logged in before
    /// the clock starts. Returns (seconds from the start to the last 250,
    /// proxy RSS peak in KiB while they ran, CPU).
    async fn run(&self, path: Path, msgs: &Arc<Vec<Msg>>, sessions: usize, reps: usize) -> io::Result<(f64, u64, Cpu)> {
        let total = msgs.len() * reps;
        let (g0, s0) = (self.graph.counts().0, self.smtp_counts().0);
        let gate = Arc::new(tokio::sync::Barrier::new(sessions + 1));
        let port = self.port();
        let mut tasks = Vec::with_capacity(sessions);
        for i in 0..sessions {
            let (gate, msgs) = (gate.clone(), msgs.clone());
            tasks.push(tokio::spawn(async move {
                let c = Smtp::login(port, path.user()).await;
                gate.wait().await;
                let mut c = c?;
                for k in (i..total).step_by(sessions) {
                    c.send(path.user(), &msgs[k % msgs.len()]).await?;
                }
                let end = Instant::now();
                c.quit().await;
                io::Result::Ok(end)
            }));
        }
        // The proxy's resident memory, sampled while the messages are in flight.
        let pid = self.proxy.pid();
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5"); // resets VmHWM
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut peak = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(proc_status_kib(pid, "VmRSS"));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                peak
            })
        };
        gate.wait().await;
        let p0 = self.probe();
        let t0 = Instant::now();
        let mut last = t0;
        let mut first_err = None;
        for t in tasks {
            match t.await.map_err(io::Error::other).and_then(|r| r) {
                Ok(end) => last = last.max(end),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let secs = (last - t0).as_secs_f64();
        let cpu = self.cpu_since(&p0, secs);
        stop.store(true, Ordering::Relaxed);
        let peak = sampler.await.unwrap_or(0).max(proc_status_kib(pid, "VmHWM"));
        if let Some(e) = first_err {
            return Err(e);
        }
        // Every message reached its sink.
        let want = total as u64;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = match path {
                Path::Graph => self.graph.counts().0 - g0,
                Path::Smtp => self.smtp_counts().0 - s0,
            };
            if got >= want {
                break;
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("sink got {got} of {want} messages")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((secs, peak, cpu))
    }
}

// ---------------------------------------------------------------------------
// The section

pub struct GraphResult {
    small: usize,
    small_bytes: u64,
    sessions: usize,
    large: usize,
    large_size: u64,
    runs: usize,
    /// Seconds per run: small Graph, small SMTP, large Graph, large SMTP.
    secs: [Vec<f64>; 4],
    cpu: [Cpu; 4],
    /// Per large run: (baseline, peak) RSS in KiB, Graph and SMTP.
    rss: [Vec<(u64, u64)>; 2],
    note: String,
}

impl GraphResult {
    fn per_session_kib(&self, i: usize) -> Vec<f64> {
        self.rss[i]
            .iter()
            .map(|&(b, p)| (p as f64 - b as f64) / self.large as f64)
            .collect()
    }
}

pub async fn bench_graph(w: &World, o: &GraphOpts) -> io::Result<GraphResult> {
    progress!("graph: counting Graph, a proxy with a Graph account and one relaying to Dovecot's submissions");
    let mut b = tokio::task::block_in_place(|| Bench::start(w));
    let small: [Arc<Vec<Msg>>; 2] = [
        Arc::new(small_messages(GRAPH_USER, o.small, o.small_kb * 1024)),
        Arc::new(small_messages(ALICE, o.small, o.small_kb * 1024)),
    ];
    let large: [Arc<Vec<Msg>>; 2] = [
        Arc::new(vec![large_message(GRAPH_USER, o.large_mb * 1_000_000)]),
        Arc::new(vec![large_message(ALICE, o.large_mb * 1_000_000)]),
    ];
    let small_bytes: u64 = small[0].iter().map(|m| m.size as u64).sum();
    let large_size = large[0][0].size as u64;
    // One message per path to warm a fresh proxy: password, tokens, spool directory.
    let one: [Arc<Vec<Msg>>; 2] = [
        Arc::new(small_messages(GRAPH_USER, 1, o.small_kb * 1024)),
        Arc::new(small_messages(ALICE, 1, o.small_kb * 1024)),
    ];
    let mut r = GraphResult {
        small: o.small,
        small_bytes,
        sessions: o.small_sessions,
        large: o.large,
        large_size,
        runs: o.runs,
        secs: Default::default(),
        cpu: [Cpu::default(); 4],
        rss: Default::default(),
        note: String::new(),
    };
    let paths = [Path::Graph, Path::Smtp];
    let (g0, gb0) = b.graph.counts();
    progress!(
        "graph: {} messages of {} KiB over {} sessions, {} of {:.1} MB at once; warm-up",
        o.small,
        o.small_kb,
        o.small_sessions,
        o.large,
        large_size as f64 / 1e6
    );
    // Warm-up: tokens (the Graph one is fetched on first use), Dovecot's processes, the spool directory.
    for (i, &p) in paths.iter().enumerate() {
        b.run(p, &small[i], o.small_sessions, 1).await?;
        b.run(p, &large[i], o.large, o.large).await?;
    }
    for run in 0..o.runs {
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (secs, _, cpu) = b.run(paths[i], &small[i], o.small_sessions, 1).await?;
            r.secs[i].push(secs);
            r.cpu[i] += cpu;
        }
        for i in order {
            // Memory is measured on a fresh proxy, warmed by one message.
            tokio::task::block_in_place(|| b.restart());
            b.run(paths[i], &one[i], 1, 1).await?;
            let base = settled_rss(&b.proxy).await;
            let (secs, peak, cpu) = b.run(paths[i], &large[i], o.large, o.large).await?;
            r.secs[2 + i].push(secs);
            r.cpu[2 + i] += cpu;
            r.rss[i].push((base, peak));
        }
        let at = |i: usize| r.secs[i].last().copied().unwrap_or(f64::NAN);
        progress!(
            "graph run {}/{}: small {:.0} vs {:.0} msg/s, large {:.1} vs {:.1} MB/s (Graph vs SMTP relay); RSS peak over base {:.0} / {:.0} KiB per session",
            run + 1,
            o.runs,
            o.small as f64 / at(0),
            o.small as f64 / at(1),
            (large_size * o.large as u64) as f64 / 1e6 / at(2),
            (large_size * o.large as u64) as f64 / 1e6 / at(3),
            r.per_session_kib(0).last().copied().unwrap_or(f64::NAN),
            r.per_session_kib(1).last().copied().unwrap_or(f64::NAN),
        );
    }
    let (g1, gb1) = b.graph.counts();
    let st = &b.graph.state;
    let expect = (o.runs as u64 + 1) * (o.small + o.large) as u64 + o.runs as u64;
    r.note = format!(
        "Graph sink: {} messages (expected {expect}), {:.1} MB of MIME and uploaded attachment bytes (decoded), \
         {} requests, largest body {:.2} MB, {} refused as over 4 MB",
        g1 - g0,
        (gb1 - gb0) as f64 / 1e6,
        st.requests.load(Ordering::Relaxed),
        st.largest.load(Ordering::Relaxed) as f64 / 1e6,
        st.refused.load(Ordering::Relaxed),
    );
    Ok(r)
}

/// The section's table; returns the number of missed targets.
pub fn print_graph(r: &GraphResult) -> usize {
    let med = |i: usize| median(&r.secs[i]);
    println!();
    println!(
        "Graph. Submission through Microsoft Graph vs the SMTP relay, same proxy, each to a counting sink; medians of {} interleaved runs after a warm-up",
        r.runs
    );
    println!("   (client plain to the proxy, AUTH PLAIN, MAIL+RCPT+DATA pipelined per message, timed from all sessions logged in");
    println!(
        "    to the last final 250. Graph: the proxy spools each message, then sendMail, or over 4 MB a draft, upload"
    );
    println!("    sessions of 3.2 MB chunks and send, to a local counting Graph over HTTP with keep-alive; 250 once Graph took it.");
    println!("    SMTP relay: the SMTP section's path, proxy TLS to Dovecot submissions, which relays to a counting sink before its 250)");
    println!(
        "   {:<36} {:>14} {:>14} {:>11}",
        "case", "Graph", "SMTP relay", "Graph/SMTP"
    );
    let (gs, ss) = (r.small as f64 / med(0), r.small as f64 / med(1));
    println!(
        "   {:<36} {:>8.0} msg/s {:>8.0} msg/s {:>11.2}",
        format!(
            "{} x {:.1} KB, {} sessions",
            r.small,
            r.small_bytes as f64 / r.small as f64 / 1e3,
            r.sessions
        ),
        gs,
        ss,
        gs / ss
    );
    let mb = (r.large_size * r.large as u64) as f64 / 1e6;
    let (gl, sl) = (mb / med(2), mb / med(3));
    println!(
        "   {:<36} {:>9.1} MB/s {:>9.1} MB/s {:>11.2}",
        format!(
            "{} x {:.1} MB at once, {} sessions",
            r.large,
            r.large_size as f64 / 1e6,
            r.large
        ),
        gl,
        sl,
        gl / sl
    );
    let (pg, ps) = (median(&r.per_session_kib(0)), median(&r.per_session_kib(1)));
    let limit = r.large_size as f64 / 1024.0 / 2.0;
    let pass = pg < limit;
    println!(
        "   {:<36} {:>10.0} KiB {:>10.0} KiB {:>11}  {}",
        "RSS per session, large in flight",
        pg,
        ps,
        format!("< {:.1} MB", limit * 1024.0 / 1e6),
        verdict(pass)
    );
    let rss = |v: &[(u64, u64)]| {
        v.iter()
            .map(|(b, p)| format!("{:.1}+{:.1}", *b as f64 / 1024.0, (*p as f64 - *b as f64) / 1024.0))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "   (RSS: (peak while the {} messages are in flight - settled RSS before) / {}; fresh proxy warmed by one message; target: half a message.",
        r.large, r.large
    );
    println!(
        "    baseline+growth MiB per run: Graph [{}]  SMTP relay [{}])",
        rss(&r.rss[0]),
        rss(&r.rss[1])
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.0}", x * 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "   runs (ms): small Graph [{}] SMTP [{}]; large Graph [{}] SMTP [{}]",
        fmt(&r.secs[0]),
        fmt(&r.secs[1]),
        fmt(&r.secs[2]),
        fmt(&r.secs[3])
    );
    for (i, what) in ["small", "large"].iter().enumerate() {
        println!(
            "   cpu {what}: Graph: {}; SMTP relay: {} (of a core)",
            r.cpu[2 * i].line(Path::Graph),
            r.cpu[2 * i + 1].line(Path::Smtp)
        );
    }
    println!("   {}", r.note);
    usize::from(!pass)
}

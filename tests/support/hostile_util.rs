//! Helpers for `tests/hostile.rs`: a proxy with IMAP, SMTP and POP3 listeners
//! and chosen `[limits]`, raw sockets that push bytes without caring about the
//! protocol, fake upstream servers that misbehave, and the health checks every
//! hostile test ends with (process alive, another session still served, memory
//! bounded, vault untouched).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::mailproxy::{oauth_account, Proxy, ProxyDir};
use super::world::{ALICE, ALICE_PW, BOB, BOB_PW};
use super::{require_dovecot, Env, LineConn};

/// A proxy under attack: private Dovecot + fake provider + a config with
/// `[imap]`, `[smtp]` and `[pop3]` listeners (no fallbacks, so unknown logins
/// are refused locally), alice (OAuth over implicit TLS for all three
/// protocols) and bob (password passthrough, plaintext loopback).
pub struct Rig {
    pub env: Env,
    pub dir: ProxyDir,
    pub proxy: Option<Proxy>,
}

impl Rig {
    /// `limits`: the body of the `[limits]` table (`key = value` lines);
    /// `extra`: more TOML appended (accounts), seeing the environment.
    pub fn new(limits: &str, extra: impl FnOnce(&Env) -> String) -> Rig {
        require_dovecot();
        let env = Env::start(&[(BOB, BOB_PW)]);
        let dir = ProxyDir::new();
        let d = &env.dovecot;
        let mut cfg = format!(
            "[server]\nstate_dir = \"{}\"\nca_file = \"{}\"\n\n",
            dir.state_dir().display(),
            d.ca_pem_path().display()
        );
        for proto in ["imap", "smtp", "pop3"] {
            cfg += &format!("[{proto}]\nlisten = \"127.0.0.1:0\"\n\n");
        }
        cfg += &format!("[limits]\n{limits}\n\n");
        cfg += &oauth_account(ALICE, &env.provider, d, &format!("imaps://localhost:{}", d.imaps_port));
        // oauth_account ends the table with a blank line; keys after it still belong to it.
        cfg = cfg.trim_end().to_string();
        cfg += &format!(
            "\nsmtp = \"smtps://localhost:{}\"\npop3 = \"pop3s://localhost:{}\"\n\n",
            d.submissions_port, d.pop3s_port
        );
        cfg += &format!(
            "[accounts.\"{BOB}\"]\nprovider = \"password\"\nimap = \"imap://127.0.0.1:{}\"\nsmtp = \"smtp://127.0.0.1:{}\"\npop3 = \"pop3://127.0.0.1:{}\"\n\n",
            d.imap_port, d.submission_port, d.pop3_port
        );
        cfg += &extra(&env);
        dir.write_config(&cfg);
        Rig { env, dir, proxy: None }
    }

    pub fn authorise(&self, account: &str, pw: &str) {
        let (st, err) = self.dir.login(account, pw);
        assert!(st.success(), "mailproxy login {account} failed: {err}");
    }

    pub fn start(&mut self) -> &Proxy {
        self.proxy = Some(Proxy::start(&self.dir));
        self.proxy()
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy started")
    }

    pub fn imap_port(&self) -> u16 {
        self.proxy().imap_port()
    }

    pub fn smtp_port(&self) -> u16 {
        self.proxy().smtp.expect("smtp listener").port()
    }

    pub fn pop3_port(&self) -> u16 {
        self.proxy().pop3.expect("pop3 listener").port()
    }

    pub fn logs(&self) -> String {
        self.proxy
            .as_ref()
            .map(super::mailproxy::Proxy::logs)
            .unwrap_or_default()
    }

    pub fn rss_kib(&self) -> u64 {
        self.proxy().rss_kib()
    }

    /// The bytes of every `state_dir/accounts/*.json`, by file name.
    pub fn vault(&self) -> BTreeMap<String, Vec<u8>> {
        vault_files(&self.dir)
    }

    /// Alive, the baseline session still answers, memory grew by at most
    /// `max_growth_kib` since `rss_before` (when given), vault unchanged.
    pub async fn assert_healthy(
        &mut self,
        base: &mut Baseline,
        vault_before: &BTreeMap<String, Vec<u8>>,
        rss_before: Option<u64>,
        max_growth_kib: u64,
    ) {
        let alive = self.proxy.as_mut().expect("proxy started").is_running();
        assert!(alive, "the proxy died:\n{}", tail(&self.logs(), 60));
        base.check().await;
        assert_eq!(
            &self.vault(),
            vault_before,
            "vault files under state_dir/accounts changed"
        );
        if let Some(before) = rss_before {
            let now = self.rss_kib();
            assert!(
                now <= before + max_growth_kib,
                "proxy RSS grew from {before} KiB to {now} KiB (limit +{max_growth_kib} KiB)"
            );
        }
    }
}

/// `*.json` files under `state_dir/accounts` (not the `.NAME.tmpPID` temp files).
pub fn vault_files(dir: &ProxyDir) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir.state_dir().join("accounts")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") && !name.starts_with('.') {
                m.insert(name, std::fs::read(e.path()).unwrap_or_default());
            }
        }
    }
    m
}

/// The last `n` lines of a log, for assertion messages.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A logged-in IMAP session opened before the attack: it must keep working.
pub struct Baseline {
    pub conn: LineConn,
    n: u32,
}

impl Baseline {
    /// Logs `user` in through the proxy and selects INBOX.
    pub async fn open(port: u16, user: &str, pw: &str) -> Baseline {
        let mut conn = imap_connect(port).await;
        let r = conn.imap("b0", &format!("LOGIN \"{user}\" \"{pw}\"")).await.unwrap();
        assert!(r.is_ok(), "baseline LOGIN {user}: {r:?}");
        let r = conn.imap("b1", "SELECT INBOX").await.unwrap();
        assert!(r.is_ok(), "baseline SELECT: {r:?}");
        Baseline { conn, n: 1 }
    }

    /// Alice's baseline session.
    pub async fn alice(port: u16) -> Baseline {
        Self::open(port, ALICE, ALICE_PW).await
    }

    /// A NOOP answered OK, quickly.
    pub async fn check(&mut self) {
        self.n += 1;
        let tag = format!("b{}", self.n);
        let r = tokio::time::timeout(Duration::from_secs(10), self.conn.imap(&tag, "NOOP"))
            .await
            .expect("baseline session: NOOP not answered within 10 s")
            .expect("baseline session broken");
        assert!(r.is_ok(), "baseline NOOP: {r:?}");
    }
}

/// Plain connection to the IMAP listener, greeting checked.
pub async fn imap_connect(port: u16) -> LineConn {
    let mut c = LineConn::plain(port).await.unwrap();
    let g = c.read_line().await.unwrap();
    assert!(g.starts_with("* OK"), "IMAP greeting: {g}");
    c
}

/// Plain connection to the SMTP listener, greeting checked.
pub async fn smtp_connect(port: u16) -> LineConn {
    let mut c = LineConn::plain(port).await.unwrap();
    let g = c.read_smtp_reply().await.unwrap();
    assert!(g.last().is_some_and(|l| l.starts_with("220 ")), "SMTP greeting: {g:?}");
    c
}

/// Plain connection to the POP3 listener, greeting checked.
pub async fn pop3_connect(port: u16) -> LineConn {
    let mut c = LineConn::plain(port).await.unwrap();
    let g = c.read_line().await.unwrap();
    assert!(g.starts_with("+OK"), "POP3 greeting: {g}");
    c
}

/// What a raw connection saw.
#[derive(Debug)]
pub struct Seen {
    /// Everything the proxy sent (greeting included).
    pub bytes: Vec<u8>,
    /// The proxy closed (EOF or reset) before the time limit.
    pub closed: bool,
    /// From connect to close (or to the time limit).
    pub elapsed: Duration,
}

impl Seen {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Lines sent, without CRLF.
    pub fn lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }
}

/// Connects to `port`, writes `payload` in `chunk`-sized writes (stopping at
/// the first write error: the proxy may close while we write) while reading
/// everything the proxy sends, until it closes or `limit` passes. The write
/// side is never shut down: only the proxy may end the connection.
pub async fn blast(port: u16, payload: Vec<u8>, chunk: usize, limit: Duration) -> Seen {
    let t0 = Instant::now();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        for c in payload.chunks(chunk.max(1)) {
            if wr.write_all(c).await.is_err() {
                break;
            }
        }
        // Keep the write half (no FIN) until the reader is done.
        let _ = done_rx.await;
        drop(wr);
    });
    let (bytes, closed) = read_until_close(&mut rd, t0 + limit).await;
    let _ = done_tx.send(());
    writer.abort();
    Seen {
        bytes,
        closed,
        elapsed: t0.elapsed(),
    }
}

/// Reads until EOF/error (true) or the deadline (false).
pub async fn read_until_close<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, deadline: Instant) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0) | Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Connects to `port` from the loopback address `from` (e.g. 127.0.0.2).
pub async fn connect_from(from: [u8; 4], port: u16) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((from, 0)))?;
    sock.connect(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// Reads the first line a fresh connection gets (the greeting, or the refusal).
pub async fn first_line(tcp: &mut TcpStream, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut b)).await {
            Ok(Ok(1)) => out.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).trim_end().to_string()
}

/// A background task aborted on drop.
pub struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a fake upstream does with each connection.
#[derive(Clone)]
pub enum FakeUpstream {
    /// Accepts and never sends a byte.
    Silent,
    /// Sends these bytes, then stays silent.
    Says(Vec<u8>),
    /// A minimal IMAP server: greets, accepts any LOGIN/AUTHENTICATE, then
    /// resets the connection (RST) at the first command after it.
    ResetsAfterLogin,
}

/// Listens on a free loopback port, serving every connection as `kind`.
pub async fn fake_upstream(kind: FakeUpstream) -> (u16, Task) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((sock, _)) = l.accept().await else { continue };
            match kind.clone() {
                FakeUpstream::Silent => held.push(sock),
                FakeUpstream::Says(b) => {
                    let mut sock = sock;
                    let _ = sock.write_all(&b).await;
                    held.push(sock);
                }
                FakeUpstream::ResetsAfterLogin => {
                    tokio::spawn(reset_after_login(sock));
                }
            }
        }
    });
    (port, Task(task))
}

async fn reset_after_login(sock: TcpStream) {
    let mut c = tokio::io::BufReader::new(sock);
    let greet = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+] fake ready\r\n";
    if c.get_mut().write_all(greet).await.is_err() {
        return;
    }
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    if c.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let tag = line.split_whitespace().next().unwrap_or("*").to_string();
    let ok = format!("{tag} OK [CAPABILITY IMAP4rev1] fake: logged in\r\n");
    if c.get_mut().write_all(ok.as_bytes()).await.is_err() {
        return;
    }
    line.clear();
    let _ = c.read_line(&mut line).await;
    // SO_LINGER 0: close() sends RST instead of FIN.
    let sock = c.into_inner();
    let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
    drop(sock);
}

/// A port nobody listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

//! Helpers for `tests/it/hostile.rs`: a proxy with IMAP, SMTP and POP3 listeners
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
    /// A server that does not offer OAuth: IMAP greets without SASL-IR and
    /// answers `AUTHENTICATE` with a tagged `NO`; SMTP answers `AUTH` with
    /// `504 5.5.4`; POP3 answers `AUTH` with `-ERR`.
    WithoutOauth(Proto, Tally),
    /// Greets, then never stops talking before login: IMAP untagged
    /// `* OK flood …` lines from the greeting on; SMTP a `250-` reply to
    /// EHLO that never ends; POP3 a line after the first command that never
    /// ends.
    Flood(Proto, Tally),
    /// Sends its greeting one byte a second and never finishes it.
    Drip(Proto),
    /// Records every byte it receives; greets and refuses every login.
    Recording(Proto, Tally),
    /// Counts connections and relays each to `127.0.0.1:PORT` (a real server).
    Forward(u16, Tally),
    /// An IMAP server that reads commands of any length (literals, with or
    /// without LITERAL+) and refuses every login the way Dovecot refuses a
    /// wrong password, at once. (Dovecot's own login process drops a
    /// command of a few KB as "Input buffer full", before any verdict.)
    Refusing(Tally),
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
                FakeUpstream::WithoutOauth(p, t) => {
                    tokio::spawn(without_oauth(p, sock, t));
                }
                FakeUpstream::Flood(p, t) => {
                    tokio::spawn(flood(p, sock, t));
                }
                FakeUpstream::Drip(p) => {
                    tokio::spawn(drip(p, sock));
                }
                FakeUpstream::Recording(p, t) => {
                    tokio::spawn(recording(p, sock, t));
                }
                FakeUpstream::Forward(to, t) => {
                    tokio::spawn(forward(to, sock, t));
                }
                FakeUpstream::Refusing(t) => {
                    tokio::spawn(refusing(sock, t));
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

/// A port nobody listens on while the returned socket lives: it is bound
/// without `SO_REUSEADDR` and never listens, so connections to it are
/// refused and no other test (or its Dovecot) can take the port meanwhile.
pub fn closed_port() -> (u16, socket2::Socket) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    (port, s)
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

// ---- more rigs and fake upstreams (retry policy and hostile peers) ----

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

impl Rig {
    /// Like [`Rig::new`], with more keys in each listener's table:
    /// `listener(env, "imap")` is appended to `[imap]` (e.g. a `fallback`).
    pub fn with_listeners(
        limits: &str,
        listener: impl Fn(&Env, &str) -> String,
        extra: impl FnOnce(&Env) -> String,
    ) -> Rig {
        let rig = Rig::new(limits, extra);
        let mut cfg = rig.config();
        for proto in ["imap", "smtp", "pop3"] {
            let head = format!("[{proto}]\nlisten = \"127.0.0.1:0\"\n");
            let more = listener(&rig.env, proto);
            assert!(cfg.contains(&head), "no [{proto}] table in the rig config");
            cfg = cfg.replacen(&head, &format!("{head}{more}"), 1);
        }
        rig.dir.write_config(&cfg);
        rig
    }

    /// The config file as it is now.
    pub fn config(&self) -> String {
        std::fs::read_to_string(self.dir.config_path()).expect("rig config")
    }

    /// Rewrites the config file (the running proxy sees it at SIGHUP or restart).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let cfg = edit(self.config());
        self.dir.write_config(&cfg);
    }

    /// This rig, with its proxy log checked for secrets when it drops.
    pub fn checked(self, passwords: &[&str]) -> CheckedRig {
        CheckedRig {
            rig: self,
            passwords: passwords.iter().map(std::string::ToString::to_string).collect(),
        }
    }
}

/// A [`Rig`] whose proxy log must hold no secret when it drops (every token,
/// code and verifier the provider issued, the client secret, alice's and
/// bob's passwords and the given ones), as `World` and `MailWorld` check.
pub struct CheckedRig {
    rig: Rig,
    passwords: Vec<String>,
}

impl std::ops::Deref for CheckedRig {
    type Target = Rig;
    fn deref(&self) -> &Rig {
        &self.rig
    }
}

impl std::ops::DerefMut for CheckedRig {
    fn deref_mut(&mut self) -> &mut Rig {
        &mut self.rig
    }
}

impl Drop for CheckedRig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Some(p) = &self.rig.proxy {
            let mut pws: Vec<&str> = vec![ALICE_PW, BOB_PW];
            pws.extend(self.passwords.iter().map(String::as_str));
            super::world::assert_no_secrets(&p.logs(), &self.rig.env, &pws);
        }
    }
}

/// The three protocols, for fakes and tests that run once per protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Imap,
    Smtp,
    Pop3,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::Imap, Proto::Smtp, Proto::Pop3];

    /// The config and URL scheme name: `imap`, `smtp`, `pop3`.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Imap => "imap",
            Proto::Smtp => "smtp",
            Proto::Pop3 => "pop3",
        }
    }

    /// A plaintext loopback URL for a fake server on `port`.
    pub fn url(self, port: u16) -> String {
        format!("{}://127.0.0.1:{port}", self.name())
    }

    /// This protocol's listener port on `rig`'s proxy.
    pub fn port(self, rig: &Rig) -> u16 {
        match self {
            Proto::Imap => rig.imap_port(),
            Proto::Smtp => rig.smtp_port(),
            Proto::Pop3 => rig.pop3_port(),
        }
    }
}

/// What a fake upstream saw and did, shared with the test.
#[derive(Clone, Default)]
pub struct Tally {
    connections: Arc<AtomicUsize>,
    logins: Arc<AtomicUsize>,
    sent: Arc<AtomicU64>,
    received: Arc<Mutex<Vec<u8>>>,
}

impl Tally {
    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Login attempts (AUTHENTICATE / AUTH / LOGIN / USER) received.
    pub fn logins(&self) -> usize {
        self.logins.load(Ordering::SeqCst)
    }

    /// Bytes written to the proxy (and accepted by the socket).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Every byte received, in arrival order (all connections).
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }

    fn connected(&self) {
        self.connections.fetch_add(1, Ordering::SeqCst);
    }

    fn record(&self, bytes: &[u8]) {
        self.received.lock().unwrap().extend_from_slice(bytes);
    }
}

/// The first word of a command line, and the rest upper-cased.
fn split_command(line: &[u8]) -> (String, String) {
    let s = String::from_utf8_lossy(line);
    let s = s.trim_end_matches(['\r', '\n']);
    let (first, rest) = s.split_once(' ').unwrap_or((s, ""));
    (first.to_string(), rest.to_ascii_uppercase())
}

async fn without_oauth(proto: Proto, sock: TcpStream, tally: Tally) {
    use tokio::io::AsyncBufReadExt;
    tally.connected();
    let (rd, mut wr) = sock.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let greeting: &[u8] = match proto {
        Proto::Imap => b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN LITERAL+] fake server without OAuth\r\n",
        Proto::Smtp => b"220 fake.example.org ESMTP fake server without OAuth\r\n",
        Proto::Pop3 => b"+OK fake server without OAuth\r\n",
    };
    if wr.write_all(greeting).await.is_err() {
        return;
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        if rd.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return;
        }
        tally.record(&line);
        let (first, rest) = split_command(&line);
        let first_up = first.to_ascii_uppercase();
        let (answer, done) = match proto {
            Proto::Imap if rest.starts_with("AUTHENTICATE") || rest.starts_with("LOGIN") => {
                tally.logins.fetch_add(1, Ordering::SeqCst);
                (
                    format!("{first} NO [CANNOT] Unsupported authentication mechanism\r\n"),
                    false,
                )
            }
            Proto::Imap if rest.starts_with("CAPABILITY") => (
                format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{first} OK done\r\n"),
                false,
            ),
            Proto::Imap if rest.starts_with("LOGOUT") => (format!("* BYE bye\r\n{first} OK done\r\n"), true),
            Proto::Imap => (format!("{first} BAD unknown command\r\n"), false),
            Proto::Smtp if first_up == "EHLO" || first_up == "HELO" => (
                "250-fake.example.org\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n".to_string(),
                false,
            ),
            Proto::Smtp if first_up == "AUTH" => {
                tally.logins.fetch_add(1, Ordering::SeqCst);
                ("504 5.5.4 Unrecognized authentication type\r\n".to_string(), false)
            }
            Proto::Smtp if first_up == "QUIT" => ("221 2.0.0 Bye\r\n".to_string(), true),
            Proto::Smtp => ("502 5.5.2 unknown command\r\n".to_string(), false),
            Proto::Pop3 if first_up == "AUTH" => {
                tally.logins.fetch_add(1, Ordering::SeqCst);
                ("-ERR Unsupported authentication mechanism\r\n".to_string(), false)
            }
            Proto::Pop3 if first_up == "CAPA" => ("+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n".to_string(), false),
            Proto::Pop3 if first_up == "QUIT" => ("+OK bye\r\n".to_string(), true),
            Proto::Pop3 => ("-ERR unknown command\r\n".to_string(), false),
        };
        if wr.write_all(answer.as_bytes()).await.is_err() || done {
            return;
        }
    }
}

/// Writes `block` again and again until the peer stops taking it.
async fn stream_forever(wr: &mut tokio::net::tcp::OwnedWriteHalf, block: &[u8], tally: &Tally) {
    while wr.write_all(block).await.is_ok() {
        tally.sent.fetch_add(block.len() as u64, Ordering::SeqCst);
    }
}

async fn flood(proto: Proto, sock: TcpStream, tally: Tally) {
    use tokio::io::AsyncBufReadExt;
    tally.connected();
    let (rd, mut wr) = sock.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let line = format!("* OK flood {}\r\n", "x".repeat(180));
    let (greeting, wait_for_command, block): (&[u8], bool, Vec<u8>) = match proto {
        Proto::Imap => (
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN LITERAL+] flood ready\r\n",
            false,
            line.repeat(64 * 1024 / line.len()).into_bytes(),
        ),
        Proto::Smtp => (
            b"220 flood.example.org ESMTP flood ready\r\n",
            true,
            format!("250-flood {}\r\n", "x".repeat(180)).repeat(300).into_bytes(),
        ),
        Proto::Pop3 => (b"+OK flood ready\r\n", true, vec![b'x'; 64 * 1024]),
    };
    if wr.write_all(greeting).await.is_err() {
        return;
    }
    tally.sent.fetch_add(greeting.len() as u64, Ordering::SeqCst);
    if wait_for_command {
        let mut l = Vec::new();
        if rd.read_until(b'\n', &mut l).await.unwrap_or(0) == 0 {
            return;
        }
        tally.record(&l);
        tally.logins.fetch_add(1, Ordering::SeqCst);
        if proto == Proto::Pop3 {
            // The answer's line starts and never ends.
            if wr.write_all(b"+OK ").await.is_err() {
                return;
            }
        }
    }
    // Drain whatever the proxy sends meanwhile, so it never blocks on us.
    let drain = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    stream_forever(&mut wr, &block, &tally).await;
    drain.abort();
}

async fn drip(proto: Proto, mut sock: TcpStream) {
    let start: &[u8] = match proto {
        Proto::Imap => b"* OK ",
        Proto::Smtp => b"220 ",
        Proto::Pop3 => b"+OK ",
    };
    for b in start.iter().chain(b"slowly, ".iter()).chain(std::iter::repeat(&b'.')) {
        if sock.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn recording(proto: Proto, sock: TcpStream, tally: Tally) {
    use tokio::io::AsyncBufReadExt;
    tally.connected();
    let (rd, mut wr) = sock.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let greeting: &[u8] = match proto {
        Proto::Imap => b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN LITERAL+] recorder ready\r\n",
        Proto::Smtp => b"220 recorder.example.org ESMTP recorder ready\r\n",
        Proto::Pop3 => b"+OK recorder ready\r\n",
    };
    if wr.write_all(greeting).await.is_err() {
        return;
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        // Everything is recorded, a last line without its end too.
        let n = rd.read_until(b'\n', &mut line).await.unwrap_or(0);
        tally.record(&line);
        if n == 0 || !line.ends_with(b"\n") {
            return;
        }
        let (first, _) = split_command(&line);
        let first_up = first.to_ascii_uppercase();
        let answer = match proto {
            Proto::Imap if line.ends_with(b"}\r\n") && !line.ends_with(b"+}\r\n") => "+ go ahead\r\n".to_string(),
            Proto::Imap => {
                tally.logins.fetch_add(1, Ordering::SeqCst);
                format!("{first} NO [AUTHENTICATIONFAILED] the recorder refuses everything\r\n")
            }
            Proto::Smtp if first_up == "EHLO" || first_up == "HELO" => {
                "250-recorder.example.org\r\n250 AUTH PLAIN LOGIN\r\n".to_string()
            }
            Proto::Smtp => {
                tally.logins.fetch_add(1, Ordering::SeqCst);
                "535 5.7.8 the recorder refuses everything\r\n".to_string()
            }
            Proto::Pop3 if first_up == "USER" => "+OK\r\n".to_string(),
            Proto::Pop3 => {
                tally.logins.fetch_add(1, Ordering::SeqCst);
                "-ERR [AUTH] the recorder refuses everything\r\n".to_string()
            }
        };
        if wr.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn refusing(sock: TcpStream, tally: Tally) {
    use tokio::io::AsyncBufReadExt;
    tally.connected();
    let (rd, mut wr) = sock.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN LITERAL+] refuses every login\r\n";
    if wr.write_all(greeting).await.is_err() {
        return;
    }
    let mut line = Vec::new();
    loop {
        // One command: its first line names it; literals are read past.
        let mut first = None;
        loop {
            line.clear();
            if rd.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 || !line.ends_with(b"\n") {
                return;
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            let literal = super::client::literal_len(&text);
            first.get_or_insert(text.clone());
            let Some(n) = literal else { break };
            if !text.ends_with("+}") && wr.write_all(b"+ go ahead\r\n").await.is_err() {
                return;
            }
            let mut skip = (&mut rd).take(n as u64);
            if tokio::io::copy(&mut skip, &mut tokio::io::sink()).await.ok() != Some(n as u64) {
                return;
            }
        }
        let (tag, rest) = split_command(first.unwrap_or_default().as_bytes());
        let (answer, done) = if rest.starts_with("LOGIN") || rest.starts_with("AUTHENTICATE") {
            tally.logins.fetch_add(1, Ordering::SeqCst);
            (
                format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
                false,
            )
        } else if rest.starts_with("CAPABILITY") {
            (
                format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN LITERAL+\r\n{tag} OK done\r\n"),
                false,
            )
        } else if rest.starts_with("LOGOUT") {
            (format!("* BYE bye\r\n{tag} OK done\r\n"), true)
        } else {
            (format!("{tag} BAD unknown command\r\n"), false)
        };
        if wr.write_all(answer.as_bytes()).await.is_err() || done {
            return;
        }
    }
}

async fn forward(to: u16, mut sock: TcpStream, tally: Tally) {
    tally.connected();
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", to)).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut sock, &mut up).await;
}

/// Samples `pid`'s resident memory every 50 ms until dropped; `peak()` is
/// the largest value seen (KiB).
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    _task: Task,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(0));
        let p2 = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                p2.fetch_max(rss_kib_of(pid), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssSampler {
            peak,
            _task: Task(task),
        }
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Resident memory of process `pid` in KiB (0 when it is gone).
pub fn rss_kib_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `count` failed IMAP `LOGIN`s, `at_once` at a time, each with its own
/// login name of `name_len` bytes (numbered from `first`), three on each
/// connection, every connection from its own loopback /24 (127.x.y.1), so
/// the per-network delay never starts. Returns the tagged answers seen, by
/// their first two words after the tag (e.g. `NO [AUTHENTICATIONFAILED]`).
pub async fn failed_long_logins(
    port: u16,
    first: usize,
    count: usize,
    at_once: usize,
    name_len: usize,
) -> BTreeMap<String, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..at_once)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut seen = BTreeMap::<String, usize>::new();
                loop {
                    let start = next.fetch_add(3, Ordering::SeqCst);
                    if start >= count {
                        return seen;
                    }
                    let n = first + start;
                    let net = n / 3;
                    let from = [127, 1 + (net >> 8) as u8 % 250, net as u8, 1];
                    let tcp = connect_from(from, port).await.expect("connect from a loopback source");
                    let mut c = LineConn::from_tcp(tcp);
                    let g = c.read_line().await.expect("greeting");
                    assert!(g.starts_with("* OK"), "{g}");
                    for i in n..(n + 3).min(first + count) {
                        let mut name = format!("flood{i}-");
                        while name.len() < name_len - "@example.org".len() {
                            name.push_str("abcdefghij");
                        }
                        name.truncate(name_len - "@example.org".len());
                        name.push_str("@example.org");
                        let r = c
                            .imap("f", &format!("LOGIN \"{name}\" \"wrong\""))
                            .await
                            .expect("answer");
                        let kind: Vec<&str> = r.tagged.split_whitespace().skip(1).take(2).collect();
                        *seen.entry(kind.join(" ")).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for h in hs {
        for (k, v) in h.await.unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    all
}

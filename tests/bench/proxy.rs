//! `scripts/bench`: mailproxy against direct sessions, in one run against the
//! same private Dovecot, with medians and ratios.
//!
//! Sections (all by default; `--sections fetch,login,concurrent,memory`):
//! 1. FETCH throughput: `FETCH 1:* BODY.PEEK[]` of a >= 40 MiB INBOX, direct
//!    imaps vs proxy with imaps upstream, direct plain vs proxy with plain
//!    upstream. Interleaved runs after a warm-up, medians, proxy/direct ratio.
//! 2. Login latency: TCP connect to tagged OK, direct XOAUTH2 (cached token)
//!    vs proxy LOGIN with the local password (warm: token cached, password
//!    verified once). Sequential, interleaved samples.
//! 3. Concurrent logins: K clients at the same moment through the proxy (warm
//!    and cold) and directly, median/p95 against the single-login median.
//! 4. Memory per session: N logged-in sessions (SELECT INBOX, then idle)
//!    through a freshly started proxy; (RSS after - RSS before) / N.
//! 5. SMTP send (`mail.rs`): M messages of K KiB in one session, MAIL/RCPT/DATA
//!    pipelined per message, proxy (smtps upstream) vs direct submissions.
//! 6. POP3 RETR 1..n of the >= 40 MiB INBOX (`mail.rs`), pipelined and
//!    sequential, proxy (pop3s upstream) vs direct pop3s.
//! 7. The plain path against the peers (`peers.rs`): FETCH and logins
//!    direct, through HAProxy, nginx's mail proxy and mailproxy.
//! 8. A fleet (`fleet.rs`): logins per second and FETCH throughput through
//!    two instances on PostgreSQL behind HAProxy vs one instance.
//! 9. Idle sessions at scale (`idle.rs`): RSS per idle session at 9,500
//!    sessions, plaintext and imaps, HAProxy's beside it.
//! 10. A long soak (`idle.rs`): 100,000 churned sessions; RSS, open files
//!     and tasks after the warm-up and at the end.
//!
//! Graph (`graph.rs`): submission through Microsoft Graph vs the SMTP relay,
//! small messages per second, large ones in MB/s, memory per session.
//!
//! The client is raw bytes over tokio with large buffers: literals are
//! counted, not copied, so the client is not what limits throughput.

// The benchmark reads clock ticks and thread ids through libc.
#![allow(unsafe_code)]

// The integration tests' harness, of which the benchmark uses a part: the
// rest is unused here (the tests' own build checks it for dead code).
#[path = "../it/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::client::{self as sc, Stream};
use support::mailproxy::{oauth_account, Proxy, ProxyDir};
use support::{DovecotOptions, Env};
use words::{word, xorshift};

const ALICE: &str = "alice@example.org";
/// Second proxy account for the same mailbox, with a plaintext loopback upstream.
const ALICE_PLAIN: &str = "alice-plain@example.org";
const LOCAL_PW: &str = "bench local pw";
/// A password user of Dovecot with the same INBOX, for the peers (which
/// pass passwords through) and mailproxy's passthrough.
const PEER: &str = "peer@example.org";
const PEER_PW: &str = "peer pw";
const SCOPE: &str = "https://mail.example.org/";

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Debug)]
struct Opts {
    fetch: bool,
    login: bool,
    concurrent: bool,
    memory: bool,
    smtp: bool,
    pop3: bool,
    peers: bool,
    fleet: bool,
    idle: bool,
    soak: bool,
    idle_sessions: usize,
    soak_sessions: usize,
    graph: bool,
    graph_opts: graph::GraphOpts,
    fleet_clients: usize,
    fleet_logins: usize,
    fleet_sessions: usize,
    smtp_messages: usize,
    smtp_kb: usize,
    mail_runs: usize,
    smtp_modes: Vec<mail::Mode>,
    pop3_modes: Vec<mail::Mode>,
    mailbox_mb: f64,
    msg_kb: usize,
    runs: usize,
    login_samples: usize,
    clients: usize,
    rounds: usize,
    sessions: usize,
    memory_plain: bool,
    proxy_log: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            fetch: true,
            login: true,
            concurrent: true,
            memory: true,
            smtp: true,
            pop3: true,
            peers: true,
            fleet: true,
            idle: true,
            soak: true,
            idle_sessions: 9500,
            soak_sessions: 100_000,
            graph: true,
            graph_opts: graph::GraphOpts::default(),
            fleet_clients: 32,
            fleet_logins: 2000,
            fleet_sessions: 4,
            smtp_messages: 100,
            smtp_kb: 100,
            mail_runs: 15,
            smtp_modes: vec![mail::Mode::Pipelined],
            pop3_modes: vec![mail::Mode::Pipelined, mail::Mode::Sequential],
            mailbox_mb: 40.0,
            msg_kb: 100,
            runs: 9,
            login_samples: 200,
            clients: 100,
            rounds: 5,
            sessions: 2000,
            memory_plain: true,
            proxy_log: "info".into(),
        }
    }
}

const USAGE: &str = "\
usage: scripts/bench [options]

  --sections LIST     comma-separated: fetch,login,concurrent,memory,smtp,pop3,peers,fleet,idle,soak,graph (default: all)
  --mailbox-mb N      INBOX size for the FETCH and POP3 tests in MiB (default 40)
  --msg-kb N          size of each message in KiB (default 100)
  --runs N            timed FETCH runs per variant, after one warm-up (default 9)
  --mail-runs N       timed SMTP and POP3 runs per mode, after one warm-up (default 15; short runs, noisier)
  --login-samples N   sequential logins per variant (default 200)
  --clients N         clients logging in at the same moment (default 100)
  --rounds N          rounds of concurrent logins, warm (default 5)
  --sessions N        concurrent idle sessions for the memory test (default 2000)
  --no-memory-plain   memory test with the imaps upstream only
  --idle-sessions N   idle sessions at once in the idle section (default 9500; 2 open files each in the proxy)
  --soak-sessions N   churned sessions in the soak section (default 100000)
  --proxy-log FILTER  RUST_LOG for mailproxy serve (default info, its default)
  --smtp-messages N   messages per SMTP session (default 100)
  --smtp-kb N         size of each SMTP message in KiB (default 100)
  --smtp-mode M       pipelined (MAIL+RCPT+DATA in one write), sequential or both (default pipelined)
  --pop3-mode M       pipelined (all RETRs in one write), sequential or both (default both)
  --fleet-clients N   clients logging in at once in the fleet section (default 32)
  --fleet-logins N    logins per round and variant in the fleet section (default 2000)
  --fleet-sessions N  FETCH sessions at once in the fleet section (default 4)
";

fn parse_args() -> Opts {
    let mut o = Opts::default();
    let mut args = std::env::args().skip(1);
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
        let v = v.unwrap_or_else(|| die(&format!("{flag} needs a value")));
        v.parse()
            .unwrap_or_else(|_| die(&format!("{flag}: `{v}` is not a number")))
    }
    while let Some(a) = args.next() {
        // `--flag=value` as well as `--flag value`.
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut val = || inline.clone().or_else(|| args.next());
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "-h" | "--help" => {
                print!("{USAGE}{}", graph::USAGE);
                std::process::exit(0);
            }
            "--sections" => {
                let list = val().unwrap_or_else(|| die("--sections needs a value"));
                o.set_sections(false);
                for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match s {
                        "fetch" => o.fetch = true,
                        "login" => o.login = true,
                        "concurrent" => o.concurrent = true,
                        "memory" => o.memory = true,
                        "smtp" => o.smtp = true,
                        "pop3" => o.pop3 = true,
                        "peers" => o.peers = true,
                        "fleet" => o.fleet = true,
                        "idle" => o.idle = true,
                        "soak" => o.soak = true,
                        "graph" => o.graph = true,
                        "all" => o.set_sections(true),
                        _ => die(&format!(
                            "unknown section `{s}` (fetch, login, concurrent, memory, smtp, pop3, peers, fleet, idle, soak, graph)"
                        )),
                    }
                }
            }
            "--mailbox-mb" => o.mailbox_mb = num(&flag, val()),
            "--msg-kb" => o.msg_kb = num(&flag, val()),
            "--runs" => o.runs = num(&flag, val()),
            "--login-samples" => o.login_samples = num(&flag, val()),
            "--clients" | "--concurrent" => o.clients = num(&flag, val()),
            "--rounds" => o.rounds = num(&flag, val()),
            "--sessions" => o.sessions = num(&flag, val()),
            "--no-memory-plain" => o.memory_plain = false,
            "--idle-sessions" => o.idle_sessions = num(&flag, val()),
            "--soak-sessions" => o.soak_sessions = num(&flag, val()),
            "--smtp-messages" => o.smtp_messages = num(&flag, val()),
            "--mail-runs" => o.mail_runs = num(&flag, val()),
            "--smtp-kb" => o.smtp_kb = num(&flag, val()),
            "--fleet-clients" => o.fleet_clients = num(&flag, val()),
            "--fleet-logins" => o.fleet_logins = num(&flag, val()),
            "--fleet-sessions" => o.fleet_sessions = num(&flag, val()),
            "--smtp-mode" | "--pop3-mode" => {
                let v = val().unwrap_or_else(|| die(&format!("{flag} needs a value")));
                let m = mail::Mode::parse_list(&v)
                    .unwrap_or_else(|| die(&format!("{flag}: `{v}` (pipelined, sequential, both)")));
                if flag == "--smtp-mode" {
                    o.smtp_modes = m;
                } else {
                    o.pop3_modes = m;
                }
            }
            f if f.starts_with("--graph-") => o.graph_opts.set(f, val()),
            "--proxy-log" => o.proxy_log = val().unwrap_or_else(|| die("--proxy-log needs a value")),
            _ => die(&format!("unknown option `{a}`\n\n{USAGE}")),
        }
    }
    o.runs = o.runs.max(1);
    o.login_samples = o.login_samples.max(1);
    o.clients = o.clients.max(1);
    o.rounds = o.rounds.max(1);
    o.sessions = o.sessions.max(1);
    o.idle_sessions = o.idle_sessions.max(1);
    o.soak_sessions = o.soak_sessions.max(10);
    o.msg_kb = o.msg_kb.max(1);
    o.smtp_messages = o.smtp_messages.max(1);
    o.mail_runs = o.mail_runs.max(1);
    o.smtp_kb = o.smtp_kb.max(1);
    o.fleet_clients = o.fleet_clients.max(1);
    o.fleet_logins = o.fleet_logins.max(1);
    o.fleet_sessions = o.fleet_sessions.max(1);
    o
}

impl Opts {
    fn set_sections(&mut self, on: bool) {
        for s in [
            &mut self.fetch,
            &mut self.login,
            &mut self.concurrent,
            &mut self.memory,
            &mut self.smtp,
            &mut self.pop3,
            &mut self.peers,
            &mut self.fleet,
            &mut self.idle,
            &mut self.soak,
            &mut self.graph,
        ] {
            *s = on;
        }
    }
}

fn die(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(2);
}

macro_rules! progress {
    ($($t:tt)*) => {{
        eprintln!("[{:>6.1}s] {}", START.get().map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0), format!($($t)*));
    }};
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
static START_LOAD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

// Sections 5 to 8 and Graph; they use `progress!`, so are declared after it.
mod fleet;
mod graph;
mod idle;
mod mail;
mod peers;
mod words;

// ---------------------------------------------------------------------------
// A fast raw IMAP client

#[derive(Clone)]
enum Auth {
    /// Direct to Dovecot: AUTHENTICATE XOAUTH2 with SASL-IR.
    Xoauth2 { user: String, token: String },
    /// To the proxy: LOGIN with the local password.
    Login { user: String, password: String },
}

#[derive(Clone)]
struct Target {
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    auth: Auth,
}

struct Imap {
    s: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Free space below which the buffer is compacted before a read.
const MIN_READ: usize = 16 * 1024;

impl Imap {
    /// Connects (TLS when the target says so) and reads the greeting.
    async fn connect(t: &Target, bufsize: usize) -> io::Result<Imap> {
        let tcp = TcpStream::connect(("127.0.0.1", t.port)).await?;
        tcp.set_nodelay(true)?;
        let s = match &t.tls {
            Some(cfg) => Stream::Tls(Box::new(sc::tls_handshake(tcp, cfg.clone(), "localhost").await?)),
            None => Stream::Plain(tcp),
        };
        let mut c = Imap {
            s,
            buf: vec![0u8; bufsize.max(2 * MIN_READ)],
            start: 0,
            end: 0,
        };
        let g = c.line().await?;
        if !g.starts_with(b"* OK") {
            return Err(io::Error::other(format!("greeting: {}", String::from_utf8_lossy(&g))));
        }
        Ok(c)
    }

    /// Connect + authenticate; returns the session and the time from TCP
    /// connect to the tagged OK of the login.
    async fn login(t: &Target, bufsize: usize) -> io::Result<(Imap, Duration)> {
        let t0 = Instant::now();
        let mut c = Imap::connect(t, bufsize).await?;
        let cmd = match &t.auth {
            Auth::Xoauth2 { user, token } => format!("AUTHENTICATE XOAUTH2 {}", sc::xoauth2_b64(user, token)),
            Auth::Login { user, password } => format!("LOGIN \"{user}\" \"{password}\""),
        };
        c.command("a", &cmd).await?;
        Ok((c, t0.elapsed()))
    }

    async fn send(&mut self, line: &str) -> io::Result<()> {
        let mut b = Vec::with_capacity(line.len() + 2);
        b.extend_from_slice(line.as_bytes());
        b.extend_from_slice(b"\r\n");
        self.s.write_all(&b).await?;
        self.s.flush().await
    }

    /// Reads more bytes into the buffer (compacting it first when short of room).
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
                self.buf.resize(n, 0); // a line longer than the buffer: grow
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(60), self.s.read(&mut self.buf[self.end..]))
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
            if let Some(i) = self.buf[self.start..self.end].iter().position(|&b| b == b'\n') {
                let l = trim_crlf(&self.buf[self.start..self.start + i + 1]).to_vec();
                self.start += i + 1;
                return Ok(l);
            }
            self.fill().await?;
        }
    }

    /// Reads up to the line tagged `tag`, skipping untagged lines and
    /// literals without copying them. Returns (tagged line, literal bytes, literals).
    async fn read_tagged(&mut self, tag: &str) -> io::Result<(String, u64, u64)> {
        let tag = tag.as_bytes();
        let (mut lit_bytes, mut lits, mut in_lit) = (0u64, 0u64, 0u64);
        loop {
            if in_lit > 0 {
                let take = ((self.end - self.start) as u64).min(in_lit);
                self.start += take as usize;
                in_lit -= take;
                lit_bytes += take;
                if in_lit > 0 {
                    self.fill().await?;
                }
                continue;
            }
            let Some(i) = self.buf[self.start..self.end].iter().position(|&b| b == b'\n') else {
                self.fill().await?;
                continue;
            };
            let (ls, le) = (self.start, self.start + i + 1);
            self.start = le;
            let l = trim_crlf(&self.buf[ls..le]);
            if let Some(n) = literal_len(l) {
                in_lit = n;
                lits += 1;
                continue;
            }
            if l.len() > tag.len() && l.starts_with(tag) && l[tag.len()] == b' ' {
                return Ok((String::from_utf8_lossy(l).into_owned(), lit_bytes, lits));
            }
        }
    }

    /// Sends `tag command`, reads to the tagged reply, fails unless OK.
    async fn command(&mut self, tag: &str, command: &str) -> io::Result<(u64, u64)> {
        self.send(&format!("{tag} {command}")).await?;
        let (tagged, bytes, lits) = self.read_tagged(tag).await?;
        if tagged.split_whitespace().nth(1) != Some("OK") {
            let shown = command.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            return Err(io::Error::other(format!("{shown}: {tagged}")));
        }
        Ok((bytes, lits))
    }

    /// LOGOUT, best effort, then close.
    async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.command("z", "LOGOUT")).await;
    }
}

fn trim_crlf(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// `N` if the line ends with a literal announcement `{N}` / `{N+}`.
fn literal_len(l: &[u8]) -> Option<u64> {
    let l = l.strip_suffix(b"}")?;
    let open = l.iter().rposition(|&b| b == b'{')?;
    let d = &l[open + 1..];
    let d = d.strip_suffix(b"+").unwrap_or(d);
    if d.is_empty() || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(d).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------
// Statistics

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

// ---------------------------------------------------------------------------
// The world: provider + Dovecot + one proxy with two accounts on one mailbox

struct World {
    env: Env,
    dir: ProxyDir,
    proxy: Option<Proxy>,
    proxy_log: String,
    /// Direct-session access tokens for ALICE and ALICE_PLAIN.
    tokens: [String; 2],
    /// Where Dovecot's submission relays (SMTP section only).
    sink: Option<mail::CountSink>,
    /// Dovecot's master process, for its CPU time.
    dovecot_pid: Option<u32>,
}

/// Dovecot settings on top of the test harness's: enough processes and
/// clients for thousands of sessions from one address.
const DOVECOT_EXTRA: &str = "\
# --- scripts/bench ---
default_client_limit = 10000
default_process_limit = 1000
default_vsz_limit = 1G
mail_max_userip_connections = 100000
# High-performance login mode: long-lived imap-login processes (each also
# proxies TLS for its post-login sessions) instead of one per connection.
service imap-login {
  service_count = 0
  process_min_avail = 2
  process_limit = 16
  client_limit = 5000
}
# One imap process serves many sessions (all mail is stored as one uid).
service imap {
  service_count = 0
  client_limit = 50
  process_limit = 500
}
service auth {
  client_limit = 10000
}
service anvil {
  client_limit = 10000
}
";

impl World {
    fn new(o: &Opts) -> World {
        support::require_dovecot();
        // Dovecot relays submissions to a counting sink (the harness's own
        // sink, started by Env too, then gets nothing).
        let sink = (o.smtp || o.graph).then(mail::CountSink::start);
        let relay = sink.as_ref().map(mail::CountSink::port);
        let env = Env::start_with(&[(PEER, PEER_PW)], |opts: &mut DovecotOptions| {
            opts.extra_config = DOVECOT_EXTRA.to_string();
            if relay.is_some() {
                opts.smtp_relay_port = relay;
            }
        });
        let dir = ProxyDir::new();
        let d = &env.dovecot;
        let mut cfg = dir
            .header()
            .replace(
                "[server]\n",
                &format!("[server]\nca_file = \"{}\"\n", d.ca_pem_path().display()),
            )
            // Logins that match no account (PEER) are passed through.
            .replace(
                "listen = \"127.0.0.1:0\"\n",
                &format!(
                    "listen = \"127.0.0.1:0\"\nfallback = \"imap://127.0.0.1:{}\"\n",
                    d.imap_port
                ),
            );
        cfg += "[limits]\nmax_connections = 20000\nmax_connections_per_ip = 20000\n\n";
        if o.smtp {
            cfg += "[smtp]\nlisten = \"127.0.0.1:0\"\ntls = \"none\"\n\n";
        }
        if o.pop3 {
            cfg += "[pop3]\nlisten = \"127.0.0.1:0\"\ntls = \"none\"\n\n";
        }
        cfg += &oauth_account(ALICE, &env.provider, d, &format!("imaps://localhost:{}", d.imaps_port));
        // Same table (no header in between): SMTP and POP3 over implicit TLS.
        cfg += &format!(
            "smtp = \"smtps://localhost:{}\"\npop3 = \"pop3s://localhost:{}\"\n\n",
            d.submissions_port, d.pop3s_port
        );
        // Plaintext loopback upstream. Its own user (the provider's token
        // names the account it was authorised as); the same messages are
        // delivered to both mailboxes.
        cfg += &oauth_account(
            ALICE_PLAIN,
            &env.provider,
            d,
            &format!("imap://127.0.0.1:{}", d.imap_port),
        );
        dir.write_config(&cfg);
        for a in [ALICE, ALICE_PLAIN] {
            let (st, err) = dir.login(a, LOCAL_PW);
            assert!(st.success(), "mailproxy login {a} failed: {err}");
        }
        let tokens = [
            env.provider.issue_access_token(ALICE, SCOPE),
            env.provider.issue_access_token(ALICE_PLAIN, SCOPE),
        ];
        let mut w = World {
            env,
            dir,
            proxy: None,
            proxy_log: o.proxy_log.clone(),
            tokens,
            sink,
            dovecot_pid: None,
        };
        w.dovecot_pid = mail::dovecot_master_pid(&w);
        w
    }

    fn start_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            p.stop();
        }
        self.proxy = Some(Proxy::start_env(&self.dir, &[("RUST_LOG", self.proxy_log.as_str())]));
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy running")
    }

    fn direct(&self, tls: bool) -> Target {
        let d = &self.env.dovecot;
        Target {
            port: if tls { d.imaps_port } else { d.imap_port },
            tls: tls.then(|| d.tls_client_config()),
            auth: Auth::Xoauth2 {
                user: if tls { ALICE } else { ALICE_PLAIN }.into(),
                token: self.tokens[usize::from(!tls)].clone(),
            },
        }
    }

    fn via_proxy(&self, tls_upstream: bool) -> Target {
        Target {
            port: self.proxy().imap_port(),
            tls: None,
            auth: Auth::Login {
                user: if tls_upstream { ALICE } else { ALICE_PLAIN }.into(),
                password: LOCAL_PW.into(),
            },
        }
    }

    /// One login + logout per proxy account: KDF done, tokens cached.
    async fn warm_proxy(&self) -> io::Result<()> {
        for t in [self.via_proxy(true), self.via_proxy(false)] {
            let (c, _) = Imap::login(&t, 8192).await?;
            c.logout().await;
        }
        Ok(())
    }
}

/// Fills the INBOXes of ALICE, ALICE_PLAIN and PEER with the same `n` realistic text messages of about `size` bytes;
/// returns the total bytes of one INBOX (what FETCH BODY[] returns, CRLF included).
fn fill_mailbox(env: &Env, n: usize, size: usize) -> u64 {
    let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
    let mut total = 0u64;
    for i in 0..n {
        let mut m = format!(
            "Return-Path: <sender{i}@example.net>\r\nFrom: Sender {i} <sender{i}@example.net>\r\nTo: Alice <{ALICE}>\r\n\
             Subject: Benchmark message {i} about the quarterly report\r\nMessage-ID: <bench-{i}@example.net>\r\n\
             Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\n\r\n"
        )
        .into_bytes();
        let mut line = String::new();
        while m.len() + line.len() < size {
            let w = word(next());
            if line.len() + w.len() + 1 > 72 {
                m.extend_from_slice(line.as_bytes());
                m.extend_from_slice(b"\r\n");
                line.clear();
                if next().is_multiple_of(8) {
                    m.extend_from_slice(b"\r\n"); // paragraph
                }
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(w);
        }
        m.extend_from_slice(line.as_bytes());
        m.extend_from_slice(b"\r\n");
        total += m.len() as u64;
        env.dovecot.deliver(ALICE, &m);
        env.dovecot.deliver(ALICE_PLAIN, &m);
        env.dovecot.deliver(PEER, &m);
    }
    total
}

// ---------------------------------------------------------------------------
// 1. FETCH throughput

struct FetchResult {
    label: &'static str,
    direct_mbps: Vec<f64>,
    proxy_mbps: Vec<f64>,
    /// proxy/direct throughput of each interleaved pair.
    ratios: Vec<f64>,
    /// CPU seconds of the bench client during the direct / proxied FETCHes.
    client_cpu_direct: f64,
    client_cpu_proxy: f64,
    /// CPU seconds of the proxy during its FETCHes.
    proxy_cpu: f64,
    /// Wall seconds of all direct / proxied FETCHes.
    secs_direct: f64,
    secs_proxy: f64,
    target: f64,
}

/// One timed FETCH. Returns (wall time, CPU seconds of this process,
/// CPU seconds of the proxy when `proxy_pid` is given), all over the FETCH only.
async fn fetch_once(
    t: &Target,
    expect_bytes: u64,
    expect_msgs: u64,
    proxy_pid: Option<u32>,
) -> io::Result<(Duration, f64, f64)> {
    let (mut c, _) = Imap::login(t, 1 << 20).await?;
    c.command("s", "SELECT INBOX").await?;
    let me = std::process::id();
    let (me0, px0) = (proc_cpu_secs(me), proxy_pid.map(proc_cpu_secs).unwrap_or(0.0));
    let t0 = Instant::now();
    let (bytes, lits) = c.command("f", "FETCH 1:* BODY.PEEK[]").await?;
    let el = t0.elapsed();
    let me_cpu = proc_cpu_secs(me) - me0;
    let px_cpu = proxy_pid.map(proc_cpu_secs).unwrap_or(0.0) - px0;
    if bytes != expect_bytes || lits != expect_msgs {
        return Err(io::Error::other(format!(
            "FETCH returned {lits} literals / {bytes} bytes, expected {expect_msgs} / {expect_bytes}"
        )));
    }
    c.logout().await;
    Ok((el, me_cpu, px_cpu))
}

async fn bench_fetch(w: &World, o: &Opts, bytes: u64, msgs: u64) -> io::Result<Vec<FetchResult>> {
    let variants: [(&'static str, Target, Target, f64); 2] = [
        ("imaps", w.direct(true), w.via_proxy(true), 0.95),
        ("plain", w.direct(false), w.via_proxy(false), 0.90),
    ];
    let pid = w.proxy().pid();
    progress!("fetch: warm-up (page cache, Dovecot index), one run of each variant");
    for (_, d, p, _) in &variants {
        fetch_once(d, bytes, msgs, None).await?;
        fetch_once(p, bytes, msgs, None).await?;
    }
    let mb = bytes as f64 / 1e6;
    let mut out: Vec<FetchResult> = variants
        .iter()
        .map(|(l, _, _, t)| FetchResult {
            label: l,
            direct_mbps: vec![],
            proxy_mbps: vec![],
            ratios: vec![],
            client_cpu_direct: 0.0,
            client_cpu_proxy: 0.0,
            proxy_cpu: 0.0,
            secs_direct: 0.0,
            secs_proxy: 0.0,
            target: *t,
        })
        .collect();
    for run in 0..o.runs {
        // Alternate which goes first so drift and order effects cancel.
        for (i, (label, d, p, _)) in variants.iter().enumerate() {
            let (first, second) = if (run + i) % 2 == 0 { (d, p) } else { (p, d) };
            let first_pid = if (run + i) % 2 == 0 { None } else { Some(pid) };
            let second_pid = if (run + i) % 2 == 0 { Some(pid) } else { None };
            let a = fetch_once(first, bytes, msgs, first_pid).await?;
            let b = fetch_once(second, bytes, msgs, second_pid).await?;
            let (d_run, p_run) = if (run + i) % 2 == 0 { (a, b) } else { (b, a) };
            let (dt, pt) = (d_run.0, p_run.0);
            let r = &mut out[i];
            r.direct_mbps.push(mb / dt.as_secs_f64());
            r.proxy_mbps.push(mb / pt.as_secs_f64());
            r.ratios.push(dt.as_secs_f64() / pt.as_secs_f64());
            r.client_cpu_direct += d_run.1;
            r.client_cpu_proxy += p_run.1;
            r.proxy_cpu += p_run.2;
            r.secs_direct += dt.as_secs_f64();
            r.secs_proxy += pt.as_secs_f64();
            progress!(
                "fetch run {}/{} {label}: direct {:.0} MB/s ({:.0} ms), proxy {:.0} MB/s ({:.0} ms)",
                run + 1,
                o.runs,
                mb / dt.as_secs_f64(),
                ms(dt),
                mb / pt.as_secs_f64(),
                ms(pt)
            );
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// 2. Login latency

struct LoginResult {
    label: &'static str,
    direct_ms: Vec<f64>,
    proxy_ms: Vec<f64>,
}

async fn login_once(t: &Target) -> io::Result<f64> {
    let (c, d) = Imap::login(t, 8192).await?;
    c.logout().await;
    Ok(ms(d))
}

async fn bench_login(w: &World, o: &Opts) -> io::Result<Vec<LoginResult>> {
    let variants: [(&'static str, Target, Target); 2] = [
        ("imaps", w.direct(true), w.via_proxy(true)),
        ("plain", w.direct(false), w.via_proxy(false)),
    ];
    let mut out: Vec<LoginResult> = variants
        .iter()
        .map(|(l, _, _)| LoginResult {
            label: l,
            direct_ms: vec![],
            proxy_ms: vec![],
        })
        .collect();
    // Warm-up: a few of each, not recorded.
    for (_, d, p) in &variants {
        for _ in 0..5 {
            login_once(d).await?;
            login_once(p).await?;
        }
    }
    progress!("login: {} sequential samples per variant, interleaved", o.login_samples);
    for s in 0..o.login_samples {
        for (i, (_, d, p)) in variants.iter().enumerate() {
            if (s + i) % 2 == 0 {
                out[i].direct_ms.push(login_once(d).await?);
                out[i].proxy_ms.push(login_once(p).await?);
            } else {
                out[i].proxy_ms.push(login_once(p).await?);
                out[i].direct_ms.push(login_once(d).await?);
            }
        }
    }
    for r in &out {
        progress!(
            "login {}: direct median {:.2} ms, proxy median {:.2} ms",
            r.label,
            median(&r.direct_ms),
            median(&r.proxy_ms)
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// 3. Concurrent logins

struct ConcResult {
    label: String,
    lat_ms: Vec<f64>,
    wall_ms: Vec<f64>,
    single_ms: f64,
    note: String,
}

/// `k` clients released at the same moment; each measures its own connect
/// to tagged OK. Sessions stay open until all are in, then log out.
/// Returns (latencies, wall time of the whole burst).
async fn burst(t: &Target, k: usize) -> io::Result<(Vec<f64>, f64)> {
    let gate = Arc::new(tokio::sync::Barrier::new(k + 1));
    let mut tasks = Vec::with_capacity(k);
    for _ in 0..k {
        let (t, gate) = (t.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            Imap::login(&t, 8192).await
        }));
    }
    gate.wait().await;
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(k);
    let mut conns = Vec::with_capacity(k);
    for task in tasks {
        let (c, d) = task.await.map_err(io::Error::other)??;
        lat.push(ms(d));
        conns.push(c);
    }
    let wall = ms(t0.elapsed());
    let closing: Vec<_> = conns.into_iter().map(|c| tokio::spawn(c.logout())).collect();
    for c in closing {
        let _ = c.await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((lat, wall))
}

async fn single_median(t: &Target, n: usize) -> io::Result<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(login_once(t).await?);
    }
    Ok(median(&v))
}

async fn bench_concurrent(w: &mut World, o: &Opts) -> io::Result<Vec<ConcResult>> {
    let k = o.clients;
    progress!(
        "concurrent: {} rounds of {k} simultaneous logins, proxy (warm) and direct, imaps upstream",
        o.rounds
    );
    let (d, p) = (w.direct(true), w.via_proxy(true));
    let single_d = single_median(&d, 30).await?;
    let single_p = single_median(&p, 30).await?;
    let mut pw = ConcResult {
        label: format!("proxy, warm ({k} clients x {} rounds)", o.rounds),
        lat_ms: vec![],
        wall_ms: vec![],
        single_ms: single_p,
        note: String::new(),
    };
    let mut dw = ConcResult {
        label: format!("direct ({k} clients x {} rounds)", o.rounds),
        lat_ms: vec![],
        wall_ms: vec![],
        single_ms: single_d,
        note: String::new(),
    };
    for r in 0..o.rounds {
        let order: [bool; 2] = if r % 2 == 0 { [true, false] } else { [false, true] };
        for proxy_first in order {
            let (lat, wall) = burst(if proxy_first { &p } else { &d }, k).await?;
            let res = if proxy_first { &mut pw } else { &mut dw };
            res.lat_ms.extend(lat);
            res.wall_ms.push(wall);
        }
    }
    // Proxy CPU for one warm burst, the yardstick for the cold one.
    let pid = w.proxy().pid();
    let c0 = proc_cpu_secs(pid);
    let (lat, wall) = burst(&p, k).await?;
    let warm_burst_cpu = proc_cpu_secs(pid) - c0;
    pw.lat_ms.extend(lat);
    pw.wall_ms.push(wall);

    // Cold, one client: fresh proxy, so the login pays the password KDF and
    // a token refresh. Its proxy CPU time is what one KDF costs.
    w.start_proxy();
    let p = w.via_proxy(true);
    let pid = w.proxy().pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c0 = proc_cpu_secs(pid);
    let cold_single = login_once(&p).await?;
    let cold_single_cpu = proc_cpu_secs(pid) - c0;

    // Cold burst: fresh proxy, nothing cached; all clients use the same
    // account and password, so ideally one KDF and one token refresh.
    let refreshes0 = w.env.provider.refreshes();
    w.start_proxy();
    let p = w.via_proxy(true);
    let pid = w.proxy().pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c0 = proc_cpu_secs(pid);
    let (lat, wall) = burst(&p, k).await?;
    let burst_cpu = proc_cpu_secs(pid) - c0;
    let peak_kib = proc_status_kib(pid, "VmHWM");
    let refreshes = w.env.provider.refreshes() - refreshes0;
    let kdfs = (burst_cpu - warm_burst_cpu).max(0.0) / cold_single_cpu.max(1e-3);
    let cold = ConcResult {
        label: format!("proxy, cold ({k} clients; single = 1 cold)"),
        lat_ms: lat,
        wall_ms: vec![wall],
        single_ms: cold_single,
        note: format!(
            "{refreshes} token refresh(es); proxy CPU {burst_cpu:.2} s for the cold burst vs {warm_burst_cpu:.2} s for a warm one; \
             one cold login (KDF + refresh) costs {cold_single_cpu:.2} s CPU and {cold_single:.0} ms => ~{kdfs:.0} password KDF(s) ran; proxy peak RSS (VmHWM) {peak_kib} KiB"
        ),
    };
    w.warm_proxy().await?;
    for r in [&pw, &dw, &cold] {
        progress!(
            "concurrent {}: median {:.2} ms, p95 {:.2} ms, max {:.2} ms (single {:.2} ms)",
            r.label,
            median(&r.lat_ms),
            percentile(&r.lat_ms, 95.0),
            percentile(&r.lat_ms, 100.0),
            r.single_ms
        );
    }
    Ok(vec![pw, dw, cold])
}

// ---------------------------------------------------------------------------
// 4. Memory per session

struct MemResult {
    label: &'static str,
    sessions: usize,
    before_kib: u64,
    after_kib: u64,
    open_secs: f64,
}

impl MemResult {
    fn per_session(&self) -> f64 {
        (self.after_kib as f64 - self.before_kib as f64) / self.sessions as f64
    }
}

/// utime + stime of a process in seconds.
fn proc_cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| stat_cpu_secs(&s))
        .unwrap_or(0.0)
}

/// utime + stime in seconds from the text of a `/proc/.../stat` file.
fn stat_cpu_secs(s: &str) -> f64 {
    let Some(close) = s.rfind(')') else {
        return 0.0;
    };
    let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / if hz > 0.0 { hz } else { 100.0 }
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM, ...).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// RSS once it stops moving (the proxy may still be finishing hand-offs).
async fn settled_rss(p: &Proxy) -> u64 {
    let mut last = p.rss_kib();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = p.rss_kib();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

async fn bench_memory_one(w: &mut World, n: usize, tls_upstream: bool) -> io::Result<MemResult> {
    let label = if tls_upstream { "imaps" } else { "plain" };
    // A fresh proxy so that memory freed by earlier sections does not hide growth.
    w.start_proxy();
    w.warm_proxy().await?;
    let t = w.via_proxy(tls_upstream);
    // A few sessions first so lazily created structures are in "before".
    for _ in 0..3 {
        let (mut c, _) = Imap::login(&t, 4096).await?;
        c.command("s", "SELECT INBOX").await?;
        c.logout().await;
    }
    let before = settled_rss(w.proxy()).await;
    progress!("memory {label}: proxy RSS {before} KiB; opening {n} sessions (LOGIN, SELECT INBOX, idle)");
    let t0 = Instant::now();
    let (mut sessions, first_err) = idle::open_sessions(n, |_| t.clone()).await;
    if let Some(e) = first_err {
        return Err(io::Error::other(format!(
            "only {} of {n} sessions opened; first error: {e}",
            sessions.len()
        )));
    }
    let open_secs = t0.elapsed().as_secs_f64();
    // Every session is idle: make sure each still answers (all really relayed).
    let after = settled_rss(w.proxy()).await;
    let mut noop = Vec::new();
    for mut c in sessions.drain(..).take(20) {
        c.command("n", "NOOP").await?;
        noop.push(c);
    }
    progress!(
        "memory {label}: {n} sessions open in {open_secs:.1} s; proxy RSS {after} KiB => {:.1} KiB/session",
        (after as f64 - before as f64) / n as f64
    );
    drop(noop);
    drop(sessions);
    Ok(MemResult {
        label,
        sessions: n,
        before_kib: before,
        after_kib: after,
        open_secs,
    })
}

async fn bench_memory(w: &mut World, o: &Opts) -> io::Result<Vec<MemResult>> {
    let mut out = vec![bench_memory_one(w, o.sessions, true).await?];
    if o.memory_plain {
        out.push(bench_memory_one(w, o.sessions, false).await?);
    }
    // Leave a fresh proxy behind (sessions dropped above).
    w.start_proxy();
    Ok(out)
}

// ---------------------------------------------------------------------------
// Report

/// What the sections measured; empty for a section that did not run.
struct Results {
    fetch: Vec<FetchResult>,
    login: Vec<LoginResult>,
    conc: Vec<ConcResult>,
    mem: Vec<MemResult>,
    mail: mail::MailResults,
    peers: Vec<peers::PeerResult>,
    fleet: Vec<fleet::FleetResult>,
    idle: Vec<idle::IdleResult>,
    soak: Option<idle::SoakResult>,
    graph: Option<graph::GraphResult>,
}

fn print_report(o: &Opts, mailbox: Option<(u64, u64)>, r: &Results) {
    let Results {
        fetch,
        login,
        conc,
        mem,
        mail: mailr,
        peers,
        fleet,
        idle,
        soak,
        graph,
    } = r;
    let total = START.get().map(Instant::elapsed).unwrap_or_default();
    let mut misses = 0;
    let cpus = std::thread::available_parallelism()
        .map(std::num::NonZero::get)
        .unwrap_or(0);
    let dovecot = std::process::Command::new(support::dovecot::DOVECOT_BIN)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!();
    println!("mailproxy benchmark: proxy vs direct, same private Dovecot {dovecot}, {cpus} CPUs, release build");
    println!(
        "(client: raw IMAP over tokio in this process; proxy: `mailproxy serve`, RUST_LOG={})",
        o.proxy_log
    );
    println!(
        "load average at start {} / at end {} (other work on the machine makes numbers noisy)",
        START_LOAD.get().map(String::as_str).unwrap_or("?"),
        loadavg()
    );

    if !fetch.is_empty() {
        let (bytes, msgs) = mailbox.unwrap_or((0, 0));
        println!();
        println!(
            "1. FETCH 1:* BODY.PEEK[] of INBOX: {msgs} messages, {:.1} MB ({:.1} MiB); medians of {} interleaved runs after a warm-up",
            bytes as f64 / 1e6,
            bytes as f64 / 1048576.0,
            o.runs
        );
        println!(
            "   {:<10} {:>12} {:>12} {:>13} {:>13} {:>8}",
            "upstream", "direct MB/s", "proxy MB/s", "proxy/direct", "paired ratio", "target"
        );
        for f in fetch {
            let (d, p) = (median(&f.direct_mbps), median(&f.proxy_mbps));
            let ratio = p / d;
            let pass = ratio >= f.target;
            misses += usize::from(!pass);
            println!(
                "   {:<10} {:>12.1} {:>12.1} {:>13.3} {:>13.3} {:>8}  {}",
                f.label,
                d,
                p,
                ratio,
                median(&f.ratios),
                format!(">= {:.2}", f.target),
                verdict(pass)
            );
        }
        println!("   (proxy/direct: ratio of the medians, judged against the target; paired ratio: median of the");
        println!("    per-run ratios of back-to-back direct/proxy pairs, less sensitive to drift)");
        for f in fetch {
            let gb = bytes as f64 * f.ratios.len() as f64 / 1e9;
            println!(
                "   cpu {}: client {:.0}% of a core (direct) / {:.0}% (via proxy); proxy {:.0}% of a core, {:.2} CPU-s per GB relayed",
                f.label,
                100.0 * f.client_cpu_direct / f.secs_direct.max(1e-9),
                100.0 * f.client_cpu_proxy / f.secs_proxy.max(1e-9),
                100.0 * f.proxy_cpu / f.secs_proxy.max(1e-9),
                f.proxy_cpu / gb.max(1e-9)
            );
        }
        for f in fetch {
            let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
            println!(
                "   runs {}: direct [{}]  proxy [{}]",
                f.label,
                fmt(&f.direct_mbps),
                fmt(&f.proxy_mbps)
            );
        }
        println!("   (direct imaps: client TLS to Dovecot imaps; proxy imaps: client plain to proxy, proxy TLS to Dovecot imaps;");
        println!("    direct plain: client to Dovecot imap port; proxy plain: upstream imap://127.0.0.1)");
    }

    if !login.is_empty() {
        println!();
        println!(
            "2. Login latency, TCP connect to tagged OK: {} sequential samples per variant, interleaved",
            o.login_samples
        );
        println!(
            "   {:<10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>8}",
            "upstream", "direct med", "proxy med", "proxy adds", "direct p95", "proxy p95", "target"
        );
        for l in login {
            let (d, p) = (median(&l.direct_ms), median(&l.proxy_ms));
            let pass = p - d < 2.0;
            misses += usize::from(!pass);
            println!(
                "   {:<10} {:>9.2} ms {:>9.2} ms {:>+9.2} ms {:>9.2} ms {:>9.2} ms {:>8}  {}",
                l.label,
                d,
                p,
                p - d,
                percentile(&l.direct_ms, 95.0),
                percentile(&l.proxy_ms, 95.0),
                "< 2 ms",
                verdict(pass)
            );
        }
        println!("   (direct: AUTHENTICATE XOAUTH2 with a cached token; proxy: LOGIN with the local password, warm)");
    }

    if !conc.is_empty() {
        println!();
        println!("3. Concurrent logins, imaps upstream: all clients released at the same moment (latency per client)");
        println!(
            "   {:<40} {:>10} {:>10} {:>10} {:>10} {:>13} {:>11}",
            "case", "median", "p95", "max", "single", "p95/single", "burst wall"
        );
        for c in conc {
            println!(
                "   {:<40} {:>7.2} ms {:>7.2} ms {:>7.2} ms {:>7.2} ms {:>13.1} {:>8.1} ms",
                c.label,
                median(&c.lat_ms),
                percentile(&c.lat_ms, 95.0),
                percentile(&c.lat_ms, 100.0),
                c.single_ms,
                percentile(&c.lat_ms, 95.0) / c.single_ms,
                median(&c.wall_ms),
            );
        }
        if let (Some(pw), Some(dw)) = (conc.first(), conc.get(1)) {
            let (pm, dm) = (median(&pw.lat_ms), median(&dw.lat_ms));
            let (pp, dp) = (percentile(&pw.lat_ms, 95.0), percentile(&dw.lat_ms, 95.0));
            let serial = pw.single_ms * o.clients as f64;
            println!(
                "   proxy vs direct under the same burst: median {:+.2} ms, p95 {:+.2} ms; fully serialised logins would take ~{:.0} ms for the last client",
                pm - dm,
                pp - dp,
                serial
            );
        }
        for c in conc.iter().filter(|c| !c.note.is_empty()) {
            println!("   {}: {}", c.label, c.note);
        }
    }

    if !mem.is_empty() {
        println!();
        println!("4. Memory per session: N logged-in sessions (SELECT INBOX, then idle) through a fresh proxy, VmRSS");
        println!(
            "   {:<10} {:>9} {:>14} {:>14} {:>14} {:>10} {:>8}",
            "upstream", "sessions", "RSS before", "RSS after", "per session", "open time", "target"
        );
        for m in mem {
            let per = m.per_session();
            let pass = per < 64.0;
            misses += usize::from(!pass);
            println!(
                "   {:<10} {:>9} {:>10} KiB {:>10} KiB {:>10.1} KiB {:>8.1} s {:>8}  {}",
                m.label,
                m.sessions,
                m.before_kib,
                m.after_kib,
                per,
                m.open_secs,
                "< 64 KiB",
                verdict(pass)
            );
        }
    }
    let (smtp, pop3) = (&mailr.smtp, &mailr.pop3);
    if !smtp.is_empty() {
        println!();
        println!(
            "5. SMTP send: {} messages of {} KiB (text, CRLF, dot-stuffed lines) in one authenticated session; medians of {} interleaved runs after a warm-up",
            o.smtp_messages, o.smtp_kb, o.mail_runs
        );
        println!("   (timed: first MAIL to the 250 after the last message's data; per message MAIL+RCPT+DATA then data, waiting");
        println!("    for each message's final 250; pipelined: MAIL+RCPT+DATA in one write; sequential: one command per round trip.");
        println!("    direct: client TLS to Dovecot submissions (465-style), AUTH XOAUTH2; proxy: client plain, AUTH PLAIN local password,");
        println!("    proxy implicit TLS to the same submissions port with XOAUTH2. Dovecot relays each message to a counting sink");
        println!("    before its 250, so relaying is in the timed part for both)");
        misses += mail::print_pairs(smtp, "EHLO + AUTH");
    }
    if !pop3.is_empty() {
        let (bytes, msgs) = mailbox.unwrap_or((0, 0));
        println!();
        println!(
            "6. POP3 RETR 1..{msgs} of INBOX ({:.1} MB) in one session; medians of {} interleaved runs after a warm-up",
            bytes as f64 / 1e6,
            o.mail_runs
        );
        println!("   (timed: first RETR sent to the last `.CRLF`; pipelined: all RETRs in one write; sequential: next RETR after");
        println!("    the previous terminator. direct: client TLS to Dovecot pop3s, AUTH XOAUTH2; proxy: client plain, USER/PASS,");
        println!("    proxy implicit TLS to the same pop3s port with XOAUTH2)");
        misses += mail::print_pairs(pop3, "greeting to +OK");
    }
    let bytes = mailbox.map_or(0, |m| m.0);
    if !peers.is_empty() {
        misses += peers::print_peers(peers, o, bytes);
    }
    if !fleet.is_empty() {
        fleet::print_fleet(fleet, o, bytes);
    }
    if !idle.is_empty() {
        misses += idle::print_idle(idle);
    }
    if let Some(s) = soak {
        misses += idle::print_soak(s);
    }
    if let Some(g) = graph {
        misses += graph::print_graph(g);
    }
    println!();
    println!(
        "Targets missed: {misses}. Total bench time {:.0} s.",
        total.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------

/// Thousands of sockets here, in the proxy and in Dovecot (they inherit it).
fn raise_nofile() {
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            progress!("open files limit: {}", r.rlim_cur);
        }
    }
}

fn main() {
    START.get_or_init(Instant::now);
    START_LOAD.get_or_init(loadavg);
    let o = parse_args();
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(o)) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

async fn run(o: Opts) -> io::Result<()> {
    progress!("starting provider + Dovecot, running `mailproxy login` for {ALICE} and {ALICE_PLAIN}");
    let mut w = tokio::task::block_in_place(|| World::new(&o));
    let mut mailbox = None;
    if o.fetch || o.pop3 || o.peers || o.fleet {
        let size = o.msg_kb * 1024;
        let n = ((o.mailbox_mb * 1048576.0) / size as f64).ceil().max(1.0) as usize;
        let bytes = tokio::task::block_in_place(|| fill_mailbox(&w.env, n, size));
        progress!("delivered {n} messages, {:.1} MiB", bytes as f64 / 1048576.0);
        mailbox = Some((bytes, n as u64));
    } else {
        // Something to SELECT for the other sections.
        tokio::task::block_in_place(|| fill_mailbox(&w.env, 20, 10 * 1024));
    }
    tokio::task::block_in_place(|| w.start_proxy());
    progress!("proxy listening on {}", w.proxy().imap_port());

    let sections = async {
        w.warm_proxy().await?;
        let fetch = match (o.fetch, mailbox) {
            (true, Some((bytes, n))) => bench_fetch(&w, &o, bytes, n).await?,
            _ => vec![],
        };
        let login = if o.login { bench_login(&w, &o).await? } else { vec![] };
        let smtp = if o.smtp {
            mail::bench_smtp(&w, o.mail_runs, o.smtp_messages, o.smtp_kb, &o.smtp_modes).await?
        } else {
            vec![]
        };
        let pop3 = match (o.pop3, mailbox) {
            (true, Some((bytes, n))) => mail::bench_pop3(&w, o.mail_runs, n, bytes, &o.pop3_modes).await?,
            _ => vec![],
        };
        let peers = match (o.peers, mailbox) {
            (true, Some((bytes, n))) => peers::bench_peers(&w, &o, bytes, n).await?,
            _ => vec![],
        };
        let fleet = match (o.fleet, mailbox) {
            (true, Some((bytes, n))) => fleet::bench_fleet(&w, &o, bytes, n).await?,
            _ => vec![],
        };
        let graph = if o.graph {
            Some(graph::bench_graph(&w, &o.graph_opts).await?)
        } else {
            None
        };
        let conc = if o.concurrent {
            tokio::task::block_in_place(|| rt_block(bench_concurrent(&mut w, &o)))?
        } else {
            vec![]
        };
        let mem = if o.memory {
            tokio::task::block_in_place(|| rt_block(bench_memory(&mut w, &o)))?
        } else {
            vec![]
        };
        let idle = if o.idle {
            tokio::task::block_in_place(|| rt_block(idle::bench_idle(&mut w, o.idle_sessions)))?
        } else {
            vec![]
        };
        let soak = if o.soak {
            Some(idle::bench_soak(&w, o.soak_sessions).await?)
        } else {
            None
        };
        io::Result::Ok(Results {
            idle,
            soak,
            fetch,
            login,
            conc,
            mem,
            mail: mail::MailResults { smtp, pop3 },
            peers,
            fleet,
            graph,
        })
    };
    let results = match sections.await {
        Ok(r) => r,
        Err(e) => {
            let logs = w
                .proxy
                .as_ref()
                .map(support::mailproxy::Proxy::logs)
                .unwrap_or_default();
            let tail: Vec<&str> = logs.lines().rev().take(30).collect();
            eprintln!("--- last mailproxy log lines ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            let dlog = w.env.dovecot.log();
            let dtail: Vec<&str> = dlog.lines().rev().take(20).collect();
            eprintln!("--- last Dovecot log lines ---");
            for l in dtail.iter().rev() {
                eprintln!("{l}");
            }
            return Err(e);
        }
    };
    print_report(&o, mailbox, &results);
    // The proxy's own log, if something went wrong there, helps; keep it short.
    let logs = w
        .proxy
        .as_ref()
        .map(support::mailproxy::Proxy::logs)
        .unwrap_or_default();
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .take(5)
        .collect();
    if !errors.is_empty() {
        eprintln!("mailproxy warnings/errors (first 5):\n{}", errors.join("\n"));
    }
    Ok(())
}

/// Runs a future to completion from inside `block_in_place` (sections that
/// restart the proxy block on its startup, which is synchronous).
fn rt_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(f)
}

//! A light fake IMAP upstream for load: thousands of sessions cost it a
//! task and a small buffer each, so that what is measured is the proxy.
//! It accepts every login (`LOGIN`, `AUTHENTICATE` with an initial
//! response: passthrough and OAuth alike), skips literals of any size
//! (`APPEND … {N+}`), answers `LOGOUT` with `BYE` and closes, and every
//! other command with a tagged `OK`. During `IDLE` it pushes an untagged
//! `FETCH` of [`LightTally::push_on_idle`] bytes, when set. It counts what
//! it saw.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::client::{metric, ImapResponse, LineConn};
use super::mailproxy::{custom_account, Proxy, ProxyDir};
use super::provider::FakeProvider;

/// The listener's task, stopped when this drops (sessions already open
/// end with their sockets).
pub struct Light(tokio::task::JoinHandle<()>);

impl Drop for Light {
    fn drop(&mut self) {
        self.0.abort();
    }
}

const GREETING: &[u8] =
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER] light ready\r\n";
const CAPS: &str = "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER IDLE\r\n";

/// What the fake saw, shared with the test.
#[derive(Clone, Default)]
pub struct LightTally {
    connections: Arc<AtomicU64>,
    logins: Arc<AtomicU64>,
    /// Of those, with a token (`AUTHENTICATE XOAUTH2` or `OAUTHBEARER`).
    oauth_logins: Arc<AtomicU64>,
    /// Sessions open now.
    open: Arc<AtomicU64>,
    /// Size of the literal pushed to a client once it is in IDLE (0: none).
    idle_push: Arc<AtomicU64>,
}

impl LightTally {
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    pub fn oauth_logins(&self) -> u64 {
        self.oauth_logins.load(Ordering::Relaxed)
    }

    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// From now on, a session entering IDLE gets `* 1 FETCH (BODY[] {n}…)`
    /// with `n` bytes of mail while it idles.
    pub fn push_on_idle(&self, n: u64) {
        self.idle_push.store(n, Ordering::Relaxed);
    }
}

/// Listens on a free loopback port until the task drops.
pub async fn start() -> (u16, LightTally, Light) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let tally = LightTally::default();
    let t = tally.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else {
                // Out of descriptors under load: wait rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            };
            t.connections.fetch_add(1, Ordering::Relaxed);
            let t = t.clone();
            t.open.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                serve(sock, t.clone()).await;
                t.open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    (port, tally, Light(task))
}

/// `N` when the line ends with a literal announcement `{N}` or `{N+}`.
fn literal(line: &str) -> Option<(u64, bool)> {
    let l = line.trim_end().strip_suffix('}')?;
    let (_, n) = l.rsplit_once('{')?;
    let plus = n.ends_with('+');
    Some((n.trim_end_matches('+').parse().ok()?, plus))
}

async fn serve(sock: TcpStream, tally: LightTally) {
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(1024, rd);
    if wr.write_all(GREETING).await.is_err() {
        return;
    }
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let tag = line.split_whitespace().next().unwrap_or("*").to_string();
        let cmd = line.split_whitespace().nth(1).unwrap_or("").to_ascii_uppercase();
        // A command with literals: skip them, then the rest of the command.
        while let Some((n, plus)) = literal(&line) {
            if !plus && wr.write_all(b"+ go ahead\r\n").await.is_err() {
                return;
            }
            let skipped = tokio::io::copy(&mut (&mut rd).take(n), &mut tokio::io::sink()).await;
            if skipped.ok() != Some(n) {
                return;
            }
            line.clear();
            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
        }
        let answer = match cmd.as_str() {
            "LOGIN" | "AUTHENTICATE" => {
                tally.logins.fetch_add(1, Ordering::Relaxed);
                let mech = line.split_whitespace().nth(2).unwrap_or("").to_ascii_uppercase();
                if cmd == "AUTHENTICATE" && (mech == "XOAUTH2" || mech == "OAUTHBEARER") {
                    tally.oauth_logins.fetch_add(1, Ordering::Relaxed);
                }
                format!("{tag} OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE] logged in\r\n")
            }
            "CAPABILITY" => format!("{CAPS}{tag} OK done\r\n"),
            "IDLE" => {
                if wr.write_all(b"+ idling\r\n").await.is_err() {
                    return;
                }
                let push = tally.idle_push.load(Ordering::Relaxed);
                if push > 0 && idle_push(&mut wr, push).await.is_err() {
                    return;
                }
                loop {
                    line.clear();
                    if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim_end().eq_ignore_ascii_case("DONE") {
                        break;
                    }
                }
                format!("{tag} OK idle done\r\n")
            }
            "LOGOUT" => {
                let _ = wr
                    .write_all(format!("* BYE light\r\n{tag} OK bye\r\n").as_bytes())
                    .await;
                return;
            }
            "SELECT" | "EXAMINE" => {
                format!("* 0 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n{tag} OK [READ-WRITE] selected\r\n")
            }
            _ => format!("{tag} OK done\r\n"),
        };
        if wr.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// An untagged FETCH with an `n`-byte literal, written in 64 KiB pieces.
async fn idle_push(wr: &mut (impl AsyncWriteExt + Unpin), n: u64) -> io::Result<()> {
    wr.write_all(format!("* 1 FETCH (BODY[] {{{n}}}\r\n").as_bytes())
        .await?;
    let piece = vec![b'x'; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(piece.len() as u64) as usize;
        wr.write_all(&piece[..k]).await?;
        left -= k as u64;
    }
    wr.write_all(b")\r\n").await
}

/// A mailproxy in front of the light upstream on `port`, metrics on:
/// passthrough for any name (the IMAP listener's fallback) and the OAuth
/// account `oauth.0` of the fake provider, logged in with local password
/// `oauth.1`; `limits` is the body of `[limits]`. Blocks while it logs in.
pub fn proxy(port: u16, p: &FakeProvider, oauth: (&str, &str), limits: &str, log: &str) -> (ProxyDir, Proxy) {
    let dir = ProxyDir::new();
    let cfg = dir
        .header()
        .replace("[server]\n", "[server]\nmetrics_listen = \"127.0.0.1:0\"\n")
        .replace(
            "[imap]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[imap]\nlisten = \"127.0.0.1:0\"\nfallback = \"imap://127.0.0.1:{port}\"\n"),
        );
    let account = custom_account(oauth.0, p, &format!("imap = \"imap://127.0.0.1:{port}\"\n"));
    dir.write_config(&format!("{cfg}[limits]\n{limits}\n{account}"));
    let (st, err) = dir.login(oauth.0, oauth.1);
    assert!(st.success(), "mailproxy login {} failed: {err}", oauth.0);
    let proxy = Proxy::start_env(&dir, &[("RUST_LOG", log)]);
    (dir, proxy)
}

/// One churned session through a [`proxy`] on `port`: OAuth (`oauth`) for
/// even `i`, passthrough for odd; one in ten dropped in the middle of a
/// command (half during the login, half after it); the others log in,
/// SELECT, NOOP and LOG OUT.
pub async fn churned(port: u16, i: usize, oauth: (&str, &str)) -> io::Result<()> {
    let mut c = LineConn::plain(port).await?;
    let greeting = c.read_line().await?;
    if !greeting.starts_with("* OK") {
        return Err(io::Error::other(format!("greeting: {greeting}")));
    }
    let (user, pw) = if i.is_multiple_of(2) {
        (oauth.0.to_string(), oauth.1)
    } else {
        (format!("user{}@light.example", i % 512), "any pw")
    };
    if i % 20 == 3 {
        return c
            .write_raw(format!("a LOGIN \"{user}\" \"{}", &pw[..3]).as_bytes())
            .await;
    }
    let ok = |what: &str, r: ImapResponse| match r.is_ok() {
        true => Ok(()),
        false => Err(io::Error::other(format!("session {i}: {what}: {}", r.tagged))),
    };
    ok("LOGIN", c.imap("a", &format!("LOGIN \"{user}\" \"{pw}\"")).await?)?;
    if i % 20 == 13 {
        return c.write_raw(b"s SELECT IN").await;
    }
    ok("SELECT", c.imap("s", "SELECT INBOX").await?)?;
    ok("NOOP", c.imap("n", "NOOP").await?)?;
    c.imap("z", "LOGOUT").await?;
    Ok(())
}

/// Sessions `from..to` of [`churned`], `at_once` at a time; the first error.
pub async fn churn(
    port: u16,
    from: usize,
    to: usize,
    at_once: usize,
    oauth: (&'static str, &'static str),
) -> io::Result<()> {
    let sem = Arc::new(tokio::sync::Semaphore::new(at_once));
    let mut tasks = Vec::with_capacity(to - from);
    for i in from..to {
        let permit = sem.clone().acquire_owned().await.map_err(io::Error::other)?;
        tasks.push(tokio::spawn(async move {
            let r = churned(port, i, oauth).await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    Ok(())
}

/// Once `proxy` has no IMAP session open (or after `wait`): whether it got
/// there, its open files (from `/proc`) and its live tasks (from
/// `/metrics`).
pub async fn quiet(proxy: &Proxy, wait: Duration) -> (bool, usize, u64) {
    let url = format!("http://{}/metrics", proxy.metrics_addr());
    let t0 = std::time::Instant::now();
    loop {
        let u = url.clone();
        let body = tokio::task::spawn_blocking(move || super::http::get(&u).map(|r| r.text()).unwrap_or_default())
            .await
            .unwrap_or_default();
        let open = metric(&body, "mailproxy_sessions_open{protocol=\"imap\"}");
        if open == Some(0.0) || t0.elapsed() > wait {
            let tasks = metric(&body, "mailproxy_tasks").map_or(u64::MAX, |t| t as u64);
            let fds = std::fs::read_dir(format!("/proc/{}/fd", proxy.pid())).map_or(0, Iterator::count);
            return (open == Some(0.0), fds, tasks);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

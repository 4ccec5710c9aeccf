//! Provider session limits said plainly (`max_upstream_sessions`), end to
//! end with the real binary: a fake Gmail that enforces its own limit of
//! 15 behind a Google-preset account serves 15 sessions at once, and the
//! 16th hears mailproxy's sentence, never the provider's vague refusal; a
//! session that ends (a logout, a client that vanishes) lets a waiting
//! login in; a limit lowered on SIGHUP applies to new logins; IMAP, SMTP
//! and POP3 are counted apart, each with its own refusal; `/metrics`
//! shows the counts and passes promtool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::support::client::{metric, promtool_check};
use crate::support::hostile_util::Rig;
use crate::support::mailproxy::{run, Proxy, ProxyDir};
use crate::support::provider::{self, FakeProvider};
use crate::support::world::{imap_login, ALICE, ALICE_PW};
use crate::support::LineConn;

const GMAIL_USER: &str = "g@gmail.com";
const GMAIL_PW: &str = "g local pw";
/// What Gmail says past its limit: true, but no help to a user.
const VAGUE: &str = "Too many simultaneous connections. (Failure)";

/// A background task aborted on drop.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An IMAP server that, like Gmail, allows `limit` logged-in sessions at
/// once and refuses the next login vaguely. It counts what it saw.
#[derive(Clone, Default)]
struct Gmail {
    open: Arc<AtomicUsize>,
    logins: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl Gmail {
    async fn start(limit: usize) -> (Gmail, u16, Task) {
        let g = Gmail::default();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let g2 = g.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else { continue };
                tokio::spawn(g2.clone().serve(sock, limit));
            }
        });
        (g, port, Task(task))
    }

    async fn serve(self, sock: tokio::net::TcpStream, limit: usize) {
        let mut c = BufReader::new(sock);
        let caps = "IMAP4rev1 AUTH=XOAUTH2 AUTH=OAUTHBEARER SASL-IR";
        let greet = format!("* OK [CAPABILITY {caps}] fake Gmail ready\r\n");
        if c.get_mut().write_all(greet.as_bytes()).await.is_err() {
            return;
        }
        let mut logged_in = false;
        let mut line = String::new();
        loop {
            line.clear();
            if c.read_line(&mut line).await.unwrap_or(0) == 0 {
                break;
            }
            let mut words = line.split_whitespace();
            let tag = words.next().unwrap_or("*").to_string();
            let cmd = words.next().unwrap_or("").to_ascii_uppercase();
            let answer = match cmd.as_str() {
                "CAPABILITY" => format!("* CAPABILITY {caps}\r\n{tag} OK done\r\n"),
                "AUTHENTICATE" | "LOGIN" => {
                    self.logins.fetch_add(1, Ordering::SeqCst);
                    if self.open.fetch_add(1, Ordering::SeqCst) >= limit {
                        self.open.fetch_sub(1, Ordering::SeqCst);
                        self.refused.fetch_add(1, Ordering::SeqCst);
                        format!("{tag} NO {VAGUE}\r\n")
                    } else {
                        logged_in = true;
                        format!("{tag} OK [CAPABILITY IMAP4rev1] g@gmail.com authenticated (Success)\r\n")
                    }
                }
                "LOGOUT" => format!("* BYE LOGOUT Requested\r\n{tag} OK 73 good day\r\n"),
                _ => format!("{tag} OK Success\r\n"),
            };
            if c.get_mut().write_all(answer.as_bytes()).await.is_err() || cmd == "LOGOUT" {
                break;
            }
        }
        if logged_in {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A proxy with a Google-preset account pointed at the fake provider and
/// a fake Gmail allowing `gmail_limit` sessions (the preset's limit of 15
/// comes with the account), and a metrics listener.
async fn gmail_proxy(gmail_limit: usize) -> (Proxy, ProxyDir, FakeProvider, Gmail, Task) {
    let p = FakeProvider::start();
    let (gmail, port, task) = Gmail::start(gmail_limit).await;
    let dir = ProxyDir::new();
    let cfg = format!(
        "{}[accounts.\"{GMAIL_USER}\"]\nprovider = \"google\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\nimap = \"imap://127.0.0.1:{port}\"\n",
        dir.header().replace("[server]\n", "[server]\nmetrics_listen = \"127.0.0.1:0\"\n"),
        provider::CLIENT_ID,
        provider::CLIENT_SECRET,
        p.auth_url(),
        p.token_url(),
    );
    dir.write_config(&cfg);
    let (st, err) = dir.login(GMAIL_USER, GMAIL_PW);
    assert!(st.success(), "mailproxy login: {err}");
    let proxy = Proxy::start(&dir);
    (proxy, dir, p, gmail, task)
}

/// A new connection's `a1 LOGIN` as the Gmail user: the connection and
/// the tagged answer.
async fn login(port: u16) -> (LineConn, String) {
    imap_login(port, GMAIL_USER, GMAIL_PW).await
}

/// `n` sessions logged in at once, each answering a NOOP.
async fn sessions(port: u16, n: usize) -> Vec<LineConn> {
    let hs: Vec<_> = (0..n).map(|_| tokio::spawn(login(port))).collect();
    let mut out = Vec::new();
    for h in hs {
        let (mut c, tagged) = h.await.unwrap();
        assert!(tagged.starts_with("a1 OK"), "{tagged}");
        assert!(c.imap("n", "NOOP").await.unwrap().is_ok());
        out.push(c);
    }
    out
}

fn sentence(n: u32) -> String {
    format!(
        "a1 NO [UNAVAILABLE] {GMAIL_USER} already has {n} IMAP sessions open at Gmail, its limit: close one in another client"
    )
}

fn metrics(proxy: &Proxy) -> String {
    let addr = proxy.metrics_addr();
    crate::support::http::get(&format!("http://{addr}/metrics"))
        .unwrap()
        .text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_gmail_sessions_are_served_and_the_sixteenth_hears_why() {
    let (proxy, _dir, _p, gmail, _task) = gmail_proxy(15).await;
    let port = proxy.imap_port();

    // The legitimate case: 15 at once, all served.
    let mut held = sessions(port, 15).await;
    assert_eq!(gmail.open.load(Ordering::SeqCst), 15);
    let body = metrics(&proxy);
    let series = format!("mailproxy_upstream_sessions{{account=\"{GMAIL_USER}\",protocol=\"imap\"}}");
    let limit = format!("mailproxy_upstream_session_limit{{account=\"{GMAIL_USER}\",protocol=\"imap\"}}");
    assert_eq!(metric(&body, &series), Some(15.0), "{body}");
    assert_eq!(metric(&body, &limit), Some(15.0), "{body}");
    promtool_check(&body);

    // The 16th waits a few seconds for a slot, then gets the sentence;
    // the provider never sees it.
    let logins_before = gmail.logins.load(Ordering::SeqCst);
    let t0 = Instant::now();
    let (_c, tagged) = login(port).await;
    assert_eq!(tagged, sentence(15), "{}", proxy.logs());
    assert!(t0.elapsed() >= Duration::from_millis(4500), "{:?}", t0.elapsed());
    assert_eq!(
        gmail.logins.load(Ordering::SeqCst),
        logins_before,
        "the 16th reached upstream"
    );
    assert_eq!(gmail.refused.load(Ordering::SeqCst), 0);

    // One of the 15 logs out while the 16th waits: the 16th gets in, even
    // though the leaving client has not closed its connection yet (the
    // upstream session is over once the server closes its side).
    let t0 = Instant::now();
    let waiting = tokio::spawn(login(port));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut leaving = held.pop().unwrap();
    assert!(leaving.imap("z", "LOGOUT").await.unwrap().is_ok());
    let (mut c, tagged) = waiting.await.unwrap();
    assert!(tagged.starts_with("a1 OK"), "{tagged}\n{}", proxy.logs());
    assert!(t0.elapsed() >= Duration::from_secs(1), "it did not wait");
    assert!(c.imap("n", "NOOP").await.unwrap().is_ok());
    held.push(c);

    // A client that vanishes without a word frees its slot too.
    let waiting = tokio::spawn(login(port));
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(held.pop());
    let (c, tagged) = waiting.await.unwrap();
    assert!(tagged.starts_with("a1 OK"), "{tagged}\n{}", proxy.logs());
    held.push(c);
    assert_eq!(
        gmail.refused.load(Ordering::SeqCst),
        0,
        "the provider never had to refuse"
    );

    // All gone: the gauge is back at 0.
    held.clear();
    drop(leaving);
    let t0 = Instant::now();
    while metric(&metrics(&proxy), &series) != Some(0.0) {
        assert!(t0.elapsed() < Duration::from_secs(5), "{}", metrics(&proxy));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_lowered_on_sighup_applies_to_new_logins() {
    let (proxy, dir, _p, _gmail, _task) = gmail_proxy(100).await;
    let port = proxy.imap_port();
    // Under the preset's 15, three at once are served.
    let mut held = sessions(port, 3).await;
    held.pop();

    let cfg = std::fs::read_to_string(dir.config_path()).unwrap();
    dir.write_config(&format!("{cfg}max_upstream_sessions = 2\n"));
    proxy.signal(libc::SIGHUP);
    assert!(proxy.wait_log("configuration reloaded"), "{}", proxy.logs());
    let (_c, tagged) = login(port).await;
    assert_eq!(tagged, sentence(2), "{}", proxy.logs());
    let body = metrics(&proxy);
    let limit = format!("mailproxy_upstream_session_limit{{account=\"{GMAIL_USER}\",protocol=\"imap\"}}");
    assert_eq!(metric(&body, &limit), Some(2.0), "{body}");
    // `mailproxy accounts` asks serve: the two open and the new limit.
    let (code, out, err) = run(&dir, &["accounts"], "");
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.starts_with(GMAIL_USER)).unwrap();
    assert!(line.contains("  IMAP 2 of 2 · SMTP 0 of 2"), "{out}");

    // The two sessions from before go on; when one ends, a new one fits.
    assert!(held[0].imap("n", "NOOP").await.unwrap().is_ok());
    drop(held.pop());
    let (_c, tagged) = login(port).await;
    assert!(tagged.starts_with("a1 OK"), "{tagged}\n{}", proxy.logs());
}

/// IMAP, SMTP and POP3 are counted apart, each with its own refusal, over
/// the private Dovecot (alice, limited to one session per protocol).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_protocol_has_its_own_count_and_its_own_refusal() {
    let mut rig = Rig::new("", |_| String::new());
    rig.edit_config(|c| {
        c.replacen(
            &format!("[accounts.\"{ALICE}\"]\n"),
            &format!("[accounts.\"{ALICE}\"]\nmax_upstream_sessions = 1\n"),
            1,
        )
    });
    rig.authorise(ALICE, ALICE_PW);
    rig.start();
    let (imap, smtp, pop3) = (rig.imap_port(), rig.smtp_port(), rig.pop3_port());
    let said = |p: &str| {
        format!("{ALICE} already has 1 {p} sessions open at localhost, its limit: close one in another client")
    };

    // One of each at once: all served.
    let (mut i1, r) = imap_login(imap, ALICE, ALICE_PW).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    let mut s1 = smtp_auth(smtp).await;
    assert!(s1.0.last().unwrap().starts_with("235 "), "{:?}", s1.0);
    let mut p1 = pop3_pass(pop3).await;
    assert!(p1.1.starts_with("+OK"), "{}", p1.1);

    // A second of each: the sentence in each protocol's words, together.
    let (i2, s2, p2) = tokio::join!(imap_login(imap, ALICE, ALICE_PW), smtp_auth(smtp), pop3_pass(pop3));
    assert_eq!(i2.1, format!("a1 NO [UNAVAILABLE] {}", said("IMAP")), "{}", rig.logs());
    assert_eq!(s2.0.last().unwrap(), &format!("421 4.7.0 {}", said("SMTP")));
    let mut s2c = s2.1;
    assert!(s2c.read_line().await.is_err(), "SMTP closes after 421");
    assert_eq!(p2.1, format!("-ERR [IN-USE] {}", said("POP3")));

    // Each slot is freed by its own session's end.
    s1.1.send("QUIT").await.unwrap();
    drop(s1);
    let s3 = smtp_auth(smtp).await;
    assert!(s3.0.last().unwrap().starts_with("235 "), "{:?}", s3.0);
    p1.0.send("QUIT").await.unwrap();
    drop(p1);
    let p3 = pop3_pass(pop3).await;
    assert!(p3.1.starts_with("+OK"), "{}", p3.1);
    assert!(i1.imap("n", "NOOP").await.unwrap().is_ok());
}

/// EHLO and AUTH PLAIN as alice: the connection and AUTH's reply lines.
async fn smtp_auth(port: u16) -> (Vec<String>, LineConn) {
    let mut c = LineConn::plain(port).await.unwrap();
    c.read_smtp_reply().await.unwrap();
    c.send("EHLO client.test").await.unwrap();
    c.read_smtp_reply().await.unwrap();
    let ir = crate::support::client::plain_b64(ALICE, ALICE_PW);
    c.send(&format!("AUTH PLAIN {ir}")).await.unwrap();
    (c.read_smtp_reply().await.unwrap(), c)
}

/// USER and PASS as alice: the connection and PASS's answer.
async fn pop3_pass(port: u16) -> (LineConn, String) {
    let mut c = LineConn::plain(port).await.unwrap();
    c.read_line().await.unwrap();
    c.send(&format!("USER {ALICE}")).await.unwrap();
    c.read_line().await.unwrap();
    c.send(&format!("PASS {ALICE_PW}")).await.unwrap();
    let r = c.read_line().await.unwrap();
    (c, r)
}

//! POP3 end to end: real `mailproxy` binary, real Dovecot POP3 upstream,
//! fake OAuth provider. Clients are raw protocol bytes and fetchmail.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::support::hostile_util::closed_port;
use crate::support::starttls_injection::{self, Events, Tls, MALLORY, MALLORY_PW};
use crate::support::world_mail::*;
use crate::support::{client, sample_message, LineConn};

const CAPA: &str = "+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nTOP\r\nUIDL\r\nPIPELINING\r\nIMPLEMENTATION mailproxy\r\n.\r\n";

async fn connect(port: u16) -> LineConn {
    let mut c = LineConn::plain(port).await.unwrap();
    assert_eq!(text(&pop3_line(&mut c).await), "+OK mailproxy ready\r\n");
    c
}

async fn expect(c: &mut LineConn, line: &str, want: &str) {
    let got = text(&pop3_cmd(c, line, false).await);
    assert_eq!(got, want, "after {line:?}");
}

/// USER + PASS on `c`; asserts `+OK Logged in`.
async fn user_pass(c: &mut LineConn, user: &str, pw: &str) {
    expect(c, &format!("USER {user}"), "+OK Send PASS\r\n").await;
    expect(c, &format!("PASS {pw}"), "+OK Logged in\r\n").await;
}

async fn login(port: u16, user: &str, pw: &str) -> LineConn {
    let mut c = connect(port).await;
    user_pass(&mut c, user, pw).await;
    c
}

/// A direct pop3s session to Dovecot with a provider-minted token (AUTH XOAUTH2, two steps).
async fn direct(w: &MailWorld, user: &str) -> LineConn {
    let d = &w.env.dovecot;
    let mut c = LineConn::tls(d.pop3s_port, d.tls_client_config(), "localhost")
        .await
        .unwrap();
    assert!(pop3_line(&mut c).await.starts_with(b"+OK"));
    assert_eq!(pop3_cmd(&mut c, "AUTH XOAUTH2", false).await, b"+ \r\n");
    let r = pop3_cmd(&mut c, &client::xoauth2_b64(user, &w.token(user)), false).await;
    assert!(r.starts_with(b"+OK"), "{}", text(&r));
    c
}

/// Runs `script` ((command, multi-line?) pairs) and returns the raw responses.
async fn run(c: &mut LineConn, script: &[(&str, bool)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (cmd, multi) in script {
        out.push(pop3_cmd(c, cmd, *multi).await);
    }
    out
}

/// Messages with dot-stuffing cases: lines starting with `.`, a lone `.`, `..`.
fn mailbox() -> Vec<Vec<u8>> {
    let m1 = sample_message("a@example.org", ALICE, "first", "pop1");
    let m2 = format!(
        "From: b@example.org\r\nTo: {ALICE}\r\nSubject: dots\r\nMessage-ID: <pop2@test.example.org>\r\n\r\n.\r\n..\r\n...three\r\n. space\r\nline\r\n.\r\nend\r\n"
    )
    .into_bytes();
    let m3 = format!(
        "From: c@example.org\r\nTo: {ALICE}\r\nSubject: 8-bit\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße ✓\r\n.ä\r\n{}\r\n",
        "x".repeat(5000)
    )
    .into_bytes();
    vec![m1, m2, m3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_capa_and_login_forms() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let port = w.pop3_port();
    let before = w.upstream_log_lines("pop3-login");

    let mut c = connect(port).await;
    let capa = pop3_cmd(&mut c, "CAPA", true).await;
    assert_eq!(text(&capa), CAPA);
    assert_eq!(
        text(&pop3_cmd(&mut c, "AUTH", true).await),
        "+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"
    );
    expect(&mut c, "STLS", "-ERR STLS not available\r\n").await;
    expect(&mut c, "STAT", "-ERR Not authenticated\r\n").await;
    expect(&mut c, "QUIT", "+OK Bye\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.upstream_log_lines("pop3-login"), before, "nothing went upstream");

    // USER/PASS.
    let mut c = login(port, ALICE, ALICE_PW).await;
    expect(&mut c, "STAT", "+OK 0 0\r\n").await;
    expect(&mut c, "QUIT", "+OK Logging out.\r\n").await;

    // AUTH PLAIN with an initial response.
    let mut c = connect(port).await;
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "+OK Logged in\r\n",
    )
    .await;
    expect(&mut c, "STAT", "+OK 0 0\r\n").await;

    // AUTH PLAIN via `+`.
    let mut c = connect(port).await;
    expect(&mut c, "AUTH PLAIN", "+ \r\n").await;
    expect(&mut c, &client::plain_b64(ALICE, ALICE_PW), "+OK Logged in\r\n").await;
    expect(&mut c, "STAT", "+OK 0 0\r\n").await;

    // Wrong password: -ERR [AUTH], nothing upstream, and the right one still works.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = w.upstream_log_lines("pop3-login");
    let before_tokens = w.env.provider.total_token_requests();
    let mut c = connect(port).await;
    expect(&mut c, &format!("USER {ALICE}"), "+OK Send PASS\r\n").await;
    expect(&mut c, "PASS wrong", "-ERR [AUTH] Authentication failed\r\n").await;
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, "wrong too")),
        "-ERR [AUTH] Authentication failed\r\n",
    )
    .await;
    expect(&mut c, "STAT", "-ERR Not authenticated\r\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.upstream_log_lines("pop3-login"), before, "no upstream connection");
    assert_eq!(w.env.provider.total_token_requests(), before_tokens);
    user_pass(&mut c, ALICE, ALICE_PW).await;
    expect(&mut c, "STAT", "+OK 0 0\r\n").await;

    // Pipelined: USER, PASS and transaction commands in one write.
    let mut c = connect(port).await;
    c.write_raw(format!("USER {ALICE}\r\nPASS {ALICE_PW}\r\nSTAT\r\nLIST\r\nQUIT\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    for multi in [false, false, false, true, false] {
        got.extend(if multi {
            pop3_multi(&mut c).await
        } else {
            pop3_line(&mut c).await
        });
    }
    assert_eq!(
        text(&got),
        "+OK Send PASS\r\n+OK Logged in\r\n+OK 0 0\r\n+OK 0 messages:\r\n.\r\n+OK Logging out.\r\n"
    );
    // AUTH PLAIN (initial response) and a command in one write.
    let mut c = connect(port).await;
    c.write_raw(format!("AUTH PLAIN {}\r\nSTAT\r\n", client::plain_b64(ALICE, ALICE_PW)).as_bytes())
        .await
        .unwrap();
    assert_eq!(text(&pop3_line(&mut c).await), "+OK Logged in\r\n");
    assert_eq!(text(&pop3_line(&mut c).await), "+OK 0 0\r\n");
    assert!(!w.logs().contains(ALICE_PW), "password in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_commands_are_byte_identical_to_direct() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    let msgs = mailbox();
    for m in &msgs {
        w.env.dovecot.deliver(ALICE, m);
    }
    w.start();
    let port = w.pop3_port();

    let script: &[(&str, bool)] = &[
        ("STAT", false),
        ("LIST", true),
        ("UIDL", true),
        ("LIST 2", false),
        ("UIDL 3", false),
        ("RETR 1", true),
        ("RETR 2", true),
        ("RETR 3", true),
        ("TOP 1 3", true),
        ("TOP 2 3", true),
        ("TOP 3 0", true),
        ("RETR 9", false),
        ("NOOP", false),
        ("DELE 2", false),
        ("STAT", false),
        ("LIST", true),
        ("RETR 2", false),
        ("RSET", false),
        ("QUIT", false),
    ];
    let mut c = login(port, ALICE, ALICE_PW).await;
    let via_proxy = run(&mut c, script).await;
    let mut d = direct(&w, ALICE).await;
    let via_direct = run(&mut d, script).await;
    for (i, (p, d)) in via_proxy.iter().zip(&via_direct).enumerate() {
        assert!(p == d, "{}: proxy {:?}\ndirect {:?}", script[i].0, text(p), text(d));
    }

    // Sanity of what was compared: sizes and dot-stuffed bodies.
    let total: usize = msgs.iter().map(Vec::len).sum();
    assert_eq!(text(&via_proxy[0]), format!("+OK 3 {total}\r\n"));
    for (i, m) in msgs.iter().enumerate() {
        let r = &via_proxy[5 + i];
        let first = r.iter().position(|&b| b == b'\n').unwrap() + 1;
        assert!(r.starts_with(b"+OK"), "{}", text(r));
        assert_eq!(text(&r[first..]), text(&smtp_data(m)), "RETR {}", i + 1);
    }
    assert!(text(&via_proxy[6]).contains("\r\n..\r\n...\r\n....three\r\n.. space\r\n"));

    // DELE + QUIT commit: same answers, and the message is gone.
    let mut c = login(port, ALICE, ALICE_PW).await;
    let p = run(&mut c, &[("DELE 1", false), ("QUIT", false)]).await;
    assert_eq!(c.read_line_raw().await.unwrap(), b"", "closed after QUIT");
    let mut d = direct(&w, ALICE).await;
    let dd = run(&mut d, &[("DELE 1", false), ("QUIT", false)]).await;
    assert_eq!(p, dd, "{:?} vs {:?}", p.iter().map(|x| text(x)).collect::<Vec<_>>(), dd);
    assert_eq!(text(&p[1]), "+OK Logging out, messages deleted.\r\n");
    let mut c = login(port, ALICE, ALICE_PW).await;
    expect(&mut c, "STAT", &format!("+OK 1 {}\r\n", msgs[2].len())).await;
    assert_eq!(w.env.dovecot.message_count(ALICE), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_variants_passthrough_fallback_and_token_refresh() {
    let (closed, _closed) = closed_port();
    let mut w = MailWorld::with(LocalTls::None, LocalTls::None, |_, _| {
        format!("[accounts.\"erin@example.org\"]\nprovider = \"password\"\npop3 = \"pop3://127.0.0.1:{closed}\"\n\n")
    });
    w.authorise(ALICE, ALICE_PW);
    w.authorise(CAROL, CAROL_PW);
    w.start();
    let port = w.pop3_port();
    for (user, pw, what) in [
        (ALICE, ALICE_PW, "pop3s"),
        (CAROL, CAROL_PW, "pop3+starttls"),
        (BOB, BOB_PW, "passthrough"),
        (FRANK, FRANK_PW, "fallback"),
    ] {
        let msg = sample_message("x@example.org", user, what, &format!("up-{}", what.replace('+', "-")));
        w.env.dovecot.deliver(user, &msg);
        let mut c = login(port, user, pw).await;
        let r = pop3_cmd(&mut c, "RETR 1", true).await;
        assert_eq!(
            text(&r),
            format!("+OK {} octets\r\n{}", msg.len(), text(&smtp_data(&msg))),
            "{what}"
        );
        expect(&mut c, "QUIT", "+OK Logging out.\r\n").await;
    }
    for (u, m) in [(ALICE, "XOAUTH2"), (CAROL, "XOAUTH2"), (BOB, "PLAIN"), (FRANK, "PLAIN")] {
        let needle = format!("pop3-login: Info: Login: user=<{u}>, method={m}");
        assert!(w.wait_dovecot_log(&needle), "{needle}\n{}", w.env.dovecot.log());
    }
    let log = w.env.dovecot.log();
    for u in [ALICE, CAROL] {
        let l = log
            .lines()
            .find(|l| l.contains(&format!("pop3-login: Info: Login: user=<{u}>")))
            .unwrap();
        assert!(l.contains("TLS"), "{l}");
    }

    // Passthrough with a wrong password: the upstream's refusal.
    let mut c = connect(port).await;
    expect(&mut c, &format!("USER {BOB}"), "+OK Send PASS\r\n").await;
    let r = text(&pop3_cmd(&mut c, "PASS nope", false).await);
    assert!(r.starts_with("-ERR [AUTH] "), "{r}");

    // Unreachable upstream: a temporary failure, named.
    let mut c = connect(port).await;
    expect(&mut c, "USER erin@example.org", "+OK Send PASS\r\n").await;
    let r = text(&pop3_cmd(&mut c, "PASS pw", false).await);
    assert!(r.starts_with("-ERR [SYS/TEMP] ") && r.contains("127.0.0.1:"), "{r}");
    expect(&mut c, "STAT", "-ERR Not authenticated\r\n").await;

    // Expired access token: refreshed and retried, the login still works.
    let p = &w.env.provider;
    let before = p.refreshes();
    p.expire_all_access_tokens();
    let mut c = login(port, ALICE, ALICE_PW).await;
    let r = text(&pop3_cmd(&mut c, "STAT", false).await);
    assert!(r.starts_with("+OK 1 "), "{r}");
    assert_eq!(p.refreshes(), before + 1);
    assert!(w.proxy().wait_log("refreshing and retrying once"), "{}", w.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stls_listener_discards_pipelined_plaintext() {
    let mut w = MailWorld::with(LocalTls::None, LocalTls::StartTls, |_, _| String::new());
    w.authorise(ALICE, ALICE_PW);
    let msg = sample_message("x@example.org", ALICE, "stls", "st1");
    w.env.dovecot.deliver(ALICE, &msg);
    w.start();
    let port = w.pop3_port();
    let tls = w.local_tls_config();

    let mut c = connect(port).await;
    let capa = text(&pop3_cmd(&mut c, "CAPA", true).await);
    assert_eq!(capa, CAPA.replace("PIPELINING\r\n", "PIPELINING\r\nSTLS\r\n"));
    let need_tls = "-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; use STLS first\r\n";
    expect(&mut c, &format!("USER {ALICE}"), need_tls).await;
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        need_tls,
    )
    .await;
    expect(&mut c, "STLS", "+OK Begin TLS negotiation\r\n").await;
    let mut c = c.starttls(tls.clone(), "localhost").await.unwrap();
    assert_eq!(text(&pop3_cmd(&mut c, "CAPA", true).await), CAPA);
    expect(&mut c, "STLS", "-ERR TLS already active\r\n").await;
    user_pass(&mut c, ALICE, ALICE_PW).await;
    let r = pop3_cmd(&mut c, "RETR 1", true).await;
    assert_eq!(
        text(&r),
        format!("+OK {} octets\r\n{}", msg.len(), text(&smtp_data(&msg)))
    );
    expect(&mut c, "QUIT", "+OK Logging out.\r\n").await;

    // Injection: USER pipelined behind STLS in the same plaintext write.
    let mut c = connect(port).await;
    c.write_raw(format!("STLS\r\nUSER {ALICE}\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(text(&pop3_line(&mut c).await), "+OK Begin TLS negotiation\r\n");
    // `starttls` asserts nothing followed the +OK in plaintext.
    let mut c = c.starttls(tls, "localhost").await.unwrap();
    // The injected USER was never acted on: PASS has no user to go with.
    expect(&mut c, &format!("PASS {ALICE_PW}"), "-ERR Send USER first\r\n").await;
    assert_eq!(text(&pop3_cmd(&mut c, "CAPA", true).await), CAPA);
    user_pass(&mut c, ALICE, ALICE_PW).await;
    let r = text(&pop3_cmd(&mut c, "STAT", false).await);
    assert_eq!(r, format!("+OK 1 {}\r\n", msg.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_implicit_tls_listener() {
    let mut w = MailWorld::with(LocalTls::None, LocalTls::Implicit, |_, _| String::new());
    w.authorise(ALICE, ALICE_PW);
    let msg = sample_message("x@example.org", ALICE, "implicit", "it1");
    w.env.dovecot.deliver(ALICE, &msg);
    w.start();
    let mut c = LineConn::tls(w.pop3_port(), w.local_tls_config(), "localhost")
        .await
        .unwrap();
    assert_eq!(text(&pop3_line(&mut c).await), "+OK mailproxy ready\r\n");
    assert_eq!(text(&pop3_cmd(&mut c, "CAPA", true).await), CAPA);
    expect(&mut c, "STLS", "-ERR STLS not available\r\n").await;
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "+OK Logged in\r\n",
    )
    .await;
    let r = pop3_cmd(&mut c, "RETR 1", true).await;
    assert_eq!(
        text(&r),
        format!("+OK {} octets\r\n{}", msg.len(), text(&smtp_data(&msg)))
    );
    expect(&mut c, "QUIT", "+OK Logging out.\r\n").await;
}

/// RFC 5034 §4 bounds a SASL response only by its mechanism: 12,288
/// octets (RFC 4954's figure), inline or after `+`, get an authentication
/// answer, and the right password still logs in; one octet more is
/// `-ERR Line too long` and the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_lines_with_long_sasl_responses_are_answered() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let port = w.pop3_port();
    let long = client::plain_b64(ALICE, &"p".repeat(9216 - ALICE.len() - 2));
    assert_eq!(long.len(), 12_288);

    let mut c = connect(port).await;
    let r = text(&pop3_cmd(&mut c, &format!("AUTH PLAIN {long}"), false).await);
    assert!(r.starts_with("-ERR [AUTH] "), "{r}");
    expect(&mut c, "AUTH PLAIN", "+ \r\n").await;
    let r = text(&pop3_cmd(&mut c, &long, false).await);
    assert!(r.starts_with("-ERR [AUTH] "), "{r}");
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "+OK Logged in\r\n",
    )
    .await;
    expect(&mut c, "QUIT", "+OK Logging out.\r\n").await;

    for (before, line) in [
        (None, format!("AUTH PLAIN {}", "A".repeat(8192 + 12_288 - 10))),
        (Some("AUTH PLAIN"), "A".repeat(12_289)),
    ] {
        let mut c = connect(port).await;
        if let Some(b) = before {
            expect(&mut c, b, "+ \r\n").await;
        }
        expect(&mut c, &line, "-ERR Line too long, closing connection\r\n").await;
        assert!(c.read_line_raw().await.unwrap().is_empty(), "closed");
    }
}

/// One sample of the metrics once it reaches `want` (or after 5 s).
async fn wait_metric(addr: &str, series: &str, want: f64) -> Option<f64> {
    let t0 = std::time::Instant::now();
    loop {
        let body = crate::support::http::get(&format!("http://{addr}/metrics"))
            .unwrap()
            .text();
        let v = client::metric(&body, series);
        if v == Some(want) || t0.elapsed() > Duration::from_secs(5) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TLS client (its real ClientHello) on the plaintext POP3 listener, and
/// a plaintext client that sends `CAPA` to it with `tls = "implicit"`: each
/// gets one warning naming the listener, the client and the fix, is
/// counted, and is closed (the plaintext one told why in a POP3 line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconnected_clients_are_named_in_the_log_and_counted() {
    let mut w = MailWorld::new();
    let config = std::fs::read_to_string(w.dir.config_path()).unwrap();
    w.dir
        .write_config(&config.replace("[server]\n", "[server]\nmetrics_listen = \"127.0.0.1:0\"\n"));
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let port = w.pop3_port();
    let addr = w.proxy().metrics_addr();
    let tls_on_plaintext = "mailproxy_misconnects_total{listener=\"pop3\",kind=\"tls_on_plaintext\"}";
    let plaintext_on_tls = "mailproxy_misconnects_total{listener=\"pop3\",kind=\"plaintext_on_tls\"}";

    let hello = client::tls_client_hello(w.env.dovecot.tls_client_config());
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let (got, closed) = client::read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "{}", text(&got));
    assert_eq!(text(&got), "+OK mailproxy ready\r\n");
    let p = w.proxy();
    assert!(
        p.wait_log("a client sent a TLS handshake to a plaintext listener"),
        "{}",
        p.logs()
    );
    let logs = p.logs();
    let l = logs
        .lines()
        .find(|l| l.contains("a client sent a TLS handshake"))
        .unwrap();
    assert!(l.contains(" WARN ") && l.contains("peer=127.0.0.1:"), "{l}");
    assert!(l.contains(&format!("listener=[pop3] 127.0.0.1:{port}")), "{l}");
    assert!(l.contains("tls = \"implicit\" in [pop3]"), "{l}");
    assert_eq!(wait_metric(&addr, tls_on_plaintext, 1.0).await, Some(1.0));
    assert_eq!(wait_metric(&addr, plaintext_on_tls, 0.0).await, Some(0.0));
    drop(login(port, ALICE, ALICE_PW).await);

    if let Some(mut p) = w.proxy.take() {
        p.stop();
    }
    let config = std::fs::read_to_string(w.dir.config_path()).unwrap();
    let pop3 = config.find("[pop3]").unwrap();
    let (head, tail) = config.split_at(pop3);
    let implicit = format!("{head}{}", tail.replacen("tls = \"none\"", "tls = \"implicit\"", 1));
    assert_ne!(implicit, config);
    w.dir.write_config(&implicit);
    w.start();
    let port = w.pop3_port();
    let addr = w.proxy().metrics_addr();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(b"CAPA\r\n").await.unwrap();
    let (got, closed) = client::read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "{}", text(&got));
    assert_eq!(
        text(&got),
        "-ERR [SYS/TEMP] this port speaks TLS from the first byte (implicit TLS, \"SSL/TLS\"): set the client to use it\r\n"
    );
    let p = w.proxy();
    assert!(
        p.wait_log("a client spoke plaintext to an implicit-TLS listener"),
        "{}",
        p.logs()
    );
    let logs = p.logs();
    let l = logs.lines().find(|l| l.contains("a client spoke plaintext")).unwrap();
    assert!(l.contains(" WARN ") && l.contains("peer=127.0.0.1:"), "{l}");
    assert!(l.contains(&format!("listener=[pop3] 127.0.0.1:{port}")), "{l}");
    assert!(l.contains("tls = \"starttls\" in [pop3]"), "{l}");
    assert_eq!(wait_metric(&addr, plaintext_on_tls, 1.0).await, Some(1.0));
    let mut c = LineConn::tls(port, w.local_tls_config(), "localhost").await.unwrap();
    assert_eq!(text(&pop3_line(&mut c).await), "+OK mailproxy ready\r\n");
}

/// POP3's side of the STARTTLS response-injection test: the injected
/// `+OK`s would pass for the answers to USER and PASS.
struct Pop3;

impl starttls_injection::Protocol for Pop3 {
    const KEY: &'static str = "pop3";
    const GREETING: &'static [u8] = b"+OK fake POP3 ready\r\n";
    const UPGRADE: &'static str = "STLS";
    const UPGRADE_AND_INJECTED: &'static [u8] = b"+OK go ahead\r\n+OK injected\r\n+OK injected\r\n";

    fn plain_reply(_: &str) -> &'static [u8] {
        b"-ERR STLS first\r\n"
    }

    /// USER/PASS succeed only for mallory.
    async fn serve_tls(mut rd: Tls, events: Events) -> std::io::Result<()> {
        let mut got_user = None;
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let l = line.trim_end().to_string();
            let (verb, arg) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            let reply = match verb.to_ascii_uppercase().as_str() {
                "USER" => {
                    events.push(format!("tls: USER {arg}"));
                    got_user = Some(arg.to_string());
                    "+OK send PASS\r\n".to_string()
                }
                "PASS" => {
                    let ok = got_user.as_deref() == Some(MALLORY) && arg == MALLORY_PW;
                    events.push(format!("tls: PASS ok={ok}"));
                    if ok {
                        "+OK welcome\r\n"
                    } else {
                        "-ERR [AUTH] bad credentials\r\n"
                    }
                    .to_string()
                }
                "STAT" => "+OK 0 0\r\n".to_string(),
                "QUIT" => {
                    rd.get_mut().write_all(b"+OK bye\r\n").await?;
                    return Ok(());
                }
                _ => {
                    events.push(format!("tls: {l}"));
                    "-ERR what\r\n".to_string()
                }
            };
            rd.get_mut().write_all(reply.as_bytes()).await?;
        }
    }

    fn port(w: &MailWorld) -> u16 {
        w.pop3_port()
    }

    /// Not accepted on the strength of the injected `+OK`s.
    async fn refused(port: u16) -> LineConn {
        let mut c = connect(port).await;
        expect(&mut c, &format!("USER {MALLORY}"), "+OK Send PASS\r\n").await;
        let r = text(&pop3_cmd(&mut c, "PASS wrong", false).await);
        assert!(r.starts_with("-ERR [AUTH] ") && r.contains("bad credentials"), "{r}");
        c
    }

    async fn served(port: u16) -> LineConn {
        let mut c = login(port, MALLORY, MALLORY_PW).await;
        expect(&mut c, "STAT", "+OK 0 0\r\n").await;
        expect(&mut c, "QUIT", "+OK bye\r\n").await;
        c
    }

    fn session(ok: bool) -> Vec<String> {
        vec![
            "plain: STLS".to_string(),
            format!("tls: USER {MALLORY}"),
            format!("tls: PASS ok={ok}"),
        ]
    }

    fn check_rest(rest: &[String]) {
        assert!(rest.is_empty(), "{rest:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stls_response_injection_is_discarded() {
    starttls_injection::injected_replies_are_discarded::<Pop3>().await;
}

/// Written by the MDA after each message.
const MDA_END: &str = "@@MDA-END@@";

#[test]
fn fetchmail_collects_through_the_proxy() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    let msgs = mailbox();
    for m in &msgs {
        w.env.dovecot.deliver(ALICE, m);
    }
    w.start();
    let home = w.dir.path().join("fetchmail-home");
    std::fs::create_dir(&home).unwrap();
    let out = w.dir.path().join("delivered");
    let rc = home.join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no syslog\npoll 127.0.0.1 service {} protocol POP3\n  user \"{ALICE}\" password \"{ALICE_PW}\" sslproto ''\n  keep\n  mda \"/bin/sh -c 'cat >> {}; printf {MDA_END} >> {}'\"\n",
            w.pop3_port(),
            out.display(),
            out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let res = std::process::Command::new("fetchmail")
        .args(["-f", rc.to_str().unwrap(), "-v", "--invisible", "--nodetach"])
        // Its own lock: as root fetchmail would otherwise share /var/run/fetchmail.pid
        // with every parallel run.
        .arg("--pidfile")
        .arg(home.join("fetchmail.pid"))
        .env("HOME", &home)
        .env("FETCHMAILHOME", &home)
        .output()
        .expect("fetchmail (scripts/install-deps installs it)");
    let stderr = String::from_utf8_lossy(&res.stderr);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "fetchmail failed ({}):\n{stdout}\n{stderr}\n{}",
        res.status,
        w.logs()
    );
    let got = std::fs::read(&out).unwrap_or_default();
    let parts: Vec<&[u8]> = split_on(&got, MDA_END.as_bytes())
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect();
    assert_eq!(parts.len(), 3, "{}", text(&got));
    for (p, m) in parts.iter().zip(&msgs) {
        // fetchmail hands the MDA LF line ends; compare with CRLF folded.
        let want = text(m).replace("\r\n", "\n");
        let got = text(p).replace("\r\n", "\n");
        assert_eq!(got, want);
    }
    // `keep`: nothing was deleted.
    assert_eq!(w.env.dovecot.message_count(ALICE), 3);
}

fn split_on<'a>(hay: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = hay;
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        out.push(&rest[..i]);
        rest = &rest[i + sep.len()..];
    }
    out.push(rest);
    out
}

//! SMTP submission end to end: real `mailproxy` binary, real Dovecot
//! submission upstream (relaying to the SMTP sink), fake OAuth provider.
//! Clients are raw protocol bytes and msmtp.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::support::hostile_util::closed_port;
use crate::support::starttls_injection::{self, Events, Tls, MALLORY, MALLORY_PW};
use crate::support::world_mail::*;
use crate::support::{client, sample_message, LineConn, ReceivedMessage};

const SINK_WAIT: Duration = Duration::from_secs(15);

/// The keyword (first word, before a space or `=`) of an EHLO line's text.
fn keyword(l: &str) -> String {
    l.split([' ', '=']).next().unwrap_or_default().to_ascii_uppercase()
}

/// EHLO reply lines without the code and the greeting line.
fn ehlo_keywords(reply: &[String]) -> Vec<String> {
    reply.iter().skip(1).map(|l| l[4..].to_string()).collect()
}

fn assert_received(m: &ReceivedMessage, from: &str, to: &[&str], data: &[u8]) {
    assert_eq!(m.mail_from, from);
    assert_eq!(
        m.rcpt_to,
        to.iter().map(std::string::ToString::to_string).collect::<Vec<_>>()
    );
    let got = m.data_without_trace();
    assert!(
        got == data,
        "message differs ({} vs {} bytes); got starts {:?}",
        got.len(),
        data.len(),
        text(&got[..got.len().min(400)])
    );
}

fn eight_bit_message(id: &str) -> Vec<u8> {
    format!(
        "From: x@example.org\r\nTo: {ALICE}\r\nSubject: 8-bit\r\nMessage-ID: <{id}@test.example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße, ✓ 日本語\r\n.dotted ä\r\n..two dots\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehlo_before_auth_and_transactions_refused() {
    let mut w = MailWorld::new();
    w.start();
    let port = w.smtp_port();
    let before = w.upstream_log_lines("submission-login");

    let mut c = smtp_connect(port).await;
    // AUTH needs EHLO first.
    smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "503",
    )
    .await;
    let r = smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    assert_eq!(r[0], "250-mailproxy greets client.example.org");
    let kws = ehlo_keywords(&r);
    for k in [
        "AUTH PLAIN LOGIN",
        "AUTH=PLAIN LOGIN",
        "PIPELINING",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(kws.iter().any(|l| l == k), "{k} missing from {r:?}");
    }
    assert!(kws.iter().any(|l| l == "SIZE" || l.starts_with("SIZE ")), "{r:?}");
    assert!(
        !kws.iter().any(|l| keyword(l) == "STARTTLS"),
        "STARTTLS on a plain listener: {r:?}"
    );

    let r = smtp_cmd(&mut c, "MAIL FROM:<a@example.org>", "530").await;
    assert!(r[0].starts_with("530 5.7.0 "), "{r:?}");
    let r = smtp_cmd(&mut c, "RCPT TO:<b@example.org>", "530").await;
    assert!(r[0].starts_with("530 5.7.0 "), "{r:?}");
    smtp_cmd(&mut c, "DATA", "530").await;
    // STARTTLS is not offered here.
    smtp_cmd(&mut c, "STARTTLS", "502").await;
    smtp_cmd(&mut c, "NOOP", "250").await;
    smtp_cmd(&mut c, "QUIT", "221").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        w.upstream_log_lines("submission-login"),
        before,
        "nothing went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_forms_and_wrong_password_never_reaches_upstream() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let port = w.smtp_port();

    // AUTH PLAIN with an initial response.
    let mut c = smtp_connect(port).await;
    smtp_login(&mut c, ALICE, ALICE_PW).await;

    // AUTH PLAIN via 334.
    let mut c2 = smtp_connect(port).await;
    smtp_cmd(&mut c2, "EHLO client.example.org", "250").await;
    let r = smtp_cmd(&mut c2, "AUTH PLAIN", "334").await;
    assert_eq!(r, vec!["334 "]);
    let r = smtp_cmd(&mut c2, &client::plain_b64(ALICE, ALICE_PW), "235").await;
    assert_eq!(r, vec!["235 2.7.0 Authentication successful"]);

    // AUTH LOGIN in two steps.
    let mut c3 = smtp_connect(port).await;
    smtp_cmd(&mut c3, "EHLO client.example.org", "250").await;
    let r = smtp_cmd(&mut c3, "AUTH LOGIN", "334").await;
    assert_eq!(r, vec!["334 VXNlcm5hbWU6"]);
    let r = smtp_cmd(&mut c3, &client::b64(ALICE.as_bytes()), "334").await;
    assert_eq!(r, vec!["334 UGFzc3dvcmQ6"]);
    smtp_cmd(&mut c3, &client::b64(ALICE_PW.as_bytes()), "235").await;

    // AUTH LOGIN with the user name as initial response.
    let mut c4 = smtp_connect(port).await;
    smtp_cmd(&mut c4, "EHLO client.example.org", "250").await;
    let r = smtp_cmd(&mut c4, &format!("AUTH LOGIN {}", client::b64(ALICE.as_bytes())), "334").await;
    assert_eq!(r, vec!["334 UGFzc3dvcmQ6"]);
    smtp_cmd(&mut c4, &client::b64(ALICE_PW.as_bytes()), "235").await;
    // A second AUTH on an authenticated session is refused locally.
    smtp_cmd(
        &mut c4,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "503",
    )
    .await;

    // Each of the four sessions really is logged in upstream: all can send.
    let mut n = 0;
    for (i, conn) in [&mut c, &mut c2, &mut c3, &mut c4].into_iter().enumerate() {
        let msg = sample_message("a@example.org", ALICE, "auth forms", &format!("af{i}"));
        smtp_send(conn, "a@example.org", &[ALICE], &msg).await;
        n += 1;
    }
    w.env.sink.wait_for_async(n, SINK_WAIT).await;

    // A wrong local password: 535, no upstream connection, no token request.
    let before_logins = w.upstream_log_lines("submission-login");
    let before_tokens = w.env.provider.total_token_requests();
    let mut c = smtp_connect(port).await;
    smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    let r = smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, "wrong")),
        "535",
    )
    .await;
    assert_eq!(r, vec!["535 5.7.8 Authentication failed"]);
    smtp_cmd(&mut c, "AUTH LOGIN", "334").await;
    smtp_cmd(&mut c, &client::b64(ALICE.as_bytes()), "334").await;
    smtp_cmd(&mut c, &client::b64(b"wrong again"), "535").await;
    // Still not authenticated.
    smtp_cmd(&mut c, "MAIL FROM:<a@example.org>", "530").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        w.upstream_log_lines("submission-login"),
        before_logins,
        "no upstream connection for a wrong local password"
    );
    assert_eq!(w.env.provider.total_token_requests(), before_tokens);
    // The right password then works on the same connection.
    smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "235",
    )
    .await;
    assert!(!w.logs().contains(ALICE_PW), "password in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_8bit_and_5mb_messages_arrive_byte_for_byte() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let mut c = smtp_connect(w.smtp_port()).await;
    smtp_login(&mut c, ALICE, ALICE_PW).await;

    // Plain message with dot-stuffing, two recipients.
    let plain = sample_message("sender@example.org", ALICE, "plain", "pl1");
    assert!(plain.windows(3).any(|x| x == b"\n.l"), "has a line starting with a dot");
    smtp_send(&mut c, "sender@example.org", &[ALICE, CAROL], &plain).await;

    // 8-bit body declared with BODY=8BITMIME.
    let eight = eight_bit_message("8b1");
    smtp_cmd(&mut c, "MAIL FROM:<sender@example.org> BODY=8BITMIME", "250").await;
    smtp_cmd(&mut c, &format!("RCPT TO:<{ALICE}>"), "250").await;
    smtp_cmd(&mut c, "DATA", "354").await;
    c.write_raw(&smtp_data(&eight)).await.unwrap();
    expect_smtp(&mut c, "250").await;

    // 5 MB, announced with SIZE.
    let big = big_message("sender@example.org", ALICE, 5 * 1024 * 1024);
    smtp_cmd(
        &mut c,
        &format!("MAIL FROM:<big@example.org> SIZE={}", big.len()),
        "250",
    )
    .await;
    smtp_cmd(&mut c, &format!("RCPT TO:<{ALICE}>"), "250").await;
    smtp_cmd(&mut c, "DATA", "354").await;
    c.write_raw(&smtp_data(&big)).await.unwrap();
    expect_smtp(&mut c, "250").await;
    smtp_cmd(&mut c, "QUIT", "221").await;

    let msgs = w.env.sink.wait_for_async(3, SINK_WAIT).await;
    assert_received(&msgs[0], "sender@example.org", &[ALICE, CAROL], &plain);
    assert_received(&msgs[1], "sender@example.org", &[ALICE], &eight);
    assert_received(&msgs[2], "big@example.org", &[ALICE], &big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_transaction_and_pipelined_login() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let port = w.smtp_port();

    // After 235: MAIL + RCPT + DATA in one write.
    let mut c = smtp_connect(port).await;
    smtp_login(&mut c, ALICE, ALICE_PW).await;
    c.write_raw(format!("MAIL FROM:<p1@example.org>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n").as_bytes())
        .await
        .unwrap();
    expect_smtp(&mut c, "250").await;
    expect_smtp(&mut c, "250").await;
    expect_smtp(&mut c, "354").await;
    let m1 = sample_message("p1@example.org", ALICE, "pipelined", "pp1");
    c.write_raw(&smtp_data(&m1)).await.unwrap();
    expect_smtp(&mut c, "250").await;

    // EHLO + AUTH PLAIN (initial response) in one write.
    let mut c = smtp_connect(port).await;
    c.write_raw(
        format!(
            "EHLO pipe.example.org\r\nAUTH PLAIN {}\r\n",
            client::plain_b64(ALICE, ALICE_PW)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    expect_smtp(&mut c, "250").await;
    expect_smtp(&mut c, "235").await;
    let m2 = sample_message("p2@example.org", ALICE, "pipelined login", "pp2");
    smtp_send(&mut c, "p2@example.org", &[ALICE], &m2).await;

    // Everything in one write: EHLO, AUTH PLAIN-IR (legal to pipeline after,
    // RFC 4954 §4), MAIL, RCPT, DATA, the message and QUIT.
    let m3 = sample_message("p3@example.org", ALICE, "all in one", "pp3");
    let mut all = format!(
        "EHLO pipe.example.org\r\nAUTH PLAIN {}\r\nMAIL FROM:<p3@example.org>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n",
        client::plain_b64(ALICE, ALICE_PW)
    )
    .into_bytes();
    let mut c = smtp_connect(port).await;
    all.extend_from_slice(&smtp_data(&m3));
    all.extend_from_slice(b"QUIT\r\n");
    c.write_raw(&all).await.unwrap();
    for code in ["250", "235", "250", "250", "354", "250", "221"] {
        expect_smtp(&mut c, code).await;
    }

    // The opposite: the first transaction command dribbles in one byte per write.
    let mut c = smtp_connect(port).await;
    smtp_login(&mut c, ALICE, ALICE_PW).await;
    for b in b"MAIL FROM:<p4@example.org>\r\n" {
        c.write_raw(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    expect_smtp(&mut c, "250").await;
    smtp_cmd(&mut c, &format!("RCPT TO:<{ALICE}>"), "250").await;
    smtp_cmd(&mut c, "DATA", "354").await;
    let m4 = sample_message("p4@example.org", ALICE, "dribbled", "pp4");
    c.write_raw(&smtp_data(&m4)).await.unwrap();
    expect_smtp(&mut c, "250").await;

    let msgs = w.env.sink.wait_for_async(4, SINK_WAIT).await;
    assert_received(&msgs[0], "p1@example.org", &[ALICE], &m1);
    assert_received(&msgs[1], "p2@example.org", &[ALICE], &m2);
    assert_received(&msgs[2], "p3@example.org", &[ALICE], &m3);
    assert_received(&msgs[3], "p4@example.org", &[ALICE], &m4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_auth_ehlo_shows_upstream_extensions_and_bdat_works() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();

    // What Dovecot's submissions port says directly.
    let d = &w.env.dovecot;
    let mut direct = LineConn::tls(d.submissions_port, d.tls_client_config(), "localhost")
        .await
        .unwrap();
    expect_smtp(&mut direct, "220").await;
    let direct_kws = ehlo_keywords(&smtp_cmd(&mut direct, "EHLO client.example.org", "250").await);
    assert!(direct_kws.iter().any(|k| k == "CHUNKING"), "{direct_kws:?}");
    drop(direct);

    let mut c = smtp_connect(w.smtp_port()).await;
    smtp_login(&mut c, ALICE, ALICE_PW).await;
    let r = smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    let kws = ehlo_keywords(&r);
    for k in ["CHUNKING", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"] {
        assert!(kws.iter().any(|l| l == k), "{k} missing after login: {r:?}");
    }
    assert!(kws.iter().any(|l| keyword(l) == "SIZE"), "{r:?}");
    assert!(
        !kws.iter().any(|l| keyword(l) == "AUTH" || keyword(l) == "STARTTLS"),
        "no AUTH/STARTTLS after login: {r:?}"
    );
    // Everything shown is something the upstream offers (and nothing made up).
    let upstream: Vec<String> = direct_kws.iter().map(|k| keyword(k)).collect();
    for k in &kws {
        assert!(
            upstream.contains(&keyword(k)),
            "{k} is not an upstream extension: {r:?}"
        );
    }
    // Upstream extensions other than AUTH/STARTTLS/X* are all carried.
    for k in &upstream {
        if k != "AUTH" && k != "STARTTLS" && !k.starts_with('X') {
            assert!(kws.iter().any(|l| keyword(l) == *k), "{k} lost: {r:?}");
        }
    }

    // BDAT (CHUNKING): two chunks, no dot-stuffing, bytes as sent.
    let msg = sample_message("bdat@example.org", ALICE, "chunks", "bd1");
    let (a, b) = msg.split_at(msg.len() / 2);
    smtp_cmd(&mut c, "MAIL FROM:<bdat@example.org>", "250").await;
    smtp_cmd(&mut c, &format!("RCPT TO:<{ALICE}>"), "250").await;
    c.write_raw(format!("BDAT {}\r\n", a.len()).as_bytes()).await.unwrap();
    c.write_raw(a).await.unwrap();
    expect_smtp(&mut c, "250").await;
    let mut last = format!("BDAT {} LAST\r\n", b.len()).into_bytes();
    last.extend_from_slice(b);
    c.write_raw(&last).await.unwrap();
    expect_smtp(&mut c, "250").await;
    smtp_cmd(&mut c, "QUIT", "221").await;
    let msgs = w.env.sink.wait_for_async(1, SINK_WAIT).await;
    assert_received(&msgs[0], "bdat@example.org", &[ALICE], &msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_implicit_tls_starttls_passthrough_and_fallback() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.authorise(CAROL, CAROL_PW);
    w.start();
    let port = w.smtp_port();

    let cases = [
        (ALICE, ALICE_PW, "smtps"),
        (CAROL, CAROL_PW, "starttls"),
        (BOB, BOB_PW, "passthrough"),
        (FRANK, FRANK_PW, "fallback"),
    ];
    let mut sent = Vec::new();
    for (user, pw, what) in cases {
        let mut c = smtp_connect(port).await;
        smtp_login(&mut c, user, pw).await;
        let r = smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
        assert!(
            !r.iter()
                .any(|l| keyword(&l[4..]) == "STARTTLS" || keyword(&l[4..]) == "AUTH"),
            "{what}: {r:?}"
        );
        assert!(r.iter().any(|l| &l[4..] == "CHUNKING"), "{what}: {r:?}");
        let msg = sample_message(user, ALICE, what, &format!("tls-{what}"));
        smtp_send(&mut c, user, &[ALICE], &msg).await;
        smtp_cmd(&mut c, "QUIT", "221").await;
        sent.push((user, msg));
    }
    let msgs = w.env.sink.wait_for_async(sent.len(), SINK_WAIT).await;
    for (m, (user, msg)) in msgs.iter().zip(&sent) {
        assert_received(m, user, &[ALICE], msg);
    }
    for u in [ALICE, CAROL, BOB, FRANK] {
        assert!(
            w.wait_dovecot_log(&format!("Login: user=<{u}>")),
            "{}",
            w.env.dovecot.log()
        );
    }
    let log = w.env.dovecot.log();
    let login_line = |u: &str| {
        log.lines()
            .find(|l| l.contains("submission-login: Info: Login:") && l.contains(&format!("user=<{u}>")))
            .unwrap_or_else(|| panic!("no Dovecot login for {u}:\n{log}"))
            .to_string()
    };
    let l = login_line(ALICE);
    assert!(l.contains("method=XOAUTH2") && l.contains("TLS"), "{l}");
    let l = login_line(CAROL);
    assert!(l.contains("method=XOAUTH2") && l.contains("TLS"), "{l}");
    assert!(login_line(BOB).contains("method=PLAIN"));
    assert!(login_line(FRANK).contains("method=PLAIN"));

    // Passthrough with a wrong password: Dovecot's refusal as 535.
    let mut c = smtp_connect(port).await;
    smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    let r = smtp_cmd(&mut c, &format!("AUTH PLAIN {}", client::plain_b64(BOB, "nope")), "535").await;
    assert!(r[0].starts_with("535 5.7.8 "), "{r:?}");
    // An authorisation identity other than the user is refused locally.
    let ir = client::b64(format!("{ALICE}\0{BOB}\0{BOB_PW}").as_bytes());
    let r = smtp_cmd(&mut c, &format!("AUTH PLAIN {ir}"), "535").await;
    assert_eq!(
        r,
        vec!["535 5.7.8 Authorization identity must be empty or equal to the user name"]
    );
    // ... but one equal to the user name is fine.
    let ir = client::b64(format!("{BOB}\0{BOB}\0{BOB_PW}").as_bytes());
    smtp_cmd(&mut c, &format!("AUTH PLAIN {ir}"), "235").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_temporary_failure() {
    const ERIN: &str = "erin@example.org";
    let (closed, _closed) = closed_port();
    let mut w = MailWorld::with(LocalTls::None, LocalTls::None, |_, _| {
        format!("[accounts.\"{ERIN}\"]\nprovider = \"password\"\nsmtp = \"smtp://127.0.0.1:{closed}\"\n\n")
    });
    w.start();
    let mut c = smtp_connect(w.smtp_port()).await;
    smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    let r = smtp_cmd(&mut c, &format!("AUTH PLAIN {}", client::plain_b64(ERIN, "pw")), "454").await;
    assert!(r[0].starts_with("454 4.7.0 "), "{r:?}");
    assert!(r[0].contains(&closed.to_string()), "names the server: {r:?}");
    // The session goes on.
    smtp_cmd(&mut c, "NOOP", "250").await;
    smtp_cmd(&mut c, "QUIT", "221").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refreshed_and_upstream_refusal_is_a_535_sentence() {
    const DAVE: &str = "dave@example.org";
    const DAVE_PW: &str = "dave local pw";
    let mut w = MailWorld::with(LocalTls::None, LocalTls::None, |env, _| {
        let d = &env.dovecot;
        oauth_mail_account(
            DAVE,
            &env.provider,
            &d.ca_pem_path(),
            Some(&format!("smtps://localhost:{}", d.submissions_port)),
            None,
            "username = \"someone-else@example.org\"\n",
        )
    });
    w.authorise(ALICE, ALICE_PW);
    // The identity check refuses a grant that is not the account's, so dave
    // is authorised as himself and only then sent upstream as someone else.
    let cfg = std::fs::read_to_string(w.dir.config_path()).unwrap();
    w.dir
        .write_config(&cfg.replace("username = \"someone-else@example.org\"\n", ""));
    w.authorise(DAVE, DAVE_PW);
    w.dir.write_config(&cfg);
    w.start();
    let port = w.smtp_port();
    let p = &w.env.provider;

    let r0 = p.refreshes();
    let mut c = smtp_connect(port).await;
    smtp_login(&mut c, ALICE, ALICE_PW).await;
    assert_eq!(p.refreshes(), r0 + 1, "cold start refreshes once");
    drop(c);

    // The server stops accepting the cached token: the proxy refreshes and retries.
    p.expire_all_access_tokens();
    let mut c = smtp_connect(port).await;
    smtp_login(&mut c, ALICE, ALICE_PW).await;
    assert_eq!(p.refreshes(), r0 + 2, "refreshed after the upstream refused the token");
    let msg = sample_message("after@example.org", ALICE, "after refresh", "rf1");
    smtp_send(&mut c, "after@example.org", &[ALICE], &msg).await;
    let msgs = w.env.sink.wait_for_async(1, SINK_WAIT).await;
    assert_received(&msgs[0], "after@example.org", &[ALICE], &msg);
    assert!(w.proxy().wait_log("refreshing and retrying once"), "{}", w.logs());

    // The token's user is not the name sent upstream: Dovecot refuses; the
    // client gets a 535 with a sentence, promptly, and the session goes on.
    let mut c = smtp_connect(port).await;
    smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    let t0 = Instant::now();
    let r = smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(DAVE, DAVE_PW)),
        "535",
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].starts_with("535 5.7.8 "), "{r:?}");
    assert!(r[0].contains("refused the login"), "{r:?}");
    assert!(
        r[0].len() > "535 5.7.8 ".len() + 30,
        "a sentence, not just a code: {r:?}"
    );
    smtp_cmd(&mut c, "MAIL FROM:<x@example.org>", "530").await;
    smtp_cmd(&mut c, "QUIT", "221").await;
    assert!(
        w.wait_dovecot_log("user=<someone-else@example.org>"),
        "the upstream saw the configured username:\n{}",
        w.env.dovecot.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_starttls_listener_discards_pipelined_plaintext() {
    let mut w = MailWorld::with(LocalTls::StartTls, LocalTls::None, |_, _| String::new());
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let port = w.smtp_port();
    let tls = w.local_tls_config();

    let mut c = smtp_connect(port).await;
    let r = smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    assert!(ehlo_keywords(&r).iter().any(|k| k == "STARTTLS"), "{r:?}");
    let r = smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "530",
    )
    .await;
    assert!(r[0].starts_with("530 5.7.0 "), "{r:?}");
    smtp_cmd(&mut c, "STARTTLS", "220").await;
    let mut c = c.starttls(tls.clone(), "localhost").await.unwrap();
    let r = smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    let kws = ehlo_keywords(&r);
    assert!(!kws.iter().any(|k| k == "STARTTLS"), "{r:?}");
    assert!(kws.iter().any(|k| k == "AUTH PLAIN LOGIN"), "{r:?}");
    smtp_cmd(&mut c, "STARTTLS", "503").await;
    smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "235",
    )
    .await;
    let m1 = sample_message("tls@example.org", ALICE, "over local tls", "lt1");
    smtp_send(&mut c, "tls@example.org", &[ALICE], &m1).await;
    smtp_cmd(&mut c, "QUIT", "221").await;

    // Injection: a MAIL pipelined behind STARTTLS in the same plaintext write.
    let mut c = smtp_connect(port).await;
    smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    c.write_raw(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n").await.unwrap();
    let r = expect_smtp(&mut c, "220").await;
    assert_eq!(r, vec!["220 2.0.0 Ready to start TLS"]);
    // `starttls` asserts nothing followed the 220 in plaintext.
    let mut c = c.starttls(tls, "localhost").await.unwrap();
    c.send("EHLO client.example.org").await.unwrap();
    let r = c.read_smtp_reply().await.unwrap();
    assert!(
        r[0].starts_with("250-mailproxy greets client.example.org"),
        "first reply after TLS: {r:?}"
    );
    // No transaction was started by the injected MAIL: RCPT says MAIL first
    // (before auth: authentication required), and a new MAIL is not "nested".
    smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "235",
    )
    .await;
    let m2 = sample_message("good@example.org", ALICE, "after injection", "lt2");
    smtp_send(&mut c, "good@example.org", &[ALICE], &m2).await;
    smtp_cmd(&mut c, "QUIT", "221").await;

    let msgs = w.env.sink.wait_for_async(2, SINK_WAIT).await;
    assert_received(&msgs[0], "tls@example.org", &[ALICE], &m1);
    assert_received(&msgs[1], "good@example.org", &[ALICE], &m2);
    assert!(msgs.iter().all(|m| m.mail_from != "evil@x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_implicit_tls_listener() {
    let mut w = MailWorld::with(LocalTls::Implicit, LocalTls::None, |_, _| String::new());
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let mut c = LineConn::tls(w.smtp_port(), w.local_tls_config(), "localhost")
        .await
        .unwrap();
    let g = expect_smtp(&mut c, "220").await;
    assert_eq!(g, vec!["220 mailproxy ESMTP mailproxy ready"]);
    let r = smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    assert!(!ehlo_keywords(&r).iter().any(|k| k == "STARTTLS"), "{r:?}");
    // Already TLS: STARTTLS is not offered (502).
    smtp_cmd(&mut c, "STARTTLS", "502").await;
    smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "235",
    )
    .await;
    let msg = sample_message("itls@example.org", ALICE, "implicit", "it1");
    smtp_send(&mut c, "itls@example.org", &[ALICE], &msg).await;
    smtp_cmd(&mut c, "QUIT", "221").await;
    let msgs = w.env.sink.wait_for_async(1, SINK_WAIT).await;
    assert_received(&msgs[0], "itls@example.org", &[ALICE], &msg);

    // A plaintext client on the implicit-TLS port gets no SMTP greeting.
    let mut c = LineConn::plain(w.smtp_port()).await.unwrap();
    c.send("EHLO x").await.unwrap();
    let l = c.read_line_raw().await.unwrap_or_default();
    assert!(!l.starts_with(b"220") && !l.starts_with(b"250"), "{}", text(&l));
}

/// RFC 4954 §4: AUTH responses up to 12,288 octets of base64, inline or
/// after `334`, get an authentication answer (the 12,041-octet line of a
/// real client, a 12,288-octet response: a wrong password here, `535`),
/// and the right password still gets `235`. The AUTH line may hold
/// `max_line` (8,192) plus 12,288 octets; one more is `500 5.5.6`, and a
/// 10 MB AUTH line is refused without being buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_lines_with_rfc_4954_length_responses_are_answered() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let port = w.smtp_port();
    // base64 of "\0alice@example.org\0" and a password, `raw` octets in all.
    let plain = |raw: usize| client::plain_b64(ALICE, &"p".repeat(raw - ALICE.len() - 2));

    let mut c = smtp_connect(port).await;
    smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    let line = format!("AUTH PLAIN {}", plain(9021));
    assert_eq!(line.len() + 2, 12_041);
    let r = smtp_cmd(&mut c, &line, "535").await;
    assert!(r[0].starts_with("535 5.7.8 "), "{r:?}");
    let long = plain(9216);
    assert_eq!(long.len(), 12_288);
    smtp_cmd(&mut c, &format!("AUTH PLAIN {long}"), "535").await;
    smtp_cmd(&mut c, "AUTH PLAIN", "334").await;
    smtp_cmd(&mut c, &long, "535").await;
    // At the limit the line is read (and its base64 refused).
    let at_limit = format!("AUTH PLAIN {}", "A".repeat(8192 + 12_288 - 11));
    let r = smtp_cmd(&mut c, &at_limit, "501").await;
    assert!(r[0].starts_with("501 5.5.2 "), "{r:?}");
    smtp_cmd(
        &mut c,
        &format!("AUTH PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        "235",
    )
    .await;
    smtp_cmd(&mut c, "QUIT", "221").await;

    // One octet more, on the line or in a response: 500 5.5.6, then 421.
    for (before, line) in [(None, format!("{at_limit}A")), (Some("AUTH PLAIN"), "A".repeat(12_289))] {
        let mut c = smtp_connect(port).await;
        smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
        if let Some(b) = before {
            smtp_cmd(&mut c, b, "334").await;
        }
        let r = smtp_cmd(&mut c, &line, "500").await;
        assert_eq!(r, vec!["500 5.5.6 Line too long"]);
        let r = expect_smtp(&mut c, "421").await;
        assert!(r[0].contains("Line too long, closing connection"), "{r:?}");
        assert!(c.read_line_raw().await.unwrap().is_empty(), "closed");
    }

    // 10 MB after "AUTH PLAIN ": refused at the limit, memory stays put.
    let rss0 = w.proxy().rss_kib();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut rd, mut wr) = tcp.split();
    let mut huge = b"EHLO x\r\nAUTH PLAIN ".to_vec();
    huge.resize(10 << 20, b'A');
    let writer = async {
        for chunk in huge.chunks(64 * 1024) {
            if wr.write_all(chunk).await.is_err() {
                break;
            }
        }
    };
    let reader = async {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut got),
        )
        .await;
        got
    };
    let (_, got) = tokio::join!(writer, reader);
    let got = text(&got);
    assert!(got.contains("500 5.5.6 Line too long\r\n421 "), "{got}");
    let grown = w.proxy().rss_kib().saturating_sub(rss0);
    assert!(grown < 3 * 1024, "RSS grew by {grown} KiB");
}

/// The value of `series` once it reaches `want` (or after 5 s).
async fn wait_metric(addr: &str, series: &str, want: f64) -> Option<f64> {
    let t0 = Instant::now();
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

/// The log lines that contain `needle`, once there are `n` (or after 10 s).
fn log_lines(w: &MailWorld, needle: &str, n: usize) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let lines: Vec<String> = w
            .logs()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect();
        if lines.len() >= n || t0.elapsed() > Duration::from_secs(10) {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Clients that connect the wrong way are told apart from their first
/// bytes, named in one warning each (listener, client, what to change)
/// and counted: a TLS client (its real ClientHello) on the STARTTLS
/// listener gets the greeting it cannot read and the close; on an
/// implicit-TLS listener, a plaintext client that speaks first and one that
/// waits for a greeting get an SMTP line saying so. TLS clients are not
/// held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconnected_clients_are_named_in_the_log_and_counted() {
    let mut w = MailWorld::with(LocalTls::StartTls, LocalTls::None, |_, _| String::new());
    let config = std::fs::read_to_string(w.dir.config_path()).unwrap();
    w.dir
        .write_config(&config.replace("[server]\n", "[server]\nmetrics_listen = \"127.0.0.1:0\"\n"));
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let port = w.smtp_port();
    let addr = w.proxy().metrics_addr();
    let tls_on_plaintext = "mailproxy_misconnects_total{listener=\"smtp\",kind=\"tls_on_plaintext\"}";
    let plaintext_on_tls = "mailproxy_misconnects_total{listener=\"smtp\",kind=\"plaintext_on_tls\"}";
    assert_eq!(wait_metric(&addr, tls_on_plaintext, 0.0).await, Some(0.0));

    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(&client::tls_client_hello(w.local_tls_config()))
        .await
        .unwrap();
    let (got, closed) = client::read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "{}", text(&got));
    assert_eq!(text(&got), "220 mailproxy ESMTP mailproxy ready\r\n");
    let lines = log_lines(&w, "a client sent a TLS handshake to a STARTTLS listener", 1);
    assert_eq!(lines.len(), 1, "{}", w.logs());
    let l = &lines[0];
    assert!(l.contains(" WARN ") && l.contains("peer=127.0.0.1:"), "{l}");
    assert!(l.contains(&format!("listener=[smtp] 127.0.0.1:{port}")), "{l}");
    assert!(l.contains(&format!("set it to STARTTLS for 127.0.0.1:{port}")), "{l}");
    assert!(l.contains("tls = \"implicit\" in [smtp]"), "{l}");
    assert_eq!(wait_metric(&addr, tls_on_plaintext, 1.0).await, Some(1.0));
    assert_eq!(wait_metric(&addr, plaintext_on_tls, 0.0).await, Some(0.0));
    // STARTTLS clients are served as before.
    let mut c = smtp_connect(port).await;
    smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    smtp_cmd(&mut c, "STARTTLS", "220").await;
    let mut c = c.starttls(w.local_tls_config(), "localhost").await.unwrap();
    smtp_login(&mut c, ALICE, ALICE_PW).await;

    // The same listener with implicit TLS.
    if let Some(mut p) = w.proxy.take() {
        p.stop();
    }
    let config = std::fs::read_to_string(w.dir.config_path()).unwrap();
    let implicit = config.replacen("tls = \"starttls\"", "tls = \"implicit\"", 1);
    assert_ne!(implicit, config);
    w.dir.write_config(&implicit);
    w.start();
    let port = w.smtp_port();
    let addr = w.proxy().metrics_addr();
    let told =
        "421 4.7.0 this port speaks TLS from the first byte (implicit TLS, \"SSL/TLS\"): set the client to use it\r\n";
    // A client that speaks first.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(b"EHLO client.example.org\r\n").await.unwrap();
    let (got, closed) = client::read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "{}", text(&got));
    assert_eq!(text(&got), told);
    // A client that waits for the greeting.
    let t0 = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (got, closed) = client::read_to_close(&mut tcp, Duration::from_secs(15)).await;
    assert!(closed, "{}", text(&got));
    assert_eq!(text(&got), told);
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(10)).contains(&t0.elapsed()),
        "{:?}",
        t0.elapsed()
    );
    let lines = log_lines(&w, "a client spoke plaintext to an implicit-TLS listener", 2);
    assert_eq!(lines.len(), 2, "{}", w.logs());
    for l in &lines {
        assert!(l.contains(" WARN ") && l.contains("peer=127.0.0.1:"), "{l}");
        assert!(l.contains(&format!("listener=[smtp] 127.0.0.1:{port}")), "{l}");
        assert!(
            l.contains(&format!("set it to SSL/TLS (implicit TLS) for 127.0.0.1:{port}")),
            "{l}"
        );
        assert!(l.contains("tls = \"starttls\" in [smtp]"), "{l}");
    }
    assert_eq!(wait_metric(&addr, plaintext_on_tls, 2.0).await, Some(2.0));
    assert_eq!(wait_metric(&addr, tls_on_plaintext, 0.0).await, Some(0.0));
    // TLS clients get their greeting at once.
    let t0 = Instant::now();
    let mut c = LineConn::tls(port, w.local_tls_config(), "localhost").await.unwrap();
    expect_smtp(&mut c, "220").await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    smtp_login(&mut c, ALICE, ALICE_PW).await;
    smtp_cmd(&mut c, "QUIT", "221").await;
}

/// SMTP's side of the STARTTLS response-injection test.
struct Smtp;

impl starttls_injection::Protocol for Smtp {
    const KEY: &'static str = "smtp";
    const GREETING: &'static [u8] = b"220 fake.localhost ESMTP\r\n";
    const UPGRADE: &'static str = "STARTTLS";
    const UPGRADE_AND_INJECTED: &'static [u8] = b"220 go ahead\r\n250-FAKE\r\n235 2.7.0 injected\r\n";

    fn plain_reply(line: &str) -> &'static [u8] {
        if line.to_ascii_uppercase().starts_with("EHLO") {
            b"250-fake.localhost\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN XOAUTH2\r\n"
        } else {
            b"530 5.7.0 STARTTLS first\r\n"
        }
    }

    /// EHLO advertises AUTH; `AUTH PLAIN` succeeds only for mallory.
    async fn serve_tls(mut rd: Tls, events: Events) -> std::io::Result<()> {
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let l = line.trim_end().to_string();
            let upper = l.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") {
                events.push("tls: EHLO".into());
                b"250-fake.localhost\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN XOAUTH2\r\n"
            } else if let Some(ir) = upper.strip_prefix("AUTH PLAIN ").map(|_| &l[11..]) {
                let raw = client::unb64(ir);
                let ok = raw == format!("\0{MALLORY}\0{MALLORY_PW}").as_bytes();
                events.push(format!("tls: AUTH PLAIN ok={ok}"));
                if ok {
                    b"235 2.7.0 welcome\r\n"
                } else {
                    b"535 5.7.8 bad credentials\r\n"
                }
            } else if upper.starts_with("MAIL") || upper.starts_with("RCPT") {
                events.push(format!("tls: {l}"));
                b"250 2.0.0 ok\r\n"
            } else if upper == "DATA" {
                rd.get_mut().write_all(b"354 go\r\n").await?;
                let mut data = Vec::new();
                loop {
                    let mut dl = Vec::new();
                    if rd.read_until(b'\n', &mut dl).await? == 0 {
                        return Ok(());
                    }
                    if dl == b".\r\n" {
                        break;
                    }
                    data.extend_from_slice(&dl);
                }
                events.push(format!("tls: DATA {} bytes", data.len()));
                b"250 2.0.0 queued\r\n"
            } else if upper == "QUIT" {
                rd.get_mut().write_all(b"221 bye\r\n").await?;
                return Ok(());
            } else {
                events.push(format!("tls: {l}"));
                b"502 5.5.2 what\r\n"
            };
            rd.get_mut().write_all(reply).await?;
        }
    }

    fn port(w: &MailWorld) -> u16 {
        w.smtp_port()
    }

    /// Not accepted on the strength of the injected 235.
    async fn refused(port: u16) -> LineConn {
        let mut c = smtp_connect(port).await;
        smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
        let r = smtp_cmd(
            &mut c,
            &format!("AUTH PLAIN {}", client::plain_b64(MALLORY, "wrong")),
            "535",
        )
        .await;
        assert!(r[0].starts_with("535 5.7.8 "), "{r:?}");
        assert!(!r[0].contains("injected"), "{r:?}");
        c
    }

    async fn served(port: u16) -> LineConn {
        let mut c = smtp_connect(port).await;
        smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
        smtp_cmd(
            &mut c,
            &format!("AUTH PLAIN {}", client::plain_b64(MALLORY, MALLORY_PW)),
            "235",
        )
        .await;
        let r = smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
        assert!(!r.iter().any(|l| l.contains("FAKE")), "{r:?}");
        smtp_send(&mut c, MALLORY, &[ALICE], &sample_message(MALLORY, ALICE, "x", "inj1")).await;
        smtp_cmd(&mut c, "QUIT", "221").await;
        c
    }

    /// EHLO + STARTTLS in plaintext, then EHLO and AUTH over TLS.
    fn session(ok: bool) -> Vec<String> {
        vec![
            "plain: EHLO client.example.org".to_string(),
            "plain: STARTTLS".to_string(),
            "tls: EHLO".to_string(),
            format!("tls: AUTH PLAIN ok={ok}"),
        ]
    }

    fn check_rest(rest: &[String]) {
        assert!(rest[0].starts_with(&format!("tls: MAIL FROM:<{MALLORY}>")), "{rest:?}");
        assert!(rest.iter().any(|e| e.starts_with("tls: DATA ")), "{rest:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_starttls_response_injection_is_discarded() {
    starttls_injection::injected_replies_are_discarded::<Smtp>().await;
}

#[test]
fn msmtp_sends_through_the_proxy() {
    let mut w = MailWorld::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();
    let rc = w.dir.path().join("msmtprc");
    std::fs::write(
        &rc,
        format!(
            "defaults\nlogfile {}\n\naccount proxy\nhost 127.0.0.1\nport {}\nauth plain\nuser {ALICE}\npassword {ALICE_PW}\ntls off\nfrom msmtp@example.org\n\naccount default : proxy\n",
            w.dir.path().join("msmtp.log").display(),
            w.smtp_port()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let msg = sample_message("msmtp@example.org", ALICE, "via msmtp", "ms1");
    let mut child = std::process::Command::new("msmtp")
        .arg("-C")
        .arg(&rc)
        .arg(ALICE)
        .arg(CAROL)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("msmtp (scripts/install-deps installs it)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&msg).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "msmtp failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.logs()
    );
    let msgs = w.env.sink.wait_for(1, SINK_WAIT);
    assert_received(&msgs[0], "msmtp@example.org", &[ALICE, CAROL], &msg);
    let log = std::fs::read_to_string(w.dir.path().join("msmtp.log")).unwrap_or_default();
    assert!(log.contains("exitcode=EX_OK"), "{log}");
}

//! The upstream login policy (`upstream::login`), one test per rule and
//! protocol, end to end: a token the server rejects is refreshed once and
//! the login retried; a token rejected again is a credentials failure after
//! exactly that one refresh; a server without the mechanism is a failure a
//! person must act on, never retried; an unreachable server is a temporary
//! failure. Refreshes are counted at the fake provider.

use std::time::Duration;

use crate::support::client;
use crate::support::hostile_util::*;
use crate::support::world::{ALICE, ALICE_PW};
use crate::support::LineConn;

/// The user name alice's token is not for.
const MALLORY: &str = "mallory@example.org";

/// Refresh requests the provider received (whatever their outcome).
fn refreshes(rig: &Rig) -> u64 {
    rig.env.provider.token_requests("refresh_token")
}

/// How often the proxy said it retries a login with a new token.
fn retries_logged(rig: &Rig) -> usize {
    rig.logs().matches("refreshing and retrying once").count()
}

/// Logs in on `proto`'s listener with the client's usual first command(s):
/// IMAP `LOGIN`, SMTP `EHLO` + `AUTH PLAIN`, POP3 `USER` + `PASS`. Returns the
/// connection and the final answer to the login (one line, without CRLF).
async fn login(rig: &Rig, proto: Proto, user: &str, pw: &str) -> (LineConn, String) {
    let port = proto.port(rig);
    match proto {
        Proto::Imap => {
            let mut c = imap_connect(port).await;
            let r = c.imap("a1", &format!("LOGIN \"{user}\" \"{pw}\"")).await.unwrap();
            assert!(
                r.lines.is_empty() || r.is_ok(),
                "untagged lines before a refusal: {r:?}"
            );
            (c, r.tagged)
        }
        Proto::Smtp => {
            let mut c = smtp_connect(port).await;
            c.send("EHLO client.example.org").await.unwrap();
            let ehlo = c.read_smtp_reply().await.unwrap();
            assert!(ehlo.last().unwrap().starts_with("250 "), "{ehlo:?}");
            c.send(&format!("AUTH PLAIN {}", client::plain_b64(user, pw)))
                .await
                .unwrap();
            let r = c.read_smtp_reply().await.unwrap();
            assert_eq!(r.len(), 1, "a one-line answer to AUTH: {r:?}");
            (c, r[0].clone())
        }
        Proto::Pop3 => {
            let mut c = pop3_connect(port).await;
            c.send(&format!("USER {user}")).await.unwrap();
            assert_eq!(c.read_line_raw().await.unwrap(), b"+OK Send PASS\r\n");
            c.send(&format!("PASS {pw}")).await.unwrap();
            let l = c.read_line().await.unwrap();
            (c, l)
        }
    }
}

/// A login that must succeed, and the session must then work upstream.
async fn login_ok(rig: &Rig, proto: Proto) {
    let (mut c, answer) = login(rig, proto, ALICE, ALICE_PW).await;
    match proto {
        Proto::Imap => {
            assert!(answer.starts_with("a1 OK "), "{answer}");
            let r = c.imap("a2", "SELECT INBOX").await.unwrap();
            assert!(r.is_ok(), "{r:?}");
            let r = c.imap("a3", "LOGOUT").await.unwrap();
            assert!(r.is_ok(), "{r:?}");
        }
        Proto::Smtp => {
            assert_eq!(answer, "235 2.7.0 Authentication successful");
            c.send(&format!("MAIL FROM:<{ALICE}>")).await.unwrap();
            let r = c.read_smtp_reply().await.unwrap();
            assert!(r[0].starts_with("250 "), "the upstream takes the transaction: {r:?}");
            c.send("QUIT").await.unwrap();
            let r = c.read_smtp_reply().await.unwrap();
            assert!(r[0].starts_with("221 "), "{r:?}");
        }
        Proto::Pop3 => {
            assert_eq!(answer, "+OK Logged in");
            c.send("STAT").await.unwrap();
            let l = c.read_line().await.unwrap();
            assert!(l.starts_with("+OK "), "the upstream answers STAT: {l}");
            c.send("QUIT").await.unwrap();
            let l = c.read_line().await.unwrap();
            assert!(l.starts_with("+OK"), "{l}");
        }
    }
}

/// The protocol-fixed start of a refusal of each class.
fn credentials_failure(proto: Proto) -> &'static str {
    match proto {
        Proto::Imap => "a1 NO [AUTHENTICATIONFAILED] ",
        Proto::Smtp => "535 5.7.8 ",
        Proto::Pop3 => "-ERR [AUTH] ",
    }
}

fn action_failure(proto: Proto) -> &'static str {
    match proto {
        Proto::Imap => "a1 NO [ALERT] ",
        Proto::Smtp => "535 5.7.8 ",
        Proto::Pop3 => "-ERR [SYS/PERM] ",
    }
}

fn temporary_failure(proto: Proto) -> &'static str {
    match proto {
        Proto::Imap => "a1 NO [UNAVAILABLE] ",
        Proto::Smtp => "454 4.7.0 ",
        Proto::Pop3 => "-ERR [SYS/TEMP] ",
    }
}

/// Alice's server URL for `proto` in the rig config (implicit TLS to Dovecot).
fn alice_url(rig: &Rig, proto: Proto) -> String {
    let d = &rig.env.dovecot;
    match proto {
        Proto::Imap => format!("imap = \"imaps://localhost:{}\"", d.imaps_port),
        Proto::Smtp => format!("smtp = \"smtps://localhost:{}\"", d.submissions_port),
        Proto::Pop3 => format!("pop3 = \"pop3s://localhost:{}\"", d.pop3s_port),
    }
}

/// A rig with alice authorised against the real servers.
fn authorised_rig() -> CheckedRig {
    let rig = Rig::new("login_failure_delay_max = 0.5", |_| String::new()).checked(&[]);
    rig.authorise(ALICE, ALICE_PW);
    rig
}

/// Another protocol, whose server stays real, to get alice's token cached.
fn other(proto: Proto) -> Proto {
    match proto {
        Proto::Imap => Proto::Smtp,
        _ => Proto::Imap,
    }
}

// ---- 1. a rejected token is refreshed once and the login retried ----

async fn rejected_token_is_refreshed_once(proto: Proto) {
    let mut rig = authorised_rig();
    rig.start();
    let r0 = refreshes(&rig);
    login_ok(&rig, proto).await;
    assert_eq!(refreshes(&rig), r0 + 1, "the first login after a start refreshes once");
    login_ok(&rig, proto).await;
    assert_eq!(refreshes(&rig), r0 + 1, "a cached token is used as it is");
    assert_eq!(retries_logged(&rig), 0);

    // The server no longer accepts the cached token (it still looks fresh
    // to the proxy): the client does not notice, one more refresh.
    rig.env.provider.expire_all_access_tokens();
    login_ok(&rig, proto).await;
    assert_eq!(
        refreshes(&rig),
        r0 + 2,
        "{proto:?}: exactly one refresh for the rejected token\n{}",
        tail(&rig.logs(), 30)
    );
    assert!(
        rig.proxy().wait_log("refreshing and retrying once"),
        "{}",
        tail(&rig.logs(), 30)
    );
    assert_eq!(retries_logged(&rig), 1, "{}", tail(&rig.logs(), 30));
    // The new token is kept.
    login_ok(&rig, proto).await;
    assert_eq!(refreshes(&rig), r0 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_rejected_token_is_refreshed_once_and_retried() {
    rejected_token_is_refreshed_once(Proto::Imap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_rejected_token_is_refreshed_once_and_retried() {
    rejected_token_is_refreshed_once(Proto::Smtp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_rejected_token_is_refreshed_once_and_retried() {
    rejected_token_is_refreshed_once(Proto::Pop3).await;
}

// ---- 2. a token rejected twice is a credentials failure ----

async fn token_rejected_twice_is_a_credentials_failure(proto: Proto) {
    let mut rig = authorised_rig();
    // Authorised as alice; from now on the name sent upstream is someone the
    // token is not for, so Dovecot rejects every token.
    rig.edit_config(|c| {
        let head = format!("[accounts.\"{ALICE}\"]\n");
        assert!(c.contains(&head));
        c.replacen(&head, &format!("{head}username = \"{MALLORY}\"\n"), 1)
    });
    rig.start();
    let d = &rig.env.dovecot;
    let upstream = match proto {
        Proto::Imap => format!("imaps://localhost:{}", d.imaps_port),
        Proto::Smtp => format!("smtps://localhost:{}", d.submissions_port),
        Proto::Pop3 => format!("pop3s://localhost:{}", d.pop3s_port),
    };
    let want = format!("{}{upstream} refused the login: ", credentials_failure(proto));

    // Cold: one refresh for a token, one for the retry, then the verdict.
    let r0 = refreshes(&rig);
    let (_c, answer) = login(&rig, proto, ALICE, ALICE_PW).await;
    eprintln!("{proto:?}, token rejected twice: {answer}");
    assert!(answer.starts_with(&want), "{proto:?}: {answer:?}, expected {want:?}…");
    assert_eq!(
        refreshes(&rig),
        r0 + 2,
        "{proto:?}: a token for the login and exactly one for the retry\n{}",
        tail(&rig.logs(), 30)
    );
    assert_eq!(retries_logged(&rig), 1, "{}", tail(&rig.logs(), 30));

    // Warm (the retry's token is cached): exactly one refresh.
    let r1 = refreshes(&rig);
    let (mut c, answer) = login(&rig, proto, ALICE, ALICE_PW).await;
    assert!(answer.starts_with(&want), "{proto:?}: {answer:?}, expected {want:?}…");
    assert_eq!(
        refreshes(&rig),
        r1 + 1,
        "{proto:?}: exactly one retry refresh\n{}",
        tail(&rig.logs(), 30)
    );
    assert_eq!(retries_logged(&rig), 2, "{}", tail(&rig.logs(), 30));

    // The session goes on, not logged in.
    match proto {
        Proto::Imap => {
            let r = c.imap("a2", "SELECT INBOX").await.unwrap();
            assert_eq!(r.tagged, "a2 BAD SELECT not valid before login");
        }
        Proto::Smtp => {
            c.send("MAIL FROM:<x@example.org>").await.unwrap();
            let r = c.read_smtp_reply().await.unwrap();
            assert!(r[0].starts_with("530 5.7.0 "), "{r:?}");
        }
        Proto::Pop3 => {
            c.send("STAT").await.unwrap();
            assert_eq!(c.read_line_raw().await.unwrap(), b"-ERR Not authenticated\r\n");
        }
    }
    let service = match proto {
        Proto::Imap => "imap-login:",
        Proto::Smtp => "submission-login:",
        Proto::Pop3 => "pop3-login:",
    };
    let seen = |rig: &Rig| {
        rig.env
            .dovecot
            .log()
            .lines()
            .any(|l| l.contains(service) && l.contains(&format!("user=<{MALLORY}>")))
    };
    let t0 = std::time::Instant::now();
    while !seen(&rig) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the upstream saw the configured user name:\n{}",
            rig.env.dovecot.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_token_rejected_twice_is_a_credentials_failure() {
    token_rejected_twice_is_a_credentials_failure(Proto::Imap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_token_rejected_twice_is_a_credentials_failure() {
    token_rejected_twice_is_a_credentials_failure(Proto::Smtp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_token_rejected_twice_is_a_credentials_failure() {
    token_rejected_twice_is_a_credentials_failure(Proto::Pop3).await;
}

// ---- 3. a server without the mechanism: a person must act, no retry ----

async fn missing_mechanism_is_never_retried(proto: Proto) {
    let tally = Tally::default();
    let (port, _fake) = fake_upstream(FakeUpstream::WithoutOauth(proto, tally.clone())).await;
    let mut rig = authorised_rig();
    let real = alice_url(&rig, proto);
    rig.edit_config(|c| {
        assert!(c.contains(&real), "{real}");
        c.replacen(&real, &format!("{} = \"{}\"", proto.name(), proto.url(port)), 1)
    });
    rig.start();
    // Alice's token is cached by a login over a protocol whose server is real.
    login_ok(&rig, other(proto)).await;
    let r0 = refreshes(&rig);

    for attempt in 1..=2 {
        let (mut c, answer) = login(&rig, proto, ALICE, ALICE_PW).await;
        eprintln!("{proto:?}, server without OAuth: {answer}");
        assert!(
            answer.starts_with(action_failure(proto)),
            "{proto:?}: {answer:?}, expected {:?}…",
            action_failure(proto)
        );
        assert!(
            answer.contains(&proto.url(port)),
            "{proto:?}: the answer names the upstream: {answer:?}"
        );
        match proto {
            Proto::Imap => assert!(answer.contains("AUTHENTICATE XOAUTH2"), "{answer}"),
            Proto::Smtp => assert!(
                answer.contains("504 5.5.4 Unrecognized authentication type"),
                "{answer}"
            ),
            Proto::Pop3 => assert!(answer.contains("AUTH XOAUTH2"), "{answer}"),
        }
        assert_eq!(
            tally.logins(),
            attempt,
            "{proto:?}: one login exchange per client login, never a second\n{}",
            String::from_utf8_lossy(&tally.received())
        );
        assert_eq!(
            refreshes(&rig),
            r0,
            "{proto:?}: no refresh for a server that lacks the mechanism\n{}",
            tail(&rig.logs(), 30)
        );
        // The client may go on talking to the proxy.
        if proto == Proto::Imap {
            assert!(c.imap("n", "NOOP").await.unwrap().is_ok());
        }
    }
    assert_eq!(retries_logged(&rig), 0, "{}", tail(&rig.logs(), 30));
    // The token was not thrown away either.
    login_ok(&rig, other(proto)).await;
    assert_eq!(refreshes(&rig), r0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_server_without_oauth_is_an_alert_and_never_retried() {
    missing_mechanism_is_never_retried(Proto::Imap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_server_without_oauth_is_a_535_and_never_retried() {
    missing_mechanism_is_never_retried(Proto::Smtp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_server_without_oauth_is_sys_perm_and_never_retried() {
    missing_mechanism_is_never_retried(Proto::Pop3).await;
}

// ---- 4. an unreachable server: temporary, no refresh ----

async fn unreachable_upstream_is_temporary(proto: Proto) {
    let (port, _closed) = closed_port();
    let mut rig = authorised_rig();
    let real = alice_url(&rig, proto);
    rig.edit_config(|c| c.replacen(&real, &format!("{} = \"{}\"", proto.name(), proto.url(port)), 1));
    rig.start();
    login_ok(&rig, other(proto)).await;
    let r0 = refreshes(&rig);
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let (_c, answer) = login(&rig, proto, ALICE, ALICE_PW).await;
        eprintln!("{proto:?}, unreachable server: {answer}");
        assert!(
            answer.starts_with(temporary_failure(proto)),
            "{proto:?}: {answer:?}, expected {:?}…",
            temporary_failure(proto)
        );
        assert!(
            answer.contains(&format!("127.0.0.1:{port}")),
            "{proto:?}: names the upstream: {answer:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert_eq!(refreshes(&rig), r0, "{proto:?}: no refresh\n{}", tail(&rig.logs(), 30));
    }
    assert_eq!(retries_logged(&rig), 0, "{}", tail(&rig.logs(), 30));
    login_ok(&rig, other(proto)).await;
    assert_eq!(refreshes(&rig), r0, "the cached token is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_unreachable_upstream_is_unavailable_without_refresh() {
    unreachable_upstream_is_temporary(Proto::Imap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_unreachable_upstream_is_454_without_refresh() {
    unreachable_upstream_is_temporary(Proto::Smtp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_unreachable_upstream_is_sys_temp_without_refresh() {
    unreachable_upstream_is_temporary(Proto::Pop3).await;
}

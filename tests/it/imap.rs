//! IMAP end to end: real `mailproxy` binary, real Dovecot upstream, fake OAuth
//! provider speaking real HTTP. Clients are raw protocol bytes and Python's imaplib.

use std::time::Duration;

use crate::support::mailproxy::{Proxy, ProxyDir};
use crate::support::{client, sample_message, Env, LineConn};

use crate::support::world::*;

async fn connect(port: u16) -> LineConn {
    let mut c = LineConn::plain(port).await.unwrap();
    let g = c.read_line().await.unwrap();
    assert!(
        g.starts_with("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID]"),
        "{g}"
    );
    c
}

async fn login(port: u16, user: &str, pw: &str) -> LineConn {
    let mut c = connect(port).await;
    let r = c.imap("a1", &format!("LOGIN \"{user}\" \"{pw}\"")).await.unwrap();
    assert!(r.is_ok(), "LOGIN {user}: {r:?}");
    c
}

/// The raw bytes of message 1 of INBOX, read over `c` (already logged in).
async fn fetch_first(c: &mut LineConn) -> Vec<u8> {
    let r = c.imap("f1", "SELECT INBOX").await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    let r = c.imap("f2", "FETCH 1 BODY.PEEK[]").await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.literals.len(), 1, "{r:?}");
    r.literals[0].clone()
}

/// A direct session to Dovecot with a token minted by the provider.
async fn direct_fetch(env: &Env, user: &str) -> Vec<u8> {
    let token = env.provider.issue_access_token(user, "https://mail.example.org/");
    let d = &env.dovecot;
    let mut c = LineConn::tls(d.imaps_port, d.tls_client_config(), "localhost")
        .await
        .unwrap();
    c.read_line().await.unwrap();
    let r = c
        .imap(
            "d1",
            &format!("AUTHENTICATE XOAUTH2 {}", client::xoauth2_b64(user, &token)),
        )
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    fetch_first(&mut c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_flow_then_fetch_is_byte_identical_to_direct() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);

    // The vault holds no secret in the clear and is private.
    let vault_file = w.dir.state_dir().join("accounts").join(format!("{ALICE}.json"));
    let text = std::fs::read_to_string(&vault_file).unwrap();
    assert!(!text.contains(ALICE_PW));
    assert!(text.contains("ciphertext") && text.contains("argon2id"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&vault_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let form = w.env.provider.last_token_request().unwrap();
    assert_eq!(form.get("grant_type").map(String::as_str), Some("authorization_code"));
    assert!(form.contains_key("code_verifier"), "PKCE verifier sent: {form:?}");
    let auth = w.env.provider.last_authorize_request().unwrap();
    assert_eq!(auth.get("code_challenge_method").map(String::as_str), Some("S256"));
    assert!(auth.get("state").is_some_and(|s| s.len() >= 16));

    let mut msg = sample_message("x@example.org", ALICE, "hello", "m1");
    msg.extend_from_slice("8-bit: äöü ✓\r\n".as_bytes());
    w.env.dovecot.deliver(ALICE, &msg);
    let port = w.start();

    let mut c = login(port, ALICE, ALICE_PW).await;
    let via_proxy = fetch_first(&mut c).await;
    assert_eq!(via_proxy, msg);
    assert_eq!(via_proxy, direct_fetch(&w.env, ALICE).await);
    let r = c.imap("z", "LOGOUT").await.unwrap();
    assert!(r.is_ok());
    drop(c);
    assert!(!text.is_empty());
    assert!(w.proxy.as_ref().unwrap().wait_log("session ended"));
    assert!(!w.logs().contains(ALICE_PW), "password in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_forms_literals_and_authenticate_plain() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();

    // LOGIN with synchronising literals: the proxy answers `+` for each.
    let mut c = connect(port).await;
    c.send(&format!("a1 LOGIN {{{}}}", ALICE.len())).await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+ "));
    c.send(&format!("{ALICE} {{{}}}", ALICE_PW.len())).await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+ "));
    c.send(ALICE_PW).await.unwrap();
    let r = c.read_imap_response("a1").await.unwrap();
    assert!(r.tagged.starts_with("a1 OK"), "{r:?}");
    // The upstream's CAPABILITY code is carried through under the client's tag.
    assert!(r.tagged.starts_with("a1 OK [CAPABILITY IMAP4rev1"), "{r:?}");

    // LOGIN with non-synchronising literals: no continuation.
    let mut c = connect(port).await;
    c.write_raw(
        format!(
            "a1 LOGIN {{{}+}}\r\n{ALICE} {{{}+}}\r\n{ALICE_PW}\r\n",
            ALICE.len(),
            ALICE_PW.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let r = c.read_imap_response("a1").await.unwrap();
    assert!(r.is_ok() && r.lines.is_empty(), "{r:?}");

    // AUTHENTICATE PLAIN with SASL-IR.
    let mut c = connect(port).await;
    let r = c
        .imap(
            "a1",
            &format!("AUTHENTICATE PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        )
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:?}");

    // AUTHENTICATE PLAIN via continuation.
    let mut c = connect(port).await;
    c.send("a1 AUTHENTICATE PLAIN").await.unwrap();
    assert_eq!(c.read_line().await.unwrap(), "+ ");
    c.send(&client::plain_b64(ALICE, ALICE_PW)).await.unwrap();
    let r = c.read_imap_response("a1").await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    let r = c.imap("a2", "SELECT INBOX").await.unwrap();
    assert!(r.is_ok(), "{r:?}");

    // `*` cancels; the session goes on.
    let mut c = connect(port).await;
    c.send("a1 AUTHENTICATE PLAIN").await.unwrap();
    assert_eq!(c.read_line().await.unwrap(), "+ ");
    c.send("*").await.unwrap();
    let r = c.read_imap_response("a1").await.unwrap();
    assert!(r.tagged.starts_with("a1 BAD"), "{r:?}");
    let r = c.imap("a2", "NOOP").await.unwrap();
    assert!(r.is_ok());
    // Commands that need a login are refused with a tagged BAD.
    let r = c.imap("a3", "SELECT INBOX").await.unwrap();
    assert!(r.tagged.starts_with("a3 BAD"), "{r:?}");
    let r = c.imap("a4", "CAPABILITY").await.unwrap();
    assert_eq!(r.lines, vec!["* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID"]);
    let r = c.imap("a5", "ID (\"name\" \"test\")").await.unwrap();
    assert!(r.is_ok() && r.lines[0].starts_with("* ID ("), "{r:?}");
}

/// `ID` parameters as RFC 2971 allows them at most: 30 pairs, 1,024-octet
/// values. `escaped` writes every octet of every string escaped (the
/// longest line); otherwise the values read like a client's own.
fn maximal_id(escaped: bool) -> String {
    let pairs: Vec<String> = (0..30)
        .map(|i| {
            if escaped {
                format!("\"{}\" \"{}\"", "\\\\".repeat(30), "\\\"".repeat(1024))
            } else {
                let value: String = format!("client build {i:02}; ").chars().cycle().take(1024).collect();
                format!("\"x-field-{i:02}\" \"{value}\"")
            }
        })
        .collect();
    format!("ID ({})", pairs.join(" "))
}

/// What a client may send before login at the RFCs' maxima is answered:
/// RFC 2971's largest `ID` (about 31 KiB on one line, and every octet
/// escaped), as Dovecot answers it, with LOGIN after it; `AUTHENTICATE
/// PLAIN` with a 12,288-octet response, inline (SASL-IR) or after `+`. One
/// octet over the `ID` limit still ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximal_id_and_long_sasl_responses_are_answered_before_login() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    let id = maximal_id(false);
    assert!(id.len() > 30 * 1024, "{}", id.len());

    // Dovecot answers it...
    let mut d = LineConn::plain(w.env.dovecot.imap_port).await.unwrap();
    assert!(d.read_line().await.unwrap().starts_with("* OK"));
    let r = d.imap("i1", &id).await.unwrap();
    assert!(
        r.is_ok() && r.lines.len() == 1 && r.lines[0].starts_with("* ID ("),
        "{r:?}"
    );

    // ... and so does mailproxy, then the login goes through.
    let mut c = connect(port).await;
    for (tag, id) in [("i1", &id), ("i2", &maximal_id(true))] {
        let r = c.imap(tag, id).await.unwrap();
        assert!(
            r.is_ok() && r.lines.len() == 1 && r.lines[0].starts_with("* ID ("),
            "{r:?}"
        );
    }
    let r = c
        .imap("a1", &format!("LOGIN \"{ALICE}\" \"{ALICE_PW}\""))
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());

    // A 12,288-octet SASL response (a wrong password of 9,209 octets): an
    // authentication answer, then the right one gets in.
    let long = client::plain_b64(ALICE, &"p".repeat(9216 - ALICE.len() - 2));
    assert_eq!(long.len(), 12_288);
    let mut c = connect(port).await;
    let r = c.imap("a1", &format!("AUTHENTICATE PLAIN {long}")).await.unwrap();
    assert!(r.tagged.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r:?}");
    c.send("a2 AUTHENTICATE PLAIN").await.unwrap();
    assert_eq!(c.read_line().await.unwrap(), "+ ");
    c.send(&long).await.unwrap();
    let r = c.read_imap_response("a2").await.unwrap();
    assert!(r.tagged.starts_with("a2 NO [AUTHENTICATIONFAILED]"), "{r:?}");
    let r = c
        .imap(
            "a3",
            &format!("AUTHENTICATE PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        )
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:?}");

    // The limit: max_line (8,192) for the tag and `ID`, 63,421 for the
    // parameters. At it the command is answered; one octet more is not.
    let params = maximal_id(true);
    let at_limit = "t".repeat(8192 - " ID ".len());
    let mut c = connect(port).await;
    let r = c.imap(&at_limit, &params).await.unwrap();
    assert!(r.is_ok(), "{}", r.tagged.len());
    let mut c = connect(port).await;
    c.send(&format!("{at_limit}t {params}")).await.unwrap();
    assert_eq!(c.read_line().await.unwrap(), "* BYE Line too long");
    assert!(c.read_line_raw().await.unwrap().is_empty(), "closed");
}

/// A TLS client (its real ClientHello) on the plaintext listener gets the
/// greeting it cannot read, as before; then mailproxy closes, says in one
/// warning which listener, which client and what to change, and counts it.
/// Clients that speak IMAP are served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_on_the_plaintext_listener_is_named_in_the_log_and_counted() {
    let mut w = World::new();
    w.server_setting("metrics_listen = \"127.0.0.1:0\"");
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    let addr = w.proxy.as_ref().unwrap().metrics_addr();
    let metrics = move || {
        crate::support::http::get(&format!("http://{addr}/metrics"))
            .unwrap()
            .text()
    };
    let series = "mailproxy_misconnects_total{listener=\"imap\",kind=\"tls_on_plaintext\"}";
    assert_eq!(client::metric(&metrics(), series), Some(0.0));

    let hello = client::tls_client_hello(w.env.dovecot.tls_client_config());
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    use tokio::io::AsyncWriteExt;
    tcp.write_all(&hello).await.unwrap();
    let t0 = std::time::Instant::now();
    let (got, closed) = client::read_to_close(&mut tcp, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(closed && t0.elapsed() < Duration::from_secs(2), "{text:?}");
    assert_eq!(text.lines().count(), 1, "only the greeting: {text:?}");
    assert!(text.starts_with("* OK [CAPABILITY"), "{text:?}");

    let p = w.proxy.as_ref().unwrap();
    assert!(
        p.wait_log("a client sent a TLS handshake to a plaintext listener"),
        "{}",
        p.logs()
    );
    let logs = p.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("a client sent a TLS handshake"))
        .unwrap();
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains(&format!("listener=[imap] 127.0.0.1:{port}")), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains("tls = \"implicit\" in [imap]"), "{line}");
    assert_eq!(logs.matches("a client sent a TLS handshake").count(), 1);

    // A real TLS client fails as before, and is counted again.
    let err = LineConn::tls(port, w.env.dovecot.tls_client_config(), "localhost").await;
    assert!(err.is_err());
    let t0 = std::time::Instant::now();
    let body = loop {
        let body = metrics();
        if client::metric(&body, series) == Some(2.0) || t0.elapsed() > Duration::from_secs(5) {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(client::metric(&body, series), Some(2.0), "{body}");
    assert_eq!(
        client::metric(
            &body,
            "mailproxy_misconnects_total{listener=\"imap\",kind=\"plaintext_on_tls\"}"
        ),
        Some(0.0)
    );
    client::promtool_check(&body);

    // IMAP clients are not held up: the greeting comes at once.
    let t0 = std::time::Instant::now();
    let mut c = login(port, ALICE, ALICE_PW).await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_local_password_never_reaches_upstream() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    let before_logins = w.upstream_logins();
    let before_tokens = w.env.provider.total_token_requests();

    let mut c = connect(port).await;
    let t0 = std::time::Instant::now();
    let r = c.imap("a1", &format!("LOGIN {ALICE} wrong")).await.unwrap();
    assert!(r.tagged.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r:?}");
    let r = c.imap("a2", &format!("LOGIN {ALICE} wrong2")).await.unwrap();
    assert!(r.tagged.starts_with("a2 NO [AUTHENTICATIONFAILED]"), "{r:?}");
    let r = c.imap("a3", &format!("LOGIN {ALICE} wrong3")).await.unwrap();
    assert!(r.tagged.starts_with("a3 NO"), "{r:?}");
    // Repeated failures slow down: 0.25 + 0.5 + 1 s at least.
    assert!(t0.elapsed() >= Duration::from_millis(1500), "{:?}", t0.elapsed());
    // An unknown account without fallback config would also be refused; here
    // it goes to the fallback, which is upstream traffic by design, so it is not tried.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        w.upstream_logins(),
        before_logins,
        "no upstream connection for a wrong local password"
    );
    assert_eq!(
        w.env.provider.total_token_requests(),
        before_tokens,
        "no token request either"
    );

    // The right password still works on the same connection.
    let r = c.imap("a4", &format!("LOGIN {ALICE} \"{ALICE_PW}\"")).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refreshed_and_parallel_logins_refresh_once() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    let p = &w.env.provider;

    // Cold: the first login refreshes (access tokens live only in memory).
    let r0 = p.refreshes();
    drop(login(port, ALICE, ALICE_PW).await);
    assert_eq!(p.refreshes(), r0 + 1);
    // Warm: cached token, no refresh.
    drop(login(port, ALICE, ALICE_PW).await);
    assert_eq!(p.refreshes(), r0 + 1);

    // The server stops accepting the cached token: the proxy refreshes and retries.
    p.set_rotate_refresh_tokens(true);
    p.expire_all_access_tokens();
    let mut c = login(port, ALICE, ALICE_PW).await;
    assert_eq!(p.refreshes(), r0 + 2);
    assert!(c.imap("a2", "SELECT INBOX").await.unwrap().is_ok());

    // A provider that hands out absurdly short lifetimes: the lifetime counts
    // as 30 s (no refresh storm), and when the server refuses the
    // token that died earlier, one refresh and a retry keep logins working.
    p.set_access_token_lifetime(Duration::from_secs(2));
    p.expire_all_access_tokens();
    drop(login(port, ALICE, ALICE_PW).await);
    let before = p.refreshes();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(p.refreshes(), before, "no background refresh storm\n{}", w.logs());
    drop(login(port, ALICE, ALICE_PW).await);
    assert_eq!(p.refreshes(), before + 1, "the dead token is refreshed once");

    // Twenty clients at once, cold start: exactly one refresh.
    p.set_access_token_lifetime(Duration::from_secs(3600));
    let port = w.restart();
    let p = &w.env.provider;
    let before = p.refreshes();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = login(port, ALICE, ALICE_PW).await;
                assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(p.refreshes(), before + 1, "one refresh for twenty parallel logins");
    // Rotation was saved: a restart still works with the rotated refresh token.
    let port = w.restart();
    drop(login(port, ALICE, ALICE_PW).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_refresh_token_gives_a_clear_no() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    w.env.provider.invalidate_all_refresh_tokens();
    let mut c = connect(port).await;
    let r = c.imap("a1", &format!("LOGIN {ALICE} \"{ALICE_PW}\"")).await.unwrap();
    assert!(r.tagged.starts_with("a1 NO [ALERT]"), "{r:?}");
    assert!(r.tagged.contains(&format!("mailproxy login {ALICE}")), "{r:?}");
    let proxy = w.proxy.as_ref().unwrap();
    assert!(proxy.wait_log("token refresh failed"), "{}", w.logs());
    assert!(proxy.wait_log("event=\"refresh_failed\""), "audited: {}", w.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_fallback_and_starttls_upstream() {
    let mut w = World::new();
    w.authorise(CAROL, "carol pw");
    w.env.dovecot.deliver(BOB, &sample_message("x@y", BOB, "for bob", "b1"));
    let port = w.start();

    // Passthrough: bob's own password goes to the plain loopback upstream.
    let mut c = login(port, BOB, BOB_PW).await;
    let body = fetch_first(&mut c).await;
    assert_eq!(body, sample_message("x@y", BOB, "for bob", "b1"));
    let mut c = connect(port).await;
    let r = c.imap("a1", &format!("LOGIN {BOB} nope")).await.unwrap();
    assert!(r.tagged.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r:?}");

    // Fallback: frank is not in the config; his login goes through unchanged.
    let mut c = login(port, FRANK, FRANK_PW).await;
    assert!(c.imap("a2", "SELECT INBOX").await.unwrap().is_ok());

    // STARTTLS upstream for an OAuth account.
    let mut c = login(port, CAROL, "carol pw").await;
    assert!(c.imap("a2", "SELECT INBOX").await.unwrap().is_ok());
    // Dovecot logs the login (over TLS, after STARTTLS) asynchronously.
    let t0 = std::time::Instant::now();
    while !w
        .env
        .dovecot
        .log()
        .lines()
        .any(|l| l.contains(&format!("user=<{CAROL}>")) && l.contains("TLS"))
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", w.env.dovecot.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_and_idle_survive_the_hand_off() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    w.env
        .dovecot
        .deliver(ALICE, &sample_message("x@y", ALICE, "first", "p1"));
    let port = w.start();

    // LOGIN, SELECT and FETCH in one write: nothing lost or reordered.
    let mut c = connect(port).await;
    c.write_raw(format!("a1 LOGIN {ALICE} \"{ALICE_PW}\"\r\na2 SELECT INBOX\r\na3 FETCH 1 (FLAGS)\r\n").as_bytes())
        .await
        .unwrap();
    assert!(c.read_imap_response("a1").await.unwrap().is_ok());
    assert!(c.read_imap_response("a2").await.unwrap().is_ok());
    let r = c.read_imap_response("a3").await.unwrap();
    assert!(r.is_ok() && r.lines.iter().any(|l| l.starts_with("* 1 FETCH")), "{r:?}");

    // IDLE: a new message shows up while idling through the proxy.
    c.send("a4 IDLE").await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+ "));
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.env
        .dovecot
        .deliver(ALICE, &sample_message("x@y", ALICE, "second", "p2"));
    let l = c.read_until_prefix("* 2 EXISTS").await.unwrap();
    assert_eq!(l, "* 2 EXISTS");
    c.send("DONE").await.unwrap();
    assert!(c.read_imap_response("a4").await.unwrap().is_ok());
}

#[test]
fn python_imaplib_reads_mail_through_the_proxy() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let msg = sample_message("x@y", ALICE, "imaplib", "py1");
    w.env.dovecot.deliver(ALICE, &msg);
    let port = w.start();
    let script = format!(
        r#"
import imaplib, sys
m = imaplib.IMAP4("127.0.0.1", {port})
m.login("{ALICE}", "{ALICE_PW}")
typ, data = m.select("INBOX")
assert typ == "OK", data
typ, data = m.fetch("1", "(BODY.PEEK[])")
assert typ == "OK", data
sys.stdout.buffer.write(data[0][1])
m.logout()
"#
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, msg);
}

#[test]
fn serve_reports_config_errors_with_file_line_and_key_and_stops_cleanly() {
    let dir = ProxyDir::new();
    dir.write_config("[imap]\nlisten = \"127.0.0.1:0\"\n\n[accounts.\"a@b\"]\nprovider = \"password\"\nimap = \"imap://mail.example.org\"\n");
    let out = std::process::Command::new(crate::support::mailproxy::BIN)
        .args(["--config", dir.config_path().to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.toml:6: accounts.\"a@b\".imap"), "{err}");
    assert!(err.contains("allow_plaintext"), "{err}");

    let mut cfg = dir.header();
    cfg += "[accounts.\"a@b\"]\nprovider = \"password\"\nimap = \"imap://127.0.0.1:9\"\n";
    dir.write_config(&cfg);
    let mut p = Proxy::start(&dir);
    let st = p.stop().expect("exits on SIGTERM");
    assert!(st.success(), "{st}");
}

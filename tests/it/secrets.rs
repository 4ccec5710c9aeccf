//! No secret escapes: the whole life of an account (authorisation, logins
//! over IMAP, SMTP and POP3, wrong passwords, refresh with rotation, a
//! rejected token, revocation) runs with `RUST_LOG=trace`, and no local
//! password, token, XOAUTH2 string, authorisation code, PKCE verifier or
//! client secret may appear in any log line or command output.

use crate::support::client;
use crate::support::mailproxy::{run, Proxy};
use crate::support::provider;
use crate::support::world::*;
use crate::support::LineConn;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_in_trace_logs_or_outputs() {
    let w = World::new();
    let mut transcript = String::new();
    let (st, err) = w.dir.login_with(ALICE, ALICE_PW, &[], |url| {
        let (status, _) = provider::approve_in_browser_blocking(url).unwrap();
        assert_eq!(status, 200);
    });
    assert!(st.success(), "{err}");
    transcript.push_str(&err);

    let p = &w.env.provider;
    p.set_rotate_refresh_tokens(true);
    let mut proxy = Proxy::start_env(&w.dir, &[("RUST_LOG", "trace")]);
    let port = proxy.imap_port();

    // A wrong password, then the right one (LOGIN and AUTHENTICATE PLAIN).
    let mut c = LineConn::plain(port).await.unwrap();
    c.read_line().await.unwrap();
    let r = c
        .imap("a1", &format!("LOGIN {ALICE} \"not {ALICE_PW}\""))
        .await
        .unwrap();
    assert!(r.tagged.starts_with("a1 NO"));
    let r = c
        .imap(
            "a2",
            &format!("AUTHENTICATE PLAIN {}", client::plain_b64(ALICE, ALICE_PW)),
        )
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(c.imap("a3", "SELECT INBOX").await.unwrap().is_ok());
    drop(c);
    // The server rejects the cached token: refresh (rotated) and retry.
    p.expire_all_access_tokens();
    let mut c = LineConn::plain(port).await.unwrap();
    c.read_line().await.unwrap();
    assert!(c
        .imap("b1", &format!("LOGIN {ALICE} \"{ALICE_PW}\""))
        .await
        .unwrap()
        .is_ok());
    drop(c);
    // Passthrough with the client's own password.
    let mut c = LineConn::plain(port).await.unwrap();
    c.read_line().await.unwrap();
    assert!(c
        .imap("c1", &format!("LOGIN {BOB} \"{BOB_PW}\""))
        .await
        .unwrap()
        .is_ok());
    drop(c);

    let (code, out, err) = run(&w.dir, &["check", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 0, "{out}{err}");
    transcript.push_str(&out);
    transcript.push_str(&err);
    let (code, out, err) = run(&w.dir, &["accounts"], "");
    assert_eq!(code, 0);
    transcript.push_str(&out);
    transcript.push_str(&err);
    let (code, out, err) = run(&w.dir, &["revoke", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 0, "{out}{err}");
    transcript.push_str(&out);
    transcript.push_str(&err);

    assert!(proxy.wait_log("access token refreshed"));
    proxy.stop();
    let logs = proxy.logs();
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "trace logging was on");
    transcript.push_str(&logs);
    transcript.push_str(&std::fs::read_to_string(w.dir.state_dir().join("audit.log")).unwrap_or_default());

    let mut secrets = p.all_secrets();
    assert!(
        secrets.len() >= 6,
        "the provider saw tokens, codes and verifiers: {}",
        secrets.len()
    );
    let tokens = secrets.clone();
    secrets.extend([
        ALICE_PW.to_string(),
        BOB_PW.to_string(),
        provider::CLIENT_SECRET.to_string(),
    ]);
    for t in &tokens {
        secrets.push(client::xoauth2_b64(ALICE, t));
        secrets.push(client::xoauth2_raw(ALICE, t));
    }
    secrets.push(client::plain_b64(ALICE, ALICE_PW));
    secrets.push(client::plain_b64(BOB, BOB_PW));
    for s in &secrets {
        assert!(
            !transcript.contains(s.as_str()),
            "a secret leaked: {}…",
            &s[..s.len().min(6)]
        );
    }
}

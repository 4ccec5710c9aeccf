//! Self-test of the integration harness (tests/it/support): fake OAuth provider,
//! private Dovecot, test PKI and SMTP sink, driven with raw protocol bytes.
//! No mailproxy code is involved; if these fail, every other integration test is suspect.

use std::time::{Duration, Instant};

use crate::support::client::{plain_b64, unb64, xoauth2_b64, LineConn};
use crate::support::provider::{self, pkce_challenge, ClientReg, CLIENT_ID, CLIENT_SECRET, DEFAULT_SCOPE};
use crate::support::{http, sample_message, Env};

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";
const BOB_PASS: &str = "bob-secret pass";

fn env() -> Env {
    Env::start(&[(BOB, BOB_PASS)])
}

#[tokio::test(flavor = "multi_thread")]
async fn imaps_xoauth2_fetch_and_bad_token() {
    let env = env();
    let d = &env.dovecot;
    let (token, _refresh) = env.provider.issue_tokens(ALICE, DEFAULT_SCOPE);
    let msg = sample_message(BOB, ALICE, "harness fetch", "fetch-1");
    d.deliver(ALICE, &msg);

    let mut c = LineConn::tls(d.imaps_port, d.tls_client_config(), d.host())
        .await
        .unwrap();
    assert!(c.read_line().await.unwrap().starts_with("* OK"));
    let r = c
        .imap("a1", &format!("AUTHENTICATE XOAUTH2 {}", xoauth2_b64(ALICE, &token)))
        .await
        .unwrap();
    assert!(r.is_ok(), "XOAUTH2 failed: {r:?}\n{}", d.log());
    assert!(env.provider.introspections() >= 1);

    let r = c.imap("a2", "SELECT INBOX").await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(r.lines.iter().any(|l| l == "* 1 EXISTS"), "{r:?}");
    let r = c.imap("a3", "FETCH 1 BODY.PEEK[]").await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.literals.len(), 1, "{r:?}");
    assert_eq!(r.literals[0], msg, "fetched message differs");
    c.imap("a4", "LOGOUT").await.unwrap();

    // A token the provider never issued: Gmail-style JSON challenge, then NO.
    let mut c = LineConn::tls(d.imaps_port, d.tls_client_config(), d.host())
        .await
        .unwrap();
    c.read_line().await.unwrap();
    let r = c
        .imap(
            "b1",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2_b64(ALICE, "not-a-token")),
        )
        .await
        .unwrap();
    let cont = r.lines.last().expect("continuation");
    let json: serde_json::Value =
        serde_json::from_slice(&unb64(cont.strip_prefix("+ ").expect("+ challenge"))).unwrap();
    assert!(json.get("status").is_some(), "{json}");
    c.send("").await.unwrap();
    let r = c.read_imap_response("b1").await.unwrap();
    assert!(r.tagged.starts_with("b1 NO"), "{r:?}");

    // An expired token is refused the same way.
    let (old, _) = env.provider.issue_tokens(ALICE, DEFAULT_SCOPE);
    env.provider.expire_all_access_tokens();
    let r = c
        .imap("b2", &format!("AUTHENTICATE XOAUTH2 {}", xoauth2_b64(ALICE, &old)))
        .await
        .unwrap();
    assert!(r.lines.last().is_some_and(|l| l.starts_with("+ ")), "{r:?}");
    c.send("").await.unwrap();
    assert!(c.read_imap_response("b2").await.unwrap().tagged.starts_with("b2 NO"));
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_starttls_password_login_and_oauthbearer() {
    let env = env();
    let d = &env.dovecot;
    let mut c = LineConn::plain(d.imap_port).await.unwrap();
    let greeting = c.read_line().await.unwrap();
    assert!(greeting.contains("STARTTLS"), "{greeting}");
    let r = c.imap("s1", "STARTTLS").await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    let mut c = c.starttls(d.tls_client_config(), d.host()).await.unwrap();
    let r = c.imap("s2", "CAPABILITY").await.unwrap();
    let caps = r.lines.join(" ");
    assert!(
        caps.contains("AUTH=XOAUTH2") && caps.contains("AUTH=OAUTHBEARER"),
        "{caps}"
    );
    let r = c.imap("s3", &format!("LOGIN \"{BOB}\" \"{BOB_PASS}\"")).await.unwrap();
    assert!(r.is_ok(), "LOGIN failed: {r:?}\n{}", d.log());
    c.imap("s4", "LOGOUT").await.unwrap();

    // Wrong password, plain (no TLS) connection: NO.
    let mut c = LineConn::plain(d.imap_port).await.unwrap();
    c.read_line().await.unwrap();
    let r = c.imap("w1", &format!("LOGIN \"{BOB}\" \"wrong\"")).await.unwrap();
    assert!(r.tagged.starts_with("w1 NO"), "{r:?}");

    // OAUTHBEARER (RFC 7628) with a live token.
    let tok = env.provider.issue_access_token(ALICE, DEFAULT_SCOPE);
    let ir = crate::support::client::oauthbearer_b64(ALICE, &tok, "localhost", d.imap_port);
    let r = c.imap("o1", &format!("AUTHENTICATE OAUTHBEARER {ir}")).await.unwrap();
    assert!(r.is_ok(), "OAUTHBEARER failed: {r:?}\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_xoauth2_two_step_and_retr() {
    let env = env();
    let d = &env.dovecot;
    let (token, _) = env.provider.issue_tokens(ALICE, DEFAULT_SCOPE);
    let msg = sample_message(BOB, ALICE, "harness pop3", "pop3-1");
    d.deliver(ALICE, &msg);

    let mut c = LineConn::tls(d.pop3s_port, d.tls_client_config(), d.host())
        .await
        .unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+OK"));
    c.send("AUTH XOAUTH2").await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with('+'));
    c.send(&xoauth2_b64(ALICE, &token)).await.unwrap();
    let l = c.read_line().await.unwrap();
    assert!(l.starts_with("+OK"), "{l}\n{}", d.log());
    c.send("STAT").await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+OK 1 "));
    c.send("RETR 1").await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+OK"));
    let mut body = Vec::new();
    loop {
        let mut l = c.read_line_raw().await.unwrap();
        if l == b".\r\n" {
            break;
        }
        if l.first() == Some(&b'.') {
            l.remove(0);
        }
        body.extend_from_slice(&l);
    }
    assert_eq!(body, msg);
    c.send("QUIT").await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+OK"));

    // Plain port with STLS and USER/PASS for the password user.
    let mut c = LineConn::plain(d.pop3_port).await.unwrap();
    c.read_line().await.unwrap();
    c.send("STLS").await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+OK"));
    let mut c = c.starttls(d.tls_client_config(), d.host()).await.unwrap();
    c.send(&format!("USER {BOB}")).await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("+OK"));
    c.send(&format!("PASS {BOB_PASS}")).await.unwrap();
    let l = c.read_line().await.unwrap();
    assert!(l.starts_with("+OK"), "{l}");
}

#[tokio::test(flavor = "multi_thread")]
async fn submission_xoauth2_relays_to_sink() {
    let env = env();
    let d = &env.dovecot;
    let (token, _) = env.provider.issue_tokens(ALICE, DEFAULT_SCOPE);

    let mut c = LineConn::plain(d.submission_port).await.unwrap();
    assert!(c.read_smtp_reply().await.unwrap()[0].starts_with("220"));
    c.send("EHLO client.example").await.unwrap();
    let ehlo = c.read_smtp_reply().await.unwrap();
    assert!(ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
    c.send("STARTTLS").await.unwrap();
    assert!(c.read_smtp_reply().await.unwrap()[0].starts_with("220"));
    let mut c = c.starttls(d.tls_client_config(), d.host()).await.unwrap();
    c.send("EHLO client.example").await.unwrap();
    let ehlo = c.read_smtp_reply().await.unwrap();
    assert!(ehlo.iter().any(|l| l.contains("XOAUTH2")), "{ehlo:?}");
    c.send(&format!("AUTH XOAUTH2 {}", xoauth2_b64(ALICE, &token)))
        .await
        .unwrap();
    let r = c.read_smtp_reply().await.unwrap();
    assert!(r[0].starts_with("235"), "{r:?}\n{}", d.log());

    let msg = sample_message(ALICE, BOB, "harness submission", "sub-1");
    c.send(&format!("MAIL FROM:<{ALICE}>")).await.unwrap();
    assert!(c.read_smtp_reply().await.unwrap()[0].starts_with("250"));
    c.send(&format!("RCPT TO:<{BOB}>")).await.unwrap();
    assert!(c.read_smtp_reply().await.unwrap()[0].starts_with("250"));
    c.send("DATA").await.unwrap();
    assert!(c.read_smtp_reply().await.unwrap()[0].starts_with("354"));
    c.write_raw(&dot_stuff(&msg)).await.unwrap();
    c.write_raw(b".\r\n").await.unwrap();
    let r = c.read_smtp_reply().await.unwrap();
    assert!(r[0].starts_with("250"), "{r:?}\n{}", d.log());
    c.send("QUIT").await.unwrap();

    let got = env.sink.wait_for_async(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].mail_from, ALICE);
    assert_eq!(got[0].rcpt_to, vec![BOB.to_string()]);
    assert_eq!(
        String::from_utf8_lossy(&got[0].data_without_trace()),
        String::from_utf8_lossy(&msg)
    );

    // Implicit TLS port with AUTH PLAIN for the password user.
    let mut c = LineConn::tls(d.submissions_port, d.tls_client_config(), d.host())
        .await
        .unwrap();
    assert!(c.read_smtp_reply().await.unwrap()[0].starts_with("220"));
    c.send("EHLO client.example").await.unwrap();
    c.read_smtp_reply().await.unwrap();
    c.send(&format!("AUTH PLAIN {}", plain_b64(BOB, BOB_PASS)))
        .await
        .unwrap();
    let r = c.read_smtp_reply().await.unwrap();
    assert!(r[0].starts_with("235"), "{r:?}");
}

fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 16);
    let mut at_line_start = true;
    for &b in msg {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// Runs the authorization-code request and returns the code (plain `#[test]`: blocking HTTP).
fn get_code(p: &provider::FakeProvider, client: &str, redirect: &str, verifier: &str) -> String {
    let url = format!(
        "{}?{}",
        p.auth_url(),
        http::encode_form(&[
            ("response_type", "code"),
            ("client_id", client),
            ("redirect_uri", redirect),
            ("scope", DEFAULT_SCOPE),
            ("state", "st&ate=1"),
            ("code_challenge", &pkce_challenge(verifier)),
            ("code_challenge_method", "S256"),
            ("login_hint", ALICE),
        ])
    );
    let r = http::get(&url).unwrap();
    assert_eq!(r.status, 302, "{}", r.text());
    let loc = url::Url::parse(&r.headers["location"]).unwrap();
    let q: std::collections::HashMap<_, _> = loc.query_pairs().into_owned().collect();
    assert_eq!(q["state"], "st&ate=1");
    q["code"].clone()
}

#[test]
fn provider_pkce_rotation_device_revocation() {
    let p = provider::FakeProvider::start();
    let redirect = "http://127.0.0.1:5555/callback";
    let verifier = "verifier-0123456789-0123456789-0123456789-abcdef";
    let tok = p.token_url();

    // Missing PKCE and unknown clients get an error page, not a redirect.
    let bad = format!(
        "{}?response_type=code&client_id={CLIENT_ID}&redirect_uri={redirect}&state=x",
        p.auth_url()
    );
    assert_eq!(http::get(&bad).unwrap().status, 400);
    let plain = format!("{bad}&code_challenge=abc&code_challenge_method=plain");
    assert_eq!(http::get(&plain).unwrap().status, 400);
    let unknown = format!(
        "{}?response_type=code&client_id=nobody&redirect_uri={redirect}&code_challenge=abc&code_challenge_method=S256",
        p.auth_url()
    );
    assert_eq!(http::get(&unknown).unwrap().status, 400);

    // Wrong verifier: invalid_grant (and the code is burnt).
    let code = get_code(&p, CLIENT_ID, redirect, verifier);
    let r = http::post_form(
        &tok,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", redirect),
            ("code_verifier", "wrong-verifier"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ],
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_grant");

    // Right verifier with Basic client auth: tokens. Second use: AADSTS54005.
    let code = get_code(&p, CLIENT_ID, redirect, verifier);
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", redirect),
        ("code_verifier", verifier),
    ];
    let r = http::post_form_basic(&tok, CLIENT_ID, CLIENT_SECRET, &form).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["token_type"], "Bearer");
    assert_eq!(j["scope"], DEFAULT_SCOPE);
    let access = j["access_token"].as_str().unwrap().to_string();
    let refresh = j["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(p.access_token_user(&access).as_deref(), Some(ALICE));
    let r = http::post_form_basic(&tok, CLIENT_ID, CLIENT_SECRET, &form).unwrap();
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(r.json()["error_description"].as_str().unwrap().contains("AADSTS54005"));
    assert_eq!(p.code_exchanges(), 1);
    assert_eq!(p.token_requests("authorization_code"), 3);
    assert_eq!(p.last_token_request().unwrap()["code_verifier"], verifier);

    // Bad client secret: 401 invalid_client.
    let r = http::post_form_basic(
        &tok,
        CLIENT_ID,
        "nope",
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_client");

    // Refresh without rotation: no new refresh token, old one stays valid.
    let rf = |rt: &str| {
        http::post_form(
            &tok,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
            ],
        )
        .unwrap()
    };
    let r = rf(&refresh);
    assert_eq!(r.status, 200);
    assert!(r.json().get("refresh_token").is_none());
    assert!(p.is_refresh_token_valid(&refresh));
    // With rotation: new one returned, old one dead.
    p.set_rotate_refresh_tokens(true);
    let r = rf(&refresh);
    let rt2 = r.json()["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt2, refresh);
    assert!(!p.is_refresh_token_valid(&refresh));
    assert_eq!(rf(&refresh).json()["error"], "invalid_grant");
    assert_eq!(p.refreshes(), 2);

    // Injected failures, then normal service.
    p.fail_next_token_requests(1, 503, r#"{"error":"temporarily_unavailable"}"#);
    assert_eq!(rf(&rt2).status, 503);
    assert_eq!(rf(&rt2).status, 200);

    // Short-lived access tokens expire for introspection.
    p.set_access_token_lifetime(Duration::from_millis(300));
    let r = rf(&p.issue_tokens(ALICE, "s").1).json();
    assert_eq!(r["expires_in"], 1);
    let short = r["access_token"].as_str().unwrap().to_string();
    let intro = |t: &str| http::post_form(&p.introspection_url(), &[("token", t)]).unwrap().json();
    assert_eq!(intro(&short)["active"], true);
    assert_eq!(intro(&short)["email"], ALICE);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(intro(&short)["active"], false);

    // Revocation kills the refresh token and its access tokens.
    p.set_access_token_lifetime(Duration::from_secs(3600));
    let (a, rt) = p.issue_tokens(ALICE, "s");
    assert_eq!(
        http::post_form(&p.revoke_url(), &[("token", &rt), ("token_type_hint", "refresh_token")])
            .unwrap()
            .status,
        200
    );
    assert!(!p.is_refresh_token_valid(&rt));
    assert_eq!(intro(&a)["active"], false);
    assert_eq!(p.revocations().last().unwrap().0, rt);
    p.invalidate_all_refresh_tokens();
    assert_eq!(rf(&rt2).json()["error"], "invalid_grant");

    // Device flow (public client): pending, slow_down, approve, redeem.
    p.register_client(ClientReg::public("dev-client"));
    let d = http::post_form(&p.device_url(), &[("client_id", "dev-client"), ("scope", "mail")])
        .unwrap()
        .json();
    let dc = d["device_code"].as_str().unwrap().to_string();
    let poll = || {
        http::post_form(
            &tok,
            &[
                ("grant_type", provider::DEVICE_GRANT),
                ("device_code", &dc),
                ("client_id", "dev-client"),
            ],
        )
        .unwrap()
        .json()
    };
    assert_eq!(poll()["error"], "authorization_pending");
    p.slow_down_next_polls(1);
    assert_eq!(poll()["error"], "slow_down");
    assert_eq!(
        p.pending_user_codes(),
        vec![d["user_code"].as_str().unwrap().to_string()]
    );
    assert!(p.approve_device(d["user_code"].as_str().unwrap(), BOB));
    let t = poll();
    assert_eq!(
        p.access_token_user(t["access_token"].as_str().unwrap()).as_deref(),
        Some(BOB)
    );
    let d2 = http::post_form(&p.device_url(), &[("client_id", "dev-client")])
        .unwrap()
        .json();
    p.deny_device(d2["user_code"].as_str().unwrap());
    let r = http::post_form(
        &tok,
        &[
            ("grant_type", provider::DEVICE_GRANT),
            ("device_code", d2["device_code"].as_str().unwrap()),
            ("client_id", "dev-client"),
        ],
    )
    .unwrap();
    assert_eq!(r.json()["error"], "access_denied");
}

#[tokio::test(flavor = "multi_thread")]
async fn approve_in_browser_hits_loopback_listener() {
    let p = provider::FakeProvider::start();
    // Stand-in for the program's redirect listener: answers with the received query.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (rd, mut wr) = s.into_split();
        let req = http::read_request(rd).await.unwrap();
        let body = format!("got code={}", req.query["code"].len());
        use tokio::io::AsyncWriteExt;
        wr.write_all(&http::Response::html(200, &body).to_bytes())
            .await
            .unwrap();
    });
    let redirect = format!("http://localhost:{port}/cb");
    let url = format!(
        "{}?{}",
        p.auth_url(),
        http::encode_form(&[
            ("response_type", "code"),
            ("client_id", CLIENT_ID),
            ("redirect_uri", &redirect),
            ("state", "s"),
            ("code_challenge", &pkce_challenge("v")),
            ("code_challenge_method", "S256"),
        ])
    );
    let (status, body) = provider::approve_in_browser(&url).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("got code="), "{body}");
    srv.await.unwrap();
    assert_eq!(p.authorize_hits(), 1);
    assert_eq!(
        p.last_authorize_request().unwrap()["redirect_uri"],
        format!("http://localhost:{port}/cb")
    );
}

#[test]
fn dovecot_starts_fast_and_stops_clean() {
    let p = provider::FakeProvider::start();
    let t = Instant::now();
    let mut d = crate::support::Dovecot::start(crate::support::DovecotOptions {
        introspection_url: p.introspection_url(),
        ..Default::default()
    });
    let took = t.elapsed();
    eprintln!("dovecot start took {took:?}");
    assert!(took < Duration::from_secs(5), "dovecot start took {took:?}");
    let dir = d.dir().to_path_buf();
    d.stop();
    // Nothing of this instance may survive stop().
    let ps = std::process::Command::new("ps")
        .args(["-eo", "pid,ppid,stat,args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(!ps.contains(&*dir.to_string_lossy()), "leftover processes:\n{ps}");
}

/// The master is tied to the process, not to the thread that started it
/// (PR_SET_PDEATHSIG would otherwise fire when that thread exits).
#[test]
fn dovecot_survives_spawning_thread_exit() {
    let d = std::thread::spawn(|| crate::support::Dovecot::start(Default::default()))
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let s = std::net::TcpStream::connect(("127.0.0.1", d.imap_port)).unwrap();
    let mut l = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut l).unwrap();
    assert!(l.starts_with("* OK"), "{l}");
}

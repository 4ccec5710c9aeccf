//! The owner model and the local web pages, end to end: only the owner sets
//! a local password; clients, the log and the status page never see the
//! provider's URL or `state`; the pages answer only their own loopback
//! address and refuse cross-origin POSTs; a grant for someone else is
//! refused.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::support::http;
use crate::support::mailproxy::run;
use crate::support::provider;
use crate::support::stranger::Stranger;
use crate::support::world::*;
use crate::support::LineConn;

/// A raw request with exactly the headers given (the test client always
/// sends the URL's own Host).
fn raw(addr: &str, head: &str, body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn host_port(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
}

fn field<'a>(html: &'a str, name: &str) -> &'a str {
    let at = html.find(&format!("name={name} value=\"")).expect(name);
    let rest = &html[at + name.len() + 13..];
    &rest[..rest.find('"').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_finishes_on_demand_in_a_browser_and_no_client_sets_the_password() {
    let mut w = World::new();
    w.with_status_page();
    let port = w.start();
    let status = w.status_addr();
    let auth_url = w.env.provider.auth_url();

    // Any client: an ALERT with the local start address, never the provider's URL or state.
    let first = login_response(port, ALICE, "a client's guess").await;
    assert!(first.starts_with("a1 NO [ALERT]"), "{first}");
    assert!(!first.contains(&auth_url) && !first.contains("state="), "{first}");
    assert!(first.contains(&format!("http://{status}/")), "{first}");

    let json = http::get(&format!("http://{status}/status.json")).unwrap().text();
    let html = http::get(&format!("http://{status}/")).unwrap().text();
    for page in [&json, &html] {
        assert!(!page.contains(&auth_url) && !page.contains("state="), "{page}");
    }
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let alice = doc["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account"] == ALICE)
        .unwrap();
    assert_eq!(alice["state"], "authorizing", "{json}");
    assert!(doc["kdf"]["runs"].is_u64(), "{json}");
    let start = alice["pending"]["url"].as_str().unwrap().to_string();
    assert!(start.starts_with(&format!("http://{status}/authorize/")), "{start}");
    assert!(
        !w.logs().contains(&auth_url),
        "the log names the local start address only"
    );

    // Foreign Host (DNS rebinding) and cross-origin POSTs are refused.
    let path = &start[start.find("/authorize").unwrap()..];
    assert_eq!(
        raw(
            &status,
            &format!("GET {path} HTTP/1.1\r\nHost: evil.example:80\r\n"),
            ""
        ),
        421
    );
    assert_eq!(
        raw(&status, "GET /status.json HTTP/1.1\r\nHost: evil.example\r\n", ""),
        421
    );
    assert_eq!(
        raw(
            &status,
            &format!("POST / HTTP/1.1\r\nHost: {status}\r\nOrigin: http://evil.example\r\n"),
            "x=1"
        ),
        403
    );

    // The status page's start address sends the browser on to the redirect
    // listener's own start address; each visit there redirects to the
    // provider with a fresh state and binds that browser with a cookie.
    let hop = http::get(&start).unwrap();
    assert_eq!(hop.status, 302, "{}", hop.text());
    let local_start = hop.headers["location"].clone();
    let (mut older, mut latest) = (http::Browser::new(), http::Browser::new());
    let a = older.send("GET", &local_start, &[], b"").unwrap();
    let b = latest.send("GET", &local_start, &[], b"").unwrap();
    assert_eq!((a.status, b.status), (302, 302));
    assert!(a.headers["set-cookie"].contains("HttpOnly"), "{:?}", a.headers);
    let (la, lb) = (a.headers["location"].clone(), b.headers["location"].clone());
    assert!(la.starts_with(&auth_url) && la != lb, "{la} {lb}");
    // The older state no longer works: approving it is refused by the redirect listener.
    let (r, _) = older.open(&la).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // The latest state, from a browser that did not visit the start address
    // (a relayed code), is refused too.
    let (code, body) = provider::approve_in_browser(&lb).await.unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not started in this browser"), "{body}");
    // The latest one, in its own browser, lands on the completion page.
    let (r, _) = latest.open(&lb).unwrap();
    let (code, page) = (r.status, r.text());
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("/complete") && page.contains("generated"), "{page}");
    // A second callback, even with the right state, is not accepted.
    let (r, _) = latest.open(&lb).unwrap();
    assert_eq!(r.status, 400);

    // Until the owner sets the password, no client gets in, whatever it sends.
    for pw in ["a client's guess", ALICE_PW, ""] {
        let r = login_response(port, ALICE, pw).await;
        assert!(r.starts_with("a1 NO [ALERT]") && r.contains("no local password"), "{r}");
    }

    let redirect = w.env.provider.last_authorize_request().unwrap()["redirect_uri"].clone();
    let redirect_host = host_port(&redirect);
    let token = field(&page, "token").to_string();
    let form = format!("token={token}&choice=own&password=alice+local+pw&repeat=alice+local+pw");
    assert_eq!(
        raw(&redirect_host, "GET / HTTP/1.1\r\nHost: rebind.example\r\n", ""),
        421,
        "the redirect listener checks Host too"
    );
    let cross = format!("POST /complete HTTP/1.1\r\nHost: {redirect_host}\r\nOrigin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\n");
    assert_eq!(raw(&redirect_host, &cross, &form), 403);
    let wrong_token = form.replace(&token, "forged");
    let post = format!("POST /complete HTTP/1.1\r\nHost: {redirect_host}\r\nOrigin: http://{redirect_host}\r\nContent-Type: application/x-www-form-urlencoded\r\n");
    // The page's token alone is not enough: the browser's cookie must come too.
    assert_eq!(raw(&redirect_host, &post, &form), 403);
    let cookie = latest.cookies_for(&redirect).expect("the start address set a cookie");
    let post = format!("{post}Cookie: {cookie}\r\n");
    assert_eq!(raw(&redirect_host, &post, &wrong_token), 403);
    assert_eq!(raw(&redirect_host, &post, &form), 200);

    let ok = login_response(port, ALICE, ALICE_PW).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    let no = login_response(port, ALICE, "a client's guess").await;
    assert!(no.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{no}");
    let audit = std::fs::read_to_string(w.dir.state_dir().join("audit.log")).unwrap();
    assert!(
        audit.contains("password_set") && audit.contains("completion page"),
        "{audit}"
    );
    assert!(!w.logs().contains(&token), "the completion token is not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_credentials_account_is_unusable_until_mailproxy_login() {
    const APP: &str = "app@example.org";
    let mut w = World::with(|env, _| {
        format!(
            "[accounts.\"{APP}\"]\nprovider = \"custom\"\nflow = \"client_credentials\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nscopes = [\"https://mail.example.org/.default\"]\nimap = \"imaps://localhost:{}\"\nca_file = \"{}\"\n",
            env.provider.auth_url(),
            env.provider.token_url(),
            provider::CLIENT_ID,
            provider::CLIENT_SECRET,
            env.dovecot.imaps_port,
            env.dovecot.ca_pem_path().display()
        )
    });
    w.env.provider.set_default_user(APP);
    let port = w.start();
    for _ in 0..3 {
        let r = login_response(port, APP, "any local process").await;
        assert!(r.starts_with("a1 NO [ALERT]") && r.contains("mailproxy login"), "{r}");
    }
    assert_eq!(w.env.provider.token_requests("client_credentials"), 0, "{}", w.logs());
    let (code, _, err) = run(&w.dir, &["login", APP], "app pw\n");
    assert_eq!(code, 0, "{err}");
    let t0 = Instant::now();
    loop {
        let r = login_response(port, APP, "app pw").await;
        if r.starts_with("a1 OK") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = login_response(port, APP, "any local process").await;
    assert!(r.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwd_changes_the_local_password() {
    let mut w = World::new();
    w.authorise(ALICE, "old pw");
    let (code, out, err) = run(&w.dir, &["passwd", ALICE], "wrong\nnew pw\n");
    assert_ne!(code, 0, "{out}{err}");
    let (code, out, err) = run(&w.dir, &["passwd", ALICE], "old pw\nnew pw\n");
    assert_eq!(code, 0, "{out}{err}");
    let port = w.start();
    assert!(login_response(port, ALICE, "new pw").await.starts_with("a1 OK"));
    assert!(login_response(port, ALICE, "old pw").await.starts_with("a1 NO"));
    let audit = std::fs::read_to_string(w.dir.state_dir().join("audit.log")).unwrap();
    assert!(audit.contains("password_changed"), "{audit}");
}

/// Needs the real `identity::verify` (a login at the account's server with
/// the new token); with the stub it fails at the exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailproxy_login_refuses_a_grant_for_another_user() {
    let w = World::new();
    w.env.provider.set_default_user("mallory@example.org");
    let (st, err) = w.dir.login(ALICE, ALICE_PW);
    assert!(!st.success(), "a grant for mallory was accepted for alice: {err}");
    assert!(err.contains("mallory@example.org") && err.contains(ALICE), "{err}");
    assert!(
        !w.dir
            .state_dir()
            .join("accounts")
            .join(format!("{ALICE}.json"))
            .exists(),
        "nothing stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_during_a_slow_refresh_leaves_the_account_erased() {
    let mut w = World::new();
    // No revocation endpoint: the in-flight refresh succeeds at the provider,
    // and only the local record decides.
    let cfg = std::fs::read_to_string(w.dir.config_path()).unwrap();
    let cfg: String = cfg
        .lines()
        .filter(|l| !l.starts_with("revoke_url"))
        .map(|l| format!("{l}\n"))
        .collect();
    w.dir.write_config(&cfg);
    w.authorise(ALICE, ALICE_PW);
    w.env.provider.set_rotate_refresh_tokens(true);
    let port = w.start();
    w.env.provider.set_token_delay(Duration::from_secs(3));
    // The first login after the start unlocks and refreshes (slowly).
    let slow = tokio::spawn(async move { login_response(port, ALICE, ALICE_PW).await });
    let t0 = Instant::now();
    while w.env.provider.token_requests("refresh_token") == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir_config = w.dir.config_path();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(crate::support::mailproxy::BIN)
            .args(["--config", dir_config.to_str().unwrap(), "revoke", ALICE])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    let vault_file = w.dir.state_dir().join("accounts").join(format!("{ALICE}.json"));
    assert!(!vault_file.exists());
    let _ = slow.await.unwrap();
    w.env.provider.set_token_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !vault_file.exists(),
        "the refresh wrote the revoked account back:\n{}",
        w.logs()
    );
    let r = login_response(port, ALICE, ALICE_PW).await;
    assert!(r.starts_with("a1 NO"), "{r}");
}

/// Twenty clients at once right after a restart, then twenty more: all get
/// in (one KDF), with the file vault and with the keyring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_first_logins_after_a_restart() {
    let user = format!("burst{}@example.org", std::process::id());
    for store in ["file", "keyring"] {
        let u = user.clone();
        let mut w = World::with(move |env, _| imaps_account(&u, env));
        w.server_setting(&format!("token_store = \"{store}\""));
        w.authorise(&user, "burst pw");
        w.start();
        let port = w.restart();
        for round in 0..2 {
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let u = user.clone();
                    tokio::spawn(async move { login_response(port, &u, "burst pw").await })
                })
                .collect();
            for t in tasks {
                let r = t.await.unwrap();
                assert!(r.starts_with("a1 OK"), "{store} round {round}: {r}\n{}", w.logs());
            }
        }
        let _ = run(&w.dir, &["revoke", &user], "burst pw\n");
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 (utime, stime), counted from the state field (3).
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Two hundred connections guessing for fifteen seconds cost a few
/// CPU-seconds (one KDF per failure delay), and the owner still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessing_flood_is_cheap_and_the_owner_still_logs_in() {
    let mut w = World::new();
    w.with_status_page();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    let status = w.status_addr();
    assert!(login_response(port, ALICE, ALICE_PW).await.starts_with("a1 OK"));
    let pid = w.proxy.as_ref().unwrap().pid();
    let cpu0 = cpu_seconds(pid);
    let stop = Instant::now() + Duration::from_secs(15);
    let guessers: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let mut n = 0u32;
                while Instant::now() < stop {
                    let Ok(mut c) = LineConn::plain(port).await else {
                        continue;
                    };
                    if c.read_line().await.is_err() {
                        continue;
                    }
                    while Instant::now() < stop {
                        n += 1;
                        let Ok(r) = c.imap("g", &format!("LOGIN \"{ALICE}\" \"guess {i} {n}\"")).await else {
                            break;
                        };
                        assert!(!r.tagged.starts_with("g OK"), "{}", r.tagged);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    let owner = login_response(port, ALICE, ALICE_PW).await;
    assert!(owner.starts_with("a1 OK"), "{owner}");
    assert!(
        t0.elapsed() < Duration::from_secs(17),
        "owner waited {:?}",
        t0.elapsed()
    );
    let kdf = http::get(&format!("http://{status}/status.json")).unwrap().json()["kdf"].clone();
    for g in guessers {
        g.abort();
        let _ = g.await;
    }
    let cpu = cpu_seconds(pid) - cpu0;
    let runs = kdf["runs"].as_u64().unwrap();
    assert!(runs <= 20, "KDF runs during the flood: {kdf}");
    assert!(cpu < 6.0, "the flood cost {cpu:.1} CPU-seconds ({kdf})");
}

/// Provider lifetimes of u64::MAX and 0: no panic, no storm, and background
/// refresh keeps working for another account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_token_lifetimes_neither_panic_nor_storm() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    w.authorise(CAROL, "carol pw");
    let port = w.start();
    w.env.provider.set_advertised_expires_in(Some(u64::MAX));
    let r = login_response(port, ALICE, ALICE_PW).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    w.env.provider.set_advertised_expires_in(Some(0));
    let r = login_response(port, CAROL, "carol pw").await;
    assert!(r.starts_with("a1 OK"), "{r}");
    let before = w.env.provider.total_token_requests();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let storm = w.env.provider.total_token_requests() - before;
    assert!(storm <= 1, "{storm} token requests in 4 s");
    assert!(w.proxy.as_mut().unwrap().is_running());
    // carol's 0 s token is planned as 30 s: refreshed in the background after ~10 s.
    w.env.provider.set_advertised_expires_in(None);
    let refreshed = w.env.provider.refreshes();
    let t0 = Instant::now();
    while w.env.provider.refreshes() == refreshed {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "no background refresh\n{}",
            w.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!w.logs().contains("panicked"), "{}", w.logs());
    let r = login_response(port, ALICE, ALICE_PW).await;
    assert!(r.starts_with("a1 OK"), "{r}");
}

/// Alice's account with a pinned `http://localhost:PORT/` redirect, as
/// Microsoft registrations have it; the port.
fn localhost_redirect(w: &World) -> u16 {
    let port = crate::support::dovecot::free_ports(1)[0];
    let cfg = std::fs::read_to_string(w.dir.config_path()).unwrap().replace(
        &format!("[accounts.\"{ALICE}\"]\n"),
        &format!("[accounts.\"{ALICE}\"]\nredirect_uri = \"http://localhost:{port}/\"\n"),
    );
    w.dir.write_config(&cfg);
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_local_user_cannot_take_a_localhost_redirect_through_ipv6() {
    let mut w = World::new();
    let redirect_port = localhost_redirect(&w);
    let port = w.start();

    // Another user listens on [::1] at the redirect's port first: the
    // sign-in does not start, and says why.
    let mut squatter = Stranger::run(&["squat", &redirect_port.to_string()]);
    assert_eq!(
        squatter.next().unwrap()["bound"],
        true,
        "[::1] is free before the sign-in"
    );
    let first = login_response(port, ALICE, "a client's guess").await;
    assert!(first.starts_with("a1 NO"), "{first}");
    let said = format!("{first}\n{}", w.logs());
    assert!(
        said.contains(&format!("another program listens on [::1]:{redirect_port}")),
        "the sign-in must not start while [::1]:{redirect_port} is someone else's: {first}"
    );
    drop(squatter);

    // Once it is free, mailproxy holds both addresses: the stranger cannot bind.
    let first = login_response(port, ALICE, "a client's guess").await;
    assert!(first.starts_with("a1 NO [ALERT]"), "{first}");
    let start = first[first.find("http://").unwrap()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let mut squatter = Stranger::run(&["squat", &redirect_port.to_string()]);
    let v = squatter.next().unwrap();
    assert_eq!(v["bound"], false, "[::1]:{redirect_port} is taken by mailproxy: {v}");

    // The owner's browser (which tries ::1 first, as browsers do) reaches
    // mailproxy and finishes.
    let mut browser = http::Browser::new();
    let (page, at) = browser.open(&start).unwrap();
    assert_eq!(page.status, 200, "{at}: {}", page.text());
    let body = page.text();
    assert!(body.contains("/complete"), "{body}");
    let done = browser
        .submit(
            &format!("http://localhost:{redirect_port}/complete"),
            &[
                ("token", field(&body, "token")),
                ("choice", "own"),
                ("password", ALICE_PW),
                ("repeat", ALICE_PW),
            ],
        )
        .unwrap();
    assert_eq!(done.status, 200, "{}", done.text());
    let ok = login_response(port, ALICE, ALICE_PW).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_in_pages_refuse_other_local_users() {
    let mut w = World::new();
    w.with_status_page();
    let port = w.start();
    let status = w.status_addr();
    let status_port: u16 = status.rsplit(':').next().unwrap().parse().unwrap();
    let first = login_response(port, ALICE, "a client's guess").await;
    assert!(first.starts_with("a1 NO [ALERT]"), "{first}");
    let start_path = format!("/authorize/{ALICE}");

    // The start button, without Origin, from another uid: no provider URL, no state.
    let r = Stranger::request(
        "127.0.0.1",
        status_port,
        &format!("POST {start_path} HTTP/1.1\r\nHost: {status}\r\nContent-Length: 0\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(!r.contains("state="), "{r}");
    assert!(w.wait_log("refused a request from another local user"), "{}", w.logs());

    // The owner's visit shows where the redirect listener is.
    let hop = http::get(&format!("http://{status}{start_path}")).unwrap();
    assert_eq!(hop.status, 302, "{}", hop.text());
    let loc = url::Url::parse(&hop.headers["location"]).unwrap();
    let redirect = loc
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map_or_else(|| loc.clone(), |(_, v)| url::Url::parse(&v).unwrap());
    let redirect_port = redirect.port().unwrap();

    // A forged error callback from another uid changes nothing.
    let r = Stranger::request(
        "127.0.0.1",
        redirect_port,
        &format!("GET /?state=forged&error=access_denied HTTP/1.1\r\nHost: 127.0.0.1:{redirect_port}\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // Nor does a visit to the start address there.
    let r = Stranger::request(
        "127.0.0.1",
        redirect_port,
        &format!("GET {start_path} HTTP/1.1\r\nHost: 127.0.0.1:{redirect_port}\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 403") && !r.contains("state="), "{r}");
    let json = http::get(&format!("http://{status}/status.json")).unwrap().json();
    let alice = json["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["account"] == ALICE)
        .unwrap()
        .clone();
    assert_eq!(alice["state"], "authorizing", "{json}");

    // Forty half-sent requests from another uid hold no slot: the owner's page still answers.
    let mut holder = Stranger::run(&["hold", "127.0.0.1", &status_port.to_string(), "40"]);
    assert_eq!(holder.next().unwrap()["held"], 40);
    let t = Instant::now();
    let r = http::get(&format!("http://{status}/status.json")).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    drop(holder);
}

#[test]
fn login_opens_the_browser_at_the_local_start_address() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    let w = World::new();
    // A stand-in for xdg-open that notes the address it was given.
    let bin = w.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let seen = w.dir.path().join("opened");
    let opener = bin.join("xdg-open");
    std::fs::write(&opener, format!("#!/bin/sh\necho \"$@\" > {}\n", seen.display())).unwrap();
    std::fs::set_permissions(&opener, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    let mut child = Command::new(crate::support::mailproxy::BIN)
        .args([
            "--config",
            w.dir.config_path().to_str().unwrap(),
            "login",
            ALICE,
            "--timeout",
            "30",
        ])
        .env("PATH", path)
        .env_remove("BROWSER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{ALICE_PW}\n").as_bytes())
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    assert!(
        crate::support::stranger::eventually(20, || seen.exists()
            && std::fs::read_to_string(&seen).is_ok_and(|s| s.ends_with('\n'))),
        "the browser was opened"
    );
    let url = std::fs::read_to_string(&seen).unwrap().trim().to_string();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/authorize/"),
        "{url}"
    );
    assert!(
        !url.contains("state=") && !url.contains(&w.env.provider.auth_url()),
        "{url}"
    );
    let (status, body) = provider::approve_in_browser_blocking(&url).unwrap();
    assert_eq!(status, 200, "{body}");
    let mut rest = String::new();
    while err.read_line(&mut rest).unwrap_or(0) > 0 {}
    assert!(child.wait().unwrap().success(), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_gets_in_during_a_flood_from_another_local_user_on_many_addresses() {
    let mut w = World::new();
    w.with_status_page();
    w.authorise(ALICE, ALICE_PW);
    // A fresh start: no password verified yet, so nothing is cached.
    let port = w.start();
    let status = w.status_addr();
    let mut flood = Stranger::run(&["flood", &port.to_string(), "200", ALICE, "20"]);
    assert_eq!(flood.next().unwrap()["started"], 200);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let t0 = Instant::now();
    let owner = login_response(port, ALICE, ALICE_PW).await;
    let took = t0.elapsed();
    assert!(owner.starts_with("a1 OK"), "{owner}");
    assert!(
        took < Duration::from_secs(15),
        "the owner waited {took:?}, past the failure-delay cap"
    );
    let kdf = http::get(&format!("http://{status}/status.json")).unwrap().json()["kdf"].clone();
    let seen = flood.next().expect("the flood's summary");
    assert_eq!(seen["ok"], 0, "{seen}");
    assert!(
        seen["no"].as_u64().unwrap() + seen["busy"].as_u64().unwrap() > 200,
        "a real flood: {seen}"
    );
    // The guesses stayed bounded: one KDF per failure delay, not one per guess.
    assert!(kdf["runs"].as_u64().unwrap() <= 25, "KDF runs during the flood: {kdf}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_users_turns_other_local_users_away_before_any_work() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    w.server_setting("local_users = \"owner\"");
    let port = w.start();
    let mut other = Stranger::run(&["greeting", "127.0.0.1", &port.to_string()]);
    let line = other.next().unwrap()["line"].as_str().unwrap().to_string();
    assert!(line.starts_with("* BYE") && line.contains("local_users"), "{line}");
    assert!(
        w.proxy.as_ref().unwrap().wait_log("local_users does not name"),
        "{}",
        w.logs()
    );
    let ok = login_response(port, ALICE, ALICE_PW).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");

    // Naming the user lets its programs in.
    drop(w.proxy.take());
    let cfg = std::fs::read_to_string(w.dir.config_path())
        .unwrap()
        .replace("local_users = \"owner\"", "local_users = [\"owner\", \"nobody\"]");
    w.dir.write_config(&cfg);
    let port = w.start();
    let mut other = Stranger::run(&["greeting", "127.0.0.1", &port.to_string()]);
    let line = other.next().unwrap()["line"].as_str().unwrap().to_string();
    assert!(line.starts_with("* OK"), "{line}");
}

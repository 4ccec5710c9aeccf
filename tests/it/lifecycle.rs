//! Authorisation flows and the account lifecycle, end to end: device flow,
//! client credentials, on-demand authorisation, background refresh, revoke,
//! decoded errors, hooks, hot reload, and the keyring store.

use std::time::{Duration, Instant};

use crate::support::mailproxy::{run, Proxy};
use crate::support::provider;
use crate::support::sample_message;
use crate::support::world::*;

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_with_slow_down() {
    let mut w = World::new();
    let p = &w.env.provider;
    p.slow_down_next_polls(1);
    let provider = &w.env.provider;
    let (st, err) = w.dir.login_with(ALICE, ALICE_PW, &["--device"], |line| {
        // "To authorise X, open URL on any device and enter the code ABCD-EFGH"
        let code = line.rsplit(' ').next().unwrap().to_string();
        assert!(line.contains(&provider.verification_url()), "{line}");
        let t0 = Instant::now();
        while !provider.pending_user_codes().contains(&code) {
            assert!(t0.elapsed() < Duration::from_secs(5), "code {code} not pending");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(provider.approve_device(&code, ALICE));
    });
    assert!(st.success(), "{err}");
    assert!(err.contains("poll more slowly"), "slow_down was handled visibly: {err}");
    assert!(p.token_requests(provider::DEVICE_GRANT) >= 2, "polled at least twice");
    let port = w.start();
    let mut c = login_ok(port, ALICE, ALICE_PW).await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_account() {
    const APP: &str = "app@example.org";
    let mut w = World::with(|env, _| {
        let d = &env.dovecot;
        format!(
            "[accounts.\"{APP}\"]\nprovider = \"custom\"\nflow = \"client_credentials\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nscopes = [\"https://mail.example.org/.default\"]\nimap = \"imaps://localhost:{}\"\nca_file = \"{}\"\n",
            env.provider.auth_url(),
            env.provider.token_url(),
            provider::CLIENT_ID,
            provider::CLIENT_SECRET,
            d.imaps_port,
            d.ca_pem_path().display()
        )
    });
    // App-only tokens carry the mailbox the app was granted.
    w.env.provider.set_default_user(APP);
    let (code, _, err) = run(&w.dir, &["login", APP], "app local pw\n");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no refresh token is kept: client credentials"), "{err}");
    let vault = read(&w.dir.state_dir().join("accounts").join(format!("{APP}.json")));
    assert!(!vault.contains("refresh_token\": {"), "{vault}");
    // No user, no refresh token: the proxy fetches the app token by itself at start.
    let before = w.env.provider.token_requests("client_credentials");
    let port = w.start();
    let t0 = Instant::now();
    while w.env.provider.token_requests("client_credentials") == before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no token fetched in the background"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = login_ok(port, APP, "app local pw").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    assert_eq!(
        w.env.provider.token_requests("client_credentials"),
        before + 1,
        "the login used the cached token"
    );
    // A wrong local password is still refused.
    let tagged = login_response(port, APP, "nope").await;
    assert!(tagged.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{tagged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_authorisation_runs_once_for_twenty_clients() {
    let mut w = World::new();
    w.with_status_page();
    let port = w.start();
    let status_addr = w.status_addr();

    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { login_response(port, ALICE, "first pw").await }))
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    for a in &answers {
        assert!(a.starts_with("a1 NO [ALERT]"), "{a}");
        assert!(
            a.contains("is not authorised yet") && a.contains(&format!("http://{status_addr}/")),
            "{a}"
        );
    }
    // The status page shows one pending authorisation with its local start address.
    let page = crate::support::http::get(&format!("http://{status_addr}/status.json"))
        .unwrap()
        .text();
    let doc: serde_json::Value = serde_json::from_str(&page).unwrap();
    let alice = doc["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account"] == ALICE)
        .unwrap()
        .clone();
    assert_eq!(alice["state"], "authorizing", "{page}");
    let start = alice["pending"]["url"].as_str().unwrap().to_string();
    assert!(
        start.starts_with(&format!("http://{status_addr}/authorize/")),
        "{start}"
    );
    let html = crate::support::http::get(&format!("http://{status_addr}/"))
        .unwrap()
        .text();
    assert!(html.contains("sign in") && html.contains(ALICE), "{html}");

    // The browser that visits the start address is the one that may finish.
    let mut browser = crate::support::http::Browser::new();
    let (r, _) = browser.open(&start).unwrap();
    let (status, body) = (r.status, r.text());
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.env.provider.authorize_hits(), 1, "one authorisation");
    assert_eq!(w.env.provider.code_exchanges(), 1, "one token exchange");

    // The owner sets the local password on the completion page; no client can.
    let tagged = login_response(port, ALICE, "first pw").await;
    assert!(tagged.starts_with("a1 NO [ALERT]"), "{tagged}");
    let at = body.find("name=token value=\"").unwrap() + 18;
    let token = &body[at..at + body[at..].find('"').unwrap()];
    let redirect_uri = w.env.provider.last_authorize_request().unwrap()["redirect_uri"].clone();
    let done = browser
        .submit(
            &format!("{}complete", redirect_uri),
            &[
                ("token", token),
                ("choice", "own"),
                ("password", "first pw"),
                ("repeat", "first pw"),
            ],
        )
        .unwrap();
    assert_eq!(done.status, 200, "{}", done.text());
    let mut c = login_ok(port, ALICE, "first pw").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    let tagged = login_response(port, ALICE, "other pw").await;
    assert!(tagged.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{tagged}");
    drop(login_ok(port, ALICE, "first pw").await);
    let audit = read(&w.dir.state_dir().join("audit.log"));
    assert!(
        audit.contains("authorization_started") && audit.contains("\"consent\"") && audit.contains("password_set"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_refresh_keeps_idle_and_new_logins_going() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    // A 60 s lifetime: renewed in the background 20 s after issue.
    w.env.provider.set_access_token_lifetime(Duration::from_secs(60));
    w.env.provider.expire_all_access_tokens();
    let mut idle = login_ok(port, ALICE, ALICE_PW).await;
    assert!(idle.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    idle.send("i1 IDLE").await.unwrap();
    assert!(idle.read_line().await.unwrap().starts_with("+ "));
    let logs_at_start = w.logs().matches("access token refreshed").count();
    let refreshes_at_start = w.env.provider.refreshes();

    let t0 = Instant::now();
    let mut logins = 0;
    while t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut c = login_ok(port, ALICE, ALICE_PW).await;
        assert!(c.imap("n", "NOOP").await.unwrap().is_ok());
        logins += 1;
    }
    w.env
        .dovecot
        .deliver(ALICE, &sample_message("x@y", ALICE, "late", "late1"));
    let l = idle.read_until_prefix("* 1 EXISTS").await.unwrap();
    assert_eq!(l, "* 1 EXISTS");
    idle.send("DONE").await.unwrap();
    assert!(idle.read_imap_response("i1").await.unwrap().is_ok());

    // Refreshes happened in the background (one per ~20 s), none at login.
    let refreshed = w.env.provider.refreshes() - refreshes_at_start;
    assert!(refreshed >= 1, "background refreshes in 30 s: {refreshed}");
    let logs = w.logs();
    let at_login = logs
        .lines()
        .filter(|l| l.contains("access token refreshed") && l.contains("conn{"))
        .count();
    let retried = logs
        .lines()
        .filter(|l| l.contains("refreshing and retrying once"))
        .count();
    assert!(logins >= 8);
    assert!(logs.matches("access token refreshed").count() > logs_at_start);
    // The only refresh inside a connection is the first login after the start (nothing cached yet).
    assert_eq!(
        at_login, 1,
        "only the first, cold login refreshes: {at_login}, retries {retried}\n{logs}"
    );
}

/// Seconds from `t0`, for messages.
fn since(t0: Instant, t: Instant) -> String {
    format!("{:.1}", t.saturating_duration_since(t0).as_secs_f64())
}

/// The background refresher renews at the planned time, with one floor
/// between attempts: a 30 s token two thirds of its lifetime before expiry
/// (10 s after issue), a 15 s token at the 10 s floor, five seconds before it
/// expires. No token lapses before the next is issued, and no login is
/// needed for any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_refresh_renews_at_the_planned_time() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    let p = &w.env.provider;
    p.set_access_token_lifetime(Duration::from_secs(30));
    let t0 = Instant::now();
    // The first login unlocks the account and gets the first 30 s token.
    drop(login_ok(port, ALICE, ALICE_PW).await);
    let issued = || -> Vec<(Instant, Instant)> {
        p.access_token_times(ALICE)
            .into_iter()
            .filter(|(at, _)| *at >= t0)
            .collect()
    };
    // Four background renewals: of two 30 s tokens (the second renewal
    // already hands out a 15 s token), then of two 15 s tokens.
    let mut seen = 1;
    while seen < 5 {
        let now = issued();
        let times = || now.iter().map(|(at, _)| since(t0, *at)).collect::<Vec<_>>().join(", ");
        assert!(!now.is_empty(), "the first login got no token");
        let (last, _) = *now.last().unwrap();
        assert!(
            last.elapsed() < Duration::from_secs(13),
            "no renewal {:.1} s after the token issued at {} s; tokens issued at {} s\n{}",
            last.elapsed().as_secs_f64(),
            since(t0, last),
            times(),
            w.logs()
        );
        if now.len() > seen {
            seen = now.len();
            if seen == 2 {
                p.set_access_token_lifetime(Duration::from_secs(15));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = issued();
    let times = all.iter().map(|(at, _)| since(t0, *at)).collect::<Vec<_>>().join(", ");
    assert_eq!(all.len(), 5, "tokens issued at {times} s");
    for pair in all.windows(2) {
        let ((prev_at, prev_expires), (at, _)) = (pair[0], pair[1]);
        let gap = at.duration_since(prev_at);
        assert!(
            gap >= Duration::from_secs(8) && gap <= Duration::from_secs(12),
            "renewed {:.1} s after the previous token, not ~10 s; tokens issued at {times} s",
            gap.as_secs_f64()
        );
        assert!(
            at < prev_expires,
            "the token issued at {} s lapsed at {} s before the next was issued at {} s; tokens issued at {times} s",
            since(t0, prev_at),
            since(t0, prev_expires),
            since(t0, at)
        );
    }
    // All of them in the background: only the first login refreshed.
    let logs = w.logs();
    let at_login = logs
        .lines()
        .filter(|l| l.contains("access token refreshed") && l.contains("conn{"))
        .count();
    assert!(at_login <= 1, "{at_login} refreshes at login\n{logs}");
    assert!(!logs.contains("refreshing and retrying once"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_erases_every_trace_and_calls_the_provider() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    drop(login_ok(port, ALICE, ALICE_PW).await);
    let vault_file = w.dir.state_dir().join("accounts").join(format!("{ALICE}.json"));
    assert!(vault_file.exists());

    let (code, out, err) = run(&w.dir, &["revoke", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("revoked the refresh token at"), "{out}");
    assert!(
        out.contains("erased:") && out.contains(&vault_file.display().to_string()),
        "{out}"
    );
    let revs = w.env.provider.revocations();
    assert_eq!(revs.len(), 1, "{revs:?}");
    assert_eq!(revs[0].1.as_deref(), Some("refresh_token"));
    assert!(!w.env.provider.is_refresh_token_valid(&revs[0].0));
    assert!(!vault_file.exists());
    let audit = read(&w.dir.state_dir().join("audit.log"));
    assert!(audit.contains("\"revoked\"") && audit.contains("\"erased\""), "{audit}");
    assert!(!audit.contains(&revs[0].0), "no token in the audit log");

    // The running proxy notices without a restart: no more logins with the old state.
    let tagged = login_response(port, ALICE, ALICE_PW).await;
    assert!(
        tagged.starts_with("a1 NO [ALERT]") && tagged.contains("not authorised"),
        "{tagged}"
    );
    // `accounts` reads what the running proxy reports (refreshed within seconds).
    let t0 = Instant::now();
    loop {
        let (code, out, _) = run(&w.dir, &["accounts"], "");
        assert_eq!(code, 0);
        let line = out.lines().find(|l| l.starts_with(ALICE)).unwrap().to_string();
        if line.contains("authorizing") || line.contains("needs login") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_provider_errors_reach_the_client_and_run_the_hook() {
    let mut w = World::new();
    let hook_out = w.dir.path().join("hook.out");
    let cfg = read(&w.dir.config_path()).replace(
        "[server]\n",
        &format!(
            "[server]\non_reauth_needed = \"echo \\\"$MAILPROXY_ACCOUNT\\\" >> {}\"\n",
            hook_out.display()
        ),
    );
    std::fs::write(w.dir.config_path(), cfg).unwrap();
    w.authorise(ALICE, ALICE_PW);
    let cases = [
        (
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS50076: Due to a configuration change made by your administrator, you must use multi-factor authentication."}"#,
            "multi-factor",
        ),
        (
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS65001: The user or administrator has not consented."}"#,
            "consented",
        ),
        (
            401,
            r#"{"error":"invalid_client","error_description":"bad secret"}"#,
            "check client_id and client_secret",
        ),
        (
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS700082: The refresh token has expired due to inactivity."}"#,
            "inactivity",
        ),
        (503, "<html>down</html>", "could not be reached"),
    ];
    for (status, body, want) in cases {
        let port = w.restart();
        w.env.provider.fail_next_token_requests(1, status, body);
        let tagged = login_response(port, ALICE, ALICE_PW).await;
        assert!(tagged.starts_with("a1 NO ["), "{tagged}");
        assert!(tagged.contains(want), "{want}: {tagged}");
    }
    let hook = read(&hook_out);
    assert!(
        hook.lines().filter(|l| *l == ALICE).count() >= 3,
        "hook ran for each needs-login: {hook:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_keeps_live_sessions_and_rejects_a_broken_config() {
    const NEW: &str = "newcomer@example.org";
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    let mut live = login_ok(port, ALICE, ALICE_PW).await;
    assert!(live.imap("s", "SELECT INBOX").await.unwrap().is_ok());

    // A broken config is reported; the running one stays in force.
    let good = read(&w.dir.config_path());
    std::fs::write(
        w.dir.config_path(),
        format!("{good}\n[accounts.\"x@y\"]\nprovider = \"nonsense\"\n"),
    )
    .unwrap();
    w.proxy.as_ref().unwrap().signal(libc::SIGHUP);
    assert!(
        w.proxy.as_ref().unwrap().wait_log("config reload failed"),
        "{}",
        w.logs()
    );
    drop(login_ok(port, ALICE, ALICE_PW).await);

    // A good config with a new passthrough account takes effect.
    let d = &w.env.dovecot;
    std::fs::write(
        w.dir.config_path(),
        format!("{good}\n[accounts.\"{NEW}\"]\nprovider = \"password\"\nusername = \"{BOB}\"\nimap = \"imap://127.0.0.1:{}\"\n", d.imap_port),
    )
    .unwrap();
    w.proxy.as_ref().unwrap().signal(libc::SIGHUP);
    assert!(
        w.proxy.as_ref().unwrap().wait_log("configuration reloaded"),
        "{}",
        w.logs()
    );
    let mut c = login_ok(port, NEW, BOB_PW).await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    // The session from before the reload still works, and so does alice (unchanged, still unlocked).
    assert!(live.imap("n", "NOOP").await.unwrap().is_ok());
    drop(login_ok(port, ALICE, ALICE_PW).await);
}

/// The same lifecycle with the refresh token in the OS keyring (kernel
/// keyutils here) and in the file vault: with the keyring an account is
/// usable and refreshed right after a restart; with the file vault it waits,
/// locked, for the local password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_store_and_file_vault() {
    // A name of its own: the keyring is shared by everything in this session.
    let user = format!("kr{}@example.org", std::process::id());
    for store in ["keyring", "file"] {
        let u = user.clone();
        let mut w = World::with(move |env, _| imaps_account(&u, env));
        w.server_setting(&format!("token_store = \"{store}\""));
        w.authorise(&user, "kr pw");
        let record = read(&w.dir.state_dir().join("accounts").join(format!("{user}.json")));
        if store == "keyring" {
            assert!(record.contains("\"token_store\": \"keyring\""), "{record}");
            assert!(!record.contains("ciphertext"), "{record}");
            let shown = std::process::Command::new("keyctl")
                .args(["show", "@u"])
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&shown.stdout).contains(&user),
                "keyutils holds the token"
            );
        } else {
            assert!(record.contains("ciphertext"), "{record}");
        }
        let before = w.env.provider.refreshes();
        let port = w.start();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = w.env.provider.refreshes();
        if store == "keyring" {
            assert!(w
                .proxy
                .as_ref()
                .unwrap()
                .wait_log("refresh tokens are kept in the OS keyring"));
            assert_eq!(after, before + 1, "refreshed at start without any client: {}", w.logs());
        } else {
            assert_eq!(after, before, "locked until a client gives the password");
        }
        let mut c = login_ok(port, &user, "kr pw").await;
        assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
        let (code, out, _) = run(&w.dir, &["revoke", &user], "kr pw\n");
        assert_eq!(code, 0, "{out}");
        if store == "keyring" {
            assert!(out.contains("OS keyring"), "{out}");
            let shown = std::process::Command::new("keyctl")
                .args(["show", "@u"])
                .output()
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&shown.stdout).contains(&user),
                "erased from keyutils"
            );
        }
        let _: Option<Proxy> = w.proxy.take();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_check_commands() {
    let w = World::new();
    let (code, out, _) = run(&w.dir, &["accounts"], "");
    assert_eq!(code, 0);
    assert!(out.starts_with("ACCOUNT"), "{out}");
    let alice = out.lines().find(|l| l.starts_with(ALICE)).unwrap();
    assert!(alice.contains("needs login"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with(BOB) && l.contains("passthrough")),
        "{out}"
    );

    w.authorise(ALICE, ALICE_PW);
    let (code, out, _) = run(&w.dir, &["accounts"], "");
    assert_eq!(code, 0);
    let alice = out.lines().find(|l| l.starts_with(ALICE)).unwrap();
    assert!(
        alice.contains("locked") && alice.contains("https://mail.example.org/"),
        "{out}"
    );

    let (code, out, err) = run(&w.dir, &["check", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{ALICE}: ok")), "{out}");
    let (code, out, _) = run(&w.dir, &["check", ALICE], "wrong\n");
    assert_ne!(code, 0, "{out}");
    w.env.provider.invalidate_all_refresh_tokens();
    let (code, out, _) = run(&w.dir, &["check", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("needs action") && out.contains(&format!("mailproxy login {ALICE}")),
        "{out}"
    );
}

/// Client credentials with a certificate: the proxy signs an RS256 JWT
/// assertion that the provider verifies with the registered public key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_a_certificate() {
    const APP: &str = "certapp@example.org";
    const CLIENT: &str = "mailproxy-cert-client";
    let keys = tempfile::tempdir().unwrap();
    let (cert, key) = (keys.path().join("app.crt"), keys.path().join("app.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=app", "-days", "1", "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = std::process::Command::new("openssl")
        .args(["rsa", "-RSAPublicKey_out", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(public.status.success());
    let (c2, k2) = (cert.clone(), key.clone());
    let mut w = World::with(move |env, _| {
        let d = &env.dovecot;
        format!(
            "[accounts.\"{APP}\"]\nprovider = \"custom\"\nflow = \"client_credentials\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT}\"\nclient_certificate = \"{}\"\nclient_key = \"{}\"\nscopes = [\"https://mail.example.org/.default\"]\nimap = \"imaps://localhost:{}\"\nca_file = \"{}\"\n",
            env.provider.auth_url(),
            env.provider.token_url(),
            c2.display(),
            k2.display(),
            d.imaps_port,
            d.ca_pem_path().display()
        )
    });
    w.env
        .provider
        .register_client(provider::ClientReg::with_assertion_key(CLIENT, public.stdout));
    w.env.provider.set_default_user(APP);
    let (code, _, err) = run(&w.dir, &["login", APP], "cert pw\n");
    assert_eq!(code, 0, "{err}");
    let form = w.env.provider.last_token_request().unwrap();
    assert_eq!(form.get("grant_type").map(String::as_str), Some("client_credentials"));
    assert!(
        form.contains_key("client_assertion") && !form.contains_key("client_secret"),
        "{form:?}"
    );
    let port = w.start();
    let mut c = login_ok(port, APP, "cert pw").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());

    // A key the provider does not know is refused, with the provider's reason.
    w.env
        .provider
        .register_client(provider::ClientReg::with_assertion_key(CLIENT, vec![0u8; 10]));
    let (code, out, _) = run(&w.dir, &["check", APP], "");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("check client_id and client_secret") || out.contains("does not recognise the client"),
        "{out}"
    );
}

/// `mailproxy login` while `serve` runs: the running proxy picks the new
/// authorisation and local password up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_while_serving_takes_effect() {
    let mut w = World::new();
    w.authorise(ALICE, "old pw");
    let port = w.start();
    drop(login_ok(port, ALICE, "old pw").await);
    w.authorise(ALICE, ALICE_PW);
    let mut c = login_ok(port, ALICE, ALICE_PW).await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    let tagged = login_response(port, ALICE, "old pw").await;
    assert!(
        tagged.starts_with("a1 NO [AUTHENTICATIONFAILED]"),
        "the old password is gone: {tagged}"
    );
}

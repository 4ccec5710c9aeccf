//! Provider coverage beyond the happy path, end to end with the real binary
//! and the private Dovecot: Google Workspace service accounts, domain-wide
//! accounts, shared mailboxes through another account's grant, the
//! seven-day Google hint, HTTP proxies for provider calls, and IPv6.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::support::mailproxy::run;
use crate::support::provider;
use crate::support::world::*;
use crate::support::LineConn;

const SERVICE_ACCOUNT: &str = "mailproxy@test-project.iam.gserviceaccount.com";

/// A service account key as Google issues it (JSON with a PKCS#8 PEM RSA
/// key), written 0600; returns its path and the public key (PKCS#1 DER).
fn service_account_key(dir: &Path) -> (PathBuf, Vec<u8>, String) {
    let pem_path = dir.join("sa.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem_path)
        .output()
        .expect("openssl (run scripts/test to install the test dependencies)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = std::process::Command::new("openssl")
        .args(["rsa", "-RSAPublicKey_out", "-outform", "DER", "-in"])
        .arg(&pem_path)
        .output()
        .unwrap();
    assert!(public.status.success());
    let pem = std::fs::read_to_string(&pem_path).unwrap();
    std::fs::remove_file(&pem_path).unwrap();
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": SERVICE_ACCOUNT,
        "client_id": "100000000000000000001",
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let path = dir.join("service-account.json");
    std::fs::write(&path, json.to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A line of the key's base64, to look for in logs.
    let probe = pem.lines().nth(3).unwrap().to_string();
    (path, public.stdout, probe)
}

/// The settings of a service-account account or domain entry at the fake provider.
fn service_account_settings(env: &crate::support::Env, key: &Path) -> String {
    let d = &env.dovecot;
    format!(
        "provider = \"custom\"\nflow = \"service_account\"\nservice_account_key = \"{}\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\nscopes = [\"https://mail.google.com/\"]\nimap = \"imaps://localhost:{}\"\nca_file = \"{}\"\n\n",
        key.display(),
        env.provider.auth_url(),
        env.provider.token_url(),
        d.imaps_port,
        d.ca_pem_path().display()
    )
}

const DAVE: &str = "dave@example.org";
const ERIN: &str = "erin@example.org";

/// One service account acts for two mailboxes: each assertion names its
/// own `sub`, each mailbox has its own local password and token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_serves_two_mailboxes() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public, probe) = service_account_key(keys.path());
    let k = key.clone();
    let mut w = World::with(move |env, _| {
        let s = service_account_settings(env, &k);
        format!("[accounts.\"{DAVE}\"]\n{s}[accounts.\"{ERIN}\"]\n{s}")
    });
    w.env.provider.register_service_account(SERVICE_ACCOUNT, public);

    // The key is a secret: refused while others can read it.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run(&w.dir, &["accounts"], "");
    assert_ne!(code, 0);
    assert!(
        err.contains("service_account_key") && err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    for (who, pw) in [(DAVE, "dave local pw"), (ERIN, "erin local pw")] {
        let (code, _, err) = run(&w.dir, &["login", who], &format!("{pw}\n"));
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("no refresh token is kept: client credentials and service accounts"),
            "{err}"
        );
        let form = w.env.provider.last_token_request().unwrap();
        assert_eq!(form["grant_type"], provider::JWT_BEARER_GRANT, "{form:?}");
        assert!(!form.contains_key("client_secret") && !form.contains_key("refresh_token"));
    }
    assert_eq!(w.env.provider.jwt_bearer_subjects(), [DAVE, ERIN]);
    let (code, out, _) = run(&w.dir, &["accounts"], "");
    assert_eq!(code, 0);
    for who in [DAVE, ERIN] {
        let row = out.lines().find(|l| l.starts_with(who)).unwrap();
        assert!(row.contains("service_account") && row.contains(" ok"), "{out}");
    }

    let port = w.start();
    let mut dave = login_ok(port, DAVE, "dave local pw").await;
    let mut erin = login_ok(port, ERIN, "erin local pw").await;
    for c in [&mut dave, &mut erin] {
        assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    }
    // Each session is its own mailbox upstream (Dovecot took each token as its sub).
    let log = w.env.dovecot.log();
    for who in [DAVE, ERIN] {
        assert!(log.contains(&format!("user=<{who}>")), "{log}");
    }
    let no = login_response(port, DAVE, "erin local pw").await;
    assert!(no.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{no}");
    // One assertion per mailbox at login, one more each once serve runs
    // (in whichever order its sessions and upkeep asked).
    let mut subjects = w.env.provider.jwt_bearer_subjects();
    subjects.sort();
    assert_eq!(subjects, [DAVE, DAVE, ERIN, ERIN]);
    assert!(!w.logs().contains(&probe), "the private key is not logged");
    let (code, out, _) = run(&w.dir, &["check", ERIN], "");
    assert_eq!(code, 0, "{out}");
}

/// `[accounts."@example.org"]` serves a mailbox without an entry of its
/// own once its owner set it up; explicit entries win; `login`, `passwd`,
/// `accounts`, `check` and `revoke` all take the mailbox's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_entry_serves_a_mailbox_without_its_own_entry() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public, _) = service_account_key(keys.path());
    let k = key.clone();
    let mut w =
        World::with(move |env, _| format!("[accounts.\"@example.org\"]\n{}", service_account_settings(env, &k)));
    w.env.provider.register_service_account(SERVICE_ACCOUNT, public);
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();

    // Not set up yet: refused with what its owner does, and nothing asked at the provider.
    let r = login_response(port, DAVE, "a guess").await;
    assert!(
        r.starts_with("a1 NO [ALERT]") && r.contains(&format!("mailproxy login {DAVE}")),
        "{r}"
    );
    for not_an_address in ["@example.org", "da..ve@example.org", "dave@other.example"] {
        let r = login_response(port, not_an_address, "x").await;
        assert!(r.starts_with("a1 NO"), "{r}");
    }
    assert!(w.env.provider.jwt_bearer_subjects().is_empty());

    let (code, _, err) = run(&w.dir, &["login", "Dave@Example.org"], "dave pw\n");
    assert_eq!(code, 0, "{err}");
    assert_eq!(w.env.provider.jwt_bearer_subjects(), [DAVE]);
    // The running proxy takes it up without a restart.
    let mut c = login_ok(port, DAVE, "dave pw").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    // The explicit entry wins: alice's own browser grant, no assertion for her.
    let mut a = login_ok(port, ALICE, ALICE_PW).await;
    assert!(a.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    assert!(!w.env.provider.jwt_bearer_subjects().contains(&ALICE.to_string()));
    // Passthrough bob keeps his own entry too.
    let r = login_response(port, BOB, BOB_PW).await;
    assert!(r.starts_with("a1 OK"), "{r}");

    let (code, out, _) = run(&w.dir, &["accounts"], "");
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("@example.org") && l.contains("domain entry")),
        "{out}"
    );
    let row = out.lines().find(|l| l.starts_with(DAVE)).expect("dave listed");
    assert!(row.contains("service_account") && row.contains(" ok"), "{out}");
    assert!(!out.contains("da..ve"), "{out}");

    let (code, out, err) = run(&w.dir, &["check", DAVE], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{DAVE}: ok")), "{out}");
    let (code, _, err) = run(&w.dir, &["passwd", DAVE], "new dave pw\n");
    assert_eq!(code, 0, "{err}");
    let r = login_response(port, DAVE, "dave pw").await;
    assert!(r.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{r}");
    drop(login_ok(port, DAVE, "new dave pw").await);

    let (code, out, err) = run(&w.dir, &["revoke", DAVE], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("erased"), "{out}");
    let r = login_response(port, DAVE, "new dave pw").await;
    assert!(r.starts_with("a1 NO"), "{r}");
}

const GRACE: &str = "grace@example.org";
const GRACE_PW: &str = "grace local pw";
const SHARED: &str = "shared@example.org";
const SHARED_PW: &str = "shared local pw";

/// `token_from`: the shared mailbox has its own local password and logs in
/// upstream as itself with the delegate's token (what the recording
/// upstream saw); Exchange's "not connected" refusal is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_mailbox_uses_the_delegates_grant() {
    let rec = crate::support::recording_imap::RecordingImap::start();
    let rec_port = rec.port;
    let mut w = World::with(move |env, _| {
        let d = &env.dovecot;
        format!(
            "{}[accounts.\"{SHARED}\"]\ntoken_from = \"{GRACE}\"\nimap = \"imap://127.0.0.1:{rec_port}\"\n",
            crate::support::mailproxy::oauth_account(
                GRACE,
                &env.provider,
                d,
                &format!("imaps://localhost:{}", d.imaps_port)
            )
        )
    });
    let (code, _, err) = run(&w.dir, &["login", SHARED], &format!("{SHARED_PW}\n"));
    assert_ne!(code, 0);
    assert!(err.contains(&format!("run `mailproxy login {GRACE}` first")), "{err}");
    // The grant's own account is checked at its own server, as itself.
    w.authorise(GRACE, GRACE_PW);
    let (code, _, err) = run(&w.dir, &["login", SHARED], &format!("{SHARED_PW}\n"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("uses the grant of {GRACE}")), "{err}");
    assert!(rec.logins().is_empty(), "nothing was checked with the shared name");
    let (code, out, _) = run(&w.dir, &["accounts"], "");
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with(SHARED)).unwrap();
    assert!(row.contains(&format!("uses the grant of {GRACE}")), "{out}");

    let port = w.start();
    // With the file store the grant is sealed under grace's password: locked until she logs in.
    let r = login_response(port, SHARED, SHARED_PW).await;
    assert!(
        r.starts_with("a1 NO") && r.contains(&format!("{GRACE} is locked")),
        "{r}"
    );
    drop(login_ok(port, GRACE, GRACE_PW).await);
    let r = login_response(port, SHARED, GRACE_PW).await;
    assert!(
        r.starts_with("a1 NO [AUTHENTICATIONFAILED]"),
        "its own password, not grace's: {r}"
    );
    let mut c = login_ok(port, SHARED, SHARED_PW).await;
    assert!(c.imap("n", "NOOP").await.unwrap().is_ok());
    let logins = rec.logins();
    assert_eq!(logins.len(), 1, "{logins:?}");
    assert_eq!(logins[0].0, SHARED);
    assert!(
        w.env.provider.access_tokens_of(GRACE).contains(&logins[0].1),
        "the token is grace's"
    );

    rec.refuse_with("User is authenticated but not connected.");
    let r = login_response(port, SHARED, SHARED_PW).await;
    assert!(
        r.starts_with("a1 NO") && r.contains(&format!("Add-MailboxPermission -Identity {SHARED}")),
        "{r}"
    );
    assert!(rec.logins().iter().all(|(u, _)| u == SHARED));
}

/// Moves the record's `authorized_at` back by `days` (the grant's age).
fn age_grant(w: &World, account: &str, days: u64) {
    let path = w.dir.state_dir().join("accounts").join(format!("{account}.json"));
    let mut rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let at = rec["authorized_at"].as_u64().unwrap();
    rec["authorized_at"] = serde_json::json!(at - days * 86400 - 600);
    std::fs::write(&path, rec.to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// On the shared PostgreSQL store too, a service account's tokens come from
/// the JWT bearer grant: at `login`, and again when the server stops
/// accepting the access token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_on_the_shared_store_uses_the_jwt_bearer_grant() {
    let pg = crate::support::postgres::Postgres::start();
    let keys = tempfile::tempdir().unwrap();
    let (key, public, _) = service_account_key(keys.path());
    let mut w = World::with(move |env, _| {
        let s = service_account_settings(env, &key);
        format!("[accounts.\"{DAVE}\"]\n{s}[accounts.\"{ERIN}\"]\n{s}")
    });
    w.server_setting(pg.server_settings().trim_end());
    w.env.provider.register_service_account(SERVICE_ACCOUNT, public);
    let (code, _, err) = run(&w.dir, &["login", DAVE], "dave local pw\n");
    assert_eq!(code, 0, "{err}");
    assert_eq!(pg.psql("SELECT count(*) FROM mailproxy_accounts"), "1", "{err}");

    let port = w.start();
    let mut c = login_ok(port, DAVE, "dave local pw").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    drop(c);
    let before = w.env.provider.jwt_bearer_subjects().len();
    w.env.provider.expire_all_access_tokens();
    let mut c = login_ok(port, DAVE, "dave local pw").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok(), "{}", w.logs());
    assert_eq!(
        w.env.provider.jwt_bearer_subjects().len(),
        before + 1,
        "one new assertion for the expired token\n{}",
        w.logs()
    );
    let form = w.env.provider.last_token_request().unwrap();
    assert_eq!(form["grant_type"], provider::JWT_BEARER_GRANT, "{form:?}");

    // The other mailbox's `login` while serve runs goes through serve.
    let (code, _, err) = run(&w.dir, &["login", ERIN], "erin local pw\n");
    assert_eq!(code, 0, "{err}\n{}", w.logs());
    assert!(err.contains("no refresh token is kept"), "{err}");
    let mut c = login_ok(port, ERIN, "erin local pw").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok(), "{}", w.logs());
    assert_eq!(pg.psql("SELECT count(*) FROM mailproxy_accounts"), "2");
}

/// A Google refresh token that dies seven days after consent: `check`, the
/// log and the audit trail say the app is in Testing status and how to
/// publish it; a grant that dies at another age is just "revoked or expired".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seven_day_google_death_names_the_testing_status() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    w.env.provider.expire_refresh_tokens_like_google();
    let (code, out, _) = run(&w.dir, &["check", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no longer accepts the refresh token") && !out.contains("Testing"),
        "{out}"
    );

    age_grant(&w, ALICE, 7);
    let (code, out, _) = run(&w.dir, &["check", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 1, "{out}");
    for part in [
        "Testing status",
        "Publish app",
        "no verification is needed",
        &format!("mailproxy login {ALICE}"),
    ] {
        assert!(out.contains(part), "{part}: {out}");
    }
    let audit_path = w.dir.state_dir().join("audit.log");
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    assert!(audit.lines().last().unwrap().contains("Testing status"), "{audit}");

    // The running proxy says the same when its refresh fails.
    let port = w.start();
    let r = login_response(port, ALICE, ALICE_PW).await;
    assert!(r.starts_with("a1 NO"), "{r}");
    assert!(w.proxy.as_ref().unwrap().wait_log("Testing status"), "{}", w.logs());
    // The audit trail is written behind the log: wait for its needs_login entry.
    let t0 = std::time::Instant::now();
    loop {
        let audit = std::fs::read_to_string(&audit_path).unwrap();
        if audit
            .lines()
            .any(|l| l.contains("\"needs_login\"") && l.contains("Testing status"))
        {
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{audit}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Google's device flow cannot grant the Gmail scope: refused at config
/// load and for `login --device`, with the ssh -L alternative.
#[test]
fn the_device_flow_is_refused_for_google() {
    let dir = crate::support::mailproxy::ProxyDir::new();
    let google = "[accounts.\"g@gmail.com\"]\nprovider = \"google\"\nclient_id = \"id\"\n";
    dir.write_config(&format!("{}{google}flow = \"device\"\n", dir.header()));
    let (code, _, err) = run(&dir, &["accounts"], "");
    assert_ne!(code, 0);
    assert!(
        err.contains("accounts.\"g@gmail.com\".flow") && err.contains("ssh -L 8765:127.0.0.1:8765 HOST"),
        "{err}"
    );
    dir.write_config(&format!("{}{google}", dir.header()));
    let (code, _, err) = run(&dir, &["login", "g@gmail.com", "--device"], "pw\n");
    assert_ne!(code, 0);
    assert!(
        err.contains("Google's device flow does not accept the Gmail scope")
            && err.contains("mailproxy login g@gmail.com --no-browser"),
        "{err}"
    );
}

/// Provider calls go through `[server] http_proxy`, or through the proxy
/// `HTTP_PROXY` names (unless `NO_PROXY` exempts the host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_go_through_the_http_proxy() {
    use crate::support::http_proxy::HttpProxy;
    use crate::support::mailproxy::Proxy;
    let configured = HttpProxy::start();
    let mut w = World::new();
    let plain = std::fs::read_to_string(w.dir.config_path()).unwrap();
    w.dir.write_config(&plain.replace(
        "[server]\n",
        &format!("[server]\nhttp_proxy = \"{}\"\n", configured.url()),
    ));
    let token_request = format!("POST {}", w.env.provider.token_url());
    w.authorise(ALICE, ALICE_PW);
    assert!(
        configured.requests().contains(&token_request),
        "{:?}",
        configured.requests()
    );
    let (code, out, _) = run(&w.dir, &["check", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(configured.requests().iter().filter(|r| **r == token_request).count(), 2);

    // From the environment, for serve.
    w.dir.write_config(&plain);
    let from_env = HttpProxy::start();
    let url = from_env.url();
    w.proxy = Some(Proxy::start_env(&w.dir, &[("HTTP_PROXY", &url)]));
    let port = w.proxy.as_ref().unwrap().imap_port();
    let refreshes = w.env.provider.refreshes();
    drop(login_ok(port, ALICE, ALICE_PW).await);
    assert_eq!(w.env.provider.refreshes(), refreshes + 1);
    assert_eq!(from_env.requests(), std::slice::from_ref(&token_request));

    // NO_PROXY exempts the provider's host.
    w.proxy.take().unwrap().stop();
    w.proxy = Some(Proxy::start_env(
        &w.dir,
        &[("HTTP_PROXY", &url), ("NO_PROXY", "127.0.0.1")],
    ));
    let port = w.proxy.as_ref().unwrap().imap_port();
    drop(login_ok(port, ALICE, ALICE_PW).await);
    assert_eq!(w.env.provider.refreshes(), refreshes + 2);
    assert_eq!(from_env.requests().len(), 1, "{:?}", from_env.requests());
}

/// A whole session over IPv6: the listener on `[::1]`, the upstream
/// `imaps://[::1]:PORT` (its certificate names ::1), the identity check at
/// `mailproxy login` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_ipv6_loopback() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        panic!(
            "this machine has no IPv6 loopback ([::1]: {e}); the IPv6 test needs it: \
             enable it with `sysctl net.ipv6.conf.lo.disable_ipv6=0` (containers: run with IPv6 enabled), then run scripts/test"
        );
    }
    crate::support::require_dovecot();
    let env = crate::support::Env::start_with(&[], |o| {
        o.extra_config = "service imap-login {\n  inet_listener imaps {\n    address = 127.0.0.1, ::1\n  }\n}\n".into();
    });
    let over_v6 = |log: &str| {
        log.lines()
            .filter(|l| l.contains("imap-login:") && l.contains("rip=::1") && l.contains("TLS"))
            .count()
    };
    let dir = crate::support::mailproxy::ProxyDir::new();
    let d = &env.dovecot;
    let mut cfg = dir.header().replace("listen = \"127.0.0.1:0\"", "listen = \"[::1]:0\"");
    cfg +=
        &crate::support::mailproxy::oauth_account(ALICE, &env.provider, d, &format!("imaps://[::1]:{}", d.imaps_port));
    dir.write_config(&cfg);
    let (st, err) = dir.login(ALICE, ALICE_PW);
    assert!(st.success(), "{err}");
    assert_eq!(
        over_v6(&d.log()),
        1,
        "the identity check logged in over ::1:\n{}",
        d.log()
    );
    let proxy = crate::support::mailproxy::Proxy::start(&dir);
    let addr = proxy.imap.unwrap();
    assert_eq!(
        addr.ip(),
        std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        "{addr}"
    );
    let mut c = LineConn::plain_addr(addr).await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with("* OK"));
    let r = c
        .imap("a1", &format!("LOGIN \"{ALICE}\" \"{ALICE_PW}\""))
        .await
        .unwrap();
    assert!(r.is_ok(), "{}", r.tagged);
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    assert_eq!(over_v6(&d.log()), 2, "the session came over ::1 with TLS:\n{}", d.log());
    assert!(
        proxy.logs().contains("imaps://[::1]:"),
        "the log names the IPv6 upstream"
    );
    assert_no_secrets(&proxy.logs(), &env, &[ALICE_PW]);
}

/// An `https://` token endpoint behind `HTTPS_PROXY`: the refresh is
/// tunnelled with `CONNECT` (and TLS to the provider runs through it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_token_request_is_tunnelled_with_connect() {
    use crate::support::http_proxy::{HttpProxy, TlsFront};
    use crate::support::mailproxy::Proxy;
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let front = TlsFront::start(w.env.provider.addr());
    let cfg = std::fs::read_to_string(w.dir.config_path()).unwrap();
    let https = format!("https://localhost:{}/token", front.port);
    w.dir.write_config(&cfg.replace(&w.env.provider.token_url(), &https));
    let proxy = HttpProxy::start();
    let (url, ca) = (proxy.url(), front.ca_path.display().to_string());
    w.proxy = Some(Proxy::start_env(
        &w.dir,
        &[("HTTPS_PROXY", &url), ("SSL_CERT_FILE", &ca)],
    ));
    let port = w.proxy.as_ref().unwrap().imap_port();
    let refreshes = w.env.provider.refreshes();
    let mut c = login_ok(port, ALICE, ALICE_PW).await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    assert_eq!(w.env.provider.refreshes(), refreshes + 1);
    assert_eq!(proxy.requests(), [format!("CONNECT localhost:{}", front.port)]);
}

//! `mailproxy token`: clients that speak OAuth themselves (msmtp, curl,
//! Python) log in straight at the private Dovecot with the token it prints,
//! through a running `serve` and without one; another uid is refused by
//! `serve` and audited; twenty callers after an expiry cause one refresh;
//! `--json` and the exit statuses 0, 1 and 2.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::clients::snippet;
use crate::support::mailproxy::{run, BIN};
use crate::support::stranger::{eventually, Stranger};
use crate::support::world::*;
use crate::support::{dovecot, sample_message};

const PAGE: &str = "docs/clients/token.md";
const README: &str = "README.md";
const FRIEND: &str = "friend@example.com";

fn uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn audit(w: &World) -> String {
    std::fs::read_to_string(w.dir.state_dir().join("audit.log")).unwrap_or_default()
}

/// `mailproxy token ARGS` with `stdin`: the exit status, stdout and stderr;
/// no secret but the token on stdout.
fn token(w: &World, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    let (code, out, err) = run(&w.dir, &all, stdin);
    assert_no_secrets(&err, &w.env, &[ALICE_PW]);
    (code, out, err)
}

/// The token `mailproxy token ALICE` prints; it must succeed.
fn alice_token(w: &World, stdin: &str) -> String {
    let (code, out, err) = token(w, &[ALICE], stdin);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    out.trim().to_string()
}

/// A home for the clients, with `mailproxy` on the PATH and the test's
/// config in `MAILPROXY_CONFIG`, so the page's snippets run as written.
struct Home {
    dir: PathBuf,
    config: PathBuf,
}

impl Home {
    fn new(w: &World) -> Home {
        let dir = w.dir.path().join("home");
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let link = dir.join("bin/mailproxy");
        if !link.exists() {
            std::os::unix::fs::symlink(BIN, &link).unwrap();
        }
        Home {
            dir,
            config: w.dir.config_path(),
        }
    }

    /// A snippet of the page with this test's account, servers and CA.
    fn fill(&self, w: &World, file: &str, name: &str) -> String {
        let d = &w.env.dovecot;
        let ca = d.ca_pem_path().display().to_string();
        let python_imaps = format!(
            "imaplib.IMAP4_SSL(\"localhost\", {}, ssl_context=__import__(\"ssl\").create_default_context(cafile=\"{ca}\"))",
            d.imaps_port
        );
        snippet(file, name)
            .replace("alice@gmail.com", ALICE)
            .replace("smtp.gmail.com", "localhost")
            .replace("port 465", &format!("port {}", d.submissions_port))
            .replace("tls on\n", &format!("tls on\ntls_trust_file {ca}\n"))
            .replace(
                "imaps://imap.gmail.com/",
                &format!("imaps://localhost:{}/", d.imaps_port),
            )
            .replace("curl -s ", &format!("curl -s --cacert {ca} "))
            .replace("imaplib.IMAP4_SSL(\"imap.gmail.com\")", &python_imaps)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// `prog args` in the home, killed after 60 s; it must succeed.
    fn run(&self, prog: &str, args: &[&str], stdin: &[u8]) -> String {
        use std::io::Write;
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("timeout")
            .arg("60")
            .arg(prog)
            .args(args)
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("PATH", path)
            .env("MAILPROXY_CONFIG", &self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{prog}: {e}"));
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out: Output = child.wait_with_output().unwrap();
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{prog} failed ({}):\n{o}\n{e}", out.status);
        o.into_owned()
    }

    /// msmtp with the page's config (`auth` as given) sends to the friend
    /// through Dovecot's submission service; the sink gets it.
    fn msmtp_sends(&self, w: &World, (file, name): (&str, &str), auth: &str, pw_file: Option<&PathBuf>, n: usize) {
        let mut rc = self.fill(w, file, name).replace("auth oauthbearer", auth);
        if let Some(f) = pw_file {
            rc = rc.replace(
                &format!("\"mailproxy token {ALICE}\""),
                &format!("\"mailproxy token {ALICE} < {}\"", f.display()),
            );
        }
        self.write(".msmtprc", &rc);
        let subject = format!("token {auth} {n}");
        let msg = sample_message(ALICE, FRIEND, &subject, &format!("t{n}"));
        self.run("msmtp", &[FRIEND], &msg);
        let got = w.env.sink.wait_for(n, Duration::from_secs(20));
        assert_eq!(got.len(), n, "{got:?}");
        let data = String::from_utf8_lossy(&got[n - 1].data).into_owned();
        assert!(data.contains(&subject), "{data}");
    }

    /// curl's snippet lists the INBOX at Dovecot (`stdin` for a password).
    fn curl_lists(&self, w: &World, (file, name): (&str, &str), stdin: &str) {
        let out = self.run("sh", &["-c", &self.fill(w, file, name)], stdin.as_bytes());
        assert!(out.contains("EXISTS"), "{out}");
    }
}

#[test]
fn clients_log_in_at_dovecot_with_tokens_from_serve() {
    let mut w = World::new();
    w.start();
    w.authorise(ALICE, ALICE_PW);
    w.env
        .dovecot
        .deliver(ALICE, &sample_message("x@example.net", ALICE, "hello", "h1"));
    let refreshes = w.env.provider.refreshes();

    let t = alice_token(&w, "");
    assert_eq!(w.env.provider.access_token_user(&t).as_deref(), Some(ALICE));
    assert!(w.proxy.as_ref().unwrap().wait_log("command=Token"), "through serve");
    let (code, out, err) = token(&w, &[ALICE, "--json"], "");
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["account"], ALICE);
    assert_eq!(j["access_token"], t.as_str(), "the cached token");
    assert_eq!(j["token_type"], "Bearer");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = j["expires_at_unix"].as_u64().unwrap();
    assert!(exp >= now + 300 && exp <= now + 3600, "{j}");
    let rfc = j["expires_at"].as_str().unwrap();
    assert!(
        rfc.len() == 20 && rfc.ends_with('Z') && rfc.as_bytes()[10] == b'T',
        "{rfc}"
    );
    assert!(j["expires_in"].as_u64().unwrap() >= 300, "{j}");
    let scopes: Vec<&str> = j["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(scopes.contains(&"https://mail.example.org/"), "{j}");

    let home = Home::new(&w);
    home.msmtp_sends(&w, (PAGE, "token-msmtprc"), "auth oauthbearer", None, 1);
    home.msmtp_sends(&w, (PAGE, "token-msmtprc"), "auth xoauth2", None, 2);
    home.msmtp_sends(&w, (README, "readme-token-msmtprc"), "auth oauthbearer", None, 3);
    home.curl_lists(&w, (PAGE, "token-curl"), "");
    home.curl_lists(&w, (README, "readme-token-curl"), "");
    for (file, name) in [(PAGE, "token-python"), (README, "readme-token-python")] {
        let script = home.write("token.py", &home.fill(&w, file, name));
        let out = home.run("python3", &[script.to_str().unwrap()], b"");
        assert!(out.contains("1 messages"), "{name}: {out}");
    }
    assert_eq!(
        w.env.provider.refreshes(),
        refreshes,
        "the grant's token served them all"
    );

    let audit = audit(&w);
    assert!(audit.contains(&format!("token handed out to uid {}", uid())), "{audit}");
    assert!(audit.contains("token_handed_out"), "{audit}");
    assert_no_secrets(&audit, &w.env, &[ALICE_PW]);

    // Graph is not wired yet; an account never authorised; no such account.
    let (code, out, err) = token(&w, &[ALICE, "--resource", "graph"], "");
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("does not send through Microsoft Graph"), "{err}");
    let (code, out, err) = token(&w, &[CAROL], "");
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("needs login"), "{err}");
    let (code, out, err) = token(&w, &["nobody@example.org"], "");
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
}

#[test]
fn exit_status_through_serve_is_2_when_temporary_and_1_for_a_dead_grant() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    w.start();
    // Locked since the start (file vault): the command is asked for the
    // local password; then the provider has a bad day.
    w.env
        .provider
        .fail_next_token_requests(1, 503, r#"{"error":"temporarily_unavailable"}"#);
    let (code, out, err) = token(&w, &[ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("temporarily failing"), "{err}");
    assert!(w.proxy.as_ref().unwrap().wait_log("command=Token"), "through serve");

    w.env.provider.invalidate_all_refresh_tokens();
    let (code, out, err) = token(&w, &[ALICE], "");
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("needs action") && err.contains("login"), "{err}");
}

#[test]
fn clients_log_in_at_dovecot_with_tokens_from_the_vault_without_serve() {
    let w = World::new();
    w.authorise(ALICE, ALICE_PW);
    w.env
        .dovecot
        .deliver(ALICE, &sample_message("x@example.net", ALICE, "hello", "h1"));
    let pw = format!("{ALICE_PW}\n");

    let t = alice_token(&w, &pw);
    assert_eq!(w.env.provider.access_token_user(&t).as_deref(), Some(ALICE));
    let (code, out, err) = token(&w, &[ALICE, "--json"], &pw);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["account"], ALICE);
    assert!(j["expires_in"].as_u64().unwrap() > 3000, "{j}");
    assert!(j["scopes"].as_array().is_some_and(|s| !s.is_empty()), "{j}");

    let home = Home::new(&w);
    let pw_file = home.write("pw", &pw);
    home.msmtp_sends(&w, (PAGE, "token-msmtprc"), "auth oauthbearer", Some(&pw_file), 1);
    home.curl_lists(&w, (PAGE, "token-curl"), &pw);
    assert!(audit(&w).contains(&format!("token handed out to uid {}", uid())));

    let (code, out, err) = token(&w, &[ALICE], "not the password\n");
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("wrong local password"), "{err}");

    // The provider cannot be reached: temporary.
    let cfg = std::fs::read_to_string(w.dir.config_path()).unwrap();
    let closed = format!("http://127.0.0.1:{}/token", dovecot::free_ports(1)[0]);
    w.dir.write_config(&cfg.replace(&w.env.provider.token_url(), &closed));
    let (code, out, err) = token(&w, &[ALICE], &pw);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("temporarily failing"), "{err}");
    w.dir.write_config(&cfg);

    // A revoked grant: a person must log in again.
    w.env.provider.invalidate_all_refresh_tokens();
    let (code, out, err) = token(&w, &[ALICE], &pw);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("needs action"), "{err}");
}

#[test]
fn another_uid_is_refused_by_serve_and_audited() {
    let mut w = World::new();
    w.start();
    w.authorise(ALICE, ALICE_PW);
    // Modes opened up, so the stranger reaches the socket: the peer's uid
    // is what refuses it.
    let sock = w.dir.state_dir().join("control.sock");
    for (p, mode) in [
        (w.dir.path().to_path_buf(), 0o711),
        (w.dir.state_dir(), 0o711),
        (sock.clone(), 0o666),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let ask = format!(r#"{{"command":"token","account":"{ALICE}","min_life_secs":300}}"#);
    let mut s = Stranger::run(&["control", sock.to_str().unwrap(), &ask]);
    let v = s.next().expect("the stranger's line");
    let reply = v["reply"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(
        reply.starts_with(r#"{"reply":"error""#) && reply.contains("refused"),
        "{reply}"
    );
    assert!(
        eventually(5, || audit(&w).contains("token refused to uid 65534")),
        "{}",
        audit(&w)
    );
    assert!(audit(&w).contains("token_refused"));
    assert!(!audit(&w).contains("handed out to uid 65534"));
    // The owner still gets one.
    alice_token(&w, "");
}

#[test]
fn twenty_callers_after_the_token_expired_cause_one_refresh() {
    let mut w = World::new();
    w.start();
    let p = &w.env.provider;
    p.set_access_token_lifetime(Duration::from_secs(12));
    w.authorise(ALICE, ALICE_PW);
    let first = alice_token(&w, "");
    // The background refresh (due 10 s after issue) fails once, so the
    // token expires with nobody renewing it.
    p.fail_next_token_requests(1, 503, r#"{"error":"temporarily_unavailable"}"#);
    assert!(
        eventually(20, || p.token_requests("refresh_token") >= 1),
        "{}",
        w.logs()
    );
    std::thread::sleep(Duration::from_secs(3));
    let before = p.refreshes();
    let got: Vec<String> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..20).map(|_| s.spawn(|| alice_token(&w, ""))).collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert_eq!(
        p.refreshes(),
        before + 1,
        "one refresh for twenty callers\n{}",
        w.logs()
    );
    assert!(got.iter().all(|t| *t == got[0] && *t != first), "one new token for all");
    assert_eq!(p.access_token_user(&got[0]).as_deref(), Some(ALICE));
}

//! `mailproxy token`: clients that speak OAuth themselves (msmtp, mbsync,
//! neomutt, aerc, curl, Python) log in straight at the private Dovecot with
//! the token it prints, through a running `serve` and without one; another
//! uid is refused by `serve` and audited; twenty callers after an expiry
//! cause one refresh; `--json` and the exit statuses 0, 1 and 2.

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

/// `prog` is on the PATH.
fn installed(prog: &str) {
    let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()));
    assert!(found, "{prog} is not installed: run scripts/install-deps");
}

/// Cyrus SASL has an XOAUTH2 plugin (for mbsync).
fn sasl_xoauth2_plugin() {
    let dirs = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("sasl2"))
        .chain([PathBuf::from("/usr/lib/sasl2")]);
    let found = dirs
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().to_lowercase().contains("xoauth2"));
    assert!(
        found,
        "Cyrus SASL's XOAUTH2 plugin (libsasl2-modules-kdexoauth2) is not installed: run scripts/install-deps"
    );
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
        let (imaps, submissions) = (d.imaps_port, d.submissions_port);
        snippet(file, name)
            .replace("alice@gmail.com", ALICE)
            .replace("alice%40gmail.com", &ALICE.replace('@', "%40"))
            // mbsync
            .replace(
                "Host imap.gmail.com\n",
                &format!("Host localhost\nPort {imaps}\nCertificateFile {ca}\n"),
            )
            // neomutt
            .replace(
                "set imap_user",
                &format!("set ssl_ca_certificates_file = \"{ca}\"\nset imap_user"),
            )
            .replace("smtp.gmail.com:465", &format!("localhost:{submissions}"))
            // aerc
            .replace("@imap.gmail.com\n", &format!("@localhost:{imaps}\n"))
            .replace("@smtp.gmail.com\n", &format!("@localhost:{submissions}\n"))
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

    /// `prog args` in the home, with `mailproxy` on the PATH and the
    /// test's config; the program must be installed.
    fn command(&self, prog: &str) -> Command {
        installed(prog);
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("timeout");
        cmd.arg("60")
            .arg(prog)
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("PATH", path)
            .env("MAILPROXY_CONFIG", &self.config)
            .env("XDG_RUNTIME_DIR", &self.dir)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("MAIL");
        cmd
    }

    /// `prog args` in the home, killed after 60 s; it must succeed.
    fn run(&self, prog: &str, args: &[&str], stdin: &[u8]) -> String {
        use std::io::Write;
        let mut child = self
            .command(prog)
            .args(args)
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

    /// aerc with the page's `accounts.conf`, on `script`'s pseudo-terminal
    /// (aerc 0.14 has no batch mode): it opens the INBOX with OAUTHBEARER
    /// and lists it; a `mailto:` URL handed to it opens a message, which
    /// `y` on its review screen sends with OAUTHBEARER (the sink's `n`th);
    /// `:quit`. aerc has no CA option: Go's `SSL_CERT_FILE` trusts the
    /// test's CA.
    fn aerc_reads_and_sends(&self, w: &World, (file, name): (&str, &str), n: usize) {
        installed("aerc");
        std::fs::create_dir_all(self.dir.join(".config/aerc")).unwrap();
        self.write(".config/aerc/accounts.conf", &self.fill(w, file, name));
        let screen = self.dir.join(format!("aerc-{name}.screen"));
        let (imap, smtp) = (logins(w, "imap", "OAUTHBEARER"), logins(w, "submission", "OAUTHBEARER"));
        let child = self
            .command("script")
            .args(["-qec", "aerc", "/dev/null"])
            .env("TERM", "xterm")
            .env("COLUMNS", "120")
            .env("LINES", "30")
            .env("EDITOR", "true")
            .env("SSL_CERT_FILE", w.env.dovecot.ca_pem_path())
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&screen).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut aerc = Terminal { child, screen };
        logged_in(w, name, "imap", "OAUTHBEARER", imap);
        aerc.shows(name, "first of two");
        aerc.shows(name, "second of two");

        let subject = format!("aerc {name}");
        let url = format!(
            "mailto:{FRIEND}?subject={}&body=Sent%20by%20aerc.",
            subject.replace(' ', "%20")
        );
        self.run("aerc", &[&url], b"");
        aerc.shows(name, "Send this email?");
        aerc.keys(b"y");
        let got = w.env.sink.wait_for(n, Duration::from_secs(30));
        assert_eq!(got.len(), n, "{name}: {got:?}\n{:?}", aerc.seen());
        assert_eq!(got[n - 1].rcpt_to, [FRIEND], "{:?}", got[n - 1]);
        let data = String::from_utf8_lossy(&got[n - 1].data).into_owned();
        assert!(data.contains(&format!("Subject: {subject}")), "{data}");
        logged_in(w, name, "submission", "OAUTHBEARER", smtp);
        aerc.quit(name, b":quit\r");
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

/// A terminal program on `script`'s pseudo-terminal (under `timeout`):
/// keys go to its stdin, what it draws to the `screen` file. Ended
/// (SIGTERM, which `timeout` passes on) if the test fails before it quits.
struct Terminal {
    child: std::process::Child,
    screen: PathBuf,
}

impl Terminal {
    fn seen(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.screen).unwrap_or_default()).into_owned()
    }

    fn keys(&mut self, keys: &[u8]) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(keys).unwrap();
        stdin.flush().unwrap();
    }

    /// `text` is drawn within 30 s. aerc 0.14 sometimes draws a change only
    /// at the next key: every 2 s `:` opens its command line and Escape
    /// closes it again. Then a second's pause, so that Escape and the next
    /// key do not read as one Alt key.
    fn shows(&mut self, what: &str, text: &str) {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        let mut nudge = std::time::Instant::now() + Duration::from_secs(2);
        while !self.seen().contains(text) {
            let now = std::time::Instant::now();
            assert!(now < end, "{what}: no {text:?} on the screen: {:?}", self.seen());
            if now > nudge {
                self.keys(b":");
                std::thread::sleep(Duration::from_millis(300));
                self.keys(b"\x1b");
                nudge = now + Duration::from_secs(2);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    /// `keys` make it exit 0 within 5 s; typed again (up to three times)
    /// if a status message of aerc's swallowed them.
    fn quit(&mut self, what: &str, keys: &[u8]) {
        for _ in 0..3 {
            self.keys(keys);
            if eventually(5, || matches!(self.child.try_wait(), Ok(Some(_)))) {
                break;
            }
            self.keys(b"\x1b");
            std::thread::sleep(Duration::from_secs(1));
        }
        let status = self.child.try_wait().unwrap();
        assert!(
            status.is_some_and(|s| s.success()),
            "{what}: {status:?}: {:?}",
            self.seen()
        );
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let _ = self.child.wait();
        }
    }
}

/// Dovecot's logins of alice with `mech` so far (`service` is `imap` or
/// `submission`).
fn logins(w: &World, service: &str, mech: &str) -> usize {
    let line = format!("{service}-login: Info: Login: user=<{ALICE}>, method={mech},");
    w.env.dovecot.log().matches(&line).count()
}

/// Dovecot logs more logins of alice with `mech` than `before` (its log
/// process writes a moment later).
fn logged_in(w: &World, what: &str, service: &str, mech: &str, before: usize) {
    assert!(
        eventually(30, || logins(w, service, mech) > before),
        "{what}: no {service} login with {mech}\n{}",
        w.env.dovecot.log()
    );
}

#[test]
fn mbsync_neomutt_and_aerc_log_in_at_dovecot_with_tokens_from_serve() {
    let mut w = World::new();
    w.start();
    w.authorise(ALICE, ALICE_PW);
    for (subject, id) in [("first of two", "m1"), ("second of two", "m2")] {
        w.env
            .dovecot
            .deliver(ALICE, &sample_message("x@example.net", ALICE, subject, id));
    }
    let refreshes = w.env.provider.refreshes();
    let home = Home::new(&w);

    // mbsync: XOAUTH2 through Cyrus SASL's plugin, the INBOX mirrored.
    sasl_xoauth2_plugin();
    for (file, name) in [(PAGE, "token-mbsyncrc"), (README, "readme-token-mbsyncrc")] {
        let before = logins(&w, "imap", "XOAUTH2");
        let _ = std::fs::remove_dir_all(home.dir.join("Mail"));
        std::fs::create_dir_all(home.dir.join("Mail/gmail")).unwrap();
        home.write(".mbsyncrc", &home.fill(&w, file, name));
        home.run("mbsync", &["gmail"], b"");
        let mut got = String::new();
        for sub in ["new", "cur"] {
            for e in std::fs::read_dir(home.dir.join("Mail/gmail/INBOX").join(sub)).unwrap() {
                got.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
            }
        }
        assert!(
            got.contains("Subject: first of two") && got.contains("Subject: second of two"),
            "{name}: the Maildir has {got:?}"
        );
        logged_in(&w, name, "imap", "XOAUTH2", before);
    }

    // neomutt: in batch mode it sends with OAUTHBEARER at the submission
    // service; on a terminal (`script`'s pty) it opens the INBOX with
    // OAUTHBEARER, shows its index and quits.
    for (n, (file, name)) in [(PAGE, "token-muttrc"), (README, "readme-token-muttrc")]
        .into_iter()
        .enumerate()
    {
        home.write(".neomuttrc", &home.fill(&w, file, name));
        let before = logins(&w, "submission", "OAUTHBEARER");
        let subject = format!("neomutt {name}");
        home.run("neomutt", &["-s", &subject, FRIEND], b"Sent by neomutt.\n");
        let got = w.env.sink.wait_for(n + 1, Duration::from_secs(20));
        assert_eq!(got.len(), n + 1, "{got:?}");
        assert_eq!(got[n].rcpt_to, [FRIEND], "{:?}", got[n]);
        let data = String::from_utf8_lossy(&got[n].data).into_owned();
        assert!(data.contains(&format!("Subject: {subject}")), "{data}");
        logged_in(&w, name, "submission", "OAUTHBEARER", before);

        let before = logins(&w, "imap", "OAUTHBEARER");
        let screen = home.run(
            "script",
            &[
                "-qec",
                "TERM=xterm COLUMNS=120 LINES=30 neomutt -e 'push <quit>'",
                "/dev/null",
            ],
            b"",
        );
        assert!(
            screen.contains("first of two") && screen.contains("second of two"),
            "{name}: the index shows {screen:?}"
        );
        logged_in(&w, name, "imap", "OAUTHBEARER", before);
    }

    // aerc: reads and sends with OAUTHBEARER.
    home.aerc_reads_and_sends(&w, (PAGE, "token-aerc"), 3);
    home.aerc_reads_and_sends(&w, (README, "readme-token-aerc"), 4);

    assert_eq!(
        w.env.provider.refreshes(),
        refreshes,
        "the grant's token served them all"
    );
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

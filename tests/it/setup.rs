//! The first ten minutes: `mailproxy add` driven by flags against the fake
//! provider (then `serve` and a real login), `add` while `serve` runs (it
//! reloads and logs in through serve), and the one-sentence answers to a
//! missing config, placeholder client ids and unknown domains; the status
//! page `add` turns on and `mailproxy open`; Google's steps.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::mailproxy::{Proxy, ProxyDir, BIN};
use crate::support::provider::{self, approve_in_browser_blocking};
use crate::support::world::{assert_no_secrets, login_response};
use crate::support::{require_dovecot, Env};

const ALICE: &str = "alice@example.org";
const CAROL: &str = "carol@example.org";
const PW: &str = "setup local pw";

/// `mailproxy add` with `args`, the local password on stdin, and the fake
/// provider playing the browser when the sign-in address appears.
fn add(dir: &ProxyDir, env: &Env, args: &[&str]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(["--config", dir.config_path().to_str().unwrap(), "add"])
        .args(args)
        .env("XDG_STATE_HOME", dir.path().join("state-home"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailproxy add");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PW}\n").as_bytes())
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap_or(0) > 0 {
        seen.push_str(&line);
        let t = line.trim();
        if t.starts_with("http://") && t.contains("/authorize/") {
            let (status, body) = approve_in_browser_blocking(t).expect("browser step");
            assert_eq!(status, 200, "{body}");
            assert!(
                env.provider.authorize_hits() >= 1,
                "the start address led to the provider"
            );
        }
        line.clear();
    }
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    seen.push_str(&rest);
    let code = child.wait().unwrap().code().unwrap_or(-1);
    (code, seen)
}

fn custom_args<'a>(env: &'a Env, imap: &'a str, ca: &'a str) -> Vec<String> {
    let p = &env.provider;
    [
        "--provider",
        "custom",
        "--auth-url",
        &p.auth_url(),
        "--token-url",
        &p.token_url(),
        "--revoke-url",
        &p.revoke_url(),
        "--client-id",
        provider::CLIENT_ID,
        "--client-secret",
        provider::CLIENT_SECRET,
        "--scopes",
        "https://mail.example.org/,offline_access",
        "--imap",
        imap,
        "--ca-file",
        ca,
        "--no-browser",
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_with_flags_writes_the_config_and_logs_in_then_add_while_serving() {
    require_dovecot();
    let env = Env::start(&[]);
    let dir = ProxyDir::new();
    let d = &env.dovecot;
    let imaps = format!("imaps://localhost:{}", d.imaps_port);
    let ca = d.ca_pem_path().display().to_string();
    let args = custom_args(&env, &imaps, &ca);
    let mut a: Vec<&str> = vec![ALICE];
    a.extend(args.iter().map(String::as_str));
    let (code, err) = add(&dir, &env, &a);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("Register mailproxy as an OAuth client"),
        "the steps are printed: {err}"
    );
    assert!(err.contains(&format!("Wrote {}", dir.config_path().display())), "{err}");
    assert!(err.contains(&format!("Authorised {ALICE}")), "{err}");
    assert!(err.contains("Next: `mailproxy service install`"), "{err}");
    assert_no_secrets(&err, &env, &[PW]);

    let path = dir.config_path();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("# mailproxy configuration, written by `mailproxy add`"),
        "{text}"
    );
    assert!(
        text.contains(&format!("[accounts.\"{ALICE}\"]\nprovider = \"custom\"\n")),
        "{text}"
    );
    let record = dir
        .path()
        .join("state-home/mailproxy/accounts")
        .join(format!("{ALICE}.json"));
    assert!(
        record.exists(),
        "login stored the authorisation in the default state dir"
    );

    // The written config serves as it is (on free ports for the test).
    let status = format!("\"{}\"", written_status(&dir));
    std::fs::write(
        &path,
        text.replace("127.0.0.1:1143", "127.0.0.1:0")
            .replace("127.0.0.1:1587", "127.0.0.1:0")
            .replace(&status, "\"127.0.0.1:0\""),
    )
    .unwrap();
    let state_home = dir.path().join("state-home");
    let mut proxy = Proxy::start_env(&dir, &[("XDG_STATE_HOME", state_home.to_str().unwrap())]);
    let port = proxy.imap_port();
    let t = login_response(port, ALICE, PW).await;
    assert!(t.starts_with("a1 OK"), "{t}");

    // add while serve runs: serve reloads its config and runs the login.
    let starttls = format!("imap+starttls://localhost:{}", d.imap_port);
    let args = custom_args(&env, &starttls, &ca);
    let mut a: Vec<&str> = vec![CAROL];
    a.extend(args.iter().map(String::as_str));
    let (code, err) = add(&dir, &env, &a);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("Extended {}", path.display())), "{err}");
    assert!(err.contains("reloaded its config"), "{err}");
    assert!(proxy.wait_log("command=Login"), "the login ran in serve");
    let t = login_response(port, CAROL, PW).await;
    assert!(t.starts_with("a1 OK"), "usable at once, no restart: {t}");

    // The same address again: refused, the file untouched.
    let before = std::fs::read_to_string(&path).unwrap();
    let (code, err) = add(&dir, &env, &[CAROL, "--no-login"]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("already has the account {CAROL}")), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    assert_no_secrets(&proxy.logs(), &env, &[PW]);
    proxy.stop();
}

fn mailproxy(config: &Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(["--config", config.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_config_placeholders_and_unknown_domains_get_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere/config.toml");
    for cmd in [&["serve"][..], &["accounts"], &["check"], &["login", "a@b.example"]] {
        let (code, out, err) = mailproxy(&missing, cmd, "");
        assert_eq!(code, 1, "{cmd:?}: {out}{err}");
        assert_eq!(
            err,
            format!(
                "mailproxy: there is no config at {}: run `mailproxy add YOUR@ADDRESS` to create one (or name another with --config)\n",
                missing.display()
            )
        );
    }

    // The example config: serve and login refuse its placeholder client ids.
    let example = dir.path().join("example.toml");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml")).unwrap();
    std::fs::write(&example, text.replace("../target/mailproxy-state", "state")).unwrap();
    std::fs::set_permissions(&example, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = mailproxy(&example, &["serve"], "");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "accounts.\"alice@gmail.com\".client_id is the placeholder `YOUR-CLIENT-ID.apps.googleusercontent.com`"
        ) && err.contains("mailproxy add alice@gmail.com"),
        "{err}"
    );
    let (code, _, err) = mailproxy(&example, &["login", "bob@contoso.com"], "pw\n");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("placeholder `00000000-0000-0000-0000-000000000000`"),
        "{err}"
    );

    // add refuses placeholders and wrong shapes, and writes nothing.
    let fresh = dir.path().join("fresh/config.toml");
    let (code, _, err) = mailproxy(
        &fresh,
        &[
            "add",
            "x@gmail.com",
            "--client-id",
            "YOUR-CLIENT-ID.apps.googleusercontent.com",
            "--client-secret",
            "s",
            "--no-login",
        ],
        "",
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("Enable the Gmail API") || err.contains("enable the Gmail API"),
        "steps first: {err}"
    );
    assert!(err.contains("is a placeholder, not a client id"), "{err}");
    let (code, _, err) = mailproxy(
        &fresh,
        &["add", "y@hotmail.com", "--client-id", "not-a-guid", "--no-login"],
        "",
    );
    assert_eq!(code, 1);
    assert!(err.contains("y@hotmail.com: hotmail.com is Outlook.com"), "{err}");
    assert!(err.contains("is not a Microsoft client id"), "{err}");
    assert!(!fresh.exists(), "nothing written");

    // A domain neither known nor told by DNS: add asks (here on stdin).
    let (code, _, err) = mailproxy(
        &fresh,
        &["add", "dave@legacy.invalid", "--imap", "imaps://legacy.invalid:993"],
        "password\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Which provider hosts dave@legacy.invalid?"), "{err}");
    assert!(err.contains("nothing to authorise"), "{err}");
    let text = std::fs::read_to_string(&fresh).unwrap();
    assert!(
        text.contains(
            "[accounts.\"dave@legacy.invalid\"]\nprovider = \"password\"\nimap = \"imaps://legacy.invalid:993\"\n"
        ),
        "{text}"
    );
    // Without an answer: a sentence naming the flag.
    let (code, _, err) = mailproxy(&fresh, &["add", "erin@other.invalid", "--no-login"], "");
    assert_eq!(code, 1);
    assert!(err.contains("pass --provider"), "{err}");
}

/// Held by the tests that run `add` for the status page's usual address,
/// so one does not see it taken by the other.
static USUAL_STATUS_PORT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `add` for a custom account that needs no provider (`--no-login`), with
/// the state under the test's directory; (exit status, stderr).
fn add_offline(dir: &ProxyDir, address: &str) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["--config", dir.config_path().to_str().unwrap(), "add", address])
        .args(["--provider", "custom", "--client-id", "mailproxy-test", "--no-login"])
        .args(["--auth-url", "https://auth.example.invalid/authorize"])
        .args(["--token-url", "https://auth.example.invalid/token"])
        .args([
            "--scopes",
            "https://mail.example.org/",
            "--imap",
            "imaps://mail.example.invalid:993",
        ])
        .env("XDG_STATE_HOME", dir.path().join("state-home"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), err)
}

/// The `status_listen` address in the config `add` wrote.
fn written_status(dir: &ProxyDir) -> std::net::SocketAddr {
    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("status_listen = "))
        .unwrap_or_else(|| panic!("no status_listen in\n{text}"));
    line.trim_matches('"').parse().unwrap()
}

/// Where `open` may find a browser in a test.
#[derive(Clone, Copy, PartialEq)]
enum Opener {
    /// `$BROWSER` (a missing command, then a stand-in taking `%s`), with a
    /// stand-in `xdg-open` on PATH too: `$BROWSER` comes first.
    Browser,
    /// No `$BROWSER`: the stand-in `xdg-open` on PATH.
    XdgOpen,
    /// Neither: no `$BROWSER`, and a PATH with no `xdg-open`.
    Nothing,
}

/// A stand-in browser at `bin/NAME` that notes "NAME ARGS" in `seen`.
fn stand_in(bin: &Path, name: &str, seen: &Path) -> std::path::PathBuf {
    let path = bin.join(name);
    let script = format!(
        "#!/bin/sh\necho \"{name} $*\" > {0}.tmp && mv {0}.tmp {0}\n",
        seen.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `mailproxy open` with `opener`: (exit status, stdout, stderr, what a
/// stand-in was asked to open, as "NAME URL").
fn open_with(dir: &ProxyDir, opener: Opener) -> (i32, String, String, Option<String>) {
    let bin = dir.path().join("bin");
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    let seen = dir.path().join("opened");
    let _ = std::fs::remove_file(&seen);
    let mut cmd = Command::new(BIN);
    cmd.args(["--config", dir.config_path().to_str().unwrap(), "open"])
        .env_remove("BROWSER")
        .stdin(Stdio::null());
    let system_path = std::env::var("PATH").unwrap_or_default();
    if opener == Opener::Nothing {
        cmd.env("PATH", &bin);
    } else {
        stand_in(&bin, "xdg-open", &seen);
        cmd.env("PATH", format!("{}:{system_path}", bin.display()));
    }
    if opener == Opener::Browser {
        let browser = stand_in(&bin, "browser", &seen);
        cmd.env(
            "BROWSER",
            format!("no-such-browser-here:{} --new-tab %s", browser.display()),
        );
    }
    let out = cmd.output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    // The opener runs on its own; a started one has written within seconds.
    let opened = (code == 0)
        .then(|| crate::support::stranger::eventually(10, || seen.exists()))
        .filter(|&s| s)
        .map(|_| std::fs::read_to_string(&seen).unwrap());
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (code, text(&out.stdout), text(&out.stderr), opened)
}

/// The status page is on in the config `add` writes, at the usual loopback
/// address (another free one when something holds it), and `serve` shows it
/// from that config as it is; `open` opens that address.
#[test]
fn add_turns_the_status_page_on_and_serve_shows_it() {
    let _usual = USUAL_STATUS_PORT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = ProxyDir::new();
    let (code, err) = add_offline(&dir, ALICE);
    assert_eq!(code, 0, "{err}");
    let status = written_status(&dir);
    assert!(status.ip().is_loopback(), "{status}");
    if err.contains("is taken") {
        // Another program on this machine holds the usual port.
        assert_ne!(status.port(), 8025, "{err}");
    } else {
        assert_eq!(status.to_string(), "127.0.0.1:8025", "the usual address: {err}");
    }
    assert!(
        err.contains(&format!(
            "its status page is http://{status}/ (`mailproxy open` opens it)"
        )),
        "{err}"
    );

    let text = std::fs::read_to_string(dir.config_path()).unwrap();
    dir.write_config(
        &text
            .replace("127.0.0.1:1143", "127.0.0.1:0")
            .replace("127.0.0.1:1587", "127.0.0.1:0"),
    );
    let state_home = dir.path().join("state-home");
    let mut proxy = Proxy::start_env(&dir, &[("XDG_STATE_HOME", state_home.to_str().unwrap())]);
    assert!(
        wait_stdout(&proxy, &format!("listening status {status}")),
        "{:?}",
        proxy.stdout()
    );
    let page = crate::support::http::get(&format!("http://{status}/")).unwrap();
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains(ALICE), "{}", page.text());
    let json = crate::support::http::get(&format!("http://{status}/status.json"))
        .unwrap()
        .json();
    assert_eq!(json["accounts"][0]["account"], ALICE, "{json}");

    let (code, out, err, opened) = open_with(&dir, Opener::Browser);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, format!("http://{status}/\n"));
    assert!(err.is_empty(), "serve answers there: {err}");
    let want = format!("browser --new-tab http://{status}/\n");
    assert_eq!(opened.as_deref(), Some(want.as_str()), "$BROWSER before xdg-open");
    proxy.stop();
}

/// Waits (up to 10 s) for a line on `serve`'s stdout.
fn wait_stdout(proxy: &Proxy, line: &str) -> bool {
    crate::support::stranger::eventually(10, || proxy.stdout().iter().any(|l| l == line))
}

/// The usual port held by another program: `add` writes another free
/// loopback port and says so; `open` opens that one, and says nothing
/// answers there yet.
#[test]
fn add_takes_another_loopback_port_when_the_usual_one_is_taken() {
    let _usual = USUAL_STATUS_PORT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Held here, or already by someone else: taken either way.
    let _held = std::net::TcpListener::bind("127.0.0.1:8025");
    let dir = ProxyDir::new();
    let (code, err) = add_offline(&dir, ALICE);
    assert_eq!(code, 0, "{err}");
    let status = written_status(&dir);
    assert!(status.ip().is_loopback() && status.port() != 8025, "{status}");
    assert!(
        err.contains(&format!(
            "127.0.0.1:8025 is taken (another program listens there), so the status page gets the free port {status} instead."
        )),
        "{err}"
    );
    let (code, out, err, opened) = open_with(&dir, Opener::XdgOpen);
    assert_eq!(code, 0, "{out}{err}");
    let want = format!("xdg-open http://{status}/\n");
    assert_eq!(opened.as_deref(), Some(want.as_str()), "no $BROWSER: xdg-open");
    assert!(err.contains(&format!("Nothing answers at {status} yet")), "{err}");
}

/// Without `status_listen`, `open` names the key to set and opens nothing.
#[test]
fn open_without_a_status_page_names_the_key_to_set() {
    let dir = ProxyDir::new();
    dir.write_config(&dir.header());
    let (code, out, err, opened) = open_with(&dir, Opener::Browser);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        err,
        format!(
            "mailproxy: the status page is off: set status_listen = \"127.0.0.1:8025\" under [server] in {}, then restart mailproxy (`systemctl --user restart mailproxy`, or stop and start `mailproxy serve`)\n",
            dir.config_path().display()
        )
    );
    assert!(out.is_empty() && opened.is_none() && !dir.path().join("opened").exists());
}

/// With no `$BROWSER` and no `xdg-open`, `open` still prints the address,
/// then fails with a sentence naming what to set or install.
#[test]
fn open_without_a_browser_says_what_to_set() {
    let dir = ProxyDir::new();
    let status = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = status.local_addr().unwrap();
    let server = format!("[server]\nstatus_listen = \"{addr}\"\n");
    dir.write_config(&dir.header().replace("[server]\n", &server));
    let (code, out, err, opened) = open_with(&dir, Opener::Nothing);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(out, format!("http://{addr}/\n"));
    assert!(
        err.starts_with("mailproxy: no browser could be started (xdg-open: ")
            && err.ends_with(&format!(
                "): set BROWSER to your browser's command (e.g. BROWSER=firefox) or install xdg-open (Debian: apt install xdg-utils); or open http://{addr}/ yourself\n"
            )),
        "{err}"
    );
    assert!(!err.contains("Nothing answers"), "something listens there: {err}");
    assert!(opened.is_none());
}

/// Google's steps lead to a published app (or an Internal one), and
/// through the unverified-app screen: never to Testing and its test users,
/// where every grant ends after seven days.
#[test]
fn googles_steps_lead_to_a_published_app_never_to_test_users() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let args = [
        "add",
        "pat@gmail.com",
        "--client-id",
        "123-abc.apps.googleusercontent.com",
        "--client-secret",
        "s",
        "--no-login",
    ];
    let (code, _, err) = mailproxy(&config, &args, "");
    assert_eq!(code, 0, "{err}");
    // The steps are wrapped for a terminal: compare the words.
    let words = err.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "press \"Publish app\" and confirm, so that \"Publishing status\" reads \"In production\"",
        "An app left in Testing loses every sign-in after 7 days",
        "Your own app for personal use (under 100 users) needs no verification from Google",
        "Google shows \"Google hasn't verified this app\": it is your own app, so click Advanced → \"Go to APP (unsafe)\"",
        "Google Workspace: choose user type Internal instead",
    ] {
        assert!(words.contains(want), "{want:?} in\n{err}");
    }
    let lower = words.to_ascii_lowercase();
    for never in [
        "test user",
        "add your address as",
        "leave it in testing",
        "keep it in testing",
    ] {
        assert!(!lower.contains(never), "{never:?} in\n{err}");
    }
}

//! The control socket: while `serve` runs, `accounts`, `check`, `login`,
//! `passwd` and `revoke` talk to it, so `check` needs no password (file
//! store) and only the running proxy writes the vault.

use std::os::unix::fs::PermissionsExt;

use crate::support::mailproxy::{run, Proxy};
use crate::support::world::*;

/// Runs a command and checks that no secret reached its output.
fn cmd(w: &World, args: &[&str], stdin: &str) -> (i32, String, String) {
    let (code, out, err) = run(&w.dir, args, stdin);
    assert_no_secrets(
        &format!("{out}{err}"),
        &w.env,
        &[ALICE_PW, BOB_PW, FRANK_PW, "the new pw"],
    );
    (code, out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_while_serving_needs_no_password_and_exits_0_1_2() {
    let mut w = World::new();
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();

    // Right after start the file store keeps the account locked: a person
    // (a client login) must act, and check says so without asking.
    let (code, out, err) = cmd(&w, &["check", ALICE], "");
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("{ALICE}: needs action: locked")), "{out}");

    let tagged = login_response(port, ALICE, ALICE_PW).await;
    assert!(tagged.starts_with("a1 OK"), "{tagged}");

    let refreshes = w.env.provider.refreshes();
    let (code, out, err) = cmd(&w, &["check", ALICE], "");
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().collect::<Vec<_>>().len(), 1, "one line per account: {out}");
    assert!(
        out.starts_with(&format!("{ALICE}: ok: new access token valid for ")),
        "{out}"
    );
    assert_eq!(w.env.provider.refreshes(), refreshes + 1, "check refreshed in serve");
    assert!(
        w.proxy.as_ref().unwrap().wait_log("control socket request"),
        "the check went through serve"
    );

    // Every account: carol was never authorised.
    let (code, out, _) = cmd(&w, &["check"], "");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{ALICE}: ok")), "{out}");
    assert!(
        out.contains(&format!("{CAROL}: needs login")) && out.contains(&format!("mailproxy login {CAROL}")),
        "{out}"
    );

    // A provider having a bad day: temporary.
    w.env
        .provider
        .fail_next_token_requests(1, 503, r#"{"error":"temporarily_unavailable"}"#);
    let (code, out, _) = cmd(&w, &["check", ALICE], "");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&format!("{ALICE}: temporarily failing")), "{out}");

    // A dead refresh token: a person must log in again.
    w.env.provider.invalidate_all_refresh_tokens();
    let (code, out, _) = cmd(&w, &["check", ALICE], "");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("needs action") && out.contains(&format!("mailproxy login {ALICE}")),
        "{out}"
    );
    let (code, out, _) = cmd(&w, &["accounts"], "");
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.starts_with(ALICE)).unwrap();
    assert!(line.contains("needs login"), "{out}");

    // Not an OAuth account, not an account: a sentence, exit 1.
    let (code, _, err) = cmd(&w, &["check", BOB], "");
    assert_eq!(code, 1);
    assert!(err.contains("provider = \"password\""), "{err}");
    let (code, _, err) = cmd(&w, &["check", "nobody@example.org"], "");
    assert_eq!(code, 1);
    assert!(err.contains("has no account `nobody@example.org`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_passwd_revoke_and_accounts_go_through_serve() {
    let mut w = World::new();
    let port = w.start();
    let sock = w.dir.state_dir().join("control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is the owner's only");

    // A second serve on the same state directory refuses to start.
    let (code, _, err) = cmd(&w, &["serve"], "");
    assert_eq!(code, 1);
    assert!(err.contains("another mailproxy serve is already running"), "{err}");

    // login through serve: the running proxy has the account unlocked at once.
    let (st, err) = w.dir.login(ALICE, ALICE_PW);
    assert!(st.success(), "{err}");
    assert!(err.contains(&format!("Authorised {ALICE}")), "{err}");
    assert!(w.proxy.as_ref().unwrap().wait_log("command=Login"), "{}", w.logs());
    let (code, out, _) = cmd(&w, &["accounts"], "");
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.starts_with(ALICE)).unwrap();
    assert!(
        line.contains(" ok ") && !line.contains("locked") && line.contains("https://mail.example.org/"),
        "{out}"
    );
    let refreshes = w.env.provider.refreshes();
    assert!(login_response(port, ALICE, ALICE_PW).await.starts_with("a1 OK"));
    assert_eq!(
        w.env.provider.refreshes(),
        refreshes,
        "the grant's access token is used"
    );

    // passwd: old, then new, on stdin.
    let (code, out, err) = cmd(&w, &["passwd", ALICE], &format!("{ALICE_PW}\nthe new pw\n"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("is changed"), "{err}");
    assert!(login_response(port, ALICE, "the new pw").await.starts_with("a1 OK"));
    let old = login_response(port, ALICE, ALICE_PW).await;
    assert!(old.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{old}");
    let (code, _, err) = cmd(&w, &["passwd", ALICE], "wrong\nother\n");
    assert_eq!(code, 1);
    assert!(err.contains("wrong local password"), "{err}");
    // The account stays usable right after the change (no client login needed).
    let (code, out, _) = cmd(&w, &["check", ALICE], "");
    assert_eq!(code, 0, "{out}");

    // revoke: the live token is revoked without asking for a password.
    let vault_file = w.dir.state_dir().join("accounts").join(format!("{ALICE}.json"));
    assert!(vault_file.exists());
    let (code, out, err) = cmd(&w, &["revoke", ALICE], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("revoked the refresh token at"), "{out}");
    assert!(out.contains(&vault_file.display().to_string()), "{out}");
    let revs = w.env.provider.revocations();
    assert_eq!(revs.len(), 1, "{revs:?}");
    assert!(!w.env.provider.is_refresh_token_valid(&revs[0].0));
    assert!(!vault_file.exists());
    let tagged = login_response(port, ALICE, "the new pw").await;
    assert!(tagged.starts_with("a1 NO"), "{tagged}");
    let audit = std::fs::read_to_string(w.dir.state_dir().join("audit.log")).unwrap();
    for event in ["\"consent\"", "\"password_changed\"", "\"revoked\"", "\"erased\""] {
        assert!(audit.contains(event), "{event} audited: {audit}");
    }

    // After serve stops the socket is gone and the commands work on the vault.
    let mut p: Proxy = w.proxy.take().unwrap();
    assert_no_secrets(&p.logs(), &w.env, &[ALICE_PW, "the new pw"]);
    p.stop();
    assert!(!sock.exists(), "the socket is removed at shutdown");
    let (code, out, _) = cmd(&w, &["check", CAROL], "");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{CAROL}: needs login")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_left_behind_is_replaced_and_garbage_gets_a_sentence() {
    let mut w = World::new();
    let sock = w.dir.state_dir().join("control.sock");
    std::fs::create_dir_all(w.dir.state_dir()).unwrap();
    std::fs::set_permissions(w.dir.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    // What a serve killed with SIGKILL leaves: a socket nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let (code, out, _) = cmd(&w, &["check", ALICE], "");
    assert_eq!(code, 1, "the offline check runs: {out}");
    assert!(out.contains(&format!("{ALICE}: needs login")), "{out}");
    w.start();
    let (code, out, _) = cmd(&w, &["check", ALICE], "");
    assert_eq!(code, 1, "{out}");
    assert!(w.proxy.as_ref().unwrap().wait_log("control socket request"));

    // Garbage on the socket gets a sentence, and serve goes on.
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"command\":\"format_disk\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("{\"reply\":\"error\"") && line.contains("not a request this serve understands"),
        "{line}"
    );
    assert!(w.proxy.as_mut().unwrap().is_running());
}

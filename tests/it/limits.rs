//! The process's own limits and the config's secrets, end to end with the
//! real binary: the open-file limit is raised at start (so a busy proxy is
//! not capped by a low soft limit), a config or key file other users can
//! read is refused whatever TOML spelling holds the secret, and passthrough
//! logins are held back only once guesses have been seen (many clients at
//! once with the right password all get in).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::hostile_util::{connect_from, fake_upstream, FakeUpstream, Rig, Tally};
use crate::support::mailproxy::{run, Proxy, ProxyDir};
use crate::support::world::{BOB, BOB_PW};
use crate::support::LineConn;
use tokio::io::AsyncReadExt;

fn write_mode(path: &std::path::Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_is_raised_at_start() {
    let dir = ProxyDir::new();
    dir.write_config(&format!(
        "{}[limits]\nmax_connections_per_ip = 2000\nmax_connections = 2000\n",
        dir.header()
    ));
    // The soft limit starts at 256, far below what 600 sessions need.
    let proxy = Proxy::start_wrapped(
        &dir,
        &[("RUST_LOG", "info")],
        &["sh", "-c", "ulimit -S -n 256 && exec \"$0\" \"$@\""],
    );
    assert!(proxy.wait_log("open-file limit"), "{}", proxy.logs());
    let port = proxy.imap_port();
    let mut held = Vec::new();
    for i in 0..600 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let mut greeting = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut greeting))
            .await
            .unwrap_or_else(|_| panic!("connection {i} got no greeting:\n{}", proxy.logs()))
            .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", proxy.logs()));
        assert_eq!(&greeting, b"* OK", "connection {i}");
        held.push(s);
    }
    assert!(!proxy.logs().contains("accept failed"), "{}", proxy.logs());
}

/// A config holding a client secret that others can read is refused, in
/// every spelling TOML allows; 0600 is accepted. The secret never appears
/// in the error.
#[test]
fn world_readable_secrets_are_refused_in_any_spelling() {
    let dir = ProxyDir::new();
    let account = |key: &str| {
        format!(
            "provider = \"custom\"\nclient_id = \"id\"\n{key} = \"s3cr3t-value\"\nauth_url = \"https://login.example.org/auth\"\ntoken_url = \"https://login.example.org/token\"\nimap = \"imaps://imap.example.org\"\nscopes = [\"mail\"]\n"
        )
    };
    let spellings = [
        format!("{}[accounts.\"a@example.org\"]\n{}", dir.header(), account("client_secret")),
        format!("{}[accounts.\"a@example.org\"]\n{}", dir.header(), account("\"client_secret\"")),
        format!("{}[accounts.\"a@example.org\"]\n{}", dir.header(), account("'client_secret'")),
        format!(
            "{}[accounts]\n\"a@example.org\" = {{ provider = \"custom\", client_id = \"id\", client_secret = \"s3cr3t-value\", auth_url = \"https://login.example.org/auth\", token_url = \"https://login.example.org/token\", imap = \"imaps://imap.example.org\", scopes = [\"mail\"] }}\n",
            dir.header()
        ),
    ];
    for text in &spellings {
        write_mode(&dir.config_path(), text, 0o644);
        let (code, _, err) = run(&dir, &["accounts"], "");
        assert_ne!(code, 0, "accepted a world-readable secret:\n{text}");
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains(dir.config_path().to_str().unwrap()), "{err}");
        assert!(!err.contains("s3cr3t-value"), "{err}");
        write_mode(&dir.config_path(), text, 0o600);
        let (code, _, err) = run(&dir, &["accounts"], "");
        assert_eq!(code, 0, "{text}\n{err}");
    }
}

/// A `client_key` file (the private key of a certificate client assertion)
/// must be private too.
#[test]
fn a_readable_client_key_file_is_refused() {
    let dir = ProxyDir::new();
    let key = dir.path().join("app.key");
    let cert = dir.path().join("app.pem");
    write_mode(
        &key,
        "-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n",
        0o644,
    );
    write_mode(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n",
        0o644,
    );
    dir.write_config(&format!(
        "{}[accounts.\"svc@example.org\"]\nprovider = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"00000000-0000-0000-0000-000000000001\"\nflow = \"client_credentials\"\nclient_certificate = \"{}\"\nclient_key = \"{}\"\n",
        dir.header(),
        cert.display(),
        key.display()
    ));
    let (code, _, err) = run(&dir, &["accounts"], "");
    assert_ne!(code, 0, "accepted a readable key file");
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = run(&dir, &["accounts"], "");
    assert!(
        !(err.contains(key.to_str().unwrap()) && err.contains("chmod 600")),
        "still refused after chmod 600: {err} ({code})"
    );
}

/// Attempts the proxy lets wait for one passthrough name with recent
/// failures (`guard::MAX_WAITING`).
const MAX_WAITING: usize = 8;

/// `clients` clients, each from its own loopback /24 (numbered from
/// `net`), send `LOGIN user pw` at the same moment; those let in select
/// INBOX, fetch its first message and log out. Returns each LOGIN's tagged
/// answer.
async fn crowd(port: u16, user: &'static str, pw: &'static str, clients: usize, net: usize) -> Vec<String> {
    let start = Arc::new(tokio::sync::Barrier::new(clients));
    let hs: Vec<_> = (0..clients)
        .map(|i| {
            let start = start.clone();
            tokio::spawn(async move {
                let n = net + i;
                let from = [127, 10 + (n / 250) as u8, (n % 250) as u8 + 1, 1];
                let mut c = LineConn::from_tcp(connect_from(from, port).await.expect("connect"));
                let g = c.read_line().await.expect("greeting");
                assert!(g.starts_with("* OK"), "{g}");
                start.wait().await;
                let r = c
                    .imap("l", &format!("LOGIN \"{user}\" \"{pw}\""))
                    .await
                    .expect("LOGIN answered");
                if r.is_ok() {
                    let s = c.imap("s", "SELECT INBOX").await.expect("SELECT answered");
                    assert!(s.is_ok(), "{s:?}");
                    let f = c
                        .imap("f", "FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                        .await
                        .expect("FETCH answered");
                    assert!(f.is_ok() && f.literals.len() == 1, "{f:?}");
                    let o = c.imap("o", "LOGOUT").await.expect("LOGOUT answered");
                    assert!(o.is_ok(), "{o:?}");
                }
                r.tagged
            })
        })
        .collect();
    let mut answers = Vec::new();
    for h in hs {
        answers.push(h.await.unwrap());
    }
    answers
}

/// How many answers start with `prefix`.
fn count(answers: &[String], prefix: &str) -> usize {
    answers.iter().filter(|a| a.starts_with(prefix)).count()
}

/// A rig whose passthrough account `name` (bob's mailbox, one message in
/// it) is reached through a counting relay in front of Dovecot.
async fn counted_passthrough(name: &str, limits: &str) -> (Rig, Tally, crate::support::hostile_util::Task) {
    let mut rig = Rig::new(limits, |_| String::new());
    rig.env.dovecot.deliver(
        BOB,
        &crate::support::sample_message("carol@example.org", BOB, "hello", "pt-1"),
    );
    let tally = Tally::default();
    let (relay, task) = fake_upstream(FakeUpstream::Forward(rig.env.dovecot.imap_port, tally.clone())).await;
    rig.edit_config(|c| {
        format!(
            "{c}[accounts.\"{name}\"]\nprovider = \"password\"\nusername = \"{BOB}\"\nimap = \"imap://127.0.0.1:{relay}\"\n\n"
        )
    });
    rig.start();
    (rig, tally, task)
}

/// Twenty, then sixty-four clients log in at once to one passthrough
/// account with the right password, round after round (LOGIN, SELECT,
/// FETCH, LOGOUT): nobody has failed, so nobody is turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_correct_passthrough_logins_are_all_served() {
    const NAME: &str = "bob-busy@example.org";
    let (rig, tally, _relay) = counted_passthrough(NAME, "").await;
    let port = rig.imap_port();
    for (clients, rounds) in [(20, 8), (64, 4)] {
        let t0 = Instant::now();
        let before = tally.connections();
        let mut refused = Vec::new();
        for round in 0..rounds {
            let answers = crowd(port, NAME, BOB_PW, clients, round * clients).await;
            refused.extend(answers.into_iter().filter(|a| !a.starts_with("l OK")));
        }
        eprintln!(
            "{clients} at once, {rounds} rounds: {} of {} logins refused in {:?}; the upstream saw {} logins",
            refused.len(),
            clients * rounds,
            t0.elapsed(),
            tally.connections() - before
        );
        assert!(
            refused.is_empty(),
            "{clients} at once: {} of {} correct logins refused, e.g. {:?}",
            refused.len(),
            clients * rounds,
            refused.first()
        );
    }
}

/// Once the upstream has refused a password for a name, its logins take
/// turns again: a crowd repeating one wrong password reaches the upstream
/// a few times, not once per client, and a crowd with the right password
/// right after is held to the same bound. Once one of them is in, a crowd
/// with the right password all get in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refused_password_passthrough_logins_take_turns_until_one_succeeds() {
    const NAME: &str = "bob-guessed@example.org";
    const CROWD: usize = 40;
    const BUSY: &str = "l NO [UNAVAILABLE] too many logins for this user at once";
    let (rig, tally, _relay) = counted_passthrough(NAME, "login_failure_delay_max = 0.2").await;
    let port = rig.imap_port();

    let answers = crowd(port, NAME, "wrong", CROWD, 0).await;
    let upstream = tally.connections();
    let refused = count(&answers, "l NO [AUTHENTICATIONFAILED]");
    let busy = count(&answers, BUSY);
    eprintln!("one wrong password from {CROWD} clients: {refused} refused by the upstream, {busy} turned away; the upstream saw {upstream} logins");
    assert_eq!(refused + busy, CROWD, "{answers:?}");
    assert!(
        (1..=MAX_WAITING + 2).contains(&upstream),
        "the upstream saw {upstream} logins for one wrong password"
    );

    let answers = crowd(port, NAME, BOB_PW, CROWD, CROWD).await;
    let ok = count(&answers, "l OK");
    let busy = count(&answers, BUSY);
    eprintln!("then the right password from {CROWD} clients: {ok} got in, {busy} turned away");
    assert_eq!(ok + busy, CROWD, "{answers:?}");
    assert!(
        (1..=MAX_WAITING + 1).contains(&ok),
        "{ok} got in at once right after guesses"
    );

    let answers = crowd(port, NAME, BOB_PW, CROWD, 2 * CROWD).await;
    let ok = count(&answers, "l OK");
    eprintln!("after a success, the right password from {CROWD} clients: {ok} got in");
    assert_eq!(ok, CROWD, "{answers:?}");
}

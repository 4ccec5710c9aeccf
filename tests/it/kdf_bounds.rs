//! Argon2id parameters in a stored record are trusted only inside the window
//! mailproxy accepts. A record edited to ask for 2 GiB, 64 passes or 16
//! lanes (whoever can write the store can do that, no store key needed) is
//! refused at once, naming the account, without a KDF run: a wrong password
//! is answered promptly, `serve` stays small, and the other accounts keep
//! logging in. Against the real binary, with the records in a private
//! PostgreSQL and in the file vault.

use std::time::{Duration, Instant};

use crate::support::mailproxy::{run, Proxy, ProxyDir};
use crate::support::postgres::Postgres;
use crate::support::world::{assert_no_secrets, imaps_account, login_ok, login_response, ALICE, ALICE_PW, CAROL};
use crate::support::{require_dovecot, Env};

const CAROL_PW: &str = "carol local pw";
const WRONG_PW: &str = "not alice's password";

/// What mailproxy writes: m_cost (KiB), t_cost, p_cost.
const WRITTEN: (u32, u32, u32) = (19456, 2, 1);

/// Alice's record edited to these parameters, and the words of its refusal.
const EDITS: &[((u32, u32, u32), &str)] = &[
    (
        (2_097_152, 2, 1),
        "asks for Argon2id m_cost = 2097152 KiB, outside the accepted 19456..=38912 KiB",
    ),
    (
        (19456, 64, 1),
        "asks for Argon2id t_cost = 64, outside the accepted 2..=4",
    ),
    (
        (19456, 2, 16),
        "asks for Argon2id p_cost = 16, outside the accepted 1..=4",
    ),
];

/// `serve` must stay far below what a 2 GiB KDF run would leave behind.
const MAX_RSS_KIB: u64 = 256 * 1024;

/// Dovecot, the provider, one proxy directory with alice and carol (both
/// OAuth over imaps, both authorised with `mailproxy login`), and `serve`.
struct Setup {
    env: Env,
    dir: ProxyDir,
    pg: Option<Postgres>,
    proxy: Proxy,
}

impl Setup {
    fn new(pg: Option<Postgres>) -> Setup {
        require_dovecot();
        let env = Env::start(&[]);
        let dir = ProxyDir::new();
        let store = pg.as_ref().map(Postgres::server_settings).unwrap_or_default();
        let mut cfg = dir.header().replace(
            "[server]\n",
            &format!(
                "[server]\n{store}ca_file = \"{}\"\n",
                env.dovecot.ca_pem_path().display()
            ),
        );
        cfg += &imaps_account(ALICE, &env);
        cfg += &imaps_account(CAROL, &env);
        dir.write_config(&cfg);
        for (account, pw) in [(ALICE, ALICE_PW), (CAROL, CAROL_PW)] {
            let (st, err) = dir.login(account, pw);
            assert!(st.success(), "mailproxy login {account}: {err}");
        }
        let proxy = Proxy::start(&dir);
        Setup { env, dir, pg, proxy }
    }

    /// Sets the Argon2id parameters of alice's stored record, and waits
    /// until `serve` can see the change.
    fn edit(&self, (m, t, p): (u32, u32, u32)) {
        match &self.pg {
            Some(pg) => {
                let seen = |logs: &str| {
                    logs.lines()
                        .filter(|l| l.contains("account changed in the token database") && l.contains(ALICE))
                        .count()
                };
                let before = seen(&self.proxy.logs());
                // A writer of the database bumps the generation too, as any
                // write by mailproxy does, so every instance reads it again.
                pg.psql(&format!(
                    "UPDATE mailproxy_accounts SET generation = generation + 1,
                       record = jsonb_set(jsonb_set(jsonb_set(record,
                         '{{password,m_cost}}', '{m}'), '{{password,t_cost}}', '{t}'), '{{password,p_cost}}', '{p}')
                     WHERE account = '{ALICE}'"
                ));
                let deadline = Instant::now() + Duration::from_secs(10);
                while seen(&self.proxy.logs()) == before {
                    assert!(Instant::now() < deadline, "serve did not see the edited row");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            None => {
                // The file is read again when its identity changes; written
                // the way mailproxy writes (new file, 0600, rename).
                use std::os::unix::fs::PermissionsExt;
                let path = self.dir.state_dir().join("accounts").join(format!("{ALICE}.json"));
                let mut rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                rec["password"]["m_cost"] = m.into();
                rec["password"]["t_cost"] = t.into();
                rec["password"]["p_cost"] = p.into();
                let tmp = path.with_extension("edit");
                std::fs::write(&tmp, serde_json::to_vec_pretty(&rec).unwrap()).unwrap();
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_secrets(&self.proxy.logs(), &self.env, &[ALICE_PW, CAROL_PW, WRONG_PW]);
        }
    }
}

async fn timed_login(port: u16, user: &str, pw: &str) -> (String, Duration) {
    let t0 = Instant::now();
    let r = login_response(port, user, pw).await;
    (r, t0.elapsed())
}

/// The whole story on one store: normal logins, then each edit refused
/// promptly and named, `serve` small, carol unaffected, and alice back once
/// her record holds what mailproxy wrote.
async fn edited_parameters_are_refused(s: &Setup) {
    let port = s.proxy.imap_port();
    drop(login_ok(port, ALICE, ALICE_PW).await);
    drop(login_ok(port, CAROL, CAROL_PW).await);
    // What a wrong password normally costs: one KDF run and the first delay.
    let (r, normal) = timed_login(port, CAROL, "not carol's password").await;
    assert!(r.starts_with("a1 NO"), "{r}");
    // (Carol's next login waits out that delay first.)
    drop(login_ok(port, CAROL, CAROL_PW).await);

    for &(params, refusal) in EDITS {
        s.edit(params);
        let (r, took) = timed_login(port, ALICE, WRONG_PW).await;
        let logs = s.proxy.logs();
        assert!(r.starts_with("a1 NO"), "{params:?}: {r}\n{logs}");
        assert!(
            took < normal + Duration::from_millis(750),
            "{params:?}: a wrong password took {took:?} (normally {normal:?})\n{logs}"
        );
        assert!(
            s.proxy.wait_log(refusal),
            "{params:?}: no refusal in the log\n{}",
            s.proxy.logs()
        );
        let logs = s.proxy.logs();
        let line = logs.lines().find(|l| l.contains(refusal)).unwrap();
        assert!(
            line.contains(&format!("the password record of {ALICE}"))
                && line.contains(&format!("mailproxy login {ALICE}")),
            "the refusal names the account and what to do: {line}"
        );
        let rss = s.proxy.rss_kib();
        assert!(
            rss < MAX_RSS_KIB,
            "{params:?}: serve holds {rss} KiB after the refused login"
        );

        // The right password does not get further: a person must act.
        let (r, took) = timed_login(port, ALICE, ALICE_PW).await;
        assert!(r.starts_with("a1 NO [ALERT]") && r.contains(refusal), "{params:?}: {r}");
        assert!(took < Duration::from_secs(1), "{params:?}: took {took:?}");

        // Nobody else is held up.
        let (r, took) = timed_login(port, CAROL, CAROL_PW).await;
        assert!(r.starts_with("a1 OK"), "{params:?}: carol: {r}\n{}", s.proxy.logs());
        assert!(took < Duration::from_secs(1), "{params:?}: carol took {took:?}");
    }
    assert!(s.proxy.rss_kib() < MAX_RSS_KIB);

    // What mailproxy wrote (and every earlier version) is read as before.
    s.edit(WRITTEN);
    drop(login_ok(port, ALICE, ALICE_PW).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_row_asking_for_2_gib_is_refused_at_once_and_serve_stays_small() {
    let s = Setup::new(Some(Postgres::start()));
    edited_parameters_are_refused(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_file_asking_for_2_gib_is_refused_at_once_and_serve_stays_small() {
    let s = Setup::new(None);
    edited_parameters_are_refused(&s).await;

    // The one-shot commands refuse it too, without a KDF run.
    s.edit(EDITS[0].0);
    let (code, _, err) = run(&s.dir, &["passwd", ALICE], &format!("{ALICE_PW}\nnew pw\n"));
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(EDITS[0].1) && err.contains(&format!("the password record of {ALICE}")),
        "{err}"
    );
}

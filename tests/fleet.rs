//! Several instances on one shared token store: a private PostgreSQL, two
//! real `mailproxy serve` processes on it, the fake provider rotating
//! refresh tokens, and a private Dovecot. Single flight across instances,
//! changes that propagate, and a crash in the middle of a refresh.

mod support;

use std::time::{Duration, Instant};

use support::mailproxy::{oauth_account, run, Proxy, ProxyDir};
use support::postgres::Postgres;
use support::world::{assert_no_secrets, ALICE, ALICE_PW};
use support::{require_dovecot, Env, LineConn};

/// PostgreSQL, Dovecot, the provider and two proxy directories whose
/// configs share the database (each instance has its own state_dir).
struct Fleet {
    env: Env,
    pg: Postgres,
    dirs: [ProxyDir; 2],
    proxies: [Option<Proxy>; 2],
}

impl Fleet {
    fn new(extra_server: &str) -> Fleet {
        require_dovecot();
        let pg = Postgres::start();
        let env = Env::start(&[]);
        let dirs = [ProxyDir::new(), ProxyDir::new()];
        for d in &dirs {
            let mut cfg = d.header();
            cfg = cfg.replace(
                "[server]\n",
                &format!(
                    "[server]\ntoken_store = \"postgres\"\ndatabase_url = \"{}\"\nca_file = \"{}\"\n{extra_server}",
                    pg.url(),
                    env.dovecot.ca_pem_path().display()
                ),
            );
            cfg += &oauth_account(
                ALICE,
                &env.provider,
                &env.dovecot,
                &format!("imaps://localhost:{}", env.dovecot.imaps_port),
            );
            d.write_config(&cfg);
        }
        Fleet {
            env,
            pg,
            dirs,
            proxies: [None, None],
        }
    }

    fn start(&mut self, i: usize) -> u16 {
        let p = Proxy::start(&self.dirs[i]);
        let port = p.imap_port();
        self.proxies[i] = Some(p);
        port
    }

    fn logs(&self) -> String {
        self.proxies
            .iter()
            .flatten()
            .map(|p| p.logs())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for p in self.proxies.iter().flatten() {
            assert_no_secrets(&p.logs(), &self.env, &[ALICE_PW, "new pw"]);
        }
        // Nothing in the clear in the database either.
        let rows = self
            .pg
            .psql("SELECT coalesce(string_agg(record::text, ' '), '') FROM mailproxy_accounts");
        assert_no_secrets(&rows, &self.env, &[ALICE_PW, "new pw"]);
    }
}

async fn try_login(port: u16, pw: &str) -> (LineConn, String) {
    let mut c = LineConn::plain(port).await.unwrap();
    let g = c.read_line().await.unwrap();
    assert!(g.starts_with("* OK"), "{g}");
    let r = c.imap("a1", &format!("LOGIN \"{ALICE}\" \"{pw}\"")).await.unwrap();
    (c, r.tagged)
}

async fn login(port: u16) -> LineConn {
    let (mut c, tagged) = try_login(port, ALICE_PW).await;
    assert!(tagged.starts_with("a1 OK"), "LOGIN: {tagged}");
    let r = c.imap("s", "SELECT INBOX").await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_logins_on_two_instances_refresh_once_and_both_use_the_rotated_token() {
    let mut f = Fleet::new("");
    f.env.provider.set_rotate_refresh_tokens(true);
    let (st, err) = f.dirs[0].login(ALICE, ALICE_PW);
    assert!(st.success(), "{err}");
    assert!(err.contains("PostgreSQL"), "{err}");
    let a = f.start(0);
    let b = f.start(1);
    let p = &f.env.provider;

    // The first login on A refreshes; B then uses the token A stored.
    let r0 = p.refreshes();
    drop(login(a).await);
    drop(login(b).await);
    assert_eq!(p.refreshes(), r0 + 1, "B used A's token\n{}", f.logs());

    // The server stops accepting it: twenty logins split across both.
    p.expire_all_access_tokens();
    let tasks: Vec<_> = (0..20)
        .map(|i| tokio::spawn(async move { drop(login(if i % 2 == 0 { a } else { b }).await) }))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        p.refreshes(),
        r0 + 2,
        "one refresh for twenty logins on two instances\n{}",
        f.logs()
    );

    // The rotated token is what both use next: a refresh on B (with the
    // token A rotated; the old one is dead at the provider), then A uses
    // B's result without refreshing.
    p.expire_all_access_tokens();
    drop(login(b).await);
    drop(login(a).await);
    assert_eq!(p.refreshes(), r0 + 3, "{}", f.logs());
    assert_eq!(
        f.pg.psql("SELECT version FROM mailproxy_schema ORDER BY version"),
        "1",
        "the schema is migrated once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwd_and_revoke_on_one_instance_take_effect_on_the_other() {
    let mut f = Fleet::new("");
    let (st, err) = f.dirs[0].login(ALICE, ALICE_PW);
    assert!(st.success(), "{err}");
    let _a = f.start(0);
    let b = f.start(1);
    drop(login(b).await);

    // A new local password set through instance A's config.
    let (code, _, err) = run(&f.dirs[0], &["passwd", ALICE], &format!("{ALICE_PW}\nnew pw\n"));
    assert_eq!(code, 0, "{err}");
    let t0 = Instant::now();
    loop {
        let (_, tagged) = try_login(b, ALICE_PW).await;
        if tagged.starts_with("a1 NO") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "B still takes the old password: {tagged}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, tagged) = try_login(b, "new pw").await;
    assert!(tagged.starts_with("a1 OK"), "{tagged}\n{}", f.logs());

    // Revoked through A: B refuses within two seconds.
    let (code, out, err) = run(&f.dirs[0], &["revoke", ALICE], "new pw\n");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("in PostgreSQL"), "{out}");
    let t0 = Instant::now();
    loop {
        let (_, tagged) = try_login(b, "new pw").await;
        if tagged.starts_with("a1 NO") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "B still logs in after revoke: {tagged}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.pg.psql("SELECT count(*) FROM mailproxy_accounts"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_instance_refreshing_leaves_the_other_able_to_refresh() {
    let mut f = Fleet::new("");
    f.env.provider.set_rotate_refresh_tokens(true);
    let (st, err) = f.dirs[0].login(ALICE, ALICE_PW);
    assert!(st.success(), "{err}");
    let a = f.start(0);
    let b = f.start(1);
    drop(login(a).await);
    drop(login(b).await);
    let p = &f.env.provider;
    let r0 = p.refreshes();

    // A's refresh hangs at the provider while it holds the account's lock.
    p.set_drop_abandoned_token_requests(true);
    p.set_token_delay(Duration::from_secs(20));
    p.expire_all_access_tokens();
    let on_a = tokio::spawn(try_login(a, ALICE_PW));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // B waits for A's lock.
    let on_b = tokio::spawn(async move { login(b).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!on_b.is_finished(), "B waits while A refreshes");
    p.set_token_delay(Duration::ZERO);
    f.proxies[0].as_ref().unwrap().signal(libc::SIGKILL);
    let _ = on_a.await;

    // A died before the provider answered: its lock is gone with it, B
    // refreshes with the stored token, and nothing was lost.
    let c = tokio::time::timeout(Duration::from_secs(20), on_b)
        .await
        .expect("B finishes once A is gone")
        .unwrap();
    drop(c);
    assert_eq!(p.abandoned(), 1, "A's request never reached the provider's logic");
    assert_eq!(p.refreshes(), r0 + 1, "{}", f.logs());
    // A restarted finds the account as B left it.
    let a = f.start(0);
    drop(login(a).await);
    assert_eq!(f.env.provider.refreshes(), r0 + 1, "{}", f.logs());
}

//! Several instances on one shared token store: a private PostgreSQL, two
//! real `mailproxy serve` processes on it, the fake provider rotating
//! refresh tokens, and a private Dovecot. Single flight across instances,
//! changes that propagate, a crash in the middle of a refresh, a domain
//! entry's mailbox on both, and one instance over TLS to the database.

use std::time::{Duration, Instant};

use crate::support::client;
use crate::support::mailproxy::{oauth_account, run, Proxy, ProxyDir};
use crate::support::postgres::Postgres;
use crate::support::world::{assert_no_secrets, ALICE, ALICE_PW};
use crate::support::{require_dovecot, Env, LineConn};

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
        Self::with(extra_server, false)
    }

    /// With `[accounts."@example.org"]` too (the fake provider's browser
    /// flow signs in whoever the login hint names).
    fn with_domain() -> Fleet {
        Self::with("", true)
    }

    fn with(extra_server: &str, domain: bool) -> Fleet {
        require_dovecot();
        let pg = Postgres::start_tls();
        let env = Env::start(&[]);
        let dirs = [ProxyDir::new(), ProxyDir::new()];
        for d in &dirs {
            let mut cfg = d.header();
            cfg = cfg.replace(
                "[server]\n",
                &format!(
                    "[server]\n{}ca_file = \"{}\"\n{extra_server}",
                    pg.server_settings(),
                    env.dovecot.ca_pem_path().display()
                ),
            );
            let imaps = format!("imaps://localhost:{}", env.dovecot.imaps_port);
            cfg += &oauth_account(ALICE, &env.provider, &env.dovecot, &imaps);
            if domain {
                cfg += &oauth_account("@example.org", &env.provider, &env.dovecot, &imaps);
            }
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

    /// Points instance `i` at the database with `database_url`.
    fn set_database_url(&self, i: usize, url: &str) {
        let cfg = std::fs::read_to_string(self.dirs[i].config_path()).unwrap();
        let cfg: Vec<String> = cfg
            .lines()
            .map(|l| {
                if l.starts_with("database_url") {
                    format!("database_url = \"{url}\"")
                } else {
                    l.to_string()
                }
            })
            .collect();
        self.dirs[i].write_config(&(cfg.join("\n") + "\n"));
    }

    fn logs(&self) -> String {
        self.proxies
            .iter()
            .flatten()
            .map(crate::support::mailproxy::Proxy::logs)
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
            assert_no_secrets(&p.logs(), &self.env, &[ALICE_PW, "new pw", DAVE_PW]);
        }
        // Nothing in the clear in the database either.
        if self.pg.psql("SELECT to_regclass('mailproxy_accounts') IS NOT NULL") != "t" {
            return;
        }
        let rows = self
            .pg
            .psql("SELECT coalesce(string_agg(record::text, ' '), '') FROM mailproxy_accounts");
        assert_no_secrets(&rows, &self.env, &[ALICE_PW, "new pw", DAVE_PW]);
    }
}

async fn try_login(port: u16, pw: &str) -> (LineConn, String) {
    try_login_as(port, ALICE, pw).await
}

async fn try_login_as(port: u16, who: &str, pw: &str) -> (LineConn, String) {
    let mut c = LineConn::plain(port).await.unwrap();
    let g = c.read_line().await.unwrap();
    assert!(g.starts_with("* OK"), "{g}");
    let r = c.imap("a1", &format!("LOGIN \"{who}\" \"{pw}\"")).await.unwrap();
    (c, r.tagged)
}

/// Logs in to `who` until the answer starts with `want`, for at most two
/// seconds (what another instance's change may take to arrive).
async fn login_within_2s(port: u16, who: &str, pw: &str, want: &str) -> LineConn {
    let t0 = Instant::now();
    loop {
        let (c, tagged) = try_login_as(port, who, pw).await;
        if tagged.starts_with(want) {
            return c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{who} on port {port}: still {tagged}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    drop(login_within_2s(b, ALICE, ALICE_PW, "a1 NO").await);
    let (_, tagged) = try_login(b, "new pw").await;
    assert!(tagged.starts_with("a1 OK"), "{tagged}\n{}", f.logs());

    // Revoked through A: B refuses within two seconds.
    let (code, out, err) = run(&f.dirs[0], &["revoke", ALICE], "new pw\n");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("in PostgreSQL"), "{out}");
    drop(login_within_2s(b, ALICE, "new pw", "a1 NO").await);
    assert_eq!(f.pg.psql("SELECT count(*) FROM mailproxy_accounts"), "0");
}

const DAVE: &str = "dave@example.org";
const DAVE_PW: &str = "dave local pw";

/// `postgres://…?sslmode=verify-full&sslrootcert=CA`, named so its
/// connections can be told apart in `pg_stat_activity`.
fn tls_url(pg: &Postgres, ca: &std::path::Path, sslmode: &str) -> String {
    format!(
        "{}?sslmode={sslmode}&sslrootcert={}&application_name=mailproxy-tls",
        pg.url(),
        ca.display()
    )
}

/// A domain entry's mailbox on two instances, B on TLS to the database:
/// set up through A's config while both run, used on A and then on B with
/// no second consent, revoked through B and refused by both within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_mailbox_set_up_on_one_instance_works_on_both_and_revoke_reaches_both() {
    let mut f = Fleet::with_domain();
    f.set_database_url(1, &tls_url(&f.pg, f.pg.ca_path(), "verify-full"));
    let a = f.start(0);
    let b = f.start(1);
    // B's connections are all TLS (its change feed is always open).
    let ssl = f.pg.psql(
        "SELECT count(*) FILTER (WHERE s.ssl) || '/' || count(*) FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'mailproxy-tls'",
    );
    let (tls, all) = ssl.split_once('/').unwrap();
    assert!(tls == all && all != "0", "B's connections over TLS / all: {ssl}");
    assert!(
        f.proxies[1].as_ref().unwrap().wait_log("sslmode=\"verify-full\""),
        "{}",
        f.logs()
    );

    // Not set up yet: refused on both, with what its owner does.
    for port in [a, b] {
        let (_, tagged) = try_login_as(port, DAVE, DAVE_PW).await;
        assert!(tagged.contains(&format!("mailproxy login {DAVE}")), "{tagged}");
    }
    let (st, err) = f.dirs[0].login(DAVE, DAVE_PW);
    assert!(st.success(), "{err}");
    let p = &f.env.provider;
    let (consents, r0) = (p.authorize_hits(), p.refreshes());

    // First use on A, then on B: B takes A's token, nobody is asked again.
    let mut c = login_within_2s(a, DAVE, DAVE_PW, "a1 OK").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    let mut c = login_within_2s(b, DAVE, DAVE_PW, "a1 OK").await;
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    drop(c);
    assert_eq!(p.authorize_hits(), consents, "no second consent");
    assert_eq!(p.refreshes(), r0 + 1, "B used A's token\n{}", f.logs());
    assert!(f.env.dovecot.log().contains(&format!("user=<{DAVE}>")));
    let (code, out, err) = run(&f.dirs[1], &["accounts"], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with(DAVE) && l.contains(" ok")), "{out}");

    // Revoked through B: both refuse within two seconds.
    let (code, out, err) = run(&f.dirs[1], &["revoke", DAVE], &format!("{DAVE_PW}\n"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("in PostgreSQL"), "{out}");
    for port in [a, b] {
        drop(login_within_2s(port, DAVE, DAVE_PW, "a1 NO").await);
    }
    assert_eq!(
        f.pg.psql(&format!(
            "SELECT count(*) FROM mailproxy_accounts WHERE account = '{DAVE}'"
        )),
        "0"
    );
}

/// TLS to the database is checked as `sslmode` says: a certificate from
/// another CA, or one the platform does not trust, is refused with a
/// sentence; `require` without a CA file encrypts and checks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_certificate_is_checked_as_sslmode_says() {
    let f = Fleet::new("");
    let other = tempfile::tempdir().unwrap();
    let other_ca = crate::support::pki::TestCa::new(other.path());
    let refused = [
        tls_url(&f.pg, other_ca.cert_path(), "verify-full"),
        tls_url(&f.pg, other_ca.cert_path(), "require"),
        format!("{}?sslmode=verify-ca", f.pg.url()),
    ];
    for url in refused {
        f.set_database_url(1, &url);
        let (code, _, err) = run(&f.dirs[1], &["accounts"], "");
        assert_ne!(code, 0, "{url}");
        assert!(
            err.contains(&f.pg.url()) && err.contains("invalid peer certificate") && err.contains("must be signed by"),
            "{url}: {err}"
        );
    }
    for url in [
        format!("{}?sslmode=require", f.pg.url()),
        tls_url(&f.pg, f.pg.ca_path(), "verify-ca"),
    ] {
        f.set_database_url(1, &url);
        let (code, _, err) = run(&f.dirs[1], &["accounts"], "");
        assert_eq!(code, 0, "{url}: {err}");
    }
    // A CA file that is not there: the config's line and key.
    f.set_database_url(1, &tls_url(&f.pg, &other.path().join("missing.pem"), "verify-full"));
    let (code, _, err) = run(&f.dirs[1], &["accounts"], "");
    assert_ne!(code, 0);
    let at = format!("{}:", f.dirs[1].config_path().display());
    assert!(
        err.contains(&at) && err.contains(": server.database_url: sslrootcert: ") && err.contains("missing.pem"),
        "{err}"
    );
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

/// `GET path` on the metrics listener: (status line, body).
async fn http_get(addr: &str, path: &str) -> (String, String) {
    http_get_host(addr, path, addr).await
}

async fn http_get_host(addr: &str, path: &str, host: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// The value of one sample, e.g. `mailproxy_logins_total{protocol="imap",…}`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// Where the first instance serves its metrics (it prints the address; the
/// line may come a little after the listeners').
fn metrics_addr(f: &Fleet) -> String {
    f.proxies[0].as_ref().unwrap().metrics_addr()
}

/// Waits until `series` has the value `want`; returns the last body.
async fn wait_sample(addr: &str, series: &str, want: f64) -> String {
    let t0 = Instant::now();
    loop {
        let (_, body) = http_get(addr, "/metrics").await;
        if sample(&body, series) == Some(want) || t0.elapsed() > Duration::from_secs(5) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Refreshes are counted by outcome whichever store holds the account, and
/// on both a refused refresh is decoded and marks the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_outcomes_are_counted_on_the_file_store_and_on_postgres() {
    for store in ["file", "postgres"] {
        let mut f = Fleet::new("metrics_listen = \"127.0.0.1:0\"\n");
        if store == "file" {
            let cfg = std::fs::read_to_string(f.dirs[0].config_path()).unwrap();
            let local: Vec<&str> = cfg
                .lines()
                .filter(|l| !l.starts_with("token_store") && !l.starts_with("database_url"))
                .collect();
            f.dirs[0].write_config(&(local.join("\n") + "\n"));
        }
        let (st, err) = f.dirs[0].login(ALICE, ALICE_PW);
        assert!(st.success(), "{store}: {err}");
        assert_eq!(err.contains("PostgreSQL"), store == "postgres", "{store}: {err}");
        let port = f.start(0);
        let addr = metrics_addr(&f);
        let ok = "mailproxy_refreshes_total{provider=\"custom\",outcome=\"ok\"}";
        let needs_login = "mailproxy_refreshes_total{provider=\"custom\",outcome=\"needs_login\"}";

        // serve starts without an access token: the first login refreshes.
        drop(login(port).await);
        let body = wait_sample(&addr, ok, 1.0).await;
        assert_eq!(sample(&body, ok), Some(1.0), "{store}\n{body}");

        // The grant is gone at the provider: the next refresh is refused.
        f.env.provider.invalidate_all_refresh_tokens();
        f.env.provider.expire_all_access_tokens();
        let (_, tagged) = try_login(port, ALICE_PW).await;
        assert!(tagged.starts_with("a1 NO"), "{store}: {tagged}");
        let body = wait_sample(&addr, needs_login, 1.0).await;
        assert_eq!(sample(&body, needs_login), Some(1.0), "{store}\n{body}");
        assert_eq!(sample(&body, ok), Some(1.0), "{store}\n{body}");
        assert!(
            f.proxies[0].as_ref().unwrap().wait_log("token refresh failed"),
            "{store}\n{}",
            f.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_pass_promtool() {
    let mut f = Fleet::new("metrics_listen = \"127.0.0.1:0\"\n");
    let (st, err) = f.dirs[0].login(ALICE, ALICE_PW);
    assert!(st.success(), "{err}");
    let port = f.start(0);
    let addr = metrics_addr(&f);

    let (status, body) = http_get(&addr, "/healthz").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok\n"));
    // A name rebound to loopback (a web page's request) is not answered.
    let port_part = addr.rsplit(':').next().unwrap();
    let (status, body) = http_get_host(&addr, "/metrics", &format!("rebound.example:{port_part}")).await;
    assert_eq!(status, "HTTP/1.1 421 Misdirected Request", "{body}");
    assert!(!body.contains(ALICE), "{body}");
    let (status, _) = http_get_host(&addr, "/metrics", &format!("localhost:{port_part}")).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (status, _) = http_get(&addr, "/readyz").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (_, before) = http_get(&addr, "/metrics").await;
    assert_eq!(
        sample(&before, "mailproxy_sessions_open{protocol=\"imap\"}"),
        Some(0.0),
        "{before}"
    );

    // One good login that fetches, one wrong password.
    let mut c = login(port).await;
    let r = c.imap("f", "FETCH 1:* (FLAGS)").await.unwrap();
    assert!(r.tagged.starts_with("f "), "{r:?}");
    let (_, during) = http_get(&addr, "/metrics").await;
    assert_eq!(
        sample(&during, "mailproxy_sessions_open{protocol=\"imap\"}"),
        Some(1.0),
        "{during}"
    );
    c.imap("z", "LOGOUT").await.unwrap();
    drop(c);
    let (_, tagged) = try_login(port, "wrong").await;
    assert!(tagged.starts_with("a1 NO"), "{tagged}");

    let t0 = Instant::now();
    let body = loop {
        let (_, body) = http_get(&addr, "/metrics").await;
        let closed = sample(&body, "mailproxy_sessions_open{protocol=\"imap\"}") == Some(0.0)
            && sample(
                &body,
                "mailproxy_relayed_bytes_total{protocol=\"imap\",direction=\"up\"}",
            )
            .is_some();
        if closed || t0.elapsed() > Duration::from_secs(5) {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let get = |s: &str| sample(&body, s).unwrap_or_else(|| panic!("no {s} in\n{body}"));
    assert_eq!(
        get("mailproxy_logins_total{protocol=\"imap\",outcome=\"ok\",reason=\"none\"}"),
        1.0
    );
    assert_eq!(
        get("mailproxy_logins_total{protocol=\"imap\",outcome=\"failed\",reason=\"credentials\"}"),
        1.0
    );
    assert_eq!(
        get("mailproxy_connections_total{protocol=\"imap\",outcome=\"accepted\"}"),
        2.0
    );
    assert_eq!(
        get("mailproxy_connections_total{protocol=\"imap\",outcome=\"relayed\"}"),
        1.0
    );
    assert_eq!(
        get("mailproxy_refreshes_total{provider=\"custom\",outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(get("mailproxy_sessions_open{protocol=\"imap\"}"), 0.0);
    // What went up after the login, byte for byte.
    let up = ["s SELECT INBOX\r\n", "f FETCH 1:* (FLAGS)\r\n", "z LOGOUT\r\n"];
    assert_eq!(
        get("mailproxy_relayed_bytes_total{protocol=\"imap\",direction=\"up\"}"),
        up.iter().map(|l| l.len()).sum::<usize>() as f64
    );
    assert!(get("mailproxy_relayed_bytes_total{protocol=\"imap\",direction=\"down\"}") > 0.0);
    let left = get(&format!("mailproxy_token_expiry_seconds{{account=\"{ALICE}\"}}"));
    assert!(left > 3000.0 && left <= 3600.0, "{left}");
    assert!(get("mailproxy_kdf_runs") >= 2.0, "two password checks ran the KDF");
    assert_eq!(get("mailproxy_token_store_up"), 1.0);

    // The exposition is valid for Prometheus.
    client::promtool_check(&body);

    // The store going away makes the instance not ready.
    drop(std::mem::replace(&mut f.pg, Postgres::start()));
    let (status, body) = http_get(&addr, "/readyz").await;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert!(body.contains("PostgreSQL is not reachable"), "{body}");
}

/// The shared store going down is a temporary failure for clients of every
/// protocol, in a plain sentence: what went wrong goes to the log only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_store_outage_is_a_temporary_failure_in_plain_words() {
    use crate::support::client::plain_b64;
    use crate::support::world_mail::{expect_smtp, pop3_cmd, pop3_line, smtp_cmd};

    let mut f = Fleet::new("");
    let d = &f.env.dovecot;
    // SMTP and POP3 listeners next to IMAP, and the account's servers for them.
    let cfg = std::fs::read_to_string(f.dirs[0].config_path())
        .unwrap()
        .replace(
            "[imap]\n",
            "[smtp]\nlisten = \"127.0.0.1:0\"\ntls = \"none\"\n\n[pop3]\nlisten = \"127.0.0.1:0\"\ntls = \"none\"\n\n[imap]\n",
        )
        + &format!(
            "smtp = \"smtps://localhost:{}\"\npop3 = \"pop3s://localhost:{}\"\n",
            d.submissions_port, d.pop3s_port
        );
    f.dirs[0].write_config(&cfg);
    let (st, err) = f.dirs[0].login(ALICE, ALICE_PW);
    assert!(st.success(), "{err}");
    let imap = f.start(0);
    drop(login(imap).await);
    let (smtp, pop3) = {
        let p = f.proxies[0].as_ref().unwrap();
        (p.smtp.unwrap().port(), p.pop3.unwrap().port())
    };

    // PostgreSQL goes away (a fresh one stands in for the harness's checks).
    drop(std::mem::replace(&mut f.pg, Postgres::start()));
    let said = "mailproxy cannot reach its token store right now; try again in a moment";
    let internal = [
        "os error",
        "Connection refused",
        "token database",
        "vault",
        "db error",
        "connect",
    ];
    let plain = |proto: &str, answer: &str| {
        for word in internal {
            assert!(!answer.contains(word), "{proto} shows {word:?}: {answer}");
        }
    };

    let (_, tagged) = try_login(imap, ALICE_PW).await;
    assert_eq!(tagged, format!("a1 NO [UNAVAILABLE] {said}"), "{}", f.logs());
    plain("IMAP", &tagged);

    let mut c = LineConn::plain(smtp).await.unwrap();
    expect_smtp(&mut c, "220").await;
    smtp_cmd(&mut c, "EHLO client.example.org", "250").await;
    let r = smtp_cmd(&mut c, &format!("AUTH PLAIN {}", plain_b64(ALICE, ALICE_PW)), "454").await;
    assert_eq!(r, vec![format!("454 4.7.0 {said}")]);
    plain("SMTP", &r[0]);

    let mut c = LineConn::plain(pop3).await.unwrap();
    assert!(pop3_line(&mut c).await.starts_with(b"+OK"));
    assert!(pop3_cmd(&mut c, &format!("USER {ALICE}"), false)
        .await
        .starts_with(b"+OK"));
    let r = String::from_utf8_lossy(&pop3_cmd(&mut c, &format!("PASS {ALICE_PW}"), false).await).into_owned();
    assert_eq!(r, format!("-ERR [SYS/TEMP] {said}\r\n"));
    plain("POP3", &r);

    // The log says what happened, at error level, once per login.
    let p = f.proxies[0].as_ref().unwrap();
    let needle = "the token store cannot be reached: the token database: ";
    // The log is read by a thread of its own: wait for all three lines.
    let until = Instant::now() + Duration::from_secs(10);
    while p.logs().matches(needle).count() < 3 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = p.logs();
    let detail: Vec<&str> = logs.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(detail.len(), 3, "{logs}");
    assert!(
        detail
            .iter()
            .all(|l| l.contains("ERROR") && l.contains("Connection refused")),
        "{logs}"
    );
}

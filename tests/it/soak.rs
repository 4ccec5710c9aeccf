//! Nothing grows, and the counters are live: 10,000 churned sessions
//! against a light fake upstream leave mailproxy's memory, open files and
//! tasks where they were after the warm-up, and the bytes of a session
//! still open show in `/metrics` within 2 s. (The long soak, ≥ 100,000
//! sessions in release, is a section of `scripts/bench`.)

use std::time::{Duration, Instant};

use crate::support::client::{self, LineConn};
use crate::support::light::{self, Light, LightTally};
use crate::support::mailproxy::{Proxy, ProxyDir};
use crate::support::FakeProvider;

const OAUTH: (&str, &str) = ("soak@example.org", "soak local pw");

/// A proxy with metrics, one OAuth account and passthrough (the listener's
/// fallback) for any other name, both to the light upstream.
struct Rig {
    _light: Light,
    tally: LightTally,
    _provider: FakeProvider,
    _dir: ProxyDir,
    proxy: Proxy,
}

impl Rig {
    async fn start() -> Rig {
        let (port, tally, light) = light::start().await;
        let (provider, dir, proxy) = tokio::task::block_in_place(|| {
            let p = FakeProvider::start();
            let (dir, proxy) = light::proxy(port, &p, OAUTH, "max_connections_per_ip = 1000\n", "warn");
            (p, dir, proxy)
        });
        Rig {
            _light: light,
            tally,
            _provider: provider,
            _dir: dir,
            proxy,
        }
    }

    fn port(&self) -> u16 {
        self.proxy.imap_port()
    }

    async fn scrape(&self) -> String {
        let url = format!("http://{}/metrics", self.proxy.metrics_addr());
        tokio::task::spawn_blocking(move || crate::support::http::get(&url).unwrap().text())
            .await
            .unwrap()
    }

    /// RSS (KiB), open files and tasks once every session has closed.
    async fn settled(&self) -> (u64, usize, u64) {
        let (closed, fds, tasks) = light::quiet(&self.proxy, Duration::from_secs(15)).await;
        assert!(closed, "sessions still open after 15 s");
        (self.proxy.rss_kib(), fds, tasks)
    }
}

/// Sessions `from..to`, `at_once` at a time: OAuth and passthrough, a tenth
/// dropped mid-command ([`light::churned`]).
async fn churn(port: u16, from: usize, to: usize, at_once: usize) {
    light::churn(port, from, to, at_once, OAUTH)
        .await
        .unwrap_or_else(|e| panic!("sessions {from}..{to}: {e}"));
}

/// `now` is within `pct` % (plus `slack`) of `base`, either way.
fn flat(what: &str, base: u64, now: u64, pct: u64, slack: u64) {
    let allowed = base * pct / 100 + slack;
    assert!(
        now.abs_diff(base) <= allowed,
        "{what}: {base} after the warm-up, {now} at the end (allowed ±{allowed})"
    );
}

/// 10,000 sessions, 20 and 64 at a time, OAuth and passthrough mixed, a
/// tenth dropped mid-command: RSS, open files and tasks after the first
/// 1,000 and at the end are the same within 10 % (RSS: 10 % plus 2 MiB,
/// for the allocator's own bookkeeping; files and tasks: 10 %, at least 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_churned_sessions_leave_nothing_behind() {
    const TOTAL: usize = 10_000;
    const WARM: usize = 1_000;
    let rig = Rig::start().await;
    let port = rig.port();
    // (`mailproxy login` may have tried the account's upstream already.)
    let (logins0, oauth0, conns0) = (rig.tally.logins(), rig.tally.oauth_logins(), rig.tally.connections());
    let t0 = Instant::now();
    churn(port, 0, WARM, 20).await;
    let (rss0, fds0, tasks0) = rig.settled().await;
    let mut from = WARM;
    while from < TOTAL {
        let to = (from + 1_500).min(TOTAL);
        churn(port, from, to, if (from / 1_500).is_multiple_of(2) { 64 } else { 20 }).await;
        from = to;
    }
    let (rss1, fds1, tasks1) = rig.settled().await;
    eprintln!(
        "soak: {TOTAL} sessions in {:.1} s; RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}, tasks {tasks0} -> {tasks1}",
        t0.elapsed().as_secs_f64()
    );
    // Half the sessions were OAuth (the even ones: all of them logged in),
    // half passthrough (less the tenth of all dropped during their login);
    // the sessions dropped after their login were closed upstream too.
    let (logins, oauth) = (rig.tally.logins() - logins0, rig.tally.oauth_logins() - oauth0);
    assert_eq!(oauth, (TOTAL / 2) as u64, "OAuth logins at the upstream");
    assert_eq!(logins - oauth, (TOTAL / 2 - TOTAL / 20) as u64, "passthrough logins");
    assert_eq!(
        rig.tally.connections() - conns0,
        logins,
        "one upstream connection per login"
    );
    let t1 = Instant::now();
    while rig.tally.open() > 0 && t1.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rig.tally.open(), 0, "sessions still open at the upstream");
    flat("RSS (KiB)", rss0, rss1, 10, 2048);
    flat("open files", fds0 as u64, fds1 as u64, 10, 1);
    flat("tasks", tasks0, tasks1, 10, 1);
    let body = rig.scrape().await;
    let fds = client::metric(&body, "process_open_fds").expect("process_open_fds");
    assert!(
        fds >= 5.0 && fds <= fds1 as f64 + 2.0,
        "process_open_fds {fds}, /proc says {fds1}"
    );
}

/// A session in IDLE that gets 10 MB pushed shows them in `/metrics`
/// within 2 s of their arrival, while it is still open and idling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_of_an_idle_session_show_in_metrics_within_two_seconds() {
    const DOWN: &str = "mailproxy_relayed_bytes_total{protocol=\"imap\",direction=\"down\"}";
    const MB10: usize = 10 * 1024 * 1024;
    let rig = Rig::start().await;
    rig.tally.push_on_idle(MB10 as u64);
    let before = client::metric(&rig.scrape().await, DOWN).unwrap_or(0.0);
    let mut c = LineConn::plain(rig.port()).await.unwrap();
    c.read_line().await.unwrap();
    assert!(c
        .imap("a", &format!("LOGIN \"{}\" \"{}\"", OAUTH.0, OAUTH.1))
        .await
        .unwrap()
        .is_ok());
    c.send("i IDLE").await.unwrap();
    assert!(c.read_line().await.unwrap().starts_with('+'));
    let head = c.read_line().await.unwrap();
    assert_eq!(client::literal_len(&head), Some(MB10), "{head}");
    assert_eq!(c.read_exact(MB10).await.unwrap().len(), MB10);
    assert_eq!(c.read_line().await.unwrap().trim_end(), ")");
    let arrived = Instant::now();
    let seen = loop {
        let body = rig.scrape().await;
        let down = client::metric(&body, DOWN).unwrap_or(0.0) - before;
        if down >= MB10 as f64 || arrived.elapsed() > Duration::from_secs(3) {
            let open = client::metric(&body, "mailproxy_sessions_open{protocol=\"imap\"}");
            assert_eq!(open, Some(1.0), "the session is still open");
            break down;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = arrived.elapsed();
    assert!(
        seen >= MB10 as f64 && took <= Duration::from_secs(2),
        "{seen} bytes down after {took:?}"
    );
    c.send("DONE").await.unwrap();
    assert!(c.read_imap_response("i").await.unwrap().is_ok());
    c.write_raw(b"z LOGOUT\r\n").await.unwrap();
    let _ = c.read_imap_response("z").await;
}

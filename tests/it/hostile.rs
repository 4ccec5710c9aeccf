//! Hostile input and faults, end to end against the real binary: garbage and
//! oversized input on every listener, slow and idle clients, connection
//! floods, mass failed logins, broken upstreams and certificates, a failing
//! OAuth provider, and `kill -9` during refresh-token rotation.
//!
//! After each attack the proxy must still run, a session opened before it
//! must still be served, memory must stay bounded and the vault untouched.

use std::time::{Duration, Instant};

use crate::support::hostile_util::*;
use crate::support::mailproxy::{run, Proxy, BIN};
use crate::support::world::{imaps_account, ALICE, ALICE_PW, BOB, BOB_PW};
use crate::support::{Dovecot, DovecotOptions, LineConn, ServerCert};

const MIB: u64 = 1024;

/// Every line after the greeting must be a protocol error (or a close).
fn only_errors(proto: &str, lines: &[String]) -> bool {
    lines.iter().skip(1).all(|l| match proto {
        "imap" => {
            let mut w = l.split_whitespace();
            let _tag = w.next();
            matches!(w.next(), Some("BAD" | "NO" | "BYE")) || l.starts_with("+ ")
        }
        "smtp" => l.starts_with('4') || l.starts_with('5'),
        _ => l.starts_with("-ERR"),
    })
}

fn closing_line(proto: &str) -> &'static str {
    match proto {
        "imap" => "* BYE",
        "smtp" => "421 ",
        _ => "-ERR",
    }
}

fn ports(rig: &Rig) -> [(&'static str, u16); 3] {
    [
        ("imap", rig.imap_port()),
        ("smtp", rig.smtp_port()),
        ("pop3", rig.pop3_port()),
    ]
}

/// A started rig with alice authorised and a baseline session open.
async fn rig_with_baseline(limits: &str, extra: impl FnOnce(&crate::support::Env) -> String) -> (Rig, Baseline) {
    let mut rig = Rig::new(limits, extra);
    rig.authorise(ALICE, ALICE_PW);
    rig.start();
    let base = Baseline::alice(rig.imap_port()).await;
    (rig, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_protocol_errors_then_close_on_every_listener() {
    let (mut rig, mut base) = rig_with_baseline("preauth_timeout = 30", |_| String::new()).await;
    let vault = rig.vault();
    let rss0 = rig.rss_kib();
    // 25 more invalid lines after each payload: past the 20-consecutive-errors limit.
    let trailer = b"\x00\xff\xfe garbage \x80\x1b[2J\r\n".repeat(25);
    let mut nul = vec![0u8; 4096];
    nul.extend_from_slice(b"\r\n");
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise(0x5eed, 64 * 1024)),
        ("NUL bytes", nul),
        (
            "invalid UTF-8",
            b"a LOGIN \xff\xfe\xfd \xc3\x28\r\n\xf0\x28\x8c\x28 NOOP\r\nb\xe2\x82 CAPABILITY\r\nUSER \xc0\xaf\r\nEHLO \xed\xa0\x80\r\n"
                .to_vec(),
        ),
        ("bare CR/LF soup", b"\r\r\n\n\r\n\r\r\r\n\n\n\r \r\n\t\n".repeat(200)),
    ];
    for (proto, port) in ports(&rig) {
        for (what, p) in &payloads {
            let mut bytes = p.clone();
            bytes.extend_from_slice(&trailer);
            let seen = blast(port, bytes, 4096, Duration::from_secs(15)).await;
            let lines = seen.lines();
            assert!(
                seen.closed && seen.elapsed < Duration::from_secs(10),
                "{proto} / {what}: not closed within 10 s ({:?}): {lines:?}",
                seen.elapsed
            );
            assert!(
                lines.len() >= 2,
                "{proto} / {what}: no protocol error before the close: {lines:?}"
            );
            assert!(
                only_errors(proto, &lines),
                "{proto} / {what}: non-error reply to garbage: {lines:?}"
            );
            assert!(
                lines.iter().skip(1).any(|l| l.starts_with(closing_line(proto))),
                "{proto} / {what}: closed without saying why: {lines:?}"
            );
        }
    }
    rig.assert_healthy(&mut base, &vault, Some(rss0), 4 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_line_and_absurd_literals() {
    let (mut rig, mut base) = rig_with_baseline("", |_| String::new()).await;
    let vault = rig.vault();
    // Warm up each listener once so allocator arenas exist before measuring.
    for (_, port) in ports(&rig) {
        blast(port, b"x\r\n".to_vec(), 64, Duration::from_millis(300)).await;
    }
    let rss0 = rig.rss_kib();
    for (proto, port) in ports(&rig) {
        let seen = blast(port, vec![b'A'; 10 << 20], 64 * 1024, Duration::from_secs(20)).await;
        let lines = seen.lines();
        assert!(
            seen.closed,
            "{proto}: 10 MB line did not get the connection closed: {lines:?}"
        );
        assert!(
            lines.iter().skip(1).any(|l| l.starts_with(closing_line(proto))),
            "{proto}: no {} before the close: {lines:?}",
            closing_line(proto)
        );
        let grown = rig.rss_kib().saturating_sub(rss0);
        assert!(grown < 3 * MIB, "{proto}: RSS grew by {grown} KiB after a 10 MB line");
    }

    // Synchronising literals too large to accept: tagged BAD, the session goes on.
    let mut c = imap_connect(rig.imap_port()).await;
    for n in ["4294967295", "18446744073709551615", "99999999999999999999999", "8193"] {
        c.send(&format!("a LOGIN {{{n}}}")).await.unwrap();
        let r = c.read_imap_response("a").await.unwrap();
        assert!(r.tagged.starts_with("a BAD"), "{{{n}}}: {r:?}");
        assert!(
            r.lines.is_empty(),
            "{{{n}}}: no continuation for a refused literal: {r:?}"
        );
    }
    assert!(c.imap("n", "NOOP").await.unwrap().is_ok());
    // Non-synchronising ones would have to be swallowed: BYE and close.
    for n in [
        "4294967295",
        "18446744073709551615",
        "99999999999999999999999",
        "10485760",
    ] {
        let seen = blast(
            rig.imap_port(),
            format!("a LOGIN {{{n}+}}\r\n").into_bytes(),
            4096,
            Duration::from_secs(10),
        )
        .await;
        let lines = seen.lines();
        assert!(seen.closed, "{{{n}+}}: not closed: {lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("* BYE")), "{{{n}+}}: {lines:?}");
    }
    rig.assert_healthy(&mut base, &vault, Some(rss0), 3 * MIB).await;
}

/// Writes `bytes` one per `every`, never a line end, until the proxy closes.
async fn trickle(port: u16, every: Duration, limit: Duration) -> Seen {
    let t0 = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for b in b"x LOGIN aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .iter()
            .cycle()
        {
            tokio::time::sleep(every).await;
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    });
    let (bytes, closed) = read_until_close(&mut rd, t0 + limit).await;
    writer.abort();
    Seen {
        bytes,
        closed,
        elapsed: t0.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_and_idle_clients_are_cut_off() {
    let (mut rig, mut base) = rig_with_baseline("preauth_timeout = 2", |_| String::new()).await;
    let vault = rig.vault();
    let mut tasks = Vec::new();
    for (proto, port) in ports(&rig) {
        tasks.push((
            proto,
            "trickle",
            tokio::spawn(trickle(port, Duration::from_secs(1), Duration::from_secs(20))),
        ));
        tasks.push((
            proto,
            "idle",
            tokio::spawn(blast(port, Vec::new(), 1, Duration::from_secs(20))),
        ));
    }
    for (proto, kind, t) in tasks {
        let seen = t.await.unwrap();
        let lines = seen.lines();
        assert!(seen.closed, "{proto} {kind}: never disconnected: {lines:?}");
        let (lo, hi) = match kind {
            // Silence: one preauth_timeout.
            "idle" => (Duration::from_millis(1500), Duration::from_secs(5)),
            // One byte a second: only the 4x cap on the whole pre-login phase helps.
            _ => (Duration::from_secs(2), Duration::from_secs(11)),
        };
        assert!(
            seen.elapsed >= lo && seen.elapsed <= hi,
            "{proto} {kind}: disconnected after {:?}, expected {lo:?}..{hi:?}: {lines:?}",
            seen.elapsed
        );
        assert!(
            lines.iter().skip(1).any(|l| l.starts_with(closing_line(proto))),
            "{proto} {kind}: closed without a {}: {lines:?}",
            closing_line(proto)
        );
        eprintln!("{proto} {kind}: cut off after {:?}: {:?}", seen.elapsed, lines.last());
    }
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_beyond_max_connections() {
    let (mut rig, mut base) = rig_with_baseline("max_connections = 20", |_| String::new()).await;
    let vault = rig.vault();
    for (proto, port) in ports(&rig) {
        // The baseline session holds one IMAP slot.
        let free = if proto == "imap" { 19 } else { 20 };
        let mut held = Vec::new();
        for _ in 0..free {
            let mut t = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let g = first_line(&mut t, Duration::from_secs(5)).await;
            assert!(
                g.starts_with("* OK") || g.starts_with("220 ") || g.starts_with("+OK"),
                "{proto}: {g}"
            );
            held.push(t);
        }
        for i in 0..10 {
            let t0 = Instant::now();
            let mut t = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let l = first_line(&mut t, Duration::from_secs(5)).await;
            let want = match proto {
                "imap" => "* BYE [UNAVAILABLE]",
                "smtp" => "421 ",
                _ => "-ERR [SYS/TEMP]",
            };
            assert!(l.starts_with(want), "{proto}: connection {} got {l:?}", free + 2 + i);
            let (_, closed) = read_until_close(&mut t, Instant::now() + Duration::from_secs(3)).await;
            assert!(closed, "{proto}: refused connection left open");
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "{proto}: refusal took {:?}",
                t0.elapsed()
            );
        }
        // Free five slots: five new connections are served, the sixth is refused again.
        held.truncate(free - 5);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut accepted = Vec::new();
        while accepted.len() < 5 {
            assert!(Instant::now() < deadline, "{proto}: freed slots not reusable");
            let mut t = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let g = first_line(&mut t, Duration::from_secs(5)).await;
            if g.starts_with("* OK") || g.starts_with("220 ") || g.starts_with("+OK") {
                accepted.push(t);
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut t = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let l = first_line(&mut t, Duration::from_secs(5)).await;
        assert!(
            !(l.starts_with("* OK") || l.starts_with("220 ") || l.starts_with("+OK")),
            "{proto}: over the cap again but accepted: {l}"
        );
        base.check().await;
    }
    let logs = rig.logs();
    assert!(logs.contains("connection limit reached"), "{}", tail(&logs, 30));
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_beyond_max_connections_per_ip() {
    let (mut rig, mut base) = rig_with_baseline("max_connections_per_ip = 5", |_| String::new()).await;
    let vault = rig.vault();
    for (proto, port) in ports(&rig) {
        let free = if proto == "imap" { 4 } else { 5 };
        let mut held = Vec::new();
        for _ in 0..free {
            let mut t = connect_from([127, 0, 0, 1], port).await.unwrap();
            let g = first_line(&mut t, Duration::from_secs(5)).await;
            assert!(
                g.starts_with("* OK") || g.starts_with("220 ") || g.starts_with("+OK"),
                "{proto}: {g}"
            );
            held.push(t);
        }
        let mut t = connect_from([127, 0, 0, 1], port).await.unwrap();
        let l = first_line(&mut t, Duration::from_secs(5)).await;
        assert!(l.contains("too many connections from your address"), "{proto}: {l:?}");
        if proto == "imap" {
            assert!(l.starts_with("* BYE [UNAVAILABLE]"), "{l}");
        }
        // Another address is not affected.
        let mut others = Vec::new();
        for _ in 0..5 {
            let mut t = connect_from([127, 0, 0, 2], port).await.unwrap();
            let g = first_line(&mut t, Duration::from_secs(5)).await;
            assert!(
                g.starts_with("* OK") || g.starts_with("220 ") || g.starts_with("+OK"),
                "{proto} from 127.0.0.2: {g}"
            );
            others.push(t);
        }
        // Closing one frees a slot for this address.
        held.pop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut t = connect_from([127, 0, 0, 1], port).await.unwrap();
            let g = first_line(&mut t, Duration::from_secs(5)).await;
            if g.starts_with("* OK") || g.starts_with("220 ") || g.starts_with("+OK") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{proto}: freed per-address slot not reusable: {g}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        base.check().await;
    }
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

/// `tasks` parallel clients each make `per_task` failed LOGINs (reconnecting
/// every 20: the 20th consecutive failure closes the connection). Every
/// `real_every`-th attempt is a wrong password for alice (a KDF run), the
/// rest are unknown accounts. Returns (answered NO, connections closed with BYE).
async fn failed_login_round(port: u16, tasks: usize, per_task: usize, real_every: usize) -> (usize, usize) {
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            tokio::spawn(async move {
                let mut answered = 0usize;
                let mut byes = 0usize;
                let mut c: Option<LineConn> = None;
                for i in 0..per_task {
                    if i % 20 == 0 {
                        if let Some(mut old) = c.take() {
                            if let Ok(l) = old.read_line().await {
                                byes += usize::from(l.starts_with("* BYE"));
                            }
                        }
                        c = Some(imap_connect(port).await);
                    }
                    let conn = c.as_mut().unwrap();
                    let user = if (t * per_task + i).is_multiple_of(real_every) {
                        ALICE.to_string()
                    } else {
                        format!("guess{t}-{i}@example.org")
                    };
                    let tag = format!("t{i}");
                    let r = conn
                        .imap(&tag, &format!("LOGIN {user} \"not-the-password-{i}\""))
                        .await
                        .unwrap_or_else(|e| panic!("task {t} attempt {i}: {e}"));
                    // Attempts on a real account beyond the few that may wait
                    // for its password check are refused at once, as temporary.
                    let busy = user == ALICE && r.tagged.starts_with(&format!("{tag} NO [UNAVAILABLE]"));
                    assert!(
                        busy || r.tagged.starts_with(&format!("{tag} NO [AUTHENTICATIONFAILED]")),
                        "task {t} attempt {i}: {r:?}"
                    );
                    answered += 1;
                }
                if let Some(mut old) = c.take() {
                    if let Ok(l) = old.read_line().await {
                        byes += usize::from(l.starts_with("* BYE"));
                    }
                }
                (answered, byes)
            })
        })
        .collect();
    let (mut answered, mut byes) = (0, 0);
    for h in handles {
        let (a, b) = h.await.unwrap();
        answered += a;
        byes += b;
    }
    (answered, byes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_failed_logins() {
    const TASKS: usize = 100;
    const PER_TASK: usize = 100;
    // Every 50th attempt is a wrong password for a real account (240 KDF runs).
    let real_every = 50;
    let (mut rig, mut base) = rig_with_baseline("login_failure_delay_max = 0.02", |_| String::new()).await;
    let vault = rig.vault();
    let port = rig.imap_port();
    let rss_start = rig.rss_kib();
    // Warm-up round at full concurrency: whatever 100 parallel sessions need
    // at their peak is reached here, so the main round measures growth per attempt.
    let (a, _) = failed_login_round(port, TASKS, 20, real_every).await;
    assert_eq!(a, TASKS * 20);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_warm = rig.rss_kib();
    let t0 = Instant::now();
    let (answered, byes) = failed_login_round(port, TASKS, PER_TASK, real_every).await;
    let took = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = rig.rss_kib();
    eprintln!(
        "{answered} failed logins answered NO in {took:?}; {byes} connections closed with BYE; RSS {rss_start} KiB at start, {rss_warm} KiB after 2000 warm-up failures, {rss_end} KiB after 10 000 more"
    );
    assert_eq!(answered, TASKS * PER_TASK);
    assert_eq!(byes, TASKS * PER_TASK / 20, "each connection closed after 20 failures");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let logs = rig.logs();
    assert!(
        logs.contains("slowing down"),
        "no slow-down in the log:\n{}",
        tail(&logs, 40)
    );
    // The real user still gets in, on a new connection, promptly.
    let t1 = Instant::now();
    let mut c = imap_connect(port).await;
    let r = c.imap("ok", &format!("LOGIN {ALICE} \"{ALICE_PW}\"")).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    assert!(t1.elapsed() < Duration::from_secs(3), "{:?}", t1.elapsed());
    // No growth per attempt ...
    assert!(
        rss_end <= rss_warm + 8 * MIB,
        "RSS grew by {} KiB over 10 000 failed logins after warm-up",
        rss_end.saturating_sub(rss_warm)
    );
    // ... and a bounded peak for 100 hostile clients (see also
    // wrong_passwords_for_a_real_account_keep_memory_bounded).
    rig.assert_healthy(&mut base, &vault, Some(rss_start), 48 * MIB).await;
}

/// Each local-password check runs Argon2id with 19 MiB of working memory.
/// That memory must be given back (or reused): a client that only knows
/// account names must not be able to grow the proxy by 19 MiB per guess.
/// Four accounts are guessed at in parallel, three rounds. The proxy runs at
/// most two KDFs at once and keeps their working memory (19 MiB each) in a
/// pool of two buffers: after the first parallel round, memory must stay flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_for_real_accounts_keep_memory_bounded() {
    let others = ["k1@example.org", "k2@example.org", "k3@example.org"];
    let (mut rig, mut base) = rig_with_baseline("login_failure_delay_max = 0.02", |env| {
        others.iter().map(|n| imaps_account(n, env)).collect()
    })
    .await;
    for n in others {
        rig.authorise(n, "k local pw");
    }
    let vault = rig.vault();
    let port = rig.imap_port();
    let guess = |user: &'static str, i: usize| async move {
        let mut c = imap_connect(port).await;
        let r = c.imap("w", &format!("LOGIN {user} wrong-{i}")).await.unwrap();
        assert!(r.tagged.starts_with("w NO [AUTHENTICATIONFAILED]"), "{r:?}");
    };
    // One wrong password first: what a single KDF run leaves mapped is the baseline.
    guess(ALICE, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rig.rss_kib();
    let mut seen = Vec::new();
    for round in 1..=3 {
        let users = [ALICE, others[0], others[1], others[2]];
        let hs: Vec<_> = users.into_iter().map(|u| tokio::spawn(guess(u, round))).collect();
        for h in hs {
            h.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        seen.push(rig.rss_kib());
    }
    eprintln!("RSS {rss0} KiB after one wrong password, then after each round of four: {seen:?}");
    // The first round may add the pool's second buffer; later rounds add nothing.
    assert!(
        seen[2] <= seen[0] + 4 * 1024,
        "memory keeps growing with wrong passwords: {seen:?} KiB"
    );
    rig.assert_healthy(&mut base, &vault, Some(rss0), 20 * MIB + 8 * MIB)
        .await;
}

async fn login_tagged(port: u16, user: &str, pw: &str) -> (LineConn, String, Duration) {
    let mut c = imap_connect(port).await;
    let t0 = Instant::now();
    let r = c.imap("a1", &format!("LOGIN \"{user}\" \"{pw}\"")).await.unwrap();
    (c, r.tagged, t0.elapsed())
}

fn passthrough(name: &str, url: &str, more: &str) -> String {
    format!("[accounts.\"{name}\"]\nprovider = \"password\"\nusername = \"{BOB}\"\nimap = \"{url}\"\n{more}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_network_faults() {
    let (refused, _refused) = closed_port();
    let (silent, _s1) = fake_upstream(FakeUpstream::Silent).await;
    let (http, _s2) = fake_upstream(FakeUpstream::Says(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ))
    .await;
    let mut junk = noise(7, 2000);
    junk.extend_from_slice(b"\r\n");
    let (random, _s3) = fake_upstream(FakeUpstream::Says(junk)).await;
    let (resets, _s4) = fake_upstream(FakeUpstream::ResetsAfterLogin).await;
    let (mut rig, mut base) = rig_with_baseline("connect_timeout = 2", |_| {
        let mut s = String::new();
        for (name, port) in [
            ("refused@example.org", refused),
            ("silent@example.org", silent),
            ("http@example.org", http),
            ("random@example.org", random),
            ("resets@example.org", resets),
        ] {
            s += &passthrough(name, &format!("imap://127.0.0.1:{port}"), "");
        }
        s
    })
    .await;
    let vault = rig.vault();
    let port = rig.imap_port();

    let (_, tagged, took) = login_tagged(port, "refused@example.org", "pw").await;
    eprintln!("refused port ({took:?}): {tagged}");
    assert!(tagged.starts_with("a1 NO [UNAVAILABLE]"), "{tagged}");
    assert!(
        tagged.contains(&format!("127.0.0.1:{refused}")) && tagged.to_lowercase().contains("refused"),
        "names what failed: {tagged}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");

    let (_, tagged, took) = login_tagged(port, "silent@example.org", "pw").await;
    eprintln!("silent upstream ({took:?}): {tagged}");
    assert!(tagged.starts_with("a1 NO [UNAVAILABLE]"), "{tagged}");
    assert!(tagged.contains(&format!("127.0.0.1:{silent}")), "{tagged}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "connect_timeout = 2, NO after {took:?}"
    );

    for (name, p) in [("http@example.org", http), ("random@example.org", random)] {
        let (_, tagged, took) = login_tagged(port, name, "pw").await;
        eprintln!("{name} ({took:?}): {tagged}");
        assert!(tagged.starts_with("a1 NO [UNAVAILABLE]"), "{tagged}");
        assert!(tagged.contains(&format!("127.0.0.1:{p}")), "{tagged}");
        assert!(tagged.contains("garbage"), "says the greeting is garbage: {tagged}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    // Logged in, then the upstream resets the connection: this client's
    // session ends, nobody else's.
    let (c, tagged, _) = login_tagged(port, "resets@example.org", "pw").await;
    assert!(tagged.starts_with("a1 OK"), "{tagged}");
    let mut c = c;
    c.send("a2 NOOP").await.unwrap();
    let t0 = Instant::now();
    let mut ended = false;
    while t0.elapsed() < Duration::from_secs(10) {
        match c.read_line().await {
            Ok(l) => eprintln!("after the upstream reset the client got: {l}"),
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "client connection outlived its upstream");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificate_faults() {
    let bad = |cert: ServerCert| {
        Dovecot::start(DovecotOptions {
            password_users: vec![(BOB.to_string(), BOB_PW.to_string())],
            server_cert: cert,
            ..Default::default()
        })
    };
    let expired = bad(ServerCert::Expired);
    let selfsigned = bad(ServerCert::SelfSigned);
    let wrongname = bad(ServerCert::WrongName("wrong.example.org".into()));
    let acct = |name: &str, d: &Dovecot, more: &str| {
        passthrough(
            name,
            &format!("imaps://localhost:{}", d.imaps_port),
            &format!("ca_file = \"{}\"\n{more}", d.ca_pem_path().display()),
        )
    };
    let cfg = acct("expired@example.org", &expired, "")
        + &acct("selfsigned@example.org", &selfsigned, "")
        + &acct("wrongname@example.org", &wrongname, "")
        + &acct("insecure@example.org", &selfsigned, "insecure_skip_verify = true\n");
    let (mut rig, mut base) = rig_with_baseline("connect_timeout = 5", move |_| cfg).await;
    let vault = rig.vault();
    let port = rig.imap_port();
    for name in ["expired@example.org", "selfsigned@example.org", "wrongname@example.org"] {
        let (_, tagged, took) = login_tagged(port, name, BOB_PW).await;
        eprintln!("{name} ({took:?}): {tagged}");
        assert!(tagged.starts_with("a1 NO [UNAVAILABLE]"), "{name}: {tagged}");
        assert!(tagged.contains("certificate is not trusted"), "{name}: {tagged}");
        assert!(took < Duration::from_secs(3), "{name}: {took:?}");
    }
    assert!(!rig.logs().contains("insecure_skip_verify"), "no warning before use");
    let (mut c, tagged, _) = login_tagged(port, "insecure@example.org", BOB_PW).await;
    assert!(tagged.starts_with("a1 OK"), "insecure_skip_verify: {tagged}");
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    assert!(
        rig.proxy().wait_log("insecure_skip_verify"),
        "the log warns about the unchecked certificate:\n{}",
        tail(&rig.logs(), 30)
    );
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

/// Empties the provider's injected-failure queue: POSTs junk to /token until
/// an answer is not the injected one (unknown client: 401).
async fn drain_injected(token_url: String) {
    tokio::task::spawn_blocking(move || {
        for _ in 0..500 {
            let r = crate::support::http::post_form(
                &token_url,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", "drain"),
                    ("refresh_token", "x"),
                ],
            )
            .unwrap();
            if r.status == 401 {
                return;
            }
        }
        panic!("injected failures never drained");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_faults() {
    // One account per fault, each locked until its case: its first login
    // must go to the token endpoint.
    let names = [
        "p503@example.org",
        "phtml@example.org",
        "phang@example.org",
        "pstring@example.org",
    ];
    let (mut rig, mut base) = rig_with_baseline("provider_timeout = 2", |env| {
        names.iter().map(|n| imaps_account(n, env)).collect()
    })
    .await;
    for n in names {
        rig.authorise(n, "p local pw");
    }
    // `mailproxy login` went through the running serve, which now holds a
    // fresh access token for each: make the server refuse those, so each
    // case's login must go back to the token endpoint.
    rig.env.provider.expire_all_access_tokens();
    let vault = rig.vault();
    let port = rig.imap_port();
    let file = |n: &str| format!("{n}.json");
    // Enough failures that background retries also fail while a case runs.
    const N: usize = 50;
    let p = &rig.env.provider;

    // 1. Token endpoint down (503).
    p.fail_next_token_requests(N, 503, "<html>Service Unavailable</html>");
    let (_, tagged, took) = login_tagged(port, names[0], "p local pw").await;
    eprintln!("503 ({took:?}): {tagged}");
    assert!(tagged.starts_with("a1 NO [UNAVAILABLE]"), "{tagged}");
    assert!(tagged.contains("could not be reached"), "{tagged}");
    assert_eq!(rig.vault()[&file(names[0])], vault[&file(names[0])], "vault changed");
    drain_injected(p.token_url()).await;
    base.check().await;

    // 2. 200 with HTML instead of JSON.
    p.fail_next_token_requests(N, 200, "<html><body>Sign in</body></html>");
    let (_, tagged, took) = login_tagged(port, names[1], "p local pw").await;
    eprintln!("html ({took:?}): {tagged}");
    assert!(tagged.starts_with("a1 NO ["), "{tagged}");
    assert!(tagged.contains("could not be read"), "{tagged}");
    assert_eq!(rig.vault()[&file(names[1])], vault[&file(names[1])], "vault changed");
    drain_injected(p.token_url()).await;
    base.check().await;

    // 3. Token endpoint hangs: provider_timeout = 2.
    p.set_token_delay(Duration::from_secs(10));
    let (_, tagged, took) = login_tagged(port, names[2], "p local pw").await;
    eprintln!("hang ({took:?}): {tagged}");
    assert!(tagged.starts_with("a1 NO [UNAVAILABLE]"), "{tagged}");
    assert!(took < Duration::from_millis(4500), "NO after {took:?}");
    assert_eq!(rig.vault()[&file(names[2])], vault[&file(names[2])], "vault changed");
    p.set_token_delay(Duration::ZERO);
    base.check().await;

    // 4. expires_in as a string: a clear NO, or success.
    p.fail_next_token_requests(
        N,
        200,
        r#"{"access_token":"x","token_type":"Bearer","expires_in":"3600"}"#,
    );
    let (_, tagged, took) = login_tagged(port, names[3], "p local pw").await;
    eprintln!("expires_in as a string ({took:?}): {tagged}");
    assert!(
        tagged.starts_with("a1 OK") || (tagged.starts_with("a1 NO [") && tagged.len() > 20),
        "{tagged}"
    );
    let string_vault_same = rig.vault()[&file(names[3])] == vault[&file(names[3])];
    eprintln!("expires_in as a string: vault unchanged: {string_vault_same}");
    drain_injected(p.token_url()).await;
    base.check().await;

    // Healthy again: every account works.
    for n in names {
        let (mut c, tagged, _) = login_tagged(port, n, "p local pw").await;
        assert!(tagged.starts_with("a1 OK"), "{n} after recovery: {tagged}");
        assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
    }
    assert!(rig.proxy.as_mut().unwrap().is_running());
    base.check().await;
    let _ = string_vault_same;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_survives_kill_9_during_rotation() {
    let mut rig = Rig::new("", |_| String::new());
    rig.authorise(ALICE, ALICE_PW);
    rig.env.provider.set_rotate_refresh_tokens(true);
    let vault_file = rig.dir.state_dir().join("accounts").join(format!("{ALICE}.json"));
    let check = |rig: &Rig| {
        let mut child = std::process::Command::new(BIN)
            .args(["--config", rig.dir.config_path().to_str().unwrap(), "check", ALICE])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{ALICE_PW}\n").as_bytes());
        child
    };
    // How long a whole `check` takes here (the slowest of three): the kills
    // are spread over 1.2 times that.
    let mut full = Duration::ZERO;
    for _ in 0..3 {
        let t0 = Instant::now();
        let st = check(&rig).wait().unwrap();
        assert!(st.success());
        full = full.max(t0.elapsed());
    }
    let span_ms = (full.as_millis() as u64 * 6 / 5).max(80);
    eprintln!("one `mailproxy check` takes {full:?}; killing at random in 0..{span_ms} ms");

    let delays = noise(0xdead, 30);
    let (mut before_refresh, mut saved, mut hazards, mut finished) = (0, 0, 0, 0);
    for (i, d) in delays.iter().enumerate() {
        let before = std::fs::read(&vault_file).unwrap();
        let r0 = rig.env.provider.refreshes();
        let mut child = check(&rig);
        std::thread::sleep(Duration::from_millis(u64::from(*d) * span_ms / 255));
        let exited_by_itself = child.try_wait().ok().flatten();
        if let Some(st) = exited_by_itself {
            eprintln!("iteration {i}: `check` had already exited ({st}) when the kill came");
        }
        let _ = child.kill();
        let _ = child.wait();
        let after = std::fs::read(&vault_file).unwrap();
        let rec: serde_json::Value = serde_json::from_slice(&after).unwrap_or_else(|e| {
            panic!(
                "iteration {i}: torn vault record ({e}): {}",
                String::from_utf8_lossy(&after)
            )
        });
        assert_eq!(rec["account"], ALICE, "iteration {i}");
        let refreshed = rig.env.provider.refreshes() > r0;
        match (refreshed, after != before) {
            (false, _) => before_refresh += 1,
            (true, true) => saved += 1,
            (true, false) => {
                hazards += 1;
                eprintln!(
                    "HAZARD iteration {i}: killed after the provider rotated the refresh token but before the vault was saved; the stored token is dead. Re-authorising to go on."
                );
                let (code, out, _) = run(&rig.dir, &["check", ALICE], &format!("{ALICE_PW}\n"));
                assert_eq!(code, 1, "a dead token is reported: {out}");
                assert!(out.contains(&format!("mailproxy login {ALICE}")), "{out}");
                rig.authorise(ALICE, ALICE_PW);
            }
        }
        finished += usize::from(exited_by_itself.is_some());
    }
    eprintln!(
        "30 kills: {before_refresh} before any refresh, {saved} after the rotated token was saved, {hazards} in the rotation hazard window, {finished} had finished already"
    );
    let (code, out, err) = run(&rig.dir, &["accounts"], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(!(out + &err).contains("not a valid account record"));
    let strays: Vec<_> = std::fs::read_dir(vault_file.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    eprintln!("temp files left in the vault directory: {strays:?}");
    // The last saved token works: check, then a real login through the proxy.
    let (code, out, err) = run(&rig.dir, &["check", ALICE], &format!("{ALICE_PW}\n"));
    assert_eq!(code, 0, "after the kills the saved token no longer works: {out}{err}");
    rig.start();
    let mut c = imap_connect(rig.imap_port()).await;
    let r = c.imap("a1", &format!("LOGIN {ALICE} \"{ALICE_PW}\"")).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
}

/// The `kept=N cap=M` pairs of the log lines saying the passthrough name
/// table was full and shrunk.
fn name_table_sweeps(logs: &str) -> Vec<(usize, usize)> {
    let field = |l: &str, k: &str| -> usize {
        let v = l.split(k).nth(1).unwrap_or_default();
        let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or_else(|_| panic!("no {k} in {l}"))
    };
    logs.lines()
        .filter(|l| l.contains("failed passthrough logins for too many names"))
        .map(|l| (field(l, "kept="), field(l, "cap=")))
        .collect()
}

/// Failed passthrough logins through a fallback, each with its own 7 KB
/// login name, three per connection and every connection from a new
/// loopback /24 (so the per-network delay never starts): the proxy keeps
/// no client's name, and the table of names with failures stays within its
/// cap, so memory does not grow with the number of names tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_passthrough_logins_with_unique_long_names_keep_memory_bounded() {
    const NAME_LEN: usize = 7000;
    const AT_ONCE: usize = 48;
    const WARM: usize = 1000;
    const MAIN: usize = 9000;
    let tally = Tally::default();
    let (up, _fake) = fake_upstream(FakeUpstream::Refusing(tally.clone())).await;
    let mut rig = Rig::with_listeners(
        "",
        |_, proto| match proto {
            "imap" => format!("fallback = \"imap://127.0.0.1:{up}\"\n"),
            _ => String::new(),
        },
        |_| String::new(),
    );
    rig.authorise(ALICE, ALICE_PW);
    // At info rather than trace: every attempt would log its 7 KB name.
    rig.proxy = Some(Proxy::start_env(&rig.dir, &[("RUST_LOG", "info")]));
    let port = rig.imap_port();
    let mut base = Baseline::alice(port).await;
    let vault = rig.vault();
    let rss_start = rig.rss_kib();
    // Warm-up at full concurrency: what 48 sessions with long lines need at
    // their peak is reached here; the main round measures growth per name.
    let seen = failed_long_logins(port, 0, WARM, AT_ONCE, NAME_LEN).await;
    assert_eq!(seen.get("NO [AUTHENTICATIONFAILED]"), Some(&WARM), "{seen:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_warm = rig.rss_kib();
    let t0 = Instant::now();
    let seen = failed_long_logins(port, WARM, MAIN, AT_ONCE, NAME_LEN).await;
    let took = t0.elapsed();
    assert_eq!(seen.get("NO [AUTHENTICATIONFAILED]"), Some(&MAIN), "{seen:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = rig.rss_kib();
    let sweeps = name_table_sweeps(&rig.logs());
    eprintln!(
        "{MAIN} failed logins with unique {NAME_LEN}-byte names in {took:?}; RSS {rss_start} KiB at start, {rss_warm} KiB after {WARM} warm-up failures, {rss_end} KiB after {MAIN} more; the name table was shrunk {} times: {:?}",
        sweeps.len(),
        sweeps.last()
    );
    assert_eq!(tally.logins(), WARM + MAIN, "every attempt reached the upstream");
    assert!(
        rss_end <= rss_warm + 12 * MIB,
        "RSS grew by {} KiB over {MAIN} failed logins with unique names ({} KiB of names)",
        rss_end.saturating_sub(rss_warm),
        MAIN * NAME_LEN / 1024
    );
    // More names failed than the table holds: it was shrunk, never past its cap.
    assert!(!sweeps.is_empty(), "{}", tail(&rig.logs(), 20));
    for (kept, cap) in &sweeps {
        assert!(kept <= cap, "{kept} names kept, cap {cap}");
        assert!(*cap < WARM + MAIN, "cap {cap}");
    }
    rig.assert_healthy(&mut base, &vault, Some(rss_start), 48 * MIB).await;
}

//! Hostile peers on both sides of the proxy, end to end against the real
//! binary: upstreams that flood or drip before login, a crowd guessing a
//! passthrough password, credentials smuggling protocol lines or log lines,
//! log lines that must name only the login they are about, and a SIGHUP that
//! takes a fallback away and changes a connection limit.
//!
//! After each, the proxy must still run and another session must still be
//! served.

use std::time::{Duration, Instant};

use crate::support::client;
use crate::support::hostile_util::*;
use crate::support::world::{World, ALICE, ALICE_PW, BOB, BOB_PW, FRANK, FRANK_PW};
use crate::support::LineConn;

const MIB: u64 = 1024;

/// A started rig, its log checked for secrets at the end, with alice
/// authorised and a baseline session open.
async fn started(rig: Rig) -> (CheckedRig, Baseline) {
    let mut rig = rig.checked(&[]);
    rig.authorise(ALICE, ALICE_PW);
    rig.start();
    let base = Baseline::alice(rig.imap_port()).await;
    (rig, base)
}

/// `fallback = "URL"` for the listeners named in `urls`.
fn fallbacks(urls: &[(Proto, String)]) -> impl Fn(&crate::support::Env, &str) -> String + '_ {
    move |_, proto| {
        urls.iter()
            .find(|(p, _)| p.name() == proto)
            .map(|(_, u)| format!("fallback = \"{u}\"\n"))
            .unwrap_or_default()
    }
}

/// A passthrough login on `proto` (IMAP `LOGIN`, SMTP `EHLO` + `AUTH PLAIN`,
/// POP3 `USER` + `PASS`): the final answer (one line without CRLF), how long
/// it took from the login command, and the connection.
async fn try_login(port: u16, proto: Proto, user: &str, pw: &str) -> (String, Duration, LineConn) {
    match proto {
        Proto::Imap => {
            let mut c = imap_connect(port).await;
            let t0 = Instant::now();
            let r = c.imap("a1", &format!("LOGIN \"{user}\" \"{pw}\"")).await.unwrap();
            (r.tagged, t0.elapsed(), c)
        }
        Proto::Smtp => {
            let mut c = smtp_connect(port).await;
            c.send("EHLO client.example.org").await.unwrap();
            let r = c.read_smtp_reply().await.unwrap();
            assert!(r.last().unwrap().starts_with("250 "), "{r:?}");
            let t0 = Instant::now();
            c.send(&format!("AUTH PLAIN {}", client::plain_b64(user, pw)))
                .await
                .unwrap();
            let r = c.read_smtp_reply().await.unwrap();
            assert_eq!(r.len(), 1, "{r:?}");
            (r[0].clone(), t0.elapsed(), c)
        }
        Proto::Pop3 => {
            let mut c = pop3_connect(port).await;
            c.send(&format!("USER {user}")).await.unwrap();
            assert_eq!(c.read_line_raw().await.unwrap(), b"+OK Send PASS\r\n");
            let t0 = Instant::now();
            c.send(&format!("PASS {pw}")).await.unwrap();
            let l = c.read_line().await.unwrap();
            (l, t0.elapsed(), c)
        }
    }
}

fn temporary(proto: Proto) -> &'static str {
    match proto {
        Proto::Imap => "a1 NO [UNAVAILABLE] ",
        Proto::Smtp => "454 4.7.0 ",
        Proto::Pop3 => "-ERR [SYS/TEMP] ",
    }
}

/// The client connection is still served after a failed login.
async fn still_served(proto: Proto, c: &mut LineConn) {
    match proto {
        Proto::Imap => {
            let r = c.imap("n1", "NOOP").await.unwrap();
            assert_eq!(r.tagged, "n1 OK NOOP completed");
        }
        Proto::Smtp => {
            c.send("NOOP").await.unwrap();
            assert_eq!(c.read_smtp_reply().await.unwrap(), vec!["250 2.0.0 OK"]);
        }
        Proto::Pop3 => {
            c.send("STAT").await.unwrap();
            assert_eq!(c.read_line_raw().await.unwrap(), b"-ERR Not authenticated\r\n");
        }
    }
}

// ---- 1. an upstream that floods before login ----

/// `rounds` rounds of `at_once` concurrent passthrough logins (each its own
/// login name) at a flooding upstream; every one must end with a temporary
/// failure naming the upstream and saying why.
async fn flood_round(port: u16, proto: Proto, upstream: u16, at_once: usize, round: usize, why: &'static str) {
    let hs: Vec<_> = (0..at_once)
        .map(|i| {
            tokio::spawn(async move {
                let user = format!("flood{round}-{i}@example.org");
                let (answer, took, mut c) = try_login(port, proto, &user, "pw").await;
                assert!(
                    answer.starts_with(temporary(proto)),
                    "{proto:?} {user}: {answer:?} after {took:?}"
                );
                assert!(
                    answer.contains(&format!("{}://127.0.0.1:{upstream}", proto.name())),
                    "{proto:?}: names the upstream: {answer}"
                );
                assert!(answer.contains(why), "{proto:?}: says why ({why}): {answer}");
                assert!(took < Duration::from_secs(10), "{proto:?}: {took:?}");
                still_served(proto, &mut c).await;
                answer
            })
        })
        .collect();
    for h in hs {
        h.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_upstream_flood_before_login_is_cut_off_and_memory_stays_flat() {
    let tally = Tally::default();
    let (up, _fake) = fake_upstream(FakeUpstream::Flood(Proto::Imap, tally.clone())).await;
    let urls = [(Proto::Imap, Proto::Imap.url(up))];
    let (mut rig, mut base) = started(Rig::with_listeners("", fallbacks(&urls), |_| String::new())).await;
    let vault = rig.vault();
    let port = rig.imap_port();
    const AT_ONCE: usize = 8;
    let why = "more than 1048576 bytes before login";

    // One round first: what eight such sessions need at once is the baseline.
    let rss_start = rig.rss_kib();
    flood_round(port, Proto::Imap, up, AT_ONCE, 0, why).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rig.rss_kib();
    let sent0 = tally.sent();
    let sampler = RssSampler::start(rig.proxy().pid());
    let t0 = Instant::now();
    for round in 1..=7 {
        flood_round(port, Proto::Imap, up, AT_ONCE, round, why).await;
        base.check().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = tally.sent() - sent0;
    let (peak, end) = (sampler.peak().max(rig.rss_kib()), rig.rss_kib());
    eprintln!(
        "56 flooded IMAP logins in {:?}: the upstream sent {} MiB; proxy RSS {rss_start} KiB at start, {rss0} KiB after the first round, peak {peak} KiB, {end} KiB at the end",
        t0.elapsed(),
        sent >> 20
    );
    assert!(sent > 50 << 20, "the fake upstream sent only {sent} bytes");
    assert!(
        peak < rss0 + 30 * MIB,
        "RSS grew from {rss0} KiB to a peak of {peak} KiB while {} MiB were flooded",
        sent >> 20
    );
    assert!(end < rss_start + 30 * MIB, "RSS {rss_start} -> {end} KiB");
    rig.assert_healthy(&mut base, &vault, Some(rss_start), 30 * MIB).await;
    // Passthrough to a real server still works.
    let (answer, _, mut c) = try_login(port, Proto::Imap, BOB, BOB_PW).await;
    assert!(answer.starts_with("a1 OK "), "{answer}");
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_and_pop3_upstream_floods_before_login_are_cut_off() {
    let (smtp_tally, pop3_tally) = (Tally::default(), Tally::default());
    let (smtp_up, _f1) = fake_upstream(FakeUpstream::Flood(Proto::Smtp, smtp_tally.clone())).await;
    let (pop3_up, _f2) = fake_upstream(FakeUpstream::Flood(Proto::Pop3, pop3_tally.clone())).await;
    let urls = [
        (Proto::Smtp, Proto::Smtp.url(smtp_up)),
        (Proto::Pop3, Proto::Pop3.url(pop3_up)),
    ];
    let (mut rig, mut base) = started(Rig::with_listeners("", fallbacks(&urls), |_| String::new())).await;
    let vault = rig.vault();
    let rss0 = rig.rss_kib();
    let sampler = RssSampler::start(rig.proxy().pid());
    let why = "too long";
    for round in 0..3 {
        let smtp = flood_round(rig.smtp_port(), Proto::Smtp, smtp_up, 8, round, why);
        let pop3 = flood_round(rig.pop3_port(), Proto::Pop3, pop3_up, 8, round, why);
        tokio::join!(smtp, pop3);
        base.check().await;
    }
    let peak = sampler.peak().max(rig.rss_kib());
    eprintln!(
        "48 flooded SMTP and POP3 logins: the upstreams sent {} + {} MiB; proxy RSS {rss0} KiB before, peak {peak} KiB",
        smtp_tally.sent() >> 20,
        pop3_tally.sent() >> 20
    );
    assert_eq!(smtp_tally.connections(), 24);
    assert_eq!(pop3_tally.connections(), 24);
    assert!(peak < rss0 + 30 * MIB, "RSS {rss0} -> peak {peak} KiB");
    rig.assert_healthy(&mut base, &vault, Some(rss0), 30 * MIB).await;
    // A passthrough login to the real servers still works on both listeners.
    let (answer, _, _) = try_login(rig.smtp_port(), Proto::Smtp, BOB, BOB_PW).await;
    assert_eq!(answer, "235 2.7.0 Authentication successful");
    let (answer, _, _) = try_login(rig.pop3_port(), Proto::Pop3, BOB, BOB_PW).await;
    assert_eq!(answer, "+OK Logged in");
}

// ---- 2. an upstream that drips its greeting ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_drip_upstream_ends_within_the_total_pre_login_bound() {
    let mut urls = Vec::new();
    let mut fakes = Vec::new();
    for proto in Proto::ALL {
        let (port, task) = fake_upstream(FakeUpstream::Drip(proto)).await;
        urls.push((proto, proto.url(port)));
        fakes.push((proto, port, task));
    }
    let (mut rig, mut base) = started(Rig::with_listeners("connect_timeout = 2", fallbacks(&urls), |_| {
        String::new()
    }))
    .await;
    let vault = rig.vault();
    // connect_timeout = 2: each answer may take 2 s, the whole pre-login
    // exchange 4 x 2 = 8 s. One byte a second never trips the first.
    let hs: Vec<_> = fakes
        .iter()
        .map(|(proto, up, _)| {
            let (proto, up, port) = (*proto, *up, proto.port(&rig));
            tokio::spawn(async move {
                // One name per protocol: attempts for one name take turns.
                let user = format!("drip-{}@example.org", proto.name());
                let (answer, took, mut c) = try_login(port, proto, &user, "pw").await;
                eprintln!("{proto:?} slow drip: {answer} after {took:?}");
                assert!(answer.starts_with(temporary(proto)), "{proto:?}: {answer}");
                assert!(
                    answer.contains(&format!("127.0.0.1:{up}")) && answer.contains("did not complete within 8 s"),
                    "{proto:?}: {answer}"
                );
                assert!(
                    took >= Duration::from_millis(7500) && took < Duration::from_secs(11),
                    "{proto:?}: answered after {took:?}, expected about 8 s"
                );
                still_served(proto, &mut c).await;
            })
        })
        .collect();
    for h in hs {
        h.await.unwrap();
    }
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

// ---- 3. passthrough guessing is bounded ----

/// What one guessing client saw.
#[derive(Default)]
struct Guesses {
    refused: usize,
    busy: usize,
    busy_latency: Vec<Duration>,
}

/// Guesses `user`'s password from `from` until `until`, one attempt at a
/// time with a short pause, reconnecting every 15 attempts. A pending answer
/// is given up on at `until` (the client just leaves).
async fn guess(port: u16, from: [u8; 4], user: &'static str, until: Instant) -> Guesses {
    let mut g = Guesses::default();
    let mut n = 0usize;
    'conn: while Instant::now() < until {
        let Ok(tcp) = connect_from(from, port).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut c = LineConn::from_tcp(tcp);
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.read_line()).await {
            Ok(Ok(l)) if l.starts_with("* OK") => {}
            _ => continue,
        }
        for _ in 0..15 {
            n += 1;
            let tag = format!("g{n}");
            let t0 = Instant::now();
            let left = until.saturating_duration_since(t0);
            let r = tokio::time::timeout(left, c.imap(&tag, &format!("LOGIN \"{user}\" \"wrong-{n}\""))).await;
            let Ok(Ok(r)) = r else { break 'conn };
            if r.tagged.starts_with(&format!("{tag} NO [AUTHENTICATIONFAILED]")) {
                g.refused += 1;
            } else if r.tagged.starts_with(&format!("{tag} NO [UNAVAILABLE]")) {
                g.busy += 1;
                g.busy_latency.push(t0.elapsed());
            } else {
                panic!("unexpected answer to a wrong password: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if Instant::now() >= until {
                break 'conn;
            }
        }
    }
    g
}

/// Sends `tag command` (when given) and reads lines until the one tagged
/// `tag` (or, without a command, the first line), by `deadline`.
async fn tagged_within(
    c: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    command: Option<(&str, &str)>,
    deadline: Instant,
) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    if let Some((tag, cmd)) = command {
        c.get_mut()
            .write_all(format!("{tag} {cmd}\r\n").as_bytes())
            .await
            .ok()?;
    }
    loop {
        let mut line = String::new();
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
        let line = line.trim_end().to_string();
        match command {
            Some((tag, _)) if !line.starts_with(&format!("{tag} ")) => continue,
            _ => return Some(line),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_guessing_is_bounded_and_the_owner_still_gets_in() {
    const GUESSED: &str = "bob-guarded@example.org";
    const CLIENTS: usize = 200;
    let rig = Rig::new("login_failure_delay_max = 2", |_| String::new());
    // Every upstream login attempt for the guessed name is one connection here.
    let tally = Tally::default();
    let (fwd, _fwd_task) = fake_upstream(FakeUpstream::Forward(rig.env.dovecot.imap_port, tally.clone())).await;
    rig.edit_config(|c| {
        format!(
            "{c}[accounts.\"{GUESSED}\"]\nprovider = \"password\"\nusername = \"{BOB}\"\nimap = \"imap://127.0.0.1:{fwd}\"\n\n"
        )
    });
    let (mut rig, mut base) = started(rig).await;
    let vault = rig.vault();
    let port = rig.imap_port();

    let flood_for = Duration::from_secs(10);
    let until = Instant::now() + flood_for;
    // Each client from its own /24, so the per-network delay does not slow them.
    let hs: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(guess(port, [127, 0, 1 + i as u8, 1], GUESSED, until)))
        .collect();
    let mut all = Guesses::default();
    for h in hs {
        let g = h.await.unwrap();
        all.refused += g.refused;
        all.busy += g.busy;
        all.busy_latency.extend(g.busy_latency);
    }
    let stopped = Instant::now();
    let upstream_during = tally.connections();
    all.busy_latency.sort();
    let median = all
        .busy_latency
        .get(all.busy_latency.len() / 2)
        .copied()
        .unwrap_or_default();
    eprintln!(
        "{CLIENTS} clients guessing for {flood_for:?}: {} refused by the upstream, {} turned away at once (median {median:?}); the upstream saw {upstream_during} login attempts",
        all.refused, all.busy
    );
    assert!(
        upstream_during < 60,
        "the upstream saw {upstream_during} login attempts for one name in {flood_for:?}"
    );
    assert!(upstream_during >= 3, "the guard lets attempts through, one at a time");
    assert!(
        all.busy > 1000,
        "excess attempts are turned away: only {} were",
        all.busy
    );
    assert!(
        median < Duration::from_millis(250),
        "turned away at once, not after {median:?}"
    );

    // The flood stopped (every guessing client left): the owner logs in
    // within the failure delay cap (2 s), retrying while told to.
    let give_up = stopped + Duration::from_secs(25);
    let mut tries = 0;
    let mut owner = None;
    while Instant::now() < give_up {
        tries += 1;
        let tcp = connect_from([127, 0, 250, 1], port).await.unwrap();
        let mut c = tokio::io::BufReader::new(tcp);
        let greeting = tagged_within(&mut c, None, give_up).await;
        assert!(
            greeting.as_deref().is_some_and(|g| g.starts_with("* OK")),
            "{greeting:?}"
        );
        let cmd = format!("LOGIN \"{GUESSED}\" \"{BOB_PW}\"");
        let Some(answer) = tagged_within(&mut c, Some(("o1", &cmd)), give_up).await else {
            break;
        };
        if answer.starts_with("o1 OK ") {
            owner = Some(c);
            break;
        }
        assert!(
            answer.starts_with("o1 NO [UNAVAILABLE]"),
            "the right password: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = stopped.elapsed();
    let upstream_after = tally.connections() - upstream_during;
    eprintln!(
        "after the flood stopped: the owner {} after {took:?} ({tries} tries); the upstream saw {upstream_after} more login attempts",
        if owner.is_some() { "got in" } else { "was still not in" }
    );
    let Some(mut c) = owner else {
        panic!(
            "the owner could not log in within 25 s of the flood's end; meanwhile the upstream saw {upstream_after} more wrong-password attempts although every guessing client had left\n{}",
            tail(&rig.logs(), 20)
        );
    };
    assert!(
        took < Duration::from_secs(4),
        "the owner got in only {took:?} after the flood stopped (delay cap 2 s); the upstream saw {upstream_after} attempts after the guessing clients had left"
    );
    assert!(
        upstream_after <= 2,
        "{upstream_after} upstream attempts after every guessing client had left (the owner's is one)"
    );
    let r = tagged_within(
        &mut c,
        Some(("o2", "SELECT INBOX")),
        Instant::now() + Duration::from_secs(10),
    )
    .await;
    assert!(r.as_deref().is_some_and(|r| r.starts_with("o2 OK")), "{r:?}");
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

// ---- 4. CR, LF and NUL in credentials never reach the upstream ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cr_lf_nul_in_credentials_never_reach_the_upstream() {
    const REC: &str = "rec@example.org";
    const REFUSED: &str = "user names and passwords cannot contain CR, LF or NUL";
    let mut tallies = Vec::new();
    let mut urls = Vec::new();
    let mut _fakes = Vec::new();
    for proto in Proto::ALL {
        let t = Tally::default();
        let (port, task) = fake_upstream(FakeUpstream::Recording(proto, t.clone())).await;
        tallies.push((proto, t));
        urls.push((proto, proto.url(port)));
        _fakes.push(task);
    }
    // The recorders are both the listeners' fallbacks (for unknown names)
    // and a passthrough account's servers (for passwords).
    let account = format!(
        "[accounts.\"{REC}\"]\nprovider = \"password\"\nimap = \"{}\"\nsmtp = \"{}\"\npop3 = \"{}\"\n\n",
        urls[0].1, urls[1].1, urls[2].1
    );
    let (mut rig, mut base) = started(Rig::with_listeners(
        "login_failure_delay_max = 0.2",
        fallbacks(&urls),
        move |_| account,
    ))
    .await;
    let vault = rig.vault();

    // POP3, AUTH PLAIN: CR LF in the user name (fallback) and in the password (account).
    let pop3_refused = format!("-ERR [AUTH] {REFUSED}\r\n");
    let mut c = pop3_connect(rig.pop3_port()).await;
    for (user, pw) in [
        ("x\r\nXCLIENT ADDR=10.0.0.1 LOGIN=root\r\nDELE 1", "pw"),
        (REC, "pw\r\nDELE 1"),
        ("x\nDELE 1", "pw"),
        ("x\rDELE 1", "pw"),
    ] {
        c.send(&format!("AUTH PLAIN {}", client::plain_b64(user, pw)))
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&c.read_line_raw().await.unwrap()),
            pop3_refused,
            "{user:?} / {pw:?}"
        );
    }
    // The same after a continuation.
    c.send("AUTH PLAIN").await.unwrap();
    assert_eq!(c.read_line_raw().await.unwrap(), b"+ \r\n");
    c.send(&client::plain_b64("x\r\nDELE 1", "pw")).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&c.read_line_raw().await.unwrap()), pop3_refused);
    still_served(Proto::Pop3, &mut c).await;

    // IMAP LOGIN with literals holding CR LF (non-synchronising and synchronising).
    let mut c = imap_connect(rig.imap_port()).await;
    let user = "x\r\na2 DELETE INBOX";
    c.write_raw(format!("a LOGIN {{{}+}}\r\n{user} pw\r\n", user.len()).as_bytes())
        .await
        .unwrap();
    let r = c.read_imap_response("a").await.unwrap();
    assert_eq!(r.tagged, format!("a NO [AUTHENTICATIONFAILED] {REFUSED}"), "{r:?}");
    let pw = "pw\r\nb2 DELETE INBOX";
    c.send(&format!("b LOGIN {REC} {{{}}}", pw.len())).await.unwrap();
    let cont = c.read_line().await.unwrap();
    assert!(cont.starts_with("+ "), "{cont}");
    c.write_raw(format!("{pw}\r\n").as_bytes()).await.unwrap();
    let r = c.read_imap_response("b").await.unwrap();
    assert_eq!(r.tagged, format!("b NO [AUTHENTICATIONFAILED] {REFUSED}"), "{r:?}");
    // AUTHENTICATE PLAIN with SASL-IR: LF in the user name.
    c.send(&format!(
        "c AUTHENTICATE PLAIN {}",
        client::plain_b64("x\nc2 DELETE INBOX", "pw")
    ))
    .await
    .unwrap();
    let r = c.read_imap_response("c").await.unwrap();
    assert_eq!(r.tagged, format!("c NO [AUTHENTICATIONFAILED] {REFUSED}"), "{r:?}");
    // NUL in a password literal.
    c.write_raw(format!("d LOGIN {REC} {{7+}}\r\npw\0DELE\r\n").as_bytes())
        .await
        .unwrap();
    let r = c.read_imap_response("d").await.unwrap();
    eprintln!("IMAP, NUL in a password literal: {}", r.tagged);
    assert!(
        r.tagged == format!("d NO [AUTHENTICATIONFAILED] {REFUSED}") || r.tagged.starts_with("d BAD "),
        "{r:?}"
    );
    still_served(Proto::Imap, &mut c).await;

    // SMTP, AUTH PLAIN and AUTH LOGIN.
    let smtp_refused = format!("535 5.7.8 {REFUSED}");
    let mut c = smtp_connect(rig.smtp_port()).await;
    c.send("EHLO client.example.org").await.unwrap();
    c.read_smtp_reply().await.unwrap();
    for (user, pw) in [
        ("x\r\nMAIL FROM:<evil@example.org>\r\nDELE 1", "pw"),
        (REC, "pw\r\nRCPT TO:<victim@example.org>"),
    ] {
        c.send(&format!("AUTH PLAIN {}", client::plain_b64(user, pw)))
            .await
            .unwrap();
        assert_eq!(
            c.read_smtp_reply().await.unwrap(),
            vec![smtp_refused.clone()],
            "{user:?}"
        );
    }
    c.send("AUTH LOGIN").await.unwrap();
    assert_eq!(c.read_smtp_reply().await.unwrap(), vec!["334 VXNlcm5hbWU6"]);
    c.send(&client::b64(REC.as_bytes())).await.unwrap();
    assert_eq!(c.read_smtp_reply().await.unwrap(), vec!["334 UGFzc3dvcmQ6"]);
    c.send(&client::b64(b"pw\r\nXCLIENT ADDR=10.0.0.1")).await.unwrap();
    assert_eq!(c.read_smtp_reply().await.unwrap(), vec![smtp_refused.clone()]);
    still_served(Proto::Smtp, &mut c).await;

    for (proto, t) in &tallies {
        assert_eq!(
            t.connections(),
            0,
            "{proto:?}: the upstream was contacted; it received {:?}",
            String::from_utf8_lossy(&t.received())
        );
        assert!(t.received().is_empty());
    }

    // The routes are live: clean credentials do reach the recorders.
    for (proto, t) in &tallies {
        for user in [REC, "clean@example.org"] {
            let (answer, _, _) = try_login(proto.port(&rig), *proto, user, "pw").await;
            assert!(
                !answer.contains(REFUSED) && answer.contains("refused the login"),
                "{proto:?} {user}: {answer}"
            );
        }
        let seen = String::from_utf8_lossy(&t.received()).into_owned();
        assert_eq!(t.connections(), 2, "{proto:?}: {seen}");
        assert!(
            seen.contains("clean@example.org") || seen.contains(&client::plain_b64("clean@example.org", "pw")),
            "{proto:?}: {seen}"
        );
        assert!(
            !seen.contains("DELE") && !seen.contains("XCLIENT") && !seen.contains("DELETE"),
            "{seen}"
        );
    }
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

// ---- 5. a forged log line never appears ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_name_cannot_forge_a_log_line() {
    const FORGED: &str = "2026-12-02T00:00:00.000000Z  INFO forged";
    let (mut rig, mut base) = started(Rig::new("login_failure_delay_max = 0.2", |_| String::new())).await;
    let vault = rig.vault();
    let mut c = smtp_connect(rig.smtp_port()).await;
    c.send("EHLO client.example.org").await.unwrap();
    c.read_smtp_reply().await.unwrap();
    let attempts = [
        // A new line: refused as it stands, but logged.
        format!("alice\n{FORGED}: fake entry"),
        format!("alice\r\n{FORGED}: fake entry after CR LF"),
        format!("alice\r{FORGED}: fake entry after CR"),
        // No line end at all, but terminal controls that would move the
        // cursor back to overwrite the line in a terminal.
        format!("carol\x1b[1A\x1b[2K\r{FORGED}: fake entry over the line above"),
        format!("carol\x1b[1A\x1b[2K{FORGED}: fake entry with escapes"),
        format!("carol\u{85}{FORGED}: fake entry after NEL"),
        format!("carol\u{b}{FORGED}: fake entry after a vertical tab"),
        format!("carol\u{c}{FORGED}: fake entry after a form feed"),
    ];
    for user in &attempts {
        c.send(&format!("AUTH PLAIN {}", client::plain_b64(user, "wrong")))
            .await
            .unwrap();
        let r = c.read_smtp_reply().await.unwrap();
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].starts_with("535 5.7.8 "), "{user:?}: {r:?}");
    }
    still_served(Proto::Smtp, &mut c).await;
    assert!(
        rig.proxy().wait_log("fake entry after a form feed"),
        "every attempt is logged\n{}",
        tail(&rig.logs(), 30)
    );
    let logs = rig.logs();
    // Lines as a terminal, a pager or a log shipper would split them.
    let forged: Vec<&str> = logs
        .split(['\n', '\r', '\u{85}', '\u{b}', '\u{c}'])
        .filter(|l| l.starts_with(FORGED))
        .collect();
    for l in logs.lines().filter(|l| l.contains("fake entry")) {
        eprintln!("logged: {l}");
    }
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
    assert!(!logs.contains('\x1b'), "a terminal escape reached the log");
    assert!(
        logs.contains(&format!("\\n{FORGED}: fake entry")),
        "the login name is logged with its new line escaped\n{}",
        tail(&logs, 30)
    );
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

/// Each log line about a login names that login, once: a client that tries
/// name after name on one connection can neither make later lines blame the
/// first name nor grow every later line of its session by one name per try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_log_line_names_only_the_login_it_is_about() {
    let (mut rig, mut base) = started(Rig::new("login_failure_delay_max = 0.2", |_| String::new())).await;
    let vault = rig.vault();
    let mut c = smtp_connect(rig.smtp_port()).await;
    c.send("EHLO client.example.org").await.unwrap();
    c.read_smtp_reply().await.unwrap();
    let names: Vec<String> = (1..=5).map(|i| format!("nobody{i}@example.org")).collect();
    for n in &names {
        c.send(&format!("AUTH PLAIN {}", client::plain_b64(n, "wrong")))
            .await
            .unwrap();
        let r = c.read_smtp_reply().await.unwrap();
        assert_eq!(r, vec!["535 5.7.8 Authentication failed"], "{n}");
    }
    still_served(Proto::Smtp, &mut c).await;
    assert!(rig.proxy().wait_log("nobody5@example.org"), "{}", tail(&rig.logs(), 20));
    let logs = rig.logs();
    let refusals: Vec<&str> = logs.lines().filter(|l| l.contains("login refused")).collect();
    assert_eq!(
        refusals.len(),
        names.len(),
        "one refusal logged per login\n{}",
        tail(&logs, 20)
    );
    for (line, name) in refusals.iter().zip(&names) {
        let named: Vec<&String> = names.iter().filter(|n| line.contains(n.as_str())).collect();
        assert_eq!(named, vec![name], "the refusal of {name} names {named:?}:\n{line}");
    }
    rig.assert_healthy(&mut base, &vault, None, 0).await;
}

// ---- 6. SIGHUP applies a removed fallback and a new per-address limit ----

fn reloads(w: &World) -> usize {
    w.logs().matches("configuration reloaded").count()
}

/// Writes `cfg`, sends SIGHUP and waits for the reload to be logged.
fn reload(w: &World, cfg: &str) {
    let before = reloads(w);
    w.dir.write_config(cfg);
    w.proxy.as_ref().unwrap().signal(libc::SIGHUP);
    let t0 = Instant::now();
    while reloads(w) <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no `configuration reloaded`:\n{}",
            tail(&w.logs(), 20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens a connection from `from`: the greeting, or the refusal.
async fn open_from(from: [u8; 4], port: u16) -> (tokio::net::TcpStream, String) {
    let mut t = connect_from(from, port).await.unwrap();
    let l = first_line(&mut t, Duration::from_secs(5)).await;
    (t, l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_removed_fallback_and_a_changed_per_address_limit() {
    let mut w = World::with(|_, _| "[limits]\nmax_connections_per_ip = 3\n".to_string());
    let port = w.start();
    let cfg = std::fs::read_to_string(w.dir.config_path()).unwrap();
    let fallback = format!("fallback = \"imaps://localhost:{}\"\n", w.env.dovecot.imaps_port);
    assert!(cfg.contains(&fallback), "{cfg}");

    // An unknown login is passed through to the fallback.
    let (answer, _, mut live) = try_login(port, Proto::Imap, FRANK, FRANK_PW).await;
    assert!(answer.starts_with("a1 OK "), "{answer}");
    assert!(live.imap("s", "SELECT INBOX").await.unwrap().is_ok());

    // Without the fallback it is refused, at once and locally.
    reload(&w, &cfg.replace(&fallback, ""));
    let dovecot_logins = w.upstream_logins();
    let (answer, _, _) = try_login(port, Proto::Imap, FRANK, FRANK_PW).await;
    assert_eq!(answer, "a1 NO [AUTHENTICATIONFAILED] Authentication failed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        w.upstream_logins(),
        dovecot_logins,
        "no upstream contact without a fallback"
    );
    // The session that came through the fallback before goes on.
    assert!(live.imap("n", "NOOP").await.unwrap().is_ok());
    // And back.
    reload(&w, &cfg);
    let (answer, _, _) = try_login(port, Proto::Imap, FRANK, FRANK_PW).await;
    assert!(answer.starts_with("a1 OK "), "the fallback is back: {answer}");

    // max_connections_per_ip = 3, then 5, then 1.
    let ip = [127, 0, 0, 9];
    let refused = "* BYE [UNAVAILABLE] too many connections from your address";
    let mut held = Vec::new();
    for _ in 0..3 {
        let (t, l) = open_from(ip, port).await;
        assert!(l.starts_with("* OK"), "{l}");
        held.push(t);
    }
    assert_eq!(open_from(ip, port).await.1, refused);
    reload(
        &w,
        &cfg.replace("max_connections_per_ip = 3", "max_connections_per_ip = 5"),
    );
    for _ in 0..2 {
        let (t, l) = open_from(ip, port).await;
        assert!(l.starts_with("* OK"), "raised to 5 by SIGHUP: {l}");
        held.push(t);
    }
    assert_eq!(open_from(ip, port).await.1, refused);
    reload(
        &w,
        &cfg.replace("max_connections_per_ip = 3", "max_connections_per_ip = 1"),
    );
    assert_eq!(open_from(ip, port).await.1, refused, "lowered to 1 by SIGHUP");
    let other = [127, 0, 0, 10];
    let (_t, l) = open_from(other, port).await;
    assert!(l.starts_with("* OK"), "{l}");
    assert_eq!(open_from(other, port).await.1, refused, "one per address now");
    drop(held);

    // Still alive, and other sessions are served.
    assert!(w.proxy.as_mut().unwrap().is_running());
    assert!(live.imap("n2", "NOOP").await.unwrap().is_ok());
    reload(&w, &cfg);
    let (answer, _, mut c) = try_login(port, Proto::Imap, BOB, BOB_PW).await;
    assert!(answer.starts_with("a1 OK "), "{answer}");
    assert!(c.imap("s", "SELECT INBOX").await.unwrap().is_ok());
}

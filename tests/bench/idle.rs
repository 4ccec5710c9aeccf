//! Sections 9 and 10 of `scripts/bench`:
//!
//! 9. Idle sessions at scale: N logged-in sessions (default 9,500: the
//!    machine allows 20,000 open files per process, and the proxy holds two
//!    per session) idle through mailproxy, (RSS after - RSS before) / N,
//!    against a light plaintext upstream (`support::light`, passthrough)
//!    and over imaps (Dovecot, OAuth), with HAProxy in TCP mode on the same
//!    load beside it (to the light upstream, and TLS to Dovecot's imaps).
//! 10. A long soak: M churned sessions (default 100,000) through one proxy,
//!     OAuth and passthrough mixed, 20 and 64 at a time, a tenth dropped
//!     mid-command; RSS, open files and live tasks after the first tenth and
//!     at the end.

use std::io;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::support::light::{self, Light, LightTally};
use super::support::mailproxy::{Proxy, ProxyDir};
use super::support::{dovecot, haproxy, process};
use super::{proc_status_kib, settled_rss, Auth, Imap, Target, World, ALICE, LOCAL_PW, START};

/// The OAuth account of the light proxy (its upstream is the light fake)
/// and its local password.
const LIGHT_OAUTH: (&str, &str) = ("light@example.org", LOCAL_PW);

pub struct IdleResult {
    label: &'static str,
    wanted: usize,
    /// Sessions that opened through mailproxy and through HAProxy.
    opened: (usize, usize),
    /// KiB per session: mailproxy, HAProxy.
    per_session: (f64, f64),
    target: f64,
    note: Option<String>,
}

/// What [`per_session`] measured: KiB per session, sessions opened, and a
/// note when fewer opened than wanted.
type PerSession = (f64, usize, Option<String>);

impl IdleResult {
    fn new(label: &'static str, wanted: usize, target: f64, mine: PerSession, theirs: PerSession) -> IdleResult {
        IdleResult {
            label,
            wanted,
            opened: (mine.1, theirs.1),
            per_session: (mine.0, theirs.0),
            target,
            note: mine.2.or(theirs.2),
        }
    }
}

pub struct SoakResult {
    sessions: usize,
    secs: f64,
    /// (RSS KiB, open files, tasks) after the warm-up and at the end.
    warm: (u64, usize, u64),
    end: (u64, usize, u64),
}

/// A proxy in front of the light upstream: passthrough for any name (the
/// listener's fallback) and one OAuth account, metrics on.
struct LightProxy {
    light: Light,
    light_port: u16,
    tally: LightTally,
    _dir: ProxyDir,
    proxy: Proxy,
}

impl LightProxy {
    async fn start(w: &World) -> LightProxy {
        let (port, tally, light) = light::start().await;
        let limits = "max_connections = 20000\nmax_connections_per_ip = 20000\n";
        let (dir, proxy) =
            tokio::task::block_in_place(|| light::proxy(port, &w.env.provider, LIGHT_OAUTH, limits, &w.proxy_log));
        LightProxy {
            light,
            light_port: port,
            tally,
            _dir: dir,
            proxy,
        }
    }

    fn target(&self, i: usize) -> Target {
        passthrough(self.proxy.imap_port(), i)
    }

    /// (RSS KiB, open files, tasks) once no session is open any more.
    async fn settled(&self) -> (u64, usize, u64) {
        let (_, fds, tasks) = light::quiet(&self.proxy, Duration::from_secs(30)).await;
        (settled_rss(&self.proxy).await, fds, tasks)
    }
}

/// A LOGIN any passthrough name gets through to the light upstream. The
/// names vary so that no single name queues (the guard lets few wait).
fn passthrough(port: u16, i: usize) -> Target {
    Target {
        port,
        tls: None,
        auth: Auth::Login {
            user: format!("user{}@light.example", i % 512),
            password: "any pw".into(),
        },
    }
}

/// Opens up to `n` idle sessions (login, SELECT INBOX), 64 at a time; the
/// sessions that opened and the first error.
pub async fn open_sessions(n: usize, target: impl Fn(usize) -> Target) -> (Vec<Imap>, Option<io::Error>) {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (t, sem) = (target(i), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let (mut c, _) = Imap::login(&t, 4096).await?;
            c.command("s", "SELECT INBOX").await?;
            io::Result::Ok(c)
        }));
    }
    let mut open = Vec::with_capacity(n);
    let mut first_err = None;
    for t in tasks {
        match t.await.map_err(io::Error::other).and_then(|r| r) {
            Ok(c) => open.push(c),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    (open, first_err)
}

/// RSS per session (KiB) of process `pid` for `n` idle sessions, and how
/// many opened; a few sessions first so that lazy structures are in "before".
async fn per_session(what: &str, pid: u32, n: usize, target: impl Fn(usize) -> Target) -> io::Result<PerSession> {
    for i in 0..3 {
        let (mut c, _) = Imap::login(&target(i), 4096).await?;
        c.command("s", "SELECT INBOX").await?;
        c.logout().await;
    }
    let before = settled(pid).await;
    let t0 = Instant::now();
    let (mut open, err) = open_sessions(n, target).await;
    let after = settled(pid).await;
    for c in open.iter_mut().take(20) {
        c.command("n", "NOOP").await?;
    }
    let k = open.len().max(1);
    let per = (after as f64 - before as f64) / k as f64;
    progress!(
        "idle {what}: {} of {n} sessions open in {:.1} s; RSS {before} -> {after} KiB => {per:.1} KiB/session",
        open.len(),
        t0.elapsed().as_secs_f64()
    );
    let note = err.map(|e| format!("{what}: {} of {n} opened; first error: {e}", open.len()));
    drop(open);
    // Let both ends close before the next run needs the descriptors.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((per, k, note))
}

/// VmRSS once it stops moving.
async fn settled(pid: u32) -> u64 {
    let mut last = proc_status_kib(pid, "VmRSS");
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = proc_status_kib(pid, "VmRSS");
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// HAProxy in TCP mode in front of `backend` (`ssl`: TLS to it, unverified),
/// `maxconn` connections (it refuses more than its open-files limit allows).
struct Ha {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Ha {
    fn start(backend: u16, ssl: bool, maxconn: usize) -> Ha {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = dovecot::free_ports(1)[0];
        let ssl = if ssl { " ssl verify none" } else { "" };
        let cfg = format!(
            "global\n  maxconn {maxconn}\n\ndefaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n  \
             timeout client 600s\n  timeout server 600s\n\nfrontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n\n\
             backend b\n  server s 127.0.0.1:{backend}{ssl}\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let mut cmd = Command::new(haproxy::bin());
        cmd.args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = process::spawn_tied_to_process(cmd, libc::SIGKILL).expect("start haproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start listening on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ha { child, port, _dir: dir }
    }
}

impl Drop for Ha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Section 9.
pub async fn bench_idle(w: &mut World, n: usize) -> io::Result<Vec<IdleResult>> {
    let maxconn = n + 200;
    // Plaintext: the light upstream, passthrough.
    let lp = LightProxy::start(w).await;
    let mine = per_session("plain mailproxy", lp.proxy.pid(), n, |i| lp.target(i)).await?;
    let light_port = lp.light_port;
    drop(lp.proxy);
    let ha = tokio::task::block_in_place(|| Ha::start(light_port, false, maxconn));
    let theirs = per_session("plain HAProxy", ha.child.id(), n, |i| passthrough(ha.port, i)).await?;
    drop(ha);
    drop(lp.light);
    let plain = IdleResult::new("plain", n, 16.0, mine, theirs);
    // imaps: Dovecot, OAuth through mailproxy; HAProxy with TLS to Dovecot.
    tokio::task::block_in_place(|| w.start_proxy());
    w.warm_proxy().await?;
    let t = w.via_proxy(true);
    let mine = per_session("imaps mailproxy", w.proxy().pid(), n, |_| t.clone()).await?;
    tokio::task::block_in_place(|| w.start_proxy());
    let ha = tokio::task::block_in_place(|| Ha::start(w.env.dovecot.imaps_port, true, maxconn));
    let direct = Target {
        port: ha.port,
        tls: None,
        auth: Auth::Xoauth2 {
            user: ALICE.into(),
            token: w.tokens[0].clone(),
        },
    };
    let theirs = per_session("imaps HAProxy", ha.child.id(), n, |_| direct.clone()).await?;
    drop(ha);
    let imaps = IdleResult::new("imaps", n, 24.0, mine, theirs);
    Ok(vec![plain, imaps])
}

/// Sessions `from..to`, alternately 64 and 20 at a time in blocks of 5,000.
async fn churn(port: u16, from: usize, to: usize) -> io::Result<()> {
    let mut i = from;
    while i < to {
        let end = (i + 5_000).min(to);
        let at_once = if (i / 5_000).is_multiple_of(2) { 64 } else { 20 };
        light::churn(port, i, end, at_once, LIGHT_OAUTH).await?;
        i = end;
    }
    Ok(())
}

/// Section 10.
pub async fn bench_soak(w: &World, total: usize) -> io::Result<SoakResult> {
    let lp = LightProxy::start(w).await;
    let port = lp.proxy.imap_port();
    let warm_n = (total / 10).max(1);
    let t0 = Instant::now();
    churn(port, 0, warm_n).await?;
    let warm = lp.settled().await;
    progress!(
        "soak: {warm_n} sessions (warm-up): RSS {} KiB, {} files, {} tasks",
        warm.0,
        warm.1,
        warm.2
    );
    churn(port, warm_n, total).await?;
    let end = lp.settled().await;
    let secs = t0.elapsed().as_secs_f64();
    progress!(
        "soak: {total} sessions in {secs:.0} s: RSS {} KiB, {} files, {} tasks; upstream saw {} logins",
        end.0,
        end.1,
        end.2,
        lp.tally.logins()
    );
    Ok(SoakResult {
        sessions: total,
        secs,
        warm,
        end,
    })
}

/// Prints section 9; returns the targets missed.
pub fn print_idle(r: &[IdleResult]) -> usize {
    let mut misses = 0;
    println!();
    println!("9. Idle sessions at scale: N logged-in sessions (SELECT INBOX, then idle), VmRSS (after - before) / N");
    println!("   upstream    sessions  mailproxy/session  HAProxy/session  ratio   target");
    for x in r {
        let pass = x.per_session.0 <= x.target;
        misses += usize::from(!pass);
        let opened = if x.opened.0 == x.wanted && x.opened.1 == x.wanted {
            format!("{}", x.wanted)
        } else {
            format!("{}/{}", x.opened.0, x.opened.1)
        };
        println!(
            "   {:<9} {:>10}  {:>12.1} KiB  {:>11.1} KiB  {:>5.2}  <= {:.0} KiB  {}",
            x.label,
            opened,
            x.per_session.0,
            x.per_session.1,
            x.per_session.0 / x.per_session.1,
            x.target,
            super::verdict(pass)
        );
        if let Some(n) = &x.note {
            println!("   ({n})");
        }
    }
    println!("   (plain: passthrough to a light fake upstream in the bench process; imaps: OAuth to Dovecot,");
    println!("    HAProxy in TCP mode with TLS to Dovecot's imaps, the client logging in with XOAUTH2)");
    misses
}

/// Prints section 10; returns the targets missed (flat within 10 %).
pub fn print_soak(s: &SoakResult) -> usize {
    let flat = |a: u64, b: u64, slack: u64| b.abs_diff(a) <= a / 10 + slack;
    let pass = flat(s.warm.0, s.end.0, 2048) && flat(s.warm.1 as u64, s.end.1 as u64, 1) && flat(s.warm.2, s.end.2, 1);
    println!();
    println!(
        "10. Soak: {} churned sessions in {:.0} s (OAuth and passthrough, 20 and 64 at a time, a tenth dropped mid-command)",
        s.sessions, s.secs
    );
    println!(
        "              after warm-up ({}th)       at the end   target",
        s.sessions / 10
    );
    println!("   RSS        {:>14} KiB   {:>10} KiB", s.warm.0, s.end.0);
    println!("   open files {:>18}   {:>14}", s.warm.1, s.end.1);
    println!(
        "   tasks      {:>18}   {:>14}   flat within 10 % (RSS + 2 MiB)  {}",
        s.warm.2,
        s.end.2,
        super::verdict(pass)
    );
    usize::from(!pass)
}

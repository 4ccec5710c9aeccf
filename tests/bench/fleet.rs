//! Section 8 of `scripts/bench`: a fleet. Two `mailproxy serve` instances
//! on one private PostgreSQL (`token_store = "postgres"`, PROXY protocol v2
//! from a trusted balancer) behind a private HAProxy balancing round-robin,
//! against one of them behind the same HAProxy, and against the single
//! instance of the other sections (file store, no balancer). All three
//! serve the same account and INBOX over an imaps upstream.
//!
//! - Logins per second: C clients at once, each logging in and out again
//!   until N logins are done between them (warm: the password is verified
//!   and the access token cached on every instance).
//! - FETCH throughput: S sessions at once, each reading the whole INBOX;
//!   the bytes of all of them over the wall time of the slowest.
//!
//! Each variant runs once per round, in an order that rotates from round
//! to round; medians over the rounds.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::support::haproxy::{Frontend, HaProxy};
use super::support::mailproxy::{oauth_account, Proxy, ProxyDir};
use super::support::postgres::Postgres;
use super::{fetch_once, login_once, median, Auth, Opts, Target, World, ALICE, LOCAL_PW, START};

pub struct FleetResult {
    label: &'static str,
    logins_per_s: Vec<f64>,
    fetch_mbps: Vec<f64>,
}

/// The database, both instances and the balancer, stopped on drop.
struct Fleet {
    _pg: Postgres,
    _dirs: [ProxyDir; 2],
    proxies: [Proxy; 2],
    ha: HaProxy,
}

impl Fleet {
    fn start(w: &World, o: &Opts) -> Fleet {
        let pg = Postgres::start();
        let d = &w.env.dovecot;
        let dirs = [ProxyDir::new(), ProxyDir::new()];
        for dir in &dirs {
            let cfg = dir
                .header()
                .replace(
                    "[server]\n",
                    &format!(
                        "[server]\n{}ca_file = \"{}\"\n",
                        pg.server_settings(),
                        d.ca_pem_path().display()
                    ),
                )
                .replace(
                    "listen = \"127.0.0.1:0\"\n",
                    "listen = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1\"]\n",
                )
                + "[limits]\nmax_connections = 5000\nmax_connections_per_ip = 5000\n\n"
                + &oauth_account(
                    ALICE,
                    &w.env.provider,
                    d,
                    &format!("imaps://localhost:{}", d.imaps_port),
                );
            dir.write_config(&cfg);
        }
        // One `login` stores the account in the database for both.
        let (st, err) = dirs[0].login(ALICE, LOCAL_PW);
        if !st.success() {
            super::die(&format!("mailproxy login {ALICE} into PostgreSQL failed: {err}"));
        }
        let env = [("RUST_LOG", o.proxy_log.as_str())];
        let proxies = [Proxy::start_env(&dirs[0], &env), Proxy::start_env(&dirs[1], &env)];
        let (a, b) = (proxies[0].imap_port(), proxies[1].imap_port());
        let ha = HaProxy::start_with(
            &[
                Frontend {
                    backends: vec![a],
                    send_proxy_v2: true,
                },
                Frontend {
                    backends: vec![a, b],
                    send_proxy_v2: true,
                },
            ],
            4096,
        );
        Fleet {
            _pg: pg,
            _dirs: dirs,
            proxies,
            ha,
        }
    }

    fn target(&self, frontend: usize) -> Target {
        Target {
            port: self.ha.ports[frontend],
            tls: None,
            auth: Auth::Login {
                user: ALICE.into(),
                password: LOCAL_PW.into(),
            },
        }
    }
}

/// `clients` tasks share `total` logins; logins per second over the wall time.
async fn login_rate(t: &Target, clients: usize, total: usize) -> io::Result<f64> {
    let left = Arc::new(AtomicUsize::new(total));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (t, left) = (t.clone(), left.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    login_once(&t).await?;
                }
                io::Result::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(io::Error::other)??;
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

/// `sessions` FETCHes of the whole INBOX at once; MB/s of all of them.
async fn fetch_rate(t: &Target, sessions: usize, bytes: u64, msgs: u64) -> io::Result<f64> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..sessions)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move { fetch_once(&t, bytes, msgs, None).await })
        })
        .collect();
    for task in tasks {
        task.await.map_err(io::Error::other)??;
    }
    Ok(sessions as f64 * bytes as f64 / 1e6 / t0.elapsed().as_secs_f64())
}

pub async fn bench_fleet(w: &World, o: &Opts, bytes: u64, msgs: u64) -> io::Result<Vec<FleetResult>> {
    progress!("fleet: starting PostgreSQL, two instances on it and HAProxy in front");
    let fleet = tokio::task::block_in_place(|| Fleet::start(w, o));
    let variants: [(&'static str, Target); 3] = [
        ("one instance, no balancer (file store)", w.via_proxy(true)),
        ("one instance behind HAProxy (PostgreSQL)", fleet.target(0)),
        ("two instances behind HAProxy (PostgreSQL)", fleet.target(1)),
    ];
    // Warm every instance: the first login there verifies the password
    // (KDF) and loads the token.
    for (_, t) in &variants {
        for _ in 0..4 {
            login_once(t).await?;
        }
    }
    let mut out: Vec<FleetResult> = variants
        .iter()
        .map(|(label, _)| FleetResult {
            label,
            logins_per_s: vec![],
            fetch_mbps: vec![],
        })
        .collect();
    let n = variants.len();
    progress!(
        "fleet: {} rounds of {} logins by {} clients, then {} FETCH sessions at once, per variant",
        o.runs,
        o.fleet_logins,
        o.fleet_clients,
        o.fleet_sessions
    );
    for run in 0..o.runs {
        for k in 0..n {
            let i = (run + k) % n;
            let rate = login_rate(&variants[i].1, o.fleet_clients, o.fleet_logins).await?;
            out[i].logins_per_s.push(rate);
        }
        for k in 0..n {
            let i = (run + k) % n;
            let rate = fetch_rate(&variants[i].1, o.fleet_sessions, bytes, msgs).await?;
            out[i].fetch_mbps.push(rate);
        }
        progress!(
            "fleet round {}/{}: logins/s {} ; MB/s {}",
            run + 1,
            o.runs,
            out.iter()
                .map(|r| format!("{:.0}", r.logins_per_s.last().copied().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(" / "),
            out.iter()
                .map(|r| format!("{:.0}", r.fetch_mbps.last().copied().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    // Both instances must have served: round-robin really spread the load.
    for (i, p) in fleet.proxies.iter().enumerate() {
        let served = p.logs().matches("client=127.0.0.1:").count();
        if served == 0 {
            return Err(io::Error::other(format!(
                "fleet: instance {i} served no connection through HAProxy"
            )));
        }
    }
    Ok(out)
}

/// Prints section 8. No target: the figures say what the balancer hop and
/// the shared store cost, and what a second instance adds on this machine.
pub fn print_fleet(results: &[FleetResult], o: &Opts, bytes: u64) {
    println!();
    println!(
        "8. A fleet: two instances on one PostgreSQL behind HAProxy (round-robin, send-proxy-v2) vs one instance; imaps upstream"
    );
    println!(
        "   logins: {} clients sharing {} warm logins (connect to tagged OK, LOGOUT); FETCH: {} sessions at once, each the whole {:.1} MB INBOX;",
        o.fleet_clients,
        o.fleet_logins,
        o.fleet_sessions,
        bytes as f64 / 1e6
    );
    println!("   medians of {} rounds, order rotating per round", o.runs);
    let base = results.first();
    let (bl, bf) = base
        .map(|b| (median(&b.logins_per_s), median(&b.fetch_mbps)))
        .unwrap_or((f64::NAN, f64::NAN));
    println!(
        "   {:<44} {:>10} {:>10} {:>12} {:>10}",
        "deployment", "logins/s", "ratio", "FETCH MB/s", "ratio"
    );
    for r in results {
        let (l, f) = (median(&r.logins_per_s), median(&r.fetch_mbps));
        println!(
            "   {:<44} {:>10.0} {:>10.2} {:>12.1} {:>10.2}",
            r.label,
            l,
            l / bl,
            f,
            f / bf
        );
    }
    let cpus = std::thread::available_parallelism()
        .map(std::num::NonZero::get)
        .unwrap_or(0);
    println!(
        "   (ratio: against the first row. The client, HAProxy, both instances, PostgreSQL and Dovecot share {cpus} CPUs here,"
    );
    println!("    so a second instance adds availability, not CPU; on separate machines each instance brings its own)");
}

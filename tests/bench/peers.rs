//! Section 7 of `scripts/bench`: the plain path against the peers. The
//! same INBOX read with `FETCH 1:* BODY.PEEK[]`, and logins, through:
//! - nothing (the client to Dovecot's plain imap port, LOGIN);
//! - HAProxy in TCP mode (Debian's package; a pure byte relay);
//! - nginx's mail proxy (Debian's `libnginx-mod-mail`; it answers the
//!   login itself, asks an `auth_http` service where to go, logs in upstream
//!   and relays);
//! - mailproxy passing the password through (`fallback`), the same job as
//!   nginx's;
//! - mailproxy with its OAuth account (local password, XOAUTH2 upstream).
//!
//! Every variant runs once per round, in an order that rotates from round
//! to round; medians over the rounds.

use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::support::haproxy::{self, Frontend, HaProxy};
use super::{fetch_once, login_once, median, proc_cpu_secs, verdict, Auth, Opts, Target, World, PEER, PEER_PW, START};

/// nginx's mail module as Debian ships it.
const NGINX_MAIL_MODULE: &str = "/usr/lib/nginx/modules/ngx_mail_module.so";
const NGINX_BIN: &str = "/usr/sbin/nginx";

/// Which variants are mailproxy (judged against the peers) and which peers.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Peer,
    Mailproxy,
}

pub struct PeerResult {
    label: String,
    kind: Kind,
    fetch_mbps: Vec<f64>,
    login_ms: Vec<f64>,
    /// CPU seconds of the relaying processes over all timed FETCHes (none
    /// for the direct path).
    cpu_s: f64,
    relays: bool,
}

/// A private nginx with only its mail module: one IMAP server on a
/// loopback port, and the `auth_http` answer (a thread here) sending every
/// login to Dovecot's plain imap port. SIGTERM on drop, so that the master
/// takes its workers down with it.
struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// nginx's `auth_http` protocol: a request per login, answered with the
/// server to log in to. Every login goes to `upstream`; Dovecot checks
/// the password.
fn auth_http(upstream: u16) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind auth_http");
    let port = l.local_addr().expect("auth_http addr").port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let mut r = BufReader::new(&conn);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = (&conn).write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {upstream}\r\n\r\n"
                )
                .as_bytes(),
            );
        }
    });
    port
}

impl Nginx {
    fn start(upstream: u16) -> Nginx {
        for p in [NGINX_BIN, NGINX_MAIL_MODULE] {
            if !std::path::Path::new(p).exists() {
                super::die(&format!(
                    "{p} is missing: run scripts/install-deps (Debian's nginx-light and libnginx-mod-mail)"
                ));
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = super::support::dovecot::free_ports(1)[0];
        let auth = auth_http(upstream);
        let d = dir.path().display();
        // proxy_buffer: the relay's buffer per direction, 16k like HAProxy's
        // default (nginx's own default is one page).
        let cfg = format!(
            "load_module {NGINX_MAIL_MODULE};\n\
             worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             mail {{\n  auth_http 127.0.0.1:{auth}/auth;\n  proxy_buffer 16k;\n  proxy_timeout 60s;\n\
               server {{\n    listen 127.0.0.1:{port};\n    protocol imap;\n    imap_auth plain login;\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, cfg).expect("write nginx.conf");
        let mut cmd = Command::new(NGINX_BIN);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = super::support::process::spawn_tied_to_process(cmd, libc::SIGTERM).expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                super::die(&format!("nginx did not start listening on {port}:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, port, _dir: dir }
    }

    /// The master and its workers (the workers relay).
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = super::support::dovecot::child_pids(master);
        pids.push(master);
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// `nginx -v` / `haproxy -v`, first line, for the report.
pub fn version(bin: &str) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            // "HAProxy version 2.6.12-1 2023/…" / "nginx version: nginx/1.22.1"
            let line = String::from_utf8_lossy(&text).lines().next().unwrap_or("").to_string();
            line.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        })
        .unwrap_or_default()
}

pub async fn bench_peers(w: &World, o: &Opts, bytes: u64, msgs: u64) -> io::Result<Vec<PeerResult>> {
    let imap = w.env.dovecot.imap_port;
    let (ha, nginx) = tokio::task::block_in_place(|| {
        let ha = HaProxy::start_with(
            &[Frontend {
                backends: vec![imap],
                send_proxy_v2: false,
            }],
            4096,
        );
        (ha, Nginx::start(imap))
    });
    let password = |port| Target {
        port,
        tls: None,
        auth: Auth::Login {
            user: PEER.into(),
            password: PEER_PW.into(),
        },
    };
    let mp = vec![w.proxy().pid()];
    let variants = [
        ("direct (Dovecot imap, LOGIN)", Kind::Direct, password(imap), vec![]),
        ("HAProxy, TCP mode", Kind::Peer, password(ha.port()), vec![ha.pid()]),
        ("nginx mail proxy", Kind::Peer, password(nginx.port), nginx.pids()),
        (
            "mailproxy, password passed through",
            Kind::Mailproxy,
            password(w.proxy().imap_port()),
            mp.clone(),
        ),
        (
            "mailproxy, OAuth account (XOAUTH2)",
            Kind::Mailproxy,
            w.via_proxy(false),
            mp,
        ),
    ];
    let mut out: Vec<PeerResult> = variants
        .iter()
        .map(|(label, kind, _, pids)| PeerResult {
            label: label.to_string(),
            kind: *kind,
            fetch_mbps: vec![],
            login_ms: vec![],
            cpu_s: 0.0,
            relays: !pids.is_empty(),
        })
        .collect();
    let cpu = |pids: &[u32]| pids.iter().map(|p| proc_cpu_secs(*p)).sum::<f64>();
    progress!("peers: warm-up, one FETCH through each of {} variants", variants.len());
    for (_, _, t, _) in &variants {
        fetch_once(t, bytes, msgs, None).await?;
    }
    let mb = bytes as f64 / 1e6;
    let n = variants.len();
    for run in 0..o.runs {
        for k in 0..n {
            let i = (run + k) % n;
            let c0 = cpu(&variants[i].3);
            let (el, _, _) = fetch_once(&variants[i].2, bytes, msgs, None).await?;
            out[i].cpu_s += cpu(&variants[i].3) - c0;
            out[i].fetch_mbps.push(mb / el.as_secs_f64());
        }
        progress!(
            "peers fetch run {}/{}: {}",
            run + 1,
            o.runs,
            out.iter()
                .map(|r| format!("{:.0}", r.fetch_mbps.last().copied().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    for (_, _, t, _) in &variants {
        for _ in 0..5 {
            login_once(t).await?;
        }
    }
    progress!("peers: {} sequential logins per variant, interleaved", o.login_samples);
    for s in 0..o.login_samples {
        for k in 0..n {
            let i = (s + k) % n;
            out[i].login_ms.push(login_once(&variants[i].2).await?);
        }
    }
    drop((ha, nginx));
    Ok(out)
}

/// Prints section 7; returns how many targets were missed: each mailproxy
/// variant's FETCH median must be ahead of every peer's.
pub fn print_peers(results: &[PeerResult], o: &Opts, bytes: u64) -> usize {
    let mut misses = 0;
    println!();
    println!(
        "7. The plain path against the peers: FETCH 1:* BODY.PEEK[] of the same {:.1} MB INBOX and logins, client plain,",
        bytes as f64 / 1e6
    );
    println!(
        "   Dovecot's plain imap port behind each; medians of {} rounds (FETCH) and {} logins, order rotating per round",
        o.runs, o.login_samples
    );
    println!(
        "   ({}; {}, proxy_buffer 16k, auth_http answered in this process)",
        version(haproxy::bin()),
        version(NGINX_BIN)
    );
    let best_peer = results
        .iter()
        .filter(|r| r.kind == Kind::Peer)
        .map(|r| median(&r.fetch_mbps))
        .fold(0.0, f64::max);
    let direct = results
        .iter()
        .find(|r| r.kind == Kind::Direct)
        .map(|r| median(&r.fetch_mbps))
        .unwrap_or(f64::NAN);
    let direct_login = results
        .iter()
        .find(|r| r.kind == Kind::Direct)
        .map(|r| median(&r.login_ms))
        .unwrap_or(f64::NAN);
    println!(
        "   {:<36} {:>9} {:>10} {:>12} {:>10} {:>12} {:>11} {:>18}",
        "path", "MB/s", "/ direct", "/ best peer", "login", "login adds", "CPU-s/GB", "target"
    );
    for r in results {
        let mbps = median(&r.fetch_mbps);
        let login = median(&r.login_ms);
        let judged = if r.kind == Kind::Mailproxy {
            let pass = mbps > best_peer;
            misses += usize::from(!pass);
            format!("{:>18}  {}", "ahead of the peers", verdict(pass))
        } else {
            String::new()
        };
        let gb = bytes as f64 * r.fetch_mbps.len() as f64 / 1e9;
        let cpu = if r.relays {
            format!("{:.2}", r.cpu_s / gb.max(1e-9))
        } else {
            "-".into()
        };
        println!(
            "   {:<36} {:>9.1} {:>10.3} {:>12.3} {:>7.2} ms {:>+9.2} ms {cpu:>11} {judged}",
            r.label,
            mbps,
            mbps / direct,
            mbps / best_peer,
            login,
            login - direct_login
        );
    }
    println!("   (CPU-s/GB: CPU time of the relaying process(es) per GB relayed, over the timed FETCHes)");
    for r in results {
        let runs: Vec<String> = r.fetch_mbps.iter().map(|x| format!("{x:.0}")).collect();
        println!("   runs {}: [{}]", r.label, runs.join(" "));
    }
    misses
}

//! A private Dovecot 2.3 instance per test: IMAP(S), POP3(S), submission(s) on
//! free loopback ports, OAuth via introspection against the fake provider, plain
//! passwords via a passwd-file, mail stored as `nobody` in Maildirs under a temp dir.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pki::{self, TestCa};

/// Path of the Dovecot binary the harness runs.
pub const DOVECOT_BIN: &str = "/usr/sbin/dovecot";

/// uid/gid mail is stored as (`nobody`/`nogroup` on Debian).
const MAIL_UID: u32 = 65534;
const MAIL_GID: u32 = 65534;

/// Panics with install instructions if Dovecot is missing: tests never skip silently.
pub fn require_dovecot() {
    if !Path::new(DOVECOT_BIN).exists() {
        panic!("dovecot is not installed: run scripts/test (it installs it) or scripts/install-deps");
    }
}

/// Which certificate Dovecot presents (for TLS fault tests).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ServerCert {
    /// Leaf for `localhost`/`127.0.0.1` signed by the test CA (trusted via [`Dovecot::ca_pem_path`]).
    #[default]
    Valid,
    /// Leaf signed by the test CA that expired in 2021.
    Expired,
    /// Self-signed leaf that chains to nothing.
    SelfSigned,
    /// Leaf signed by the test CA but only valid for this DNS name (hostname mismatch).
    WrongName(String),
}

/// Settings for [`Dovecot::start`].
#[derive(Clone, Debug, Default)]
pub struct DovecotOptions {
    /// RFC 7662 introspection endpoint Dovecot's oauth2 passdb POSTs tokens to
    /// (normally `FakeProvider::introspection_url()`). Empty: no oauth2 passdb.
    pub introspection_url: String,
    /// `(user, password)` pairs accepted with PLAIN/LOGIN (passwd-file passdb).
    pub password_users: Vec<(String, String)>,
    /// Users whose Maildir is created up front (any user the provider vouches for can log in).
    pub oauth_users: Vec<String>,
    /// Port of the SMTP server the submission service relays to (e.g. `SmtpSink::port()`).
    /// `None`: relays to a closed port (sending fails, everything else works).
    pub smtp_relay_port: Option<u16>,
    /// Turn on `auth_debug` (+ `auth_verbose`) and the oauth2 `debug` flag: verbose log.
    pub auth_debug: bool,
    /// Certificate the TLS listeners present.
    pub server_cert: ServerCert,
    /// Appended verbatim to the generated `dovecot.conf` (later settings win).
    pub extra_config: String,
}

/// A running private Dovecot. Killed (master + children) on drop.
pub struct Dovecot {
    /// IMAP, plaintext with STARTTLS.
    pub imap_port: u16,
    /// IMAP over implicit TLS.
    pub imaps_port: u16,
    /// POP3, plaintext with STLS.
    pub pop3_port: u16,
    /// POP3 over implicit TLS.
    pub pop3s_port: u16,
    /// Submission (SMTP), plaintext with STARTTLS.
    pub submission_port: u16,
    /// Submission over implicit TLS (RFC 8314).
    pub submissions_port: u16,
    /// Test CA; its cert is the only root clients should trust.
    pub ca: Arc<TestCa>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// `n` distinct free ports: all are held open until every one is chosen, so
/// the kernel cannot hand out the same port twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

impl Dovecot {
    /// Writes the config and starts `dovecot -F`, retrying with new ports if one
    /// got taken between picking and binding. Blocks until all listeners accept
    /// (typically ~100-300 ms). Panics with the log on failure.
    pub fn start(opts: DovecotOptions) -> Dovecot {
        require_dovecot();
        let mut last_err = String::new();
        for _attempt in 0..5 {
            match Self::try_start(&opts) {
                Ok(d) => return d,
                Err((retry, e)) => {
                    last_err = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("could not start dovecot: {last_err}");
    }

    fn try_start(opts: &DovecotOptions) -> Result<Dovecot, (bool, String)> {
        let dir = tempfile::Builder::new()
            .prefix("mailproxy-dovecot-")
            .tempdir()
            .map_err(|e| (false, e.to_string()))?;
        let root = dir.path().to_path_buf();
        // Mail processes run as `nobody` and must traverse into the home dirs.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["run", "state", "home"] {
            std::fs::create_dir(root.join(sub)).unwrap();
        }
        chown(root.join("home"), Some(MAIL_UID), Some(MAIL_GID)).unwrap();

        let ca = Arc::new(TestCa::new(&root));
        let leaf = match &opts.server_cert {
            ServerCert::Valid => ca.server_leaf("server"),
            ServerCert::Expired => ca.expired_leaf("server"),
            ServerCert::SelfSigned => pki::self_signed_leaf(&root, "server"),
            ServerCert::WrongName(n) => ca.leaf_for_names("server", &[n.as_str()]),
        };

        let ports: Vec<u16> = free_ports(6);
        let relay_port = opts.smtp_relay_port.unwrap_or_else(|| free_ports(1)[0]);

        // passwd-file: user:{PLAIN}password:::::: (uid/gid/home come from the static userdb).
        let mut passwd = String::new();
        for (u, p) in &opts.password_users {
            passwd.push_str(&format!("{u}:{{PLAIN}}{p}::::::\n"));
        }
        std::fs::write(root.join("passwd"), passwd).unwrap();

        let oauth_passdb = if opts.introspection_url.is_empty() {
            String::new()
        } else {
            let conf = format!(
                "introspection_mode = post\n\
                 introspection_url = {url}\n\
                 username_attribute = email\n\
                 active_attribute = active\n\
                 active_value = true\n\
                 timeout_msecs = 10000\n\
                 debug = {debug}\n",
                url = opts.introspection_url,
                debug = if opts.auth_debug { "yes" } else { "no" },
            );
            std::fs::write(root.join("oauth2.conf"), conf).unwrap();
            format!(
                "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
                root.join("oauth2.conf").display()
            )
        };

        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let r = root.display();
        let yn = |b: bool| if b { "yes" } else { "no" };
        let config = format!(
            r#"# Generated by tests/it/support/dovecot.rs
instance_name = mailproxy-test-{pid}-{n}
base_dir = {r}/run
state_dir = {r}/state
log_path = {r}/dovecot.log
protocols = imap pop3 submission
listen = 127.0.0.1
hostname = localhost
postmaster_address = postmaster@example.org

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}

disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
# Failed logins are answered after 2 s by default; tests exercise failures a lot.
auth_failure_delay = 0
# (Dovecot still answers a failure only after ~0.5 s: its failure-flush timer.)
auth_verbose = {debug}
auth_debug = {debug}
auth_debug_passwords = no
mail_debug = no

first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_fsync = never
maildir_very_dirty_syncs = yes
mail_max_userip_connections = 1000

{oauth_passdb}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {r}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={r}/home/%u allow_all_users=yes
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {p0}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {p1}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {p2}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {p3}
    ssl = yes
  }}
}}
service submission-login {{
  inet_listener submission {{
    address = 127.0.0.1
    port = {p4}
  }}
  inet_listener submissions {{
    address = 127.0.0.1
    port = {p5}
    ssl = yes
  }}
}}
# Mail processes run as nobody; let them reach the stats socket without warnings.
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}

# Failed logins feed anvil's per-IP auth penalty (2 s, 4 s, ... up to 15 s before
# the next attempt). Every test connects from 127.0.0.1, so switch it off: with
# the socket unusable the auth process disables penalties (it logs one
# "net_connect_unix(anvil-auth-penalty) failed" error at the first failure).
# login_trusted_networks does not exempt from it in 2.3.19.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

submission_relay_host = 127.0.0.1
submission_relay_port = {relay_port}
submission_relay_trusted = yes
submission_relay_ssl = no

{extra}
"#,
            pid = std::process::id(),
            cert = leaf.cert_path.display(),
            key = leaf.key_path.display(),
            debug = yn(opts.auth_debug),
            uid = MAIL_UID,
            gid = MAIL_GID,
            p0 = ports[0],
            p1 = ports[1],
            p2 = ports[2],
            p3 = ports[3],
            p4 = ports[4],
            p5 = ports[5],
            extra = opts.extra_config,
        );
        let conf_path = root.join("dovecot.conf");
        std::fs::write(&conf_path, config).unwrap();

        let mut d = Dovecot {
            imap_port: ports[0],
            imaps_port: ports[1],
            pop3_port: ports[2],
            pop3s_port: ports[3],
            submission_port: ports[4],
            submissions_port: ports[5],
            ca,
            dir,
            child: None,
        };
        for u in opts
            .oauth_users
            .iter()
            .chain(opts.password_users.iter().map(|(u, _)| u))
        {
            d.maildir(u);
        }

        let stderr = std::fs::File::create(root.join("stderr.log")).unwrap();
        let mut cmd = Command::new(DOVECOT_BIN);
        cmd.arg("-F")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // If the test process dies without running Drop, the kernel sends SIGTERM to
        // the master, which then stops its children: no stray dovecots.
        let child = super::process::spawn_tied_to_process(cmd, libc::SIGTERM)
            .map_err(|e| (false, format!("spawn dovecot: {e}")))?;
        d.child = Some(child);

        match d.wait_ready(Duration::from_secs(15)) {
            Ok(()) => Ok(d),
            Err(e) => {
                let log = format!("{e}\n--- stderr ---\n{}\n--- log ---\n{}", d.stderr(), d.log());
                // Another process may grab a port between our pick and Dovecot's bind.
                let retry = log.contains("Address already in use") || log.contains("duplicate listener");
                d.stop();
                Err((retry, log))
            }
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let checks: [(u16, Option<&str>); 6] = [
            (self.imap_port, Some("* OK")),
            (self.pop3_port, Some("+OK")),
            (self.submission_port, Some("220 ")),
            (self.imaps_port, None),
            (self.pop3s_port, None),
            (self.submissions_port, None),
        ];
        for (port, greeting) in checks {
            loop {
                if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    return Err(format!("dovecot exited early: {st}"));
                }
                if Instant::now() > deadline {
                    return Err(format!("port {port} not ready after {timeout:?}"));
                }
                match probe(port, greeting) {
                    Ok(()) => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Ok(())
    }

    /// Host name clients should connect to and verify (the cert covers it and 127.0.0.1).
    pub fn host(&self) -> &'static str {
        "localhost"
    }

    /// PEM file of the test CA that signed the server certificate.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.ca.pem.cert_path.clone()
    }

    /// rustls client config trusting only the test CA.
    pub fn tls_client_config(&self) -> Arc<rustls::ClientConfig> {
        self.ca.client_config()
    }

    /// Instance temp dir (config, logs, homes).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Contents of the Dovecot log (`log_path`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// What the master wrote to stderr (startup errors before logging is set up).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Ensures `~user/Maildir/{cur,new,tmp}` exist (owned by the mail uid) and returns the Maildir path.
    pub fn maildir(&self, user: &str) -> PathBuf {
        let home = self.dir.path().join("home").join(user);
        let md = home.join("Maildir");
        for p in [home.clone(), md.clone(), md.join("cur"), md.join("new"), md.join("tmp")] {
            if !p.exists() {
                std::fs::create_dir_all(&p).unwrap();
                chown(&p, Some(MAIL_UID), Some(MAIL_GID)).unwrap();
            }
        }
        md
    }

    /// Drops `raw` (an RFC 5322 message, CRLF or LF) into `user`'s INBOX as a new
    /// message, as a local delivery agent would (`tmp/` then rename into `new/`).
    /// Returns the file path. Fast enough for multi-10-MB messages.
    pub fn deliver(&self, user: &str, raw: &[u8]) -> PathBuf {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let md = self.maildir(user);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        // Maildir unique name; `S=` lets Dovecot know the size without a stat.
        let name = format!(
            "{}.M{}P{}Q{}.localhost,S={}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            raw.len()
        );
        let tmp = md.join("tmp").join(&name);
        std::fs::write(&tmp, raw).unwrap();
        chown(&tmp, Some(MAIL_UID), Some(MAIL_GID)).unwrap();
        let dest = md.join("new").join(&name);
        std::fs::rename(&tmp, &dest).unwrap();
        dest
    }

    /// Number of message files in `user`'s INBOX (`new/` + `cur/`).
    pub fn message_count(&self, user: &str) -> usize {
        let md = self.maildir(user);
        ["new", "cur"]
            .iter()
            .map(|d| {
                std::fs::read_dir(md.join(d))
                    .map(std::iter::Iterator::count)
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Stops the instance quickly and completely: SIGTERM the master (so it stops
    /// listening and won't respawn anything), SIGKILL its children, reap the master.
    /// Idempotent.
    ///
    /// Why not a plain SIGTERM: the master then waits for its log process (~1 s) and
    /// for login processes that had a connection at the time (~5 s); a test suite
    /// starting dozens of instances cannot afford that, and the state is thrown away.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let master = child.id();
        unsafe {
            libc::kill(master as libc::pid_t, libc::SIGTERM);
        }
        // Give the master a moment to enter shutdown before its children vanish,
        // otherwise it would treat their deaths as crashes and respawn them.
        std::thread::sleep(Duration::from_millis(20));
        let children = child_pids(master);
        for &pid in &children {
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    // Still up (e.g. it forked something late): kill what is left.
                    for pid in child_pids(master) {
                        unsafe {
                            libc::kill(pid as libc::pid_t, libc::SIGKILL);
                        }
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        // The master normally reaps them; wait so callers can rely on "no processes left".
        let deadline = Instant::now() + Duration::from_secs(3);
        for &pid in &children {
            while is_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Children that died after the master are zombies until init reaps them;
        // give it a moment so `ps` is clean right after stop() (don't insist: an
        // init that never reaps must not cost every test seconds).
        let deadline = Instant::now() + Duration::from_millis(300);
        for &pid in &children {
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
        // Debug aid: keep config + logs of every instance for post-mortem.
        if std::env::var_os("MAILPROXY_TEST_KEEP_DOVECOT").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("kept dovecot dir {}", dir.keep().display());
        }
    }
}

/// PIDs whose parent is `ppid` (from /proc/PID/stat).
pub fn child_pids(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((parent, _)) = proc_stat(pid) {
            if parent == ppid {
                out.push(pid);
            }
        }
    }
    out
}

/// (ppid, state) of a process; the comm field may contain spaces, so parse after ')'.
fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Alive and not a zombie (zombies of reparented children are init's business).
fn is_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((_, st)) if st != 'Z' && st != 'X')
}

fn probe(port: u16, greeting: Option<&str>) -> std::io::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    if let Some(g) = greeting {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        if !line.starts_with(g) {
            return Err(std::io::Error::other(format!("unexpected greeting {line:?}")));
        }
    }
    Ok(())
}

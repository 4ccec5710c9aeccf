//! The standard end-to-end setup: private Dovecot, fake provider and a proxy
//! config with one account of each kind.

use super::mailproxy::{oauth_account, Proxy, ProxyDir};
use super::{require_dovecot, Env, LineConn};

pub const ALICE: &str = "alice@example.org";
pub const ALICE_PW: &str = "alice local pw";
pub const CAROL: &str = "carol@example.org";
pub const BOB: &str = "bob@example.org";
pub const BOB_PW: &str = "bob-upstream-pw";
pub const FRANK: &str = "frank@example.org";
pub const FRANK_PW: &str = "frank-upstream-pw";

/// Dovecot + provider + a proxy configured with:
/// alice (OAuth over imaps), carol (OAuth over STARTTLS), bob (password
/// passthrough, plain loopback), and a fallback for unknown logins (imaps).
pub struct World {
    pub env: Env,
    pub dir: ProxyDir,
    pub proxy: Option<Proxy>,
}

impl World {
    pub fn new() -> World {
        Self::with(|_, _| String::new())
    }

    /// Like `new`, with more config appended (it sees the environment and the proxy dir).
    pub fn with(extra: impl FnOnce(&Env, &ProxyDir) -> String) -> World {
        require_dovecot();
        let env = Env::start(&[(BOB, BOB_PW), (FRANK, FRANK_PW)]);
        let dir = ProxyDir::new();
        let d = &env.dovecot;
        let mut cfg = dir.header();
        cfg = cfg.replace(
            "listen = \"127.0.0.1:0\"\n",
            &format!(
                "listen = \"127.0.0.1:0\"\nfallback = \"imaps://localhost:{}\"\n",
                d.imaps_port
            ),
        );
        cfg = cfg.replace(
            "[server]\n",
            &format!("[server]\nca_file = \"{}\"\n", d.ca_pem_path().display()),
        );
        cfg += &imaps_account(ALICE, &env);
        cfg += &oauth_account(
            CAROL,
            &env.provider,
            d,
            &format!("imap+starttls://localhost:{}", d.imap_port),
        );
        cfg += &format!(
            "[accounts.\"{BOB}\"]\nprovider = \"password\"\nimap = \"imap://127.0.0.1:{}\"\n",
            d.imap_port
        );
        cfg += &extra(&env, &dir);
        dir.write_config(&cfg);
        World { env, dir, proxy: None }
    }

    /// Adds `line` to the config's `[server]` table.
    pub fn server_setting(&self, line: &str) {
        let cfg = std::fs::read_to_string(self.dir.config_path())
            .unwrap()
            .replace("[server]\n", &format!("[server]\n{line}\n"));
        self.dir.write_config(&cfg);
    }

    /// Adds `line` to `account`'s table.
    pub fn account_setting(&self, account: &str, line: &str) {
        let table = format!("[accounts.\"{account}\"]\n");
        let cfg = std::fs::read_to_string(self.dir.config_path()).unwrap();
        assert!(cfg.contains(&table), "no table for {account}");
        self.dir
            .write_config(&cfg.replacen(&table, &format!("{table}{line}\n"), 1));
    }

    /// Turns the status page on, on a free port ([`World::status_addr`]).
    pub fn with_status_page(&self) {
        self.server_setting("status_listen = \"127.0.0.1:0\"");
    }

    /// The status page's address, from `serve`'s stdout (read by a thread,
    /// so it may lag behind the other listeners' lines).
    pub fn status_addr(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let found = self
                .proxy
                .as_ref()
                .unwrap()
                .stdout()
                .iter()
                .find_map(|l| l.strip_prefix("listening status ").map(str::to_string));
            if let Some(a) = found {
                return a;
            }
            assert!(std::time::Instant::now() < deadline, "no status listener line");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn authorise(&self, account: &str, pw: &str) {
        let (st, err) = self.dir.login(account, pw);
        assert!(st.success(), "mailproxy login failed: {err}");
    }

    pub fn start(&mut self) -> u16 {
        let p = Proxy::start(&self.dir);
        let port = p.imap_port();
        self.proxy = Some(p);
        port
    }

    pub fn restart(&mut self) -> u16 {
        if let Some(mut p) = self.proxy.take() {
            p.stop();
        }
        self.start()
    }

    pub fn logs(&self) -> String {
        self.proxy
            .as_ref()
            .map(super::mailproxy::Proxy::logs)
            .unwrap_or_default()
    }

    /// Waits (up to 10 s) until the proxy's log holds `needle`: a line
    /// written as a reply goes out may reach the log after the reply.
    pub fn wait_log(&self, needle: &str) -> bool {
        self.proxy.as_ref().is_some_and(|p| p.wait_log(needle))
    }

    /// Lines Dovecot logged for its login processes (each upstream connection leaves some).
    pub fn upstream_logins(&self) -> usize {
        self.env
            .dovecot
            .log()
            .lines()
            .filter(|l| l.contains("imap-login:"))
            .count()
    }
}

/// An OAuth account like alice's: over imaps to the private Dovecot.
pub fn imaps_account(name: &str, env: &Env) -> String {
    oauth_account(
        name,
        &env.provider,
        &env.dovecot,
        &format!("imaps://localhost:{}", env.dovecot.imaps_port),
    )
}

/// `a1 LOGIN` on a new plain IMAP connection to the proxy's `port`, after
/// its `* OK` greeting: the connection and the tagged answer.
pub async fn imap_login(port: u16, user: &str, pw: &str) -> (LineConn, String) {
    let mut c = LineConn::plain(port).await.unwrap();
    let g = c.read_line().await.unwrap();
    assert!(g.starts_with("* OK"), "{g}");
    let r = c.imap("a1", &format!("LOGIN \"{user}\" \"{pw}\"")).await.unwrap();
    (c, r.tagged)
}

/// The tagged answer to `a1 LOGIN` on a new connection.
pub async fn login_response(port: u16, user: &str, pw: &str) -> String {
    imap_login(port, user, pw).await.1
}

/// A new connection logged in as `user`; the login must succeed.
pub async fn login_ok(port: u16, user: &str, pw: &str) -> LineConn {
    let (c, tagged) = imap_login(port, user, pw).await;
    assert!(tagged.starts_with("a1 OK"), "LOGIN {user}: {tagged}");
    c
}

/// Whatever a test did, no password, token, code, verifier or client secret
/// may have reached the proxy's (trace-level) log.
pub fn assert_no_secrets(logs: &str, env: &Env, passwords: &[&str]) {
    let mut secrets = env.provider.all_secrets();
    secrets.push(super::provider::CLIENT_SECRET.to_string());
    secrets.extend(passwords.iter().map(std::string::ToString::to_string));
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret reached the proxy log: {}…",
            &s[..s.len().min(6)]
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Some(p) = &self.proxy {
            assert_no_secrets(&p.logs(), &self.env, &[ALICE_PW, BOB_PW, FRANK_PW]);
        }
    }
}

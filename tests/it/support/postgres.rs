//! A private PostgreSQL from Debian's packages, one per test: `initdb` into
//! a temporary directory owned by an unprivileged system user (PostgreSQL
//! refuses to run as root), listening on 127.0.0.1 and a free port only,
//! its unix socket in the same directory. Trust authentication on loopback:
//! nothing else can reach it. [`Postgres::start_tls`] also turns on TLS
//! with a server certificate from a test CA of its own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The unprivileged user the test databases run as.
pub const USER: &str = "mailproxy-test";

/// Where Debian puts the server binaries (`/usr/lib/postgresql/15/bin`).
pub fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists() && p.join("postgres").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: run scripts/test (it installs postgresql)"
        )
    })
}

fn ids() -> (u32, u32) {
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, USER])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<u32>().ok())
    };
    if id("-u").is_none() {
        // Two tests may race to create it; whoever loses finds it made.
        let _ = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER])
            .stderr(Stdio::null())
            .status();
    }
    match (id("-u"), id("-g")) {
        (Some(u), Some(g)) => (u, g),
        _ => panic!("cannot create the system user {USER} for the test database (useradd); run the tests as root via scripts/test"),
    }
}

/// `cmd` as the unprivileged user, exec'd directly (no wrapper process).
fn as_user(program: &Path, uid: u32, gid: u32) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        "--".into(),
    ])
    .arg(program);
    c
}

pub struct Postgres {
    pub port: u16,
    /// The CA of the server's certificate, when TLS is on.
    ca: Option<PathBuf>,
    child: Child,
    dir: tempfile::TempDir,
    bin: PathBuf,
    uid: u32,
    gid: u32,
}

/// A test CA under `dir/pki` and a server leaf for localhost and 127.0.0.1
/// the server user can read (PostgreSQL refuses a key others can read).
/// Returns the `-c` settings and the CA's path.
fn server_tls(dir: &Path, uid: u32, gid: u32) -> (Vec<String>, PathBuf) {
    let pki = dir.join("pki");
    std::fs::create_dir(&pki).unwrap();
    let ca = super::pki::TestCa::new(&pki);
    let leaf = ca.server_leaf("server");
    for p in [&leaf.cert_path, &leaf.key_path] {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    }
    std::fs::set_permissions(&leaf.key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let settings = vec![
        "ssl=on".to_string(),
        format!("ssl_cert_file={}", leaf.cert_path.display()),
        format!("ssl_key_file={}", leaf.key_path.display()),
    ];
    (settings, ca.cert_path().to_path_buf())
}

impl Postgres {
    pub fn start() -> Postgres {
        Self::start_with(false)
    }

    /// With `ssl = on`, its certificate signed by [`Postgres::ca_path`].
    pub fn start_tls() -> Postgres {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Postgres {
        let bin = bin_dir();
        let (uid, gid) = ids();
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the database directory");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = dir.path().join("data");
        let out = as_user(&bin.join("initdb"), uid, gid)
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "mailproxy",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = super::dovecot::free_ports(1)[0];
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        std::os::unix::fs::chown(dir.path().join("server.log"), Some(uid), Some(gid)).unwrap();
        let (ssl, ca) = if tls {
            let (settings, ca) = server_tls(dir.path(), uid, gid);
            (settings, Some(ca))
        } else {
            (Vec::new(), None)
        };
        let mut cmd = as_user(&bin.join("postgres"), uid, gid);
        for s in &ssl {
            cmd.args(["-c", s]);
        }
        cmd.args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={}", dir.path().display())])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=100", "-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = super::process::spawn_tied_to_process(cmd, libc::SIGQUIT).expect("start postgres");
        let mut pg = Postgres {
            port,
            ca,
            child,
            dir,
            bin,
            uid,
            gid,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = pg
                .tool("createdb")
                .args(["mailproxy"])
                .stderr(Stdio::null())
                .status()
                .expect("run createdb");
            if st.success() {
                break;
            }
            if let Ok(Some(st)) = pg.child.try_wait() {
                panic!("postgres exited early ({st}):\n{}", pg.log());
            }
            assert!(Instant::now() < deadline, "postgres did not start:\n{}", pg.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    fn tool(&self, name: &str) -> Command {
        let mut c = as_user(&self.bin.join(name), self.uid, self.gid);
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "mailproxy"]);
        c
    }

    /// `postgres://mailproxy@127.0.0.1:PORT/mailproxy`
    pub fn url(&self) -> String {
        format!("postgres://mailproxy@127.0.0.1:{}/mailproxy", self.port)
    }

    /// The CA file that signed the server's certificate ([`Postgres::start_tls`]).
    pub fn ca_path(&self) -> &Path {
        self.ca.as_deref().expect("started with start_tls")
    }

    /// The `[server]` lines that keep an instance's records in this database.
    pub fn server_settings(&self) -> String {
        format!("token_store = \"postgres\"\ndatabase_url = \"{}\"\n", self.url())
    }

    /// Runs SQL with psql; returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "mailproxy",
                "-d",
                "mailproxy",
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, nothing to keep.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGQUIT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

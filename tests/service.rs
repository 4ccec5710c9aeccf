//! Daily life: the systemd user unit (checked with the real
//! `systemd-analyze verify --user`), `service install|status|uninstall`,
//! the readiness protocol `serve` speaks to systemd, journal-friendly logs,
//! and the generated completions and man page.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::mailproxy::{Proxy, ProxyDir, BIN};

/// `systemd-analyze` from Debian's `systemd` package, or a clear failure.
fn systemd_analyze() -> &'static str {
    let p = "/usr/bin/systemd-analyze";
    assert!(
        Path::new(p).exists(),
        "systemd-analyze is missing: run scripts/test (it installs the Debian package systemd)"
    );
    p
}

/// `systemd-analyze verify --user UNIT`: exit 0 and not one warning
/// (`--man=no`: the man page the unit names comes with the Debian package).
fn verify_user_unit(unit: &Path, runtime: &Path) {
    let out = Command::new(systemd_analyze())
        .args(["verify", "--user", "--man=no"])
        .arg(unit)
        .env("XDG_RUNTIME_DIR", runtime)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "{}: {err}",
        unit.display()
    );
}

/// Runs mailproxy where no user systemd can be reached (an empty runtime
/// directory, no session bus), so nothing outside the test is touched.
fn mailproxy(dir: &ProxyDir, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["--config", dir.config_path().to_str().unwrap()])
        .args(args)
        .env("XDG_CONFIG_HOME", dir.path().join("xdg-config"))
        .env("XDG_RUNTIME_DIR", dir.path().join("runtime"))
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn service_install_writes_a_unit_systemd_accepts_then_status_and_uninstall() {
    let dir = ProxyDir::new();
    dir.write_config(&dir.header());
    std::fs::create_dir_all(dir.path().join("runtime")).unwrap();
    let (code, out, err) = mailproxy(&dir, &["service", "install"]);
    assert_eq!(code, 0, "{out}{err}");
    let unit = dir.path().join("xdg-config/systemd/user/mailproxy.service");
    assert!(out.contains(&format!("wrote {}", unit.display())), "{out}");
    assert!(
        out.contains("your user's systemd cannot be reached from here")
            && out.contains("  systemctl --user daemon-reload\n")
            && out.contains("  systemctl --user enable --now mailproxy.service\n")
            && out.contains("loginctl enable-linger"),
        "the exact commands are printed: {out}"
    );
    assert!(
        dir.state_dir().is_dir(),
        "the state directory exists before the sandbox needs it"
    );

    let text = std::fs::read_to_string(&unit).unwrap();
    let want = [
        "Type=notify\n".to_string(),
        format!("ExecStart={BIN} --config {} serve\n", dir.config_path().display()),
        "ExecReload=/bin/kill -HUP $MAINPID\n".into(),
        "NoNewPrivileges=yes\n".into(),
        "ProtectSystem=strict\n".into(),
        "PrivateTmp=yes\n".into(),
        format!("ReadWritePaths={}\n", dir.state_dir().display()),
        "WantedBy=default.target\n".into(),
    ];
    for w in &want {
        assert!(text.contains(w.as_str()), "{w:?} in\n{text}");
    }
    verify_user_unit(&unit, &dir.path().join("runtime"));

    // --print shows the same unit and writes nothing.
    let (code, printed, _) = mailproxy(&dir, &["service", "install", "--print"]);
    assert_eq!(code, 0);
    assert_eq!(printed, text);

    let (code, out, _) = mailproxy(&dir, &["service", "status"]);
    assert_eq!(code, 3, "not running: {out}");
    assert!(
        out.contains(&format!("installed: {}", unit.display())) && out.contains("serve: not running"),
        "{out}"
    );

    let (code, out, err) = mailproxy(&dir, &["service", "uninstall"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("removed {}", unit.display())), "{out}");
    assert!(!unit.exists());
    let (code, out, _) = mailproxy(&dir, &["service", "status"]);
    assert_eq!(code, 3);
    assert!(out.contains("not installed"), "{out}");

    // The unit the Debian package ships passes too.
    let (code, packaged, _) = mailproxy(&dir, &["service", "install", "--print", "--packaged"]);
    assert_eq!(code, 0);
    assert!(packaged.contains("ExecStart=/usr/bin/mailproxy serve\n"), "{packaged}");
    assert!(
        packaged.contains("ReadWritePaths=%h/.local/state/mailproxy\n"),
        "{packaged}"
    );
    // verify checks that ExecStart exists: point it at this build.
    let pdir = dir.path().join("packaged");
    std::fs::create_dir_all(&pdir).unwrap();
    let p = pdir.join("mailproxy.service");
    std::fs::write(&p, packaged.replace("/usr/bin/mailproxy", BIN)).unwrap();
    verify_user_unit(&p, &dir.path().join("runtime"));

    // A unit systemd would reject is caught by the same check.
    std::fs::write(&p, packaged.replace("Type=notify", "Type=notfy")).unwrap();
    let out = Command::new(systemd_analyze())
        .args(["verify", "--user", "--man=no"])
        .arg(&p)
        .env("XDG_RUNTIME_DIR", dir.path().join("runtime"))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serve_tells_systemd_ready_reloading_stopping_and_logs_without_timestamps() {
    let dir = ProxyDir::new();
    dir.write_config(&dir.header());
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut p = Proxy::start_env(
        &dir,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("JOURNAL_STREAM", "8:424242"),
        ],
    );
    assert_eq!(recv(&sock), "READY=1\nSTATUS=listening");
    p.signal(libc::SIGHUP);
    assert_eq!(recv(&sock), "RELOADING=1");
    assert_eq!(recv(&sock), "READY=1\nSTATUS=listening; configuration reloaded");
    // A broken config: ready again, the running one in force, and said so.
    dir.write_config("[server\n");
    p.signal(libc::SIGHUP);
    assert_eq!(recv(&sock), "RELOADING=1");
    let st = recv(&sock);
    assert!(
        st.starts_with("READY=1\nSTATUS=listening; reload failed, the running configuration stays in force: "),
        "{st}"
    );
    assert!(!st[8..].contains('\n'), "one status line: {st:?}");
    assert_eq!(p.stop().and_then(|s| s.code()), Some(0));
    assert_eq!(recv(&sock), "STOPPING=1");

    // The journal stamps lines itself: none of ours starts with a timestamp.
    let logs = p.logs();
    assert!(logs.contains("listening"), "{logs}");
    for l in logs.lines() {
        let year = l.get(..4).is_some_and(|y| y.chars().all(|c| c.is_ascii_digit()));
        assert!(!year, "a timestamp under the journal: {l}");
        assert!(!l.contains('\u{1b}'), "no colours under the journal: {l}");
    }
    // Without JOURNAL_STREAM the same lines carry their time.
    dir.write_config(&dir.header());
    let mut p = Proxy::start(&dir);
    assert!(p.wait_log("listening"));
    let first = p.logs().lines().next().unwrap_or_default().to_string();
    assert!(first.get(..2) == Some("20"), "{first}");
    p.stop();
}

#[test]
fn completions_and_the_man_page_are_generated_from_the_cli() {
    let dir = ProxyDir::new();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("complete -F _mailproxy"), "{bash}");
    for sub in ["serve", "login", "add", "service", "completions", "--client-id"] {
        assert!(bash.contains(sub), "bash completes {sub}");
    }
    let f = dir.path().join("c.bash");
    std::fs::write(&f, &bash).unwrap();
    let st = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(st.success(), "the bash completion parses");
    assert!(run(&["completions", "zsh"]).starts_with("#compdef mailproxy\n"));
    assert!(run(&["completions", "fish"]).contains("complete -c mailproxy"));
    let e = Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert!(!e.status.success());

    // scripts/man writes all four files from this binary.
    let out_dir = dir.path().join("man");
    let st = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/man"))
        .arg(&out_dir)
        .env("MAILPROXY_BIN", BIN)
        .status()
        .unwrap();
    assert!(st.success());
    let man = std::fs::read_to_string(out_dir.join("mailproxy.1")).unwrap();
    assert!(man.contains(".TH mailproxy 1"), "{man}");
    for sub in ["serve", "add", "service", "check"] {
        assert!(man.contains(sub), "the man page lists {sub}");
    }
    assert_eq!(std::fs::read_to_string(out_dir.join("mailproxy.bash")).unwrap(), bash);
    assert!(out_dir.join("_mailproxy").exists() && out_dir.join("mailproxy.fish").exists());
}

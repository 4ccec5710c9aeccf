//! Daily life: the systemd user unit (checked with the real
//! `systemd-analyze verify --user`), `service install|status|uninstall`,
//! the readiness protocol `serve` speaks to systemd, journal-friendly logs,
//! and the generated completions and man page.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::mailproxy::{Proxy, ProxyDir, BIN};
use crate::support::system_dirs;

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
    mailproxy_at(Path::new(BIN), &dir.config_path(), dir, args)
}

/// [`mailproxy`] with this binary and config file.
fn mailproxy_at(exe: &Path, config: &Path, dir: &ProxyDir, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(exe)
        .arg("--config")
        .arg(config)
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
    // systemd-analyze reads the user unit directories the .deb test installs into.
    let _system = system_dirs();
    let dir = ProxyDir::new();
    let status = "[server]\nstatus_listen = \"127.0.0.1:8025\"\n";
    dir.write_config(&dir.header().replace("[server]\n", status));
    std::fs::create_dir_all(dir.path().join("runtime")).unwrap();
    let (code, out, err) = mailproxy(&dir, &["service", "install"]);
    assert_eq!(code, 0, "{out}{err}");
    let unit = dir.path().join("xdg-config/systemd/user/mailproxy.service");
    assert!(out.contains(&format!("wrote {}", unit.display())), "{out}");
    assert!(
        out.ends_with("status page: http://127.0.0.1:8025/ (`mailproxy open` opens it)\n"),
        "where to look once it runs: {out}"
    );
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

/// The unit as systemd loaded it: `systemd-analyze verify` at debug level
/// dumps it, with specifiers expanded. Returns the ExecStart command line
/// split into its words (the dump quotes them as a shell would) and the
/// ReadWritePaths line.
fn loaded_unit(unit: &Path, runtime: &Path) -> (Vec<String>, String) {
    let out = Command::new(systemd_analyze())
        .args(["verify", "--user", "--man=no"])
        .arg(unit)
        .env("XDG_RUNTIME_DIR", runtime)
        .env("SYSTEMD_LOG_LEVEL", "debug")
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        dump.lines()
            .find_map(|l| l.trim_start().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in the dump of {}:\n{dump}", unit.display()))
            .to_string()
    };
    let command = field("Command Line: ");
    let mut words = Vec::new();
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        let mut w = String::new();
        if c == '"' {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => w.extend(chars.next()),
                    c => w.push(c),
                }
            }
            chars.next(); // the space after the word
        } else {
            w.push(c);
            w.extend(chars.by_ref().take_while(|c| *c != ' '));
        }
        words.push(w);
    }
    (words, field("ReadWritePaths: "))
}

/// A string for a TOML basic string.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Paths with what systemd would read as specifiers, variables, word
/// breaks and quotes: the unit names them exactly as they are.
#[test]
fn service_install_escapes_specifiers_variables_quotes_and_spaces_in_paths() {
    // systemd-analyze reads the user unit directories the .deb test installs into.
    let _system = system_dirs();
    let dir = ProxyDir::new();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    let odd = dir.path().join("odd dir%h $HOME ${USER} %%");
    let odder = odd.join("\"q\" it's a\\b");
    let state = odder.join("state");
    let config = odder.join("c.toml");
    std::fs::create_dir_all(&odder).unwrap();
    // The binary lives there too (systemd runs no program whose path holds
    // a quote or a backslash): verify checks that ExecStart's program, as
    // systemd reads it, exists and is executable.
    let exe = odd.join("bin").join("mailproxy");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    if std::fs::hard_link(BIN, &exe).is_err() {
        std::fs::copy(BIN, &exe).unwrap();
    }
    std::fs::write(
        &config,
        format!(
            "[server]\nstate_dir = {}\n\n[imap]\nlisten = \"127.0.0.1:0\"\n",
            toml_str(state.to_str().unwrap())
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    let (code, out, err) = mailproxy_at(&exe, &config, &dir, &["service", "install"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("status page"), "none configured: {out}");
    let unit = dir.path().join("xdg-config/systemd/user/mailproxy.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    verify_user_unit(&unit, &runtime);

    let (argv, rw) = loaded_unit(&unit, &runtime);
    // The dump shows the words before variable expansion, where systemd
    // turns `$$` into `$` and any other `$` into a variable's value.
    let cfg = config.to_str().unwrap();
    assert_eq!(
        argv,
        [exe.to_str().unwrap(), "--config", &cfg.replace('$', "$$"), "serve"],
        "ExecStart as systemd reads it, from\n{text}"
    );
    assert_eq!(rw, state.to_str().unwrap(), "ReadWritePaths from\n{text}");
    // `--print` shows the same unit.
    let (code, printed, _) = mailproxy_at(&exe, &config, &dir, &["service", "install", "--print"]);
    assert_eq!(code, 0);
    assert_eq!(printed, text);
}

/// A control character in a path the unit would name is refused, with the
/// path (escaped) in the sentence, and nothing is written.
#[test]
fn service_install_refuses_a_path_with_a_control_character() {
    let dir = ProxyDir::new();
    std::fs::create_dir_all(dir.path().join("runtime")).unwrap();
    let odd = dir.path().join("new\nline");
    std::fs::create_dir_all(&odd).unwrap();
    let config = odd.join("c.toml");
    std::fs::write(&config, dir.header()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let shown = format!("{:?}", config.display().to_string());
    assert!(shown.contains("new\\nline"), "{shown}");
    for args in [&["service", "install"][..], &["service", "install", "--print"]] {
        let (code, out, err) = mailproxy_at(Path::new(BIN), &config, &dir, args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(
            err.contains(&format!(
                "the config file {shown} contains a control character (U+000A): a systemd unit cannot name it"
            )),
            "{args:?}: {err}"
        );
        assert!(!out.contains("ExecStart"), "{args:?}: {out}");
    }
    assert!(!dir.path().join("xdg-config/systemd/user/mailproxy.service").exists());

    // systemd runs no program whose path holds a quote or a backslash.
    std::fs::write(dir.config_path(), dir.header()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.config_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let exe = dir.path().join("it's").join("mailproxy");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    if std::fs::hard_link(BIN, &exe).is_err() {
        std::fs::copy(BIN, &exe).unwrap();
    }
    let (code, out, err) = mailproxy_at(&exe, &dir.config_path(), &dir, &["service", "install"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains(&format!(
            "the mailproxy binary {:?} contains a quote or a backslash",
            exe.display().to_string()
        )),
        "{err}"
    );
    assert!(!dir.path().join("xdg-config/systemd/user/mailproxy.service").exists());
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
    // A page per visible command, from clap's own list of them.
    let cli = run(&["--help"]);
    let commands: Vec<&str> = cli
        .split("Commands:\n")
        .nth(1)
        .unwrap()
        .lines()
        .map_while(|l| l.strip_prefix("  ")?.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.contains(&"login") && commands.contains(&"open"), "{cli}");
    // mailproxy(1) names them all under SEE ALSO; each has its examples.
    let see_also = man
        .split(".SH \"SEE ALSO\"\n")
        .nth(1)
        .expect("mailproxy(1) has SEE ALSO");
    for c in commands {
        let page = std::fs::read_to_string(out_dir.join(format!("mailproxy-{c}.1"))).unwrap();
        assert!(page.contains(&format!(".TH mailproxy-{c} 1")), "{page}");
        assert!(
            page.contains(&format!(".SH EXAMPLES\n.TP\n\\fBmailproxy {c}")),
            "{page}"
        );
        assert!(page.contains(".SH \"SEE ALSO\"\n\\fBmailproxy\\fR(1)"), "{page}");
        let reference = format!("\\fBmailproxy\\-{c}\\fR(1)");
        assert!(see_also.contains(&reference), "{reference} in {see_also}");
    }
    assert!(out_dir.join("mailproxy-service-install.1").exists());
    assert!(
        !out_dir.join("mailproxy-manpage.1").exists(),
        "hidden commands have none"
    );
    assert_eq!(std::fs::read_to_string(out_dir.join("mailproxy.bash")).unwrap(), bash);
    assert!(out_dir.join("_mailproxy").exists() && out_dir.join("mailproxy.fish").exists());
}

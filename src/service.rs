//! `mailproxy service install|uninstall|status`: run `serve` as a systemd
//! user service (Linux) or a launchd agent (macOS). The unit is written
//! where the user's service manager looks; the manager is told only when it
//! can be reached, otherwise the exact commands are printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{xdg_dir, Config};

pub const UNIT: &str = "mailproxy.service";
pub const LAUNCHD_LABEL: &str = "org.mailproxy.serve";

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{cmd}` failed: {why}")]
    Manager { cmd: String, why: String },
    #[error("{0}")]
    Unsupported(String),
    /// A path the unit must name cannot be written in it.
    #[error("{what} {path:?} {why}: a {manager} unit cannot name it; rename or move it")]
    Path {
        what: &'static str,
        path: PathBuf,
        why: String,
        manager: &'static str,
    },
}

/// A path the unit names, as text: absolute (the service manager does not
/// start where this command runs), UTF-8 and without control characters
/// (no unit syntax can carry them: systemd refuses them on a command line,
/// XML 1.0 has no way to write most of them).
fn unit_path_text(what: &'static str, p: &Path, manager: &'static str) -> Result<String, ServiceError> {
    let p = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let refused = |why: String| ServiceError::Path {
        what,
        path: p.clone(),
        why,
        manager,
    };
    let Some(s) = p.to_str() else {
        return Err(refused("is not valid UTF-8".into()));
    };
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(refused(format!(
            "contains a control character (U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(s.to_string())
}

/// `%` starts a specifier everywhere systemd reads a unit: `%%` is a `%`.
fn specifiers_escaped(s: &str) -> String {
    s.replace('%', "%%")
}

/// Double-quoted for systemd's word splitting (systemd.syntax(7),
/// "Quoting") when the text holds a space, a quote or a backslash; inside
/// the quotes a backslash and a double quote are escaped with a backslash.
/// `Exec*=` lines and path lists such as `ReadWritePaths=` split alike.
fn quoted(s: &str) -> String {
    if s.chars().any(|c| c == ' ' || c == '"' || c == '\'' || c == '\\') {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s.to_string()
    }
}

/// One argument of an `ExecStart=` command line: specifiers escaped, `$$`
/// for a `$` (systemd expands `$VAR` in the arguments), then quoted.
fn exec_arg(s: &str) -> String {
    quoted(&specifiers_escaped(s).replace('$', "$$"))
}

/// The program of an `ExecStart=` line (no quotes or backslashes: systemd
/// refuses them there): systemd expands specifiers in it but no variables
/// (systemd.service(5): "the first argument ... may not be a variable"), so
/// a `$` stays as it is.
fn exec_program(s: &str) -> String {
    quoted(&specifiers_escaped(s))
}

/// One entry of a path list such as `ReadWritePaths=`: specifiers but no
/// variables are expanded there.
fn path_entry(s: &str) -> String {
    quoted(&specifiers_escaped(s))
}

/// The directories `serve` writes: the state directory, and the audit
/// log's directory when it lies elsewhere.
fn writable(config: &Config) -> Vec<PathBuf> {
    let mut v = vec![config.state_dir.clone()];
    if let Some(d) = config.audit_log.parent() {
        if !d.starts_with(&config.state_dir) {
            v.push(d.to_owned());
        }
    }
    v
}

/// The systemd user unit for `serve` with this binary and config. Refused
/// when a path cannot be written in it.
pub fn systemd_unit(exe: &Path, config: &Config) -> Result<String, ServiceError> {
    let text = |what, p: &Path| unit_path_text(what, p, "systemd");
    let mut rw = Vec::new();
    for (i, d) in writable(config).iter().enumerate() {
        let what = if i == 0 {
            "the state directory"
        } else {
            "the audit log's directory"
        };
        rw.push(path_entry(&text(what, d)?));
    }
    let program = text("the mailproxy binary", exe)?;
    if program.contains(['"', '\'', '\\']) {
        return Err(ServiceError::Path {
            what: "the mailproxy binary",
            path: PathBuf::from(program),
            why: "contains a quote or a backslash, which systemd refuses in the path of a program".into(),
            manager: "systemd",
        });
    }
    let exec = format!(
        "{} --config {} serve",
        exec_program(&program),
        exec_arg(&text("the config file", &config.path)?)
    );
    Ok(unit_text(&exec, None, &rw.join(" ")))
}

/// The unit the Debian package ships in `/usr/lib/systemd/user`: the
/// default config and state directory of whoever enables it.
pub fn packaged_unit() -> String {
    unit_text(
        "/usr/bin/mailproxy serve",
        Some("+/bin/mkdir -p -m 0700 %h/.local/state/mailproxy"),
        "%h/.local/state/mailproxy",
    )
}

fn unit_text(exec_start: &str, pre: Option<&str>, rw: &str) -> String {
    let pre = pre
        .map(|p| format!("# The sandbox below makes the home directory read-only: create the state directory first.\nExecStartPre={p}\n"))
        .unwrap_or_default();
    format!(
        "# Written by `mailproxy service install`; `mailproxy service uninstall` removes it.
[Unit]
Description=mailproxy, a local authenticating mail proxy (OAuth 2.0 for IMAP, SMTP and POP3 clients)
Documentation=man:mailproxy(1)

[Service]
Type=notify
NotifyAccess=main
{pre}ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ReadWritePaths={rw}
UMask=0077

[Install]
WantedBy=default.target
"
    )
}

/// Text for a plist `<string>`: the XML markup characters as entities.
fn xml_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The launchd agent for `serve` (macOS). launchd runs the arguments as
/// they are (no shell, no expansion); refused when a path cannot be
/// written in XML.
pub fn launchd_plist(exe: &Path, config: &Config) -> Result<String, ServiceError> {
    let text = |what, p: &Path| unit_path_text(what, p, "launchd").map(|s| xml_text(&s));
    let exe = text("the mailproxy binary", exe)?;
    let cfg = text("the config file", &config.path)?;
    let log = text("the state directory", &config.state_dir)?;
    Ok(format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>{LAUNCHD_LABEL}</string>
  <key>ProgramArguments</key>
  <array><string>{exe}</string><string>--config</string><string>{cfg}</string><string>serve</string></array>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>
  <key>StandardErrorPath</key><string>{log}/serve.log</string>
</dict>
</plist>
"#
    ))
}

/// Where the unit goes: `$XDG_CONFIG_HOME/systemd/user/mailproxy.service`,
/// or `~/Library/LaunchAgents/org.mailproxy.serve.plist` on macOS.
pub fn unit_path() -> PathBuf {
    if cfg!(target_os = "macos") {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join("Library/LaunchAgents").join(format!("{LAUNCHD_LABEL}.plist"))
    } else {
        xdg_dir("XDG_CONFIG_HOME", ".config").join("systemd/user").join(UNIT)
    }
}

/// Whether the user's systemd instance answers.
pub fn user_systemd_reachable() -> bool {
    Command::new("systemctl")
        .args(["--user", "show-environment"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &[&str]) -> Result<String, ServiceError> {
    let shown = cmd.join(" ");
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| ServiceError::Manager {
            cmd: shown.clone(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ServiceError::Manager {
            cmd: shown,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_unit(path: &Path, text: &str) -> Result<(), ServiceError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| ServiceError::Io { path: p, source }
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    std::fs::write(path, text).map_err(io(path))
}

/// Writes the unit and starts it (or says how). Returns the lines to print.
pub fn install(exe: &Path, config: &Config) -> Result<Vec<String>, ServiceError> {
    let path = unit_path();
    let mut out = Vec::new();
    if cfg!(target_os = "macos") {
        write_unit(&path, &launchd_plist(exe, config)?)?;
        out.push(format!("wrote {}", path.display()));
        let uid = crate::sys::euid();
        let target = format!("gui/{uid}");
        let p = path.display().to_string();
        let _ = run(&["launchctl", "bootout", &target, &p]);
        run(&["launchctl", "bootstrap", &target, &p])?;
        out.push(format!("started {LAUNCHD_LABEL}; it starts again at every login"));
        return Ok(out);
    }
    if !cfg!(target_os = "linux") {
        return Err(ServiceError::Unsupported(
            "mailproxy service knows systemd (Linux) and launchd (macOS); run `mailproxy serve` from your system's service manager".into(),
        ));
    }
    write_unit(&path, &systemd_unit(exe, config)?)?;
    out.push(format!("wrote {}", path.display()));
    let cmds: [&[&str]; 2] = [
        &["systemctl", "--user", "daemon-reload"],
        &["systemctl", "--user", "enable", "--now", UNIT],
    ];
    if user_systemd_reachable() {
        for c in cmds {
            run(c)?;
        }
        out.push(format!(
            "enabled and started {UNIT}; `journalctl --user -u mailproxy` shows its log, `systemctl --user reload mailproxy` re-reads the config"
        ));
    } else {
        out.push("your user's systemd cannot be reached from here; start the service with:".into());
        for c in cmds {
            out.push(format!("  {}", c.join(" ")));
        }
    }
    out.push(format!(
        "to keep it running while you are logged out: loginctl enable-linger {}",
        std::env::var("USER").unwrap_or_else(|_| "$USER".into())
    ));
    Ok(out)
}

/// Stops and removes the unit (or says how to stop it).
pub fn uninstall() -> Result<Vec<String>, ServiceError> {
    let path = unit_path();
    let mut out = Vec::new();
    if cfg!(target_os = "macos") {
        let target = format!("gui/{}", crate::sys::euid());
        let _ = run(&["launchctl", "bootout", &target, &path.display().to_string()]);
    } else if user_systemd_reachable() {
        let _ = run(&["systemctl", "--user", "disable", "--now", UNIT]);
        out.push(format!("stopped and disabled {UNIT}"));
    } else if path.exists() {
        out.push(format!(
            "your user's systemd cannot be reached from here; if the service runs, stop it with: systemctl --user disable --now {UNIT}"
        ));
    }
    match std::fs::remove_file(&path) {
        Ok(()) => out.push(format!("removed {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.push(format!("{} was not installed", path.display())),
        Err(source) => return Err(ServiceError::Io { path, source }),
    }
    if !cfg!(target_os = "macos") && user_systemd_reachable() {
        let _ = run(&["systemctl", "--user", "daemon-reload"]);
    }
    Ok(out)
}

/// Whether the unit is installed, and what the service manager says.
pub fn status() -> (bool, Vec<String>) {
    let path = unit_path();
    let installed = path.exists();
    let mut out = vec![if installed {
        format!("installed: {}", path.display())
    } else {
        format!(
            "not installed ({} does not exist); run `mailproxy service install`",
            path.display()
        )
    }];
    if installed && !cfg!(target_os = "macos") {
        if user_systemd_reachable() {
            match run(&["systemctl", "--user", "is-active", UNIT]) {
                Ok(s) => out.push(format!("systemd: {}", s.trim())),
                Err(ServiceError::Manager { .. }) => out.push("systemd: not running".into()),
                Err(e) => out.push(e.to_string()),
            }
        } else {
            out.push("systemd: your user's systemd cannot be reached from here".into());
        }
    }
    (installed, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_and_escaped_for_systemd() {
        assert_eq!(quoted("/a/b"), "/a/b");
        assert_eq!(quoted("/a b/c\"d"), "\"/a b/c\\\"d\"");
        assert_eq!(quoted("/a'b\\c"), "\"/a'b\\\\c\"");
        assert_eq!(exec_arg("/h%h/$HOME"), "/h%%h/$$HOME");
        assert_eq!(exec_program("/h%h/$x"), "/h%%h/$x");
        assert_eq!(path_entry("/h %h/$HOME"), "\"/h %%h/$HOME\"");
    }

    fn config_at(path: &str, state: &str) -> Config {
        Config::parse(
            &format!("[server]\nstate_dir = \"{state}\"\n\n[imap]\nlisten = \"127.0.0.1:0\"\n"),
            Path::new(path),
        )
        .unwrap()
    }

    #[test]
    fn control_characters_and_quoted_programs_are_refused() {
        let exe = Path::new("/usr/bin/mailproxy");
        let e = systemd_unit(exe, &config_at("/a\tb/c.toml", "/s"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "the config file \"/a\\tb/c.toml\" contains a control character (U+0009): a systemd unit cannot name it; rename or move it"
        );
        let e = systemd_unit(exe, &config_at("/c.toml", "/s\\u001bt"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("the state directory \"/s\\u{1b}t\" contains a control character (U+001B)"),
            "{e}"
        );
        let e = launchd_plist(exe, &config_at("/a\u{7f}/c.toml", "/s"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a launchd unit cannot name it"), "{e}");
        let e = systemd_unit(Path::new("/o'k/mailproxy"), &config_at("/c.toml", "/s"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("the mailproxy binary \"/o'k/mailproxy\" contains a quote"),
            "{e}"
        );
    }

    #[test]
    fn the_plist_escapes_markup() {
        let p = launchd_plist(Path::new("/b<&>/mailproxy"), &config_at("/c \"'&.toml", "/s&")).unwrap();
        assert!(
            p.contains("<string>/b&lt;&amp;&gt;/mailproxy</string><string>--config</string><string>/c &quot;&apos;&amp;.toml</string>"),
            "{p}"
        );
        assert!(p.contains("<string>/s&amp;/serve.log</string>"), "{p}");
    }
}

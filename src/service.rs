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
}

/// A path as one systemd command-line word (quoted when it has spaces).
fn word(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\') {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
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

/// The systemd user unit for `serve` with this binary and config.
pub fn systemd_unit(exe: &Path, config: &Config) -> String {
    let rw: Vec<String> = writable(config).iter().map(|p| word(p)).collect();
    unit_text(
        &format!("{} --config {} serve", word(exe), word(&config.path)),
        None,
        &rw.join(" "),
    )
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

/// The launchd agent for `serve` (macOS).
pub fn launchd_plist(exe: &Path, config: &Config) -> String {
    let esc = |p: &Path| {
        p.display()
            .to_string()
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let log = esc(&config.state_dir.join("serve.log"));
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>{LAUNCHD_LABEL}</string>
  <key>ProgramArguments</key>
  <array><string>{}</string><string>--config</string><string>{}</string><string>serve</string></array>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>
  <key>StandardErrorPath</key><string>{log}</string>
</dict>
</plist>
"#,
        esc(exe),
        esc(&config.path)
    )
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
        write_unit(&path, &launchd_plist(exe, config))?;
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
    write_unit(&path, &systemd_unit(exe, config))?;
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
    fn paths_with_spaces_are_quoted() {
        assert_eq!(word(Path::new("/a/b")), "/a/b");
        assert_eq!(word(Path::new("/a b/c\"d")), "\"/a b/c\\\"d\"");
    }
}
